# SPDX-License-Identifier: Apache-2.0
"""The ``dimple-rt`` command.

``dimple-rt demo`` is README's first command. Until a trained model ships with the package it writes a tiny
checkpoint with *random* weights, runs the full pipeline (chat template, image preprocessing, vision tower,
decoder) on an image it draws, and says plainly that the numbers carry no meaning.
``dimple-rt forward MODEL`` runs one full-sequence forward of any checkpoint on a prompt (and image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def _draw_demo_image():
    """A 224x168 picture of a red circle and a blue square on white (drawn, so nothing is downloaded)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 168), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 30, 100, 110), fill=(220, 30, 30))
    draw.rectangle((130, 50, 200, 120), fill=(30, 60, 220))
    return image


def _run_forward(model: str, prompt: str, image: object | None, backend: str) -> None:
    from dimple_rt import Runtime

    start = time.perf_counter()
    rt = Runtime(model, backend=backend)
    print(f"loaded {rt.path} ({rt.config.model_type}, backend={rt.backend}) in {time.perf_counter() - start:.2f} s")
    content: list[dict] = [{"type": "image", "image": image}] if image is not None else []
    content.append({"type": "text", "text": prompt})
    inputs = rt.prepare([{"role": "user", "content": content}])
    start = time.perf_counter()
    logits = rt.forward(inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.image_grid_thw)
    elapsed = time.perf_counter() - start
    n_image_tokens = int((inputs.input_ids == rt.config.image_token_id).sum())
    print(f"prompt: {inputs.input_ids.shape[1]} tokens ({n_image_tokens} image tokens)")
    print(f"forward: logits {tuple(logits.shape)} in {elapsed:.3f} s, finite={bool(torch.isfinite(logits).all())}")
    top = logits[0, -1].topk(5)
    shown = ", ".join(f"{rt.tokenizer.decode([i])!r}:{v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"top-5 logits at the last prompt position: {shown}")


def _demo(args: argparse.Namespace) -> int:
    from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint

    print(
        "dimple-rt demo: no trained model ships with the package yet, so this writes a tiny checkpoint with\n"
        "RANDOM weights (Dimple's exact layout and special tokens) and runs one real forward pass on it.\n"
        "The pipeline is real; the predicted tokens are meaningless.\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.out) if args.out else Path(tmp) / "dimple-tiny-random"
        write_tiny_checkpoint(directory)
        print(f"wrote a random tiny checkpoint to {directory}")
        _run_forward(str(directory), "What shapes are in this picture?", _draw_demo_image(), args.backend)
    return 0


def _forward(args: argparse.Namespace) -> int:
    _run_forward(args.model, args.prompt, args.image, args.backend)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dimple-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline end to end on a tiny model")
    demo.add_argument("--out", help="keep the tiny checkpoint in this folder instead of a temporary one")
    demo.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    demo.set_defaults(func=_demo)
    forward = sub.add_parser("forward", help="one full-sequence forward of a checkpoint")
    forward.add_argument("model", help="alias, folder in Hugging Face layout, or repo id in the local HF cache")
    forward.add_argument("--prompt", default="Describe this image.")
    forward.add_argument("--image", help="path of an image to put before the prompt")
    forward.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    forward.set_defaults(func=_forward)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"dimple-rt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
