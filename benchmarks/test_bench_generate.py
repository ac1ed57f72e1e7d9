# SPDX-License-Identifier: Apache-2.0
"""End-to-end generation speed: prefilled vs full forwards, on a Dimple whose decoder has Qwen2.5-0.5B's shape.

The benchmark shape of shared/design/performance.md (hidden 896, 14/2 heads, FFN 4864, vocab 151936, untied LM
head, a small vision tower; one 224x224 image + a question; 64 new tokens; maskgit_plus, threshold 0.95,
greedy, fp32). Random weights never pass the threshold, so a run makes the fallback schedule's 63 forwards,
confident decoding's worst case. The baseline in the same group emulates the authors' loop (full forward with
the vision tower each step, full LM head, plain-torch attention). The layer count defaults to 4 to keep a run short on 2 cores (``DIMPLE_RT_BENCH_LAYERS=24``
gives the full 0.5B decoder). Each result carries its forward passes, tokens/s, and the measured time per
forward over the compute floor (2·params·tokens / this machine's fp32 GEMM rate, measured in the same run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt.generation.sampling import sample_tokens
from dimple_rt.testing.tiny_checkpoint import TinySizes, write_tiny_checkpoint

LAYERS = int(os.environ.get("DIMPLE_RT_BENCH_LAYERS", "4"))
MAX_NEW = 64
SIZES = TinySizes(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=LAYERS,
    num_attention_heads=14,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=128,
    vision_num_heads=2,
    vision_intermediate_size=256,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bench"), sizes=SIZES, vocab_size=151936)


@pytest.fixture(scope="module")
def rt(checkpoint: Path) -> dimple_rt.Runtime:
    return dimple_rt.Runtime(checkpoint)


def authors_like_generate(rt: dimple_rt.Runtime, conversation: list[dict], forwards: int) -> int:
    """The cost structure of the authors' no-cache loop, emulated on our reference backend (transformers'
    Dimple code does not run here): every step a full-sequence forward that reruns the vision tower, the LM
    head over every position, attention on the plain-torch reference (repeat_kv, a materialised mask), then
    ``sample_tokens`` over the masked rows and one committed token. Same forward count as ours; the tokens are
    not the point, only the time."""
    inputs = rt.prepare(conversation)
    mask_id = rt.config.mask_token_id
    ids = torch.cat([inputs.input_ids, torch.full((1, MAX_NEW), mask_id)], dim=1)
    attention_mask = torch.ones_like(ids)
    for _ in range(forwards):
        logits = rt.forward(ids, attention_mask, inputs.pixel_values, inputs.image_grid_thw)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # the shift
        masked = ids == mask_id
        confidence, x0 = sample_tokens(logits[masked])
        best = int(confidence.argmax())
        ids[masked.nonzero()[best].unbind()] = x0[best]
    return forwards


@pytest.fixture(scope="module")
def gemm_flops() -> float:
    """This machine's fp32 GEMM rate (FLOP/s) through torch, the floor's denominator."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


def _conversation():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(30, 60, 220))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


def _decoder_params(rt: dimple_rt.Runtime) -> tuple[int, int]:
    """(parameters of the decoder layers, parameters of the LM head): the GEMM work per token."""
    layers = sum(p.numel() for p in rt.model.model.layers.parameters())
    return layers, rt.model.lm_head.weight.numel()


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "full"])
def test_generate(benchmark, rt: dimple_rt.Runtime, gemm_flops: float, prefill: bool) -> None:
    conversation = _conversation()
    prompt_len = rt.prepare(conversation).input_ids.shape[1]
    benchmark.group = f"generate-{LAYERS}-layers"
    # One round: an answer is a minute of 2-core time, and the ratio between the two modes is what we read.
    kwargs = {"max_new_tokens": MAX_NEW, "prefill": prefill}
    result = benchmark.pedantic(rt.generate, args=(conversation,), kwargs=kwargs, rounds=1, iterations=1)
    assert 1 <= result.num_forward_passes <= MAX_NEW and len(result.sequences[0]) == prompt_len + MAX_NEW
    seconds = benchmark.stats.stats.mean
    layer_params, head_params = _decoder_params(rt)
    # FLOPs per answer: step 0 over the whole sequence, then per step the current tokens through the layers and
    # the masked rows (on average half the canvas) through the LM head.
    tokens_later = MAX_NEW + 1 if prefill else prompt_len + MAX_NEW
    flops = 2 * layer_params * (prompt_len + MAX_NEW) + 2 * head_params * MAX_NEW
    flops += (result.num_forward_passes - 1) * (2 * layer_params * tokens_later + 2 * head_params * MAX_NEW / 2)
    benchmark.extra_info.update(
        prompt_tokens=prompt_len,
        forward_passes=result.num_forward_passes,
        tokens_per_s=round(MAX_NEW / seconds, 2),
        s_per_forward=round(seconds / result.num_forward_passes, 4),
        gflop=round(flops / 1e9, 1),
        measured_over_floor=round(seconds / (flops / gemm_flops), 2),
        gemm_gflops=round(gemm_flops / 1e9, 1),
    )


def test_authors_like_baseline(benchmark, checkpoint: Path, gemm_flops: float) -> None:
    """The baseline of the 'generate' group: see :func:`authors_like_generate`. 63 forwards, as the fallback
    schedule makes for a 64-token canvas."""
    reference = dimple_rt.Runtime(checkpoint, backend="reference")
    benchmark.group = f"generate-{LAYERS}-layers"
    forwards = benchmark.pedantic(
        authors_like_generate, args=(reference, _conversation(), MAX_NEW - 1), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        forward_passes=forwards, s_per_forward=round(benchmark.stats.stats.mean / forwards, 4),
        gemm_gflops=round(gemm_flops / 1e9, 1),
    )  # fmt: skip
