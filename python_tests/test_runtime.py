# SPDX-License-Identifier: Apache-2.0
"""Runtime: loading every checkpoint flavour (single file, sharded, text-only Dream, bf16), dtype/backend
options, ``prepare`` and ``forward`` against the model called directly, and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt import cli
from dimple_rt.backend import backend_for
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _image():
    from PIL import Image

    return Image.new("RGB", (60, 90), (10, 200, 30))


def test_sharded_checkpoint_gives_the_same_logits(tiny: Path, tmp_path: Path) -> None:
    sharded = write_tiny_checkpoint(tmp_path / "sharded", max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = dimple_rt.Runtime(tiny), dimple_rt.Runtime(sharded)
    inputs = a.prepare(
        [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    )
    assert torch.equal(a.forward(**vars(inputs)), b.forward(**vars(inputs)))


def test_forward_equals_the_model_called_directly(tiny: Path) -> None:
    rt = dimple_rt.Runtime(tiny, backend="reference")
    inputs = rt.prepare(["Hello there", "Hi"])
    logits = rt.forward(inputs.input_ids, inputs.attention_mask)
    assert logits.shape == (2, inputs.input_ids.shape[1], rt.config.vocab_size)
    direct = rt.model(inputs.input_ids, backend_for("reference"), attention_mask=inputs.attention_mask).logits
    torch.testing.assert_close(logits, direct, rtol=0, atol=0)


def test_text_only_dream_checkpoint_loads_and_generates(tmp_path: Path) -> None:
    rt = dimple_rt.Runtime(write_tiny_checkpoint(tmp_path / "dream", vision=False))
    assert rt.config.model_type == "Dream" and rt.processor is None
    result = rt.generate("Hello", max_new_tokens=6)
    assert result.num_forward_passes >= 1 and len(result.sequences[0]) == rt.prepare("Hello").input_ids.shape[1] + 6
    with pytest.raises(ValueError, match="no vision tower"):
        rt.prepare([{"role": "user", "content": [{"type": "image", "image": _image()}]}])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_cast_the_weights(tiny: Path, dtype: torch.dtype) -> None:
    rt = dimple_rt.Runtime(tiny, dtype=dtype)
    assert {p.dtype for p in rt.model.parameters()} == {dtype}
    inputs = rt.prepare("Hi")
    logits = rt.forward(inputs.input_ids, inputs.attention_mask)
    assert logits.dtype == dtype and bool(torch.isfinite(logits).all())
    fp32 = dimple_rt.Runtime(tiny).forward(inputs.input_ids, inputs.attention_mask)
    torch.testing.assert_close(logits.float(), fp32, atol=0.1, rtol=0.1)  # a few roundings of O(1) logits


def test_bad_options(tiny: Path) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        dimple_rt.Runtime(tiny, backend="triton")
    with pytest.raises(TypeError, match="dtype must be one of"):
        dimple_rt.Runtime(tiny, dtype=torch.int8)
    rt = dimple_rt.Runtime(tiny)
    inputs = rt.prepare("Hi")
    with pytest.raises(ValueError, match="attention_mask"):
        rt.forward(inputs.input_ids, inputs.attention_mask[:, 1:])
    with pytest.raises(ValueError, match="go together"):
        rt.forward(inputs.input_ids, inputs.attention_mask, pixel_values=torch.zeros(4, 1176))


def test_cli_generate_and_demo(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", str(tiny), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "forward passes:" in out and "stats: " in out and "tokens/s" in out
    assert cli.main(["forward", str(tiny), "--prompt", "Hi"]) == 0
    assert "logits (1," in capsys.readouterr().out
    assert cli.main(["generate", str(tiny / "nowhere")]) == 2
    assert "dimple-rt: error:" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_and_reference_forwards_agree(tiny: Path, dtype: torch.dtype) -> None:
    """One full forward (vision tower with window/full attention, bidirectional decoder with left padding) on
    the C++ kernels vs the plain-torch reference: logits within the dtype's tolerance, and the first denoising
    step's greedy choices equal."""
    kernels = dimple_rt.Runtime(tiny, dtype=dtype, backend="kernels")
    reference = dimple_rt.Runtime(tiny, dtype=dtype, backend="reference")
    conversation = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    inputs = kernels.prepare([conversation, "A longer question without a picture, to pad the first row"])
    ours, ref = kernels.forward(**vars(inputs)).float(), reference.forward(**vars(inputs)).float()
    if dtype == torch.float32:
        # The online softmax reorders sums: 1e-5 relative per reduction, over two decoder and vision layers.
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        one_step = {"max_new_tokens": 8, "steps": 1}
        assert (
            kernels.generate(conversation, **one_step).sequences.tolist()
            == reference.generate(conversation, **one_step).sequences.tolist()
        )
    else:
        # style.md: in bf16 the kernels' error against fp32 may be at most twice the torch reference's error.
        exact = dimple_rt.Runtime(tiny, backend="reference").forward(**vars(inputs))
        assert (ours - exact).abs().max() <= 2 * (ref - exact).abs().max()


