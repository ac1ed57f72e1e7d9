// SPDX-License-Identifier: Apache-2.0
// confident_select (CUDA device code): one denoising step's token, confidence and commit mask.
// Semantics (every rounding that decides something): dimple_rt/reference.py confident_select.
//
// Kernel 1, one block of kThreads per masked row (logits (N, V), contiguous vocabulary, any row stride). The
// row is streamed from global memory (16-byte vector loads when the row is aligned) once per pass; nothing of
// it is kept in shared memory (a 152064-entry row is 300-600 KB; later passes hit L2). Passes, each only
// when the options need it:
//   max     m, the lowest index of m, the second largest z (with multiplicity), NaN/+inf check
//   sums    S0 = Σ exp(z − m) and St = Σ exp(zt − mt), zt = z / temperature, in fp64 per thread
//   top-k   the k-th largest zt: radix select on the order-preserving uint32 of zt, 4 x 8 bits, counts in a
//           256-bin shared histogram (warp-aggregated atomics: the high bits of similar floats collide)
//   top-p   the rank cut: the highest value level τ whose cumulative mass (from the top) exceeds top_p·St.
//           First a 257-bin histogram of the mass over d = mt − zt ∈ [0, 32) in 1/8-nat bins (d is monotone
//           in zt, so bins are value intervals and spread over many addresses), then the 4-pass radix on
//           the uint32 keys restricted to the crossing bin, with fp64 mass histograms. Ties at τ: the kept
//           count c follows from the mass above τ and τ's weight; only when c is less than the number of ties
//           a pass finds the c-th tie in index order (ties to the lowest index).
//   kept    per thread a CONTIGUOUS chunk of the vocabulary: Σ wk in fp64 in index order, the number of kept
//           entries and the last one with weight; a block exclusive scan of the chunk sums then names the
//           chunk where the inverse CDF crosses u·Σwk and one thread walks it (index order, as the reference's
//           cumsum): no sort, no host round trip.
//   entropy Σ p·log(p + 1e-10) (fp32 terms, fp64 sum) over the original or filtered distribution.
// Reductions are warp shuffles, then one value per warp through shared memory. All maths is fp32 from the
// upcast logits with the accurate expf/logf (no fast-math), as torch computes the reference.
//
// Kernel 2, the commit decision, one thread per entry: its group [s, e) (the whole batch, or the run of equal
// row ids), then "any confidence > threshold" or its rank by (confidence desc, index asc) against n. O(group²)
// compares over a few hundred confidences, read from L1.
//
// Tempered logits are zt = z / T, except in a row where m / T is not finite in fp32: there (z − m) / T (the
// T → 0 limit without inf − inf; the CPU kernel and the reference do the same).
//
// Values on the device are not checked (that would need a host round trip): a row without a finite maximum
// (all -inf, or a NaN/+inf entry) gets its argmax (an in-vocabulary id) and confidence NaN where the CPU op
// raises; row ids without an entry in n commit as if n were 0; uniforms outside [0, 1) clamp to the first
// or last kept entry.
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

constexpr int kThreads = 512;
constexpr int kRadixBins = 256;
constexpr int kDistBins = 257;        // 256 bins of 1/8 nat over d in [0, 32), then everything further down
constexpr float kDistBinsPerNat = 8.0f;
constexpr int kFinderBins = 288;      // 32 lanes x 9 bins >= both histograms
constexpr float kEntropyEps = 1e-10f;  // the reference's p + 1e-10, in fp32

// Order-preserving map of a float (no NaN) to uint32; -0 and +0 map to the same key.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(__fadd_rn(x, 0.0f));  // -0 + 0 = +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The fp32 values of one 16-byte vector of row elements (register moves only: no address is taken).
__device__ __forceinline__ void unpack(const uint4 raw, float (&x)[4]) {
  x[0] = __uint_as_float(raw.x);
  x[1] = __uint_as_float(raw.y);
  x[2] = __uint_as_float(raw.z);
  x[3] = __uint_as_float(raw.w);
}

template <int kN>
__device__ __forceinline__ void unpack_halves(const uint4 raw, float (&x)[kN], bool bf16) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned short lo = static_cast<unsigned short>(w[j] & 0xffffu), hi = static_cast<unsigned short>(w[j] >> 16);
    x[2 * j] = bf16 ? __bfloat162float(__ushort_as_bfloat16(lo)) : __half2float(__ushort_as_half(lo));
    x[2 * j + 1] = bf16 ? __bfloat162float(__ushort_as_bfloat16(hi)) : __half2float(__ushort_as_half(hi));
  }
}


