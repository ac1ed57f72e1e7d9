# SPDX-License-Identifier: Apache-2.0
"""DimpleModel: vision tower → SiLU projector → scatter at ``<|image_pad|>`` → decoder → untied LM head.

The state-dict prefixes are the checkpoint's: ``visual``, ``img_projector``, ``model``, ``lm_head``. Image
features are computed by :meth:`DimpleModel.encode_images` once per request and passed to every forward, so
the vision tower never reruns per denoising step (the reference reruns it; the result is identical).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dimple_rt.backend import Backend
from dimple_rt.config import DimpleConfig

from .kv_cache import KVCache
from .layers import Linear
from .llm import AttentionInputs, Decoder
from .rope import get_rope_index, rotary_cos_sin
from .vision import VisionTower


class ImageProjector(nn.Module):
    """``img_projector``: Linear(out_hidden_size → hidden) → SiLU → Linear(hidden → hidden), as the authors'
    (Dimple's own, not GELU); ``in_features`` is the vision merger's ``out_hidden_size``, 3584 = hidden_size in
    Dimple-7B, but the two may differ."""

    def __init__(self, hidden_size: int, in_features: int | None = None) -> None:
        super().__init__()
        self.linear_1 = Linear(hidden_size if in_features is None else in_features, hidden_size, bias=True)
        self.act = nn.SiLU()
        self.linear_2 = Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


@dataclass
class ForwardOutput:
    """logits: (batch, rows, vocab) for the requested rows; rope_deltas: (batch, 1) when positions were
    computed here, else None."""

    logits: torch.Tensor
    rope_deltas: torch.Tensor | None


def key_mask_from(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention op's bool key mask, or None when every token is real (the kernels' fast path)."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    return None if bool(mask.all()) else mask


class DimpleModel(nn.Module):
    """The whole Dimple network; ``config.vision_config is None`` gives a text-only Dream model."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.config = config
        if config.vision_config is not None:
            self.visual = VisionTower(config.vision_config)
            self.img_projector = ImageProjector(config.hidden_size, config.vision_config.out_hidden_size)
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, backend: Backend) -> torch.Tensor:
        """pixel_values: (patches, patch_dim), image_grid_thw: (images, 3) → projected features
        (patches / merge², hidden) in the processor's merge-block order."""
        if self.config.vision_config is None:
            raise ValueError("this checkpoint has no vision tower (text-only model): it cannot take images")
        dtype = self.lm_head.weight.dtype
        features = self.visual(pixel_values.to(dtype), image_grid_thw, backend.attention)  # (tokens, hidden)
        return self.img_projector(features)

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (batch, len, hidden) with image features scattered, in row-major order, over
        the ``<|image_pad|>`` positions, or over ``image_mask`` (batch, len) when given: generation passes the
        prompt's placeholders, so an ``<|image_pad|>`` the model writes into the canvas stays a plain token."""
        embeds = self.model.embed_tokens(input_ids)  # (B, L, hidden)
        if image_mask is not None:
            is_image = image_mask
        elif self.config.image_token_id is None:  # a text-only model has no image placeholder id
            is_image = torch.zeros_like(input_ids, dtype=torch.bool)
        else:
            is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        n_features = 0 if image_features is None else image_features.shape[0]
        if n_slots != n_features:
            raise ValueError(
                f"input_ids hold {n_slots} <|image_pad|> tokens but the images give {n_features} features: "
                "each image needs exactly t*h*w/4 placeholders"
            )
        if n_slots:
            embeds = embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        backend: Backend,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int = 0,
        cache_suffix: int = 0,
        logits_rows: torch.Tensor | None = None,
        causal: bool | None = None,
    ) -> ForwardOutput:
        """One forward of the current tokens ``input_ids (batch, len)``.

        attention_mask: (batch, prefix_len + len + suffix_len) 0/1 over the prefix, the current tokens and the
        suffix. position_ids: (3, batch, len); computed with :func:`get_rope_index` when None (only valid without
        a prefix). backend: the attention and cache-write implementations. cache: the K/V cache; this
        call's tokens are written at ``cache_start``, the keys before it are the prefix and the ``cache_suffix``
        cached keys right after this call's tokens are the suffix (the dual cache). image_features:
        from :meth:`encode_images`, scattered over ``image_mask`` (default: the ``<|image_pad|>`` ids).
        logits_rows: optional bool (batch, len): only those rows go through the LM head, returned as
        (1, rows, vocab) in row-major order.
        causal: defaults to ``not config.full_attn_mask``.
        """
        rope_deltas = None
        if position_ids is None:
            if cache is not None and cache_start:
                raise ValueError("position_ids are required when a prefix cache is given")
            position_ids, rope_deltas = get_rope_index(input_ids, self.config, image_grid_thw, attention_mask)
        embeds = self.embed(input_ids, image_features, image_mask)
        cos, sin = rotary_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, self.config.mrope_section, embeds.dtype
        )
        ctx = AttentionInputs(
            cos=cos,
            sin=sin,
            key_mask=key_mask_from(attention_mask),
            causal=(not self.config.full_attn_mask) if causal is None else causal,
            backend=backend,
            cache=cache,
            cache_start=cache_start,
            cache_suffix=cache_suffix,
        )
        hidden = self.model(embeds, ctx)  # (B, L, hidden)
        if logits_rows is not None:
            hidden = hidden[logits_rows][None]  # (1, rows, hidden)
        return ForwardOutput(logits=self.lm_head(hidden), rope_deltas=rope_deltas)
