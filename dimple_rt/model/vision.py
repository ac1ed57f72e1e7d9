# SPDX-License-Identifier: Apache-2.0
"""The Qwen2.5-VL vision tower (``visual``) of Dimple: patch embed, windowed ViT blocks, 2×2 patch merger.

Spec §1.3. The tower runs once per request, so everything that depends only on ``grid_thw`` (rotary table,
window order, segment boundaries) is computed once per forward by the small pure functions below, on the
CPU with Python ints, and moved to the activations' device. Attention goes through an injected function with
the :func:`dimple_rt.reference.masked_attention` signature; its ``cu_seqlens`` gives the block-diagonal
segments (windows or whole images) of the packed sequence.

Parameter names are those of the checkpoint below the ``visual.`` prefix (spec §1.9).
"""

from __future__ import annotations

import torch
from torch import nn

from dimple_rt import reference
from dimple_rt.backend import AttentionFn
from dimple_rt.config import VisionConfig
from dimple_rt.model.layers import GatedMLP, Linear, RMSNorm, linear, rotate_half

ROPE_THETA = 10000.0
"""Base of the vision rotary frequencies (Qwen2.5-VL's; not in the config)."""


def _grids(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"grid_thw must be (n_images ≥ 1, 3), got {tuple(grid_thw.shape)}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw must be an integer tensor, got {grid_thw.dtype}")
    grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
    if any(min(g) <= 0 for g in grids):
        raise ValueError(f"grid_thw entries must be positive, got {grids}")
    return grids


def vision_rotary_ids(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """Per-patch (row, col) rotary ids in merge-block order.

    For each image the h×w patch grid is cut into ``m×m`` blocks (m = spatial_merge_size); blocks are taken
    row-major and, within a block, patches row-major; the ids repeat for each of the t frames. This is the
    order of the patches in ``pixel_values`` (the processor emits them so).

    grid_thw: (n_images, 3) int (t, h, w) in patches, h and w multiples of m.
    Returns: (N_patch, 2) int64, column 0 the row id and column 1 the column id; N_patch = Σ t·h·w.
    """
    m = spatial_merge_size
    ids = []
    for t, h, w in _grids(grid_thw):
        if h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size {m}")
        rows = torch.arange(h)[:, None].expand(h, w)  # (h, w)
        cols = torch.arange(w)[None, :].expand(h, w)  # (h, w)
        hw = torch.stack([rows, cols], dim=-1)  # (h, w, 2)
        hw = hw.reshape(h // m, m, w // m, m, 2).permute(0, 2, 1, 3, 4)  # (h/m, w/m, m, m, 2)
        ids.append(hw.reshape(h * w, 2).repeat(t, 1))  # (t·h·w, 2)
    return torch.cat(ids, dim=0)  # (N_patch, 2)


def vision_rotary_freqs(rotary_ids: torch.Tensor, head_dim: int, max_grid: int) -> torch.Tensor:
    """Rotary angles of each patch: ``[row angles ‖ col angles]``, fp32.

    ``inv_freq = 1 / θ^(arange(0, head_dim/2, 2) / (head_dim/2))`` (head_dim/4 frequencies); the table
    ``outer(arange(max_grid), inv_freq)`` is looked up with the row and column ids.

    rotary_ids: (N_patch, 2) int64 from :func:`vision_rotary_ids`; max_grid: G, the largest h or w of the
    images (every id is < G). Returns: (N_patch, head_dim / 2) float32. The attention uses
    ``cat(angles, angles)`` (N_patch, head_dim) as the rotary embedding.
    """
    if head_dim % 4:
        raise ValueError(f"vision head_dim must be a multiple of 4, got {head_dim}")
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, spatial_dim, 2, dtype=torch.float32) / spatial_dim))
    table = torch.outer(torch.arange(max_grid, dtype=torch.float32), inv_freq)  # (G, head_dim/4)
    return table[rotary_ids].flatten(1)  # (N_patch, 2, head_dim/4) -> (N_patch, head_dim/2)


