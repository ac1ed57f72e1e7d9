# SPDX-License-Identifier: Apache-2.0
"""The two training objectives of Dimple: autoregressive CE (stages 1-2) and masked diffusion (stage 3).

Both keep Dream's shifted convention (spec §1.8): the token at position p is predicted by the output at p-1,
so ``logits[:, :-1]`` meet ``targets[:, 1:]``. Both are means over the supervised tokens of one micro-batch,
computed on fp32 logits. Where there is nothing to supervise the loss is an exact 0 that still depends on the
logits (zero gradients, no NaN), so that every rank of a DDP run reaches the same backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

MASK_STRATEGIES = ("single", "dual")
WEIGHTINGS = ("none", "inverse_t")


def _zero_like_graph(logits: torch.Tensor) -> torch.Tensor:
    """An fp32 scalar 0 with a (zero) gradient path to ``logits``."""
    return logits.float().mean() * 0.0


def ar_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted next-token CE, mean over labels ≠ IGNORE_INDEX. logits: (batch, len, vocab); labels: (batch, len)."""
    shifted = logits[:, :-1].float()  # (B, L-1, V): output p-1 predicts token p
    targets = labels[:, 1:]  # (B, L-1)
    if not bool((targets != IGNORE_INDEX).any()):
        return _zero_like_graph(logits)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@dataclass
class NoisedBatch:
    """The diffusion input of one micro-batch; with ``dual`` masking every tensor has 2·batch rows."""

    input_ids: torch.Tensor
    """(rows, len) x_t: the mask id where ``masked``, the clean token elsewhere."""
    masked: torch.Tensor
    """(rows, len) bool: the positions replaced by the mask id (a subset of mask_locations)."""
    targets: torch.Tensor
    """(rows, len) the clean tokens x_0."""
    t: torch.Tensor
    """(rows,) float32 noise level of each row (a dual copy shares its source row's t)."""
    copies: int
    """1 for ``single``, 2 for ``dual``: rows = copies · batch, copy-major."""


def mask_for_diffusion(
    input_ids: torch.Tensor,
    mask_locations: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    strategy: str = "single",
    eps: float = 1e-3,
) -> NoisedBatch:
    """Draw t ~ U[eps, 1) per sample and mask each maskable token with probability t (spec §6.5).

    ``single``: masked = (r < t) ∧ mask_locations. ``dual``: the batch is duplicated, copy 1 masks r < t and
    copy 2 masks r ≥ t, so each maskable token is masked in exactly one copy. Draws come from ``generator``
    (a CPU generator, so the noise does not depend on the device): first t (batch,), then r (batch, len).
    """
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"mask strategy must be one of {MASK_STRATEGIES}, got {strategy!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if mask_locations.shape[1] and bool(mask_locations[:, 0].any()):
        raise ValueError("position 0 is maskable, but nothing precedes it to predict it (shifted logits)")
    batch, length = input_ids.shape
    t = (1 - eps) * torch.rand(batch, generator=generator, device=generator.device) + eps  # (B,)
    r = torch.rand(batch, length, generator=generator, device=generator.device)  # (B, L)
    t, r = t.to(input_ids.device), r.to(input_ids.device)
    below = r < t[:, None]  # (B, L)
    if strategy == "single":
        masked = below & mask_locations
        targets, t_rows, copies = input_ids, t, 1
    else:
        masked = torch.cat([below & mask_locations, ~below & mask_locations])  # (2B, L), copy-major
        targets, t_rows, copies = input_ids.repeat(2, 1), t.repeat(2), 2  # (2B, L), (2B,)
    noised = targets.masked_fill(masked, mask_token_id)
    return NoisedBatch(noised, masked, targets, t_rows, copies)


def diffusion_loss(logits: torch.Tensor, noised: NoisedBatch, weighting: str = "none") -> torch.Tensor:
    """CE at the masked positions, mean over all masked tokens of the micro-batch (pooled across rows).

    logits: (rows, len, vocab) from the bidirectional forward of ``noised.input_ids``. Masked position p is
    predicted by output p-1. ``weighting="inverse_t"`` multiplies each token's CE by 1/t of its row (the
    paper's ELBO weight); the default ``"none"`` is what the authors trained with.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    target_mask = noised.masked[:, 1:]  # (rows, L-1)
    count = int(target_mask.sum())
    if count == 0:
        return _zero_like_graph(logits)
    predicted = logits[:, :-1][target_mask].float()  # (count, V): output p-1 for every masked p
    targets = noised.targets[:, 1:][target_mask]  # (count,)
    per_token = F.cross_entropy(predicted, targets, reduction="none")  # (count,)
    if weighting == "inverse_t":
        rows = torch.nonzero(target_mask)[:, 0]  # (count,) row of each masked token, row-major like the gather
        per_token = per_token / noised.t[rows]
    return per_token.sum() / count
