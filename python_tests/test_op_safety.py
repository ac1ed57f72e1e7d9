# SPDX-License-Identifier: Apache-2.0
"""Memory safety and defined behaviour of the ops for hostile arguments (issue 15).

Calls that used to crash the interpreter (heap corruption, segfault) run in a subprocess, so that a
regression is a failed test rather than a dead test run: they must end in a Python exception (returncode 1,
the exception in stderr), never a signal (returncode < 0). The other cases run in-process. A bounded random
fuzz of op calls runs in batches, each in its own subprocess (python_tests/_op_fuzz.py).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import dimple_rt
from dimple_rt import ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the dimple_rt under test lives: the installed package (CI runs pytest -P against it, and the checkout's
# source folder has no compiled _C) or a checkout with an in-place build. Subprocesses import that one.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(dimple_rt.__file__)))
PRELUDE = "import torch\nfrom dimple_rt import ops, reference\n"


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter that imports the dimple_rt under test."""
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        check=False,
        cwd=PACKAGE_PARENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_raises_in_subprocess(code: str, error: str, message: str) -> None:
    r = _run(code)
    assert r.returncode >= 0, f"killed by signal {-r.returncode}: {r.stderr[-2000:]}"
    assert r.returncode == 1, f"returncode {r.returncode}, stdout {r.stdout[-500:]}, stderr {r.stderr[-2000:]}"
    assert f"{error}: " in r.stderr and message in r.stderr, r.stderr[-2000:]


# ---- kv_cache_write: start + len overflowed in the bounds check (heap corruption)

KV_SETUP = """
c = torch.zeros(1, 8, 2, 8); d = c.clone(); k = torch.randn(1, 1, 2, 8); x = torch.randn(1, 1, 8)
"""


@pytest.mark.parametrize("start", [2**63 - 1, 2**63 - 8, 2**62, -1, -(2**63)])
def test_kv_cache_write_start_overflow_subprocess(start: int) -> None:
    _assert_raises_in_subprocess(
        KV_SETUP + f"ops.kv_cache_write(c, d, k, k, x, x, {start})",
        "ValueError",
        "must satisfy 0 <= start and start + len <= max_len=8",
    )


@pytest.mark.parametrize("start", [2**63 - 1, 9, -1, -(2**63)])
def test_kv_cache_write_start_range(start: int) -> None:
    c = torch.zeros(1, 8, 2, 8)
    k = torch.randn(1, 1, 2, 8)
    x = torch.randn(1, 1, 8)
    for fn in (ops.kv_cache_write, reference.kv_cache_write):
        with pytest.raises(ValueError, match="must satisfy 0 <= start"):
            fn(c, c.clone(), k, k, x, x, start)


def test_kv_cache_write_last_row_ok() -> None:
    c, d = torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8)
    k = torch.randn(1, 1, 2, 8)
    x = torch.ones(1, 1, 8)
    ops.kv_cache_write(c, d, k, k, x, 0 * x, 7)
    torch.testing.assert_close(d[:, 7:], k)
    ops.kv_cache_write(c, d, k[:, :0], k[:, :0], x[:, :0], x[:, :0], 8)  # an empty write at the end


# ---- kv_cache_write: aliased or overlapping outputs


def _kv(batch: int = 2, max_len: int = 8, heads: int = 2, dim: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "cache_k": torch.zeros(batch, max_len, heads, dim),
        "cache_v": torch.zeros(batch, max_len, heads, dim),
        "k": torch.randn(batch, 3, heads, dim, generator=g),
        "v": torch.randn(batch, 3, heads, dim, generator=g),
        "cos": torch.randn(batch, 3, dim, generator=g),
        "sin": torch.randn(batch, 3, dim, generator=g),
        "start": 2,
    }


