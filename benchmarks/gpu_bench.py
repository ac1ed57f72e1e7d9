# SPDX-License-Identifier: Apache-2.0
"""Time each CUDA kernel of dimple_rt against its torch baseline on Dimple-7B shapes; print a short table.

Run by benchmarks/gpu_check.sh after the CUDA tests pass (``python3 -P benchmarks/gpu_bench.py``). Every kernel
is checked against dimple_rt.reference on the same inputs before it is timed. Times are the median of CUDA-event
timings after a warm-up; GB/s counts the bytes each op must move at least (inputs read once, outputs written once).

Shapes (Dimple-7B: 28 query heads, 4 kv heads, head_dim 128; vision tower head_dim 80):
  attention decode    65-token canvas over 600 cached tokens (+ the canvas), batch 1 and 4, left-padding mask
  attention prefill   665 tokens over themselves, batch 1
  attention vision    1024 patches, 16 heads, head_dim 80, 16 windows of 64 (cu_seqlens)
  kv_cache_write      65 tokens into a 700-token cache at 600
  confident_select    64 masked rows x 152064 vocabulary, greedy and sampled (top-p 0.9, top-k 50)
Baselines: torch SDPA (enable_gqa, bool mask) and flash-attn if installed; the torch composites of
dimple_rt.reference (kv_cache_write, confident_select) and the authors' sample_tokens + topk.
"""

# ruff: noqa: B023  (every lambda is timed inside record() before the loop moves on)
from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dimple_rt import ops, reference
from dimple_rt.generation.sampling import sample_tokens

try:
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:
    flash_attn_func = None

DEV = "cuda"


def cuda_time_us(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


ROWS: list[tuple[str, str, float, float]] = []  # (case, impl, microseconds, GB/s)


def record(case: str, impl: str, fn: Callable[[], object], nbytes: int, args: argparse.Namespace) -> None:
    us = cuda_time_us(fn, args.warmup, args.iters)
    ROWS.append((case, impl, us, nbytes / (us * 1e-6) / 1e9))


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def sdpa_inputs(q, k, v, prefix_k, prefix_v, key_mask, causal):
    """SDPA's layout: (batch, heads, len, dim), K/V concatenated, the allowed mask of reference.py."""
    kk = torch.cat([prefix_k, k], 1) if prefix_k is not None else k
    vv = torch.cat([prefix_v, v], 1) if prefix_v is not None else v
    prefix_len = kk.shape[1] - q.shape[1]
    allowed = reference.attention_allowed(q.shape[0], q.shape[1], prefix_len, key_mask, None, causal, q.device)
    return q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), allowed[:, None]


