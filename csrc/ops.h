// SPDX-License-Identifier: Apache-2.0
// The C++ table of contents: one declaration per op and device. Schemas (with their documentation) are in
// torch_bindings.cpp; each device file registers its own implementations with TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dimple_rt {

// Attention of the current tokens over [prefix ‖ current] keys; see dimple_rt/reference.py.
at::Tensor masked_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                bool causal, std::optional<double> scale);

#ifdef DIMPLE_RT_WITH_CUDA
at::Tensor masked_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                 bool causal, std::optional<double> scale);
#endif

}  // namespace dimple_rt
