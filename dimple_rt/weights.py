# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: find them, load them into a meta-device model, write them, all in Hugging Face's layout.

Loading follows gpt-fast's ``_load_model``: the model is built on the meta device (no memory, no init), every
safetensors shard is memory-mapped, and each tensor is *assigned* to its parameter, so nothing is allocated
twice. With ``dtype=None`` on CPU the parameters are the mapped file pages themselves (a private copy-on-write
mapping: writing to a parameter never changes the file). All names and shapes are checked from the headers
before any tensor is read, so a wrong checkpoint fails fast, with the file and the tensor named.

Protocol for modules:

- Tied weights are expressed the PyTorch way, by sharing one ``nn.Parameter`` under several names
  (``self.lm_head.weight = self.embed_tokens.weight``). The checkpoint needs any one of the names; after
  loading, every name points to the same parameter again. Hugging Face drops the duplicate when it saves.
- Non-persistent buffers (``register_buffer(..., persistent=False)``, e.g. a rotary ``inv_freq``) are not in
  checkpoints. After loading they are materialised, uninitialised, on ``device``, and ``reset_buffers()`` is
  called on every submodule that defines it; the method fills them in place (under ``torch.no_grad``). A
  submodule that owns a non-persistent buffer on the meta device but has no ``reset_buffers`` is a TypeError.

Resolution (:func:`resolve_model`) never touches the network: a local folder, an alias, or a repo id found in
the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from safetensors import SafetensorError, safe_open
from torch import nn

from .io import write_json, write_safetensors

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

DEFAULT_REPO_ID = "rp-yu/Dimple-7B"
TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "dimple-tiny"
"""dimple-tiny, trained by ``python -m dimple_rt.tiny.build`` and shipped inside the package (works offline)."""
MODEL_ALIASES: dict[str, str | Path] = {"dimple-7b": DEFAULT_REPO_ID, "dimple-tiny": TINY_MODEL_DIR}
"""Short names. A ``str`` value is a Hugging Face repo id (looked up in the local cache), a ``Path`` value a
local folder (how a model shipped inside the package registers itself)."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or cannot be read: the message names the file and the tensor."""


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint for a model name: the message lists every place looked and how to download it."""


def _listing(names: list[str], limit: int = 10) -> str:
    """``a, b, c`` or ``a, b, ... (25 in all)``."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


# ----------------------------------------------------------------------------------------------- finding files


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder.

    ``model.safetensors.index.json`` (its ``weight_map`` names the shards), else ``model.safetensors``, else every
    ``*.safetensors``. Raises CheckpointError for an unreadable index or a shard it names that is missing, and
    FileNotFoundError when there is no safetensors file at all.
    """
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{index}: not a valid safetensors index ({type(error).__name__}: {error})"
            ) from error
        if not all(isinstance(shard, str) and shard and Path(shard).name == shard for shard in shards):
            raise CheckpointError(f"{index}: weight_map values must be file names in the same folder, got {shards}")
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {directory}: {_listing(missing)}")
        return [directory / shard for shard in shards]
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors checkpoint in {directory}: looked for {INDEX_NAME}, {SINGLE_NAME} and *.safetensors"
        )
    return files


# ---------------------------------------------------------------------------------------------------- loading


@contextmanager
def _reading(path: Path) -> Iterator[Any]:
    """``safe_open`` (memory-mapped) whose read errors become a CheckpointError naming the file."""
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt? ({error})") from error


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``"a.b.weight"`` → (``module.a.b``, ``"weight"``)."""
    prefix, _, attr = name.rpartition(".")
    return module.get_submodule(prefix), attr


def _non_persistent_buffers(module: nn.Module, persistent: Mapping[str, torch.Tensor]) -> list[tuple[nn.Module, str]]:
    return [
        (owner, attr)
        for prefix, owner in module.named_modules()
        for attr, _ in owner.named_buffers(recurse=False)
        if (f"{prefix}.{attr}" if prefix else attr) not in persistent
    ]


