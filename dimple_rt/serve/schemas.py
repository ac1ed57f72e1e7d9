# SPDX-License-Identifier: Apache-2.0
"""The OpenAI chat-completions request, checked field by field into a :class:`ChatRequest`, and the response
and chunk bodies.

Accepted OpenAI fields: model, messages, max_tokens (or max_completion_tokens: the canvas length), temperature,
top_p, seed, stop, n (1 only), stream, stream_options.include_usage, user (ignored). Fields that clients send
with their defaults are accepted at values that change nothing here (:data:`DEFAULTS_ONLY`: no penalties, no
logprobs, text output, no tools, nothing stored...); any other value is a 400 that names the field. Dimple's own
options go in the ``dimple`` extension object (:data:`DIMPLE_OPTIONS`). Any other field is a 400 that names it;
the decoding options are validated by :class:`~dimple_rt.config.GenerationConfig`, whose message is passed on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimple_rt.config import MAX_NEW_TOKENS, GenerationConfig, check_int
from dimple_rt.presets import Preset, options_over_preset

from .errors import APIError, bad_request
from .images import DEFAULT_LIMITS, ImageLimits, load_request_image

OPENAI_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "dimple",
)


def _is_zero(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _is_string_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


DEFAULTS_ONLY: dict[str, tuple[Callable[[object], bool], str]] = {
    "presence_penalty": (_is_zero, "0 (there are no penalties)"),
    "frequency_penalty": (_is_zero, "0 (there are no penalties)"),
    "logit_bias": (lambda v: v == {}, "{} (no bias)"),
    "logprobs": (lambda v: v is False, "false (no log probabilities)"),
    "top_logprobs": (_is_zero, "0 (no log probabilities)"),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"} (plain text)'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "tools": (lambda v: v == [], "[] (no tools)"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" or "auto" (there are no tools)'),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "true or false (there are no tools)"),
    "functions": (lambda v: v == [], "[] (no functions)"),
    "function_call": (lambda v: v in ("none", "auto"), '"none" or "auto" (there are no functions)'),
    "store": (lambda v: v is False, "false (nothing is stored)"),
    "metadata": (_is_string_map, "an object of strings (ignored: nothing is stored)"),
    "service_tier": (lambda v: v in ("auto", "default"), '"auto" or "default"'),
    "safety_identifier": (lambda v: isinstance(v, str), "a string (ignored)"),
    "prompt_cache_key": (lambda v: isinstance(v, str), "a string (ignored)"),
}
"""OpenAI fields accepted only at values that change nothing on this server: name → (test, what is accepted).
null counts as absent."""

DIMPLE_OPTIONS = (
    "alg",
    "threshold",
    "steps",
    "template",
    "response_length",
    "eps",
    "top_k",
    "alg_temp",
    "use_original_confidence",
    "pipeline",
    "prefill",
    "cache",
    "block_length",
    "refresh_every",
    "early_stop",
    "block_start",
    "refresh_prompt",
    "validate_categorical",
    "preset",
    "stream_canvas",
)
"""Keys of the ``dimple`` extension object: GenerationConfig fields, the structure priors, a ``preset`` name
(whose options the others override; default: the server's), and stream_canvas (send the whole canvas after
every step as an extension chunk)."""
ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_TEXT_CHARS = 1_000_000
"""Text characters over all messages: far more than any model's positions, far less than a slow tokenization."""