def _aliased_cases() -> dict[str, tuple[dict, str]]:
    base = _kv()
    ck = base["cache_k"]
    cases: dict[str, tuple[dict, str]] = {
        "cache_v_is_cache_k": ({**base, "cache_v": ck}, "cache_k and cache_v must be different tensors"),
        "cache_v_view_of_cache_k": ({**base, "cache_v": ck.view(ck.shape)}, "cache_k and cache_v overlap"),
        "cache_v_shifted_view": (
            {**base, "cache_v": torch.zeros(2 * 8 * 2 * 8 + 16)[16:].view(2, 8, 2, 8)},
            "",
        ),
        "k_is_written_rows": ({**base, "k": ck[:, 2:5]}, "k overlaps the rows [2, 5) of cache_k"),
        "v_overlaps_cache_v": ({**base, "v": base["cache_v"][:, 3:6]}, "v overlaps the rows [2, 5) of cache_v"),
        "k_overlaps_cache_v": ({**base, "k": base["cache_v"][:, 1:4]}, "k overlaps the rows [2, 5) of cache_v"),
        "cos_inside_cache": ({**base, "cos": ck[:, 2:5, 0]}, "cos overlaps the rows [2, 5) of cache_k"),
        "stride0_cache_k": (
            {**base, "cache_k": torch.zeros(1, 8, 2, 8).expand(2, 8, 2, 8)},
            "cache_k has elements that share memory",
        ),
        "stride0_cache_v_heads": (
            {**base, "cache_v": torch.zeros(2, 8, 1, 8).expand(2, 8, 2, 8)},
            "cache_v has elements that share memory",
        ),
        "overlapping_as_strided": (
            {**base, "cache_k": torch.zeros(400).as_strided((2, 8, 2, 8), (128, 8, 4, 1))},
            "cache_k has elements that share memory",
        ),
    }
    # the shifted view of a different buffer does not overlap: valid
    del cases["cache_v_shifted_view"]
    return cases


@pytest.mark.parametrize("case", sorted(_aliased_cases()))
def test_kv_cache_write_aliasing_rejected(case: str) -> None:
    args, message = _aliased_cases()[case]
    for fn in (ops.kv_cache_write, reference.kv_cache_write):
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(**args)


def test_kv_cache_write_disjoint_views_allowed() -> None:
    """Views of one buffer that share no element are fine: interleaved k/v heads, k from other cache rows."""
    base = _kv()
    kv = torch.zeros(2, 8, 4, 8)  # (batch, max_len, [k heads | v heads], dim)
    want = {**base, "cache_k": torch.zeros(2, 8, 2, 8), "cache_v": torch.zeros(2, 8, 2, 8)}
    reference.kv_cache_write(**want)
    ops.kv_cache_write(**{**base, "cache_k": kv[:, :, :2], "cache_v": kv[:, :, 2:]})
    torch.testing.assert_close(kv[:, :, :2], want["cache_k"])
    torch.testing.assert_close(kv[:, :, 2:], want["cache_v"])
    # k taken from rows [5, 8) of cache_k itself, written to rows [2, 5): no element in common
    ck = torch.randn(2, 8, 2, 8)
    ck_ref = ck.clone()
    args = {**base, "cache_v": torch.zeros(2, 8, 2, 8)}
    ops.kv_cache_write(**{**args, "cache_k": ck, "k": ck[:, 5:8]})
    reference.kv_cache_write(**{**args, "cache_v": torch.zeros(2, 8, 2, 8), "cache_k": ck_ref, "k": ck_ref[:, 5:8]})
    torch.testing.assert_close(ck, ck_ref)


# ---- confident_select: logits / temperature overflowing fp32 (segfault, token id -1)

TINY_T = "torch.tensor([[1., 0., -1.]]), torch.zeros(1, dtype=torch.long), torch.tensor([1])"


