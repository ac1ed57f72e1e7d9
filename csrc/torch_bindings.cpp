// SPDX-License-Identifier: Apache-2.0
// Every dimple_rt op schema, in one TORCH_LIBRARY block, and the Python module stub that loads them.
//
// The ops are reached through the dispatcher (torch.ops.dimple_rt.*), never through pybind11 functions:
// the dispatcher picks the CPU or CUDA implementation (registered by csrc/cpu/*.cpp and csrc/cuda/*.cu with
// TORCH_LIBRARY_IMPL), torch.compile can trace them and torch.library.opcheck can test them. Python must
// `import torch` before `dimple_rt._C` (the extension has no RPATH; torch loads libtorch first).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dimple_rt, m) {
  // Attention of the current tokens over [prefix ‖ current ‖ suffix] keys, in one pass with an online softmax.
  // q: (batch, len, heads, head_dim); k, v: (batch, len, kv_heads, head_dim) with heads a multiple of kv_heads
  // (GQA); prefix_k/prefix_v: (batch, prefix_len, kv_heads, head_dim) cached keys/values placed before k/v;
  // suffix_k/suffix_v: (batch, suffix_len, kv_heads, head_dim) cached keys/values placed after them (the dual
  // cache); both read in place through their strides. Query i sits at absolute position prefix_len + i.
  // key_mask: bool (batch, prefix_len + len + suffix_len), True = real token, bidirectional rows keep their
  // diagonal; cu_seqlens: int32 (segments + 1,) block-diagonal segments (batch 1, no prefix or suffix);
  // causal: key j visible to query i iff j <= prefix_len + i (a non-empty suffix is refused); scale defaults
  // to 1/sqrt(head_dim). A row with no visible key is zero. Returns (batch, len, heads, head_dim) in q's dtype.
  // Exact semantics: dimple_rt/reference.py.
  m.def(
      "masked_attention(Tensor q, Tensor k, Tensor v, Tensor? prefix_k=None, Tensor? prefix_v=None, "
      "Tensor? key_mask=None, Tensor? cu_seqlens=None, bool causal=False, float? scale=None, "
      "Tensor? suffix_k=None, Tensor? suffix_v=None) -> Tensor");

  // Writes the rotated keys and the values of the current tokens into a preallocated per-layer cache.
  // cache_k/cache_v: (batch, max_len, kv_heads, head_dim), mutated; k (not yet rotated), v: (batch, len,
  // kv_heads, head_dim); cos/sin: (batch, len, head_dim) rotary tables, already M-RoPE-section-selected.
  // cache_k[:, start:start+len] = k·cos + rotate_half(k)·sin (fp32, rounded once), cache_v[...] = v.
  m.def(
      "kv_cache_write(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k, Tensor v, Tensor cos, Tensor sin, "
      "int start) -> ()");

  // One denoising step's choice over the masked rows: logits (N, V) in row-major (batch, position) order,
  // row_ids (N,) int64 non-decreasing batch row of each entry, n (groups,) int64 the fallback count per group
  // (one group when batch_coupled, else one per batch row). Token: argmax (lowest id) at temperature 0, else
  // an inverse-CDF draw with uniforms (N,) over the top-p/top-k filtered softmax of logits/temperature.
  // confidence: "plain" | "margin" | "neg_entropy" of the original or the filtered distribution. commit: per
  // group, every confidence > threshold if any, else the n most confident (ties to the lowest index).
  // Returns (x0 (N,) int64, confidence (N,) fp32, commit (N,) bool). Exact semantics: dimple_rt/reference.py.
  m.def(
      "confident_select(Tensor logits, Tensor row_ids, Tensor n, *, float temperature=0., float? top_p=None, "
      "int? top_k=None, Tensor? uniforms=None, str confidence=\"plain\", bool use_original_confidence=True, "
      "float? threshold=None, bool batch_coupled=True) -> (Tensor x0, Tensor confidence, Tensor commit)");
}

// `import dimple_rt._C` loads this library (its static initialisers register the ops above) and gets an
// otherwise empty module carrying two build facts for dimple_rt.ops.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "dimple_rt's compiled ops; use them through dimple_rt.ops or torch.ops.dimple_rt.",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef DIMPLE_RT_WITH_CUDA
  const int cuda_kernels_built = 1;
#else
  const int cuda_kernels_built = 0;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  const char* cpu_capability = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  const char* cpu_capability = "AVX2";
#else
  const char* cpu_capability = "DEFAULT";
#endif
  if (PyModule_AddIntConstant(module, "cuda_kernels_built", cuda_kernels_built) < 0 ||
      PyModule_AddStringConstant(module, "cpu_capability", cpu_capability) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
