# SPDX-License-Identifier: Apache-2.0
"""DimpleTokenizer against transformers' Qwen2Tokenizer built from the same vocab.json / merges.txt.

A second, independent oracle is a port of the pure-Python Qwen2 tokenizer of transformers 4.x (regex + BPE loop),
which Dimple's own slow ``DimpleTokenizer`` inherits: it checks the pipeline itself, not just that two users of the
``tokenizers`` library agree. Strings are generated deterministically to cover accents (NFC and NFD input), CJK,
emoji, digit and whitespace runs, newlines, contractions and added tokens embedded in text.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
import regex
import torch
from _transformers_oracle import require_transformers

from dimple_rt.testing.tiny_tokenizer import ADDED_TOKENS, write_tiny_tokenizer
from dimple_rt.tokenizer import DimpleTokenizer

transformers = require_transformers()

NUM_RANDOM_STRINGS = 300

# Written out again rather than imported, so that the reference does not share a typo with the code under test.
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Dream-7B's ids for the tokens, to check the tiny checkpoint keeps their offsets from <|endoftext|> (spec §2).
DREAM_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|beginoftext|>": 151665,
    "<|mask|>": 151666,
}

WORDS = [
    "the", "The", "circle", "squares", "RED", "blue", "Describe", "image", "hello", "world", "x", "a",
    "naïve", "Café", "résumé", "jalapeño", "über", "Ångström", "São", "Zażółć",
    "東京", "这是一个", "빨간", "Привет", "Σίσυφος", "مرحبا", "नमस्ते",
]  # fmt: skip
SYMBOLS = [
    "😀", "🚀", "❤️", "👍🏽", "👨‍👩‍👧", "🇯🇵", "€", "©", "±", "—", "…", "«»", "¿", "½", "²",
    ".", ",", "?", "!", "...", "?!", ":", ";", "(", ")", "[x]", "{}", "$", "%", "#", "@", "&&", "->", "==", "'", '"',
]  # fmt: skip
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ll", "'D", "n't", "'x"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", " \t\n", "\n   "]
NEAR_SPECIAL = ["<|", "|>", "<|im_", "<|mask|", "|mask|>", "<|endoftext", "< |im_end| >", "<tool_call"]
SPECIALS = [token for token, _ in ADDED_TOKENS]

# Hand-picked edge cases, then random mixes of the fragments above.
FIXED_STRINGS = [
    "",
    " ",
    "\n",
    "Describe this image.",
    "It's 12345 o'clock; they'll say I'M LATE, you'd think.",
    "Cafe\u0301 vs Café",  # NFD vs NFC: NFC folds the first into the second
    "e\u0301\u0301 a\u0308 n\u0303",
    "1234567890" * 5,
    "    indented\n\tcode()\r\n\r\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n",
    "<|mask|><|mask|><|mask|>",
    "text<|endoftext|>more<|endoftext|><|endoftext|>",
    "<tool_call>{}</tool_call> <|fim_prefix|>",
    "<|im_start|> spaced <|im_end|>",
    "no <|im_start special",
]


def _random_string(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.30:
            word = rng.choice(WORDS)
            pieces.append(unicodedata.normalize(rng.choice(["NFC", "NFD"]), word))
        elif kind < 0.45:
            pieces.append(rng.choice(WHITESPACE))
        elif kind < 0.58:
            pieces.append(rng.choice(SYMBOLS))
        elif kind < 0.68:
            pieces.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9))))
        elif kind < 0.76:
            pieces.append(rng.choice(CONTRACTIONS))
        elif kind < 0.88:
            pieces.append(rng.choice(SPECIALS))
        else:
            pieces.append(rng.choice(NEAR_SPECIAL))
    return "".join(pieces)


def _strings() -> list[str]:
    rng = random.Random(0)
    return FIXED_STRINGS + [_random_string(rng) for _ in range(NUM_RANDOM_STRINGS)]


STRINGS = _strings()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte → printable-character map.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _slow_qwen2_encoder(directory: Path, added: dict[str, int]) -> Callable[[str], list[int]]:
    """Port of transformers 4.x ``Qwen2Tokenizer``: NFC on the whole text, split on added tokens (longest match),
    Qwen2 regex, byte map, greedy lowest-rank BPE."""
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(x for x in lines if x and not x.startswith("#"))}
    byte_map = _bytes_to_unicode()
    pattern = regex.compile(QWEN2_REGEX)
    added_re = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")

    def bpe(word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(text: str) -> list[int]:
        ids = []
        for chunk in added_re.split(unicodedata.normalize("NFC", text)):
            if chunk in added:
                ids.append(added[chunk])
                continue
            for piece in pattern.findall(chunk):
                ids.extend(vocab[symbol] for symbol in bpe(tuple(byte_map[b] for b in piece.encode("utf-8"))))
        return ids

    return encode


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two copies of the tiny checkpoint: vocab.json + merges.txt only, and tokenizer.json only."""
    plain = tmp_path_factory.mktemp("tiny_vocab_merges")
    fast = tmp_path_factory.mktemp("tiny_tokenizer_json")
    write_tiny_tokenizer(plain)
    write_tiny_tokenizer(fast, with_tokenizer_json=True)
    for name in ("vocab.json", "merges.txt"):  # so that loading cannot fall back to them
        (fast / name).unlink()
    return {"plain": plain, "fast": fast}


