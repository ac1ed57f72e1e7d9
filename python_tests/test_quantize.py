# SPDX-License-Identifier: Apache-2.0
"""quantize="int8": the int8 linear against fp32 on awkward sizes, per-token activation scales, a whole tiny model
loaded quantized (logits and greedy tokens against fp32), the bad combinations, and the memory it saves.

Error bound, reasoned: rounding to a grid of step Δ adds uniform noise of variance Δ²/12. Weights get
Δ_w = absmax(row)/127 per output channel, activations Δ_x = 2·absmax(token)/255 per token. For the output
y = Σ_k w_k x_k the noise Σ_k (δw_k x_k + w_k δx_k) has relative size

    predicted = sqrt(mean_o(Δ_w²)/12 / mean(w²) + mean_t(Δ_x²)/12 / mean(x²))

(≈ 1 % for Gaussian factors of a few hundred inputs). The test allows 1.5x that plus fp32 rounding: a
quantization that were per tensor, 7-bit, or wrongly scaled misses it by a wide margin (the outlier test).
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt.config import DimpleConfig
from dimple_rt.model import layers, quant
from dimple_rt.model.dimple import DimpleModel
from dimple_rt.model.packed import PackedBf16Weight
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint
from dimple_rt.weights import load_state_dict_into

# (leading dims, in_features, out_features): odd widths, one token, the benchmark canvas, a batch
SHAPES = [((1,), 37, 23), ((65,), 37, 23), ((3, 7), 64, 129), ((1,), 896, 17), ((65,), 513, 255), ((2, 33), 31, 1)]


def _predicted(x: torch.Tensor, w: torch.Tensor) -> float:
    """The relative output error that rounding both factors to their 8-bit grids predicts (module docstring)."""
    dw = w.abs().amax(dim=1) / 127  # (out,)
    dx = 2 * x.reshape(-1, x.shape[-1]).abs().amax(dim=1) / 255  # (tokens,)
    return math.sqrt(float((dw**2).mean() / 12 / (w**2).mean() + (dx**2).mean() / 12 / (x**2).mean()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(("lead", "n_in", "n_out"), SHAPES)
def test_int8_linear_within_the_rounding_error_of_fp32(lead: tuple, n_in: int, n_out: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n_in * 1000 + n_out)
    module = layers.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        module.weight.copy_(torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in))
        if bias:
            module.bias.copy_(torch.randn(n_out, generator=g))
    w = module.weight.detach().clone()
    wide = torch.randn(*lead, 2 * n_in, generator=g)
    x = wide[..., ::2]  # non-contiguous, made by slicing a wider tensor
    exact = torch.nn.functional.linear(x.double(), w.double(), None if not bias else module.bias.detach().double())
    no_bias = torch.nn.functional.linear(x.double(), w.double())
    module.quantize_int8()
    out = module(x)
    assert out.shape == (*lead, n_out) and out.dtype == torch.float32
    # The bias is added exactly: the error is that of x @ W.T alone.
    err = float((out.detach().double() - exact).norm() / no_bias.norm())
    assert err <= 1.5 * _predicted(x, w) + 1e-6, err
    # The weight the GEMM used is w rounded to its per-channel grid: at most half a step away.
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((module.weight.dequantize() - w).abs() <= step / 2 + 1e-7).all())


def test_seven_bit_activations_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPUs without VNNI (AVX2) quantize activations to 7 bits (fbgemm's reduce_range): half the resolution, so
    the activation term of the predicted error doubles; the path is run here whatever this CPU has."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(129, 300, generator=g) / math.sqrt(300), torch.randn(65, 300, generator=g)
    module = layers.Linear(300, 129, bias=False)
    with torch.no_grad():
        module.weight.copy_(w)
    module.quantize_int8()
    exact = x.double() @ w.double().T
    monkeypatch.setattr(quant, "reduce_range", lambda: False)
    err8 = _rel(module(x), exact)
    monkeypatch.setattr(quant, "reduce_range", lambda: True)
    err7 = _rel(module(x), exact)
    dw, dx = w.abs().amax(dim=1) / 127, 2 * x.abs().amax(dim=1) / 127
    predicted = math.sqrt(float((dw**2).mean() / 12 / (w**2).mean() + (dx**2).mean() / 12 / (x**2).mean()))
    assert err7 <= 1.5 * predicted, (err7, predicted)
    # Coarser for real (expected sqrt(5/2) ≈ 1.6x when both factors have similar absmax/σ): the option is obeyed.
    assert err7 > 1.25 * err8, (err7, err8)


def test_each_token_has_its_own_scale() -> None:
    """A token 1000x larger than the others (an attention sink) leaves the others' error unchanged: with one
    scale per tensor they would be rounded to a grid 1000x too coarse (relative error ~ 1)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 200, generator=g) / math.sqrt(200)
    x = torch.randn(9, 200, generator=g)
    x[4] *= 1000.0
    module = layers.Linear(200, 96, bias=False)
    with torch.no_grad():
        module.weight.copy_(w)
    module.quantize_int8()
    out = module(x)
    exact = x.double() @ w.double().T
    for t in range(9):
        assert _rel(out[t], exact[t]) <= 1.5 * _predicted(x[t : t + 1], w), t


