# SPDX-License-Identifier: Apache-2.0
"""Training data: JSONL conversations → token samples (spec §6.2) → right-padded batches (spec §6.3).

A record is one JSON object per line: ``{"messages": [{"role": "user"|"assistant", "content": str}, ...],
"images": [path, ...]}``, with one ``<image>`` placeholder per image, in order. Image paths are absolute or
relative to the JSONL file. A sample is built exactly as the authors' ``CustomizedDataProcessor.process``:

- the system segment ``<|im_start|>system\\n{system}<|im_end|>`` before the first message, then per user turn
  ``\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n`` and per assistant turn ``{content}``
  (no ``<|im_end|>``), each segment tokenised on its own;
- labels are the assistant tokens themselves (unshifted; the loss shifts), -100 elsewhere;
- ``mask_locations`` marks the assistant tokens, pads included: the only positions diffusion may mask;
- every answer gets trailing ``<|endoftext|>`` pads: ``dynamic`` draws the padded length from
  ``[n+1, upper(n)]`` with a ``random.Random`` seeded by (seed, epoch, record), so a sample is the same
  whatever the process, rank or resume point; ``fixed`` pads or truncates to ``answer_length``.

Unlike the authors, an over-long sample is not sliced (that can cut an image's tokens and crash the forward):
it is a bad record. Every problem that comes from the data is a bad record (:class:`BadRecordError`, reported
as ``file:line: reason`` and skipped or raised per ``on_bad_record``): a line that is not UTF-8 or not JSON, a
wrong structure or role, special tokens in the text (only the builder makes structure: ``<|image_pad|>`` typed
in a record would claim an image that is not there), a placeholder/image count mismatch, a missing or
unreadable image, a sample too long. The structural problems are found when the file is read, the ones that
need the images when the sample is built; the built sample is checked once more before it is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from dimple_rt.config import DimpleConfig
from dimple_rt.model.rope import get_rope_index
from dimple_rt.processor import ImageProcessor, num_image_tokens, regularize_image
from dimple_rt.tokenizer import IMAGE_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN, DimpleTokenizer
from dimple_rt.training.config import PADDING_STRATEGIES

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("user", "assistant")


class BadRecordError(ValueError):
    """A training record that cannot become a sample; the message starts with ``file:line``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def dynamic_padding_upper(n: int) -> int:
    """The largest padded answer length for an answer of n tokens (the authors' ``exp_dynamic_padding``)."""
    if n < 16:
        return 2 ** math.ceil(math.log2(n + 1))
    return (n // 16 + 1) * 16


def padded_answer_length(n: int, strategy: str, rng: random.Random, answer_length: int) -> int:
    """Length of an n-token answer after padding (``fixed`` may be shorter than n: it truncates).

    ``uniform`` is ours, not the authors': like ``dynamic`` but the upper bound is at least ``answer_length``,
    so a 2-token answer also meets runs of dozens of pads, as it does on a long inference canvas (``dynamic``
    never shows it more than 2).
    """
    if strategy == "dynamic":
        return rng.randint(n + 1, dynamic_padding_upper(n))  # inclusive: always at least one pad
    if strategy == "uniform":
        return rng.randint(n + 1, max(dynamic_padding_upper(n), answer_length))
    if strategy == "fixed":
        return answer_length
    raise ValueError(f"answer padding strategy must be one of {', '.join(PADDING_STRATEGIES)}; got {strategy!r}")


@dataclass
class Record:
    """One checked line of a JSONL file: the conversation and its resolved image paths."""

    source: str
    """``file:line``, for messages."""
    messages: list[dict[str, str]]
    images: list[Path]


@dataclass
class Sample:
    """One conversation as the model sees it; all lists have the sample's length, unshifted."""

    input_ids: list[int]
    labels: list[int]
    """The token at assistant positions (answer and pads), IGNORE_INDEX elsewhere."""
    mask_locations: list[bool]
    """True where diffusion may mask: exactly the positions with a label."""
    pixel_values: torch.Tensor | None
    """(patches, patch_dim) float32 for the sample's images, in order, or None without images."""
    image_grid_thw: torch.Tensor | None
    """(images, 3) int64, or None."""
    source: str


def _check_text(text: str, where: str, source: str, forbidden: Sequence[str]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecordError(source, f"{where} is not valid Unicode (a lone surrogate escape?)") from None
    for token in forbidden:
        if token in text:
            raise BadRecordError(
                source, f"{where} holds the special token {token!r}: data text cannot hold control tokens"
            )


def _check_record(
    data: Any, source: str, base: Path, forbidden: Sequence[str] = (), require_images: bool = False
) -> Record:
    """The structural checks that need no image decoding; raise BadRecordError naming the problem.

    ``forbidden``: the tokenizer's special token strings, which no message may contain. ``require_images``:
    a record without images is bad (the align stage trains only the projector: it would have no gradient)."""
    if not isinstance(data, dict):
        raise BadRecordError(source, f"expected a JSON object, got {type(data).__name__}")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecordError(source, "'messages' must be a non-empty list")
    images = data.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadRecordError(source, "'images' must be a list of path strings")
    placeholders = 0
    answers = 0
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRecordError(source, f"message {number} must be an object with a string 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRecordError(source, f"message {number} has role {role!r}; only {ROLES} are accepted")
        _check_text(message["content"], f"message {number}", source, forbidden)
        if role == "assistant":
            if IMAGE_PLACEHOLDER in message["content"]:
                raise BadRecordError(source, f"message {number}: an assistant turn cannot hold {IMAGE_PLACEHOLDER}")
            if not message["content"].strip():
                raise BadRecordError(source, f"message {number}: empty assistant answer")
            answers += 1
        placeholders += message["content"].count(IMAGE_PLACEHOLDER)
    if answers == 0:
        raise BadRecordError(source, "no assistant turn: nothing to train on")
    if placeholders != len(images):
        raise BadRecordError(source, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    if require_images and not images:
        raise BadRecordError(source, "no image: the align stage trains only the image projector")
    for number, image in enumerate(images):
        _check_text(image, f"image path {number}", source, ())
        if "\0" in image:
            raise BadRecordError(source, f"image path {number} holds a NUL character")
    paths = [Path(p) if os.path.isabs(p) else base / p for p in images]
    try:
        missing = [str(p) for p in paths if not p.is_file()]
    except OSError as err:  # a name too long, a permission error on a folder on the way
        raise BadRecordError(source, f"cannot check image path: {err}") from None
    if missing:
        raise BadRecordError(source, f"image file not found: {', '.join(missing)}")
    return Record(source, [{"role": m["role"], "content": m["content"]} for m in messages], paths)


def read_records(
    path: str | os.PathLike, on_bad_record: str = "error", forbidden: Sequence[str] = (), require_images: bool = False
) -> tuple[list[Record], list[BadRecordError]]:
    """Parse and check every line of a JSONL file (blank lines are skipped; a UTF-8 BOM is allowed).

    With ``on_bad_record="error"`` the first bad line raises; with ``"skip"`` bad lines are logged and
    returned as the second value. ``forbidden`` and ``require_images``: see :func:`_check_record`.
    """
    if on_bad_record not in ("skip", "error"):
        raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train_file {path} is not a file")
    records: list[Record] = []
    bad: list[BadRecordError] = []
    with path.open("rb") as handle:  # bytes: one line's bad UTF-8 is that line's problem, not the file's
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            source = f"{path}:{number}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadRecordError(source, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BadRecordError(source, f"not valid JSON ({err})") from None
                except RecursionError:
                    raise BadRecordError(source, "not usable JSON (nested too deeply)") from None
                records.append(_check_record(data, source, path.parent, forbidden, require_images))
            except BadRecordError as err:
                if on_bad_record == "error":
                    raise
                logger.warning("skipping bad record %s", err)
                bad.append(err)
    return records, bad


class SampleBuilder:
    """Turns records into samples with one checkpoint's tokenizer and image processor."""

    def __init__(
        self,
        tokenizer: DimpleTokenizer,
        processor: ImageProcessor | None,
        *,
        max_seq_length: int = 1024,
        answer_padding: str = "dynamic",
        answer_length: int = 64,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        """``vocab_size``: the model's; a sample with an id at or above it is a bad record."""
        padded_answer_length(1, answer_padding, random.Random(0), answer_length)  # validates the strategy
        # The structure tokens are placed by id, so a sample never depends on whether encode() parses special
        # tokens in text; data text holds none (checked), and a special token splits BPE anyway, so the ids
        # are the authors' (each segment tokenised with its special tokens).
        specials = {IMAGE_PAD_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, "<|im_start|>", "<|im_end|>"}
        added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
        specials |= {token.content for token in added.values() if token.special}
        specials |= set(tokenizer.special_tokens_map.values())
        backend = tokenizer.backend_tokenizer
        # A text-only tokenizer may lack the vision tokens: only the ones it has can be placed or typed.
        self.special_ids = {token: backend.token_to_id(token) for token in sorted(specials)}
        self.special_ids = {token: i for token, i in self.special_ids.items() if token and i is not None}
        alternatives = "|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True)))
        self._special_split = re.compile(f"({alternatives})") if alternatives else None
        self.forbidden = tuple(sorted(self.special_ids))
        """Special token strings: a record that holds one is bad; the system prompt may not hold one."""
        for token in self.forbidden:
            if token in system_prompt:
                raise ValueError(f"system_prompt holds the special token {token!r}; the template places those")
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_seq_length = max_seq_length
        self.answer_padding = answer_padding
        self.answer_length = answer_length
        self.system_prompt = system_prompt
        self.seed = seed

    def padding_rng(self, epoch: int, index: int) -> random.Random:
        """The answer-padding RNG of record ``index`` in ``epoch``: a pure function of (seed, epoch, index)."""
        return random.Random(f"dimple-pad/{self.seed}/{epoch}/{index}")

    def _images(self, record: Record) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not record.images:
            return None, None
        if self.processor is None:
            raise BadRecordError(record.source, "the model has no vision tower but the record has images")
        # The files stay open until the processor is done: regularize_image may hand back the opened image
        # itself, and older Pillow makes a closed image unusable.
        with contextlib.ExitStack() as files:
            regularized = []
            for path in record.images:
                try:
                    image = files.enter_context(PIL.Image.open(path))
                    image.load()
                    regularized.append(regularize_image(image, self.processor.min_pixels, self.processor.max_pixels))
                except MemoryError:
                    raise
                # Pillow's decoders raise many types for a broken file (OSError, ValueError, SyntaxError,
                # struct.error, EOFError, DecompressionBombError, ...): any of them means this image is unusable.
                except Exception as err:
                    raise BadRecordError(record.source, f"cannot read image {path}: {err}") from err
            try:
                processed = self.processor(regularized)
            except (ValueError, TypeError, RuntimeError) as err:
                raise BadRecordError(record.source, f"image preprocessing failed: {err}") from err
        return processed.pixel_values, processed.image_grid_thw

    def encode_template(self, text: str) -> list[int]:
        """Ids of ``text`` built by this class: its special tokens by id, the text between them by BPE."""
        if self._special_split is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for piece in self._special_split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self.tokenizer.encode(piece))
        return ids

    def build(self, record: Record, rng: random.Random) -> Sample:
        """The sample of ``record``; ``rng`` draws the dynamic answer padding. Raises BadRecordError."""
        pixel_values, grids = self._images(record)
        counts = [] if grids is None else [num_image_tokens(g, self.processor.merge_size) for g in grids]
        image_text = [f"{VISION_START_TOKEN}{IMAGE_PAD_TOKEN * n}{VISION_END_TOKEN}" for n in counts]
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in record.messages if m["role"] == "user")
        if placeholders != len(image_text):
            raise BadRecordError(
                record.source, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(counts)} images"
            )
        next_image = iter(image_text)
        pad_id = self.tokenizer.pad_token_id
        input_ids: list[int] = []
        labels: list[int] = []
        mask_locations: list[bool] = []

        def append(ids: list[int], supervised: bool) -> None:
            input_ids.extend(ids)
            labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
            mask_locations.extend([supervised] * len(ids))

        append(self.encode_template(f"<|im_start|>system\n{self.system_prompt}<|im_end|>"), False)
        for message in record.messages:
            content = message["content"]
            if message["role"] == "user":
                pieces = content.split(IMAGE_PLACEHOLDER)
                content = pieces[0] + "".join(next(next_image) + piece for piece in pieces[1:])
                append(self.encode_template(f"\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"), False)
            else:
                ids = self.tokenizer.encode(content)
                length = padded_answer_length(len(ids), self.answer_padding, rng, self.answer_length)
                append(ids[:length] + [pad_id] * (length - len(ids)), True)
        if len(input_ids) > self.max_seq_length:
            raise BadRecordError(
                record.source, f"sample has {len(input_ids)} tokens, more than max_seq_length={self.max_seq_length}"
            )
        self._check_sample(input_ids, sum(counts), record.source)
        return Sample(input_ids, labels, mask_locations, pixel_values, grids, record.source)

    def _check_sample(self, input_ids: list[int], image_tokens: int, source: str) -> None:
        """What the forward needs of a sample: one <|image_pad|> per image feature, ids within the vocabulary."""
        found = input_ids.count(self.special_ids[IMAGE_PAD_TOKEN]) if IMAGE_PAD_TOKEN in self.special_ids else 0
        if found != image_tokens:
            raise BadRecordError(source, f"{found} <|image_pad|> tokens but the images give {image_tokens} features")
        if self.vocab_size is not None and input_ids and max(input_ids) >= self.vocab_size:
            raise BadRecordError(
                source, f"token id {max(input_ids)} is outside the model's vocabulary ({self.vocab_size})"
            )


class ConversationDataset:
    """The checked records of one JSONL file and how to build the sample of (epoch, index)."""

    def __init__(
        self,
        path: str | os.PathLike,
        builder: SampleBuilder,
        on_bad_record: str = "error",
        require_images: bool = False,
    ) -> None:
        self.path = Path(path)
        self.builder = builder
        self.on_bad_record = on_bad_record
        self.records, self.bad_records = read_records(self.path, on_bad_record, builder.forbidden, require_images)
        if not self.records:
            raise ValueError(f"{self.path}: no usable training record ({len(self.bad_records)} bad)")

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, epoch: int, index: int) -> Sample:
        return self.builder.build(self.records[index], self.builder.padding_rng(epoch, index))


class GlobalOrder:
    """The one sample stream all ranks share: epoch e is a seeded permutation of the records.

    Position ``c`` of the stream is record ``perm_e[c % n]`` with ``e = c // n``; the data position of a run
    is a single integer, so resuming (with any world size) continues exactly where the run stopped.
    """

    def __init__(self, num_records: int, seed: int, shuffle: bool = True) -> None:
        self.num_records = num_records
        self.seed = seed
        self.shuffle = shuffle
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            order = list(range(self.num_records))
            if self.shuffle:
                random.Random(f"dimple-order/{self.seed}/{epoch}").shuffle(order)
            self._cache = (epoch, order)
        return self._cache[1]

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(epoch, record index) at stream position ``position``."""
        epoch, offset = divmod(position, self.num_records)
        return epoch, self.permutation(epoch)[offset]


@dataclass
class Batch:
    """A right-padded micro-batch (spec §6.3)."""

    input_ids: torch.Tensor
    """(batch, len) int64, padded with the pad id."""
    attention_mask: torch.Tensor
    """(batch, len) int64, 1 on real tokens."""
    labels: torch.Tensor
    """(batch, len) int64, IGNORE_INDEX on prompt and padding."""
    mask_locations: torch.Tensor
    """(batch, len) bool, False on prompt and padding."""
    position_ids: torch.Tensor
    """(3, batch, len) int64 M-RoPE ids; padded slots get 1."""
    rope_deltas: torch.Tensor
    """(batch, 1) int64."""
    pixel_values: torch.Tensor | None
    """(patches, patch_dim) float32 of all images of the batch, in batch order, or None."""
    image_grid_thw: torch.Tensor | None
    """(images, 3) int64, or None."""

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{name: None if value is None else value.to(device) for name, value in vars(self).items()})


def collate(samples: Sequence[Sample], pad_token_id: int, config: DimpleConfig) -> Batch:
    """Right-pad ``samples`` into a batch and compute the M-RoPE positions on CPU."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch, length = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, L)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    mask_locations = torch.zeros((batch, length), dtype=torch.bool)  # (B, L)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
        mask_locations[row, :n] = torch.tensor(sample.mask_locations, dtype=torch.bool)
    with_images = [s for s in samples if s.pixel_values is not None]
    pixel_values = torch.cat([s.pixel_values for s in with_images]) if with_images else None  # (patches, dim)
    grids = torch.cat([s.image_grid_thw for s in with_images]) if with_images else None  # (images, 3)
    position_ids, rope_deltas = get_rope_index(input_ids, config, grids, attention_mask)
    return Batch(input_ids, attention_mask, labels, mask_locations, position_ids, rope_deltas, pixel_values, grids)
