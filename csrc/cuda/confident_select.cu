// SPDX-License-Identifier: Apache-2.0
// confident_select (CUDA launcher): the shared argument checks, then one block per masked row
// (kernels/confident_select.cuh: token, confidence) and a second small kernel for the commit mask, both on
// the current stream: no host round trip, so the tensor values that the CPU op checks on the host (row_ids
// order, n >= 0, uniforms in [0, 1), a finite maximum per row) are not checked here; see the kernel file.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "common/confident_select.h"
#include "cuda/kernels/confident_select.cuh"
#include "cuda/kernels/static_switch.h"
#include "ops.h"

namespace dimple_rt {

std::tuple<at::Tensor, at::Tensor, at::Tensor> confident_select_cuda(
    const at::Tensor& logits_in, const at::Tensor& row_ids_in, const at::Tensor& n_in, double temperature,
    std::optional<double> top_p, std::optional<int64_t> top_k, const std::optional<at::Tensor>& uniforms_in,
    c10::string_view confidence, bool use_original_confidence, std::optional<double> threshold, bool batch_coupled) {
  const std::string_view kind_name(confidence.data(), confidence.size());
  check_confident_select_args(logits_in, row_ids_in, n_in, temperature, top_p, top_k, uniforms_in, kind_name, threshold,
                              batch_coupled);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "confident_select_cuda: logits must be on a CUDA device, got ",
                    logits_in.device());
  const int64_t N = logits_in.size(0);
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31), "confident_select: the CUDA kernel supports up to 2^31 - 1 rows, got ", N);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const ConfidentSelectInputs in = confident_select_inputs(logits_in, row_ids_in, n_in, temperature, uniforms_in);
  const at::Tensor &logits = in.logits, &row_ids = in.row_ids, &n = in.n, &uniforms = in.uniforms;

  at::Tensor x0 = at::empty({N}, logits.options().dtype(at::kLong));
  at::Tensor conf = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor commit = at::empty({N}, logits.options().dtype(at::kBool));
  if (N == 0) return {x0, conf, commit};

  ConfidentSelectParams p = confident_select_params(logits, uniforms, temperature, top_p, top_k, kind_name,
                                                    use_original_confidence, x0, conf);

  const cuda::ElementKind kind = logits.scalar_type() == at::kBFloat16 ? cuda::ElementKind::kBFloat16
                                 : logits.scalar_type() == at::kHalf   ? cuda::ElementKind::kFloat16
                                                                       : cuda::ElementKind::kFloat32;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ELEMENT_SWITCH(kind, elem_t, [&] {
    cuda::select::confident_select_rows_kernel<elem_t>
        <<<static_cast<unsigned>(N), cuda::select::kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const ConfidentCommitParams c = confident_commit_params(p.confidence, row_ids, n, threshold, batch_coupled, commit);
  const unsigned blocks = static_cast<unsigned>((N + cuda::select::kCommitThreads - 1) / cuda::select::kCommitThreads);
  cuda::select::commit_kernel<<<blocks, cuda::select::kCommitThreads, 0, stream>>>(c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x0, conf, commit};
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CUDA, m) {
  m.impl("confident_select", &dimple_rt::confident_select_cuda);
}
