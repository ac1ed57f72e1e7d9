# SPDX-License-Identifier: Apache-2.0
"""One forward of the Qwen2.5-0.5B-shaped Dimple in fp32, bf16 and ``quantize="int8"``, and the memory of each.

    PYTHONPATH=. python benchmarks/forward_int8.py [rounds] [tokens]   # from the repository root

The checkpoint is test_bench_generate.py's (24 layers, hidden 896, FFN 4864, vocab 151936, untied LM head,
random weights, fp32 safetensors in a temporary folder). Part 1, one fresh process per precision: resident
memory (RSS, anonymous and file-backed) after loading and one small forward, with the model's parameter bytes
(:func:`dimple_rt.model.quant.weight_bytes`); for int8 also before and after quantizing an already loaded
model (``*_in_place``). Part 2, one process, one thread: a full forward of ``tokens`` text tokens (65: the
prefilled canvas) through the decoder and the LM head, the three precisions interleaved, best of ``rounds``.

Floor per forward = max(2·P·T / GEMM rate, weight bytes / bandwidth), P the decoder-layer and LM-head
parameters. GEMM rate: :func:`dimple_rt.model.layers.linear` on 2048×2048×2048 in that precision (int8: the
int8 path, its activation quantization included), measured in the same run; bandwidth: the best of 5 copies of
1 GiB (read + written).
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dimple_rt
from dimple_rt.model import layers, quant
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_bench_generate import SIZES

MODES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.float32, "int8"),
    "int8_bf16": (torch.bfloat16, "int8"),
}
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int8_bf16": 1}


def rss_mib() -> dict[str, float]:
    """Resident MiB: anonymous (memory the process owns) and file-backed (mmap'd checkpoint pages: page cache
    the kernel may drop, but counted in RSS while mapped)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def _touch(rt: dimple_rt.Runtime) -> None:
    """One small forward, so that every weight a forward reads is resident (mmap loads lazily)."""
    ids = torch.randint(0, 1000, (1, 8))
    rt.forward(ids, torch.ones_like(ids))


def memory(checkpoint: Path, mode: str) -> dict:
    """Runs in a fresh process: RSS and parameter bytes after loading ``mode`` and one small forward. For
    ``<mode>_in_place``: load without quantization, measure, quantize the loaded model, measure again."""
    in_place = mode.endswith("_in_place")
    dtype, quantize = MODES[mode.removesuffix("_in_place")]
    base = rss_mib()

    def grown() -> str:
        now = rss_mib()
        return f"anon {now['RssAnon'] - base['RssAnon']:.0f} + file {now['RssFile'] - base['RssFile']:.0f} MiB"

    start = time.perf_counter()
    rt = dimple_rt.Runtime(checkpoint, dtype=dtype, quantize=None if in_place else quantize)
    result = {"load_s": round(time.perf_counter() - start, 2)}
    _touch(rt)
    result.update(rss=grown(), param_mib=round(quant.weight_bytes(rt.model) / 2**20))
    if in_place:
        start = time.perf_counter()
        quant.quantize_model(rt.model, quantize)
        gc.collect()
        result["quantize_s"] = round(time.perf_counter() - start, 2)
        _touch(rt)
        result.update(rss_quantized=grown(), param_quantized_mib=round(quant.weight_bytes(rt.model) / 2**20))
    return result


def gemm_rate(mode: str) -> float:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    if mode in ("bf16", "int8_bf16"):
        x, w = x.bfloat16(), w.bfloat16()
    weight = quant.Int8Weight(w) if mode.startswith("int8") else w
    layers.linear(x, weight)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        layers.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def bandwidth() -> float:
    src = torch.ones(2**28)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def main(rounds: int, tokens: int) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "qwen0.5b", sizes=SIZES, vocab_size=151936)
        print(
            f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
            f"VNNI {torch.cpu._is_vnni_supported()}, bf16 GEMM {layers.cpu_has_bf16_gemm()}, 1 thread"
        )
        for mode in (*MODES, "int8_in_place", "int8_bf16_in_place"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory", str(checkpoint), mode],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"memory {mode}: {out.stdout.strip().splitlines()[-1]}", flush=True)

        runtimes = {mode: dimple_rt.Runtime(checkpoint, dtype=d, quantize=q) for mode, (d, q) in MODES.items()}
        rt = runtimes["fp32"]
        P = sum(p.numel() for p in rt.model.model.layers.parameters()) + rt.model.lm_head.weight.numel()
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, 151000, (1, tokens), generator=g)
        mask = torch.ones_like(input_ids)
        logits = {mode: r.forward(input_ids, mask).double() for mode, r in runtimes.items()}
        rates = {mode: gemm_rate(mode) for mode in MODES}
        bw = bandwidth()
        best = dict.fromkeys(MODES, math.inf)
        for _ in range(rounds):
            for mode, r in runtimes.items():
                start = time.perf_counter()
                r.forward(input_ids, mask)
                best[mode] = min(best[mode], time.perf_counter() - start)
        print(
            f"P = {P / 1e6:.1f} M (decoder layers + LM head), T = {tokens}, {2 * P * tokens / 1e9:.1f} GFLOP; "
            f"bandwidth {bw / 1e9:.1f} GB/s; best of {rounds} interleaved rounds"
        )
        print(
            "| precision | s/forward | vs fp32 | GEMM rate 2048³ | compute floor | memory floor | / floor | "
            "logits rel. err vs fp32 | argmax = fp32 |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in MODES:
            compute, mem = 2 * P * tokens / rates[mode], P * WEIGHT_BYTES[mode] / bw
            err = float((logits[mode] - logits["fp32"]).norm() / logits["fp32"].norm())
            same = float((logits[mode].argmax(-1) == logits["fp32"].argmax(-1)).double().mean())
            print(
                f"| {mode} | {best[mode]:.3f} | {best['fp32'] / best[mode]:.2f}x | {rates[mode] / 1e9:.0f} GFLOP/s "
                f"| {compute:.3f} | {mem:.4f} | {best[mode] / max(compute, mem):.2f} | {err:.2e} | {same:.0%} |"
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        torch.set_num_threads(1)
        print(json.dumps(memory(Path(sys.argv[2]), sys.argv[3])))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, int(sys.argv[2]) if len(sys.argv) > 2 else 65)
