// SPDX-License-Identifier: Apache-2.0
// confident_select (CPU): one denoising step's token choice, confidence and commit mask, fused.
//
// logits: (N, V) rows of the masked canvas positions (row-major (batch, position) order), any row stride,
// contiguous vocabulary (the launcher copies otherwise). Per row, in fp32 (dimple_rt/reference.py
// confident_select is the executable spec and defines every rounding that matters):
//   pass 1  max, lowest argmax and second largest of z (per-lane max1/max2/index in two interleaved lane
//           sets, reduced at the end); with top-k also the k-th largest tempered logit (a candidate buffer
//           above a rising threshold, compacted with nth_element: O(V + k log V), no vocabulary sort);
//   pass 2  w0 = exp(z − m) and/or wt = exp(z/T − m/T), summed per block of 4 vectors into doubles (the
//           block sums are the inverse-CDF table when sampling); the candidates: with top-k the entries
//           ≥ the k-th largest (the kept set is a rank-order prefix of them), with top-p alone the entries
//           wt ≥ exp(−24) (P ⊆ candidates whenever their mass exceeds top_p·ΣW, which is checked);
//   pass 3  only for neg_entropy over a whole distribution: Σ p·log(p + 1e-10).
// The greedy step with the original distribution's plain/margin confidence (Dimple's default) fuses passes
// 1 and 2 per L1-sized chunk with an online rescale (fused_max_sum), so the row is read from memory once;
// otherwise passes 2/3 re-read it (600 KB per fp32 row of Dimple's 152064-token vocabulary, from L2/L3).
// Top-p alone finds the nucleus with a 512-bucket histogram of the logit gap (buckets before the crossing
// are kept whole), then halving with nth_element inside the crossing bucket (linear), sorting only the
// last ≤ 32 entries. Sampling is an inverse CDF in vocabulary order driven by the caller's uniform, so a
// run is reproducible and independent of the thread count. Rows run in parallel (at::parallel_for, each
// thread with its own scratch); the commit decision (threshold, else the n most confident per group) is a
// cheap serial pass over the N confidences afterwards. Vector loops are at::vec::Vectorized<float>; a
// partial last vector is padded with -inf, which every pass treats as probability 0, and is masked out of
// the candidate lists.
//
// Tempered logits are zt = z / T (fp32), except in a row where max(z) / T is not finite in fp32 (a tiny T or a
// huge logit): there zt = (z − max z) / T, which is <= 0 and exactly 0 at the argmax, the T → 0 limit done
// without inf − inf. Every tempered quantity goes through tempered() / tempered1(), which switch per row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/confident_select.h"
#include "common/dispatch.h"
#include "ops.h"

namespace dimple_rt {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kBlockVecs = 4;  // fp32 lane sums are flushed into a double every kBlockVecs vectors
constexpr int64_t kBlock = kBlockVecs * kVec;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Top-p candidates are the tokens within kCandidateGap nats of the best one. The rest weighs at most
// V·e^-24 ≈ 6e-6 of the total for V = 152064, so the candidates hold the nucleus unless top_p is within
// that of 1 (then every token with a nonzero weight becomes a candidate).
constexpr float kCandidateGap = 24.0f;
constexpr int64_t kSortTail = 32;  // top-p halving stops at this many undecided candidates
const float kEntropyEps = 1e-10f;  // the reference's p + 1e-10, in fp32

// The fp32 vector of row elements [i, i + kVec); lanes at or past V are -inf.
template <typename T>
inline Vec load_logits(const T* row, int64_t i, int64_t V) {
  if (i + kVec <= V) {
    if constexpr (std::is_same_v<T, float>) {
      return Vec::loadu(row + i);
    } else {
      Vec f;
      at::vec::load_to_float(row + i, f);
      return f;
    }
  }
  alignas(64) float buf[kVec];
  for (int64_t j = 0; j < kVec; ++j) buf[j] = i + j < V ? static_cast<float>(row[i + j]) : kNegInf;
  return Vec::loadu(buf);
}

// Bit j set for the lanes of the vector at i that hold real vocabulary entries.
inline uint32_t valid_lanes(int64_t i, int64_t V) {
  const int64_t n = std::min(kVec, V - i);
  return n >= 32 ? 0xffffffffu : (1u << n) - 1u;
}

// Bit j set where lane j of a comparison result is true (all bits set), using zero_mask's "lane == 0".
inline uint32_t true_lanes(const Vec& cmp) {
  return ~static_cast<uint32_t>(cmp.zero_mask()) & valid_lanes(0, kVec);
}

inline float hsum(const Vec& x) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x);
}

