# SPDX-License-Identifier: Apache-2.0
"""Structure priors (Dimple spec §5): a response canvas that mixes fixed tokens and mask spans.

The authors' code has no API for them, only the step-``None`` tokens hook that may overwrite canvas positions
before the first forward. We build the initial canvas here instead; the effect is identical: fixed tokens are
never masks, so they are never resampled, they are visible to every position, and they reduce the mask count
that the schedule divides by.

Template syntax: literal text with ``<mask:N>`` spans, e.g. ``"Answer: <mask:4>. Reason: <mask:24>"``. Each text
piece is tokenised on its own (BPE merges never cross a span). ``response_length=k`` fills positions ``k..`` with
``<|endoftext|>``, the terminator Dimple was trained to pad answers with, which forces the answer to ≤ k tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dimple_rt.config import MAX_NEW_TOKENS

MASK_SPAN = re.compile(r"<mask:(\d+)>")


def parse_template(
    template: str, encode: Callable[[str], list[int]], mask_token_id: int, max_length: int = MAX_NEW_TOKENS
) -> list[int]:
    """Canvas ids of ``template``: its text pieces tokenised, ``<mask:N>`` spans as N mask ids; ValueError
    (before anything is built) when it would be longer than ``max_length`` tokens."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string, got {type(template).__name__}")
    if len(template) > 16 * max_length:
        raise ValueError(f"template has {len(template)} characters; at most {16 * max_length} are accepted")
    pieces = MASK_SPAN.split(template)  # [text, N, text, N, ..., text]
    masks = sum(int(piece) for piece in pieces[1::2])
    if masks > max_length:
        raise ValueError(f"the template's mask spans hold {masks} masks; at most {max_length} fit in a canvas")
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            if int(piece) < 1:
                raise ValueError(f"template span <mask:{piece}> must hold at least one mask")
            ids.extend([mask_token_id] * int(piece))
        elif "<mask" in piece:
            raise ValueError(f"template {template!r} has a malformed mask span: write <mask:N>, N a positive integer")
        elif piece:
            ids.extend(encode(piece))
    if len(ids) > max_length:
        raise ValueError(f"the template is {len(ids)} tokens long; at most {max_length} fit in a canvas")
    return ids


def build_canvas(
    mask_token_id: int,
    terminator_id: int,
    max_new_tokens: int | None,
    template_ids: list[int] | None = None,
    response_length: int | None = None,
    default_length: int = 64,
) -> list[int]:
    """The initial response canvas: masks, the template at its start, terminators from ``response_length`` on.

    Its length is ``max_new_tokens``, or without it the template's length (at least ``response_length``), else
    ``default_length``. A template longer than the canvas or than ``response_length`` is an error, not a cut.
    """
    template_ids = list(template_ids or [])
    if max_new_tokens is None:
        max_new_tokens = max(len(template_ids), response_length or 0) or default_length
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if len(template_ids) > max_new_tokens:
        raise ValueError(f"the template has {len(template_ids)} tokens, more than max_new_tokens={max_new_tokens}")
    canvas = template_ids + [mask_token_id] * (max_new_tokens - len(template_ids))
    if response_length is not None:
        if not 0 <= response_length <= max_new_tokens:
            raise ValueError(f"response_length must be in [0, max_new_tokens={max_new_tokens}], got {response_length}")
        if len(template_ids) > response_length:
            raise ValueError(
                f"the template has {len(template_ids)} tokens, more than response_length={response_length}"
            )
        canvas[response_length:] = [terminator_id] * (max_new_tokens - response_length)
    return canvas
