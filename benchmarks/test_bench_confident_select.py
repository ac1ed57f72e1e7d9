# SPDX-License-Identifier: Apache-2.0
"""confident_select: the fused C++ kernel vs the authors' composite (sampling.sample_tokens, then topk of the
confidences, as their step does) vs dimple_rt.reference, on 64 masked rows over Dimple-7B's 152064-token
vocabulary."""

from __future__ import annotations

import pytest
import torch

from dimple_rt import reference
from dimple_rt.generation.sampling import sample_tokens
from dimple_rt.ops import confident_select

ROWS, VOCAB, N_COMMIT = 64, 152064, 2
# name: (dtype, temperature, top_p, top_k). greedy is the benchmark setting (maskgit_plus, origin confidence).
CONFIGS = {
    "greedy_fp32": (torch.float32, 0.0, None, None),
    "greedy_bf16": (torch.bfloat16, 0.0, None, None),
    "sample_topp_topk_fp32": (torch.float32, 0.8, 0.9, 50),
    "sample_topp_bf16": (torch.bfloat16, 0.8, 0.9, None),  # top-p alone: the nucleus search over candidates
}
IMPLS = ["kernel", "authors", "reference"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_confident_select(config: str, impl: str, timed) -> None:
    dtype, temperature, top_p, top_k = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(ROWS, VOCAB, generator=g) * 3.0).to(dtype)
    row_ids, n = torch.zeros(ROWS, dtype=torch.int64), torch.tensor([N_COMMIT])
    options = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    options["uniforms"] = torch.rand(ROWS, generator=g) if temperature > 0 else None

    def authors() -> tuple[torch.Tensor, torch.Tensor]:
        confidence, x0 = sample_tokens(logits, temperature=temperature, top_p=top_p, top_k=top_k)
        return x0, torch.topk(confidence, N_COMMIT).indices

    fn = {
        "kernel": lambda: confident_select(logits, row_ids, n, **options),
        "authors": authors,
        "reference": lambda: reference.confident_select(logits, row_ids, n, **options),
    }[impl]
    if impl == "kernel":  # correctness before timing (the authors' path samples with its own RNG)
        got, want = fn(), reference.confident_select(logits, row_ids, n, **options)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    elif temperature == 0 and dtype == torch.float32:
        x0, _ = authors()
        assert torch.equal(x0, confident_select(logits, row_ids, n)[0])
    bytes_moved = logits.numel() * logits.element_size()
    timed(
        fn,
        group=f"confident_select {config} {ROWS}x{VOCAB}",
        bytes_moved=bytes_moved,
        rounds=3 if impl != "kernel" else 10,
    )
