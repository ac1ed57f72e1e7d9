// SPDX-License-Identifier: Apache-2.0
// masked_attention argument checks, shared by the CPU and CUDA launchers. The list and the messages follow
// check_masked_attention_args in dimple_rt/reference.py: shapes and options raise ValueError
// (TORCH_CHECK_VALUE), dtypes raise TypeError (TORCH_CHECK_TYPE).
#include "common/masked_attention.h"

#include <cmath>
#include <sstream>

namespace dimple_rt {
void check_masked_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                 bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                 const std::optional<at::Tensor>& suffix_v) {
  // The kernels multiply by the fp32 scale: NaN, inf or <= 0 (also after rounding to fp32) is refused.
  TORCH_CHECK_VALUE(!scale.has_value() || (std::isfinite(static_cast<float>(*scale)) && static_cast<float>(*scale) > 0),
                    "masked_attention: scale must be finite and > 0 (as a float32), got ", scale.value_or(0));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.dim() == 4, "masked_attention: ", name, " must be 4-D (batch, len, heads, head_dim), got ",
                      shape_str(t.sizes()));
    TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), "masked_attention: ", name,
                     " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  const int64_t batch = q.size(0), q_len = q.size(1), num_heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "masked_attention: k ", shape_str(k.sizes()), " and v ",
                    shape_str(v.sizes()), " must have the same shape");
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(1) == q_len && k.size(3) == head_dim,
                    "masked_attention: k must be (batch=", batch, ", len=", q_len, ", kv_heads, head_dim=", head_dim,
                    "), got ", shape_str(k.sizes()));
  const int64_t num_kv_heads = k.size(2);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "masked_attention: q heads (", num_heads,
                    ") must be a multiple of kv heads (", num_kv_heads, ")");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "masked_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());

  // Devices before anything reads memory.
  const std::pair<const char*, const std::optional<at::Tensor>*> others[] = {
      {"prefix_k", &prefix_k}, {"prefix_v", &prefix_v}, {"suffix_k", &suffix_k},
      {"suffix_v", &suffix_v}, {"key_mask", &key_mask}, {"cu_seqlens", &cu_seqlens}};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.device() == q.device(), "masked_attention: ", name, " is on ", t.device(), ", q on ",
                      q.device());
  }
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == q.device(), "masked_attention: ", name, " is on ",
                      (*t)->device(), ", q on ", q.device());
  }

  // The cached keys before (prefix) and after (suffix) the current ones: (batch, len, kv_heads, head_dim) each.
  auto cached_len = [&](const char* kname, const char* vname, const char* len_name,
                        const std::optional<at::Tensor>& ck, const std::optional<at::Tensor>& cv) -> int64_t {
    TORCH_CHECK_VALUE(ck.has_value() == cv.has_value(), "masked_attention: give both ", kname, " and ", vname,
                      " or neither");
    if (!ck.has_value()) return 0;
    TORCH_CHECK_VALUE(ck->dim() == 4 && ck->sizes() == cv->sizes(), "masked_attention: ", kname, " ",
                      shape_str(ck->sizes()), " and ", vname, " ", shape_str(cv->sizes()), " must be equal 4-D");
    TORCH_CHECK_VALUE(ck->size(0) == batch && ck->size(2) == num_kv_heads && ck->size(3) == head_dim,
                      "masked_attention: ", kname, " must be (batch=", batch, ", ", len_name, ", kv_heads=",
                      num_kv_heads, ", head_dim=", head_dim, "), got ", shape_str(ck->sizes()));
    TORCH_CHECK_TYPE(ck->scalar_type() == q.scalar_type() && cv->scalar_type() == q.scalar_type(),
                     "masked_attention: ", kname, "/", vname, " must have q's dtype ", q.scalar_type(), ", got ",
                     ck->scalar_type(), ", ", cv->scalar_type());
    return ck->size(1);
  };
  const int64_t prefix_len = cached_len("prefix_k", "prefix_v", "prefix_len", prefix_k, prefix_v);
  const int64_t suffix_len = cached_len("suffix_k", "suffix_v", "suffix_len", suffix_k, suffix_v);
  // Suffix keys sit after every query: a causal query could never see them. Refused rather than ignored (an
  // empty suffix is no suffix, as an empty prefix is no prefix).
  TORCH_CHECK_VALUE(!causal || suffix_len == 0, "masked_attention: causal attention takes no suffix (suffix_len ",
                    suffix_len, " > 0)");
  if (key_mask.has_value()) {
    const at::Tensor& mask = *key_mask;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "masked_attention: key_mask must be bool, got ",
                     mask.scalar_type());
    const int64_t total = prefix_len + q_len + suffix_len;
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == total,
                      "masked_attention: key_mask must be (batch=", batch, ", prefix_len+len+suffix_len=", total,
                      "), got ", shape_str(mask.sizes()));
  }
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "masked_attention: cu_seqlens must be int32, got ",
                     cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 2,
                      "masked_attention: cu_seqlens must be 1-D with ≥2 entries, got ", shape_str(cu.sizes()));
    TORCH_CHECK_VALUE(batch == 1 && prefix_len == 0 && suffix_len == 0,
                      "masked_attention: cu_seqlens needs batch 1 and no prefix or suffix, got batch ", batch,
                      ", prefix_len ", prefix_len, " and suffix_len ", suffix_len);
    TORCH_CHECK_VALUE(!key_mask.has_value(), "masked_attention: cu_seqlens and key_mask cannot be combined");
  }
}

