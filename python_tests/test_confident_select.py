# SPDX-License-Identifier: Apache-2.0
"""The confident_select op (C++ kernel) against dimple_rt.reference.confident_select, its executable spec.

Decisions are exact: x0 and commit must equal the reference's, ties included (the tie cases are built on
purpose below). Confidences are fp32 results of sums over the vocabulary in another order: the fp32 tolerance
of conftest's table, whatever the logits' dtype (both sides compute in fp32 from the same upcast logits).
"""

from __future__ import annotations

import math

import pytest
import torch

from dimple_rt import reference
from dimple_rt.generation.sampling import sample_tokens
from dimple_rt.ops import confident_select

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machines have no hypothesis
    st = None

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["plain", "margin", "neg_entropy"]
VOCABS = [1, 17, 151]  # 1 entry, less than one AVX-512 vector plus one, no multiple of any block
BIG_VOCAB = 152064  # Dimple-7B's
ROW_IDS = [0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 5]  # batch rows 1 and 4 have no masked entry
NUM_BATCH_ROWS = 6

# (temperature, top_p, top_k, use_original_confidence): greedy and sampled, each filter alone and together.
MODES = {
    "greedy": (0.0, None, None, True),
    "greedy_filtered_conf": (0.0, 0.8, 5, False),
    "sample": (1.0, None, None, True),
    "sample_tempered": (0.7, None, None, False),
    "sample_top_p": (1.3, 0.9, None, False),
    "sample_top_k": (0.5, None, 4, False),
    "sample_both": (1.0, 0.6, 3, True),
    "sample_both_filtered_conf": (2.0, 0.95, 7, False),
}


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(dtype)


def _uniforms(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed))


def _assert_same(got: tuple, want: tuple, tol: dict) -> None:
    x0, conf, commit = got
    assert x0.dtype == torch.int64 and conf.dtype == torch.float32 and commit.dtype == torch.bool
    assert torch.equal(x0, want[0]), f"x0 {x0.tolist()} != {want[0].tolist()}"
    torch.testing.assert_close(conf, want[1], **tol)
    assert torch.equal(commit, want[2]), f"commit {commit.tolist()} != {want[2].tolist()}"


def _both(logits: torch.Tensor, row_ids: torch.Tensor, n: torch.Tensor, **options) -> tuple[tuple, tuple]:
    return confident_select(logits, row_ids, n, **options), reference.confident_select(logits, row_ids, n, **options)


def _options(mode: str, kind: str, rows: int, threshold: float | None = None) -> dict:
    temperature, top_p, top_k, use_orig = MODES[mode]
    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "uniforms": _uniforms(rows) if temperature > 0 else None,
        "confidence": kind,
        "use_original_confidence": use_orig,
        "threshold": threshold,
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("vocab", VOCABS)
def test_matches_reference(vocab: int, mode: str, kind: str, dtype: torch.dtype, tol) -> None:
    row_ids = torch.tensor(ROW_IDS)
    rows = len(ROW_IDS)
    logits = _logits(rows, vocab, dtype)
    for coupled, n in ((True, torch.tensor([4])), (False, torch.tensor([1, 9, 2, 0, 3, 1]))):
        got, want = _both(logits, row_ids, n, batch_coupled=coupled, **_options(mode, kind, rows))
        _assert_same(got, want, tol(torch.float32))


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("coupled", [True, False])
def test_threshold(threshold: float, coupled: bool, tol) -> None:
    """Groups where something passes commit exactly those; the others fall back to their n."""
    row_ids = torch.tensor(ROW_IDS)
    logits = _logits(len(ROW_IDS), 151, torch.float32, seed=4, scale=6.0)
    n = torch.tensor([2]) if coupled else torch.tensor([2, 1, 1, 1, 2, 1])
    got, want = _both(logits, row_ids, n, batch_coupled=coupled, **_options("greedy", "plain", len(ROW_IDS), threshold))
    _assert_same(got, want, tol(torch.float32))
    conf, commit = want[1], want[2]
    if coupled and bool((conf > threshold).any()):
        assert torch.equal(commit, conf > threshold)


