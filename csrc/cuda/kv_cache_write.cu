// SPDX-License-Identifier: Apache-2.0
// kv_cache_write (CUDA launcher): the shared argument checks and parameter struct, then one grid-stride kernel
// (kernels/kv_cache_write.cuh) on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/kv_cache_write.h"
#include "cuda/kernels/kv_cache_write.cuh"
#include "cuda/kernels/static_switch.h"
#include "ops.h"

namespace dimple_rt {

void kv_cache_write_cuda(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t start) {
  check_kv_cache_write_args(cache_k, cache_v, k, v, cos, sin, start);
  TORCH_CHECK_VALUE(cache_k.is_cuda(), "kv_cache_write_cuda: cache_k must be on a CUDA device, got ",
                    cache_k.device());
  if (k.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(cache_k.device());
  const at::Tensor cos32 = cos.to(at::kFloat).contiguous();  // (batch, len, head_dim), small
  const at::Tensor sin32 = sin.to(at::kFloat).contiguous();
  const KvCacheWriteParams params = make_kv_cache_write_params(cache_k, cache_v, k, v, cos32, sin32, start);
  const int64_t pairs = params.batch * params.len * params.num_kv_heads * (params.head_dim / 2);
  const int64_t blocks = std::min<int64_t>((pairs + cuda::kKvWriteThreads - 1) / cuda::kKvWriteThreads, 65536);
  const cuda::ElementKind kind = k.scalar_type() == at::kBFloat16 ? cuda::ElementKind::kBFloat16
                                 : k.scalar_type() == at::kHalf   ? cuda::ElementKind::kFloat16
                                                                  : cuda::ElementKind::kFloat32;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ELEMENT_SWITCH(kind, elem_t, [&] {
    cuda::kv_cache_write_kernel<elem_t><<<static_cast<unsigned>(blocks), cuda::kKvWriteThreads, 0, stream>>>(params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CUDA, m) {
  m.impl("kv_cache_write", &dimple_rt::kv_cache_write_cuda);
}
