// SPDX-License-Identifier: Apache-2.0
// masked_attention split-KV (CUDA): where a block sits in the grid, which keys its split owns, the merge of
// the splits' partial results, and the host rule that picks the number of splits. Design note (tiles, merge
// maths, the heuristic's numbers): kernels/masked_attention.cuh, sections "Grid" and "Split-KV".
//
// Torch-free: includes only common/*_params.h, so it compiles standalone with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/masked_attention_params.h"
#include "cuda/kernels/device_utils.cuh"

namespace dimple_rt {
namespace cuda {
namespace attention {

constexpr int kMaxSplits = 64;          // workspace and merge-loop bound
constexpr int kMinTilesPerSplit = 2;    // key tiles per split at least (fewer: the merge costs more than it saves)
constexpr float kSplitBusyFraction = 0.8f;  // no split once the grid holds 80% of the resident-block capacity
constexpr float kSplitEfficiencyKeep = 0.85f;

// The split-KV side of a launch. o_partial == nullptr: one split, the kernel writes p.out itself.
struct SplitKvParams {
  float* o_partial = nullptr;  // (num_splits, rows_flat, ws_stride) fp32: each split's normalised output
  float* lse = nullptr;        // (num_splits, rows_flat) fp32: each split's log2-sum-exp2 of its scores (-inf: none)
  int num_splits = 1;
  int ws_stride = 0;           // the kernel's padded head_dim (a multiple of 4)
  int64_t rows_flat = 0;       // batch · q_len · num_heads; row (b, i, h) is (b·q_len + i)·num_heads + h
};

// Which (batch, kv head, row tile, split) a block computes. blockIdx.x = row_tile · num_splits + split (the
// splits of a tile and the tiles of a kv head are neighbours, so they share K/V in L2); (batch, kv head) is
// flattened over gridDim.y (≤ 65535) and gridDim.z, so any batch · kv_heads up to 65535² launches.
struct BlockCoord {
  bool valid;  // false for the padding blocks of the last grid.z slice
  int64_t b, kvh, row0;
  int split;
};

__device__ __forceinline__ BlockCoord block_coord(const MaskedAttentionParams& p, const SplitKvParams& sp,
                                                  int block_m) {
  BlockCoord c;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  c.valid = bh < p.batch * p.num_kv_heads;
  c.b = bh / p.num_kv_heads;
  c.kvh = bh % p.num_kv_heads;
  c.split = static_cast<int>(blockIdx.x % static_cast<unsigned>(sp.num_splits));
  c.row0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(sp.num_splits)) * block_m;
  return c;
}

// Cuts the key range [*lo, *hi) of a row tile to split `split` of `num_splits`: the range's key tiles of
// block_n are dealt in contiguous runs of ceil(tiles / num_splits); a split past the end gets an empty range.
__device__ __forceinline__ void split_key_range(int64_t* lo, int64_t* hi, int split, int num_splits, int block_n) {
  if (num_splits == 1) return;
  const int64_t tiles = (*hi - *lo + block_n - 1) / block_n;
  const int64_t run = (tiles + num_splits - 1) / num_splits * block_n;
  const int64_t a = *lo + split * run;
  const int64_t end = *hi;
  *lo = a < end ? a : end;
  *hi = a + run < end ? a + run : end;
}

// The flat row (b, i, h) of the partial results.
__device__ __forceinline__ int64_t flat_row(const MaskedAttentionParams& p, int64_t b, int64_t i, int64_t h) {
  return (b * p.q_len + i) * p.num_heads + h;
}

// 16-byte (kBytes) vector access is safe for every row of a tensor with this base pointer and these strides.
template <typename T, int kBytes>
__device__ __forceinline__ bool vec_ok_bytes(const void* ptr, const Strides4& s) {
  constexpr int64_t kElems = kBytes / sizeof(T);
  return ptr != nullptr && s.dim == 1 && reinterpret_cast<uintptr_t>(ptr) % kBytes == 0 && s.batch % kElems == 0 &&
         s.seq % kElems == 0 && s.head % kElems == 0;
}

// Four consecutive elements as one 8-byte (bf16/fp16) or 16-byte (fp32) store.
__device__ __forceinline__ void store4(float* dst, const float (&x)[4]) {
  *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
}
template <typename T>
__device__ __forceinline__ void store4(T* dst, const float (&x)[4]) {
  T v[4] = {from_float<T>(x[0]), from_float<T>(x[1]), from_float<T>(x[2]), from_float<T>(x[3])};
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(v);
}

// Merge: one warp per flat row, lane l owns channels [4l, 4l + 4). With L_s the log2-sum-exp2 of split s and
// O_s its normalised output: M = max_s L_s, w_s = 2^(L_s - M), out = Σ_s w_s O_s / Σ_s w_s. M = -inf (no split
// saw a key) writes zeros, as the unsplit kernels do for a row with no visible key.
constexpr int kMergeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) masked_attention_merge_kernel(const MaskedAttentionParams p,
                                                                               const SplitKvParams sp) {
  constexpr int kWarps = kMergeThreads / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head_dim = static_cast<int>(p.head_dim);
  const int d0 = 4 * lane;
  const bool vec = vec_ok_bytes<T, 4 * sizeof(T)>(p.out, p.out_stride) && head_dim % 4 == 0;
  T* out = static_cast<T*>(p.out);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < sp.rows_flat;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    float m = -INFINITY;
    for (int s = lane; s < sp.num_splits; s += 32) m = fmaxf(m, sp.lse[s * sp.rows_flat + row]);
    m = warp_max(m);
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float wsum = 0.0f;
    if (m != -INFINITY) {
      for (int s = 0; s < sp.num_splits; ++s) {
        const float w = exp2f(sp.lse[s * sp.rows_flat + row] - m);
        wsum += w;
        if (d0 < sp.ws_stride) {
          const float4 x =
              *reinterpret_cast<const float4*>(sp.o_partial + (s * sp.rows_flat + row) * sp.ws_stride + d0);
          o[0] = fmaf(w, x.x, o[0]);
          o[1] = fmaf(w, x.y, o[1]);
          o[2] = fmaf(w, x.z, o[2]);
          o[3] = fmaf(w, x.w, o[3]);
        }
      }
    }
    if (d0 >= head_dim) continue;
    const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
    const float r[4] = {o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv};
    const int64_t h = row % p.num_heads, i = (row / p.num_heads) % p.q_len, b = row / (p.num_heads * p.q_len);
    T* dst = out + b * p.out_stride.batch + i * p.out_stride.seq + h * p.out_stride.head;
    if (vec) {
      store4(dst + d0, r);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (d0 + e < head_dim) dst[(d0 + e) * p.out_stride.dim] = from_float<T>(r[e]);
      }
    }
  }
}

