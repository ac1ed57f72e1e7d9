# SPDX-License-Identifier: Apache-2.0
"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm with the reference's order of operations.

    The variance is computed in fp32 and the normalised value is cast back to the input dtype *before* the
    weight multiply; with bf16 weights this order decides the last bit, so it is kept exactly.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        normed = (x32 * torch.rsqrt(variance + self.eps)).to(dtype)
        return self.weight * normed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., d/2:], x[..., :d/2])``: the rotation partner used by RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; the decoder has no biases, the vision tower does."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
