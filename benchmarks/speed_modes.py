# SPDX-License-Identifier: Apache-2.0
"""Seconds per answer of every decoding mode × precision on the 0.5B benchmark shape (issue 16, "Speed").

    PYTHONPATH=. python benchmarks/speed_modes.py [rounds]      # from the repository root; default 3 rounds

The checkpoint is test_bench_generate.py's (Qwen2.5-0.5B-shaped decoder: 24 layers, hidden 896, 14/2 heads,
FFN 4864, vocab 151936, untied LM head; a small vision tower; random fp32 weights) written once into a
temporary folder outside the repo; the prompt is its 224×224 image + "What is it?"; 64 new tokens, greedy.
One thread; the modes run round-robin (interleaved), ``rounds`` times; the table gives medians.

Random weights have no confidence: almost nothing passes a threshold, so every mode makes about one forward per
token. Seconds per answer = forwards × seconds per forward, and with a trained model the forwards fall (by how
much is REPRODUCTION.md's subject, not this script's), so the table gives both, and each forward's time against
its floor: per forward max(2·P·T / GEMM rate at that precision, weight bytes / copy bandwidth), P the decoder
layers' parameters (+ the LM head over half the computed canvas rows), T the tokens that forward computes:
prompt+canvas for a full forward (the prefill, and each block's refresh in the block/dual caches), canvas+1 for
a prefilled 'dim' step, the block for 'dual', the block and everything after it for 'block'. The forwards of
the block caches are assumed evenly spread over the blocks. GEMM rate and bandwidth: forward_int8.py's
(2048³ through dimple_rt's ``linear`` in that precision; best of 5 copies of 1 GiB), measured in this run.

The authors' baseline runs when DIMPLE_RT_AUTHORS (a checkout of github.com/yu-rp/Dimple) and
DIMPLE_RT_AUTHORS_PYTHON (a Python with transformers==4.46.2 and accelerate==1.6.0) are set: their
``diffusion_generate`` on the same checkpoint and inputs, fp32, one thread, ``use_cache=True`` (their prefill),
``alg="maskgit_plus"``, ``alg_p_threshold=0.95``, steps = 64, in a persistent subprocess
(speed_authors_worker.py) that takes its turn in each round. Otherwise it is skipped, with the reason printed.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dimple_rt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from forward_int8 import bandwidth, gemm_rate  # noqa: E402
from test_bench_generate import SIZES, _conversation  # noqa: E402

from dimple_rt.presets import PRESETS  # noqa: E402
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

MAX_NEW = 64
BLOCK = 32
PRECISIONS = {  # name: (Runtime kwargs, weight bytes, forward_int8 GEMM mode)
    "fp32": ({"dtype": torch.float32}, 4, "fp32"),
    "bf16": ({"dtype": torch.bfloat16}, 2, "bf16"),
    "int8": ({"dtype": torch.float32, "quantize": "int8"}, 1, "int8"),
}
EXACT = {}  # the defaults: pipeline 'dim', threshold 0.95, prefill
DUAL = {"pipeline": "fast_dllm", "cache": "dual", "block_length": BLOCK}  # threshold 'auto' = 0.9
BLOCKC = {"pipeline": "fast_dllm", "cache": "block", "block_length": BLOCK}
MODES = [  # (mode, precision, generate kwargs)
    ("exact", "fp32", EXACT),
    ("exact", "bf16", EXACT),
    ("exact", "int8", EXACT),
    ("fast_dllm dual", "fp32", DUAL),
    ("fast_dllm dual", "bf16", DUAL),
    ("fast_dllm dual", "int8", DUAL),
    ("fast_dllm block", "fp32", BLOCKC),
    ("fast_dllm block", "bf16", BLOCKC),
    ("fast_dllm block", "int8", BLOCKC),
    ("preset 'fast'", "int8", {"preset": "fast"}),
]


def tokens_per_forward(kwargs: dict, prompt_len: int, forwards: int) -> list[int]:
    """Tokens each forward computes (see the module docstring); a preset's options are expanded first."""
    if "preset" in kwargs:
        kwargs = {**PRESETS[kwargs["preset"]].options, **kwargs}
    full = prompt_len + MAX_NEW
    cache = kwargs.get("cache", "prefix")
    if kwargs.get("pipeline", "dim") == "dim" or cache == "prefix":
        return [full] + [MAX_NEW + 1] * (forwards - 1)
    block = kwargs["block_length"]
    refresh = full if kwargs.get("refresh_prompt", True) else MAX_NEW + 1
    shift = kwargs.get("block_start", "first") == "threshold"  # the span starts one position early
    blocks = math.ceil(MAX_NEW / block)
    out = []
    for b in range(blocks):
        n = forwards // blocks + (b < forwards % blocks)
        later = (block if cache == "dual" else MAX_NEW - b * block) + shift
        out += [full if b == 0 else refresh] + [later] * (n - 1)
    return out


def floor_seconds(
    tokens: list[int], layer_params: int, head_params: int, nbytes: int, rate: float, bw: float, prompt_len: int
) -> float:
    total = 0.0
    for t in tokens:
        canvas_rows = min(t, MAX_NEW) / 2
        compute = (2 * layer_params * t + 2 * head_params * canvas_rows) / rate
        memory = (layer_params + head_params) * nbytes / bw
        total += max(compute, memory)
    return total


