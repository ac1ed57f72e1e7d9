# SPDX-License-Identifier: Apache-2.0
"""Byte-level BPE tokenizers in Dimple's layout, trained with the `tokenizers` library: dimple-tiny's, and the
small one tests write (:mod:`dimple_rt.testing.tiny_tokenizer`).

Both have Dimple's shape exactly (Qwen2 normaliser and pre-tokeniser, the added tokens after the base vocabulary
in Dimple's order, the Qwen2.5-VL chat template, ``<|endoftext|>`` as pad, ``<|im_end|>`` as eos, ``<|mask|>``);
only the corpus, the vocabulary size and the minimum merge frequency differ. The special tokens keep their offsets
from ``<|endoftext|>`` (``<|mask|>`` = ``<|endoftext|>`` + 23, as 151666 − 151643), so code that looks ids up by
string sees the same structure as with Dimple-7B.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from dimple_rt.io import write_json, write_text
from dimple_rt.tokenizer import PRETOKENIZE_REGEX

# Qwen2.5-VL-7B-Instruct's chat template, verbatim; Dimple's init.py copies it into the checkpoint.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# (token, special) in id order, starting right after the base vocabulary. Qwen2.5's added tokens (151643..151664)
# followed by Dream's two (151665, 151666); the tool/FIM tokens are not special in Qwen2.5.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<|beginoftext|>", True),
    ("<|mask|>", True),
)

ADDITIONAL_SPECIAL_TOKENS = [token for token, special in ADDED_TOKENS[1:14] if special] + [
    "<|beginoftext|>",
    "<|mask|>",
]

# A generic corpus, mixed into every training set: enough variety that the merges cover words, digits, punctuation and multi-byte characters.
CORPUS: tuple[str, ...] = (
    "Describe this image.",
    "What is in the picture? There is a red circle next to a blue square.",
    "A green triangle sits on top of a yellow rectangle.",
    "The image shows three red circles and two blue squares on a white background.",
    "How many shapes are there in the image? There are 5 shapes.",
    "Is the circle bigger than the square? Yes, the circle is bigger.",
    "What colour is the triangle? The triangle is green.",
    "Count the objects: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "The numbers 12345 and 67890 appear in the top left corner.",
    "It's a small purple star, and it isn't moving.",
    "They're standing near the orange hexagon; we've seen it before.",
    "I'm sure you'll like the black and white pattern, they'd said.",
    "Answer the question using a single word or phrase.",
    "Please answer with the option's letter from the given choices directly.",
    "A. red\nB. green\nC. blue\nD. yellow\nAnswer with the letter.",
    "The chart shows values of 3.14, 2.718 and 1.618 for the years 2019, 2020 and 2021.",
    "You are a helpful assistant.",
    "def area(width, height):\n    return width * height\n",
    "Café, naïve, résumé, jalapeño and über are words with accents.",
    "東京の空は青い。 这是一个红色的圆。 빨간 원이 있습니다.",
    "Emoji: 😀 🚀 ❤️ 👍 and symbols like € £ ¥ © ° ± ×.",
    "The quick brown fox jumps over the lazy dog.",
    "    Indented line with tabs\tand  double  spaces.\r\n",
    "Where is the dog? The dog is under the table, to the right of the chair.",
    "Read the text in the image: OPEN 24 HOURS.",
    "Which shape is on the left? The square is on the left and the circle is on the right.",
    "Two cats and one dog are playing in the garden with a ball.",
    "The sign says: Speed limit 60 km/h.",
    "Question: What time is shown on the clock? Answer: 10:45.",
    "A person in a blue shirt is holding an umbrella in the rain.",
    "Σ α β γ δ — Greek letters; Привет, мир!",
    "Total: $1,234.56 (tax included) — 50% off!",
)


def train_base(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (Qwen2 normaliser and pre-tokeniser) with at most ``vocab_size`` tokens on ``texts``."""
    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _token_entry(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def write_layout(directory: str | os.PathLike, tokenizer: Tokenizer, model_max_length: int) -> dict[str, int]:
    """Write ``tokenizer``'s ``vocab.json`` and ``merges.txt`` with Dimple's ``tokenizer_config.json`` (the slow
    layout DimpleTokenizer and transformers both read); return each added token's id, to fill ``config.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    base = len(vocab)
    ids = {token: base + offset for offset, (token, _) in enumerate(ADDED_TOKENS)}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[token]): _token_entry(token, special) for token, special in ADDED_TOKENS},
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": "<|im_start|>",
        "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "mask_token": "<|mask|>",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "DimpleTokenizer",
        "unk_token": "<|endoftext|>",
    }
    write_json(out / "vocab.json", vocab, ensure_ascii=False)
    write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    write_json(out / "tokenizer_config.json", config, ensure_ascii=False)
    return ids


def write_tokenizer(directory: str | os.PathLike, texts: Iterable[str], vocab_size: int = 1024) -> dict[str, int]:
    """Train dimple-tiny's tokenizer on ``texts`` and write it into ``directory``; return the added tokens' ids."""
    # The generic corpus is mixed in so that common English and punctuation get merges too.
    return write_layout(directory, train_base([*texts, *CORPUS], vocab_size), model_max_length=4096)
