# SPDX-License-Identifier: Apache-2.0
"""Time each CUDA kernel of dimple_rt against its baselines on Dimple-7B shapes; print one table.

Run by benchmarks/gpu_check.sh after the CUDA tests (``python3 -P benchmarks/gpu_bench.py``); ``--dry-run`` runs
everything a CPU can (arguments, the cases' shapes and work counts on the meta device, the peak table, which
baselines are importable, the table layout) without a GPU. Every kernel is checked against dimple_rt.reference
on the same inputs before it is timed.

Timing: after ``--warmup`` calls, ``--inner`` calls are captured in one CUDA graph (or, where capture is not
possible, e.g. an op that reads a value back to the host, issued back to back) and replayed between ONE pair
of CUDA events; that is repeated ``--repeats`` times and the table gives the median and the min per call. So
µs-scale ops measure GPU time, not host dispatch, and nothing here syncs the host inside a timed region.
confident_select is timed both in a graph (kernels only) and eagerly (with the one device-to-host copy of its
error checks). The method column says which.

Roofline: attention counts 4·D FLOP per visible (query, key) pair and head (QKᵀ and PV), shown as TFLOP/s and %
of the GPU's dense BF16 tensor peak; kv_cache_write and confident_select count the bytes they must move at
least (inputs read once, outputs written once), as GB/s and % of HBM bandwidth. Peaks: NVIDIA's data sheets.

Shapes (Dimple-7B: 28 query heads, 4 kv heads, head_dim 128; vision tower head_dim 80):
  attention decode    canvas 65 / 64 / 256 over 600 / 2048 cached tokens, batch 1 and 4, left-padding mask
  attention prefill   665 tokens over themselves, batch 1
  attention vision    1024 patches, 16 heads, head_dim 80, 16 windows of 64 (cu_seqlens)
  kv_cache_write      65 tokens into a 700-token cache at 600
  confident_select    1 / 16 / 64 / 256 masked rows x 152064 vocabulary greedy; 64 rows sampled (top-p, top-k)
Baselines: torch SDPA (enable_gqa, bool mask and none), flash-attn and FlashInfer when importable (else the
table says why not), the torch composites of dimple_rt.reference and the authors' sample_tokens + topk.
"""

# ruff: noqa: B023  (every lambda is timed before the loop moves on)
from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dimple_rt import ops, reference
from dimple_rt.generation.sampling import sample_tokens

# (dense BF16 tensor FLOP/s, HBM bytes/s) by device-name fragment, most specific first.
PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H800", 989e12, 3.35e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),
    ("L40S", 362e12, 0.864e12),
]


