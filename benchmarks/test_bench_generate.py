# SPDX-License-Identifier: Apache-2.0
"""End-to-end generation speed of ``Runtime.generate`` on a Dimple whose decoder has Qwen2.5-0.5B's shape.

The benchmark shape of shared/design/performance.md (24 layers, hidden 896, 14/2 heads, FFN 4864, vocab 151936,
untied LM head, a small vision tower; one 224x224 image + a question; maskgit_plus, threshold 0.95, greedy),
random weights. The grid: both backends × fp32/bf16 × 64/256 new tokens, plus the authors-like loop as the
baseline. Random weights never pass the threshold, so a run makes as many forwards as it has steps;
``DIMPLE_RT_BENCH_STEPS`` (default 8) caps the steps so that a 256-token answer does not take 255 forwards of a
second each on 2 cores. Seconds per forward and forwards/s are what carries over to any schedule; tokens/s is
that of this step count.

Each result also carries two floors per forward: compute (2·params·tokens at this machine's torch GEMM rate in
the dtype, measured in the same run; bf16 uses the fp32 rate where that is higher, as on CPUs without bf16
FMA, where torch's bf16 GEMM is far slower than its fp32 one) and memory (the weight bytes one forward streams, at this machine's
measured copy bandwidth). ``DIMPLE_RT_BENCH_LAYERS`` (default 24) shrinks the decoder for a quick look.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt.generation.sampling import sample_tokens
from dimple_rt.testing.tiny_checkpoint import TinySizes, write_tiny_checkpoint

LAYERS = int(os.environ.get("DIMPLE_RT_BENCH_LAYERS", "24"))
STEPS = int(os.environ.get("DIMPLE_RT_BENCH_STEPS", "8"))
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bench"), sizes=SIZES, vocab_size=151936)


class _OneRuntime:
    """At most one loaded runtime at a time: a 24-layer fp32 copy is 2.5 GB, and the grid has four."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint, self.key, self.rt = checkpoint, None, None

    def get(self, backend: str, dtype: torch.dtype) -> dimple_rt.Runtime:
        if self.key != (backend, dtype):
            self.rt = None
            gc.collect()
            self.rt = dimple_rt.Runtime(self.checkpoint, backend=backend, dtype=dtype)
            self.key = (backend, dtype)
        return self.rt


@pytest.fixture(scope="module")
def runtimes(checkpoint: Path) -> _OneRuntime:
    return _OneRuntime(checkpoint)


@pytest.fixture(scope="module")
def gemm_flops() -> dict[torch.dtype, float]:
    """This machine's torch GEMM rate (FLOP/s) per dtype, the compute floor's denominator: the best of the
    dtype's own rate and fp32's (widening bf16 weights to fp32 is always possible)."""
    rates = {}
    for dtype in DTYPES.values():
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        rates[dtype] = 5 * 2 * 2048**3 / (time.perf_counter() - start)
    return {dtype: max(rate, rates[torch.float32]) for dtype, rate in rates.items()}


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """This machine's memory bandwidth (bytes/s) as torch sees it: best of 5 copies of 1 GiB (read + write)."""
    src = torch.ones(2**28)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def _conversation():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(30, 60, 220))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


def _decoder_params(rt: dimple_rt.Runtime) -> tuple[int, int]:
    """(parameters of the decoder layers, parameters of the LM head): the GEMM work per token, and (with the
    dtype's size) the weight bytes every forward streams."""
    layers = sum(p.numel() for p in rt.model.model.layers.parameters())
    return layers, rt.model.lm_head.weight.numel()


def _floors(rt, prompt_len: int, max_new: int, forwards: int, prefill: bool, gemm: float, bandwidth: float) -> dict:
    """Compute and memory floors of one answer (seconds), summed over its forwards.

    Step 0 runs the whole sequence through the layers and the canvas through the LM head; each later step runs
    the current tokens (the canvas, plus the last prompt token when prefilling) and, on average, half of the
    canvas rows through the LM head (only rows that predict a masked position)."""
    layer_params, head_params = _decoder_params(rt)
    tokens_later = max_new + 1 if prefill else prompt_len + max_new
    flops = 2 * layer_params * (prompt_len + max_new) + 2 * head_params * max_new
    flops += (forwards - 1) * (2 * layer_params * tokens_later + head_params * max_new)
    weight_bytes = (layer_params + head_params) * rt.dtype.itemsize * forwards
    return {"compute": flops / gemm, "memory": weight_bytes / bandwidth, "gflop": flops / 1e9}


