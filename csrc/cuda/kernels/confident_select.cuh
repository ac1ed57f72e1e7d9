// SPDX-License-Identifier: Apache-2.0
// confident_select (CUDA device code): one denoising step's token, confidence and commit mask.
// Semantics (every rounding that decides something): dimple_rt/reference.py confident_select. Launcher and
// the host side of the error checks: csrc/cuda/confident_select.cu.
//
// DESIGN (each point names the code that implements it)
// 1. stats_kernel: ONE pass over the vocabulary for every mode. Per thread an online state (OnlineTop2): the
//    max m, its lowest index, the second largest z (with multiplicity), S0 = Σ exp(z − m) kept relative to
//    the running max (rescaled once per 16-byte vector when the max rises), a NaN/+inf flag. Threads merge
//    states with merge() (warp shuffles, then one state per warp through shared memory).
//    Split vocabulary: when rows x vocabulary underfill the GPU the launcher gives each row `splits` blocks
//    (gridDim.x = rows x splits, rows never in gridDim.y/z, so no 65535 limit); each writes a SplitPartial and
//    the last block of the row to arrive (row_arrivals counter, threadfence pattern) merges them: the combine
//    step. The finishing block then runs finish_row(): the value checks, commit[r] = false, and either the
//    final x0/confidence (greedy with a plain/margin confidence and no active filter: Dimple's default, done
//    in this one pass) or the row's RowStats for rows_kernel.
// 2. rows_kernel (sampling, an active top-p/top-k, neg_entropy): one block of kRowThreads per row (not split),
//    starting from RowStats (no max pass). Sections ("// ----"), each only when needed: St = Σ exp(zt − mt);
//    top-k = radix select on order keys (4 x 8 bits, integer counts, warp-aggregated atomics); top-p = LOCATE
//    the cut level with WARP-PRIVATE histograms (private_add/combine_private: integer counts + a 2^-40
//    fixed-point mass as two 32-bit integer shared atomics with an exact carry; no fp64 shared atomics, no CAS
//    loops) over the distance to the max, then 4 radix levels inside the crossing distance bin; then the
//    "Exact:" step makes the cut exact with fp64 block reductions (mass above the level, its count, the
//    adjacent levels) and steps to the adjacent level while the fixed-point sums put it off (0 steps in
//    practice, at most kMaxLevelSteps; past that the cut can differ only by levels whose total weight is under
//    the fixed-point error, V·2^-41 ≈ 7e-8 of the top weight at V = 152064). Ties at the cut level are kept in
//    index order (a coalesced ballot scan). The kept set is never stored: kept() decides.
// 3. Draw: scan_pick() walks the row in index order in COALESCED segments (thread t owns the t-th 16-byte
//    vector of the segment, so thread order is index order); per segment one block scan of per-thread fp64
//    sums, and only the segment where the running sum crosses u·Σ is walked, by the one thread that holds the
//    crossing (≤ 8 entries).
// 4. Commit: commit_group() per group (the whole batch, or the run of equal row ids found by binary search):
//    the threshold test (a block OR), else the min(n, size) most confident by radix select on the order keys
//    of the confidences (ties to the lowest index by a ballot scan). FUSED: when the batch is small
//    (fuse_commit), the block that finishes the last row runs it for every group (rows_done counter);
//    otherwise commit_kernel, one block per group.
// 5. Errors: the CPU op raises on tensor values (n < 0, row_ids order/range, uniforms outside [0, 1), a row
//    without a finite maximum). Here finish_row()/commit_group() record the lowest offending index of each
//    check in `errors` (atomicMax of ~index, 0 = none) and the launcher raises the CPU op's exact message after
//    one device-to-host copy. Under CUDA graph capture it cannot read them: such a row then gets an
//    in-vocabulary id, a NaN confidence, and NaN confidences rank last in the commit.
//
// Tempered logits are zt = z / T, except in a row where m / T is not finite in fp32: there (z − m) / T (the
// T → 0 limit without inf − inf; the CPU kernel and the reference do the same). All maths is fp32 from the
// upcast logits with the accurate expf/logf (no fast math), sums in fp64, as the reference computes them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/confident_select_params.h"
#include "cuda/kernels/device_utils.cuh"