def peaks_for(name: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) peaks of a device by its name, or None when it is not in the table."""
    for fragment, flops, bandwidth in PEAKS:
        if fragment in name:
            return flops, bandwidth
    return None


def optional_module(name: str) -> tuple[object | None, str]:
    """The module, or None and the reason it cannot be used (shown in the table instead of its rows)."""
    try:
        return importlib.import_module(name), ""
    except (ImportError, OSError, RuntimeError) as e:  # missing, or built for another torch/CUDA
        return None, f"{name} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


@dataclass
class Timing:
    median_us: float
    min_us: float
    method: str


def time_op(fn: Callable[[], object], args: argparse.Namespace, graph: bool) -> Timing:
    """Median and min µs per call: ``args.inner`` calls between one event pair, ``args.repeats`` times."""
    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize()

    def loop() -> None:
        for _ in range(args.inner):
            fn()

    runner, method = loop, f"{args.inner} launches"
    if graph and not args.no_graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # capture-time allocations come from warmed-up pools
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(cuda_graph):
                loop()
            runner, method = cuda_graph.replay, f"graph of {args.inner}"
        except Exception as e:  # noqa: BLE001  (an op that syncs cannot be captured: time it eagerly)
            torch.cuda.synchronize()
            method = f"{args.inner} launches (capture: {type(e).__name__})"
    runner()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / args.inner)
    return Timing(statistics.median(times), min(times), method)


@dataclass
class Row:
    case: str
    impl: str
    timing: Timing | None
    work: float  # FLOP (attention) or bytes (the others)
    kind: str  # "flop" | "bytes"
    note: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    device: str
    peaks: tuple[float, float] | None
    rows: list[Row] = field(default_factory=list)
    failures: int = 0

    def verified(self, case: str, check: Callable[[], None]) -> bool:
        """Runs ``check`` (our kernel against the reference); a failure is a table row, not the end of the run, so
        one wrong kernel still leaves every other number of the GPU slot. Nothing to check in a dry run."""
        if self.args.dry_run:
            return True
        try:
            check()
        except (AssertionError, RuntimeError, ValueError) as e:
            self.failures += 1
            self.skip(case, "dimple_rt", f"FAILED its check, not timed: {str(e).splitlines()[0][:120]}")
            return False
        return True

    def add(self, case: str, impl: str, fn: Callable[[], object], work: float, kind: str, graph: bool = True) -> None:
        timing = None if self.args.dry_run else time_op(fn, self.args, graph)
        self.rows.append(Row(case, impl, timing, work, kind))

    def skip(self, case: str, impl: str, reason: str) -> None:
        self.rows.append(Row(case, impl, None, 0.0, "", reason))

    def roofline(self, row: Row) -> str:
        if row.timing is None or not row.kind:
            return ""
        rate = row.work / (row.timing.median_us * 1e-6)
        peak = None if self.peaks is None else self.peaks[0 if row.kind == "flop" else 1]
        share = f" ({100 * rate / peak:4.1f}%)" if peak else ""
        return f"{rate / 1e12:7.1f} TFLOP/s{share}" if row.kind == "flop" else f"{rate / 1e9:7.0f} GB/s{share}"

    def print_table(self, title: str) -> None:
        print(f"\n{title}\n")
        print(
            f"{'case':30s} {'implementation':34s} {'median us':>10s} {'min us':>9s} {'vs ours':>8s}  roofline (% peak)"
        )
        ours = {r.case: r.timing.median_us for r in self.rows if r.impl == "dimple_rt" and r.timing}
        for r in self.rows:
            if r.timing is None:
                work = f"{r.work / 1e9:.3f} GFLOP" if r.kind == "flop" else f"{r.work / 1e6:.1f} MB" if r.kind else ""
                if r.kind and self.peaks is not None:
                    work += f", >= {r.work / self.peaks[0 if r.kind == 'flop' else 1] * 1e6:.1f} us at peak"
                print(f"{r.case:30s} {r.impl:34s} {'-':>10s} {'-':>9s} {'':>8s}  {r.note or work}")
                continue
            ratio = r.timing.median_us / ours[r.case] if r.case in ours else math.nan
            print(
                f"{r.case:30s} {r.impl:34s} {r.timing.median_us:10.1f} {r.timing.min_us:9.1f} {ratio:7.2f}x  "
                f"{self.roofline(r)}  [{r.timing.method}]"
            )


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def attention_flops(allowed: torch.Tensor, heads: int, head_dim: int) -> float:
    """4·head_dim FLOP per visible (query, key) pair per head; allowed: (batch, q_len, keys) bool."""
    return 4.0 * head_dim * heads * float(allowed.sum())


ATTENTION_CASES = {  # (batch, canvas, prefix, heads, kv_heads, head_dim)
    "attn decode b1 65/600": (1, 65, 600, 28, 4, 128),
    "attn decode b4 65/600": (4, 65, 600, 28, 4, 128),
    "attn decode b1 64/2048": (1, 64, 2048, 28, 4, 128),
    "attn decode b1 256/2048": (1, 256, 2048, 28, 4, 128),
    "attn prefill b1 665": (1, 665, 0, 28, 4, 128),
}


def bench_attention(b: Bench) -> None:
    dtype, dev, dry = torch.bfloat16, b.device, b.args.dry_run
    flash_attn, flash_reason = optional_module("flash_attn")
    flashinfer, infer_reason = optional_module("flashinfer")
    g = None if dry else torch.Generator(device=dev).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return (
            torch.empty(*shape, device=dev, dtype=dtype)
            if dry
            else torch.randn(*shape, generator=g, device=dev, dtype=dtype)
        )

    for case, (batch, q_len, prefix_len, heads, kv_heads, hd) in ATTENTION_CASES.items():
        q, k, v = randn(batch, q_len, heads, hd), randn(batch, q_len, kv_heads, hd), randn(batch, q_len, kv_heads, hd)
        pk = randn(batch, prefix_len, kv_heads, hd) if prefix_len else None
        pv = randn(batch, prefix_len, kv_heads, hd) if prefix_len else None
        mask = torch.ones(batch, prefix_len + q_len, dtype=torch.bool)
        mask[1:, :7] = False  # left padding of the other sequences
        allowed = reference.attention_allowed(batch, q_len, prefix_len, mask, None, False, torch.device("cpu"))
        flops = attention_flops(allowed, heads, hd)
        mask = mask.to(dev)
        ops.masked_attention(q, k, v, pk, pv, mask)  # meta tensors in a dry run: the fake kernel

        def check() -> None:
            out = ops.masked_attention(q, k, v, pk, pv, mask)
            want = reference.masked_attention(*(None if t is None else t.float() for t in (q, k, v, pk, pv)), mask)
            err = (out.float() - want).abs().max().item()
            assert err < 3e-2, f"{case}: kernel differs from the reference by {err}"

        if b.verified(case, check):
            b.add(case, "dimple_rt", lambda: ops.masked_attention(q, k, v, pk, pv, mask), flops, "flop")
        kk = torch.cat([pk, k], 1) if pk is not None else k
        vv = torch.cat([pv, v], 1) if pv is not None else v
        sq, sk, sv = q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)
        sdpa_mask = allowed[:, None].to(dev)
        b.add(
            case,
            "sdpa (bool mask)",
            lambda: F.scaled_dot_product_attention(sq, sk, sv, attn_mask=sdpa_mask, enable_gqa=True),
            flops,
            "flop",
        )
        b.add(
            case, "sdpa (no mask)", lambda: F.scaled_dot_product_attention(sq, sk, sv, enable_gqa=True), flops, "flop"
        )
        if flash_attn is None:
            b.skip(case, "flash-attn (no mask)", flash_reason)
        else:
            b.add(case, "flash-attn (no mask)", lambda: flash_attn.flash_attn_func(q, kk, vv), flops, "flop")
        if flashinfer is None:
            b.skip(case, "flashinfer prefill (no mask)", infer_reason)
        elif batch != 1:
            b.skip(case, "flashinfer prefill (no mask)", "single-request API: batch 1 only here")
        else:
            b.add(
                case,
                "flashinfer prefill (no mask)",
                lambda: flashinfer.single_prefill_with_kv_cache(q[0], kk[0], vv[0], causal=False),
                flops,
                "flop",
            )

    # Vision tower: block-diagonal windows, head_dim 80, no GQA; cu_seqlens stays on the device.
    seq, heads, hd, window = 1024, 16, 80, 64
    q, k, v = randn(1, seq, heads, hd), randn(1, seq, heads, hd), randn(1, seq, heads, hd)
    cu_host = torch.arange(0, seq + 1, window, dtype=torch.int32)
    cu = cu_host.to(dev)
    allowed = reference.attention_allowed(1, seq, 0, None, cu_host, False, torch.device("cpu"))
    flops = attention_flops(allowed, heads, hd)
    case = "attn vision hd80 16x64"

    def check_vision() -> None:
        out = ops.masked_attention(q, k, v, cu_seqlens=cu)
        want = reference.masked_attention(q.float(), k.float(), v.float(), cu_seqlens=cu)
        assert (out.float() - want).abs().max().item() < 3e-2, "vision: kernel differs from the reference"

    if b.verified(case, check_vision):
        b.add(case, "dimple_rt", lambda: ops.masked_attention(q, k, v, cu_seqlens=cu), flops, "flop")
    sq, sk, sv, vis_mask = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed[:, None].to(dev)
    b.add(
        case, "sdpa (block mask)", lambda: F.scaled_dot_product_attention(sq, sk, sv, attn_mask=vis_mask), flops, "flop"
    )
    if flash_attn is None:
        b.skip(case, "flash-attn varlen", flash_reason)
    else:
        q2, k2, v2 = q[0], k[0], v[0]
        b.add(
            case,
            "flash-attn varlen",
            lambda: flash_attn.flash_attn_varlen_func(q2, k2, v2, cu, cu, window, window),
            flops,
            "flop",
        )


def bench_kv_cache_write(b: Bench) -> None:
    dtype, dev, dry = torch.bfloat16, b.device, b.args.dry_run
    batch, max_len, length, start, kv_heads, hd = 1, 700, 65, 600, 4, 128
    g = None if dry else torch.Generator(device=dev).manual_seed(1)

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return (
            torch.empty(*shape, device=dev, dtype=dt) if dry else torch.randn(*shape, generator=g, device=dev, dtype=dt)
        )

    cache_k, cache_v = randn(batch, max_len, kv_heads, hd), randn(batch, max_len, kv_heads, hd)
    k, v = randn(batch, length, kv_heads, hd), randn(batch, length, kv_heads, hd)
    angle = randn(batch, length, hd, dt=torch.float32)
    cos, sin = angle.cos(), angle.sin()
    ck, cv, rk, rv = cache_k.clone(), cache_v.clone(), cache_k.clone(), cache_v.clone()
    ops.kv_cache_write(ck, cv, k, v, cos, sin, start)
    moved = 2 * nbytes(k, v) + nbytes(cos, sin)
    case = "kv_cache_write 65@600"

    def check() -> None:
        reference.kv_cache_write(rk, rv, k, v, cos, sin, start)
        assert torch.equal(cv, rv) and (ck.float() - rk.float()).abs().max().item() < 2e-2, "kv_cache_write differs"

    if b.verified(case, check):
        b.add(case, "dimple_rt", lambda: ops.kv_cache_write(ck, cv, k, v, cos, sin, start), moved, "bytes")
    b.add(case, "reference (torch)", lambda: reference.kv_cache_write(rk, rv, k, v, cos, sin, start), moved, "bytes")


SELECT_CASES = {  # rows -> options; greedy is Dimple's default path (one pass over the vocabulary)
    "select greedy 1x152064": (1, {}),
    "select greedy 16x152064": (16, {}),
    "select greedy 64x152064": (64, {}),
    "select greedy 256x152064": (256, {}),
    "select top-p/top-k 64x152064": (64, {"temperature": 0.8, "top_p": 0.9, "top_k": 50}),
    "select top-p 64x152064": (64, {"temperature": 1.0, "top_p": 0.95}),
}


def bench_confident_select(b: Bench) -> None:
    dev, dry, vocab = b.device, b.args.dry_run, 152064
    g = None if dry else torch.Generator(device=dev).manual_seed(2)
    for case, (rows, opts) in SELECT_CASES.items():
        if dry:
            logits = torch.empty(rows, vocab, device=dev, dtype=torch.bfloat16)
            uniforms = torch.empty(rows, device=dev)
        else:
            logits = (torch.randn(rows, vocab, generator=g, device=dev) * 3.0).to(torch.bfloat16)
            uniforms = torch.rand(rows, generator=g, device=dev)
        row_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        n = torch.full((1,), 2, dtype=torch.int64, device=dev)
        options = {**opts, "uniforms": uniforms} if opts else {}
        ops.confident_select(logits, row_ids, n, **options)
        moved = nbytes(logits, uniforms if opts else None) + rows * (8 + 4 + 1)

        def ours() -> tuple[torch.Tensor, ...]:
            return ops.confident_select(logits, row_ids, n, **options)

        def check() -> None:
            got = ours()
            cpu_opts = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
            want = reference.confident_select(logits.cpu(), row_ids.cpu(), n.cpu(), **cpu_opts)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2]), f"{case}: decisions"
            torch.testing.assert_close(got[1].cpu(), want[1], atol=1e-5, rtol=1e-5)

        if b.verified(case, check):
            b.add(case, "dimple_rt", ours, moved, "bytes")
            b.add(case, "dimple_rt (eager + error readback)", ours, moved, "bytes", graph=False)
        b.add(
            case,
            "reference (torch)",
            lambda: reference.confident_select(logits, row_ids, n, **options),
            moved,
            "bytes",
            graph=False,
        )
        temperature = opts.get("temperature", 0.0)

        def authors() -> object:
            conf, x0 = sample_tokens(logits, temperature=temperature, top_p=opts.get("top_p"), top_k=opts.get("top_k"))
            return x0, torch.topk(conf, min(2, rows)).indices

        b.add(case, "authors (sample_tokens+topk)", authors, moved, "bytes", graph=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--inner", type=int, default=20, help="calls per event pair / graph (default 20)")
    parser.add_argument("--repeats", type=int, default=15, help="timed replays; median and min (default 15)")
    parser.add_argument("--no-graphs", action="store_true", help="launch back to back instead of CUDA graphs")
    parser.add_argument(
        "--only",
        choices=["attention", "kv_cache_write", "confident_select"],
        action="append",
        help="run only these op families (repeatable)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: build every case on the meta device and print the plan and work counts",
    )
    parser.add_argument(
        "--device-name", default=None, help="peak table entry to use (default: the GPU's name; in a dry run 'none')"
    )
    args = parser.parse_args(argv)
    for name in ("warmup", "inner", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        device, name = "meta", args.device_name or "none"
    else:
        if not torch.cuda.is_available() or not ops.cuda_kernels_built():
            raise SystemExit("gpu_bench needs a CUDA device and dimple_rt built with its CUDA kernels (or --dry-run)")
        torch.backends.cuda.matmul.allow_tf32 = False
        device, name = "cuda", args.device_name or torch.cuda.get_device_name()
    b = Bench(args, device, peaks_for(name))
    families = {
        "attention": bench_attention,
        "kv_cache_write": bench_kv_cache_write,
        "confident_select": bench_confident_select,
    }
    for family, run in families.items():
        if not args.only or family in args.only:
            run(b)
    peak = (
        "peaks: not in the table"
        if b.peaks is None
        else (f"peaks: {b.peaks[0] / 1e12:.0f} TFLOP/s bf16 dense, {b.peaks[1] / 1e9:.0f} GB/s HBM")
    )
    mode = (
        "DRY RUN (no timing; work per call)"
        if args.dry_run
        else (f"median and min per call over {args.repeats} repeats of {args.inner} calls after {args.warmup} warm-up")
    )
    print_header = f"{name} | torch {torch.__version__} | {peak} | {mode}"
    b.print_table(print_header)
    sys.stdout.flush()
    if b.failures:
        raise SystemExit(f"gpu_bench: {b.failures} kernel(s) failed their reference check (rows marked FAILED)")


if __name__ == "__main__":
    main()
