# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers of the compiled ops (``torch.ops.dimple_rt.*``) and their fake kernels.

The dispatcher picks the CPU or CUDA implementation from the inputs' device; nothing here falls back to
:mod:`dimple_rt.reference`, which holds the executable specification of every op.
"""

from __future__ import annotations

import torch  # first: it loads libtorch, which dimple_rt._C links against without an RPATH

try:
    from dimple_rt import _C
except ImportError as e:
    raise ImportError(
        f"dimple_rt's compiled extension dimple_rt._C could not be loaded ({e}). Build it against the installed "
        "torch: `pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .` in a checkout), "
        "after `pip install torch ninja`."
    ) from e

_ISA_SUPPORTED = {"AVX512": "_is_avx512_supported", "AVX2": "_is_avx2_supported"}
if not getattr(torch.cpu, _ISA_SUPPORTED.get(_C.cpu_capability, ""), lambda: True)():
    raise ImportError(
        f"dimple_rt._C was compiled for {_C.cpu_capability}, which this CPU lacks. Rebuild it here "
        "(`pip install --no-build-isolation .`), or with DIMPLE_RT_CPU_ISA=default for a portable build."
    )

__all__ = ["cpu_capability", "cuda_kernels_built", "masked_attention"]


def cuda_kernels_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels (a CUDA torch and nvcc at build time)."""
    return bool(_C.cuda_kernels_built)


def cpu_capability() -> str:
    """The x86 vector ISA the CPU kernels were compiled for: "AVX512", "AVX2" or "DEFAULT"."""
    return str(_C.cpu_capability)


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
    """Attention of the current tokens over ``[prefix ‖ current]`` keys, in one pass (online softmax).

    q: (batch, len, heads, head_dim); k, v: (batch, len, kv_heads, head_dim), heads a multiple of kv_heads
    (query head h reads kv head ``h // (heads // kv_heads)``); prefix_k, prefix_v: (batch, prefix_len,
    kv_heads, head_dim) or None; key_mask: bool (batch, prefix_len + len), True = real token; cu_seqlens:
    int32 (segments + 1,) block-diagonal segments (batch 1, no prefix); causal: query i sees keys up to its
    own position prefix_len + i; scale: defaults to 1/sqrt(head_dim). A query with no visible key gets zeros.
    Inputs may have any strides. Returns a contiguous (batch, len, heads, head_dim) tensor in q's dtype.
    Semantics: :func:`dimple_rt.reference.masked_attention`. Bad arguments raise ValueError / TypeError.
    """
    return torch.ops.dimple_rt.masked_attention.default(
        q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, causal, scale
    )


@torch.library.register_fake("dimple_rt::masked_attention")
def _masked_attention_fake(
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
    # Only what the output's metadata needs; the real kernel checks everything (cu_seqlens' values need data).
    torch._check(q.dim() == 4, lambda: f"masked_attention: q must be 4-D, got {tuple(q.shape)}")
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the kernels return
