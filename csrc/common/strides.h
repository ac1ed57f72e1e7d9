// SPDX-License-Identifier: Apache-2.0
// Element strides of a (batch, seq, head, dim) tensor, as the parameter structs carry them. Plain C++: the CUDA
// kernels include this, so no torch types here (checks.h fills it from an at::Tensor).
#pragma once

#include <cstdint>

namespace dimple_rt {

struct Strides4 {
  int64_t batch = 0, seq = 0, head = 0, dim = 0;
};

}  // namespace dimple_rt
