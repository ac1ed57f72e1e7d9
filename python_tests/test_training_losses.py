# SPDX-License-Identifier: Apache-2.0
"""The AR and diffusion losses against hand computations (spec §6.4-6.5), and the training attention."""

from __future__ import annotations

import math

import pytest
import torch

from dimple_rt.reference import masked_attention
from dimple_rt.training.attention import reference_attention, sdpa_attention
from dimple_rt.training.data import IGNORE_INDEX
from dimple_rt.training.losses import NoisedBatch, ar_loss, diffusion_loss, mask_for_diffusion

MASK_ID = 7
VOCAB = 11


def _hand_ce(logits: torch.Tensor, row: int, position: int, target: int) -> float:
    """-log softmax of the output at position-1 (the shifted convention), in float64."""
    scores = logits[row, position - 1].double()
    return float(torch.logsumexp(scores, 0) - scores[target])


def test_ar_loss_is_the_shifted_token_mean() -> None:
    logits = torch.randn(2, 5, VOCAB, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]]
    )
    expected = [
        _hand_ce(logits, b, p, int(labels[b, p])) for b in range(2) for p in range(1, 5) if labels[b, p] != IGNORE_INDEX
    ]
    got = ar_loss(logits, labels)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), sum(expected) / len(expected), rel_tol=1e-6)
    # bf16 logits are upcast before the CE: the loss is the fp32 loss of the bf16 values.
    assert math.isclose(
        float(ar_loss(logits.bfloat16(), labels)), float(ar_loss(logits.bfloat16().float(), labels)), rel_tol=1e-7
    )


def test_ar_loss_without_labels_is_an_exact_zero_with_a_gradient() -> None:
    logits = torch.randn(2, 4, VOCAB, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 0] = 3  # position 0 has no predictor: it does not count
    loss = ar_loss(logits, labels)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def _maskable(batch: int, length: int) -> torch.Tensor:
    locations = torch.zeros(batch, length, dtype=torch.bool)
    locations[:, length // 4 :] = True
    locations[0, -3:] = False  # a shorter row (right padding)
    return locations


def test_single_masking_is_rand_below_t_within_mask_locations() -> None:
    batch, length, eps = 3, 16, 1e-3
    input_ids = torch.randint(0, MASK_ID, (batch, length), generator=torch.Generator().manual_seed(1))
    locations = _maskable(batch, length)
    noised = mask_for_diffusion(input_ids, locations, MASK_ID, torch.Generator().manual_seed(5), "single", eps)
    # The same draws, in the documented order: t (batch,) then r (batch, len).
    replay = torch.Generator().manual_seed(5)
    t = (1 - eps) * torch.rand(batch, generator=replay) + eps
    r = torch.rand(batch, length, generator=replay)
    assert torch.equal(noised.t, t)
    assert torch.equal(noised.masked, (r < t[:, None]) & locations)
    assert torch.equal(noised.input_ids, torch.where(noised.masked, MASK_ID, input_ids))
    assert torch.equal(noised.targets, input_ids) and noised.copies == 1


def test_masking_statistics_follow_t() -> None:
    batch, length = 64, 2048
    locations = torch.ones(batch, length, dtype=torch.bool)
    locations[:, 0] = False
    noised = mask_for_diffusion(
        torch.zeros(batch, length, dtype=torch.long), locations, MASK_ID, torch.Generator().manual_seed(0)
    )
    assert float(noised.t.min()) >= 1e-3 and float(noised.t.max()) < 1.0
    fraction = noised.masked[:, 1:].float().mean(1)  # (batch,)
    # Binomial(2047, t): the standard deviation of the fraction is at most 0.5/sqrt(2047) ≈ 0.011; 5 sigma.
    assert (fraction - noised.t).abs().max() < 0.06
    assert abs(float(noised.t.mean()) - 0.5) < 0.2  # U[eps, 1) over 64 samples


def test_dual_masking_is_complementary() -> None:
    batch, length = 4, 20
    input_ids = torch.randint(0, MASK_ID, (batch, length), generator=torch.Generator().manual_seed(2))
    locations = _maskable(batch, length)
    noised = mask_for_diffusion(input_ids, locations, MASK_ID, torch.Generator().manual_seed(9), "dual")
    first, second = noised.masked[:batch], noised.masked[batch:]
    assert noised.copies == 2 and noised.input_ids.shape == (2 * batch, length)
    assert torch.equal(first | second, locations) and not bool((first & second).any())
    assert torch.equal(noised.targets, input_ids.repeat(2, 1)) and torch.equal(noised.t[:batch], noised.t[batch:])
    single = mask_for_diffusion(input_ids, locations, MASK_ID, torch.Generator().manual_seed(9), "single")
    assert torch.equal(first, single.masked)  # copy 1 is the single-masking draw


def test_position_zero_cannot_be_maskable() -> None:
    with pytest.raises(ValueError, match="position 0"):
        mask_for_diffusion(
            torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), MASK_ID, torch.Generator()
        )


