# SPDX-License-Identifier: Apache-2.0
"""Which implementations the model and the decoding loop call.

``"reference"`` runs plain torch with the authors' numerics: :mod:`dimple_rt.reference` attention, the rotary
applied in the model dtype before a cache copy, and the decoding step of :mod:`dimple_rt.generation.sampling`
and ``schedule`` (bf16 probabilities for a bf16 model, torch's Categorical draws): the parity mode.
``"kernels"`` runs the registered C++/CUDA ops of :mod:`dimple_rt.ops` (the dispatcher picks CPU or CUDA):
fused attention, ``kv_cache_write`` and ``confident_select`` (fp32 selection, inverse-CDF sampling from
uniforms of the same seeded streams). Greedy decoding of an fp32 model gives the same tokens on both. Nothing
falls back from one to the other: asking for kernels without a built extension is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

BACKENDS = ("kernels", "reference")


class AttentionFn(Protocol):
    """The ``masked_attention`` contract (see :func:`dimple_rt.reference.masked_attention`)."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor | None = None,
        prefix_v: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor: ...


def attention_for(backend: str) -> AttentionFn:
    """The attention function of ``backend`` ("kernels" or "reference")."""
    if backend == "reference":
        from dimple_rt import reference

        return reference.masked_attention
    if backend == "kernels":
        from dimple_rt import ops

        return ops.masked_attention
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@dataclass(frozen=True)
class Backend:
    """The implementations of one backend. confident_select: the fused decoding-step op, or None for the
    reference step (``sample_tokens`` + the schedules)."""

    name: str
    attention: AttentionFn
    kv_cache_write: Callable[..., None]
    confident_select: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None


def backend_for(name: str) -> Backend:
    """The :class:`Backend` called ``name`` ("kernels" or "reference")."""
    attention = attention_for(name)
    if name == "reference":
        from dimple_rt.generation.cache import rotate_then_copy

        return Backend(name, attention, rotate_then_copy, None)
    from dimple_rt import ops

    return Backend(name, attention, ops.kv_cache_write, ops.confident_select)
