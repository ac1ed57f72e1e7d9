# SPDX-License-Identifier: Apache-2.0
"""Commit schedules of the 'dim' and 'dream' pipelines (Dimple spec §4.5, §4.6, §4.8, §4.9, §9 item 8).

The oracle for whole schedules is an exact-rational transcription of the spec's formulas: for these (N, steps)
every N·(1 − s/t) lies at least 1e-3 away from an integer and every ratio at least 7e-6 away from a timestep,
far above float32 rounding, so float32 and exact arithmetic agree. Worked numbers are the spec's, by hand.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dimple_rt.config import GenerationConfig
from dimple_rt.generation.schedule import (
    StepInputs,
    dim_fallback_count,
    dim_step,
    dream_count,
    dream_preselect,
    dream_step,
    masked_row_ids,
    timesteps,
)

BF16 = torch.bfloat16
DIM_CASES = [(64, 64), (128, 128), (64, 16), (8, 8)]
ALL_ALGS = ["origin", "origin-ratio", "autoregressive", "maskgit_plus", "topk_margin", "entropy"]


def exact_timesteps(steps: int) -> list[Fraction]:
    return [1 - Fraction(k, steps) * (1 - Fraction(1, 1000)) for k in range(steps + 1)]


def oracle_dim_counts(n_total: int, steps: int) -> list[int]:
    """Spec §4.5 step 3, no threshold, one sequence, in exact arithmetic."""
    ts = exact_timesteps(steps)
    n_cur, counts = n_total, []
    for i in range(steps):
        if n_cur == 0:
            break
        ratio = Fraction(n_cur, n_total)
        first = min(k for k in range(steps + 1) if ts[k] < ratio)
        for k in range(max(first, i + 1), steps + 1):
            n = math.floor(n_cur * (1 - ts[k] / ratio)) if k < steps else n_cur
            if n >= 1:
                break
        counts.append(n)
        n_cur -= n
    return counts


def step(i: int, ts: torch.Tensor, alg: str = "origin", **options: object) -> tuple[StepInputs, GenerationConfig]:
    """Step ``i`` of ``ts`` and the options of a request decoding with ``alg``: batch-coupled (the authors'
    decisions) and without a threshold unless ``options`` say otherwise."""
    options = {"threshold": None, "batch_coupled": True, **options}
    return StepInputs(i, ts), GenerationConfig(alg=alg, **options)  # type: ignore[arg-type]


def per_row(options: GenerationConfig) -> GenerationConfig:
    """The same options with per-sequence decisions."""
    return dataclasses.replace(options, batch_coupled=False)


def rows(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in enumerate(lengths)])


def conf(values: list[float]) -> torch.Tensor:
    t = torch.tensor(values, dtype=BF16)
    assert t.float().tolist() == values, "test confidences must be exact bf16 values"
    return t


def test_timesteps() -> None:
    ts = timesteps(64)
    assert ts.dtype == torch.float32 and ts.shape == (65,)
    assert ts[0].item() == 1.0 and ts[-1].item() == torch.tensor(1e-3, dtype=torch.float32).item()


def test_dim_worked_numbers_64_64() -> None:
    ts = timesteps(64)
    # Step 0: k=1 gives int(64·0.015609375 = 0.999) = 0, k=2 gives int(1.998) = 1.
    assert dim_fallback_count(64, 64, 0, ts, 64) == (1, ts[2].item(), 1.0)
    # Step 1: ratio 63/64 = 0.984375 is below timesteps[1] = 0.984390625, so k starts at 2 (0 tokens), then 3.
    assert ts[1].item() > 0.984375 > ts[2].item()
    assert dim_fallback_count(63, 64, 1, ts, 64) == (1, ts[3].item(), 0.984375)


def test_dim_worked_numbers_64_16() -> None:
    ts = timesteps(16)
    # k=1: 64·(1 − 0.9375625) = 3.996 → 3 tokens at once.
    assert dim_fallback_count(64, 64, 0, ts, 16) == (3, ts[1].item(), 1.0)


def test_dim_fallback_raises_when_ratio_reaches_eps() -> None:
    with pytest.raises(ValueError, match="ratio"):
        dim_fallback_count(1, 2000, 5, timesteps(64), 64)  # 1/2000 ≤ eps, as in the reference


@pytest.mark.parametrize(("n_total", "steps"), DIM_CASES)
def test_dim_fallback_schedule(n_total: int, steps: int) -> None:
    ts = timesteps(steps)
    expected = oracle_dim_counts(n_total, steps)
    n_cur, counts = n_total, []
    for i in range(steps):
        if n_cur == 0:
            break
        n, s, t = dim_fallback_count(n_cur, n_total, i, ts, steps)
        assert t == pytest.approx(n_cur / n_total, rel=1e-6) and s in ts.tolist()
        counts.append(n)
        n_cur -= n
        # Never behind the linear schedule by a whole token once the step is done.
        assert n_cur < n_total * ts[i + 1].item() + 1 + 1e-3
    assert counts == expected
    assert all(n >= 1 for n in counts)
    assert sum(counts) == n_total and len(counts) <= steps
    if n_total == steps:
        # One token per step until N_cur = 2 at step N−2: ratio 2/N lies below timesteps[N−1] only, where
        # 2·(1 − s/t) = 1.001 − 0.001·N < 1, so k moves on to the last timestep and both are committed.
        assert counts == [1] * (n_total - 2) + [2]


def test_dim_step_commits_the_fallback_count() -> None:
    n_total, steps = 64, 16
    ts = timesteps(steps)
    confidence = torch.linspace(0.1, 0.9, n_total).to(BF16)
    alive = torch.ones(n_total, dtype=torch.bool)
    for i, n in enumerate(oracle_dim_counts(n_total, steps)):
        c = confidence[alive]
        selected = dim_step(c, torch.zeros_like(c, dtype=torch.long), [n_total], *step(i, ts, "maskgit_plus"))
        assert int(selected.sum()) == n
        alive[alive.nonzero()[:, 0][selected]] = False
    assert not alive.any()


def test_threshold_is_strict_in_bf16() -> None:
    ts = timesteps(8)
    c = conf([0.94921875, 0.953125, 0.5])
    for threshold in (0.95, 0.949):  # both round to bf16 0.94921875, which does not pass itself
        inputs = step(0, ts, "maskgit_plus", threshold=threshold)
        assert dim_step(c, rows(3), [3], *inputs).tolist() == [False, True, False]


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_last_step(alg: str) -> None:
    ts, row_ids, totals = timesteps(8), rows(3, 2), [6, 4]
    c = conf([0.5, 0.25, 0.75, 0.125, 0.0625])
    last = step(7, ts, alg)
    expected = [True, False, False, True, False] if alg == "autoregressive" else [True] * 5
    assert dim_step(c, row_ids, totals, *last).tolist() == expected
    assert dim_step(c, row_ids, totals, *step(7, ts, alg, threshold=0.9)).tolist() == [True] * 5
    if alg in ("maskgit_plus", "topk_margin", "entropy"):
        assert dim_step(c, row_ids, totals, *step(7, ts, alg, alg_temp=0.5)).tolist() == [True] * 5


def test_autoregressive_commits_the_leftmost_mask_per_row() -> None:
    c = conf([0.5, 0.25, 0.75, 0.125, 0.0625])
    selected = dim_step(c, rows(3, 2), [3, 2], *step(0, timesteps(8), "autoregressive"))
    assert selected.tolist() == [True, False, False, True, False]


def test_entropy_never_passes_a_positive_threshold() -> None:
    # Negative entropies (one exactly 0); steps=2: the fallback commits int(3·0.4995) = 1, the largest.
    c = conf([-0.5, 0.0, -2.0])
    with pytest.warns(UserWarning, match="never exceeds a positive threshold"):
        inputs = step(0, timesteps(2), "entropy", threshold=0.01)
    selected = dim_step(c, rows(3), [3], *inputs)
    assert selected.tolist() == [False, True, False]


def test_topk_ties_go_to_the_lowest_index() -> None:
    # steps=2, N=5: n = int(5·0.4995) = 2 out of three tied 0.75s.
    c = conf([0.5, 0.75, 0.75, 0.75, 0.25])
    selected = dim_step(c, rows(5), [5], *step(0, timesteps(2), "maskgit_plus"))
    assert selected.tolist() == [False, True, True, False, False]


def test_batch_coupled_vs_per_sequence_threshold() -> None:
    # Rows of 3 and 2 masks, steps=4, threshold 0.9 (bf16 0.8984375). Only 0.96875 passes.
    c, row_ids, totals = conf([0.5, 0.96875, 0.25, 0.5, 0.75]), rows(3, 2), [3, 2]
    inputs = step(0, timesteps(4), "maskgit_plus", threshold=0.9)
    # Coupled: something passed somewhere in the batch, so row 1 commits nothing.
    assert dim_step(c, row_ids, totals, *inputs).tolist() == [False, True, False, False, False]
    # Per sequence: row 1 falls back; N=2, k=1: 0.4995 → 0, k=2: 0.999 → 0, k=3: 1.4985 → 1, its top entry.
    expected = [False, True, False, False, True]
    assert dim_step(c, row_ids, totals, inputs[0], per_row(inputs[1])).tolist() == expected


def test_batch_coupled_vs_per_sequence_fallback() -> None:
    c, row_ids, totals = conf([0.5, 0.25, 0.125, 0.75]), rows(3, 1), [3, 1]
    inputs = step(0, timesteps(4), "maskgit_plus")
    # Coupled: N=4, k=2 gives int(1.998) = 1: the batch-wide top entry, in row 1.
    assert dim_step(c, row_ids, totals, *inputs).tolist() == [False, False, False, True]
    # Per sequence: row 0, N=3: k=2 gives int(1.4985) = 1; row 1, N=1: only the last timestep gives 1.
    assert dim_step(c, row_ids, totals, inputs[0], per_row(inputs[1])).tolist() == [True, False, False, True]


def test_origin_randperm_matches_the_reference_draws() -> None:
    """The reference runs ``torch.randperm(N_cur)[:n]`` on the CPU global RNG after ``torch.manual_seed``."""
    seed, row_ids, totals, steps = 1234, rows(5, 3), [5, 3], 8
    ts = timesteps(steps)
    counts = oracle_dim_counts(8, steps)
    torch.manual_seed(seed)
    n_cur, expected = 8, []
    for n in counts:
        expected.append(torch.randperm(n_cur)[:n])
        n_cur -= n

    cpu_generator = torch.Generator().manual_seed(seed)
    alive = torch.ones(8, dtype=torch.bool)
    for i, perm in enumerate(expected):
        c = torch.ones(int(alive.sum()), dtype=BF16)
        selected = dim_step(c, row_ids[alive], totals, *step(i, ts, "origin"), cpu_generator=cpu_generator)
        want = torch.zeros_like(selected)
        want[perm] = True
        assert torch.equal(selected, want)
        alive[alive.nonzero()[:, 0][selected]] = False
    assert not alive.any()


def test_origin_ratio_draws_rand_against_one_minus_s_over_t() -> None:
    ts, inputs = timesteps(4), step(0, timesteps(4), "origin-ratio")
    c = torch.ones(10, dtype=BF16)
    # N=10, k=1: int(10·0.24975) = 2, so s = timesteps[1] and p = 1 − s/1.
    torch.manual_seed(7)
    expected = torch.rand(10) < (1 - ts[1])
    assert torch.equal(dim_step(c, rows(10), [10], *inputs, generator=torch.Generator().manual_seed(7)), expected)


def _row0_decision(row1: list[float], alg: str, threshold: float | None, alg_temp: float | None) -> torch.Tensor:
    row0 = [0.5, 0.25, 0.96875, 0.125]
    c = conf(row0 + row1)
    inputs = step(1, timesteps(6), alg, threshold=threshold, alg_temp=alg_temp, batch_coupled=False)
    cpu = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    dev = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    selected = dim_step(c, rows(4, len(row1)), [6, len(row1) + 2], *inputs, cpu_generator=cpu, generator=dev)
    return selected[:4]


@settings(max_examples=25, deadline=None)
@given(
    row1=st.lists(st.sampled_from([0.0625, 0.25, 0.5, 0.75, 0.98046875]), min_size=1, max_size=6),
    alg=st.sampled_from(ALL_ALGS),
    threshold=st.sampled_from([None, 0.9]),
    alg_temp=st.sampled_from([None, 0.5]),
)
def test_per_sequence_mode_is_batch_invariant(
    row1: list[float], alg: str, threshold: float | None, alg_temp: float | None
) -> None:
    reference = _row0_decision([0.5], alg, threshold, alg_temp)
    assert torch.equal(_row0_decision(row1, alg, threshold, alg_temp), reference)


def test_dream_counts_8_8() -> None:
    ts = timesteps(8)
    n_cur, counts = 8, []
    for i in range(8):
        n = dream_count(n_cur, i, ts, 8)
        counts.append(n)
        n_cur -= n
    assert counts == [0, 1, 1, 1, 1, 1, 1, 2]


def test_dream_maskgit_plus_with_one_hot_confidences_decodes_left_to_right() -> None:
    """The lmms-eval setting (top_p 0.01, greedy): every confidence is 1.0, so topk ties decide."""
    ts, order = timesteps(8), []
    alive = torch.ones(8, dtype=torch.bool)
    for i in range(8):
        c = torch.ones(int(alive.sum()), dtype=BF16)
        selected = dream_step(c, torch.zeros_like(c, dtype=torch.long), *step(i, ts, "maskgit_plus"))
        positions = alive.nonzero()[:, 0][selected]
        order.append(positions.tolist())
        alive[positions] = False
    assert order == [[], [0], [1], [2], [3], [4], [5], [6, 7]]


def test_dream_coupled_vs_per_sequence() -> None:
    # Two rows of 4, steps=8, step 1: 1 − s/t = 0.14257. Coupled: int(8·0.14257) = 1; per row int(0.57) = 0.
    c, row_ids = conf([0.5, 0.25, 0.75, 0.125, 0.0625, 0.5, 0.25, 0.125]), rows(4, 4)
    inputs = step(1, timesteps(8), "maskgit_plus")
    assert dream_step(c, row_ids, *inputs).tolist() == [False, False, True] + [False] * 5
    assert not dream_step(c, row_ids, inputs[0], per_row(inputs[1])).any()


def test_dream_preselect() -> None:
    ts, row_ids = timesteps(8), rows(3, 2)
    torch.manual_seed(11)
    expected = torch.rand(5) < (1 - ts[1] / ts[0])
    after = torch.rand(1)
    torch.manual_seed(11)
    assert torch.equal(dream_preselect(row_ids, *step(0, ts, "origin")), expected)
    # The last step commits everything but still draws its uniforms, like the reference.
    torch.manual_seed(11)
    torch.rand(5)
    assert torch.equal(torch.rand(1), after)
    torch.manual_seed(11)
    assert dream_preselect(row_ids, *step(7, ts, "origin")).all()
    assert torch.equal(torch.rand(1), after)
    selected = dream_preselect(row_ids, *step(3, ts, "autoregressive"))
    assert selected.tolist() == [True, False, False, True, False]


def test_validation() -> None:
    ts = timesteps(4)
    with pytest.raises(ValueError, match="step"):
        StepInputs(4, ts)
    with pytest.raises(ValueError, match="timesteps"):
        StepInputs(0, ts.double())
    with pytest.raises(ValueError, match="alg_temp"):
        GenerationConfig(alg="maskgit_plus", alg_temp=-1.0)
    with pytest.raises(ValueError, match="dream_step"):
        dream_step(torch.ones(2), rows(2), *step(0, ts, "origin"))
    with pytest.raises(ValueError, match="dream_preselect"):
        dream_preselect(rows(2), *step(0, ts, "origin-ratio"))
    with pytest.raises(ValueError, match="nondecreasing"):
        dim_step(torch.ones(2), torch.tensor([1, 0]), [1, 1], *step(0, ts, batch_coupled=False))
    with pytest.raises(ValueError, match="batch_coupled"):
        dim_step(torch.ones(2), rows(2), [2], *step(0, ts), cpu_generator=[torch.Generator()])


def test_masked_row_ids_and_empty_input() -> None:
    mask = torch.tensor([[False, True, True], [True, False, True]])
    assert masked_row_ids(mask).tolist() == [0, 0, 1, 1]
    empty = torch.zeros(0, dtype=BF16)
    none = torch.zeros(0, dtype=torch.long)
    assert dim_step(empty, none, [4], *step(0, timesteps(4), "maskgit_plus")).shape == (0,)
    assert dream_step(empty, none, *step(3, timesteps(4), "maskgit_plus")).shape == (0,)