@pytest.mark.parametrize("weighting", ["none", "inverse_t"])
def test_diffusion_loss_against_a_hand_computation(weighting: str) -> None:
    logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[0, [2, 5]] = True
    masked[1, [1, 2, 3]] = True
    t = torch.tensor([0.25, 0.8])
    noised = NoisedBatch(targets.masked_fill(masked, MASK_ID), masked, targets, t, 1)
    terms = [
        _hand_ce(logits, b, p, int(targets[b, p])) / (float(t[b]) if weighting == "inverse_t" else 1.0)
        for b in range(2)
        for p in range(6)
        if masked[b, p]
    ]
    got = diffusion_loss(logits, noised, weighting)
    assert math.isclose(float(got), sum(terms) / 5, rel_tol=1e-6)  # pooled over the 5 masked tokens


def test_diffusion_loss_with_nothing_masked_is_an_exact_zero() -> None:
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 5))
    noised = NoisedBatch(targets, torch.zeros(2, 5, dtype=torch.bool), targets, torch.tensor([0.001, 0.001]), 1)
    loss = diffusion_loss(logits, noised)
    assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------------- training attention

ATTENTION_CASES = {
    # name: (batch, len, heads, kv_heads, head_dim, padded lengths or None, causal, cu_seqlens)
    "bidirectional_padded_gqa": (2, 7, 4, 2, 16, [7, 4], False, None),
    "causal_padded": (2, 6, 2, 2, 8, [6, 3], True, None),
    "causal_no_padding": (1, 5, 4, 1, 8, None, True, None),
    "block_diagonal": (1, 9, 2, 2, 8, None, False, [0, 4, 9]),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_sdpa_attention_matches_the_reference_with_gradients(case: str) -> None:
    batch, length, heads, kv_heads, dim, lengths, causal, cu = ATTENTION_CASES[case]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads, dim, generator=generator)
    k = torch.randn(batch, length, kv_heads, dim, generator=generator)
    v = torch.randn(batch, length, kv_heads, dim, generator=generator)
    key_mask = None if lengths is None else torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    grad_out = torch.randn(batch, length, heads, dim, generator=generator)
    results = []
    for fn in (masked_attention, sdpa_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, key_mask=key_mask, cu_seqlens=cu_seqlens, causal=causal)
        (out * grad_out).sum().backward()
        results.append((out.detach(), *(x.grad for x in leaves)))
    for expected, got in zip(results[0], results[1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if causal and lengths is not None:
        assert torch.equal(results[1][0][1, lengths[1] :], torch.zeros_like(results[1][0][1, lengths[1] :]))


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
def test_training_attentions_take_the_suffix(padded: bool) -> None:
    """sdpa_attention and reference_attention honour suffix_k/suffix_v ([prefix ‖ current ‖ suffix] keys) like
    the reference, gradients included (also into the suffix), and refuse causal + suffix alike."""
    batch, length, prefix, suffix, heads, kv_heads, dim = 2, 5, 3, 4, 4, 2, 8
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    inputs = [randn(batch, length, heads, dim)] + [
        randn(batch, n, kv_heads, dim) for n in (length, length, prefix, prefix, suffix, suffix)
    ]
    key_mask = None
    if padded:
        key_mask = torch.ones(batch, prefix + length + suffix, dtype=torch.bool)
        key_mask[1, :4] = False  # a padded prefix and a padded query
        key_mask[1, -2:] = False  # padded suffix keys
    grad_out = randn(batch, length, heads, dim)
    results = []
    for fn in (masked_attention, sdpa_attention, reference_attention):
        leaves = [x.clone().requires_grad_() for x in inputs]
        q, k, v, pk, pv, sk, sv = leaves
        out = fn(q, k, v, pk, pv, key_mask, suffix_k=sk, suffix_v=sv)
        (out * grad_out).sum().backward()
        results.append((out.detach(), *(x.grad for x in leaves)))
        with pytest.raises(ValueError, match="causal attention takes no suffix"):
            fn(q, k, v, pk, pv, None, None, True, suffix_k=sk, suffix_v=sv)
    assert results[0][-1].abs().sum() > 0  # the suffix values do receive gradient
    for got in results[1:]:
        for expected, g in zip(results[0], got, strict=True):
            torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5)


def test_every_attention_fn_has_the_contract_signature() -> None:
    """Every AttentionFn (reference, kernels, training sdpa/reference) takes the Protocol's parameters, in order."""
    import inspect

    from dimple_rt import ops, reference
    from dimple_rt.backend import AttentionFn

    want = [(p.name, p.default) for p in inspect.signature(AttentionFn.__call__).parameters.values()][1:]
    for fn in (reference.masked_attention, ops.masked_attention, sdpa_attention, reference_attention):
        got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == want, fn.__qualname__