@pytest.fixture(scope="module")
def ours(tiny_dirs: dict[str, Path]) -> DimpleTokenizer:
    return DimpleTokenizer.from_pretrained(tiny_dirs["plain"])


@pytest.fixture(scope="module")
def ours_fast(tiny_dirs: dict[str, Path]) -> DimpleTokenizer:
    return DimpleTokenizer.from_pretrained(tiny_dirs["fast"])


@pytest.fixture(scope="module")
def oracle(tiny_dirs: dict[str, Path]):
    directory = tiny_dirs["plain"]
    assert not (directory / "tokenizer.json").exists()  # so transformers must build from vocab.json + merges.txt
    tok = transformers.Qwen2Tokenizer.from_pretrained(directory)
    backend = json.loads(tok.backend_tokenizer.to_str())
    merges = [m for m in (directory / "merges.txt").read_text().split("\n") if m and not m.startswith("#")]
    assert len(backend["model"]["merges"]) == len(merges)
    assert backend["normalizer"]["type"] == "NFC"
    return tok


@pytest.fixture(scope="module")
def slow_encode(tiny_dirs: dict[str, Path], ours: DimpleTokenizer) -> Callable[[str], list[int]]:
    added = {token: ours.convert_tokens_to_ids(token) for token in SPECIALS}
    return _slow_qwen2_encoder(tiny_dirs["plain"], added)


def test_encode_matches_transformers(ours: DimpleTokenizer, oracle) -> None:
    for text in STRINGS:
        assert ours.encode(text) == oracle.encode(text, add_special_tokens=False), repr(text)


def test_encode_matches_slow_qwen2(ours: DimpleTokenizer, slow_encode: Callable[[str], list[int]]) -> None:
    for text in STRINGS:
        assert ours.encode(text) == slow_encode(text), repr(text)


def _pieces(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def test_pre_tokenisation_matches_transformers_and_regex(ours: DimpleTokenizer, oracle) -> None:
    # The tiny vocabulary is too small to expose every regex branch through ids (there are no multi-digit or
    # cross-contraction merges to get wrong), so compare the pre-tokenised pieces directly.
    byte_map = _bytes_to_unicode()
    pattern = regex.compile(QWEN2_REGEX)
    mine, theirs = ours.backend_tokenizer.pre_tokenizer, oracle.backend_tokenizer.pre_tokenizer
    for text in STRINGS:
        text = unicodedata.normalize("NFC", text)
        want = ["".join(byte_map[b] for b in piece.encode("utf-8")) for piece in pattern.findall(text)]
        assert _pieces(mine, text) == _pieces(theirs, text) == want, repr(text)
    assert ours.backend_tokenizer.normalizer.normalize_str("Cafe\u0301") == "Café"


def test_decode_matches_transformers_and_round_trips(ours: DimpleTokenizer, oracle) -> None:
    for text in STRINGS:
        ids = ours.encode(text)
        assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=False), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True), repr(text)
        # Encoding normalises to NFC, so that is what comes back; the added tokens never touch a combining mark here.
        assert ours.decode(ids) == unicodedata.normalize("NFC", text), repr(text)


