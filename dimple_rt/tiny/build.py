# SPDX-License-Identifier: Apache-2.0
"""Rebuild dimple-tiny end to end: data, tokenizer, initial model, AR → diffusion training, the pure-diffusion
baseline, and the shipped copy under ``dimple_rt/assets/dimple-tiny``.

    python -m dimple_rt.tiny.build --work runs/dimple-tiny            # everything, then ship
    python -m dimple_rt.tiny.build --work runs/dimple-tiny --part main --no-ship

The recipe is Dimple's (spec §6.6) at small scale: the ViT is random and frozen (there is no pre-trained one to
start from), ``instruct`` trains projector + decoder autoregressively, ``diffusion`` continues the same weights
with the masked-diffusion loss. The baseline runs ``diffusion`` from the initial model for as many samples as
``instruct`` + ``diffusion``; ``diffusion_more`` then continues the diffusion phase (fresh warmup and decay), and
``diffusion_canvas`` ends it with answers padded up to the 48-token canvas of the report (``uniform`` padding):
the shipped model. The stage configs are the JSON files next to this module; this script only fills in the
paths. Each stage resumes from its newest checkpoint, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dimple_rt.config import DimpleConfig
from dimple_rt.io import write_json
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.processor import ImageProcessor
from dimple_rt.testing.tiny_checkpoint import TinySizes, tiny_config
from dimple_rt.weights import SINGLE_NAME, save_state_dict

from . import tasks
from .tokenizer import write_tokenizer

HERE = Path(__file__).resolve().parent
ASSET_DIR = HERE.parent / "assets" / "dimple-tiny"
SIZES = TinySizes(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=64,
    vision_num_heads=2,
    vision_intermediate_size=128,
    min_pixels=56 * 56,
    max_pixels=tasks.IMAGE_SIZE * tasks.IMAGE_SIZE,
)
SPLIT_SIZES = {"train": 50000, "validation": 300, "test": 600}
VOCAB_SIZE = 1024


def init_state_dict(config: DimpleConfig, seed: int) -> dict[str, torch.Tensor]:
    """The authors' init (spec §6.1) for decoder and projector: normal(0, 0.02) weights, zero biases, unit norms.

    The vision tower differs, because it stays frozen at its random init (Dimple starts from Qwen2.5-VL's trained
    ViT; there is none to start from here): with std 0.02 its outputs are a large shared offset plus a variation
    of about 0.02 per dimension, which the decoder barely picks up. A fan-in-scaled normal, 1/sqrt(fan_in), keeps
    the patch information at unit scale (a linear probe on either reads colour and kind per cell perfectly).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DimpleModel(config)
    state = {}
    for name, param in model.state_dict().items():
        if "norm" in name or "ln_q" in name:
            state[name] = torch.ones(param.shape)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(param.shape)
        elif name.startswith("visual."):
            fan_in = param[0].numel()
            state[name] = torch.randn(param.shape, generator=generator) / fan_in**0.5
        else:
            state[name] = torch.randn(param.shape, generator=generator) * 0.02
    return state


def prepare(work: Path, seed: int = 0) -> Path:
    """Write the splits, the tokenizer and the initial checkpoint (``work/init``); skip what exists."""
    data = work / "data"
    for split, count in SPLIT_SIZES.items():
        if not (data / f"{split}.jsonl").is_file():
            tasks.write_split(data, split, count)
    init = work / "init"
    if not (init / SINGLE_NAME).is_file():
        ids = write_tokenizer(init, tasks.corpus_texts(), VOCAB_SIZE)
        vocab = json.loads((init / "vocab.json").read_text(encoding="utf-8"))
        vocab_size = max(max(vocab.values()), max(ids.values())) + 1
        config = tiny_config(ids, vocab_size, SIZES)
        config.max_position_embeddings = 1024
        # At head_dim 32 with M-RoPE sections [4, 6, 6], Dream's theta 1e6 turns the w section by at most 1.8e-4
        # rad per grid step: under bidirectional attention the 3x3 cells are then nearly indistinguishable by
        # position (Qwen2-VL's trained ViT adds position to its features; our frozen random one does not).
        # theta 10 turns it by 0.12-0.24 rad (benchmarks/REPRODUCTION.md has the comparison).
        config.rope_theta = 10.0
        write_json(init / "config.json", config.to_dict())
        ImageProcessor(min_pixels=SIZES.min_pixels, max_pixels=SIZES.max_pixels).save(init)
        state = init_state_dict(config, seed)
        save_state_dict(state, init)
        save_state_dict(standardize_vision_output(init, state), init)
    return init


