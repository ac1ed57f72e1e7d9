// SPDX-License-Identifier: Apache-2.0
// masked_attention (CUDA device code): attention of the current tokens over [prefix ‖ current ‖ suffix] keys
// with an online softmax, FlashAttention-2 style, with pipelined K/V loads and split-KV for decode shapes.
// Semantics: dimple_rt/reference.py masked_attention. Grid, split and merge helpers:
// masked_attention_split.cuh. Launcher: ../masked_attention.cu.
//
// Layout: q (batch, q_len, heads, head_dim), k/v (batch, q_len, kv_heads, head_dim), prefix_k/prefix_v
// (batch, prefix_len, kv_heads, head_dim), suffix_k/suffix_v (batch, suffix_len, kv_heads, head_dim), any
// strides (16-byte vector loads where the head_dim stride is 1 and the pointer and other strides of every
// segment are 16-byte aligned, element loads otherwise). Keys are numbered by absolute position: j <
// prefix_len is read straight from the prefix cache tensors, j < prefix_len + q_len from k/v, the rest from
// the suffix cache tensors (the dual cache): nothing is concatenated (kv_row). Causal calls have no suffix.
//
// GQA packing: the rows of a tile are (query, head-in-group) pairs of ONE kv head, row = i·groups + h % groups,
// so the 7 query heads that share a kv head (Dimple-7B 28:4) share every K/V tile that is loaded: a decode
// step (65 queries) is 455 rows per kv head instead of 7 separate 65-row problems.
//
// Grid (block_coord): x = row_tile · num_splits + split; (batch, kv head) flattened over y (≤ 65535) and z, so
//   any batch · kv_heads up to 65535² launches (the launcher refuses more, and row tiles · splits ≥ 2^31).
//   A block's keys [kv_lo, kv_hi): what any of its rows can see (tile_key_range: causal -> up to its last
//   query; cu_seqlens -> its first query's segment start to its last query's segment end), cut to its split's
//   run of key tiles (split_key_range). Per score: key < kv_hi, then the row's own segment/causal limit and
//   the key mask with Dimple's forced diagonal (visible); a tile with no mask to evaluate skips all of it.
//
// Pipeline (both kernels): K and V tiles live in a ring of kStages shared-memory stages, filled by 16-byte
//   cp.async.cg (sm_80+; the src-size operand zero-fills channels past head_dim; rows past kv_hi are zero
//   stores) where every key segment allows 16-byte loads, element loads otherwise (synchronous, same ring).
//   Commit groups: [Q] [tile 0] ... [tile kStages-2] before the loop (load_tile_async, cp_async_commit).
//   Iteration it: cp_async_wait<kStages-2> (tile it has landed), ONE __syncthreads (tile it is visible to
//   all threads, and all threads are done with iteration it-1, so its stage (it-1) % kStages is free), issue
//   tile it+kStages-1 into that stage and commit (an empty group when no tile is left: the count stays
//   uniform), then the maths on stage it % kStages. The tile's key-mask bytes go through a register: loaded
//   when the tile is issued, stored into the stage's mask slot after the maths (a load-then-store at issue
//   time would stall the thread on global latency).
//
// Tensor-core kernel (bf16/fp16), 4 warps, 64 rows x 64 keys per step, head_dim padded to kD in {64, 96, 128}:
//   stages: kStages = 3 for kD = 64, 2 for 96 and 128. A stage is a K and a V tile of 64 x (kD+8) elements
//   (rows padded by 16 bytes so the 8 row addresses of every ldmatrix fall into different bank groups).
//   Dynamic shared memory (TcConfig::kSmemBytes) = kStages · 2 · 64 · (kD+8) · 2 B + kStages · 64 mask bytes:
//   69,760 B at kD = 128 and 53,376 B at 96 (2 stages), 55,488 B at 64 (3 stages). Resident blocks per SM
//   (128 threads): kD = 128 and 96 take 189-217 registers (sm_80/90 ptxas, no spills), so 2 (registers);
//   kD = 64 takes 163, so 3 (H100/H200: 228 KB of shared memory allows 4; A100: 164 KB allows 2). Capping
//   kD = 96/128 at 168 registers (3 blocks) spills 48-122 bytes, so __launch_bounds__ asks for 2 only.
//   Q is staged in the last stage's K tile (unused until iteration 0 refills it), then held in registers as
//   mma A fragments for the whole key loop.
//   per warp: 16 rows. S = Q·Kᵀ with mma.m16n8k16 (fp32 accumulation; K fragments by ldmatrix), masking and
//   the online softmax in registers (exp2 of log2e-prescaled scores; a row whose running max is still -inf
//   keeps alpha = 1 and p = 0, so a fully masked row ends with l = 0 and is written as zeros), then P is
//   rounded to the input type and O += P·V with V fragments by ldmatrix.trans. The C fragment of S has the
//   layout of the A fragment of P (FA2's register reuse), so P never goes through shared memory.
//   Epilogue: O / l goes to an fp32 64 x (kD+8) tile in the ring (float2 fragment stores, conflict-free with
//   that stride), then leaves as 16-byte stores: 8 bf16/fp16 of out per store (store_tile_out; element stores
//   where head_dim % 8 != 0 or out is strided), or 4 floats of the split's partial (store_tile_partial).
// FP32 kernel: exact fp32 FMA maths (the tolerance is 1e-5), 4 warps x 4 rows = 16 rows, 32 keys per step,
//   head_dim <= 128 zero-padded to 128, 2 stages. Lane j scores key j: float4 reads of its K row (row stride
//   132 floats: the 8 lanes of a quarter-warp hit distinct 16-byte bank groups) against broadcast float4 reads
//   of Q, channels in order. P·V: lane l owns channels [4l, 4l + 4), float4 reads of V rows (shared by the
//   warp's 4 rows), p broadcast by shuffles; float4 stores. Dynamic shared memory: Q 16 x 128 + 2 x (K 32 x
//   132 + V 32 x 128) floats + 64 mask bytes = 74,816 B: 3 blocks per SM on H100, 2 on A100 (105-128
//   registers allow 4).
//
// Split-KV (masked_attention_split.cuh). A decode step has few row tiles (Dimple-7B, batch 1, canvas 64: 7
//   row tiles x 4 kv heads = 28 blocks for 132 SMs), so the keys of a row tile are dealt to num_splits blocks.
//   Split s writes O_s = (Σ_{j∈s} 2^(x_j - m_s) v_j) / l_s, l_s = Σ_{j∈s} 2^(x_j - m_s), as fp32 (workspace row
//   stride kD) and L_s = m_s + log2(l_s) (x: log2e-scaled scores; the fp32 kernel converts (m + ln l)·log2e),
//   L_s = -inf when it saw no key. The merge kernel (one warp per (b, i, h) row) takes M = max_s L_s,
//   w_s = 2^(L_s - M) and writes Σ_s w_s O_s / Σ_s w_s, rounded once to q's dtype: w_s · O_s = 2^-M Σ_{j∈s}
//   2^(x_j) v_j, so this is the unsplit softmax up to fp32 rounding; M = -inf (no visible key at all) writes
//   zeros. Workspace: num_splits · rows · (kD + 1) · 4 bytes.
//   The number of splits (choose_num_splits, host): FlashAttention-2's rule over the device's resident-block
//   capacity (multiprocessor count x cudaOccupancyMaxActiveBlocksPerMultiprocessor of the kernel): none once
//   the grid fills 80% of the capacity, else the smallest count within 85% of the best wave efficiency, at
//   least 2 key tiles per split, at most 64 splits. Examples, H100 (132 SMs x 2 resident blocks), Dimple-7B
//   bf16: batch 1, canvas 64 over 2048 prefix keys: 28 blocks, 33 key tiles -> 7 splits (runs of 5 tiles), 196
//   blocks; canvas 32 over 2048: 16 blocks -> 11 splits; canvas 256 over 2048: 112 blocks -> 2 splits; batch 4,
//   canvas 256: 448 blocks -> no split. DIMPLE_RT_ATTENTION_SPLITS=n forces n splits (the tests use it to
//   reach split boundaries, empty splits and splits whose keys are all masked on any GPU).
//
// Not done: a wgmma (sm_90a) path; the mma.sync path above runs on sm_90 as on sm_80.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/masked_attention_params.h"
#include "cuda/kernels/device_utils.cuh"
#include "cuda/kernels/masked_attention_split.cuh"

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
  return vec_ok_bytes<T, 16>(ptr, s);
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
// Asynchronous copies (cp.async, sm_80+; a synchronous copy on older arches so the file compiles for them).

