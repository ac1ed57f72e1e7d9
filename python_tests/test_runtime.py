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
    assert "answer:" in out and "forward passes:" in out
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
