# SPDX-License-Identifier: Apache-2.0
"""The training configuration: one flat dataclass, read from JSON (or YAML when PyYAML is installed).

Every field has a default and a one-line docstring; ``__post_init__`` checks the values so that a bad config
fails before any model is loaded, with the field named. Stage defaults follow the authors' run.sh
(spec §6.6): learning rate and gradient clipping are taken from the stage unless given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("align", "instruct", "diffusion")
PADDING_STRATEGIES = ("dynamic", "uniform", "fixed")
STAGE_LEARNING_RATE = {"align": 1e-3, "instruct": 2e-5, "diffusion": 5e-6}
STAGE_MAX_GRAD_NORM = {"align": 1.0, "instruct": 1.0, "diffusion": 0.01}


class TrainConfigError(ValueError):
    """A training config value that cannot work; the message names the field."""


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainConfigError(f"{name} must be one of {choices}, got {value!r}")


def _int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TrainConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _number(name: str, value: object, low: float, high: float, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = "(" if open_low else "["
        raise TrainConfigError(f"{name} must be a finite number in {bound}{low}, {high}], got {value!r}")


# Upper bounds of the sizes: far above any real run, low enough that nothing is allocated or looped over
# for minutes before a typo is noticed. (field → (low, high)); None-able fields are checked when set.
INT_RANGES: dict[str, tuple[int, int]] = {
    "max_seq_length": (1, 1 << 20),
    "answer_length": (1, 1 << 20),
    "per_device_batch_size": (1, 1 << 16),
    "gradient_accumulation_steps": (1, 1 << 16),
    "max_steps": (1, 10**9),
    "warmup_steps": (0, 10**9),
    "save_steps": (0, 10**9),
    "keep_last": (0, 10**6),
    "seed": (0, 2**63 - 1),
    "max_shard_bytes": (1 << 20, 1 << 50),
}
MAX_SAMPLES_PER_RANK_STEP = 1 << 20
"""per_device_batch_size × gradient_accumulation_steps: the samples one rank builds in one optimizer step."""
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {  # field → (low, high, low excluded)
    "learning_rate": (0.0, 1.0, True),
    "max_grad_norm": (0.0, 1e6, False),
    "warmup_ratio": (0.0, 1.0, False),
    "weight_decay": (0.0, 1.0, False),
    "adam_beta1": (0.0, 1.0, False),
    "adam_beta2": (0.0, 1.0, False),
    "adam_epsilon": (0.0, 1.0, True),
    "noise_eps": (0.0, 1.0, False),
}


@dataclass
class TrainConfig:
    """Everything one training run needs; ``python -m dimple_rt.training.synthetic DIR`` writes a tiny example."""

    init_model: str = ""
    """Checkpoint to start from: a folder in Hugging Face layout, an alias or a cached repo id."""
    train_file: str = ""
    """JSONL conversations (``messages`` + ``images``, image paths relative to this file or absolute)."""
    output_dir: str = "runs/dimple"
    """Where checkpoints (``checkpoint-<step>``) and ``metrics.jsonl`` go."""
    stage: str = "diffusion"
    """``align`` (projector only, AR), ``instruct`` (all but the ViT, AR) or ``diffusion`` (decoder, masked)."""

    max_seq_length: int = 1024
    """Samples longer than this are bad records (never sliced)."""
    answer_padding: str = "dynamic"
    """``dynamic``: a random number of <|endoftext|> pads per answer (the authors'); ``uniform``: the same, but
    up to at least answer_length; ``fixed``: pad/truncate to answer_length."""
    answer_length: int = 64
    """Answer length of ``fixed``; the least upper bound of ``uniform``."""
    system_prompt: str = "You are a helpful assistant."
    """System segment put before the first message."""
    on_bad_record: str = "skip"
    """``skip`` (warn and count) or ``error`` (stop the run) on a bad record."""
    shuffle: bool = True
    """Shuffle the records, a new seeded permutation every epoch."""

    seed: int = 0
    """Seeds the data order, the answer padding and the diffusion noise."""
    per_device_batch_size: int = 1
    """Samples per micro-batch on each rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank; the loss is their mean."""
    max_steps: int = 100
    """Optimizer steps of the whole run (the LR schedule spans them)."""

    learning_rate: float | None = None
    """Peak learning rate; None takes the stage's (align 1e-3, instruct 2e-5, diffusion 5e-6)."""
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of max_steps (rounded up), then linear decay to 0."""
    warmup_steps: int | None = None
    """Warmup steps; overrides warmup_ratio when set."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = None
    """Gradient clipping norm; None takes the stage's (1.0, 1.0, 0.01); 0 disables clipping."""
    freeze_pad_embedding: bool = True
    """Keep the <|endoftext|> embedding row fixed, as the authors' padding_idx does (spec §8.C.10)."""

    mask_strategy: str = "single"
    """Diffusion masking: ``single`` (r < t) or ``dual`` (complementary copies, the batch doubles)."""
    noise_eps: float = 1e-3
    """Smallest noise level: t ~ U[eps, 1)."""
    loss_weighting: str = "none"
    """Diffusion loss weighting: ``none`` (the authors') or ``inverse_t`` (the ELBO's 1/t)."""

    precision: str = "auto"
    """``fp32``, ``bf16`` (autocast; fp32 master weights) or ``auto`` (bf16 on a GPU that has it, else fp32)."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto`` (cuda when available)."""
    attention: str = "sdpa"
    """Training attention: ``sdpa`` (torch SDPA) or ``reference`` (the plain-torch reference)."""
    distributed: str = "ddp"
    """Wrapper under torchrun: ``ddp`` or ``fsdp`` (FSDP2 fully_shard per decoder layer)."""

    save_steps: int = 0
    """Write a checkpoint every this many steps (0: only at the end and on SIGTERM)."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints (0 keeps all)."""
    max_shard_bytes: int | None = None
    """Split model.safetensors into shards of at most this many bytes."""
    resume_from: str = "auto"
    """``auto`` (the newest checkpoint in output_dir, if any), ``none``, or a checkpoint folder."""
    overwrite_output_dir: bool = False
    """Allow a run to replace what output_dir holds: its checkpoints (all for ``resume_from="none"``, those
    after the resume point otherwise) and their metrics lines are deleted when the run starts."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""

    def __post_init__(self) -> None:
        for name in ("init_model", "train_file"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TrainConfigError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        _choice("stage", self.stage, STAGES)
        _choice("answer_padding", self.answer_padding, PADDING_STRATEGIES)
        _choice("on_bad_record", self.on_bad_record, ("skip", "error"))
        _choice("mask_strategy", self.mask_strategy, ("single", "dual"))
        _choice("loss_weighting", self.loss_weighting, ("none", "inverse_t"))
        _choice("precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("attention", self.attention, ("sdpa", "reference"))
        _choice("distributed", self.distributed, ("ddp", "fsdp"))
        for name, (low, high) in INT_RANGES.items():
            if getattr(self, name) is not None or name not in ("warmup_steps", "max_shard_bytes"):
                _int(name, getattr(self, name), low, high)
        for name, (low, high, open_low) in FLOAT_RANGES.items():
            if getattr(self, name) is not None or name not in ("learning_rate", "max_grad_norm"):
                _number(name, getattr(self, name), low, high, open_low)
        if self.noise_eps >= 1.0:
            raise TrainConfigError(f"noise_eps must be below 1, got {self.noise_eps}")
        if self.answer_padding == "fixed" and self.answer_length >= self.max_seq_length:
            raise TrainConfigError(
                f"answer_length must be below max_seq_length={self.max_seq_length} with answer_padding='fixed' "
                f"(every sample would be too long), got {self.answer_length}"
            )
        per_rank = self.per_device_batch_size * self.gradient_accumulation_steps
        if per_rank > MAX_SAMPLES_PER_RANK_STEP:
            raise TrainConfigError(
                f"per_device_batch_size × gradient_accumulation_steps must be at most {MAX_SAMPLES_PER_RANK_STEP}, "
                f"got {self.per_device_batch_size} × {self.gradient_accumulation_steps} = {per_rank}"
            )
        for name in ("shuffle", "freeze_pad_embedding", "progress_bar", "overwrite_output_dir"):
            if type(getattr(self, name)) is not bool:
                raise TrainConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.system_prompt, str):
            raise TrainConfigError(f"system_prompt must be a string, got {self.system_prompt!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise TrainConfigError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        if not isinstance(self.resume_from, str) or not self.resume_from:
            raise TrainConfigError(
                f"resume_from must be 'auto', 'none' or a checkpoint folder, got {self.resume_from!r}"
            )

    @property
    def lr(self) -> float:
        """The peak learning rate actually used."""
        return self.learning_rate if self.learning_rate is not None else STAGE_LEARNING_RATE[self.stage]

    @property
    def grad_clip(self) -> float:
        """The clipping norm actually used (0: no clipping)."""
        return self.max_grad_norm if self.max_grad_norm is not None else STAGE_MAX_GRAD_NORM[self.stage]

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(-(-self.warmup_ratio * self.max_steps // 1))  # ceil, as transformers' get_warmup_steps

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> TrainConfig:
        """From a mapping; unknown keys are an error (a typo must not be silently ignored). Relative paths are
        resolved against ``base`` (the config file's folder)."""
        if not isinstance(data, dict):
            raise TrainConfigError(f"a training config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainConfigError(f"unknown training config keys: {', '.join(unknown)}")
        data = dict(data)
        if base is not None:
            for name in ("train_file", "output_dir", "init_model"):
                value = data.get(name)
                # init_model may be an alias or repo id: only rewrite it when it names an existing path there.
                if isinstance(value, str) and value and not os.path.isabs(value):
                    candidate = base / value
                    if name != "init_model" or candidate.exists():
                        data[name] = str(candidate)
            value = data.get("resume_from")
            if isinstance(value, str) and value not in ("auto", "none") and not os.path.isabs(value):
                data["resume_from"] = str(base / value)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a ``.json`` (or ``.yaml``/``.yml``, which needs PyYAML) config, then apply ``overrides``."""
        path = Path(path)
        if not path.is_file():  # a folder, or a FIFO that would block
            raise TrainConfigError(f"{path}: not a regular file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise TrainConfigError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise TrainConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or use JSON") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise TrainConfigError(f"{path}: not valid YAML: {err}") from None
        else:
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as err:
                raise TrainConfigError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: a training config must be a mapping")
        data.update(overrides or {})
        try:
            return cls.from_dict(data, base=path.parent)
        except TrainConfigError as err:
            raise TrainConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
