# SPDX-License-Identifier: Apache-2.0
"""Dimple's image preprocessing (spec §3) and the expansion of image placeholders (spec §2).

The authors' ``DimpleImageProcessor`` is transformers 4.46's ``Qwen2VLImageProcessor``: convert to RGB, resize
with PIL bicubic to a multiple of 28 (``smart_resize``), rescale, normalise with the CLIP mean/std, tile to two
frames and cut into 14×14 patches in merge-block order. We redo it without transformers and bit for bit: the
numeric steps are per pixel value, done in the same dtypes, and the resize is the same PIL call. Two places where
transformers 5 changed behaviour follow the authors' 4.46 instead: images with alpha lose it (``convert("RGB")``)
rather than being composited onto white, and sides under 28 pixels are an error rather than scaled up.

Inputs are bounded before anything large is built: at most :data:`MAX_IMAGES` images per call, image files of at
most :data:`MAX_IMAGE_FILE_BYTES` and :data:`MAX_INPUT_PIXELS` pixels (checked from the header, before
decoding), ``max_pixels`` at most :data:`MAX_PIXELS_LIMIT`, and the vision tokens of one call at most
:data:`MAX_TOTAL_IMAGE_TOKENS` (computed from the image sizes before any image is resized). Images with more
than 8 bits per sample (16-bit PNG gray ``I;16``, 32-bit ``I``, uint16 arrays) are scaled to 8 bits
(``round(v · 255 / 65535)``) rather than clipped to white by Pillow's ``convert``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .files import MAX_JSON_BYTES, NotARegularFileError, read_bytes, read_json
from .io import write_json
from .tokenizer import IMAGE_PAD_TOKEN

ImageInput = str | os.PathLike | PIL.Image.Image | np.ndarray
"""A file path, a PIL image, or a uint8/uint16 array: (H, W) gray, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA."""

MAX_IMAGES = 256
"""Most images one processor call (one generate request, all its conversations) takes."""
MAX_IMAGE_FILE_BYTES = 256 << 20
"""Largest image file read (256 MiB)."""
MAX_INPUT_PIXELS = 1 << 28
"""Largest image (width x height, 268 Mpx, e.g. 16384x16384) decoded or taken; checked from the file header."""
MAX_PIXELS_LIMIT = 4 * 12845056
"""Upper bound of ``max_pixels`` (and so of ``min_pixels``): 65536 vision tokens per image, 4x Qwen2.5-VL's
default, 455x Dimple-7B's trained 112896."""
MAX_TOTAL_IMAGE_TOKENS = 1 << 17
"""Most vision tokens (merged patches) all images of one call may produce: Dimple-7B's 131072 positions."""
VIDEO_INPUT_KEYS = ("pixel_values_videos", "video_grid_thw", "videos", "second_per_grid_ts")
"""Processor/model inputs that carry video, which is not supported."""


class ImageLimitError(ValueError):
    """A request whose images exceed a stated bound (count, file size, pixels, vision tokens)."""


def check_no_video(inputs: Mapping[str, Any]) -> None:
    """NotImplementedError when ``inputs`` (a processor/model input dict) carries video; None values are ignored.

    The authors' model has no video projector either ("Video feature projector not implemented")."""
    present = [key for key in VIDEO_INPUT_KEYS if inputs.get(key) is not None]
    if present:
        raise NotImplementedError(
            f"video inputs ({', '.join(present)}) are not supported: Dimple has no video projector; pass images"
        )