def _plan(
    files: list[Path], expected: Mapping[str, torch.Tensor], strict: bool
) -> tuple[dict[Path, list[str]], dict[str, list[str]]]:
    """Check every file's names and shapes from its header (no tensor data is read).

    Returns the names to read from each file, and for each name read the other names that share its tensor.
    """
    # Names sharing one tensor (tied weights) form a group; the checkpoint must provide one name of each group.
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    source: dict[str, Path] = {}
    provided: dict[int, str] = {}
    plan: dict[Path, list[str]] = {}
    for path in files:
        with _reading(path) as handle:
            names = handle.keys()  # the handle itself is not iterable
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in names}
        unexpected = [name for name in shapes if name not in expected]
        if unexpected and strict:
            raise CheckpointError(
                f"{path} has {len(unexpected)} tensors the model does not have: {_listing(unexpected)}"
            )
        plan[path] = []
        for name, shape in shapes.items():
            if name not in expected:
                continue
            if shape != list(expected[name].shape):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {shape}, the model expects {list(expected[name].shape)}"
                )
            if name in source:
                raise CheckpointError(f"tensor {name!r} is in two files: {source[name]} and {path}")
            source[name] = path
            group = id(expected[name])
            if group not in provided:  # a second name of a tied group is skipped
                provided[group] = name
                plan[path].append(name)
    missing = [names[0] for group, names in groups.items() if group not in provided]
    if missing:
        raise CheckpointError(
            f"checkpoint {files[0].parent} lacks {len(missing)} tensors of the model: {_listing(missing)}"
        )
    ties = {provided[group]: [n for n in names if n != provided[group]] for group, names in groups.items()}
    return plan, {name: others for name, others in ties.items() if others}


