// SPDX-License-Identifier: Apache-2.0
// kv_cache_write argument checks, shared by the launchers. Shapes, ranges and devices raise ValueError
// (TORCH_CHECK_VALUE), dtypes TypeError (TORCH_CHECK_TYPE); the list follows dimple_rt/reference.py.
#include "common/kv_cache_write.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace dimple_rt {
namespace {

// The (size, stride) pairs of the dimensions with more than one element, by ascending stride.
std::vector<std::pair<int64_t, int64_t>> moving_dims(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.size(d), t.stride(d));
  }
  std::sort(dims.begin(), dims.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  return dims;
}

// Whether no two elements share memory, by the usual sufficient test: with the dimensions ordered by stride,
// each stride exceeds the furthest offset that the smaller ones reach. Every slice or permutation of a dense
// tensor passes; a stride-0 (expanded) dimension or an overlapping as_strided view fails. Overflow-checked.
bool distinct_elements(const at::Tensor& t) {
  int64_t reach = 0;  // the largest offset the dimensions so far reach
  for (const auto& [size, stride] : moving_dims(t)) {
    if (stride <= reach) return false;
    int64_t extent = 0;
    if (__builtin_mul_overflow(size - 1, stride, &extent) || __builtin_add_overflow(reach, extent, &reach)) {
      return false;
    }
  }
  return true;
}

// [first, last] byte addresses an element of t touches (t non-empty, strides >= 0, memory that exists).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  uintptr_t reach = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    reach += static_cast<uintptr_t>(t.size(d) - 1) * static_cast<uintptr_t>(t.stride(d));
  }
  return {first, first + (reach + 1) * t.element_size() - 1};
}

// Whether delta = Σ e_d·stride_d for some |e_d| <= size_d − 1, over dims[0, n) (ascending, each stride above
// the reach of the smaller ones: then at most two values of the largest e_d can work).
bool offset_reachable(const std::vector<std::pair<int64_t, int64_t>>& dims, size_t n, int64_t delta) {
  if (n == 0) return delta == 0;
  const auto [size, stride] = dims[n - 1];
  int64_t e = delta / stride;  // toward zero; the other candidate is one further from zero
  for (int64_t cand : {e, delta < 0 ? e - 1 : e + 1}) {
    if (cand < -(size - 1) || cand > size - 1) continue;
    if (offset_reachable(dims, n - 1, delta - cand * stride)) return true;
  }
  return false;
}

// Whether two non-empty views may share an element. Exact when they have the same sizes, strides and dtype and
// distinct elements each (e.g. cache_k and cache_v as two slices of one interleaved buffer, or k as the cache's
// own rows); otherwise any intersection of their byte spans counts as shared.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  if (a1 < b0 || b1 < a0) return false;
  if (a.sizes() != b.sizes() || a.strides() != b.strides() || a.element_size() != b.element_size() ||
      !distinct_elements(a)) {
    return true;
  }
  const int64_t bytes = static_cast<int64_t>(b0) - static_cast<int64_t>(a0);
  if (bytes % a.element_size() != 0) return true;  // misaligned by part of an element
  const auto dims = moving_dims(a);
  return offset_reachable(dims, dims.size(), bytes / static_cast<int64_t>(a.element_size()));
}

}  // namespace

