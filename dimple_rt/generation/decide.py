# SPDX-License-Identifier: Apache-2.0
"""One denoising step's decision: which token each masked position gets and which positions are committed.

``reference_step`` is the authors' computation (``sample_tokens`` in the logits' dtype, torch's Categorical
draws, then the 'dim' or 'dream' schedule). ``fused_step`` makes the same decisions through the fused
``confident_select`` op: token choice and confidence in one pass over the vocabulary, and for the confidence
algs (maskgit_plus, topk_margin, entropy) the threshold test and top-n too; random fallbacks (origin's
randperm, origin-ratio, autoregressive, alg_temp draws) stay in the schedule code. Its sampling is an
inverse-CDF draw from uniforms, so sampled tokens differ from the authors' Categorical draws; greedy tokens of
an fp32 model agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimple_rt.backend import SelectFn
from dimple_rt.config import ALG_CONFIDENCE, GenerationConfig

from .sampling import sample_tokens
from .schedule import (
    DREAM_CONFIDENCE_ALGS,
    DREAM_PRESELECT_ALGS,
    Generators,
    StepInputs,
    dim_fallback_count,
    dim_step,
    dream_preselect,
    dream_step,
    pick_generator,
    row_segments,
)


@dataclass
class Streams:
    """RNG streams: ``device`` for sampling, origin-ratio and multinomial draws; ``cpu`` for origin's randperm.
    Each is one generator (batch-coupled), one per row (per-sequence), or None (torch's global RNG)."""

    device: Generators
    cpu: Generators


def make_streams(seed: int | None, batch: int, device: torch.device, coupled: bool) -> Streams:
    """Seeded streams, reproducing the authors' code run after ``torch.manual_seed(seed)``: on a CPU run all
    their draws come from one stream, so device and cpu share a generator. Per-sequence mode gives every row
    its own copy of that stream, so a row draws what it would draw alone."""
    if seed is None:
        return Streams(None, None)

    def one() -> tuple[torch.Generator, torch.Generator]:
        cpu = torch.Generator().manual_seed(seed)
        return (cpu, cpu) if device.type == "cpu" else (torch.Generator(device=device).manual_seed(seed), cpu)

    if coupled:
        return Streams(*one())
    pairs = [one() for _ in range(batch)]
    return Streams([p[0] for p in pairs], [p[1] for p in pairs])


def _sample(
    logits: torch.Tensor, row_ids: torch.Tensor, options: GenerationConfig, use_original: bool, streams: Streams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tokens`` over masked rows ``logits (N, V)``: one call for the batch, or one per sequence when
    the sequences draw from their own streams (so a sequence's draws do not depend on its companions)."""
    kind = ALG_CONFIDENCE[options.alg]

    def call(part: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_tokens(
            part,
            options.temperature,
            options.top_p,
            options.top_k,
            margin_confidence=kind == "margin",
            neg_entropy=kind == "neg_entropy",
            use_original_confidence=use_original,
            generator=generator,
            validate_categorical=options.validate_categorical,
        )

    if options.batch_coupled:
        return call(logits, pick_generator(streams.device, None))
    if options.temperature == 0:
        return call(logits, None)  # greedy draws nothing: one call serves every sequence
    confidence = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    x0 = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for row, start, end in row_segments(row_ids):
        confidence[start:end], x0[start:end] = call(logits[start:end], pick_generator(streams.device, row))
    return confidence, x0


def reference_step(
    mask_logits: torch.Tensor,
    row_ids: torch.Tensor,
    num_total_mask: list[int],
    inputs: StepInputs,
    options: GenerationConfig,
    streams: Streams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's ``(commit (N,) bool, x0 (N,))`` for the masked rows, by pipeline (spec §4.5, §4.6), with the
    authors' ops and numerics."""
    if options.pipeline == "dim":
        confidence, x0 = _sample(mask_logits, row_ids, options, options.use_original_confidence, streams)
        commit = dim_step(
            confidence, row_ids, num_total_mask, inputs, options, cpu_generator=streams.cpu, generator=streams.device
        )
        return commit, x0
    if options.alg in DREAM_PRESELECT_ALGS:
        commit = dream_preselect(row_ids, inputs, options, generator=streams.device)
        x0 = torch.zeros_like(row_ids)
        _, x0[commit] = _sample(mask_logits[commit], row_ids[commit], options, False, streams)
        return commit, x0
    confidence, x0 = _sample(mask_logits, row_ids, options, False, streams)
    return dream_step(confidence, row_ids, inputs, options, generator=streams.device), x0


def _uniforms(row_ids: torch.Tensor, coupled: bool, streams: Streams) -> torch.Tensor:
    """(N,) float32 uniforms for the fused op's sampling, from the batch's stream or each row's own."""
    if coupled:
        return torch.rand(row_ids.numel(), device=row_ids.device, generator=pick_generator(streams.device, None))
    uniforms = torch.empty(row_ids.numel(), device=row_ids.device)
    for row, start, end in row_segments(row_ids):
        uniforms[start:end] = torch.rand(
            end - start, device=row_ids.device, generator=pick_generator(streams.device, row)
        )
    return uniforms


def _groups(row_ids: torch.Tensor, num_total_mask: list[int], coupled: bool) -> list[tuple[int, int, int]]:
    """(group index, masked entries, mask total) per decision group: the batch, or each row with entries."""
    if coupled:
        return [(0, row_ids.numel(), sum(num_total_mask))]
    return [(row, end - start, num_total_mask[row]) for row, start, end in row_segments(row_ids)]


def _select(
    select: SelectFn,
    rows: torch.Tensor,
    ids: torch.Tensor,
    n: list[int],
    threshold: float | None,
    options: GenerationConfig,
    streams: Streams,
    use_original: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``confident_select`` call over masked rows ``rows (N, V)`` with the request's sampling options:
    ``(x0, confidence, commit)``, n per decision group, uniforms drawn from the request's streams."""
    uniforms = _uniforms(ids, options.batch_coupled, streams) if options.temperature > 0 else None
    return select(
        rows,
        ids,
        torch.tensor(n, dtype=torch.long, device=rows.device),
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        uniforms=uniforms,
        confidence=ALG_CONFIDENCE[options.alg],
        use_original_confidence=use_original,
        threshold=threshold,
        batch_coupled=options.batch_coupled,
    )


def block_step(
    select: SelectFn | None,
    mask_logits: torch.Tensor,
    row_ids: torch.Tensor,
    batch: int,
    options: GenerationConfig,
    streams: Streams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'fast_dllm' decision over a block's candidate rows: per sequence its most confident candidate (ties
    to the lowest position) plus every other whose confidence is >= the threshold (Fast-dLLM's rule). Tokens
    and confidences come from the filtered, tempered distribution, as in its ``sample_tokens``; ``select`` is
    the fused op, or None for the reference's :func:`sample_tokens`."""
    if select is None:
        confidence, x0 = _sample(mask_logits, row_ids, options, False, streams)
    else:
        x0, confidence, _ = _select(select, mask_logits, row_ids, [0] * batch, None, options, streams, False)
    commit = confidence >= options.threshold
    for _, start, end in row_segments(row_ids):
        commit[start + int(torch.argmax(confidence[start:end]))] = True  # argmax: the first of equal maxima
    return commit, x0


def fused_step(
    select: SelectFn,
    mask_logits: torch.Tensor,
    row_ids: torch.Tensor,
    num_total_mask: list[int],
    inputs: StepInputs,
    options: GenerationConfig,
    streams: Streams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_step`'s contract through the fused ``confident_select`` op."""
    coupled = options.batch_coupled
    groups = 1 if coupled else len(num_total_mask)
    dim = options.pipeline == "dim"

    def run(rows: torch.Tensor, ids: torch.Tensor, n: list[int], threshold: float | None):
        return _select(select, rows, ids, n, threshold, options, streams, options.use_original_confidence and dim)

    none = [0] * groups
    if not dim and options.alg in DREAM_PRESELECT_ALGS:
        commit = dream_preselect(row_ids, inputs, options, generator=streams.device)
        x0 = torch.zeros_like(row_ids)
        x0[commit] = run(mask_logits[commit], row_ids[commit], none, None)[0]
        return commit, x0
    if not dim:
        x0, confidence, _ = run(mask_logits, row_ids, none, None)
        return dream_step(confidence, row_ids, inputs, options, generator=streams.device), x0
    if options.alg not in DREAM_CONFIDENCE_ALGS or options.alg_temp:
        x0, confidence, _ = run(mask_logits, row_ids, none, None)
        commit = dim_step(
            confidence, row_ids, num_total_mask, inputs, options, cpu_generator=streams.cpu, generator=streams.device
        )
        return commit, x0

    # Fully fused: threshold test, else the fallback's top-n, per group. The count is computed up front; the
    # reference only computes it (and may raise, when the mask ratio is below eps) if the threshold selects
    # nothing, so a failing count is kept and raised only where that happens.
    threshold = options.threshold
    counts, failures = list(none), {}
    for group, n_cur, total in _groups(row_ids, num_total_mask, coupled):
        if threshold is not None and inputs.is_last:
            counts[group] = n_cur  # the last step commits everything
            continue
        try:
            counts[group] = dim_fallback_count(n_cur, total, inputs.step, inputs.timesteps, inputs.steps)[0]
        except ValueError as err:
            failures[group] = err
    x0, _, commit = run(mask_logits, row_ids, counts, None if inputs.is_last else threshold)
    for group, err in failures.items():
        committed = commit if coupled else commit[row_ids == group]
        if not bool(committed.any()):
            raise err
    return commit, x0
