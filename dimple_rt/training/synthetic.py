# SPDX-License-Identifier: Apache-2.0
"""A tiny synthetic training set: drawn pictures of coloured shapes and questions about them, as JSONL.

Tests and the tiny example use it: nothing is downloaded, the answers follow from the pictures (so a model
can learn them and a loss can go down), and a run over it takes seconds.

``python -m dimple_rt.training.synthetic OUT`` writes ``OUT/model`` (a tiny random checkpoint),
``OUT/data/train.jsonl`` with its images, and ``OUT/train_tiny.json``, a config that trains on them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square")


def paint_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    """Paint a circle, square or triangle inside ``box`` (x0, y0, x1, y1, corners included, as PIL's).

    The square keeps 1 px inside the box. dimple-tiny (:mod:`dimple_rt.tiny.tasks`) was trained on exactly these
    pixels, so any change here changes what the shipped model sees.
    """
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def draw_shape(colour: str, shape: str, size: tuple[int, int] = (84, 56)) -> Image.Image:
    """A white picture with one shape of ``colour`` in the middle."""
    image = Image.new("RGB", size, "white")
    w, h = size
    paint_shape(ImageDraw.Draw(image), shape, (w // 2 - h // 3, h // 6, w // 2 + h // 3, h - h // 6), COLOURS[colour])
    return image


def write_synthetic_dataset(
    directory: str | Path, num_records: int = 8, seed: int = 0, text_only_every: int = 0
) -> Path:
    """Write ``num_records`` conversations (one image each, relative paths) to ``directory/train.jsonl``.

    With ``text_only_every = k > 0`` every k-th record has no image (a plain text question).
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for index in range(num_records):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if text_only_every and index % text_only_every == text_only_every - 1:
            record = {
                "messages": [
                    {"role": "user", "content": f"What colour is a {colour} {shape}?"},
                    {"role": "assistant", "content": f"The {shape} is {colour}."},
                ],
                "images": [],
            }
        else:
            name = f"images/{index:04d}.png"
            draw_shape(colour, shape).save(directory / name)
            record = {
                "messages": [
                    {"role": "user", "content": "<image>\nWhat colour is the shape?"},
                    {"role": "assistant", "content": f"The {shape} is {colour}."},
                ],
                "images": [name],
            }
        lines.append(json.dumps(record))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the model, data and config into")
    parser.add_argument("--records", type=int, default=32)
    args = parser.parse_args(argv)
    out = Path(args.out)
    write_tiny_checkpoint(out / "model")
    write_synthetic_dataset(out / "data", args.records)
    config = {
        "init_model": "model",
        "train_file": "data/train.jsonl",
        "output_dir": "run",
        "stage": "diffusion",
        "learning_rate": 1e-3,
        "max_grad_norm": 1.0,
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 20,
        "max_seq_length": 256,
    }
    (out / "train_tiny.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'model'}, {out / 'data/train.jsonl'} and {out / 'train_tiny.json'}")
    print(f"train with:  dimple-rt train {out / 'train_tiny.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
