# SPDX-License-Identifier: Apache-2.0
"""Bounded random op calls with hostile arguments; run by test_op_safety.py, one subprocess per batch.

``python python_tests/_op_fuzz.py FIRST_SEED COUNT``: for each seed, one random call of masked_attention,
kv_cache_write or confident_select (extreme values, NaN/inf, tiny and huge temperatures and scales, odd
strides, aliasing, meta tensors, out-of-range options). Every call must either return a valid result (right
shape and dtype, in-vocabulary ids, finite confidences, the reference's answer where the call is ordinary) or
raise ValueError/TypeError (or RuntimeError with a message), and the reference must accept or refuse the
same calls (with ValueError/TypeError; a call with several faults may be refused for different ones). Prints "seed N" before each call (so a crash names its seed) and exits 1 listing the failures.
"""

from __future__ import annotations

import math
import random
import sys

import torch

from dimple_rt import ops, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACCEPTED = (ValueError, TypeError)


def _tensor(rng: random.Random, g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random values of a random magnitude in a random layout (contiguous, sliced, transposed, strided)."""
    scale = rng.choice([1.0, 1.0, 3.0, 20.0, 1e4, 1e30, 3e38])
    layout = rng.choice(["contiguous", "contiguous", "sliced", "transposed", "strided"])
    if layout == "sliced" and shape:
        big = torch.randn(*(s + 2 for s in shape), generator=g)
        t = big[tuple(slice(1, s + 1) for s in shape)]
    elif layout == "transposed" and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    elif layout == "strided" and shape:
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    else:
        t = torch.randn(*shape, generator=g)
    t = (t * scale).clamp(-3e38, 3e38)
    if t.numel() and rng.random() < 0.1:
        flat = t.view(-1) if t.is_contiguous() else None
        if flat is not None:
            flat[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return t.to(dtype)


def _pick(rng: random.Random, valid: list, invalid: list, p_invalid: float = 0.12):
    """A valid value mostly, an invalid one with probability p_invalid."""
    return rng.choice(invalid) if rng.random() < p_invalid else rng.choice(valid)


def _maybe_meta(rng: random.Random, args: dict, names: list[str]) -> bool:
    if rng.random() < 0.06:
        name = rng.choice([n for n in names if isinstance(args.get(n), torch.Tensor)])
        args[name] = args[name].to("meta")
        return True
    return False


def _ordinary(*tensors: torch.Tensor | None) -> bool:
    return all(
        t is None or not t.is_floating_point() or t.numel() == 0 or bool(t.float().abs().max() <= 100) for t in tensors
    )


def fuzz_masked_attention(rng: random.Random, g: torch.Generator) -> None:
    batch, q_len, prefix = rng.randint(1, 3), rng.choice([0, 1, 5, 17]), rng.choice([0, 0, 3, 9])
    kv_heads = rng.randint(1, 3)
    heads = kv_heads * rng.randint(1, 3) + (1 if rng.random() < 0.1 else 0)
    head_dim = rng.choice([0, 1, 2, 7, 16, 33, 64])
    dtype = rng.choice(DTYPES)
    args: dict = {
        "q": _tensor(rng, g, (batch, q_len, heads, head_dim), dtype),
        "k": _tensor(rng, g, (batch, q_len, kv_heads, head_dim), dtype),
        "v": _tensor(rng, g, (batch, q_len, kv_heads, head_dim), rng.choice([dtype] * 9 + [torch.float32])),
        "causal": rng.random() < 0.5,
        "scale": _pick(rng, [None, None, 0.1, 1e-30, 1e30], [math.nan, math.inf, 0.0, -1.0, 1e-50, 1e39]),
    }
    if prefix:
        args["prefix_k"] = _tensor(rng, g, (batch, prefix, kv_heads, head_dim), dtype)
        args["prefix_v"] = _tensor(rng, g, (batch, prefix, kv_heads, head_dim), dtype)
    suffix = rng.choice([0, 0, 0, 1, 4, 70])
    if suffix:  # the dual cache's suffix; with causal or cu_seqlens both sides must raise
        args["suffix_k"] = _tensor(rng, g, (batch, suffix, kv_heads, head_dim), dtype)
        args["suffix_v"] = _tensor(rng, g, (batch, suffix, kv_heads, head_dim), dtype)
    option = rng.choice(["none", "key_mask", "cu_seqlens"])
    if option == "key_mask":
        args["key_mask"] = torch.rand(batch, prefix + q_len + suffix + rng.choice([0] * 9 + [1]), generator=g) < 0.6
    elif option == "cu_seqlens":
        cuts = sorted(rng.randint(-1, q_len + 1) for _ in range(rng.randint(0, 3)))
        args["cu_seqlens"] = torch.tensor([0, *cuts, q_len], dtype=rng.choice([torch.int32] * 5 + [torch.int64]))
    meta = _maybe_meta(
        rng, args, ["q", "k", "v", "prefix_k", "prefix_v", "suffix_k", "suffix_v", "key_mask", "cu_seqlens"]
    )
    out = _call(ops.masked_attention, reference.masked_attention, args)
    if out is None:
        return
    got, want = out
    assert not meta, "a real/meta mix returned"
    assert got.shape == args["q"].shape and got.dtype == args["q"].dtype, (got.shape, got.dtype)
    scale = args["scale"]
    if _ordinary(*(t for t in args.values() if isinstance(t, torch.Tensor))) and (scale is None or scale <= 10):
        assert bool(torch.isfinite(got.float()).all()), "non-finite attention output from ordinary inputs"
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def fuzz_kv_cache_write(rng: random.Random, g: torch.Generator) -> None:
    batch, max_len, heads = rng.randint(1, 3), rng.choice([1, 4, 9]), rng.randint(1, 3)
    length = rng.choice([0, 1, 3, max_len])
    head_dim = rng.choice([2, 8, 18]) + (1 if rng.random() < 0.05 else 0)
    dtype = rng.choice(DTYPES)
    start = _pick(
        rng, [0, max_len - length, max(0, max_len - length - 1)], [-1, 2**63 - 1, 2**62, -(2**63), max_len + 1]
    )
    table_dtype = rng.choice([dtype, torch.float32])
    cache_k = _tensor(rng, g, (batch, max_len, heads, head_dim), dtype)
    cache_v = _tensor(rng, g, (batch, max_len, heads, head_dim), rng.choice([dtype] * 9 + [torch.float32]))
    args: dict = {
        "cache_k": cache_k,
        "cache_v": cache_v,
        "k": _tensor(rng, g, (batch, length, heads, head_dim), dtype),
        "v": _tensor(rng, g, (batch, length, heads, head_dim), dtype),
        "cos": _tensor(rng, g, (batch, length, head_dim), table_dtype),
        "sin": _tensor(rng, g, (batch, length, head_dim), _pick(rng, [table_dtype], [torch.float64, torch.float16])),
        "start": start,
    }
    alias = rng.choice(["none"] * 6 + ["same", "view", "k_rows", "v_rows", "expanded", "interleaved"])
    if alias == "same":
        args["cache_v"] = cache_k
    elif alias == "view":
        args["cache_v"] = cache_k[:]
    elif alias == "k_rows" and max_len >= length:
        args["k"] = cache_k[:, max_len - length :]
    elif alias == "v_rows" and max_len >= length:
        args["v"] = args["cache_v"][:, :length]
    elif alias == "expanded":
        args["cache_k"] = cache_k[:1].expand(batch + 1, *cache_k.shape[1:])
    elif alias == "interleaved":
        both = torch.zeros(batch, max_len, 2 * heads, head_dim, dtype=dtype)
        args["cache_k"], args["cache_v"] = both[:, :, :heads], both[:, :, heads:]
    meta = _maybe_meta(rng, args, ["cache_k", "cache_v", "k", "v", "cos", "sin"])
    before_k = args["cache_k"].clone() if not args["cache_k"].is_meta else None
    before_v = args["cache_v"].clone() if not args["cache_v"].is_meta else None
    try:
        ops.kv_cache_write(**args)
    except ACCEPTED as e:
        _expect_reference_refuses(reference.kv_cache_write, args, e)
        return
    assert not meta, "a real/meta mix returned"
    if alias != "none":
        return
    # The rows outside [start, start + len) are untouched (bit for bit); the written ones match the reference
    # where the values are ordinary (with overflowing products the kernel's fused multiply-adds and the
    # reference's separately rounded products may differ in inf/NaN).
    end = start + args["k"].shape[1]
    for got, before in ((args["cache_k"], before_k), (args["cache_v"], before_v)):
        for rows in (slice(0, start), slice(end, None)):
            torch.testing.assert_close(got[:, rows], before[:, rows], atol=0, rtol=0, equal_nan=True)
    if _ordinary(*(t for t in args.values() if isinstance(t, torch.Tensor))):
        ref_k, ref_v = before_k.clone(), before_v.clone()  # type: ignore[union-attr]
        reference.kv_cache_write(**{**args, "cache_k": ref_k, "cache_v": ref_v})
        for got, want in ((args["cache_k"], ref_k), (args["cache_v"], ref_v)):
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2, equal_nan=True)


def fuzz_confident_select(rng: random.Random, g: torch.Generator) -> None:
    rows, vocab = rng.choice([0, 1, 2, 5]), rng.choice([1, 2, 3, 17, 300])
    dtype = rng.choice(DTYPES)
    logits = _tensor(rng, g, (rows, vocab), torch.float32)
    if rows and vocab > 1 and rng.random() < 0.3:
        logits[:, :: rng.randint(2, 4)] = -math.inf
    if rows and rng.random() < 0.05:
        logits[rng.randrange(rows)] = -math.inf
    logits = logits.to(dtype)
    steps = sorted(rng.randint(0, 2) for _ in range(rows))
    row_ids = torch.tensor(steps, dtype=torch.int64).cumsum(0) if rows else torch.zeros(0, dtype=torch.int64)
    coupled = rng.random() < 0.5
    groups = 1 if coupled else (int(row_ids.max()) + 1 if rows else 1) + rng.choice([0, 0, 0, 1, -1])
    n = torch.randint(-1 if rng.random() < 0.05 else 0, 6, (max(groups, 1),), generator=g)
    temperature = _pick(
        rng, [0.0, 0.0, 0.5, 1.0, 1e-39, 1e-45, 1e-20, 1e3, 3e38], [math.nan, -1.0, math.inf, 1e-50, 1e39]
    )
    uniforms = torch.rand(rows, generator=g) if rng.random() < 0.9 else None
    if uniforms is not None and rows and rng.random() < 0.1:
        uniforms[0] = rng.choice([math.nan, 1.0, -0.1, math.inf])
    args: dict = {
        "logits": logits,
        "row_ids": row_ids,
        "n": n,
        "temperature": temperature,
        "top_p": _pick(rng, [None, None, 0.0, 0.5, 0.9, 1.0], [1.5, -0.1, math.nan]),
        "top_k": _pick(rng, [None, None, 1, 2, max(vocab - 1, 1), vocab, vocab + 5, 2**62], [0, -1]),
        "uniforms": uniforms,
        "confidence": _pick(rng, ["plain", "margin", "neg_entropy"], ["bogus"]),
        "use_original_confidence": rng.random() < 0.5,
        "threshold": _pick(rng, [None, None, 0.0, 0.3, 0.9, math.inf, -1.0], [math.nan]),
        "batch_coupled": coupled,
    }
    meta = _maybe_meta(rng, args, ["logits", "row_ids", "n", "uniforms"])
    out = _call(ops.confident_select, reference.confident_select, args)
    if out is None:
        return
    (x0, conf, commit), (rx0, rconf, _) = out
    assert not meta, "a real/meta mix returned"
    assert x0.shape == conf.shape == commit.shape == (rows,), (x0.shape, conf.shape, commit.shape)
    assert x0.dtype == torch.int64 and conf.dtype == torch.float32 and commit.dtype == torch.bool
    assert bool(((x0 >= 0) & (x0 < vocab)).all()), f"token id out of the vocabulary: {x0.tolist()}"
    assert bool(torch.isfinite(conf).all()), f"non-finite confidence: {conf.tolist()}"
    assert x0.tolist() == rx0.tolist(), f"x0 {x0.tolist()} != reference {rx0.tolist()}"
    torch.testing.assert_close(conf, rconf, atol=1e-5, rtol=1e-4)


def _expect_reference_refuses(fn, args: dict, e: Exception) -> None:
    try:
        fn(**args)
    except ACCEPTED as r:
        # A call with several faults may be refused for a different one first (e.g. the Meta kernel checks devices
        # before dtypes): any named ValueError/TypeError from both is fine.
        del r
        return
    raise AssertionError(f"the op raised {type(e).__name__}: {e}; the reference accepted the call")


def _call(op, ref, args: dict):
    """(op result, reference result), or None when both refused the call with the same exception type."""
    try:
        got = op(**args)
    except ACCEPTED as e:
        _expect_reference_refuses(ref, args, e)
        return None
    try:
        want = ref(**args)
    except ACCEPTED as r:
        raise AssertionError(f"the op accepted the call; the reference raised {type(r).__name__}: {r}") from r
    return got, want


def main(first: int, count: int) -> int:
    fuzzers = (fuzz_masked_attention, fuzz_kv_cache_write, fuzz_confident_select)
    failures = []
    for seed in range(first, first + count):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        fuzzer = fuzzers[seed % len(fuzzers)]
        print(f"seed {seed} {fuzzer.__name__}", flush=True)
        try:
            fuzzer(rng, g)
        except AssertionError as e:
            failures.append(f"seed {seed} {fuzzer.__name__}: {e}")
        except RuntimeError as e:
            if not str(e).strip():
                failures.append(f"seed {seed} {fuzzer.__name__}: RuntimeError without a message")
        except Exception as e:  # noqa: BLE001 - anything else is a finding
            failures.append(f"seed {seed} {fuzzer.__name__}: {type(e).__name__}: {e}")
    print(f"{count} calls, {len(failures)} failures")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
