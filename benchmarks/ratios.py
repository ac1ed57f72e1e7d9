# SPDX-License-Identifier: Apache-2.0
"""Turn a pytest-benchmark JSON file into the ratio table of benchmarks/RESULTS.md.

    python benchmarks/ratios.py /tmp/bench.json

One line per benchmark group: the kernel's minimum time, and each other implementation's minimum time over the
kernel's (> 1 means the kernel is faster), plus the kernel's achieved GB/s or GFLOP/s.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = re.search(r"-(\w+)\]$", bench["name"])
        if bench["group"] and impl:
            groups[bench["group"]][impl.group(1)] = bench
    lines = [
        "| group | kernel min | vs authors' torch path | vs reference.py | kernel throughput |",
        "|---|---|---|---|---|",
    ]
    for group, impls in sorted(groups.items()):
        kernel = impls.get("kernel")
        if kernel is None:
            continue
        t = kernel["stats"]["min"]
        others = {name: b["stats"]["min"] / t for name, b in impls.items() if name != "kernel"}
        authors = next((f"{r:.2f}x" for name, r in others.items() if name != "reference"), "-")
        ref = f"{others['reference']:.2f}x" if "reference" in others else "-"
        info = kernel.get("extra_info", {})
        rate = (
            f"{info['GFLOP/s']} GFLOP/s"
            if "GFLOP/s" in info and info.get("flops", 0) > 1e8
            else f"{info.get('GB/s')} GB/s"
        )
        shown = f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} µs"
        lines.append(f"| {group} | {shown} | {authors} | {ref} | {rate} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
