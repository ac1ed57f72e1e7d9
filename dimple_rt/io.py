# SPDX-License-Identifier: Apache-2.0
"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through :func:`atomic_path`: the bytes go into a hidden temporary file in the target's folder
(a rename is atomic only within one file system), are flushed to disk with ``fsync``, and the file is then
renamed over the target. If anything fails, the temporary file is removed and an existing target is untouched.
Serialisation happens before the temporary file is opened, so a value that cannot be serialised leaves nothing.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary file next to ``path`` for a caller that writes it by name (as safetensors'
    ``save_file`` does); on leaving the block without an error it is synced and renamed to ``path``.

    A missing folder or a folder we may not write into raises FileNotFoundError / PermissionError naming
    ``path``, not the temporary file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.open("xb").close()  # reserves the name and checks the folder before any work is done
    except OSError as error:
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror}", str(path)) from error
    try:
        yield temporary
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (newlines as given, on every platform); return ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False, ensure_ascii: bool = True
) -> Path:
    """Write ``data`` as JSON plus a final newline to ``path`` atomically (options as ``json.dumps``'s)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    return write_text(path, text)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (contiguous CPU tensors, no shared storage) as a safetensors file atomically."""
    with atomic_path(path) as temporary:
        save_file(dict(tensors), temporary, metadata=dict(metadata) if metadata is not None else None)
    return Path(path)