def standardize_vision_output(init: Path, state: dict[str, torch.Tensor], images: int = 300) -> dict[str, torch.Tensor]:
    """Rescale the frozen random ViT's last layer so its outputs have zero mean and unit variance per dimension
    on training pictures (a data-dependent init, like feature standardisation).

    Why: the white background makes every vision token share a large offset (norm ~6.6 against a variation of
    ~0.2 per dimension); centred and scaled features reach the decoder at the scale of its embeddings.
    """
    from dimple_rt import Runtime

    rt = Runtime(init, backend="reference")
    outputs = []
    for example in tasks.examples("train", images):
        if example.has_image:
            processed = rt.processor([example.image()])
            with torch.no_grad():
                outputs.append(rt.model.visual(processed.pixel_values, processed.image_grid_thw, rt.backend.attention))
    features = torch.cat(outputs)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    state = dict(state)
    state["visual.merger.mlp.2.weight"] = state["visual.merger.mlp.2.weight"] / std[:, None]
    state["visual.merger.mlp.2.bias"] = (state["visual.merger.mlp.2.bias"] - mean) / std
    return state


def train_stage(config_name: str, init: Path, train_file: Path, output_dir: Path, **overrides: object) -> Path:
    """Run one stage from ``dimple_rt/tiny/<config_name>`` (resuming if it was interrupted); return its final
    checkpoint."""
    from dimple_rt.training.checkpoint import latest_checkpoint
    from dimple_rt.training.config import TrainConfig
    from dimple_rt.training.trainer import run

    data = json.loads((HERE / config_name).read_text(encoding="utf-8"))
    data.update(init_model=str(init), train_file=str(train_file), output_dir=str(output_dir), **overrides)
    config = TrainConfig.from_dict(data)
    done = latest_checkpoint(output_dir)
    if done is not None and done.name == f"checkpoint-{config.max_steps}":
        return done
    start = time.perf_counter()
    run(config)
    elapsed = time.perf_counter() - start
    final = latest_checkpoint(output_dir)
    assert final is not None
    timing = output_dir / "timing.json"
    previous = json.loads(timing.read_text()) if timing.is_file() else {"seconds": 0.0}
    write_json(timing, {"seconds": previous["seconds"] + elapsed})
    return final


def ship(checkpoint: Path, target: Path = ASSET_DIR) -> Path:
    """Copy a checkpoint's model files (not its training state) into ``target``, atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file():
            shutil.copyfile(path, tmp / path.name)
            os.chmod(tmp / path.name, 0o644)  # checkpoint files are written 0600; a shipped model is world-readable
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/dimple-tiny", help="folder for data, runs and checkpoints")
    parser.add_argument(
        "--part",
        default="all",
        choices=["all", "main", "baseline"],
        help="main: AR → diffusion (and ship); baseline: pure diffusion; all: both, one after the other",
    )
    parser.add_argument("--no-ship", action="store_true", help="do not copy the model into dimple_rt/assets")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    init = prepare(work)  # both parts may start at once: the data and init are written before either trains
    train_file = work / "data" / "train.jsonl"
    if args.part in ("all", "main"):
        ar = train_stage("instruct.json", init, train_file, work / "instruct")
        diffusion = train_stage("diffusion.json", ar, train_file, work / "diffusion")
        # A second diffusion stage (a fresh warmup and decay) from the first's end. The first stage's end
        # (instruct + diffusion = the baseline's budget) is the length-bias comparison's AR arm.
        more = train_stage("diffusion_more.json", diffusion, train_file, work / "diffusion-more")
        # The shipped model: dynamic padding shows a 2-token answer at most 2 pads, and on a 48-token canvas it
        # then does not end; this last stage pads answers up to 48 tokens.
        final = train_stage("diffusion_canvas.json", more, train_file, work / "diffusion-canvas")
        if not args.no_ship:
            print(f"shipped {ship(final)}")
    if args.part in ("all", "baseline"):
        train_stage("baseline.json", init, train_file, work / "baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
