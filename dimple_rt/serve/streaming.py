# SPDX-License-Identifier: Apache-2.0
"""Append-only text deltas from a diffusion canvas.

OpenAI's stream deltas only ever append, but a diffusion canvas unmasks in any order. So the stream carries the
committed left-to-right prefix: a token is sent once it and every token left of it are unmasked. Text is held
back while it could still change: a trailing U+FFFD (half of a multi-byte character), and the last characters
that could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .scheduler import cut_at_stop


class CommittedPrefix:
    """Turns successive canvases of one request into text deltas; ``sent`` is everything sent so far."""

    def __init__(self, tokenizer: Any, mask_id: int, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def update(self, canvas: Sequence[int]) -> str:
        """The delta after a step; ``canvas`` is the whole canvas (masks included)."""
        if self.stopped:
            return ""
        end = canvas.index(self.mask_id) if self.mask_id in canvas else len(canvas)
        prefix = list(canvas[:end])
        answer = self.tokenizer.answer_ids(prefix)
        final = len(answer) < len(prefix) or end == len(canvas)  # a terminator, or nothing masked: it is the answer
        text = self.tokenizer.decode(answer)
        cut = cut_at_stop(text, self.stops)
        if cut is not None:
            text, final, self.stopped = cut, True, True
        if not final:
            text = text[: max(0, len(text) - self.hold)].rstrip("\ufffd")
        return self._advance(text)

    def finish(self, text: str) -> str:
        """The last delta, given the request's final text (the non-streamed answer)."""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding a longer prefix changed earlier text: wait, never rewrite
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
