# SPDX-License-Identifier: Apache-2.0
"""An autograd-capable attention for training: the ``masked_attention`` contract on top of torch SDPA.

The C++ kernels have no backward, and the plain-torch reference materialises fp32 scores for every head, so
training calls :func:`torch.nn.functional.scaled_dot_product_attention` instead. The visibility pattern is the
reference's (:func:`dimple_rt.reference.attention_allowed`: Dimple's forced diagonal in bidirectional mode, no
diagonal in causal mode), so the two agree on every row; a query that sees no key returns zeros, as in the
reference, rather than SDPA's NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimple_rt.backend import Backend
from dimple_rt.model.kv_cache import rotate_then_copy
from dimple_rt.reference import attention_allowed, check_masked_attention_args, masked_attention

MaybeTensor = torch.Tensor | None


def _autocast_inputs(*tensors: MaybeTensor) -> tuple[MaybeTensor, ...]:
    """Under autocast the rotary tables stay fp32, so q/k come out fp32 while v is bf16; attention runs in the
    autocast dtype anyway, so bring all of them there. Without autocast the inputs pass unchanged."""
    first = tensors[0]
    assert first is not None
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(None if x is None else x.to(dtype) for x in tensors)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dimple_rt.reference.masked_attention` (differentiable plain torch), usable under autocast."""
    q, k, v, prefix_k, prefix_v, suffix_k, suffix_v = _autocast_inputs(q, k, v, prefix_k, prefix_v, suffix_k, suffix_v)
    assert q is not None and k is not None and v is not None
    return masked_attention(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, causal, scale, suffix_k, suffix_v)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same arguments and result as :func:`dimple_rt.reference.masked_attention`, differentiable, in q's dtype.

    q: (batch, len, heads, head_dim); k, v: (batch, len, kv_heads, head_dim) → (batch, len, heads, head_dim).
    The keys are ``[prefix ‖ current ‖ suffix]`` (concatenated here: SDPA takes one key tensor).
    """
    q, k, v, prefix_k, prefix_v, suffix_k, suffix_v = _autocast_inputs(q, k, v, prefix_k, prefix_v, suffix_k, suffix_v)
    assert q is not None and k is not None and v is not None
    check_masked_attention_args(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, scale, suffix_k, suffix_v, causal)
    batch, q_len, num_heads, _ = q.shape
    prefix_len = 0 if prefix_k is None else prefix_k.shape[1]
    suffix_len = 0 if suffix_k is None else suffix_k.shape[1]
    if prefix_len or suffix_len:
        k = torch.cat([x for x in (prefix_k, k, suffix_k) if x is not None], dim=1)  # (batch, total, kv_heads, D)
        v = torch.cat([x for x in (prefix_v, v, suffix_v) if x is not None], dim=1)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (batch, heads, len, head_dim)
    gqa = num_heads != k.shape[2]
    if key_mask is None and cu_seqlens is None and prefix_len == 0 and suffix_len == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)  # (batch, len, heads, head_dim)
    allowed = attention_allowed(
        batch, q_len, prefix_len, key_mask, cu_seqlens, causal, q.device, suffix_len
    )  # (B, Lq, total)
    empty = ~allowed.any(dim=-1)  # (B, Lq): only causal padded rows
    if bool(empty.any()):
        # Let an empty row see its own key so that SDPA stays finite, then zero it: the reference's result.
        diagonal = torch.zeros_like(allowed)
        diagonal[
            :, torch.arange(q_len, device=q.device), torch.arange(prefix_len, prefix_len + q_len, device=q.device)
        ] = True
        allowed = allowed | (diagonal & empty[..., None])
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed[:, None], scale=scale, enable_gqa=gqa)
    out = out.transpose(1, 2)  # (batch, len, heads, head_dim)
    if bool(empty.any()):
        out = out.masked_fill(empty[:, :, None, None], 0.0)
    return out


TRAINING_ATTENTION = {"sdpa": sdpa_attention, "reference": reference_attention}


def training_backend(attention: str) -> Backend:
    """The model's :class:`~dimple_rt.backend.Backend` for training: an autograd-capable attention ("sdpa" or
    "reference"). Training neither fills a K/V cache nor decodes, so the cache write is the reference's and
    there is no fused selection."""
    return Backend(f"training-{attention}", TRAINING_ATTENTION[attention], rotate_then_copy, None)