namespace dimple_rt {
namespace cuda {
namespace select {

constexpr int kStatsThreads = 256;
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kCommitThreads = 256;
constexpr int kRadixBins = 256;
constexpr int kDistBins = 257;  // 256 bins of 1/8 nat over d in [0, 32), then everything further down
constexpr float kDistBinsPerNat = 8.0f;
constexpr int kFinderBins = 288;  // 32 lanes x 9 bins >= both histograms
constexpr float kEntropyEps = 1e-10f;  // the reference's p + 1e-10, in fp32
constexpr double kMassScale = 1099511627776.0;  // 2^40: weights are in [0, 1], V < 2^24, so sums < 2^64
constexpr int kMaxLevelSteps = 64;  // verify_level: adjacent-level steps (1 in practice)
constexpr int kStatsUnroll = 4;  // 16-byte loads in flight per thread in stats_kernel

// errors[] slots: the lowest offending index of each value check, stored as ~index (0 = none).
enum ErrorSlot : int { kErrN = 0, kErrRowIds = 1, kErrUniforms = 2, kErrLogits = 3, kNumErrorSlots = 4 };

// The per-row result of stats_kernel that rows_kernel starts from.
struct RowStats {
  float m, z2;
  int argmax, bad;
  double s0;
};

// One block's share of a row (split vocabulary), merged by the row's last block.
struct SplitPartial {
  float m1, m2;
  int idx, bad;
  double s;
};

struct SelectArgs {
  ConfidentSelectParams p;
  ConfidentCommitParams c;
  int splits = 1;                         // blocks per row in stats_kernel
  bool final_stats = false;               // stats_kernel writes x0/confidence (no rows_kernel)
  bool fuse_commit = false;               // the block finishing the last row runs every group's commit
  RowStats* stats = nullptr;              // (N,) when !final_stats
  SplitPartial* partials = nullptr;       // (N, splits) when splits > 1
  unsigned* row_arrivals = nullptr;       // (N,) zeroed, when splits > 1
  unsigned* rows_done = nullptr;          // (1,) zeroed, when fuse_commit
  unsigned long long* errors = nullptr;   // (kNumErrorSlots,) zeroed
};

// Order-preserving map of a float (no NaN) to uint32; -0 and +0 map to the same key.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(__fadd_rn(x, 0.0f));  // -0 + 0 = +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ void record_error(unsigned long long* errors, int slot, int64_t index) {
  atomicMax(errors + slot, ~static_cast<unsigned long long>(index));
}

// ---- row access: a row is [head scalars | nvec aligned 16-byte vectors | tail scalars]

template <typename T>
struct RowView {
  static constexpr int kVec = 16 / sizeof(T);
  const T* row;
  int V, head, nvec;  // head < kVec entries before the first 16-byte aligned one

  __device__ __forceinline__ RowView(const T* r, int v) : row(r), V(v) {
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(r) % 16) / sizeof(T));
    head = mis == 0 ? 0 : min(V, kVec - mis);
    nvec = (V - head) / kVec;
  }
  __device__ __forceinline__ int tail_start() const { return head + nvec * kVec; }

  // The fp32 values of aligned vector v (entries head + v·kVec ...).
  __device__ __forceinline__ void load_vec(int v, float (&x)[kVec]) const {
    unpack(__ldg(reinterpret_cast<const uint4*>(row + head) + v), x);
  }
  __device__ __forceinline__ float at(int i) const { return to_float(row[i]); }

  static __device__ __forceinline__ void unpack(const uint4 raw, float (&x)[kVec]) {
    if constexpr (sizeof(T) == 4) {
      x[0] = __uint_as_float(raw.x);
      x[1] = __uint_as_float(raw.y);
      x[2] = __uint_as_float(raw.z);
      x[3] = __uint_as_float(raw.w);
    } else {
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned short lo = static_cast<unsigned short>(w[j] & 0xffffu);
        const unsigned short hi = static_cast<unsigned short>(w[j] >> 16);
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          x[2 * j] = __bfloat162float(__ushort_as_bfloat16(lo));
          x[2 * j + 1] = __bfloat162float(__ushort_as_bfloat16(hi));
        } else {
          x[2 * j] = __half2float(__ushort_as_half(lo));
          x[2 * j + 1] = __half2float(__ushort_as_half(hi));
        }
      }
    }
  }
};

// Segments of a row for one block of nthreads: 0 = head, 1..tiles = nthreads vectors each, then the tail.
// In every segment thread t owns one contiguous index range [i0, i0 + n), rising with t: coalesced loads,
// and thread order is vocabulary order (what scan_pick needs).
template <typename T>
struct Segments {
  RowView<T> view;
  int tiles;
  __device__ __forceinline__ Segments(const RowView<T>& v) : view(v), tiles((v.nvec + blockDim.x - 1) / blockDim.x) {}
  __device__ __forceinline__ int count() const { return tiles + 2; }
  // Loads this thread's entries of segment s into x; returns n (0 if none) and the first index in *i0.
  __device__ __forceinline__ int load(int s, float (&x)[RowView<T>::kVec], int* i0) const {
    const int t = threadIdx.x;
    if (s == 0) {
      *i0 = t;
      if (t < view.head) {
        x[0] = view.at(t);
        return 1;
      }
      return 0;
    }
    if (s <= tiles) {
      const int v = (s - 1) * blockDim.x + t;
      *i0 = view.head + v * RowView<T>::kVec;
      if (v < view.nvec) {
        view.load_vec(v, x);
        return RowView<T>::kVec;
      }
      return 0;
    }
    const int i = view.tail_start() + t;
    *i0 = i;
    if (i < view.V) {
      x[0] = view.at(i);
      return 1;
    }
    return 0;
  }
};

// Calls f(index, fp32 value) for every entry this thread owns in the whole row (no barriers inside).
template <typename T, typename F>
__device__ __forceinline__ void for_each_entry(const RowView<T>& view, F&& f) {
  constexpr int kVec = RowView<T>::kVec;
  const Segments<T> seg(view);
  for (int s = 0; s < seg.count(); ++s) {
    float x[kVec];
    int i0;
    const int n = seg.load(s, x, &i0);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < n) f(i0 + j, x[j]);
    }
  }
}

// ---- 1. the one-pass statistics

// max m1 (its lowest index), second largest m2 (with multiplicity), s = Σ exp(z − m1), NaN/+inf seen.
struct OnlineTop2 {
  float m1 = -INFINITY, m2 = -INFINITY;
  int idx = 0x7fffffff;
  bool bad = false;
  double s = 0.0;

