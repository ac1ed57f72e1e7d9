# SPDX-License-Identifier: Apache-2.0
"""The ``dimple-rt`` command.

``dimple-rt demo`` is README's first command: the shipped dimple-tiny model (a small Dimple we trained,
AR then diffusion, see ``dimple_rt.tiny``) answers a question about a picture the task generator draws, with the
full pipeline (chat template, image preprocessing, vision tower, decoder, confident decoding with prefilling),
and prints the answer and the number of forward passes.
``dimple-rt generate MODEL`` answers a prompt (and image) with any checkpoint, with a flag for every
GenerationConfig option (derived from the dataclass, so a new option gets its flag), ``--json`` and
``--visualize``; ``dimple-rt chat MODEL`` is a terminal chat that shows the canvas unmasking;
``dimple-rt forward MODEL`` runs one full-sequence forward.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import re
import sys
import textwrap
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dimple_rt import __version__
from dimple_rt.config import ALG_CONFIDENCE, BLOCK_STARTS, CACHES, PIPELINES, GenerationConfig
from dimple_rt.presets import PRESETS, options_over_preset, preset_named

if TYPE_CHECKING:
    from dimple_rt.runtime import GenerationResult


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


# Generation options as flags -----------------------------------------------------------------------------------

GENERATION_FIELDS = tuple(field.name for field in dataclasses.fields(GenerationConfig))
"""Every GenerationConfig option; each gets ``--name-with-dashes``."""
CHOICES: dict[str, tuple[str, ...]] = {
    "alg": tuple(ALG_CONFIDENCE),
    "pipeline": PIPELINES,
    "cache": CACHES,
    "block_start": BLOCK_STARTS,
}
"""Options whose values form a fixed set (argparse lists them and refuses others; a str field not listed here
still gets its flag, and GenerationConfig checks its value)."""
PRIOR_OPTIONS = ("template", "response_length")
"""generate's structure-prior keywords, which are not GenerationConfig fields."""


def _field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under it in the source), whitespace collapsed."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _converter(hint: object) -> Callable[[str], object]:
    """An argparse ``type`` for a field annotated ``hint``: ints and floats parsed, 'none' for an optional one,
    free text where the annotation admits a str (GenerationConfig then checks it)."""
    members = typing.get_args(hint) or (hint,)
    optional = type(None) in members
    numbers = [kind for kind in (int, float) if kind in members]
    expected = " or ".join(
        [{"int": "an integer", "float": "a number"}[k.__name__] for k in numbers] + ["'none'"] * optional
    )

    def convert(text: str) -> object:
        if optional and text.lower() == "none":
            return None
        for kind in numbers:
            try:
                return kind(text)
            except ValueError:
                pass
        if str in members:
            return text
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return convert


