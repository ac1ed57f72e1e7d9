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

Hostile checkpoints: every file is checked to be a regular file before it is opened (a FIFO would block the
mmap forever); tensor dtypes are checked from the headers (weights must be fp32, bf16 or fp16, so an int64
"weight" is refused by name); the bytes the model will occupy on the target device are compared with that
device's memory before any tensor is read; and each tensor is checked to be finite (no NaN/inf) as it is
loaded, after the cast, on the target device. The finite check reads every weight once; on the CPU that is
about the cost of paging the mmap in, which the first forward pays anyway (measured: see
:func:`load_state_dict_into`); ``check_finite=False`` skips it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from safetensors import SafetensorError, safe_open
from torch import nn

from .files import MAX_JSON_BYTES, check_regular_file, read_json
from .io import write_json, write_safetensors

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
"""Accepted dtype spellings (also with a ``torch.`` prefix), besides ``"auto"``."""
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""Header dtypes a floating-point weight may be stored in."""
_FINITE_CHUNK = 1 << 24
"""Elements per chunk of the finite check: bounds its temporary bool tensor to 16 MiB."""
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


class InsufficientMemoryError(CheckpointError):
    """The model's weights would not fit in the memory of the device they are loaded onto."""


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
    if index.exists():
        data = read_json(index, "a safetensors index", MAX_JSON_BYTES, dict, CheckpointError)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index: 'weight_map' must be an object")
        shards = sorted(set(map(str, weight_map.values())))
        if not all(isinstance(shard, str) and shard and Path(shard).name == shard for shard in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map values must be file names in the same folder, got {shards}")
        missing = [shard for shard in shards if not (directory / shard).exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {directory}: {_listing(missing)}")
        return [_regular(directory / shard) for shard in shards]
    if (directory / SINGLE_NAME).exists():
        return [_regular(directory / SINGLE_NAME)]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors checkpoint in {directory}: looked for {INDEX_NAME}, {SINGLE_NAME} and *.safetensors"
        )
    return [_regular(path) for path in files]


def _regular(path: Path) -> Path:
    try:
        return check_regular_file(path, "a safetensors file")
    except ValueError as error:
        raise CheckpointError(str(error)) from None


# ---------------------------------------------------------------------------------------------------- loading


@contextmanager
def _reading(path: Path) -> Iterator[Any]:
    """``safe_open`` (memory-mapped) whose read errors become a CheckpointError naming the file."""
    _regular(path)  # safe_open would block forever on a FIFO
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
    files: list[Path], expected: Mapping[str, torch.Tensor], strict: bool, stored: dict[str, str] | None = None
) -> tuple[dict[Path, list[str]], dict[str, list[str]]]:
    """Check every file's names, shapes and dtypes from its header (no tensor data is read).

    Returns the names to read from each file, and for each name read the other names that share its tensor.
    ``stored``, when given, receives the header dtype (``"BF16"``, ...) of each name read.
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
            slices = {name: handle.get_slice(name) for name in names}
            shapes = {name: list(piece.get_shape()) for name, piece in slices.items()}
            dtypes = {name: piece.get_dtype() for name, piece in slices.items()}
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
            if expected[name].is_floating_point() and dtypes[name] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is stored as {dtypes[name]}; weights must be floating point, one of "
                    f"{', '.join(_SAFETENSORS_DTYPES)} (float32, bfloat16, float16)"
                )
            if name in source:
                raise CheckpointError(f"tensor {name!r} is in two files: {source[name]} and {path}")
            source[name] = path
            group = id(expected[name])
            if group not in provided:  # a second name of a tied group is skipped
                provided[group] = name
                plan[path].append(name)
                if stored is not None:
                    stored[name] = dtypes[name]
    missing = [names[0] for group, names in groups.items() if group not in provided]
    if missing:
        raise CheckpointError(
            f"checkpoint {files[0].parent} lacks {len(missing)} tensors of the model: {_listing(missing)}"
        )
    ties = {provided[group]: [n for n in names if n != provided[group]] for group, names in groups.items()}
    return plan, {name: others for name, others in ties.items() if others}


def resolve_dtype(value: str | torch.dtype | None, checkpoint: str | os.PathLike | None = None) -> torch.dtype | None:
    """The torch dtype a user's ``dtype`` option means; None stays None (the caller's default).

    Accepts a torch dtype (fp32, bf16, fp16), a name (``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``/``"half"``,
    ``"float32"``/``"fp32"``/``"float"``, optionally ``"torch."``-prefixed, any case) or ``"auto"``: the dtype the
    checkpoint folder ``checkpoint`` stores its weights in, read from the safetensors headers (the dtype of most
    floating-point elements), else from config.json's ``torch_dtype``/``dtype``. TypeError for a value of the
    wrong type or an unsupported torch dtype, ValueError for an unknown name or "auto" without a checkpoint.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, 'auto' or a name of one, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"dtype must be a torch dtype, a dtype name or 'auto', got {type(value).__name__} {value!r}")
    name = value.strip().lower().removeprefix("torch.")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    if name != "auto":
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {value!r}")
    if checkpoint is None:
        raise ValueError("dtype='auto' needs the checkpoint folder to read the stored dtype from")
    return stored_dtype(checkpoint)