// Calls f(index, fp32 value) for the row's entries this thread owns (strided; each thread's indices rise).
template <typename T, typename F>
__device__ __forceinline__ void for_each_entry(const T* row, int64_t V, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t tail = 0;
  if (reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    const int64_t nvec = V / kVec;
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float x[kVec];
      if constexpr (sizeof(T) == 4) {
        unpack(__ldg(vrow + v), x);
      } else {
        unpack_halves<kVec>(__ldg(vrow + v), x, std::is_same_v<T, __nv_bfloat16>);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) f(v * kVec + j, x[j]);
    }
    tail = nvec * kVec;
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) f(i, to_float(row[i]));
}

// Adds one to counts[bin] for every lane of the converged warp that holds bin (one atomic per distinct bin).
__device__ __forceinline__ void aggregated_count(unsigned* counts, int bin) {
  const unsigned peers = __match_any_sync(__activemask(), bin);
  if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(counts + bin, static_cast<unsigned>(__popc(peers)));
}

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
    int last_nonempty = -1;
    V cum_last = cum;
    for (int j = 0; j < kPerLane; ++j) {
      const V h = hist[top - j];
      if (kStrict ? cum + h > target : cum + h >= target) {
        bin = top - j;
        at = cum;
        break;
      }
      if (h > V(0)) {
        last_nonempty = top - j;
        cum_last = cum;
      }
      cum += h;
    }
    if (bin < 0) {  // the lane sum crossed but the bin-by-bin sum did not (fp64 rounding): its last mass
      bin = last_nonempty;
      at = cum_last;
    }
  }
  const int src = ballot != 0 ? __ffs(ballot) - 1 : 0;
  bin = __shfl_sync(kFullMask, bin, src);
  *before = __shfl_sync(kFullMask, at, src);
  return bin;
}

