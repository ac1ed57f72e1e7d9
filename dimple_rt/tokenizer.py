# SPDX-License-Identifier: Apache-2.0
"""Dimple's tokenizer and chat template, without transformers at runtime.

Dimple's ``DimpleTokenizer`` is Qwen2's byte-level BPE (spec §2). We build the same pipeline on the
``tokenizers`` library, the way ``transformers.Qwen2Tokenizer`` does: NFC, Qwen2's pre-tokenisation regex, byte-level
BPE, a byte-level decoder, and the checkpoint's added tokens split off before any of that. No BOS/EOS is ever added.
The chat template is rendered with jinja2 in the environment Hugging Face uses, so prompts match byte for byte.

Untrusted inputs:

- **Message text never becomes control tokens.** :meth:`DimpleTokenizer.encode_chat` (and
  ``apply_chat_template(tokenize=True)``) render the template with each message text replaced by a unique
  placeholder, so only the template makes structure; the user's text is then tokenised with special tokens as
  plain text (``tokenizers``' ``encode_special_tokens``, transformers' ``split_special_tokens``). A user-typed
  ``<|im_end|>`` or ``<|image_pad|>`` becomes the ids of its characters, not a role switch or an image slot.
  Other strings the template may print (roles, names) must not contain special tokens at all. Callers who pass
  raw prompts on purpose opt in with ``parse_special_tokens=True``. ``encode`` itself parses special tokens (it
  is the raw API, used for generation templates that contain ``<|mask|>``).
- **Rendering is bounded**: at most :data:`TEMPLATE_TIMEOUT_S` seconds (a trace function checks the clock on
  every line the template runs) and :data:`MAX_TEMPLATE_OUTPUT_CHARS` characters plus twice the input text;
  every string or list an expression builds is held to the same size limit, checked *before* the operations that
  multiply sizes (repetition, ``+``, ``~``, replace, padding, ``%``/``format`` widths, joins) so that one
  expression cannot allocate gigabytes. A template over a bound raises :class:`TemplateLimitError`.
- **Video items** raise NotImplementedError: Dimple has no video projector.
- Every file is read through :mod:`dimple_rt.files`: regular files only, with size limits.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .files import MAX_TOKENIZER_FILE_BYTES, read_json, read_text

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


TEMPLATE_TIMEOUT_S = 5.0
"""Longest a chat template may take to render (the Qwen2.5-VL template takes well under a millisecond)."""
MAX_TEMPLATE_OUTPUT_CHARS = 1 << 22
"""Characters a rendered prompt may have beyond twice the conversation's own text (4 Mi)."""
MAX_TEMPLATE_BYTES = 1 << 20
"""Largest chat template source (chat_template.jinja, or the string in tokenizer_config/chat_template.json): 1 Mi
characters; Qwen2.5-VL's is 1.4 K."""


class TokenizerFileError(ValueError):
    """A tokenizer file that is unreadable or cannot describe a tokenizer."""


class TemplateLimitError(ValueError):
    """A chat template that runs too long or produces too much output."""


def _read_json(path: Path, expect: type | None = None) -> Any:
    return read_json(path, "tokenizer data", MAX_TOKENIZER_FILE_BYTES, expect, TokenizerFileError)


def _read_text(path: Path, max_bytes: int = MAX_TOKENIZER_FILE_BYTES) -> str:
    try:
        return read_text(path, "a tokenizer file", max_bytes)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise TokenizerFileError(str(exc)) from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    # Same rules as tokenizers' and transformers' readers: an optional "#version" header, "left right" per line.
    merges = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
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
        if not isinstance(extra, (list, Mapping)):
            raise TokenizerFileError(
                f"{source}: {key} must be a list of tokens, got {type(extra).__name__} {extra!r:.60}"
            )
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


class _Limits(threading.local):
    max_chars: int = MAX_TEMPLATE_OUTPUT_CHARS
    """Largest string or list any one template expression may build during the current render on this thread."""


_LIMITS = _Limits()


def _too_big(what: str, size: Any) -> TemplateLimitError:
    return TemplateLimitError(
        f"chat template: {what} ({size}) exceeds the limit of {_LIMITS.max_chars} for this prompt "
        "(MAX_TEMPLATE_OUTPUT_CHARS plus twice the conversation's text)"
    )


def _check_size(value: Any, what: str) -> Any:
    """``value``, after checking that a string, list or tuple is within the render's size limit."""
    if isinstance(value, (str, list, tuple)) and len(value) > _LIMITS.max_chars:
        raise _too_big(what, len(value))
    return value


