// SPDX-License-Identifier: Apache-2.0
// Small helpers for the argument checks of every op: shapes printed as Python prints them (so a message
// reads like the reference's), 4-D strides, and the activation-dtype test.
#pragma once

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

#include "common/strides.h"

namespace dimple_rt {

// A shape as Python prints a tuple: (2, 3) or (5,).
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

// Element strides of a (batch, seq, head, dim) tensor.
inline Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The activation dtypes the kernels accept.
inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace dimple_rt