@pytest.mark.parametrize("options", ["top_k=1", "top_p=0.9", "top_k=2, top_p=0.5", ""])
def test_confident_select_tiny_temperature_subprocess(options: str) -> None:
    r = _run(
        f"""
        args = ({TINY_T})
        kw = dict(temperature=1e-39, uniforms=torch.tensor([.5]), {options})
        for orig in (True, False):
            for kind in ("plain", "margin", "neg_entropy"):
                got = ops.confident_select(*args, confidence=kind, use_original_confidence=orig, **kw)
                want = reference.confident_select(*args, confidence=kind, use_original_confidence=orig, **kw)
                assert got[0].tolist() == want[0].tolist() == [0], (got, want)
                assert bool(torch.isfinite(got[1]).all()), got
                torch.testing.assert_close(got[1], want[1])
        print("ok")
        """
    )
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])


def _sampled(logits: torch.Tensor, temperature: float, **kw) -> None:
    rows = logits.shape[0]
    args = (logits, torch.zeros(rows, dtype=torch.long), torch.tensor([1]))
    for u in (0.0, 0.3, 0.999999):
        uniforms = torch.full((rows,), u)
        for orig in (True, False):
            for kind in ("plain", "margin", "neg_entropy"):
                options = {"confidence": kind, "use_original_confidence": orig, **kw}
                got = ops.confident_select(*args, temperature=temperature, uniforms=uniforms, **options)
                want = reference.confident_select(*args, temperature=temperature, uniforms=uniforms, **options)
                vocab = logits.shape[1]
                assert bool(((got[0] >= 0) & (got[0] < vocab)).all()), got
                assert bool(torch.isfinite(got[1]).all()), got
                assert got[0].tolist() == want[0].tolist(), (kind, orig, u, got, want)
                torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
                assert got[2].tolist() == want[2].tolist()


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1.401298464324817e-45, 1e-8])
@pytest.mark.parametrize("filters", [{}, {"top_k": 1}, {"top_k": 3}, {"top_p": 0.9}, {"top_p": 0.0}])
def test_confident_select_overflowing_scaled_logits(temperature: float, filters: dict) -> None:
    """Rows where max(z) / T overflows fp32 use (z − max z) / T, in the kernel and the reference alike."""
    logits = torch.tensor(
        [
            [1.0, 0.0, -1.0, 1.0 - 1e-7, -3e38],  # positive maximum: max / T → +inf
            [-1.0, -2.0, -1.0, -5.0, float("-inf")],  # negative maximum: max / T → −inf, tie at the argmax
            [3e38, -3e38, 1e38, 0.0, 3e38],  # huge logits overflow even at moderate T
            [0.0, 0.0, -1e-40, -1.0, 0.0],  # zero maximum: max / T = 0, finite, the plain path
        ]
    )
    _sampled(logits, temperature, **filters)
    _sampled(logits.bfloat16(), temperature, **filters)


def test_confident_select_huge_logits_moderate_temperature() -> None:
    logits = torch.tensor([[3e38, 2e38, -3e38, 0.0], [1e38, 1e38, 1e38, 1e38]])
    for t in (0.5, 0.01, 1.0, 7.0):
        _sampled(logits, t, top_p=0.95)
        _sampled(logits, t)


@pytest.mark.parametrize(
    ("temperature", "message"),
    [
        (math.nan, "temperature must be >= 0 and finite, got nan"),
        (-1.0, "temperature must be >= 0 and finite, got -1"),
        (math.inf, "temperature must be >= 0 and finite, got inf"),
        (-0.0 - 1e-300, "temperature must be >= 0"),
        (1e-50, "temperature must be 0 or a positive float32 in"),  # rounds to 0 in fp32
        (1e39, "temperature must be 0 or a positive float32 in"),  # rounds to inf in fp32
    ],
)
def test_confident_select_bad_temperature(temperature: float, message: str) -> None:
    args = (torch.randn(2, 5), torch.zeros(2, dtype=torch.long), torch.tensor([1]))
    for fn in (ops.confident_select, reference.confident_select):
        with pytest.raises(ValueError, match=message):
            fn(*args, temperature=temperature, uniforms=torch.rand(2))


def test_confident_select_nan_threshold() -> None:
    args = (torch.randn(2, 5), torch.zeros(2, dtype=torch.long), torch.tensor([1]))
    for fn in (ops.confident_select, reference.confident_select):
        with pytest.raises(ValueError, match="threshold must not be NaN"):
            fn(*args, threshold=math.nan)


