# SPDX-License-Identifier: Apache-2.0
"""Model resolution: local folder, alias, repo id in a local Hugging Face cache, and the one not-found error.

The cache is built in ``tmp_path`` in huggingface_hub's real layout (``models--owner--name/refs/main``,
``snapshots/<commit>/`` whose files link into ``blobs/``). Sockets are blocked in every test: resolution must
never reach for the network.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from dimple_rt import weights
from dimple_rt.weights import MODEL_ALIASES, ModelNotFoundError, default_cache_dir, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "rp-yu/Dimple-7B"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resolve_model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


def checkpoint_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def fake_cache(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A cache entry as ``hf download`` leaves it; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content.encode()).hexdigest()
        blob.write_text(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_local_folder(tmp_path):
    folder = checkpoint_folder(tmp_path / "ckpt")
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(tmp_path)


def test_alias_to_local_folder(tmp_path, monkeypatch):
    folder = checkpoint_folder(tmp_path / "packaged")
    monkeypatch.setitem(MODEL_ALIASES, "tiny-test", folder)
    assert resolve_model("tiny-test") == folder


def test_alias_to_repo_id_in_cache(tmp_path):
    snapshot = fake_cache(tmp_path / "hub", REPO_ID, {"config.json": "{}", "model.safetensors": "x"})
    assert MODEL_ALIASES["dimple-7b"] == REPO_ID
    assert resolve_model("dimple-7b", cache_dir=tmp_path / "hub") == snapshot


def test_existing_folder_comes_before_alias(tmp_path, monkeypatch):
    folder = checkpoint_folder(tmp_path / "dimple-7b")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("dimple-7b", cache_dir=tmp_path / "empty").resolve() == folder


@pytest.mark.parametrize("offline", ["1", None])
def test_repo_id_in_cache_from_environment(tmp_path, monkeypatch, offline):
    """The cache location is read from the environment when resolve_model runs, not when anything was imported."""
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE")
    snapshot = fake_cache(tmp_path / "hub", "someone/other-model", {"config.json": "{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("someone/other-model") == snapshot


def test_cache_under_hf_home(tmp_path, monkeypatch):
    snapshot = fake_cache(tmp_path / "home" / "hub", REPO_ID, {"config.json": "{}"})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "hub"
    assert resolve_model(REPO_ID) == snapshot


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "huggingface" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"


def test_partial_download_is_not_found(tmp_path):
    """A snapshot without config.json (an interrupted download) is not a checkpoint."""
    fake_cache(tmp_path / "hub", REPO_ID, {"model.safetensors": "x"})
    with pytest.raises(ModelNotFoundError, match="no snapshot of 'main' with config.json"):
        resolve_model(REPO_ID, cache_dir=tmp_path / "hub")


def test_alias_not_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hub"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("dimple-7b", cache_dir=cache)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"local folder {tmp_path / 'dimple-7b'}: does not exist" in message
    assert f"alias 'dimple-7b' → repo id {REPO_ID}" in message
    assert f"Hugging Face cache {cache / 'models--rp-yu--Dimple-7B'}:" in message
    assert f"hf download {REPO_ID} --cache-dir {cache}" in message
    assert f"huggingface-cli download {REPO_ID} --cache-dir {cache}" in message


def test_repo_id_not_found_uses_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("someone/missing")
    message = str(info.value)
    assert f"Hugging Face cache {tmp_path / 'hub' / 'models--someone--missing'}:" in message
    assert message.endswith("(older huggingface_hub: huggingface-cli download someone/missing)")


def test_unknown_name_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("notes.txt")
    message = str(info.value)
    assert f"local folder {tmp_path / 'notes.txt'}: is not a folder" in message
    assert "aliases: 'notes.txt' is not one of dimple-7b" in message
    assert "Hugging Face cache: not searched, 'notes.txt' is not a repo id (owner/name)" in message
    assert f"hf download {weights.DEFAULT_REPO_ID}" in message


def test_alias_to_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_ALIASES, "tiny-test", tmp_path / "gone")
    with pytest.raises(ModelNotFoundError, match=r"alias 'tiny-test' → local folder .*gone: does not exist"):
        resolve_model("tiny-test")
