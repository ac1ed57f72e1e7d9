# SPDX-License-Identifier: Apache-2.0
"""The vision tower against transformers' Qwen2.5-VL ViT (the oracle), on tiny random models.

The oracle is ``Qwen2_5_VisionTransformerPretrainedModel`` with the same state dict. Grids cover merged
grids (h/2, w/2) divisible by the 4-token window (Qwen2.5-VL then pads a whole empty window row/column),
not divisible, several images in one call, and a two-frame grid.
"""

from __future__ import annotations

import pytest
import torch
from _transformers_oracle import require_transformers

transformers = require_transformers()
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.vision_utils import (  # noqa: E402
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from dimple_rt import reference  # noqa: E402
from dimple_rt.config import VisionConfig  # noqa: E402
from dimple_rt.model.vision import (  # noqa: E402
    VisionTower,
    image_cu_seqlens,
    vision_rotary_freqs,
    vision_rotary_ids,
    window_index,
)

GRIDS: dict[str, list[tuple[int, int, int]]] = {
    "one_8x12": [(1, 8, 12)],  # merged 4×6: rows divisible by the window, columns not
    "divisible_16x16": [(1, 16, 16)],  # merged 8×8: both divisible, empty padded windows
    "odd_10x14": [(1, 10, 14)],  # merged 5×7: neither divisible
    "several": [(1, 8, 12), (1, 10, 14), (1, 4, 4), (1, 16, 8)],
    "two_frames": [(2, 6, 10)],
}
# Index functions are cheap: also check a wide, tall image and a one-merged-token image.
INDEX_GRIDS: dict[str, list[tuple[int, int, int]]] = {
    **GRIDS,
    "wide_tall": [(1, 2, 40), (1, 34, 2)],
    "tiny": [(1, 2, 2)],
}
# head_dim 16 (small) and 80 (Dimple-7B's); 4 blocks, of which 1 and 3 attend over the whole image.
CONFIGS: dict[str, dict[str, int]] = {
    "head_dim16": {"hidden_size": 64, "num_heads": 4},
    "head_dim80": {"hidden_size": 160, "num_heads": 2},
}
COMMON = {
    "depth": 4,
    "intermediate_size": 96,
    "out_hidden_size": 48,
    "fullatt_block_indexes": [1, 3],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
MERGE, WINDOW, PATCH = 2, 112, 14


def grid_tensor(grid: list[tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(grid, dtype=torch.int64)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights large enough that attention is far from uniform and every term matters.

    Matrices get std 1.5/√fan_in (0.04–0.19 here): each projection scales an RMS-normalised input by ~1.5,
    so the block-0 attention logits have a std of ~2.5 and a softmax entropy of ~3.4 nats against 5.9 for
    uniform rows; the 0.02 of the usual init would make attention nearly uniform and hide ordering bugs.
    A gain of 2 makes the 4-block net chaotic (bf16 errors ~15% of the output scale) and useless for
    tolerances. Norm weights are uniform in [0.5, 1.5], biases std 0.1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(1.5 / fan_in**0.5 * torch.randn(p.shape, generator=gen))


def build_oracle(name: str, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    oracle = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        Qwen2_5_VLVisionConfig(**COMMON, **CONFIGS[name]), attn_implementation=attn_implementation, dtype=dtype
    ).eval()
    assert oracle.config._attn_implementation == attn_implementation
    return oracle


class Models:
    """One random fp32 state dict, loaded into transformers and into our tower at each dtype."""

    def __init__(self, name: str) -> None:
        source = build_oracle(name, torch.float32)
        randomise_(source, seed=1234)
        weights = source.state_dict()
        self.oracle = {dtype: build_oracle(name, dtype) for dtype in (torch.float64, torch.float32, torch.bfloat16)}
        self.oracle_eager = build_oracle(name, torch.float32, "eager")
        self.config = VisionConfig(**COMMON, **CONFIGS[name])
        self.ours = {dtype: VisionTower(self.config).to(dtype).eval() for dtype in self.oracle}
        for model in (*self.oracle.values(), self.oracle_eager, *self.ours.values()):
            assert set(model.state_dict()) == set(weights)
            model.load_state_dict(weights, strict=True)  # copies, casting to the model's dtype


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request: pytest.FixtureRequest) -> Models:
    return Models(request.param)


def pixels(grid: list[tuple[int, int, int]], patch_dim: int, seed: int = 0) -> torch.Tensor:
    n_patch = sum(t * h * w for t, h, w in grid)
    return torch.randn(n_patch, patch_dim, generator=torch.Generator().manual_seed(seed))  # (N_patch, patch_dim)


def oracle_forward(
    oracle: Qwen2_5_VisionTransformerPretrainedModel, x: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        return oracle(hidden_states=x, grid_thw=grid).pooler_output  # (N_patch / 4, out_hidden)


@pytest.mark.parametrize("grid", list(INDEX_GRIDS.values()), ids=list(INDEX_GRIDS))
def test_window_index_matches_transformers(grid: list[tuple[int, int, int]]) -> None:
    g = grid_tensor(grid)
    ours_index, ours_cu = window_index(g, MERGE, WINDOW, PATCH)
    ref_index, ref_cu = get_vision_window_index(g, spatial_merge_size=MERGE, window_size=WINDOW, patch_size=PATCH)
    assert ours_cu.dtype == torch.int32
    assert torch.equal(ours_index, ref_index)
    assert torch.equal(ours_cu, ref_cu)
    assert torch.equal(image_cu_seqlens(g), get_vision_cu_seqlens(g))


def test_window_index_worked_example() -> None:
    # Merged grid 2×6 with 4-token windows: windows [cols 0-3] (8 tokens) and [cols 4-5] (4 tokens); the
    # padded bottom row of windows is empty and dropped by unique_consecutive.
    index, cu = window_index(grid_tensor([(1, 4, 12)]), MERGE, WINDOW, PATCH)
    assert index.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11]
    assert cu.tolist() == [0, 32, 48]


@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("grid", list(INDEX_GRIDS.values()), ids=list(INDEX_GRIDS))
def test_rotary_matches_transformers(grid: list[tuple[int, int, int]], head_dim: int) -> None:
    g = grid_tensor(grid)
    ids = vision_rotary_ids(g, MERGE)
    assert torch.equal(ids, get_vision_position_ids(g, MERGE))
    config = Qwen2_5_VLVisionConfig(**{**COMMON, "hidden_size": 2 * head_dim, "num_heads": 2})
    oracle = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
    cos_ref, sin_ref = oracle.rotary_pos_emb(torch.empty(0), ids)  # (N_patch, head_dim) each
    angles = vision_rotary_freqs(ids, head_dim, max(max(h, w) for _, h, w in grid))
    emb = torch.cat([angles, angles], dim=-1)  # (N_patch, head_dim)
    assert emb.dtype == torch.float32
    # Same products of the same fp32 numbers: bit-identical.
    assert torch.equal(emb.cos(), cos_ref)
    assert torch.equal(emb.sin(), sin_ref)


def test_segments_per_block_match_transformers(models: Models) -> None:
    """Both towers attend over windows in windowed blocks and over whole images in blocks 1 and 3."""
    oracle, ours = models.oracle[torch.float32], models.ours[torch.float32]
    g = grid_tensor(GRIDS["several"])
    x = pixels(GRIDS["several"], models.config.patch_dim)
    seen_ref: list[torch.Tensor] = []
    hooks = [
        blk.attn.register_forward_hook(lambda _m, _a, kw, _o: seen_ref.append(kw["cu_seqlens"]), with_kwargs=True)
        for blk in oracle.blocks
    ]
    try:
        oracle_forward(oracle, x, g)
    finally:
        for h in hooks:
            h.remove()
    seen_ours: list[torch.Tensor] = []

    def recording_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
        seen_ours.append(kw["cu_seqlens"])
        return reference.masked_attention(q, k, v, **kw)

    with torch.no_grad():
        ours(x, g, attention=recording_attention)
    windows, images = window_index(g, MERGE, WINDOW, PATCH)[1], image_cu_seqlens(g)
    assert len(windows) > len(images) + 2  # the grid really has several windows per image
    expected = [images if i in COMMON["fullatt_block_indexes"] else windows for i in range(COMMON["depth"])]
    for got_ours, got_ref, want in zip(seen_ours, seen_ref, expected, strict=True):
        assert torch.equal(got_ours, want)
        assert torch.equal(got_ref.to(torch.int32), want)


def attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Block-diagonal attention in float64 (the reference op takes fp32/bf16/fp16 only); q, k, v: (1, S, H, D)."""
    allowed = reference.attention_allowed(1, q.shape[1], 0, None, cu_seqlens, False, q.device)  # (1, S, S)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5  # (1, H, S, S)
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (1, S, H, D)


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_tower_matches_transformers_fp64(models: Models, grid: list[tuple[int, int, int]], tol) -> None:
    """The maths, free of rounding: both towers in float64 agree to fp32 tolerance.

    Any error of order, index or formula is O(1) here; float64 keeps the legitimate differences (matmul
    instead of conv, one packed attention instead of per-segment calls) at ~1e-13.
    """
    g = grid_tensor(grid)
    x = pixels(grid, models.config.patch_dim).double()
    expected = oracle_forward(models.oracle[torch.float64], x, g)
    with torch.no_grad():
        got = models.ours[torch.float64](x, g, attention=attention_f64)
    assert got.shape == (x.shape[0] // 4, COMMON["out_hidden_size"])
    torch.testing.assert_close(got, expected, **tol(torch.float32))


def max_errors(models: Models, grid: list[tuple[int, int, int]], dtype: torch.dtype) -> tuple[float, float, float]:
    """(our error, transformers' error, output scale) at ``dtype``, both against the float64 oracle."""
    g = grid_tensor(grid)
    x = pixels(grid, models.config.patch_dim, seed=2)
    expected = oracle_forward(models.oracle[torch.float64], x.double(), g)
    with torch.no_grad():
        got = models.ours[dtype](x.to(dtype), g)
    assert got.dtype == dtype
    theirs = oracle_forward(models.oracle[dtype], x.to(dtype), g)
    err_ours = (got.double() - expected).abs().max().item()
    err_ref = (theirs.double() - expected).abs().max().item()
    return err_ours, err_ref, expected.abs().max().item()


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_tower_fp32_error_within_twice_transformers(models: Models, grid: list[tuple[int, int, int]], tol) -> None:
    """Reference backend in fp32, measured against the float64 oracle.

    A 4-block network with peaked attention amplifies fp32 rounding to ~1e-5 of the output scale, beyond
    the one-op fp32 tolerance, so the fp32 run is judged like a kernel: its error may be at most twice that
    of transformers' own fp32 run (the atol, the fp32 table's atol times the output scale, covers the case
    where both are a few ulps).
    """
    err_ours, err_ref, scale = max_errors(models, grid, torch.float32)
    assert err_ours <= 2 * err_ref + tol(torch.float32)["atol"] * scale, f"ours {err_ours:.3g}, hf {err_ref:.3g}"


def test_tower_matches_transformers_eager(models: Models) -> None:
    """Against transformers with eager attention too: our fp32 error is within twice its fp32 error."""
    grid = GRIDS["several"]
    g = grid_tensor(grid)
    x = pixels(grid, models.config.patch_dim, seed=1)
    expected = oracle_forward(models.oracle[torch.float64], x.double(), g)
    eager = oracle_forward(models.oracle_eager, x, g)
    with torch.no_grad():
        got = models.ours[torch.float32](x, g)
    err_eager = (eager.double() - expected).abs().max().item()
    err_ours = (got.double() - expected).abs().max().item()
    assert err_ours <= 2 * err_eager + 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_tower_bf16_error_within_twice_transformers(models: Models, grid: list[tuple[int, int, int]]) -> None:
    """bf16 weights and activations, both measured against the float64 oracle.

    Our tower runs the same ops in the same order with the same bf16 roundings (fp32 RMSNorm variance and
    rotary), except that the reference attention computes in fp32, which can only help. So its error may be
    at most twice transformers' bf16 error; the atol (1% of the output scale, about two bf16 ulps) absorbs
    the case where both errors are a few ulps and their ratio is noise.
    """
    err_ours, err_ref, scale = max_errors(models, grid, torch.bfloat16)
    assert err_ours <= 2 * err_ref + 1e-2 * scale, f"ours {err_ours:.4g}, transformers {err_ref:.4g}, scale {scale:.3g}"


def test_rejects_bad_inputs() -> None:
    tower = VisionTower(VisionConfig(**{**COMMON, **CONFIGS["head_dim16"]}))
    patch_dim = tower.config.patch_dim
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.zeros(10, patch_dim), grid_tensor([(1, 4, 4)]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        tower(torch.zeros(15, patch_dim), grid_tensor([(1, 3, 5)]))
    with pytest.raises(ValueError, match="grid_thw"):
        tower(torch.zeros(16, patch_dim), torch.tensor([1, 4, 4]))