@pytest.mark.parametrize("u", [math.nan, 1.0, -1e-9, math.inf])
def test_confident_select_bad_uniforms(u: float) -> None:
    args = (torch.randn(2, 5), torch.zeros(2, dtype=torch.long), torch.tensor([1]))
    for fn in (ops.confident_select, reference.confident_select):
        with pytest.raises(ValueError, match=r"uniforms must be in \[0, 1\)"):
            fn(*args, temperature=1.0, uniforms=torch.tensor([0.5, u]))


# ---- confident_select: NaN / +inf / all -inf logits raise the same ValueError in the kernel and the reference


@pytest.mark.parametrize("bad", [math.nan, math.inf, "all_-inf"])
@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_select_nonfinite_logits(bad: float | str, sampling: bool, dtype: torch.dtype) -> None:
    logits = torch.randn(3, 40)
    if bad == "all_-inf":
        logits[2] = -math.inf
    else:
        logits[2, 17] = bad
    logits = logits.to(dtype)
    options = {"temperature": 0.7, "uniforms": torch.rand(3), "top_p": 0.9} if sampling else {}
    message = "confident_select: logits row 2 has no finite maximum (every entry -inf, or +inf/NaN present)"
    for fn in (ops.confident_select, reference.confident_select):
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(logits, torch.zeros(3, dtype=torch.long), torch.tensor([1]), **options)


def test_confident_select_nan_logits_subprocess() -> None:
    _assert_raises_in_subprocess(
        "ops.confident_select(torch.tensor([[float('nan'), 1.0]]), torch.zeros(1, dtype=torch.long),"
        " torch.tensor([1]), temperature=1e-39, top_k=1, uniforms=torch.tensor([.5]))",
        "ValueError",
        "logits row 0 has no finite maximum",
    )


# ---- masked_attention: scale


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.5, 1e-50, 1e39])
def test_masked_attention_bad_scale(scale: float) -> None:
    q = torch.randn(1, 3, 2, 8)
    for fn in (ops.masked_attention, reference.masked_attention):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            fn(q, q, q, scale=scale)


def test_masked_attention_extreme_valid_scale() -> None:
    q = torch.randn(1, 3, 2, 8)
    for scale in (1e-30, 1.5e-45, 1e30):
        out = ops.masked_attention(q, q, q, scale=scale)
        want = reference.masked_attention(q, q, q, scale=scale)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [False, True])
