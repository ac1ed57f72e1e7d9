// SPDX-License-Identifier: Apache-2.0
// masked_attention (CUDA device code): attention of the current tokens over [prefix ‖ current ‖ suffix] keys
// with an online softmax, FlashAttention-2 style. Semantics: dimple_rt/reference.py masked_attention.
//
// Layout: q (batch, q_len, heads, head_dim), k/v (batch, q_len, kv_heads, head_dim), prefix_k/prefix_v
// (batch, prefix_len, kv_heads, head_dim), suffix_k/suffix_v (batch, suffix_len, kv_heads, head_dim), any
// strides (16-byte vector loads where the head_dim stride is 1 and the pointer and other strides of every
// segment are 16-byte aligned, element loads otherwise). Keys are numbered by absolute position: j <
// prefix_len is read straight from the prefix cache tensors, j < prefix_len + q_len from k/v, the rest from
// the suffix cache tensors (the dual cache): nothing is concatenated. Causal calls have no suffix (checked).
//
// GQA packing: the rows of a tile are (query, head-in-group) pairs of ONE kv head, row = i·groups + h % groups,
// so the 7 query heads that share a kv head (Dimple-7B 28:4) share every K/V tile that is loaded: a decode
// step (65 queries) is 455 rows per kv head instead of 7 separate 65-row problems. Grid: (row tiles, kv
// heads, batch). The key range of a tile is cut to what its rows can see (causal: up to its last query;
// cu_seqlens: from its first query's segment start to its last query's segment end).
//
// Tensor-core kernel (bf16/fp16), 4 warps, 64 rows x 64 keys per step, head_dim padded to kD in {64, 96, 128}:
//   shared memory: one 64 x (kD+8) tile that holds Q (once, moved into registers as mma A fragments) and then
//   each K tile, one for V, and the 64 key-mask bytes; rows are padded by 8 elements (16 bytes) so the 8 row
//   addresses of every ldmatrix fall into different bank groups. 34 KB at kD = 128: static shared memory, and
//   2-3 blocks per SM.
//   per warp: 16 rows. S = Q·Kᵀ with mma.m16n8k16 (fp32 accumulation; K fragments by ldmatrix), masking and
//   the online softmax in registers (exp2 of log2e-prescaled scores; a row whose running max is still -inf
//   keeps alpha = 1 and p = 0, so a fully masked row ends with l = 0 and is written as zeros), then P is
//   rounded to the input type and O += P·V with V fragments by ldmatrix.trans. The C fragment of S has the
//   layout of the A fragment of P (FA2's register reuse), so P never goes through shared memory.
//   Loads are plain (no cp.async pipeline): K/V of the next tile are not overlapped with the maths. That and
//   the missing split-KV (a decode step has few row tiles: 8 per kv head) are the known performance gaps.
// FP32 kernel: exact fp32 FMA maths (the tolerance is 1e-5), 4 warps, 16 rows x 32 keys per step; lane j of a
//   warp computes the score of key j (K tile in shared memory with a 129-float row stride: conflict-free),
//   lanes own head_dim channels for P·V (p broadcast by shuffles). head_dim <= 128.
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

constexpr int kMaxHeadDim = 128;
constexpr float kLog2e = 1.4426950408889634f;

// What one query row of a tile needs to decide which keys it sees.
// 32-bit positions: the launcher checks prefix_len + len and len·groups against 2^31.
struct RowInfo {
  bool valid = false;  // a real row (the last tile may be partial)
  bool real = true;    // key_mask at the query's own position (true without a mask)
  int qpos = 0;        // absolute position prefix_len + i
  int seg_lo = 0;      // first visible key (cu_seqlens segment start, else 0)
  int seg_hi = 0;      // one past the last visible key (segment end / causal limit / total incl. suffix)
  int i = 0, h = 0;    // query index and query head
};

// The segment [lo, hi) that holds query i (empty segments skipped: the largest s with cu[s] <= i).
__device__ __forceinline__ void segment_of(const int64_t* cu, int64_t num_segments, int64_t i, int64_t* lo,
                                           int64_t* hi) {
  int64_t a = 0, b = num_segments - 1;  // answer in [a, b]
  while (a < b) {
    const int64_t mid = (a + b + 1) / 2;
    if (cu[mid] <= i) {
      a = mid;
    } else {
      b = mid - 1;
    }
  }
  *lo = cu[a];
  *hi = cu[a + 1];
}

