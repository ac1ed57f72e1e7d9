# SPDX-License-Identifier: Apache-2.0
"""masked_attention's CUDA kernels where the pipelined split-KV code has edges, against dimple_rt.reference.

The kernels (csrc/cuda/kernels/masked_attention.cuh) stream key tiles of 64 (bf16/fp16) or 32 (fp32) keys
through a cp.async ring, deal a row tile's key tiles to ``num_splits`` blocks in runs of ceil(tiles / splits)
and merge the splits' (output, log-sum-exp) pairs. ``DIMPLE_RT_ATTENTION_SPLITS=n`` forces n splits, so the
cases below reach split boundaries, splits whose keys are all masked, splits past the end (empty) and rows with
no visible key on any GPU; ``None`` leaves the choice to the heuristic (SM count x occupancy).

Tolerances: test_masked_attention._assert_matches_reference, the CPU tests' rule. fp32: assert_close with
atol = rtol = 1e-5 (the split merge adds a few fp32 roundings per output, far below that). bf16/fp16: the
kernel's max error against the fp32 reference on the same (rounded) inputs is at most twice the low-precision
reference's own rounding error + 1e-5, and within the dtype's atol/rtol (2e-2 / 2e-3): partial outputs are
kept in fp32 and rounded once, after the merge. Skipped where there is no GPU or no CUDA kernels were built.
"""

from __future__ import annotations

import pytest
import test_masked_attention as tma
import torch
from _cuda import CUDA_ONLY, DEVICE

from dimple_rt import ops

pytestmark = CUDA_ONLY
SPLITS_ENV = "DIMPLE_RT_ATTENTION_SPLITS"
DTYPES = tma.DTYPES


def _tile(dtype: torch.dtype) -> int:
    """Keys per pipeline step of the kernel that runs this dtype (the unit of a split's run of keys)."""
    return 32 if dtype == torch.float32 else 64


def _run_keys(total_keys: int, splits: int, dtype: torch.dtype) -> int:
    """Keys per split for a row tile that sees all total_keys: ceil(tiles / splits) tiles."""
    tiles = -(-total_keys // _tile(dtype))
    return -(-tiles // splits) * _tile(dtype)


@pytest.fixture
def force_splits(monkeypatch: pytest.MonkeyPatch):
    """``force_splits(n)`` sets the split override for this test; ``force_splits(None)`` removes it."""

    def force(n: int | None) -> None:
        if n is None:
            monkeypatch.delenv(SPLITS_ENV, raising=False)
        else:
            monkeypatch.setenv(SPLITS_ENV, str(n))

    return force


def _inputs(batch: int, q_len: int, prefix_len: int, heads: int, kv_heads: int, head_dim: int, dtype, **kw) -> dict:
    return {
        k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
        for k, v in tma._attention_inputs(batch, q_len, prefix_len, heads, kv_heads, head_dim, dtype, **kw).items()
    }


def _check(args: dict, tol: dict) -> torch.Tensor:
    out = ops.masked_attention(**args)
    assert out.device.type == "cuda"
    tma._assert_matches_reference(out, args, tol)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 1, 2, 3, 7])