PREPROCESSOR_CONFIG = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# The type names save() writes: transformers' class for these settings (so a stock transformers reads the file)
# and the authors' processor.
IMAGE_PROCESSOR_TYPE = "Qwen2VLImageProcessor"
PROCESSOR_CLASS = "DimpleProcessor"


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of ``factor``, area within [min, max] pixels,
    aspect ratio kept as well as rounding allows (spec §3)."""
    if height < factor or width < factor:
        raise ValueError(f"image is {height}x{width} (height x width); both sides must be at least {factor} pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image is {height}x{width} (height x width), aspect ratio {max(height, width) / min(height, width):.1f};"
            f" it must be at most {MAX_ASPECT_RATIO}"
        )
    # Python's round: ties to even, so 42 → 56 but 70 → 56 for factor 28.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        # The authors' copy lacks the max(): a thin strip would get a side of 0 and PIL would refuse it. transformers
        # 5 clamps to one block; that changes no size the authors' code can produce.
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _scale_to_8_bits(values: np.ndarray, maximum: int) -> np.ndarray:
    """Integers in [0, maximum] → uint8, rounded: ``round(v · 255 / maximum)``."""
    wide = np.clip(values.astype(np.int64), 0, maximum)
    return ((wide * 255 + maximum // 2) // maximum).astype(np.uint8)


def _eight_bit(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    """Modes with more than 8 bits per sample, scaled to 8 bits: Pillow's ``convert`` would clip them to 255.

    ``I;16*`` (16-bit gray, how Pillow opens 16-bit gray PNGs) and ``I`` (32-bit integers, which 16-bit PNGs give in
    older Pillows) are read as 16-bit values [0, 65535] → ``L``. Pillow itself reduces 16-bit RGB(A)/LA PNGs to
    8 bits by their high byte. ``F`` has no defined range and is refused.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        return PIL.Image.fromarray(_scale_to_8_bits(np.asarray(image), 65535), mode="L")
    if image.mode == "La":  # premultiplied gray + alpha: Pillow converts it to RGB only through LA
        return image.convert("LA")
    if image.mode == "F":
        raise ValueError(
            f"image {index}: mode F (32-bit float pixels) has no defined value range; convert it to 8 or 16 bits first"
        )
    return image


def _check_input_pixels(width: int, height: int, index: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise ImageLimitError(
            f"image {index} is {width}x{height} (width x height) = {width * height} pixels; at most "
            f"{MAX_INPUT_PIXELS} pixels are accepted (MAX_INPUT_PIXELS)"
        )


def _open_image(image: ImageInput, index: int) -> PIL.Image.Image:
    """``image`` as a PIL image; a file is read (bounded) and opened but not decoded yet."""
    if isinstance(image, PIL.Image.Image):
        _check_input_pixels(image.width, image.height, index)
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = read_bytes(path, f"image {index}", MAX_IMAGE_FILE_BYTES)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {index}: no such file: {path}") from None
        except NotARegularFileError as err:
            raise NotARegularFileError(f"image {index}: {err}") from None
        except ValueError as err:  # too large, FileTooLargeError
            raise ImageLimitError(f"image {index}: {err}") from None
        try:
            opened = PIL.Image.open(io.BytesIO(data))
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"image {index}: cannot read {path} as an image: {err}") from err
        _check_input_pixels(opened.width, opened.height, index)
        opened.filename_for_errors = str(path)  # type: ignore[attr-defined]
        return opened
    if isinstance(image, np.ndarray):
        if image.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"image {index}: a numpy image must be uint8 or uint16, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(
                f"image {index}: a numpy image must be (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA,"
                f" got shape {tuple(image.shape)}"
            )
        _check_input_pixels(image.shape[1], image.shape[0], index)
        if image.dtype == np.uint16:
            image = _scale_to_8_bits(image, 65535)
        return PIL.Image.fromarray(np.ascontiguousarray(image))  # mode L, RGB or RGBA from the shape
    raise TypeError(
        f"image {index}: expected a file path, a PIL image or a uint8/uint16 numpy array, got {type(image).__name__}"
    )


def load_image(image: ImageInput, index: int = 0) -> PIL.Image.Image:
    """``image`` as a decoded PIL image in its own mode, except that samples wider than 8 bits are scaled to 8 bits
    (no RGB conversion: callers differ on when that happens). ``index`` is the image's place in the caller's list,
    for the error messages. Files must be regular files within :data:`MAX_IMAGE_FILE_BYTES` and
    :data:`MAX_INPUT_PIXELS`."""
    return _decoded(_open_image(image, index), index)


