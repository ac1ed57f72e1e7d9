# SPDX-License-Identifier: Apache-2.0
"""The per-request K/V cache of prefilling (Dimple spec §4.7), preallocated once per request.

One ``(batch, capacity, kv_heads, head_dim)`` K and V buffer per decoder layer, with capacity = prompt + canvas.
A forward given the cache and a ``start`` writes its tokens' rotated K and V at ``start`` (through the
backend's ``kv_cache_write``) and the attention op reads the keys before ``start`` as the reused prefix and the
rest as the current keys, straight from the buffer: no concatenation, no per-step allocation. Which span a
forward computes is the caller's decision (the decoding loop's cache policy); the cache only holds buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import apply_rotary


def rotate_then_copy(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
) -> None:
    """The reference backend's cache write: the model's ``apply_rotary`` (rounding after each op in the model
    dtype, as the authors' bf16 code does), then a copy. The fused op rounds once, which is not bit-parity."""
    end = start + k.shape[1]
    cache_k[:, start:end] = apply_rotary(k, cos, sin)
    cache_v[:, start:end] = v


@dataclass
class KVCache:
    """layers: per decoder layer the (k, v) buffers (batch, capacity, kv_heads, head_dim)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def capacity(self) -> int:
        """Positions each buffer holds."""
        return self.layers[0][0].shape[1] if self.layers else 0

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (batch, capacity, num_kv_heads, head_dim)
        layers = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        return cls(layers=layers)
