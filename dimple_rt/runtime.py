# SPDX-License-Identifier: Apache-2.0
"""Runtime: owns the model, tokenizer, image processor, device and backend of one checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DimpleConfig
from .model.backend import BACKENDS, attention_for
from .model.dimple import DimpleModel
from .processor import ImageProcessor, expand_image_placeholders
from .tokenizer import DimpleTokenizer
from .weights import load_state_dict_into, resolve_model

Message = dict[str, Any]
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ModelInputs:
    """Exactly what the authors' processor returns: input_ids and attention_mask (batch, len), left padded;
    pixel_values (patches, patch_dim) and image_grid_thw (images, 3), or None without images."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


def _images_of(messages: Sequence[Message]) -> list[Any]:
    """Image items of a conversation in order: ``{"type": "image", "image": ...}`` (or an ``image`` key)."""
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
                    if "image" not in item:
                        raise ValueError(f"image item without an 'image' field: {item!r}")
                    found.append(item["image"])
    return found


class Runtime:
    """A loaded Dimple checkpoint.

    ``model`` is an alias (``"dimple-7b"``), a folder in Hugging Face layout, or a repo id found in the
    local Hugging Face cache. ``dtype`` defaults to fp32 on CPU; ``backend`` is ``"kernels"`` (the C++/CUDA
    ops) or ``"reference"`` (plain torch).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "kernels",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype = dtype if dtype is not None else torch.float32
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype}")
        self.backend = backend
        self.attention = attention_for(backend)
        self.path: Path = resolve_model(model)
        self.config = DimpleConfig.from_json_file(self.path / "config.json")
        with torch.device("meta"):
            self.model = DimpleModel(self.config)
        load_state_dict_into(self.model, self.path, dtype=self.dtype, device=self.device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = DimpleTokenizer.from_pretrained(self.path)
        self.processor: ImageProcessor | None = None
        if self.config.vision_config is not None:
            self.processor = ImageProcessor.from_pretrained(self.path)

    def prepare(self, conversations: str | Sequence[Message] | Sequence[Sequence[Message]]) -> ModelInputs:
        """Chat template → image placeholder expansion → token ids, left padded, as the authors' processor.

        A plain string is one user turn; a list of messages is one conversation; a list of conversations is
        a batch. Images are the conversation's image items (paths, PIL images or uint8 arrays).
        """
        if isinstance(conversations, str):
            batch = [[{"role": "user", "content": conversations}]]
        elif conversations and isinstance(conversations[0], dict):
            batch = [list(conversations)]  # type: ignore[list-item]
        else:
            batch = [list(conv) for conv in conversations]  # type: ignore[arg-type]
        if not batch or any(not conv for conv in batch):
            raise ValueError("prepare needs at least one non-empty conversation")
        texts = [self.tokenizer.apply_chat_template(conv, add_generation_prompt=True) for conv in batch]
        images = [image for conv in batch for image in _images_of(conv)]
        pixel_values = image_grid_thw = None
        if images:
            if self.processor is None:
                raise ValueError("this checkpoint has no vision tower (text-only model): it cannot take images")
            processed = self.processor(images)
            pixel_values, image_grid_thw = processed.pixel_values, processed.image_grid_thw
            texts = expand_image_placeholders(texts, image_grid_thw)
        input_ids, attention_mask = self.tokenizer.pad_batch([self.tokenizer.encode(t) for t in texts])
        return ModelInputs(input_ids, attention_mask, pixel_values, image_grid_thw)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unshifted logits ``(batch, len, vocab)`` of one full-sequence forward, as the authors'
        ``DimpleModel.forward`` returns them (bidirectional attention with Dimple's mask)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, len), got {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}"
            )
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw go together: give both or neither")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        features = None
        if pixel_values is not None:
            assert image_grid_thw is not None
            features = self.model.encode_images(pixel_values.to(self.device), image_grid_thw, self.attention)
        out = self.model(
            input_ids,
            self.attention,
            attention_mask=attention_mask,
            image_features=features,
            image_grid_thw=image_grid_thw,
        )
        return out.logits
