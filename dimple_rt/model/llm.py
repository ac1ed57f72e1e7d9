# SPDX-License-Identifier: Apache-2.0
"""The Dream / Qwen2 decoder of Dimple, bidirectional (Dimple's mask) or causal.

Parameter names below ``model.`` follow the checkpoint exactly (spec §1.9). Attention goes through an
injected :class:`~dimple_rt.model.backend.AttentionFn`, so the same module runs on the plain-torch reference
or on the C++ kernels. K/V of a reused prompt prefix come in per layer (``prefix_kv``); the layer returns its
fresh K/V (after rotary) so that a caller can keep them as a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dimple_rt.config import DimpleConfig

from .backend import AttentionFn
from .layers import GatedMLP, RMSNorm
from .rope import apply_rotary


@dataclass
class AttentionInputs:
    """Per-forward attention context shared by all layers.

    cos/sin: (batch, len, head_dim) rotary tables of the current tokens; key_mask: bool
    (batch, prefix_len + len) or None (every token real); causal: AR training stages.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None
    causal: bool
    attention: AttentionFn


class DecoderAttention(nn.Module):
    """GQA self-attention with biased q/k/v projections and an unbiased output projection."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionInputs,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (batch, len, hidden) → output (batch, len, hidden) and this call's (k, v), each
        (batch, len, kv_heads, head_dim) with rotary already applied to k."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)  # (B, L, H, D)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        q = apply_rotary(q, ctx.cos, ctx.sin)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        prefix_k, prefix_v = prefix_kv if prefix_kv is not None else (None, None)
        out = ctx.attention(q, k, v, prefix_k, prefix_v, ctx.key_mask, None, ctx.causal)  # (B, L, H, D)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim)), (k, v)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionInputs,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, kv = self.self_attn(self.input_layernorm(x), ctx, prefix_kv)
        h = x + attn_out
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Decoder(nn.Module):
    """``model.*``: token embedding, decoder layers and the final norm (no LM head)."""

    def __init__(self, config: DimpleConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        ctx: AttentionInputs,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """inputs_embeds: (batch, len, hidden) → final hidden states (batch, len, hidden) and, if
        ``keep_kv``, every layer's fresh (k, v) of this call (else an empty list)."""
        x = inputs_embeds
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, ctx, prefix_kv[index] if prefix_kv is not None else None)
            if keep_kv:
                new_kv.append(kv)
        return self.norm(x), new_kv