def load_state_dict_into(
    module: nn.Module,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> None:
    """Load the safetensors checkpoint in ``directory`` into ``module``, built on the meta device.

    Floating-point tensors are cast to ``dtype`` (fp32, bf16 or fp16; None keeps the checkpoint's) and placed on
    ``device``; parameters stay ``nn.Parameter`` with the module's ``requires_grad``. With ``strict`` a tensor
    the module does not have is an error, without it such tensors are skipped. A tensor the module has and the
    checkpoint lacks is always an error: a parameter left on the meta device cannot run. See the module
    docstring for tied weights and non-persistent buffers.
    """
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES} or None, got {dtype}")
    files = checkpoint_files(directory)
    expected = module.state_dict(keep_vars=True)
    buffers = _non_persistent_buffers(module, expected)
    for owner, attr in buffers:
        if getattr(owner, attr).is_meta and not callable(getattr(owner, "reset_buffers", None)):
            raise TypeError(
                f"{type(owner).__name__} has the non-persistent buffer {attr!r} on the meta device but no "
                "reset_buffers() to fill it; checkpoints do not hold non-persistent buffers"
            )
    plan, ties = _plan(files, expected, strict)

    for path, names in plan.items():
        with _reading(path) as handle:
            shard = {}
            for name in names:
                tensor = handle.get_tensor(name)
                shard[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        module.load_state_dict(shard, strict=False, assign=True)

    for name, others in ties.items():
        loaded = getattr(*_owner(module, name))
        for other in others:
            setattr(*_owner(module, other), loaded)
    for owner, attr in buffers:
        buffer = getattr(owner, attr)
        materialised = torch.empty_like(buffer, device=device) if buffer.is_meta else buffer.to(device)
        owner.register_buffer(attr, materialised, persistent=False)
    with torch.no_grad():
        for submodule in module.modules():
            if callable(getattr(submodule, "reset_buffers", None)):
                submodule.reset_buffers()


# ---------------------------------------------------------------------------------------------------- writing


def _split(state_dict: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Hugging Face's greedy split (``huggingface_hub.split_torch_state_dict_into_shards``): in order, a new
    shard when the next tensor would overflow the current one; a tensor larger than the limit is alone."""
    if max_shard_bytes is None:
        return [list(state_dict)]
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _cpu_tensors(state_dict: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses tensors that share memory)."""
    tensors = {}
    seen: set[int] = set()
    for name in names:
        tensor = state_dict[name].detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        tensors[name] = tensor
    return tensors


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` in Hugging Face's layout, each file atomically.

    ``model.safetensors``, or, when ``max_shard_bytes`` splits it, ``model-00001-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` (``metadata.total_size`` in bytes and ``weight_map``). ``metadata`` is the
    safetensors header metadata, ``{"format": "pt"}`` by default. Files of an earlier save into the same folder
    that the new layout does not use (an old index, old shards) are removed afterwards.
    """
    meta = [name for name, tensor in state_dict.items() if tensor.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device: {_listing(meta)}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = dict(metadata) if metadata is not None else {"format": "pt"}
    shards = _split(state_dict, max_shard_bytes)
    if len(shards) == 1:
        file_names = [SINGLE_NAME]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    for file_name, names in zip(file_names, shards):
        tensors = _cpu_tensors(state_dict, names)
        write_safetensors(directory / file_name, tensors, metadata=header)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
            "weight_map": {name: file_name for file_name, names in zip(file_names, shards) for name in names},
        }
        # The index is written last: it is what makes the new shards the checkpoint.
        write_json(directory / INDEX_NAME, index, indent=2, sort_keys=True)

    stale = [INDEX_NAME] if len(shards) == 1 else [SINGLE_NAME]
    stale += [p.name for p in directory.glob("model-*-of-*.safetensors") if _SHARD_NAME.fullmatch(p.name)]
    for name in stale:
        if name not in file_names:
            (directory / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- resolution


def default_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment *now* (huggingface_hub reads it once, at import).

    Same rules as ``huggingface_hub.constants``: ``HF_HUB_CACHE``, then the older ``HUGGINGFACE_HUB_CACHE``,
    then ``$HF_HOME/hub`` with ``HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface`` (``~/.cache``).
    """
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub")
    return Path(cache).expanduser()


def _folder_problem(path: Path) -> str | None:
    """None for a checkpoint folder, else what is wrong with it."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder"
    if not (path / "config.json").is_file():
        return "has no config.json"
    return None


def resolve_model(name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of ``name``, without any network access.

    In order: an existing folder (it must hold ``config.json``); an alias of :data:`MODEL_ALIASES`; a repo id
    ``owner/name`` (directly or through an alias) whose ``main`` snapshot is in the Hugging Face cache
    ``cache_dir`` (default :func:`default_cache_dir`). Otherwise one ModelNotFoundError that lists every place
    looked and the command that downloads the model.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but has no config.json: not a Hugging Face checkpoint folder")
        return path
    looked = [f"local folder {path.absolute()}: {_folder_problem(path)}"]

    repo_id: str | None = None
    target = MODEL_ALIASES.get(text)
    if target is None:
        looked.append(f"aliases: {text!r} is not one of {', '.join(sorted(MODEL_ALIASES))}")
        if _REPO_ID.fullmatch(text):
            repo_id = text
    elif isinstance(target, Path):
        problem = _folder_problem(target)
        if problem is None:
            return target
        looked.append(f"alias {text!r} → local folder {target}: {problem}")
    else:
        looked.append(f"alias {text!r} → repo id {target}")
        repo_id = target

    if repo_id is None:
        looked.append(f"Hugging Face cache: not searched, {text!r} is not a repo id (owner/name)")
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)  # reads files only, no network
        if isinstance(found, str):
            return Path(found).parent
        repo_cache = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        looked.append(f"Hugging Face cache {repo_cache}: no snapshot of 'main' with config.json")

    download = repo_id or DEFAULT_REPO_ID
    option = f" --cache-dir {cache_dir}" if cache_dir is not None and repo_id is not None else ""
    raise ModelNotFoundError(
        f"model {text!r} not found. Looked at:\n"
        + "".join(f"  - {line}\n" for line in looked)
        + f"Download it with:  hf download {download}{option}\n"
        + f"  (older huggingface_hub: huggingface-cli download {download}{option})"
    )
