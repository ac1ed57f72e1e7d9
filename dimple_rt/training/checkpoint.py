# SPDX-License-Identifier: Apache-2.0
"""Training checkpoints: a Hugging Face model folder that :class:`dimple_rt.Runtime` loads, plus resume state.

``checkpoint-<step>/`` holds ``config.json``, ``model.safetensors`` (or shards with an index), the tokenizer
files and ``preprocessor_config.json`` copied from the initial model, and ``training_state/``:

- ``trainer_state.json``: step, data position, skipped records, the config, the LR schedule position;
- ``optimizer.safetensors`` + ``optimizer.json``: every optimizer state tensor (keyed by parameter name) and the
  param groups;
- ``rng-rank<r>.safetensors`` + ``.json``: each rank's torch (CPU, CUDA) and Python ``random`` states.

No pickle anywhere. The folder is written under a hidden temporary name and renamed into place, so a
checkpoint folder that exists is complete; a crash mid-save leaves at most a ``.checkpoint-*.tmp`` folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dimple_rt.io import write_json, write_safetensors
from dimple_rt.weights import INDEX_NAME, save_state_dict

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are hidden and not matched)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir() and (path / STATE_DIR / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def copy_model_files(source: Path, target: Path, config_updates: Mapping[str, Any]) -> None:
    """Copy the tokenizer, processor and other side files of ``source``; ``config.json`` with ``config_updates``.

    Weights (``*.safetensors`` and their index) are not copied: the trainer writes its own.
    """
    for path in source.iterdir():
        if not path.is_file() or path.name.endswith(".safetensors") or path.name == INDEX_NAME:
            continue
        if path.name == "config.json":
            config = _read_json(path)
            config.update(config_updates)
            write_json(target / "config.json", config, sort_keys=True)
        else:
            shutil.copy2(path, target / path.name)


# -------------------------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict keyed by parameter name (``get_optimizer_state_dict``'s form) into
    tensors for safetensors (``state/<param>/<key>``) and the JSON rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(param), {})[key] = value
    meta = {"param_groups": [dict(group) for group in state["param_groups"]], "scalars": scalars}
    for group in meta["param_groups"]:
        if "betas" in group:
            group["betas"] = list(group["betas"])
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer_state`."""
    state: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, rest = name.split("/", 1)
        param, key = rest.rsplit("/", 1)
        state.setdefault(param, {})[key] = tensor
    for param, entry in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------- RNG state


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch and Python RNG states, as safetensors tensors and JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


# -------------------------------------------------------------------------------------------- writing, reading


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[], None],
    source_dir: Path,
    config_updates: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor] | None,
    optimizer_state: Mapping[str, Any] | None,
    trainer_state: Mapping[str, Any],
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; a collective call (every rank, same order).

    ``model_state`` and ``optimizer_state`` are needed on rank 0 only (the full, unsharded ones); every rank
    writes its own RNG state. The output folder must be shared by all ranks.
    """
    final = output_dir / checkpoint_name(step)
    temporary = output_dir / f".{checkpoint_name(step)}.tmp"
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        (temporary / STATE_DIR).mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state()
    write_safetensors(temporary / STATE_DIR / f"rng-rank{rank}.safetensors", rng_tensors)
    write_json(temporary / STATE_DIR / f"rng-rank{rank}.json", rng_meta, sort_keys=True)
    if rank == 0:
        assert model_state is not None and optimizer_state is not None
        save_state_dict(model_state, temporary, max_shard_bytes=max_shard_bytes)
        copy_model_files(source_dir, temporary, config_updates)
        tensors, meta = flatten_optimizer_state(optimizer_state)
        write_safetensors(temporary / STATE_DIR / OPTIMIZER_TENSORS, tensors)
        write_json(temporary / STATE_DIR / OPTIMIZER_META, meta, sort_keys=True)
        write_json(temporary / STATE_DIR / TRAINER_STATE, dict(trainer_state), sort_keys=True)
    barrier()
    if rank == 0:
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            stale = output_dir / f".{checkpoint_name(step)}.old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale)
        else:
            os.replace(temporary, final)
    barrier()
    return final


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (rank 0 only; 0 keeps all)."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_DIR / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: no {STATE_DIR}/{TRAINER_STATE}")
    return _read_json(path)


def read_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    directory = checkpoint / STATE_DIR
    return unflatten_optimizer_state(load_file(directory / OPTIMIZER_TENSORS), _read_json(directory / OPTIMIZER_META))


def restore_rng_state(checkpoint: Path, rank: int) -> None:
    """Set this rank's RNG states from ``checkpoint`` (a rank the run did not have keeps its own)."""
    directory = checkpoint / STATE_DIR
    tensors_path = directory / f"rng-rank{rank}.safetensors"
    if tensors_path.is_file():
        set_rng_state(load_file(tensors_path), _read_json(directory / f"rng-rank{rank}.json"))
