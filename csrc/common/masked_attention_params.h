// SPDX-License-Identifier: Apache-2.0
// masked_attention: the plain parameter struct that the CPU and CUDA kernels read (FlashAttention flash.h
// style). Plain C++, no torch types: the CUDA kernels include it. The launchers fill it after the argument
// checks of common/masked_attention.h.
#pragma once

#include <cstdint>

#include "common/strides.h"

namespace dimple_rt {

struct MaskedAttentionParams {
  // Element type of q/k/v/prefix/suffix/out is the launcher's template parameter; the pointers are untyped.
  // Keys are [prefix ‖ current ‖ suffix] at absolute positions [0, prefix_len), [prefix_len, prefix_len +
  // q_len), [prefix_len + q_len, prefix_len + q_len + suffix_len): query i sits at prefix_len + i.
  const void* q = nullptr;         // (batch, q_len, num_heads, head_dim)
  const void* k = nullptr;         // (batch, q_len, num_kv_heads, head_dim)
  const void* v = nullptr;         // (batch, q_len, num_kv_heads, head_dim)
  const void* prefix_k = nullptr;  // (batch, prefix_len, num_kv_heads, head_dim) or null
  const void* prefix_v = nullptr;  // (batch, prefix_len, num_kv_heads, head_dim) or null
  const void* suffix_k = nullptr;  // (batch, suffix_len, num_kv_heads, head_dim) or null
  const void* suffix_v = nullptr;  // (batch, suffix_len, num_kv_heads, head_dim) or null
  const bool* key_mask = nullptr;  // (batch, prefix_len + q_len + suffix_len) or null; true = real token
  void* out = nullptr;             // (batch, q_len, num_heads, head_dim)
  Strides4 q_stride, k_stride, v_stride, prefix_k_stride, prefix_v_stride, suffix_k_stride, suffix_v_stride,
      out_stride;
  int64_t key_mask_batch_stride = 0, key_mask_seq_stride = 0;

  // Segment boundaries (num_segments + 1 values rising from 0 to q_len), or null. Host memory for the CPU
  // kernel (a contiguous int64 copy), device memory for the CUDA kernel.
  const int64_t* cu_seqlens = nullptr;
  int64_t num_segments = 0;

  int64_t batch = 0, q_len = 0, prefix_len = 0, suffix_len = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t groups = 1;  // num_heads / num_kv_heads: q head h reads kv head h / groups
  float scale = 1.0f;  // finite and > 0 (checked)
  bool causal = false;  // never together with a suffix (checked)
};

}  // namespace dimple_rt
