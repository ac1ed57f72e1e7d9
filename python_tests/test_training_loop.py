# SPDX-License-Identifier: Apache-2.0
"""The training loop on the tiny checkpoint and drawn data: stage freezing, AR then diffusion end to end, exact
resume, SIGTERM, and 2-process gloo DDP and FSDP runs against the 1-process run with the same global batch
(including a 1-process resume of their checkpoints)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dimple_rt
from dimple_rt.cli import main as cli_main
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint
from dimple_rt.training.config import TrainConfig, TrainConfigError
from dimple_rt.training.data import BadRecordError
from dimple_rt.training.synthetic import write_synthetic_dataset
from dimple_rt.training.trainer import METRICS_FILE, Trainer, linear_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    model = write_tiny_checkpoint(root / "model")
    data = write_synthetic_dataset(root / "data", num_records=12, text_only_every=4)
    with data.open("a", encoding="utf-8") as handle:  # line 13: a bad record, skipped with a warning
        handle.write(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                    "images": ["gone.png"],
                }
            )
            + "\n"
        )
    return {"root": root, "model": model, "data": data}


def _config(setup: dict[str, Path], output_dir: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "init_model": str(setup["model"]),
        "train_file": str(setup["data"]),
        "output_dir": str(output_dir),
        "stage": "diffusion",
        "learning_rate": 2e-3,
        "max_grad_norm": 1.0,
        "warmup_steps": 0,
        "per_device_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "max_seq_length": 128,
        "progress_bar": False,
        "attention": "sdpa",
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def _fixed_batch_loss(trainer: Trainer) -> float:
    """The stage's loss on the first two samples with fixed noise: comparable before and after training."""
    with torch.no_grad():
        return float(trainer.micro_batch_loss(trainer.micro_batch(0, 0), step=0, global_index=0))


EXPECTED_TRAINED = {
    "align": lambda name: name.startswith("img_projector."),
    "instruct": lambda name: not name.startswith("visual."),
    "diffusion": lambda name: name.startswith(("model.", "lm_head.")),
}


@pytest.mark.parametrize("stage", sorted(EXPECTED_TRAINED))
def test_stage_freezing_gives_gradients_exactly_where_trained(
    setup: dict[str, Path], tmp_path: Path, stage: str
) -> None:
    trainer = Trainer(_config(setup, tmp_path, stage=stage, mask_strategy="dual", noise_eps=0.5))
    names = [name for name, _ in trainer.model.named_parameters()]
    expected = {name for name in names if EXPECTED_TRAINED[stage](name)}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == expected
    trainer.micro_batch_loss(trainer.micro_batch(0, 0), 0, 0).backward()
    trainer.zero_pad_row_grad()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert set(grads) == expected
    assert all(bool(grads[n].abs().sum() > 0) for n in expected if n != "model.embed_tokens.weight")
    if stage == "instruct":
        pad = trainer.model_config.pad_token_id
        embed_grad = grads["model.embed_tokens.weight"]
        assert torch.equal(embed_grad[pad], torch.zeros_like(embed_grad[pad]))  # the padding_idx row stays frozen
        assert bool(embed_grad.abs().sum() > 0)


