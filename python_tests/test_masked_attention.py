# SPDX-License-Identifier: Apache-2.0
"""The masked_attention op (C++ kernels) against dimple_rt.reference.masked_attention, its executable spec."""

from __future__ import annotations

import math

import pytest
import torch

from dimple_rt import reference
from dimple_rt.ops import masked_attention

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machines have no hypothesis: everything but the random-call test still runs there
    st = None

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, q_len, prefix_len, heads, kv_heads, head_dim): odd lengths incl. 1, prefixes 0/1/17/33, GQA 1:1,
# 2:1 and 7:1 (Dimple-7B's 28:4), head_dim 64/80/128 and one that is no multiple of any vector width.
SHAPES = [
    (1, 1, 0, 1, 1, 64),
    (2, 7, 0, 4, 2, 64),
    (2, 13, 1, 2, 2, 80),
    (1, 33, 17, 7, 1, 128),
    (1, 65, 33, 28, 4, 128),  # more than one 64-key tile
    (3, 5, 0, 3, 1, 17),
]

# Attention modes: (causal, left-padded key mask).
MODES = {
    "bidirectional": (False, False),
    "padded": (False, True),
    "causal": (True, False),
    "causal_padded": (True, True),
}

# cu_seqlens for one packed sequence of CU_LEN tokens: uneven segments, an empty one, a single token.
CU_LEN = 21
CU_SEQLENS = [0, 4, 4, 15, 16, 21]
CU_HEADS, CU_HEAD_DIM = 4, 80  # the vision tower's head_dim


