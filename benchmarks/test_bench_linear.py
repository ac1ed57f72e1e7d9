# SPDX-License-Identifier: Apache-2.0
"""Linear layers of the decoder shapes: fp32 and bf16 ``F.linear`` against the int8 candidates.

One group per shape (tokens × in_features × out_features); each group holds:
- ``fp32``, ``bf16``: :func:`dimple_rt.model.layers.linear` on float weights (bf16 is torch's native bf16 GEMM
  where ``cpu_has_bf16_gemm()``, the widening path elsewhere);
- ``bf16_packed``: what a bf16 Runtime runs where the CPU has bf16 GEMM: the weight reordered once for oneDNN
  (model/packed.py), bitwise ``bf16``'s outputs;
- ``int8``: what ``quantize="int8"`` runs (fbgemm's dynamic linear, per-token scales, model/quant.py);
- ``int8_per_tensor``: the same op without the per-token rescaling (its one scale per input tensor);
- ``int8_onednn``: the same per-token op on weights prepacked by the ``onednn`` engine;
- ``int8_int_mm``: per-token symmetric int8 activations × int8 weights on ``torch._int_mm`` (int32 out);
- ``int8_weight_only``: ``torch._weight_int8pack_mm`` with bf16 activations (weight-only int8, no activation
  rounding). Its fp32-activation kernel runs at ~2 GFLOP/s here and is left out.
Each candidate is checked against fp64 before it is timed (int8 within 2x the rounding error that
model/quant.py predicts). GFLOP/s is in extra_info.

    DIMPLE_RT_BENCH_THREADS=1 pytest benchmarks/test_bench_linear.py --benchmark-group-by=group
    PYTHONPATH=. python benchmarks/test_bench_linear.py [rounds]   # the same candidates interleaved, one thread: ratios

pytest-benchmark times one candidate after the other, so on a shared machine its ratios drift with the load;
the script's interleaved rounds are what benchmarks/RESULTS.md quotes.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable

import pytest
import torch

from dimple_rt.model import layers, quant
from dimple_rt.model.packed import PackedBf16Weight

# name: (tokens, in_features, out_features)
SHAPES = {
    "qwen0.5b_gate_65tok": (65, 896, 4864),
    "qwen0.5b_down_65tok": (65, 4864, 896),
    "qwen0.5b_lm_head_65tok": (65, 896, 151936),
    "qwen0.5b_gate_1tok": (1, 896, 4864),
    "qwen0.5b_gate_16tok": (16, 896, 4864),
    "qwen0.5b_gate_9tok": (9, 896, 4864),
    "qwen0.5b_down_9tok": (9, 4864, 896),
    "qwen0.5b_lm_head_9tok": (9, 896, 151936),
    "qwen0.5b_gate_33tok": (33, 896, 4864),
    "dimple7b_gate_65tok": (65, 3584, 18944),
}
CANDIDATES = (
    "fp32",
    "bf16",
    "bf16_packed",
    "int8",
    "int8_per_tensor",
    "int8_onednn",
    "int8_int_mm",
    "int8_weight_only",
)


def _prepack(weight: torch.Tensor, engine: str) -> torch.ScriptObject:
    """Per-channel symmetric int8 ``weight`` prepacked under ``engine`` (as quant.Int8Weight does for x86)."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-30) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
        )
    with quant._quantized_engine(engine):
        return torch.ops.quantized.linear_prepack(qweight, None)


