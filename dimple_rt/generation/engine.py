# SPDX-License-Identifier: Apache-2.0
"""A row-in/row-out step engine: continuous (step-level) batching of independent decodes.

Each sequence is added on its own (:meth:`Engine.add`, at any step boundary) with its own options, RNG streams
and prompt K/V; :meth:`Engine.step` advances every sequence by one denoising step and lets the finished ones
leave. Sequences share forwards by kind, whatever their step, prompt length, canvas length or options:

- ``prefill``: the first step of a prefilling sequence (prompt and canvas; its prompt K/V are kept after it);
- ``cached``: every later step of a prefilling sequence (the last prompt token and the canvas, over its kept
  prompt K/V);
- ``full``: every step of a ``prefill=False`` sequence (the whole sequence, no cache).

Each kind is one batched forward over its rows, padded to a common layout with the attention key mask hiding
the padding: ``prefill``/``full`` rows are right padded (positions are explicit, so padding may follow the
tokens); ``cached`` rows put their prompt K/V right-aligned before one common cache start in a pooled cache
(rebuilt only when the rows change), and their current tokens after it, right padded. So a steady state runs
one forward per step, plus one for the sequences joining at that boundary (their prompts are longer than the
others' canvases: padding them together would multiply the others' work) and one for any ``prefill=False``
sequences.

After the forward each row decides alone from its own state (step index, schedule, mask count, streams)
through :func:`~dimple_rt.generation.loop.decide_step`, exactly as :func:`~dimple_rt.generation.loop.denoise`
decides for a request of one: per-sequence decisions make each answer the single-request answer, tokens and
forward count, as long as the forward's floating point does not depend on its companions. Measured on an
AVX-512 CPU: the linears do not (a row's outputs are the same bits among 66-1300 rows, fp32 and bf16, 128-3584
wide), and with the reference backend dimple-tiny's every batched forward gives each row its solo logits bit
for bit, as do the kernels' ``prefill``/``full`` forwards (trailing masked keys change nothing). The kernels' attention tiles the concatenated [prefix ‖
current] keys by 64, so a ``cached`` row whose prompt is shorter than the longest one (masked keys before its
prefix) gets attention sums rounded differently: logits off by ~1e-5. Decisions then agree unless a confidence
sits within that of a threshold or a tie; python_tests/test_engine.py checks the tokens.

Sequences that cannot share a forward run their own ``denoise`` generator, one forward each per step:
fast_dllm's 'block'/'dual' caches (the span of each forward depends on the sequence's block) and hooks (full
logits and a callback per sequence).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dimple_rt.backend import Backend
from dimple_rt.config import GenerationConfig
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.model.kv_cache import KVCache

from .loop import (
    DecodeRequest,
    DecodeState,
    LogitsHook,
    Span,
    Step,
    TokensHook,
    decide_step,
    denoise,
    logits_rows,
    plan_step,
    start_decode,
    write_step,
)

KINDS = ("prefill", "cached", "full")
"""The kinds of shared forwards, in the order a step runs them."""


class Sequence:
    """One decode inside an :class:`Engine`; ``tag`` is the caller's.

    After each step: ``last_step`` (its Step: sequences (1, prompt_len + max_new_tokens)), ``forwards`` (its
    steps done, one forward each), ``finished`` (its answer is final), ``error`` (the exception that
    ended it). Finished and failed sequences have left the engine.
    """

    def __init__(self, request: DecodeRequest, tag: Any) -> None:
        self.tag = tag
        self.prompt_len = int(request.input_ids.shape[1])
        self.state: DecodeState | None = None  # a sequence that shares forwards
        self.solo: Iterator[Step] | None = None  # one that runs its own denoise generator
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (keep, kv_heads, head_dim) K, V
        self.last_step: Step | None = None
        self._canvas = request.canvas[0]
        self.forwards = 0
        self.finished = False
        self.error: Exception | None = None

    @property
    def canvas(self) -> torch.Tensor:
        """(max_new_tokens,) ids of the canvas now (masks included)."""
        if self.last_step is None:
            return self._canvas
        return self.last_step.sequences[0, self.prompt_len :]

    @property
    def done(self) -> bool:
        return self.finished or self.error is not None


@dataclass
class Forward:
    """One forward a step ran: its kind (or "solo"), rows, tokens those rows committed, seconds (the forward and
    the rows' decisions)."""

    kind: str
    rows: int
    committed: int
    seconds: float


Planned = tuple[Sequence, tuple[Span, torch.Tensor, torch.Tensor]]


class Engine:
    """Step-level batching over ``model`` with ``backend``: :meth:`add` sequences, :meth:`step` them.

    ``forwards`` lists the forwards of the last step; ``total_forwards`` counts them all.
    """

    def __init__(self, model: DimpleModel, backend: Backend) -> None:
        self.model = model
        self.backend = backend
        self.sequences: list[Sequence] = []
        self.forwards: list[Forward] = []
        self.total_forwards = 0
        self._pool: tuple[tuple[Sequence, ...], KVCache] | None = None

    @torch.inference_mode()
    def add(
        self,
        request: DecodeRequest,
        options: GenerationConfig,
        *,
        tokens_hook: TokensHook | None = None,
        logits_hook: LogitsHook | None = None,
        tag: Any = None,
    ) -> Sequence:
        """Add one sequence (``request`` with batch 1, images encoded); it takes its first step at the next
        :meth:`step`. Bad input raises here (ValueError), except for sequences that run their own generator
        (hooks, 'block'/'dual' caches), whose errors arrive as their ``error`` at their first step."""
        if request.input_ids.dim() != 2 or request.input_ids.shape[0] != 1:
            raise ValueError(f"add takes one sequence: input_ids (1, prompt_len), got {tuple(request.input_ids.shape)}")
        sequence = Sequence(request, tag)
        if tokens_hook is not None or logits_hook is not None or options.cache != "prefix":
            sequence.solo = denoise(self.model, self.backend, request, options, tokens_hook, logits_hook)
        else:
            sequence.state = start_decode(self.model.config, request, options)
        self.sequences.append(sequence)
        return sequence

    def remove(self, sequence: Sequence) -> None:
        """Take a sequence out (cancelled) before it is done; nothing happens if it already left."""
        if sequence in self.sequences:
            self.sequences.remove(sequence)
        sequence.prefix = []
        if sequence.solo is not None:
            sequence.solo.close()  # type: ignore[attr-defined]

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One step of every sequence. Returns them all: each advanced (``last_step``), finished or failed; the
        finished and failed ones have left. A forward that raises fails its rows; a decision that raises fails
        its own row only."""
        self.forwards = []
        stepped = list(self.sequences)
        planned: dict[str, list[Planned]] = {kind: [] for kind in KINDS}
        for sequence in stepped:
            if sequence.solo is not None:
                self._step_solo(sequence)
                continue
            state = sequence.state
            assert state is not None
            try:
                plan = plan_step(state, sequence.forwards)
            except Exception as err:  # noqa: BLE001 - the sequence's own error, reported on it
                sequence.error = err
                continue
            if plan is None:
                sequence.finished = True
                continue
            kind = "full" if not state.options.prefill else "prefill" if sequence.forwards == 0 else "cached"
            planned[kind].append((sequence, plan))
        for kind in KINDS:
            if planned[kind]:
                self._shared(kind, planned[kind])
        if not planned["cached"]:
            self._pool = None
        self.total_forwards += len(self.forwards)
        for sequence in stepped:
            if sequence.done:
                sequence.prefix = []  # its K/V go now, not when the caller drops it
        self.sequences = [s for s in self.sequences if not s.done]
        return stepped

    # One step ---------------------------------------------------------------------------------------------------

    def _step_solo(self, sequence: Sequence) -> None:
        assert sequence.solo is not None
        begin = time.perf_counter()
        try:
            step = next(sequence.solo)
        except StopIteration:
            sequence.finished = True
            return
        except Exception as err:  # noqa: BLE001 - the sequence's own error, reported on it
            sequence.error = err
            return
        sequence.last_step, sequence.forwards = step, sequence.forwards + 1
        sequence.finished = step.last
        self.forwards.append(Forward("solo", 1, step.committed, time.perf_counter() - begin))

    def _shared(self, kind: str, rows: list[Planned]) -> None:
        """One batched forward over ``rows``, then each row's decision and write-back."""
        begin = time.perf_counter()
        committed = offset = 0
        try:
            logits = self._forward(kind, rows)  # (N, V): every row's candidates, row-major
        except Exception as err:  # noqa: BLE001 - a failed forward fails its rows, not the engine
            for sequence, _ in rows:
                sequence.error = err
            self.forwards.append(Forward(kind, len(rows), 0, time.perf_counter() - begin))
            return
        for sequence, (span, x, candidates) in rows:
            state, i = sequence.state, sequence.forwards
            assert state is not None
            count = int(candidates.sum())
            mask_logits, offset = logits[offset : offset + count], offset + count
            try:
                commit, x0 = decide_step(self.backend, state, i, mask_logits, candidates)
                step = write_step(state, i, span, x, candidates, commit, x0, mask_logits)
            except Exception as err:  # noqa: BLE001 - the sequence's own error, reported on it
                sequence.error = err
                continue
            sequence.last_step, sequence.forwards, sequence.finished = step, i + 1, step.last
            committed += step.committed
        self.forwards.append(Forward(kind, len(rows), committed, time.perf_counter() - begin))

    def _forward(self, kind: str, rows: list[Planned]) -> torch.Tensor:
        """The batched forward of one kind: the candidates' logits (N, V) in row order."""
        config = self.model.config
        first = rows[0][0].state
        assert first is not None
        device = first.ids.device
        length = max(x.shape[1] for _, (_, x, _) in rows)
        start = max(span.start for _, (span, _, _) in rows) if kind == "cached" else 0
        batch = len(rows)
        ids = torch.full((batch, length), config.pad_token_id, dtype=first.ids.dtype, device=device)
        positions = torch.zeros((3, batch, length), dtype=first.position_ids.dtype, device=device)
        image_mask = torch.zeros((batch, length), dtype=torch.bool, device=device)
        wanted = torch.zeros((batch, length), dtype=torch.bool, device=device)
        key_mask = torch.zeros((batch, start + length), dtype=first.attention_mask.dtype, device=device)
        features = []
        for row, (sequence, (span, x, candidates)) in enumerate(rows):
            state = sequence.state
            assert state is not None
            n = x.shape[1]
            ids[row, :n] = x[0]
            positions[:, row, :n] = state.position_ids[:, 0, span.start : span.end]
            image_mask[row, :n] = state.image_mask[0, span.start : span.end]
            wanted[row, :n] = logits_rows(candidates)[0]
            key_mask[row, start - span.start : start] = state.attention_mask[0, : span.start]
            key_mask[row, start : start + n] = state.attention_mask[0, span.start : span.end]
            if span.start == 0 and state.image_features is not None:
                features.append(state.image_features)
        cache = None
        if kind == "prefill":
            cache = KVCache.allocate(
                config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim,
                self.model.lm_head.weight.dtype, device,
            )  # fmt: skip
        elif kind == "cached":
            cache = self._pooled([sequence for sequence, _ in rows], start, length)
        out = self.model(
            ids,
            self.backend,
            attention_mask=key_mask,
            position_ids=positions,
            image_features=torch.cat(features) if features else None,
            image_mask=image_mask,
            cache=cache,
            cache_start=start,
            logits_rows=wanted,
        )
        if cache is not None and kind == "prefill":
            for row, (sequence, _) in enumerate(rows):
                keep = sequence.prompt_len - 1
                sequence.prefix = [(k[row, :keep].clone(), v[row, :keep].clone()) for k, v in cache.layers]
        return out.logits[0]

    def _pooled(self, sequences: list[Sequence], start: int, length: int) -> KVCache:
        """The ``cached`` kind's cache, (rows, start + length) per layer: each row's prompt K/V right-aligned
        at ``start``; built again only when the rows change (zeros where nothing is kept: masked, but finite)."""
        key = tuple(sequences)
        if self._pool is not None and self._pool[0] == key:
            return self._pool[1]
        self._pool = None  # release the old one before allocating
        config = self.model.config
        shape = (len(sequences), start + length, config.num_key_value_heads, config.head_dim)
        dtype, device = self.model.lm_head.weight.dtype, self.model.lm_head.weight.device
        layers = []
        for layer in range(config.num_hidden_layers):
            k = torch.zeros(shape, dtype=dtype, device=device)
            v = torch.zeros(shape, dtype=dtype, device=device)
            for row, sequence in enumerate(sequences):
                kept_k, kept_v = sequence.prefix[layer]
                k[row, start - kept_k.shape[0] : start] = kept_k
                v[row, start - kept_v.shape[0] : start] = kept_v
            layers.append((k, v))
        cache = KVCache(layers=layers)
        self._pool = (key, cache)
        return cache
