// SPDX-License-Identifier: Apache-2.0
// Small device helpers shared by the kernels: element <-> fp32 conversion, warp and block reductions.
// No torch types here (the kernels see only the plain parameter structs of csrc/common).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dimple_rt {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even, as torch's casts do.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Sum over the block; every thread gets the result. scratch: >= 32 elements of shared memory. Ends with a
// barrier-protected read, so scratch may be reused right after the call.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = lane < warps ? scratch[lane] : T(0);
  return warp_sum(total);
}

// Exclusive prefix sum over the block in thread order (thread t gets Σ_{s<t} x_s) and the total.
// scratch: >= 32 elements of shared memory.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T x, T* scratch, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  T inclusive = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  T warp_offset = 0, all = 0;
  for (int w = 0; w < warps; ++w) {  // in warp order, so every thread rounds the same way
    const T s = scratch[w];
    if (w == warp) warp_offset = all;
    all += s;
  }
  *total = all;
  T exclusive = __shfl_up_sync(kFullMask, inclusive, 1);  // not inclusive - x: no cancellation
  if (lane == 0) exclusive = 0;
  return warp_offset + exclusive;
}

}  // namespace cuda
}  // namespace dimple_rt
