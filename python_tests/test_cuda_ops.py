# SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels of every op against dimple_rt.reference, with the CPU tests' sizes and tolerances.

The sizes, input builders and comparison rules are imported from the CPU test modules, so both devices are held
to the same contract. Attention and kv_cache_write compare with the reference run on the GPU (fp32 maths, no
TF32); confident_select compares with the reference on the CPU, whose rounding (true fp32 division by the
temperature, torch's exp) is the one the spec names: decisions (x0, commit) must be identical, confidences agree
to the fp32 tolerance. Skipped where there is no GPU or the extension was built without its CUDA kernels.
"""

from __future__ import annotations

import pytest
import test_confident_select as tcs
import test_kv_cache_write as tkv
import test_masked_attention as tma
import torch
from _cuda import CUDA_ONLY, DEVICE

from dimple_rt import ops, reference

pytestmark = CUDA_ONLY


def _cuda(value):
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE)
    if isinstance(value, dict):
        return {k: _cuda(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_cuda(v) for v in value)
    return value


# ---- masked_attention


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(tma.MODES))
@pytest.mark.parametrize("shape", tma.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(shape: tuple, mode: str, dtype: torch.dtype, tol) -> None:
    batch, q_len, prefix_len = shape[:3]
    causal, padded = tma.MODES[mode]
    args = _cuda(tma._attention_inputs(*shape, dtype))
    args["key_mask"] = _cuda(tma._left_padding(batch, prefix_len + q_len)) if padded else None
    args["causal"] = causal
    out = ops.masked_attention(**args)
    assert out.device.type == "cuda"
    tma._assert_matches_reference(out, args, tol(dtype))
    if causal and padded:
        padded_queries = ~args["key_mask"][:, prefix_len:]
        assert torch.equal(out[padded_queries], torch.zeros_like(out[padded_queries]))


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 65, 600, 28, 4, 128), (2, 65, 100, 28, 4, 128), (1, 64, 0, 16, 16, 80)],
    ids=["dimple7b_decode", "dimple7b_decode_b2", "vision_hd80"],
)
def test_attention_real_shapes(shape: tuple, dtype: torch.dtype, tol) -> None:
    """Dimple-7B decode (65-token canvas over a 600-token cache: ten 64-key tiles) and the vision head_dim."""
    args = _cuda(tma._attention_inputs(*shape, dtype))
    args["key_mask"] = _cuda(tma._left_padding(shape[0], shape[1] + shape[2]))
    tma._assert_matches_reference(ops.masked_attention(**args), args, tol(dtype))


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
def test_attention_fully_masked_rows_are_zero(dtype: torch.dtype) -> None:
    args = _cuda(tma._attention_inputs(2, 6, 2, 4, 2, 64, dtype))
    key_mask = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    key_mask[1, :6] = False
    out = ops.masked_attention(**args, key_mask=key_mask, causal=True)
    assert out[1, :4].abs().sum() == 0 and not out.isnan().any()
    assert out[1, 4:].abs().sum() > 0 and out[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_cu_seqlens(causal: bool, dtype: torch.dtype, tol) -> None:
    args = _cuda(tma._attention_inputs(1, tma.CU_LEN, 0, tma.CU_HEADS, tma.CU_HEADS, tma.CU_HEAD_DIM, dtype))
    args.update(cu_seqlens=torch.tensor(tma.CU_SEQLENS, dtype=torch.int32, device=DEVICE), causal=causal)
    tma._assert_matches_reference(ops.masked_attention(**args), args, tol(dtype))


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
def test_attention_non_contiguous(dtype: torch.dtype, tol) -> None:
    """Sliced heads/channels, a transposed k, a channel stride of 2, a prefix cut from a longer cache and a
    sliced key mask: the element-load paths of the kernels."""
    batch, q_len, prefix_len, heads, kv_heads, head_dim = 2, 11, 17, 6, 2, 64
    g = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q = randn(batch, q_len, heads + 3, head_dim + 5)[:, :, 1 : heads + 1, 2 : head_dim + 2]
    k = randn(batch, kv_heads, q_len, head_dim).transpose(1, 2)
    v = randn(batch, q_len, kv_heads, 2 * head_dim)[..., ::2]
    cache_k, cache_v = randn(batch, 64, kv_heads, head_dim), randn(batch, 64, kv_heads, head_dim)
    mask = torch.ones(batch + 1, 2 * (prefix_len + q_len), dtype=torch.bool, device=DEVICE)
    mask[:, :5] = False
    args = {"q": q, "k": k, "v": v, "prefix_k": cache_k[:, :prefix_len], "prefix_v": cache_v[:, :prefix_len]}
    for extra in ({}, {"key_mask": mask[1:, ::2]}, {"key_mask": mask[1:, ::2], "causal": True}):
        tma._assert_matches_reference(ops.masked_attention(**args, **extra), {**args, **extra}, tol(dtype))


def test_attention_scale(tol) -> None:
    args = _cuda(tma._attention_inputs(2, 9, 5, 4, 2, 64, torch.float32))
    args["scale"] = 0.37
    tma._assert_matches_reference(ops.masked_attention(**args), args, tol(torch.float32))


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["bidirectional", "padded"])
@pytest.mark.parametrize("shape", tma.SUFFIX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_suffix_matches_reference(shape: tuple, padded: bool, dtype: torch.dtype, tol) -> None:
    """[prefix ‖ current ‖ suffix] keys (the dual cache) on the CPU tests' awkward sizes and key masks."""
    batch, q_len, prefix_len, suffix_len, heads, kv_heads, head_dim = shape
    args = tma._attention_inputs(batch, q_len, prefix_len, heads, kv_heads, head_dim, dtype, suffix_len=suffix_len)
    args["key_mask"] = tma._suffix_mask(batch, prefix_len, q_len, suffix_len) if padded else None
    args = _cuda(args)
    out = ops.masked_attention(**args)
    assert out.device.type == "cuda"
    tma._assert_matches_reference(out, args, tol(dtype))


@pytest.mark.parametrize("dtype", tma.DTYPES, ids=str)
def test_attention_suffix_views_of_a_cache(dtype: torch.dtype, tol) -> None:
    """Prefix, current and suffix as views of one wider cache buffer: the vector-load path (cache layout) and
    the element-load paths (a transposed buffer, a head_dim stride of 2, a suffix that starts at an odd row of
    a buffer whose rows are not 16-byte multiples)."""
    batch, prefix_len, q_len, suffix_len, heads, kv_heads, head_dim = 2, 21, 13, 70, 8, 2, 80
    max_len = prefix_len + q_len + suffix_len + 9
    g = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q = randn(batch, q_len, heads, head_dim)
    layouts = {
        "cache": lambda: randn(batch, max_len, kv_heads, head_dim),
        "transposed": lambda: randn(batch, kv_heads, max_len, head_dim).transpose(1, 2),
        "strided_dim": lambda: randn(batch, max_len, kv_heads, 2 * head_dim)[..., ::2],
        "odd_rows": lambda: randn(batch, max_len, kv_heads, head_dim + 1)[..., :head_dim],
    }
    end = prefix_len + q_len
    mask = _cuda(tma._suffix_mask(batch, prefix_len, q_len, suffix_len))
    for make in layouts.values():
        cache_k, cache_v = make(), make()
        args = {
            "q": q,
            "k": cache_k[:, prefix_len:end],
            "v": cache_v[:, prefix_len:end],
            "prefix_k": cache_k[:, :prefix_len],
            "prefix_v": cache_v[:, :prefix_len],
            "suffix_k": cache_k[:, end : end + suffix_len],
            "suffix_v": cache_v[:, end : end + suffix_len],
        }
        for extra in ({}, {"key_mask": mask}):
            tma._assert_matches_reference(ops.masked_attention(**args, **extra), {**args, **extra}, tol(dtype))


@pytest.mark.parametrize("case", list(tma.BAD_INPUTS))
def test_attention_bad_inputs_same_message(case: str) -> None:
    args, error, message = tma.BAD_INPUTS[case]
    if "is on" in message:
        pytest.skip("a device-mismatch case: every tensor is on the GPU here")
    with pytest.raises(error, match=message):
        ops.masked_attention(**_cuda(args))


@pytest.mark.parametrize("sample", range(len(tma._opcheck_samples())))
def test_attention_opcheck(sample: int) -> None:
    args, kwargs = tma._opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.dimple_rt.masked_attention.default, _cuda(args), _cuda(kwargs))


