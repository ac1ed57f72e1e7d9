# SPDX-License-Identifier: Apache-2.0
"""Plain-torch versions of every dimple_rt op: the executable specification.

The hand-written kernels in ``csrc/`` must agree with these functions (tests compare them on random inputs
of awkward sizes) and the model's ``backend="reference"`` runs on them. They favour clarity over speed:
masks are materialised, K/V are concatenated and repeated, and the maths is done in fp32.
"""

from __future__ import annotations

import math

import torch


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _cached_len(
    which: str, cache_k: torch.Tensor | None, cache_v: torch.Tensor | None, q: torch.Tensor, num_kv_heads: int
) -> int:
    """The length of the cached prefix or suffix keys (``which``), 0 when absent, after checking them."""
    kname, vname = f"{which}_k", f"{which}_v"
    _require((cache_k is None) == (cache_v is None), f"masked_attention: give both {kname} and {vname} or neither")
    if cache_k is None:
        return 0
    assert cache_v is not None
    batch, _, _, head_dim = q.shape
    _require(
        cache_k.dim() == 4 and cache_k.shape == cache_v.shape,
        f"masked_attention: {kname} {tuple(cache_k.shape)} and {vname} {tuple(cache_v.shape)} must be equal 4-D",
    )
    _require(
        cache_k.shape[0] == batch and cache_k.shape[2] == num_kv_heads and cache_k.shape[3] == head_dim,
        f"masked_attention: {kname} must be (batch={batch}, {which}_len, kv_heads={num_kv_heads}, "
        f"head_dim={head_dim}), got {tuple(cache_k.shape)}",
    )
    if cache_k.dtype != q.dtype or cache_v.dtype != q.dtype:
        raise TypeError(f"masked_attention: {kname}/{vname} must have q's dtype {q.dtype}")
    return cache_k.shape[1]


def check_masked_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float | None = None,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
    causal: bool = False,
) -> None:
    """Raise ValueError/TypeError naming the argument when the inputs do not form a valid call."""
    if scale is not None:
        s32 = torch.tensor(scale, dtype=torch.float32).item()  # the kernels multiply by the fp32 value
        _require(
            math.isfinite(s32) and s32 > 0,
            f"masked_attention: scale must be finite and > 0 (as a float32), got {scale}",
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require(
            t.dim() == 4, f"masked_attention: {name} must be 4-D (batch, len, heads, head_dim), got {tuple(t.shape)}"
        )
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"masked_attention: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    batch, q_len, num_heads, head_dim = q.shape
    _require(
        k.shape == v.shape, f"masked_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape"
    )
    _require(
        k.shape[0] == batch and k.shape[1] == q_len and k.shape[3] == head_dim,
        f"masked_attention: k must be (batch={batch}, len={q_len}, kv_heads, head_dim={head_dim}), got {tuple(k.shape)}",
    )
    num_kv_heads = k.shape[2]
    _require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0,
        f"masked_attention: q heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})",
    )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"masked_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # devices before anything reads memory (as the C++ checks)
    for name, t in (
        ("k", k),
        ("v", v),
        ("prefix_k", prefix_k),
        ("prefix_v", prefix_v),
        ("suffix_k", suffix_k),
        ("suffix_v", suffix_v),
        ("key_mask", key_mask),
        ("cu_seqlens", cu_seqlens),
    ):
        _require(
            t is None or t.device == q.device,
            f"masked_attention: {name} is on {None if t is None else t.device}, q on {q.device}",
        )
    prefix_len = _cached_len("prefix", prefix_k, prefix_v, q, num_kv_heads)
    suffix_len = _cached_len("suffix", suffix_k, suffix_v, q, num_kv_heads)
    # Suffix keys sit after every query, so a causal query could never see them: refused rather than ignored.
    _require(
        not causal or suffix_len == 0,
        f"masked_attention: causal attention takes no suffix (suffix_len {suffix_len} > 0)",
    )
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"masked_attention: key_mask must be bool, got {key_mask.dtype}")
        total = prefix_len + q_len + suffix_len
        _require(
            key_mask.shape == (batch, total),
            f"masked_attention: key_mask must be (batch={batch}, prefix_len+len+suffix_len={total}), "
            f"got {tuple(key_mask.shape)}",
        )
    if cu_seqlens is not None:
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"masked_attention: cu_seqlens must be int32, got {cu_seqlens.dtype}")
        _require(
            cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2,
            "masked_attention: cu_seqlens must be 1-D with ≥2 entries",
        )
        _require(
            batch == 1 and prefix_len == 0 and suffix_len == 0,
            "masked_attention: cu_seqlens needs batch 1 and no prefix or suffix",
        )
        _require(key_mask is None, "masked_attention: cu_seqlens and key_mask cannot be combined")
        c = cu_seqlens.to("cpu", torch.int64)
        _require(
            int(c[0]) == 0 and int(c[-1]) == q_len and bool((c[1:] >= c[:-1]).all()),
            f"masked_attention: cu_seqlens must rise from 0 to len={q_len}, got {c.tolist()}",
        )


