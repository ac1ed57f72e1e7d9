# SPDX-License-Identifier: Apache-2.0
"""Dimple-7B at full size on the CPU: load time, resident memory, one forward and a fast 16-token answer
(issue 16, "7B scale"). A benchmark script, not a test: it writes ~16.6 GB and needs ~20 GB of free RAM.

    PYTHONPATH=. python benchmarks/scale_7b.py [--dir /work/tmp-scale7b] [--keep] [--threads 2]

1. Writes a random checkpoint with Dimple-7B's exact shapes (dimple_rt's ``DimpleConfig()``/``VisionConfig()``
   defaults, dimple_spec.md §1.2/§1.9: Dream-7B decoder, hidden 3584, 28 layers, 28/4 heads, FFN 18944, vocab
   152064, untied LM head; Qwen2.5-VL vision tower, 32 blocks of 1280; the 3584→3584 projector): bf16
   safetensors in Hugging Face's layout and tensor names, shards of at most ``--shard-gib`` with
   ``model.safetensors.index.json``, config.json, the test tokenizer files (tiny_checkpoint.py's, with the
   vocabulary padded to 152064 rows) and Qwen2.5-VL's preprocessor config. Each shard's weights are drawn
   (N(0, 0.02²), norms 1 + that) just before it is written (``save_state_dict(materialize=...)``), so at most
   one shard is in memory. The folder is outside the repo and is deleted at the end unless ``--keep``.
2. Measures copy bandwidth (1 GiB fp32, read + written, best of 5) on 1 thread and on the run's threads, and
   the GEMM rate of dimple_rt's ``linear`` at 2048³ in bf16 and int8 on the run's threads.
3. ``bf16`` worker, a fresh process (its RSS is the load's alone): ``Runtime(path, dtype=bf16)`` (mmap, no
   copy: the parameters are the files' pages) and ``--forwards`` full forwards of the prompt.
4. ``fast`` worker, a fresh process: ``Runtime(path, preset="fast", dtype=bf16)`` (int8 linears, see
   :func:`fast_options`), the same forwards, then a 16-token ``generate`` with the preset's options (Fast-dLLM's
   dual cache in blocks of 8).

The prompt: one 224×224 image (64 image tokens) and a question, ~100 tokens (``--text-only`` drops the image).
RSS is read from /proc/self/status: VmHWM (peak), RssAnon (the process's own memory) and RssFile (mapped
checkpoint pages: page cache, counted while mapped). Floors per forward: memory = weight bytes the forward
reads (decoder layers, LM head, and with the image the vision tower and projector; not the embedding, of which
a forward reads ~100 rows) ÷ copy bandwidth on the run's threads; compute = 2 · those parameters · tokens ÷
the GEMM rate (vision parameters × patches). Random weights decide nothing with confidence: the generate makes
one commit per step, so its forward count is the most the options allow (one per token). Times are wall
seconds with CPU seconds ÷ threads beside them, and the 1-minute load average of each phase: on a shared machine
the wall time grows with the others' load, and the CPU time shows what the work itself costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

import dimple_rt
from dimple_rt.config import DimpleConfig, VisionConfig
from dimple_rt.io import write_json
from dimple_rt.model import layers
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.processor import ImageProcessor
from dimple_rt.testing.tiny_checkpoint import special_token_fields
from dimple_rt.testing.tiny_tokenizer import write_tiny_tokenizer
from dimple_rt.weights import INDEX_NAME, save_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_int8 import bandwidth, gemm_rate

GIB = 1 << 30
DEFAULT_DIR = Path("/work/tmp-scale7b")
NAME = "Dimple-7B-random-bf16"
STD = 0.02  # DimpleConfig.initializer_range
QUESTION = "Which shapes and colours are there?"


def fast_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """Runtime options and generate options of the fast run: ``Runtime(path, preset="fast", dtype=bf16)`` (int8
    linears; the vision tower, embeddings and attention in the checkpoint's bf16) and the preset's decoding
    options, unless ``--generate`` gives others (JSON)."""
    return {"dtype": torch.bfloat16, "preset": "fast"}, json.loads(args.generate)


# ---------------------------------------------------------------------------------------------- the checkpoint


def seven_b_config(special_ids: dict[str, int]) -> DimpleConfig:
    """Dimple-7B's config (the dataclass defaults are its values) with the test tokenizer's special ids."""
    return DimpleConfig(
        **special_token_fields(special_ids),
        torch_dtype="bfloat16",
        vision_config=VisionConfig(),
    )


def write_checkpoint(directory: Path, max_shard_bytes: int, seed: int = 0) -> Path:
    """Write the random bf16 7B checkpoint into ``directory``, one shard in memory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    special_ids = write_tiny_tokenizer(directory)
    config = seven_b_config(special_ids)
    write_json(directory / "config.json", config.to_dict())
    ImageProcessor().save(directory)
    with torch.device("meta"):
        model = DimpleModel(config)
    declared = model.state_dict()
    if any(not tensor.is_floating_point() for tensor in declared.values()):
        raise RuntimeError("the model has non-float persistent state: this writer only draws weights")
    declared = {name: tensor.to(torch.bfloat16) for name, tensor in declared.items()}
    norms = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, layers.RMSNorm)}

    def materialize(name: str, meta: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
        tensor = torch.empty(meta.shape, dtype=meta.dtype).normal_(0.0, STD, generator=generator)
        return tensor.add_(1.0) if name in norms else tensor

    save_state_dict(declared, directory, max_shard_bytes=max_shard_bytes, materialize=materialize)
    return directory


# ------------------------------------------------------------------------------------------------- the workers


def status_gib() -> dict[str, float]:
    """VmHWM (peak resident), VmRSS, RssAnon and RssFile of this process, in GiB."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 2**20, 2) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def conversation(text_only: bool) -> list[dict]:
    from PIL import Image, ImageDraw

    if text_only:
        return [{"role": "user", "content": QUESTION}]
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 120, 120), fill=(30, 60, 220))
    draw.rectangle((130, 110, 210, 200), fill=(220, 40, 30))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def read_bytes_and_params(rt: dimple_rt.Runtime, image: bool) -> tuple[int, int, int]:
    """(weight bytes one forward reads, decoder + LM head parameters, vision + projector parameters)."""
    model = rt.model
    head = model.lm_head.weight
    text = [*model.model.layers.parameters(), *model.model.norm.parameters()]
    text += [head] if isinstance(head, torch.Tensor) else []  # not when it is an int8 or packed weight
    vision = [*model.visual.parameters(), *model.img_projector.parameters()] if image else []
    forms = [w for _, m in layers.inference_linears(model) if not isinstance(w := m.weight, torch.Tensor)]
    read = sum(p.numel() * p.element_size() for p in (*text, *vision)) + sum(w.nbytes for w in forms)
    text_params = sum(p.numel() for p in text) + sum(w.shape.numel() for w in forms)
    return read, text_params, sum(p.numel() for p in vision)


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds (all threads) since ``start``, and the 1-minute load average now. On a shared
    machine wall time grows with the others' load; CPU seconds ÷ threads is about what the work takes with the
    cores to itself."""
    return {
        "wall": round(time.perf_counter() - start[0], 2),
        "cpu": round(time.process_time() - start[1], 2),
        "loadavg": round(os.getloadavg()[0], 1),
    }


def worker(mode: str, path: Path, args: argparse.Namespace) -> dict:
    """Runs in a fresh process: load, forwards and (``fast``) the 16-token generate; returns the numbers."""
    torch.set_num_threads(args.threads)
    before = status_gib()
    runtime_kwargs, generate_kwargs = fast_options(args) if mode == "fast" else ({"dtype": torch.bfloat16}, {})
    start = clock()
    rt = dimple_rt.Runtime(path, **runtime_kwargs)
    result: dict = {"mode": mode, "load": since(start), "rss_before": before, "rss_after_load": status_gib()}
    image = not args.text_only
    inputs = rt.prepare(conversation(args.text_only))
    tokens = int(inputs.input_ids.shape[1])
    patches = int(inputs.image_grid_thw.prod(-1).sum()) if image else 0
    result.update(prompt_tokens=tokens, image_patches=patches, text_only=not image)
    result["read_bytes"], result["text_params"], result["vision_params"] = read_bytes_and_params(rt, image)
    result["forward"] = []
    for _ in range(args.forwards):
        start = clock()
        logits = rt.forward(**vars(inputs))
        result["forward"].append(since(start))
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the forward gave non-finite logits")
        del logits
    result["rss_after_forward"] = status_gib()
    if mode == "fast":
        kwargs = {"max_new_tokens": 16, **generate_kwargs}
        start = clock()
        out = rt.generate(conversation(args.text_only), **kwargs)
        result["generate"] = since(start)
        result["generate_forwards"] = out.num_forward_passes
        result["generate_kwargs"] = {key: str(value) for key, value in {**runtime_kwargs, **kwargs}.items()}
        result["rss_after_generate"] = status_gib()
    return result


# ---------------------------------------------------------------------------------------------------- the run


def mem_available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def cpu_isa() -> str:
    flags = Path("/proc/cpuinfo").read_text().split()
    return ", ".join(flag for flag in ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16") if flag in flags)


def run_worker(mode: str, path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--dir", str(path), "--threads", str(args.threads)]
    command += ["--forwards", str(args.forwards), "--generate", args.generate]
    command += ["--text-only"] if args.text_only else []
    out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.worker_timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the {mode} worker failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict], bw1: float, bw: float, rates: dict[str, float], isa: str, threads: int) -> str:
    """The markdown table; each time is wall seconds, with CPU seconds ÷ threads in parentheses."""

    def both(timing: dict) -> str:
        return f"{timing['wall']:.1f} ({timing['cpu'] / threads:.1f})"

    lines = [
        (
            "| run | load s | peak RSS GiB (VmHWM): load / whole run | RSS after load GiB (anon + file) "
            "| s/forward | memory floor s | ratio | compute floor s | 16-token generate s (forwards) | load avg |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = rates["int8" if r["mode"] == "fast" else "bf16"]
        memory_floor = r["read_bytes"] / bw
        compute_floor = 2 * (r["text_params"] * r["prompt_tokens"] + r["vision_params"] * r["image_patches"]) / rate
        forward = min(r["forward"], key=lambda timing: timing["wall"])
        last = r.get("rss_after_generate", r["rss_after_forward"])
        load = r["rss_after_load"]
        generate = f"{both(r['generate'])} ({r['generate_forwards']})" if "generate" in r else "-"
        options = ", ".join(f"{key}={value}" for key, value in r.get("generate_kwargs", {}).items())
        loads = [r["load"]["loadavg"], *(t["loadavg"] for t in r["forward"]), r.get("generate", {}).get("loadavg")]
        lines.append(
            f"| {r['mode']}{f' ({options})' if options else ''} | {both(r['load'])} "
            f"| {load['VmHWM']} / {last['VmHWM']} | {load['VmRSS']} ({load['RssAnon']} + {load['RssFile']}) "
            f"| {both(forward)} | {memory_floor:.2f} | {forward['wall'] / memory_floor:.1f}x "
            f"({forward['cpu'] / threads / memory_floor:.1f}x) | {compute_floor:.2f} | {generate} "
            f"| {', '.join(str(x) for x in loads if x is not None)} |"
        )
    prompt = results[0]
    return (
        f"{datetime.date.today()}, torch {torch.__version__}, CPU ISA: {isa}, {threads} threads, "
        f"{os.cpu_count()} cores; copy bandwidth {bw1 / 1e9:.1f} GB/s on 1 thread, {bw / 1e9:.1f} on {threads}; GEMM 2048³ bf16 {rates['bf16'] / 1e9:.0f}, "
        f"int8 {rates['int8'] / 1e9:.0f} GFLOP/s; prompt {prompt['prompt_tokens']} tokens "
        + ("(text only)" if prompt["text_only"] else f"(one 224×224 image: {prompt['image_patches']} patches)")
        + "; times: wall s (CPU s ÷ threads)\n\n"
        + "\n".join(lines)
    )


def main(args: argparse.Namespace) -> None:
    available = mem_available_gib()
    if available < args.min_available_gib:
        raise SystemExit(f"only {available:.1f} GiB of RAM available, {args.min_available_gib} needed: not started")
    free_disk = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free / GIB
    path = args.dir / NAME
    try:
        if (path / INDEX_NAME).exists():
            print(f"reusing the checkpoint in {path}", flush=True)
        else:
            if free_disk < 20:
                raise SystemExit(f"only {free_disk:.0f} GiB of disk free in {args.dir}, the checkpoint takes 16.6")
            start = time.perf_counter()
            write_checkpoint(path, int(args.shard_gib * GIB))
            shards = sorted(path.glob("*.safetensors"))
            size = sum(p.stat().st_size for p in shards) / GIB
            print(f"wrote {size:.1f} GiB in {len(shards)} shards in {time.perf_counter() - start:.0f} s", flush=True)
        rates = {mode: 0.0 for mode in ("bf16", "int8")}
        torch.set_num_threads(1)
        bw1 = bandwidth()
        torch.set_num_threads(args.threads)
        bw = bandwidth()
        rates = {mode: gemm_rate(mode) for mode in rates}
        print(f"copy bandwidth: 1 thread {bw1 / 1e9:.1f} GB/s, {args.threads} threads {bw / 1e9:.1f} GB/s", flush=True)
        results = []
        for mode in args.modes.split(","):
            print(f"{mode} worker, {mem_available_gib():.1f} GiB available", flush=True)
            results.append(run_worker(mode, path, args))
            print(json.dumps(results[-1]), flush=True)
        print()
        print(table(results, bw1, bw, rates, cpu_isa(), args.threads))
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"deleted {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="parent folder of the checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (default: delete it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--forwards", type=int, default=2, help="timed full forwards per worker")
    parser.add_argument("--shard-gib", type=float, default=3.0)
    parser.add_argument("--modes", default="bf16,fast", help="workers to run, in order")
    parser.add_argument("--generate", default="{}", help="generate options over the fast preset's (JSON)")
    parser.add_argument("--text-only", action="store_true", help="no image in the prompt")
    parser.add_argument("--min-available-gib", type=float, default=20.0)
    parser.add_argument("--worker-timeout", type=float, default=1800.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not math.isfinite(args.shard_gib) or args.shard_gib <= 0:
        parser.error("--shard-gib must be a positive number")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        print(json.dumps(worker(arguments.worker, arguments.dir, arguments)))
    else:
        main(arguments)