def test_stats_are_consistent_and_rows_count_their_own_forwards() -> None:
    """dimple-tiny answers a colour question in one confident step ('stop': it wrote <|endoftext|>) and fills a
    short canvas with a description ('length'); in a batch each row counts the forwards it needed, which are
    what it takes alone (per-sequence decisions), while num_forward_passes is the batch's."""
    from dimple_rt.tiny import tasks

    rt = dimple_rt.Runtime("dimple-tiny")
    found = {
        task: next(e for e in tasks.examples("test", 1000) if e.task == task) for task in ("colour_of_kind", "describe")
    }
    conversations = [tasks.conversation(found["colour_of_kind"]), tasks.conversation(found["describe"])]
    batch = rt.generate(conversations, max_new_tokens=24)
    alone = [rt.generate(conversation, max_new_tokens=24) for conversation in conversations]
    assert [r.finish_reason for r in batch] == ["stop", "length"]
    assert [r.finish_reason for r in alone] == ["stop", "length"]
    assert [r.stats.forward_passes for r in batch] == [r.num_forward_passes for r in alone]
    assert batch[0].stats.forward_passes < batch[1].stats.forward_passes == batch[0].num_forward_passes
    for result in [*batch, *alone]:
        stats = result.stats
        assert stats.forward_passes > 0 and stats.canvas_tokens == 24
        assert stats.answer_tokens == len(result.token_ids)
        assert 0 < stats.vision_seconds and 0 < stats.decode_seconds
        assert stats.total_seconds >= stats.vision_seconds + stats.decode_seconds
        assert stats.seconds_per_forward == pytest.approx(stats.decode_seconds / result.num_forward_passes)
        assert stats.tokens_per_second == pytest.approx(stats.answer_tokens / stats.total_seconds)
        assert f"finish: {result.finish_reason}" in result.summary()
    assert [r.stats.total_seconds for r in batch] == [batch[0].stats.total_seconds] * 2  # a batch shares its time
    text_only = rt.generate("What is 2 plus 3?", max_new_tokens=4)
    assert text_only.stats.vision_seconds == 0.0


def test_finish_reason_of_constructed_canvases(tiny: Path) -> None:
    """A canvas forced to hold a terminator after a word finishes with 'stop'; one forced to hold no
    terminator fills the canvas: 'length' (both decided in one step: nothing is masked)."""
    rt = dimple_rt.Runtime(tiny)
    word = rt.tokenizer.encode(" blue")

    def forcing(ids: list[int]):
        def hook(step, x, logits):
            if step is None:
                x[:, -len(ids) :] = torch.tensor(ids)
            return x

        return hook

    stop = rt.generate(
        "Hi", max_new_tokens=6, tokens_hook=forcing(word + [rt.tokenizer.eos_token_id] * (6 - len(word)))
    )
    length = rt.generate("Hi", max_new_tokens=6, tokens_hook=forcing((word * 6)[:6]))
    assert (stop.finish_reason, stop.token_ids) == ("stop", word)
    assert (length.finish_reason, len(length.token_ids)) == ("length", 6)
    assert stop.stats.forward_passes == length.stats.forward_passes == 1


def test_steps_report_the_committed_positions_and_their_probabilities(tiny: Path) -> None:
    """Each step's positions are exactly the canvas positions that stopped being masks, and each confidence is
    the softmax probability of the committed (greedy: most likely) token in the logits the step decided from."""
    rt = dimple_rt.Runtime(tiny, backend="reference")
    seen: list[torch.Tensor] = []

    def keep(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return logits

    steps = []
    conversation = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]}]
    result = rt.generate(conversation, max_new_tokens=8, threshold=None, logits_hook=keep, on_step=steps.append)
    streamed = list(rt.stream(conversation, max_new_tokens=8, threshold=None, logits_hook=keep))
    mask_id = rt.config.mask_token_id
    before = torch.full((8,), mask_id)
    assert len(steps) == result.num_forward_passes == len(streamed)
    for index, step in enumerate(steps):
        canvas = step.canvas[0]
        filled = ((before == mask_id) & (canvas != mask_id)).nonzero().flatten()
        assert step.positions[:, 0].tolist() == [0] * step.committed
        assert step.positions[:, 1].tolist() == filled.tolist() and step.committed == len(filled)
        # Step 0 computes the whole sequence, later ones (prefilling) the last prompt token and the canvas: either
        # way the canvas is the last 8 columns of the step's shifted logits.
        columns = step.positions[:, 1] + seen[index].shape[1] - 8
        probabilities = torch.softmax(seen[index][0, columns].float(), dim=-1)
        torch.testing.assert_close(step.confidences, probabilities.max(dim=-1).values)
        assert torch.equal(streamed[index].positions, step.positions)
        before = canvas
    assert torch.equal(steps[-1].canvas, result.sequences[:, -8:])


@pytest.mark.parametrize(
    "options",
    [
        {"pipeline": "dream", "threshold": None, "steps": 5},
        {"pipeline": "fast_dllm", "cache": "dual", "block_length": 4},
        {"pipeline": "fast_dllm", "cache": "block", "block_length": 3, "block_start": "threshold"},
        {"pipeline": "fast_dllm", "cache": "dual", "block_length": 4, "block_start": "threshold", "refresh_every": 2},
    ],
)
def test_committed_positions_in_every_pipeline(tiny: Path, options: dict) -> None:
    """Whatever span a step computes (a block, a block starting one position early, the whole canvas), its
    positions are the canvas positions it unmasked, row by row, and each confidence is a probability."""
    rt = dimple_rt.Runtime(tiny)
    steps = list(rt.stream(["Hi", "What colour is it?"], max_new_tokens=10, **options))
    before = torch.full((2, 10), rt.config.mask_token_id)
    for step in steps:
        filled = ((before == rt.config.mask_token_id) & (step.canvas != rt.config.mask_token_id)).nonzero()
        assert step.positions.tolist() == filled.tolist() and step.committed == len(filled)
        assert bool(((step.confidences > 0) & (step.confidences <= 1)).all())
        before = step.canvas
    assert not bool((before == rt.config.mask_token_id).any())