void check_cu_seqlens_values(const int64_t* values, int64_t n, int64_t q_len) {
  bool ok = n >= 2 && values[0] == 0 && values[n - 1] == q_len;
  for (int64_t i = 1; ok && i < n; ++i) ok = values[i] >= values[i - 1];
  if (ok) return;
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < n; ++i) s << (i ? ", " : "") << values[i];
  s << "]";
  TORCH_CHECK_VALUE(false, "masked_attention: cu_seqlens must rise from 0 to len=", q_len, ", got ", s.str());
}

MaskedAttentionParams make_masked_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& prefix_k,
                                                   const std::optional<at::Tensor>& prefix_v,
                                                   const std::optional<at::Tensor>& key_mask, bool causal,
                                                   std::optional<double> scale,
                                                   const std::optional<at::Tensor>& suffix_k,
                                                   const std::optional<at::Tensor>& suffix_v, const at::Tensor& out) {
  MaskedAttentionParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.q_stride = strides4(q);
  p.k_stride = strides4(k);
  p.v_stride = strides4(v);
  p.out_stride = strides4(out);
  if (prefix_k.has_value()) {
    p.prefix_k = prefix_k->const_data_ptr();
    p.prefix_v = prefix_v->const_data_ptr();
    p.prefix_k_stride = strides4(*prefix_k);
    p.prefix_v_stride = strides4(*prefix_v);
    p.prefix_len = prefix_k->size(1);
  }
  if (suffix_k.has_value()) {
    p.suffix_k = suffix_k->const_data_ptr();
    p.suffix_v = suffix_v->const_data_ptr();
    p.suffix_k_stride = strides4(*suffix_k);
    p.suffix_v_stride = strides4(*suffix_v);
    p.suffix_len = suffix_k->size(1);
  }
  if (key_mask.has_value()) {
    p.key_mask = key_mask->const_data_ptr<bool>();
    p.key_mask_batch_stride = key_mask->stride(0);
    p.key_mask_seq_stride = key_mask->stride(1);
  }
  p.batch = q.size(0);
  p.q_len = q.size(1);
  p.num_heads = q.size(2);
  p.head_dim = q.size(3);
  p.num_kv_heads = k.size(2);
  p.groups = p.num_heads / p.num_kv_heads;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  p.causal = causal;
  return p;
}

}  // namespace dimple_rt