  // Entries x[0..n) at indices i0, i0 + 1, ... (this thread's indices rise from call to call).
  template <int kN>
  __device__ __forceinline__ void push(const float (&x)[kN], int n, int i0) {
    const float old = m1;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (j >= n) break;
      const float z = x[j];
      bad |= (z != z) || z == INFINITY;
      if (z > m1) {
        m2 = m1;
        m1 = z;
        idx = i0 + j;
      } else if (z > m2) {
        m2 = z;
      }
    }
    if (m1 > -INFINITY) {  // else every entry so far is -inf: weight 0
      if (m1 > old) s = old > -INFINITY ? s * exp(static_cast<double>(old) - static_cast<double>(m1)) : 0.0;
      float a = 0.0f;
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        if (j < n) a += expf(x[j] - m1);
      }
      s += static_cast<double>(a);
    }
  }

  __device__ __forceinline__ void merge(float b1, int bi, float b2, double bs, bool bbad) {
    const bool b_wins = b1 > m1 || (b1 == m1 && bi < idx);
    const float loser = b_wins ? m1 : b1;
    const float win2 = b_wins ? b2 : m2;
    const float top = b_wins ? b1 : m1;
    double sum = 0.0;
    if (top > -INFINITY) {
      if (m1 > -INFINITY) sum += s * exp(static_cast<double>(m1) - static_cast<double>(top));
      if (b1 > -INFINITY) sum += bs * exp(static_cast<double>(b1) - static_cast<double>(top));
    }
    if (b_wins) idx = bi;
    m1 = top;
    m2 = fmaxf(win2, loser);
    s = sum;
    bad |= bbad;
  }

  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float b1 = __shfl_xor_sync(kFullMask, m1, o), b2 = __shfl_xor_sync(kFullMask, m2, o);
      const int bi = __shfl_xor_sync(kFullMask, idx, o);
      const double bs = __shfl_xor_sync(kFullMask, s, o);
      const bool bb = __shfl_xor_sync(kFullMask, static_cast<int>(bad), o) != 0;
      merge(b1, bi, b2, bs, bb);
    }
  }
};

// Block-wide merge of OnlineTop2; the result is valid in warp 0 (every lane).
__device__ __forceinline__ void block_reduce_top2(OnlineTop2& st, SplitPartial* scratch) {
  st.warp_reduce();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) scratch[warp] = SplitPartial{st.m1, st.m2, st.idx, st.bad ? 1 : 0, st.s};
  __syncthreads();
  if (warp == 0) {
    st = OnlineTop2{};
    if (lane < warps) {
      const SplitPartial q = scratch[lane];
      st.m1 = q.m1;
      st.m2 = q.m2;
      st.idx = q.idx;
      st.bad = q.bad != 0;
      st.s = q.s;
    }
    st.warp_reduce();
  }
}

// ---- 4. the commit decision of one group (whole block)

