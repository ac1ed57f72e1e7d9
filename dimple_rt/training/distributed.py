# SPDX-License-Identifier: Apache-2.0
"""Where a training process sits in a torchrun job: rank, world size, and the few collectives the loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    reduce_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where all_reduce tensors live: the GPU under nccl, the CPU under gloo."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of a few floats over the ranks, in float64."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()


def init_distributed(device_kind: str) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    reduce_device = torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, reduce_device)
