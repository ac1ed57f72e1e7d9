# SPDX-License-Identifier: Apache-2.0
"""``sample_tokens`` on fixed bf16 logits (Dimple spec §4.4, §9 item 7).

Expectations are hand-derived or come from the torch primitives the reference calls (softmax, Categorical,
multinomial) applied directly, never from the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from dimple_rt.config import ALG_CONFIDENCE, GenerationConfig
from dimple_rt.generation.sampling import (
    sample_tokens,
    token_confidence,
    top_k_filter,
)

BF16 = torch.bfloat16

# Logits 0.5 and 0.50390625 (one bf16 ulp apart) give the same bf16 probability 0.26171875: the lower id wins.
TIE_ROW = [0.5, 0.50390625, 0.0, 0.0, 0.0]
# softmax of this row renormalised in bf16 sums to 1.0078125, so Categorical's validation rejects it.
BAD_ROW = [3.390625, 0.466796875, 4.0, 0.255859375]
GOOD_ROW = [1.0, 0.0, 2.0, 0.5]
SEEDS = range(20)


def bf16(rows: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=BF16)
    assert t.float().tolist() == rows, "test logits must be exact bf16 values"
    return t


def random_logits(n: int = 6, v: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 3).to(BF16)


def test_greedy_bf16_probability_tie_goes_to_lowest_id() -> None:
    logits = bf16([TIE_ROW])
    assert logits[0, 1] > logits[0, 0]
    assert torch.softmax(logits.float(), -1).argmax().item() == 1  # an fp32 sampler would pick id 1
    probs = torch.softmax(logits, -1)
    assert probs[0, 0].item() == probs[0, 1].item() == 0.26171875
    confidence, x0 = sample_tokens(logits)
    assert x0.tolist() == [0]
    assert confidence.dtype == BF16 and confidence.tolist() == [0.26171875]


def test_confidence_original_vs_filtered() -> None:
    logits = random_logits()
    original = torch.softmax(logits, -1)
    x0_expected = original.max(-1).indices
    conf, x0 = sample_tokens(logits, top_k=1, use_original_confidence=True)
    assert torch.equal(x0, x0_expected)
    assert torch.equal(conf, original.gather(-1, x0_expected[:, None])[:, 0])
    # Without the original distribution, confidence is read from the top-1-filtered one: exactly 1.
    conf, x0 = sample_tokens(logits, top_k=1, use_original_confidence=False)
    assert torch.equal(x0, x0_expected)
    assert conf.tolist() == [1.0] * logits.shape[0]


@pytest.mark.parametrize("top_p", [0.0, 0.01])
def test_small_top_p_keeps_only_the_argmax(top_p: float) -> None:
    logits = random_logits()
    argmax = logits.argmax(-1)
    assert bool((logits.float().sort(-1, descending=True).values.diff(dim=-1)[:, 0] < 0).all()), "no top ties"
    assert bool((torch.softmax(logits, -1).max(-1).values > 0.01).all())
    for seed in SEEDS:
        torch.manual_seed(seed)
        conf, x0 = sample_tokens(logits, temperature=1.0, top_p=top_p, use_original_confidence=False)
        assert torch.equal(x0, argmax)
        assert conf.tolist() == [1.0] * logits.shape[0]


def test_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = bf16([[3.0, 2.0, 2.0, 1.0, 0.0]])
    filtered = top_k_filter(logits, 2)
    low = torch.finfo(BF16).min
    assert filtered.tolist() == [[3.0, 2.0, 2.0, low, low]]
    conf, x0 = sample_tokens(logits, top_k=2, use_original_confidence=False)
    assert x0.tolist() == [0]
    assert torch.equal(conf, torch.softmax(filtered, -1)[:, 0])
    for seed in SEEDS:
        torch.manual_seed(seed)
        _, x0 = sample_tokens(logits, temperature=1.0, top_k=2)
        assert x0.item() in (0, 1, 2)


def test_margin_is_top1_minus_top2() -> None:
    logits = random_logits()
    for original in (True, False):
        probs = torch.softmax(logits, -1) if original else torch.softmax(top_k_filter(logits, 3), -1)
        ranked = probs.sort(-1, descending=True).values
        conf, _ = sample_tokens(logits, top_k=3, margin_confidence=True, use_original_confidence=original)
        assert torch.equal(conf, ranked[:, 0] - ranked[:, 1])
        assert bool((conf >= 0).all())


def test_neg_entropy() -> None:
    logits = random_logits()
    conf, _ = sample_tokens(logits, neg_entropy=True)
    assert bool((conf <= 0).all())
    probs = torch.softmax(logits, -1)
    assert torch.equal(conf, (probs * torch.log(probs + 1e-10)).sum(-1))
    # Uniform over 4 has entropy ln 4; a one-hot distribution (top_k=1, filtered confidence) has exactly 0.
    conf, _ = sample_tokens(bf16([[0.0] * 4]), neg_entropy=True)
    assert conf.float().item() == pytest.approx(-math.log(4), abs=2e-2)
    conf, _ = sample_tokens(logits, top_k=1, neg_entropy=True, use_original_confidence=False)
    assert conf.tolist() == [0.0] * logits.shape[0]
    # neg_entropy wins over margin, as in the reference.
    both, _ = sample_tokens(logits, margin_confidence=True, neg_entropy=True)
    assert torch.equal(both, sample_tokens(logits, neg_entropy=True)[0])


def test_temperature_sampling_matches_a_direct_categorical_draw() -> None:
    logits = random_logits(n=8, v=16, seed=1)
    probs = torch.softmax(logits / 0.7, -1)
    torch.distributions.Categorical(probs=probs)  # precondition: validation passes, so no greedy fallback
    greedy = probs.max(-1).indices
    differs = False
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected = torch.distributions.Categorical(probs=probs).sample()
        torch.manual_seed(seed)
        conf, x0 = sample_tokens(logits, temperature=0.7)
        assert torch.equal(x0, expected)
        assert torch.equal(conf, torch.softmax(logits, -1).gather(-1, expected[:, None])[:, 0])
        conf_g, x0_g = sample_tokens(logits, temperature=0.7, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(x0_g, expected)  # a seeded generator draws what the seeded global RNG draws
        assert torch.equal(conf_g, conf)
        differs |= not torch.equal(x0, greedy)
    assert differs, "the draws must not all be greedy, or this test proves nothing"


def test_categorical_validation_failure_makes_the_whole_call_greedy() -> None:
    logits = bf16([GOOD_ROW, BAD_ROW])
    probs = torch.softmax(logits, -1)
    renormalised_sum = (probs / probs.sum(-1, keepdim=True)).sum(-1)
    assert renormalised_sum.tolist() == [1.0, 1.0078125]  # precondition: only the bad row fails validation
    greedy = probs.max(-1).indices
    assert greedy.tolist() == [2, 2]
    sampled_differs = False
    for seed in SEEDS:
        torch.manual_seed(seed)
        conf, x0 = sample_tokens(logits, temperature=1.0)
        assert torch.equal(x0, greedy)  # the good row is greedy too
        assert torch.equal(conf, probs.gather(-1, greedy[:, None])[:, 0])

        torch.manual_seed(seed)
        expected = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, True)[:, 0]
        torch.manual_seed(seed)
        _, x0 = sample_tokens(logits, temperature=1.0, validate_categorical=False)
        assert torch.equal(x0, expected)
        sampled_differs |= not torch.equal(x0, greedy)
    assert sampled_differs


def test_empty_input() -> None:
    conf, x0 = sample_tokens(torch.zeros(0, 7, dtype=BF16), temperature=1.0, top_p=0.9, top_k=2)
    assert conf.shape == (0,) and x0.shape == (0,) and x0.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_options(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sample_tokens(random_logits(), **kwargs)


def test_alg_confidence_mapping() -> None:
    assert ALG_CONFIDENCE == {
        "origin": "plain",
        "origin-ratio": "plain",
        "autoregressive": "plain",
        "maskgit_plus": "plain",
        "topk_margin": "margin",
        "entropy": "neg_entropy",
    }
    with pytest.raises(ValueError, match="maskgit_plus"):
        GenerationConfig(alg="maskgit")
    with pytest.raises(ValueError, match="confidence kind"):
        token_confidence(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), "bogus")  # type: ignore[arg-type]