def test_masked_attention_nan_propagates_alike(mask: bool) -> None:
    """A NaN in q gives NaN in the same places in the kernel and the reference (the reference used to hide it
    with nan_to_num); rows with no visible key stay zeros in both."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g), torch.randn(2, 5, 2, 16))
    q[0, 1, 0, 3] = math.nan
    key_mask = torch.rand(2, 5, generator=g) < 0.6 if mask else None
    for causal in (False, True):
        got = ops.masked_attention(q, k, v, key_mask=key_mask, causal=causal)
        want = reference.masked_attention(q, k, v, key_mask=key_mask, causal=causal)
        assert torch.equal(got.isnan(), want.isnan())
        assert mask or bool(got.isnan().any())
        torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0), atol=1e-5, rtol=1e-5)


# ---- meta tensors mixed with real ones: the Meta (fake) kernel must not run on them


def _meta_mixes() -> list[tuple[str, object]]:
    q = torch.randn(1, 3, 2, 8)
    kv = _kv()
    logits = torch.randn(2, 5)
    cs = {
        "logits": logits,
        "row_ids": torch.zeros(2, dtype=torch.long),
        "n": torch.tensor([1]),
        "temperature": 1.0,
        "uniforms": torch.rand(2),
    }
    calls: list[tuple[str, object]] = []
    for name in ("q", "k", "v"):
        args = {"q": q, "k": q, "v": q}
        args[name] = q.to("meta")
        calls.append((f"masked_attention_{name}", lambda fn, a=args: fn.masked_attention(**a)))
    pk = {"q": q, "k": q, "v": q, "prefix_k": q, "prefix_v": q.to("meta")}
    calls.append(("masked_attention_prefix_v", lambda fn, a=pk: fn.masked_attention(**a)))
    for name in ("suffix_k", "suffix_v"):
        sx = {"q": q, "k": q, "v": q, "suffix_k": q, "suffix_v": q}
        sx[name] = q.to("meta")
        calls.append((f"masked_attention_{name}", lambda fn, a=sx: fn.masked_attention(**a)))
    km = {"q": q, "k": q, "v": q, "key_mask": torch.ones(1, 3, dtype=torch.bool, device="meta")}
    calls.append(("masked_attention_key_mask", lambda fn, a=km: fn.masked_attention(**a)))
    for name in ("cache_k", "cache_v", "k", "v", "cos", "sin"):
        args = dict(kv)
        args[name] = args[name].to("meta")
        calls.append((f"kv_cache_write_{name}", lambda fn, a=args: fn.kv_cache_write(**a)))
    for name in ("logits", "row_ids", "n", "uniforms"):
        args = dict(cs)
        args[name] = args[name].to("meta")
        calls.append((f"confident_select_{name}", lambda fn, a=args: fn.confident_select(**a)))
    return calls


@pytest.mark.parametrize(("name", "call"), _meta_mixes(), ids=[n for n, _ in _meta_mixes()])
def test_meta_mixed_with_real_raises(name: str, call) -> None:
    for fn in (ops, reference):
        with pytest.raises(ValueError, match=r" is on (meta|cpu), \w+ on (cpu|meta)"):
            call(fn)


def test_all_meta_still_propagates_shapes() -> None:
    q = torch.empty(1, 3, 4, 8, device="meta")
    kv = torch.empty(1, 3, 2, 8, device="meta")
    assert ops.masked_attention(q, kv, kv).shape == (1, 3, 4, 8)
    suffix = torch.empty(1, 5, 2, 8, device="meta")
    assert ops.masked_attention(q, kv, kv, suffix_k=suffix, suffix_v=suffix).shape == (1, 3, 4, 8)
    x0, conf, commit = ops.confident_select(
        torch.empty(4, 9, device="meta"), torch.empty(4, dtype=torch.long, device="meta"), torch.empty(1, device="meta")
    )
    assert x0.device.type == "meta" and x0.shape == conf.shape == commit.shape == (4,)


# ---- issue 14: the headers that device code includes are plain C++ (no torch, ATen or c10)


def test_device_headers_free_of_torch() -> None:
    """csrc/cuda/kernels/* and the <op>_params.h structs they include, followed through their local includes."""
    csrc = os.path.join(ROOT, "csrc")
    roots = [os.path.join("cuda", "kernels", f) for f in sorted(os.listdir(os.path.join(csrc, "cuda", "kernels")))]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        with open(os.path.join(csrc, rel), encoding="utf-8") as f:
            for line in f:
                m = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
                if not m:
                    continue
                header = m.group(2)
                assert not header.startswith(("ATen/", "c10/", "torch/")), f"{rel} includes {header}"
                if m.group(1) == '"':
                    todo.append(header)
    assert {os.path.join("common", f"{op}_params.h") for op in ("masked_attention", "kv_cache_write")} <= seen
    assert os.path.join("common", "confident_select_params.h") in seen


# ---- bounded random fuzz: every call returns a valid result or raises ValueError / TypeError


@pytest.mark.parametrize("batch", range(4))
def test_random_op_calls_fuzz(batch: int) -> None:
    calls = 120
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "python_tests", "_op_fuzz.py"), str(batch * calls), str(calls)],
        check=False,
        cwd=PACKAGE_PARENT,
        env={**os.environ, "PYTHONPATH": PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode >= 0, (
        f"killed by signal {-r.returncode} (the last seed started is in stdout): {r.stdout[-600:]}"
    )
    assert r.returncode == 0, f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    assert f"{calls} calls" in r.stdout