def _add_generation_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """A flag for every GenerationConfig field, typed from its annotation and documented by its docstring, plus
    ``--template`` and ``--response-length``. Flags left out are not passed, so the library's defaults apply
    (except ``max_new_tokens``, this command's default without a template)."""
    docs, hints = _field_docs(GenerationConfig), typing.get_type_hints(GenerationConfig)
    group = parser.add_argument_group("generation options (GenerationConfig; 'none' means None)")
    for field in dataclasses.fields(GenerationConfig):
        name, flag = field.name, "--" + field.name.replace("_", "-")
        default = max_new_tokens if name == "max_new_tokens" else field.default
        help_text = f"{_first_sentence(docs.get(name, ''))} (default: {default})".replace("%", "%%")
        if hints[name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(
                flag, type=_converter(hints[name]), choices=CHOICES.get(name), default=argparse.SUPPRESS, help=help_text
            )
    group.add_argument("--template", default=argparse.SUPPRESS, help="text with <mask:N> spans at the canvas start")
    group.add_argument(
        "--response-length", type=int, default=argparse.SUPPRESS, help="<|endoftext|> from this canvas position on"
    )
    parser.set_defaults(options_parser=parser, default_max_new_tokens=max_new_tokens)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generate keywords the flags give: the GenerationConfig fields that were set, template and
    response_length; ``max_new_tokens`` gets the command's default unless a template sizes the canvas."""
    options = {name: getattr(args, name) for name in (*GENERATION_FIELDS, *PRIOR_OPTIONS) if hasattr(args, name)}
    if "max_new_tokens" not in options and "template" not in options:
        options["max_new_tokens"] = args.default_max_new_tokens
    return options


def _config_of(options: dict[str, Any], preset: str | None, canvas_tokens: int | None = None) -> GenerationConfig:
    """The GenerationConfig that generate keywords make over ``preset``'s options (its warnings are generate's
    to give)."""
    fields = options_over_preset(options, preset_named(preset))
    fields = {name: value for name, value in fields.items() if name in GENERATION_FIELDS}
    if canvas_tokens is not None:
        fields["max_new_tokens"] = canvas_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GenerationConfig(**fields)


def _with_flags(message: str, options: dict[str, Any]) -> str:
    """A GenerationConfig error led by the flags it names (it names fields: ``top_k``, not ``--top-k``)."""
    named = ["--" + name.replace("_", "-") for name in options if re.search(rf"\b{name}\b", message)]
    return f"argument {'/'.join(named)}: {message}" if named else message


def _print_result(
    result: GenerationResult, prompt: str, image: object | None, render: Callable[[torch.Tensor], str]
) -> None:
    """The answer for people: the prompt, the canvas after every step (with --return-history), the answer and
    its statistics."""
    print(f"prompt: {prompt!r}" + (" (with an image)" if image is not None else ""))
    if result.history is not None:
        for index, sequences in enumerate(result.history):
            print(f"step {index}: {render(sequences[0, -result.stats.canvas_tokens :])}")
    print(f"answer: {result.text!r}")
    print(f"forward passes: {result.num_forward_passes} for a {result.stats.canvas_tokens}-token canvas")
    print(f"stats: {result.summary()}")


def _result_json(
    result: GenerationResult, prompt: str, image: object | None, options: dict[str, Any], preset: str | None
) -> dict[str, Any]:
    """``--json``'s object: the answer, its ids, why it ended, the stats and the options as resolved."""
    config = dataclasses.asdict(_config_of(options, preset, result.stats.canvas_tokens))
    config.update({name: options[name] for name in PRIOR_OPTIONS if name in options})
    data = {
        "prompt": prompt,
        "image": None if image is None else str(image),
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "num_forward_passes": result.num_forward_passes,
        "stats": dataclasses.asdict(result.stats),
        "options": config,
    }
    if result.history is not None:
        data["history"] = [sequences[0, -result.stats.canvas_tokens :].tolist() for sequences in result.history]
    return data


def _run_generate(model: str, prompt: str, image: object | None, args: argparse.Namespace) -> None:
    from dimple_rt import Runtime

    rt = Runtime(model, **_runtime_options(args))
    options = generation_options(args)
    conversation = _conversation(prompt, image)
    if args.visualize:
        from dimple_rt import visualize

        trace = visualize.record(rt, conversation, **options)
        result = trace.result
        visualize.write(trace, args.visualize)
    else:
        result = rt.generate(conversation, **options)
    if args.json:
        print(json.dumps(_result_json(result, prompt, image, options, args.preset)))
        return
    _print_result(result, prompt, image, rt.render_canvas)
    if args.visualize:
        print(f"visualisation: {args.visualize}")


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
    rt = Runtime("dimple-tiny", **_runtime_options(args))
    result = rt.generate(tasks.conversation(example, image), **generation_options(args))
    print(f"model: dimple-tiny ({rt.path})")
    print(f"image: {', '.join(f'{s.colour} {s.kind} at {s.position}' for s in example.shapes)} (drawn, 84x84)")
    print(f"question: {example.question}")
    print(f"answer: {result.text}")
    print(f"expected: {example.answer} ({'correct' if tasks.is_correct(example, result.text) else 'wrong'})")
    print(f"forward passes: {result.num_forward_passes} for a {result.stats.canvas_tokens}-token canvas")
    print(f"stats: {result.summary()}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    _run_generate(args.model, args.prompt, args.image, args)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from dimple_rt.chat import run_chat

    return run_chat(args.model, args.image, _runtime_options(args), generation_options(args))


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="kernels", choices=["kernels", "reference"])
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 or auto (default: float32 on the CPU)")
    parser.add_argument("--quantize", choices=["int8"], help="int8 linear layers (CPU)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="start from these options (flags override them); see presets.py"
    )


def _runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("backend", "device", "dtype", "quantize", "preset")
    return {key: getattr(args, key) for key in keys}


def _visualization_path(text: str) -> Path:
    from dimple_rt.visualize import FORMATS

    if Path(text).suffix.lower() not in FORMATS:
        raise argparse.ArgumentTypeError(f"the file must end in {' or '.join(FORMATS)}, got {text!r}")
    return Path(text)


def _forward(args: argparse.Namespace) -> int:
    _run_forward(args.model, args.prompt, args.image, args.backend)
    return 0


def _train(args: argparse.Namespace) -> int:
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
        shutdown_grace=args.shutdown_grace,
        **_runtime_options(args),
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
    _add_runtime_options(serve)
    serve.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="after SIGTERM, seconds in-flight requests may finish"
    )
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``dimple-rt`` argument parser (every subcommand)."""
    parser = argparse.ArgumentParser(prog="dimple-rt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dimple-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the shipped dimple-tiny model answers a question about a picture it draws")
    demo.add_argument("--out", help="also save the demo picture as OUT/demo.png")
    demo.add_argument("--example", type=int, default=0, help="ask about the n-th held-out picture instead")
    _add_runtime_options(demo)
    _add_generation_options(demo, max_new_tokens=16)
    demo.set_defaults(func=_demo)
    generate = sub.add_parser("generate", help="answer a prompt (and an image) with a checkpoint")
    generate.add_argument("model", help="alias, folder in Hugging Face layout, or repo id in the local HF cache")
    generate.add_argument("--prompt", default="Describe this image.")
    generate.add_argument("--image", help="path of an image to put before the prompt")
    generate.add_argument("--json", action="store_true", help="print one JSON object: text, ids, stats, options")
    generate.add_argument(
        "--visualize",
        type=_visualization_path,
        metavar="OUT.gif|OUT.html",
        help="also write the decoding, step by step: an animated GIF or an HTML page with a step slider",
    )
    _add_runtime_options(generate)
    _add_generation_options(generate, max_new_tokens=32)
    generate.set_defaults(func=_generate)
    chat = sub.add_parser("chat", help="chat in the terminal, watching each answer unmask")
    chat.add_argument("model", help="alias, folder in Hugging Face layout, or repo id in the local HF cache")
    chat.add_argument("--image", help="path of an image for the first question (later: /image PATH)")
    _add_runtime_options(chat)
    _add_generation_options(chat, max_new_tokens=64)
    chat.set_defaults(func=_chat)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "options_parser"):  # refuse bad options before a model is loaded, argparse-style (exit 2)
        try:
            _config_of(generation_options(args), args.preset)
        except (ValueError, TypeError) as err:
            args.options_parser.error(_with_flags(str(err), generation_options(args)))
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError) as err:
        print(f"dimple-rt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