@pytest.mark.parametrize("max_new", [64, 256])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_generate(benchmark, runtimes, gemm_flops, copy_bandwidth, backend: str, dtype: str, max_new: int) -> None:
    rt = runtimes.get(backend, DTYPES[dtype])
    conversation = _conversation()
    prompt_len = rt.prepare(conversation).input_ids.shape[1]
    benchmark.group = f"generate {LAYERS} layers {dtype} {max_new} new"
    # One round: a 24-layer answer is tens of seconds of 2-core time; the ratios between implementations are
    # what we read.
    kwargs = {"max_new_tokens": max_new, "steps": min(STEPS, max_new)}
    result = benchmark.pedantic(rt.generate, args=(conversation,), kwargs=kwargs, rounds=1, iterations=1)
    assert 1 <= result.num_forward_passes <= max_new and len(result.sequences[0]) == prompt_len + max_new
    seconds, forwards = benchmark.stats.stats.mean, result.num_forward_passes
    floors = _floors(rt, prompt_len, max_new, forwards, True, gemm_flops[rt.dtype], copy_bandwidth)
    benchmark.extra_info.update(
        prompt_tokens=prompt_len,
        forward_passes=forwards,
        tokens_per_s=round(max_new / seconds, 2),
        forwards_per_s=round(forwards / seconds, 3),
        s_per_forward=round(seconds / forwards, 4),
        gflop=round(floors["gflop"], 1),
        over_compute_floor=round(seconds / floors["compute"], 2),
        memory_floor_s_per_forward=round(floors["memory"] / forwards, 4),
        over_memory_floor=round(seconds / floors["memory"], 2),
        gemm_gflops=round(gemm_flops[rt.dtype] / 1e9, 1),
        bandwidth_gbs=round(copy_bandwidth / 1e9, 1),
    )


def authors_like_generate(rt: dimple_rt.Runtime, conversation: list[dict], max_new: int, forwards: int) -> int:
    """The cost structure of the authors' no-cache loop, emulated on our reference backend (transformers'
    Dimple code does not run here): every step a full-sequence forward that reruns the vision tower, the LM
    head over every position, attention on the plain-torch reference (repeat_kv, a materialised mask), then
    ``sample_tokens`` over the masked rows and the step's share of tokens committed. Same forward count as
    ours; the tokens are not the point, only the time."""
    inputs = rt.prepare(conversation)
    mask_id = rt.config.mask_token_id
    ids = torch.cat([inputs.input_ids, torch.full((1, max_new), mask_id)], dim=1)
    attention_mask = torch.ones_like(ids)
    per_step = max_new // forwards
    for _ in range(forwards):
        logits = rt.forward(ids, attention_mask, inputs.pixel_values, inputs.image_grid_thw)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # the shift
        masked = ids == mask_id
        confidence, x0 = sample_tokens(logits[masked])
        best = confidence.topk(per_step).indices
        rows = masked.nonzero()[best]
        ids[rows[:, 0], rows[:, 1]] = x0[best]
    return forwards


@pytest.mark.parametrize("max_new", [64, 256])
def test_authors_like_baseline(benchmark, runtimes, max_new: int) -> None:
    """The baseline of the fp32 groups: see :func:`authors_like_generate`, with as many forwards as ours."""
    rt = runtimes.get("reference", torch.float32)
    benchmark.group = f"generate {LAYERS} layers fp32 {max_new} new"
    forwards = min(STEPS, max_new)
    benchmark.pedantic(authors_like_generate, args=(rt, _conversation(), max_new, forwards), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(forward_passes=forwards, s_per_forward=round(seconds / forwards, 4))
