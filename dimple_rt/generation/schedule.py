# SPDX-License-Identifier: Apache-2.0
"""Which masked positions a denoising step commits: the 'dim' and 'dream' schedules (Dimple spec §4.5, §4.6).

Pure functions over the batch-flattened masked entries, in the row-major (batch, position) order that
``logits[mask_index]`` gives; ``row_ids (N,)`` names the batch row of each entry (``masked_row_ids``). They
return a bool ``(N,)`` commit mask; the caller writes the sampled ``x0`` where it is set.

``batch_coupled=True`` reproduces the reference (§4.8): one mask count, one threshold "any selected" test,
one fallback count and one randperm/topk/multinomial over the whole flattened batch, so a sequence's tokens
depend on its batch companions. ``batch_coupled=False`` runs the same logic per sequence (its own counts,
test and draws, rows in ascending order), so with per-row generators a row's decisions depend on nothing else.

Counts are computed with the reference's float32 0-d tensor arithmetic (ratio, 1 − s/t, N·(…), truncating
``int``). Those are correctly rounded IEEE ops on every device, so they run on a CPU copy of ``timesteps``.

RNG, matching the reference: ``origin`` draws ``torch.randperm`` on the CPU (``cpu_generator``, else the CPU
global RNG); ``origin-ratio``, dream ``origin`` and the ``alg_temp`` multinomial draw on the entries' device
(``generator``, else that device's global RNG). On a CPU run the reference takes both from one global stream:
pass the same generator twice to match it after ``torch.manual_seed``. In per-sequence mode either argument may
also be a sequence of generators indexed by batch row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dimple_rt.config import GenerationConfig

Generators = torch.Generator | Sequence[torch.Generator | None] | None

DREAM_PRESELECT_ALGS = ("origin", "autoregressive")
"""Dream algs that choose the rows to commit before sampling; the caller samples only those rows."""

DREAM_CONFIDENCE_ALGS = ("maskgit_plus", "topk_margin", "entropy")
"""Dream algs that sample every masked row, then commit the top ``n`` by confidence."""


def timesteps(steps: int, eps: float = 1e-3, device: torch.device | str | None = None) -> torch.Tensor:
    """``linspace(1, eps, steps + 1)`` in float32, made on the reference's device (the input ids' device)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32, device=device)


def masked_row_ids(mask_index: torch.Tensor) -> torch.Tensor:
    """``mask_index (B, L) bool → (N,)`` int64: the batch row of each entry of ``logits[mask_index]``."""
    return mask_index.nonzero()[:, 0]


@dataclass(frozen=True)
class StepInputs:
    """The per-step values a commit decision reads; the options (alg, threshold, alg_temp, batch coupling)
    come from the request's :class:`~dimple_rt.config.GenerationConfig`."""

    step: int
    """The step index i, 0 ≤ i < steps."""
    timesteps: torch.Tensor
    """``timesteps(options.steps, options.eps, device)``, shape (steps + 1,) float32."""

    def __post_init__(self) -> None:
        if self.timesteps.dim() != 1 or self.timesteps.numel() < 2 or self.timesteps.dtype != torch.float32:
            raise ValueError(
                f"timesteps must be 1-D float32 with >= 2 entries, got {tuple(self.timesteps.shape)} "
                f"{self.timesteps.dtype}"
            )
        if not 0 <= self.step < self.steps:
            raise ValueError(f"step must be in [0, {self.steps}), got {self.step}")

    @property
    def steps(self) -> int:
        """The number of denoising steps."""
        return self.timesteps.numel() - 1

    @property
    def is_last(self) -> bool:
        """Whether this is the final step, where every schedule commits all it can."""
        return self.step == self.steps - 1


def dim_fallback_count(
    n_cur: int, num_total_mask: int, step: int, timesteps: torch.Tensor, steps: int
) -> tuple[int, float, float]:
    """The 'dim' fallback count (spec §4.5 step 3): ``(n, s, t)`` with ``t = n_cur / num_total_mask``.

    From ``k = max(first k with timesteps[k] < t, step + 1)`` on, take ``s = timesteps[k]`` and
    ``n = int(n_cur · (1 − s/t))`` (``n_cur`` at the last timestep) until ``n ≥ 1``. Starting no earlier than
    ``step + 1`` makes a step that lags the linear schedule catch up; the last step always yields ``n_cur``.
    Raises ValueError when ``t ≤ timesteps[-1]``, as the reference does (e.g. one mask left of > 1/eps).
    """
    if num_total_mask < 1:
        raise ValueError(f"num_total_mask must be >= 1, got {num_total_mask}")
    ts = timesteps.cpu()
    n_cur_t = torch.tensor(n_cur, dtype=torch.int64)
    ratio = n_cur_t / torch.tensor(num_total_mask, dtype=torch.int64)  # int64 true division → float32
    if ratio <= ts[-1]:
        raise ValueError(f"mask ratio {float(ratio)} must be larger than timesteps[-1] = {float(ts[-1])}")
    first = int((ts < ratio).nonzero()[0, 0])
    for k in range(max(first, step + 1), steps + 1):
        s = ts[k]
        n = int(n_cur_t * (1 - s / ratio)) if s > ts[-1] else n_cur
        if n >= 1:
            break
    return n, float(s), float(ratio)


