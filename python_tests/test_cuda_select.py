# SPDX-License-Identifier: Apache-2.0
"""The CUDA confident_select against dimple_rt.reference on the cases its design makes risky.

The kernel (csrc/cuda/kernels/confident_select.cuh) splits a row's vocabulary across blocks when the rows alone
underfill the GPU, locates the top-p cut with fixed-point histograms before an exact fp64 check, draws with a
segmented block scan, fuses the commit into the last row's block for small batches, and raises the CPU op's
value errors after one device-to-host copy. Each test below aims at one of those: -inf rows and whole -inf
vocabulary chunks, non-contiguous and misaligned logits, the CPU op's error texts, split boundaries, the sampled
distribution for a grid of uniforms, and grids past 65535 rows / groups. Decisions (x0, commit) must equal the
reference's; confidences agree to the fp32 tolerance. Skipped without a GPU or without the CUDA kernels.
"""

from __future__ import annotations

import math

import pytest
import test_confident_select as tcs
import torch
from _cuda import CUDA_ONLY, DEVICE

from dimple_rt import ops, reference

pytestmark = CUDA_ONLY
# Modes that reach each kernel path: the one-pass greedy, the rows kernel with/without each filter.
PATH_MODES = ["greedy", "greedy_filtered_conf", "sample", "sample_top_p", "sample_top_k", "sample_both"]


