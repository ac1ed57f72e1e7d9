# SPDX-License-Identifier: Apache-2.0
"""The prompt K/V cache of prefilling (Dimple spec §4.7), preallocated once per request.

One ``(batch, capacity, kv_heads, head_dim)`` K and V buffer per decoder layer, with capacity = prompt + canvas.
Every forward writes its tokens' rotated K and V at ``start`` (0 at step 0, then ``prompt_len − 1``) and the
attention op reads the keys before ``start`` as the reused prefix and the rest as the current keys, straight
from the buffer: no concatenation, no per-step allocation. Positions past the prompt are scratch, overwritten
every step, which is the authors' append-then-crop without the copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dimple_rt.model.rope import apply_rotary

KVWriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]
"""The ``kv_cache_write(cache_k, cache_v, k, v, cos, sin, start)`` contract (``dimple_rt.ops``)."""


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
    """layers: per decoder layer the (k, v) buffers (batch, capacity, kv_heads, head_dim); start: where the
    current forward's tokens go (keys before it are the reused prefix); write: the backend's cache write."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    start: int
    write: KVWriteFn

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
        write: KVWriteFn,
    ) -> KVCache:
        shape = (batch, capacity, num_kv_heads, head_dim)
        layers = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        return cls(layers=layers, start=0, write=write)