def attention_allowed(
    batch: int,
    q_len: int,
    prefix_len: int,
    key_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
    device: torch.device,
    suffix_len: int = 0,
) -> torch.Tensor:
    """Which keys each query may see: bool ``(batch, q_len, prefix_len + q_len + suffix_len)``.

    Keys are ``[prefix ‖ current ‖ suffix]``: query i sits at absolute position ``prefix_len + i``, suffix key
    j at ``prefix_len + q_len + j``. With a key mask ``a`` (True = real token) over all of them: bidirectional
    attention allows ``(a_i ∧ a_j) ∨ (i == j)`` (Dimple's forced diagonal: a padded row sees only itself; the
    diagonal is always a current key); causal attention allows ``(j ≤ i) ∧ a_i ∧ a_j`` with no diagonal, so a
    padded row is fully masked and its output is zero (suffix keys would be invisible: causal calls take no
    suffix). ``cu_seqlens`` makes the pattern block-diagonal (no prefix or suffix then).
    """
    total = prefix_len + q_len + suffix_len
    qpos = torch.arange(prefix_len, prefix_len + q_len, device=device)  # (q_len,)
    kpos = torch.arange(total, device=device)  # (total,)
    allowed = torch.ones(batch, q_len, total, dtype=torch.bool, device=device)
    if key_mask is not None:
        a_q = key_mask[:, prefix_len : prefix_len + q_len]  # (batch, q_len)
        both = a_q[:, :, None] & key_mask[:, None, :]  # (batch, q_len, total)
        allowed = both if causal else both | (qpos[:, None] == kpos[None, :])[None]
    if causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])[None]
    if cu_seqlens is not None:
        c = cu_seqlens.to(device=device, dtype=torch.int64)
        seg = torch.bucketize(kpos, c[1:], right=True)  # (total,) segment id of each position
        allowed = allowed & (seg[prefix_len : prefix_len + q_len, None] == seg[None, :])[None]
    return allowed


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
    """Attention of the current tokens over ``[prefix ‖ current ‖ suffix]`` keys.

    q: (batch, len, heads, head_dim); k, v: (batch, len, kv_heads, head_dim), heads a multiple of kv_heads
    (GQA: query head h reads kv head ``h // (heads // kv_heads)``); prefix_k, prefix_v: (batch, prefix_len,
    kv_heads, head_dim) or None, the cached keys before the current ones; suffix_k, suffix_v: (batch,
    suffix_len, kv_heads, head_dim) or None, the cached keys after them (the dual cache); key_mask: bool
    (batch, prefix_len + len + suffix_len), True = real token; cu_seqlens: int32 (segments + 1,)
    block-diagonal segments (batch 1, no prefix or suffix); causal: query i sees keys up to its own position
    ``prefix_len + i`` (a non-empty suffix is refused with ValueError: no causal query could see it). Visibility:
    :func:`attention_allowed`. A query with no visible key gets zeros. Computed in fp32, returned in q's dtype:
    (batch, len, heads, head_dim).
    """
    check_masked_attention_args(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, scale, suffix_k, suffix_v, causal)
    batch, q_len, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[2]
    prefix_len = 0 if prefix_k is None else prefix_k.shape[1]
    suffix_len = 0 if suffix_k is None else suffix_k.shape[1]
    k = torch.cat([x for x in (prefix_k, k, suffix_k) if x is not None], dim=1)  # (batch, total, kv_heads, head_dim)
    v = torch.cat([x for x in (prefix_v, v, suffix_v) if x is not None], dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0  # head_dim 0: an empty output either way
    qf = q.float().transpose(1, 2)  # (batch, heads, len, head_dim)
    kf = k.float().repeat_interleave(groups, dim=2).transpose(1, 2)  # (batch, heads, total, head_dim)
    vf = v.float().repeat_interleave(groups, dim=2).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (batch, heads, len, total)
    allowed = attention_allowed(batch, q_len, prefix_len, key_mask, cu_seqlens, causal, q.device, suffix_len)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    # A row with no visible key softmaxes to NaN: make it zeros. Only those rows: a NaN or inf from the inputs
    # propagates, as it does in the kernels (nan_to_num would turn it into a silent finite answer).
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(dim=-1)[:, None, :, None], 0.0)
    out = torch.matmul(probs, vf)  # (batch, heads, len, head_dim)
    return out.transpose(1, 2).to(q.dtype)  # (batch, len, heads, head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[d/2:], x[:d/2])`` over the last dimension (the model's rotate_half)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _moving_dims(t: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) of the dimensions with more than one element, by ascending stride."""
    return sorted(((s, st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1), key=lambda d: d[1])


def _distinct_elements(t: torch.Tensor) -> bool:
    """Whether no two elements share memory (each stride, by stride order, exceeds what the smaller ones reach)."""
    reach = 0
    for size, stride in _moving_dims(t):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """First and last byte address a non-empty tensor's elements touch."""
    reach = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (reach + 1) * t.element_size() - 1


def _offset_reachable(dims: list[tuple[int, int]], delta: int) -> bool:
    """Whether delta = Σ e·stride with |e| <= size − 1 per dim (dims nested as _distinct_elements requires)."""
    if not dims:
        return delta == 0
    size, stride = dims[-1]
    e = abs(delta) // stride * (1 if delta >= 0 else -1)  # toward zero; the other candidate is one further
    return any(
        -(size - 1) <= c <= size - 1 and _offset_reachable(dims[:-1], delta - c * stride)
        for c in (e, e - 1 if delta < 0 else e + 1)
    )


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty views may share an element (exact for equal layouts, else by byte spans)."""
    a0, a1 = _byte_span(a)
    b0, b1 = _byte_span(b)
    if a1 < b0 or b1 < a0:
        return False
    if a.shape != b.shape or a.stride() != b.stride() or a.element_size() != b.element_size():
        return True
    if not _distinct_elements(a) or (b0 - a0) % a.element_size():
        return True
    return _offset_reachable(_moving_dims(a), (b0 - a0) // a.element_size())


def check_kv_cache_write_overlap(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
) -> None:
    """ValueError unless each cache has one memory location per element and the rows written overlap neither
    each other nor an input (the kernels write in parallel while they read)."""
    if k.numel() == 0 or cache_k.is_meta:
        return
    for name, t in (("cache_k", cache_k), ("cache_v", cache_v)):
        _require(
            _distinct_elements(t),
            f"kv_cache_write: {name} has elements that share memory (strides {tuple(t.stride())} for shape "
            f"{tuple(t.shape)}, e.g. an expanded or stride-0 tensor); the cache must have one memory location per "
            "element",
        )
    end = start + k.shape[1]
    rows_k, rows_v = cache_k[:, start:end], cache_v[:, start:end]
    _require(
        not _may_overlap(rows_k, rows_v),
        f"kv_cache_write: cache_k and cache_v overlap in the rows [{start}, {end}) being written "
        "(one is a view of the other?)",
    )
    for out_name, out in (("cache_k", rows_k), ("cache_v", rows_v)):
        for name, t in (("k", k), ("v", v), ("cos", cos), ("sin", sin)):
            _require(
                not _may_overlap(out, t),
                f"kv_cache_write: {name} overlaps the rows [{start}, {end}) of {out_name} being written; "
                f"pass a copy ({name}.clone())",
            )


def check_kv_cache_write_args(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
) -> None:
    """Raise ValueError/TypeError naming the argument when the inputs do not form a valid call."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    for name, t in (("cache_k", cache_k), ("cache_v", cache_v), ("k", k), ("v", v)):
        _require(
            t.dim() == 4, f"kv_cache_write: {name} must be 4-D (batch, len, kv_heads, head_dim), got {tuple(t.shape)}"
        )
        if t.dtype not in floats:
            raise TypeError(f"kv_cache_write: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        _require(t.dim() == 3, f"kv_cache_write: {name} must be 3-D (batch, len, head_dim), got {tuple(t.shape)}")
        if t.dtype not in floats:
            raise TypeError(f"kv_cache_write: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    _require(
        cache_k.shape == cache_v.shape,
        f"kv_cache_write: cache_k {tuple(cache_k.shape)} and cache_v {tuple(cache_v.shape)} must have the same shape",
    )
    _require(k.shape == v.shape, f"kv_cache_write: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    batch, max_len, kv_heads, head_dim = cache_k.shape
    length = k.shape[1]
    _require(
        k.shape[0] == batch and k.shape[2] == kv_heads and k.shape[3] == head_dim,
        f"kv_cache_write: k must be (batch={batch}, len, kv_heads={kv_heads}, head_dim={head_dim}) like the cache, "
        f"got {tuple(k.shape)}",
    )
    _require(head_dim % 2 == 0, f"kv_cache_write: head_dim must be even (rotate_half), got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        _require(
            t.shape == (batch, length, head_dim),
            f"kv_cache_write: {name} must be (batch={batch}, len={length}, head_dim={head_dim}), got {tuple(t.shape)}",
        )
    if not (cache_v.dtype == k.dtype == v.dtype == cache_k.dtype):
        raise TypeError(
            f"kv_cache_write: cache_k, cache_v, k, v must share a dtype, got {cache_k.dtype}, {cache_v.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    if cos.dtype != sin.dtype:
        raise TypeError(f"kv_cache_write: cos and sin must share a dtype, got {cos.dtype}, {sin.dtype}")
    for name, t in (("cache_v", cache_v), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        _require(t.device == cache_k.device, f"kv_cache_write: {name} is on {t.device}, cache_k on {cache_k.device}")
    _require(
        0 <= start and start + length <= max_len,
        f"kv_cache_write: start={start} and len={length} must satisfy 0 <= start and start + len <= max_len={max_len}",
    )
    _require(cache_k is not cache_v, "kv_cache_write: cache_k and cache_v must be different tensors")
    check_kv_cache_write_overlap(cache_k, cache_v, k, v, cos, sin, start)


def kv_cache_write(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
) -> None:
    """Write the rotated keys and the values of the current tokens into a preallocated cache, in place.

    cache_k, cache_v: (batch, max_len, kv_heads, head_dim), mutated; k (not yet rotated), v: (batch, len,
    kv_heads, head_dim) in the cache's dtype; cos, sin: (batch, len, head_dim), the tables of
    ``dimple_rt.model.rope.rotary_cos_sin`` (M-RoPE sections already selected, so plain RoPE is the same call).
    ``cache_k[:, start:start+len] = k·cos + rotate_half(k)·sin``, computed in fp32 from the given values and
    rounded once to the cache dtype (the model's ``apply_rotary`` rounds after each op in bf16: a few bf16 ulp
    apart); ``cache_v[:, start:start+len] = v``.
    """
    check_kv_cache_write_args(cache_k, cache_v, k, v, cos, sin, start)
    length = k.shape[1]
    kf = k.float()
    c = cos.float()[:, :, None, :]  # (batch, len, 1, head_dim)
    s = sin.float()[:, :, None, :]
    rotated = kf * c + _rotate_half(kf) * s  # (batch, len, kv_heads, head_dim)
    cache_k[:, start : start + length] = rotated.to(cache_k.dtype)
    cache_v[:, start : start + length] = v


CONFIDENCE_KINDS = ("plain", "margin", "neg_entropy")
"""The confidence kinds of :func:`confident_select` (spec §4.4: probability, top1 − top2, Σ p·log p)."""


def check_confident_select_args(
    logits: torch.Tensor,
    row_ids: torch.Tensor,
    n: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    uniforms: torch.Tensor | None,
    confidence: str,
    batch_coupled: bool,
    threshold: float | None = None,
) -> None:
    """Raise ValueError/TypeError naming the argument when the inputs do not form a valid call."""
    _require(logits.dim() == 2, f"confident_select: logits must be 2-D (N, vocab), got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"confident_select: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    num_rows, vocab = logits.shape
    _require(vocab >= 1, f"confident_select: logits must have a vocabulary of at least 1, got {tuple(logits.shape)}")
    _require(vocab < 2**24, f"confident_select: vocabulary sizes up to 2^24 are supported, got {vocab}")
    _require(
        row_ids.dim() == 1 and row_ids.shape[0] == num_rows,
        f"confident_select: row_ids must be (N={num_rows},), got {tuple(row_ids.shape)}",
    )
    if row_ids.dtype != torch.int64:
        raise TypeError(f"confident_select: row_ids must be int64, got {row_ids.dtype}")
    _require(
        n.dim() == 1 and n.shape[0] >= 1,
        f"confident_select: n must be 1-D (groups,) with >= 1 entry, got {tuple(n.shape)}",
    )
    _require(
        not batch_coupled or n.shape[0] == 1,
        f"confident_select: n must be (1,) when batch_coupled (one group), got {tuple(n.shape)}",
    )
    if n.dtype != torch.int64:
        raise TypeError(f"confident_select: n must be int64, got {n.dtype}")
    _require(
        math.isfinite(temperature) and temperature >= 0,
        f"confident_select: temperature must be >= 0 and finite, got {temperature}",
    )
    t32 = torch.tensor(temperature, dtype=torch.float32).item()  # the kernels divide by the fp32 value
    _require(
        temperature == 0 or (t32 > 0 and math.isfinite(t32)),
        f"confident_select: temperature must be 0 or a positive float32 in [1.4e-45, 3.4e38], got {temperature}",
    )
    _require(top_p is None or 0 <= top_p <= 1, f"confident_select: top_p must be in [0, 1], got {top_p}")
    _require(top_k is None or top_k >= 1, f"confident_select: top_k must be >= 1, got {top_k}")
    _require(threshold is None or not math.isnan(threshold), "confident_select: threshold must not be NaN")
    _require(
        confidence in CONFIDENCE_KINDS,
        f"confident_select: confidence must be one of 'plain', 'margin', 'neg_entropy', got {confidence!r}",
    )
    if temperature > 0:
        _require(uniforms is not None, "confident_select: uniforms (N,) are required when temperature > 0")
    if uniforms is not None:
        _require(
            uniforms.dim() == 1 and uniforms.shape[0] == num_rows,
            f"confident_select: uniforms must be (N={num_rows},), got {tuple(uniforms.shape)}",
        )
        if uniforms.dtype != torch.float32:
            raise TypeError(f"confident_select: uniforms must be float32, got {uniforms.dtype}")
    for name, t in (("uniforms", uniforms), ("row_ids", row_ids), ("n", n)):
        _require(
            t is None or t.device == logits.device,
            f"confident_select: {name} is on {None if t is None else t.device}, logits on {logits.device}",
        )
    _require(bool((n >= 0).all()), f"confident_select: n must be >= 0, got {n.tolist()}")
    if num_rows:
        _require(
            bool((row_ids >= 0).all()) and bool((row_ids[1:] >= row_ids[:-1]).all()),
            "confident_select: row_ids must be non-decreasing and >= 0",
        )
        _require(
            batch_coupled or int(row_ids[-1]) < n.shape[0],
            f"confident_select: row_ids[{num_rows - 1}] = {int(row_ids[-1])} has no entry in n ({n.shape[0]} groups)",
        )
    if temperature > 0 and uniforms is not None:
        _require(bool(((uniforms >= 0) & (uniforms < 1)).all()), "confident_select: uniforms must be in [0, 1)")


def _first_index(mask: torch.Tensor) -> torch.Tensor:
    """``(N, V) bool → (N,)``: the lowest column index where mask is set (V where it is nowhere set)."""
    vocab = mask.shape[-1]
    idx = torch.arange(vocab, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, vocab).min(dim=-1).values


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
    """One denoising step's token, confidence and commit mask for the masked rows (Dimple spec §4.4–4.5, in fp32).

    logits: (N, V) float, the masked rows in row-major (batch, position) order; row_ids: (N,) int64, the
    non-decreasing batch row of each entry; n: (groups,) int64 ≥ 0, the fallback count of each group (one group,
    shape (1,), when ``batch_coupled``; else one entry per batch row, indexed by row id). Returns
    ``(x0 (N,) int64, confidence (N,) float32, commit (N,) bool)``. Every row needs a finite maximum logit and no
    NaN: otherwise ValueError "confident_select: logits row {r} has no finite maximum (every entry -inf, or
    +inf/NaN present)" naming the first such row (the CUDA op raises it too, except under CUDA graph capture,
    where such a row gets an in-vocabulary id and a NaN confidence). temperature is 0 or a positive value that
    stays positive and finite in fp32; threshold is not NaN.

    With z = fp32 logits, m = max z, w0 = exp(z − m), S0 = Σ w0 (sums in float64, divided in fp32 as
    ``w / fl32(S)``):

    - the original distribution is w0 / S0;
    - tempered logits zt = z / temperature (fp32 division) when temperature > 0, else z; in a row where
      m / temperature overflows fp32 (a tiny temperature or a huge logit) zt = (z − m) / temperature instead,
      which is ≤ 0, exactly 0 at the argmax and never inf − inf (the temperature → 0 limit, computed safely);
      wt = exp(zt − max zt);
    - top-p (only if top_p < 1): order the vocabulary by zt descending, ties by ascending index; keep an entry
      iff the float64 mass ranked strictly before it is ≤ top_p · Σ wt (so the top entry always stays);
    - top-k (only if top_k < V): keep entries with zt ≥ the k-th largest zt (ties at the k-th value all stay);
      an entry must pass both filters; the filtered distribution is wk / Sk with wk = wt where kept, else 0;
    - x0: temperature 0 → the argmax of z, lowest index on ties (the filters always keep it); temperature > 0 →
      inverse CDF in vocabulary order: the first index whose float64 running sum of wk exceeds u · Σ wk, where
      u = uniforms[row] ∈ [0, 1) (the last entry with wk > 0 if rounding leaves none);
    - confidence, of the original distribution if ``use_original_confidence`` else of the filtered one:
      "plain" p[x0]; "margin" top1 − top2 of p (top2 = 0 when there is no second entry); "neg_entropy"
      Σ p·log(p + 1e-10) (fp32 terms, float64 sum), ≤ 0;
    - commit, per group: if threshold is not None and > 0 and some confidence > fl32(threshold), exactly those;
      else the min(n, size) most confident (ties to the lowest index). A caller wanting "everything on the last
      step" passes threshold=None and n = the group's size.

    The filters change nothing at temperature 0 with ``use_original_confidence`` (x0 is the argmax either way).
    The kernels equal this function exactly for x0 and commit except where a float64 sum or an fp32
    confidence lies within rounding of a decision boundary (u · Σ at a CDF step, a top-p cut, the threshold,
    two different rows' confidences within an ulp); confidences agree to fp32 rounding.
    """
    check_confident_select_args(
        logits, row_ids, n, temperature, top_p, top_k, uniforms, confidence, batch_coupled, threshold
    )
    num_rows, vocab = logits.shape
    device = logits.device
    z = logits.float()  # (N, V)
    m = z.max(dim=-1, keepdim=True).values  # (N, 1)
    bad = ~torch.isfinite(m[:, 0]) | torch.isnan(z).any(dim=-1)  # (N,) NaN, +inf, or every entry -inf
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"confident_select: logits row {row} has no finite maximum (every entry -inf, or +inf/NaN present)"
        )
    x0 = _first_index(z == m)  # (N,) greedy choice
    sampling = temperature > 0
    dist_w: torch.Tensor
    dist_s: torch.Tensor
    if use_original_confidence:
        dist_w = torch.exp(z - m)  # (N, V)
        dist_s = dist_w.double().sum(dim=-1, keepdim=True)  # (N, 1)
    if sampling or not use_original_confidence:
        zt = z  # (N, V)
        if sampling:
            # z / T, except in rows where m / T overflows fp32: there (z − m) / T, <= 0 and 0 at the argmax
            shifted = ~torch.isfinite(m / temperature)  # (N, 1)
            zt = torch.where(shifted, (z - m) / temperature, z / temperature)
        wt = torch.exp(zt - zt.max(dim=-1, keepdim=True).values)
        keep = torch.ones_like(zt, dtype=torch.bool)
        if top_p is not None and top_p < 1:
            order = torch.sort(zt, dim=-1, descending=True, stable=True).indices  # ties: lower index first
            ws = torch.gather(wt, -1, order).double()  # (N, V) weights in rank order
            # float64 mass ranked strictly before each entry (an exclusive cumsum, not cumsum − ws: no rounding)
            before = torch.cat([torch.zeros_like(ws[:, :1]), torch.cumsum(ws, dim=-1)[:, :-1]], dim=-1)
            total = wt.double().sum(dim=-1, keepdim=True)
            keep = torch.zeros_like(keep).scatter_(-1, order, before <= top_p * total)
        if top_k is not None and top_k < vocab:
            kth = torch.topk(zt, top_k, dim=-1).values[:, -1:]  # (N, 1)
            keep &= zt >= kth
        wk = torch.where(keep, wt, torch.zeros_like(wt))
        if sampling:
            assert uniforms is not None
            cdf = torch.cumsum(wk.double(), dim=-1)  # (N, V)
            target = uniforms.double()[:, None] * cdf[:, -1:]
            x0 = _first_index(cdf > target)
            last = vocab - 1 - _first_index((wk > 0).flip(-1))  # the last entry with weight
            x0 = torch.minimum(x0, last)
        if not use_original_confidence:
            dist_w = wk
            dist_s = wk.double().sum(dim=-1, keepdim=True)
    probs = dist_w / dist_s.float()  # (N, V)
    if confidence == "plain":
        conf = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    elif confidence == "margin":
        if vocab >= 2:
            top2 = torch.topk(probs, 2, dim=-1).values  # (N, 2)
            conf = top2[:, 0] - top2[:, 1]
        else:
            conf = probs[:, 0].clone()  # no second entry: top2 = 0
    else:
        conf = (probs * torch.log(probs + 1e-10)).double().sum(dim=-1).float()

    commit = torch.zeros(num_rows, dtype=torch.bool, device=device)
    if num_rows:
        if batch_coupled:
            groups = [(0, num_rows, int(n[0]))]
        else:
            rows, counts = torch.unique_consecutive(row_ids, return_counts=True)
            ends = counts.cumsum(0).tolist()
            groups = [(e - c, e, int(n[r])) for r, c, e in zip(rows.tolist(), counts.tolist(), ends, strict=True)]
        for start, end, count in groups:
            c = conf[start:end]
            if threshold is not None and threshold > 0:
                selected = c > threshold  # the Python float is compared in fp32
                if bool(selected.any()):
                    commit[start:end] = selected
                    continue
            index = torch.sort(c, descending=True, stable=True).indices[: min(count, end - start)]
            commit[start + index] = True
    return x0, conf, commit
