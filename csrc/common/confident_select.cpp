// SPDX-License-Identifier: Apache-2.0
// confident_select argument checks, shared by the launchers. Shapes and options raise ValueError
// (TORCH_CHECK_VALUE), dtypes TypeError (TORCH_CHECK_TYPE); the list follows dimple_rt/reference.py.
#include "common/confident_select.h"

#include <cmath>
#include <string>

namespace dimple_rt {

ConfidenceKind parse_confidence_kind(std::string_view name) {
  if (name == "plain") return ConfidenceKind::kPlain;
  if (name == "margin") return ConfidenceKind::kMargin;
  if (name == "neg_entropy") return ConfidenceKind::kNegEntropy;
  TORCH_CHECK_VALUE(false, "confident_select: confidence must be one of 'plain', 'margin', 'neg_entropy', got '",
                    std::string(name), "'");
}

ConfidentSelectParams confident_select_params(const at::Tensor& logits, const at::Tensor& uniforms, double temperature,
                                              std::optional<double> top_p, std::optional<int64_t> top_k,
                                              std::string_view confidence, bool use_original_confidence,
                                              at::Tensor& x0, at::Tensor& confidence_out) {
  ConfidentSelectParams p;
  p.logits = logits.const_data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.uniforms = temperature > 0 ? uniforms.const_data_ptr<float>() : nullptr;
  p.num_rows = logits.size(0);
  p.vocab = logits.size(1);
  p.temperature = static_cast<float>(temperature);
  p.top_p = top_p.value_or(1.0);
  p.top_k = top_k.value_or(0);
  p.kind = parse_confidence_kind(confidence);
  p.use_original_confidence = use_original_confidence;
  p.x0 = x0.mutable_data_ptr<int64_t>();
  p.confidence = confidence_out.mutable_data_ptr<float>();
  return p;
}

void check_confident_select_args(const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n,
                                 double temperature, std::optional<double> top_p, std::optional<int64_t> top_k,
                                 const std::optional<at::Tensor>& uniforms, std::string_view confidence,
                                 std::optional<double> threshold, bool batch_coupled) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "confident_select: logits must be 2-D (N, vocab), got ",
                    shape_str(logits.sizes()));
  TORCH_CHECK_TYPE(is_float_type(logits.scalar_type()),
                   "confident_select: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t num_rows = logits.size(0);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "confident_select: logits must have a vocabulary of at least 1, got ",
                    shape_str(logits.sizes()));
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t{1} << 24),
                    "confident_select: vocabulary sizes up to 2^24 are supported, got ", logits.size(1));
  TORCH_CHECK_VALUE(row_ids.dim() == 1 && row_ids.size(0) == num_rows,
                    "confident_select: row_ids must be (N=", num_rows, ",), got ", shape_str(row_ids.sizes()));
  TORCH_CHECK_TYPE(row_ids.scalar_type() == at::kLong, "confident_select: row_ids must be int64, got ",
                   row_ids.scalar_type());
  TORCH_CHECK_VALUE(n.dim() == 1 && n.size(0) >= 1, "confident_select: n must be 1-D (groups,) with >= 1 entry, got ",
                    shape_str(n.sizes()));
  TORCH_CHECK_VALUE(!batch_coupled || n.size(0) == 1,
                    "confident_select: n must be (1,) when batch_coupled (one group), got ", shape_str(n.sizes()));
  TORCH_CHECK_TYPE(n.scalar_type() == at::kLong, "confident_select: n must be int64, got ", n.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0,
                    "confident_select: temperature must be >= 0 and finite, got ", temperature);
  // The kernels divide by the fp32 temperature: it must not round to 0 (a division by zero) or to inf.
  const float temperature32 = static_cast<float>(temperature);
  TORCH_CHECK_VALUE(temperature == 0 || (temperature32 > 0 && std::isfinite(temperature32)),
                    "confident_select: temperature must be 0 or a positive float32 in [1.4e-45, 3.4e38], got ",
                    temperature);
  TORCH_CHECK_VALUE(!top_p.has_value() || (*top_p >= 0 && *top_p <= 1),
                    "confident_select: top_p must be in [0, 1], got ", top_p.value_or(0));
  TORCH_CHECK_VALUE(!top_k.has_value() || *top_k >= 1, "confident_select: top_k must be >= 1, got ", top_k.value_or(0));
  TORCH_CHECK_VALUE(!threshold.has_value() || !std::isnan(*threshold), "confident_select: threshold must not be NaN");
  parse_confidence_kind(confidence);
  if (temperature > 0) {
    TORCH_CHECK_VALUE(uniforms.has_value(), "confident_select: uniforms (N,) are required when temperature > 0");
  }
  if (uniforms.has_value()) {
    const at::Tensor& u = *uniforms;
    TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == num_rows, "confident_select: uniforms must be (N=", num_rows,
                      ",), got ", shape_str(u.sizes()));
    TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat, "confident_select: uniforms must be float32, got ",
                     u.scalar_type());
    TORCH_CHECK_VALUE(u.device() == logits.device(), "confident_select: uniforms is on ", u.device(), ", logits on ",
                      logits.device());
  }
  TORCH_CHECK_VALUE(row_ids.device() == logits.device(), "confident_select: row_ids is on ", row_ids.device(),
                    ", logits on ", logits.device());
  TORCH_CHECK_VALUE(n.device() == logits.device(), "confident_select: n is on ", n.device(), ", logits on ",
                    logits.device());
}

ConfidentCommitParams confident_commit_params(const float* confidence, const at::Tensor& row_ids, const at::Tensor& n,
                                              std::optional<double> threshold, bool batch_coupled, at::Tensor& commit) {
  ConfidentCommitParams c;
  c.confidence = confidence;
  c.row_ids = row_ids.const_data_ptr<int64_t>();
  c.n = n.const_data_ptr<int64_t>();
  c.num_rows = row_ids.size(0);
  c.groups = n.size(0);
  c.batch_coupled = batch_coupled;
  c.use_threshold = threshold.has_value() && *threshold > 0;
  c.threshold = static_cast<float>(threshold.value_or(0.0));  // compared in fp32, as the reference does
  c.commit = commit.mutable_data_ptr<bool>();
  return c;
}

ConfidentSelectInputs confident_select_inputs(const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n,
                                              double temperature, const std::optional<at::Tensor>& uniforms) {
  const int64_t vocab = logits.size(1);
  ConfidentSelectInputs in;
  in.logits = logits.stride(1) == 1 || vocab == 1 ? logits : logits.contiguous();
  in.row_ids = row_ids.contiguous();
  in.n = n.contiguous();
  if (temperature > 0) in.uniforms = uniforms->contiguous();
  return in;
}

}  // namespace dimple_rt
