# SPDX-License-Identifier: Apache-2.0
"""Atomic writes (dimple_rt.io): the content arrives whole, no temporary file stays, a failed write keeps the old
file, and folder errors name the target."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dimple_rt import io

OLD = '{"old": true}\n'


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_write_text_and_bytes(tmp_path: Path) -> None:
    text = "naïve — 東京\nline two\n"
    assert io.write_text(tmp_path / "a.txt", text) == tmp_path / "a.txt"
    io.write_bytes(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "a.txt").read_bytes() == text.encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert _names(tmp_path) == ["a.txt", "b.bin"]


@pytest.mark.parametrize(
    "options", [{}, {"indent": 2, "sort_keys": True}, {"indent": 1, "ensure_ascii": False}, {"indent": None}]
)
def test_write_json_matches_json_dumps(tmp_path: Path, options: dict) -> None:
    data = {"b": [1, 2.5, None], "a": "é"}
    io.write_json(tmp_path / "x.json", data, **options)
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == json.dumps(data, **{"indent": 2, **options}) + "\n"
    assert _names(tmp_path) == ["x.json"]


def test_write_safetensors(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    io.write_safetensors(tmp_path / "m.safetensors", tensors, metadata={"format": "pt"})
    loaded = load_file(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert _names(tmp_path) == ["m.safetensors"]


def test_replaces_existing_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(OLD)
    io.write_json(tmp_path / "x.json", {"new": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"new": 1}
    assert _names(tmp_path) == ["x.json"]


def test_serializer_error_keeps_old_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(OLD)
    with pytest.raises(TypeError):
        io.write_json(tmp_path / "x.json", {"bad": object()})
    assert (tmp_path / "x.json").read_text() == OLD
    assert _names(tmp_path) == ["x.json"]


def test_error_inside_block_removes_temporary_and_keeps_old_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(OLD)
    with pytest.raises(RuntimeError, match="serializer failed"), io.atomic_path(tmp_path / "x.json") as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".x.json.")
        temporary.write_text("half a fi")
        raise RuntimeError("serializer failed")
    assert (tmp_path / "x.json").read_text() == OLD
    assert _names(tmp_path) == ["x.json"]


def test_safetensors_error_keeps_old_file(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_text(OLD)
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError, match="share memory"):
        io.write_safetensors(tmp_path / "m.safetensors", {"a": shared, "b": shared[:2]})
    assert (tmp_path / "m.safetensors").read_text() == OLD
    assert _names(tmp_path) == ["m.safetensors"]


def test_rename_onto_a_folder_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "x.json").mkdir()
    with pytest.raises(IsADirectoryError):
        io.write_json(tmp_path / "x.json", {})
    assert _names(tmp_path) == ["x.json"] and (tmp_path / "x.json").is_dir()


def test_missing_folder_names_the_target(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError, match="cannot write .*missing/x.json"):
        io.write_json(target, {})
    assert _names(tmp_path) == []


def test_parent_is_a_file_names_the_target(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="cannot write .*file/x.txt"):
        io.write_text(tmp_path / "file" / "x.txt", "")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_read_only_folder_names_the_target(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "x.json").write_text(OLD)
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write .*ro/x.json"):
            io.write_json(folder / "x.json", {})
        assert (folder / "x.json").read_text() == OLD
        assert _names(folder) == ["x.json"]
    finally:
        folder.chmod(0o700)