__device__ __forceinline__ RowInfo row_info(const MaskedAttentionParams& p, int64_t b, int64_t kvh, int64_t row) {
  RowInfo r;
  const int64_t total = p.prefix_len + p.q_len + p.suffix_len;
  r.valid = row < p.q_len * p.groups;
  if (!r.valid) return r;
  r.i = static_cast<int>(row / p.groups);
  r.h = static_cast<int>(kvh * p.groups + row % p.groups);
  r.qpos = static_cast<int>(p.prefix_len + r.i);
  r.seg_lo = 0;
  r.seg_hi = static_cast<int>(total);
  if (p.cu_seqlens != nullptr) {
    int64_t lo, hi;
    segment_of(p.cu_seqlens, p.num_segments, r.i, &lo, &hi);
    r.seg_lo = static_cast<int>(lo);
    r.seg_hi = static_cast<int>(hi);
  }
  if (p.causal) r.seg_hi = min(r.seg_hi, r.qpos + 1);
  if (p.key_mask != nullptr) r.real = p.key_mask[b * p.key_mask_batch_stride + r.qpos * p.key_mask_seq_stride];
  return r;
}

// Key j visible to the row? key_real is the key mask at j (true without a mask). Dimple's rule: bidirectional
// rows see (a_i ∧ a_j) ∨ (i == j), causal rows (j <= i) ∧ a_i ∧ a_j; cu_seqlens/causal limits are in seg_lo/hi.
__device__ __forceinline__ bool visible(const MaskedAttentionParams& p, const RowInfo& r, int j, bool key_real) {
  if (!r.valid || j < r.seg_lo || j >= r.seg_hi) return false;
  if (p.key_mask == nullptr) return true;
  return (r.real && key_real) || (!p.causal && j == r.qpos);
}

// The keys [lo, hi) that any row in [row0, row1) can see.
__device__ __forceinline__ void tile_key_range(const MaskedAttentionParams& p, int64_t row0, int64_t row1, int64_t* lo,
                                               int64_t* hi) {
  const int64_t total = p.prefix_len + p.q_len + p.suffix_len;
  const int64_t i0 = row0 / p.groups, i1 = (min(row1, p.q_len * p.groups) - 1) / p.groups;
  *lo = 0;
  *hi = total;
  if (p.cu_seqlens != nullptr) {
    int64_t a, b;
    segment_of(p.cu_seqlens, p.num_segments, i0, lo, &b);
    segment_of(p.cu_seqlens, p.num_segments, i1, &a, hi);
  }
  if (p.causal) *hi = min(*hi, p.prefix_len + i1 + 1);
}

// 16-byte vector loads are safe for every row of a tensor with this base pointer and these strides.
template <typename T>
__device__ __forceinline__ bool vec_ok(const void* ptr, const Strides4& s) {
  constexpr int64_t kElems = 16 / sizeof(T);
  return ptr != nullptr && s.dim == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s.batch % kElems == 0 &&
         s.seq % kElems == 0 && s.head % kElems == 0;
}

// vec_ok for a cached segment that may be absent or empty (then it never constrains the loads).
template <typename T>
__device__ __forceinline__ bool segment_vec_ok(int64_t len, const void* ptr, const Strides4& s) {
  return len == 0 || vec_ok<T>(ptr, s);
}

// One row of a tile: its first element and the element stride along head_dim (nullptr: a zero row).
template <typename T>
struct RowRef {
  const T* ptr;
  int64_t dim_stride;
};

// Key (kValues = false) or value (true) row j (absolute position) of batch b, kv head kvh: j < prefix_len from
// the prefix cache, j < prefix_len + q_len from the current tokens, else from the suffix cache. Written as
// selects rather than branches on a stride pointer: ptxas then keeps the fp32 kernel at 104 registers (sm_80)
// instead of 132 (100 before the suffix); the tensor-core kernels stay within 8 of before (same blocks/SM).
template <typename T, bool kValues>
__device__ __forceinline__ RowRef<T> kv_row(const MaskedAttentionParams& p, int64_t b, int64_t j, int64_t kvh) {
  const int64_t cur_end = p.prefix_len + p.q_len;
  const bool pre = j < p.prefix_len, cur = j < cur_end;
  const Strides4& ps = kValues ? p.prefix_v_stride : p.prefix_k_stride;
  const Strides4& cs = kValues ? p.v_stride : p.k_stride;
  const Strides4& ss = kValues ? p.suffix_v_stride : p.suffix_k_stride;
  const void* base = pre   ? (kValues ? p.prefix_v : p.prefix_k)
                     : cur ? (kValues ? p.v : p.k)
                           : (kValues ? p.suffix_v : p.suffix_k);
  const int64_t jj = pre ? j : cur ? j - p.prefix_len : j - cur_end;
  const int64_t sb = pre ? ps.batch : cur ? cs.batch : ss.batch;
  const int64_t sq = pre ? ps.seq : cur ? cs.seq : ss.seq;
  const int64_t sh = pre ? ps.head : cur ? cs.head : ss.head;
  const int64_t sd = pre ? ps.dim : cur ? cs.dim : ss.dim;
  return {static_cast<const T*>(base) + b * sb + jj * sq + kvh * sh, sd};
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16).

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <int kD>
struct TcConfig {
  static constexpr int kBlockM = 64;  // rows per block (16 per warp)
  static constexpr int kBlockN = 64;  // keys per step
  static constexpr int kThreads = 128;
  static constexpr int kStride = kD + 8;  // shared row stride in elements (+16 bytes: conflict-free ldmatrix)
};

