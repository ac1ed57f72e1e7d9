# SPDX-License-Identifier: Apache-2.0
"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .packed import PackedBf16Weight, packed_linear
from .quant import Int8Weight, int8_linear

InferenceWeight = Int8Weight | PackedBf16Weight

# Output features per fp32 weight chunk of :func:`linear`'s widening path: at most this many bytes of widened
# weight exist at once (a whole fp32 copy of Dimple-7B's LM head would be 2.2 GB).
WIDEN_CHUNK_BYTES = 32 * 2**20


@functools.cache
def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as oneDNN sees it). Without it torch's
    bf16 GEMM is 5-100x slower than its fp32 one (AVX2: 0.2-8 GFLOP/s against 35-80)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: assume the slow path is the only one
        return False


def linear(x: torch.Tensor, weight: torch.Tensor | InferenceWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The one linear entry point: ``F.linear``, except for three cases chosen by the weight loaded.

    - An :class:`~dimple_rt.model.quant.Int8Weight` (``quantize="int8"``): int8 weights times per-token int8
      activations, see :func:`~dimple_rt.model.quant.int8_linear`.
    - A :class:`~dimple_rt.model.packed.PackedBf16Weight` (a bf16 Runtime on a CPU with bf16 GEMM): oneDNN's
      GEMM on the weight reordered once, see :func:`~dimple_rt.model.packed.packed_linear`.
    - bf16 on a CPU without bf16 GEMM: the weight is widened to fp32 in chunks of output features and
      multiplied in fp32, and the result rounded to bf16 once. Same math as a bf16 GEMM (bf16 inputs, fp32
      accumulation, one rounding of the output), about 4x faster on AVX2; only the summation order differs.
      Autograd flows through the widening to the bf16 weight.
    """
    if isinstance(weight, Int8Weight):
        return int8_linear(x, weight, bias)
    if isinstance(weight, PackedBf16Weight):
        return packed_linear(x, weight, bias)
    if (
        x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or weight.device.type != "cpu"
        or cpu_has_bf16_gemm()
    ):
        return nn.functional.linear(x, weight, bias)
    x32 = x.float()
    weights = weight.split(max(1, WIDEN_CHUNK_BYTES // (4 * weight.shape[1])))
    biases = [None] * len(weights) if bias is None else bias.split(weights[0].shape[0])
    chunks = [nn.functional.linear(x32, w.float(), b if b is None else b.float()) for w, b in zip(weights, biases)]
    return torch.cat(chunks, dim=-1).to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) computed by :func:`linear`.

    After :meth:`quantize_int8` or :meth:`pack_bf16` its ``weight`` is an inference form (an
    :class:`~dimple_rt.model.quant.Int8Weight` or :class:`~dimple_rt.model.packed.PackedBf16Weight`, not a
    parameter) and the module is inference-only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def quantize_int8(self) -> None:
        """Replace the float weight by its int8 form and free it; the bias stays a float parameter (frozen)."""
        self._to_inference(Int8Weight)

    def pack_bf16(self) -> None:
        """Replace the bf16 weight by its oneDNN-packed form and free it; the bias stays (frozen)."""
        self._to_inference(PackedBf16Weight)

    def _to_inference(self, form: type[InferenceWeight]) -> None:
        if not isinstance(self.weight, torch.Tensor):
            if isinstance(self.weight, form):
                return
            raise ValueError(f"this layer's weight is already a {type(self.weight).__name__}")
        converted = form(self.weight)
        del self.weight  # drops the parameter: the float weight is not kept next to the converted one
        self.weight = converted
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Linear:
        if mode and isinstance(self.weight, Int8Weight):
            raise ValueError("a quantize='int8' model is inference-only: it cannot be put in training mode")
        if mode and isinstance(self.weight, PackedBf16Weight):
            raise ValueError("a Runtime's prepacked bf16 model is inference-only: it cannot be put in training mode")
        return super().train(mode)


def inference_linears(model: nn.Module) -> Iterator[tuple[str, Linear]]:
    """The linears an inference form replaces (int8, prepacked bf16), with their names in ``model``: the
    decoder's (``model.model``) and the LM head. The vision tower and projector run once per image: not them."""
    for prefix, root in (("model", model.model), ("lm_head", model.lm_head)):
        for name, module in root.named_modules(prefix=prefix):
            if isinstance(module, Linear):
                yield name, module


def convert_linears(model: nn.Module, convert: Callable[[Linear], None]) -> None:
    """``convert`` every inference linear of ``model`` (``Linear.quantize_int8`` or ``Linear.pack_bf16``, no-ops
    on a layer already converted) and switch the model to inference."""
    model.eval()
    for _, module in inference_linears(model):
        convert(module)


def convert_after_file(model: nn.Module, convert: Callable[[Linear], None]) -> Callable[[list[str]], None]:
    """The loader's ``after_file`` hook (:func:`dimple_rt.weights.load_state_dict_into`) that converts each
    inference linear as soon as the file holding its weight is read, so that the loader can unmap the file
    before the next one: one file's float pages resident at a time, not the whole checkpoint's."""
    targets = {f"{name}.weight": module for name, module in inference_linears(model)}

    def convert_file(names: list[str]) -> None:
        for name in names:
            if name in targets:
                convert(targets[name])

    return convert_file


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
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
