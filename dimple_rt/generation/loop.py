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

from .decide import fused_step, make_streams, reference_step
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
    committed: tokens written this step over the whole batch."""

    step: int
    sequences: torch.Tensor
    committed: int


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


def denoise(
    model: DimpleModel,
    backend: Backend,
    request: DecodeRequest,
    options: GenerationConfig,
    tokens_hook: TokensHook | None = None,
    logits_hook: LogitsHook | None = None,
) -> Iterator[Step]:
    """Run the step loop of ``options`` on ``request``, yielding after every executed step.

    ``backend`` supplies attention, the prefill cache write and the step decision (fused op or reference).
    Hooks have the authors' signatures: ``tokens_hook(step, x, logits) -> x`` (also once with step None on the
    full initial sequences, the structure-prior entry point) and ``logits_hook(step, x, logits) -> logits``,
    where x is (batch, total) for a full forward and (batch, max_new_tokens + 1) for a prefilled one.
    """
    config: DimpleConfig = model.config
    mask_id, vocab_size = config.mask_token_id, config.vocab_size
    input_ids, device = request.input_ids, request.input_ids.device
    batch, prompt_len = input_ids.shape
    keep = prompt_len - 1  # the prompt K/V reused with prefilling: all but the last prompt token
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token")
    if bool((input_ids == mask_id).any()):
        raise ValueError("the prompt contains <|mask|> tokens: only the response canvas may hold masks")

    ids = torch.cat([input_ids, request.canvas.to(device)], dim=1)  # (B, total)
    attention_mask = torch.cat([request.attention_mask.to(device), torch.ones_like(request.canvas)], dim=1)
    if tokens_hook is not None:
        hooked = tokens_hook(None, ids.clone(), None)
        _check_tokens(hooked, ids, prompt_len, vocab_size, "tokens_hook(None, ...)")
        ids = hooked
    image_mask = ids == config.image_token_id  # (B, total): the prompt's placeholders, never the canvas's
    image_mask[:, prompt_len:] = False
    num_total_mask = (ids == mask_id).sum(dim=1).tolist()  # per row; the authors' count is the sum
    position_ids, _ = get_rope_index(ids, config, request.image_grid_thw, attention_mask)  # (3, B, total)
    schedule = timesteps(options.steps, options.eps, device)
    streams = make_streams(options.seed, batch, device, options.batch_coupled)
    full_logits = tokens_hook is not None or logits_hook is not None
    cache = None
    if options.prefill:
        cache = KVCache.allocate(
            config.num_hidden_layers, batch, ids.shape[1], config.num_key_value_heads, config.head_dim,
            model.lm_head.weight.dtype, device,
        )  # fmt: skip

    start = 0  # where this step's forward begins: 0, or with prefilling ``keep`` after step 0
    for i in range(options.steps):
        prefilled = start > 0
        x = ids[:, start:].clone()  # (B, len): the full sequence, or the last prompt token + canvas
        mask_index = x == mask_id  # (B, len)
        if bool(mask_index[:, 0].any()):
            raise ValueError("the first token of a forward must not be a mask")
        rows = None
        if not full_logits:
            rows = torch.zeros_like(mask_index)
            rows[:, :-1] = mask_index[:, 1:]  # output p - 1 predicts position p
        out = model(
            x,
            backend,
            attention_mask=attention_mask,
            position_ids=position_ids[:, :, start:],
            image_features=None if prefilled else request.image_features,
            image_mask=image_mask[:, start:],
            cache=cache,
            cache_start=start,
            logits_rows=rows,
        )
        logits = None
        if full_logits:
            logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)  # (B, len, V), shifted
            if logits_hook is not None:
                logits = logits_hook(i, x, logits)
            mask_logits = logits[mask_index]  # (N, V), row-major over (batch, position)
        else:
            mask_logits = out.logits[0]  # (N, V), the same rows in the same order
        _check_finite(mask_logits, i)

        row_ids = masked_row_ids(mask_index)
        inputs = StepInputs(i, schedule)
        if backend.confident_select is None:
            commit, x0 = reference_step(mask_logits, row_ids, num_total_mask, inputs, options, streams)
        else:
            commit, x0 = fused_step(
                backend.confident_select, mask_logits, row_ids, num_total_mask, inputs, options, streams
            )
        x[mask_index] = torch.where(commit, x0, torch.full_like(x0, mask_id))
        if tokens_hook is not None:
            hooked = tokens_hook(i, x.clone(), logits)
            _check_tokens(hooked, x, 1 if prefilled else prompt_len, vocab_size, f"tokens_hook({i}, ...)")
            x = hooked
        ids[:, keep:] = x[:, keep - start :]
        if cache is not None:
            start = keep  # keep the prompt's K/V but its last token's; later steps overwrite the rest
        yield Step(step=i, sequences=ids.clone(), committed=int(commit.sum()))
        if options.pipeline == "dim" and not bool((ids == mask_id).any()):
            break
