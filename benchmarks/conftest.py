# SPDX-License-Identifier: Apache-2.0
"""Shared helper of the kernel benchmarks: time a call with pytest-benchmark and report its throughput.

Each benchmark is one (op, shape, implementation); the implementations of one (op, shape) share a
``benchmark.group`` so that ``--benchmark-group-by=group`` shows them side by side. Throughput is computed from
the fastest round (the least disturbed by other processes on a shared 2-core machine).
``DIMPLE_RT_BENCH_THREADS=n`` sets torch's (and so at::parallel_for's) thread count for the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if os.environ.get("DIMPLE_RT_BENCH_THREADS"):  # e.g. 1 to compare on one core while the other one is busy
    torch.set_num_threads(int(os.environ["DIMPLE_RT_BENCH_THREADS"]))


@pytest.fixture
def timed(benchmark):
    """``timed(fn, group=..., bytes_moved=..., flops=..., rounds=...)``: benchmark ``fn()`` and fill extra_info
    with the bytes/FLOPs of one call and the GB/s / GFLOP/s achieved at the minimum time."""

    def run(fn: Callable[[], object], *, group: str, bytes_moved: int, flops: int = 0, rounds: int = 10) -> None:
        benchmark.group = group
        benchmark.extra_info["bytes"] = bytes_moved
        benchmark.extra_info["flops"] = flops
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        best = benchmark.stats.stats.min
        benchmark.extra_info["GB/s"] = round(bytes_moved / best / 1e9, 2)
        if flops:
            benchmark.extra_info["GFLOP/s"] = round(flops / best / 1e9, 2)

    return run
