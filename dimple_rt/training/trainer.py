# SPDX-License-Identifier: Apache-2.0
"""The training loop: one code path for a single process, DDP and FSDP under torchrun (spec §6.4-6.6).

The data stream is global (:class:`~dimple_rt.training.data.GlobalOrder`): optimizer step s consumes the next
``world · accumulation · batch`` stream positions, cut into micro-batches of ``batch``; rank r takes
micro-batch ``m · world + r`` at accumulation step m. The diffusion noise of a micro-batch is seeded by its
global index. So what a run computes depends on the global batch only, not on how it is split over ranks, and
resuming needs just the step and the stream position. The loss of a step is the mean over all its
micro-batches of each micro-batch's token mean, the authors' objective (``loss_rescale = 1/GA``, then DDP's
mean over ranks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dimple_rt.backend import Backend
from dimple_rt.config import DimpleConfig
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.processor import ImageProcessor
from dimple_rt.tokenizer import DimpleTokenizer
from dimple_rt.weights import CheckpointError, load_state_dict_into, resolve_model

from . import checkpoint as ckpt
from .attention import training_backend
from .config import TrainConfig, TrainConfigError
from .data import BadRecordError, Batch, ConversationDataset, GlobalOrder, SampleBuilder, collate
from .distributed import init_distributed
from .losses import ar_loss, diffusion_loss, mask_for_diffusion
from .signals import StopFlag, sigterm_to

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Parameter-name prefixes (the checkpoint's) trained in each stage; the vision tower is always frozen.
STAGE_TRAINABLE = {
    "align": ("img_projector.",),
    "instruct": ("model.", "lm_head.", "img_projector."),
    "diffusion": ("model.", "lm_head."),
}


def set_trainable(model: DimpleModel, stage: str) -> list[str]:
    """Set ``requires_grad`` for ``stage`` (spec §6.6) and return the trained parameter names."""
    prefixes = STAGE_TRAINABLE[stage]
    if stage == "align" and model.config.vision_config is None:
        raise ValueError("the align stage trains the image projector, but this model has no vision tower")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): transformers' linear warmup then linear decay."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def noise_seed(seed: int, step: int, micro_batch: int) -> int:
    """Seed of the diffusion noise of global micro-batch ``micro_batch`` of optimizer step ``step``."""
    digest = hashlib.sha256(f"dimple-noise/{seed}/{step}/{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TrainingModule(nn.Module):
    """The model plus its training Backend (the attention function), with a forward that takes a batch's tensors and returns logits.

    DDP and FSDP wrap this module, so the projector and the decoder both run inside the wrapped forward. The
    frozen vision tower runs without autograd.
    """

    def __init__(self, model: DimpleModel, backend: Backend) -> None:
        super().__init__()
        self.dimple = model
        self.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        causal: bool,
        image_repeats: int = 1,
    ) -> torch.Tensor:
        """input_ids, attention_mask: (rows, len); position_ids: (3, rows, len). ``image_repeats`` copies of
        the images' features fill rows that repeat the batch (dual masking). Returns logits (rows, len, vocab)."""
        features = None
        if pixel_values is not None:
            with torch.no_grad():
                visual = self.dimple.visual(
                    pixel_values.to(self.dimple.lm_head.weight.dtype), image_grid_thw, self.backend.attention
                )
            projector_trains = any(p.requires_grad for p in self.dimple.img_projector.parameters())
            with nullcontext() if projector_trains else torch.no_grad():
                features = self.dimple.img_projector(visual)  # (image tokens, hidden)
            features = features.repeat(image_repeats, 1)  # (repeats · image tokens, hidden), copy-major
        out = self.dimple(
            input_ids,
            self.backend,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_features=features,
            causal=causal,
        )
        return out.logits


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`train` runs it."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        device_kind = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device_kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
        self.dist = init_distributed(device_kind)
        self.device = torch.device("cuda", self.dist.local_rank) if device_kind == "cuda" else torch.device("cpu")
        if device_kind == "cuda":
            torch.cuda.set_device(self.device)
        if config.precision == "auto":
            bf16 = device_kind == "cuda" and torch.cuda.is_bf16_supported()
        else:
            bf16 = config.precision == "bf16"
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.output_dir = Path(config.output_dir)
        self.stop = StopFlag()

        self.source_dir = resolve_model(config.init_model)
        self.model_config = DimpleConfig.from_json_file(self.source_dir / "config.json")
        self.tokenizer = DimpleTokenizer.from_pretrained(self.source_dir)
        processor = ImageProcessor.from_pretrained(self.source_dir) if self.model_config.vision_config else None
        # The data is read before the model is loaded, so that a bad record in "error" mode fails fast.
        builder = SampleBuilder(
            self.tokenizer,
            processor,
            max_seq_length=config.max_seq_length,
            answer_padding=config.answer_padding,
            answer_length=config.answer_length,
            system_prompt=config.system_prompt,
            seed=config.seed,
            vocab_size=self.model_config.vocab_size,
        )
        self.dataset = ConversationDataset(
            config.train_file, builder, config.on_bad_record, require_images=config.stage == "align"
        )
        self.order = GlobalOrder(len(self.dataset), config.seed, config.shuffle)

        self.resume_dir, self._stale_checkpoints = self._resume_checkpoint()
        weights_dir = self.resume_dir if self.resume_dir is not None else self.source_dir
        with torch.device("meta"):
            model = DimpleModel(self.model_config)
        load_state_dict_into(model, weights_dir, dtype=torch.float32, device=self.device)
        self.trainable_names = set_trainable(model, config.stage)
        self.trainable_shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
        self.model = model
        self.module = self._wrap(TrainingModule(model, training_backend(config.attention)))
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.pad_row = (
            self.model_config.pad_token_id
            if config.freeze_pad_embedding and "model.embed_tokens.weight" in self.trainable_names
            else None
        )

        self.step = 0
        self.position = 0
        self.skipped = len(self.dataset.bad_records)
        self._fallback: Batch | None = None
        self._skipped_now = 0  # bad records met while building the current step's micro-batches
        self._saved_step: int | None = None
        if self.resume_dir is not None:
            self._load_training_state(self.resume_dir)
            self._saved_step = self.step

    # ------------------------------------------------------------------------------------------------- set-up

    @property
    def global_batch(self) -> int:
        return self.config.per_device_batch_size * self.config.gradient_accumulation_steps * self.dist.world_size

    def _resume_checkpoint(self) -> tuple[Path | None, list[Path]]:
        """The checkpoint to resume from, and the checkpoints of output_dir this run would overwrite (refused
        unless overwrite_output_dir): all of them for a fresh start or a resume from elsewhere, the ones after
        the resume point otherwise. Checked before the model is loaded."""
        value = self.config.resume_from
        for path, kind in ((self.output_dir, "a folder"), (self.output_dir / METRICS_FILE, "a file")):
            if path.exists() and not (path.is_dir() if kind == "a folder" else path.is_file()):
                raise TrainConfigError(f"{path} exists but is not {kind}: output_dir must be a folder this run can use")
        existing = ckpt.list_checkpoints(self.output_dir, complete_only=False)
        if value == "none":
            resume = None
        elif value == "auto":
            resume = existing[-1][1] if existing else None
        else:
            resume = Path(value)
        if resume is None:
            stale = [path for _, path in existing]
        else:
            step = ckpt.read_trainer_state(resume)["step"]  # a clear error for a folder that is not a checkpoint
            inside = resume.resolve().parent == self.output_dir.resolve()
            stale = [path for found, path in existing if not inside or found > step]
        if stale and not self.config.overwrite_output_dir:
            names = ", ".join(path.name for path in stale[:3]) + (" ..." if len(stale) > 3 else "")
            where = "starts from scratch" if resume is None else f"resumes from {resume}"
            raise TrainConfigError(
                f"output_dir {self.output_dir} holds checkpoints of another run or of later steps ({names}) and "
                f"this run {where} (resume_from={value!r}): it would overwrite them and their metrics. Use another "
                "output_dir, resume_from='auto', or set overwrite_output_dir=true to delete them."
            )
        return resume, stale

    def _wrap(self, module: TrainingModule) -> nn.Module:
        if not self.dist.enabled:
            return module
        if self.config.distributed == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # In the instruct stage a text-only micro-batch leaves the trained projector unused on that rank.
            unused = self.config.stage == "instruct" and self.model_config.vision_config is not None
            return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=unused)
        from torch.distributed.fsdp import fully_shard

        for layer in module.dimple.model.layers:
            fully_shard(layer)
        return fully_shard(module)

    @property
    def _fsdp(self) -> bool:
        return self.dist.enabled and self.config.distributed == "fsdp"

    def _load_training_state(self, checkpoint: Path) -> None:
        state = ckpt.read_trainer_state(checkpoint)
        state_file = checkpoint / ckpt.STATE_DIR / ckpt.TRAINER_STATE
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{state_file}: trained with a global batch of {state['global_batch']}, this run has "
                f"{self.global_batch} (per-device batch × accumulation × world size): the data stream would differ"
            )
        if state["stage"] != self.config.stage:
            raise ValueError(f"{state_file}: a {state['stage']!r} checkpoint, this run is {self.config.stage!r}")
        if state["step"] > self.config.max_steps:
            logger.warning(
                "%s is at step %d, past max_steps=%d: nothing to train",
                checkpoint,
                state["step"],
                self.config.max_steps,
            )
        optim_state = ckpt.read_optimizer_state(checkpoint, self.trainable_shapes)
        # The hyperparameters are this run's config (the LR is set every step); the checkpoint gives the state.
        own_groups = self.optimizer.state_dict()["param_groups"]
        if len(optim_state["param_groups"]) != len(own_groups):
            raise CheckpointError(
                f"{checkpoint / ckpt.STATE_DIR / ckpt.OPTIMIZER_META}: {len(optim_state['param_groups'])} param "
                f"groups, this run's optimizer has {len(own_groups)}"
            )
        optim_state["param_groups"] = [
            {**{k: v for k, v in own.items() if k != "params"}, "params": saved["params"]}
            for own, saved in zip(own_groups, optim_state["param_groups"])
        ]
        try:
            if self._fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                prefixed = _rename_optimizer_state(optim_state, lambda name: f"dimple.{name}")
                options = StateDictOptions(full_state_dict=True)
                set_optimizer_state_dict(self.module, self.optimizer, prefixed, options=options)
            else:
                index = {name: i for i, name in enumerate(self.trainable_names)}
                self.optimizer.load_state_dict(_rename_optimizer_state(optim_state, index.__getitem__))
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise CheckpointError(
                f"{checkpoint / ckpt.STATE_DIR / ckpt.OPTIMIZER_TENSORS}: does not fit this run's optimizer ({err})"
            ) from None
        ckpt.restore_rng_state(checkpoint, self.dist.rank, state["world_size"])
        self.step = state["step"]
        self.position = state["position"]
        self.skipped = state["skipped_records"]
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    # --------------------------------------------------------------------------------------------------- data

    def micro_batch(self, step_start: int, global_index: int) -> Batch | None:
        """The micro-batch at global index ``global_index`` of the step whose stream starts at ``step_start``;
        None when all its samples were bad records (skipped)."""
        size = self.config.per_device_batch_size
        samples = []
        for position in range(step_start + global_index * size, step_start + (global_index + 1) * size):
            epoch, index = self.order[position]
            try:
                samples.append(self.dataset.sample(epoch, index))
            except BadRecordError as err:
                if self.config.on_bad_record == "error":
                    raise
                self._skipped_now += 1
                logger.warning("skipping bad record %s", err)
        if not samples:
            return None
        return collate(samples, self.tokenizer.pad_token_id, self.model_config).to(self.device)

    def stand_in_batch(self) -> Batch:
        """A one-sample batch of the first record that builds, to run at weight 0 when a micro-batch held only
        bad records and no earlier batch exists (e.g. the very first one of a run or of a resume)."""
        for index in range(len(self.dataset)):
            try:
                sample = self.dataset.sample(0, index)
            except BadRecordError:
                continue
            return collate([sample], self.tokenizer.pad_token_id, self.model_config).to(self.device)
        raise ValueError(f"{self.config.train_file}: no record builds into a sample; every record is bad")

    # --------------------------------------------------------------------------------------------------- loss

    def micro_batch_loss(self, batch: Batch, step: int, global_index: int) -> torch.Tensor:
        """The stage's loss of one micro-batch (its token mean), fp32 scalar."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        if self.config.stage in ("align", "instruct"):
            with autocast:
                logits = self.module(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.position_ids,
                    batch.pixel_values,
                    batch.image_grid_thw,
                    True,
                )
            return ar_loss(logits, batch.labels)
        generator = torch.Generator().manual_seed(noise_seed(self.config.seed, step, global_index))
        noised = mask_for_diffusion(
            batch.input_ids,
            batch.mask_locations,
            self.model_config.mask_token_id,
            generator,
            self.config.mask_strategy,
            self.config.noise_eps,
        )
        copies = noised.copies
        with autocast:
            logits = self.module(
                noised.input_ids,
                batch.attention_mask.repeat(copies, 1),  # (copies·B, L)
                batch.position_ids.repeat(1, copies, 1),  # (3, copies·B, L)
                batch.pixel_values,
                batch.image_grid_thw,
                False,
                copies,
            )
        return diffusion_loss(logits, noised, self.config.loss_weighting)

    # --------------------------------------------------------------------------------------------------- loop

    def zero_pad_row_grad(self) -> None:
        """The authors' embedding has padding_idx = <|endoftext|>: its row never gets a gradient."""
        if self.pad_row is None:
            return
        grad = self.model.model.embed_tokens.weight.grad
        if grad is None:
            return
        if hasattr(grad, "to_local"):  # an FSDP2 DTensor sharded on dim 0 in torch.chunk pieces
            local = grad.to_local()
            rows = self.model_config.vocab_size
            chunk = -(-rows // self.dist.world_size)
            start = self.dist.rank * chunk
            if start <= self.pad_row < start + local.shape[0]:
                local[self.pad_row - start].zero_()
        else:
            grad[self.pad_row].zero_()

    def _clip(self) -> float:
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics (the ``metrics.jsonl`` line).

        loss: mean over the step's micro-batches (all ranks) of their token-mean loss; lr: the rate used; grad_norm:
        the total norm before clipping; tokens_per_s / samples_per_s: real (unpadded) tokens and samples of the
        whole step (all ranks, dual copies counted once) over the step's wall time, data preparation included.
        """
        config = self.config
        started = time.perf_counter()
        accumulation = config.gradient_accumulation_steps
        lr = config.lr * linear_schedule(self.step, config.num_warmup_steps, config.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._skipped_now = 0
        loss_sum = 0.0
        tokens = samples = 0
        for micro in range(accumulation):
            global_index = micro * self.dist.world_size + self.dist.rank
            batch = self.micro_batch(self.position, global_index)
            weight = 1.0
            if batch is None:
                # Every rank must run the same forward/backward: run a batch seen before at weight 0. It counts
                # as a zero in the step's mean (and AdamW still steps, on its momentum, if the step had nothing else).
                if self._fallback is None:
                    self._fallback = self.stand_in_batch()
                batch, weight = self._fallback, 0.0
            else:
                self._fallback = batch
                tokens += batch.num_tokens
                samples += batch.num_samples
            sync = micro == accumulation - 1 or not isinstance(self.module, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else self.module.no_sync():
                loss = self.micro_batch_loss(batch, self.step, global_index) * weight
                if not loss.requires_grad:
                    raise RuntimeError(
                        f"the {config.stage} stage's loss does not depend on any trained parameter in this "
                        "micro-batch (the align stage trains only the projector: every sample needs an image)"
                    )
                (loss / accumulation).backward()
            loss_sum += float(loss.detach())
        self.zero_pad_row_grad()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, tokens, samples, skipped_now = self.dist.all_reduce(
            [loss_sum, float(tokens), float(samples), float(self._skipped_now)]
        )
        self.step += 1
        self.position += self.global_batch
        self.skipped += int(skipped_now)
        elapsed = time.perf_counter() - started
        return {
            "step": self.step,
            "loss": loss_total / (accumulation * self.dist.world_size),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "samples": int(samples),
            "epoch": self.position / len(self.dataset),
            "skipped_records": self.skipped,
            "step_time_s": elapsed,
        }

    def request_stop(self) -> None:
        """Checkpoint and return at the end of the current step (what SIGTERM does)."""
        self.stop.requested = True

    def train(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run until ``max_steps`` (or step ``stop_after``, or SIGTERM); checkpoint at the end.

        Returns the metrics of the steps run by this call (they are also appended to ``metrics.jsonl``).
        """
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main and self.skipped:
            logger.warning("%d bad records skipped while reading %s", self.skipped, config.train_file)
        history: list[dict[str, Any]] = []
        bar = None
        if config.progress_bar and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=config.max_steps, initial=self.step, desc=f"train {config.stage}", unit="step")
        if self.dist.is_main:
            self._prepare_output_dir()
        self.dist.barrier()
        self.module.train()
        with sigterm_to(self.stop):
            while self.step < config.max_steps:
                metrics = self.train_step()
                history.append(metrics)
                if self.dist.is_main:
                    self._log_metrics(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.1f}")
                stop = self.dist.all_reduce([1.0 if self.stop.requested else 0.0], op="max")[0] > 0
                done = self.step >= config.max_steps or (stop_after is not None and self.step >= stop_after)
                if stop or done or (config.save_steps and self.step % config.save_steps == 0):
                    self.save()
                if stop or done:
                    break
        if bar is not None:
            bar.close()
        if self._saved_step != self.step:
            self.save()
        if self.stop.signal is not None and self.dist.is_main:
            logger.warning(
                "stopped by signal %d at step %d; rerun the same command to resume", self.stop.signal, self.step
            )
        return history

    # -------------------------------------------------------------------------------------------- persistence

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def _prepare_output_dir(self) -> None:
        """Rank 0, before the first step: delete what overwrite_output_dir allowed to replace (checked in
        __init__), then bring metrics.jsonl back to the resume point."""
        if self._stale_checkpoints:
            for path in self._stale_checkpoints:
                if path.is_dir():
                    shutil.rmtree(path)
            logger.warning("overwrite_output_dir: deleted %s", ", ".join(path.name for path in self._stale_checkpoints))
        fresh = self.resume_dir is None or self.resume_dir.resolve().parent != self.output_dir.resolve()
        self._truncate_metrics(-1 if fresh else self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (they were run after the checkpoint we resume from).

        A torn last line (a write cut short by a crash or a full disk) is dropped with a warning; a complete line
        that cannot be read is kept as it is, with a warning. The file is replaced atomically."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return
        data = path.read_bytes()
        *complete, tail = data.split(b"\n")
        kept: list[bytes] = []
        dropped = unreadable = 0
        for raw in complete:
            found = _metrics_step(raw)
            if found is None:
                if raw.strip():
                    kept.append(raw)
                    unreadable += 1
            elif found <= step:
                kept.append(raw)
            else:
                dropped += 1
        if tail.strip():
            found = _metrics_step(tail)
            if found is None:
                logger.warning("%s: dropped a torn last line (%r)", path, tail[:120])
            elif found <= step:
                kept.append(tail)
            else:
                dropped += 1
        if unreadable:
            logger.warning("%s: kept %d line(s) that are not metrics records as they are", path, unreadable)
        if dropped:
            logger.warning("%s: dropped %d line(s) of steps after step %d", path, dropped, max(step, 0))
        new = b"".join(line + b"\n" for line in kept)
        if new != data:
            temporary = path.with_name(f".{METRICS_FILE}.tmp")
            temporary.write_bytes(new)
            os.replace(temporary, path)

    def _full_states(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """The unsharded model and optimizer states under checkpoint names (on rank 0; collective for FSDP)."""
        if not self._fsdp:
            if not self.dist.is_main:
                return None, None
            # The optimizer keys its state by position in its parameter list, which is trainable_names' order.
            names = self.trainable_names
            return dict(self.model.state_dict()), _rename_optimizer_state(
                self.optimizer.state_dict(), names.__getitem__
            )
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.module, options=options)
        optim_state = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        if not self.dist.is_main:  # with cpu_offload, the full states are gathered on rank 0 only
            return None, None
        strip = len("dimple.")
        model_state = {name[strip:]: tensor for name, tensor in model_state.items()}
        return model_state, _rename_optimizer_state(optim_state, lambda name: name[strip:])

    def save(self) -> Path:
        """Write ``checkpoint-<step>`` (collective: every rank calls it)."""
        model_state, optim_state = self._full_states()
        trainer_state = {
            "step": self.step,
            "position": self.position,
            "skipped_records": self.skipped,
            "global_batch": self.global_batch,
            "world_size": self.dist.world_size,
            "stage": self.config.stage,
            "scheduler": {
                "kind": "linear",
                "warmup_steps": self.config.num_warmup_steps,
                "total_steps": self.config.max_steps,
                "next_step": self.step,
                "peak_lr": self.config.lr,
            },
            "config": self.config.to_dict(),
        }
        path = ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            rank=self.dist.rank,
            barrier=self.dist.barrier,
            source_dir=self.source_dir,
            config_updates={"full_attn_mask": self.config.stage == "diffusion"},
            model_state=model_state,
            optimizer_state=optim_state,
            trainer_state=trainer_state,
            max_shard_bytes=self.config.max_shard_bytes,
        )
        if self.dist.is_main:
            ckpt.prune_checkpoints(self.output_dir, self.config.keep_last, self.step)
        self.dist.barrier()
        self._saved_step = self.step
        return path

    def close(self) -> None:
        if self.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _metrics_step(line: bytes) -> int | None:
    """The step of a metrics.jsonl line, or None when the line is not a metrics record."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _rename_optimizer_state(state: dict[str, Any], rename: Callable[[Any], Any]) -> dict[str, Any]:
    """An optimizer state dict with every parameter key (in ``state`` and the groups' ``params``) renamed."""
    return {
        "state": {rename(key): value for key, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [rename(key) for key in group["params"]]} for group in state["param_groups"]
        ],
    }


def run(config: TrainConfig) -> list[dict[str, Any]]:
    """Train with ``config`` (single process, or one rank under torchrun) and return this rank's step metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