@pytest.mark.parametrize("mode", ["greedy", "sample", "sample_both", "sample_top_p", "sample_top_k"])
@pytest.mark.parametrize("kind", KINDS)
def test_dimple_vocabulary(mode: str, kind: str, tol) -> None:
    """One and three rows over Dimple-7B's 152064-token vocabulary (many 64-entry blocks, a partial last vector)."""
    for rows, dtype, scale in ((1, torch.float32, 2.0), (3, torch.bfloat16, 4.0)):
        logits = _logits(rows, BIG_VOCAB, dtype, seed=rows, scale=scale)
        row_ids, n = torch.zeros(rows, dtype=torch.int64), torch.tensor([2])
        got, want = _both(logits, row_ids, n, **_options(mode, kind, rows))
        _assert_same(got, want, tol(torch.float32))


def test_argmax_ties_take_lowest_id() -> None:
    logits = torch.zeros(4, 40)
    logits[0, [7, 3, 30]] = 5.0  # three maxima: 3 wins
    logits[1, [39, 20]] = 2.0  # one in the partial last vector of an AVX-512 row
    logits[2] = 1.0  # all equal: 0
    logits[3, [17, 33]] = -1.0  # minima don't matter: the max (0) first appears at 0
    for dtype in DTYPES:
        x0, _, _ = confident_select(logits.to(dtype), torch.arange(4), torch.tensor([0]))
        assert x0.tolist() == [3, 20, 0, 0]
        assert torch.equal(x0, reference.confident_select(logits.to(dtype), torch.arange(4), torch.tensor([0]))[0])


@pytest.mark.parametrize("kind", KINDS)
def test_confidence_ties_take_lowest_position(kind: str) -> None:
    """Identical rows have identical confidences: the fallback commits the lowest positions among them."""
    base = _logits(1, 151, torch.float32, seed=7, scale=4.0)
    weak = base * 0.2  # flatter: lower plain/margin/neg_entropy confidence
    logits = torch.cat([weak, base, weak, base, base, weak])  # (6, 151)
    row_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    got = confident_select(logits, row_ids, torch.tensor([2]), confidence=kind)
    assert got[2].tolist() == [False, True, False, True, False, False]
    assert torch.equal(got[2], reference.confident_select(logits, row_ids, torch.tensor([2]), confidence=kind)[2])
    per_row = confident_select(logits, row_ids, torch.tensor([1, 2]), confidence=kind, batch_coupled=False)
    assert per_row[2].tolist() == [False, True, False, True, True, False]


def test_one_hot_filtered_confidence_ties() -> None:
    """top_p = 0 keeps only the argmax: every filtered confidence is exactly 1, so selection is by position
    (the authors' benchmark setting, spec §4.9)."""
    logits = _logits(7, 151, torch.bfloat16, seed=3)
    x0, conf, commit = confident_select(
        logits, torch.zeros(7, dtype=torch.int64), torch.tensor([3]), top_p=0.0, use_original_confidence=False
    )
    assert torch.equal(conf, torch.ones(7)) and commit.tolist() == [True] * 3 + [False] * 4
    assert torch.equal(x0, logits.float().argmax(-1))


def test_top_p_ties_resolved_by_index() -> None:
    """Weights 4:2:2:2 (probabilities .4 .2 .2 .2), top_p = .5: the nucleus is {0} plus the lowest-index tie (1)."""
    logits = torch.log(torch.tensor([[2.0, 4.0, 2.0, 2.0], [2.0, 2.0, 2.0, 4.0]]))
    for u in (0.1, 0.5, 0.9, 0.999):
        options = {"temperature": 1.0, "top_p": 0.5, "uniforms": torch.tensor([u, u]), "use_original_confidence": False}
        x0, conf, _ = confident_select(
            logits, torch.tensor([0, 1]), torch.tensor([1, 1]), batch_coupled=False, **options
        )
        want = reference.confident_select(
            logits, torch.tensor([0, 1]), torch.tensor([1, 1]), batch_coupled=False, **options
        )
        # The kept weights in id order: row 0 {0: 1/3, 1: 2/3}, row 1 {0: 1/3, 3: 2/3} (ids 2 and 3 / 1 and 2 dropped).
        first = u < 1 / 3
        assert x0.tolist() == ([0, 0] if first else [1, 3]) and torch.equal(x0, want[0])
        torch.testing.assert_close(conf, torch.full((2,), 1 / 3 if first else 2 / 3))


