// SPDX-License-Identifier: Apache-2.0
// kv_cache_write: the argument checks that the CPU and CUDA launchers run, and the function that fills the
// plain parameter struct (common/kv_cache_write_params.h, which the kernels read: no torch types there).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "common/kv_cache_write_params.h"

namespace dimple_rt {

// Ranks, shapes, start/len against max_len (overflow-safe), devices, aliasing (ValueError) and dtypes (TypeError),
// naming the argument; the messages follow check_kv_cache_write_args in dimple_rt/reference.py.
void check_kv_cache_write_args(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin, int64_t start);

// Part of the checks above (ValueError, naming the arguments): cache_k and cache_v each have one memory location
// per element (no stride 0, no overlapping strides), and the rows [start, start + len) written in them overlap
// neither each other nor k, v, cos, sin.
void check_kv_cache_write_overlap(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin, int64_t start);

// Fills the struct; cos32/sin32 are fp32 contiguous versions of cos/sin that the caller keeps alive.
KvCacheWriteParams make_kv_cache_write_params(const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& cos32, const at::Tensor& sin32,
                                              int64_t start);

}  // namespace dimple_rt