inline float hmax(const Vec& x) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x);
}

// exp of one value through the same vector code as the passes, so it has the same bits.
inline float vexp(float x) {
  alignas(64) float buf[kVec];
  Vec(x).exp().store(buf);
  return buf[0];
}

struct Candidate {
  float zt;     // tempered logit
  float w;      // exp(zt - mt)
  int64_t idx;  // vocabulary index
};

// Rank order of the nucleus: higher tempered logit first, ties to the lower index.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.zt > b.zt || (a.zt == b.zt && a.idx < b.idx);
}

// Per-thread buffers, reused across rows.
struct Scratch {
  std::vector<float> topk;         // top-k candidate values
  std::vector<Candidate> cands;    // top-p / top-k candidates
  std::vector<Candidate> band;     // top-p candidates of the bucket holding the cut
  std::vector<double> block_sums;  // Σ wt per kBlock entries, for the inverse CDF
};

// The k-th largest value (with multiplicity) of a stream, keeping only values >= a rising threshold.
struct KthLargest {
  int64_t k = 0;
  size_t cap = 0;
  float threshold = kNegInf;
  std::vector<float>* buf = nullptr;

  void reset(int64_t k_, std::vector<float>* b) {
    k = k_;
    cap = static_cast<size_t>(std::max<int64_t>(4 * k, 1024));
    threshold = kNegInf;
    buf = b;
    buf->clear();
  }
  void compact() {
    std::nth_element(buf->begin(), buf->begin() + (k - 1), buf->end(), std::greater<float>());
    threshold = (*buf)[k - 1];
    buf->erase(std::remove_if(buf->begin(), buf->end(), [&](float x) { return x < threshold; }), buf->end());
    if (buf->size() > cap / 2) cap *= 2;  // many ties at the threshold: grow instead of compacting forever
  }
  void push(const Vec& x, int64_t i, int64_t V) {
    uint32_t hits = true_lanes(x >= Vec(threshold)) & valid_lanes(i, V);
    if (!hits) return;
    alignas(64) float lanes[kVec];
    x.store(lanes);
    for (; hits; hits &= hits - 1) buf->push_back(lanes[__builtin_ctz(hits)]);
    if (buf->size() > cap) compact();
  }
  float result() {  // needs at least k values pushed
    std::nth_element(buf->begin(), buf->begin() + (k - 1), buf->end(), std::greater<float>());
    return (*buf)[k - 1];
  }
};

// Per lane: the largest value (first occurrence), the base index of the vector that held it, and the second
// largest value counting multiplicity. Plain compares (no NaN propagation: pass 1 checks NaN separately).
struct LaneTop2 {
  Vec max1{kNegInf}, max2{kNegInf}, at{0.0f};

  void update(const Vec& x, float base) {
    const Vec raised = x > max1;                      // strict: each lane keeps its first maximum
    const Vec second = Vec::blendv(x, max1, raised);  // whichever of x and the old max1 is not the new max
    max2 = Vec::blendv(max2, second, second > max2);
    max1 = Vec::blendv(max1, x, raised);
    at = Vec::blendv(at, Vec(base), raised);
  }
};

struct RowResult {
  int64_t x0 = 0;
  float confidence = 0.0f;
};

template <typename T>
class RowSelector {
 public:
  RowSelector(const ConfidentSelectParams& p, Scratch& s) : p_(p), s_(s), V_(p.vocab) {
    sampling_ = p.temperature > 0.0f;
    tempered_ = sampling_ && p.temperature != 1.0f;
    need_orig_ = p.use_original_confidence;
    need_filtered_ = !p.use_original_confidence || sampling_;
    top_p_ = need_filtered_ && p.top_p < 1.0;
    top_k_ = need_filtered_ && p.top_k > 0 && p.top_k < V_;
    vt_ = Vec(p.temperature);
  }

