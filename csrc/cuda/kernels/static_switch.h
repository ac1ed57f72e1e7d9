// SPDX-License-Identifier: Apache-2.0
// Compile-time specialisation for the CUDA launchers (after FlashAttention's static_switch.h).
//
// Each macro turns a runtime value into a constexpr named CONST_NAME and runs the lambda body __VA_ARGS__
// with it, so a launcher reads
//
//   ELEMENT_SWITCH(kind, elem_t, [&] { HEADDIM_SWITCH(head_dim, kHeadDim, [&] { launch<elem_t, kHeadDim>(p); }); });
//
// and every instantiation is listed in one place. Keep the value sets small: each combination is a kernel that
// nvcc compiles for every arch in TORCH_CUDA_ARCH_LIST (minutes per .cu file).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dimple_rt {
namespace cuda {

// The activation element types, as the launcher (which sees torch dtypes) names them to device code.
enum class ElementKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace cuda
}  // namespace dimple_rt

// CONST_NAME is true or false.
#define BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                     \
    if (COND) {                             \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                 \
    }                                       \
  }()

// TYPE_NAME is float, __nv_bfloat16 or __half for KIND (a dimple_rt::cuda::ElementKind).
#define ELEMENT_SWITCH(KIND, TYPE_NAME, ...)                         \
  [&] {                                                              \
    switch (KIND) {                                                  \
      case ::dimple_rt::cuda::ElementKind::kBFloat16: {              \
        using TYPE_NAME = __nv_bfloat16;                             \
        return __VA_ARGS__();                                        \
      }                                                              \
      case ::dimple_rt::cuda::ElementKind::kFloat16: {               \
        using TYPE_NAME = __half;                                    \
        return __VA_ARGS__();                                        \
      }                                                              \
      default: {                                                     \
        using TYPE_NAME = float;                                     \
        return __VA_ARGS__();                                        \
      }                                                              \
    }                                                                \
  }()

// The same for the two tensor-core types only (bf16 / fp16): IS_BF16 selects.
#define HALF_SWITCH(IS_BF16, TYPE_NAME, ...) \
  [&] {                                      \
    if (IS_BF16) {                           \
      using TYPE_NAME = __nv_bfloat16;       \
      return __VA_ARGS__();                  \
    } else {                                 \
      using TYPE_NAME = __half;              \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// CONST_NAME is the padded head dimension the tensor-core attention kernel is compiled for: 64, 96 or 128
// (head_dim <= 64, <= 96, <= 128; the padding columns are zero-filled in shared memory). 80 (the vision
// tower) runs on the 96 kernel: mma.m16n8k16 steps over 16 channels, so 80 would need 5 k-steps and 10 n-tiles,
// and 96 costs one idle k-step more but shares the instantiation with every head_dim in (64, 96].
#define HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...) \
  [&] {                                          \
    if ((HEADDIM) <= 64) {                       \
      constexpr static int CONST_NAME = 64;      \
      return __VA_ARGS__();                      \
    } else if ((HEADDIM) <= 96) {                \
      constexpr static int CONST_NAME = 96;      \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr static int CONST_NAME = 128;     \
      return __VA_ARGS__();                      \
    }                                            \
  }()
