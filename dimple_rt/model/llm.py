# SPDX-License-Identifier: Apache-2.0
"""The Dream / Qwen2 decoder of Dimple, bidirectional (Dimple's mask) or causal.

Parameter names below ``model.`` follow the checkpoint exactly (spec §1.9). Attention and the cache write go
through an injected :class:`~dimple_rt.backend.Backend`, so the same module runs on the plain-torch reference
or on the C++ kernels. With a :class:`~dimple_rt.model.kv_cache.KVCache` (prefilling) each layer writes its
rotated K/V into its cache buffers at ``cache_start`` and attends over the buffer: the keys before
``cache_start`` are the prompt prefix reused from an earlier forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dimple_rt.backend import Backend
from dimple_rt.config import DimpleConfig

from .kv_cache import KVCache
from .layers import GatedMLP, Linear, RMSNorm
from .rope import apply_rotary


@dataclass
class AttentionInputs:
    """Per-forward attention context shared by all layers.

    cos/sin: (batch, len, head_dim) rotary tables of the current tokens; key_mask: bool
    (batch, prefix_len + len + suffix_len) or None (every token real); causal: AR training stages; backend:
    attention and cache write; cache: the per-request K/V cache, or None; cache_start: where this forward's K/V
    go in it (the keys before it are the prefix); cache_suffix: how many cached positions right after this
    forward's tokens are attended too (the dual cache's suffix), 0 for none.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None
    causal: bool
    backend: Backend
    cache: KVCache | None = None
    cache_start: int = 0
    cache_suffix: int = 0


class DecoderAttention(nn.Module):
    """GQA self-attention with biased q/k/v projections and an unbiased output projection."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionInputs, layer_index: int) -> torch.Tensor:
        """x: (batch, len, hidden) → (batch, len, hidden). ``layer_index`` picks this layer's cache buffers."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)  # (B, L, H, D)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        q = apply_rotary(q, ctx.cos, ctx.sin)
        prefix_k = prefix_v = suffix_k = suffix_v = None
        if ctx.cache is None:
            k = apply_rotary(k, ctx.cos, ctx.sin)
        else:
            start, (cache_k, cache_v) = ctx.cache_start, ctx.cache.layers[layer_index]
            end = start + length
            ctx.backend.kv_cache_write(cache_k, cache_v, k, v, ctx.cos, ctx.sin, start)
            k, v = cache_k[:, start:end], cache_v[:, start:end]  # (B, L, Hkv, D) views
            if start:
                prefix_k, prefix_v = cache_k[:, :start], cache_v[:, :start]  # (B, start, Hkv, D) views
            if ctx.cache_suffix:  # the dual cache's suffix: (B, S, Hkv, D) views, read in place
                suffix_end = end + ctx.cache_suffix
                suffix_k, suffix_v = cache_k[:, end:suffix_end], cache_v[:, end:suffix_end]
        out = ctx.backend.attention(
            q, k, v, prefix_k, prefix_v, ctx.key_mask, None, ctx.causal, suffix_k=suffix_k, suffix_v=suffix_v
        )  # (B, L, H, D)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionInputs, layer_index: int) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx, layer_index)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """``model.*``: token embedding, decoder layers and the final norm (no LM head)."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, ctx: AttentionInputs) -> torch.Tensor:
        """inputs_embeds: (batch, len, hidden) → final hidden states (batch, len, hidden)."""
        x = inputs_embeds
        for index, layer in enumerate(self.layers):
            x = layer(x, ctx, index)
        return self.norm(x)