def bench_attention(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(0)
    cases = {
        "attn decode b1 65/600": (1, 65, 600, 28, 4, 128),
        "attn decode b4 65/600": (4, 65, 600, 28, 4, 128),
        "attn prefill b1 665": (1, 665, 0, 28, 4, 128),
    }
    for case, (batch, q_len, prefix_len, heads, kv_heads, hd) in cases.items():

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=DEV, dtype=dtype)

        q, k, v = randn(batch, q_len, heads, hd), randn(batch, q_len, kv_heads, hd), randn(batch, q_len, kv_heads, hd)
        pk = randn(batch, prefix_len, kv_heads, hd) if prefix_len else None
        pv = randn(batch, prefix_len, kv_heads, hd) if prefix_len else None
        mask = torch.ones(batch, prefix_len + q_len, dtype=torch.bool, device=DEV)
        mask[1:, :7] = False  # left padding of the other sequences
        out = ops.masked_attention(q, k, v, pk, pv, mask)
        want = reference.masked_attention(
            q.float(),
            k.float(),
            v.float(),
            None if pk is None else pk.float(),
            None if pv is None else pv.float(),
            mask,
        )
        err = (out.float() - want).abs().max().item()
        assert err < 3e-2, f"{case}: kernel differs from the reference by {err}"
        moved = nbytes(q, k, v, pk, pv, out)
        record(case, "dimple_rt", lambda: ops.masked_attention(q, k, v, pk, pv, mask), moved, args)
        sq, sk, sv, allowed = sdpa_inputs(q, k, v, pk, pv, mask, False)
        record(
            case,
            "sdpa (mask)",
            lambda: F.scaled_dot_product_attention(sq, sk, sv, attn_mask=allowed, enable_gqa=True),
            moved,
            args,
        )
        record(case, "sdpa (no mask)", lambda: F.scaled_dot_product_attention(sq, sk, sv, enable_gqa=True), moved, args)
        if flash_attn_func is not None:
            fk = torch.cat([pk, k], 1) if pk is not None else k
            fv = torch.cat([pv, v], 1) if pv is not None else v
            record(case, "flash-attn (no mask)", lambda: flash_attn_func(q, fk, fv), moved, args)

    # Vision tower: block-diagonal windows, head_dim 80, no GQA.
    seq, heads, hd, window = 1024, 16, 80, 64
    q = torch.randn(1, seq, heads, hd, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(1, seq, heads, hd, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(1, seq, heads, hd, generator=g, device=DEV, dtype=dtype)
    cu = torch.arange(0, seq + 1, window, dtype=torch.int32, device=DEV)
    out = ops.masked_attention(q, k, v, cu_seqlens=cu)
    want = reference.masked_attention(q.float(), k.float(), v.float(), cu_seqlens=cu)
    assert (out.float() - want).abs().max().item() < 3e-2
    case = "attn vision hd80 16x64"
    record(case, "dimple_rt", lambda: ops.masked_attention(q, k, v, cu_seqlens=cu), nbytes(q, k, v, out), args)
    allowed = reference.attention_allowed(1, seq, 0, None, cu, False, q.device)[:, None]
    sq, sk, sv = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    record(
        case,
        "sdpa (block mask)",
        lambda: F.scaled_dot_product_attention(sq, sk, sv, attn_mask=allowed),
        nbytes(q, k, v, out),
        args,
    )


def bench_kv_cache_write(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(1)
    batch, max_len, length, start, kv_heads, hd = 1, 700, 65, 600, 4, 128
    cache_k = torch.randn(batch, max_len, kv_heads, hd, generator=g, device=DEV, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    k = torch.randn(batch, length, kv_heads, hd, generator=g, device=DEV, dtype=dtype)
    v = torch.randn_like(k)
    angle = torch.rand(batch, length, hd, generator=g, device=DEV) * 50
    cos, sin = angle.cos(), angle.sin()
    ck, cv, rk, rv = cache_k.clone(), cache_v.clone(), cache_k.clone(), cache_v.clone()
    ops.kv_cache_write(ck, cv, k, v, cos, sin, start)
    reference.kv_cache_write(rk, rv, k, v, cos, sin, start)
    assert torch.equal(cv, rv) and (ck.float() - rk.float()).abs().max().item() < 2e-2
    moved = 2 * nbytes(k, v) + nbytes(cos, sin)
    case = "kv_cache_write 65@600"
    record(case, "dimple_rt", lambda: ops.kv_cache_write(ck, cv, k, v, cos, sin, start), moved, args)
    record(case, "reference (torch)", lambda: reference.kv_cache_write(rk, rv, k, v, cos, sin, start), moved, args)


def bench_confident_select(args: argparse.Namespace) -> None:
    rows, vocab = 64, 152064
    g = torch.Generator(device=DEV).manual_seed(2)
    logits = (torch.randn(rows, vocab, generator=g, device=DEV) * 3.0).to(torch.bfloat16)
    row_ids = torch.zeros(rows, dtype=torch.int64, device=DEV)
    n = torch.tensor([2], device=DEV)
    uniforms = torch.rand(rows, generator=g, device=DEV)
    configs = {
        "select greedy 64x152064": {},
        "select top-p/top-k 64x152064": {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "uniforms": uniforms},
    }
    for case, options in configs.items():
        got = ops.confident_select(logits, row_ids, n, **options)
        cpu_opts = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
        want = reference.confident_select(logits.cpu(), row_ids.cpu(), n.cpu(), **cpu_opts)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2]), f"{case}: decisions differ"
        torch.testing.assert_close(got[1].cpu(), want[1], atol=1e-5, rtol=1e-5)
        moved = nbytes(logits)
        record(case, "dimple_rt", lambda: ops.confident_select(logits, row_ids, n, **options), moved, args)
        record(
            case, "reference (torch)", lambda: reference.confident_select(logits, row_ids, n, **options), moved, args
        )
        temperature = options.get("temperature", 0.0)

        def authors():
            conf, x0 = sample_tokens(
                logits, temperature=temperature, top_p=options.get("top_p"), top_k=options.get("top_k")
            )
            return x0, torch.topk(conf, 2).indices

        record(case, "authors (sample_tokens+topk)", authors, moved, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not ops.cuda_kernels_built():
        raise SystemExit("gpu_bench needs a CUDA device and dimple_rt built with its CUDA kernels")
    torch.backends.cuda.matmul.allow_tf32 = False
    bench_attention(args)
    bench_kv_cache_write(args)
    bench_confident_select(args)
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | median of {args.iters} (CUDA events)\n")
    print(f"{'case':32s} {'implementation':30s} {'time (us)':>10s} {'GB/s':>8s} {'vs dimple_rt':>13s}")
    ours = {case: us for case, impl, us, _ in ROWS if impl == "dimple_rt"}
    for case, impl, us, gbs in ROWS:
        ratio = us / ours[case] if case in ours else math.nan
        print(f"{case:32s} {impl:30s} {us:10.1f} {gbs:8.1f} {ratio:12.2f}x")


if __name__ == "__main__":
    main()
