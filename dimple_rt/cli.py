# SPDX-License-Identifier: Apache-2.0
"""The ``dimple-rt`` command.

``dimple-rt demo`` is README's first command: the shipped dimple-tiny model (a small Dimple we trained,
AR then diffusion, see ``dimple_rt.tiny``) answers a question about a picture the task generator draws, with the
full pipeline (chat template, image preprocessing, vision tower, decoder, confident decoding with prefilling),
and prints the answer and the number of forward passes.
``dimple-rt generate MODEL`` answers a prompt (and image) with any checkpoint; ``dimple-rt forward MODEL`` runs
one full-sequence forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _run_forward(model: str, prompt: str, image: object | None, backend: str) -> None:
    from dimple_rt import Runtime

    start = time.perf_counter()
    rt = Runtime(model, backend=backend)
    print(
        f"loaded {rt.path} ({rt.config.model_type}, backend={rt.backend.name}) in {time.perf_counter() - start:.2f} s"
    )
    inputs = rt.prepare(_conversation(prompt, image))
    start = time.perf_counter()
    logits = rt.forward(inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.image_grid_thw)
    elapsed = time.perf_counter() - start
    image_id = rt.config.image_token_id
    n_image_tokens = 0 if image_id is None else int((inputs.input_ids == image_id).sum())
    print(f"prompt: {inputs.input_ids.shape[1]} tokens ({n_image_tokens} image tokens)")
    print(f"forward: logits {tuple(logits.shape)} in {elapsed:.3f} s, finite={bool(torch.isfinite(logits).all())}")
    top = logits[0, -1].topk(5)
    shown = ", ".join(
        f"{rt.tokenizer.decode([i])!r}:{v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist())
    )
    print(f"top-5 logits at the last prompt position: {shown}")


def _conversation(prompt: str, image: object | None) -> list[dict]:
    content: list[dict] = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]


def _generation_options(args: argparse.Namespace) -> dict[str, object]:
    """GenerationConfig options from the shared flags; GenerationConfig validates them (a threshold of 0 turns
    confident decoding off)."""
    options: dict[str, object] = {
        "max_new_tokens": args.max_new_tokens,
        "alg": args.alg,
        "prefill": not args.no_prefill,
    }
    if args.threshold is not None:
        options["threshold"] = args.threshold
    return options


def _run_generate(model: str, prompt: str, image: object | None, args: argparse.Namespace) -> None:
    from dimple_rt import Runtime

    rt = Runtime(model, backend=args.backend)
    options = _generation_options(args)
    start = time.perf_counter()
    result = rt.generate(_conversation(prompt, image), **options)
    elapsed = time.perf_counter() - start
    print(f"prompt: {prompt!r}" + (" (with an image)" if image is not None else ""))
    print(f"answer: {result.text!r}")
    print(
        f"forward passes: {result.num_forward_passes} for a {args.max_new_tokens}-token canvas in {elapsed:.2f} s "
        f"({len(result.token_ids)} answer tokens)"
    )


def _demo(args: argparse.Namespace) -> int:
    from dimple_rt import Runtime
    from dimple_rt.tiny import tasks

    # The n-th held-out (test-split) "What colour is the ...?" question: never seen in training.
    found = (e for e in tasks.examples("test", 100_000) if e.task == "colour_of_kind")
    example = next(e for index, e in enumerate(found) if index == args.example)
    image = example.image()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        image.save(Path(args.out) / "demo.png")
    rt = Runtime("dimple-tiny", backend=args.backend)
    options = _generation_options(args)
    start = time.perf_counter()
    result = rt.generate(tasks.conversation(example, image), **options)
    elapsed = time.perf_counter() - start
    print(f"model: dimple-tiny ({rt.path})")
    print(f"image: {', '.join(f'{s.colour} {s.kind} at {s.position}' for s in example.shapes)} (drawn, 84x84)")
    print(f"question: {example.question}")
    print(f"answer: {result.text}")
    print(f"expected: {example.answer} ({'correct' if tasks.is_correct(example, result.text) else 'wrong'})")
    print(
        f"forward passes: {result.num_forward_passes} for a {args.max_new_tokens}-token canvas "
        f"({len(result.token_ids)} answer tokens) in {elapsed:.2f} s"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    _run_generate(args.model, args.prompt, args.image, args)
    return 0


def _add_decoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--alg", default="maskgit_plus")
    parser.add_argument("--threshold", type=float, help="confident decoding threshold (default 0.95; 0 disables)")
    parser.add_argument("--no-prefill", action="store_true", help="recompute the prompt at every step")


def _forward(args: argparse.Namespace) -> int:
    _run_forward(args.model, args.prompt, args.image, args.backend)
    return 0


def _train(args: argparse.Namespace) -> int:
    import json

    from dimple_rt.training.config import TrainConfig
    from dimple_rt.training.trainer import run

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)  # numbers, booleans, null; anything else is a string
        except json.JSONDecodeError:
            overrides[key] = value
    run(TrainConfig.from_file(args.config, overrides))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from dimple_rt.serve import serve

    return serve(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key or os.environ.get("DIMPLE_RT_API_KEY") or None,
        image_dir=args.image_dir,
        timeout=args.timeout,
        max_images=args.max_images,
        backend=args.backend,
        shutdown_grace=args.shutdown_grace,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP with OpenAI's chat-completions API")
    serve.add_argument("model", help="alias, folder in Hugging Face layout, or repo id in the local HF cache")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded at once")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; then 429")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $DIMPLE_RT_API_KEY, or none)")
    serve.add_argument("--image-dir", help="folder that local image paths may name (default: data: URLs only)")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queueing included")
    serve.add_argument("--max-images", type=int, default=4, help="images per request")
    serve.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    serve.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="after SIGTERM, seconds in-flight requests may finish"
    )
    serve.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dimple-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the shipped dimple-tiny model answers a question about a picture it draws")
    demo.add_argument("--out", help="also save the demo picture as OUT/demo.png")
    demo.add_argument("--example", type=int, default=0, help="ask about the n-th held-out picture instead")
    _add_decoding_options(demo)
    demo.set_defaults(func=_demo, max_new_tokens=16)
    generate = sub.add_parser("generate", help="answer a prompt (and an image) with a checkpoint")
    generate.add_argument("model", help="alias, folder in Hugging Face layout, or repo id in the local HF cache")
    generate.add_argument("--prompt", default="Describe this image.")
    generate.add_argument("--image", help="path of an image to put before the prompt")
    _add_decoding_options(generate)
    generate.set_defaults(func=_generate)
    forward = sub.add_parser("forward", help="one full-sequence forward of a checkpoint")
    forward.add_argument("model", help="alias, folder in Hugging Face layout, or repo id in the local HF cache")
    forward.add_argument("--prompt", default="Describe this image.")
    forward.add_argument("--image", help="path of an image to put before the prompt")
    forward.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    forward.set_defaults(func=_forward)
    train = sub.add_parser("train", help="train from a JSON (or YAML) config; also runs under torchrun")
    train.add_argument("config", help="JSON/YAML config (python -m dimple_rt.training.synthetic DIR writes an example)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    train.set_defaults(func=_train)
    _add_serve(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"dimple-rt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