// Copies src_bytes (0 < src_bytes <= 16, a multiple of 2) from global src to 16-byte-aligned shared dst and
// zero-fills the rest of the 16 bytes. src must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(src_bytes) : "memory");
#else
  if (src_bytes == 16) {
    *static_cast<uint4*>(dst) = __ldg(static_cast<const uint4*>(src));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* d = static_cast<uint16_t*>(dst);
#pragma unroll
    for (int e = 0; e < 8; ++e) d[e] = 2 * e < src_bytes ? s[e] : uint16_t{0};
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Issues the fill of rows [0, kRows) x columns [0, kCols) of a shared tile (row stride kStride elements) from
// row_ref(r); columns >= head_dim and null rows become zeros. vec: every non-null row allows 16-byte loads
// (cp.async, asynchronous: the caller commits and waits); else element loads (synchronous).
template <typename T, int kRows, int kCols, int kStride, int kThreads, typename RowRefFn>
__device__ __forceinline__ void load_tile_async(T* smem, RowRefFn row_ref, int head_dim, bool vec) {
  constexpr int kChunk = 16 / sizeof(T);  // elements per 16 bytes
  constexpr int kChunks = kCols / kChunk;
  static_assert(kCols % kChunk == 0 && (kRows * kChunks) % kThreads == 0, "whole chunks per thread");
// Not unrolled: unrolling hoists every chunk's address maths (kD = 64: 240 registers instead of 163).
#pragma unroll 1
  for (int k = 0; k < kRows * kChunks / kThreads; ++k) {
    const int c = static_cast<int>(threadIdx.x) + k * kThreads;
    const int r = c / kChunks, d0 = (c % kChunks) * kChunk;
    const RowRef<T> src = row_ref(r);
    T* dst = smem + r * kStride + d0;
    const int n = src.ptr == nullptr ? 0 : max(0, min(kChunk, head_dim - d0));  // real elements in the chunk
    if (n == 0) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else if (vec) {
      cp_async_16(dst, src.ptr + d0, n * static_cast<int>(sizeof(T)));
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) dst[e] = e < n ? src.ptr[(d0 + e) * src.dim_stride] : from_float<T>(0.0f);
    }
  }
}

