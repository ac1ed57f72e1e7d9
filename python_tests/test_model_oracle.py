# SPDX-License-Identifier: Apache-2.0
"""The whole model against transformers, given the same tiny random weights.

Oracles: transformers' Qwen2 decoder (text-only, with an explicit 4-D all-attend mask carrying Dimple's
forced diagonal) and transformers' Qwen2.5-VL vision tower + text model with its own ``get_rope_index``
(images). Dimple's only new piece between them, the SiLU projector, is written out with torch.nn.functional.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _transformers_oracle import require_transformers

transformers = require_transformers()
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLModel  # noqa: E402

from dimple_rt.backend import backend_for  # noqa: E402
from dimple_rt.config import DimpleConfig, VisionConfig  # noqa: E402
from dimple_rt.model.dimple import DimpleModel  # noqa: E402
from dimple_rt.model.rope import get_rope_index  # noqa: E402
from dimple_rt.testing.tiny_checkpoint import random_state_dict  # noqa: E402

VOCAB = 300
IMAGE_PAD, VISION_START, VISION_END, MASK, PAD = 290, 287, 288, 299, 280
GRIDS = [(1, 8, 12), (1, 10, 6)]  # patch grids: one image per row, h/2 and w/2 not multiples of 4
LEFT_PAD = 3


def _config(vision: bool, full_attn_mask: bool = True, out_hidden_size: int = 64) -> DimpleConfig:
    return DimpleConfig(
        model_type="dimple" if vision else "Dream",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        mask_token_id=MASK,
        pad_token_id=PAD,
        image_token_id=IMAGE_PAD,
        video_token_id=291,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        mrope_section=[2, 3, 3],
        full_attn_mask=full_attn_mask,
        vision_config=VisionConfig(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=48,
            fullatt_block_indexes=[1],
            out_hidden_size=out_hidden_size,
        )
        if vision
        else None,
    )


def _ours(config: DimpleConfig, state: dict[str, torch.Tensor]) -> DimpleModel:
    model = DimpleModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _dimple_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Spec §1.7, written independently of the code under test, as the additive (B, 1, L, L) float mask that
    transformers' eager attention adds to the scores (finfo.min, not -inf, so a fully masked row stays finite)."""
    a = attention_mask.bool()
    both = a[:, :, None] & a[:, None, :]
    length = a.shape[1]
    if causal:
        allowed = both & torch.ones(length, length, dtype=torch.bool).tril()
    else:
        allowed = both | torch.eye(length, dtype=torch.bool)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def _text_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 270, (2, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :LEFT_PAD] = 0
    ids[1, :LEFT_PAD] = PAD
    return ids, mask


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_decoder_matches_transformers_qwen2(causal: bool, tol) -> None:
    config = _config(vision=False, full_attn_mask=not causal)
    state = random_state_dict(config, seed=1)
    ours = _ours(config, state)
    oracle = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    missing, unexpected = oracle.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    ids, mask = _text_batch(torch.Generator().manual_seed(0))
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = oracle(
            input_ids=ids, attention_mask={"full_attention": _dimple_mask(mask, causal)}, position_ids=positions
        ).logits
        got = ours(ids, backend_for("reference"), attention_mask=mask).logits
    rows = mask.bool() if causal else torch.ones_like(mask, dtype=torch.bool)  # causal pad rows see nothing
    torch.testing.assert_close(got[rows], expected[rows], **tol(torch.float32))
    if causal:
        assert torch.isfinite(got).all()


