// SPDX-License-Identifier: Apache-2.0
// masked_attention: the plain parameter struct that the CPU and CUDA kernels read, and the argument checks
// that both launchers run before filling it (FlashAttention flash.h style: kernels see no torch types).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace dimple_rt {

struct MaskedAttentionParams {
  // Element type of q/k/v/prefix/out is the launcher's template parameter; the pointers are untyped here.
  const void* q = nullptr;         // (batch, q_len, num_heads, head_dim)
  const void* k = nullptr;         // (batch, q_len, num_kv_heads, head_dim)
  const void* v = nullptr;         // (batch, q_len, num_kv_heads, head_dim)
  const void* prefix_k = nullptr;  // (batch, prefix_len, num_kv_heads, head_dim) or null
  const void* prefix_v = nullptr;  // (batch, prefix_len, num_kv_heads, head_dim) or null
  const bool* key_mask = nullptr;  // (batch, prefix_len + q_len) or null; true = real token
  void* out = nullptr;             // (batch, q_len, num_heads, head_dim)
  Strides4 q_stride, k_stride, v_stride, prefix_k_stride, prefix_v_stride, out_stride;
  int64_t key_mask_batch_stride = 0, key_mask_seq_stride = 0;

  // Segment boundaries (num_segments + 1 values rising from 0 to q_len), or null. Host memory for the CPU
  // kernel (a contiguous int64 copy), device memory for a CUDA kernel.
  const int64_t* cu_seqlens = nullptr;
  int64_t num_segments = 0;

  int64_t batch = 0, q_len = 0, prefix_len = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t groups = 1;  // num_heads / num_kv_heads: q head h reads kv head h / groups
  float scale = 1.0f;
  bool causal = false;
};

// Checks ranks, shapes, dtypes (TypeError), devices and option combinations (ValueError), naming the
// argument. Does not read cu_seqlens' values (that needs host memory: see check_cu_seqlens_values).
void check_masked_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask,
                                 const std::optional<at::Tensor>& cu_seqlens);

// ValueError unless the n values rise (non-strictly) from 0 to q_len.
void check_cu_seqlens_values(const int64_t* values, int64_t n, int64_t q_len);

// Fills the struct from checked arguments and the allocated output. cu_seqlens pointer and count are left
// to the launcher (its memory is device-specific).
MaskedAttentionParams make_masked_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& prefix_k,
                                                   const std::optional<at::Tensor>& prefix_v,
                                                   const std::optional<at::Tensor>& key_mask, bool causal,
                                                   std::optional<double> scale, const at::Tensor& out);

}  // namespace dimple_rt
