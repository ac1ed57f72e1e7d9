// SPDX-License-Identifier: Apache-2.0
// dtype dispatch shared by the CPU and CUDA launchers: the activation dtypes every dimple_rt op accepts.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda body __VA_ARGS__ with `scalar_t` bound to float, c10::BFloat16 or c10::Half (the dtypes
// that the argument checks admit; anything else raises in AT_DISPATCH_SWITCH).
#define DIMPLE_RT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
