# SPDX-License-Identifier: Apache-2.0
"""The one error type of the server: an HTTP status plus OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``, whose message says what to fix."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client. ``param`` names the request field at fault (``messages[0].content[1]``,
    ``dimple.threshold``), or None; ``headers`` go on the response (``Retry-After`` with a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)
