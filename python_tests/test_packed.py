# SPDX-License-Identifier: Apache-2.0
"""Prepacked bf16 linears (dimple_rt.model.packed): bitwise the outputs of F.linear on awkward row counts and
shapes, used by a bf16 CPU Runtime (same logits and tokens as the plain layers), inference-only, bad input
named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dimple_rt
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.model.layers import Linear, cpu_has_bf16_gemm, inference_linears
from dimple_rt.model.packed import PackedBf16Weight, pack_bf16_model, packed_linear
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint
from dimple_rt.weights import load_state_dict_into

pytestmark = pytest.mark.skipif(not cpu_has_bf16_gemm(), reason="this CPU has no native bf16 GEMM: nothing is packed")


@pytest.mark.parametrize("rows", [1, 5, 16, 33, 130])
@pytest.mark.parametrize("features", [(24, 40), (96, 7), (129, 257)])
def test_packed_equals_f_linear_bitwise(rows: int, features: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + features[0])
    fan_in, fan_out = features
    weight = torch.randn(fan_out, fan_in, generator=generator).bfloat16()
    bias = torch.randn(fan_out, generator=generator).bfloat16()
    x = torch.randn(2, rows, fan_in, generator=generator).bfloat16()
    packed = PackedBf16Weight(weight)
    for b in (None, bias):
        torch.testing.assert_close(packed_linear(x, packed, b), nn.functional.linear(x, weight, b), rtol=0, atol=0)
    strided = x.transpose(0, 1)  # non-contiguous rows
    torch.testing.assert_close(packed_linear(strided, packed), nn.functional.linear(strided, weight), rtol=0, atol=0)


def test_a_bf16_runtime_packs_and_keeps_its_outputs(tmp_path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny", seed=3)
    rt = dimple_rt.Runtime(checkpoint, dtype=torch.bfloat16)
    layers = [m for m in rt.model.modules() if isinstance(m, Linear) and isinstance(m.weight, PackedBf16Weight)]
    assert layers and isinstance(rt.model.lm_head.weight, PackedBf16Weight)
    with pytest.raises(ValueError, match="inference-only"):
        rt.model.train()
    plain = dimple_rt.Runtime(checkpoint, dtype=torch.bfloat16)
    with torch.device("meta"):
        plain.model = DimpleModel(plain.config)
    load_state_dict_into(plain.model, plain.path, dtype=torch.bfloat16, device=plain.device)
    plain.model.eval()
    assert isinstance(plain.model.lm_head.weight, torch.Tensor)
    inputs = rt.prepare("Describe the picture in one word.")
    torch.testing.assert_close(rt.forward(**vars(inputs)), plain.forward(**vars(inputs)), rtol=0, atol=0)
    answer = rt.generate("Describe the picture in one word.", max_new_tokens=12)
    assert answer.token_ids == plain.generate("Describe the picture in one word.", max_new_tokens=12).token_ids


def test_bad_inputs_are_named() -> None:
    with pytest.raises(TypeError, match="2-D bf16 CPU weight"):
        PackedBf16Weight(torch.randn(4, 4))
    packed = PackedBf16Weight(torch.randn(4, 6).bfloat16())
    with pytest.raises(TypeError, match="bf16 CPU activations"):
        packed_linear(torch.randn(2, 6), packed)
    with pytest.raises(ValueError, match="x has 5 features"):
        packed_linear(torch.randn(2, 5).bfloat16(), packed)
    with pytest.raises(ValueError, match="inference-only"):
        packed_linear(torch.randn(2, 6).bfloat16().requires_grad_(), packed)


def test_pack_bf16_model_packs_decoder_and_head_only(tmp_path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny", seed=4)
    rt = dimple_rt.Runtime(checkpoint)  # fp32: nothing packed
    assert isinstance(rt.model.lm_head.weight, torch.Tensor)
    model = rt.model.to(torch.bfloat16)
    pack_bf16_model(model)
    linears = [module for _, module in inference_linears(model)]
    assert len(linears) > 1 and all(isinstance(m.weight, PackedBf16Weight) for m in linears)
    assert isinstance(model.model.layers[0].mlp.gate_proj.weight, PackedBf16Weight)
    pack_bf16_model(model)  # already packed: a no-op, not an error
    assert all(isinstance(m.weight, PackedBf16Weight) for m in linears)
    assert all(isinstance(p, torch.Tensor) for p in model.visual.parameters())  # the vision tower is not packed