class Authors:
    """The authors' diffusion_generate in a persistent subprocess (speed_authors_worker.py)."""

    def __init__(self, python: str, checkout: str, checkpoint: Path, inputs: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, str(HERE / "speed_authors_worker.py"), checkout, str(checkpoint), str(inputs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the authors' worker did not start (said {line!r}); run it by hand to see why")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    from dimple_rt.model import layers

    isa = torch.backends.cpu.get_cpu_capability()
    print(f"dimple_rt from {dimple_rt.__file__}")
    print(
        f"{datetime.date.today()}, torch {torch.__version__}, ISA {isa}, bf16 GEMM {layers.cpu_has_bf16_gemm()}, "
        f"VNNI {torch.cpu._is_vnni_supported()}, 1 thread, {rounds} rounds",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dimple_speed_") as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "qwen0.5b", sizes=SIZES, vocab_size=151936)
        runtimes = {p: dimple_rt.Runtime(checkpoint, **kw) for p, (kw, _, _) in PRECISIONS.items()}
        rt = runtimes["fp32"]
        inputs = rt.prepare(_conversation())
        prompt_len = inputs.input_ids.shape[1]
        layer_params = sum(p.numel() for p in rt.model.model.layers.parameters())
        head_params = rt.model.lm_head.weight.numel()
        rates = {p: gemm_rate(g) for p, (_, _, g) in PRECISIONS.items()}
        bw = bandwidth()
        print(
            f"prompt {prompt_len} tokens, {MAX_NEW} new; decoder layers {layer_params / 1e6:.1f} M + LM head "
            f"{head_params / 1e6:.1f} M params; GEMM 2048³ "
            + ", ".join(f"{p} {r / 1e9:.0f}" for p, r in rates.items())
            + f" GFLOP/s; copy bandwidth {bw / 1e9:.1f} GB/s",
            flush=True,
        )

        authors, why = None, None
        checkout, python = os.environ.get("DIMPLE_RT_AUTHORS"), os.environ.get("DIMPLE_RT_AUTHORS_PYTHON")
        if not checkout or not python:
            why = "DIMPLE_RT_AUTHORS and DIMPLE_RT_AUTHORS_PYTHON are not both set"
        elif not (Path(checkout) / "training-code" / "models" / "modeling_dimple.py").exists():
            why = f"{checkout} has no training-code/models/modeling_dimple.py"
        else:
            inputs_path = Path(tmp) / "inputs.pt"
            torch.save(
                {
                    "input_ids": inputs.input_ids,
                    "attention_mask": inputs.attention_mask,
                    "pixel_values": inputs.pixel_values,
                    "image_grid_thw": inputs.image_grid_thw,
                    "max_new_tokens": MAX_NEW,
                    "mask_token_id": rt.config.mask_token_id,
                    "pad_token_id": rt.config.pad_token_id,
                    "eos_token_id": rt.config.eos_token_id,
                },
                inputs_path,
            )
            try:
                authors = Authors(python, checkout, checkpoint, inputs_path)
            except Exception as error:  # noqa: BLE001 - reported, and the rest still runs
                why = f"the authors' worker failed: {error}"
        print("authors' baseline: " + ("running" if authors else f"skipped ({why})"), flush=True)

        conversation = _conversation()
        for name, precision, kwargs in MODES:  # warm-up, one short answer each
            runtimes[precision].generate(
                conversation,
                max_new_tokens=8,
                **kwargs,
            )
        times = {(m, p): [] for m, p, _ in MODES}
        forwards, answers = {}, {}
        if authors:
            times[("authors", "fp32")] = []
        for r in range(rounds):
            for name, precision, kwargs in MODES:
                gc.collect()
                start = time.perf_counter()
                result = runtimes[precision].generate(conversation, max_new_tokens=MAX_NEW, **kwargs)
                times[(name, precision)].append(time.perf_counter() - start)
                forwards[(name, precision)] = result.num_forward_passes
                answers[(name, precision)] = result.sequences[0][prompt_len:].tolist()
            if authors:
                out = authors.run()
                times[("authors", "fp32")].append(out["seconds"])
                forwards[("authors", "fp32")] = out["forwards"]
                answers[("authors", "fp32")] = out["tokens"]
            print(f"round {r + 1}: " + ", ".join(f"{m} {p} {t[-1]:.1f}s" for (m, p), t in times.items()), flush=True)
        if authors:
            authors.close()

    med = {key: statistics.median(t) for key, t in times.items()}
    base = med[("exact", "fp32")]
    ref = med.get(("authors", "fp32"))
    print(
        "\n| mode | precision | forwards | s/answer | s/forward | floor s/forward | / floor | vs exact fp32 |"
        + (" vs authors fp32 |" if ref else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if ref else ""))
    rows = ([("authors", "fp32", {})] if ref else []) + MODES
    for name, precision, kwargs in rows:
        key = (name, precision)
        f = forwards[key]
        _, nbytes, _ = PRECISIONS[precision]
        floor = (
            floor_seconds(
                tokens_per_forward(kwargs, prompt_len, f),
                layer_params,
                head_params,
                nbytes,
                rates[precision],
                bw,
                prompt_len,
            )
            / f
        )
        line = (
            f"| {name} | {precision} | {f} | {med[key]:.2f} | {med[key] / f:.3f} | {floor:.3f} | "
            f"{med[key] / f / floor:.2f} | {base / med[key]:.2f}x |"
        )
        if ref:
            line += f" {ref / med[key]:.2f}x |"
        print(line)
    if ref:
        same = answers[("authors", "fp32")] == answers[("exact", "fp32")]
        print(f"\nexact fp32 tokens identical to the authors': {same}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