@pytest.mark.parametrize("prefix_len", [31, 32, 33, 63, 64, 65, 127, 128, 129, 191, 192, 193])
def test_split_boundaries(prefix_len: int, splits: int | None, dtype: torch.dtype, force_splits, tol) -> None:
    """Key counts around tile and run multiples (prefix + 32 queries), GQA 7:1, left-padded keys: every split
    boundary falls inside, at the start or at the end of a tile; 7 splits of few tiles leave empty splits."""
    force_splits(splits)
    args = _inputs(2, 32, prefix_len, 28, 4, 128, dtype)
    args["key_mask"] = tma._left_padding(2, prefix_len + 32).to(DEVICE)
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 5])
@pytest.mark.parametrize(
    "shape",
    [(1, 32, 2048), (1, 64, 2048), (1, 256, 2048), (8, 32, 600), (2, 65, 1000), (4, 64, 256)],
    ids=lambda s: "b{}_canvas{}_prefix{}".format(*s),
)
def test_dimple7b_decode_shapes(shape: tuple, splits: int | None, dtype: torch.dtype, force_splits, tol) -> None:
    """Dimple-7B decode (28/4 heads, head_dim 128): canvases 32-256 over 256-2048 prefix keys, batch 1-8,
    left-padded sequences; the heuristic's split count and a forced one."""
    batch, canvas, prefix_len = shape
    force_splits(splits)
    args = _inputs(batch, canvas, prefix_len, 28, 4, 128, dtype)
    args["key_mask"] = tma._left_padding(batch, prefix_len + canvas).to(DEVICE)
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_split_whose_keys_are_all_masked(causal: bool, dtype: torch.dtype, force_splits, tol) -> None:
    """4 forced splits over 512 prefix + 64 current keys: every key of split 1 is masked out (its log-sum-exp
    is -inf and must weigh nothing), the last split is past the end for the 64-key tiles (empty); sequence 1
    is left-padded into its queries (its first 5 queries see only themselves, or nothing when causal)."""
    batch, q_len, prefix_len = 2, 64, 512
    total = prefix_len + q_len
    run = _run_keys(total, 4, dtype)
    key_mask = torch.ones(batch, total, dtype=torch.bool)
    key_mask[:, run : 2 * run] = False
    key_mask[1, : prefix_len + 5] = False
    force_splits(4)
    args = _inputs(batch, q_len, prefix_len, 28, 4, 128, dtype)
    args.update(key_mask=key_mask.to(DEVICE), causal=causal)
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_fully_masked_rows_are_zero_with_splits(splits: int | None, dtype: torch.dtype, force_splits) -> None:
    """Causal + key mask: sequence 1's queries 0-19 are padding, so they see no key at all (every split's
    log-sum-exp is -inf): zeros, not NaN; the merge must not divide by zero."""
    batch, q_len, prefix_len = 2, 40, 300
    key_mask = torch.ones(batch, prefix_len + q_len, dtype=torch.bool, device=DEVICE)
    key_mask[1, : prefix_len + 20] = False
    force_splits(splits)
    args = _inputs(batch, q_len, prefix_len, 8, 2, 64, dtype)
    out = ops.masked_attention(**args, key_mask=key_mask, causal=True)
    assert not out.isnan().any()
    assert torch.equal(out[1, :20], torch.zeros_like(out[1, :20]))
    assert out[1, 20:].abs().sum() > 0 and out[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 2, 5])