# ---- kv_cache_write


@pytest.mark.parametrize("dtype", tkv.DTYPES, ids=str)
@pytest.mark.parametrize("shape", tkv.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kv_cache_write_matches_reference(shape: tuple, dtype: torch.dtype, tol) -> None:
    batch, max_len, length, start, kv_heads, head_dim = shape
    args = _cuda(tkv._inputs(batch, max_len, length, kv_heads, head_dim, dtype))
    tkv._check(*args, start, tol(dtype))


@pytest.mark.parametrize("dtype", tkv.DTYPES, ids=str)
def test_kv_cache_write_non_contiguous(dtype: torch.dtype, tol) -> None:
    g = torch.Generator().manual_seed(2)
    cache_k = torch.randn(2, 40, 6, 64, generator=g).to(dtype).to(DEVICE)[:, :, 1:4]
    cache_v = torch.randn(2, 3, 40, 64, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 9, 3, 128, generator=g).to(dtype).to(DEVICE)[..., ::2]
    v = torch.randn(2, 9, 3, 64, generator=g).to(dtype).to(DEVICE)
    angle = torch.rand(2, 9, 64, generator=g).to(DEVICE) * 50.0
    tkv._check(cache_k, cache_v, k, v, angle.cos(), angle.sin(), 17, tol(dtype))


@pytest.mark.parametrize("case", list(tkv.BAD_INPUTS))
def test_kv_cache_write_bad_inputs_same_message(case: str) -> None:
    args, error, message = tkv.BAD_INPUTS[case]
    if "is on" in message:
        pytest.skip("a device-mismatch case: every tensor is on the GPU here")
    with pytest.raises(error, match=message):
        ops.kv_cache_write(**_cuda(args))


def test_kv_cache_write_opcheck() -> None:
    cache_k, cache_v, k, v, cos, sin = _cuda(tkv._inputs(2, 12, 5, 2, 16, torch.float32))
    torch.library.opcheck(torch.ops.dimple_rt.kv_cache_write.default, (cache_k, cache_v, k, v, cos, sin, 3))


# ---- confident_select


def _select_both(logits: torch.Tensor, row_ids: torch.Tensor, n: torch.Tensor, **options) -> tuple[tuple, tuple]:
    """(CUDA kernel results moved to the CPU, the reference on the CPU)."""
    got = ops.confident_select(_cuda(logits), _cuda(row_ids), _cuda(n), **_cuda(options))
    want = reference.confident_select(logits, row_ids, n, **options)
    return tuple(t.cpu() for t in got), want


@pytest.mark.parametrize("dtype", tcs.DTYPES, ids=str)
@pytest.mark.parametrize("kind", tcs.KINDS)
@pytest.mark.parametrize("mode", list(tcs.MODES))
@pytest.mark.parametrize("vocab", tcs.VOCABS)
def test_select_matches_reference(vocab: int, mode: str, kind: str, dtype: torch.dtype, tol) -> None:
    row_ids = torch.tensor(tcs.ROW_IDS)
    rows = len(tcs.ROW_IDS)
    logits = tcs._logits(rows, vocab, dtype)
    for coupled, n in ((True, torch.tensor([4])), (False, torch.tensor([1, 9, 2, 0, 3, 1]))):
        got, want = _select_both(logits, row_ids, n, batch_coupled=coupled, **tcs._options(mode, kind, rows))
        tcs._assert_same(got, want, tol(torch.float32))


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("coupled", [True, False])
def test_select_threshold(threshold: float, coupled: bool, tol) -> None:
    row_ids = torch.tensor(tcs.ROW_IDS)
    logits = tcs._logits(len(tcs.ROW_IDS), 151, torch.float32, seed=4, scale=6.0)
    n = torch.tensor([2]) if coupled else torch.tensor([2, 1, 1, 1, 2, 1])
    options = tcs._options("greedy", "plain", len(tcs.ROW_IDS), threshold)
    got, want = _select_both(logits, row_ids, n, batch_coupled=coupled, **options)
    tcs._assert_same(got, want, tol(torch.float32))


@pytest.mark.parametrize("mode", ["greedy", "sample", "sample_both", "sample_top_p", "sample_top_k"])
@pytest.mark.parametrize("kind", tcs.KINDS)
def test_select_dimple_vocabulary(mode: str, kind: str, tol) -> None:
    for rows, dtype, scale in ((1, torch.float32, 2.0), (3, torch.bfloat16, 4.0), (64, torch.bfloat16, 3.0)):
        logits = tcs._logits(rows, tcs.BIG_VOCAB, dtype, seed=rows, scale=scale)
        row_ids, n = torch.zeros(rows, dtype=torch.int64), torch.tensor([2])
        got, want = _select_both(logits, row_ids, n, **tcs._options(mode, kind, rows))
        tcs._assert_same(got, want, tol(torch.float32))


def test_select_ties() -> None:
    """Argmax ties to the lowest id, top-p ties by index, top-k keeps every tie at the k-th value, confidence
    ties to the lowest position: the CPU tests' hand-built cases, on the GPU."""
    logits = torch.zeros(4, 40)
    logits[0, [7, 3, 30]] = 5.0
    logits[1, [39, 20]] = 2.0
    logits[2] = 1.0
    logits[3, [17, 33]] = -1.0
    for dtype in tcs.DTYPES:
        x0, _, _ = ops.confident_select(_cuda(logits.to(dtype)), _cuda(torch.arange(4)), _cuda(torch.tensor([0])))
        assert x0.tolist() == [3, 20, 0, 0]
    nucleus = torch.log(torch.tensor([[2.0, 4.0, 2.0, 2.0], [2.0, 2.0, 2.0, 4.0]]))
    for u in (0.1, 0.5, 0.9, 0.999):
        options = {"temperature": 1.0, "top_p": 0.5, "uniforms": torch.tensor([u, u]), "use_original_confidence": False}
        got, want = _select_both(nucleus, torch.tensor([0, 1]), torch.tensor([1, 1]), batch_coupled=False, **options)
        assert torch.equal(got[0], want[0])
    kth = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    for u, expected in ((0.0, 0), (0.99, 3)):
        options = {"temperature": 1.0, "top_k": 2, "uniforms": torch.tensor([u]), "use_original_confidence": False}
        got, _ = _select_both(kth, torch.tensor([0]), torch.tensor([1]), **options)
        assert got[0].item() == expected
    base = tcs._logits(1, 151, torch.float32, seed=7, scale=4.0)
    weak = base * 0.2
    stacked = torch.cat([weak, base, weak, base, base, weak])
    for kind in tcs.KINDS:
        got, want = _select_both(stacked, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([2]), confidence=kind)
        assert got[2].tolist() == [False, True, False, True, False, False] and torch.equal(got[2], want[2])
    one_hot = tcs._logits(7, 151, torch.bfloat16, seed=3)
    got, _ = _select_both(
        one_hot, torch.zeros(7, dtype=torch.int64), torch.tensor([3]), top_p=0.0, use_original_confidence=False
    )
    assert torch.equal(got[1], torch.ones(7)) and got[2].tolist() == [True] * 3 + [False] * 4


def test_select_commit_counts() -> None:
    logits = tcs._logits(5, 17, torch.float32, seed=9)
    row_ids = torch.tensor([0, 0, 1, 1, 1])
    got, _ = _select_both(logits, row_ids, torch.tensor([0, 7]), batch_coupled=False, threshold=0.0)
    assert got[2].tolist() == [False, False, True, True, True]
    got, _ = _select_both(logits, row_ids, torch.tensor([99]))
    assert got[2].all()


@pytest.mark.parametrize("case", list(tcs.BAD_INPUTS))
def test_select_bad_inputs_same_message(case: str) -> None:
    """Every CPU check, tensor values included (the CUDA op reads its error slots back; test_cuda_select.py)."""
    args, error, message = tcs.BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        ops.confident_select(**_cuda(args))


def test_select_opcheck() -> None:
    logits = _cuda(tcs._logits(6, 33, torch.float32))
    row_ids, n = _cuda(torch.tensor([0, 0, 1, 1, 1, 2])), _cuda(torch.tensor([2]))
    torch.library.opcheck(torch.ops.dimple_rt.confident_select.default, (logits, row_ids, n), {"confidence": "margin"})


# ---- hostile arguments (issue 15): the same contract as python_tests/test_op_safety.py


@pytest.mark.parametrize("temperature", [1e-39, 1.401298464324817e-45, 0.5])
@pytest.mark.parametrize("filters", [{}, {"top_k": 1}, {"top_k": 3}, {"top_p": 0.9}, {"top_p": 0.0}])
def test_select_overflowing_scaled_logits(temperature: float, filters: dict, tol) -> None:
    """Rows where max(z) / T overflows fp32 use (z − max z) / T on the GPU as in the reference."""
    logits = torch.tensor(
        [
            [1.0, 0.0, -1.0, 1.0 - 1e-7, -3e38],
            [-1.0, -2.0, -1.0, -5.0, float("-inf")],
            [3e38, -3e38, 1e38, 0.0, 3e38],
            [0.0, 0.0, -1e-40, -1.0, 0.0],
        ]
    )
    row_ids = torch.zeros(4, dtype=torch.long)
    for u in (0.0, 0.3, 0.999999):
        for kind in tcs.KINDS:
            for orig in (True, False):
                options = {"temperature": temperature, "uniforms": torch.full((4,), u), "confidence": kind}
                got, want = _select_both(
                    logits, row_ids, torch.tensor([2]), use_original_confidence=orig, **options, **filters
                )
                assert bool(((got[0] >= 0) & (got[0] < 5)).all()) and bool(torch.isfinite(got[1]).all())
                tcs._assert_same(got, want, tol(torch.float32))


def test_kv_cache_write_overflow_and_aliasing_rejected() -> None:
    c = torch.zeros(1, 8, 2, 8, device=DEVICE)
    k = torch.randn(1, 1, 2, 8, device=DEVICE)
    x = torch.randn(1, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must satisfy 0 <= start"):
        ops.kv_cache_write(c, c.clone(), k, k, x, x, 2**63 - 1)
    with pytest.raises(ValueError, match="cache_k and cache_v overlap"):
        ops.kv_cache_write(c, c.view(c.shape), k, k, x, x, 0)
    with pytest.raises(ValueError, match="k overlaps the rows"):
        ops.kv_cache_write(c, c.clone(), c[:, 3:4], k, x, x, 3)


def test_cuda_meta_mix_and_scale_rejected() -> None:
    q = torch.randn(1, 3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k is on meta"):
        ops.masked_attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.masked_attention(q, q, q, scale=float("nan"))
