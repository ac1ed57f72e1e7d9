# SPDX-License-Identifier: Apache-2.0
"""The kv_cache_write op (C++ kernel) against dimple_rt.reference.kv_cache_write, and against the model's rotary."""

from __future__ import annotations

import pytest
import torch

from dimple_rt import reference
from dimple_rt.config import DimpleConfig, VisionConfig
from dimple_rt.model.rope import apply_rotary, get_rope_index, rotary_cos_sin
from dimple_rt.ops import kv_cache_write

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machines have no hypothesis
    st = None

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, max_len, len, start, kv_heads, head_dim): odd lengths incl. 1, a write at the very end of the
# cache, head_dim 64/80/128 and one (18) whose half is no multiple of any vector width.
SHAPES = [
    (1, 8, 1, 0, 1, 64),
    (2, 33, 7, 26, 2, 64),  # ends exactly at max_len
    (3, 40, 13, 5, 4, 80),
    (1, 700, 65, 600, 4, 128),  # Dimple-7B decode-like: a 65-token canvas after a 600-token prefix
    (2, 9, 9, 0, 3, 18),
]


def _inputs(batch: int, max_len: int, length: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cache_k = torch.randn(batch, max_len, kv_heads, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(batch, max_len, kv_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, length, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, length, kv_heads, head_dim, generator=g).to(dtype)
    angle = torch.rand(batch, length, head_dim, generator=g) * 50.0  # (batch, len, head_dim)
    return cache_k, cache_v, k, v, angle.cos().to(dtype), angle.sin().to(dtype)


def _check(cache_k, cache_v, k, v, cos, sin, start: int, tol: dict) -> None:
    """Kernel vs reference on clones of the same caches.

    Untouched positions and the values must be bit-identical (a copy). The rotated keys: for fp32 the same
    three-term expression up to FMA contraction, so the fp32 tolerance; for bf16/fp16 both compute in fp32 and
    round once, so they may differ by one rounding where the fp32 results straddle a rounding boundary: the
    kernel's error against the exact fp32 value is at most twice the reference's (plus fp32 noise).
    """
    ck, cv = cache_k.clone(), cache_v.clone()
    rk, rv = cache_k.clone(), cache_v.clone()
    kv_cache_write(ck, cv, k, v, cos, sin, start)
    reference.kv_cache_write(rk, rv, k, v, cos, sin, start)
    length = k.shape[1]
    outside = torch.ones(cache_k.shape[1], dtype=torch.bool)
    outside[start : start + length] = False
    assert torch.equal(ck[:, outside], cache_k[:, outside]) and torch.equal(cv[:, outside], cache_v[:, outside])
    assert torch.equal(cv[:, start : start + length], v)
    got, want = ck[:, start : start + length], rk[:, start : start + length]
    if cache_k.dtype == torch.float32:
        torch.testing.assert_close(got, want, **tol)
        return
    exact = k.float() * cos.float()[:, :, None] + reference._rotate_half(k.float()) * sin.float()[:, :, None]
    err_kernel = (got.float() - exact).abs().max().item() if got.numel() else 0.0
    err_ref = (want.float() - exact).abs().max().item() if got.numel() else 0.0
    assert err_kernel <= 2 * err_ref + 1e-6, f"kernel error {err_kernel} > 2 × reference error {err_ref}"
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape: tuple, dtype: torch.dtype, tol) -> None:
    batch, max_len, length, start, kv_heads, head_dim = shape
    args = _inputs(batch, max_len, length, kv_heads, head_dim, dtype)
    _check(*args, start, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_tables_with_low_precision_cache(dtype: torch.dtype, tol) -> None:
    """cos/sin may come in fp32 (the rotary's own dtype) while the cache is bf16/fp16."""
    cache_k, cache_v, k, v, _, _ = _inputs(2, 20, 5, 2, 64, dtype)
    angle = torch.rand(2, 5, 64, generator=torch.Generator().manual_seed(3)) * 9.0
    _check(cache_k, cache_v, k, v, angle.cos(), angle.sin(), 11, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype: torch.dtype, tol) -> None:
    """Caches sliced out of a wider buffer (a (batch, heads, len, dim) layout seen through a transpose, a head_dim
    stride of 2), k/v cut from a fused qkv projection, cos/sin with a stride in the position dim."""
    batch, max_len, length, kv_heads, head_dim = 2, 30, 9, 2, 64
    g = torch.Generator().manual_seed(5)
    cache_k = torch.randn(batch, kv_heads, max_len, head_dim, generator=g).to(dtype).transpose(1, 2)
    cache_v = torch.randn(batch, max_len, kv_heads, 2 * head_dim, generator=g).to(dtype)[..., ::2]
    qkv = torch.randn(batch, length, 3 * kv_heads + 1, head_dim + 3, generator=g).to(dtype)
    k = qkv[:, :, 1 : kv_heads + 1, :head_dim]
    v = qkv[:, :, kv_heads + 1 : 2 * kv_heads + 1, 3:]
    angle = torch.rand(batch, 2 * length, head_dim, generator=g) * 20.0
    cos, sin = angle.cos().to(dtype)[:, ::2], angle.sin().to(dtype)[:, 1::2]
    for t in (cache_k, cache_v, k, v, cos, sin):
        assert not t.is_contiguous()
    _check(cache_k, cache_v, k, v, cos, sin, 17, tol(dtype))


def test_empty_write_is_a_no_op() -> None:
    cache_k, cache_v, k, v, cos, sin = _inputs(2, 6, 0, 2, 16, torch.float32)
    ck, cv = cache_k.clone(), cache_v.clone()
    kv_cache_write(ck, cv, k, v, cos, sin, 6)
    assert torch.equal(ck, cache_k) and torch.equal(cv, cache_v)


def test_matches_model_rotary() -> None:
    """With M-RoPE tables from rope.py (text and image positions), fp32: the cache holds apply_rotary(k)."""
    config = DimpleConfig(vision_config=VisionConfig())  # Dimple-7B's ids and mrope_section [16, 24, 24]
    head_dim, kv_heads = 128, 2
    ids = torch.tensor([[1, 2, config.vision_start_token_id] + [config.image_token_id] * 4 + [5, 6]])  # (1, 9)
    position_ids, _ = get_rope_index(ids, config, image_grid_thw=torch.tensor([[1, 4, 4]]))  # (3, 1, 9)
    cos, sin = rotary_cos_sin(position_ids, head_dim, 1e6, config.mrope_section, torch.float32)
    k = torch.randn(1, 9, kv_heads, head_dim, generator=torch.Generator().manual_seed(2))
    v = torch.randn_like(k)
    cache_k, cache_v = torch.zeros(1, 16, kv_heads, head_dim), torch.zeros(1, 16, kv_heads, head_dim)
    kv_cache_write(cache_k, cache_v, k, v, cos, sin, 3)
    torch.testing.assert_close(cache_k[:, 3:12], apply_rotary(k, cos, sin), atol=1e-5, rtol=1e-5)
    assert torch.equal(cache_v[:, 3:12], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    cache_k, cache_v, k, v, cos, sin = _inputs(2, 12, 5, 2, 16, dtype)
    torch.library.opcheck(torch.ops.dimple_rt.kv_cache_write.default, (cache_k, cache_v, k, v, cos, sin, 4))


def test_torch_compile() -> None:
    cache_k, cache_v, k, v, cos, sin = _inputs(2, 12, 5, 2, 16, torch.float32)

    def write_then_read(ck, cv, k, v, cos, sin):
        kv_cache_write(ck, cv, k * 2.0, v, cos, sin, 3)
        return ck[:, :8] + cv[:, :8]

    # Dynamo's first run turns off torch.distributions' argument validation for the whole process; restore it.
    validate_args = torch.distributions.Distribution._validate_args
    try:
        compiled = torch.compile(write_then_read, fullgraph=True)
        ck, cv = cache_k.clone(), cache_v.clone()
        got = compiled(ck, cv, k, v, cos, sin)
        rk, rv = cache_k.clone(), cache_v.clone()
        torch.testing.assert_close(got, write_then_read(rk, rv, k, v, cos, sin))
        torch.testing.assert_close(ck, rk)  # the mutation is visible to the caller
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate_args)


def _bad(**changes) -> dict:
    cache_k, cache_v, k, v, cos, sin = _inputs(2, 10, 4, 2, 16, torch.float32)
    args = {"cache_k": cache_k, "cache_v": cache_v, "k": k, "v": v, "cos": cos, "sin": sin, "start": 3}
    args.update(changes)
    return args


BAD_INPUTS = {
    "cache_rank": (_bad(cache_k=torch.zeros(10, 2, 16)), ValueError, "cache_k must be 4-D"),
    "k_rank": (_bad(k=torch.zeros(2, 4, 16)), ValueError, "k must be 4-D"),
    "cos_rank": (_bad(cos=torch.zeros(2, 4)), ValueError, "cos must be 3-D"),
    "cache_dtype": (_bad(cache_v=torch.zeros(2, 10, 2, 16, dtype=torch.int32)), TypeError, "cache_v must be float32"),
    "mixed_dtype": (
        _bad(k=torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)),
        TypeError,
        "cache_k, cache_v, k, v must share",
    ),
    "cos_sin_dtype": (_bad(sin=torch.zeros(2, 4, 16, dtype=torch.half)), TypeError, "cos and sin must share a dtype"),
    "cos_int": (_bad(cos=torch.zeros(2, 4, 16, dtype=torch.int64)), TypeError, "cos must be float32"),
    "cache_shapes": (_bad(cache_v=torch.zeros(2, 11, 2, 16)), ValueError, r"cache_k \(2, 10, 2, 16\) and cache_v"),
    "kv_shapes": (_bad(v=torch.zeros(2, 5, 2, 16)), ValueError, r"k \(2, 4, 2, 16\) and v \(2, 5, 2, 16\)"),
    "k_heads": (
        _bad(k=torch.zeros(2, 4, 3, 16), v=torch.zeros(2, 4, 3, 16)),
        ValueError,
        r"k must be \(batch=2, len, kv_heads=2",
    ),
    "odd_head_dim": (
        _bad(
            cache_k=torch.zeros(2, 10, 2, 15),
            cache_v=torch.zeros(2, 10, 2, 15),
            k=torch.zeros(2, 4, 2, 15),
            v=torch.zeros(2, 4, 2, 15),
            cos=torch.zeros(2, 4, 15),
            sin=torch.zeros(2, 4, 15),
        ),
        ValueError,
        "head_dim must be even",
    ),
    "cos_shape": (_bad(cos=torch.zeros(2, 5, 16)), ValueError, r"cos must be \(batch=2, len=4, head_dim=16\)"),
    "sin_shape": (_bad(sin=torch.zeros(1, 4, 16)), ValueError, r"sin must be \(batch=2"),
    "start_negative": (_bad(start=-1), ValueError, "start=-1 and len=4 must satisfy"),
    "past_end": (_bad(start=7), ValueError, r"start \+ len <= max_len=10"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case: str) -> None:
    args, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        kv_cache_write(**args)
    with pytest.raises(error, match=message):  # the reference rejects it the same way
        reference.kv_cache_write(**args)


def test_aliased_caches_rejected() -> None:
    args = _bad()
    args["cache_v"] = args["cache_k"]
    with pytest.raises(ValueError, match="different tensors"):
        kv_cache_write(**args)


if st is None:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install '.[test]')")
    def test_random_calls() -> None:
        pass

else:

    @st.composite
    def _random_call(draw: st.DrawFn) -> dict:
        """Random shapes, strides, dtypes and start; sometimes an invalid combination."""
        batch = draw(st.integers(1, 3))
        max_len = draw(st.integers(1, 24))
        length = draw(st.integers(0, 24))
        start = draw(st.one_of(st.integers(-1, 24), st.sampled_from([-(2**63), 2**62, 2**63 - 1])))
        kv_heads = draw(st.integers(1, 4))
        head_dim = 2 * draw(st.integers(1, 40)) - draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 1]))  # 1 in 8: odd
        dtype = draw(st.sampled_from(DTYPES))
        table_dtype = draw(st.sampled_from([dtype, torch.float32]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

        def tensor(*shape: int, dt: torch.dtype) -> torch.Tensor:
            layout = draw(st.sampled_from(["contiguous", "sliced", "transposed", "strided_last"]))
            if layout == "sliced":
                big = torch.randn(*(s + 2 for s in shape), generator=g)
                t = big[tuple(slice(1, s + 1) for s in shape)]
            elif layout == "transposed":
                t = torch.randn(shape[0], shape[2], shape[1], *shape[3:], generator=g).transpose(1, 2)
            elif layout == "strided_last":
                t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
            else:
                t = torch.randn(*shape, generator=g)
            return t.to(dt)

        args = {
            "cache_k": tensor(batch, max_len, kv_heads, head_dim, dt=dtype),
            "cache_v": tensor(batch, max_len, kv_heads, head_dim, dt=dtype),
            "k": tensor(batch, length, kv_heads, head_dim, dt=dtype),
            "v": tensor(batch, length, kv_heads, head_dim, dt=dtype),
            "cos": tensor(batch, length, head_dim, dt=table_dtype),
            "sin": tensor(batch, length, head_dim, dt=table_dtype),
            "start": start,
        }
        if draw(st.integers(0, 9)) == 0:  # one argument on the meta device: both must raise (ValueError)
            name = draw(st.sampled_from(["cache_k", "cache_v", "k", "v", "cos", "sin"]))
            args[name] = args[name].to("meta")
        return args

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(args=_random_call())
    def test_random_calls(args: dict, tol) -> None:
        """Any call gives the reference's caches or raises the Python exception the reference raises."""
        try:
            reference.check_kv_cache_write_args(**args)
            if any(t.is_meta for t in args.values() if isinstance(t, torch.Tensor)):
                raise AssertionError("a meta tensor among real ones passed the reference's checks")
        except (ValueError, TypeError) as e:
            with pytest.raises(type(e)):
                kv_cache_write(**{**args, "cache_k": args["cache_k"].clone(), "cache_v": args["cache_v"].clone()})
            return
        _check(**args, tol=tol(args["k"].dtype))
