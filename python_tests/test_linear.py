# SPDX-License-Identifier: Apache-2.0
"""dimple_rt.model.layers.linear: the fp32-compute path for bf16 on CPUs without bf16 GEMM matches torch's bf16
linear (bf16 inputs, fp32 accumulation, one rounding), chunked or not, with and without bias, and trains."""

from __future__ import annotations

import pytest
import torch

from dimple_rt.model import layers


@pytest.fixture(params=[False, True], ids=["native", "widened"])
def widened(request, monkeypatch) -> bool:
    """Run each test on both paths, whatever this CPU has."""
    monkeypatch.setattr(layers, "cpu_has_bf16_gemm", lambda: not request.param)
    return request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [layers.WIDEN_CHUNK_BYTES, 4 * 37 * 5])  # 5 output rows per chunk
def test_matches_fp32_math_rounded_once(widened: bool, bias: bool, chunk_bytes: int, monkeypatch) -> None:
    monkeypatch.setattr(layers, "WIDEN_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 37, generator=g).bfloat16()
    w = torch.randn(23, 37, generator=g).bfloat16()  # 23 outputs: the last chunk is partial
    b = torch.randn(23, generator=g).bfloat16() if bias else None
    out = layers.linear(x, w, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 23)
    # One rounding of an fp32 sum: within bf16's half-ulp (2^-9 relative) plus fp32 summation error.
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-5)
    if widened:  # the widened path is fp32 math, rounded once
        fp32 = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()
        torch.testing.assert_close(out, fp32, rtol=0, atol=0)


def test_other_dtypes_are_plain_linear(widened: bool) -> None:
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    assert torch.equal(layers.linear(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(RuntimeError):  # mixed dtypes stay an error, as in F.linear
        layers.linear(x, w.bfloat16())


def test_gradients_reach_the_bf16_weight(widened: bool) -> None:
    module = layers.Linear(6, 4).bfloat16()
    x = torch.randn(2, 6).bfloat16().requires_grad_()
    module(x).float().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.dtype == torch.bfloat16
    assert x.grad is not None and module.bias.grad is not None
    torch.testing.assert_close(module.bias.grad.float(), torch.full((4,), 2.0))