def _check_length(length: int, what: str) -> None:
    if length > _LIMITS.max_chars:
        raise _too_big(what, length)


def _check_int_args(args: Iterable[Any], what: str) -> None:
    """Integer arguments are widths or counts: each must stay within the size limit."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool):
            _check_length(abs(arg), what)


_FORMAT_NUMBER = re.compile(r"\d+")


def _check_format(text: str, args: Iterable[Any]) -> None:
    """A %-format or str.format: widths in the string and the arguments' lengths bound the result."""
    widths = sum(int(n) for n in _FORMAT_NUMBER.findall(text[:100_000]) if len(n) < 30)
    if any(len(n) >= 30 for n in _FORMAT_NUMBER.findall(text)):
        raise _too_big("format width", "30+ digits")
    if re.search(r"%[-#0 +]*\*|\{[^{}]*:[^{}]*\{", text):
        raise TemplateLimitError("chat template: widths taken from arguments ('%*d', '{:{}}') are not allowed")
    arguments = list(args)
    _check_length(
        len(text) + widths + sum(len(a) if isinstance(a, (str, list, tuple)) else 32 for a in arguments), "formatted"
    )


def _str_method_bound(method: str, text: str, args: tuple[Any, ...]) -> None:
    """Refuse a str method call whose result would exceed the size limit, before it runs."""
    if method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = text.count(args[0]) if args[0] else len(text) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        _check_length(len(text) + count * max(len(args[1]) - len(args[0]), 0), "replace result")
    elif method in ("center", "ljust", "rjust", "zfill"):
        _check_int_args(args, f"{method} width")
    elif method == "expandtabs":
        _check_int_args(args, "expandtabs size")
        size = args[0] if args and isinstance(args[0], int) else 8
        _check_length(len(text) + text.count("\t") * max(size, 0), "expandtabs result")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus a size limit on every string or list an expression builds, checked before the
    operations that multiply sizes (repetition, replace, padding, format widths, joins) and after every call."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and not isinstance(count, bool):
                    _check_length(count * len(seq), "repetition")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1024:
                raise _too_big("exponent", right)
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,))
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_length(len(left) + len(right), "concatenation")
        return _check_size(super().call_binop(context, operator, left, right), f"result of {operator!r}")

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format(text, [*args, *kwargs.values()])
            return _check_size(wrapped(*args, **kwargs), "format result")

        return bounded

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(obj, "__name__", "")
            if name == "join" and args:
                items = list(args[0])
                _check_length(sum(len(i) if isinstance(i, str) else 0 for i in items) + len(owner) * len(items), "join")
                args = (items, *args[1:])
            else:
                _str_method_bound(name, owner, args)
        return _check_size(super().call(context, obj, *args, **kwargs), "call result")


def _bounded_filter(name: str, original: Any) -> Any:
    @functools.wraps(original)  # keeps jinja's pass_context/pass_eval_context marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        # Filters take (value, ...) or, for context/environment filters, (context|environment, value, ...).
        _check_int_args([a for a in (*args, *kwargs.values()) if isinstance(a, int)], f"'{name}' filter argument")
        strings = [a for a in args if isinstance(a, str)]
        if name == "replace" and len(strings) >= 3:
            _str_method_bound("replace", strings[0], tuple(strings[1:3]))
        if name == "format" and strings:
            _check_format(strings[0], args[1:])
        if name == "join":
            for arg in args:
                if isinstance(arg, (list, tuple)):
                    _check_length(sum(len(i) if isinstance(i, str) else 32 for i in arg), "'join' filter result")
                    break
        if name == "indent" and strings:
            _check_length(len(strings[0]) * 2 + 64, "indent result")
        return _check_size(original(*args, **kwargs), f"'{name}' filter result")

    return bounded


def _bounded_join(original: Any) -> Any:
    def bounded(seq: Any) -> Any:
        items = list(seq)
        _check_length(sum(len(i) if isinstance(i, str) else 32 for i in items), "concatenation ('~')")
        return original(items)

    return bounded


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the environment of transformers' ``_compile_jinja_template``, plus the bounds above."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name, original in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, original)
    env.globals.pop("lipsum", None)  # lipsum(n) would build n paragraphs
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = env.from_string(source)
    # '~' compiles to calls of jinja2.runtime's str_join/markup_join, looked up in the compiled code's globals.
    namespace = template.root_render_func.__globals__
    for helper in ("str_join", "markup_join"):
        if helper in namespace:
            namespace[helper] = _bounded_join(namespace[helper])
    return template