  RowResult run(const T* row, int64_t r, float u) {
    row_ = row;
    if (!need_filtered_ && p_.kind != ConfidenceKind::kNegEntropy) {
      fused_max_sum(r);
    } else {
      pass_max(r);
      pass_sums();
    }
    RowResult out;
    if (!need_filtered_) {  // greedy, confidence from the original distribution
      out.x0 = argmax_;
      out.confidence = confidence_from(/*filtered=*/false, out.x0, /*w_filtered=*/1.0f);
      return out;
    }
    float w_x0 = 1.0f;  // filtered weight of the chosen token; the argmax has exp(0) = 1
    if (top_p_ || top_k_) {
      build_kept();
      out.x0 = argmax_;
      if (sampling_) sample_kept(u, &out.x0, &w_x0);
    } else {
      out.x0 = argmax_;
      if (sampling_) sample_blocks(u, &out.x0, &w_x0);
    }
    out.confidence = confidence_from(!need_orig_, out.x0, w_x0);
    return out;
  }

 private:
  // The tempered logit: z / T, or (z − m) / T in a shifted row (m = max z, known after pass 1).
  Vec tempered(const Vec& x) const { return tempered_ ? (shifted_ ? (x - vm_) / vt_ : x / vt_) : x; }
  float tempered1(float x) const { return tempered_ ? (shifted_ ? (x - m_) / p_.temperature : x / p_.temperature) : x; }

  // Pass 1: m, the lowest index of m, the second largest z; the k-th largest tempered logit. The candidates
  // are the raw logits: tempered() is monotone (non-decreasing), so the k-th largest of zt is tempered(the
  // k-th largest z), bit for bit, and it needs m only afterwards.
  void pass_max(int64_t r) {
    // Two independent lane sets (even / odd vectors) so that the compare-blend chains overlap.
    LaneTop2 lanes[2];
    Vec nan_seen(0.0f);
    KthLargest kth;
    if (top_k_) kth.reset(p_.top_k, &s_.topk);
    for (int64_t i = 0; i < V_; i += 2 * kVec) {
      const Vec x = load_logits(row_, i, V_);
      lanes[0].update(x, static_cast<float>(i));  // exact: V < 2^24
      nan_seen = nan_seen | (x != x);
      if (top_k_) kth.push(x, i, V_);
      if (i + kVec < V_) {
        const Vec y = load_logits(row_, i + kVec, V_);
        lanes[1].update(y, static_cast<float>(i + kVec));
        nan_seen = nan_seen | (y != y);
        if (top_k_) kth.push(y, i + kVec, V_);
      }
    }
    finish_max(lanes, nan_seen, r);
    if (top_k_) kth_ = tempered1(kth.result());
  }

  // Passes 1 and 2 fused for the greedy step with the original distribution's confidence (the common case):
  // each kChunk-entry chunk is scanned for the maxima from memory, then summed from L1 against the running
  // maximum M; the sum is rescaled by exp(M_old − M_new) when M rises (once per chunk). Only S0 comes out
  // of this differently rounded (a confidence's denominator, ~1e-7 relative); the decisions do not use it.
  void fused_max_sum(int64_t r) {
    constexpr int64_t kChunk = 2048;
    LaneTop2 lanes[2];
    Vec nan_seen(0.0f);
    float run_max = kNegInf;
    double total = 0.0;
    for (int64_t c0 = 0; c0 < V_; c0 += kChunk) {
      const int64_t c1 = std::min(V_, c0 + kChunk);
      for (int64_t i = c0; i < c1; i += 2 * kVec) {
        const Vec x = load_logits(row_, i, V_);
        lanes[0].update(x, static_cast<float>(i));
        nan_seen = nan_seen | (x != x);
        if (i + kVec < c1) {
          const Vec y = load_logits(row_, i + kVec, V_);
          lanes[1].update(y, static_cast<float>(i + kVec));
          nan_seen = nan_seen | (y != y);
        }
      }
      const float m = hmax(at::vec::maximum(lanes[0].max1, lanes[1].max1));
      if (m == kNegInf) continue;  // nothing but -inf so far: those weigh 0
      if (m > run_max) {
        total *= std::exp(static_cast<double>(run_max) - m);  // 0 on the first finite chunk
        run_max = m;
      }
      const Vec vm(run_max);
      Vec a(0.0f), b(0.0f);
      int64_t i = c0;
      for (; i + 2 * kVec <= c1; i += 2 * kVec) {
        a = a + (load_logits(row_, i, V_) - vm).exp_u20();
        b = b + (load_logits(row_, i + kVec, V_) - vm).exp_u20();
      }
      for (; i < c1; i += kVec) a = a + (load_logits(row_, i, V_) - vm).exp_u20();
      total += hsum(a + b);
    }
    finish_max(lanes, nan_seen, r);  // m_ == run_max
    s0_ = total;
  }