// Fills rows [0, kRows) of a shared tile (row stride kStride) from row_ref(r); channels >= head_dim are zero.
// vec: every non-null row allows 16-byte loads (head_dim stride 1, 16-byte aligned).
template <typename T, int kD, int kRows, int kStride, int kThreads, typename RowRefFn>
__device__ __forceinline__ void load_tile(T* smem, RowRefFn row_ref, int head_dim, bool vec) {
  constexpr int kChunk = 8;  // 16 bytes of 2-byte elements
  constexpr int kChunks = kD / kChunk;
#pragma unroll 4
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, d0 = (c % kChunks) * kChunk;
    const RowRef<T> src = row_ref(r);
    T* dst = smem + r * kStride + d0;
    if (src.ptr != nullptr && vec && d0 + kChunk <= head_dim) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src.ptr + d0));
    } else if (src.ptr == nullptr || d0 >= head_dim) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        dst[e] = d0 + e < head_dim ? src.ptr[(d0 + e) * src.dim_stride] : from_float<T>(0.0f);
      }
    }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(TcConfig<kD>::kThreads, 1) masked_attention_tc_kernel(const MaskedAttentionParams p) {
  using Cfg = TcConfig<kD>;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kS = Cfg::kStride, kThreads = Cfg::kThreads;
  constexpr int kDSteps = kD / 16;  // k-steps of S = Q·Kᵀ
  constexpr int kDTiles = kD / 8;   // n-tiles of O
  __shared__ __align__(16) T s_qk[kM * kS];
  __shared__ __align__(16) T s_v[kN * kS];
  __shared__ bool s_mask[kN];

  const int64_t b = blockIdx.z, kvh = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kM;
  const int64_t rows_total = p.q_len * p.groups;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int head_dim = static_cast<int>(p.head_dim);

  // Q tile -> registers (A fragments).
  const bool vec_q = vec_ok<T>(p.q, p.q_stride);
  load_tile<T, kD, kM, kS, kThreads>(
      s_qk,
      [&p, row0, rows_total, b, kvh](int r) -> RowRef<T> {
        const int64_t row = row0 + r;
        if (row >= rows_total) return {nullptr, 0};
        const int64_t i = row / p.groups, h = kvh * p.groups + row % p.groups;
        return {static_cast<const T*>(p.q) + b * p.q_stride.batch + i * p.q_stride.seq + h * p.q_stride.head,
                p.q_stride.dim};
      },
      head_dim, vec_q);
  __syncthreads();
  uint32_t qf[kDSteps][4];
#pragma unroll
  for (int kd = 0; kd < kDSteps; ++kd) {
    const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
    ldmatrix_x4(qf[kd], s_qk + r * kS + kd * 16 + 8 * (lane >> 4));
  }
  __syncthreads();

  // This thread's two rows (g and g + 8 of the warp's 16).
  RowInfo rows[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) rows[rr] = row_info(p, b, kvh, row0 + warp * 16 + g + 8 * rr);

  int64_t kv_lo, kv_hi;
  tile_key_range(p, row0, row0 + kM, &kv_lo, &kv_hi);
  const bool vec_k = vec_ok<T>(p.k, p.k_stride) && segment_vec_ok<T>(p.prefix_len, p.prefix_k, p.prefix_k_stride) &&
                     segment_vec_ok<T>(p.suffix_len, p.suffix_k, p.suffix_k_stride);
  const bool vec_v = vec_ok<T>(p.v, p.v_stride) && segment_vec_ok<T>(p.prefix_len, p.prefix_v, p.prefix_v_stride) &&
                     segment_vec_ok<T>(p.suffix_len, p.suffix_v, p.suffix_v_stride);
  const bool plain = p.key_mask == nullptr && !p.causal && p.cu_seqlens == nullptr;  // no mask to evaluate
  const float scale_log2 = p.scale * kLog2e;

  float acc[kDTiles][4];
#pragma unroll
  for (int n = 0; n < kDTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  for (int64_t j0 = kv_lo; j0 < kv_hi; j0 += kN) {
    load_tile<T, kD, kN, kS, kThreads>(
        s_qk,
        [&p, j0, kv_hi, b, kvh](int r) -> RowRef<T> {
          const int64_t j = j0 + r;
          if (j >= kv_hi) return {nullptr, 0};
          return kv_row<T, false>(p, b, j, kvh);
        },
        head_dim, vec_k);
    load_tile<T, kD, kN, kS, kThreads>(
        s_v,
        [&p, j0, kv_hi, b, kvh](int r) -> RowRef<T> {
          const int64_t j = j0 + r;
          if (j >= kv_hi) return {nullptr, 0};
          return kv_row<T, true>(p, b, j, kvh);
        },
        head_dim, vec_v);
    if (threadIdx.x < kN) {
      const int64_t j = j0 + threadIdx.x;
      s_mask[threadIdx.x] =
          j < kv_hi && (p.key_mask == nullptr || p.key_mask[b * p.key_mask_batch_stride + j * p.key_mask_seq_stride]);
    }
    __syncthreads();

    // S = Q·Kᵀ: 16 rows x 64 keys per warp, in 8 n-tiles of 8 keys.
    float s[kN / 8][4];
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kd = 0; kd < kDSteps; ++kd) {
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t kf[4];
        const int key = np * 16 + (lane & 7) + 8 * (lane >> 4);
        ldmatrix_x4(kf, s_qk + key * kS + kd * 16 + 8 * ((lane >> 3) & 1));
        MmaOp<T>::run(s[2 * np], qf[kd], kf[0], kf[1]);
        MmaOp<T>::run(s[2 * np + 1], qf[kd], kf[2], kf[3]);
      }
    }

    // Mask, scale, online softmax. Element e of n-tile n: row g + 8·(e / 2), key j0 + 8n + 2t + e % 2.
    const bool full_tile = plain && j0 + kN <= kv_hi;
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kl = n * 8 + 2 * t + (e & 1);
        const bool ok = full_tile || visible(p, rows[e >> 1], static_cast<int>(j0) + kl, s_mask[kl]);
        s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
      }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * rr], s[n][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(m_run[rr], mx);
      // Nothing visible yet: keep alpha = 1 and make every p = exp2(-inf) = 0.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_run[rr] - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) {
        s[n][2 * rr] = exp2f(s[n][2 * rr] - m_use);
        s[n][2 * rr + 1] = exp2f(s[n][2 * rr + 1] - m_use);
        sum += s[n][2 * rr] + s[n][2 * rr + 1];
      }
      l_run[rr] = l_run[rr] * alpha + sum;  // this thread's share of the row sum; reduced over the quad at the end
      m_run[rr] = m_new;
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        acc[n][2 * rr] *= alpha;
        acc[n][2 * rr + 1] *= alpha;
      }
    }

    // O += P·V: the S accumulators of n-tiles (2kk, 2kk+1) are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint32_t a[4] = {MmaOp<T>::pack(s[2 * kk][0], s[2 * kk][1]), MmaOp<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             MmaOp<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             MmaOp<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t vf[4];
        const int key = kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
        ldmatrix_x4_trans(vf, s_v + key * kS + dp * 16 + 8 * (lane >> 4));
        MmaOp<T>::run(acc[2 * dp], a, vf[0], vf[1]);
        MmaOp<T>::run(acc[2 * dp + 1], a, vf[2], vf[3]);
      }
    }
    __syncthreads();  // before the next tile overwrites s_qk / s_v
  }

  // Normalise and store; a row with l = 0 (no visible key) is written as zeros.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = l_run[rr];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const RowInfo& r = rows[rr];
    if (!r.valid) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* dst = out + b * p.out_stride.batch + r.i * p.out_stride.seq + r.h * p.out_stride.head;
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = n * 8 + 2 * t + e;
        if (d < head_dim) dst[d * p.out_stride.dim] = from_float<T>(acc[n][2 * rr + e] * inv);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// FP32 kernel.

