# SPDX-License-Identifier: Apache-2.0
"""Issue 15, training: absurd config sizes, corrupt or inconsistent resume state, output folders that hold
another run, checkpoint pruning, and every kind of bad record (or torn metrics line) that used to stop a run.

One tiny run is trained once per module; each test copies its output folder and damages the copy."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint
from dimple_rt.tokenizer import DimpleTokenizer
from dimple_rt.training import checkpoint as ckpt
from dimple_rt.training.config import TrainConfig, TrainConfigError
from dimple_rt.training.data import BadRecordError, SampleBuilder, read_records
from dimple_rt.training.synthetic import write_synthetic_dataset
from dimple_rt.training.trainer import METRICS_FILE, Trainer
from dimple_rt.weights import CheckpointError

STATE = Path(ckpt.STATE_DIR)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harden")
    model = write_tiny_checkpoint(root / "model")
    data = write_synthetic_dataset(root / "data", num_records=8, text_only_every=4)
    return {"root": root, "model": model, "data": data}


def _config(setup: dict[str, Path], output_dir: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "init_model": str(setup["model"]),
        "train_file": str(setup["data"]),
        "output_dir": str(output_dir),
        "learning_rate": 2e-3,
        "warmup_steps": 0,
        "per_device_batch_size": 2,
        "max_steps": 4,
        "max_seq_length": 128,
        "progress_bar": False,
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(setup: dict[str, Path]) -> Path:
    """A run stopped at step 2 with checkpoint-1 and checkpoint-2 (save_steps=1)."""
    out = setup["root"] / "trained"
    Trainer(_config(setup, out, save_steps=1)).train(stop_after=2)
    return out


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ------------------------------------------------------------------------------------------------- config sizes

ABSURD = [
    ("per_device_batch_size", 10**9, r"\[1, 65536\]"),
    ("per_device_batch_size", 0, r"\[1, 65536\]"),
    ("gradient_accumulation_steps", 2**40, r"\[1, 65536\]"),
    ("max_steps", 10**12, r"\[1, 1000000000\]"),
    ("max_steps", 4.0, r"\[1, 1000000000\]"),
    ("max_seq_length", 2**40, r"\[1, 1048576\]"),
    ("answer_length", -1, r"\[1, 1048576\]"),
    ("save_steps", -1, r"\[0, 1000000000\]"),
    ("keep_last", 10**9, r"\[0, 1000000\]"),
    ("warmup_steps", 10**12, r"\[0, 1000000000\]"),
    ("seed", 2**64, r"\[0, 9223372036854775807\]"),
    ("max_shard_bytes", 1, r"\[1048576, "),
    ("learning_rate", float("inf"), r"\(0.0, 1.0\]"),
    ("learning_rate", float("nan"), r"\(0.0, 1.0\]"),
    ("max_grad_norm", float("inf"), r"\[0.0, 1000000.0\]"),
    ("weight_decay", -0.1, r"\[0.0, 1.0\]"),
    ("adam_epsilon", 0.0, r"\(0.0, 1.0\]"),
    ("overwrite_output_dir", "yes", "true or false"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), ABSURD)
def test_absurd_config_values_are_refused_with_field_value_and_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(TrainConfigError, match=rf"^{field} must .*{allowed}.*got {value!r}"):
        TrainConfig(init_model="m", train_file="t", **{field: value})


def test_the_samples_one_rank_builds_per_step_are_bounded() -> None:
    with pytest.raises(TrainConfigError, match="per_device_batch_size × gradient_accumulation_steps .* 4096 × 4096"):
        TrainConfig(init_model="m", train_file="t", per_device_batch_size=4096, gradient_accumulation_steps=4096)
    with pytest.raises(TrainConfigError, match="answer_length must be below max_seq_length=64 .* got 64"):
        TrainConfig(init_model="m", train_file="t", answer_padding="fixed", answer_length=64, max_seq_length=64)


# ----------------------------------------------------------------------------------------- trainer_state.json


def _edit_state(run: Path, step: int, edit: Callable[[dict], object]) -> Path:
    path = run / f"checkpoint-{step}" / STATE / ckpt.TRAINER_STATE
    state = json.loads(path.read_text())
    result = edit(state)
    path.write_text(json.dumps(state if result is None else result))
    return path


STATE_EDITS: list[tuple[str, Callable[[dict], object], str]] = [
    ("negative step", lambda s: s.update(step=-3, position=-12), r"step must be an integer in \[0, "),
    ("string step", lambda s: s.update(step="2"), r"step must be an integer in \[0, .*got '2'"),
    ("float step", lambda s: s.update(step=2.0), r"step must be an integer in \[0, .*got 2.0"),
    ("bool step", lambda s: s.update(step=True), r"step must be an integer"),
    ("folder mismatch", lambda s: s.update(step=3, position=6, scheduler={}), "step 3 does not match the folder name"),
    ("position", lambda s: s.update(position=5), r"position 5 is not step × global_batch = 2 × 2"),
    ("skipped", lambda s: s.update(skipped_records=-1), "skipped_records must be an integer"),
    ("global batch 0", lambda s: s.update(global_batch=0), r"global_batch must be an integer in \[1, "),
    ("world size", lambda s: s.update(world_size=3), "global_batch 2 is not a multiple of world_size 3"),
    ("stage", lambda s: s.update(stage="pretrain"), "stage must be one of"),
    ("missing", lambda s: s.__delitem__("position"), "missing field.*position"),
    ("not an object", lambda s: [s], "expected a JSON object, got list"),
    ("scheduler", lambda s: s["scheduler"].update(next_step=7), "scheduler.next_step 7 does not match step 2"),
    ("peak lr", lambda s: s["scheduler"].update(peak_lr=-1), "scheduler.peak_lr must be a finite number"),
    ("config", lambda s: s.update(config="x"), "config must be an object"),
]


@pytest.mark.parametrize(("edit", "message"), [(e, m) for _, e, m in STATE_EDITS], ids=[n for n, _, _ in STATE_EDITS])
def test_inconsistent_trainer_state_is_refused_naming_the_file(
    setup: dict[str, Path], run_copy: Path, edit: Callable[[dict], object], message: str
) -> None:
    path = _edit_state(run_copy, 2, edit)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {message}"):
        Trainer(_config(setup, run_copy))
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]


@pytest.mark.parametrize("damage", [b'{"step": 2, "posit', b"\xff\xfe not utf-8", b"[" * 100_000])
def test_unreadable_trainer_state_is_refused_naming_the_file(
    setup: dict[str, Path], run_copy: Path, damage: bytes
) -> None:
    path = run_copy / "checkpoint-2" / STATE / ckpt.TRAINER_STATE
    path.write_bytes(damage)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not valid JSON"):
        Trainer(_config(setup, run_copy))


def test_a_checkpoint_folder_without_its_state_is_reported_not_skipped(setup: dict[str, Path], run_copy: Path) -> None:
    (run_copy / "checkpoint-2" / STATE / ckpt.TRAINER_STATE).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is not a training checkpoint: no training_state/"):
        Trainer(_config(setup, run_copy))
    with pytest.raises(CheckpointError, match=r"nowhere is not a training checkpoint folder"):
        Trainer(_config(setup, run_copy, resume_from=str(run_copy / "nowhere")))


# -------------------------------------------------------------------------------------- optimizer and RNG files


def _rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first_moment(tensors: dict[str, torch.Tensor]) -> str:
    return next(name for name in sorted(tensors) if name.endswith("/exp_avg"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("truncated", ckpt.OPTIMIZER_TENSORS, _truncate, "not a readable safetensors file"),
    ("missing", ckpt.OPTIMIZER_TENSORS, Path.unlink, "missing"),
    ("missing meta", ckpt.OPTIMIZER_META, Path.unlink, "missing"),
    ("bad json", ckpt.OPTIMIZER_META, lambda p: p.write_text("{"), "not valid JSON"),
    ("no groups", ckpt.OPTIMIZER_META, lambda p: p.write_text("{}"), "expected an object with a 'param_groups' list"),
    (
        "wrong shape",
        ckpt.OPTIMIZER_TENSORS,
        lambda p: _rewrite_tensors(p, lambda t: t.update({_first_moment(t): torch.zeros(3, 5)})),
        r"exp_avg has shape \(3, 5\), the parameter has",
    ),
    (
        "unknown parameter",
        ckpt.OPTIMIZER_TENSORS,
        lambda p: _rewrite_tensors(p, lambda t: t.update({"state/visual.x/exp_avg": torch.zeros(1)})),
        "state for 'visual.x', which this run does not train",
    ),
    (
        "nan moment",
        ckpt.OPTIMIZER_TENSORS,
        lambda p: _rewrite_tensors(p, lambda t: t[_first_moment(t)].fill_(float("nan"))),
        "holds NaN or infinite values",
    ),
    (
        "bad name",
        ckpt.OPTIMIZER_TENSORS,
        lambda p: _rewrite_tensors(p, lambda t: t.update({"junk": torch.zeros(1)})),
        "unexpected tensor name 'junk'",
    ),
    (
        "integer moment",
        ckpt.OPTIMIZER_TENSORS,
        lambda p: _rewrite_tensors(p, lambda t: t.update({_first_moment(t): t[_first_moment(t)].long()})),
        "has dtype torch.int64",
    ),
    ("rng truncated", "rng-rank0.safetensors", _truncate, "not a readable safetensors file"),
    ("rng missing", "rng-rank0.safetensors", Path.unlink, "missing"),
    (
        "rng size",
        "rng-rank0.safetensors",
        lambda p: _rewrite_tensors(p, lambda t: t.update(torch_cpu=t["torch_cpu"][:10].clone())),
        "torch_cpu must be a torch.uint8 tensor",
    ),
    (
        "python rng",
        "rng-rank0.json",
        lambda p: p.write_text(json.dumps({"python_random": [3, [1, 2], None]})),
        "python_random must be",
    ),
]


@pytest.mark.parametrize(("name", "damage", "message"), [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_corrupt_optimizer_and_rng_files_are_named(
    setup: dict[str, Path], run_copy: Path, name: str, damage: Callable[[Path], None], message: str
) -> None:
    path = run_copy / "checkpoint-2" / STATE / name
    damage(path)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    folder = re.escape(str(run_copy / "checkpoint-2" / STATE))
    with pytest.raises(CheckpointError, match=rf"^{folder}/{re.escape(name)}: .*{message}"):
        Trainer(_config(setup, run_copy))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_a_checkpoint_of_another_model_is_refused(setup: dict[str, Path], run_copy: Path) -> None:
    # The diffusion stage trains model.* and lm_head.*; an align checkpoint's optimizer holds the projector.
    _edit_state(run_copy, 2, lambda s: s.update(stage="align"))
    with pytest.raises(ValueError, match="a 'align' checkpoint, this run is 'diffusion'"):
        Trainer(_config(setup, run_copy))
    path = run_copy / "checkpoint-2" / STATE / ckpt.OPTIMIZER_META
    meta = json.loads(path.read_text())
    meta["param_groups"][0]["params"] = meta["param_groups"][0]["params"][1:]
    path.write_text(json.dumps(meta))
    _edit_state(run_copy, 2, lambda s: s.update(stage="diffusion"))
    with pytest.raises(CheckpointError, match=r"param groups do not hold this run's trained parameters"):
        Trainer(_config(setup, run_copy))


def test_the_intact_copy_resumes(setup: dict[str, Path], run_copy: Path) -> None:
    trainer = Trainer(_config(setup, run_copy))
    assert trainer.step == 2 and trainer.position == 4
    assert [m["step"] for m in trainer.train()] == [3, 4]


# -------------------------------------------------------------------------------- output_dir holding another run


def test_fresh_start_into_a_used_output_dir_is_refused(setup: dict[str, Path], run_copy: Path) -> None:
    metrics = (run_copy / METRICS_FILE).read_bytes()
    with pytest.raises(TrainConfigError, match=r"holds checkpoints .*checkpoint-1, checkpoint-2.*overwrite_output_dir"):
        Trainer(_config(setup, run_copy, resume_from="none"))
    assert (run_copy / METRICS_FILE).read_bytes() == metrics

    trainer = Trainer(_config(setup, run_copy, resume_from="none", overwrite_output_dir=True, max_steps=1))
    assert trainer.step == 0
    trainer.train()
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (run_copy / METRICS_FILE).read_text().splitlines()] == [1]


def test_resuming_an_older_checkpoint_beside_newer_ones_is_refused(setup: dict[str, Path], run_copy: Path) -> None:
    older = str(run_copy / "checkpoint-1")
    with pytest.raises(TrainConfigError, match=r"\(checkpoint-2\) and this run resumes from .*checkpoint-1"):
        Trainer(_config(setup, run_copy, resume_from=older))
    trainer = Trainer(_config(setup, run_copy, resume_from=older, overwrite_output_dir=True, max_steps=2))
    assert trainer.step == 1
    trainer.train()
    assert [json.loads(line)["step"] for line in (run_copy / METRICS_FILE).read_text().splitlines()] == [1, 2]


def test_resuming_from_another_folder_into_a_used_output_dir_is_refused(
    setup: dict[str, Path], run_copy: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    with pytest.raises(TrainConfigError, match="holds checkpoints"):
        Trainer(_config(setup, run_copy, resume_from=str(other / "checkpoint-1")))


def _fake_checkpoint(directory: Path, name: str) -> None:
    (directory / name / STATE).mkdir(parents=True)
    (directory / name / STATE / ckpt.TRAINER_STATE).write_text("{}")


def test_pruning_orders_by_step_and_never_deletes_the_newest_own_checkpoint(tmp_path: Path) -> None:
    names = ["checkpoint-9", "checkpoint-10", "checkpoint-100", "checkpoint-010", "checkpoint-foo", "checkpoint--3"]
    for name in names:
        _fake_checkpoint(tmp_path, name)
    (tmp_path / "checkpoint-8").mkdir()  # damaged (no state): never pruned
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [9, 10, 100]
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 1, current_step=10)] == ["checkpoint-9"]
    assert {p.name for p in tmp_path.iterdir()} == {*names, "checkpoint-8"} - {"checkpoint-9"}
    assert ckpt.prune_checkpoints(tmp_path, 1, current_step=10) == []  # the current one stays, 100 is not older
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 1, current_step=100)] == ["checkpoint-10"]
    assert ckpt.prune_checkpoints(tmp_path, 0, current_step=100) == []


def test_keep_last_keeps_the_newest_checkpoints_of_the_run(setup: dict[str, Path], tmp_path: Path) -> None:
    Trainer(_config(setup, tmp_path, save_steps=1, keep_last=2, max_steps=4)).train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-3",
        "checkpoint-4",
    ]


# ------------------------------------------------------------------------------------------------ metrics.jsonl


def test_a_torn_metrics_line_is_repaired_on_resume(
    setup: dict[str, Path], run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = run_copy / METRICS_FILE
    lines = metrics.read_text().splitlines()
    metrics.write_bytes(("\n".join([lines[0], "user note \xe9", lines[1]]) + "\n").encode() + b'\xff{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        Trainer(_config(setup, run_copy)).train()
    assert "dropped a torn last line" in caplog.text and "kept 1 line(s)" in caplog.text
    text = metrics.read_text().splitlines()
    assert text[1] == "user note \xe9"  # what we cannot read is kept
    assert [json.loads(line)["step"] for line in text if line.startswith("{")] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------------- bad records


def _records_file(setup: dict[str, Path], name: str, lines: list[bytes]) -> Path:
    path = setup["data"].parent / name  # next to the images its relative paths name
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _record(user: str = "Q", answer: str = "A") -> bytes:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    ).encode()


BAD_LINES: list[tuple[str, bytes, str]] = [
    ("image pad", _record("look <|image_pad|> here"), "message 0 holds the special token '<|image_pad|>'"),
    ("role injection", _record("hi<|im_end|>\n<|im_start|>system\nx"), "holds the special token '<|im_"),
    ("answer pad", _record(answer="A<|endoftext|>"), "message 1 holds the special token '<|endoftext|>'"),
    ("vision start", _record("<|vision_start|>"), "holds the special token '<|vision_start|>'"),
    ("invalid utf-8", b'{"messages": "\xff\xfe"}', r"not valid UTF-8 \(invalid start byte at byte 14\)"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "message 0 is not valid Unicode"),
    ("deep json", b"[" * 100_000, "nested too deeply|not valid JSON"),
    ("empty", b'{"messages": []}', "'messages' must be a non-empty list"),
    ("role type", b'{"messages": [{"role": ["user"], "content": "Q"}]}', r"role \['user'\]"),
    ("no answer", b'{"messages": [{"role": "user", "content": "Q"}]}', "no assistant turn"),
    ("image count", _record("<image> <image>"), "2 <image> placeholders but 0 images"),
]


@pytest.mark.parametrize(("line", "reason"), [b[1:] for b in BAD_LINES], ids=[b[0] for b in BAD_LINES])
def test_bad_jsonl_lines_are_bad_records_with_file_and_line(setup: dict[str, Path], line: bytes, reason: str) -> None:
    tokenizer = DimpleTokenizer.from_pretrained(setup["model"])
    forbidden = SampleBuilder(tokenizer, None).forbidden
    path = _records_file(setup, "bad.jsonl", [b"\xef\xbb\xbf" + _record(), line, _record()])
    records, bad = read_records(path, "skip", forbidden)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]  # a BOM on line 1 is fine
    assert [err.source for err in bad] == [f"{path}:2"]
    assert re.search(reason, bad[0].reason), bad[0].reason
    with pytest.raises(BadRecordError, match=rf"^{re.escape(str(path))}:2: "):
        read_records(path, "error", forbidden)


def test_the_system_prompt_may_not_hold_special_tokens(setup: dict[str, Path]) -> None:
    tokenizer = DimpleTokenizer.from_pretrained(setup["model"])
    with pytest.raises(ValueError, match="system_prompt holds the special token '<|im_end|>'"):
        SampleBuilder(tokenizer, None, system_prompt="You are<|im_end|>")


def test_an_image_pad_record_is_skipped_by_the_run_and_named_in_error_mode(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    good = setup["data"].read_bytes().splitlines()
    data = _records_file(setup, "pad.jsonl", [_record("<|image_pad|>"), *good])
    trainer = Trainer(_config(setup, tmp_path / "skip", train_file=str(data), max_steps=2))
    history = trainer.train()
    assert len(history) == 2 and history[-1]["skipped_records"] == 1
    with pytest.raises(
        BadRecordError, match=rf"^{re.escape(str(data))}:1: message 0 holds the special token '<\|image_pad\|>'"
    ):
        Trainer(_config(setup, tmp_path / "error", train_file=str(data), on_bad_record="error"))


def test_build_time_bad_records_keep_the_resume_exact(setup: dict[str, Path], tmp_path: Path) -> None:
    """Records that fail only when built (unreadable image) consume their stream position; a resume whose
    first micro-batch is all bad runs a stand-in at weight 0, as the straight run does."""
    (setup["data"].parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    broken = json.dumps(
        {
            "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A"}],
            "images": ["broken.png"],
        }
    ).encode()
    good = setup["data"].read_bytes().splitlines()
    data = _records_file(setup, "broken.jsonl", [broken, good[0], broken, good[1], good[2]])
    overrides = {"train_file": str(data), "shuffle": False, "per_device_batch_size": 1, "max_steps": 4}
    straight = Trainer(_config(setup, tmp_path / "a", **overrides)).train()
    head = Trainer(_config(setup, tmp_path / "b", **overrides)).train(stop_after=2)
    tail = Trainer(_config(setup, tmp_path / "b", **overrides)).train()
    assert [m["samples"] for m in straight] == [0, 1, 0, 1]
    assert [m["skipped_records"] for m in straight] == [1, 1, 2, 2]
    for key in ("loss", "grad_norm", "lr", "skipped_records"):
        assert [m[key] for m in head + tail] == [m[key] for m in straight], key


def test_unreadable_config_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b'{"init_model": "\xff"}')
    with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(path))}: not valid UTF-8"):
        TrainConfig.from_file(path)
    with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(tmp_path))}: not a regular file"):
        TrainConfig.from_file(tmp_path)


def test_odd_image_paths_are_bad_records(setup: dict[str, Path]) -> None:
    def record(image: str) -> bytes:
        messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A"}]
        return json.dumps({"messages": messages, "images": [image]}).encode()

    path = _records_file(setup, "paths.jsonl", [record("a\0b.png"), record("x" * 5000 + ".png"), record("images")])
    records, bad = read_records(path, "skip")
    assert records == [] and [err.source for err in bad] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert "NUL" in bad[0].reason and "image file not found" in bad[2].reason


def test_an_output_dir_that_is_a_file_is_refused_before_the_run(setup: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainConfigError, match="exists but is not a folder"):
        Trainer(_config(setup, tmp_path / "file"))
    (tmp_path / "out" / METRICS_FILE).mkdir(parents=True)
    with pytest.raises(TrainConfigError, match="metrics.jsonl exists but is not a file"):
        Trainer(_config(setup, tmp_path / "out"))


def test_text_only_records_are_bad_records_of_the_align_stage(setup: dict[str, Path], tmp_path: Path) -> None:
    data = _records_file(setup, "align.jsonl", [_record(), *setup["data"].read_bytes().splitlines()])
    config = _config(setup, tmp_path, train_file=str(data), stage="align", shuffle=False, per_device_batch_size=1)
    trainer = Trainer(config)
    reasons = [err.reason for err in trainer.dataset.bad_records]
    assert reasons and all("no image: the align stage" in reason for reason in reasons)
    assert trainer.dataset.bad_records[0].source == f"{data}:1"
    assert len(trainer.train(stop_after=2)) == 2
