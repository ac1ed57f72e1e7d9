# SPDX-License-Identifier: Apache-2.0
"""int8 linears on CPU: per-output-channel symmetric int8 weights, dynamic per-token int8 activations.

``Runtime(..., quantize="int8")`` quantizes while the safetensors are loaded (:func:`quantize_after_file`, then
:func:`quantize_model` for what is left): every :class:`~dimple_rt.model.layers.Linear` of the decoder and the
LM head gets an :class:`Int8Weight` in place of its float weight (which is freed, and its file unmapped), and
:func:`~dimple_rt.model.layers.linear` (the one linear entry point) multiplies it with :func:`int8_linear`. Not quantized: the vision tower and the image projector (they run once
per image, a few percent of a request's time, and every answer token reads their output), the embedding table
(a gather, no arithmetic), norms and attention.

The GEMM is torch's quantized dynamic linear (``torch.ops.quantized.linear_dynamic``) on the ``x86`` engine
(fbgemm: u8×s8 dot products with int32 accumulation, VNNI where the CPU has it). Measured on this project's
AVX-512-VNNI/BF16 EPYC, one thread, candidates interleaved (benchmarks/test_bench_linear.py, RESULTS.md):
3.7-5.8x fp32 and 1.3-2.1x torch's native bf16 GEMM on the 65-token shapes (8-9x / 2.4-3x with 16 tokens). Against it:
- ``torch._int_mm`` (int8×int8→int32, the same per-token scales): 0.75-1.05x this path's speed on 65 tokens,
  0.6-0.75x on 16; faster only for a single token (1.1-2.3x), which Dimple's 65-token canvas never is;
- ``torch._weight_int8pack_mm`` (weight-only int8, no activation rounding, ~0.85 % error against 1.1-1.2 %):
  its bf16 kernel runs at fp32's speed (0.2-0.25x this path; 0.65x for one token), its fp32 one at ~2 GFLOP/s;
- the ``onednn`` engine, same op: 1.0-1.25x on the decoder shapes and 1.5-1.7x on the 151936-row LM head, but its
  packed weight keeps a second int8 copy (2 bytes per parameter, bf16's footprint; fbgemm's keeps one byte).
  The weights are not kept twice, so fbgemm it is.
Caveat: torch 2.13 warns that quantized tensor creation (used once here, to hand the int8 weight to the
prepack) is deprecated (pytorch/pytorch#184982). Should it go, ``torch._int_mm`` with the same per-token
scales is the measured next-fastest path.

Per-token activations on a per-tensor kernel: ``linear_dynamic`` quantizes its whole input with one
(asymmetric, 8-bit) scale. Each token is first divided by its own absmax, so every row spans [-1, 1], and the
output row is multiplied back by it (a linear map commutes with a per-row scale; the bias is added after).
Each token then gets a step of ``2·absmax/255``: the resolution of per-token symmetric int8, and one token with
huge activations (an attention sink) cannot flatten the others. Cost: a pass over x and one over the output
(~0.1 ms of a 2-4 ms decoder GEMM).

Error (reasoned, checked in python_tests/test_quantize.py): rounding to a grid of step Δ adds uniform noise of
variance Δ²/12. With Δ_w = absmax(row)/127 and Δ_x ≈ absmax(token)/127.5, a dot product of Gaussian-like
factors has relative error ≈ sqrt(2) · absmax/(σ · 127 · sqrt(12)): 1.0-1.3 % for 896-18944 inputs per output,
against 0.3 % for bf16.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

QUANTIZE_MODES = ("int8",)
ENGINE = "x86"
_CHUNK_ELEMENTS = 1 << 22
"""Weight entries quantized at a time: bounds the fp32 temporaries to 16 MiB each (Dimple-7B's LM head has 545 M
entries: unchunked, its fp32 copy and quotient alone would take 4.4 GB at load)."""


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """Prepack under ``engine`` and put the process-wide setting back: the packed object remembers its engine."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def reduce_range() -> bool:
    """7-bit activations where the CPU lacks VNNI: AVX2's ``vpmaddubsw`` adds two u8·s8 products in int16,
    which saturates for 255·127·2; VNNI (``vpdpbusd``) accumulates in int32 and takes the full 8 bits."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)  # private: absent means "assume no VNNI", the safe side
    return not (is_vnni is not None and is_vnni())


class Int8Weight:
    """A linear weight (out_features, in_features) quantized to int8 per output channel (symmetric:
    ``w ≈ scale[o] · q[o, :]``, q in [-127, 127]) and prepacked for fbgemm. Holds no float copy.

    ``dtype`` is the activation dtype the layer takes and returns (fp32 or bf16); the GEMM itself reads fp32.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"Int8Weight needs a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
        rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
        scale = torch.empty(weight.shape[0], dtype=torch.float32)  # (out,)
        q = torch.empty(weight.shape, dtype=torch.int8)  # (out, in)
        for start in range(0, weight.shape[0], rows):  # row by row is exact: each row has its own scale
            w32 = weight.detach()[start : start + rows].float()
            part = w32.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
            q[start : start + rows] = torch.round(w32 / part[:, None]).clamp_(-127, 127)  # w32 may be weight
            scale[start : start + rows] = part
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; see the module docstring
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
        del q
        with _quantized_engine(ENGINE):
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        self.device = weight.device
        # fbgemm's packed B: one byte per weight (padded to its blocks), plus a column offset and a scale per row.
        self.nbytes = weight.numel() + 12 * weight.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the GEMM multiplies by, ``scale[o] · q[o, :]`` (for tests)."""
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qweight.dequantize().float()

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, engine={ENGINE!r})"


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W int8 per channel and x quantized to 8 bits per token on the fly.

    x: (..., in_features) fp32 or bf16 → (..., out_features) in x's dtype; bf16 goes through fp32 around the
    GEMM. No autograd: quantized models are inference-only.
    """
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("quantize='int8' layers are inference-only: no gradient flows through an int8 weight")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the int8 weight takes {weight.shape[1]}")
    x32 = x.float()
    token_scale = x32.abs().amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)  # (..., 1)
    out = torch.ops.quantized.linear_dynamic(x32 / token_scale, weight.packed, reduce_range())  # (..., out)
    out.mul_(token_scale)
    if bias is not None:
        out.add_(bias)
    return out.to(x.dtype)