// Host: the number of splits for a grid of `blocks` (row tiles × kv heads × batch) on a device that keeps
// `capacity` (SMs × resident blocks per SM) blocks resident, when the longest row tile reads `key_tiles` key
// tiles. FlashAttention-2's rule (num_splits_heuristic): no split once the grid fills 80% of the capacity;
// else, with waves(s) = blocks·s / capacity and efficiency(s) = waves / ceil(waves), the smallest s whose
// efficiency is within 85% of the best, over s ≤ min(kMaxSplits, key_tiles / kMinTilesPerSplit). Then s is
// lowered to ceil(key_tiles / ceil(key_tiles / s)), the same runs of tiles without empty trailing splits.
inline int choose_num_splits(int64_t blocks, int64_t capacity, int64_t key_tiles) {
  if (blocks <= 0 || capacity <= 0 || static_cast<float>(blocks) >= kSplitBusyFraction * capacity) return 1;
  int64_t max_splits = key_tiles / kMinTilesPerSplit;
  if (max_splits > kMaxSplits) max_splits = kMaxSplits;
  if (max_splits <= 1) return 1;
  auto efficiency = [&](int64_t s) {
    const double waves = static_cast<double>(blocks * s) / static_cast<double>(capacity);
    return waves / std::ceil(waves);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) best = std::fmax(best, efficiency(s));
  int64_t chosen = 1;
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (efficiency(s) >= kSplitEfficiencyKeep * best) {
      chosen = s;
      break;
    }
  }
  const int64_t run = (key_tiles + chosen - 1) / chosen;
  return static_cast<int>((key_tiles + run - 1) / run);
}

}  // namespace attention
}  // namespace cuda
}  // namespace dimple_rt
