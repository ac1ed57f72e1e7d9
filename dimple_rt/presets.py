# SPDX-License-Identifier: Apache-2.0
"""Named bundles of load and decoding options, so that a user can pick "exact" or "fast" without reading
every option's doc. ``Runtime(model, preset=...)`` applies a preset's quantization at load and its decoding
options to every ``generate``/``stream`` call; options passed to a call override the preset's.

What each preset trades is measured in ``benchmarks/REPRODUCTION.md`` (accuracy, forward passes on
dimple-tiny) and ``benchmarks/RESULTS.md`` (seconds per answer on the 0.5B shape against the authors' code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Preset:
    """``quantize``: the Runtime's quantization on CPU (None on other devices, where no int8 path exists);
    ``options``: GenerationConfig fields that every call starts from."""

    name: str
    quantize: str | None
    options: Mapping[str, Any] = field(default_factory=dict)


EXACT = Preset("exact", None, MappingProxyType({}))
"""The defaults: Dimple's confident decoding (threshold 0.95) with its prompt cache, the authors' tokens in
fp32."""

FAST = Preset(
    "fast",
    "int8",
    MappingProxyType(
        {
            "pipeline": "fast_dllm",
            "cache": "dual",
            "block_length": 8,
            "threshold": 0.9,
            "block_start": "threshold",
            "refresh_prompt": False,
            "early_stop": True,
        }
    ),
)
"""Fast-dLLM's block decoding with its dual K/V cache in blocks of 8, threshold 0.9, over int8 linears.

What it trades away, against the exact default:
- **Not the authors' tokens.** Three approximations change them: int8 weights and activations (per channel,
  per token); the dual cache (a step recomputes only its block of 8, over K/V of the rest of the canvas frozen
  at the block's start); and the prompt K/V kept from the first forward through every block refresh (Dimple's
  prefill, applied to the block caches).
- **Left to right in blocks.** No position of a later block is committed before the current block is done.
  A block's first step uses the threshold rule (its most confident position plus every other above 0.9), not
  Fast-dLLM's "first masked position" rule, so a confident block takes one forward.
- **No hooks** (``tokens_hook``/``logits_hook`` need full-canvas logits) and no ``prefill=False``.
- **Early stop**: once a finished block holds ``<|endoftext|>``, the rest of the canvas is filled with it
  instead of decoded (Dimple pads answers with it).
Measured on dimple-tiny's test split: no accuracy lost against the exact mode (REPRODUCTION.md); on the 0.5B
shape with random weights, where nothing is confident, RESULTS.md gives its speed against the authors' code.
"""

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (EXACT, FAST)})


def preset_named(name: str | None) -> Preset | None:
    """The preset called ``name`` (None for None); ValueError naming the choices otherwise."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {name!r}")
    return PRESETS[name]


def options_over_preset(options: Mapping[str, Any], default: Preset | None) -> dict[str, Any]:
    """``options`` over a preset's: the preset named by their ``"preset"`` key (which is removed), else
    ``default``. The one place where a call's options and a preset's meet (Runtime, CLI, server)."""
    options = dict(options)
    preset = preset_named(options.pop("preset")) if "preset" in options else default
    return {**(preset.options if preset is not None else {}), **options}