def _render_bounded(template: jinja2.Template, variables: Mapping[str, Any], max_chars: int, timeout: float) -> str:
    """``template.render(**variables)`` within ``timeout`` seconds and ``max_chars`` characters.

    The clock is checked on every line the compiled template (and anything it calls in Python) executes, through
    a trace function on this thread only; the output is checked chunk by chunk as jinja streams it.
    """
    deadline = time.monotonic() + timeout

    def expired() -> TemplateLimitError:
        return TemplateLimitError(f"chat template: rendering took longer than {timeout:g} s (TEMPLATE_TIMEOUT_S)")

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise expired()
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        # Every Python call checks the clock; only the template's own code (where its loops are) is traced line
        # by line, which keeps the overhead to a few times the plain render.
        if time.monotonic() > deadline:
            raise expired()
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    pieces: list[str] = []
    size = 0
    previous_limit = _LIMITS.max_chars
    _LIMITS.max_chars = max_chars
    sys.settrace(on_call)
    try:
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimitError(
                    f"chat template: the prompt exceeds {max_chars} characters (MAX_TEMPLATE_OUTPUT_CHARS plus twice "
                    "the conversation's text)"
                )
            pieces.append(chunk)
            if time.monotonic() > deadline:
                raise expired()
    except RecursionError:
        raise TemplateLimitError("chat template: recursion too deep (a macro calling itself without end?)") from None
    except MemoryError:
        raise TemplateLimitError("chat template: ran out of memory while rendering") from None
    finally:
        sys.settrace(previous)
        _LIMITS.max_chars = previous_limit
    return "".join(pieces)


