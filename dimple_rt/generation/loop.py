# SPDX-License-Identifier: Apache-2.0
"""The denoising step loop of ``diffusion_generate`` (Dimple spec §4.2–4.7), as a generator of steps.

Per step: one forward (the full sequence, or with prefilling the last prompt token plus the canvas over the
prompt K/V cached at step 0), the shift of logits (position p is predicted by output p − 1), token choice and
confidence (``sampling``), which masked positions to commit (``schedule``), the hooks, and the write-back.

Only what is needed is computed: image features come in precomputed (never a vision-tower run per step), and
without hooks the LM head runs only on the rows that predict a masked position. Hooks get the authors' full
``(batch, len, vocab)`` shifted logits, so with a hook the whole LM head runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dimple_rt.backend import Backend
from dimple_rt.config import DimpleConfig, GenerationConfig
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.model.kv_cache import KVCache
from dimple_rt.model.rope import get_rope_index

from .decide import Streams, block_step, fused_step, make_streams, reference_step
from .schedule import StepInputs, masked_row_ids, timesteps


class NonFiniteLogitsError(ValueError):
    """The model (or a logits hook) produced NaN or +inf logits, or a masked row whose every logit is -inf:
    no token can be chosen from it. Both backends raise it, before any decision is made from such a row."""


TokensHook = Callable[[int | None, torch.Tensor, torch.Tensor | None], torch.Tensor]
LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DecodeRequest:
    """One batch to decode. input_ids, attention_mask: (batch, prompt_len), left padded; canvas: (batch,
    max_new_tokens) initial response (masks and fixed prior tokens); image_features: (image_tokens, hidden)
    from ``DimpleModel.encode_images`` with its image_grid_thw (images, 3), or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    canvas: torch.Tensor
    image_features: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


@dataclass
class Step:
    """The state after one executed step: sequences (batch, prompt_len + max_new_tokens), owned by the caller;
    committed: tokens written this step over the whole batch; positions (committed, 2): (row, canvas position)
    of each, row-major; confidences (committed,) fp32: the probability the step's logits gave each committed
    token (the plain softmax, whatever the alg ranked by), for display; it plays no part in decisions;
    last: no step follows (:func:`ends_after`)."""

    step: int
    sequences: torch.Tensor
    committed: int
    positions: torch.Tensor
    confidences: torch.Tensor
    last: bool = False


