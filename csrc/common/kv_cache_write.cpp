// SPDX-License-Identifier: Apache-2.0
// kv_cache_write argument checks, shared by the launchers. Shapes, ranges and devices raise ValueError
// (TORCH_CHECK_VALUE), dtypes TypeError (TORCH_CHECK_TYPE); the list follows dimple_rt/reference.py.
#include "common/kv_cache_write.h"

#include <utility>

namespace dimple_rt {

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
  TORCH_CHECK_VALUE(start >= 0 && start + len <= max_len, "kv_cache_write: start=", start, " and len=", len,
                    " must satisfy 0 <= start and start + len <= max_len=", max_len);
  TORCH_CHECK_VALUE(!cache_k.is_same(cache_v), "kv_cache_write: cache_k and cache_v must be different tensors");
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