def stored_dtype(checkpoint: str | os.PathLike) -> torch.dtype:
    """The dtype a checkpoint folder stores its weights in (see :func:`resolve_dtype`'s ``"auto"``)."""
    directory = Path(checkpoint)
    counts: dict[str, int] = {}
    try:
        files = checkpoint_files(directory)
    except FileNotFoundError:
        files = []
    for path in files:
        with _reading(path) as handle:
            names = handle.keys()  # the handle itself is not iterable
            for name in names:
                piece = handle.get_slice(name)
                if piece.get_dtype() in _SAFETENSORS_DTYPES:
                    numel = 1
                    for size in piece.get_shape():
                        numel *= size
                    counts[piece.get_dtype()] = counts.get(piece.get_dtype(), 0) + numel
    if counts:
        return _SAFETENSORS_DTYPES[max(counts, key=lambda key: counts[key])]
    config = directory / "config.json"
    if config.exists():
        data = read_json(config, "the model config", MAX_JSON_BYTES, dict, CheckpointError)
        stated = data.get("torch_dtype") or data.get("dtype")
        if isinstance(stated, str) and stated.lower().removeprefix("torch.") in DTYPE_NAMES:
            return DTYPE_NAMES[stated.lower().removeprefix("torch.")]
        raise CheckpointError(
            f"{config}: dtype='auto' found no floating-point weights and torch_dtype {stated!r} is not one of "
            f"{sorted(DTYPE_NAMES)}; pass an explicit dtype"
        )
    raise CheckpointError(
        f"dtype='auto': {directory} has neither safetensors weights nor a config.json to read it from"
    )


def device_memory_bytes(device: str | torch.device) -> int | None:
    """Total memory of ``device`` in bytes (physical RAM for the CPU), or None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def _check_memory(
    expected: Mapping[str, torch.Tensor], stored: Mapping[str, str], dtype: torch.dtype | None, device: torch.device
) -> None:
    """Refuse before reading anything when the weights cannot fit in the device's memory."""
    needed = 0
    for name, code in stored.items():
        target = dtype if dtype is not None and expected[name].is_floating_point() else _SAFETENSORS_DTYPES.get(code)
        needed += expected[name].numel() * (target.itemsize if target is not None else 8)
    total = device_memory_bytes(device)
    if total is not None and needed > total:
        gib = 1 << 30
        raise InsufficientMemoryError(
            f"the model's weights need {needed / gib:,.1f} GiB on {device}"
            + (f" in {dtype}" if dtype is not None else "")
            + f", more than its {total / gib:,.1f} GiB of memory: choose a smaller dtype, another device, or a "
            "smaller model"
        )


