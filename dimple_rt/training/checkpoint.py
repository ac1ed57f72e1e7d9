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
Reading back checks every field, shape and type against the running model before anything is set, and any
problem is a :class:`~dimple_rt.weights.CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dimple_rt.io import write_json, write_safetensors
from dimple_rt.weights import INDEX_NAME, CheckpointError, save_state_dict

from .config import STAGES

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
# Only the names this module writes: checkpoint-010 or checkpoint-foo are someone else's, never read or pruned.
_CHECKPOINT = re.compile(r"checkpoint-(0|[1-9][0-9]{0,17})")
MAX_STEP = 10**15


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(output_dir: str | os.PathLike, complete_only: bool = True) -> list[tuple[int, Path]]:
    """Checkpoints in ``output_dir``, oldest first (temporary folders are hidden and not matched).

    ``complete_only``: only folders holding a trainer state; otherwise every ``checkpoint-N`` folder, so that a
    damaged one is reported rather than silently passed over (or overwritten)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and (not complete_only or (path / STATE_DIR / TRAINER_STATE).is_file()):
            found.append((step, path))
    return sorted(found)


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N`` as :func:`checkpoint_name` writes it, else None."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


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


def prune_checkpoints(output_dir: Path, keep_last: int, current_step: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints up to the run's own ``checkpoint-<current_step>``
    (rank 0 only; 0 keeps all). The current checkpoint always stays, and checkpoints after it are never
    touched here (the run refuses to start beside them without overwrite_output_dir). Returns the deleted ones."""
    if keep_last <= 0:
        return []
    older = [path for step, path in list_checkpoints(output_dir) if step < current_step]
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _read_checked_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _load_checked_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt? ({err})") from None


def _is_int(value: Any, low: int = 0, high: int = MAX_STEP) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_float(value: Any, low: float = 0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def validate_trainer_state(state: Any, path: Path) -> dict[str, Any]:
    """``state`` as read from ``path``, after checking each field's type and range and the consistency between
    them and with the folder name; raises CheckpointError naming the file and the field."""

    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"{path}: {message}")

    if not isinstance(state, dict):
        raise fail(f"expected a JSON object, got {type(state).__name__}")
    required = ("step", "position", "skipped_records", "global_batch", "world_size", "stage")
    missing = [name for name in required if name not in state]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    ranges = {"step": (0, MAX_STEP), "position": (0, 2**62), "skipped_records": (0, 2**62)}
    ranges.update(global_batch=(1, 2**40), world_size=(1, 2**20))
    for name, (low, high) in ranges.items():
        if not _is_int(state[name], low, high):
            raise fail(f"{name} must be an integer in [{low}, {high}], got {state[name]!r}")
    if state["stage"] not in STAGES:
        raise fail(f"stage must be one of {STAGES}, got {state['stage']!r}")
    if state["position"] != state["step"] * state["global_batch"]:
        raise fail(
            f"position {state['position']} is not step × global_batch = {state['step']} × {state['global_batch']}"
        )
    if state["global_batch"] % state["world_size"]:
        raise fail(f"global_batch {state['global_batch']} is not a multiple of world_size {state['world_size']}")
    folder_step = checkpoint_step(path.parent.parent)
    if folder_step is not None and folder_step != state["step"]:
        raise fail(f"step {state['step']} does not match the folder name {path.parent.parent.name}")
    scheduler = state.get("scheduler", {})
    if not isinstance(scheduler, dict):
        raise fail(f"scheduler must be an object, got {scheduler!r}")
    for name in ("warmup_steps", "total_steps", "next_step"):
        if name in scheduler and not _is_int(scheduler[name]):
            raise fail(f"scheduler.{name} must be an integer in [0, {MAX_STEP}], got {scheduler[name]!r}")
    if "next_step" in scheduler and scheduler["next_step"] != state["step"]:
        raise fail(f"scheduler.next_step {scheduler['next_step']} does not match step {state['step']}")
    if "peak_lr" in scheduler and not _is_float(scheduler["peak_lr"]):
        raise fail(f"scheduler.peak_lr must be a finite number >= 0, got {scheduler['peak_lr']!r}")
    if "config" in state and not isinstance(state["config"], dict):
        raise fail(f"config must be an object, got {type(state['config']).__name__}")
    return state


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The checked ``trainer_state.json`` of ``checkpoint`` (CheckpointError naming the file otherwise)."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint folder")
    path = checkpoint / STATE_DIR / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint: no {STATE_DIR}/{TRAINER_STATE}")
    return validate_trainer_state(_read_checked_json(path), path)


# AdamW's per-parameter state: the moments have the parameter's shape, step is a scalar.
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def read_optimizer_state(checkpoint: Path, params: Mapping[str, torch.Size] | None = None) -> dict[str, Any]:
    """The optimizer state (keyed by parameter name) of ``checkpoint``, checked against ``params`` (the trained
    parameters' names and full shapes): names, keys, shapes, dtypes, finiteness. CheckpointError names the file."""
    directory = checkpoint / STATE_DIR
    tensors_path, meta_path = directory / OPTIMIZER_TENSORS, directory / OPTIMIZER_META
    tensors = _load_checked_tensors(tensors_path)
    meta = _read_checked_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"{meta_path}: expected an object with a 'param_groups' list")
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise CheckpointError(f"{meta_path}: 'scalars' must map parameter names to objects")
    groups = meta["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{meta_path}: every param group must be an object with a 'params' list")
    for name in tensors:
        parts = name.split("/")
        if len(parts) < 3 or parts[0] != "state" or not parts[-1]:
            raise CheckpointError(f"{tensors_path}: unexpected tensor name {name!r} (expected state/<param>/<key>)")
    state = unflatten_optimizer_state(tensors, meta)
    if params is not None:
        _check_optimizer_state(state, params, tensors_path, meta_path)
    return state


def _check_optimizer_state(
    state: Mapping[str, Any], params: Mapping[str, torch.Size], tensors_path: Path, meta_path: Path
) -> None:
    grouped = [name for group in state["param_groups"] for name in group["params"]]
    if sorted(map(str, grouped)) != sorted(params):
        extra = sorted(set(map(str, grouped)) - set(params))
        absent = sorted(set(params) - set(map(str, grouped)))
        raise CheckpointError(
            f"{meta_path}: the param groups do not hold this run's trained parameters "
            f"(unknown: {_few(extra)}; missing: {_few(absent)}); was it written for another stage or model?"
        )
    for param, entry in state["state"].items():
        if param not in params:
            raise CheckpointError(f"{tensors_path}: state for {param!r}, which this run does not train")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{meta_path}: state {param}/{key} must be a tensor, got {value!r}")
            if not value.is_floating_point():
                raise CheckpointError(f"{tensors_path}: state/{param}/{key} has dtype {value.dtype}, not floating")
            if key == "step":
                if value.numel() != 1 or not math.isfinite(float(value)) or float(value) < 0:
                    raise CheckpointError(f"{tensors_path}: state/{param}/step must be one finite number >= 0")
            elif key in _MOMENTS:
                if value.shape != params[param]:
                    raise CheckpointError(
                        f"{tensors_path}: state/{param}/{key} has shape {tuple(value.shape)}, the parameter has "
                        f"{tuple(params[param])}"
                    )
            else:
                raise CheckpointError(f"{tensors_path}: unexpected optimizer state key {param}/{key}")
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{tensors_path}: state/{param}/{key} holds NaN or infinite values")
        if "step" not in entry or not {"exp_avg", "exp_avg_sq"} <= set(entry):
            raise CheckpointError(f"{tensors_path}: the state of {param} lacks step, exp_avg or exp_avg_sq")


def _few(names: Sequence[str], limit: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def restore_rng_state(checkpoint: Path, rank: int, world_size: int | None = None) -> None:
    """Set this rank's RNG states from ``checkpoint`` (a rank the run did not have keeps its own).

    ``world_size`` is the saved run's: a rank below it must find its files. Everything is checked before any
    state is set; CheckpointError names the file."""
    directory = checkpoint / STATE_DIR
    tensors_path = directory / f"rng-rank{rank}.safetensors"
    meta_path = directory / f"rng-rank{rank}.json"
    if not tensors_path.is_file() and not meta_path.is_file() and (world_size is None or rank >= world_size):
        return
    tensors = _load_checked_tensors(tensors_path)
    meta = _read_checked_json(meta_path)
    cpu = tensors.get("torch_cpu")
    reference = torch.get_rng_state()
    if cpu is None or cpu.dtype != reference.dtype or cpu.shape != reference.shape:
        raise CheckpointError(f"{tensors_path}: torch_cpu must be a {reference.dtype} tensor of {reference.numel()}")
    value = meta.get("python_random") if isinstance(meta, dict) else None
    ok = isinstance(value, list) and len(value) == 3 and _is_int(value[0], 0, 1 << 31)
    ok = ok and isinstance(value[1], list) and len(value[1]) == 625
    ok = ok and all(_is_int(v, 0, 2**32 - 1) for v in value[1][:624]) and _is_int(value[1][624], 0, 624)
    ok = ok and (value[2] is None or _is_float(value[2], -math.inf))
    if not ok:
        raise CheckpointError(f"{meta_path}: python_random must be [version, 625 integers, gauss] as random.getstate")
    try:
        previous = torch.get_rng_state(), random.getstate()
        set_rng_state(tensors, meta)
    except (RuntimeError, ValueError, TypeError) as err:
        torch.set_rng_state(previous[0])
        random.setstate(previous[1])
        raise CheckpointError(f"{tensors_path}: cannot restore the RNG state ({err})") from None
