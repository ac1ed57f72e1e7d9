# SPDX-License-Identifier: Apache-2.0
"""Saving and loading safetensors checkpoints: Hugging Face layout, meta-device assignment, and every failure."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from dimple_rt import weights
from dimple_rt.weights import CheckpointError, checkpoint_files, load_state_dict_into, save_state_dict

VOCAB = 37  # odd sizes, so that no tensor is a multiple of a page or of the shard limit
DIM = 24
SHARD_BYTES = 4000  # embed (3552 B) fits alone; each 24x24 linear (2304 B) starts a new shard → 6 shards
DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Rotary(nn.Module):
    """Holds a non-persistent buffer, refilled by ``reset_buffers`` as the loader's protocol asks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.inv_freq.copy_(expected_inv_freq())


def expected_inv_freq() -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


class Tiny(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)])
        self.norm = RMSNorm(DIM)
        self.rotary = Rotary(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # persistent and not floating point
        if tie:
            self.lm_head.weight = self.embed.weight


def meta_model(tie: bool = False) -> Tiny:
    with torch.device("meta"):
        return Tiny(tie)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
        model.step.fill_(7)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def quoted(path: Path | str) -> str:
    """A path as a regular expression that matches it literally."""
    return re.escape(str(path))


def tensor_names(path: Path) -> set[str]:
    with safe_open(path, framework="pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("max_shard_bytes", [None, SHARD_BYTES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(tmp_path, state, max_shard_bytes, dtype):
    save_state_dict(state, tmp_path, max_shard_bytes=max_shard_bytes)
    model = meta_model()
    load_state_dict_into(model, tmp_path, dtype=dtype)

    loaded = model.state_dict(keep_vars=True)
    assert set(loaded) == set(state)
    for name, reference in state.items():
        tensor = loaded[name]
        assert not tensor.is_meta and tensor.device.type == "cpu", name
        want = reference.to(dtype) if dtype is not None and reference.is_floating_point() else reference
        assert tensor.dtype == want.dtype, name
        torch.testing.assert_close(tensor.detach(), want, rtol=0, atol=0)  # one rounding, the same as torch's
    for param in model.parameters():
        assert isinstance(param, nn.Parameter) and param.requires_grad
    assert model.rotary.inv_freq.dtype == torch.float32  # not cast: the module decides its buffers
    torch.testing.assert_close(model.rotary.inv_freq, expected_inv_freq(), rtol=0, atol=0)


def test_sharded_layout_is_hugging_faces(tmp_path, state):
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    shards = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    count = len(shards)
    assert count >= 3
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    text = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in state.values())}
    assert set(index["weight_map"]) == set(state)
    for shard in shards:
        assert tensor_names(tmp_path / shard) == {n for n, f in index["weight_map"].items() if f == shard}
        with safe_open(tmp_path / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    # Hugging Face's greedy rule: no shard goes over the limit unless it holds one tensor that alone does.
    for shard in shards:
        names = tensor_names(tmp_path / shard)
        size = sum(state[n].numel() * state[n].element_size() for n in names)
        assert size <= SHARD_BYTES or len(names) == 1
    assert checkpoint_files(tmp_path) == [tmp_path / shard for shard in shards]


def test_resaving_removes_the_other_layout(tmp_path, state):
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    save_state_dict(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    load_state_dict_into(meta_model(), tmp_path)


def test_failed_write_leaves_the_old_file(tmp_path, state, monkeypatch):
    save_state_dict(state, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("dimple_rt.io.save_file", broken_save_file)  # every safetensors write goes through io
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({name: t + 1 for name, t in state.items()}, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_saves_views_shared_storage_and_non_contiguous(tmp_path):
    fused = torch.randn(3 * DIM, DIM)
    q, k, v = fused.split(DIM)  # three views of one storage
    state = {"q": q, "k": k, "v": v, "q_again": q, "transposed": fused.t()}
    save_state_dict(state, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        for name, tensor in state.items():
            torch.testing.assert_close(handle.get_tensor(name), tensor, rtol=0, atol=0)


def test_refuses_to_save_meta_tensors(tmp_path):
    with pytest.raises(ValueError, match="meta device: w"):
        save_state_dict({"w": torch.empty(2, device="meta")}, tmp_path)


def test_bf16_checkpoint(tmp_path, state):
    bf16 = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in state.items()}
    save_state_dict(bf16, tmp_path)
    model = meta_model()
    load_state_dict_into(model, tmp_path)
    assert model.embed.weight.dtype == torch.bfloat16
    model = meta_model()
    load_state_dict_into(model, tmp_path, dtype=torch.float32)
    torch.testing.assert_close(model.embed.weight.detach(), bf16["embed.weight"].float(), rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loading_without_cast_maps_the_file(tmp_path, state):
    """dtype=None on CPU: the parameters are the file's mapped pages, not a copy of them."""
    save_state_dict(state, tmp_path)
    model = meta_model()
    load_state_dict_into(model, tmp_path)
    path = str((tmp_path / "model.safetensors").resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(path):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    assert ranges
    for name, param in model.named_parameters():
        assert any(start <= param.data_ptr() < end for start, end in ranges), name


@pytest.mark.parametrize("with_duplicate", [False, True])
def test_tied_weights(tmp_path, state, with_duplicate):
    if with_duplicate:
        state["lm_head.weight"] = state["embed.weight"]  # transformers sometimes saves both names
    else:
        del state["lm_head.weight"]
    save_state_dict(state, tmp_path)
    model = meta_model(tie=True)
    load_state_dict_into(model, tmp_path)
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model.lm_head.weight.detach(), state["embed.weight"], rtol=0, atol=0)


def test_missing_tensors(tmp_path, state):
    del state["norm.weight"]
    save_state_dict(state, tmp_path)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors of the model: norm\.weight$"):
        load_state_dict_into(meta_model(), tmp_path)


def test_many_missing_tensors_are_counted(tmp_path):
    save_state_dict({"embed.weight": torch.zeros(VOCAB, DIM)}, tmp_path)
    with pytest.raises(CheckpointError, match=r"lacks 7 tensors") as info:
        load_state_dict_into(meta_model(), tmp_path)
    assert "layers.0.weight" in str(info.value) and "step" in str(info.value)


def test_many_missing_names_are_cut_at_ten():
    names = [f"layers.{i}.weight" for i in range(25)]
    assert weights._listing(names) == ", ".join(names[:10]) + ", ... (25 in all)"


def test_unexpected_tensor(tmp_path, state):
    state["extra.weight"] = torch.zeros(3)
    save_state_dict(state, tmp_path)
    file = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match=rf"{quoted(file)} has 1 tensors the model does not have: extra\.weight"):
        load_state_dict_into(meta_model(), tmp_path)
    model = meta_model()
    load_state_dict_into(model, tmp_path, strict=False)
    torch.testing.assert_close(model.norm.weight.detach(), state["norm.weight"], rtol=0, atol=0)


def test_mis_shaped_tensor(tmp_path, state):
    state["layers.1.weight"] = torch.zeros(DIM, DIM - 1)
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    file = tmp_path / index["weight_map"]["layers.1.weight"]
    message = rf"{quoted(file)}: tensor 'layers\.1\.weight' has shape \[24, 23\], the model expects \[24, 24\]"
    with pytest.raises(CheckpointError, match=message):
        load_state_dict_into(meta_model(), tmp_path)


def test_tensor_in_two_files(tmp_path, state):
    save_state_dict(state, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    save_state_dict({"norm.weight": state["norm.weight"]}, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'norm\.weight' is in two files: .*a\.safetensors and .*b\.safetensors"):
        load_state_dict_into(meta_model(), tmp_path)


def test_missing_shard(tmp_path, state):
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    index = tmp_path / "model.safetensors.index.json"
    with pytest.raises(
        CheckpointError,
        match=rf"{quoted(index)} names shards that are not in {quoted(tmp_path)}: {quoted(shard.name)}$",
    ):
        load_state_dict_into(meta_model(), tmp_path)


@pytest.mark.parametrize(
    "text", ["{not json", '{"metadata": {}}', '{"weight_map": ["a"]}', '{"weight_map": {"w": "../x.safetensors"}}']
)
def test_corrupt_index(tmp_path, state, text):
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match=rf"^{quoted(index)}: "):
        checkpoint_files(tmp_path)


def test_truncated_file(tmp_path, state):
    save_state_dict(state, tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=rf"^{quoted(file)}: not a readable safetensors file"):
        load_state_dict_into(meta_model(), tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!}"])
def test_garbage_file(tmp_path, content):
    file = tmp_path / "model.safetensors"
    file.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{quoted(file)}: not a readable safetensors file"):
        load_state_dict_into(meta_model(), tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    message = rf"no safetensors checkpoint in {quoted(tmp_path)}: looked for model\.safetensors\.index\.json"
    with pytest.raises(FileNotFoundError, match=message):
        load_state_dict_into(meta_model(), tmp_path)


def test_other_safetensors_names(tmp_path, state):
    names = sorted(state)
    save_state_dict({n: state[n] for n in names[:3]}, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "part-b.safetensors")
    save_state_dict({n: state[n] for n in names[3:]}, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "part-a.safetensors")
    assert checkpoint_files(tmp_path) == [tmp_path / "part-a.safetensors", tmp_path / "part-b.safetensors"]
    model = meta_model()
    load_state_dict_into(model, tmp_path)
    torch.testing.assert_close(model.lm_head.weight.detach(), state["lm_head.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_unsupported_dtype(tmp_path, state, dtype):
    save_state_dict(state, tmp_path)
    with pytest.raises(TypeError, match="dtype must be one of"):
        load_state_dict_into(meta_model(), tmp_path, dtype=dtype)


def test_non_persistent_buffer_needs_reset_buffers(tmp_path, state):
    class NoReset(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.zeros(4), persistent=False)

    save_state_dict(state, tmp_path)
    with torch.device("meta"):
        model = NoReset()
    with pytest.raises(TypeError, match="NoReset has the non-persistent buffer 'table' on the meta device"):
        load_state_dict_into(model, tmp_path)


# ------------------------------------------------------------------------------- writing shard by shard, after_file


def test_materialize_writes_what_a_full_state_dict_writes_one_shard_at_a_time(tmp_path, state):
    """A state dict of meta tensors plus ``materialize`` gives the same files as the real tensors, and each
    shard's tensors are made only after the shard before is on disk."""
    save_state_dict(state, tmp_path / "direct", max_shard_bytes=SHARD_BYTES)
    declared = {name: torch.empty_like(tensor, device="meta") for name, tensor in state.items()}
    made: list[tuple[str, int]] = []  # (name, shards on disk when it was made)

    def materialize(name: str, meta: torch.Tensor) -> torch.Tensor:
        assert meta.is_meta
        made.append((name, len(list((tmp_path / "lazy").glob("model-*.safetensors")))))
        return state[name].clone()

    save_state_dict(declared, tmp_path / "lazy", max_shard_bytes=SHARD_BYTES, materialize=materialize)
    assert [name for name, _ in made] == list(state)  # each once, in order
    index = json.loads((tmp_path / "lazy" / "model.safetensors.index.json").read_text())
    shard_of = {name: int(index["weight_map"][name][6:11]) for name in state}
    assert all(on_disk == shard_of[name] - 1 for name, on_disk in made)
    for path in sorted((tmp_path / "direct").iterdir()):
        assert (tmp_path / "lazy" / path.name).read_bytes() == path.read_bytes(), path.name


def test_materialize_must_keep_the_declared_shape_and_dtype(tmp_path, state):
    declared = {name: torch.empty_like(tensor, device="meta") for name, tensor in state.items()}

    def wrong(name: str, meta: torch.Tensor) -> torch.Tensor:
        return torch.zeros(meta.shape, dtype=torch.half) if name == "embed.weight" else state[name]

    with pytest.raises(ValueError, match=r"materialize\('embed.weight'\) returned \(37, 24\) torch.float16"):
        save_state_dict(declared, tmp_path, materialize=wrong)
    with pytest.raises(ValueError, match=r"materialize\('step'\) returned \(2,\) torch.float32, the state dict decl"):
        save_state_dict(declared, tmp_path, materialize=lambda name, meta: torch.zeros(2))


def _mapped_ranges(directory: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the safetensors files in ``directory``."""
    files = {str(path.resolve()) for path in directory.glob("*.safetensors")}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in files:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("tie", [False, True])
def test_after_file_sees_each_file_then_the_files_are_unmapped(tmp_path, state, tie):
    """The hook runs once per file with the names that file provided (tied ones excluded), before the next file
    is read; afterwards the tensors it did not replace have their own memory, the same values, and no mapping
    of the checkpoint is left (without the hook the parameters stay the mapped pages: the test above)."""
    if tie:
        del state["lm_head.weight"]
    save_state_dict(state, tmp_path, max_shard_bytes=SHARD_BYTES)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    model = meta_model(tie)
    calls: list[list[str]] = []

    def after_file(names: list[str]) -> None:
        calls.append(names)
        assert not getattr(*weights._owner(model, names[0])).is_meta
        if "layers.0.weight" in names:  # replaced by the hook, as quantization replaces a weight
            model.layers[0].weight = nn.Parameter(torch.full((DIM, DIM), 2.0))

    load_state_dict_into(model, tmp_path, after_file=after_file)
    files = sorted(set(index["weight_map"].values()))
    tied = {"embed.weight"} if tie else set()
    assert [sorted(names) for names in calls] == [
        sorted(n for n in state if index["weight_map"][n] == f and n not in tied) for f in files
    ]
    assert _mapped_ranges(tmp_path) == []
    assert bool((model.layers[0].weight == 2).all())
    assert (model.lm_head.weight is model.embed.weight) == tie
    for name, tensor in model.state_dict().items():
        if name != "layers.0.weight":
            torch.testing.assert_close(tensor, state["embed.weight" if tie and name == "lm_head.weight" else name])