  // Reduces the lane sets: m (lowest index on ties), the second largest, and the NaN/inf check.
  void finish_max(const LaneTop2 (&lanes)[2], const Vec& nan_seen, int64_t r) {
    constexpr int kLanes = 2 * kVec;
    alignas(64) float m1[kLanes], m2[kLanes], ix[kLanes];
    for (int s = 0; s < 2; ++s) {
      lanes[s].max1.store(m1 + s * kVec);
      lanes[s].max2.store(m2 + s * kVec);
      lanes[s].at.store(ix + s * kVec);
    }
    auto index = [&](int j) { return static_cast<int64_t>(ix[j]) + j % kVec; };
    int best = 0;
    for (int j = 1; j < kLanes; ++j) {
      if (m1[j] > m1[best] || (m1[j] == m1[best] && index(j) < index(best))) best = j;
    }
    m_ = m1[best];
    argmax_ = index(best);
    TORCH_CHECK_VALUE(std::isfinite(m_) && true_lanes(nan_seen) == 0, "confident_select: logits row ", r,
                      " has no finite maximum (every entry -inf, or +inf/NaN present)");
    z2_ = m2[best];
    for (int j = 0; j < kLanes; ++j) {
      if (j != best) z2_ = std::max(z2_, m1[j]);
      z2_ = std::max(z2_, m2[j]);
    }
    shifted_ = false;
    mt_ = tempered_ ? m_ / p_.temperature : m_;
    if (!std::isfinite(mt_)) {  // m / T overflowed: tempered logits (z − m) / T, whose maximum is 0
      shifted_ = true;
      mt_ = 0.0f;
    }
    vm_ = Vec(m_);
  }

  // Pass 2: S0 = Σ exp(z − m), St = Σ exp(zt − mt) (with block sums when sampling without filters), and
  // the candidate list: with top-k the entries zt >= k-th largest (the kept set is a prefix of it in rank
  // order), with top-p alone the entries wt >= e^-24.
  void pass_sums() {
    if (!need_filtered_) {
      s0_ = sum_exp_original();
      return;
    }
    const bool full_t = need_filtered_ && (top_p_ || !top_k_);  // Σ wt over the whole vocabulary
    const bool blocks = sampling_ && !top_p_ && !top_k_;
    const bool gather_p = top_p_ && !top_k_;
    const bool shared = !tempered_ && need_orig_ && full_t;  // wt == w0: one exp serves both
    const Vec vm(m_), vmt(mt_), vomega(std::exp(-kCandidateGap)), vkth(top_k_ ? kth_ : 0.0f);
    s_.cands.clear();
    s_.block_sums.clear();
    double s0 = 0.0, st = 0.0;
    for (int64_t i0 = 0; i0 < V_; i0 += kBlock) {
      Vec acc0(0.0f), acct(0.0f);
      const int64_t i1 = std::min(V_, i0 + kBlock);
      for (int64_t i = i0; i < i1; i += kVec) {
        const Vec x = load_logits(row_, i, V_);
        Vec w0(0.0f);
        if (need_orig_) {
          // Weights that only feed S0 (a confidence's denominator) take torch's fast softmax exp; weights
          // that also decide a draw or a cut use the 1-ulp exp, as torch.exp does in the reference.
          w0 = shared ? (x - vm).exp() : (x - vm).exp_u20();
          acc0 = acc0 + w0;
        }
        if (full_t) {
          const Vec xt = tempered(x);
          const Vec wt = shared ? w0 : (xt - vmt).exp();
          acct = acct + wt;
          if (gather_p) gather(xt, wt, true_lanes(wt >= vomega) & valid_lanes(i, V_), i);
        }
        if (top_k_) {
          const Vec xt = tempered(x);
          const uint32_t hits = true_lanes(xt >= vkth) & valid_lanes(i, V_);
          if (hits) gather(xt, (xt - vmt).exp(), hits, i);
        }
      }
      if (need_orig_) s0 += hsum(acc0);
      if (full_t) {
        const double b = hsum(acct);
        st += b;
        if (blocks) s_.block_sums.push_back(b);
      }
    }
    s0_ = s0;
    st_ = st;
  }