def _decoded(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    try:
        image.load()  # decode now (a no-op for a decoded image), so a truncated file fails here
    except (OSError, SyntaxError, ValueError) as err:
        where = getattr(image, "filename_for_errors", "the image")
        raise ValueError(f"image {index}: cannot read {where} as an image: {err}") from err
    return _eight_bit(image, index)


def regularize_image(image: ImageInput, min_pixels: int, max_pixels: int) -> PIL.Image.Image:
    """The training-time and lmms-eval pre-resize ``_regularize_images`` (spec §3), applied before the processor.

    The order is the authors': area clamps with ``int()`` truncation and PIL's default filter, *then* RGB (so a
    palette image is resized with NEAREST), then the minimum side and the aspect-ratio fixes.
    """
    image = load_image(image)
    if image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * scale), int(image.height * scale)))
    if image.width * image.height < min_pixels:
        scale = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * scale), int(image.height * scale)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > MAX_ASPECT_RATIO:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > MAX_ASPECT_RATIO:
        image = image.resize((image.width, image.width * 180))
    return image


@dataclass
class ProcessedImages:
    """What the model's vision tower takes, in the authors' processor layout."""

    pixel_values: torch.Tensor
    """(total patches, C·T·P·P) float32; each image's patches in merge-block order, images one after another."""
    image_grid_thw: torch.Tensor
    """(images, 3) int64: (1, patches high, patches wide) per image."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


@dataclass
class ImageProcessor:
    """Dimple's image processor, configured from a checkpoint's ``preprocessor_config.json``.

    Defaults are Qwen2.5-VL-7B-Instruct's, which Dimple starts from; Dimple-7B's training saved its own
    ``max_pixels`` (likely 112896), so load the checkpoint's file rather than relying on them.
    """

    min_pixels: int = 56 * 56
    """Smallest area after resizing; smaller images are scaled up."""
    max_pixels: int = 12845056
    """Largest area after resizing; larger images are scaled down."""
    patch_size: int = 14
    """Side of a vision patch in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch; a still image is repeated this many times."""
    merge_size: int = 2
    """Side of the square of patches merged into one LLM token; resized sides are multiples of patch·merge."""
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    """Per-channel (RGB) mean subtracted after rescaling."""
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    """Per-channel (RGB) standard deviation divided by after subtracting the mean."""
    rescale_factor: float = 1 / 255
    """Factor from uint8 pixel values to [0, 1]."""
    do_resize: bool = True
    """Resize with ``smart_resize``; without it the image's sides must already be multiples of patch·merge."""
    do_rescale: bool = True
    """Multiply by ``rescale_factor``."""
    do_normalize: bool = True
    """Subtract ``image_mean`` and divide by ``image_std``."""
    do_convert_rgb: bool = True
    """Convert non-RGB images to RGB; without it they are refused."""
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    """PIL resampling filter of the resize (3 = bicubic)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}")
        if self.max_pixels > MAX_PIXELS_LIMIT:
            raise ValueError(
                f"{name}.max_pixels must be at most {MAX_PIXELS_LIMIT} ({MAX_PIXELS_LIMIT // 784} vision tokens per "
                f"image), got {self.max_pixels}"
            )
        for field in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, field) > 64:
                raise ValueError(f"{name}.{field} must be an integer in [1, 64], got {getattr(self, field)!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"{name}.min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        for field in ("image_mean", "image_std"):
            value = getattr(self, field)
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(map(_is_number, value)):
                raise ValueError(f"{name}.{field} must be 3 finite numbers (R, G, B), got {value!r}")
            setattr(self, field, tuple(float(v) for v in value))
        if any(v == 0 for v in self.image_std):
            raise ValueError(f"{name}.image_std must not contain 0, got {self.image_std!r}")
        if not _is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"{name}.rescale_factor must be a positive number, got {self.rescale_factor!r}")
        self.rescale_factor = float(self.rescale_factor)
        for field in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if type(getattr(self, field)) is not bool:  # a bad option value, hence ValueError like the others
                raise ValueError(f"{name}.{field} must be true or false, got {getattr(self, field)!r}")
        filters = sorted(int(r) for r in PIL.Image.Resampling)
        if not _is_int(self.resample) or self.resample not in filters:
            raise ValueError(f"{name}.resample must be a PIL filter id {filters}, got {self.resample!r}")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge block of patches."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageProcessor:
        """From the fields of a ``preprocessor_config.json``; unknown keys (type names, auto_map) are ignored, and
        null values mean the default, as in transformers.

        ``min_pixels``/``max_pixels`` may also come from ``size``, as ``shortest_edge``/``longest_edge``
        (transformers 5) or ``min_pixels``/``max_pixels`` (4.x); top-level keys win, as in transformers.
        """
        kwargs = {f.name: data[f.name] for f in dataclasses.fields(cls) if data.get(f.name) is not None}
        size = data.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise ValueError(f"{cls.__name__}.size must be an object, got {size!r}")
            for field, new_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                if field not in kwargs:
                    value = size.get(new_key, size.get(field))
                    if value is not None:
                        kwargs[field] = value
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        """Read ``preprocessor_config.json`` from a checkpoint folder."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        if not path.exists():
            raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG} in {directory}: it holds the image processor settings")
        data = read_json(path, "the image processor settings", MAX_JSON_BYTES, dict)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` fields, in the Hugging Face layout (transformers can load them)."""
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        data["size"] = {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels}
        data["image_processor_type"] = IMAGE_PROCESSOR_TYPE
        data["processor_class"] = PROCESSOR_CLASS
        return data

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``directory`` atomically (temp file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # indent 2, sorted keys: as transformers' to_json_string
        return write_json(directory / PREPROCESSOR_CONFIG, self.to_dict(), indent=2, sort_keys=True)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> ProcessedImages:
        """Preprocess one image or a list of them; the patches of all images are concatenated."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        if len(batch) > MAX_IMAGES:
            raise ImageLimitError(f"{len(batch)} images in one call; at most {MAX_IMAGES} are accepted (MAX_IMAGES)")
        # Open every image (header only) and add up the vision tokens before decoding or resizing any of them.
        opened = [_open_image(image, index) for index, image in enumerate(batch)]
        tokens = 0
        for index, image in enumerate(opened):
            height, width = image.height, image.width
            if self.do_resize:
                try:
                    height, width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
                except ValueError as err:
                    raise ValueError(f"image {index}: {err}") from err
            tokens += (height // self.factor) * (width // self.factor)
        if tokens > MAX_TOTAL_IMAGE_TOKENS:
            raise ImageLimitError(
                f"the {len(batch)} images would give {tokens} vision tokens; at most {MAX_TOTAL_IMAGE_TOKENS} per call "
                "are accepted (MAX_TOTAL_IMAGE_TOKENS): pass fewer or smaller images, or lower max_pixels"
            )
        table = self._value_table()
        patches, grids = [], []
        for index, image in enumerate(opened):
            image_patches, grid = self._patchify(self._resized_rgb(_decoded(image, index), index), table)
            patches.append(image_patches)
            grids.append(grid)
        return ProcessedImages(torch.cat(patches), torch.tensor(grids, dtype=torch.long))

    def _resized_rgb(self, image: PIL.Image.Image, index: int) -> np.ndarray:
        """RGB, resized: (H', W', 3) uint8."""
        if image.mode != "RGB":
            if not self.do_convert_rgb:
                raise ValueError(f"image {index}: mode {image.mode} is not RGB and do_convert_rgb is off")
            try:
                # transformers 4.46's convert_to_rgb: a plain convert, which drops alpha (5.x composites on white).
                image = image.convert("RGB")
            except ValueError as err:
                raise ValueError(f"image {index}: cannot convert mode {image.mode} to RGB: {err}") from err
        width, height = image.size
        if self.do_resize:
            try:
                new_height, new_width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
            except ValueError as err:
                raise ValueError(f"image {index}: {err}") from err
            # transformers' resize hands the uint8 RGB pixels to PIL and resizes there: the same call as this.
            image = image.resize((new_width, new_height), resample=self.resample)
        elif height % self.factor or width % self.factor:
            raise ValueError(
                f"image {index}: with do_resize off the sides must be multiples of {self.factor}, got {height}x{width}"
            )
        return np.asarray(image)

    def _value_table(self) -> np.ndarray:
        """(256, 3) float32: the processed value of each uint8 value in each channel.

        Rescale and normalise act on each pixel value alone, so tabulating them is exact. The table is computed as
        transformers does: the rescale product in float64 rounded once to float32, then (x - mean) / std in float32.
        """
        values = np.arange(256, dtype=np.float64)[:, None].repeat(3, axis=1)  # (256, 3), exact in float64
        values = (values * self.rescale_factor if self.do_rescale else values).astype(np.float32)
        if self.do_normalize:
            values = (values - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(
                self.image_std, dtype=np.float32
            )
        return values

    def _patchify(self, pixels: np.ndarray, table: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(H, W, 3) uint8 → ((gh·gw, C·T·P·P) float32 patches, (1, gh, gw))."""
        height, width, channels = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        x = torch.from_numpy(table[pixels, np.arange(channels)])  # (H, W, C) float32
        x = x.view(gh // m, m, p, gw // m, m, p, channels)  # (gh/m, m, py, gw/m, m, px, C)
        # Spec order: block row, block col, in-block row, in-block col, channel, t, py, px. The spec reaches it from
        # CHW frames; starting from HWC only changes which axes the permute names.
        x = x.permute(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, py, px)
        x = x.unsqueeze(5).expand(gh // m, gw // m, m, m, channels, t, p, p)  # T identical frames of a still image
        return x.reshape(gh * gw, channels * t * p * p), (1, gh, gw)  # (gh·gw, C·T·P·P)


def num_image_tokens(grid_thw: torch.Tensor | Sequence[int], merge_size: int = 2) -> int:
    """LLM tokens of one image: t·h·w patches, merge_size² patches per token."""
    t, h, w = (int(v) for v in grid_thw)
    patches = t * h * w
    if patches % (merge_size * merge_size):
        raise ValueError(f"grid {(t, h, w)} has {patches} patches, not a multiple of merge_size² = {merge_size**2}")
    return patches // (merge_size * merge_size)


def expand_image_placeholders(
    texts: Sequence[str],
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]],
    image_pad_token: str = IMAGE_PAD_TOKEN,
    merge_size: int = 2,
) -> list[str]:
    """Replace the k-th ``image_pad_token`` (counting over all texts, in order) by one copy per token of image k.

    The authors' processor does this before tokenising (spec §2); the model then scatters image k's features
    into those positions, so the counts must match exactly. On text, a ``<|image_pad|>`` the user typed counts
    as a placeholder too: for untrusted text use :func:`expand_image_placeholder_ids` after
    :meth:`~dimple_rt.tokenizer.DimpleTokenizer.encode_chat`.
    """
    grids = torch.as_tensor(image_grid_thw, dtype=torch.long)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (images, 3), got shape {tuple(grids.shape)}")
    counts = [num_image_tokens(grid, merge_size) for grid in grids]
    placeholders = sum(text.count(image_pad_token) for text in texts)
    if placeholders != len(counts):
        raise ValueError(
            f"the texts hold {placeholders} {image_pad_token} placeholders but there are {len(counts)} images;"
            " each image needs exactly one"
        )
    expanded, k = [], 0
    for text in texts:
        pieces = text.split(image_pad_token)
        out = [pieces[0]]
        for piece in pieces[1:]:
            out.append(image_pad_token * counts[k] + piece)
            k += 1
        expanded.append("".join(out))
    return expanded


def expand_image_placeholder_ids(
    sequences: Sequence[Sequence[int]],
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]],
    image_pad_token_id: int,
    merge_size: int = 2,
) -> list[list[int]]:
    """:func:`expand_image_placeholders` on token ids: the k-th ``image_pad_token_id`` (over all sequences, in
    order) becomes one copy per token of image k.

    Use it after :meth:`~dimple_rt.tokenizer.DimpleTokenizer.encode_chat`: there the only placeholder ids are the
    template's, one per image item, while a ``<|image_pad|>`` the user typed is plain text and is not counted.
    """
    grids = torch.as_tensor(image_grid_thw, dtype=torch.long)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (images, 3), got shape {tuple(grids.shape)}")
    counts = [num_image_tokens(grid, merge_size) for grid in grids]
    placeholders = sum(list(ids).count(image_pad_token_id) for ids in sequences)
    if placeholders != len(counts):
        raise ValueError(
            f"the token ids hold {placeholders} image placeholders (id {image_pad_token_id}) but there are "
            f"{len(counts)} images; each image needs exactly one"
        )
    expanded, k = [], 0
    for ids in sequences:
        out: list[int] = []
        for token in ids:
            if token == image_pad_token_id:
                out.extend([token] * counts[k])
                k += 1
            else:
                out.append(token)
        expanded.append(out)
    return expanded