// The key-mask byte of key j for this block (true without a mask; false past the block's keys).
__device__ __forceinline__ bool key_real(const MaskedAttentionParams& p, int64_t b, int64_t j, int64_t kv_hi) {
  return j < kv_hi && (p.key_mask == nullptr || p.key_mask[b * p.key_mask_batch_stride + j * p.key_mask_seq_stride]);
}

// Stores rows [0, kM) of an fp32 staging tile (row stride kOS floats; row r = (query, head-in-group) pair row0 + r
// of kv head kvh) to out in its dtype: 16-byte stores where out allows them (head_dim stride 1, 16-byte
// aligned rows, head_dim a multiple of the vector), element stores otherwise.
template <typename T, int kM, int kD, int kOS, int kThreads>
__device__ __forceinline__ void store_tile_out(const MaskedAttentionParams& p, const float* s_o, int64_t b,
                                               int64_t kvh, int64_t row0) {
  constexpr int kChunk = 16 / sizeof(T);
  constexpr int kChunks = kD / kChunk;
  const int head_dim = static_cast<int>(p.head_dim);
  const bool vec = vec_ok<T>(p.out, p.out_stride) && head_dim % kChunk == 0;
  const int64_t rows_total = p.q_len * p.groups;
  T* out = static_cast<T*>(p.out);
#pragma unroll 2
  for (int c = static_cast<int>(threadIdx.x); c < kM * kChunks; c += kThreads) {
    const int r = c / kChunks, d0 = (c % kChunks) * kChunk;
    const int64_t row = row0 + r;
    if (row >= rows_total || d0 >= head_dim) continue;
    const int64_t i = row / p.groups, h = kvh * p.groups + row % p.groups;
    T* dst = out + b * p.out_stride.batch + i * p.out_stride.seq + h * p.out_stride.head;
    const float* src = s_o + r * kOS + d0;
    if (vec) {
      uint4 u;
      T* v = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) v[e] = from_float<T>(src[e]);
      *reinterpret_cast<uint4*>(dst + d0) = u;
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        if (d0 + e < head_dim) dst[(d0 + e) * p.out_stride.dim] = from_float<T>(src[e]);
      }
    }
  }
}

