# SPDX-License-Identifier: Apache-2.0
"""dimple-tiny's tokenizer: byte-level BPE trained on the task corpus with the `tokenizers` library.

It has Dimple's shape exactly (Qwen2 normaliser and pre-tokeniser, the added tokens after the base vocabulary in
Dimple's order, the Qwen2.5-VL chat template, ``<|endoftext|>`` as pad, ``<|im_end|>`` as eos, ``<|mask|>``),
as :mod:`dimple_rt.testing.tiny_tokenizer` writes it for tests; only the corpus and the vocabulary size differ,
so the constants and the file layout are taken from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from dimple_rt.testing import tiny_tokenizer as layout


def train_base(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (Qwen2 normaliser and pre-tokeniser) with at most ``vocab_size`` tokens on ``texts``."""
    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(layout.PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_tokenizer(directory: str | os.PathLike, texts: Iterable[str], vocab_size: int = 1024) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (the slow layout DimpleTokenizer and
    transformers both read); return each added token's id, to fill ``config.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # The generic corpus of the test tokenizer is mixed in so that common English and punctuation get merges too.
    tokenizer = train_base([*texts, *layout.CORPUS], vocab_size)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    base = len(vocab)
    ids = {token: base + offset for offset, (token, _) in enumerate(layout.ADDED_TOKENS)}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[token]): layout._token_entry(token, special) for token, special in layout.ADDED_TOKENS
        },
        "additional_special_tokens": layout.ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": "<|im_start|>",
        "chat_template": layout.QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "mask_token": "<|mask|>",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "DimpleTokenizer",
        "unk_token": "<|endoftext|>",
    }
    layout._atomic_write(out / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=2) + "\n")
    layout._atomic_write(out / "merges.txt", "#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    layout._atomic_write(out / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return ids