  // S0 alone (greedy, original confidence: the common step): a tight loop over whole vectors, two
  // accumulators, flushed into a double every kBlock entries; the tail vector is padded with -inf.
  double sum_exp_original() const {
    const Vec vm(m_);
    double total = 0.0;
    int64_t i0 = 0;
    for (; i0 + kBlock <= V_; i0 += kBlock) {
      Vec a(0.0f), b(0.0f);
      for (int64_t i = i0; i < i0 + kBlock; i += 2 * kVec) {
        a = a + (load_logits(row_, i, V_) - vm).exp_u20();
        b = b + (load_logits(row_, i + kVec, V_) - vm).exp_u20();
      }
      total += hsum(a + b);
    }
    Vec a(0.0f);
    for (int64_t i = i0; i < V_; i += kVec) a = a + (load_logits(row_, i, V_) - vm).exp_u20();
    return total + hsum(a);
  }

  void gather(const Vec& xt, const Vec& wt, uint32_t hits, int64_t i) {
    if (!hits) return;
    alignas(64) float zl[kVec], wl[kVec];
    xt.store(zl);
    wt.store(wl);
    for (; hits; hits &= hits - 1) {
      const int j = __builtin_ctz(hits);
      s_.cands.push_back({zl[j], wl[j], i + j});
    }
  }

  // Every entry with a nonzero tempered weight (when the e^-24 candidates miss part of the nucleus).
  void gather_all_positive() {
    const Vec vmt(mt_);
    s_.cands.clear();
    for (int64_t i = 0; i < V_; i += kVec) {
      const Vec xt = tempered(load_logits(row_, i, V_));
      const Vec wt = (xt - vmt).exp();
      gather(xt, wt, true_lanes(wt > Vec(0.0f)) & valid_lanes(i, V_), i);
    }
  }

  // The kept set in vocabulary order (s_.cands) and its mass sk_.
  void build_kept() {
    auto& c = s_.cands;
    if (top_k_) {
      // The top-k set is closed under "ranked before", so the mass before each of its entries is a prefix sum
      // inside it, and P ∩ K is the entries of K (in rank order) whose prefix mass is <= top_p·St.
      if (top_p_) {
        const double target = p_.top_p * st_;
        std::sort(c.begin(), c.end(), ranks_before);
        size_t cut = 0;
        for (double before = 0.0; cut < c.size() && before <= target; ++cut) before += c[cut].w;
        c.resize(cut);
        std::sort(c.begin(), c.end(), [](const Candidate& a, const Candidate& b) { return a.idx < b.idx; });
      }
    } else if (top_p_) {
      const double target = p_.top_p * st_;
      // Bucket the candidates by their logit gap (1/16 nat; a bucket is an interval of the rank order):
      // every bucket before the one where the mass crosses top_p·St is kept whole, every one after dropped.
      // Four interleaved histograms, so that runs of entries in one bucket do not serialise on one sum.
      constexpr int kBuckets = 512;
      constexpr float kBucketsPerNat = 16.0f;
      auto bucket = [&](float zt) {
        return static_cast<int>(std::min((mt_ - zt) * kBucketsPerNat, static_cast<float>(kBuckets - 1)));
      };
      double hist[4][kBuckets];
      auto histogram = [&] {
        std::fill(&hist[0][0], &hist[0][0] + 4 * kBuckets, 0.0);
        for (size_t j = 0; j < c.size(); ++j) hist[j & 3][bucket(c[j].zt)] += c[j].w;
        double total = 0.0;
        for (int b = 0; b < kBuckets; ++b) {
          hist[0][b] += hist[1][b] + hist[2][b] + hist[3][b];
          total += hist[0][b];
        }
        return total;
      };
      if (!(histogram() > target)) {  // the e^-24 candidates miss part of the nucleus: take every token
        gather_all_positive();
        histogram();
      }
      const double* bucket_mass = hist[0];
      int cut_bucket = -1;
      double base = 0.0;  // mass ranked before the cut bucket
      for (int b = 0; b < kBuckets && cut_bucket < 0; ++b) {
        if (base + bucket_mass[b] > target) {
          cut_bucket = b;
        } else {
          base += bucket_mass[b];
        }
      }
      if (cut_bucket >= 0) {
        // Inside the cut bucket, halving: [0, lo) is kept, [hi, end) is not; undecided [lo, hi) holds the cut.
        auto& band = s_.band;
        band.clear();
        for (const Candidate& e : c)
          if (bucket(e.zt) == cut_bucket) band.push_back(e);
        int64_t lo = 0, hi = static_cast<int64_t>(band.size());
        while (hi - lo > kSortTail) {
          const int64_t mid = lo + (hi - lo) / 2;
          std::nth_element(band.begin() + lo, band.begin() + mid, band.begin() + hi, ranks_before);
          double upper = 0.0;
          for (int64_t j = lo; j < mid; ++j) upper += band[j].w;
          if (base + upper <= target) {  // the entry ranked at mid still has at most top_p before it
            base += upper;
            lo = mid;
          } else {
            hi = mid;
          }
        }
        std::sort(band.begin() + lo, band.begin() + hi, ranks_before);
        int64_t cut = lo;
        while (cut < hi && base <= target) base += band[cut++].w;  // keep while the mass before it <= top_p
        // The kept set is a rank-order prefix: everything ranked before the first dropped entry. Filtering the
        // index-ordered candidates by that keeps them in vocabulary order without a sort.
        const auto dropped =
            cut < hi ? band.begin() + cut : std::min_element(band.begin() + hi, band.end(), ranks_before);
        if (dropped != band.end()) {
          const Candidate first_dropped = *dropped;
          c.erase(
              std::remove_if(c.begin(), c.end(), [&](const Candidate& e) { return !ranks_before(e, first_dropped); }),
              c.end());
        } else {
          c.erase(std::remove_if(c.begin(), c.end(), [&](const Candidate& e) { return bucket(e.zt) > cut_bucket; }),
                  c.end());
        }
      }
    }
    double sk = 0.0;
    for (const Candidate& e : c) sk += e.w;
    sk_ = sk;
  }