@dataclass
class ChatRequest:
    """A checked request. messages are in Runtime's format (image items hold decoded PIL images); options are
    GenerationConfig fields (no max_new_tokens: that is ``max_tokens``)."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    response_length: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    stream_canvas: bool = False


def parse_chat_request(
    body: object,
    *,
    model_name: str,
    image_dir: Path | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    preset: Preset | None = None,
) -> ChatRequest:
    """Check a decoded JSON body; raises :class:`APIError` (400, or 404 for another model's name). ``preset``:
    the server's, whose options a request's own start from (as ``Runtime.generate`` applies them)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in DEFAULTS_ONLY:
            accepts, accepted = DEFAULTS_ONLY[key]
            if value is not None and not accepts(value):
                raise bad_request(
                    f"{key}={json.dumps(value)[:200]} is not supported; this server accepts {key} = {accepted} only",
                    key,
                    code="unsupported_value",
                )
        elif key not in OPENAI_FIELDS:
            raise bad_request(
                f"unsupported field {key!r}: this server accepts {', '.join(OPENAI_FIELDS)}, and "
                f"{', '.join(DEFAULTS_ONLY)} at their defaults (Dimple's options go in 'dimple': "
                f"{', '.join(DIMPLE_OPTIONS)})",
                key,
                code="unsupported_field",
            )
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request(f"'model' is required: a string, {model_name!r} on this server", "model")
    if model != model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist on this server; it serves {model_name!r}",
            param="model",
            code="model_not_found",
        )
    request = ChatRequest(model=model, messages=_messages(body.get("messages"), image_dir, limits))

    max_tokens = body.get("max_tokens")
    if body.get("max_completion_tokens") is not None:
        if max_tokens is not None and max_tokens != body["max_completion_tokens"]:
            raise bad_request("give max_tokens or max_completion_tokens, not two different values", "max_tokens")
        max_tokens = body["max_completion_tokens"]
    if max_tokens is not None:
        _check(lambda: check_int("max_tokens", max_tokens, 1, MAX_NEW_TOKENS), "max_tokens")
    request.max_tokens = max_tokens

    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request(f"n must be 1 (one answer per request), got {n!r}", "n")
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            request.options[name] = body[name]
    request.stop = _stop(body.get("stop"))
    request.stream = _bool(body.get("stream", False), "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options may only hold include_usage (true or false)", "stream_options")
        request.include_usage = _bool(options.get("include_usage", False), "stream_options.include_usage")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("user must be a string", "user")

    dimple = body.get("dimple")
    if dimple is not None:
        if not isinstance(dimple, dict):
            raise bad_request(f"dimple must be an object with some of {', '.join(DIMPLE_OPTIONS)}", "dimple")
        for key, value in dimple.items():
            if key not in DIMPLE_OPTIONS:
                raise bad_request(
                    f"unknown Dimple option {key!r}; the dimple object accepts {', '.join(DIMPLE_OPTIONS)}",
                    f"dimple.{key}",
                    code="unsupported_field",
                )
            if key == "template":
                if value is not None and not isinstance(value, str):
                    raise bad_request("dimple.template must be a string with <mask:N> spans", "dimple.template")
                request.template = value
            elif key == "response_length":
                if value is not None:
                    _check(lambda v=value: check_int("response_length", v, 0, MAX_NEW_TOKENS), "dimple.response_length")
                request.response_length = value
            elif key == "stream_canvas":
                request.stream_canvas = _bool(value, "dimple.stream_canvas")
            elif value is not None or key == "threshold":  # threshold None means off; the others mean default
                request.options[key] = value
    _check_options(request, preset)
    return request


def _check(check: Any, param: str) -> None:
    try:
        check()
    except (ValueError, TypeError) as err:
        raise bad_request(str(err), param) from None


def _check_options(request: ChatRequest, preset: Preset | None) -> None:
    """GenerationConfig validates every option over the preset's (the request's own, else the server's); its
    message names the option, which becomes the param."""
    try:
        options = options_over_preset(request.options, preset)
    except ValueError as err:  # only a bad preset name can fail here
        raise bad_request(str(err), "dimple.preset") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. entropy + threshold: allowed, it only warns
        try:
            GenerationConfig(max_new_tokens=request.max_tokens or 1, **options)
        except (ValueError, TypeError) as err:
            message = str(err)
            name = re.match(r"\w+", message)
            option = name.group(0) if name else None
            param = None
            if option in ("temperature", "top_p", "seed"):
                param = option
            elif option in {f.name for f in dataclasses.fields(GenerationConfig)}:
                param = f"dimple.{option}"
            raise bad_request(message, param) from None


def _bool(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"{param} must be true or false, got {value!r}", param)
    return value


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stops


def _messages(messages: object, image_dir: Path | None, limits: ImageLimits) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    converted, images, text_chars = [], 0, 0
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad_request(f"{where}: unsupported field {min(extra)!r} (role, content only)", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            text_chars += len(content)
            converted.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise bad_request(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        parts = []
        for p, part in enumerate(content):
            at = f"{where}.content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                    raise bad_request(f"{at}: a text part is {{'type': 'text', 'text': <string>}}", at)
                text_chars += len(part["text"])
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise bad_request(f"{at}: only user messages may carry images", at)
                images += 1
                if images > limits.max_images:
                    raise bad_request(
                        f"too many images: at most {limits.max_images} per request on this server",
                        at,
                        "too_many_images",
                    )
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if isinstance(image_url, dict) and set(image_url) - {"url", "detail"}:
                    raise bad_request(f"{at}.image_url may hold url and detail only", f"{at}.image_url")
                image = load_request_image(url, f"{at}.image_url.url", image_dir, limits)
                parts.append({"type": "image", "image": image})
            else:
                raise bad_request(
                    f"{at}: unsupported content part (type {kind!r}); use {{'type': 'text', 'text': ...}} or "
                    "{'type': 'image_url', 'image_url': {'url': ...}}",
                    at,
                )
        converted.append({"role": role, "content": parts})
    if text_chars > MAX_TEXT_CHARS:
        raise bad_request(
            f"the messages hold {text_chars} characters of text; at most {MAX_TEXT_CHARS} are accepted", "messages"
        )
    return converted


# Responses --------------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(
    cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int], extension: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` object; ``extension`` is Dimple's ``dimple`` field (forward passes, seconds, ...)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage,
        "dimple": extension,
    }


def chunk_body(
    cid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta`` None gives an empty choices list (the usage and canvas chunks)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }
