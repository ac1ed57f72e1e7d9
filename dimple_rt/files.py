# SPDX-License-Identifier: Apache-2.0
"""Reading the files of a checkpoint or a request without trusting them.

Every file dimple_rt reads (config.json, safetensors shards and their index, tokenizer files, the chat template,
preprocessor_config.json, images given as paths) goes through :func:`check_regular_file` or :func:`read_bytes`:

- a path that is not a regular file (a FIFO, a character or block device, a socket, a folder) is refused. A FIFO is
  opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is read, so a FIFO with no writer cannot
  block the caller forever, and ``/dev/zero`` cannot feed it an endless stream;
- a file larger than the reader's stated limit is refused from its size, before it is read;
- JSON that is not valid, nested too deeply, or not the expected top-level type gets one line naming the file.

The errors are ValueErrors (a bad input, not a failed system call) and name the file and what it was expected to
hold; a missing file stays a FileNotFoundError.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MiB = 1 << 20
MAX_JSON_BYTES = 64 * MiB
"""Largest config/index/preprocessor JSON read (Dimple-7B's biggest, the shard index, is about 60 KB)."""
MAX_TOKENIZER_FILE_BYTES = 512 * MiB
"""Largest tokenizer file read (Qwen2's tokenizer.json is 7 MB, vocab.json 2.8 MB, merges.txt 1.7 MB)."""


class NotARegularFileError(ValueError):
    """A path that exists but is not a regular file (FIFO, device, socket, folder)."""


class FileTooLargeError(ValueError):
    """A file larger than the limit stated for what it should hold."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _check_stat(path: Path, info: os.stat_result, what: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFileError(f"{path} is {_kind(info.st_mode)}: {what} must be a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise FileTooLargeError(
            f"{path} is {info.st_size} bytes: {what} may be at most {max_bytes} bytes ({max_bytes / MiB:.0f} MiB)"
        )


def check_regular_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> Path:
    """``path`` as a Path, after checking (``os.stat``, which never blocks) that it is a regular file of at most
    ``max_bytes``. For readers that take a path (safetensors' mmap). FileNotFoundError if it does not exist."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path} ({what})") from None
    _check_stat(path, info, what, max_bytes)
    return path


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The contents of the regular file ``path``, at most ``max_bytes`` of them.

    Opened without blocking and checked on the open descriptor, so the file checked is the file read.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path} ({what})") from None
    except IsADirectoryError:
        raise NotARegularFileError(f"{path} is a folder: {what} must be a regular file") from None
    try:
        _check_stat(path, os.fstat(fd), what, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise FileTooLargeError(f"{path}: {what} may be at most {max_bytes} bytes")
    return data


def read_text(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """:func:`read_bytes` decoded as UTF-8; invalid UTF-8 is a ValueError naming the file."""
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err})") from None


def read_json(
    path: str | os.PathLike,
    what: str,
    max_bytes: int = MAX_JSON_BYTES,
    expect: type | None = dict,
    error: type[Exception] = ValueError,
) -> Any:
    """The JSON value in ``path``; ``error`` (a ValueError subclass) names the file when the JSON is invalid, too
    deeply nested, or (with ``expect``) not of the expected top-level type (``dict``: a JSON object)."""
    try:
        text = read_text(path, what, max_bytes)
    except ValueError as err:  # not a regular file, too large, not UTF-8: one error type per reader
        if isinstance(err, error):
            raise
        raise error(str(err)) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, int-digit limits; nesting past the stack
        raise error(f"{path}: not valid JSON ({type(err).__name__}: {err}); it should hold {what}") from None
    if expect is not None and type(data) is not expect:
        kind = {dict: "object", list: "array", str: "string"}.get(expect, expect.__name__)
        raise error(f"{path}: must hold a JSON {kind} ({what}), got {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
    }.get(type(value), "null" if value is None else type(value).__name__)