struct RowShared {
  double red_d[32];
  float red_f[32];
  int red_i[32];
  unsigned counts[kFinderBins];
  double mass[kFinderBins];
  // broadcast values
  float m, z2, kth;
  int argmax;
  bool bad;
  uint32_t tau_key, prefix;
  int bin, tie_cut;
  bool keep_all;
  double above;
  int64_t x0;
  float w_x0;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) confident_select_rows_kernel(const ConfidentSelectParams p) {
  __shared__ RowShared sh;
  const int64_t r = blockIdx.x;
  const int V = static_cast<int>(p.vocab);
  const T* row = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;

  const bool sampling = p.temperature > 0.0f;
  const bool need_orig = p.use_original_confidence;
  const bool need_filtered = !p.use_original_confidence || sampling;
  const bool top_p = need_filtered && p.top_p < 1.0;
  const bool top_k = need_filtered && p.top_k > 0 && p.top_k < p.vocab;
  const float T_ = p.temperature;

  // ---- pass: max, lowest argmax, second largest, NaN/+inf
  {
    float m1 = -INFINITY, m2 = -INFINITY;
    int idx = 0x7fffffff;
    bool bad = false;
    for_each_entry(row, V, [&](int64_t i, float z) {
      bad |= (z != z) || z == INFINITY;
      if (z > m1) {
        m2 = m1;
        m1 = z;
        idx = static_cast<int>(i);
      } else if (z > m2) {
        m2 = z;
      }
    });
    auto combine = [](float& a1, int& ai, float& a2, float b1, int bi, float b2) {
      const bool b_wins = b1 > a1 || (b1 == a1 && bi < ai);
      const float loser = b_wins ? a1 : b1;
      const float win2 = b_wins ? b2 : a2;
      if (b_wins) {
        a1 = b1;
        ai = bi;
      }
      a2 = fmaxf(win2, loser);
    };
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float b1 = __shfl_xor_sync(kFullMask, m1, o), b2 = __shfl_xor_sync(kFullMask, m2, o);
      const int bi = __shfl_xor_sync(kFullMask, idx, o);
      combine(m1, idx, m2, b1, bi, b2);
    }
    const bool any_bad = __syncthreads_or(bad);
    if (lane == 0) {
      sh.red_f[warp] = m1;
      sh.red_i[warp] = idx;
      sh.mass[warp] = m2;  // scratch
    }
    __syncthreads();
    if (warp == 0) {
      float a1 = lane < warps ? sh.red_f[lane] : -INFINITY, a2 = lane < warps ? static_cast<float>(sh.mass[lane]) : -INFINITY;
      int ai = lane < warps ? sh.red_i[lane] : 0x7fffffff;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float b1 = __shfl_xor_sync(kFullMask, a1, o), b2 = __shfl_xor_sync(kFullMask, a2, o);
        const int bi = __shfl_xor_sync(kFullMask, ai, o);
        combine(a1, ai, a2, b1, bi, b2);
      }
      if (lane == 0) {
        sh.m = a1;
        sh.z2 = a2;
        sh.argmax = ai < V ? ai : 0;
        sh.bad = any_bad || !(fabsf(a1) <= 3.4028235e38f);  // no finite maximum
      }
    }
    __syncthreads();
  }
  const float m = sh.m, z2 = sh.z2;
  const int argmax = sh.argmax;
  if (sh.bad) {  // the CPU op raises; without a host round trip the row is marked by a NaN confidence
    if (tid == 0) {
      p.x0[r] = argmax;
      p.confidence[r] = NAN;
    }
    return;
  }
  // max(z / T) == max(z) / T: division by T > 0 is monotone. When that is not finite in fp32 (a tiny T, a huge
  // logit) the row's tempered logits are (z − m) / T instead: <= 0, exactly 0 at the argmax, no inf − inf.
  const float mt_plain = sampling ? __fdiv_rn(m, T_) : m;
  const bool shifted = sampling && !isfinite(mt_plain);
  const float mt = shifted ? 0.0f : mt_plain;
  auto tempered = [&](float z) {
    return sampling ? (shifted ? __fdiv_rn(__fsub_rn(z, m), T_) : __fdiv_rn(z, T_)) : z;
  };

  // ---- pass: S0 and St
  double s0 = 0.0, st = 0.0;
  {
    double a0 = 0.0, at = 0.0;
    for_each_entry(row, V, [&](int64_t, float z) {
      if (need_orig) a0 += static_cast<double>(expf(z - m));
      if (need_filtered) at += static_cast<double>(expf(tempered(z) - mt));
    });
    if (need_orig) s0 = block_sum(a0, sh.red_d);
    if (need_filtered) st = block_sum(at, sh.red_d);
  }

  // ---- top-k: the k-th largest tempered logit (radix select on order keys, counts)
  float kth = -INFINITY;
  if (top_k) {
    uint32_t prefix = 0, mask = 0;
    unsigned k_rem = static_cast<unsigned>(p.top_k);
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < kFinderBins; b += blockDim.x) sh.counts[b] = 0;
      __syncthreads();
      for_each_entry(row, V, [&](int64_t, float z) {
        const uint32_t key = order_key(tempered(z));
        if ((key & mask) == prefix) aggregated_count(sh.counts, static_cast<int>((key >> shift) & 0xffu));
      });
      __syncthreads();
      if (warp == 0) {
        unsigned before;
        const int bin = find_crossing_bin<unsigned, false>(sh.counts, 0u, k_rem, &before);
        if (lane == 0) {
          sh.bin = bin;
          sh.counts[kFinderBins - 1] = before;  // scratch (bins >= 256 are never used by the radix)
        }
      }
      __syncthreads();
      k_rem -= sh.counts[kFinderBins - 1];
      prefix |= static_cast<uint32_t>(sh.bin) << shift;
      mask |= 0xffu << shift;
      __syncthreads();
    }
    kth = key_value(prefix);
  }

  // ---- top-p: the value level τ where the mass from the top first exceeds top_p·St, and the tie cut
  bool keep_all = true;
  uint32_t tau_key = 0;
  int tie_cut = 0x7fffffff;  // entries at τ with index <= tie_cut are kept
  if (top_p) {
    const double target = p.top_p * st;
    auto dist_bin = [&](float zt) {
      const float d = mt - zt;  // >= 0, +inf for -inf logits
      return d < 32.0f ? min(static_cast<int>(d * kDistBinsPerNat), kDistBins - 2) : kDistBins - 1;
    };
    auto clear_bins = [&] {  // zero the finder's mass and count bins, then sync
      for (int b = tid; b < kFinderBins; b += blockDim.x) {
        sh.mass[b] = 0.0;
        sh.counts[b] = 0;
      }
      __syncthreads();
    };
    // Level 1: mass per distance bin. Bin index b counts from the top, so the finder sees it reversed.
    clear_bins();
    for_each_entry(row, V, [&](int64_t, float z) {
      const float zt = tempered(z);
      const int b = dist_bin(zt);
      atomicAdd(sh.mass + (kFinderBins - 1 - b), static_cast<double>(expf(zt - mt)));
    });
    __syncthreads();
    if (warp == 0) {
      double before;
      const int fb = find_crossing_bin<double, true>(sh.mass, 0.0, target, &before);
      if (lane == 0) {
        sh.keep_all = fb < 0;
        sh.bin = fb < 0 ? 0 : kFinderBins - 1 - fb;
        sh.above = before;
      }
    }
    __syncthreads();
    keep_all = sh.keep_all;
    if (!keep_all) {
      const int dbin = sh.bin;
      double above = sh.above;  // mass of the values above the distance bin
      uint32_t prefix = 0, mask = 0;
      unsigned level_count = 0;
      for (int shift = 24; shift >= 0; shift -= 8) {
        __syncthreads();
        clear_bins();
        for_each_entry(row, V, [&](int64_t, float z) {
          const float zt = tempered(z);
          const uint32_t key = order_key(zt);
          if (dist_bin(zt) == dbin && (key & mask) == prefix) {
            const int b = static_cast<int>((key >> shift) & 0xffu);
            atomicAdd(sh.mass + b, static_cast<double>(expf(zt - mt)));
            atomicAdd(sh.counts + b, 1u);
          }
        });
        __syncthreads();
        if (warp == 0) {
          double before;
          int b = find_crossing_bin<double, true>(sh.mass, above, target, &before);
          if (b < 0) {  // fp64 rounding between the levels' sums: take the lowest non-empty bin
            before = above;
            for (int j = kRadixBins - 1; j >= 0; --j) {
              if (sh.counts[j] > 0) b = j;
            }
            for (int j = kRadixBins - 1; j > b; --j) before += sh.mass[j];
          }
          if (lane == 0) {
            sh.bin = b;
            sh.above = before;
          }
        }
        __syncthreads();
        prefix |= static_cast<uint32_t>(sh.bin) << shift;
        mask |= 0xffu << shift;
        above = sh.above;
        level_count = sh.counts[sh.bin];
      }
      tau_key = prefix;
      // Ties at τ in index order have mass before them above + j·w (j = 0, 1, ...): kept while that <= target.
      const float w_tau = expf(key_value(tau_key) - mt);
      const double room = fmax(target - above, 0.0) / static_cast<double>(w_tau);
      const unsigned keep_ties = room >= static_cast<double>(level_count - 1)
                                     ? level_count
                                     : static_cast<unsigned>(floor(room)) + 1u;
      if (keep_ties < level_count) {  // find the keep_ties-th tie in index order
        __syncthreads();
        if (tid == 0) sh.tie_cut = 0x7fffffff;
        unsigned seen = 0;
        for (int base = 0; base < V; base += blockDim.x) {
          const int i = base + tid;
          const bool hit = i < V && order_key(tempered(to_float(row[i]))) == tau_key;
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
  }

  auto kept = [&](int i, float zt) {
    if (top_k && !(zt >= kth)) return false;
    if (!top_p || keep_all) return true;
    const uint32_t key = order_key(zt);
    return key > tau_key || (key == tau_key && i <= tie_cut);
  };

  // ---- kept set: Σ wk per contiguous chunk (index order), count, last entry with weight; then the draw
  int64_t x0 = argmax;
  float w_x0 = 1.0f;  // filtered weight of the argmax: exp(0)
  double sk = st;
  int kept_count = 0;
  if (need_filtered && (sampling || top_p || top_k)) {
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int c0 = min(V, tid * chunk), c1 = min(V, c0 + chunk);
    double csum = 0.0;
    int count = 0, last = -1;
    for (int i = c0; i < c1; ++i) {
      const float zt = tempered(to_float(row[i]));
      if (kept(i, zt)) {
        const float w = expf(zt - mt);
        csum += static_cast<double>(w);
        ++count;
        if (w > 0.0f) last = i;
      }
    }
    double total;
    const double prefix = block_exclusive_scan(csum, sh.red_d, &total);
    sk = total;
    kept_count = block_sum(count, sh.red_i);
    __syncthreads();
    if (tid == 0) sh.red_i[0] = -1;
    __syncthreads();
    if (last >= 0) atomicMax(sh.red_i, last);
    __syncthreads();
    const int last_kept = sh.red_i[0];
    if (sampling) {
      const double target = static_cast<double>(p.uniforms[r]) * sk;
      // The first chunk whose inclusive running sum passes the target walks its entries.
      const bool crosses = c0 < c1 && prefix + csum > target;
      __syncthreads();
      if (tid == 0) sh.red_i[1] = 0x7fffffff;
      __syncthreads();
      if (crosses) atomicMin(sh.red_i + 1, tid);
      __syncthreads();
      const int walker = sh.red_i[1];
      if (tid == (walker == 0x7fffffff ? 0 : walker)) {
        int pick = -1;
        float wpick = 0.0f;
        if (walker != 0x7fffffff) {
          double cum = prefix;
          for (int i = c0; i < V && pick < 0; ++i) {  // past c1 only if rounding moved the crossing
            const float zt = tempered(to_float(row[i]));
            if (!kept(i, zt)) continue;
            const float w = expf(zt - mt);
            cum += static_cast<double>(w);
            if (cum > target) {
              pick = i;
              wpick = w;
            }
          }
        }
        if (pick < 0 || pick > last_kept) {  // u·Σ at or past the rounded total: the last entry with weight
          pick = last_kept;
          if (pick < 0) pick = argmax;  // no kept weight (cannot happen: the argmax weighs 1)
          wpick = expf(tempered(to_float(row[pick])) - mt);
        }
        sh.x0 = pick;
        sh.w_x0 = wpick;
      }
      __syncthreads();
      x0 = sh.x0;
      w_x0 = sh.w_x0;
    }
  }

  // ---- confidence
  const bool filtered = !need_orig;
  const bool kept_list = filtered && (top_p || top_k);
  const float sum = static_cast<float>(filtered ? (kept_list ? sk : st) : s0);
  float conf = 0.0f;
  if (p.kind == ConfidenceKind::kPlain) {
    const float w = filtered ? w_x0 : expf(to_float(row[x0]) - m);
    conf = w / sum;
  } else if (p.kind == ConfidenceKind::kMargin) {
    // top1 has weight exp(0) = 1; top2 is the entry ranked second (z2), if it is in the distribution.
    float w2;
    if (kept_list) {
      w2 = kept_count >= 2 ? expf(tempered(z2) - mt) : 0.0f;
    } else {
      w2 = filtered ? expf(tempered(z2) - mt) : expf(z2 - m);
    }
    conf = 1.0f / sum - w2 / sum;
  } else {
    double acc = 0.0;
    for_each_entry(row, V, [&](int64_t i, float z) {
      float w;
      if (filtered) {
        const float zt = tempered(z);
        w = kept(static_cast<int>(i), zt) ? expf(zt - mt) : 0.0f;
      } else {
        w = expf(z - m);
      }
      const float prob = w / sum;
      acc += static_cast<double>(prob * logf(prob + kEntropyEps));
    });
    conf = static_cast<float>(block_sum(acc, sh.red_d));
  }
  if (tid == 0) {
    p.x0[r] = x0;
    p.confidence[r] = conf;
  }
}

constexpr int kCommitThreads = 256;

// The commit decision of every entry (kernel 2); the CPU op reads the same ConfidentCommitParams.
__global__ void __launch_bounds__(kCommitThreads) commit_kernel(const ConfidentCommitParams c) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= c.num_rows) return;
  int64_t s = 0, e = c.num_rows, count = c.n[0];
  if (!c.batch_coupled) {
    const int64_t rid = c.row_ids[i];
    int64_t lo = 0, hi = i;  // first index with row_ids == rid
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (c.row_ids[mid] < rid) lo = mid + 1; else hi = mid;
    }
    s = lo;
    lo = i + 1;
    hi = c.num_rows;  // first index with row_ids > rid
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (c.row_ids[mid] <= rid) lo = mid + 1; else hi = mid;
    }
    e = lo;
    count = rid >= 0 && rid < c.groups ? c.n[rid] : 0;
  }
  const float ci = c.confidence[i];
  if (c.use_threshold) {
    bool any = false;
    for (int64_t j = s; j < e && !any; ++j) any = c.confidence[j] > c.threshold;
    if (any) {
      c.commit[i] = ci > c.threshold;
      return;
    }
  }
  int64_t rank = 0;  // entries ranked before i: higher confidence, or equal at a lower index
  for (int64_t j = s; j < e; ++j) {
    const float cj = c.confidence[j];
    rank += (cj > ci || (cj == ci && j < i)) ? 1 : 0;
  }
  c.commit[i] = rank < min(count, e - s);
}

}  // namespace select
}  // namespace cuda
}  // namespace dimple_rt