def _commit_record(
    candidates: torch.Tensor, commit: torch.Tensor, x0: torch.Tensor, mask_logits: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step's positions and confidences: ``candidates (B, len)`` in span columns (``offset`` = span start -
    prompt_len), ``commit``/``x0 (N,)`` and ``mask_logits (N, V)`` over its masked entries in row-major order.
    One log-sum-exp over the committed rows only, so the cost is bounded by the tokens written."""
    positions = candidates.nonzero()[commit]  # (K, 2), the order of mask_logits' rows
    positions[:, 1] += offset
    rows = mask_logits[commit].float()  # (K, V)
    chosen = rows.gather(1, x0[commit].unsqueeze(1)).squeeze(1)  # (K,)
    return positions.cpu(), torch.exp(chosen - torch.logsumexp(rows, dim=-1)).cpu()


def _check_tokens(after: torch.Tensor, before: torch.Tensor, fixed: int, vocab_size: int, what: str) -> None:
    """A hook may only change the response, with token ids: ValueError if its shape, dtype or the first
    ``fixed`` columns changed, or an id is outside the vocabulary."""
    if not isinstance(after, torch.Tensor) or after.shape != before.shape or after.dtype != before.dtype:
        got = f"{tuple(after.shape)} {after.dtype}" if isinstance(after, torch.Tensor) else type(after).__name__
        raise ValueError(f"{what} must return x of shape {tuple(before.shape)} {before.dtype}, got {got}")
    if not torch.equal(after[:, :fixed], before[:, :fixed]):
        raise ValueError(f"{what} changed prompt tokens: it may only write the response canvas")
    if bool(((after < 0) | (after >= vocab_size)).any()):
        raise ValueError(f"{what} wrote token ids outside the vocabulary [0, {vocab_size})")


def _check_finite(mask_logits: torch.Tensor, step: int) -> None:
    """NonFiniteLogitsError unless every masked row has a finite maximum (one pass over the rows: NaN
    propagates through the max, +inf is the max, and an all -inf row has -inf as its max)."""
    if mask_logits.numel() and not bool(torch.isfinite(mask_logits.amax(dim=-1)).all()):
        raise NonFiniteLogitsError(
            f"step {step}: the logits of a masked position are NaN, +inf or all -inf, so no token can be chosen "
            "(NaN or inf weights, an overflowing fp16 model, or a logits_hook that masked every token)"
        )


@dataclass(frozen=True)
class Span:
    """The positions one forward computes: ``[start, end)``, over the cached prefix ``[0, start)`` and, with a
    dual cache, the cached suffix ``[end, end + suffix)``."""

    start: int
    end: int
    suffix: int = 0


class Blocks:
    """Fast-dLLM's semi-autoregressive blocks over the canvas, decoded in lockstep by the whole batch: the
    current block is the first one in which some sequence still has a mask (rows already done with it wait,
    committing nothing, so a row's tokens do not depend on its companions)."""

    def __init__(self, prompt_len: int, total: int, block_length: int | None) -> None:
        length = block_length or total - prompt_len
        self.bounds = [(s, min(s + length, total)) for s in range(prompt_len, total, length)]
        self.index = -1
        self.step = 0  # steps taken in the current block

    def advance(self, masks: torch.Tensor) -> tuple[int, int] | None:
        """Move to the block of the next step given ``masks (B, total)``; None when no mask is left."""
        for index, (start, end) in enumerate(self.bounds):
            if bool(masks[:, start:end].any()):
                self.step = self.step + 1 if index == self.index else 0
                self.index = index
                return start, end
        return None


def _plan(options: GenerationConfig, first: bool, keep: int, total: int, blocks: Blocks | None) -> Span:
    """Where the next forward starts and ends, by cache policy (``GenerationConfig.cache``)."""
    if options.cache == "prefix":
        return Span(keep if options.prefill and not first else 0, total)
    assert blocks is not None
    start, end = blocks.bounds[blocks.index]
    every = options.refresh_every
    if blocks.step == 0 or (every is not None and blocks.step % every == 0):
        # A refresh: every position's K/V recomputed and cached (the prompt's only when asked, and always at
        # the first forward, which fills the cache).
        return Span(0 if first or options.refresh_prompt else keep, total)
    # Output p - 1 predicts position p, so a span's first position must be known. Fast-dLLM's first step
    # commits the block's first masked position; after a 'threshold' first step that may still be a mask, so
    # the span then starts one earlier, at a position of the previous block (or the prompt's last token).
    start -= options.block_start == "threshold"
    if options.cache == "block":
        return Span(start, total)
    return Span(start, end, total - end)


def _candidates(masks: torch.Tensor, span: Span, blocks: Blocks | None, block_start: str) -> torch.Tensor:
    """(B, len) bool: the masked positions of the span this step may commit. Without blocks every masked one;
    in a block only its masked positions, and on the block's first step with ``block_start="first"`` only each
    row's first one."""
    if blocks is None:
        return masks
    start, end = blocks.bounds[blocks.index]
    allowed = torch.zeros_like(masks)
    allowed[:, max(start - span.start, 0) : end - span.start] = True
    candidates = masks & allowed
    if blocks.step == 0 and block_start == "first":
        first = candidates.cumsum(dim=1) == 1
        candidates &= first
    return candidates


def _stop_after_eos(ids: torch.Tensor, mask_id: int, eos_id: int, prompt_len: int, end: int) -> None:
    """Early stop: a row that holds <|endoftext|> before ``end`` and has no mask left before it gets
    <|endoftext|> in every later masked position (in place)."""
    done = ~(ids[:, prompt_len:end] == mask_id).any(dim=1) & (ids[:, prompt_len:end] == eos_id).any(dim=1)
    later = ids[:, end:]
    later[done[:, None] & (later == mask_id)] = eos_id


@dataclass
class DecodeState:
    """One decode between its steps: the rows of a :class:`DecodeRequest` with their options, decided per row
    (unless batch-coupled). :func:`denoise` runs one for a whole request; the step engine
    (:mod:`~dimple_rt.generation.engine`) runs one per sequence and batches their forwards.

    ids: (B, total) prompt and canvas, written by every step; attention_mask, image_mask: (B, total);
    position_ids: (3, B, total); num_total_mask: per row, the masks after the initial tokens hook; limit: the
    most steps the loop may take."""

    config: DimpleConfig
    options: GenerationConfig
    ids: torch.Tensor
    prompt_len: int
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    position_ids: torch.Tensor
    image_features: torch.Tensor | None
    num_total_mask: list[int]
    schedule: torch.Tensor
    streams: Streams
    blocks: Blocks | None
    limit: int

    @property
    def total(self) -> int:
        return self.ids.shape[1]

    @property
    def keep(self) -> int:
        """The prompt K/V reused with prefilling: all but the last prompt token."""
        return self.prompt_len - 1


def start_decode(
    config: DimpleConfig, request: DecodeRequest, options: GenerationConfig, tokens_hook: TokensHook | None = None
) -> DecodeState:
    """Check ``request`` and build the state before the first step (the initial ``tokens_hook`` call included)."""
    mask_id, vocab_size = config.mask_token_id, config.vocab_size
    input_ids, device = request.input_ids, request.input_ids.device
    batch, prompt_len = input_ids.shape
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token")
    if bool((input_ids == mask_id).any()):
        raise ValueError("the prompt contains <|mask|> tokens: only the response canvas may hold masks")

    ids = torch.cat([input_ids, request.canvas.to(device)], dim=1)  # (B, total)
    total = ids.shape[1]
    attention_mask = torch.cat([request.attention_mask.to(device), torch.ones_like(request.canvas)], dim=1)
    if tokens_hook is not None:
        hooked = tokens_hook(None, ids.clone(), None)
        _check_tokens(hooked, ids, prompt_len, vocab_size, "tokens_hook(None, ...)")
        ids = hooked
    image_mask = torch.zeros_like(ids, dtype=torch.bool)  # (B, total): the prompt's placeholders, not the canvas's
    if config.image_token_id is not None:  # a text-only Dream model has none
        image_mask[:, :prompt_len] = ids[:, :prompt_len] == config.image_token_id
    num_total_mask = (ids == mask_id).sum(dim=1).tolist()  # per row; the authors' count is the sum
    position_ids, _ = get_rope_index(ids, config, request.image_grid_thw, attention_mask)  # (3, B, total)
    blocks = Blocks(prompt_len, total, options.block_length) if options.pipeline == "fast_dllm" else None
    return DecodeState(
        config=config,
        options=options,
        ids=ids,
        prompt_len=prompt_len,
        attention_mask=attention_mask,
        image_mask=image_mask,
        position_ids=position_ids,
        image_features=request.image_features,
        num_total_mask=num_total_mask,
        schedule=timesteps(options.steps, options.eps, device),
        streams=make_streams(options.seed, batch, device, options.batch_coupled),
        blocks=blocks,
        # fast_dllm commits at least one position per sequence with masks per step, so the canvas bounds its steps.
        limit=total - prompt_len if blocks is not None else options.steps,
    )


def plan_step(state: DecodeState, i: int) -> tuple[Span, torch.Tensor, torch.Tensor] | None:
    """Step ``i``'s span, its tokens ``x (B, len)`` (a copy) and the candidate masked positions ``(B, len)``
    bool, or None when no block has a mask left (fast_dllm: the decode is over)."""
    options, blocks, keep, total = state.options, state.blocks, state.keep, state.total
    mask_id = state.config.mask_token_id
    if blocks is not None and blocks.advance(state.ids == mask_id) is None:
        return None
    span = _plan(options, i == 0, keep, total, blocks)
    x = state.ids[:, span.start : span.end].clone()  # (B, len)
    candidates = _candidates(x == mask_id, span, blocks, options.block_start)  # (B, len)
    if bool((x[:, 0] == mask_id).any()):
        raise ValueError("the first token of a forward must not be a mask")
    return span, x, candidates


def logits_rows(candidates: torch.Tensor) -> torch.Tensor:
    """(B, len) bool: the forward's output rows that predict a candidate (output p - 1 predicts position p)."""
    rows = torch.zeros_like(candidates)
    rows[:, :-1] = candidates[:, 1:]
    return rows


def decide_step(
    backend: Backend, state: DecodeState, i: int, mask_logits: torch.Tensor, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``i``'s ``(commit, x0)`` over the candidates' logits ``mask_logits (N, V)`` (row-major over
    (batch, position)), by the backend's step decision; NonFiniteLogitsError before any decision."""
    _check_finite(mask_logits, i)
    options, streams, batch = state.options, state.streams, state.ids.shape[0]
    row_ids = masked_row_ids(candidates)
    if state.blocks is not None:
        return block_step(backend.confident_select, mask_logits, row_ids, batch, options, streams)
    inputs = StepInputs(i, state.schedule)
    if backend.confident_select is None:
        return reference_step(mask_logits, row_ids, state.num_total_mask, inputs, options, streams)
    return fused_step(backend.confident_select, mask_logits, row_ids, state.num_total_mask, inputs, options, streams)


def write_step(
    state: DecodeState,
    i: int,
    span: Span,
    x: torch.Tensor,
    candidates: torch.Tensor,
    commit: torch.Tensor,
    x0: torch.Tensor,
    mask_logits: torch.Tensor,
    tokens_hook: TokensHook | None = None,
    logits: torch.Tensor | None = None,
) -> Step:
    """Write step ``i``'s committed tokens (then the tokens hook's edit, given the step's full ``logits``) into
    ``state.ids``; the Step after it, with the committed positions and their confidences from the candidates'
    logits ``mask_logits (N, V)``, which says whether it is the decode's last."""
    config, ids = state.config, state.ids
    positions, confidences = _commit_record(candidates, commit, x0, mask_logits, span.start - state.prompt_len)
    x[candidates] = torch.where(commit, x0, torch.full_like(x0, config.mask_token_id))
    if tokens_hook is not None:
        hooked = tokens_hook(i, x.clone(), logits)
        fixed = max(state.prompt_len - span.start, 0)
        _check_tokens(hooked, x, fixed, config.vocab_size, f"tokens_hook({i}, ...)")
        x = hooked
    ids[:, span.start : span.end] = x
    if state.blocks is not None and state.options.early_stop:
        end = state.blocks.bounds[state.blocks.index][1]
        _stop_after_eos(ids, config.mask_token_id, config.pad_token_id, state.prompt_len, end)
    return Step(i, ids.clone(), int(commit.sum()), positions, confidences, last=ends_after(state, i))


def ends_after(state: DecodeState, i: int) -> bool:
    """Whether the decode is over after step ``i``: its step limit, or no mask left ('dim' stops there; a
    fast_dllm decode would find no block to advance to; 'dream' runs all its steps)."""
    if i + 1 >= state.limit:
        return True
    done = not bool((state.ids == state.config.mask_token_id).any())
    return done and state.options.pipeline != "dream"


def denoise(
    model: DimpleModel,
    backend: Backend,
    request: DecodeRequest,
    options: GenerationConfig,
    tokens_hook: TokensHook | None = None,
    logits_hook: LogitsHook | None = None,
) -> Iterator[Step]:
    """Run the step loop of ``options`` on ``request``, yielding after every executed step.

    ``backend`` supplies attention, the cache write and the step decision (fused op or reference). Each step
    runs one forward over the span its cache policy plans (:func:`_plan`), decides over the candidate masked
    positions (:func:`_candidates`) and writes the committed tokens back.
    Hooks have the authors' signatures: ``tokens_hook(step, x, logits) -> x`` (also once with step None on the
    full initial sequences, the structure-prior entry point) and ``logits_hook(step, x, logits) -> logits``,
    where x is (batch, total) for a full forward and (batch, max_new_tokens + 1) for a prefilled one.
    """
    config: DimpleConfig = model.config
    if options.cache != "prefix" and (tokens_hook is not None or logits_hook is not None):
        raise ValueError(f"cache={options.cache!r} computes part of the canvas per step: hooks need full logits")
    state = start_decode(config, request, options, tokens_hook)
    batch, total = state.ids.shape
    full_logits = tokens_hook is not None or logits_hook is not None
    cache = None
    if options.prefill:
        cache = KVCache.allocate(
            config.num_hidden_layers, batch, total, config.num_key_value_heads, config.head_dim,
            model.lm_head.weight.dtype, state.ids.device,
        )  # fmt: skip

    for i in range(state.limit):
        planned = plan_step(state, i)
        if planned is None:
            break
        span, x, candidates = planned
        out = model(
            x,
            backend,
            attention_mask=state.attention_mask,
            position_ids=state.position_ids[:, :, span.start : span.end],
            image_features=request.image_features if span.start == 0 else None,
            image_mask=state.image_mask[:, span.start : span.end],
            cache=cache,
            cache_start=span.start,
            cache_suffix=span.suffix,
            logits_rows=None if full_logits else logits_rows(candidates),
        )
        logits = None
        if full_logits:
            logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)  # (B, len, V), shifted
            if logits_hook is not None:
                logits = logits_hook(i, x, logits)
            mask_logits = logits[candidates]  # (N, V), row-major over (batch, position)
        else:
            mask_logits = out.logits[0]  # (N, V), the same rows in the same order
        commit, x0 = decide_step(backend, state, i, mask_logits, candidates)
        step = write_step(state, i, span, x, candidates, commit, x0, mask_logits, tokens_hook, logits)
        yield step
        if step.last:
            break
