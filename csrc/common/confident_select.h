// SPDX-License-Identifier: Apache-2.0
// confident_select: the argument checks that the CPU and CUDA launchers run, and the functions that fill the
// plain parameter structs (common/confident_select_params.h, which the kernels read: no torch types there).
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "common/confident_select_params.h"

namespace dimple_rt {

// Parses the confidence kind ("plain" | "margin" | "neg_entropy"); ValueError otherwise.
ConfidenceKind parse_confidence_kind(std::string_view name);

// The rows pass's parameters, filled the same way for every device: logits (N, vocab) with a contiguous
// vocabulary, uniforms contiguous (read only when temperature > 0), x0 (N,) int64 and confidence (N,) float32
// outputs. The arguments must already have passed check_confident_select_args.
ConfidentSelectParams confident_select_params(const at::Tensor& logits, const at::Tensor& uniforms, double temperature,
                                              std::optional<double> top_p, std::optional<int64_t> top_k,
                                              std::string_view confidence, bool use_original_confidence,
                                              at::Tensor& x0, at::Tensor& confidence_out);

// The commit pass's parameters (one group, or one per batch row), for every device; row_ids and n contiguous.
ConfidentCommitParams confident_commit_params(const float* confidence, const at::Tensor& row_ids, const at::Tensor& n,
                                              std::optional<double> threshold, bool batch_coupled, at::Tensor& commit);

// The inputs in the layout every kernel reads: the vocabulary contiguous (rows may keep any stride), row_ids
// and n contiguous, uniforms contiguous when temperature > 0 (else undefined). After the checks below.
struct ConfidentSelectInputs {
  at::Tensor logits, row_ids, n, uniforms;
};
ConfidentSelectInputs confident_select_inputs(const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n,
                                              double temperature, const std::optional<at::Tensor>& uniforms);

// Ranks, shapes, sizes, options (temperature 0 or a positive finite fp32 value, top_p in [0, 1], top_k >= 1,
// threshold not NaN) and devices (ValueError), dtypes (TypeError), naming the argument. Does not read tensor
// values (row_ids order, n >= 0, uniforms in [0, 1) need host memory: the CPU launcher checks them).
void check_confident_select_args(const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n,
                                 double temperature, std::optional<double> top_p, std::optional<int64_t> top_k,
                                 const std::optional<at::Tensor>& uniforms, std::string_view confidence,
                                 std::optional<double> threshold, bool batch_coupled);

}  // namespace dimple_rt
