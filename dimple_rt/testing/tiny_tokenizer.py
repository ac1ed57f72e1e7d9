# SPDX-License-Identifier: Apache-2.0
"""A tiny Dimple tokenizer checkpoint in the Hugging Face layout, for tests.

The real vocabulary has 151,643 BPE tokens; tests need the same *shape* of checkpoint but small enough to train in
well under a second: :mod:`dimple_rt.tiny.tokenizer`'s trainer and layout on its generic corpus alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import AddedToken

from dimple_rt.io import write_text
from dimple_rt.tiny.tokenizer import ADDED_TOKENS, CORPUS, QWEN2_5_VL_CHAT_TEMPLATE, train_base, write_layout

__all__ = ["ADDED_TOKENS", "QWEN2_5_VL_CHAT_TEMPLATE", "VOCAB_SIZE", "write_tiny_tokenizer"]

VOCAB_SIZE = 768  # base BPE vocabulary: 256 byte symbols plus learned merges


def write_tiny_tokenizer(directory: str | os.PathLike[str], *, with_tokenizer_json: bool = False) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (and optionally ``tokenizer.json``).

    Returns the map from each added token's string to its id, to fill ``config.json`` consistently.
    """
    tokenizer = train_base(CORPUS, VOCAB_SIZE, min_frequency=1)
    ids = write_layout(directory, tokenizer, model_max_length=131072)
    if with_tokenizer_json:
        # Added tokens take the next free ids in call order, which is exactly ADDED_TOKENS' order.
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in ADDED_TOKENS])
        if any(tokenizer.token_to_id(token) != token_id for token, token_id in ids.items()):
            raise RuntimeError("tokenizers assigned the added tokens unexpected ids")
        write_text(Path(directory) / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    return ids