def _attention_inputs(
    batch: int,
    q_len: int,
    prefix_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
    suffix_len: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Random q/k/v and prefix (None when prefix_len is 0); suffix_k/suffix_v too when suffix_len is given
    (an empty (batch, 0, ...) pair for 0)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    args = {
        "q": randn(batch, q_len, heads, head_dim),
        "k": randn(batch, q_len, kv_heads, head_dim),
        "v": randn(batch, q_len, kv_heads, head_dim),
        "prefix_k": randn(batch, prefix_len, kv_heads, head_dim) if prefix_len else None,
        "prefix_v": randn(batch, prefix_len, kv_heads, head_dim) if prefix_len else None,
    }
    if suffix_len is not None:
        args["suffix_k"] = randn(batch, suffix_len, kv_heads, head_dim)
        args["suffix_v"] = randn(batch, suffix_len, kv_heads, head_dim)
    return args


def _left_padding(batch: int, total: int) -> torch.Tensor:
    """Key mask (batch, total) with 3, 0, total-1, 1, 3, ... padded positions at the front of the sequences."""
    pads = [3, 0, total - 1, 1]
    mask = torch.ones(batch, total, dtype=torch.bool)
    for b in range(batch):
        mask[b, : pads[b % len(pads)]] = False
    return mask


def _assert_matches_reference(out: torch.Tensor, args: dict, tol: dict) -> None:
    """Compare with the reference, reasoning per dtype (see the module's tolerance notes in conftest.py).

    fp32: the same maths in another order (tiles, online softmax): assert_close with the fp32 tolerance.
    bf16/fp16: the exact answer for the given (already rounded) inputs is the reference on their fp32 upcast.
    The reference run on the low-precision inputs computes in fp32 and rounds once, so its error is the
    output rounding (≤ ½ ulp). The kernel also accumulates in fp32 and rounds once; fp32 reordering noise
    (~1e-6) can only flip a rounding where the reference's own error is already ≈ ½ ulp. So the kernel's error
    is at most twice the reference's, plus an atol for that fp32 noise.
    """
    dtype = args["q"].dtype
    assert out.dtype == dtype and out.shape == args["q"].shape and out.is_contiguous()
    up = {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in args.items()}
    exact = reference.masked_attention(**up)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, **tol)
        return
    err_kernel = (out.float() - exact).abs().max().item() if out.numel() else 0.0
    ref_lp = reference.masked_attention(**args)
    err_ref = (ref_lp.float() - exact).abs().max().item() if out.numel() else 0.0
    assert err_kernel <= 2 * err_ref + 1e-5, f"kernel error {err_kernel} > 2 × reference error {err_ref}"
    torch.testing.assert_close(out.float(), exact, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape: tuple, mode: str, dtype: torch.dtype, tol) -> None:
    batch, q_len, prefix_len = shape[:3]
    causal, padded = MODES[mode]
    args = _attention_inputs(*shape, dtype)
    args["key_mask"] = _left_padding(batch, prefix_len + q_len) if padded else None
    args["causal"] = causal
    out = masked_attention(**args)
    _assert_matches_reference(out, args, tol(dtype))
    if causal and padded:  # a padded query sees no key in causal mode: exactly zero, not NaN
        padded_queries = ~args["key_mask"][:, prefix_len:]  # (batch, q_len)
        assert torch.equal(out[padded_queries], torch.zeros_like(out[padded_queries]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_are_zero(dtype: torch.dtype) -> None:
    args = _attention_inputs(2, 6, 2, 4, 2, 64, dtype)
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[1, :6] = False  # sequence 1: two padded prefix keys, then four padded queries
    out = masked_attention(**args, key_mask=key_mask, causal=True)
    assert out[1, :4].abs().sum() == 0 and not out.isnan().any()
    assert out[1, 4:].abs().sum() > 0 and out[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_cu_seqlens(causal: bool, dtype: torch.dtype, tol) -> None:
    args = _attention_inputs(1, CU_LEN, 0, CU_HEADS, CU_HEADS, CU_HEAD_DIM, dtype)
    args.update(cu_seqlens=torch.tensor(CU_SEQLENS, dtype=torch.int32), causal=causal)
    _assert_matches_reference(masked_attention(**args), args, tol(dtype))


def test_scale(tol) -> None:
    args = _attention_inputs(2, 9, 5, 4, 2, 64, torch.float32)
    args["scale"] = 0.37
    _assert_matches_reference(masked_attention(**args), args, tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype: torch.dtype, tol) -> None:
    """Inputs sliced out of wider tensors: odd head/seq strides, a head_dim stride of 2, a prefix cut out of a
    longer cache, a (batch, heads, len, dim) layout seen through a transpose, and a sliced key mask."""
    batch, q_len, prefix_len, heads, kv_heads, head_dim = 2, 11, 17, 6, 2, 64
    g = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(batch, q_len, heads + 3, head_dim + 5)[:, :, 1 : heads + 1, 2 : head_dim + 2]
    k = randn(batch, kv_heads, q_len, head_dim).transpose(1, 2)
    v = randn(batch, q_len, kv_heads, 2 * head_dim)[..., ::2]
    cache_k = randn(batch, 64, kv_heads, head_dim)
    cache_v = randn(batch, 64, kv_heads, head_dim)
    mask = torch.ones(batch + 1, 2 * (prefix_len + q_len), dtype=torch.bool)
    mask[:, :5] = False
    key_mask = mask[1:, ::2]
    args = {"q": q, "k": k, "v": v, "prefix_k": cache_k[:, :prefix_len], "prefix_v": cache_v[:, :prefix_len]}
    for t in (q, k, v, key_mask):
        assert not t.is_contiguous()
    for extra in ({}, {"key_mask": key_mask}, {"key_mask": key_mask, "causal": True}):
        _assert_matches_reference(masked_attention(**args, **extra), {**args, **extra}, tol(dtype))


def test_cu_seqlens_non_contiguous(tol) -> None:
    args = _attention_inputs(1, CU_LEN, 0, CU_HEADS, 2, CU_HEAD_DIM, torch.float32)
    wide = torch.tensor([x for c in CU_SEQLENS for x in (c, -1)], dtype=torch.int32)
    args["cu_seqlens"] = wide[::2]
    _assert_matches_reference(masked_attention(**args), args, tol(torch.float32))


# ---- [prefix ‖ current ‖ suffix]: the dual cache's suffix

# (batch, q_len, prefix_len, suffix_len, heads, kv_heads, head_dim): a suffix of one key, odd lengths, a suffix
# longer than one 64-key tile, an empty one, GQA 1:1 / 2:1 / 7:1, head_dim 64/80/128/17, and the dual cache's
# decode shape (a 32-token block over a prefix and a suffix, Dimple-7B's 28:4 heads).
SUFFIX_SHAPES = [
    (1, 1, 0, 1, 1, 1, 64),
    (2, 7, 3, 5, 4, 2, 64),
    (2, 13, 1, 31, 2, 2, 80),
    (1, 33, 17, 70, 7, 1, 128),
    (1, 32, 100, 96, 28, 4, 128),
    (3, 5, 0, 9, 3, 1, 17),
    (2, 9, 4, 0, 4, 2, 64),
]


def _suffix_mask(batch: int, prefix_len: int, q_len: int, suffix_len: int) -> torch.Tensor:
    """Key mask over prefix + current + suffix: left padding as _left_padding (sequence 2 has only its last key
    real), and for odd sequences the last two suffix keys padded too (right padding of the canvas)."""
    mask = _left_padding(batch, prefix_len + q_len + suffix_len)
    for b in range(1, batch, 2):
        mask[b, prefix_len + q_len + max(0, suffix_len - 2) :] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["bidirectional", "padded"])
@pytest.mark.parametrize("shape", SUFFIX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_suffix_matches_reference(shape: tuple, padded: bool, dtype: torch.dtype, tol) -> None:
    batch, q_len, prefix_len, suffix_len, heads, kv_heads, head_dim = shape
    args = _attention_inputs(batch, q_len, prefix_len, heads, kv_heads, head_dim, dtype, suffix_len=suffix_len)
    args["key_mask"] = _suffix_mask(batch, prefix_len, q_len, suffix_len) if padded else None
    _assert_matches_reference(masked_attention(**args), args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_suffix_padded_queries_see_only_themselves(dtype: torch.dtype) -> None:
    """A padded query keeps Dimple's forced diagonal (a current key) and sees no prefix or suffix key: its output
    is exactly its own value row. (No row is ever fully masked with a suffix: bidirectional rows keep their
    diagonal, and causal calls take no suffix.)"""
    batch, q_len, prefix_len, suffix_len, heads, kv_heads = 2, 6, 3, 70, 4, 2
    args = _attention_inputs(batch, q_len, prefix_len, heads, kv_heads, 64, dtype, suffix_len=suffix_len)
    key_mask = torch.ones(batch, prefix_len + q_len + suffix_len, dtype=torch.bool)
    key_mask[1, prefix_len : prefix_len + 4] = False  # sequence 1: its first four queries are padding
    out = masked_attention(**args, key_mask=key_mask)
    own = args["v"][1, :4].repeat_interleave(heads // kv_heads, dim=1)  # (4, heads, head_dim)
    assert torch.equal(out[1, :4], own) and not out.isnan().any()


def _explicit_visibility(key_mask: torch.Tensor | None, batch: int, prefix_len: int, q_len: int, total: int):
    """(batch, q_len, total) bool, written out from the contract rather than from reference.attention_allowed."""
    allowed = torch.ones(batch, q_len, total, dtype=torch.bool)
    if key_mask is None:
        return allowed
    for b in range(batch):
        for i in range(q_len):
            for j in range(total):
                allowed[b, i, j] = bool(key_mask[b, prefix_len + i] and key_mask[b, j]) or j == prefix_len + i
    return allowed


@pytest.mark.parametrize("padded", [False, True], ids=["bidirectional", "padded"])
def test_suffix_equals_attention_over_concatenated_keys(padded: bool) -> None:
    """[prefix ‖ current ‖ suffix] read in place == the same queries over torch.cat'ed keys: (1) SDPA (GQA) with
    the visibility written out, (2) this op with no prefix/suffix, queries placed at their absolute positions
    of a full-length canvas (the other queries are zeros and ignored)."""
    batch, q_len, prefix_len, suffix_len, heads, kv_heads, head_dim = 3, 11, 19, 45, 6, 2, 64
    total = prefix_len + q_len + suffix_len
    args = _attention_inputs(batch, q_len, prefix_len, heads, kv_heads, head_dim, torch.float32, suffix_len=suffix_len)
    key_mask = _suffix_mask(batch, prefix_len, q_len, suffix_len) if padded else None
    out = masked_attention(**args, key_mask=key_mask)

    k_all = torch.cat([args["prefix_k"], args["k"], args["suffix_k"]], dim=1)  # (batch, total, kv_heads, head_dim)
    v_all = torch.cat([args["prefix_v"], args["v"], args["suffix_v"]], dim=1)
    allowed = _explicit_visibility(key_mask, batch, prefix_len, q_len, total)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        args["q"].transpose(1, 2),
        k_all.transpose(1, 2),
        v_all.transpose(1, 2),
        attn_mask=allowed[:, None],
        enable_gqa=True,
    ).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)

    q_full = torch.zeros(batch, total, heads, head_dim)
    q_full[:, prefix_len : prefix_len + q_len] = args["q"]
    full = masked_attention(q_full, k_all, v_all, key_mask=key_mask)
    torch.testing.assert_close(out, full[:, prefix_len : prefix_len + q_len], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_suffix_views_of_a_cache(dtype: torch.dtype, tol) -> None:
    """The dual cache's call: prefix, current and suffix are all views into one preallocated (batch, max_len,
    kv_heads, head_dim) cache buffer, wider than what is attended (its tail unused), in three layouts: the
    cache's own, a (batch, kv_heads, max_len, head_dim) buffer seen through a transpose, and a head_dim stride of
    2. The result equals the reference on contiguous copies, and the cache is not written."""
    batch, prefix_len, q_len, suffix_len, heads, kv_heads, head_dim = 2, 21, 13, 37, 8, 2, 80
    max_len = prefix_len + q_len + suffix_len + 9
    g = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(batch, q_len, heads, head_dim)
    layouts = {
        "cache": lambda: randn(batch, max_len, kv_heads, head_dim),
        "transposed": lambda: randn(batch, kv_heads, max_len, head_dim).transpose(1, 2),
        "strided_dim": lambda: randn(batch, max_len, kv_heads, 2 * head_dim)[..., ::2],
    }
    end = prefix_len + q_len
    for name, make in layouts.items():
        cache_k, cache_v = make(), make()
        before = (cache_k.clone(), cache_v.clone())
        args = {
            "q": q,
            "k": cache_k[:, prefix_len:end],
            "v": cache_v[:, prefix_len:end],
            "prefix_k": cache_k[:, :prefix_len],
            "prefix_v": cache_v[:, :prefix_len],
            "suffix_k": cache_k[:, end : end + suffix_len],
            "suffix_v": cache_v[:, end : end + suffix_len],
        }
        assert not args["suffix_k"].is_contiguous(), name
        for extra in ({}, {"key_mask": _suffix_mask(batch, prefix_len, q_len, suffix_len)}):
            out = masked_attention(**args, **extra)
            contiguous = {n: t.contiguous() if isinstance(t, torch.Tensor) else t for n, t in {**args, **extra}.items()}
            _assert_matches_reference(out, contiguous, tol(dtype))
        assert torch.equal(cache_k, before[0]) and torch.equal(cache_v, before[1]), name


def test_suffix_empty_is_no_suffix() -> None:
    """An empty (batch, 0, ...) suffix is no suffix: the same result, bit for bit, also with causal=True."""
    args = _attention_inputs(2, 9, 4, 4, 2, 64, torch.float32, suffix_len=0)
    without = {n: t for n, t in args.items() if not n.startswith("suffix")}
    for causal in (False, True):
        assert torch.equal(masked_attention(**args, causal=causal), masked_attention(**without, causal=causal))


def _opcheck_samples() -> list[tuple[tuple, dict]]:
    base = _attention_inputs(2, 5, 3, 4, 2, 16, torch.float32)
    cu = _attention_inputs(1, CU_LEN, 0, 2, 1, 16, torch.float32)
    dual = _attention_inputs(2, 5, 3, 4, 2, 16, torch.float32, suffix_len=6)
    qkv = (base["q"], base["k"], base["v"])
    cache = torch.randn(2, 20, 2, 16)  # prefix, current and suffix as views of one cache buffer
    return [
        (qkv, {}),
        (qkv, {"prefix_k": base["prefix_k"], "prefix_v": base["prefix_v"], "key_mask": _left_padding(2, 8)}),
        (qkv, {"causal": True, "scale": 0.5}),
        ((cu["q"], cu["k"], cu["v"]), {"cu_seqlens": torch.tensor(CU_SEQLENS, dtype=torch.int32)}),
        (
            (dual["q"], dual["k"], dual["v"], dual["prefix_k"], dual["prefix_v"]),
            {"suffix_k": dual["suffix_k"], "suffix_v": dual["suffix_v"], "key_mask": _suffix_mask(2, 3, 5, 6)},
        ),
        (
            (dual["q"], cache[:, 3:8], cache[:, 3:8].flip(-1)),
            {
                "suffix_k": cache[:, 8:15],
                "suffix_v": cache[:, 8:15],
                "prefix_k": cache[:, :3],
                "prefix_v": cache[:, :3],
            },
        ),
    ]


@pytest.mark.parametrize("sample", range(len(_opcheck_samples())))
def test_opcheck(sample: int) -> None:
    args, kwargs = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.dimple_rt.masked_attention.default, args, kwargs)


def test_torch_compile() -> None:
    args = _attention_inputs(2, 9, 4, 4, 2, 32, torch.float32)
    key_mask = _left_padding(2, 13)

    def attend(q, k, v, pk, pv, mask):
        return masked_attention(q, k, v, pk, pv, mask) * 2.0

    inputs = (args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], key_mask)
    # Dynamo's first run turns off torch.distributions' argument validation for the whole process; put it back
    # so that tests running after this one see torch's default.
    validate_args = torch.distributions.Distribution._validate_args
    try:
        compiled = torch.compile(attend, fullgraph=True)
        torch.testing.assert_close(compiled(*inputs), attend(*inputs))
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate_args)


def test_torch_compile_with_suffix() -> None:
    """The dual cache's call traced whole: prefix/current/suffix sliced from one cache buffer inside the graph."""
    g = torch.Generator().manual_seed(2)
    cache_k, cache_v = torch.randn(2, 30, 2, 32, generator=g), torch.randn(2, 30, 2, 32, generator=g)
    q = torch.randn(2, 6, 4, 32, generator=g)
    key_mask = _suffix_mask(2, 7, 6, 15)

    def attend(q, ck, cv, mask):
        return masked_attention(
            q, ck[:, 7:13], cv[:, 7:13], ck[:, :7], cv[:, :7], mask, suffix_k=ck[:, 13:28], suffix_v=cv[:, 13:28]
        )

    validate_args = torch.distributions.Distribution._validate_args
    try:
        compiled = torch.compile(attend, fullgraph=True)
        torch.testing.assert_close(compiled(q, cache_k, cache_v, key_mask), attend(q, cache_k, cache_v, key_mask))
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate_args)


