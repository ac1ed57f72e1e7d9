# SPDX-License-Identifier: Apache-2.0
"""Accuracy of ``quantize="int8"`` against fp32 and bf16 on dimple-tiny's test split (exact mode).

    PYTHONPATH=. python benchmarks/quality_int8.py [n] [canvas ...]   # defaults: 200 examples, canvases 48 128

The settings of benchmarks/REPRODUCTION.md's accuracy table: the first ``n`` test examples, greedy, confident
decoding (threshold 0.95), prefilling, one thread. Per precision and canvas: accuracy, mean forward passes per
answer, and how many answers are word for word fp32's.
"""

from __future__ import annotations

import sys
import time

import torch

from dimple_rt import Runtime
from dimple_rt.tiny import tasks

MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8")}


def main(n: int, canvases: list[int]) -> None:
    torch.set_num_threads(1)
    examples = list(tasks.examples("test", n))
    runtimes = {mode: Runtime("dimple-tiny", dtype=d, quantize=q) for mode, (d, q) in MODES.items()}
    print(f"dimple-tiny, test split, first {n} examples, threshold 0.95, prefill, greedy, 1 thread")
    print("| canvas | precision | accuracy | mean forwards | answers = fp32's | s / answer |")
    print("|---|---|---|---|---|---|")
    for canvas in canvases:
        texts = {}
        for mode, rt in runtimes.items():
            start = time.perf_counter()
            results = [rt.generate(tasks.conversation(e), max_new_tokens=canvas) for e in examples]
            seconds = (time.perf_counter() - start) / n
            texts[mode] = [r.text for r in results]
            correct = sum(tasks.is_correct(e, r.text) for e, r in zip(examples, results))
            forwards = sum(r.num_forward_passes for r in results) / n
            same = sum(a == b for a, b in zip(texts[mode], texts["fp32"]))
            print(
                f"| {canvas} | {mode} | {100 * correct / n:.1f} % | {forwards:.2f} | {same}/{n} | {seconds:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200, [int(c) for c in sys.argv[2:]] or [48, 128])
