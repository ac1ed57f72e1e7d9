# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers of the compiled ops (``torch.ops.dimple_rt.*``) and their fake kernels.

The dispatcher picks the CPU or CUDA implementation from the inputs' device; nothing here falls back to
:mod:`dimple_rt.reference`, which holds the executable specification of every op.
"""

from __future__ import annotations

import torch  # first: it loads libtorch, which dimple_rt._C links against without an RPATH

try:
    from dimple_rt import _C
except ImportError as e:
    raise ImportError(
        f"dimple_rt's compiled extension dimple_rt._C could not be loaded ({e}). Build it against the installed "
        "torch: `pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .` in a checkout), "
        "after `pip install torch ninja`."
    ) from e

_ISA_SUPPORTED = {"AVX512": "_is_avx512_supported", "AVX2": "_is_avx2_supported"}
if not getattr(torch.cpu, _ISA_SUPPORTED.get(_C.cpu_capability, ""), lambda: True)():
    raise ImportError(
        f"dimple_rt._C was compiled for {_C.cpu_capability}, which this CPU lacks. Rebuild it here "
        "(`pip install --no-build-isolation .`), or with DIMPLE_RT_CPU_ISA=default for a portable build."
    )

__all__ = ["confident_select", "cpu_capability", "cuda_kernels_built", "kv_cache_write", "masked_attention"]


def cuda_kernels_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels (a CUDA torch and nvcc at build time)."""
    return bool(_C.cuda_kernels_built)


def cpu_capability() -> str:
    """The x86 vector ISA the CPU kernels were compiled for: "AVX512", "AVX2" or "DEFAULT"."""
    return str(_C.cpu_capability)


