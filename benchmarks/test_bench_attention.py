# SPDX-License-Identifier: Apache-2.0
"""masked_attention: the C++ kernel vs the authors' torch path (cat + repeat_kv + SDPA with a bool mask) vs
dimple_rt.reference, on Dimple-7B's decoder shapes (28 query / 4 KV heads, head_dim 128) and the vision tower's
window attention (16 heads, head_dim 80, cu_seqlens); and the dual cache's step ([prefix ‖ block ‖ suffix] read
in place from one cache buffer) against SDPA over the concatenated keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimple_rt import reference
from dimple_rt.ops import masked_attention

# name: (batch, q_len, prefix_len, heads, kv_heads, head_dim, window, dtype). window > 0: block-diagonal segments
# of that many tokens (vision), else a full bidirectional key mask (decoder; the authors always pass one).
SHAPES = {
    "7b_decode_fp32": (1, 65, 600, 28, 4, 128, 0, torch.float32),  # 65-token canvas over a 600-token cached prompt
    "7b_decode_bf16": (1, 65, 600, 28, 4, 128, 0, torch.bfloat16),
    "7b_prefill_fp32": (1, 700, 0, 28, 4, 128, 0, torch.float32),  # the first (full) forward of a 700-token input
    "7b_prefill_bf16": (1, 700, 0, 28, 4, 128, 0, torch.bfloat16),
    "vision_windows_fp32": (1, 1024, 0, 16, 16, 80, 64, torch.float32),  # 448x448 image, 8x8-patch windows
}
IMPLS = ["kernel", "authors_sdpa", "reference"]
# Issue 4's decode grid (Dimple-7B heads): canvas 64/128/256 (+1: the last prompt token) over a cached prefix of
# 256/1024/2048 tokens, batch 1 and 4, fp32 and bf16, against the authors' path and the best single torch call.
GRID = {
    f"decode_b{batch}_c{canvas}_p{prefix}_{dtype_name}": (batch, canvas + 1, prefix, 28, 4, 128, 0, dtype)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    for batch in (1, 4)
    for canvas in (64, 128, 256)
    for prefix in (256, 1024, 2048)
}
GRID_IMPLS = ["kernel", "authors_sdpa", "sdpa_gqa"]
# The dual cache's decode step (issue 16): a 32-query block over a 1024-token prefix and a 224-token suffix, all
# three views of one preallocated (batch, max_len, kv_heads, head_dim) cache; Dimple-7B heads; no key mask
# (batch 1: the model passes none). name: (batch, block, prefix_len, suffix_len, heads, kv_heads, head_dim, dtype)
DUAL = {
    f"dual_7b_block32_p1024_s224_{dtype_name}": (1, 32, 1024, 224, 28, 4, 128, dtype)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
}
DUAL_IMPLS = ["kernel", "reference", "sdpa_gqa"]


def _inputs(name: str) -> dict:
    batch, q_len, prefix_len, heads, kv_heads, head_dim, window, dtype = {**SHAPES, **GRID}[name]
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    args = {"q": randn(batch, q_len, heads, head_dim), "k": randn(batch, q_len, kv_heads, head_dim)}
    args["v"] = randn(batch, q_len, kv_heads, head_dim)
    if prefix_len:
        args["prefix_k"] = randn(batch, prefix_len, kv_heads, head_dim)
        args["prefix_v"] = randn(batch, prefix_len, kv_heads, head_dim)
    if window:
        args["cu_seqlens"] = torch.arange(0, q_len + 1, window, dtype=torch.int32)
    else:
        args["key_mask"] = torch.ones(batch, prefix_len + q_len, dtype=torch.bool)
    return args


def _authors_path(args: dict) -> tuple:
    """The authors' attention as a closure over its precomputed mask (built once per forward, shared by layers)."""
    q, k, v = args["q"], args["k"], args["v"]
    batch, q_len, heads, _ = q.shape
    groups = heads // k.shape[2]
    total = q_len + (args["prefix_k"].shape[1] if "prefix_k" in args else 0)
    allowed = reference.attention_allowed(
        batch, q_len, total - q_len, args.get("key_mask"), args.get("cu_seqlens"), False, q.device
    )[:, None]  # (batch, 1, q_len, total) bool, as the reference model passes to SDPA

    def run() -> torch.Tensor:
        kk, vv = k, v
        if "prefix_k" in args:  # DynamicCache.update: cat the cached prefix
            kk = torch.cat([args["prefix_k"], k], dim=1)
            vv = torch.cat([args["prefix_v"], v], dim=1)
        qh = q.transpose(1, 2)  # (batch, heads, q_len, head_dim)
        kh = kk.transpose(1, 2).repeat_interleave(groups, dim=1)  # repeat_kv: (batch, heads, total, head_dim)
        vh = vv.transpose(1, 2).repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed)
        return out.transpose(1, 2).contiguous()  # (batch, q_len, heads, head_dim)

    return run