def test_bf16_activations_come_back_in_bf16() -> None:
    g = torch.Generator().manual_seed(2)
    module = layers.Linear(77, 45, bias=True).bfloat16()
    x = torch.randn(5, 77, generator=g).bfloat16()
    exact = torch.nn.functional.linear(x.double(), module.weight.detach().double(), module.bias.detach().double())
    no_bias = torch.nn.functional.linear(x.double(), module.weight.detach().double())
    w = module.weight.detach().float()
    module.quantize_int8()
    out = module(x)
    assert out.dtype == torch.bfloat16 and module.weight.dtype == torch.bfloat16
    # int8 rounding plus one bf16 rounding of the output (2^-9 relative).
    assert float((out.double() - exact).norm() / no_bias.norm()) <= 1.5 * _predicted(x.float(), w) + 2**-8


def test_quantizing_in_row_chunks_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Int8Weight quantizes a few rows at a time (bounded fp32 temporaries, for 7B's 545 M-entry LM head);
    every row has its own scale, so chunks of 3 rows (the last one short) give the same int8 weight and scales
    as one chunk of everything, and leave the weight they read unchanged (an fp32 row chunk is the weight's own
    memory, and a tied weight lives on in the embedding)."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(40, 37, generator=g) * torch.logspace(-3, 2, 40)[:, None]).to(dtype)
        before = w.clone()
        with monkeypatch.context() as patch:
            whole = quant.Int8Weight(w)
            patch.setattr(quant, "_CHUNK_ELEMENTS", 3 * 37 + 5)
            chunked = quant.Int8Weight(w)
        assert torch.equal(w, before)
        a, b = (torch.ops.quantized.linear_unpack(x.packed)[0] for x in (whole, chunked))
        assert torch.equal(a.int_repr(), b.int_repr())
        assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
        assert torch.equal(whole.dequantize(), chunked.dequantize())


def test_empty_token_dimension() -> None:
    module = layers.Linear(8, 5)
    module.quantize_int8()
    assert module(torch.randn(2, 0, 8)).shape == (2, 0, 5)


def test_quantized_linears_are_inference_only() -> None:
    module = layers.Linear(8, 5)
    module.quantize_int8()
    with pytest.raises(ValueError, match="inference-only"):
        module.train()
    with pytest.raises(ValueError, match="inference-only"):
        module(torch.randn(3, 8, requires_grad=True))
    with torch.no_grad():
        assert module(torch.randn(3, 8, requires_grad=True)).shape == (3, 5)


# Whole model --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _conversation():
    from PIL import Image

    image = Image.new("RGB", (60, 90), (10, 200, 30))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi there"}]}]


def test_whole_model_quantizes_the_decoder_and_lm_head_only(tiny: Path) -> None:
    rt = dimple_rt.Runtime(tiny, quantize="int8")
    names = {n for n, m in rt.model.named_modules() if isinstance(m, layers.Linear)}
    int8 = {n for n, m in rt.model.named_modules() if isinstance(getattr(m, "weight", None), quant.Int8Weight)}
    assert int8 == {n for n in names if n == "lm_head" or n.startswith("model.")}
    assert any(n.startswith("visual.") for n in names - int8)  # the vision tower stays float
    assert not any(n.endswith("proj.weight") and n.startswith("model.") for n, _ in rt.model.named_parameters())
    with pytest.raises(ValueError, match="inference-only"):
        rt.model.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_logits_and_tokens_near_fp32(tiny: Path, dtype: torch.dtype) -> None:
    """Logits of a forward (image + text, two decoder layers) against fp32: the per-layer error is ~1 %, so the
    logits' cosine similarity is > 0.99 (random logits of two unrelated models sit near 0) and their relative
    error < 10 % (measured: cos ≥ 0.998, 2.5-3 %; bf16 without int8: 1.3 %); the argmax of ≥ 90 % of positions
    survives (measured 93-99 %)."""
    fp32 = dimple_rt.Runtime(tiny)
    int8 = dimple_rt.Runtime(tiny, dtype=dtype, quantize="int8")
    inputs = fp32.prepare([_conversation(), "A question without a picture, to pad the first row"])
    exact, ours = fp32.forward(**vars(inputs)).double(), int8.forward(**vars(inputs)).double()
    cos = torch.nn.functional.cosine_similarity(ours.flatten(0, 1), exact.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.99, float(cos.min())
    assert _rel(ours, exact) < 0.1
    same_argmax = (ours.argmax(-1) == exact.argmax(-1)).double().mean()
    assert float(same_argmax) >= 0.9, float(same_argmax)
    # Greedy tokens: a one-step decode commits every position from one forward's argmax. (Over many steps one
    # different commit on this random model's near-flat logits changes all later ones, so that is not compared.)
    prompt_len = fp32.prepare(_conversation()).input_ids.shape[1]
    one_step = {"max_new_tokens": 16, "steps": 1}
    ours_gen, exact_gen = (rt.generate(_conversation(), **one_step) for rt in (int8, fp32))
    same = (ours_gen.sequences[0, prompt_len:] == exact_gen.sequences[0, prompt_len:]).double().mean()
    assert float(same) >= 0.75, float(same)
    assert int8.generate(_conversation(), max_new_tokens=16).sequences.shape == (1, prompt_len + 16)


def test_memory_drops(tiny: Path) -> None:
    """Parameter bytes: every quantized weight goes from 4 bytes (fp32) to 1 byte per entry plus a few bytes
    per output row; nothing else changes."""
    fp32 = dimple_rt.Runtime(tiny)
    int8 = dimple_rt.Runtime(tiny, quantize="int8")
    quantized = [
        m.weight
        for n, m in fp32.model.named_modules()
        if isinstance(m, layers.Linear) and (n == "lm_head" or n[:6] == "model.")
    ]
    entries, rows = sum(w.numel() for w in quantized), sum(w.shape[0] for w in quantized)
    before, after = quant.weight_bytes(fp32.model), quant.weight_bytes(int8.model)
    assert before - after == 4 * entries - (entries + 12 * rows)
    assert sum(p.numel() for p in int8.model.parameters()) == sum(p.numel() for p in fp32.model.parameters()) - entries


def _mapped_files(directory: Path) -> set[str]:
    """The safetensors files of ``directory`` that this process has mapped."""
    files = {str(path.resolve()) for path in directory.glob("*.safetensors")}
    fields = (line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines())
    return {f[5] for f in fields if len(f) == 6} & files


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_quantized_load_lets_the_mapped_float_weights_go(tmp_path: Path) -> None:
    """bf16 stored and loaded as bf16: without quantization the weights are the files' mapped pages; with
    int8 each file's linears are quantized as it is read and everything else copied out of it, so no file
    stays mapped (nothing refers to the bf16 pages: Dimple-7B's 15.5 GiB leave the RSS), and the model is
    the one quantize_model makes after a plain load, to the bit."""
    path = write_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=60_000)
    assert len(list(path.glob("*.safetensors"))) >= 4
    plain = _zero_copy_model(path)
    assert _mapped_files(path)  # the control: zero-copy loading keeps them
    del plain
    gc.collect()
    assert not _mapped_files(path)
    int8 = dimple_rt.Runtime(path, dtype=torch.bfloat16, quantize="int8")
    assert not _mapped_files(path)
    after = dimple_rt.Runtime(path, dtype=torch.bfloat16)
    after.model = _zero_copy_model(path)
    quant.quantize_model(after.model, "int8")
    assert quant.weight_bytes(after.model) == quant.weight_bytes(int8.model)
    inputs = int8.prepare(_conversation())
    assert torch.equal(int8.forward(**vars(inputs)), after.forward(**vars(inputs)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.skipif(not layers.cpu_has_bf16_gemm(), reason="no native bf16 GEMM: a bf16 Runtime does not pack here")
def test_packed_bf16_load_lets_the_mapped_weights_go(tmp_path: Path) -> None:
    """A bf16 Runtime on a CPU with bf16 GEMM packs each file's linears as it is read (model/packed.py) and the
    loader copies the rest out, so no file stays mapped: Dimple-7B's mapped pages do not sit next to the packed
    copies."""
    path = write_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=60_000)
    rt = dimple_rt.Runtime(path, dtype=torch.bfloat16)
    assert not _mapped_files(path)
    assert all(isinstance(module.weight, PackedBf16Weight) for _, module in layers.inference_linears(rt.model))


def _zero_copy_model(path: Path) -> DimpleModel:
    """The model as the loader leaves it, before any inference form: bf16 tensors on the files' pages."""
    config = DimpleConfig.from_json_file(path / "config.json")
    with torch.device("meta"):
        model = DimpleModel(config)
    load_state_dict_into(model, path, dtype=torch.bfloat16)
    return model.eval()


# Bad combinations ---------------------------------------------------------------------------------------------


def test_bad_combinations_name_the_option(tiny: Path) -> None:
    with pytest.raises(ValueError, match="quantize"):
        dimple_rt.Runtime(tiny, quantize="int4")
    with pytest.raises(ValueError, match="quantize"):
        dimple_rt.Runtime(tiny, quantize=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="quantize='int8'.*dtype"):
        dimple_rt.Runtime(tiny, dtype=torch.float16, quantize="int8")
    with pytest.raises(ValueError, match="quantize='int8' is not implemented on 'cuda'"):
        dimple_rt.Runtime(tiny, device="cuda", quantize="int8")