def _load_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The checkpoint's template; ``chat_template.jinja`` wins over tokenizer_config.json, as in transformers."""
    jinja_file = directory / CHAT_TEMPLATE_JINJA
    if jinja_file.exists():
        return _read_text(jinja_file, MAX_TEMPLATE_BYTES)
    template = config.get("chat_template")
    json_file = directory / CHAT_TEMPLATE_JSON
    if template is None and json_file.exists():
        data = _read_json(json_file, dict)
        template = data.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(entry, Mapping) and "name" in entry and "template" in entry for entry in template):
            raise TokenizerFileError(f"{directory}: a chat_template list must hold {{'name', 'template'}} objects")
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerFileError(f"{directory}: chat_template must be a string, got {type(template).__name__}")
    if template is not None and len(template) > MAX_TEMPLATE_BYTES:
        raise TokenizerFileError(
            f"{directory}: chat_template has {len(template)} characters; at most {MAX_TEMPLATE_BYTES} are accepted"
        )
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
        self._chat_template = chat_template

    @property
    def chat_template(self) -> str | None:
        """The Jinja source of the chat template, or None; assigning a new one recompiles it on next use."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self._chat_template = source
        self.__dict__.pop("_compiled_template", None)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DimpleTokenizer:
        """Load from ``tokenizer.json`` when present, else from ``vocab.json`` + ``merges.txt``; special tokens and
        the chat template come from ``tokenizer_config.json`` (and ``chat_template.jinja``/``.json``)."""
        directory = Path(directory)
        config_file = directory / TOKENIZER_CONFIG
        fast_file = directory / TOKENIZER_JSON
        vocab_file, merges_file = directory / VOCAB_JSON, directory / MERGES_TXT
        # exists(), not is_file(): a FIFO or device in place of a file is refused by name when read, not skipped
        has_model = fast_file.exists() or (vocab_file.exists() and merges_file.exists())
        if not (config_file.exists() and has_model):
            raise FileNotFoundError(
                f"no tokenizer in {directory}: looked for {TOKENIZER_CONFIG} plus either {TOKENIZER_JSON} "
                f"or {VOCAB_JSON} + {MERGES_TXT}"
            )
        config = _read_json(config_file, dict)

        if fast_file.exists():
            text = _read_text(fast_file)
            try:
                json.loads(text)  # a precise error for malformed JSON; Tokenizer.from_str's is vague
            except (ValueError, RecursionError) as exc:
                raise TokenizerFileError(f"{fast_file}: not valid JSON ({exc})") from None
            try:
                tokenizer = Tokenizer.from_str(text)
            except Exception as exc:  # tokenizers raises a bare Exception
                raise TokenizerFileError(f"{fast_file} is not a valid tokenizers serialisation: {exc}") from exc
        else:
            vocab = _read_json(vocab_file)
            if not isinstance(vocab, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in vocab.values()
            ):
                raise TokenizerFileError(f"{vocab_file} must map token strings to ids in [0, 2^31)")
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

    @cached_property
    def _plain_text_tokenizer(self) -> Tokenizer:
        """A copy that tokenises special-token strings as their characters (``encode_special_tokens``). A copy,
        not a toggled flag on the shared one, so that concurrent encodes never see each other's setting."""
        clone = Tokenizer.from_str(self._tokenizer.to_str())
        clone.encode_special_tokens = True
        return clone

    @cached_property
    def special_token_strings(self) -> frozenset[str]:
        """Contents of every special added token (``<|im_end|>``, ``<|image_pad|>``, ``<|mask|>``, ...)."""
        return frozenset(
            t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special and t.content
        )

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special)

    def contains_special_token(self, text: str) -> bool:
        """Whether ``text`` holds the string of a special token."""
        return any(token in text for token in self.special_token_strings)

    def encode(self, text: str, parse_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added. Special-token strings in the text become their ids
        (the raw API); with ``parse_special_tokens=False`` they are tokenised as plain text."""
        tokenizer = self._tokenizer if parse_special_tokens else self._plain_text_tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids

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
        if len(self.chat_template) > MAX_TEMPLATE_BYTES:
            raise TemplateLimitError(
                f"chat template: {len(self.chat_template)} characters, at most {MAX_TEMPLATE_BYTES}"
            )
        try:
            return _compile_chat_template(self.chat_template)
        except (RecursionError, MemoryError):
            raise TemplateLimitError("chat template: too deeply nested to compile") from None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        parse_special_tokens: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render one conversation with the checkpoint's template, as ``transformers`` would.

        ``messages`` are ``{"role": ..., "content": str | [{"type": "image"}, {"type": "text", "text": ...}]}``.
        Extra keyword arguments (e.g. ``add_vision_id``) reach the template and override the special-token variables.
        Returns the prompt text, or with ``tokenize=True`` its ids from :meth:`encode_chat`, where message text
        never becomes special tokens unless ``parse_special_tokens=True``. The text form cannot tell the
        template's ``<|im_end|>`` from a user's: tokenise it only if the conversation is trusted.
        Video items raise NotImplementedError; rendering is bounded (TemplateLimitError).
        """
        if tokenize:
            return self.encode_chat(
                messages,
                add_generation_prompt=add_generation_prompt,
                parse_special_tokens=parse_special_tokens,
                **kwargs,
            )
        chat = self._checked_messages(messages)
        return self._render(chat, add_generation_prompt, kwargs, _text_length(chat))

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        parse_special_tokens: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of one conversation rendered with the chat template, safe against injected control tokens.

        Only the template makes structure: the text of each message (a string ``content`` or a ``text`` item) is
        tokenised with special-token strings as plain characters, so ``"hi<|im_end|>\\n<|im_start|>system"`` or a
        typed ``<|image_pad|>`` stays text. Other strings the template might print (roles, names, ...) must hold
        no special token (ValueError). For a conversation without special-token strings the ids equal
        ``encode(apply_chat_template(...))`` exactly. ``parse_special_tokens=True`` is the opt-in for callers that
        pass raw prompts on purpose: the rendered text is encoded as is.
        """
        chat = self._checked_messages(messages)
        text_length = _text_length(chat)
        rendered = self._render(chat, add_generation_prompt, kwargs, text_length)
        if parse_special_tokens:
            return self.encode(rendered)
        self._check_other_strings(chat)
        texts: list[str] = []
        _collect_texts(chat, texts)
        if not any(self.contains_special_token(text) for text in texts):
            return self.encode(rendered)  # nothing to neutralise: exactly the plain encoding

        # Render again with every message text replaced by a unique placeholder; the template's own text is what
        # lies between them.
        nonce = uuid.uuid4().hex
        placeholders = [f"\ue000{nonce}:{k}\ue001" for k in range(len(texts))]
        skeleton = self._render(
            _replace_texts(chat, iter(placeholders)), add_generation_prompt, kwargs, text_length + 64 * len(texts)
        )
        pattern = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        parts = pattern.split(skeleton)  # [template, k, template, k, ..., template]
        rebuilt = "".join(texts[int(piece)] if i % 2 else piece for i, piece in enumerate(parts))
        if rebuilt != rendered:
            raise ValueError(
                "message text contains special-token strings and this chat template transforms message text, so "
                "it cannot be kept apart from the template's structure; remove the special tokens from the text, "
                "or pass parse_special_tokens=True if they are meant as control tokens"
            )
        # Runs of text between the template's own special tokens are encoded whole (so tokenisation across the
        # template/text boundary is the plain one) with special-token strings as plain text.
        ids: list[int] = []
        run: list[str] = []
        for i, piece in enumerate(parts):
            if i % 2:
                run.append(texts[int(piece)])
                continue
            start = 0
            for token_id, (begin, end) in self._special_spans(piece):
                run.append(piece[start:begin])
                ids.extend(self.encode("".join(run), parse_special_tokens=False))
                run = []
                ids.append(token_id)
                start = end
            run.append(piece[start:])
        ids.extend(self.encode("".join(run), parse_special_tokens=False))
        return ids

    def _special_spans(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, (start, end)) of each special token the tokenizer finds in ``text``, in order."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        special = self._special_ids
        return [(i, span) for i, span in zip(encoding.ids, encoding.offsets) if i in special]

    def _checked_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(
                f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}"
            )
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if not all(isinstance(message, Mapping) for message in messages):
            raise TypeError("chat messages must be dicts with 'role' and 'content'")
        for number, message in enumerate(messages):
            content = message.get("content")
            items = content if isinstance(content, list) else []
            for item in items:
                if isinstance(item, Mapping) and (item.get("type") == "video" or "video" in item):
                    raise NotImplementedError(
                        f"message {number} has a video item: video is not supported (Dimple has no video projector)"
                    )
        # transformers drops None-valued keys first: templates handle a missing key better than a None.
        return _plain_template_data([{k: v for k, v in message.items() if v is not None} for message in messages])

    def _check_other_strings(self, value: Any, where: str = "messages") -> None:
        """Special tokens in strings other than message text (roles, names, keys) are refused: they cannot be
        told apart from the template's structure."""
        if isinstance(value, str):
            found = sorted(token for token in self.special_token_strings if token in value)
            if found:
                raise ValueError(
                    f"{where} contains the special token {found[0]!r}: only message text may hold special-token "
                    "strings (they are kept as plain text there)"
                )
        elif isinstance(value, Mapping):
            for key, item in value.items():
                self._check_other_strings(key, f"{where} key")
                if not _is_text_slot(key, item, value):
                    self._check_other_strings(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self._check_other_strings(item, f"{where}[{index}]")

    def _render(
        self, chat: list[dict[str, Any]], add_generation_prompt: bool, kwargs: Mapping[str, Any], text_length: int
    ) -> str:
        variables = _plain_template_data({**self.special_tokens_map, **kwargs})
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        variables.update(messages=chat, add_generation_prompt=add_generation_prompt)
        return _render_bounded(
            self._compiled_template, variables, MAX_TEMPLATE_OUTPUT_CHARS + 2 * text_length, TEMPLATE_TIMEOUT_S
        )


def _is_text_slot(key: Any, value: Any, owner: Mapping[str, Any]) -> bool:
    """Whether ``owner[key]`` is message text: a string ``content``, or the string ``text`` of a content item."""
    return isinstance(value, str) and (key == "content" or (key == "text" and "role" not in owner))


def _collect_texts(value: Any, out: list[str]) -> None:
    """Message texts, in the order :func:`_replace_texts` visits them."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _is_text_slot(key, item, value):
                out.append(item)
            else:
                _collect_texts(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_texts(item, out)


def _replace_texts(value: Any, replacements: Iterator[str]) -> Any:
    if isinstance(value, Mapping):
        return {
            key: next(replacements) if _is_text_slot(key, item, value) else _replace_texts(item, replacements)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_replace_texts(item, replacements) for item in value]
    if isinstance(value, tuple):
        return tuple(_replace_texts(item, replacements) for item in value)
    return value


def _text_length(chat: Any) -> int:
    texts: list[str] = []
    _collect_texts(chat, texts)
    return sum(map(len, texts))


__all__: list[str] = [
    "ANSWER_TERMINATORS",
    "PRETOKENIZE_REGEX",
    "DimpleTokenizer",
    "TemplateLimitError",
    "TokenizerFileError",
]