def test_split_causal_prefix(splits: int | None, dtype: torch.dtype, force_splits, tol) -> None:
    """Causal over a 700-key prefix: each row tile's key range ends at its own last query, so the split runs
    differ per row tile (the later tiles' last split holds the diagonal)."""
    force_splits(splits)
    args = _inputs(1, 150, 700, 28, 4, 128, dtype)
    args["causal"] = True
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("splits", [None, 3])
def test_split_cu_seqlens(splits: int | None, causal: bool, dtype: torch.dtype, force_splits, tol) -> None:
    """Varlen segments (the vision tower's head_dim 80) long enough to split: an empty segment, a one-token one,
    a segment boundary inside a key tile."""
    force_splits(splits)
    args = _inputs(1, 300, 0, 4, 4, 80, dtype)
    cu = torch.tensor([0, 100, 100, 230, 231, 300], dtype=torch.int32, device=DEVICE)
    args.update(cu_seqlens=cu, causal=causal)
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["bidirectional", "padded"])
@pytest.mark.parametrize("splits", [None, 2, 6])
def test_split_suffix(splits: int | None, padded: bool, dtype: torch.dtype, force_splits, tol) -> None:
    """[prefix 400 ‖ current 32 ‖ suffix 200] (the dual cache): split runs that cross the prefix/current and
    current/suffix borders; padded: left padding and two padded suffix keys."""
    batch, q_len, prefix_len, suffix_len = 2, 32, 400, 200
    force_splits(splits)
    args = _inputs(batch, q_len, prefix_len, 28, 4, 128, dtype, suffix_len=suffix_len)
    if padded:
        args["key_mask"] = tma._suffix_mask(batch, prefix_len, q_len, suffix_len).to(DEVICE)
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 3])
def test_split_non_contiguous(splits: int | None, dtype: torch.dtype, force_splits, tol) -> None:
    """Sliced heads/channels, a transposed k, a channel stride of 2 (the element-load path), a 650-key prefix cut
    from a longer cache (the cp.async path), a strided key mask."""
    batch, q_len, prefix_len, heads, kv_heads, head_dim = 2, 24, 650, 14, 2, 128
    force_splits(splits)
    g = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q = randn(batch, q_len, heads + 2, head_dim + 8)[:, :, 1 : heads + 1, 8:]
    k = randn(batch, kv_heads, q_len, head_dim).transpose(1, 2)
    v = randn(batch, q_len, kv_heads, 2 * head_dim)[..., ::2]
    cache_k, cache_v = randn(batch, 800, kv_heads, head_dim), randn(batch, 800, kv_heads, head_dim)
    mask = torch.ones(batch + 1, 2 * (prefix_len + q_len), dtype=torch.bool, device=DEVICE)
    mask[:, :7] = False
    base = {"q": q, "k": k, "v": v, "prefix_k": cache_k[:, :prefix_len], "prefix_v": cache_v[:, :prefix_len]}
    for extra in ({}, {"key_mask": mask[1:, ::2]}, {"key_mask": mask[1:, ::2], "causal": True}):
        _check({**base, **extra}, tol(dtype))
    # Every segment on the cp.async path: the prefix and the current keys as views of one cache buffer.
    _check(
        {**base, "k": cache_k[:, prefix_len : prefix_len + q_len], "v": cache_v[:, prefix_len : prefix_len + q_len]},
        tol(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("head_dim", [17, 36, 64, 80, 96, 100, 128])
def test_head_dims(head_dim: int, splits: int, dtype: torch.dtype, force_splits, tol) -> None:
    """Every padded head_dim instantiation (64/96/128) and sizes that are no multiple of the 16-byte vectors:
    partial cp.async chunks (zero-filled), element output stores, padded workspace rows in the merge."""
    force_splits(splits)
    args = _inputs(2, 19, 150, 6, 2, head_dim, dtype)
    args["key_mask"] = tma._left_padding(2, 150 + 19).to(DEVICE)
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 2])
def test_partial_vector_chunks(splits: int, dtype: torch.dtype, force_splits, tol) -> None:
    """head_dim 17 sliced from rows of 24: 16-byte aligned rows (the cp.async path) whose last chunk holds 1
    (bf16/fp16) or 1 of 4 (fp32) real elements; the src-size operand must zero-fill the rest."""
    batch, q_len, prefix_len, heads, kv_heads = 2, 21, 140, 6, 2
    force_splits(splits)
    g = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, 24, generator=g).to(dtype).to(DEVICE)[..., :17]

    args = {
        "q": randn(batch, q_len, heads),
        "k": randn(batch, q_len, kv_heads),
        "v": randn(batch, q_len, kv_heads),
        "prefix_k": randn(batch, prefix_len, kv_heads),
        "prefix_v": randn(batch, prefix_len, kv_heads),
        "key_mask": tma._left_padding(batch, prefix_len + q_len).to(DEVICE),
    }
    _check(args, tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [None, 2])
@pytest.mark.parametrize("shape", [(70_000, 2, 1), (1, 66_000, 66_000)], ids=["batch70000", "kv_heads66000"])
def test_grid_beyond_65535(shape: tuple, splits: int | None, dtype: torch.dtype, force_splits, tol) -> None:
    """batch · kv_heads > 65535 is tiled over grid y and z (one block per (batch, kv head) here); with 2 forced
    splits of a single key tile the second split is empty for every block."""
    batch, heads, kv_heads = shape
    force_splits(splits)
    args = _inputs(batch, 1, 0, heads, kv_heads, 16, dtype)
    _check(args, tol(dtype))


@pytest.mark.parametrize("value", ["0", "65", "two", "3x"])
def test_splits_override_rejects_bad_values(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SPLITS_ENV, value)
    args = _inputs(1, 4, 8, 2, 1, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=SPLITS_ENV):
        ops.masked_attention(**args)


def test_forced_splits_equal_unsplit_fp32(force_splits) -> None:
    """The merge is the unsplit softmax up to fp32 rounding: 1, 2, 9 and 64 splits (64: 49 one-tile splits and 15
    empty ones) agree to 1e-6. Expected difference ~1e-7: the fp32 sums of ~1500 terms round differently per
    split (relative error ~sqrt(n)·6e-8 ≈ 2e-6 of a partial sum), and outputs are ~0.05 of those sums' scale."""
    args = _inputs(1, 48, 1500, 28, 4, 128, torch.float32)
    outs = []
    for n in (1, 2, 9, 64):
        force_splits(n)
        outs.append(ops.masked_attention(**args))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-6)