// Stores rows [0, kM) of an fp32 staging tile as split `split`'s partial output: 16-byte stores of all kD
// (padded) channels into the workspace (row stride sp.ws_stride == kD, 16-byte aligned).
template <int kM, int kD, int kOS, int kThreads>
__device__ __forceinline__ void store_tile_partial(const MaskedAttentionParams& p, const SplitKvParams& sp,
                                                   const float* s_o, int64_t b, int64_t kvh, int64_t row0,
                                                   int split) {
  constexpr int kChunks = kD / 4;
  const int64_t rows_total = p.q_len * p.groups;
#pragma unroll 2
  for (int c = static_cast<int>(threadIdx.x); c < kM * kChunks; c += kThreads) {
    const int r = c / kChunks, d0 = (c % kChunks) * 4;
    const int64_t row = row0 + r;
    if (row >= rows_total) continue;
    const int64_t i = row / p.groups, h = kvh * p.groups + row % p.groups;
    float* dst = sp.o_partial + (split * sp.rows_flat + flat_row(p, b, i, h)) * sp.ws_stride + d0;
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(s_o + r * kOS + d0);
  }
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
  static constexpr int kStride = kD + 8;   // shared row stride in elements (+16 bytes: conflict-free ldmatrix)
  static constexpr int kOStride = kD + 8;  // fp32 output staging row stride (conflict-free float2 stores)
  static constexpr int kStages = kD <= 64 ? 3 : 2;
  static constexpr int kTileElems = kBlockN * kStride;  // one K or one V tile
  static constexpr int kRingBytes = kStages * 2 * kTileElems * 2;
  static constexpr int kSmemBytes = kRingBytes + kStages * kBlockN;  // + the key-mask bytes of each stage
  static_assert(kBlockM * kStride <= kTileElems, "Q is staged in one K tile");
  static_assert(kBlockM * kOStride * 4 <= kRingBytes, "the fp32 output tile is staged in the ring");
};