def test_top_k_keeps_every_tie_at_the_kth_value() -> None:
    """top_k = 2 over [3, 1, 1, 1, 0]: the k-th value 1 is tied three times, all kept (mass e^0 + 3·e^-2)."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    for u, expected in ((0.0, 0), (0.99, 3)):
        options = {"temperature": 1.0, "top_k": 2, "uniforms": torch.tensor([u]), "use_original_confidence": False}
        x0, conf, _ = confident_select(logits, torch.tensor([0]), torch.tensor([1]), **options)
        assert x0.item() == expected
        w = torch.exp(logits[0] - 3.0)[:4]
        torch.testing.assert_close(conf, (w[expected] / w.sum()).reshape(1))


def test_commit_counts() -> None:
    """n = 0 commits nothing, n beyond the group commits all of it; threshold <= 0 means off."""
    logits = _logits(5, 17, torch.float32, seed=9)
    row_ids = torch.tensor([0, 0, 1, 1, 1])
    _, _, commit = confident_select(logits, row_ids, torch.tensor([0, 7]), batch_coupled=False, threshold=0.0)
    assert commit.tolist() == [False, False, True, True, True]
    _, _, commit = confident_select(logits, row_ids, torch.tensor([99]))
    assert commit.all()


def test_matches_authors_semantics_on_fp32() -> None:
    """On fp32 logits without ties, greedy choices and confidences equal sampling.sample_tokens' (the authors'
    composite), for every confidence kind and both confidence sources."""
    logits = _logits(9, 151, torch.float32, seed=11)
    for kind, use_orig, top_p, top_k in (
        ("plain", True, None, None),
        ("plain", False, 0.7, 5),
        ("margin", True, None, None),
        ("margin", False, None, 3),
        ("neg_entropy", True, None, None),
        ("neg_entropy", False, 0.9, None),
    ):
        conf_ref, x0_ref = sample_tokens(
            logits,
            top_p=top_p,
            top_k=top_k,
            margin_confidence=kind == "margin",
            neg_entropy=kind == "neg_entropy",
            use_original_confidence=use_orig,
        )
        x0, conf, _ = confident_select(
            logits, torch.zeros(9, dtype=torch.int64), torch.tensor([1]), top_p=top_p, top_k=top_k,
            confidence=kind, use_original_confidence=use_orig,
        )  # fmt: skip
        assert torch.equal(x0, x0_ref)
        torch.testing.assert_close(conf, conf_ref, atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_distribution() -> None:
    """The inverse CDF with evenly spread uniforms reproduces the softmax probabilities."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    rows = 4000
    u = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    x0, _, _ = confident_select(logits.expand(rows, 5), torch.zeros(rows, dtype=torch.int64), torch.tensor([1]),
                                temperature=1.0, uniforms=u)  # fmt: skip
    freq = torch.bincount(x0, minlength=5).float() / rows
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype: torch.dtype, tol) -> None:
    """Rows with a stride (cut from a wider buffer), a strided vocabulary (a transpose), sliced index tensors."""
    rows, vocab = len(ROW_IDS), 151
    wide = _logits(rows, vocab + 9, dtype, seed=5)[:, 4 : vocab + 4]
    transposed = _logits(vocab, rows, dtype, seed=6).t()
    row_ids = torch.tensor([x for r in ROW_IDS for x in (r, -1)])[::2]
    n = torch.tensor([2, 0, 1, 0, 3, 0, 1, 0, 1, 0, 2, 0])[::2]
    u = torch.rand(2 * rows, generator=torch.Generator().manual_seed(2))[::2]
    for logits in (wide, transposed):
        assert not logits.is_contiguous() and not row_ids.is_contiguous() and not u.is_contiguous()
        for mode in ("greedy", "sample_both_filtered_conf"):
            options = _options(mode, "plain", rows)
            options["uniforms"] = u if options["uniforms"] is not None else None
            got, want = _both(logits, row_ids, n, batch_coupled=False, **options)
            _assert_same(got, want, tol(torch.float32))