def _check_one_device(op: str, first: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """ValueError unless every given tensor is on the device of tensors[first] (messages as the C++ checks').

    The fake kernels are also the ops' Meta kernels, and the dispatcher picks the Meta kernel as soon as one
    argument is a meta tensor: without this a mix of real and meta tensors would return uninitialised memory
    or do nothing. (Under FakeTensorMode every fake tensor reports its real device, so tracing is unaffected.)
    """
    device = tensors[first].device  # type: ignore[union-attr]
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, {first} on {device}")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the current tokens over ``[prefix ‖ current ‖ suffix]`` keys, in one pass (online softmax).

    q: (batch, len, heads, head_dim); k, v: (batch, len, kv_heads, head_dim), heads a multiple of kv_heads
    (query head h reads kv head ``h // (heads // kv_heads)``); prefix_k, prefix_v: (batch, prefix_len,
    kv_heads, head_dim) or None, cached keys before the current ones; suffix_k, suffix_v: (batch, suffix_len,
    kv_heads, head_dim) or None, cached keys after them (the dual cache's suffix); key_mask: bool (batch,
    prefix_len + len + suffix_len), True = real token; cu_seqlens: int32 (segments + 1,) block-diagonal
    segments (batch 1, no prefix or suffix); causal: query i sees keys up to its own position prefix_len + i
    (a non-empty suffix is then a ValueError); scale: defaults to 1/sqrt(head_dim), else finite and > 0 as a
    float32 (ValueError otherwise). A query with no visible key gets zeros; NaN/inf inputs propagate as in
    torch. Inputs may have any strides: the prefix and suffix are read in place (views into a preallocated
    cache), nothing is concatenated. Returns a contiguous (batch, len, heads, head_dim) tensor in q's dtype.
    Semantics: :func:`dimple_rt.reference.masked_attention`. Bad arguments raise ValueError / TypeError.
    """
    return torch.ops.dimple_rt.masked_attention.default(
        q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, causal, scale, suffix_k, suffix_v
    )


@torch.library.register_fake("dimple_rt::masked_attention")
def _masked_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
) -> torch.Tensor:
    # Only what the output's metadata needs; the real kernel checks everything (cu_seqlens' values need data).
    _check_one_device(
        "masked_attention",
        "q",
        {
            "q": q,
            "k": k,
            "v": v,
            "prefix_k": prefix_k,
            "prefix_v": prefix_v,
            "suffix_k": suffix_k,
            "suffix_v": suffix_v,
            "key_mask": key_mask,
            "cu_seqlens": cu_seqlens,
        },
    )
    torch._check(q.dim() == 4, lambda: f"masked_attention: q must be 4-D, got {tuple(q.shape)}")
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the kernels return


def kv_cache_write(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
) -> None:
    """Write the current tokens' rotated keys and values into a preallocated per-layer cache, in place.

    cache_k, cache_v: (batch, max_len, kv_heads, head_dim), any strides, mutated; k (NOT yet rotated), v:
    (batch, len, kv_heads, head_dim), the cache's dtype; cos, sin: (batch, len, head_dim) in any float dtype,
    from ``dimple_rt.model.rope.rotary_cos_sin`` (M-RoPE sections already selected, so M-RoPE and plain RoPE
    are the same call). Writes ``cache_k[:, start:start+len] = k·cos + rotate_half(k)·sin`` (fp32 maths,
    rounded once to the cache dtype; the model's ``apply_rotary`` in bf16 rounds after each op, so the two
    differ by a few bf16 ulp) and ``cache_v[:, start:start+len] = v``. Requires 0 ≤ start, start + len ≤
    max_len (checked without overflow) and an even head_dim. The caches must have one memory location per element
    (no expanded / stride-0 dimension) and the rows written must share no memory with each other or with k, v,
    cos, sin (ValueError naming them). Semantics: :func:`dimple_rt.reference.kv_cache_write`. Bad arguments
    raise ValueError / TypeError.
    """
    torch.ops.dimple_rt.kv_cache_write.default(cache_k, cache_v, k, v, cos, sin, start)


@torch.library.register_fake("dimple_rt::kv_cache_write")
def _kv_cache_write_fake(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
) -> None:
    # Mutates its first two arguments and returns nothing: no metadata to produce, only the device check.
    _check_one_device(
        "kv_cache_write", "cache_k", {"cache_k": cache_k, "cache_v": cache_v, "k": k, "v": v, "cos": cos, "sin": sin}
    )


def confident_select(
    logits: torch.Tensor,
    row_ids: torch.Tensor,
    n: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    uniforms: torch.Tensor | None = None,
    confidence: str = "plain",
    use_original_confidence: bool = True,
    threshold: float | None = None,
    batch_coupled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising step's token choice, confidence and commit mask for the masked rows, fused in one kernel.

    logits: (N, V) float32/bfloat16/float16, ``logits[mask_index]`` (row-major (batch, position) order; any row
    stride, a non-contiguous vocabulary dimension is copied); row_ids: (N,) int64, the non-decreasing batch row
    of each entry (``generation.schedule.masked_row_ids``); n: (groups,) int64 ≥ 0, how many entries each group
    commits when the threshold path selects nothing there: shape (1,) with ``batch_coupled=True`` (the whole
    batch is one group, as in the authors' code), else one entry per batch row indexed by row id (rows without
    masked entries are simply absent from row_ids). n larger than a group commits the whole group.

    temperature 0: x0 is the argmax of the logits, lowest id on ties. temperature > 0: uniforms (N,) float32 in
    [0, 1) are required and x0 is the inverse-CDF draw (in vocabulary-index order) from softmax(logits /
    temperature) after top_p (nucleus by descending logit, ties by ascending id, the top token always kept) and
    top_k (entries ≥ the k-th largest). temperature must be 0 or stay positive and finite in fp32 ([1.4e-45,
    3.4e38]); in a row where max(logits) / temperature overflows fp32 the tempered logits are (logits − max) /
    temperature (the temperature → 0 limit without inf − inf), so any temperature in range is safe. confidence: "plain" (p[x0]), "margin" (top1 − top2) or "neg_entropy"
    (Σ p·log(p + 1e-10)) of softmax(logits) if ``use_original_confidence`` else of the filtered distribution.
    commit, per group: every confidence > threshold if threshold is not None and > 0 and any passes; else the n
    most confident (ties to the lowest index). For "everything on the last step", pass threshold=None and n =
    the group size. All maths is fp32 from the logits (sums in float64).

    A row with a NaN or +inf logit, or only -inf, raises ValueError "confident_select: logits row {r} has no
    finite maximum (every entry -inf, or +inf/NaN present)" on every device (and in the reference), as do bad
    values of n, row_ids and uniforms: the CUDA op reads its kernels' error flags back once per call. Under CUDA
    graph capture it cannot: there such a row gets an in-vocabulary id and a NaN confidence, ranked last.

    Returns ``(x0 (N,) int64, confidence (N,) float32, commit (N,) bool)``. Exact semantics and rounding:
    :func:`dimple_rt.reference.confident_select` (same signature). Bad arguments raise ValueError / TypeError.
    """
    return torch.ops.dimple_rt.confident_select.default(
        logits,
        row_ids,
        n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        uniforms=uniforms,
        confidence=confidence,
        use_original_confidence=use_original_confidence,
        threshold=threshold,
        batch_coupled=batch_coupled,
    )


@torch.library.register_fake("dimple_rt::confident_select")
def _confident_select_fake(
    logits: torch.Tensor,
    row_ids: torch.Tensor,
    n: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    uniforms: torch.Tensor | None = None,
    confidence: str = "plain",
    use_original_confidence: bool = True,
    threshold: float | None = None,
    batch_coupled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_one_device(
        "confident_select", "logits", {"logits": logits, "row_ids": row_ids, "n": n, "uniforms": uniforms}
    )
    torch._check(logits.dim() == 2, lambda: f"confident_select: logits must be 2-D, got {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    return (
        torch.empty(num_rows, dtype=torch.int64, device=logits.device),
        torch.empty(num_rows, dtype=torch.float32, device=logits.device),
        torch.empty(num_rows, dtype=torch.bool, device=logits.device),
    )
