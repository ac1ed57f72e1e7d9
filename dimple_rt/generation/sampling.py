# SPDX-License-Identifier: Apache-2.0
"""Token choice and confidence for one denoising step: the authors' ``sample_tokens`` (Dimple spec §4.4).

Everything runs in the logits' dtype with the same torch ops as the reference. The model emits bf16 logits and
the choices are made on bf16 *probabilities*, where ties are common: a sampler in fp32 would pick other tokens.
The confidence is a function of (the distribution it is read from, the chosen token, the kind), kept in
``token_confidence`` so a fused kernel can implement exactly that contract.

RNG: the reference draws ``Categorical(probs).sample()`` from the global RNG of the logits' device. With
``generator=None`` we make the same call, so ``torch.manual_seed(s)`` followed by our call equals theirs; a
``torch.Generator`` (on the logits' device) gives a private stream with the same draws.
"""

from __future__ import annotations

import torch
from torch import distributions as dists

from dimple_rt.config import ConfidenceKind


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter ``(N, V) → (N, V)``: removed entries become ``finfo.min``.

    The removal mask is shifted right by one so the most likely token always survives; ``top_p = 0`` therefore
    keeps only the argmax (ties in the sort aside).
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove_sorted = cumulative > top_p
    remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k filter ``(N, V) → (N, V)``: entries strictly below the k-th value become ``finfo.min``, so ties at
    the k-th value are all kept."""
    kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def token_confidence(probs: torch.Tensor, x0: torch.Tensor, kind: ConfidenceKind) -> torch.Tensor:
    """Confidence ``(N,)`` of the chosen tokens ``x0 (N,)`` under ``probs (N, V)``, in ``probs.dtype``.

    plain: ``probs[x0]``; margin: top1 − top2 (independent of ``x0``); neg_entropy: Σ p·log(p + 1e-10) ≤ 0.
    The ops and their order are the reference's, so bf16 results are bit-identical.
    """
    if kind == "plain":
        return torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    if kind == "margin":
        if probs.size(-1) < 2:
            raise ValueError(f"margin confidence needs a vocabulary of at least 2, got {probs.size(-1)}")
        top2 = torch.topk(probs, 2, dim=-1).values  # (N, 2), the same values as the reference's full sort
        return top2[:, 0] - top2[:, 1]
    if kind == "neg_entropy":
        return torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    raise ValueError(f"confidence kind must be one of 'plain', 'margin', 'neg_entropy', got {kind!r}")


def _categorical_draw(probs: torch.Tensor, generator: torch.Generator | None, validate: bool) -> torch.Tensor:
    """One draw per row, exactly as ``Categorical(probs=probs).sample()`` does it (bf16 renormalisation, then
    ``multinomial(..., 1, replacement=True)``); validation is torch's default when ``validate`` is set."""
    dist = dists.Categorical(probs=probs, validate_args=None if validate else False)
    if generator is None:
        return dist.sample()
    return torch.multinomial(dist.probs, 1, True, generator=generator).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
    use_original_confidence: bool = True,
    generator: torch.Generator | None = None,
    validate_categorical: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose a token per masked row and its confidence: ``logits (N, V) → (confidence (N,), x0 (N,) int64)``.

    temperature 0 is greedy (first maximal index); > 0 draws from the filtered distribution. The confidence is
    read from the unfiltered, untempered softmax when ``use_original_confidence``, else from the filtered one;
    ``neg_entropy`` wins over ``margin_confidence`` as in the reference.

    ``validate_categorical`` reproduces a reference quirk: torch validates ``Categorical``'s bf16-renormalised
    probabilities (each row's bf16 sum must be exactly 1.0); if *any* row fails, the reference's bare
    ``except`` turns the whole call greedy. False skips that validation, so every row is sampled.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")

    kind: ConfidenceKind = "neg_entropy" if neg_entropy else "margin" if margin_confidence else "plain"
    original_probs = torch.softmax(logits, dim=-1) if use_original_confidence else None
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    confidence_probs = original_probs if original_probs is not None else probs

    x0 = None
    if temperature > 0:
        if validate_categorical:
            try:
                x0 = _categorical_draw(probs, generator, validate=True)
            except (ValueError, RuntimeError):
                # The reference's bare ``except``: validation raises ValueError, multinomial RuntimeError.
                x0 = None
        else:
            x0 = _categorical_draw(probs, generator, validate=False)
    if x0 is None:
        x0 = probs.max(dim=-1).indices
    return token_confidence(confidence_probs, x0, kind), x0
