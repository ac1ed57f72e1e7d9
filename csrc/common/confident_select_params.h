// SPDX-License-Identifier: Apache-2.0
// confident_select: the plain parameter structs that the CPU and CUDA kernels read, one for the rows pass
// (token and confidence per row) and one for the commit pass (the commit mask per group). Plain C++, no torch
// types: the CUDA kernels include it. The launchers fill them after the argument checks of
// common/confident_select.h.
#pragma once

#include <cstdint>

namespace dimple_rt {

enum class ConfidenceKind : int { kPlain = 0, kMargin = 1, kNegEntropy = 2 };

struct ConfidentSelectParams {
  const void* logits = nullptr;     // (num_rows, vocab), element type = the launcher's template parameter
  int64_t logits_row_stride = 0;    // elements between rows; the vocabulary dimension is contiguous
  const float* uniforms = nullptr;  // (num_rows,) in [0, 1), contiguous, or null (greedy)
  int64_t num_rows = 0, vocab = 0;  // vocab in [1, 2^24)

  // 0: greedy (no scaling); else a positive, finite fp32 value (the checks reject temperatures that round to
  // 0 or inf in fp32): logits / temperature, then a draw. When max(z) / temperature is not finite in fp32,
  // the tempered logits are (z − max z) / temperature instead (see dimple_rt/reference.py).
  float temperature = 0.0f;
  double top_p = 1.0;  // nucleus mass; >= 1 disables it
  int64_t top_k = 0;   // 0 disables it (as does top_k >= vocab)
  ConfidenceKind kind = ConfidenceKind::kPlain;
  bool use_original_confidence = true;

  int64_t* x0 = nullptr;        // (num_rows,) out
  float* confidence = nullptr;  // (num_rows,) out
};

// The commit decision: per group [s, e) of rows (the whole batch, or the run of equal row ids), every
// confidence > threshold if use_threshold and any passes; else the min(n[group], e − s) most confident, ties
// to the lowest index.
struct ConfidentCommitParams {
  const float* confidence = nullptr;  // (num_rows,)
  const int64_t* row_ids = nullptr;   // (num_rows,) non-decreasing
  const int64_t* n = nullptr;         // (groups,)
  int64_t num_rows = 0, groups = 0;
  bool batch_coupled = true;
  bool use_threshold = false;
  float threshold = 0.0f;  // compared in fp32, as the reference does
  bool* commit = nullptr;  // (num_rows,) out
};

}  // namespace dimple_rt