def _dual_inputs(name: str) -> dict:
    """q and the prefix / current / suffix K/V as views of one cache buffer (as DecoderAttention passes them)."""
    batch, block, prefix_len, suffix_len, heads, kv_heads, head_dim, dtype = DUAL[name]
    g = torch.Generator().manual_seed(0)
    max_len = prefix_len + block + suffix_len
    cache_k, cache_v = (torch.randn(batch, max_len, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    end = prefix_len + block
    return {
        "q": torch.randn(batch, block, heads, head_dim, generator=g).to(dtype),
        "k": cache_k[:, prefix_len:end],
        "v": cache_v[:, prefix_len:end],
        "prefix_k": cache_k[:, :prefix_len],
        "prefix_v": cache_v[:, :prefix_len],
        "suffix_k": cache_k[:, end:],
        "suffix_v": cache_v[:, end:],
    }


def _sdpa_gqa(args: dict) -> tuple:
    """The best single torch call: SDPA with ``enable_gqa`` over K/V that are already concatenated (the cat is
    not timed) and every key visible (no mask), on (batch, heads, len, dim) views of our layout."""
    qh = args["q"].transpose(1, 2)
    kh = torch.cat([args[n] for n in ("prefix_k", "k", "suffix_k") if n in args], dim=1).transpose(1, 2)
    vh = torch.cat([args[n] for n in ("prefix_v", "v", "suffix_v") if n in args], dim=1).transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True).transpose(1, 2)


def _cost(args: dict) -> tuple[int, int]:
    """(bytes read + written, FLOPs) of one call: QK and PV over the visible keys."""
    q = args["q"]
    batch, q_len, heads, head_dim = q.shape
    if "cu_seqlens" in args:
        seg = args["cu_seqlens"].diff().to(torch.int64)
        pairs = int((seg * seg).sum())
    else:
        cached = sum(args[n].shape[1] for n in ("prefix_k", "suffix_k") if n in args)
        pairs = q_len * (q_len + cached)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bytes_moved = sum(t.numel() * t.element_size() for t in tensors) + q.numel() * q.element_size()
    return bytes_moved, 4 * batch * heads * pairs * head_dim


def _check_then_time(fn, args: dict, shape: str, timed, rounds: int) -> None:
    """Assert ``fn`` against the fp32 reference, then time it."""
    exact = reference.masked_attention(**{n: t.float() if t.is_floating_point() else t for n, t in args.items()})
    tol = 1e-4 if args["q"].dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fn().float(), exact, atol=tol, rtol=tol)
    bytes_moved, flops = _cost(args)
    timed(fn, group=f"masked_attention {shape}", bytes_moved=bytes_moved, flops=flops, rounds=rounds)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_masked_attention(shape: str, impl: str, timed) -> None:
    args = _inputs(shape)
    fn = {
        "kernel": lambda: masked_attention(**args),
        "authors_sdpa": _authors_path(args),
        "reference": lambda: reference.masked_attention(**args),
    }[impl]
    _check_then_time(fn, args, shape, timed, rounds=3 if impl == "reference" else 5)


@pytest.mark.parametrize("impl", GRID_IMPLS)
@pytest.mark.parametrize("shape", list(GRID))
def test_masked_attention_decode_grid(shape: str, impl: str, timed) -> None:
    args = _inputs(shape)
    implementations = {"kernel": lambda: masked_attention(**args), "authors_sdpa": _authors_path(args)}
    implementations["sdpa_gqa"] = _sdpa_gqa(args)
    _check_then_time(implementations[impl], args, shape, timed, rounds=5)


@pytest.mark.parametrize("impl", DUAL_IMPLS)
@pytest.mark.parametrize("shape", list(DUAL))
def test_masked_attention_dual_cache(shape: str, impl: str, timed) -> None:
    args = _dual_inputs(shape)
    fn = {
        "kernel": lambda: masked_attention(**args),
        "reference": lambda: reference.masked_attention(**args),
        "sdpa_gqa": _sdpa_gqa(args),
    }[impl]
    _check_then_time(fn, args, shape, timed, rounds=3 if impl == "reference" else 10)
