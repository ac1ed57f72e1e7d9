// SPDX-License-Identifier: Apache-2.0
// confident_select: the plain parameter struct that the CPU (and a future CUDA) kernel reads, and the
// argument checks that every launcher runs before filling it.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace dimple_rt {

enum class ConfidenceKind : int { kPlain = 0, kMargin = 1, kNegEntropy = 2 };

struct ConfidentSelectParams {
  const void* logits = nullptr;     // (num_rows, vocab), element type = the launcher's template parameter
  int64_t logits_row_stride = 0;    // elements between rows; the vocabulary dimension is contiguous
  const float* uniforms = nullptr;  // (num_rows,) in [0, 1), contiguous, or null (greedy)
  int64_t num_rows = 0, vocab = 0;

  float temperature = 0.0f;  // 0: greedy (no scaling); > 0: logits / temperature, then a draw
  double top_p = 1.0;        // nucleus mass; >= 1 disables it
  int64_t top_k = 0;         // 0 disables it (as does top_k >= vocab)
  ConfidenceKind kind = ConfidenceKind::kPlain;
  bool use_original_confidence = true;

  int64_t* x0 = nullptr;        // (num_rows,) out
  float* confidence = nullptr;  // (num_rows,) out
};

// Parses the confidence kind ("plain" | "margin" | "neg_entropy"); ValueError otherwise.
ConfidenceKind parse_confidence_kind(std::string_view name);

// The rows pass's parameters, filled the same way for every device: logits (N, vocab) with a contiguous
// vocabulary, uniforms contiguous (read only when temperature > 0), x0 (N,) int64 and confidence (N,) float32
// outputs. The arguments must already have passed check_confident_select_args.
ConfidentSelectParams confident_select_params(const at::Tensor& logits, const at::Tensor& uniforms, double temperature,
                                              std::optional<double> top_p, std::optional<int64_t> top_k,
                                              std::string_view confidence, bool use_original_confidence,
                                              at::Tensor& x0, at::Tensor& confidence_out);

// The inputs in the layout every kernel reads: the vocabulary contiguous (rows may keep any stride), row_ids
// and n contiguous, uniforms contiguous when temperature > 0 (else undefined). After the checks below.
struct ConfidentSelectInputs {
  at::Tensor logits, row_ids, n, uniforms;
};
ConfidentSelectInputs confident_select_inputs(const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n,
                                              double temperature, const std::optional<at::Tensor>& uniforms);

// Ranks, shapes, sizes, options and devices (ValueError), dtypes (TypeError), naming the argument. Does not read
// tensor values (row_ids order, n >= 0, uniforms in [0, 1) need host memory: the CPU launcher checks them).
void check_confident_select_args(const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n,
                                 double temperature, std::optional<double> top_p, std::optional<int64_t> top_k,
                                 const std::optional<at::Tensor>& uniforms, std::string_view confidence,
                                 bool batch_coupled);

}  // namespace dimple_rt
