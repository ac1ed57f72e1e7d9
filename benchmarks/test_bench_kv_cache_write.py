# SPDX-License-Identifier: Apache-2.0
"""kv_cache_write: the C++ kernel vs the model's torch path (rope.apply_rotary in the activation dtype, then a
slice assignment into the cache) vs dimple_rt.reference, for one Dimple-7B layer (4 KV heads, head_dim 128)."""

from __future__ import annotations

import pytest
import torch

from dimple_rt import reference
from dimple_rt.model.rope import apply_rotary
from dimple_rt.ops import kv_cache_write

# name: (batch, max_len, len, start, dtype)
SHAPES = {
    "7b_decode_bf16": (1, 700, 65, 600, torch.bfloat16),  # the canvas after a 600-token prompt
    "7b_prefill_fp32": (1, 700, 700, 0, torch.float32),  # the whole first forward
    "7b_prefill_bf16": (1, 700, 700, 0, torch.bfloat16),
}
IMPLS = ["kernel", "torch_model_path", "reference"]
KV_HEADS, HEAD_DIM = 4, 128


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kv_cache_write(shape: str, impl: str, timed) -> None:
    batch, max_len, length, start, dtype = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    cache_k = torch.zeros(batch, max_len, KV_HEADS, HEAD_DIM, dtype=dtype)
    cache_v = torch.zeros_like(cache_k)
    k = torch.randn(batch, length, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(batch, length, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    angle = torch.rand(batch, length, HEAD_DIM, generator=g) * 100.0
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)

    def model_path() -> None:
        cache_k[:, start : start + length] = apply_rotary(k, cos, sin)
        cache_v[:, start : start + length] = v

    fn = {
        "kernel": lambda: kv_cache_write(cache_k, cache_v, k, v, cos, sin, start),
        "torch_model_path": model_path,
        "reference": lambda: reference.kv_cache_write(cache_k, cache_v, k, v, cos, sin, start),
    }[impl]
    fn()  # correctness before timing, against the reference on fresh caches
    want_k, want_v = torch.zeros_like(cache_k), torch.zeros_like(cache_v)
    reference.kv_cache_write(want_k, want_v, k, v, cos, sin, start)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the model path rounds in bf16 after every op
    torch.testing.assert_close(cache_k, want_k, atol=tol, rtol=tol)
    assert torch.equal(cache_v, want_v)
    bytes_moved = 4 * k.numel() * k.element_size() + 2 * cos.numel() * cos.element_size()  # read k, v; write both
    timed(fn, group=f"kv_cache_write {shape}", bytes_moved=bytes_moved, flops=3 * k.numel(), rounds=20)
