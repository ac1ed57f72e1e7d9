# SPDX-License-Identifier: Apache-2.0
"""Which implementation of the attention op the model calls.

``"reference"`` runs the plain-torch functions of :mod:`dimple_rt.reference`; ``"kernels"`` runs the
registered C++/CUDA ops of :mod:`dimple_rt.ops` (the dispatcher picks CPU or CUDA). Nothing falls back from
one to the other: asking for kernels without a built extension is an error.
"""

from __future__ import annotations

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
