# SPDX-License-Identifier: Apache-2.0
"""Write a tiny random Dimple checkpoint in the exact Hugging Face layout of ``rp-yu/Dimple-7B``.

``config.json`` (``model_type`` "dimple" with a nested ``vision_config``), ``model.safetensors`` or shards with
``model.safetensors.index.json``, the tokenizer files with Dimple's special-token strings and
``preprocessor_config.json``. Real weights cannot be downloaded on our machines, so every test of loading,
the model and generation runs on checkpoints made here; only the sizes differ from Dimple-7B.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dimple_rt.config import DimpleConfig, VisionConfig
from dimple_rt.io import write_json
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.processor import ImageProcessor
from dimple_rt.weights import save_state_dict

from .tiny_tokenizer import write_tiny_tokenizer


@dataclass
class TinySizes:
    """Sizes of the tiny model; the defaults keep a forward well under a second on 2 cores."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 48
    max_pixels: int = 112896
    min_pixels: int = 3136


def special_token_fields(special_ids: Mapping[str, int]) -> dict[str, int]:
    """DimpleConfig's special-token id fields from the test tokenizer's ids (``write_tiny_tokenizer``'s)."""
    end = special_ids["<|endoftext|>"]
    return {
        "mask_token_id": special_ids["<|mask|>"],
        "pad_token_id": end,
        "bos_token_id": end,
        "eos_token_id": end,
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
    }


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary pairs over (t, h, w) in Dimple's 16:24:24 proportion."""
    pairs = head_dim // 2
    h = w = (pairs * 3) // 8
    return [pairs - h - w, h, w]


def tiny_config(special_ids: dict[str, int], vocab_size: int, sizes: TinySizes, vision: bool = True) -> DimpleConfig:
    """A valid :class:`DimpleConfig` for the tiny model, with the tokenizer's special ids."""
    head_dim = sizes.hidden_size // sizes.num_attention_heads
    vision_config = None
    if vision:
        vision_config = VisionConfig(
            depth=sizes.vision_depth,
            hidden_size=sizes.vision_hidden_size,
            num_heads=sizes.vision_num_heads,
            intermediate_size=sizes.vision_intermediate_size,
            fullatt_block_indexes=[sizes.vision_depth - 1],
            out_hidden_size=sizes.hidden_size,
        )
    return DimpleConfig(
        model_type="dimple" if vision else "Dream",
        vocab_size=vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=4096,
        **special_token_fields(special_ids),
        mrope_section=_mrope_section(head_dim),
        vision_config=vision_config,
    )


def random_state_dict(config: DimpleConfig, seed: int, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every parameter of the model (norm weights around 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DimpleModel(config)
    state: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        noise = torch.randn(param.shape, generator=generator) * std
        state[name] = (
            1.0 + noise
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name
            else noise
        )
    return state


def write_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    vision: bool = True,
    seed: int = 0,
    sizes: TinySizes | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a tiny random checkpoint into ``directory`` (created if needed) and return its path.

    ``vision=False`` writes a text-only Dream-style checkpoint; ``max_shard_bytes`` writes shards with an
    index, as large checkpoints are published; ``vocab_size`` pads the model's vocabulary beyond the tokenizer's,
    as Dimple-7B's 152064 rows exceed its tokenizer (benchmarks use it for real LM-head sizes).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = sizes or TinySizes()
    special_ids = write_tiny_tokenizer(directory)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    needed = max(max(vocab.values()), max(special_ids.values())) + 1
    if vocab_size is not None and vocab_size < needed:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {needed} ids")
    vocab_size = vocab_size or needed
    config = tiny_config(special_ids, vocab_size, sizes, vision)
    write_json(directory / "config.json", config.to_dict())
    state = {name: tensor.to(dtype) for name, tensor in random_state_dict(config, seed).items()}
    save_state_dict(state, directory, max_shard_bytes=max_shard_bytes)
    if vision:
        ImageProcessor(min_pixels=sizes.min_pixels, max_pixels=sizes.max_pixels).save(directory)
    return directory