  // Inverse CDF over the kept list in vocabulary order: the first entry whose running mass exceeds u·Σ.
  void sample_kept(float u, int64_t* x0, float* w_x0) const {
    const auto& c = s_.cands;
    const double target = static_cast<double>(u) * sk_;
    double cum = 0.0;
    const Candidate* last = nullptr;
    for (const Candidate& e : c) {
      if (e.w > 0.0f) last = &e;
      cum += e.w;
      if (cum > target) {
        *x0 = e.idx;
        *w_x0 = e.w;
        return;
      }
    }
    if (last == nullptr) return;  // no kept weight (cannot happen: the argmax weighs 1): keep the argmax
    // u·Σ at or past the rounded total: the last token with weight
    *x0 = last->idx;
    *w_x0 = last->w;
  }

  // Inverse CDF over the whole vocabulary: find the block from the block sums, then the entry inside it.
  void sample_blocks(float u, int64_t* x0, float* w_x0) const {
    const auto& b = s_.block_sums;
    const double target = static_cast<double>(u) * st_;
    double cum = 0.0;
    int64_t blk = -1, last = -1;
    for (int64_t j = 0; j < static_cast<int64_t>(b.size()); ++j) {
      if (b[j] > 0.0) last = j;
      if (cum + b[j] > target) {
        blk = j;
        break;
      }
      cum += b[j];
    }
    double limit = target;
    if (blk < 0) {  // rounding put the target at the very end: take the last token with weight
      blk = last;
      limit = std::numeric_limits<double>::infinity();
    }
    if (blk < 0) return;  // no weight anywhere (cannot happen: the argmax weighs 1): keep the argmax
    alignas(64) float w[kBlock];
    const int64_t i0 = blk * kBlock, i1 = std::min(V_, i0 + kBlock);
    const Vec vmt(mt_);
    for (int64_t i = i0; i < i1; i += kVec) (tempered(load_logits(row_, i, V_)) - vmt).exp().store(w + (i - i0));
    int64_t pick = -1;
    for (int64_t i = i0; i < i1; ++i) {
      if (w[i - i0] > 0.0f) pick = i;
      cum += w[i - i0];
      if (cum > limit) break;
    }
    if (pick < 0) return;
    *x0 = pick;
    *w_x0 = w[pick - i0];
  }

