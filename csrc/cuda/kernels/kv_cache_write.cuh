// SPDX-License-Identifier: Apache-2.0
// kv_cache_write (CUDA device code): cache_k[:, start+t] = k·cos + rotate_half(k)·sin, cache_v[:, start+t] = v.
// Semantics: dimple_rt/reference.py kv_cache_write.
//
// Layout: cache_k/cache_v (batch, max_len, kv_heads, head_dim) and k/v (batch, len, kv_heads, head_dim) with any
// strides; cos/sin (batch, len, head_dim) fp32 contiguous (the launcher widens them; they are kv_heads times
// smaller than k). With half = head_dim / 2 each thread owns one channel pair (d, d + half) of one (b, t, h):
//   out[d]        = k[d]·cos[d]             − k[d+half]·sin[d]
//   out[d + half] = k[d+half]·cos[d+half]   + k[d]·sin[d+half]
// and copies v at the same two channels. Threads are numbered channel-fastest, so a warp reads and writes
// contiguous runs of a head when the head_dim stride is 1. The op moves a few hundred KB per decode step and
// is bandwidth-bound: no shared memory, no vector loads (any stride works the same way). The maths is fp32
// with separate multiply and add roundings (__fmul_rn/__fadd_rn, no FMA contraction), exactly the reference's
// k·cos + rotate_half(k)·sin, rounded once to the cache dtype.
#pragma once

#include <cstdint>

#include "common/kv_cache_write_params.h"
#include "cuda/kernels/device_utils.cuh"

namespace dimple_rt {
namespace cuda {

constexpr int kKvWriteThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kKvWriteThreads) kv_cache_write_kernel(const KvCacheWriteParams p) {
  const int64_t half = p.head_dim / 2;
  const int64_t total = p.batch * p.len * p.num_kv_heads * half;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* ck = static_cast<T*>(p.cache_k);
  T* cv = static_cast<T*>(p.cache_v);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % half;
    int64_t rest = idx / half;
    const int64_t h = rest % p.num_kv_heads;
    rest /= p.num_kv_heads;
    const int64_t t = rest % p.len, b = rest / p.len;
    const int64_t d2 = d + half;

    const T* ks = k + b * p.k_stride.batch + t * p.k_stride.seq + h * p.k_stride.head;
    const float* c = p.cos + (b * p.len + t) * p.head_dim;
    const float* s = p.sin + (b * p.len + t) * p.head_dim;
    const float lo = to_float(ks[d * p.k_stride.dim]), hi = to_float(ks[d2 * p.k_stride.dim]);
    const float out_lo = __fsub_rn(__fmul_rn(lo, c[d]), __fmul_rn(hi, s[d]));
    const float out_hi = __fadd_rn(__fmul_rn(hi, c[d2]), __fmul_rn(lo, s[d2]));
    T* kd = ck + b * p.cache_k_stride.batch + (p.start + t) * p.cache_k_stride.seq + h * p.cache_k_stride.head;
    kd[d * p.cache_k_stride.dim] = from_float<T>(out_lo);
    kd[d2 * p.cache_k_stride.dim] = from_float<T>(out_hi);

    const T* vs = v + b * p.v_stride.batch + t * p.v_stride.seq + h * p.v_stride.head;
    T* vd = cv + b * p.cache_v_stride.batch + (p.start + t) * p.cache_v_stride.seq + h * p.cache_v_stride.head;
    vd[d * p.cache_v_stride.dim] = vs[d * p.v_stride.dim];
    vd[d2 * p.cache_v_stride.dim] = vs[d2 * p.v_stride.dim];
  }
}

}  // namespace cuda
}  // namespace dimple_rt
