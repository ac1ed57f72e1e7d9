// SPDX-License-Identifier: Apache-2.0
// masked_attention on the CPU: attention of the current tokens over [prefix ‖ current ‖ suffix] keys in one
// pass.
//
// What: out[b,i,h] = Σ_j softmax_j(scale · q[b,i,h]·key[b,j,h/G]) · value[b,j,h/G] over the keys j that query
// i (absolute position prefix_len+i) may see: key mask with Dimple's forced diagonal, causal, or the
// block-diagonal segments of cu_seqlens (dimple_rt/reference.py::attention_allowed is the definition).
// Keys are numbered by absolute position: j < prefix_len is read from prefix_k/prefix_v, j < prefix_len + len
// from k/v, the rest from suffix_k/suffix_v (the dual cache's suffix), each in place through its own strides:
// nothing is concatenated or allocated per call beyond the per-thread scratch. A key tile may straddle two
// segments; each row of it is fetched from its own segment when the tile is loaded.
//
// Layout: (batch, seq, head, head_dim) tensors with arbitrary strides; out is allocated contiguous.
//
// Shape of the computation: a work item is (batch, kv head, tile of Tq queries) and holds all G = heads /
// kv_heads query heads that read that kv head, i.e. G·Tq rows. So each key/value tile is loaded and widened
// to fp32 once for G·Tq rows, and GQA costs no repeated K/V. For each tile of kKeyTile keys:
//   S = Q·Kᵀ   register-blocked (4 rows × 2-4 vectors of keys), vectorised over keys, K tile transposed;
//   mask       -inf outside the row's visible range / where the key mask is false;
//   softmax    online: running max m and sum l per row, O rescaled by exp(m_old - m_new) when m grows;
//   O += P·V   register-blocked (4 rows × 1-4 vectors of head_dim), vectorised over head_dim.
// The score matrix never exists beyond one rows × kKeyTile tile (it stays in L1/L2). Scratch rows are padded
// with zeros to the vector width, so any head_dim and length works. Everything accumulates in fp32 (inputs
// are widened when a tile is loaded); the output is rounded to q's dtype once, at the end. A row that saw no
// key keeps l = 0 and is written as zeros. at::parallel_for runs over work items; each thread owns its
// scratch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/masked_attention.h"
#include "ops.h"

namespace dimple_rt {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Register blocking: kRowBlock rows × kColBlock vectors of accumulators (16 of 32 zmm on AVX-512; 12 of 16
// ymm on AVX2, the 6×2 shape of the usual AVX2 GEMM kernels: 57 → 69 GFLOP/s on one core here), plus the
// loaded vectors and one broadcast.
constexpr int kRowBlock = kVec >= 16 ? 4 : 6;
constexpr int kColBlock = kVec >= 16 ? 4 : 2;
constexpr int64_t kKeyTile = 64;  // keys per tile
static_assert(kKeyTile % (kColBlock * kVec) == 0, "a key tile must be whole column blocks");
// Query rows (heads × queries) per work item: each K/V tile is transposed/widened once for all of them.
constexpr int64_t kTargetRows = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// dst[0..n) = fp32(src[i * stride]).
template <typename T>
inline void load_row(const T* src, int64_t stride, int64_t n, float* dst) {
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kVec <= n; i += kVec) {
      if constexpr (std::is_same_v<T, float>) {
        Vec::loadu(src + i).store(dst + i);
      } else {
        Vec f;
        at::vec::load_to_float(src + i, f);  // widen kVec bf16/fp16 values
        f.store(dst + i);
      }
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
}

// kt[d * kKeyTile + j] = rows[j * ld + d] for j < n_keys, d < head_dim: the K tile transposed, in kVec × kVec
// register blocks (at::vec's shuffle transpose), the ragged edges element by element.
inline void transpose_keys(const float* rows, int64_t ld, int64_t n_keys, int64_t head_dim, float* kt) {
  constexpr int kB = static_cast<int>(kVec);
  const int64_t keys_b = n_keys / kB * kB, dims_b = head_dim / kB * kB;
  for (int64_t j = 0; j < keys_b; j += kB)
    for (int64_t d = 0; d < dims_b; d += kB)
      at::vec::transpose_mxn<float, kB, kB>(rows + j * ld + d, ld, kt + d * kKeyTile + j, kKeyTile);
  for (int64_t j = 0; j < n_keys; ++j)
    for (int64_t d = j < keys_b ? dims_b : 0; d < head_dim; ++d) kt[d * kKeyTile + j] = rows[j * ld + d];
}

inline float hsum(const Vec& x) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x);
}

inline float hmax(const Vec& x) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x);
}