def test_ar_then_diffusion_end_to_end(setup: dict[str, Path], tmp_path: Path) -> None:
    ar = Trainer(_config(setup, tmp_path / "ar", stage="instruct", max_steps=8, per_device_batch_size=4))
    pad = ar.model_config.pad_token_id
    pad_row = ar.model.model.embed_tokens.weight[pad].detach().clone()
    before = _fixed_batch_loss(ar)
    history = ar.train()
    after = _fixed_batch_loss(ar)
    assert [m["step"] for m in history] == list(range(1, 9))
    assert after < 0.7 * before, (before, after)
    assert history[-1]["skipped_records"] == 1  # the record whose image is missing
    assert torch.equal(ar.model.model.embed_tokens.weight[pad], pad_row)
    for metrics in history:
        assert metrics["samples_per_s"] > 0 and metrics["tokens_per_s"] > 0 and metrics["grad_norm"] > 0
    logged = [json.loads(line) for line in (tmp_path / "ar" / METRICS_FILE).read_text().splitlines()]
    assert [m["loss"] for m in logged] == [m["loss"] for m in history]
    ar_checkpoint = tmp_path / "ar" / "checkpoint-8"
    assert json.loads((ar_checkpoint / "config.json").read_text())["full_attn_mask"] is False

    diffusion = Trainer(
        _config(
            setup,
            tmp_path / "dlm",
            init_model=str(ar_checkpoint),
            max_steps=8,
            per_device_batch_size=4,
            mask_strategy="dual",
        )
    )
    before = _fixed_batch_loss(diffusion)
    diffusion.train()
    after = _fixed_batch_loss(diffusion)
    assert after < 0.85 * before, (before, after)

    final = tmp_path / "dlm" / "checkpoint-8"
    for name in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ):
        assert (final / name).is_file(), name
    rt = dimple_rt.Runtime(final, backend="reference")
    state = load_file(final / "model.safetensors")
    torch.testing.assert_close(rt.model.lm_head.weight, diffusion.model.lm_head.weight.detach(), atol=0, rtol=0)
    assert set(state) == set(rt.model.state_dict())
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(setup["data"].parent / "images" / "0000.png")},
                {"type": "text", "text": "What colour is the shape?"},
            ],
        }
    ]
    inputs = rt.prepare(conversation)
    logits = rt.forward(inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.image_grid_thw)
    assert logits.shape[:2] == inputs.input_ids.shape and bool(torch.isfinite(logits).all())
    result = rt.generate(conversation, max_new_tokens=8, steps=8)
    assert isinstance(result.text, str) and 1 <= result.num_forward_passes <= 8


def test_resume_is_exact(setup: dict[str, Path], tmp_path: Path) -> None:
    overrides = {"max_steps": 4, "gradient_accumulation_steps": 2, "mask_strategy": "dual", "save_steps": 0}
    straight = Trainer(_config(setup, tmp_path / "a", **overrides))
    full = straight.train()

    first = Trainer(_config(setup, tmp_path / "b", **overrides))
    head = first.train(stop_after=2)
    assert [m["step"] for m in head] == [1, 2]
    resumed = Trainer(_config(setup, tmp_path / "b", **overrides))  # resume_from="auto" finds checkpoint-2
    assert resumed.step == 2 and resumed.position == 2 * 4
    tail = resumed.train()
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in head + tail] == [m[key] for m in full], key  # bitwise on CPU fp32
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / METRICS_FILE).read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="global batch"):
        Trainer(_config(setup, tmp_path / "b", **{**overrides, "gradient_accumulation_steps": 1}))


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])  # this source tree's dimple_rt
    env["OMP_NUM_THREADS"] = "1"
    return env


def _write_config(config: TrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    return path


def test_sigterm_writes_a_checkpoint(setup: dict[str, Path], tmp_path: Path) -> None:
    config = _config(setup, tmp_path / "run", max_steps=100_000)
    process = subprocess.Popen(
        [sys.executable, "-m", "dimple_rt.training", str(_write_config(config, tmp_path / "c.json"))],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "run" / METRICS_FILE
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, output.decode()
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 2 <= last < 100_000
    state = json.loads((tmp_path / "run" / f"checkpoint-{last}" / "training_state" / "trainer_state.json").read_text())
    assert state["step"] == last and state["position"] == last * 2
    assert b"stopped by signal" in output


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_process_run_matches_one_process(setup: dict[str, Path], tmp_path: Path, wrapper: str) -> None:
    ddp_config = _config(
        setup,
        tmp_path / "ddp",
        max_steps=3,
        per_device_batch_size=1,
        gradient_accumulation_steps=1,
        distributed=wrapper,
        save_steps=2,
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dimple_rt.training", str(_write_config(ddp_config, tmp_path / "ddp.json")),
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, env=_subprocess_env(), capture_output=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / METRICS_FILE).read_text().splitlines()]

    single = Trainer(
        _config(setup, tmp_path / "one", max_steps=3, per_device_batch_size=1, gradient_accumulation_steps=2)
    )
    alone = single.train()
    assert [m["step"] for m in ddp] == [1, 2, 3] and [m["samples"] for m in ddp] == [2, 2, 2]
    for a, b in zip(ddp, alone):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    saved = load_file(tmp_path / "ddp" / "checkpoint-3" / "model.safetensors")
    for name, tensor in single.model.state_dict().items():
        if name.endswith("k_proj.bias"):
            # Softmax ignores a key bias (it adds the same q·b to a whole row), so its gradient is rounding
            # noise, which Adam normalises into lr-sized steps of arbitrary sign: not comparable across runs.
            continue
        # Adam's first steps are ~lr·sign(grad): an element whose gradient is near rounding noise may step the
        # other way when the sums are ordered differently, so compare whole tensors, not elements.
        assert float((saved[name] - tensor).norm()) <= 1e-4 * float(tensor.norm()), name

    # The checkpoint does not depend on the world size: one process resumes the 2-process run at step 2.
    shutil.rmtree(tmp_path / "ddp" / "checkpoint-3")
    resumed = Trainer(
        _config(setup, tmp_path / "ddp", max_steps=3, per_device_batch_size=1, gradient_accumulation_steps=2)
    )
    assert resumed.step == 2
    (step3,) = resumed.train()
    assert step3["loss"] == pytest.approx(ddp[2]["loss"], rel=1e-5)
    assert step3["grad_norm"] == pytest.approx(ddp[2]["grad_norm"], rel=1e-4)


def test_bf16_autocast_and_yaml_config(setup: dict[str, Path], tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            _config(setup, tmp_path / "bf16", precision="bf16", max_steps=2, attention="reference").to_dict()
        )
    )
    trainer = Trainer(TrainConfig.from_file(path))
    assert trainer.autocast_dtype == torch.bfloat16
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in history)
    assert trainer.model.lm_head.weight.dtype == torch.float32  # fp32 master weights