def _image_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, each: text, <|vision_start|>, image pads, <|vision_end|>, text; row 1 left padded."""
    rows = []
    for t, h, w in GRIDS:
        n_pad = t * h * w // 4
        before = torch.randint(0, 270, (4,), generator=generator).tolist()
        after = torch.randint(0, 270, (5,), generator=generator).tolist()
        rows.append(before + [VISION_START] + [IMAGE_PAD] * n_pad + [VISION_END] + after)
    length = max(len(r) for r in rows) + LEFT_PAD
    ids = torch.full((2, length), PAD)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = torch.tensor(row)
        mask[b, length - len(row) :] = 1
    grid = torch.tensor(GRIDS)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator)
    return ids, mask, pixel_values, grid


def _qwen25vl_oracle(config: DimpleConfig, state: dict[str, torch.Tensor]) -> Qwen2_5_VLModel:
    vc = config.vision_config
    assert vc is not None
    hf_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": vc.depth,
            "hidden_size": vc.hidden_size,
            "num_heads": vc.num_heads,
            "intermediate_size": vc.intermediate_size,
            "out_hidden_size": vc.out_hidden_size,
            "fullatt_block_indexes": vc.fullatt_block_indexes,
            "window_size": vc.window_size,
        },
        image_token_id=IMAGE_PAD,
        video_token_id=291,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        attn_implementation="eager",
    )
    oracle = Qwen2_5_VLModel(hf_config).eval()
    renamed = {
        ("language_model." + k[len("model.") :] if k.startswith("model.") else k): v
        for k, v in state.items()
        if not k.startswith(("img_projector.", "lm_head."))
    }
    missing, unexpected = oracle.load_state_dict(renamed, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return oracle


def test_rope_index_matches_transformers() -> None:
    config = _config(vision=True)
    oracle = _qwen25vl_oracle(config, random_state_dict(config, seed=2))
    ids, mask, _, grid = _image_batch(torch.Generator().manual_seed(3))
    got, deltas = get_rope_index(ids, config, grid, mask)
    expected, _ = oracle.get_rope_index(ids, (ids == IMAGE_PAD).int(), image_grid_thw=grid, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got[:, valid], expected[:, valid], rtol=0, atol=0)
    assert (got[:, ~valid] == 1).all(), "padded slots keep position 1 (spec §1.6)"
    # Dimple's rope_deltas count the padding in the length (spec §1.6 step 6).
    assert deltas[:, 0].tolist() == [int(got[:, b].max()) + 1 - ids.shape[1] for b in range(2)]


def test_worked_example_positions() -> None:
    """Spec §1.6: 15 text tokens (vision_start at 14), grid (1, 12, 16), then text."""
    config = _config(vision=True)
    ids = torch.tensor([[5] * 14 + [VISION_START] + [IMAGE_PAD] * 48 + [VISION_END, 7]])
    pos, _ = get_rope_index(ids, config, torch.tensor([[1, 12, 16]]))
    assert pos[:, 0, :15].tolist() == [list(range(15))] * 3
    image = pos[:, 0, 15:63]
    assert image[0].unique().tolist() == [15]
    assert image[1].unique().tolist() == list(range(15, 21))
    assert image[2].unique().tolist() == list(range(15, 23))
    assert pos[:, 0, 63].tolist() == [23, 23, 23]


@pytest.mark.parametrize("out_hidden_size", [64, 48], ids=["merger_eq_hidden", "merger_ne_hidden"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dimple_with_images_matches_transformers(dtype: torch.dtype, out_hidden_size: int, tol) -> None:
    """The authors' projector is Linear(out_hidden_size → hidden), SiLU, Linear(hidden → hidden): the merger's
    width may differ from the decoder's."""
    config = _config(vision=True, out_hidden_size=out_hidden_size)
    state = random_state_dict(config, seed=4)
    ours = _ours(config, state)
    oracle = _qwen25vl_oracle(config, state)
    ids, mask, pixel_values, grid = _image_batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        features = oracle.visual(pixel_values, grid_thw=grid).pooler_output  # (tokens, hidden)
        features = F.linear(
            F.silu(F.linear(features, state["img_projector.linear_1.weight"], state["img_projector.linear_1.bias"])),
            state["img_projector.linear_2.weight"],
            state["img_projector.linear_2.bias"],
        )
        embeds = oracle.language_model.embed_tokens(ids).masked_scatter((ids == IMAGE_PAD)[..., None], features)
        positions, _ = get_rope_index(ids, config, grid, mask)
        hidden = oracle.language_model(
            inputs_embeds=embeds,
            attention_mask={"full_attention": _dimple_mask(mask, causal=False)},
            position_ids=positions,
        ).last_hidden_state
        expected = F.linear(hidden, state["lm_head.weight"])

        model = ours.to(dtype)
        backend = backend_for("reference")
        image_features = model.encode_images(pixel_values, grid, backend)
        got = model(ids, backend, attention_mask=mask, image_features=image_features, image_grid_thw=grid).logits
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, **tol(torch.float32))
    else:
        # bf16 end to end through 2 vision blocks and 2 decoder layers: a few bf16 ulps of the O(1) logits.
        err = (got.float() - expected).abs().max().item()
        assert err < 0.1 * expected.abs().max().item(), err


def test_logits_rows_equal_full_lm_head(tol) -> None:
    config = _config(vision=False)
    model = _ours(config, random_state_dict(config, seed=6))
    ids, mask = _text_batch(torch.Generator().manual_seed(7))
    rows = torch.rand(ids.shape, generator=torch.Generator().manual_seed(8)) < 0.4
    backend = backend_for("reference")
    with torch.no_grad():
        full = model(ids, backend, attention_mask=mask).logits
        some = model(ids, backend, attention_mask=mask, logits_rows=rows).logits
    torch.testing.assert_close(some[0], full[rows], **tol(torch.float32))


def test_image_placeholder_count_mismatch_raises() -> None:
    config = _config(vision=True)
    model = _ours(config, random_state_dict(config, seed=9))
    ids, mask, pixel_values, grid = _image_batch(torch.Generator().manual_seed(10))
    backend = backend_for("reference")
    with torch.no_grad():
        features = model.encode_images(pixel_values, grid, backend)
        broken = ids.clone()
        broken[0, (broken[0] == IMAGE_PAD).nonzero()[-1]] = 5  # one placeholder too few
        with pytest.raises(ValueError, match="<\\|image_pad\\|> tokens but the images give"):
            model(broken, backend, attention_mask=mask, image_features=features, image_grid_thw=grid)