// s[r][j] = Σ_d q[r][d] · kt[d][j] for kRowBlock rows and kColBlock·kVec keys.
inline void qk_block(const float* q, int64_t ldq, const float* kt, int64_t ldk, int64_t head_dim, float* s,
                     int64_t lds) {
  Vec acc[kRowBlock][kColBlock];
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < kColBlock; ++c) acc[r][c] = Vec(0.0f);
  for (int64_t d = 0; d < head_dim; ++d) {
    Vec kv[kColBlock];
    for (int c = 0; c < kColBlock; ++c) kv[c] = Vec::loadu(kt + d * ldk + c * kVec);
    for (int r = 0; r < kRowBlock; ++r) {
      const Vec qv(q[r * ldq + d]);
      for (int c = 0; c < kColBlock; ++c) acc[r][c] = at::vec::fmadd(qv, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < kColBlock; ++c) acc[r][c].store(s + r * lds + c * kVec);
}

// o[r][0..NB·kVec) += Σ_{j<n_keys} p[r][j] · v[j][0..NB·kVec) for kRowBlock rows.
template <int NB>
inline void pv_block(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n_keys, float* o, int64_t ldo) {
  Vec acc[kRowBlock][NB];
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = Vec::loadu(o + r * ldo + c * kVec);
  for (int64_t j = 0; j < n_keys; ++j) {
    Vec vv[NB];
    for (int c = 0; c < NB; ++c) vv[c] = Vec::loadu(v + j * ldv + c * kVec);
    for (int r = 0; r < kRowBlock; ++r) {
      const Vec pr(p[r * ldp + j]);
      for (int c = 0; c < NB; ++c) acc[r][c] = at::vec::fmadd(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c].store(o + r * ldo + c * kVec);
}

// pv_block over all padded head_dim vectors of kRowBlock rows.
inline void pv_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n_keys, float* o, int64_t ldo,
                    int64_t padded_dim) {
  const int64_t n_vec = padded_dim / kVec;
  int64_t c = 0;
  for (; c + kColBlock <= n_vec; c += kColBlock)
    pv_block<kColBlock>(p, ldp, v + c * kVec, ldv, n_keys, o + c * kVec, ldo);
  for (; c < n_vec; ++c) pv_block<1>(p, ldp, v + c * kVec, ldv, n_keys, o + c * kVec, ldo);
}

// Where a query of the current tile may look: keys [lo, hi) (absolute positions), and whether the key mask
// still has to be applied inside that range.
struct RowRange {
  int64_t lo = 0, hi = 0;
  bool apply_key_mask = false;
};

RowRange row_range(const MaskedAttentionParams& p, int64_t b, int64_t i) {
  const int64_t pos = p.prefix_len + i;  // the query's own absolute position
  RowRange r{0, p.prefix_len + p.q_len + p.suffix_len, p.key_mask != nullptr};
  if (p.cu_seqlens != nullptr) {  // the segment [c[s], c[s+1]) holding i; empty segments are skipped over
    const int64_t* c = p.cu_seqlens;
    const int64_t* above =
        std::upper_bound(c, c + p.num_segments + 1, i);  // first boundary > i (exists: c[n] = len > i)
    r.lo = *(above - 1);
    r.hi = *above;
  }
  if (p.causal) r.hi = std::min(r.hi, pos + 1);  // (causal calls have no suffix: checked)
  if (p.key_mask != nullptr && !p.key_mask[b * p.key_mask_batch_stride + pos * p.key_mask_seq_stride]) {
    // A padded query: bidirectional rows see only themselves (Dimple's forced diagonal), causal rows nothing.
    r = p.causal ? RowRange{0, 0, false} : RowRange{pos, pos + 1, false};
  }
  return r;
}

template <typename T>
void masked_attention_kernel(const MaskedAttentionParams& p) {
  const int64_t G = p.groups, D = p.head_dim, Dp = round_up(D, kVec), P = p.prefix_len, PL = P + p.q_len;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* pk = static_cast<const T*>(p.prefix_k);
  const T* pv = static_cast<const T*>(p.prefix_v);
  const T* sk = static_cast<const T*>(p.suffix_k);
  const T* sv = static_cast<const T*>(p.suffix_v);
  // Key/value row j (absolute position) of batch b, kv head hk, from the segment that holds it.
  auto key_row = [&](int64_t b, int64_t hk, int64_t j, const T*& ks, int64_t& kd, const T*& vs, int64_t& vd) {
    if (j < P) {
      ks = pk + b * p.prefix_k_stride.batch + j * p.prefix_k_stride.seq + hk * p.prefix_k_stride.head;
      vs = pv + b * p.prefix_v_stride.batch + j * p.prefix_v_stride.seq + hk * p.prefix_v_stride.head;
      kd = p.prefix_k_stride.dim;
      vd = p.prefix_v_stride.dim;
    } else if (j < PL) {
      ks = k + b * p.k_stride.batch + (j - P) * p.k_stride.seq + hk * p.k_stride.head;
      vs = v + b * p.v_stride.batch + (j - P) * p.v_stride.seq + hk * p.v_stride.head;
      kd = p.k_stride.dim;
      vd = p.v_stride.dim;
    } else {
      ks = sk + b * p.suffix_k_stride.batch + (j - PL) * p.suffix_k_stride.seq + hk * p.suffix_k_stride.head;
      vs = sv + b * p.suffix_v_stride.batch + (j - PL) * p.suffix_v_stride.seq + hk * p.suffix_v_stride.head;
      kd = p.suffix_k_stride.dim;
      vd = p.suffix_v_stride.dim;
    }
  };
  T* out = static_cast<T*>(p.out);

  // Queries per item: about kTargetRows rows, fewer when that would leave threads idle.
  int64_t tq = std::min<int64_t>(std::max<int64_t>(1, kTargetRows / G), p.q_len);
  if (p.cu_seqlens != nullptr) {  // no longer than a segment: a tile spanning two would score both (half masked)
    int64_t longest = 1;
    for (int64_t s = 0; s < p.num_segments; ++s) longest = std::max(longest, p.cu_seqlens[s + 1] - p.cu_seqlens[s]);
    tq = std::min(tq, longest);
  }
  auto items_for = [&](int64_t t) { return p.batch * p.num_kv_heads * ((p.q_len + t - 1) / t); };
  while (tq > 1 && items_for(tq) < 4 * static_cast<int64_t>(at::get_num_threads())) tq = (tq + 1) / 2;
  const int64_t q_tiles = (p.q_len + tq - 1) / tq;
  const int64_t max_rows = round_up(G * tq, kRowBlock);

  at::parallel_for(0, items_for(tq), 1, [&](int64_t begin, int64_t end) {
    // Zero-initialised once: the padding columns of q/v (head_dim..Dp) are never written and stay zero.
    std::vector<float> qbuf(max_rows * Dp), obuf(max_rows * Dp), sbuf(max_rows * kKeyTile);
    std::vector<float> ktbuf(std::max<int64_t>(D, 1) * kKeyTile), kbuf(kKeyTile * Dp), vbuf(kKeyTile * Dp);
    std::vector<float> kbias(kKeyTile);
    std::vector<float> row_max(max_rows), row_sum(max_rows);
    std::vector<RowRange> ranges(tq);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t qt = item % q_tiles, hk = (item / q_tiles) % p.num_kv_heads, b = item / q_tiles / p.num_kv_heads;
      const int64_t i0 = qt * tq, nt = std::min(tq, p.q_len - i0);
      const int64_t rows = G * nt, rows_p = round_up(rows, kRowBlock);  // row r = g·nt + t: head hk·G+g, query i0+t

      int64_t key_lo = PL + p.suffix_len, key_hi = 0;  // union of the rows' ranges
      for (int64_t t = 0; t < nt; ++t) {
        ranges[t] = row_range(p, b, i0 + t);
        if (ranges[t].lo < ranges[t].hi) {
          key_lo = std::min(key_lo, ranges[t].lo);
          key_hi = std::max(key_hi, ranges[t].hi);
        }
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / nt, t = r % nt;
        const T* src = q + b * p.q_stride.batch + (i0 + t) * p.q_stride.seq + (hk * G + g) * p.q_stride.head;
        float* dst = qbuf.data() + r * Dp;
        load_row(src, p.q_stride.dim, D, dst);
        for (int64_t d = 0; d < D; ++d) dst[d] *= p.scale;  // scale q once instead of every score
      }
      std::fill(obuf.begin(), obuf.begin() + rows_p * Dp, 0.0f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);

      for (int64_t j0 = key_lo; j0 < key_hi; j0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, key_hi - j0);
        const int64_t nk_v = round_up(nk, kVec);  // columns handled as whole vectors; [nk, nk_v) are -inf
        for (int64_t jj = 0; jj < nk; ++jj) {
          const T *ks, *vs;
          int64_t kd, vd;
          key_row(b, hk, j0 + jj, ks, kd, vs, vd);
          load_row(ks, kd, D, kbuf.data() + jj * Dp);
          load_row(vs, vd, D, vbuf.data() + jj * Dp);
        }
        transpose_keys(kbuf.data(), Dp, nk, D, ktbuf.data());
        bool tile_has_padding = false;  // any key of this tile masked out: only then do rows add kbias
        if (p.key_mask != nullptr) {
          const bool* mask = p.key_mask + b * p.key_mask_batch_stride;
          for (int64_t jj = 0; jj < nk_v; ++jj) {
            const bool valid = jj < nk && mask[(j0 + jj) * p.key_mask_seq_stride];
            kbias[jj] = valid ? 0.0f : kNegInf;
            tile_has_padding |= jj < nk && !valid;
          }
        }

        // S = Q·Kᵀ over the column blocks that hold real keys.
        const int64_t col_block = kColBlock * kVec;
        for (int64_t r0 = 0; r0 < rows_p; r0 += kRowBlock)
          for (int64_t c0 = 0; c0 < nk; c0 += col_block)
            qk_block(qbuf.data() + r0 * Dp, Dp, ktbuf.data() + c0, kKeyTile, D, sbuf.data() + r0 * kKeyTile + c0,
                     kKeyTile);

        // Mask and online softmax; s becomes p (zero outside the visible keys).
        for (int64_t r = 0; r < rows_p; ++r) {
          float* s = sbuf.data() + r * kKeyTile;
          const RowRange range = r < rows ? ranges[r % nt] : RowRange{};
          const int64_t a = std::clamp(range.lo - j0, int64_t{0}, nk), e = std::clamp(range.hi - j0, int64_t{0}, nk);
          if (a >= e) {
            std::fill(s, s + nk, 0.0f);
            continue;
          }
          std::fill(s, s + a, kNegInf);
          std::fill(s + e, s + nk_v, kNegInf);
          Vec vmax(kNegInf);
          for (int64_t jj = 0; jj < nk_v; jj += kVec) {
            Vec x = Vec::loadu(s + jj);
            if (range.apply_key_mask && tile_has_padding) {
              x = x + Vec::loadu(kbias.data() + jj);
              x.store(s + jj);
            }
            vmax = at::vec::maximum(vmax, x);
          }
          const float tile_max = hmax(vmax);
          if (tile_max == kNegInf) {  // every key in range is padding
            std::fill(s, s + nk, 0.0f);
            continue;
          }
          const float m_old = row_max[r], m_new = std::max(m_old, tile_max);
          const Vec vm(m_new);
          Vec vsum(0.0f);
          for (int64_t jj = 0; jj < nk_v; jj += kVec) {
            const Vec e_x = (Vec::loadu(s + jj) - vm).exp_u20();  // exp(-inf) = 0
            e_x.store(s + jj);
            vsum = vsum + e_x;
          }
          const float correction = std::exp(m_old - m_new);  // 0 on the first visible tile (m_old = -inf)
          row_sum[r] = row_sum[r] * correction + hsum(vsum);
          row_max[r] = m_new;
          if (correction != 1.0f) {
            float* o = obuf.data() + r * Dp;
            const Vec vc(correction);
            for (int64_t d = 0; d < Dp; d += kVec) (Vec::loadu(o + d) * vc).store(o + d);
          }
        }

        // O += P·V.
        for (int64_t r0 = 0; r0 < rows_p; r0 += kRowBlock)
          pv_rows(sbuf.data() + r0 * kKeyTile, kKeyTile, vbuf.data(), Dp, nk, obuf.data() + r0 * Dp, Dp, Dp);
      }

      // out = O / l, or zeros for a row that saw no key.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / nt, t = r % nt;
        T* dst = out + b * p.out_stride.batch + (i0 + t) * p.out_stride.seq + (hk * G + g) * p.out_stride.head;
        float* o = obuf.data() + r * Dp;
        const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        at::vec::convert(o, dst, D);  // out is contiguous in head_dim
      }
    }
  });
}

}  // namespace