def _cuda(options: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def _check(logits: torch.Tensor, row_ids: torch.Tensor, n: torch.Tensor, tol: dict, **options) -> tuple:
    """Runs the CUDA op on ``logits`` (already on the GPU, any layout) and compares with the CPU reference."""
    got = ops.confident_select(logits, row_ids.to(DEVICE), n.to(DEVICE), **_cuda(options))
    got = tuple(t.cpu() for t in got)
    want = reference.confident_select(logits.cpu(), row_ids, n, **options)
    assert bool(((got[0] >= 0) & (got[0] < logits.shape[1])).all()), "an id outside the vocabulary"
    tcs._assert_same(got, want, tol)
    return got


@pytest.mark.parametrize("mode", PATH_MODES)
@pytest.mark.parametrize("kind", tcs.KINDS)
def test_neg_inf_entries_and_chunks(mode: str, kind: str, tol) -> None:
    """Strided -inf entries, and -inf over whole split-sized chunks (a split block that sees only -inf must not
    turn into NaN in the combine), including the first and the last chunk of a row."""
    rows, vocab = 3, tcs.BIG_VOCAB
    logits = tcs._logits(rows, vocab, torch.bfloat16, seed=11, scale=3.0)
    logits[0, ::3] = float("-inf")
    logits[1, : vocab // 2] = float("-inf")  # the first half: every early split sees only -inf
    logits[2, 8192:] = float("-inf")  # everything past the first chunk
    logits[2, 100] = 50.0
    _check(
        logits.to(DEVICE),
        torch.zeros(rows, dtype=torch.long),
        torch.tensor([1]),
        tol(torch.float32),
        **tcs._options(mode, kind, rows),
    )


@pytest.mark.parametrize("mode", PATH_MODES)
def test_non_contiguous_and_misaligned_logits(mode: str, tol) -> None:
    """Row strides, a transposed (copied) view, and rows starting 1-3 elements past a 16-byte boundary (the
    scalar head before the vector loads), for every dtype."""
    rows, vocab = 5, 4099
    for dtype in tcs.DTYPES:
        base = tcs._logits(rows, vocab + 16, dtype, seed=3).to(DEVICE)
        options = tcs._options(mode, "margin", rows)
        for offset in (0, 1, 2, 3):
            _check(
                base[:, offset : offset + vocab],
                torch.zeros(rows, dtype=torch.long),
                torch.tensor([2]),
                tol(torch.float32),
                **options,
            )
        _check(
            base[::2, :vocab],
            torch.zeros(3, dtype=torch.long),
            torch.tensor([2]),
            tol(torch.float32),
            **tcs._options(mode, "plain", 3),
        )
        transposed = base[:, :vocab].t().contiguous().t()
        _check(transposed, torch.zeros(rows, dtype=torch.long), torch.tensor([2]), tol(torch.float32), **options)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all_-inf"])
@pytest.mark.parametrize("sampled", [False, True])
def test_nonfinite_rows_raise_the_cpu_error(bad, sampled: bool) -> None:
    """A row without a finite maximum raises the CPU op's exact ValueError on every path; with several such rows
    it names the lowest, as the reference does."""
    logits = torch.randn(4, 40000)
    for r in (2, 3):
        if bad == "all_-inf":
            logits[r] = float("-inf")
        else:
            logits[r, 7 + 9000 * r] = bad
    options = {"temperature": 0.7, "uniforms": torch.rand(4), "top_k": 5} if sampled else {}
    row_ids, n = torch.zeros(4, dtype=torch.long), torch.tensor([1])
    with pytest.raises(ValueError) as cpu:
        ops.confident_select(logits[:3], row_ids[:3], n, **{**options, **_first3(options)})
    with pytest.raises(ValueError) as ref:
        reference.confident_select(logits, row_ids, n, **options)
    assert _first_line(cpu.value) == _first_line(ref.value)  # the CPU op and the reference agree on the text
    with pytest.raises(ValueError) as gpu:
        ops.confident_select(logits.to(DEVICE), row_ids.to(DEVICE), n.to(DEVICE), **_cuda(options))
    assert _first_line(gpu.value) == _first_line(ref.value)
    assert "logits row 2 has no finite maximum" in _first_line(gpu.value)


def _first3(options: dict) -> dict:
    return {k: v[:3] for k, v in options.items() if isinstance(v, torch.Tensor)}


def _first_line(err: BaseException) -> str:
    return str(err).split("\n")[0]


VALUE_CASES = {
    "row_ids_order": {"row_ids": torch.tensor([0, 1, 0, 2])},
    "row_ids_negative": {"row_ids": torch.tensor([-1, 0, 1, 2])},
    "row_ids_past_n": {"n": torch.tensor([1, 1]), "batch_coupled": False},
    "n_negative": {"n": torch.tensor([-1])},
    "n_negative_later_group": {"n": torch.tensor([1, 1, -3]), "batch_coupled": False},
    "uniforms_range": {"temperature": 1.0, "uniforms": torch.tensor([0.1, 1.0, 0.2, -0.5])},
    "uniforms_nan": {"temperature": 1.0, "uniforms": torch.tensor([0.1, 0.2, math.nan, 0.3])},
    "empty_rows_negative_n": {
        "logits": torch.zeros(0, 10),
        "row_ids": torch.zeros(0, dtype=torch.long),
        "n": torch.tensor([-2]),
    },
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_value_checks_same_text_as_cpu(case: str) -> None:
    """The checks of tensor values that the CPU op makes on the host: the same ValueError text on the GPU."""
    args = {"logits": torch.randn(4, 10), "row_ids": torch.tensor([0, 0, 1, 2]), "n": torch.tensor([1])}
    args.update(VALUE_CASES[case])
    with pytest.raises(ValueError) as cpu:
        ops.confident_select(**args)
    with pytest.raises(ValueError) as gpu:
        ops.confident_select(**_cuda(args))
    assert _first_line(gpu.value) == _first_line(cpu.value)


def test_graph_capture_marks_bad_rows() -> None:
    """Under CUDA graph capture the values cannot be read back: a bad row gets an in-vocabulary id and a NaN
    confidence, the others are exact, and replays recompute from the captured buffers."""
    logits = tcs._logits(3, 5000, torch.float32, seed=5).to(DEVICE)
    row_ids, n = torch.zeros(3, dtype=torch.long, device=DEVICE), torch.tensor([1], device=DEVICE)
    ops.confident_select(logits, row_ids, n)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x0, conf, commit = ops.confident_select(logits, row_ids, n)
    logits[1, 17] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    assert bool(((x0 >= 0) & (x0 < 5000)).all()) and bool(conf[1].isnan())
    want = reference.confident_select(logits[[0, 2]].cpu(), row_ids[:2].cpu(), n.cpu())
    assert torch.equal(x0[[0, 2]].cpu(), want[0])
    assert not bool(commit[1])  # NaN ranks last


def _split_edges(rows: int, vocab: int, dtype: torch.dtype) -> list[int]:
    """The first index of every split block but the first, as csrc/cuda/confident_select.cu's vocab_splits()
    chooses them for a contiguous row (4 blocks per SM, >= 512 16-byte vectors per split). Mirrors its constants:
    if they change, the test still passes but probes other positions."""
    per_vec = 16 // torch.tensor([], dtype=dtype).element_size()
    nvec = vocab // per_vec
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    splits = max(1, min(-(-4 * sms // rows), nvec // 512))
    per_split = -(-nvec // splits)
    return [j * per_split * per_vec for j in range(1, splits)]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", tcs.DTYPES, ids=str)
def test_split_vocabulary_boundaries(rows: int, dtype: torch.dtype, tol) -> None:
    """Maxima on both sides of every split boundary, and at the first and last entries, with a tie in another
    split (the combine keeps the lowest id) and the second largest in a third (margin, with multiplicity)."""
    vocab = tcs.BIG_VOCAB + 3  # a scalar tail after the last vector
    edges = _split_edges(rows, vocab, dtype)
    assert rows > 1 or len(edges) > 8, "one row of Dimple's vocabulary must be split"
    spots = sorted({0, 1, vocab - 2, vocab - 1, *(e + d for e in edges for d in (-1, 0))})
    logits = tcs._logits(rows, vocab, dtype, seed=rows, scale=1.0).to(DEVICE)
    row_ids = torch.zeros(rows, dtype=torch.long)
    for j, e in enumerate(spots):
        trial = logits.clone()
        trial[:, e] = 20.0
        trial[0, spots[(j + 7) % len(spots)]] = 20.0  # a tie in another split: the lower id wins
        trial[-1, spots[(j + 3) % len(spots)]] = 19.0  # the second largest elsewhere
        _check(trial, row_ids, torch.tensor([1]), tol(torch.float32), confidence="margin")


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1.0},
        {"temperature": 0.6, "top_p": 0.9},
        {"temperature": 1.7, "top_k": 40},
        {"temperature": 0.8, "top_p": 0.7, "top_k": 20},
        {"temperature": 1.0, "top_p": 0.35},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("ties", [False, True])
def test_sampling_distribution_matches_reference(options: dict, ties: bool, tol) -> None:
    """The inverse-CDF draw for a grid of uniforms: every draw equals the reference's, and the draws' frequencies
    are the filtered distribution's probabilities (to the grid's resolution). With ties (rounded logits) the
    top-p cut falls inside a level of equal values and keeps a prefix of it in index order."""
    draws, vocab = 2048, 3000
    base = tcs._logits(1, vocab, torch.float32, seed=21, scale=2.5)
    if ties:
        base = base.round()
    logits = base.expand(draws, vocab).contiguous()
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5).div(draws).float()
    row_ids = torch.zeros(draws, dtype=torch.long)
    got = _check(
        logits.to(DEVICE),
        row_ids,
        torch.tensor([3]),
        tol(torch.float32),
        uniforms=uniforms,
        use_original_confidence=False,
        **options,
    )
    probs = _filtered_probs(base[0], options)
    freq = torch.bincount(got[0], minlength=vocab).double() / draws
    assert float((freq - probs).abs().max()) <= 2.0 / draws


def _filtered_probs(z: torch.Tensor, options: dict) -> torch.Tensor:
    """The reference's filtered distribution for one row (top-p by rank with ties by index, then top-k)."""
    zt = z / options["temperature"]
    w = torch.exp(zt - zt.max()).double()
    keep = torch.ones_like(w, dtype=torch.bool)
    if options.get("top_p") is not None:
        order = torch.sort(zt, descending=True, stable=True).indices
        before = torch.cat([torch.zeros(1, dtype=w.dtype), torch.cumsum(w[order], 0)[:-1]])  # exclusive, exact
        keep = torch.zeros_like(keep).scatter_(0, order, before <= options["top_p"] * w.sum())
    if options.get("top_k") is not None:
        keep &= zt >= torch.topk(zt, options["top_k"]).values[-1]
    wk = torch.where(keep, w, torch.zeros_like(w))
    return wk / wk.sum()


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("mode", ["greedy", "sample_both"])
def test_huge_row_counts(coupled: bool, mode: str, tol) -> None:
    """66000 rows (past the 65535 limit of gridDim.y/z) and, per row, 66000 groups: rows live in gridDim.x, the
    commit is the unfused per-group kernel, and a group of 66000 rows ranks by radix select."""
    rows, vocab = 66000, 24
    logits = tcs._logits(rows, vocab, torch.float16, seed=8)
    if coupled:
        row_ids, n = torch.zeros(rows, dtype=torch.long), torch.tensor([1234])
    else:
        row_ids = torch.arange(rows)  # one row per group
        n = torch.randint(0, 2, (rows,), generator=torch.Generator().manual_seed(0))
    options = tcs._options(mode, "margin", rows, threshold=0.99)
    _check(logits.to(DEVICE), row_ids, n, tol(torch.float32), batch_coupled=coupled, **options)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("mode", PATH_MODES)
def test_dimple_vocabulary_row_counts(rows: int, mode: str, tol) -> None:
    """Dimple-7B's vocabulary at row counts of a decoding step (1 row: the most splits; 64: a few per row),
    threshold and fallback commits, fused (one group) and per-row groups (9 groups: unfused)."""
    logits = tcs._logits(rows, tcs.BIG_VOCAB, torch.bfloat16, seed=rows, scale=3.0).to(DEVICE)
    ids = torch.arange(rows) * 9 // rows
    coupled = (True, torch.zeros(rows, dtype=torch.long), torch.tensor([3]))
    per_row = (False, ids, torch.tensor([1, 0, 2, 1, 3, 0, 1, 2, 1]))
    for (batch_coupled, row_ids, n), threshold in ((coupled, None), (coupled, 0.5), (per_row, 0.5)):
        options = tcs._options(mode, "plain", rows, threshold)
        _check(logits, row_ids, n, tol(torch.float32), batch_coupled=batch_coupled, **options)
