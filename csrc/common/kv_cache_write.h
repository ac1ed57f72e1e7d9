// SPDX-License-Identifier: Apache-2.0
// kv_cache_write: the plain parameter struct that the CPU (and a future CUDA) kernel reads, and the argument
// checks that every launcher runs before filling it.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace dimple_rt {

struct KvCacheWriteParams {
  // Element type of cache_k/cache_v/k/v is the launcher's template parameter; cos/sin are always fp32.
  void* cache_k = nullptr;     // (batch, max_len, kv_heads, head_dim)
  void* cache_v = nullptr;     // (batch, max_len, kv_heads, head_dim)
  const void* k = nullptr;     // (batch, len, kv_heads, head_dim), not yet rotated
  const void* v = nullptr;     // (batch, len, kv_heads, head_dim)
  const float* cos = nullptr;  // (batch, len, head_dim), contiguous
  const float* sin = nullptr;  // (batch, len, head_dim), contiguous
  Strides4 cache_k_stride, cache_v_stride, k_stride, v_stride;
  int64_t batch = 0, len = 0, num_kv_heads = 0, head_dim = 0, start = 0;
};

// Ranks, shapes, start/len against max_len, devices (ValueError) and dtypes (TypeError), naming the
// argument; the messages follow check_kv_cache_write_args in dimple_rt/reference.py.
void check_kv_cache_write_args(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin, int64_t start);

// Fills the struct; cos32/sin32 are fp32 contiguous versions of cos/sin that the caller keeps alive.
KvCacheWriteParams make_kv_cache_write_params(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& cos32, const at::Tensor& sin32,
                                              int64_t start);

}  // namespace dimple_rt