def make(name: str, x: torch.Tensor, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call ``fn()`` of candidate ``name`` on fp32 activations ``x`` (tokens, in) and weight (out, in)."""
    if name == "fp32":
        return lambda: layers.linear(x, weight)
    if name == "bf16":
        xb, wb = x.bfloat16(), weight.bfloat16()
        return lambda: layers.linear(xb, wb)
    if name == "bf16_packed":
        xb, packed_b = x.bfloat16(), PackedBf16Weight(weight.bfloat16())
        return lambda: layers.linear(xb, packed_b)
    if name == "int8":
        int8 = quant.Int8Weight(weight)
        return lambda: layers.linear(x, int8)
    if name == "int8_per_tensor":
        packed = _prepack(weight, quant.ENGINE)
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, quant.reduce_range())
    if name == "int8_onednn":
        packed = _prepack(weight, "onednn")

        def onednn() -> torch.Tensor:
            token_scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)
            return torch.ops.quantized.linear_dynamic(x / token_scale, packed, False).mul_(token_scale)

        return onednn
    scale = weight.abs().amax(dim=1).clamp_min(1e-30) / 127  # (out,)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    if name == "int8_int_mm":
        qt = q.t()  # (in, out)

        def int_mm() -> torch.Tensor:
            token_scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30) / 127  # (tokens, 1)
            xq = torch.round(x / token_scale).clamp_(-127, 127).to(torch.int8)  # (tokens, in)
            return torch._int_mm(xq, qt).float().mul_(token_scale).mul_(scale)

        return int_mm
    if name == "int8_weight_only":
        xb, scale_b = x.bfloat16(), scale.bfloat16()
        return lambda: torch._weight_int8pack_mm(xb, q, scale_b)
    raise ValueError(f"unknown candidate {name!r}")


def inputs(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, n_in, n_out = shape
    g = torch.Generator().manual_seed(0)
    return torch.randn(tokens, n_in, generator=g), torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)


def check(name: str, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative error against fp64; raises if it exceeds what the candidate's arithmetic allows."""
    exact = x.double() @ weight.double().T
    err = float((out.double() - exact).norm() / exact.norm())
    if name == "fp32":
        bound = 1e-5
    elif name in ("bf16", "bf16_packed", "int8_weight_only"):
        bound = 2e-2
    else:  # int8 × int8: 2x the rounding error quant.py predicts (~1.3 % at 4864 inputs)
        bound = 2 * math.sqrt(2) * float(x.abs().amax(-1).mean() / x.std()) / (127 * math.sqrt(12))
    if err > bound:
        raise AssertionError(f"{name}: relative error {err:.2e} > {bound:.2e}")
    return err


@pytest.mark.parametrize("impl", CANDIDATES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_linear(timed, shape_name: str, impl: str) -> None:
    if impl == "bf16_packed" and not layers.cpu_has_bf16_gemm():
        pytest.skip("no native bf16 GEMM on this CPU: a bf16 Runtime does not pack here")
    x, weight = inputs(SHAPES[shape_name])
    fn = make(impl, x, weight)
    check(impl, fn(), x, weight)
    tokens, n_in, n_out = SHAPES[shape_name]
    flops = 2 * tokens * n_in * n_out
    rounds = 3 if flops > 5e9 else 10
    timed(
        fn,
        group=shape_name,
        bytes_moved=n_in * n_out * {"fp32": 4, "bf16": 2, "bf16_packed": 2}.get(impl, 1),
        flops=flops,
        rounds=rounds,
    )


def interleaved(rounds: int = 5) -> None:
    """Every candidate of a shape once per round, in turn, one thread; the best of the rounds."""
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, VNNI {torch.cpu._is_vnni_supported()}, "
        f"bf16 GEMM {layers.cpu_has_bf16_gemm()}, 1 thread, best of {rounds} interleaved rounds"
    )
    candidates = [c for c in CANDIDATES if c != "bf16_packed" or layers.cpu_has_bf16_gemm()]
    print("| shape | " + " | ".join(candidates) + " | int8 vs fp32 | int8 vs bf16 | bf16_packed vs bf16 |")
    print("|---" * (len(candidates) + 4) + "|")
    for shape_name, shape in SHAPES.items():
        x, weight = inputs(shape)
        flops = 2 * math.prod(shape)
        fns = {name: make(name, x, weight) for name in candidates}
        errs = {name: check(name, fn(), x, weight) for name, fn in fns.items()}
        calls = max(1, int(3e9 / flops))
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
        cells = [f"{best[n] * 1e3:.2f} ms {flops / best[n] / 1e9:.0f} GF/s ({errs[n]:.1e})" for n in candidates]
        ratios = f"{best['fp32'] / best['int8']:.2f}x | {best['bf16'] / best['int8']:.2f}x | "
        ratios += f"{best['bf16'] / best['bf16_packed']:.2f}x" if "bf16_packed" in best else "-"
        print(f"| {shape_name} {'x'.join(map(str, shape))} | " + " | ".join(cells) + f" | {ratios} |", flush=True)


if __name__ == "__main__":
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
