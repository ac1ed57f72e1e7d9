# SPDX-License-Identifier: Apache-2.0
"""Image preprocessing against transformers' Qwen2-VL image processor, and placeholder expansion.

The oracle is ``Qwen2VLImageProcessorPil`` (transformers 5's NumPy/PIL backend; the plain ``Qwen2VLImageProcessor``
needs torchvision). Its numbers are the authors' 4.46 numbers: the same PIL resize, float64 rescale and float32
normalise. Where 5.x departs from 4.46 (alpha compositing, sides under 28), we follow 4.46 and say so below.
Everything is compared bit for bit: the pipeline is deterministic per pixel, so no tolerance is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from _transformers_oracle import require_transformers

transformers = require_transformers()
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)

from dimple_rt.processor import (  # noqa: E402
    PREPROCESSOR_CONFIG,
    ImageProcessor,
    ProcessedImages,
    expand_image_placeholders,
    num_image_tokens,
    regularize_image,
    smart_resize,
)

DEFAULT_MAX = 12845056  # Qwen2.5-VL-7B-Instruct's max_pixels
TRAINED_MAX = 112896  # (14·24)², what Dimple's training saves (spec §3)
MIN_PIXELS = 3136
PIXEL_LIMITS = [(MIN_PIXELS, DEFAULT_MAX), (MIN_PIXELS, TRAINED_MAX), (100352, TRAINED_MAX)]

# Sides for smart_resize: 42, 70, 98, 126 and 406 are odd multiples of 14, i.e. exact .5 ties of side/28, which
# Python's round sends to even (42 → 56, 70 → 56, 98 → 112, 126 → 112). 5600 against 28 is the 200:1 limit, where
# the >max branch would floor a side to 0 without transformers 5's clamp to 28.
SIDES = [28, 29, 41, 42, 43, 55, 56, 69, 70, 71, 98, 126, 333, 406, 517, 1000, 1022, 1050, 3000, 3612, 5000, 5600]

# (height, width, max_pixels) for the pixel comparison: odd sizes, the <min branch (30×40, 28×28), a 1:75 strip,
# the >max branch with the trained limit (cheap) and with the default one (a 13.3 Mpixel image, the slow case).
IMAGE_CASES = [
    (333, 517, TRAINED_MAX),
    (333, 517, DEFAULT_MAX),
    (30, 40, TRAINED_MAX),
    (28, 28, DEFAULT_MAX),
    (40, 3000, TRAINED_MAX),
    (1000, 1400, TRAINED_MAX),
    (3700, 3600, DEFAULT_MAX),
]


def random_pixels(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Deterministic noise: the worst case for resampling, every output pixel mixes distinct values."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng([height, width, channels, seed]).integers(0, 256, shape, dtype=np.uint8)


def reference(
    images: list[PIL.Image.Image], min_pixels: int, max_pixels: int, **options: Any
) -> dict[str, torch.Tensor]:
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **options)
    return processor(images=images, return_tensors="pt")


def assert_same(ours: ProcessedImages, theirs: dict[str, torch.Tensor]) -> None:
    assert ours.pixel_values.dtype == torch.float32 and ours.image_grid_thw.dtype == torch.int64
    assert torch.equal(ours.image_grid_thw, theirs["image_grid_thw"])
    assert torch.equal(ours.pixel_values, theirs["pixel_values"])


# --- smart_resize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("min_pixels", "max_pixels"), PIXEL_LIMITS)
def test_smart_resize_matches_transformers(min_pixels: int, max_pixels: int) -> None:
    for height in SIDES:
        for width in SIDES:
            if max(height, width) / min(height, width) > 200:
                continue
            expected = hf_smart_resize(height, width, 28, min_pixels, max_pixels)
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected, (height, width)


def test_smart_resize_branches() -> None:
    assert smart_resize(70, 98, 28, MIN_PIXELS, DEFAULT_MAX) == (56, 112)  # ties to even, both ways
    assert smart_resize(42, 126, 28, MIN_PIXELS, DEFAULT_MAX) == (56, 112)
    assert smart_resize(30, 40, 28, MIN_PIXELS, DEFAULT_MAX) == (56, 84)  # <min: scaled up, ceil
    height, width = smart_resize(3700, 3600, 28, MIN_PIXELS, TRAINED_MAX)  # >max: scaled down, floor
    assert (height, width) == (336, 308) and height * width <= TRAINED_MAX
    assert smart_resize(28, 5600, 28, MIN_PIXELS, TRAINED_MAX) == (28, 4732)  # clamped side, not 0


def test_smart_resize_errors() -> None:
    # transformers 5 scales such images up; the authors' 4.46 copy (and spec §3) refuse them.
    with pytest.raises(ValueError, match=r"27x100 .*at least 28"):
        smart_resize(27, 100)
    with pytest.raises(ValueError, match=r"100x20 .*at least 28"):
        smart_resize(100, 20)
    with pytest.raises(ValueError, match=r"28x5601 .*aspect ratio 200\.0.*at most 200"):
        smart_resize(28, 5601)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(28, 5601)  # the oracle agrees on this one


# --- pixel values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "max_pixels"), IMAGE_CASES)
def test_pixel_values_bit_equal(height: int, width: int, max_pixels: int) -> None:
    image = PIL.Image.fromarray(random_pixels(height, width))
    ours = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=max_pixels)([image])
    assert_same(ours, reference([image], MIN_PIXELS, max_pixels))
    grid = ours.image_grid_thw[0]
    assert ours.pixel_values.shape == (int(grid.prod()), 3 * 2 * 14 * 14)


def _image_of_mode(mode: str) -> PIL.Image.Image:
    rgb = PIL.Image.fromarray(random_pixels(333, 517))
    if mode == "P":
        return rgb.quantize(64)  # a palette without transparency
    if mode == "RGBA-opaque":
        return PIL.Image.fromarray(np.dstack([random_pixels(333, 517), np.full((333, 517), 255, np.uint8)]))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "RGBA-opaque"])
def test_modes_bit_equal(mode: str) -> None:
    image = _image_of_mode(mode)
    ours = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX)([image])
    assert_same(ours, reference([image], MIN_PIXELS, TRAINED_MAX))


def test_translucent_rgba_drops_alpha_like_the_authors() -> None:
    # transformers 4.46 (the authors' stack) converts with a plain convert("RGB"), dropping alpha; 5.x composites
    # onto white. We match 4.46, so the oracle gets the alpha-dropped image, and fed the RGBA one it differs.
    image = PIL.Image.fromarray(random_pixels(333, 517, channels=4))
    ours = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX)([image])
    assert_same(ours, reference([image.convert("RGB")], MIN_PIXELS, TRAINED_MAX))
    assert not torch.equal(ours.pixel_values, reference([image], MIN_PIXELS, TRAINED_MAX)["pixel_values"])


@pytest.mark.parametrize(
    "options",
    [{"do_normalize": False}, {"do_rescale": False}, {"do_rescale": False, "do_normalize": False}, {"resample": 2}],
)
def test_options_bit_equal(options: dict[str, Any]) -> None:
    image = PIL.Image.fromarray(random_pixels(333, 517))
    ours = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX, **options)([image])
    assert_same(ours, reference([image], MIN_PIXELS, TRAINED_MAX, **options))


def test_several_images_in_one_call() -> None:
    images = [
        PIL.Image.fromarray(random_pixels(333, 517)),
        PIL.Image.fromarray(random_pixels(30, 40)).convert("L"),
        PIL.Image.fromarray(random_pixels(40, 3000)),
        PIL.Image.fromarray(random_pixels(700, 500)).quantize(200),
    ]
    ours = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX)(images)
    assert_same(ours, reference(images, MIN_PIXELS, TRAINED_MAX))
    assert ours.image_grid_thw.shape == (4, 3)
    assert ours.pixel_values.shape[0] == int(ours.image_grid_thw.prod(dim=1).sum())


def test_input_kinds_agree(tmp_path: Path) -> None:
    processor = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX)
    for channels in (3, 1, 4):
        array = random_pixels(333, 517, channels=channels)
        pil = PIL.Image.fromarray(array)
        path = tmp_path / f"image{channels}.png"
        pil.save(path)
        expected = processor([pil])
        kinds = [array, path, str(path)] + ([array[:, :, None]] if channels == 1 else [])
        for kind in kinds:
            got = processor([kind])
            assert torch.equal(got.pixel_values, expected.pixel_values), type(kind)
            assert torch.equal(got.image_grid_thw, expected.image_grid_thw)
    single = processor(pil)  # one image without a list
    assert torch.equal(single.pixel_values, processor([pil]).pixel_values)


def test_input_errors(tmp_path: Path) -> None:
    processor = ImageProcessor()
    good = random_pixels(56, 56)
    with pytest.raises(
        TypeError, match=r"image 1: expected a file path, a PIL image or a uint8/uint16 numpy array, got int"
    ):
        processor([good, 42])
    with pytest.raises(TypeError, match=r"image 0: .*got Tensor"):
        processor([torch.zeros(56, 56, 3, dtype=torch.uint8)])
    with pytest.raises(TypeError, match=r"image 0: a numpy image must be uint8 or uint16, got float32"):
        processor([good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"image 1: a numpy image must be .*got shape \(56, 56, 2\)"):
        processor([good, good[:, :, :2]])
    with pytest.raises(ValueError, match=r"image 0: .*got shape \(2, 56, 56, 3\)"):
        processor([np.stack([good, good])])
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=r"image 2: no such file: .*missing\.png"):
        processor([good, good, missing])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"image 0: cannot read .*garbage\.png as an image"):
        processor([garbage])
    truncated = tmp_path / "truncated.png"
    PIL.Image.fromarray(random_pixels(100, 100)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"image 0: cannot read .*truncated\.png"):
        processor([truncated])
    with pytest.raises(ValueError, match=r"image 1: image is 20x50 .*at least 28"):
        processor([good, random_pixels(20, 50)])
    with pytest.raises(ValueError, match=r"image 0: .*aspect ratio"):
        processor([random_pixels(28, 6000)])
    with pytest.raises(ValueError, match="no images"):
        processor([])


def test_convert_and_resize_switches() -> None:
    strict = ImageProcessor(do_convert_rgb=False, do_resize=False)
    with pytest.raises(ValueError, match=r"image 0: mode L is not RGB and do_convert_rgb is off"):
        strict([random_pixels(56, 56, channels=1)])
    with pytest.raises(ValueError, match=r"image 0: with do_resize off the sides must be multiples of 28, got 56x60"):
        strict([random_pixels(56, 60)])
    assert strict([random_pixels(56, 84)]).image_grid_thw.tolist() == [[1, 4, 6]]


# --- preprocessor_config.json -------------------------------------------------------------------------------------

# Qwen2.5-VL-7B-Instruct's file, which Dimple's image processor starts from.
QWEN25_VL_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def write_config(directory: Path, data: dict[str, Any] | str) -> None:
    """Write a config: a dict as JSON, a string as is (for malformed files)."""
    (directory / PREPROCESSOR_CONFIG).write_text(data if isinstance(data, str) else json.dumps(data))


def test_config_round_trip_and_transformers_reads_it(tmp_path: Path) -> None:
    processor = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX)
    path = processor.save(tmp_path / "checkpoint")
    assert [p.name for p in path.parent.iterdir()] == [PREPROCESSOR_CONFIG]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["image_processor_type"] == "Qwen2VLImageProcessor" and data["processor_class"] == "DimpleProcessor"
    assert data["size"] == {"longest_edge": TRAINED_MAX, "shortest_edge": MIN_PIXELS}
    assert data["resample"] == 3 and data["rescale_factor"] == 1 / 255
    assert ImageProcessor.from_pretrained(path.parent) == processor
    processor.save(path.parent)  # overwriting is fine
    theirs = Qwen2VLImageProcessorPil.from_pretrained(path.parent)
    image = PIL.Image.fromarray(random_pixels(333, 517))
    assert_same(processor([image]), theirs(images=[image], return_tensors="pt"))


def test_config_layouts(tmp_path: Path) -> None:
    write_config(tmp_path, QWEN25_VL_CONFIG)
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()
    write_config(tmp_path, {"size": {"shortest_edge": 1000, "longest_edge": 2000}})  # transformers 5
    loaded = ImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_pixels, loaded.max_pixels) == (1000, 2000)
    write_config(tmp_path, {"size": {"min_pixels": 10, "max_pixels": 20}, "max_pixels": 30})  # 4.x; top level wins
    loaded = ImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_pixels, loaded.max_pixels) == (10, 30)
    write_config(tmp_path, {"max_pixels": None, "image_mean": None})  # null means the default
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object .*, got an array"),
        ({"max_pixels": -1}, r"max_pixels must be a positive integer, got -1"),
        ({"patch_size": 14.0}, r"patch_size must be a positive integer, got 14\.0"),
        ({"min_pixels": 200, "max_pixels": 100}, r"min_pixels \(200\) must not exceed max_pixels \(100\)"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean must be 3 finite numbers"),
        ({"image_std": [0.5, 0.0, 0.5]}, r"image_std must not contain 0"),
        ({"rescale_factor": "1/255"}, r"rescale_factor must be a positive number"),
        ({"do_resize": "yes"}, r"do_resize must be true or false, got 'yes'"),
        ({"resample": 9}, r"resample must be a PIL filter id"),
        ({"size": 5}, r"size must be an object"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, data: dict[str, Any] | str, message: str) -> None:
    write_config(tmp_path, data)
    with pytest.raises(ValueError, match=rf"{PREPROCESSOR_CONFIG}: .*{message}"):
        ImageProcessor.from_pretrained(tmp_path)


def test_config_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"no {PREPROCESSOR_CONFIG} in"):
        ImageProcessor.from_pretrained(tmp_path)


# --- placeholder expansion ----------------------------------------------------------------------------------------

PAD = "<|image_pad|>"


def authors_expansion(texts: list[str], grids: torch.Tensor, merge_length: int = 4) -> list[str]:
    """DimpleProcessor.__call__'s loop (spec §2), as the oracle."""
    texts, index = list(texts), 0
    for i in range(len(texts)):
        while PAD in texts[i]:
            texts[i] = texts[i].replace(PAD, "<|placeholder|>" * int(grids[index].prod() // merge_length), 1)
            index += 1
        texts[i] = texts[i].replace("<|placeholder|>", PAD)
    return texts


def test_expand_image_placeholders() -> None:
    grids = torch.tensor([[1, 4, 6], [1, 18, 28], [1, 2, 214]])
    texts = [f"a<|vision_start|>{PAD}<|vision_end|>b{PAD}c", f"{PAD}d", "no image here"]
    expanded = expand_image_placeholders(texts, grids)
    assert expanded == authors_expansion(texts, grids)
    assert [t.count(PAD) for t in expanded] == [6 + 126, 107, 0]
    assert expanded[0] == f"a<|vision_start|>{PAD * 6}<|vision_end|>b{PAD * 126}c"
    assert expand_image_placeholders(["x"], torch.zeros(0, 3, dtype=torch.long)) == ["x"]
    assert expand_image_placeholders(["<i><img>"], [[1, 2, 4]], image_pad_token="<img>") == ["<i><img><img>"]


def test_expand_image_placeholders_count_mismatch() -> None:
    grids = torch.tensor([[1, 4, 6], [1, 4, 4]])
    with pytest.raises(ValueError, match=r"3 <\|image_pad\|> placeholders but there are 2 images"):
        expand_image_placeholders([f"{PAD}{PAD}", PAD], grids)
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholders but there are 2 images"):
        expand_image_placeholders(["text", PAD], grids)
    with pytest.raises(ValueError, match=r"image_grid_thw must be \(images, 3\)"):
        expand_image_placeholders([PAD], torch.tensor([4, 6]))


def test_num_image_tokens() -> None:
    assert num_image_tokens(torch.tensor([1, 18, 28])) == 126
    assert num_image_tokens((1, 18, 28), merge_size=1) == 504
    with pytest.raises(ValueError, match="not a multiple of merge_size"):
        num_image_tokens((1, 3, 5))


# --- _regularize_images -------------------------------------------------------------------------------------------


def test_regularize_image_branches() -> None:
    def size_after(
        width: int, height: int, min_pixels: int = MIN_PIXELS, max_pixels: int = TRAINED_MAX
    ) -> tuple[int, int]:
        image = PIL.Image.fromarray(random_pixels(height, width))
        result = regularize_image(image, min_pixels, max_pixels)
        assert result.mode == "RGB"
        return result.size  # (width, height)

    scale = math.sqrt(TRAINED_MAX / (1000 * 800))
    assert size_after(1000, 800) == (int(1000 * scale), int(800 * scale)) == (375, 300)  # over max: down, truncated
    assert size_after(30, 20) == (68, 45)  # under min: up, truncated
    assert size_after(300, 200) == (300, 200)  # in range: untouched
    assert size_after(500, 10) == (500, 28)  # short side raised to 28
    assert size_after(6000, 28, max_pixels=DEFAULT_MAX) == (5040, 28)  # wider than 200:1 → 180:1
    assert size_after(28, 6000, max_pixels=DEFAULT_MAX) == (28, 5040)


def test_regularize_image_converts_after_resizing(tmp_path: Path) -> None:
    palette = PIL.Image.fromarray(random_pixels(800, 1000)).quantize(64)
    result = regularize_image(palette, MIN_PIXELS, TRAINED_MAX)
    expected = palette.resize((375, 300), PIL.Image.Resampling.NEAREST).convert("RGB")  # P resizes with NEAREST
    assert np.array_equal(np.asarray(result), np.asarray(expected))
    path = tmp_path / "palette.png"
    palette.save(path)
    assert np.array_equal(np.asarray(regularize_image(path, MIN_PIXELS, TRAINED_MAX)), np.asarray(expected))
    ours = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=TRAINED_MAX)([result])
    assert_same(ours, reference([result], MIN_PIXELS, TRAINED_MAX))
