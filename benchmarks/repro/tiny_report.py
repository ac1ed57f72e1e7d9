# SPDX-License-Identifier: Apache-2.0
"""Small-scale reproduction of the Dimple paper's claims with dimple-tiny (see benchmarks/REPRODUCTION.md).

    PYTHONPATH=. python benchmarks/repro/tiny_report.py --baseline runs/dimple-tiny/baseline/checkpoint-3200

Runs every experiment on the test split (seeds 20,000,000+, never seen in training), writes
``benchmarks/repro/results.json`` (every number), ``benchmarks/repro/RESULTS.md`` (the tables) and the PNG plots
next to them. Greedy decoding throughout, batch size 1, so every number is deterministic up to floating point.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dimple_rt import Runtime
from dimple_rt.generation.priors import parse_template
from dimple_rt.io import write_json, write_text
from dimple_rt.tiny import tasks

HERE = Path(__file__).resolve().parent
CANVAS = 48  # longer than every answer (at most 36 tokens + 1 terminator)
LONG_CANVAS = 128  # "much longer than the answer", for the length-bias experiment


def run_one(rt: Runtime, example: tasks.Example, **options: Any) -> dict[str, Any]:
    """Generate one answer and record what the experiments need."""
    start = time.perf_counter()
    result = rt.generate(tasks.conversation(example), **options)
    elapsed = time.perf_counter() - start
    return {
        "seed": example.seed,
        "task": example.task,
        "text": result.text,
        "correct": tasks.is_correct(example, result.text),
        "passes": result.num_forward_passes,
        "length": len(result.token_ids),
        "ref_length": len(rt.tokenizer.encode(example.answer)),
        "seconds": elapsed,
    }


def run_causal(rt: Runtime, example: tasks.Example, max_new: int = CANVAS) -> dict[str, Any]:
    """Greedy left-to-right decoding with causal attention: how the AR-phase checkpoint itself answers (it was
    trained causally, so the diffusion loop is not its decoder). One full forward per token, no cache: this
    is a measurement of what the AR phase learnt, not of speed."""
    model = rt.model
    inputs = rt.prepare(tasks.conversation(example))
    features = None
    if inputs.pixel_values is not None:
        features = model.encode_images(inputs.pixel_values, inputs.image_grid_thw, rt.backend)
    stop = {rt.config.pad_token_id, rt.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids, out = inputs.input_ids, []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(
                ids,
                rt.backend,
                attention_mask=torch.ones_like(ids),
                image_features=features,
                image_grid_thw=inputs.image_grid_thw,
                causal=True,
                logits_rows=torch.arange(ids.shape[1]).eq(ids.shape[1] - 1)[None],
            ).logits
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    text = rt.tokenizer.decode(out)
    return {"seed": example.seed, "task": example.task, "text": text, "correct": tasks.is_correct(example, text),
            "passes": len(out) + 1, "length": len(out), "ref_length": len(rt.tokenizer.encode(example.answer)),
            "seconds": 0.0}  # fmt: skip


def run_many(rt: Runtime, items: list[tasks.Example], label: str, **options: Any) -> list[dict[str, Any]]:
    rows = []
    start = time.perf_counter()
    for index, example in enumerate(items):
        rows.append(run_one(rt, example, **options))
        if (index + 1) % 50 == 0:
            print(f"  {label}: {index + 1}/{len(items)} in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per task, mean passes, mean answer length, mean wall time."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row["correct"])
    return {
        "n": len(rows),
        "accuracy": statistics.fmean(row["correct"] for row in rows),
        "accuracy_by_task": {task: statistics.fmean(v) for task, v in sorted(by_task.items())},
        "n_by_task": {task: len(v) for task, v in sorted(by_task.items())},
        "mean_passes": statistics.fmean(row["passes"] for row in rows),
        "mean_length": statistics.fmean(row["length"] for row in rows),
        "mean_ref_length": statistics.fmean(row["ref_length"] for row in rows),
        "mean_seconds": statistics.fmean(row["seconds"] for row in rows),
    }


# Structure priors ----------------------------------------------------------------------------------------------


def template_experiment(rt: Runtime, items: list[tasks.Example]) -> dict[str, Any]:
    """A format the model never saw: ``Colour:<c> Shape:<k>.`` for "What shape is at ...?" questions.

    Obeys: both slots hold a word of the right kind (a colour, a shape) and nothing follows the template;
    correct: they are the scene's. The template tokens themselves are fixed by construction.
    """
    template = "Colour:<mask:1> Shape:<mask:1>."
    colours, kinds = set(tasks.COLOURS), set(tasks.KINDS)
    pattern = re.compile(r"Colour:\s*(\w+) Shape:\s*(\w+)\.$")
    length = len(parse_template(template, rt.tokenizer.encode, rt.config.mask_token_id))
    rows = []
    for example in items:
        result = rt.generate(
            tasks.conversation(example), max_new_tokens=CANVAS, template=template, response_length=length
        )
        match = pattern.match(result.text.strip())
        truth = re.match(r"A (\w+) (\w+)\.", example.answer)
        assert truth is not None
        obeys = bool(match) and match.group(1).lower() in colours and match.group(2).lower() in kinds
        correct = obeys and (match.group(1).lower(), match.group(2).lower()) == truth.groups()
        rows.append({"seed": example.seed, "text": result.text, "obeys": obeys, "correct": correct})
    return {
        "template": template,
        "n": len(rows),
        "obey_rate": statistics.fmean(r["obeys"] for r in rows),
        "accuracy": statistics.fmean(r["correct"] for r in rows),
        "examples": rows[:5],
    }


def length_experiment(rt: Runtime, items: list[tasks.Example], lengths: list[int]) -> dict[str, Any]:
    """``response_length=k`` on "Describe the image." (answers of 12-36 tokens): how often the answer is exactly k
    tokens, at most k (guaranteed by construction), and a complete sentence (ends with '.')."""
    out = {}
    for k in lengths:
        rows = []
        for example in items:
            result = rt.generate(tasks.conversation(example), max_new_tokens=CANVAS, response_length=k)
            text = result.text.strip()
            rows.append(
                {
                    "length": len(result.token_ids),
                    "exact": len(result.token_ids) == k,
                    "at_most": len(result.token_ids) <= k,
                    "complete": text.endswith("."),
                    "correct": tasks.is_correct(example, result.text),
                    "ref_length": len(rt.tokenizer.encode(example.answer)),
                    "text": result.text,
                }
            )
        out[str(k)] = {
            "n": len(rows),
            "exact_rate": statistics.fmean(r["exact"] for r in rows),
            "at_most_rate": statistics.fmean(r["at_most"] for r in rows),
            "complete_rate": statistics.fmean(r["complete"] for r in rows),
            "content_accuracy": statistics.fmean(r["correct"] for r in rows),
            "mean_length": statistics.fmean(r["length"] for r in rows),
            "ref_fits_rate": statistics.fmean(r["ref_length"] <= k for r in rows),
            "examples": [r["text"] for r in rows[:3]],
        }
    return out


# Plots ----------------------------------------------------------------------------------------------------------


def plot_passes(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([r["length"] for r in rows], [r["passes"] for r in rows], s=12, alpha=0.5, label="threshold 0.95")
    top = max(r["length"] for r in rows) + 2
    ax.plot([0, top], [0, top / 3], "k--", lw=1, label="answer length / 3")
    ax.axhline(CANVAS / 3, color="g", lw=1, label=f"canvas / 3 = {CANVAS / 3:.0f} (paper's L/3)")
    ax.axhline(CANVAS, color="r", lw=1, label=f"one token per step ({CANVAS})")
    ax.set_xlabel("answer length L (tokens)")
    ax.set_ylabel("forward passes")
    ax.set_title(f"dimple-tiny, confident decoding, canvas {CANVAS}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (name, rows) in zip(axes, results.items()):
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for r in rows:
            counts[(r["ref_length"], r["length"])] += 1
        points = sorted(counts.items())
        ax.scatter([p[0][0] for p in points], [p[0][1] for p in points], s=[12 * p[1] for p in points], alpha=0.5)
        top = max(max(r["length"] for r in rows), max(r["ref_length"] for r in rows)) + 2
        ax.plot([0, top], [0, top], "k--", lw=1)
        ax.set_title(f"{name}\n(canvas {LONG_CANVAS})", fontsize=9)
        ax.set_xlabel("reference length (tokens); area = count")
    axes[0].set_ylabel("generated length (tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Report ---------------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """The tables of every experiment present in ``results``."""
    lines = [
        "# dimple-tiny: measured numbers",
        "",
        f"Generated by `benchmarks/repro/tiny_report.py` ({results['when']}).",
        "",
    ]
    main = results["main"]
    lines += [
        f"## Accuracy and forward passes (test split, n={main['confident']['n']}, canvas {CANVAS}, prefill on)",
        "",
        "| decoding | accuracy | mean passes | mean answer length | mean s/answer |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("confident", "threshold 0.95"), ("one_per_step", "threshold None (one token per step)")):
        s = main[name]
        lines.append(
            f"| {label} | {_pct(s['accuracy'])} | {s['mean_passes']:.2f} | {s['mean_length']:.1f} | "
            f"{s['mean_seconds']:.3f} |"
        )
    ar = results.get("ar_causal")
    if ar:
        lines.append(
            f"| AR-phase checkpoint, causal greedy decoding (before diffusion) | {_pct(ar['accuracy'])} | "
            f"{ar['mean_passes']:.2f} | {ar['mean_length']:.1f} | - |"
        )
    lines += [
        "",
        "| task | n | accuracy (0.95) | accuracy (one per step) | AR phase, causal |",
        "|---|---|---|---|---|",
    ]
    for task, acc in main["confident"]["accuracy_by_task"].items():
        other = main["one_per_step"]["accuracy_by_task"].get(task, float("nan"))
        causal = _pct(ar["accuracy_by_task"].get(task, float("nan"))) if ar else "-"
        lines.append(f"| {task} | {main['confident']['n_by_task'][task]} | {_pct(acc)} | {_pct(other)} | {causal} |")
    ratio = results["passes_over_length"]
    per_canvas = main["confident"]["mean_passes"] / CANVAS
    lines += [
        "",
        (
            f"With threshold 0.95: mean passes / canvas length = {per_canvas:.3f}; mean passes / mean answer length = "
            f"{ratio:.3f} (paper: about 1/3 of the response length)."
        ),
        "",
    ]
    pre = results["prefill"]
    lines += [
        f"## Prefilling (n={pre['on']['n']}, threshold 0.95)",
        "",
        "| prefill | accuracy | mean s/answer | mean passes |",
        "|---|---|---|---|",
        f"| on | {_pct(pre['on']['accuracy'])} | {pre['on']['mean_seconds']:.3f} | {pre['on']['mean_passes']:.2f} |",
        f"| off | {_pct(pre['off']['accuracy'])} | {pre['off']['mean_seconds']:.3f} | {pre['off']['mean_passes']:.2f} |",
        "",
        (
            f"Speed-up {pre['off']['mean_seconds'] / pre['on']['mean_seconds']:.2f}x; answers identical in "
            f"{_pct(pre['identical_rate'])} of cases."
        ),
        "",
        f"## Canvas much longer than the answer (canvas {LONG_CANVAS}, threshold 0.95)",
        "",
        (
            "| model | n | accuracy | mean generated length | mean reference length | mean abs(gen - ref) | "
            "longer than ref | shorter than ref |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results["length_bias"].items():
        lines.append(
            f"| {name} | {s['n']} | {_pct(s['accuracy'])} | {s['mean_length']:.2f} | {s['mean_ref_length']:.2f} | "
            f"{s['mean_abs_error']:.2f} | {_pct(s['longer_rate'])} | {_pct(s['shorter_rate'])} |"
        )
    for key, label in (
        ("ar_arm_canvas48", "AR → diffusion at the baseline's budget"),
        ("baseline_canvas48", "Pure-diffusion baseline"),
    ):
        if key in results:
            b = results[key]
            lines += [
                "",
                (
                    f"{label}, canvas {CANVAS}: accuracy {_pct(b['accuracy'])}, mean passes "
                    f"{b['mean_passes']:.2f} (n={b['n']})."
                ),
            ]
    lines.append("")
    t = results["template"]
    lines += [
        "",
        "## Structure priors",
        "",
        f"Template `{t['template']}` on 'What shape is at ...?' questions (n={t['n']}): obeys "
        f"{_pct(t['obey_rate'])}, correct {_pct(t['accuracy'])}. First outputs: "
        + "; ".join(f"`{e['text']}`" for e in t["examples"][:3]),
        "",
        "`response_length=k` on 'Describe the image.':",
        "",
        "| k | n | exactly k | at most k | ends with '.' | content correct | reference fits in k |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s in results["response_length"].items():
        lines.append(
            f"| {k} | {s['n']} | {_pct(s['exact_rate'])} | {_pct(s['at_most_rate'])} | {_pct(s['complete_rate'])} | "
            f"{_pct(s['content_accuracy'])} | {_pct(s['ref_fits_rate'])} |"
        )
    write_text(path, "\n".join(lines) + "\n")


def length_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    s = summary(rows)
    s["mean_abs_error"] = statistics.fmean(abs(r["length"] - r["ref_length"]) for r in rows)
    s["longer_rate"] = statistics.fmean(r["length"] > r["ref_length"] for r in rows)
    s["shorter_rate"] = statistics.fmean(r["length"] < r["ref_length"] for r in rows)
    return s


PARTS = ("main", "ar", "prefill", "long", "baseline", "priors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dimple-tiny")
    parser.add_argument("--baseline", help="pure-diffusion checkpoint for the length-bias comparison")
    parser.add_argument(
        "--ar-arm", help="AR → diffusion checkpoint trained for the baseline's budget (length-bias comparison)"
    )
    parser.add_argument("--instruct", help="the AR-phase (instruct) checkpoint, decoded causally (part 'ar')")
    parser.add_argument("--n", type=int, default=300, help="test examples for accuracy and forward passes")
    parser.add_argument("--n-small", type=int, default=100, help="examples for the other experiments")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated subset of " + ", ".join(PARTS) + "; the others are kept from an existing results.json",
    )
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}")
    if "ar" in parts and not args.instruct:
        parser.error("the ar part needs --instruct CHECKPOINT")
    if "baseline" in parts and not args.baseline:
        parser.error("the baseline part needs --baseline CHECKPOINT")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {"rows": {}}
    results.update(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), model=args.model)
    rows = results.setdefault("rows", {})
    rt = Runtime(args.model)
    test = list(tasks.examples("test", args.n))
    small = test[: args.n_small]

    def timed(label: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {label}", flush=True)

    if "main" in parts:
        timed("main: threshold 0.95")
        rows["confident"] = run_many(rt, test, "0.95", max_new_tokens=CANVAS)
        timed("main: one token per step")
        rows["one_per_step"] = run_many(rt, test, "None", max_new_tokens=CANVAS, threshold=None)
        results["main"] = {"confident": summary(rows["confident"]), "one_per_step": summary(rows["one_per_step"])}
        confident = rows["confident"]
        results["passes_over_length"] = statistics.fmean(r["passes"] for r in confident) / max(
            1e-9, statistics.fmean(r["length"] for r in confident)
        )

    if "ar" in parts:
        timed("AR phase, causal decoding")
        instruct = Runtime(args.instruct)
        rows["ar_causal"] = [run_causal(instruct, example) for example in test]
        results["ar_causal"] = summary(rows["ar_causal"])

    if "prefill" in parts:
        timed("prefill off")
        # Interleaved, in one process, so that both settings see the same machine load.
        on, rows["prefill_off"] = [], []
        for example in small:
            on.append(run_one(rt, example, max_new_tokens=CANVAS, prefill=True))
            rows["prefill_off"].append(run_one(rt, example, max_new_tokens=CANVAS, prefill=False))
        rows["prefill_on"] = on
        results["prefill"] = {
            "on": summary(on),
            "off": summary(rows["prefill_off"]),
            "identical_rate": statistics.fmean(a["text"] == b["text"] for a, b in zip(on, rows["prefill_off"])),
        }

    long_rows = rows.setdefault("long", {})
    if "long" in parts:
        timed("length bias: AR → diffusion")
        long_rows["AR → diffusion (dimple-tiny)"] = run_many(rt, small, "long", max_new_tokens=LONG_CANVAS)
        if args.ar_arm:
            arm = Runtime(args.ar_arm)
            long_rows["AR → diffusion, baseline's budget"] = run_many(
                arm, small, "AR arm long", max_new_tokens=LONG_CANVAS
            )
            rows["ar_arm_canvas48"] = run_many(arm, small, "AR arm 48", max_new_tokens=CANVAS)
            results["ar_arm_canvas48"] = summary(rows["ar_arm_canvas48"])
    if "baseline" in parts:
        timed("length bias: pure diffusion")
        base = Runtime(args.baseline)
        long_rows["pure diffusion (baseline)"] = run_many(base, small, "baseline long", max_new_tokens=LONG_CANVAS)
        rows["baseline_canvas48"] = run_many(base, small, "baseline 48", max_new_tokens=CANVAS)
        results["baseline_canvas48"] = summary(rows["baseline_canvas48"])
    results["length_bias"] = {name: length_stats(r) for name, r in long_rows.items()}
    if len(long_rows) > 1:
        plot_lengths(long_rows, out / "tiny_length_bias.png")

    if "priors" in parts:
        timed("structure priors")
        shape_questions = list(tasks.examples("test", args.n_small, task="kind_at_position"))
        results["template"] = template_experiment(rt, shape_questions)
        describe = list(tasks.examples("test", args.n_small // 2, task="describe"))
        results["response_length"] = length_experiment(rt, describe, [8, 16, 24])

    if "confident" in rows:
        plot_passes(rows["confident"], out / "tiny_passes.png")
    write_json(out / "results.json", results, indent=1, ensure_ascii=False)
    write_markdown(results, out / "RESULTS.md")
    timed(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