struct F32Config {
  static constexpr int kThreads = 128;
  static constexpr int kRowsPerWarp = 4;
  static constexpr int kBlockM = 4 * kRowsPerWarp;    // 16 rows
  static constexpr int kBlockN = 32;                  // one key per lane
  static constexpr int kChannels = kMaxHeadDim / 32;  // channels per lane in P·V
};

__global__ void __launch_bounds__(F32Config::kThreads) masked_attention_f32_kernel(const MaskedAttentionParams p) {
  using Cfg = F32Config;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kR = Cfg::kRowsPerWarp, kC = Cfg::kChannels;
  constexpr int kD = kMaxHeadDim;
  __shared__ float s_q[kM][kD];
  __shared__ float s_k[kN][kD + 1];  // +1: lane j reads row j, column d: different banks
  __shared__ float s_v[kN][kD];
  __shared__ bool s_mask[kN];

  const int64_t b = blockIdx.z, kvh = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head_dim = static_cast<int>(p.head_dim);
  const float* q = static_cast<const float*>(p.q);

  for (int c = threadIdx.x; c < kM * kD; c += Cfg::kThreads) {
    const int r = c / kD, d = c % kD;
    const int64_t row = row0 + r;
    float x = 0.0f;
    if (row < p.q_len * p.groups && d < head_dim) {
      const int64_t i = row / p.groups, h = kvh * p.groups + row % p.groups;
      x = q[b * p.q_stride.batch + i * p.q_stride.seq + h * p.q_stride.head + d * p.q_stride.dim];
    }
    s_q[r][d] = x;
  }
  RowInfo rows[kR];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) rows[rr] = row_info(p, b, kvh, row0 + warp * kR + rr);
  int64_t kv_lo, kv_hi;
  tile_key_range(p, row0, row0 + kM, &kv_lo, &kv_hi);

  float acc[kR][kC];
  float m_run[kR], l_run[kR];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    m_run[rr] = -INFINITY;
    l_run[rr] = 0.0f;
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[rr][c] = 0.0f;
  }

  for (int64_t j0 = kv_lo; j0 < kv_hi; j0 += kN) {
    __syncthreads();  // the previous tile (and, first time round, nothing) is no longer read
    for (int c = threadIdx.x; c < kN * kD; c += Cfg::kThreads) {
      const int r = c / kD, d = c % kD;
      const int64_t j = j0 + r;
      float kx = 0.0f, vx = 0.0f;
      if (j < kv_hi && d < head_dim) {
        const RowRef<float> kr = kv_row<float, false>(p, b, j, kvh), vr = kv_row<float, true>(p, b, j, kvh);
        kx = kr.ptr[d * kr.dim_stride];
        vx = vr.ptr[d * vr.dim_stride];
      }
      s_k[r][d] = kx;
      s_v[r][d] = vx;
    }
    if (threadIdx.x < kN) {
      const int64_t j = j0 + threadIdx.x;
      s_mask[threadIdx.x] =
          j < kv_hi && (p.key_mask == nullptr || p.key_mask[b * p.key_mask_batch_stride + j * p.key_mask_seq_stride]);
    }
    __syncthreads();

    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kR; ++rr) {
      const float* qr = s_q[warp * kR + rr];
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < head_dim; ++d) dot = fmaf(qr[d], s_k[lane][d], dot);
      const bool ok = j < kv_hi && visible(p, rows[rr], static_cast<int>(j), s_mask[lane]);
      const float sc = ok ? dot * p.scale : -INFINITY;
      const float m_new = fmaxf(m_run[rr], warp_max(sc));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = m_new == -INFINITY ? 1.0f : expf(m_run[rr] - m_new);
      const float pr = expf(sc - m_use);
      l_run[rr] = l_run[rr] * alpha + warp_sum(pr);
      m_run[rr] = m_new;
#pragma unroll
      for (int c = 0; c < kC; ++c) acc[rr][c] *= alpha;
#pragma unroll 4
      for (int jj = 0; jj < kN; ++jj) {
        const float pj = __shfl_sync(kFullMask, pr, jj);
#pragma unroll
        for (int c = 0; c < kC; ++c) acc[rr][c] = fmaf(pj, s_v[jj][lane + 32 * c], acc[rr][c]);
      }
    }
  }

  float* out = static_cast<float*>(p.out);
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    const RowInfo& r = rows[rr];
    if (!r.valid) continue;
    const float inv = l_run[rr] > 0.0f ? 1.0f / l_run[rr] : 0.0f;
    float* dst = out + b * p.out_stride.batch + r.i * p.out_stride.seq + r.h * p.out_stride.head;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int d = lane + 32 * c;
      if (d < head_dim) dst[d * p.out_stride.dim] = acc[rr][c] * inv;
    }
  }
}

}  // namespace attention
}  // namespace cuda
}  // namespace dimple_rt