def test_config_validation_and_files(tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="stage must be one of"):
        TrainConfig(init_model="m", train_file="t", stage="pretrain")
    with pytest.raises(TrainConfigError, match="unknown training config keys: learning_rat"):
        TrainConfig.from_dict({"init_model": "m", "train_file": "t", "learning_rat": 1.0})
    config = TrainConfig(init_model="m", train_file="t", stage="diffusion")
    assert config.lr == 5e-6 and config.grad_clip == 0.01  # the authors' stage-3 values
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"init_model": "m", "train_file": "data/t.jsonl", "max_steps": 100}))
    loaded = TrainConfig.from_file(path, {"stage": "align"})
    assert loaded.train_file == str(tmp_path / "data/t.jsonl") and loaded.stage == "align"
    assert loaded.num_warmup_steps == 3 and loaded.lr == 1e-3


def test_linear_schedule_is_transformers_warmup_then_decay() -> None:
    assert [linear_schedule(step, 2, 10) for step in (0, 1, 2, 6, 10, 11)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert [linear_schedule(step, 0, 4) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_bad_record_in_error_mode_stops_the_run(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(BadRecordError, match=rf"^{setup['data']}:13: image file not found"):
        Trainer(_config(setup, tmp_path, on_bad_record="error"))
    config = _write_config(_config(setup, tmp_path, on_bad_record="error"), tmp_path / "c.json")
    assert cli_main(["train", str(config), "--set", "max_steps=1"]) == 2
    assert f"{setup['data']}:13: image file not found" in capsys.readouterr().err
    assert cli_main(["train", str(config), "--set", "stage=pretrain"]) == 2
    assert "stage must be one of" in capsys.readouterr().err


def test_micro_batch_of_only_bad_records_counts_as_zero(setup: dict[str, Path], tmp_path: Path) -> None:
    lines = setup["data"].read_text().splitlines()[:3]
    too_long = {"messages": [{"role": "user", "content": "Q " * 300}, {"role": "assistant", "content": "A"}]}
    data = setup["data"].parent / "with_long.jsonl"  # next to the images its relative paths name
    data.write_text("\n".join([lines[0], json.dumps(too_long), *lines[1:]]) + "\n")
    trainer = Trainer(
        _config(
            setup, tmp_path, train_file=str(data), stage="instruct", shuffle=False, per_device_batch_size=1, max_steps=3
        )
    )
    history = trainer.train()
    assert [m["samples"] for m in history] == [1, 0, 1]
    assert history[1]["loss"] == 0.0 and history[1]["grad_norm"] == 0.0  # the stand-in batch runs at weight 0
    assert [m["skipped_records"] for m in history] == [0, 1, 1]
    assert history[0]["loss"] > 0 and history[2]["loss"] > 0
