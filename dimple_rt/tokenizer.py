# SPDX-License-Identifier: Apache-2.0
"""Dimple's tokenizer and chat template, without transformers at runtime.

Dimple's ``DimpleTokenizer`` is Qwen2's byte-level BPE (spec §2). We build the same pipeline on the
``tokenizers`` library, the way ``transformers.Qwen2Tokenizer`` does: NFC, Qwen2's pre-tokenisation regex, byte-level
BPE, a byte-level decoder, and the checkpoint's added tokens split off before any of that. No BOS/EOS is ever added.
The chat template is rendered with jinja2 in the environment Hugging Face uses, so prompts match byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# Qwen2's pre-tokenisation regex (transformers/models/qwen2/tokenization_qwen2.py).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Hugging Face's named special-token attributes, in its order; the chat template sees them as variables.
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Fallback names where tokenizer_config.json leaves a role out; they are Dimple-7B's (spec §2).
DEFAULT_PAD_TOKEN = "<|endoftext|>"
DEFAULT_EOS_TOKEN = "<|im_end|>"
DEFAULT_MASK_TOKEN = "<|mask|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# Training pads answers with <|endoftext|>, chat turns end with <|im_end|>: either ends an answer (spec §4.10).
ANSWER_TERMINATORS = ("<|endoftext|>", "<|im_end|>")

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"


class TokenizerFileError(ValueError):
    """A tokenizer file that is unreadable or cannot describe a tokenizer."""


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerFileError(f"{path} is not valid JSON: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    # Same rules as tokenizers' and transformers' readers: an optional "#version" header, "left right" per line.
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerFileError(f"{path}, line {number}: expected two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_token(value: str | Mapping[str, Any], *, special: bool, source: Path) -> AddedToken:
    """An ``AddedToken`` from a tokenizer_config entry: a plain string or a serialised AddedToken dict."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        raise TokenizerFileError(f"{source}: expected a token string or an AddedToken dict, got {value!r}")
    flags = {key: bool(value[key]) for key in ("single_word", "lstrip", "rstrip", "normalized") if key in value}
    is_special = bool(value.get("special", special))
    flags.setdefault("normalized", not is_special)
    return AddedToken(value["content"], special=is_special, **flags)


def _qwen2_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The pipeline of ``transformers.Qwen2Tokenizer.__init__``, without its added tokens."""
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


def _special_token_strings(config: Mapping[str, Any], source: Path) -> tuple[dict[str, str], list[AddedToken]]:
    """The named special tokens (role → string) and every special token the config names, as AddedTokens."""
    named: dict[str, str] = {}
    tokens: list[AddedToken] = []
    for role in SPECIAL_TOKEN_ATTRIBUTES:
        if config.get(role) is not None:
            token = _added_token(config[role], special=True, source=source)
            named[role] = token.content
            tokens.append(token)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        for value in extra.values() if isinstance(extra, Mapping) else extra:
            tokens.append(_added_token(value, special=True, source=source))
    return named, tokens


def _add_config_tokens(tokenizer: Tokenizer, config: Mapping[str, Any], source: Path) -> dict[str, str]:
    """Register the config's added tokens at their ids, then any other named special token, as transformers does.

    Returns the named special tokens (role → string).
    """
    named, special_tokens = _special_token_strings(config, source)
    named_strings = set(named.values())
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerFileError(f"{source}: added_tokens_decoder must map ids to tokens")
    try:
        entries = sorted((int(key), value) for key, value in decoder.items())
    except ValueError as exc:
        raise TokenizerFileError(f"{source}: added_tokens_decoder keys must be integer ids") from exc
    for token_id, value in entries:
        token = _added_token(value, special=False, source=source)
        if token.content in named_strings:
            token.special = True  # transformers forces the flag on for named special tokens
        # A token not in the vocabulary takes the next free id; the checkpoint's ids must be contiguous for that.
        tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(token.content)
        if got != token_id:
            raise TokenizerFileError(
                f"{source}: added token {token.content!r} should have id {token_id}, but got id {got}"
            )
    tokenizer.add_tokens([token for token in special_tokens if tokenizer.token_to_id(token.content) is None])
    return named


def _plain_template_data(value: Any) -> Any:
    # Like transformers: the sandboxed template sees only JSON-like data; other objects (decoded images, tensors)
    # become inert placeholders. Templates only test whether media keys exist, so the output is unchanged.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain_template_data(key): _plain_template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(item) for item in value)
    return f"<{type(value).__name__}>"


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's override of jinja's tojson, which would HTML-escape characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the environment of transformers' ``_compile_jinja_template``."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _load_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The checkpoint's template; ``chat_template.jinja`` wins over tokenizer_config.json, as in transformers."""
    jinja_file = directory / CHAT_TEMPLATE_JINJA
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    json_file = directory / CHAT_TEMPLATE_JSON
    if template is None and json_file.is_file():
        data = _read_json(json_file)
        if not isinstance(data, dict):
            raise TokenizerFileError(f"{json_file} must hold a JSON object")
        template = data.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerFileError(f"{directory}: chat_template must be a string, got {type(template).__name__}")
    return template


def _as_id_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