  // Σ p·log(p + 1e-10) with p = w / fl32(S) over the whole vocabulary of the original or tempered logits.
  float entropy_full(bool filtered) const {
    const float sum = static_cast<float>(filtered ? st_ : s0_);
    const Vec vm(filtered ? mt_ : m_), vs(sum), veps(kEntropyEps);
    double total = 0.0;
    for (int64_t i0 = 0; i0 < V_; i0 += kBlock) {
      Vec acc(0.0f);
      const int64_t i1 = std::min(V_, i0 + kBlock);
      for (int64_t i = i0; i < i1; i += kVec) {
        Vec x = load_logits(row_, i, V_);
        if (filtered) x = tempered(x);
        const Vec prob = (x - vm).exp_u20() / vs;  // feeds only this sum: the fast exp
        acc = acc + prob * (prob + veps).log();
      }
      total += hsum(acc);
    }
    return static_cast<float>(total);
  }

  // The same over the kept list (every other entry has p = 0 and contributes 0).
  float entropy_kept() const {
    const auto& c = s_.cands;
    const Vec vs(static_cast<float>(sk_)), veps(kEntropyEps);
    alignas(64) float buf[kVec];
    double total = 0.0;
    for (size_t i = 0; i < c.size(); i += kVec) {
      const size_t n = std::min<size_t>(kVec, c.size() - i);
      for (size_t j = 0; j < static_cast<size_t>(kVec); ++j) buf[j] = j < n ? c[i + j].w : 0.0f;
      const Vec prob = Vec::loadu(buf) / vs;
      total += hsum(prob * (prob + veps).log());
    }
    return static_cast<float>(total);
  }

  float confidence_from(bool filtered, int64_t x0, float w_x0) const {
    const bool kept_list = filtered && (top_p_ || top_k_);
    const float sum = static_cast<float>(filtered ? (kept_list ? sk_ : st_) : s0_);
    switch (p_.kind) {
      case ConfidenceKind::kPlain: {
        const float w = filtered ? w_x0 : vexp(static_cast<float>(row_[x0]) - m_);
        return w / sum;
      }
      case ConfidenceKind::kMargin: {
        // top1 has weight exp(0) = 1; top2 is the second largest weight (0 when there is none).
        float w2;
        if (kept_list) {
          float a = 0.0f, b = 0.0f;  // the two largest kept weights
          for (const Candidate& e : s_.cands) {
            if (e.w > a) {
              b = a;
              a = e.w;
            } else if (e.w > b) {
              b = e.w;
            }
          }
          w2 = b;
        } else {
          const float second = filtered ? tempered1(z2_) : z2_;
          w2 = vexp(second - (filtered ? mt_ : m_));
        }
        return 1.0f / sum - w2 / sum;
      }
      case ConfidenceKind::kNegEntropy:
        return kept_list ? entropy_kept() : entropy_full(filtered);
    }
    return 0.0f;
  }

  const ConfidentSelectParams& p_;
  Scratch& s_;
  const int64_t V_;
  const T* row_ = nullptr;
  bool shifted_ = false;  // this row's tempered logits are (z − m) / T
  bool sampling_ = false, tempered_ = false, need_orig_ = true, need_filtered_ = false, top_p_ = false, top_k_ = false;
  Vec vt_, vm_;
  float m_ = 0.0f, z2_ = 0.0f, mt_ = 0.0f, kth_ = 0.0f;
  int64_t argmax_ = 0;
  double s0_ = 0.0, st_ = 0.0, sk_ = 0.0;
};

template <typename T>
void confident_select_rows(const ConfidentSelectParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  at::parallel_for(0, p.num_rows, 1, [&](int64_t begin, int64_t end) {
    // Per thread and kept across calls: a top-p row can gather the whole vocabulary (2.4 MB), and
    // allocating that afresh every step costs page faults.
    thread_local Scratch scratch;
    RowSelector<T> selector(p, scratch);
    for (int64_t r = begin; r < end; ++r) {
      const float u = p.uniforms != nullptr ? p.uniforms[r] : 0.0f;
      const RowResult res = selector.run(logits + r * p.logits_row_stride, r, u);
      p.x0[r] = res.x0;
      p.confidence[r] = res.confidence;
    }
  });
}