template <typename T, int kD>
__global__ void __launch_bounds__(TcConfig<kD>::kThreads, 2)
    masked_attention_tc_kernel(const MaskedAttentionParams p, const SplitKvParams sp) {
  using Cfg = TcConfig<kD>;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kS = Cfg::kStride, kThreads = Cfg::kThreads;
  constexpr int kStages = Cfg::kStages, kTE = Cfg::kTileElems, kOS = Cfg::kOStride;
  constexpr int kDSteps = kD / 16;  // k-steps of S = Q·Kᵀ
  constexpr int kDTiles = kD / 8;   // n-tiles of O
  extern __shared__ __align__(16) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);  // stage s: K tile at ring + 2s·kTE, V tile right after it
  bool* s_mask = reinterpret_cast<bool*>(smem + Cfg::kRingBytes);  // stage s: s_mask[s·kN, (s+1)·kN)

  const BlockCoord bc = block_coord(p, sp, kM);
  if (!bc.valid) return;
  const int64_t b = bc.b, kvh = bc.kvh, row0 = bc.row0;
  const int64_t rows_total = p.q_len * p.groups;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int head_dim = static_cast<int>(p.head_dim);

  int64_t kv_lo, kv_hi;
  tile_key_range(p, row0, row0 + kM, &kv_lo, &kv_hi);
  split_key_range(&kv_lo, &kv_hi, bc.split, sp.num_splits, kN);
  const int n_tiles = kv_hi > kv_lo ? static_cast<int>((kv_hi - kv_lo + kN - 1) / kN) : 0;

  const bool vec_q = vec_ok<T>(p.q, p.q_stride);
  const bool vec_k = vec_ok<T>(p.k, p.k_stride) && segment_vec_ok<T>(p.prefix_len, p.prefix_k, p.prefix_k_stride) &&
                     segment_vec_ok<T>(p.suffix_len, p.suffix_k, p.suffix_k_stride);
  const bool vec_v = vec_ok<T>(p.v, p.v_stride) && segment_vec_ok<T>(p.prefix_len, p.prefix_v, p.prefix_v_stride) &&
                     segment_vec_ok<T>(p.suffix_len, p.suffix_v, p.suffix_v_stride);
  // Issues key tile `tile` (keys kv_lo + tile·kN ...) into its stage.
  auto issue_kv = [&](int tile) {
    const int64_t j0 = kv_lo + static_cast<int64_t>(tile) * kN;
    T* s_k = ring + 2 * (tile % kStages) * kTE;
    load_tile_async<T, kN, kD, kS, kThreads>(
        s_k,
        [&p, j0, kv_hi, b, kvh](int r) -> RowRef<T> {
          const int64_t j = j0 + r;
          if (j >= kv_hi) return {nullptr, 0};
          return kv_row<T, false>(p, b, j, kvh);
        },
        head_dim, vec_k);
    load_tile_async<T, kN, kD, kS, kThreads>(
        s_k + kTE,
        [&p, j0, kv_hi, b, kvh](int r) -> RowRef<T> {
          const int64_t j = j0 + r;
          if (j >= kv_hi) return {nullptr, 0};
          return kv_row<T, true>(p, b, j, kvh);
        },
        head_dim, vec_v);
  };

  // Prologue: Q into the last stage's K tile, tiles 0 .. kStages-2 into their stages; one group each.
  T* s_q = ring + 2 * (kStages - 1) * kTE;
  load_tile_async<T, kM, kD, kS, kThreads>(
      s_q,
      [&p, row0, rows_total, b, kvh](int r) -> RowRef<T> {
        const int64_t row = row0 + r;
        if (row >= rows_total) return {nullptr, 0};
        const int64_t i = row / p.groups, h = kvh * p.groups + row % p.groups;
        return {static_cast<const T*>(p.q) + b * p.q_stride.batch + i * p.q_stride.seq + h * p.q_stride.head,
                p.q_stride.dim};
      },
      head_dim, vec_q);
  cp_async_commit();
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) {
    if (tile < n_tiles) {
      issue_kv(tile);
      if (tid < kN) s_mask[tile * kN + tid] = key_real(p, b, kv_lo + tile * kN + tid, kv_hi);
    }
    cp_async_commit();
  }
  cp_async_wait<kStages - 1>();  // the Q group has landed (the tile groups may still be in flight)
  __syncthreads();
  uint32_t qf[kDSteps][4];
#pragma unroll
  for (int kd = 0; kd < kDSteps; ++kd) {
    const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
    ldmatrix_x4(qf[kd], s_q + r * kS + kd * 16 + 8 * (lane >> 4));
  }

  // This thread's two rows (g and g + 8 of the warp's 16).
  RowInfo rows[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) rows[rr] = row_info(p, b, kvh, row0 + warp * 16 + g + 8 * rr);

  const bool plain = p.key_mask == nullptr && !p.causal && p.cu_seqlens == nullptr;  // no mask to evaluate
  const float scale_log2 = p.scale * kLog2e;

  float acc[kDTiles][4];