def test_negative_infinity_logits(tol) -> None:
    """-inf entries (a logits hook banning tokens) have probability 0 and are never drawn."""
    logits = _logits(3, 40, torch.float32, seed=8)
    logits[:, ::2] = float("-inf")
    logits[2, :39] = float("-inf")  # only the last entry is allowed
    for mode in MODES:
        for kind in KINDS:
            got, want = _both(logits, torch.arange(3), torch.tensor([1]), **_options(mode, kind, 3))
            _assert_same(got, want, tol(torch.float32))
            assert bool(torch.isfinite(logits[torch.arange(3), got[0]]).all())
    assert confident_select(logits, torch.arange(3), torch.tensor([1]))[0][2].item() == 39
    # Over several 2048-entry chunks of the fused greedy pass: whole chunks of -inf first, the maximum rising late.
    long = _logits(2, 7000, torch.float32, seed=9)
    long[0, :4500] = float("-inf")
    long[1, 6999] = 50.0
    for kind in KINDS:
        got, want = _both(long, torch.arange(2), torch.tensor([1]), confidence=kind)
        _assert_same(got, want, tol(torch.float32))


def test_nan_logits_rejected() -> None:
    logits = _logits(2, 3000, torch.float32)
    logits[1, 2500] = float("nan")
    for options in ({}, {"temperature": 1.0, "uniforms": _uniforms(2)}):
        with pytest.raises(ValueError, match="row 1 has no finite maximum"):
            confident_select(logits, torch.arange(2), torch.tensor([1]), **options)


def test_empty() -> None:
    x0, conf, commit = confident_select(torch.zeros(0, 17), torch.zeros(0, dtype=torch.int64), torch.tensor([3]))
    assert x0.shape == conf.shape == commit.shape == (0,)


def _opcheck_samples() -> list[tuple[tuple, dict]]:
    logits = _logits(6, 37, torch.float32, seed=2)
    row_ids = torch.tensor([0, 0, 1, 1, 1, 3])
    return [
        ((logits, row_ids, torch.tensor([2])), {}),
        ((logits.bfloat16(), row_ids, torch.tensor([1, 2, 0, 1])), {"batch_coupled": False, "threshold": 0.2}),
        (
            (logits, row_ids, torch.tensor([3])),
            {"temperature": 0.8, "top_p": 0.9, "top_k": 5, "uniforms": _uniforms(6), "confidence": "margin"},
        ),
        (
            (logits, row_ids, torch.tensor([1])),
            {
                "temperature": 1.0,
                "uniforms": _uniforms(6),
                "confidence": "neg_entropy",
                "use_original_confidence": False,
            },
        ),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample: int) -> None:
    args, kwargs = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.dimple_rt.confident_select.default, args, kwargs)


def test_torch_compile() -> None:
    logits = _logits(6, 37, torch.float32, seed=2)
    row_ids = torch.tensor([0, 0, 1, 1, 1, 3])
    u = _uniforms(6)

    def step(logits, row_ids, n, u):
        x0, conf, commit = confident_select(logits * 1.5, row_ids, n, temperature=0.9, top_k=8, uniforms=u)
        return torch.where(commit, x0, -1), conf

    validate_args = torch.distributions.Distribution._validate_args
    try:
        compiled = torch.compile(step, fullgraph=True)
        got, want = compiled(logits, row_ids, torch.tensor([3]), u), step(logits, row_ids, torch.tensor([3]), u)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate_args)