class DimpleTokenizer:
    """Qwen2 byte-level BPE with Dimple's special tokens and chat template."""

    def __init__(
        self, tokenizer: Tokenizer, special_tokens: Mapping[str, str] | None = None, chat_template: str | None = None
    ) -> None:
        """``tokenizer`` must already hold the added tokens; ``special_tokens`` maps roles (``pad_token``, …) to
        token strings; ``chat_template`` is the Jinja source, or None when the checkpoint has none."""
        self._tokenizer = tokenizer
        self.special_tokens_map: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DimpleTokenizer:
        """Load from ``tokenizer.json`` when present, else from ``vocab.json`` + ``merges.txt``; special tokens and
        the chat template come from ``tokenizer_config.json`` (and ``chat_template.jinja``/``.json``)."""
        directory = Path(directory)
        config_file = directory / TOKENIZER_CONFIG
        fast_file = directory / TOKENIZER_JSON
        vocab_file, merges_file = directory / VOCAB_JSON, directory / MERGES_TXT
        has_model = fast_file.is_file() or (vocab_file.is_file() and merges_file.is_file())
        if not (config_file.is_file() and has_model):
            raise FileNotFoundError(
                f"no tokenizer in {directory}: looked for {TOKENIZER_CONFIG} plus either {TOKENIZER_JSON} "
                f"or {VOCAB_JSON} + {MERGES_TXT}"
            )
        config = _read_json(config_file)
        if not isinstance(config, dict):
            raise TokenizerFileError(f"{config_file} must hold a JSON object")

        if fast_file.is_file():
            _read_json(fast_file)  # a precise error for malformed JSON; Tokenizer.from_file's is vague
            try:
                tokenizer = Tokenizer.from_file(str(fast_file))
            except Exception as exc:  # tokenizers raises a bare Exception
                raise TokenizerFileError(f"{fast_file} is not a valid tokenizers serialisation: {exc}") from exc
        else:
            vocab = _read_json(vocab_file)
            if not isinstance(vocab, dict):
                raise TokenizerFileError(f"{vocab_file} must map token strings to ids")
            try:
                tokenizer = _qwen2_bpe(vocab, _read_merges(merges_file))
            except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge out of vocabulary
                raise TokenizerFileError(f"cannot build BPE from {vocab_file} and {merges_file}: {exc}") from exc
        named = _add_config_tokens(tokenizer, config, config_file)
        return cls(tokenizer, named, _load_chat_template(directory, config))

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (as in transformers), for inspection."""
        return self._tokenizer

    # Vocabulary -------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary, without added tokens (transformers' ``vocab_size``)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Number of ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token string (or ids of a list); unknown tokens raise KeyError rather than map to unk."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            if token_id is None:
                raise KeyError(f"token {tokens!r} is not in the vocabulary")
            return token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def _role_id(self, role: str, default: str) -> int:
        return self.convert_tokens_to_ids(self.special_tokens_map.get(role, default))

    @cached_property
    def pad_token_id(self) -> int:
        """Padding id (``<|endoftext|>`` in Dimple)."""
        return self._role_id("pad_token", DEFAULT_PAD_TOKEN)

    @cached_property
    def eos_token_id(self) -> int:
        """End-of-turn id (``<|im_end|>`` in Dimple)."""
        return self._role_id("eos_token", DEFAULT_EOS_TOKEN)

    @cached_property
    def mask_token_id(self) -> int:
        """The diffusion mask id (``<|mask|>``)."""
        return self._role_id("mask_token", DEFAULT_MASK_TOKEN)

    @cached_property
    def image_pad_token_id(self) -> int:
        """Placeholder id, one per merged vision token."""
        return self.convert_tokens_to_ids(IMAGE_PAD_TOKEN)

    @cached_property
    def vision_start_token_id(self) -> int:
        return self.convert_tokens_to_ids(VISION_START_TOKEN)

    @cached_property
    def vision_end_token_id(self) -> int:
        return self.convert_tokens_to_ids(VISION_END_TOKEN)

    @cached_property
    def answer_terminator_ids(self) -> frozenset[int]:
        """Ids that end an answer: ``<|endoftext|>`` and ``<|im_end|>`` (spec §4.10)."""
        return frozenset(self.convert_tokens_to_ids(list(ANSWER_TERMINATORS)))

    # Encoding and decoding --------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; added tokens in the text become their ids, and no BOS/EOS is added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, with no clean-up of spaces. As in transformers, ids outside the vocabulary are dropped."""
        return self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def answer_ids(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        """Generated ids up to, not including, the first answer terminator."""
        ids = _as_id_list(ids)
        stops = self.answer_terminator_ids
        return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)

    def answer_text(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The answer's text: cut at the first terminator, then decode (spec §4.10)."""
        return self.decode(self.answer_ids(ids))

    def pad_batch(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad with the pad id to the longest sequence: ``(input_ids, attention_mask)``, both (batch, length).

        Left padding puts every prompt's last token at the same index, which the prefix cache relies on (spec §4.7).
        """
        if not sequences:
            raise ValueError("pad_batch needs at least one sequence")
        length = max(len(seq) for seq in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)  # (batch, length)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (batch, length)
        for row, seq in enumerate(sequences):
            if len(seq):
                input_ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
                attention_mask[row, length - len(seq) :] = 1
        return input_ids, attention_mask

    # Chat template ----------------------------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json, chat_template.json/.jinja)")
        return _compile_chat_template(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render one conversation with the checkpoint's template, as ``transformers`` would.

        ``messages`` are ``{"role": ..., "content": str | [{"type": "image"}, {"type": "text", "text": ...}]}``.
        Extra keyword arguments (e.g. ``add_vision_id``) reach the template and override the special-token variables.
        Returns the prompt text, or its ids with ``tokenize=True``.
        """
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if not all(isinstance(message, Mapping) for message in messages):
            raise TypeError("chat messages must be dicts with 'role' and 'content'")
        # transformers drops None-valued keys first: templates handle a missing key better than a None.
        chat = _plain_template_data([{k: v for k, v in message.items() if v is not None} for message in messages])
        variables = _plain_template_data({**self.special_tokens_map, **kwargs})
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        prompt = self._compiled_template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(prompt) if tokenize else prompt


__all__: list[str] = ["ANSWER_TERMINATORS", "PRETOKENIZE_REGEX", "DimpleTokenizer", "TokenizerFileError"]
