# SPDX-License-Identifier: Apache-2.0
"""Presets (issue 16): ``Runtime(preset=...)`` quantizes at load and starts every call from the preset's
options; a call's own options and its own ``preset`` override the Runtime's; bad names are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import dimple_rt
from dimple_rt.presets import FAST, PRESETS
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint

PROMPT = "What colour is the big circle in the picture?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def fast(checkpoint: Path) -> dimple_rt.Runtime:
    return dimple_rt.Runtime(checkpoint, preset="fast")


@pytest.fixture(scope="module")
def int8(checkpoint: Path) -> dimple_rt.Runtime:
    return dimple_rt.Runtime(checkpoint, quantize="int8")


def test_the_fast_preset_is_int8_with_its_options(fast: dimple_rt.Runtime, int8: dimple_rt.Runtime) -> None:
    assert fast.quantize == "int8"
    got = fast.generate(PROMPT, max_new_tokens=24)
    want = int8.generate(PROMPT, max_new_tokens=24, **FAST.options)
    assert got.token_ids == want.token_ids
    assert got.num_forward_passes == want.num_forward_passes
    default = int8.generate(PROMPT, max_new_tokens=24)
    assert (got.token_ids, got.num_forward_passes) != (default.token_ids, default.num_forward_passes)


def test_call_options_override_the_preset(fast: dimple_rt.Runtime, int8: dimple_rt.Runtime) -> None:
    got = fast.generate(PROMPT, max_new_tokens=24, block_length=4, early_stop=False)
    want = int8.generate(PROMPT, max_new_tokens=24, **{**FAST.options, "block_length": 4, "early_stop": False})
    assert (got.token_ids, got.num_forward_passes) == (want.token_ids, want.num_forward_passes)
    exact = fast.generate(PROMPT, max_new_tokens=24, preset="exact")
    plain = int8.generate(PROMPT, max_new_tokens=24)
    assert (exact.token_ids, exact.num_forward_passes) == (plain.token_ids, plain.num_forward_passes)
    streamed = list(int8.stream(PROMPT, max_new_tokens=24, preset="fast"))
    assert len(streamed) == fast.generate(PROMPT, max_new_tokens=24).num_forward_passes


def test_an_explicit_quantize_wins_over_the_presets(checkpoint: Path) -> None:
    assert dimple_rt.Runtime(checkpoint, preset="exact").quantize is None
    assert dimple_rt.Runtime(checkpoint, preset="exact", quantize="int8").quantize == "int8"


def test_presets_need_what_they_use(fast: dimple_rt.Runtime) -> None:
    with pytest.raises(ValueError, match="cache computes part of the canvas|hooks need full logits"):
        fast.generate(PROMPT, max_new_tokens=8, logits_hook=lambda step, x, logits: logits)
    with pytest.raises(ValueError, match="cannot be combined with prefill=False"):
        fast.generate(PROMPT, max_new_tokens=8, prefill=False)


@pytest.mark.parametrize("name", ["turbo", "", 3])
def test_bad_preset_names_are_named(checkpoint: Path, fast: dimple_rt.Runtime, name: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"preset must be one of {sorted(PRESETS)}")):
        dimple_rt.Runtime(checkpoint, preset=name)
    with pytest.raises(ValueError, match="preset must be one of"):
        fast.generate(PROMPT, max_new_tokens=8, preset=name)
