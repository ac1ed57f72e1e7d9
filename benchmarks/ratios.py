# SPDX-License-Identifier: Apache-2.0
"""Turn a pytest-benchmark JSON file into the ratio tables of benchmarks/RESULTS.md.

    python benchmarks/ratios.py /tmp/bench.json

Kernel groups: one line each, the kernel's minimum time and each other implementation's minimum time over the
kernel's (> 1 means the kernel is faster), plus the kernel's achieved GB/s or GFLOP/s. Generate groups: one line
per run with its seconds, forwards, tokens/s, the floors, and the authors-like loop's time over it.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

# Baselines of the kernel groups, in column order: the authors' torch path (whatever its benchmark calls it),
# the best single torch call, the package's plain-torch reference.
AUTHORS = ("authors_sdpa", "authors", "torch_model_path")


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} µs"


def _ratio(impls: dict[str, dict], names: tuple[str, ...], kernel_time: float) -> str:
    """The first of ``names`` that ran, as its minimum time over the kernel's."""
    found = [impls[n]["stats"]["min"] / kernel_time for n in names if n in impls]
    return f"{found[0]:.2f}x" if found else "-"


def kernel_table(groups: dict[str, dict[str, dict]]) -> str:
    header = "| group | kernel min | vs authors' torch path | vs best torch call (SDPA enable_gqa) | vs reference.py |"
    lines = [header + " kernel throughput |", "|---|---|---|---|---|---|"]
    for group, impls in sorted(groups.items()):
        kernel = impls.get("kernel")
        if kernel is None:
            continue
        t = kernel["stats"]["min"]

        info = kernel.get("extra_info", {})
        rate = (
            f"{info['GFLOP/s']} GFLOP/s"
            if "GFLOP/s" in info and info.get("flops", 0) > 1e8
            else f"{info.get('GB/s')} GB/s"
        )
        lines.append(
            f"| {group} | {_fmt_time(t)} | {_ratio(impls, AUTHORS, t)} | {_ratio(impls, ('sdpa_gqa',), t)} "
            f"| {_ratio(impls, ('reference',), t)} "
            f"| {rate} |"
        )
    return "\n".join(lines)


def generate_table(runs: list[dict]) -> str:
    header = "| run | s / answer | forwards | s / forward | forwards/s | tokens/s | GFLOP | / compute floor |"
    header += " memory floor s / forward | / memory floor | authors-like loop / this |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    baselines = {b["group"]: b["stats"]["mean"] for b in runs if b["name"].startswith("test_authors_like")}
    for bench in runs:
        info, t = bench.get("extra_info", {}), bench["stats"]["mean"]
        base = baselines.get(bench["group"])
        versus = f"{base / t:.2f}x" if base and not bench["name"].startswith("test_authors_like") else "-"
        cells = [
            bench["name"].removeprefix("test_"),
            f"{t:.2f}",
            info.get("forward_passes", "-"),
            info.get("s_per_forward", "-"),
            info.get("forwards_per_s", "-"),
            info.get("tokens_per_s", "-"),
            info.get("gflop", "-"),
            info.get("over_compute_floor", "-"),
            info.get("memory_floor_s_per_forward", "-"),
            info.get("over_memory_floor", "-"),
            versus,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def tables(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    runs = []
    for bench in data["benchmarks"]:
        if (bench["group"] or "").startswith("generate"):
            runs.append(bench)
            continue
        impl = re.search(r"-(\w+)\]$", bench["name"])
        if bench["group"] and impl:
            groups[bench["group"]][impl.group(1)] = bench
    out = [kernel_table(groups)] if groups else []
    if runs:
        out.append(generate_table(runs))
    return "\n\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1]))
