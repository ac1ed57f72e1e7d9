// SPDX-License-Identifier: Apache-2.0
// kv_cache_write: the plain parameter struct that the CPU and CUDA kernels read. Plain C++, no torch types:
// the CUDA kernels include it. The launchers fill it after the argument checks of common/kv_cache_write.h.
#pragma once

#include <cstdint>

#include "common/strides.h"

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
  // 0 <= start and start + len <= max_len (checked without overflow); the written rows share no memory with
  // each other or with k, v, cos, sin.
  int64_t batch = 0, len = 0, num_kv_heads = 0, head_dim = 0, start = 0;
};

}  // namespace dimple_rt