#pragma unroll
  for (int n = 0; n < kDTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();  // tile `it` has landed (this thread's copies)
    __syncthreads();               // ... everyone's; and stage (it - 1) % kStages is no longer read
    const int next = it + kStages - 1;
    bool next_real = false;
    if (next < n_tiles) {
      issue_kv(next);
      if (tid < kN) next_real = key_real(p, b, kv_lo + static_cast<int64_t>(next) * kN + tid, kv_hi);
    }
    cp_async_commit();

    const int stage = it % kStages;
    const T* s_k = ring + 2 * stage * kTE;
    const T* s_v = s_k + kTE;
    const bool* s_m = s_mask + stage * kN;
    const int64_t j0 = kv_lo + static_cast<int64_t>(it) * kN;

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
        ldmatrix_x4(kf, s_k + key * kS + kd * 16 + 8 * ((lane >> 3) & 1));
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
        const bool ok = full_tile || (j0 + kl < kv_hi && visible(p, rows[e >> 1], static_cast<int>(j0) + kl, s_m[kl]));
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
    // The mask slot of stage `next` was last read in iteration it - 1 (before this iteration's barrier).
    if (next < n_tiles && tid < kN) s_mask[(next % kStages) * kN + tid] = next_real;
  }

  // Epilogue: normalise into an fp32 tile in the ring (rows with l = 0 saw no key: zeros), then 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();  // every thread is done with the ring
  float* s_o = reinterpret_cast<float*>(smem);
  const bool partial = sp.o_partial != nullptr;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = l_run[rr];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int r = warp * 16 + g + 8 * rr;
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
      *reinterpret_cast<float2*>(s_o + r * kOS + n * 8 + 2 * t) =
          make_float2(acc[n][2 * rr] * inv, acc[n][2 * rr + 1] * inv);
    }
    if (partial && t == 0 && rows[rr].valid) {
      sp.lse[bc.split * sp.rows_flat + flat_row(p, b, rows[rr].i, rows[rr].h)] =
          l > 0.0f ? m_run[rr] + log2f(l) : -INFINITY;
    }
  }
  __syncthreads();
  if (partial) {
    store_tile_partial<kM, kD, kOS, kThreads>(p, sp, s_o, b, kvh, row0, bc.split);
  } else {
    store_tile_out<T, kM, kD, kOS, kThreads>(p, s_o, b, kvh, row0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// FP32 kernel.

struct F32Config {
  static constexpr int kThreads = 128;
  static constexpr int kRowsPerWarp = 4;
  static constexpr int kBlockM = 4 * kRowsPerWarp;  // 16 rows
  static constexpr int kBlockN = 32;                // one key per lane
  static constexpr int kD = kMaxHeadDim;            // head_dim zero-padded to 128
  static constexpr int kKStride = kD + 4;           // K rows: lane j reads row j as float4s, conflict-free
  static constexpr int kStages = 2;
  static constexpr int kQFloats = kBlockM * kD;
  static constexpr int kStageFloats = kBlockN * kKStride + kBlockN * kD;  // K tile, then V tile
  static constexpr int kSmemBytes = (kQFloats + kStages * kStageFloats) * 4 + kStages * kBlockN;
};

__global__ void __launch_bounds__(F32Config::kThreads)
    masked_attention_f32_kernel(const MaskedAttentionParams p, const SplitKvParams sp) {
  using Cfg = F32Config;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kR = Cfg::kRowsPerWarp, kD = Cfg::kD;
  constexpr int kKS = Cfg::kKStride, kStages = Cfg::kStages, kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  float* s_q = reinterpret_cast<float*>(smem);  // kM x kD
  float* ring = s_q + Cfg::kQFloats;            // stage s: K (kN x kKS) at ring + s·kStageFloats, V (kN x kD) after
  bool* s_mask = reinterpret_cast<bool*>(ring + kStages * Cfg::kStageFloats);

  const BlockCoord bc = block_coord(p, sp, kM);
  if (!bc.valid) return;
  const int64_t b = bc.b, kvh = bc.kvh, row0 = bc.row0;
  const int64_t rows_total = p.q_len * p.groups;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const int head_dim = static_cast<int>(p.head_dim);

  int64_t kv_lo, kv_hi;
  tile_key_range(p, row0, row0 + kM, &kv_lo, &kv_hi);
  split_key_range(&kv_lo, &kv_hi, bc.split, sp.num_splits, kN);
  const int n_tiles = kv_hi > kv_lo ? static_cast<int>((kv_hi - kv_lo + kN - 1) / kN) : 0;

  const bool vec_q = vec_ok<float>(p.q, p.q_stride);
  const bool vec_k = vec_ok<float>(p.k, p.k_stride) &&
                     segment_vec_ok<float>(p.prefix_len, p.prefix_k, p.prefix_k_stride) &&
                     segment_vec_ok<float>(p.suffix_len, p.suffix_k, p.suffix_k_stride);
  const bool vec_v = vec_ok<float>(p.v, p.v_stride) &&
                     segment_vec_ok<float>(p.prefix_len, p.prefix_v, p.prefix_v_stride) &&
                     segment_vec_ok<float>(p.suffix_len, p.suffix_v, p.suffix_v_stride);
  auto issue_kv = [&](int tile) {
    const int64_t j0 = kv_lo + static_cast<int64_t>(tile) * kN;
    float* s_k = ring + (tile % kStages) * Cfg::kStageFloats;
    load_tile_async<float, kN, kD, kKS, kThreads>(
        s_k,
        [&p, j0, kv_hi, b, kvh](int r) -> RowRef<float> {
          const int64_t j = j0 + r;
          if (j >= kv_hi) return {nullptr, 0};
          return kv_row<float, false>(p, b, j, kvh);
        },
        head_dim, vec_k);
    load_tile_async<float, kN, kD, kD, kThreads>(
        s_k + kN * kKS,
        [&p, j0, kv_hi, b, kvh](int r) -> RowRef<float> {
          const int64_t j = j0 + r;
          if (j >= kv_hi) return {nullptr, 0};
          return kv_row<float, true>(p, b, j, kvh);
        },
        head_dim, vec_v);
  };

  // Prologue: Q, then tiles 0 .. kStages-2; one group each. Q is first read after iteration 0's wait.
  load_tile_async<float, kM, kD, kD, kThreads>(
      s_q,
      [&p, row0, rows_total, b, kvh](int r) -> RowRef<float> {
        const int64_t row = row0 + r;
        if (row >= rows_total) return {nullptr, 0};
        const int64_t i = row / p.groups, h = kvh * p.groups + row % p.groups;
        return {static_cast<const float*>(p.q) + b * p.q_stride.batch + i * p.q_stride.seq + h * p.q_stride.head,
                p.q_stride.dim};
      },
      head_dim, vec_q);
  cp_async_commit();
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) {
    if (tile < n_tiles) {
      issue_kv(tile);
      if (tid < kN) s_mask[tile * kN + tid] = key_real(p, b, kv_lo + tile * kN + tid, kv_hi);
    }
    cp_async_commit();
  }

  RowInfo rows[kR];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) rows[rr] = row_info(p, b, kvh, row0 + warp * kR + rr);
  const int d_end = (head_dim + 3) & ~3;  // K and Q are zero past head_dim: the dot runs over whole float4s

  // Lane l owns output channels [4l, 4l + 4).
  float acc[kR][4];
  float m_run[kR], l_run[kR];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    m_run[rr] = -INFINITY;
    l_run[rr] = 0.0f;
    acc[rr][0] = acc[rr][1] = acc[rr][2] = acc[rr][3] = 0.0f;
  }

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = it + kStages - 1;
    bool next_real = false;
    if (next < n_tiles) {
      issue_kv(next);
      if (tid < kN) next_real = key_real(p, b, kv_lo + static_cast<int64_t>(next) * kN + tid, kv_hi);
    }
    cp_async_commit();

    const int stage = it % kStages;
    const float* s_k = ring + stage * Cfg::kStageFloats;
    const float* s_v = s_k + kN * kKS;
    const bool* s_m = s_mask + stage * kN;
    const int64_t j = kv_lo + static_cast<int64_t>(it) * kN + lane;

    // Scores of key j for the warp's 4 rows (fp32 FMAs in channel order).
    float dot[kR] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* krow = s_k + lane * kKS;
