# SPDX-License-Identifier: Apache-2.0
"""Plain-torch versions of every dimple_rt op: the executable specification.

The hand-written kernels in ``csrc/`` must agree with these functions (tests compare them on random inputs
of awkward sizes) and the model's ``backend="reference"`` runs on them. They favour clarity over speed:
masks are materialised, K/V are concatenated and repeated, and the maths is done in fp32.
"""

from __future__ import annotations

import math

import torch


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_masked_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> None:
    """Raise ValueError/TypeError naming the argument when the inputs do not form a valid call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require(t.dim() == 4, f"masked_attention: {name} must be 4-D (batch, len, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"masked_attention: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    batch, q_len, num_heads, head_dim = q.shape
    _require(k.shape == v.shape, f"masked_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    _require(
        k.shape[0] == batch and k.shape[1] == q_len and k.shape[3] == head_dim,
        f"masked_attention: k must be (batch={batch}, len={q_len}, kv_heads, head_dim={head_dim}), got {tuple(k.shape)}",
    )
    num_kv_heads = k.shape[2]
    _require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0,
        f"masked_attention: q heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})",
    )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"masked_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _require((prefix_k is None) == (prefix_v is None), "masked_attention: give both prefix_k and prefix_v or neither")
    prefix_len = 0
    if prefix_k is not None:
        assert prefix_v is not None
        _require(
            prefix_k.dim() == 4 and prefix_k.shape == prefix_v.shape,
            f"masked_attention: prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must be equal 4-D",
        )
        _require(
            prefix_k.shape[0] == batch and prefix_k.shape[2] == num_kv_heads and prefix_k.shape[3] == head_dim,
            f"masked_attention: prefix_k must be (batch={batch}, prefix_len, kv_heads={num_kv_heads}, "
            f"head_dim={head_dim}), got {tuple(prefix_k.shape)}",
        )
        if prefix_k.dtype != q.dtype or prefix_v.dtype != q.dtype:
            raise TypeError(f"masked_attention: prefix_k/prefix_v must have q's dtype {q.dtype}")
        prefix_len = prefix_k.shape[1]
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"masked_attention: key_mask must be bool, got {key_mask.dtype}")
        _require(
            key_mask.shape == (batch, prefix_len + q_len),
            f"masked_attention: key_mask must be (batch={batch}, prefix_len+len={prefix_len + q_len}), "
            f"got {tuple(key_mask.shape)}",
        )
    if cu_seqlens is not None:
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"masked_attention: cu_seqlens must be int32, got {cu_seqlens.dtype}")
        _require(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2, "masked_attention: cu_seqlens must be 1-D with ≥2 entries")
        _require(batch == 1 and prefix_len == 0, "masked_attention: cu_seqlens needs batch 1 and no prefix")
        _require(key_mask is None, "masked_attention: cu_seqlens and key_mask cannot be combined")
        c = cu_seqlens.to("cpu", torch.int64)
        _require(
            int(c[0]) == 0 and int(c[-1]) == q_len and bool((c[1:] >= c[:-1]).all()),
            f"masked_attention: cu_seqlens must rise from 0 to len={q_len}, got {c.tolist()}",
        )
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("key_mask", key_mask), ("cu_seqlens", cu_seqlens)):
        _require(t is None or t.device == q.device, f"masked_attention: {name} is on {None if t is None else t.device}, q on {q.device}")


def attention_allowed(
    batch: int,
    q_len: int,
    prefix_len: int,
    key_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Which keys each query may see: bool ``(batch, q_len, prefix_len + q_len)``.

    Query i sits at absolute position ``prefix_len + i``. With a key mask ``a`` (True = real token):
    bidirectional attention allows ``(a_i ∧ a_j) ∨ (i == j)`` (Dimple's forced diagonal: a padded row
    sees only itself); causal attention allows ``(j ≤ i) ∧ a_i ∧ a_j`` with no diagonal, so a padded row is
    fully masked and its output is zero. ``cu_seqlens`` makes the pattern block-diagonal.
    """
    total = prefix_len + q_len
    qpos = torch.arange(prefix_len, total, device=device)  # (q_len,)
    kpos = torch.arange(total, device=device)  # (total,)
    allowed = torch.ones(batch, q_len, total, dtype=torch.bool, device=device)
    if key_mask is not None:
        a_q = key_mask[:, prefix_len:]  # (batch, q_len)
        both = a_q[:, :, None] & key_mask[:, None, :]  # (batch, q_len, total)
        allowed = both if causal else both | (qpos[:, None] == kpos[None, :])[None]
    if causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])[None]
    if cu_seqlens is not None:
        c = cu_seqlens.to(device=device, dtype=torch.int64)
        seg = torch.bucketize(kpos, c[1:], right=True)  # (total,) segment id of each position
        allowed = allowed & (seg[prefix_len:, None] == seg[None, :])[None]
    return allowed


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of the current tokens over ``[prefix ‖ current]`` keys.

    q: (batch, len, heads, head_dim); k, v: (batch, len, kv_heads, head_dim), heads a multiple of kv_heads
    (GQA: query head h reads kv head ``h // (heads // kv_heads)``); prefix_k, prefix_v: (batch, prefix_len,
    kv_heads, head_dim) or None; key_mask: bool (batch, prefix_len + len), True = real token; cu_seqlens:
    int32 (segments + 1,) block-diagonal segments (batch 1, no prefix). A query with no visible key gets
    zeros. Computed in fp32, returned in q's dtype: (batch, len, heads, head_dim).
    """
    check_masked_attention_args(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens)
    batch, q_len, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[2]
    if prefix_k is not None:
        assert prefix_v is not None
        k = torch.cat([prefix_k, k], dim=1)  # (batch, total, kv_heads, head_dim)
        v = torch.cat([prefix_v, v], dim=1)
    prefix_len = k.shape[1] - q_len
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qf = q.float().transpose(1, 2)  # (batch, heads, len, head_dim)
    kf = k.float().repeat_interleave(groups, dim=2).transpose(1, 2)  # (batch, heads, total, head_dim)
    vf = v.float().repeat_interleave(groups, dim=2).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (batch, heads, len, total)
    allowed = attention_allowed(batch, q_len, prefix_len, key_mask, cu_seqlens, causal, q.device)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all -inf row softmaxes to NaN: make it zeros
    out = torch.matmul(probs, vf)  # (batch, heads, len, head_dim)
    return out.transpose(1, 2).to(q.dtype)  # (batch, len, heads, head_dim)
