// SPDX-License-Identifier: Apache-2.0
// The C++ table of contents: one declaration per op and device. Schemas (with their documentation) are in
// torch_bindings.cpp; each device file registers its own implementations with TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include <c10/util/string_view.h>

namespace dimple_rt {

// Attention of the current tokens over [prefix ‖ current ‖ suffix] keys; see dimple_rt/reference.py.
at::Tensor masked_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                const std::optional<at::Tensor>& suffix_v);

// Writes rotate(k) and v into cache_k/cache_v at positions [start, start + len); see dimple_rt/reference.py.
void kv_cache_write_cpu(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cos, const at::Tensor& sin, int64_t start);

// One step's (x0, confidence, commit) from the masked rows' logits; see dimple_rt/reference.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor> confident_select_cpu(
    const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n, double temperature,
    std::optional<double> top_p, std::optional<int64_t> top_k, const std::optional<at::Tensor>& uniforms,
    c10::string_view confidence, bool use_original_confidence, std::optional<double> threshold, bool batch_coupled);

#ifdef DIMPLE_RT_WITH_CUDA
at::Tensor masked_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                 bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                 const std::optional<at::Tensor>& suffix_v);

void kv_cache_write_cuda(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t start);

std::tuple<at::Tensor, at::Tensor, at::Tensor> confident_select_cuda(
    const at::Tensor& logits, const at::Tensor& row_ids, const at::Tensor& n, double temperature,
    std::optional<double> top_p, std::optional<int64_t> top_k, const std::optional<at::Tensor>& uniforms,
    c10::string_view confidence, bool use_original_confidence, std::optional<double> threshold, bool batch_coupled);
#endif

}  // namespace dimple_rt