#pragma unroll 4
    for (int d = 0; d < d_end; d += 4) {
      const float4 kx = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
      for (int rr = 0; rr < kR; ++rr) {
        const float4 qx = *reinterpret_cast<const float4*>(s_q + (warp * kR + rr) * kD + d);
        dot[rr] = fmaf(qx.x, kx.x, dot[rr]);
        dot[rr] = fmaf(qx.y, kx.y, dot[rr]);
        dot[rr] = fmaf(qx.z, kx.z, dot[rr]);
        dot[rr] = fmaf(qx.w, kx.w, dot[rr]);
      }
    }
    float pr[kR];
#pragma unroll
    for (int rr = 0; rr < kR; ++rr) {
      const bool ok = j < kv_hi && visible(p, rows[rr], static_cast<int>(j), s_m[lane]);
      const float sc = ok ? dot[rr] * p.scale : -INFINITY;
      const float m_new = fmaxf(m_run[rr], warp_max(sc));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = m_new == -INFINITY ? 1.0f : expf(m_run[rr] - m_new);
      pr[rr] = expf(sc - m_use);
      l_run[rr] = l_run[rr] * alpha + warp_sum(pr[rr]);
      m_run[rr] = m_new;
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[rr][c] *= alpha;
    }
    // O += P·V: one float4 of V row jj per lane, shared by the 4 rows.
