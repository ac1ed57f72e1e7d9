// SPDX-License-Identifier: Apache-2.0
// kv_cache_write (CPU): rotate the fresh keys and write them and the values into a preallocated cache.
//
// cache_k/cache_v: (batch, max_len, kv_heads, head_dim), any strides; k/v: (batch, len, kv_heads, head_dim),
// any strides; cos/sin: (batch, len, head_dim), already M-RoPE-section-selected (dimple_rt/model/rope.py
// rotary_cos_sin), widened to fp32 contiguous by the launcher (they are kv_heads times smaller than k).
// For each (b, t, h): cache_k[b, start+t, h] = k·cos + rotate_half(k)·sin, cache_v[b, start+t, h] = v, where
// rotate_half(x) = cat(-x[d/2:], x[:d/2]); so with half = d/2:
//   out[i]        = x[i]·cos[i]               − x[i+half]·sin[i]
//   out[i + half] = x[i+half]·cos[i+half]     + x[i]·sin[i+half]
// Both halves are vectorised with at::vec (tails by masked load/store), so any even head_dim works. The
// rotation is done in fp32 and rounded once to the cache dtype (the model's rope.apply_rotary computes in
// the activation dtype, rounding after every multiply and the add: up to a few bf16 ulp apart).
// The op is bandwidth-bound (read k, v; write two cache rows), so the only parallelism needed is
// at::parallel_for over (batch, position) rows; v is a plain copy (memcpy when both rows are contiguous).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/kv_cache_write.h"
#include "ops.h"

namespace dimple_rt {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// dst[0..n) = fp32(src[i * stride]).
template <typename T>
inline void load_row(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    at::vec::convert(src, dst, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
}

// dst[i * stride] = T(src[i]) for i < n, rounding to nearest even as torch's casts do.
template <typename T>
inline void store_row(const float* src, T* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    at::vec::convert(src, dst, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
}

// y = x·cos + rotate_half(x)·sin over one head of 2·half channels.
inline void rotate(const float* x, const float* c, const float* s, int64_t half, float* y) {
  for (int64_t i = 0; i < half; i += kVec) {
    const int64_t n = std::min(kVec, half - i);
    const Vec lo = Vec::loadu(x + i, n), hi = Vec::loadu(x + half + i, n);
    const Vec y_lo = lo * Vec::loadu(c + i, n) - hi * Vec::loadu(s + i, n);
    const Vec y_hi = hi * Vec::loadu(c + half + i, n) + lo * Vec::loadu(s + half + i, n);
    y_lo.store(y + i, n);
    y_hi.store(y + half + i, n);
  }
}

template <typename T>
void kv_cache_write_kernel(const KvCacheWriteParams& p) {
  const int64_t D = p.head_dim, half = D / 2, rows = p.batch * p.len;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* ck = static_cast<T*>(p.cache_k);
  T* cv = static_cast<T*>(p.cache_v);
  // At least 64K elements of k per task: below that (a 65-token decode write is 33K) waking the other threads
  // costs more than the copy, and a busy core turns the wait into milliseconds.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.num_kv_heads * D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D), y(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.len, t = r % p.len;
      const float* c = p.cos + r * D;
      const float* s = p.sin + r * D;
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        const T* ks = k + b * p.k_stride.batch + t * p.k_stride.seq + h * p.k_stride.head;
        T* kd = ck + b * p.cache_k_stride.batch + (p.start + t) * p.cache_k_stride.seq + h * p.cache_k_stride.head;
        load_row(ks, p.k_stride.dim, D, x.data());
        rotate(x.data(), c, s, half, y.data());
        store_row(y.data(), kd, p.cache_k_stride.dim, D);

        const T* vs = v + b * p.v_stride.batch + t * p.v_stride.seq + h * p.v_stride.head;
        T* vd = cv + b * p.cache_v_stride.batch + (p.start + t) * p.cache_v_stride.seq + h * p.cache_v_stride.head;
        if (p.v_stride.dim == 1 && p.cache_v_stride.dim == 1) {
          std::memcpy(vd, vs, D * sizeof(T));
        } else {
          for (int64_t d = 0; d < D; ++d) vd[d * p.cache_v_stride.dim] = vs[d * p.v_stride.dim];
        }
      }
    }
  });
}

}  // namespace

void kv_cache_write_cpu(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cos, const at::Tensor& sin, int64_t start) {
  check_kv_cache_write_args(cache_k, cache_v, k, v, cos, sin, start);
  TORCH_CHECK_VALUE(cache_k.device().is_cpu(), "kv_cache_write_cpu: cache_k must be on the CPU, got ",
                    cache_k.device());
  if (k.numel() == 0) return;
  const at::Tensor cos32 = cos.to(at::kFloat).contiguous();  // (batch, len, head_dim), small
  const at::Tensor sin32 = sin.to(at::kFloat).contiguous();
  const KvCacheWriteParams params = make_kv_cache_write_params(cache_k, cache_v, k, v, cos32, sin32, start);
  DIMPLE_RT_DISPATCH_FLOAT_TYPES(k.scalar_type(), "kv_cache_write_cpu",
                                 [&] { kv_cache_write_kernel<scalar_t>(params); });
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CPU, m) {
  m.impl("kv_cache_write", &dimple_rt::kv_cache_write_cpu);
}
