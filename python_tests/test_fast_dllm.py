# SPDX-License-Identifier: Apache-2.0
"""The 'fast_dllm' pipeline (Fast-dLLM's block-wise threshold decoding) and its block and dual K/V caches
(issue 16): blocks are decoded in order and nothing is committed outside the current block, a cache refreshed
at every step gives the exact (uncached) tokens, a refresh leaves the cache equal to a fresh full forward,
forward counts follow the rule, a batch decodes each row as it would alone, and bad combinations are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt.backend import backend_for
from dimple_rt.model.kv_cache import KVCache
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint

BACKENDS = ("kernels", "reference")
CACHES = ("block", "dual")
BLOCK_STARTS = ("first", "threshold")
CANVAS, BLOCK = 12, 4
PROMPTS = ["Hi there", "What colour is the big circle in the picture?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module", params=BACKENDS)
def rt(request: pytest.FixtureRequest, checkpoint: Path) -> dimple_rt.Runtime:
    return dimple_rt.Runtime(checkpoint, backend=request.param)


def _fast(rt: dimple_rt.Runtime, prompt, **options):
    options = {"max_new_tokens": CANVAS, "pipeline": "fast_dllm", "block_length": BLOCK, **options}
    return rt.generate(prompt, **options)


@pytest.mark.parametrize("cache", CACHES)
def test_a_cache_refreshed_every_step_gives_the_exact_tokens(rt: dimple_rt.Runtime, cache: str) -> None:
    for threshold in (0.9, 0.02):
        exact = _fast(rt, PROMPTS, threshold=threshold, prefill=False)
        cached = _fast(rt, PROMPTS, threshold=threshold, cache=cache, refresh_every=1)
        assert [r.token_ids for r in cached] == [r.token_ids for r in exact]
        assert cached[0].num_forward_passes == exact[0].num_forward_passes


@pytest.mark.parametrize("cache", CACHES)
def test_refreshes_that_keep_the_prompt_cache_equal_dimples_prefill(rt: dimple_rt.Runtime, cache: str) -> None:
    """refresh_prompt=False refreshed at every step recomputes the canvas over the prompt K/V of the first
    forward: exactly what the prefix cache (Dimple's prefill) computes at every step."""
    prefilled = _fast(rt, PROMPTS, threshold=0.5)
    kept = _fast(rt, PROMPTS, threshold=0.5, cache=cache, refresh_every=1, refresh_prompt=False)
    assert [r.token_ids for r in kept] == [r.token_ids for r in prefilled]
    assert kept[0].num_forward_passes == prefilled[0].num_forward_passes


@pytest.mark.parametrize("block_start", BLOCK_STARTS)
@pytest.mark.parametrize("cache", ["prefix", *CACHES])
def test_blocks_are_decoded_in_order_and_nothing_is_committed_outside_the_current_block(
    rt: dimple_rt.Runtime, cache: str, block_start: str
) -> None:
    prompt_len = rt.prepare(PROMPTS[1]).input_ids.shape[1]
    mask_id = rt.config.mask_token_id
    previous = torch.full((CANVAS,), mask_id)
    finished_blocks = 0
    options = {"pipeline": "fast_dllm", "block_length": BLOCK, "cache": cache, "block_start": block_start}
    for step in rt.stream(PROMPTS[1], max_new_tokens=CANVAS, threshold=0.2, **options):
        canvas = step.canvas[0]
        changed = (canvas != previous).nonzero()[:, 0]
        assert changed.numel() >= 1, "every step commits at least one position"
        blocks = set((changed // BLOCK).tolist())
        assert blocks == {finished_blocks}, f"step {step.step} committed in blocks {blocks}"
        assert bool((canvas[: finished_blocks * BLOCK] != mask_id).all())
        if not bool((canvas[finished_blocks * BLOCK : (finished_blocks + 1) * BLOCK] == mask_id).any()):
            finished_blocks += 1
        previous = canvas
    assert finished_blocks == CANVAS // BLOCK
    assert prompt_len > 0


@pytest.mark.parametrize("cache", ["prefix", *CACHES])
def test_forward_counts_follow_the_threshold_rule(rt: dimple_rt.Runtime, cache: str) -> None:
    # A threshold every token passes: each block takes its first-position step, then one step for the rest.
    result = _fast(rt, PROMPTS[0], threshold=1e-9, cache=cache)
    assert result.num_forward_passes == 2 * (CANVAS // BLOCK)
    # A threshold nothing passes: one position per step, so one forward per canvas position.
    assert _fast(rt, PROMPTS[0], threshold=1.0, cache=cache).num_forward_passes == CANVAS
    # A shorter last block is allowed (Fast-dLLM asserts divisibility; we do not).
    odd = _fast(rt, PROMPTS[0], threshold=1e-9, cache=cache, block_length=5)
    assert odd.num_forward_passes == 2 * 3
    # block_start='threshold': a block whose every position passes is done in its first step.
    assert _fast(rt, PROMPTS[0], threshold=1e-9, cache=cache, block_start="threshold").num_forward_passes == 3
    assert _fast(rt, PROMPTS[0], threshold=1.0, cache=cache, block_start="threshold").num_forward_passes == CANVAS


@pytest.mark.parametrize("cache", ["prefix", *CACHES])
def test_a_batch_decodes_each_row_as_it_would_alone(rt: dimple_rt.Runtime, cache: str) -> None:
    batch = _fast(rt, PROMPTS, threshold=0.05, cache=cache)
    alone = [_fast(rt, prompt, threshold=0.05, cache=cache) for prompt in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


def test_a_refresh_leaves_the_cache_equal_to_a_fresh_full_forward(checkpoint: Path) -> None:
    rt = dimple_rt.Runtime(checkpoint, backend="kernels")
    config, model = rt.config, rt.model
    ids = rt.prepare(PROMPTS[0]).input_ids
    canvas = torch.full((1, CANVAS), config.mask_token_id)
    ids = torch.cat([ids, canvas], dim=1)
    total, start = ids.shape[1], ids.shape[1] - CANVAS
    mask = torch.ones_like(ids)

    def cache() -> KVCache:
        dims = (config.num_hidden_layers, 1, total, config.num_key_value_heads, config.head_dim)
        return KVCache.allocate(*dims, model.lm_head.weight.dtype, ids.device)

    backend = backend_for("kernels")
    used, fresh = cache(), cache()

    def same(a: KVCache, b: KVCache) -> bool:
        return all(torch.equal(x, y) for pa, pb in zip(a.layers, b.layers, strict=True) for x, y in zip(pa, pb))

    with torch.inference_mode():
        model(ids, backend, attention_mask=mask, cache=used)  # the block's refresh
        block = ids[:, start : start + BLOCK].clone()
        block[0, 1:] = torch.tensor([5, 6, 7])
        positions = torch.arange(total)[None, None].expand(3, 1, total)[:, :, start : start + BLOCK]
        model(block, backend, attention_mask=mask, position_ids=positions, cache=used, cache_start=start,
              cache_suffix=total - start - BLOCK)  # fmt: skip  # a dual-cache step: block rows rewritten in place
        ids[:, start : start + BLOCK] = block
        model(ids, backend, attention_mask=mask, cache=fresh)
        assert not same(used, fresh), "after a dual step the suffix and the block's deeper K/V are stale"
        model(ids, backend, attention_mask=mask, cache=used)  # the next refresh
    assert same(used, fresh)


def test_early_stop_fills_the_rest_with_the_terminator() -> None:
    rt = dimple_rt.Runtime("dimple-tiny")
    question = "How many shapes are there?"
    options = {"max_new_tokens": 32, "pipeline": "fast_dllm", "block_length": 8, "cache": "dual"}
    plain = rt.generate(question, **options)
    stopped = rt.generate(question, early_stop=True, **options)
    eos = rt.config.pad_token_id
    canvas = stopped.sequences[0, -32:].tolist()
    assert eos in canvas and rt.config.mask_token_id not in canvas
    first = canvas.index(eos)
    block_end = (first // 8 + 1) * 8
    assert all(token == eos for token in canvas[block_end:])
    assert stopped.num_forward_passes < plain.num_forward_passes
    assert stopped.text == plain.text


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cache": "block"}, "cache='block' needs pipeline='fast_dllm'"),
        ({"block_length": 4}, "block_length=4 needs pipeline='fast_dllm'"),
        ({"early_stop": True}, "early_stop=True needs pipeline='fast_dllm'"),
        ({"pipeline": "fast_dllm", "threshold": None}, "needs a threshold"),
        ({"pipeline": "fast_dllm", "alg": "origin"}, "no confidence ranking"),
        ({"pipeline": "fast_dllm", "alg_temp": 0.5}, "alg_temp has no meaning"),
        ({"pipeline": "fast_dllm", "batch_coupled": True}, "per sequence"),
        ({"pipeline": "fast_dllm", "cache": "dual", "prefill": False}, "cannot be combined with prefill=False"),
        ({"pipeline": "fast_dllm", "refresh_every": 2}, "refresh_every=2 needs cache='block' or 'dual'"),
        ({"pipeline": "fast_dllm", "refresh_prompt": False}, "refresh_prompt=False needs cache='block' or 'dual'"),
        ({"pipeline": "fast_dllm", "cache": "ring"}, "cache must be one of"),
        ({"pipeline": "fast_dllm", "block_start": "last"}, "block_start must be one of"),
        ({"block_start": "threshold"}, "block_start='threshold' needs pipeline='fast_dllm'"),
        ({"pipeline": "fast_dllm", "block_length": 0}, "block_length must be an integer"),
        ({"pipeline": "fast_dllm", "cache": "dual", "refresh_every": 0}, "refresh_every must be an integer"),
    ],
)
def test_bad_combinations_are_named(rt: dimple_rt.Runtime, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rt.generate(PROMPTS[0], max_new_tokens=8, **options)


def test_a_flag_that_is_not_a_bool_is_named(rt: dimple_rt.Runtime) -> None:
    with pytest.raises(TypeError, match="refresh_prompt must be True or False"):
        rt.generate(PROMPTS[0], max_new_tokens=8, pipeline="fast_dllm", cache="dual", refresh_prompt=0)


@pytest.mark.parametrize("cache", CACHES)
def test_hooks_need_full_logits(rt: dimple_rt.Runtime, cache: str) -> None:
    with pytest.raises(ValueError, match="hooks need full logits"):
        _fast(rt, PROMPTS[0], cache=cache, logits_hook=lambda step, x, logits: logits)