// commit[s, e) for one group: every confidence > threshold if any; else the n largest (ties: lowest index).
void commit_group(const ConfidentCommitParams& c, int64_t s, int64_t e, int64_t n, std::vector<int64_t>& order) {
  const float* conf = c.confidence;
  bool* commit = c.commit;
  if (c.use_threshold) {
    bool any = false;
    for (int64_t i = s; i < e; ++i) any |= (commit[i] = conf[i] > c.threshold);
    if (any) return;
  }
  const int64_t k = std::min(n, e - s);
  if (k <= 0) return;
  order.resize(e - s);
  for (int64_t i = s; i < e; ++i) order[i - s] = i;
  auto before = [&](int64_t a, int64_t b) { return conf[a] > conf[b] || (conf[a] == conf[b] && a < b); };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  for (int64_t j = 0; j < k; ++j) commit[order[j]] = true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> confident_select_cpu(
    const at::Tensor& logits_in, const at::Tensor& row_ids_in, const at::Tensor& n_in, double temperature,
    std::optional<double> top_p, std::optional<int64_t> top_k, const std::optional<at::Tensor>& uniforms_in,
    c10::string_view confidence, bool use_original_confidence, std::optional<double> threshold, bool batch_coupled) {
  const std::string_view kind_name(confidence.data(), confidence.size());
  check_confident_select_args(logits_in, row_ids_in, n_in, temperature, top_p, top_k, uniforms_in, kind_name, threshold,
                              batch_coupled);
  TORCH_CHECK_VALUE(logits_in.device().is_cpu(), "confident_select_cpu: logits must be on the CPU, got ",
                    logits_in.device());
  const int64_t N = logits_in.size(0);
  const ConfidentSelectInputs in = confident_select_inputs(logits_in, row_ids_in, n_in, temperature, uniforms_in);
  const at::Tensor &logits = in.logits, &row_ids = in.row_ids, &n = in.n, &uniforms = in.uniforms;
  const int64_t* rid = row_ids.const_data_ptr<int64_t>();
  const int64_t* nv = n.const_data_ptr<int64_t>();
  const int64_t groups = n.size(0);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK_VALUE(nv[g] >= 0, "confident_select: n must be >= 0, got n[", g, "] = ", nv[g]);
  }
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(rid[i] >= 0 && (i == 0 || rid[i] >= rid[i - 1]),
                      "confident_select: row_ids must be non-decreasing and >= 0, got row_ids[", i, "] = ", rid[i]);
    TORCH_CHECK_VALUE(batch_coupled || rid[i] < groups, "confident_select: row_ids[", i, "] = ", rid[i],
                      " has no entry in n (", groups, " groups)");
  }
  if (temperature > 0) {
    const float* u = uniforms.const_data_ptr<float>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK_VALUE(u[i] >= 0.0f && u[i] < 1.0f, "confident_select: uniforms must be in [0, 1), got uniforms[", i,
                        "] = ", u[i]);
    }
  }

  at::Tensor x0 = at::empty({N}, logits.options().dtype(at::kLong));
  at::Tensor conf = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor commit = at::empty({N}, logits.options().dtype(at::kBool));
  if (N == 0) return {x0, conf, commit};

  ConfidentSelectParams p = confident_select_params(logits, uniforms, temperature, top_p, top_k, kind_name,
                                                    use_original_confidence, x0, conf);
  DIMPLE_RT_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "confident_select_cpu",
                                 [&] { confident_select_rows<scalar_t>(p); });

  // The commit mask: one group (the whole batch) or one per batch row.
  const ConfidentCommitParams c = confident_commit_params(p.confidence, row_ids, n, threshold, batch_coupled, commit);
  std::fill(c.commit, c.commit + N, false);
  std::vector<int64_t> order;
  if (c.batch_coupled) {
    commit_group(c, 0, N, c.n[0], order);
  } else {
    for (int64_t s = 0; s < N;) {
      int64_t e = s + 1;
      while (e < N && c.row_ids[e] == c.row_ids[s]) ++e;
      commit_group(c, s, e, c.n[c.row_ids[s]], order);
      s = e;
    }
  }
  return {x0, conf, commit};
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CPU, m) {
  m.impl("confident_select", &dimple_rt::confident_select_cpu);
}