def _bad(**changes) -> dict:
    args = _attention_inputs(2, 5, 3, 4, 2, 16, torch.float32)
    args.update(changes)
    return args


_F = torch.float32
BAD_INPUTS = {
    "q_rank": (_bad(q=torch.zeros(5, 4, 16)), ValueError, "q must be 4-D"),
    "q_dtype": (
        _bad(q=torch.zeros(2, 5, 4, 16, dtype=torch.int32)),
        TypeError,
        "q must be float32, bfloat16 or float16",
    ),
    "kv_dtype": (_bad(k=torch.zeros(2, 5, 2, 16, dtype=torch.float64)), TypeError, "k must be float32"),
    "mixed_dtype": (
        _bad(k=torch.zeros(2, 5, 2, 16, dtype=torch.bfloat16), v=torch.zeros(2, 5, 2, 16, dtype=torch.bfloat16)),
        TypeError,
        "share a dtype",
    ),
    "kv_shapes": (_bad(v=torch.zeros(2, 5, 2, 8)), ValueError, r"k \(2, 5, 2, 16\) and v \(2, 5, 2, 8\)"),
    "k_len": (_bad(k=torch.zeros(2, 4, 2, 16), v=torch.zeros(2, 4, 2, 16)), ValueError, r"k must be \(batch=2, len=5"),
    "heads": (_bad(k=torch.zeros(2, 5, 3, 16), v=torch.zeros(2, 5, 3, 16)), ValueError, "multiple of kv heads"),
    "prefix_one": (_bad(prefix_v=None), ValueError, "both prefix_k and prefix_v or neither"),
    "prefix_shape": (
        _bad(prefix_k=torch.zeros(2, 3, 2, 8), prefix_v=torch.zeros(2, 3, 2, 8)),
        ValueError,
        "prefix_k must be",
    ),
    "prefix_dtype": (
        _bad(prefix_k=torch.zeros(2, 3, 2, 16, dtype=torch.half), prefix_v=torch.zeros(2, 3, 2, 16, dtype=torch.half)),
        TypeError,
        "prefix_k/prefix_v must have q's dtype",
    ),
    "mask_dtype": (_bad(key_mask=torch.ones(2, 8)), TypeError, "key_mask must be bool"),
    "mask_shape": (_bad(key_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"prefix_len\+len\+suffix_len=8"),
    "mask_shape_suffix": (
        _bad(suffix_k=torch.zeros(2, 4, 2, 16), suffix_v=torch.zeros(2, 4, 2, 16), key_mask=torch.ones(2, 8).bool()),
        ValueError,
        r"prefix_len\+len\+suffix_len=12\), got \(2, 8\)",
    ),
    "suffix_one": (_bad(suffix_k=torch.zeros(2, 4, 2, 16)), ValueError, "both suffix_k and suffix_v or neither"),
    "suffix_shape": (
        _bad(suffix_k=torch.zeros(2, 4, 2, 8), suffix_v=torch.zeros(2, 4, 2, 8)),
        ValueError,
        r"suffix_k must be \(batch=2, suffix_len, kv_heads=2, head_dim=16\), got \(2, 4, 2, 8\)",
    ),
    "suffix_batch": (
        _bad(suffix_k=torch.zeros(1, 4, 2, 16), suffix_v=torch.zeros(1, 4, 2, 16)),
        ValueError,
        "suffix_k must be",
    ),
    "suffix_kv_differ": (
        _bad(suffix_k=torch.zeros(2, 4, 2, 16), suffix_v=torch.zeros(2, 3, 2, 16)),
        ValueError,
        r"suffix_k \(2, 4, 2, 16\) and suffix_v \(2, 3, 2, 16\) must be equal 4-D",
    ),
    "suffix_rank": (
        _bad(suffix_k=torch.zeros(2, 4, 32), suffix_v=torch.zeros(2, 4, 32)),
        ValueError,
        "suffix_k .* must be equal 4-D",
    ),
    "suffix_dtype": (
        _bad(suffix_k=torch.zeros(2, 4, 2, 16, dtype=torch.half), suffix_v=torch.zeros(2, 4, 2, 16, dtype=torch.half)),
        TypeError,
        "suffix_k/suffix_v must have q's dtype",
    ),
    "causal_suffix": (
        _bad(suffix_k=torch.zeros(2, 4, 2, 16), suffix_v=torch.zeros(2, 4, 2, 16), causal=True),
        ValueError,
        r"causal attention takes no suffix \(suffix_len 4 > 0\)",
    ),
    "cu_dtype": (
        _bad(prefix_k=None, prefix_v=None, cu_seqlens=torch.tensor([0, 5])),
        TypeError,
        "cu_seqlens must be int32",
    ),
    "cu_batch": (
        _bad(prefix_k=None, prefix_v=None, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)),
        ValueError,
        "cu_seqlens needs batch 1 and no prefix",
    ),
    "cu_rank": (
        _bad(
            q=torch.zeros(1, 5, 4, 16),
            k=torch.zeros(1, 5, 2, 16),
            v=torch.zeros(1, 5, 2, 16),
            prefix_k=None,
            prefix_v=None,
            cu_seqlens=torch.tensor([0], dtype=torch.int32),
        ),
        ValueError,
        "cu_seqlens must be 1-D with ≥2 entries",
    ),
    "cu_end": (
        _bad(
            q=torch.zeros(1, 5, 4, 16),
            k=torch.zeros(1, 5, 2, 16),
            v=torch.zeros(1, 5, 2, 16),
            prefix_k=None,
            prefix_v=None,
            cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32),
        ),
        ValueError,
        r"cu_seqlens must rise from 0 to len=5, got \[0, 2, 4\]",
    ),
    "cu_falling": (
        _bad(
            q=torch.zeros(1, 5, 4, 16),
            k=torch.zeros(1, 5, 2, 16),
            v=torch.zeros(1, 5, 2, 16),
            prefix_k=None,
            prefix_v=None,
            cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32),
        ),
        ValueError,
        "cu_seqlens must rise from 0 to len=5",
    ),
    "cu_suffix": (
        _bad(
            q=torch.zeros(1, 5, 4, 16),
            k=torch.zeros(1, 5, 2, 16),
            v=torch.zeros(1, 5, 2, 16),
            prefix_k=None,
            prefix_v=None,
            suffix_k=torch.zeros(1, 2, 2, 16),
            suffix_v=torch.zeros(1, 2, 2, 16),
            cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
        ),
        ValueError,
        "cu_seqlens needs batch 1 and no prefix or suffix",
    ),
    "cu_and_mask": (
        _bad(
            q=torch.zeros(1, 5, 4, 16),
            k=torch.zeros(1, 5, 2, 16),
            v=torch.zeros(1, 5, 2, 16),
            prefix_k=None,
            prefix_v=None,
            key_mask=torch.ones(1, 5, dtype=torch.bool),
            cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
        ),
        ValueError,
        "cu_seqlens and key_mask cannot be combined",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case: str) -> None:
    args, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        masked_attention(**args)
    with pytest.raises(error):  # the reference rejects it the same way
        reference.masked_attention(**args)