void check_kv_cache_write_args(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin, int64_t start) {
  using Named = std::pair<const char*, const at::Tensor&>;
  for (const auto& [name, t] : {Named{"cache_k", cache_k}, {"cache_v", cache_v}, {"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.dim() == 4, "kv_cache_write: ", name, " must be 4-D (batch, len, kv_heads, head_dim), got ",
                      shape_str(t.sizes()));
    TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), "kv_cache_write: ", name,
                     " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  for (const auto& [name, t] : {Named{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK_VALUE(t.dim() == 3, "kv_cache_write: ", name, " must be 3-D (batch, len, head_dim), got ",
                      shape_str(t.sizes()));
    TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), "kv_cache_write: ", name,
                     " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(cache_k.sizes() == cache_v.sizes(), "kv_cache_write: cache_k ", shape_str(cache_k.sizes()),
                    " and cache_v ", shape_str(cache_v.sizes()), " must have the same shape");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "kv_cache_write: k ", shape_str(k.sizes()), " and v ", shape_str(v.sizes()),
                    " must have the same shape");
  const int64_t batch = cache_k.size(0), max_len = cache_k.size(1), kv_heads = cache_k.size(2),
                head_dim = cache_k.size(3), len = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(2) == kv_heads && k.size(3) == head_dim,
                    "kv_cache_write: k must be (batch=", batch, ", len, kv_heads=", kv_heads, ", head_dim=", head_dim,
                    ") like the cache, got ", shape_str(k.sizes()));
  TORCH_CHECK_VALUE(head_dim % 2 == 0, "kv_cache_write: head_dim must be even (rotate_half), got ", head_dim);
  for (const auto& [name, t] : {Named{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK_VALUE(t.size(0) == batch && t.size(1) == len && t.size(2) == head_dim, "kv_cache_write: ", name,
                      " must be (batch=", batch, ", len=", len, ", head_dim=", head_dim, "), got ",
                      shape_str(t.sizes()));
  }
  TORCH_CHECK_TYPE(cache_v.scalar_type() == cache_k.scalar_type() && k.scalar_type() == cache_k.scalar_type() &&
                       v.scalar_type() == cache_k.scalar_type(),
                   "kv_cache_write: cache_k, cache_v, k, v must share a dtype, got ", cache_k.scalar_type(), ", ",
                   cache_v.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_TYPE(cos.scalar_type() == sin.scalar_type(), "kv_cache_write: cos and sin must share a dtype, got ",
                   cos.scalar_type(), ", ", sin.scalar_type());
  for (const auto& [name, t] : {Named{"cache_v", cache_v}, {"k", k}, {"v", v}, {"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK_VALUE(t.device() == cache_k.device(), "kv_cache_write: ", name, " is on ", t.device(), ", cache_k on ",
                      cache_k.device());
  }
  // Compared without forming start + len, which overflows for a start near 2^63.
  TORCH_CHECK_VALUE(start >= 0 && start <= max_len && len <= max_len - start, "kv_cache_write: start=", start,
                    " and len=", len, " must satisfy 0 <= start and start + len <= max_len=", max_len);
  TORCH_CHECK_VALUE(!cache_k.is_same(cache_v), "kv_cache_write: cache_k and cache_v must be different tensors");
  check_kv_cache_write_overlap(cache_k, cache_v, k, v, cos, sin, start);
}

void check_kv_cache_write_overlap(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin, int64_t start) {
  if (k.numel() == 0 || cache_k.is_meta()) return;  // nothing is written (or no memory to compare)
  using Named = std::pair<const char*, const at::Tensor&>;
  for (const auto& [name, t] : {Named{"cache_k", cache_k}, {"cache_v", cache_v}}) {
    TORCH_CHECK_VALUE(distinct_elements(t), "kv_cache_write: ", name, " has elements that share memory (strides ",
                      shape_str(t.strides()), " for shape ", shape_str(t.sizes()),
                      ", e.g. an expanded or stride-0 tensor); the cache must have one memory location per element");
  }
  const at::Tensor rows_k = cache_k.narrow(1, start, k.size(1));  // the rows written
  const at::Tensor rows_v = cache_v.narrow(1, start, k.size(1));
  TORCH_CHECK_VALUE(!may_overlap(rows_k, rows_v), "kv_cache_write: cache_k and cache_v overlap in the rows [", start,
                    ", ", start + k.size(1), ") being written (one is a view of the other?)");
  for (const auto& [out_name, out] : {Named{"cache_k", rows_k}, {"cache_v", rows_v}}) {
    for (const auto& [name, t] : {Named{"k", k}, {"v", v}, {"cos", cos}, {"sin", sin}}) {
      TORCH_CHECK_VALUE(!may_overlap(out, t), "kv_cache_write: ", name, " overlaps the rows [", start, ", ",
                        start + k.size(1), ") of ", out_name, " being written; pass a copy (", name, ".clone())");
    }
  }
}

KvCacheWriteParams make_kv_cache_write_params(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& cos32, const at::Tensor& sin32,
                                              int64_t start) {
  KvCacheWriteParams p;
  p.cache_k = cache_k.mutable_data_ptr();
  p.cache_v = cache_v.mutable_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.cos = cos32.const_data_ptr<float>();
  p.sin = sin32.const_data_ptr<float>();
  p.cache_k_stride = strides4(cache_k);
  p.cache_v_stride = strides4(cache_v);
  p.k_stride = strides4(k);
  p.v_stride = strides4(v);
  p.batch = k.size(0);
  p.len = k.size(1);
  p.num_kv_heads = k.size(2);
  p.head_dim = k.size(3);
  p.start = start;
  return p;
}

}  // namespace dimple_rt