def test_nfd_input_encodes_as_nfc(ours: DimpleTokenizer) -> None:
    assert ours.encode("Cafe\u0301 nai\u0308ve") == ours.encode("Café naïve")


def test_both_construction_paths_agree(ours: DimpleTokenizer, ours_fast: DimpleTokenizer) -> None:
    assert ours_fast.encode_batch(STRINGS) == ours.encode_batch(STRINGS)
    assert (len(ours_fast), ours_fast.vocab_size) == (len(ours), ours.vocab_size)
    assert ours_fast.special_tokens_map == ours.special_tokens_map
    assert ours_fast.chat_template == ours.chat_template
    for token in SPECIALS:
        assert ours_fast.convert_tokens_to_ids(token) == ours.convert_tokens_to_ids(token)


def test_encode_batch_matches_encode(ours: DimpleTokenizer) -> None:
    assert ours.encode_batch(STRINGS) == [ours.encode(text) for text in STRINGS]


def test_no_bos_or_eos_is_added(ours: DimpleTokenizer) -> None:
    assert ours.encode("") == []
    ids = ours.encode("hello")
    assert ours.convert_tokens_to_ids("<|im_start|>") not in ids
    assert ids[-1] not in (ours.eos_token_id, ours.pad_token_id)


def test_sizes_and_special_ids_match_transformers(ours: DimpleTokenizer, oracle) -> None:
    assert len(ours) == len(oracle)
    assert ours.vocab_size == oracle.vocab_size
    assert ours.pad_token_id == oracle.pad_token_id == oracle.convert_tokens_to_ids("<|endoftext|>")
    assert ours.eos_token_id == oracle.eos_token_id == oracle.convert_tokens_to_ids("<|im_end|>")
    assert ours.mask_token_id == oracle.mask_token_id == oracle.convert_tokens_to_ids("<|mask|>")
    assert ours.image_pad_token_id == oracle.convert_tokens_to_ids("<|image_pad|>")
    assert ours.vision_start_token_id == oracle.convert_tokens_to_ids("<|vision_start|>")
    assert ours.vision_end_token_id == oracle.convert_tokens_to_ids("<|vision_end|>")
    assert ours.convert_tokens_to_ids(SPECIALS) == oracle.convert_tokens_to_ids(SPECIALS)
    assert ours.special_tokens_map == oracle.special_tokens_map


def test_config_variants_match_transformers(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    # AddedToken dicts for named tokens, and a named special token whose decoder entry says special=False
    # (transformers forces the flag on, so skip_special_tokens drops it).
    directory = _copy(tiny_dirs["plain"], tmp_path / "ckpt")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", "special": True, "normalized": False}
    im_end = next(k for k, v in config["added_tokens_decoder"].items() if v["content"] == "<|im_end|>")
    config["added_tokens_decoder"][im_end]["special"] = False
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, oracle = DimpleTokenizer.from_pretrained(directory), transformers.Qwen2Tokenizer.from_pretrained(directory)
    text = "<|im_start|>user hi<|im_end|>\n<tool_call>x<|endoftext|>"
    ids = ours.encode(text)
    assert ids == oracle.encode(text, add_special_tokens=False)
    assert (
        ours.decode(ids, skip_special_tokens=True)
        == oracle.decode(ids, skip_special_tokens=True)
        == "user hi\n<tool_call>x"
    )
    assert ours.special_tokens_map == oracle.special_tokens_map


def test_unknown_token_raises(ours: DimpleTokenizer) -> None:
    with pytest.raises(KeyError, match="not-a-token"):
        ours.convert_tokens_to_ids("not-a-token")


def test_tiny_checkpoint_layout(tmp_path: Path) -> None:
    ids = write_tiny_tokenizer(tmp_path / "a")
    again = write_tiny_tokenizer(tmp_path / "b", with_tokenizer_json=True)
    assert ids == again
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]  # no temp files left behind
    base = ids["<|endoftext|>"]
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    assert base == len(vocab) and 500 <= base <= 1000
    for token, dream_id in DREAM_IDS.items():
        assert ids[token] - base == dream_id - DREAM_IDS["<|endoftext|>"], token
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == {v: k for k, v in ids.items()}
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert config["mask_token"] == "<|mask|>" and config["padding_side"] == "left"


