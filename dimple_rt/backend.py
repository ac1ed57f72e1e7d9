# SPDX-License-Identifier: Apache-2.0
"""Which implementation of each op a Runtime uses: the one route by which the ops reach the model and the loop.

``"reference"`` runs plain torch with the authors' numerics: :mod:`dimple_rt.reference` attention, the rotary
applied in the model dtype before a cache copy (:func:`dimple_rt.model.kv_cache.rotate_then_copy`), and the
decoding step of :mod:`dimple_rt.generation.sampling` and ``schedule`` (bf16 probabilities for a bf16 model,
torch's Categorical draws): the parity mode. ``"kernels"`` runs the registered C++/CUDA ops of
:mod:`dimple_rt.ops` (the dispatcher picks CPU or CUDA): fused attention, ``kv_cache_write`` and
``confident_select`` (fp32 selection, inverse-CDF sampling from uniforms of the same seeded streams). Greedy
decoding of an fp32 model gives the same tokens on both. Nothing falls back from one to the other: asking for
kernels without a built extension is an error.

The model reads ``attention`` and ``kv_cache_write`` from the Backend it is given; the decoding loop reads
``confident_select``. Training builds its own Backend around an autograd-capable attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

BACKENDS = ("kernels", "reference")


class AttentionFn(Protocol):
    """The ``masked_attention`` contract (see :func:`dimple_rt.reference.masked_attention`): the current tokens'
    queries over ``[prefix ‖ current ‖ suffix]`` keys. Every implementation takes every argument."""

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
        suffix_k: torch.Tensor | None = None,
        suffix_v: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


KVWriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]
"""The ``kv_cache_write(cache_k, cache_v, k, v, cos, sin, start)`` contract (:func:`dimple_rt.ops.kv_cache_write`)."""

SelectFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""The ``confident_select`` contract (:func:`dimple_rt.ops.confident_select`)."""


@dataclass(frozen=True)
class Backend:
    """The implementations of one backend. confident_select: the fused decoding-step op, or None for the
    reference step (``sample_tokens`` + the schedules)."""

    name: str
    attention: AttentionFn
    kv_cache_write: KVWriteFn
    confident_select: SelectFn | None


def backend_for(name: str) -> Backend:
    """The :class:`Backend` called ``name`` ("kernels" or "reference")."""
    if name == "reference":
        from dimple_rt import reference
        from dimple_rt.model.kv_cache import rotate_then_copy

        return Backend(name, reference.masked_attention, rotate_then_copy, None)
    if name == "kernels":
        from dimple_rt import ops

        return Backend(name, ops.masked_attention, ops.kv_cache_write, ops.confident_select)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