#pragma unroll 4
    for (int jj = 0; jj < kN; ++jj) {
      const float4 vx = *reinterpret_cast<const float4*>(s_v + jj * kD + 4 * lane);
#pragma unroll
      for (int rr = 0; rr < kR; ++rr) {
        const float pj = __shfl_sync(kFullMask, pr[rr], jj);
        acc[rr][0] = fmaf(pj, vx.x, acc[rr][0]);
        acc[rr][1] = fmaf(pj, vx.y, acc[rr][1]);
        acc[rr][2] = fmaf(pj, vx.z, acc[rr][2]);
        acc[rr][3] = fmaf(pj, vx.w, acc[rr][3]);
      }
    }
    if (next < n_tiles && tid < kN) s_mask[(next % kStages) * kN + tid] = next_real;
  }
  cp_async_wait<0>();  // only empty groups can be left; nothing reads the ring after this

  // Lane-owned float4 stores: out (element stores where it is strided or head_dim % 4 != 0) or the partial.
  float* out = static_cast<float*>(p.out);
  const bool vec_out = vec_ok<float>(p.out, p.out_stride) && head_dim % 4 == 0;
  const int d0 = 4 * lane;
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    const RowInfo& r = rows[rr];
    if (!r.valid) continue;
    const float inv = l_run[rr] > 0.0f ? 1.0f / l_run[rr] : 0.0f;
    const float o[4] = {acc[rr][0] * inv, acc[rr][1] * inv, acc[rr][2] * inv, acc[rr][3] * inv};
    if (sp.o_partial != nullptr) {
      const int64_t fr = bc.split * sp.rows_flat + flat_row(p, b, r.i, r.h);
      store4(sp.o_partial + fr * sp.ws_stride + d0, o);
      if (lane == 0) sp.lse[fr] = l_run[rr] > 0.0f ? (m_run[rr] + logf(l_run[rr])) * kLog2e : -INFINITY;
      continue;
    }
    if (d0 >= head_dim) continue;
    float* dst = out + b * p.out_stride.batch + r.i * p.out_stride.seq + r.h * p.out_stride.head;
    if (vec_out) {
      store4(dst + d0, o);
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (d0 + c < head_dim) dst[(d0 + c) * p.out_stride.dim] = o[c];
      }
    }
  }
}

}  // namespace attention
}  // namespace cuda
}  // namespace dimple_rt