def _check_mode(quantize: str) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")


def check_quantize(quantize: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """ValueError/TypeError naming the option for a combination :func:`quantize_model` cannot run."""
    if quantize is None:
        return
    _check_mode(quantize)
    if device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} is not implemented on {device.type!r}: it runs on CPU only")
    if dtype not in (torch.float32, torch.bfloat16):
        # fp16 has no fast CPU GEMM to gain from and no test here; fp32/bf16 activations are what int8 serves.
        raise TypeError(f"quantize={quantize!r} takes dtype torch.float32 or torch.bfloat16, got {dtype}")


def quantize_model(model: nn.Module, quantize: str | None) -> None:
    """Quantize ``model``'s decoder linears (``model.model``) and LM head (``model.lm_head``) in place; the float
    weights are dropped. The model is switched to inference: training it afterwards raises ValueError."""
    from .layers import Linear, convert_linears

    if quantize is None:
        return
    _check_mode(quantize)
    convert_linears(model, Linear.quantize_int8)  # a no-op for those :func:`quantize_after_file` did
    release_freed_heap()


def quantize_after_file(model: nn.Module, quantize: str | None) -> Callable[[list[str]], None] | None:
    """The loader's ``after_file`` hook (:func:`dimple_rt.weights.load_state_dict_into`) for ``quantize``: it
    quantizes each linear that :func:`quantize_model` would, as soon as the file holding its weight is read.

    The loader then copies that file's other tensors out of its mapping and the file is unmapped, so loading
    Dimple-7B with int8 keeps one file's bf16 pages resident at a time instead of all 15.5 GiB of them.
    None (no hook) without ``quantize``; a tied weight is left to :func:`quantize_model`.
    """
    from .layers import Linear, convert_after_file

    if quantize is None:
        return None
    _check_mode(quantize)
    return convert_after_file(model, Linear.quantize_int8)


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    glibc serves blocks under its mmap threshold from the heap, and the threshold rises to 32 MB once a larger
    block is freed; the freed float weights (a 0.5B decoder's are 3-17 MB each) then stay in RSS. Measured on
    the 0.5B shape: 1.6-1.8 GiB anonymous RSS after quantizing, 0.6-0.9 GiB after the trim.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or another libc: no malloc_trim
            pass


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, buffers and inference weights (int8 or prepacked bf16)."""
    from .packed import PackedBf16Weight

    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    forms = (Int8Weight, PackedBf16Weight)
    return total + sum(m.weight.nbytes for m in model.modules() if isinstance(getattr(m, "weight", None), forms))