def _bad(**changes) -> dict:
    args = {
        "logits": _logits(4, 10, torch.float32),
        "row_ids": torch.tensor([0, 0, 1, 2]),
        "n": torch.tensor([1]),
        "temperature": 0.0,
    }
    args.update(changes)
    return args


BAD_INPUTS = {
    "logits_rank": (_bad(logits=torch.zeros(4)), ValueError, "logits must be 2-D"),
    "logits_dtype": (_bad(logits=torch.zeros(4, 10, dtype=torch.float64)), TypeError, "logits must be float32"),
    "empty_vocab": (_bad(logits=torch.zeros(4, 0)), ValueError, "vocabulary of at least 1"),
    "row_ids_shape": (_bad(row_ids=torch.tensor([0, 0, 1])), ValueError, r"row_ids must be \(N=4,\)"),
    "row_ids_dtype": (_bad(row_ids=torch.tensor([0, 0, 1, 2], dtype=torch.int32)), TypeError, "row_ids must be int64"),
    "row_ids_order": (_bad(row_ids=torch.tensor([0, 1, 0, 2])), ValueError, "row_ids must be non-decreasing"),
    "row_ids_negative": (_bad(row_ids=torch.tensor([-1, 0, 1, 2])), ValueError, "row_ids must be non-decreasing"),
    "row_ids_past_n": (
        _bad(n=torch.tensor([1, 1]), batch_coupled=False),
        ValueError,
        r"row_ids\[3\] = 2 has no entry in n",
    ),
    "n_rank": (_bad(n=torch.tensor(1)), ValueError, r"n must be 1-D \(groups,\)"),
    "n_coupled": (_bad(n=torch.tensor([1, 2, 3])), ValueError, r"n must be \(1,\) when batch_coupled"),
    "n_dtype": (_bad(n=torch.tensor([1.0])), TypeError, "n must be int64"),
    "n_negative": (_bad(n=torch.tensor([-1])), ValueError, "n must be >= 0"),
    "temperature": (_bad(temperature=-0.5), ValueError, "temperature must be >= 0"),
    "temperature_nan": (_bad(temperature=math.nan), ValueError, "temperature must be >= 0"),
    "top_p": (_bad(top_p=1.5), ValueError, r"top_p must be in \[0, 1\]"),
    "top_k": (_bad(top_k=0), ValueError, "top_k must be >= 1"),
    "kind": (_bad(confidence="entropy"), ValueError, "confidence must be one of"),
    "no_uniforms": (_bad(temperature=1.0), ValueError, "uniforms .* are required when temperature > 0"),
    "uniforms_shape": (_bad(temperature=1.0, uniforms=torch.rand(3)), ValueError, r"uniforms must be \(N=4,\)"),
    "uniforms_dtype": (_bad(temperature=1.0, uniforms=torch.rand(4).double()), TypeError, "uniforms must be float32"),
    "uniforms_range": (
        _bad(temperature=1.0, uniforms=torch.tensor([0.1, 1.0, 0.2, 0.3])),
        ValueError,
        r"uniforms must be in \[0, 1\)",
    ),
    "no_finite_max": (
        _bad(logits=torch.full((4, 10), float("-inf"))),
        ValueError,
        "finite maximum",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case: str) -> None:
    args, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        confident_select(**args)
    with pytest.raises(error, match=message):  # the reference rejects it the same way
        reference.confident_select(**args)


if st is None:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install '.[test]')")
    def test_random_calls() -> None:
        pass