def dream_count(n_cur: int, step: int, timesteps: torch.Tensor, steps: int) -> int:
    """The 'dream' count for confidence algs (spec §4.6): ``int(n_cur · (1 − s/t))`` with ``t = timesteps[i]``,
    ``s = timesteps[i+1]``, or ``n_cur`` on the last step. It may be 0, which wastes the step."""
    if step == steps - 1:
        return n_cur
    ts = timesteps.cpu()
    return int(torch.tensor(n_cur, dtype=torch.int64) * (1 - ts[step + 1] / ts[step]))


def _transfer_probability(s: float, t: float, last: bool) -> torch.Tensor | float:
    """``1 − s/t`` in float32 as the reference computes it, or 1 when ``last``."""
    if last:
        return 1
    return 1 - torch.tensor(s, dtype=torch.float32) / torch.tensor(t, dtype=torch.float32)


def _first_per_row(row_ids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the leftmost masked entry of each row (row_ids are row-major, so where the row changes)."""
    first = torch.ones_like(row_ids, dtype=torch.bool)
    first[1:] = row_ids[1:] != row_ids[:-1]
    return first


def _top_n(confidence: torch.Tensor, n: int, alg_temp: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """``(N,)`` bool marking n entries: the n largest confidences, or a multinomial draw when ``alg_temp > 0``.

    Ties go to the lowest index: that is what CUDA's radix-select topk does (spec §4.5), while CPU topk's tie
    order is unspecified, so a stable descending sort stands in for it.
    """
    if alg_temp is None or alg_temp == 0:
        index = torch.sort(confidence, descending=True, stable=True).indices[:n]
    else:
        weights = torch.softmax(confidence / alg_temp, dim=-1)
        index = torch.multinomial(weights, num_samples=n, generator=generator)
    selected = torch.zeros_like(confidence, dtype=torch.bool)
    selected[index] = True
    return selected


def row_segments(row_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of each row's contiguous run of entries; ValueError unless row-major."""
    rows, counts = torch.unique_consecutive(row_ids, return_counts=True)
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("row_ids must be nondecreasing (the row-major order of logits[mask_index])")
    ends = counts.cumsum(0).tolist()
    return [(row, end - count, end) for row, count, end in zip(rows.tolist(), counts.tolist(), ends, strict=True)]


def pick_generator(generators: Generators, row: int | None) -> torch.Generator | None:
    """The generator for ``row`` (None: the batch-coupled call, which takes a single generator)."""
    if generators is None or isinstance(generators, torch.Generator):
        return generators
    if row is None:
        raise ValueError("a sequence of generators needs batch_coupled=False")
    return generators[row]


def _dim_group(
    confidence: torch.Tensor,
    row_ids: torch.Tensor,
    num_total_mask: int,
    inputs: StepInputs,
    options: GenerationConfig,
    cpu_generator: torch.Generator | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One 'dim' decision over a group of entries: the whole batch, or one sequence."""
    if options.threshold is not None:
        if inputs.is_last:
            return torch.ones_like(confidence, dtype=torch.bool)
        # The Python float is cast to the confidence dtype: bf16(0.95) = 0.94921875, so this is conf >= 0.953125.
        selected = confidence > options.threshold
        if bool(selected.any()):
            return selected

    n_cur = confidence.numel()
    n, s, t = dim_fallback_count(n_cur, num_total_mask, inputs.step, inputs.timesteps, inputs.steps)
    if options.alg == "origin":
        index = torch.randperm(n_cur, generator=cpu_generator)[:n]
        selected = torch.zeros_like(confidence, dtype=torch.bool)
        selected[index.to(confidence.device)] = True
        return selected
    if options.alg == "origin-ratio":
        p = _transfer_probability(s, t, last=s <= float(inputs.timesteps[-1]))
        return torch.rand(n_cur, device=confidence.device, generator=generator) < p
    if options.alg == "autoregressive":
        return _first_per_row(row_ids)
    return _top_n(confidence, n, options.alg_temp, generator)


def dim_step(
    confidence: torch.Tensor,
    row_ids: torch.Tensor,
    num_total_mask: Sequence[int],
    inputs: StepInputs,
    options: GenerationConfig,
    *,
    cpu_generator: Generators = None,
    generator: Generators = None,
) -> torch.Tensor:
    """The 'dim' commit mask ``(N,)`` bool for one step (spec §4.5), per ``options.batch_coupled`` group.

    confidence: (N,) from ``sample_tokens`` with the alg's ``ALG_CONFIDENCE`` kind and the configured
    ``use_original_confidence``. row_ids: (N,) batch row of each entry. num_total_mask: per batch row, the mask
    count after the initial tokens hook (the reference's batch-wide count is the sum).

    Threshold path (``options.threshold`` set): the last step commits everything; otherwise ``confidence > threshold``,
    kept if anything in the group passes. Fallback: ``n = dim_fallback_count(...)`` entries by alg: origin a CPU
    ``randperm(N)[:n]``; origin-ratio each entry with p = 1 − s/t (may commit none); autoregressive the leftmost
    entry per row (n ignored, so masks may remain at the end); the others ``_top_n``. An empty group commits
    nothing.
    """
    if confidence.shape != row_ids.shape or confidence.dim() != 1:
        raise ValueError(f"confidence and row_ids must both be (N,), got {tuple(confidence.shape)}, {row_ids.shape}")
    if confidence.numel() == 0:
        return torch.zeros_like(confidence, dtype=torch.bool)
    if options.batch_coupled:
        total = sum(int(v) for v in num_total_mask)
        return _dim_group(
            confidence,
            row_ids,
            total,
            inputs,
            options,
            pick_generator(cpu_generator, None),
            pick_generator(generator, None),
        )
    selected = torch.zeros_like(confidence, dtype=torch.bool)
    for row, start, end in row_segments(row_ids):
        selected[start:end] = _dim_group(
            confidence[start:end],
            row_ids[start:end],
            int(num_total_mask[row]),
            inputs,
            options,
            pick_generator(cpu_generator, row),
            pick_generator(generator, row),
        )
    return selected


def _check_dream_alg(alg: str, allowed: tuple[str, ...], use: str) -> None:
    if alg not in allowed:
        raise ValueError(f"{use} takes alg in {list(allowed)}, got {alg!r}")


def dream_preselect(
    row_ids: torch.Tensor, inputs: StepInputs, options: GenerationConfig, *, generator: Generators = None
) -> torch.Tensor:
    """The 'dream' commit mask ``(N,)`` for ``origin`` / ``autoregressive``, chosen *before* sampling (§4.6).

    origin: each entry with ``rand < p``, p = 1 − timesteps[i+1]/timesteps[i] (1 on the last step; the uniform
    draw happens anyway, as in the reference). autoregressive: the leftmost entry per row. The caller then runs
    ``sample_tokens(mask_logits[selected], ..., use_original_confidence=False)`` on the selected rows only, so the
    sampler's RNG consumption differs from 'dim'.
    """
    _check_dream_alg(options.alg, DREAM_PRESELECT_ALGS, "dream_preselect")
    if options.alg == "autoregressive":
        return _first_per_row(row_ids)
    ts = inputs.timesteps.cpu()
    p = _transfer_probability(float(ts[inputs.step + 1]), float(ts[inputs.step]), inputs.is_last)
    if options.batch_coupled:
        return torch.rand(row_ids.numel(), device=row_ids.device, generator=pick_generator(generator, None)) < p
    selected = torch.zeros_like(row_ids, dtype=torch.bool)
    for row, start, end in row_segments(row_ids):
        selected[start:end] = (
            torch.rand(end - start, device=row_ids.device, generator=pick_generator(generator, row)) < p
        )
    return selected


def dream_step(
    confidence: torch.Tensor,
    row_ids: torch.Tensor,
    inputs: StepInputs,
    options: GenerationConfig,
    *,
    generator: Generators = None,
) -> torch.Tensor:
    """The 'dream' commit mask ``(N,)`` for ``maskgit_plus`` / ``topk_margin`` / ``entropy`` (§4.6).

    confidence: (N,) from ``sample_tokens`` over all masked rows with ``use_original_confidence=False`` (dream
    forces it, whatever the config says: the caller must pass it). Commits ``_top_n`` of ``dream_count(N_cur)``
    entries, which may be none. There is no threshold path in 'dream'.
    """
    _check_dream_alg(options.alg, DREAM_CONFIDENCE_ALGS, "dream_step")
    if confidence.shape != row_ids.shape or confidence.dim() != 1:
        raise ValueError(f"confidence and row_ids must both be (N,), got {tuple(confidence.shape)}, {row_ids.shape}")
    if options.batch_coupled:
        groups = [(None, 0, confidence.numel())]
    else:
        groups = row_segments(row_ids)
    selected = torch.zeros_like(confidence, dtype=torch.bool)
    for row, start, end in groups:
        n = dream_count(end - start, inputs.step, inputs.timesteps, inputs.steps)
        if n > 0:
            selected[start:end] = _top_n(confidence[start:end], n, options.alg_temp, pick_generator(generator, row))
    return selected