if st is None:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install '.[test]')")
    def test_random_calls() -> None:
        pass

else:

    @st.composite
    def _random_call(draw: st.DrawFn) -> dict:
        """Random shapes, strides and options; sometimes an invalid combination."""
        batch = draw(st.integers(1, 3))
        q_len = draw(st.integers(0, 24))
        prefix_len = draw(st.integers(0, 20))
        kv_heads = draw(st.integers(1, 3))
        heads = kv_heads * draw(st.integers(1, 4)) + draw(st.sampled_from([0, 0, 0, 0, 1]))  # 1 in 5: maybe no multiple
        head_dim = draw(st.integers(1, 40))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)

        def tensor(*shape: int) -> torch.Tensor:
            layout = draw(st.sampled_from(["contiguous", "sliced", "transposed", "strided_dim"]))
            if layout == "sliced":  # cut out of a larger tensor in every dim
                big = torch.randn(*(s + 2 for s in shape), generator=g)
                t = big[1 : shape[0] + 1, 1 : shape[1] + 1, 1 : shape[2] + 1, 1 : shape[3] + 1]
            elif layout == "transposed":
                t = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).transpose(1, 2)
            elif layout == "strided_dim":
                t = torch.randn(*shape[:3], 2 * shape[3], generator=g)[..., ::2]
            else:
                t = torch.randn(*shape, generator=g)
            return t.to(dtype)

        args = {
            "q": tensor(batch, q_len, heads, head_dim),
            "k": tensor(batch, q_len, kv_heads, head_dim),
            "v": tensor(batch, q_len, kv_heads, head_dim),
            "causal": draw(st.booleans()),
            # invalid scales (NaN, inf, <= 0, 0 or inf once rounded to fp32) must raise in both
            "scale": draw(st.sampled_from([None, None, 0.1, 2.0, math.nan, math.inf, 0.0, -1.0, 1e-50, 1e39])),
        }
        if prefix_len and draw(st.booleans()):
            args["prefix_k"] = tensor(batch, prefix_len, kv_heads, head_dim)
            args["prefix_v"] = tensor(batch, prefix_len, kv_heads, head_dim)
        else:
            prefix_len = 0
        suffix_len = 0
        if draw(st.integers(0, 2)) == 0:  # a suffix (maybe empty); with causal or cu_seqlens both must raise
            suffix_len = draw(st.integers(0, 20))
            args["suffix_k"] = tensor(batch, suffix_len, kv_heads, head_dim)
            args["suffix_v"] = tensor(batch, suffix_len, kv_heads, head_dim)
        option = draw(st.sampled_from(["none", "key_mask", "cu_seqlens"]))
        if option == "key_mask":
            args["key_mask"] = torch.rand(batch, prefix_len + q_len + suffix_len, generator=g) < 0.7
        elif option == "cu_seqlens":  # valid only for batch 1 and no prefix: otherwise both must raise
            cuts = sorted(draw(st.lists(st.integers(0, q_len), max_size=4)))
            args["cu_seqlens"] = torch.tensor([0, *cuts, q_len], dtype=torch.int32)
        if draw(st.integers(0, 9)) == 0:  # one argument on the meta device: both must raise (ValueError)
            name = draw(st.sampled_from(sorted(n for n, a in args.items() if isinstance(a, torch.Tensor))))
            args[name] = args[name].to("meta")
        return args

    # The tol fixture is a pure lookup, so sharing it across hypothesis examples is safe.
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(args=_random_call())
    def test_random_calls(args: dict, tol) -> None:
        """Any call gives the reference's answer or raises the Python exception the reference raises."""
        try:
            expected = reference.masked_attention(**args)
        except (ValueError, TypeError) as e:
            with pytest.raises(type(e)):
                masked_attention(**args)
            return
        out = masked_attention(**args)
        assert out.shape == expected.shape
        _assert_matches_reference(out, args, tol(args["q"].dtype))
