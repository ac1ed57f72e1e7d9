# SPDX-License-Identifier: Apache-2.0
"""bf16 linears on CPU with weights prepacked once for oneDNN's bf16 GEMM.

``torch.nn.functional.linear`` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout at every
call; for the few-token products of a decoding step (a dual-cache block of 8-33 rows, a 65-token canvas) that
reorder costs as much as the multiply. :class:`PackedBf16Weight` does it once, at load
(``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU backend uses for frozen linears), and
:func:`packed_linear` multiplies with ``torch.ops.mkldnn._linear_pointwise``. Same kernel family, same
accumulation: the outputs are bitwise equal to ``F.linear``'s (python_tests/test_packed.py checks it).
Measured on an AVX512-BF16 EPYC, one thread: 1.3-2.7x ``F.linear`` for 9-33 rows on the 0.5B shapes
(benchmarks/RESULTS.md, "bf16 prepacked linears").

Only where the CPU has native bf16 dot products (:func:`~dimple_rt.model.layers.cpu_has_bf16_gemm`): without
them (AVX2) bf16 linears take the widening path of :func:`~dimple_rt.model.layers.linear` instead. Packing makes
the model inference-only, as int8 does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PackedBf16Weight:
    """A bf16 linear weight (out_features, in_features) in oneDNN's blocked layout. Holds no plain copy."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise TypeError(
                f"PackedBf16Weight needs a 2-D bf16 CPU weight, got {tuple(weight.shape)} {weight.dtype} "
                f"on {weight.device}"
            )
        # The batch-size argument is a layout hint only; the packed weight multiplies any number of rows.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        self.device = weight.device
        self.nbytes = weight.numel() * weight.element_size()

    def __repr__(self) -> str:
        return f"PackedBf16Weight(shape={tuple(self.shape)})"


def packed_linear(x: torch.Tensor, weight: PackedBf16Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for bf16 x (..., in_features) → (..., out_features) bf16. No autograd."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("prepacked bf16 layers are inference-only: no gradient flows through a packed weight")
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise TypeError(f"a prepacked bf16 weight takes bf16 CPU activations, got {x.dtype} on {x.device}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weight takes {weight.shape[1]}")
    return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")


def pack_bf16_model(model: nn.Module) -> None:
    """Prepack the bf16 weights of ``model``'s decoder linears and LM head in place, freeing the plain ones (a
    no-op for those already packed, e.g. by :func:`pack_after_file`). The model is switched to inference."""
    from .layers import Linear, convert_linears

    convert_linears(model, Linear.pack_bf16)


def pack_after_file(model: nn.Module) -> Callable[[list[str]], None]:
    """The loader's ``after_file`` hook that packs each linear as soon as its file is read (the file is then
    unmapped: a bf16 Dimple-7B keeps one file's mapped pages next to the packed weights, not all 15.5 GiB)."""
    from .layers import Linear, convert_after_file

    return convert_after_file(model, Linear.pack_bf16)