// The first index with row_ids >= key (kUpper: > key) in [0, n); any input terminates in range.
template <bool kUpper>
__device__ __forceinline__ int64_t row_bound(const int64_t* ids, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t v = ids[mid];
    if (kUpper ? v <= key : v < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Confidence -> commit rank key: higher confidence, higher key; NaN (a row without a finite maximum, only
// under graph capture) ranks last.
__device__ __forceinline__ uint32_t confidence_key(float c) { return c != c ? 0u : order_key(c); }

// Warp 0 only. Scanning hist[kFinderBins - 1] down to hist[0] with a running sum that starts at base: the first
// bin b where base + Σ_{bins >= b} crosses target (> when kStrict, >= otherwise). Returns b (-1 if none) and in
// *before the running sum just before b. Lane l owns bins [kFinderBins - 9(l + 1), kFinderBins - 9l).
template <typename V, bool kStrict>
__device__ __forceinline__ int find_crossing_bin(const V* hist, V base, V target, V* before) {
  constexpr int kPerLane = kFinderBins / 32;
  const int lane = threadIdx.x & 31;
  const int top = kFinderBins - 1 - kPerLane * lane;
  V local = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) local += hist[top - j];
  V incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += y;
  }
  V excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0;
  const bool cross = kStrict ? base + incl > target : base + incl >= target;
  const unsigned ballot = __ballot_sync(kFullMask, cross);
  int bin = -1;
  V at = 0;
  if (ballot != 0 && lane == __ffs(ballot) - 1) {
    V cum = base + excl;
    for (int j = 0; j < kPerLane; ++j) {
      const V h = hist[top - j];
      if (kStrict ? cum + h > target : cum + h >= target) {
        bin = top - j;
        at = cum;
        break;
      }
      cum += h;
    }
  }
  const int src = ballot != 0 ? __ffs(ballot) - 1 : 0;
  bin = __shfl_sync(kFullMask, bin, src);
  *before = __shfl_sync(kFullMask, at, src);
  return bin;
}

__device__ void commit_group(const SelectArgs& a, int64_t g) {
  __shared__ unsigned counts[kFinderBins];
  __shared__ int s_bin;
  __shared__ unsigned s_before, s_seen;
  const ConfidentCommitParams& c = a.c;
  const int tid = threadIdx.x;
  int64_t s = 0, e = c.num_rows;
  if (!c.batch_coupled) {
    s = row_bound<false>(c.row_ids, c.num_rows, g);
    e = max(s, row_bound<true>(c.row_ids, c.num_rows, g));
  }
  const int64_t count = c.n[g];
  if (tid == 0 && count < 0) record_error(a.errors, kErrN, g);
  const float* conf = c.confidence;
  if (c.use_threshold) {
    bool any = false;
    for (int64_t i = s + tid; i < e && !any; i += blockDim.x) any = __ldcg(conf + i) > c.threshold;
    if (__syncthreads_or(any)) {
      for (int64_t i = s + tid; i < e; i += blockDim.x) c.commit[i] = __ldcg(conf + i) > c.threshold;
      return;
    }
  }
  const int64_t size = e - s;
  const int64_t k = min(max(count, int64_t{0}), size);
  if (k == 0) return;  // commit[s, e) is already false (finish_row)
  if (k == size) {
    for (int64_t i = s + tid; i < e; i += blockDim.x) c.commit[i] = true;
    return;
  }
  // Radix select of the k-th largest key; then the first k_rem ties at it in index order.
  uint32_t prefix = 0, mask = 0;
  unsigned k_rem = static_cast<unsigned>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < kFinderBins; b += blockDim.x) counts[b] = 0;
    __syncthreads();
    for (int64_t i = s + tid; i < e; i += blockDim.x) {
      const uint32_t key = confidence_key(__ldcg(conf + i));
      if ((key & mask) == prefix) atomicAdd(counts + ((key >> shift) & 0xffu), 1u);
    }
    __syncthreads();
    if (tid < 32) {
      unsigned before;
      const int bin = find_crossing_bin<unsigned, false>(counts, 0u, k_rem, &before);
      if (tid == 0) {
        s_bin = bin;
        s_before = before;
      }
    }
    __syncthreads();
    k_rem -= s_before;
    prefix |= static_cast<uint32_t>(s_bin) << shift;
    mask |= 0xffu << shift;
    __syncthreads();
  }
  const uint32_t tau = prefix;
  if (tid == 0) s_seen = 0;
  __syncthreads();
  for (int64_t base = s; base < e; base += blockDim.x) {
    const int64_t i = base + tid;
    const uint32_t key = i < e ? confidence_key(__ldcg(conf + i)) : 0u;
    const bool tie = i < e && key == tau;
    const unsigned bal = __ballot_sync(kFullMask, tie);
    if (tid % 32 == 0) counts[tid / 32] = __popc(bal);
    __syncthreads();
    unsigned before_warp = 0, total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
      if (w == tid / 32) before_warp = total;
      total += counts[w];
    }
    const unsigned seen = s_seen;
    const unsigned rank = seen + before_warp + __popc(bal & ((1u << (tid % 32)) - 1u));
    if (i < e) c.commit[i] = key > tau || (tie && rank < k_rem);
    __syncthreads();
    if (tid == 0) s_seen = seen + total;
  }
}

