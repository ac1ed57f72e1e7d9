// SPDX-License-Identifier: Apache-2.0
// masked_attention (CUDA launcher): the shared argument checks, the parameter struct, and the launch of the
// tensor-core kernel (bf16/fp16, head_dim padded to 64/96/128) or the fp32 kernel; device code and its
// design note: kernels/masked_attention.cuh.
//
// cu_seqlens is copied to the host once to check its values with the CPU op's message (the vision tower calls
// this a few times per image, never in the decode loop); the kernel reads an int64 copy on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/masked_attention.h"
#include "cuda/kernels/masked_attention.cuh"
#include "cuda/kernels/static_switch.h"
#include "ops.h"

namespace dimple_rt {

at::Tensor masked_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                 bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                 const std::optional<at::Tensor>& suffix_v) {
  check_masked_attention_args(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, causal, scale, suffix_k, suffix_v);
  TORCH_CHECK_VALUE(q.is_cuda(), "masked_attention_cuda: q must be on a CUDA device, got ", q.device());
  TORCH_CHECK_VALUE(q.size(3) <= cuda::attention::kMaxHeadDim, "masked_attention: the CUDA kernels support head_dim <= ",
                    cuda::attention::kMaxHeadDim, ", got ", q.size(3));
  TORCH_CHECK_VALUE(q.size(1) * (q.size(2) / k.size(2)) < (int64_t{1} << 31) &&
                        q.size(1) + (prefix_k.has_value() ? prefix_k->size(1) : 0) +
                                (suffix_k.has_value() ? suffix_k->size(1) : 0) <
                            (int64_t{1} << 31),
                    "masked_attention: the CUDA kernels need prefix_len + len + suffix_len and len * (heads / "
                    "kv_heads) below 2^31");
  TORCH_CHECK_VALUE(k.size(0) <= 65535 && k.size(2) <= 65535,
                    "masked_attention: the CUDA kernels support batch and kv_heads up to 65535 (grid y/z), got batch ",
                    k.size(0), " and kv_heads ", k.size(2));
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor cu64;
  if (cu_seqlens.has_value()) {
    cu64 = cu_seqlens->to(at::kLong).contiguous();  // (segments + 1,) on the device
    const at::Tensor host = cu64.cpu();
    check_cu_seqlens_values(host.const_data_ptr<int64_t>(), host.numel(), q.size(1));
  }
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous (batch, len, heads, head_dim)
  if (out.numel() == 0) return out;

  MaskedAttentionParams p =
      make_masked_attention_params(q, k, v, prefix_k, prefix_v, key_mask, causal, scale, suffix_k, suffix_v, out);
  if (cu_seqlens.has_value()) {
    p.cu_seqlens = cu64.const_data_ptr<int64_t>();
    p.num_segments = cu64.numel() - 1;
  }
  const int64_t rows = p.q_len * p.groups;  // packed (query, head-in-group) rows per kv head
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kFloat) {
    using Cfg = cuda::attention::F32Config;
    const dim3 grid((rows + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_kv_heads, p.batch);
    cuda::attention::masked_attention_f32_kernel<<<grid, Cfg::kThreads, 0, stream>>>(p);
  } else {
    HALF_SWITCH(q.scalar_type() == at::kBFloat16, elem_t, [&] {
      HEADDIM_SWITCH(p.head_dim, kHeadDim, [&] {
        using Cfg = cuda::attention::TcConfig<kHeadDim>;
        const dim3 grid((rows + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_kv_heads, p.batch);
        cuda::attention::masked_attention_tc_kernel<elem_t, kHeadDim><<<grid, Cfg::kThreads, 0, stream>>>(p);
      });
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CUDA, m) {
  m.impl("masked_attention", &dimple_rt::masked_attention_cuda);
}