def _check_finite(tensor: torch.Tensor, name: str, path: Path, dtype: torch.dtype | None) -> None:
    """NaN or inf anywhere in ``tensor`` is a CheckpointError naming the tensor (chunked: bounded temporaries)."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        # Fast path: a sum is finite iff every term is (NaN and inf propagate), unless it overflows; only a
        # non-finite sum pays for the exact elementwise check. sum() is ~5x faster than isfinite() on bf16.
        if bool(torch.isfinite(chunk.sum())):
            continue
        finite = torch.isfinite(chunk)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0]) + start
            value = float(flat[bad])
            cast = f" after the cast to {dtype}" if dtype is not None else ""
            raise CheckpointError(
                f"{path}: tensor {name!r} holds non-finite values{cast} (first at flat index {bad}: {value}); "
                "the checkpoint is corrupt" + (" or overflows this dtype" if dtype is not None else "")
            )


def load_state_dict_into(
    module: nn.Module,
    directory: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    check_finite: bool = True,
    after_file: Callable[[list[str]], None] | None = None,
) -> None:
    """Load the safetensors checkpoint in ``directory`` into ``module``, built on the meta device.

    Floating-point tensors are cast to ``dtype`` (fp32, bf16 or fp16, a name of one or ``"auto"``, see
    :func:`resolve_dtype`; None keeps the checkpoint's) and placed on ``device``; parameters stay
    ``nn.Parameter`` with the module's ``requires_grad``. With ``strict`` a tensor the module does not have is
    an error, without it such tensors are skipped. A tensor the module has and the checkpoint lacks is always
    an error: a parameter left on the meta device cannot run. See the module docstring for tied weights and
    non-persistent buffers.

    Before any tensor is read, the bytes the weights take on ``device`` are compared with its memory
    (:class:`InsufficientMemoryError`). With ``check_finite`` each tensor is checked for NaN/inf once, on
    ``device`` after the cast, by summing each chunk (NaN/inf propagate) and looking element by element only
    where a sum is not finite. Measured on 2 shared CPU cores, weights in memory: 0.25-0.5 s per GiB in
    bf16/fp16 and 0.15 s/GiB in fp32 (elementwise isfinite: 4.7 s/GiB in bf16), so some 4-8 s for Dimple-7B's
    15.5 GiB of bf16 weights, less than reading them from disk; on a GPU it is negligible.

    ``after_file(names)``, when given, runs after each file's tensors are assigned, with the names they were
    assigned to (tied names excluded: those are set after the last file), before the next file is read. It is
    for a caller that replaces those weights (int8 quantization replaces the float linears). Then every tensor
    of that file still on the file's mapped pages is copied into memory of its own, so nothing refers to the
    mapping any more and it is unmapped: the pages the finite check (and the hook) read leave the RSS file by
    file. Without it the mapped weights stay in place and all of a checkpoint read so far stays resident
    (Dimple-7B: about 15.5 GiB of mapped bf16 next to 7 GiB of int8 weights, the sum of the two).
    """
    dtype = resolve_dtype(dtype, directory)
    device = torch.device(device)
    files = checkpoint_files(directory)
    expected = module.state_dict(keep_vars=True)
    buffers = _non_persistent_buffers(module, expected)
    for owner, attr in buffers:
        if getattr(owner, attr).is_meta and not callable(getattr(owner, "reset_buffers", None)):
            raise TypeError(
                f"{type(owner).__name__} has the non-persistent buffer {attr!r} on the meta device but no "
                "reset_buffers() to fill it; checkpoints do not hold non-persistent buffers"
            )
    stored: dict[str, str] = {}
    plan, ties = _plan(files, expected, strict, stored)
    _check_memory(expected, stored, dtype, device)

    for path, names in plan.items():
        shard, mapped = _read_file(path, names, dtype, device, check_finite)
        module.load_state_dict(shard, strict=False, assign=True)
        del shard  # the module holds the tensors now; only it may keep the file mapped
        if after_file is not None:
            after_file([name for name in names if name not in ties])
            _copy_out_of_file(module, mapped)

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


def _read_file(
    path: Path, names: list[str], dtype: torch.dtype | None, device: torch.device, check_finite: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The tensors ``names`` of one file, cast and placed (and checked finite), and for those that are the
    file's mapped pages themselves (no cast, CPU) their address."""
    shard: dict[str, torch.Tensor] = {}
    mapped: dict[str, int] = {}
    with _reading(path) as handle:
        for name in names:
            stored = handle.get_tensor(name)
            tensor = stored.to(device=device, dtype=dtype if stored.is_floating_point() else None)
            if check_finite and tensor.is_floating_point():
                _check_finite(tensor, name, path, dtype)
            if tensor is stored:
                mapped[name] = tensor.data_ptr()
            shard[name] = tensor
    return shard, mapped


def _copy_out_of_file(module: nn.Module, mapped: Mapping[str, int]) -> None:
    """Give each tensor of ``mapped`` (name -> address in a mapped file) that still lives there its own memory.

    A parameter's ``.data`` is swapped in place, so it keeps its identity (and its ties); a buffer is replaced,
    since it may be a view (safetensors returns a 0-d tensor as a view of a 1-element one) whose base would
    keep the file mapped. A name whose tensor was replaced (an int8 weight, a tensor elsewhere) is left alone.
    """
    for name, address in mapped.items():
        owner, attr = _owner(module, name)
        value = getattr(owner, attr, None)
        if not isinstance(value, torch.Tensor) or value.data_ptr() != address:
            continue
        if isinstance(value, nn.Parameter):
            value.data = value.data.clone()
        else:
            setattr(owner, attr, value.clone())


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


Materialize = Callable[[str, torch.Tensor], torch.Tensor]
"""``materialize(name, declared)`` → the tensor to write for ``name``, of ``declared``'s shape and dtype."""


def _cpu_tensors(
    state_dict: Mapping[str, torch.Tensor], names: list[str], materialize: Materialize | None = None
) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses tensors that share memory)."""
    tensors = {}
    seen: set[int] = set()
    for name in names:
        tensor = state_dict[name]
        if materialize is not None:
            declared, tensor = tensor, materialize(name, tensor)
            if tensor.shape != declared.shape or tensor.dtype != declared.dtype:
                raise ValueError(
                    f"materialize({name!r}) returned {tuple(tensor.shape)} {tensor.dtype}, the state dict declares "
                    f"{tuple(declared.shape)} {declared.dtype}"
                )
        tensor = tensor.detach().to("cpu").contiguous()
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
    materialize: Materialize | None = None,
) -> None:
    """Write ``state_dict`` in Hugging Face's layout, each file atomically.

    ``model.safetensors``, or, when ``max_shard_bytes`` splits it, ``model-00001-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` (``metadata.total_size`` in bytes and ``weight_map``). ``metadata`` is the
    safetensors header metadata, ``{"format": "pt"}`` by default. Files of an earlier save into the same folder
    that the new layout does not use (an old index, old shards) are removed afterwards.

    ``materialize(name, declared)``, when given, makes each tensor just before its shard is written, and
    ``state_dict`` only declares shapes and dtypes (meta tensors will do): only one shard is ever in memory,
    so a checkpoint larger than the RAM can be written (benchmarks/scale_7b.py writes Dimple-7B's shapes).
    """
    meta = [name for name, tensor in state_dict.items() if tensor.is_meta]
    if meta and materialize is None:
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
        tensors = _cpu_tensors(state_dict, names, materialize)
        write_safetensors(directory / file_name, tensors, metadata=header)
        del tensors  # before the next shard is made
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
    if not (path / "config.json").exists():  # not is_file(): a FIFO there is refused by name when it is read
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
        if not (path / "config.json").exists():
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