def test_answer_ids_cut_at_first_terminator(ours: DimpleTokenizer) -> None:
    body = ours.encode("A red circle.")
    eot, im_end = ours.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert ours.answer_ids(body + [eot, eot, eot]) == body
    assert ours.answer_ids(body + [im_end] + ours.encode("junk")) == body
    assert ours.answer_ids(body + [eot, im_end]) == body
    assert ours.answer_ids(body) == body
    assert ours.answer_ids([eot] + body) == []
    assert ours.answer_text(torch.tensor(body + [eot, ours.mask_token_id])) == "A red circle."


def test_pad_batch_pads_on_the_left(ours: DimpleTokenizer) -> None:
    seqs = [[5, 6, 7], [8], []]
    input_ids, attention_mask = ours.pad_batch(seqs)
    pad = ours.pad_token_id
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [pad, pad, 8], [pad, pad, pad]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="at least one"):
        ours.pad_batch([])


def test_pad_batch_matches_transformers_left_padding(ours: DimpleTokenizer, oracle) -> None:
    texts = STRINGS[3:9]
    oracle.padding_side = "left"
    want = oracle(texts, padding="longest", add_special_tokens=False, return_tensors="pt")
    input_ids, attention_mask = ours.pad_batch(ours.encode_batch(texts))
    assert torch.equal(input_ids, want["input_ids"])
    assert torch.equal(attention_mask, want["attention_mask"])


# Error paths ----------------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_names_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        DimpleTokenizer.from_pretrained(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert name in message


@pytest.mark.parametrize("missing", ["merges.txt", "vocab.json", "tokenizer_config.json"])
def test_missing_file(tiny_dirs: dict[str, Path], tmp_path: Path, missing: str) -> None:
    directory = _copy(tiny_dirs["plain"], tmp_path / "ckpt")
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        DimpleTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("corrupt", ["tokenizer_config.json", "vocab.json", "tokenizer.json"])
def test_corrupt_json_names_file(tiny_dirs: dict[str, Path], tmp_path: Path, corrupt: str) -> None:
    directory = _copy(tiny_dirs["fast" if corrupt == "tokenizer.json" else "plain"], tmp_path / "ckpt")
    (directory / corrupt).write_text('{"truncated": ', encoding="utf-8")
    with pytest.raises(ValueError, match=corrupt.replace(".", r"\.")):
        DimpleTokenizer.from_pretrained(directory)


def test_bad_merges_line_names_file(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny_dirs["plain"], tmp_path / "ckpt")
    with (directory / "merges.txt").open("a", encoding="utf-8") as handle:
        handle.write("one two three\n")
    with pytest.raises(ValueError, match=r"merges\.txt"):
        DimpleTokenizer.from_pretrained(directory)


def test_added_token_id_mismatch_is_rejected(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny_dirs["plain"], tmp_path / "ckpt")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = config["added_tokens_decoder"]
    first = min(decoder, key=int)
    decoder[str(int(first) + 1000)] = decoder.pop(first)
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="should have id"):
        DimpleTokenizer.from_pretrained(directory)


def test_no_chat_template(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny_dirs["plain"], tmp_path / "ckpt")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = DimpleTokenizer.from_pretrained(directory)
    assert tok.chat_template is None
    assert tok.encode("still works") == DimpleTokenizer.from_pretrained(tiny_dirs["plain"]).encode("still works")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
