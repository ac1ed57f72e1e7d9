// SPDX-License-Identifier: Apache-2.0
// masked_attention: the argument checks that the CPU and CUDA launchers run, and the function that fills the
// plain parameter struct (common/masked_attention_params.h, which the kernels read: no torch types there).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "common/masked_attention_params.h"

namespace dimple_rt {

// Checks ranks, shapes, dtypes (TypeError), devices, option combinations (cu_seqlens with a prefix/suffix,
// causal with a suffix) and scale (finite and > 0 in fp32) (ValueError), naming the argument. Does not read
// cu_seqlens' values (that needs host memory: see check_cu_seqlens_values).
void check_masked_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                 bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                 const std::optional<at::Tensor>& suffix_v);

// ValueError unless the n values rise (non-strictly) from 0 to q_len.
void check_cu_seqlens_values(const int64_t* values, int64_t n, int64_t q_len);

// Fills the struct from checked arguments and the allocated output. cu_seqlens pointer and count are left
// to the launcher (its memory is device-specific).
MaskedAttentionParams make_masked_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& prefix_k,
                                                   const std::optional<at::Tensor>& prefix_v,
                                                   const std::optional<at::Tensor>& key_mask, bool causal,
                                                   std::optional<double> scale,
                                                   const std::optional<at::Tensor>& suffix_k,
                                                   const std::optional<at::Tensor>& suffix_v, const at::Tensor& out);

}  // namespace dimple_rt