// The block that finishes the last row (rows_done reaches N) runs every group's commit.
__device__ __forceinline__ void maybe_commit_all(const SelectArgs& a) {
  __shared__ bool s_last;
  if (!a.fuse_commit) return;
  if (threadIdx.x == 0) {
    __threadfence();  // this block's x0/confidence/commit writes before the count
    s_last = atomicAdd(a.rows_done, 1u) == static_cast<unsigned>(a.c.num_rows - 1);
    __threadfence();
  }
  __syncthreads();
  if (!s_last) return;
  for (int64_t g = 0; g < a.c.groups; ++g) {
    commit_group(a, g);
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kCommitThreads) commit_kernel(const SelectArgs a) { commit_group(a, blockIdx.x); }

// ---- 1. (continued) the stats kernel

// Thread 0: the row's value checks, commit[r] = false, then x0/confidence (final_stats) or its RowStats.
__device__ __forceinline__ void finish_row(const SelectArgs& a, int64_t r, const OnlineTop2& st) {
  const ConfidentSelectParams& p = a.p;
  const bool bad = st.bad || !(fabsf(st.m1) <= 3.4028235e38f);  // NaN/+inf seen, or no finite maximum
  const int argmax = st.idx < p.vocab ? st.idx : 0;             // in the vocabulary whatever the row holds
  if (bad) record_error(a.errors, kErrLogits, r);
  if (p.temperature > 0.0f) {
    const float u = p.uniforms[r];
    if (!(u >= 0.0f && u < 1.0f)) record_error(a.errors, kErrUniforms, r);
  }
  const int64_t rid = a.c.row_ids[r];
  const bool order_ok = rid >= 0 && (r == 0 || rid >= a.c.row_ids[r - 1]);
  if (!order_ok || (!a.c.batch_coupled && rid >= a.c.groups)) record_error(a.errors, kErrRowIds, r);
  a.c.commit[r] = false;
  if (a.final_stats) {
    // The greedy token is the argmax, whose weight is exp(0) = 1; margin's top2 weighs exp(z2 − m).
    const float sum = static_cast<float>(st.s);
    float conf = NAN;
    if (!bad) {
      conf = 1.0f / sum;
      if (p.kind == ConfidenceKind::kMargin) conf = 1.0f / sum - expf(st.m2 - st.m1) / sum;
    }
    p.x0[r] = argmax;
    p.confidence[r] = conf;
  } else {
    a.stats[r] = RowStats{st.m1, st.m2, argmax, bad ? 1 : 0, st.s};
  }
}

template <typename T>
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(const SelectArgs a) {
  constexpr int kVec = RowView<T>::kVec;
  __shared__ SplitPartial scratch[32];
  __shared__ bool s_last;
  const int64_t r = blockIdx.x / a.splits;
  const int split = static_cast<int>(blockIdx.x % a.splits);
  const RowView<T> view(static_cast<const T*>(a.p.logits) + r * a.p.logits_row_stride, static_cast<int>(a.p.vocab));
  const int per_split = (view.nvec + a.splits - 1) / a.splits;
  const int v0 = min(view.nvec, split * per_split), v1 = min(view.nvec, v0 + per_split);
  const int t = threadIdx.x, B = blockDim.x;

  OnlineTop2 st;
  if (split == 0 && t < view.head) {
    const float x[1] = {view.at(t)};
    st.push(x, 1, t);
  }
  for (int v = v0 + t; v < v1; v += kStatsUnroll * B) {
    float x[kStatsUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      if (v + u * B < v1) view.load_vec(v + u * B, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      if (v + u * B < v1) st.push(x[u], kVec, view.head + (v + u * B) * kVec);
    }
  }
  if (split == a.splits - 1 && view.tail_start() + t < view.V) {
    const float x[1] = {view.at(view.tail_start() + t)};
    st.push(x, 1, view.tail_start() + t);
  }
  block_reduce_top2(st, scratch);

  if (a.splits > 1) {
    if (t == 0) {
      a.partials[r * a.splits + split] = SplitPartial{st.m1, st.m2, st.idx, st.bad ? 1 : 0, st.s};
      __threadfence();
      s_last = atomicAdd(a.row_arrivals + r, 1u) == static_cast<unsigned>(a.splits - 1);
      __threadfence();
    }
    __syncthreads();
    if (!s_last) return;
    if (t < 32) {  // the combine step: merge the row's partials (read from L2: other blocks wrote them)
      st = OnlineTop2{};
      for (int j = t; j < a.splits; j += 32) {
        const SplitPartial* q = a.partials + r * a.splits + j;
        st.merge(__ldcg(&q->m1), __ldcg(&q->idx), __ldcg(&q->m2), __ldcg(&q->s), __ldcg(&q->bad) != 0);
      }
      st.warp_reduce();
    }
  }
  if (t == 0) finish_row(a, r, st);
  if (a.final_stats) maybe_commit_all(a);
}

// ---- 2./3. the sampling / filter / entropy kernel

struct RowShared {
  double red_d[32];
  int red_i[32];
  unsigned red_u[32];
  // top-p: warp-private histograms (integer counts, 2^-40 fixed-point mass as lo/hi 32-bit words)
  unsigned wlo[kRowWarps][kFinderBins], whi[kRowWarps][kFinderBins], wcnt[kRowWarps][kFinderBins];
  unsigned long long mass[kFinderBins];
  unsigned counts[kFinderBins];
  int bin, tie_cut, pick;
  unsigned long long above_q;
  float w_pick;
};

__device__ __forceinline__ unsigned long long quantize_mass(float w) {
  return static_cast<unsigned long long>(static_cast<double>(w) * kMassScale + 0.5);
}

// Adds weight q and one entry to this warp's private bin (exact 64-bit sum from 32-bit atomics).
__device__ __forceinline__ void private_add(RowShared& sh, int bin, unsigned long long q) {
  const int w = threadIdx.x >> 5;
  const unsigned lo = static_cast<unsigned>(q);
  const unsigned old = atomicAdd(&sh.wlo[w][bin], lo);
  const unsigned hi = static_cast<unsigned>(q >> 32) + (old + lo < old ? 1u : 0u);  // carry out of lo
  if (hi != 0) atomicAdd(&sh.whi[w][bin], hi);
  atomicAdd(&sh.wcnt[w][bin], 1u);
}

__device__ __forceinline__ void clear_private(RowShared& sh) {
  for (int b = threadIdx.x; b < kRowWarps * kFinderBins; b += blockDim.x) {
    (&sh.wlo[0][0])[b] = 0;
    (&sh.whi[0][0])[b] = 0;
    (&sh.wcnt[0][0])[b] = 0;
  }
  __syncthreads();
}

// Sums the warp-private histograms into sh.mass / sh.counts, then syncs.
__device__ __forceinline__ void combine_private(RowShared& sh) {
  __syncthreads();
  for (int b = threadIdx.x; b < kFinderBins; b += blockDim.x) {
    unsigned long long m = 0;
    unsigned n = 0;
#pragma unroll
    for (int w = 0; w < kRowWarps; ++w) {
      m += (static_cast<unsigned long long>(sh.whi[w][b]) << 32) | sh.wlo[w][b];
      n += sh.wcnt[w][b];
    }
    sh.mass[b] = m;
    sh.counts[b] = n;
  }
  __syncthreads();
}

__device__ __forceinline__ int block_max_int(int x, int* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  int y = (threadIdx.x & 31) < static_cast<int>(blockDim.x >> 5) ? scratch[threadIdx.x & 31] : -1;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) y = max(y, __shfl_xor_sync(kFullMask, y, o));
  return y;
}

__device__ __forceinline__ unsigned block_min_u(unsigned x, unsigned* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(kFullMask, x, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  unsigned y = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : 0xffffffffu;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) y = min(y, __shfl_xor_sync(kFullMask, y, o));
  return y;
}

// 3. The draw: the first index (vocabulary order) whose running fp64 sum of w(i, z) exceeds target, with its
// weight in *w_pick; -1 if the sum never exceeds it (rounding at the very end: the caller takes the last entry
// with weight). Coalesced segments; only the crossing segment's crossing thread walks its entries.
template <typename T, typename W>
__device__ int scan_pick(const RowView<T>& view, W&& weight, double target, RowShared& sh, float* w_pick) {
  constexpr int kVec = RowView<T>::kVec;
  const Segments<T> seg(view);
  double carry = 0.0;
  for (int s = 0; s < seg.count(); ++s) {
    float x[kVec], w[kVec];
    int i0;
    const int n = seg.load(s, x, &i0);
    double own = 0.0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      w[j] = j < n ? weight(i0 + j, x[j]) : 0.0f;
      own += static_cast<double>(w[j]);
    }
    double total;
    const double excl = block_exclusive_scan(own, sh.red_d, &total);
    if (!(carry + total > target)) {  // block-uniform: every thread has the same carry and total
      carry += total;
      continue;
    }
    // The first thread whose inclusive sum passes the target walks; if rounding between the block total and
    // the per-thread sums leaves none, the last thread with weight (the segment's last weighted entry).
    const bool crosses = carry + excl + own > target;
    if (threadIdx.x == 0) {
      sh.red_i[0] = 0x7fffffff;
      sh.red_i[1] = -1;
    }
    __syncthreads();
    if (crosses) atomicMin(sh.red_i, static_cast<int>(threadIdx.x));
    if (own > 0.0) atomicMax(sh.red_i + 1, static_cast<int>(threadIdx.x));
    __syncthreads();
    const int walker = sh.red_i[0] != 0x7fffffff ? sh.red_i[0] : sh.red_i[1];
    if (static_cast<int>(threadIdx.x) == walker) {
      double cum = carry + excl;
      int pick = -1, last = -1;
      float wp = 0.0f, wl = 0.0f;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < n && pick < 0) {
          cum += static_cast<double>(w[j]);
          if (w[j] > 0.0f) {
            last = i0 + j;
            wl = w[j];
          }
          if (cum > target) {
            pick = i0 + j;
            wp = w[j];
          }
        }
      }
      if (pick < 0) {  // the thread sum crossed but the entry-by-entry sum did not (fp64 rounding)
        pick = last;
        wp = wl;
      }
      sh.pick = pick;
      sh.w_pick = wp;
    }
    __syncthreads();
    *w_pick = sh.w_pick;
    return sh.pick;
  }
  return -1;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(const SelectArgs a) {
  __shared__ RowShared sh;
  const ConfidentSelectParams& p = a.p;
  const int64_t r = blockIdx.x;
  const RowView<T> view(static_cast<const T*>(p.logits) + r * p.logits_row_stride, static_cast<int>(p.vocab));
  const int V = view.V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const RowStats rs = a.stats[r];
  if (rs.bad) {  // recorded in errors; the launcher raises unless a CUDA graph is being captured
    if (tid == 0) {
      p.x0[r] = rs.argmax;
      p.confidence[r] = NAN;
    }
    maybe_commit_all(a);
    return;
  }

  const bool sampling = p.temperature > 0.0f;
  const bool need_orig = p.use_original_confidence;
  const bool need_filtered = !p.use_original_confidence || sampling;
  const bool top_p = need_filtered && p.top_p < 1.0;
  const bool top_k = need_filtered && p.top_k > 0 && p.top_k < p.vocab;
  const float T_ = p.temperature;
  const float m = rs.m, z2 = rs.z2;
  const int argmax = rs.argmax;
  // max(z / T) == max(z) / T: division by T > 0 is monotone. When that is not finite in fp32 (a tiny T, a huge
  // logit) the row's tempered logits are (z − m) / T instead: <= 0, exactly 0 at the argmax, no inf − inf.
  const float mt_plain = sampling ? __fdiv_rn(m, T_) : m;
  const bool shifted = sampling && !isfinite(mt_plain);
  const float mt = shifted ? 0.0f : mt_plain;
  auto tempered = [&](float z) {
    return sampling ? (shifted ? __fdiv_rn(__fsub_rn(z, m), T_) : __fdiv_rn(z, T_)) : z;
  };

  // ---- St = Σ exp(zt − mt) and the last entry with weight
  double st = 0.0;
  int last_w = -1;
  if (need_filtered) {
    double acc = 0.0;
    int last = -1;
    for_each_entry(view, [&](int i, float z) {
      const float w = expf(tempered(z) - mt);
      acc += static_cast<double>(w);
      if (w > 0.0f) last = i;
    });
    st = block_sum(acc, sh.red_d);
    last_w = block_max_int(last, sh.red_i);
  }

  // ---- top-k: the k-th largest tempered logit (radix select on order keys, integer counts)
  float kth = -INFINITY;
  if (top_k) {
    uint32_t prefix = 0, mask = 0;
    unsigned k_rem = static_cast<unsigned>(p.top_k);
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < kFinderBins; b += blockDim.x) sh.counts[b] = 0;
      __syncthreads();
      for_each_entry(view, [&](int, float z) {
        const uint32_t key = order_key(tempered(z));
        if ((key & mask) == prefix) {
          const int bin = static_cast<int>((key >> shift) & 0xffu);
          const unsigned peers = __match_any_sync(__activemask(), bin);  // one atomic per distinct bin
          if (lane == __ffs(peers) - 1) atomicAdd(sh.counts + bin, static_cast<unsigned>(__popc(peers)));
        }
      });
      __syncthreads();
      if (warp == 0) {
        unsigned before;
        const int bin = find_crossing_bin<unsigned, false>(sh.counts, 0u, k_rem, &before);
        if (lane == 0) {
          sh.bin = bin;
          sh.red_u[0] = before;
        }
      }
      __syncthreads();
      k_rem -= sh.red_u[0];
      prefix |= static_cast<uint32_t>(sh.bin) << shift;
      mask |= 0xffu << shift;
      __syncthreads();
    }
    kth = key_value(prefix);
  }

  // ---- top-p: the value level τ holding the crossing of top_p·St (ranked from the top), and the tie cut
  uint32_t tau_key = 0;
  int tie_cut = 0x7fffffff;  // entries at τ with index <= tie_cut are kept
  if (top_p) {
    const double target = p.top_p * st;
    const unsigned long long target_q = static_cast<unsigned long long>(target * kMassScale);
    auto dist_bin = [&](float zt) {
      const float d = mt - zt;  // >= 0, +inf for -inf logits
      return d < 32.0f ? min(static_cast<int>(d * kDistBinsPerNat), kDistBins - 2) : kDistBins - 1;
    };
    // Locate (fixed-point mass): level 1 the distance bin (bin b counts from the top: the finder sees it
    // reversed), then 4 radix levels on the order keys inside it.
    clear_private(sh);
    for_each_entry(view, [&](int, float z) {
      const float zt = tempered(z);
      private_add(sh, kFinderBins - 1 - dist_bin(zt), quantize_mass(expf(zt - mt)));
    });
    combine_private(sh);
    if (warp == 0) {
      unsigned long long before;
      int fb = find_crossing_bin<unsigned long long, true>(sh.mass, 0ull, target_q, &before);
      if (fb < 0) {  // the quantized total does not pass the target: the lowest-ranked non-empty bin
        before = 0;
        for (int b = kFinderBins - 1; b >= 0; --b) {
          if (sh.counts[b] > 0) fb = b;
        }
        for (int b = kFinderBins - 1; b > fb; --b) before += sh.mass[b];
      }
      if (lane == 0) {
        sh.bin = kFinderBins - 1 - fb;
        sh.above_q = before;
      }
    }
    __syncthreads();
    const int dbin = sh.bin;
    unsigned long long above_q = sh.above_q;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      __syncthreads();
      clear_private(sh);
      for_each_entry(view, [&](int, float z) {
        const float zt = tempered(z);
        const uint32_t key = order_key(zt);
        if (dist_bin(zt) == dbin && (key & mask) == prefix) {
          private_add(sh, static_cast<int>((key >> shift) & 0xffu), quantize_mass(expf(zt - mt)));
        }
      });
      combine_private(sh);
      if (warp == 0) {
        unsigned long long before;
        int b = find_crossing_bin<unsigned long long, true>(sh.mass, above_q, target_q, &before);
        if (b < 0) {  // quantization: the lowest non-empty bin
          before = above_q;
          for (int j = kRadixBins - 1; j >= 0; --j) {
            if (sh.counts[j] > 0) b = j;
          }
          for (int j = kRadixBins - 1; j > b; --j) before += sh.mass[j];
        }
        if (lane == 0) {
          sh.bin = b;
          sh.above_q = before;
        }
      }
      __syncthreads();
      prefix |= static_cast<uint32_t>(sh.bin) << shift;
      mask |= 0xffu << shift;
      above_q = sh.above_q;
    }
    tau_key = prefix;

    // Exact: above(τ) = fp64 mass ranked above τ must satisfy above <= target < above + mass(τ); else step to
    // the adjacent value level (a fixed-point sum put the crossing one level off). Monotone, so it ends.
    double above = 0.0;
    unsigned level_count = 0;
    float w_tau = 0.0f;
    for (int step = 0; step < kMaxLevelSteps; ++step) {
      double acc = 0.0;
      unsigned cnt = 0, up = 0xffffffffu, down_inv = 0xffffffffu;  // down_inv: ~(max key < τ)
      for_each_entry(view, [&](int, float z) {
        const float zt = tempered(z);
        const uint32_t key = order_key(zt);
        if (key > tau_key) {
          acc += static_cast<double>(expf(zt - mt));
          up = min(up, key);
        } else if (key == tau_key) {
          ++cnt;
        } else {
          down_inv = min(down_inv, ~key);
        }
      });
      above = block_sum(acc, sh.red_d);
      level_count = block_sum(cnt, sh.red_u);
      up = block_min_u(up, sh.red_u);
      down_inv = block_min_u(down_inv, sh.red_u);
      w_tau = expf(key_value(tau_key) - mt);
      const double level_mass = static_cast<double>(level_count) * static_cast<double>(w_tau);
      // (A lower level of weight 0 changes no draw, sum or confidence: the walk stops above it.)
      if (above > target && up != 0xffffffffu) {
        tau_key = up;
      } else if (above + level_mass <= target && down_inv != 0xffffffffu &&
                 expf(key_value(~down_inv) - mt) > 0.0f) {
        tau_key = ~down_inv;
      } else {
        break;
      }
    }
    // Ties at τ in index order have mass before them above + j·w (j = 0, 1, ...): kept while that <= target.
    // (Ties of weight 0 change nothing: all kept.)
    const double room = w_tau > 0.0f ? fmax(target - above, 0.0) / static_cast<double>(w_tau) : INFINITY;
    const unsigned keep_ties =
        level_count == 0 || room >= static_cast<double>(level_count - 1) ? level_count
                                                                          : static_cast<unsigned>(floor(room)) + 1u;
    if (keep_ties < level_count) {  // the keep_ties-th tie in index order (a coalesced ballot scan)
      __syncthreads();
      if (tid == 0) sh.tie_cut = 0x7fffffff;
      unsigned seen = 0;
      const int warps = blockDim.x >> 5;
      for (int base = 0; base < V; base += blockDim.x) {
        const int i = base + tid;
        const bool hit = i < V && order_key(tempered(view.at(i))) == tau_key;
        const unsigned bal = __ballot_sync(kFullMask, hit);
        __syncthreads();
        if (lane == 0) sh.counts[warp] = __popc(bal);
        __syncthreads();
        unsigned before_warp = 0, total = 0;
        for (int w = 0; w < warps; ++w) {
          if (w == warp) before_warp = total;
          total += sh.counts[w];
        }
        if (seen + total >= keep_ties) {
          const unsigned rank = seen + before_warp + __popc(bal & ((1u << lane) - 1u)) + 1u;
          if (hit && rank == keep_ties) sh.tie_cut = i;
          break;  // block-uniform: seen and total are the same in every thread
        }
        seen += total;
      }
      __syncthreads();
      tie_cut = sh.tie_cut;
    }
  }

  auto kept = [&](int i, float zt) {
    if (top_k && !(zt >= kth)) return false;
    if (!top_p) return true;
    const uint32_t key = order_key(zt);
    return key > tau_key || (key == tau_key && i <= tie_cut);
  };
  auto kept_weight = [&](int i, float z) {
    const float zt = tempered(z);
    return kept(i, zt) ? expf(zt - mt) : 0.0f;
  };

  // ---- the kept set's mass Sk, size and last entry with weight; the draw
  const bool kept_list = top_p || top_k;
  double sk = st;
  int kept_count = 0;
  if (need_filtered && kept_list) {
    double acc = 0.0;
    int cnt = 0, last = -1;
    for_each_entry(view, [&](int i, float z) {
      const float zt = tempered(z);
      if (kept(i, zt)) {
        const float w = expf(zt - mt);
        acc += static_cast<double>(w);
        ++cnt;
        if (w > 0.0f) last = i;
      }
    });
    sk = block_sum(acc, sh.red_d);
    kept_count = block_sum(cnt, sh.red_i);
    last_w = block_max_int(last, sh.red_i);
  }
  int64_t x0 = argmax;
  float w_x0 = 1.0f;  // filtered weight of the argmax: exp(0)
  if (sampling) {
    const double target = static_cast<double>(p.uniforms[r]) * sk;
    float wp = 0.0f;
    int pick = kept_list ? scan_pick(view, kept_weight, target, sh, &wp)
                         : scan_pick(view, [&](int, float z) { return expf(tempered(z) - mt); }, target, sh, &wp);
    if (pick < 0) {  // u·Σ at or past the rounded total: the last entry with weight
      pick = last_w >= 0 ? last_w : argmax;
      wp = kept_weight(pick, view.at(pick));
    }
    x0 = pick;
    w_x0 = wp;
  }

  // ---- confidence
  const bool filtered = !need_orig;
  const bool kept_conf = filtered && kept_list;
  const float sum = static_cast<float>(filtered ? (kept_conf ? sk : st) : rs.s0);
  float conf = 0.0f;
  if (p.kind == ConfidenceKind::kPlain) {
    const float w = filtered ? w_x0 : expf(view.at(static_cast<int>(x0)) - m);
    conf = w / sum;
  } else if (p.kind == ConfidenceKind::kMargin) {
    // top1 has weight exp(0) = 1; top2 is the entry ranked second (z2), if it is in the distribution (the kept
    // set is a rank-order prefix, so it is when it holds two entries).
    float w2;
    if (kept_conf) {
      w2 = kept_count >= 2 ? expf(tempered(z2) - mt) : 0.0f;
    } else {
      w2 = filtered ? expf(tempered(z2) - mt) : expf(z2 - m);
    }
    conf = 1.0f / sum - w2 / sum;
  } else {
    double acc = 0.0;
    for_each_entry(view, [&](int i, float z) {
      const float w = filtered ? kept_weight(i, z) : expf(z - m);
      const float prob = w / sum;
      acc += static_cast<double>(prob * logf(prob + kEntropyEps));
    });
    conf = static_cast<float>(block_sum(acc, sh.red_d));
  }
  if (tid == 0) {
    p.x0[r] = x0;
    p.confidence[r] = conf;
  }
  maybe_commit_all(a);
}

}  // namespace select
}  // namespace cuda
}  // namespace dimple_rt