at::Tensor masked_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                const std::optional<at::Tensor>& suffix_v) {
  check_masked_attention_args(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, causal, scale, suffix_k, suffix_v);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "masked_attention_cpu: q must be on the CPU, got ", q.device());

  std::vector<int64_t> segments;  // cu_seqlens widened to int64, read through its stride
  if (cu_seqlens.has_value()) {
    const int32_t* c = cu_seqlens->const_data_ptr<int32_t>();
    for (int64_t s = 0; s < cu_seqlens->numel(); ++s) segments.push_back(c[s * cu_seqlens->stride(0)]);
    check_cu_seqlens_values(segments.data(), static_cast<int64_t>(segments.size()), q.size(1));
  }

  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous (batch, len, heads, head_dim)
  if (out.numel() == 0) return out;
  MaskedAttentionParams params =
      make_masked_attention_params(q, k, v, prefix_k, prefix_v, key_mask, causal, scale, suffix_k, suffix_v, out);
  if (!segments.empty()) {
    params.cu_seqlens = segments.data();
    params.num_segments = static_cast<int64_t>(segments.size()) - 1;
  }
  TORCH_INTERNAL_ASSERT(params.out_stride.dim == 1);
  DIMPLE_RT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "masked_attention_cpu",
                                 [&] { masked_attention_kernel<scalar_t>(params); });
  return out;
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CPU, m) {
  m.impl("masked_attention", &dimple_rt::masked_attention_cpu);
}