def window_index(
    grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the merged tokens for windowed attention, and the window boundaries.

    Per image (and frame), the merged-token grid (h/m, w/m) is padded at the right and bottom by
    ``k − (h/m mod k)`` and ``k − (w/m mod k)`` with k = window_size / m / patch_size merged tokens; this
    pads by a whole empty row/column of windows when already divisible (Qwen2.5-VL's quirk, kept so the
    window boundaries match). Windows are taken row-major, tokens within a window row-major, padding
    dropped; indices are offset by the tokens of the previous images. ``cu_window_seqlens`` accumulates the
    valid tokens per window × m² (patch units) after a leading 0, then ``unique_consecutive`` removes the
    empty windows.

    grid_thw: (n_images, 3) int. Returns: window_index (N_patch / m²,) int64, a permutation of the merged
    tokens; cu_window_seqlens (n_windows + 1,) int32 in patches.
    """
    m = spatial_merge_size
    k = window_size // m // patch_size
    if k <= 0:
        raise ValueError(f"window_size {window_size} is smaller than one merged token ({m * patch_size} px)")
    order = []
    cu = [0]
    offset = 0
    for t, h, w in _grids(grid_thw):
        gh, gw = h // m, w // m
        pad_h, pad_w = k - gh % k, k - gw % k
        nh, nw = (gh + pad_h) // k, (gw + pad_w) // k
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)  # (t, gh, gw)
        padded = nn.functional.pad(index, (0, pad_w, 0, pad_h), value=-1)  # (t, gh + pad_h, gw + pad_w)
        windows = padded.reshape(t, nh, k, nw, k).permute(0, 1, 3, 2, 4).reshape(-1, k * k)  # (t·nh·nw, k²)
        valid = windows >= 0
        order.append(windows[valid] + offset)  # row-major over windows, then within each window
        cu.extend((valid.sum(dim=1).cumsum(0) * m * m + cu[-1]).tolist())
        offset += t * gh * gw
    cu_window_seqlens = torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
    return torch.cat(order), cu_window_seqlens


def image_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Full-attention segments: one per image frame, ``[0] + cumsum(h·w repeated t times)``.

    grid_thw: (n_images, 3) int. Returns: (Σ t + 1,) int32 in patches.
    """
    lengths = [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]
    return nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch) and no bias, applied to flattened patches.

    A stride-equals-kernel convolution of one patch is a dot product with the flattened kernel, so it is
    computed as one matmul with the weight viewed as (hidden, patch_dim); the parameter keeps the
    checkpoint's Conv3d shape (hidden, C, T, patch, patch).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N_patch, patch_dim), flattened in (C, T, ph, pw) order → (N_patch, hidden)."""
        weight = self.proj.weight.flatten(1)  # (hidden, C·T·ph·pw)
        return linear(pixel_values.to(weight.dtype), weight)


class VisionAttention(nn.Module):
    """Multi-head self-attention with 2-D rotary over block-diagonal segments of the packed sequence."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """x: (S, hidden); cos, sin: (S, head_dim) float32; cu_seqlens: int32 segments → (S, hidden)."""
        seq_len = x.shape[0]
        q, k, v = self.qkv(x).view(seq_len, 3, self.num_heads, self.head_dim).unbind(1)  # 3 × (S, heads, head_dim)
        # Rotary in fp32, then back to the activation dtype (the reference's order of roundings).
        cos, sin = cos[:, None], sin[:, None]  # (S, 1, head_dim)
        q32, k32 = q.float(), k.float()
        q = (q32 * cos + rotate_half(q32) * sin).to(x.dtype)
        k = (k32 * cos + rotate_half(k32) * sin).to(x.dtype)
        out = attention(q[None], k[None], v[None], cu_seqlens=cu_seqlens)  # (1, S, heads, head_dim)
        return self.proj(out.reshape(seq_len, -1))  # (S, hidden)


class VisionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """x: (S, hidden) → (S, hidden); see :meth:`VisionAttention.forward`."""
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, attention)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each m² consecutive patches concatenated and mapped by Linear, exact GELU, Linear."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = nn.Sequential(
            Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            Linear(self.merged_dim, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N_patch, hidden) → (N_patch / m², out_hidden)."""
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))  # (N_patch/m², hidden·m²)


class VisionTower(nn.Module):
    """Qwen2.5-VL ViT: pixel patches → one feature per merged m×m block of patches (spec §1.3)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        attention: AttentionFn = reference.masked_attention,
    ) -> torch.Tensor:
        """Features of all images of a request, in the processor's merge-block order.

        pixel_values: (N_patch, patch_dim), N_patch = Σ t·h·w, each row one patch flattened (C, T, ph, pw);
        grid_thw: (n_images, 3) int64 (t, h, w) in patches; attention: a function with the
        :func:`dimple_rt.reference.masked_attention` signature. Returns: (N_patch / m², out_hidden_size) in
        the dtype of the weights.
        """
        cfg = self.config
        unit = cfg.spatial_merge_size**2
        grids = _grids(grid_thw)
        n_patch = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (n_patch, cfg.patch_dim):
            raise ValueError(
                f"pixel_values must be (N_patch={n_patch}, patch_dim={cfg.patch_dim}) for grid_thw "
                f"{grid_thw.tolist()}, got {tuple(pixel_values.shape)}"
            )
        device = pixel_values.device

        # Per-request indices, computed once for all blocks.
        rotary_ids = vision_rotary_ids(grid_thw, cfg.spatial_merge_size)  # (N_patch, 2)
        angles = vision_rotary_freqs(rotary_ids, cfg.head_dim, max(max(h, w) for _, h, w in grids))  # (N_patch, hd/2)
        merged_order, cu_window = window_index(grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        patch_order = (merged_order[:, None] * unit + torch.arange(unit)).flatten()  # (N_patch,) whole merge groups
        emb = torch.cat([angles, angles], dim=-1)[patch_order].to(device)  # (N_patch, head_dim) fp32, window order
        cos, sin = emb.cos(), emb.sin()
        cu_window = cu_window.to(device)
        cu_image = image_cu_seqlens(grid_thw).to(device)
        full_blocks = set(cfg.fullatt_block_indexes)

        x = self.patch_embed(pixel_values)[patch_order.to(device)]  # (N_patch, hidden), window order
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_image if i in full_blocks else cu_window, attention)
        merged = self.merger(x)  # (N_patch / m², out_hidden), window order
        return merged[torch.argsort(merged_order).to(device)]  # back to merge-block (processor) order
