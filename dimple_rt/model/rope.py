# SPDX-License-Identifier: Apache-2.0
"""M-RoPE for the decoder: 3-stream position ids (``get_rope_index``) and the rotary tables.

Text tokens get equal temporal/height/width positions, so M-RoPE reduces to ordinary 1-D RoPE for them;
image tokens get (0, row, col) offsets on the merged grid. Following the reference, the cos/sin table is
computed in fp32 and cast to the activation dtype before it is applied.
"""

from __future__ import annotations

import torch

from dimple_rt.config import DimpleConfig

from .layers import rotate_half


def get_rope_index(
    input_ids: torch.Tensor,
    config: DimpleConfig,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids ``(3, batch, len)`` int64 and ``rope_deltas (batch, 1)`` (Dimple spec §1.6).

    Padded slots (attention_mask 0) get position 1, as in the reference. ``rope_deltas`` is
    ``max position + 1 - len`` per row, so position ``p`` of a later token is ``p + rope_deltas``.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if image_grid_thw is None:
        pos = mask.long().cumsum(-1) - 1  # (batch, len)
        pos = pos.masked_fill(~mask, 1)
        position_ids = pos[None].expand(3, batch, length).clone()  # (3, batch, len)
        deltas = pos.max(-1).values + 1 - length if length else torch.zeros(batch, dtype=torch.long, device=device)
        return position_ids, deltas[:, None]

    merge = config.vision_config.spatial_merge_size if config.vision_config else 2
    position_ids = torch.ones(3, batch, length, dtype=torch.long, device=device)
    deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    grids = image_grid_thw.tolist()
    image_cursor = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]].tolist()
        pieces: list[torch.Tensor] = []
        start = 0
        next_pos = 0
        while True:
            try:
                ed = ids.index(config.image_token_id, start)
            except ValueError:
                break
            if image_cursor >= len(grids):
                raise ValueError(f"row {b} has more image placeholders than image_grid_thw has images ({len(grids)})")
            t, h, w = grids[image_cursor]
            image_cursor += 1
            gh, gw = h // merge, w // merge
            text_len = ed - start
            pieces.append(torch.arange(text_len).expand(3, text_len) + next_pos)
            base = next_pos + text_len
            t_idx = torch.arange(t).repeat_interleave(gh * gw)  # (t*gh*gw,)
            h_idx = torch.arange(gh).repeat_interleave(gw).repeat(t)
            w_idx = torch.arange(gw).repeat(t * gh)
            pieces.append(torch.stack([t_idx, h_idx, w_idx]) + base)  # (3, t*gh*gw)
            next_pos = int(pieces[-1].max()) + 1
            start = ed + t * gh * gw
        tail = len(ids) - start
        if tail > 0:
            pieces.append(torch.arange(tail).expand(3, tail) + next_pos)
        row = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)  # (3, valid_len)
        position_ids[:, b, mask[b]] = row.to(device)
        top = int(row.max()) if row.numel() else -1
        deltas[b, 0] = top + 1 - length
    if image_cursor != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold {image_cursor} image spans")
    return position_ids, deltas


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(batch, len, head_dim)`` for 3-stream ``position_ids (3, batch, len)``.

    Channel chunk k of ``mrope_section * 2`` takes its angle from stream ``k % 3``; selecting the chunks
    before applying the rotation is the same maths as the reference's per-chunk application.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (3, batch, len, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (3, batch, len, head_dim)
    chunks = emb.split(list(mrope_section) * 2, dim=-1)
    emb = torch.cat([chunk[k % 3] for k, chunk in enumerate(chunks)], dim=-1)  # (batch, len, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (batch, len, heads, head_dim)`` by ``cos/sin (batch, len, head_dim)`` in x's dtype (the tables
    are cast to it: under autocast the projections are bf16 while the tables follow the fp32 embeddings)."""
    cos = cos.to(x.dtype)[:, :, None, :]  # (batch, len, 1, head_dim)
    sin = sin.to(x.dtype)[:, :, None, :]
    return x * cos + rotate_half(x) * sin