else:

    @st.composite
    def _random_call(draw: st.DrawFn) -> dict:
        """Random sizes, strides, dtypes, ties, -inf entries and options; sometimes an invalid combination."""
        rows = draw(st.integers(0, 10))
        vocab = draw(st.integers(1, 200))
        dtype = draw(st.sampled_from(DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        scale = draw(st.sampled_from([0.5, 3.0, 20.0, 1e30]))  # 1e30: logits / temperature can overflow fp32
        layout = draw(st.sampled_from(["contiguous", "row_stride", "transposed"]))
        if layout == "row_stride":
            logits = torch.randn(rows, vocab + 5, generator=g)[:, 2 : vocab + 2]
        elif layout == "transposed":
            logits = torch.randn(vocab, rows, generator=g).t()
        else:
            logits = torch.randn(rows, vocab, generator=g)
        logits = logits * scale
        if draw(st.booleans()):  # coarse values: many ties in logits and in confidences
            logits = logits.round()
        if rows and vocab > 1 and draw(st.booleans()):
            logits[:, :: draw(st.integers(2, 5))] = float("-inf")
        logits = logits.to(dtype)
        if rows > 1 and draw(st.booleans()):  # duplicated rows: exact confidence ties
            logits[-1] = logits[0]

        steps = sorted(draw(st.lists(st.integers(0, 2), min_size=rows, max_size=rows)))
        row_ids = torch.tensor(steps, dtype=torch.int64).cumsum(0) if rows else torch.zeros(0, dtype=torch.int64)
        if rows > 1 and draw(st.integers(0, 9)) == 0:
            row_ids = row_ids.flip(0)  # decreasing: must raise
        batch_coupled = draw(st.booleans())
        groups = (
            1 if batch_coupled else (int(row_ids.max()) + 1 if rows else 1) + draw(st.sampled_from([0, 0, 0, 1, -1]))
        )
        n = torch.randint(-1 if draw(st.integers(0, 9)) == 0 else 0, 6, (max(groups, 1),), generator=g)
        # tiny temperatures overflow logits / temperature (the (z − max z) / T rows); NaN, < 0, 0 or inf in fp32
        # must raise in both
        temperature = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.7, 1e-39, 1e-20, 1e-45, math.nan, -1.0, 1e-50, 1e39]))
        uniforms = torch.rand(rows, generator=g) if temperature > 0 or draw(st.booleans()) else None
        if temperature > 0 and draw(st.integers(0, 9)) == 0:
            uniforms = None  # must raise
        if uniforms is not None and draw(st.integers(0, 19)) == 0:
            uniforms[0:1] = draw(st.sampled_from([math.nan, 1.0, -0.5]))  # out of [0, 1): must raise when sampling
        args = {
            "logits": logits,
            "row_ids": row_ids,
            "n": n,
            "temperature": temperature,
            "top_p": draw(st.sampled_from([None, None, 0.0, 0.3, 0.9, 1.0])),
            "top_k": draw(st.sampled_from([None, None, 1, 3, 500])),
            "uniforms": uniforms,
            "confidence": draw(st.sampled_from(KINDS)),
            "use_original_confidence": draw(st.booleans()),
            "threshold": draw(st.sampled_from([None, None, 0.0, 0.2, 0.9, math.nan])),
            "batch_coupled": batch_coupled,
        }
        if draw(st.integers(0, 9)) == 0:  # one argument on the meta device: both must raise (ValueError)
            name = draw(st.sampled_from([n for n in ("logits", "row_ids", "n", "uniforms") if args[n] is not None]))
            args[name] = args[name].to("meta")
        return args

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(args=_random_call())
    def test_random_calls(args: dict, tol) -> None:
        """Any call gives exactly the reference's decisions or raises the Python exception the reference raises."""
        try:
            want = reference.confident_select(**args)
        except (ValueError, TypeError) as e:
            with pytest.raises(type(e)):
                confident_select(**args)
            return
        _assert_same(confident_select(**args), want, tol(torch.float32))


def test_vocabulary_over_2_pow_24_is_rejected() -> None:
    """The CPU kernel keeps token ids as floats in its vector lanes (exact below 2^24): larger must fail by name."""
    logits = torch.zeros(1, 2**24, dtype=torch.bfloat16)  # 32 MB
    with pytest.raises(ValueError, match="vocabulary sizes up to 2\\^24"):
        confident_select(logits, torch.zeros(1, dtype=torch.long), torch.tensor([1]))
