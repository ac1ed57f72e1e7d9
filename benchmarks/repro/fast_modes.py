# SPDX-License-Identifier: Apache-2.0
"""Accuracy and forward passes of the decoding modes on dimple-tiny's test split (issue 16's quality table).

Each mode answers the first ``--n`` test examples on canvases of 48 and 128 tokens, in each precision asked
for; the table goes to stdout (Markdown) and, with ``--json``, to a file. The exact mode is the default
``Runtime.generate`` (Dimple's confident decoding, threshold 0.95, prompt cache); the others are the
'fast_dllm' pipeline with its caches, and the options of ``preset="fast"`` (in the int8 rows, the preset itself:
``Runtime(preset="fast")`` is int8 with these options).

    python benchmarks/repro/fast_modes.py --n 200 --precisions fp32 bf16 --json fast_modes.json
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from typing import Any

import torch

from dimple_rt import Runtime
from dimple_rt.io import write_json
from dimple_rt.tiny import tasks

FAST = {"pipeline": "fast_dllm", "threshold": 0.9, "block_length": 16}
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "fast_dllm, prompt cache": {**FAST},
    "fast_dllm, block cache": {**FAST, "cache": "block"},
    "fast_dllm, dual cache": {**FAST, "cache": "dual"},
    "fast_dllm, dual cache, early stop": {**FAST, "cache": "dual", "early_stop": True},
    "fast_dllm, dual cache, early stop, threshold start, prompt kept": {
        **FAST,
        "cache": "dual",
        "early_stop": True,
        "block_start": "threshold",
        "refresh_prompt": False,
    },
    "preset 'fast' options": {"preset": "fast"},
}
PRECISIONS = {"fp32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}}


def evaluate(rt: Runtime, items: list[tasks.Example], canvas: int, options: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, mean forward passes and mean seconds per answer of one mode on ``items``."""
    correct, passes, seconds = [], [], []
    for example in items:
        start = time.perf_counter()
        result = rt.generate(tasks.conversation(example), max_new_tokens=canvas, **options)
        seconds.append(time.perf_counter() - start)
        correct.append(tasks.is_correct(example, result.text))
        passes.append(result.num_forward_passes)
    return {
        "accuracy": statistics.fmean(correct),
        "mean_passes": statistics.fmean(passes),
        "mean_seconds": statistics.fmean(seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dimple-tiny")
    parser.add_argument("--n", type=int, default=200, help="first n examples of the test split")
    parser.add_argument("--canvases", type=int, nargs="+", default=[48, 128])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = list(tasks.examples("test", args.n))
    accepted = set(inspect.signature(Runtime).parameters)
    results: list[dict[str, Any]] = []
    print("| precision | mode | canvas | accuracy | forward passes | s / answer |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions:
        kwargs = PRECISIONS[precision]
        if not set(kwargs) <= accepted:
            print(f"| {precision} | (not available in this build: Runtime takes no {sorted(set(kwargs) - accepted)}) |")
            continue
        rt = Runtime(args.model, **kwargs)
        for canvas in args.canvases:
            for mode, options in MODES.items():
                row = {"precision": precision, "mode": mode, "canvas": canvas, **evaluate(rt, items, canvas, options)}
                results.append(row)
                print(
                    f"| {precision} | {mode} | {canvas} | {100 * row['accuracy']:.1f} % | {row['mean_passes']:.2f} | "
                    f"{row['mean_seconds']:.3f} |",
                    flush=True,
                )
    if args.json:
        write_json(args.json, {"n": args.n, "threads": args.threads, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
