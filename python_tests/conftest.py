# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the one tolerance table of the test suite.

Tolerances are reasoned, not tuned. fp32 comparisons of the same maths in a different order (blocked
reductions, online softmax) differ by a few ulp times the reduction length: 1e-5 relative covers reductions
of a few thousand terms. bf16 has 8 bits of mantissa (ulp 2^-8 ≈ 4e-3 relative) and fp16 11 bits
(≈ 5e-4): one or two roundings of an O(1) value.
"""

from __future__ import annotations

import pytest
import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


@pytest.fixture
def tol():
    """``tol(dtype)`` → ``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close``."""

    def lookup(dtype: torch.dtype) -> dict[str, float]:
        return TOLERANCES[dtype]

    return lookup
