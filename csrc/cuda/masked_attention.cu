// SPDX-License-Identifier: Apache-2.0
// masked_attention (CUDA launcher): the shared argument checks, the parameter struct, the number of KV splits,
// and the launches of the tensor-core kernel (bf16/fp16, head_dim padded to 64/96/128) or the fp32 kernel,
// then of the merge kernel when the keys were split; device code and its design note:
// kernels/masked_attention.cuh (kernels/masked_attention_split.cuh: grid, splits, merge).
//
// cu_seqlens is copied to the host once to check its values with the CPU op's message (the vision tower calls
// this a few times per image, never in the decode loop); the kernel reads an int64 copy on the device.
// DIMPLE_RT_ATTENTION_SPLITS=n (1..64) forces n KV splits instead of the heuristic: for the tests, which
// must reach split boundaries and empty splits on any GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <string>

#include "common/masked_attention.h"
#include "cuda/kernels/masked_attention.cuh"
#include "cuda/kernels/masked_attention_split.cuh"
#include "cuda/kernels/static_switch.h"
#include "ops.h"

namespace dimple_rt {
namespace {

namespace attn = cuda::attention;
using AttentionKernel = void (*)(MaskedAttentionParams, attn::SplitKvParams);

constexpr int kMaxDevices = 128;
constexpr int64_t kMaxGridYZ = 65535;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Resident blocks of kKernel on the whole current device (SMs x blocks per SM at `smem` dynamic bytes), after
// the opt-in to that much dynamic shared memory (needed above 48 KB). Once per kernel and device.
template <auto kKernel>
int64_t kernel_capacity(int threads, int smem) {
  static std::array<std::atomic<int64_t>, kMaxDevices> cached{};  // 0: not asked yet
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev >= 0 && dev < kMaxDevices, "masked_attention: CUDA device index ", dev, " >= ", kMaxDevices);
  int64_t capacity = cached[dev].load(std::memory_order_relaxed);
  if (capacity == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, threads, smem));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    TORCH_CHECK(per_sm > 0, "masked_attention: the kernel does not fit on this GPU (", threads, " threads, ", smem,
                " bytes of shared memory per block)");
    capacity = static_cast<int64_t>(per_sm) * sms;
    cached[dev].store(capacity, std::memory_order_relaxed);
  }
  return capacity;
}

// DIMPLE_RT_ATTENTION_SPLITS: 0 when unset or empty, else the forced number of splits (ValueError if invalid).
int forced_splits() {
  const char* text = std::getenv("DIMPLE_RT_ATTENTION_SPLITS");
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && value >= 1 && value <= attn::kMaxSplits,
                    "masked_attention: DIMPLE_RT_ATTENTION_SPLITS must be an integer in [1, ", attn::kMaxSplits,
                    "], got '", std::string(text), "'");
  return static_cast<int>(value);
}

// Launches kKernel (block_m rows x block_n keys per step, ws_stride = its padded head_dim) over the grid of
// masked_attention_split.cuh's block_coord, split when the heuristic (or the override) says so, then the merge.
template <auto kKernel>
void launch(const MaskedAttentionParams& p, AttentionKernel merge, int block_m, int block_n, int threads, int smem,
            int ws_stride, const at::Tensor& q, cudaStream_t stream) {
  const int64_t row_tiles = ceil_div(p.q_len * p.groups, block_m);
  const int64_t batch_heads = p.batch * p.num_kv_heads;
  const int64_t grid_y = std::min(batch_heads, kMaxGridYZ), grid_z = ceil_div(batch_heads, grid_y);
  TORCH_CHECK_VALUE(grid_z <= kMaxGridYZ, "masked_attention: the CUDA kernels support batch * kv_heads up to 65535^2 ",
                    "(grid y x z), got batch ", p.batch, " x kv_heads ", p.num_kv_heads);
  const int64_t capacity = kernel_capacity<kKernel>(threads, smem);
  const int forced = forced_splits();
  const int64_t key_tiles = ceil_div(p.prefix_len + p.q_len + p.suffix_len, block_n);
  const int splits = forced > 0 ? forced : attn::choose_num_splits(row_tiles * batch_heads, capacity, key_tiles);
  TORCH_CHECK_VALUE(row_tiles * splits < (int64_t{1} << 31), "masked_attention: ", row_tiles, " row tiles x ", splits,
                    " splits exceed the CUDA grid's x dimension");

  attn::SplitKvParams sp;
  at::Tensor o_partial, lse;  // freed after the launches: the caching allocator reuses them in stream order
  if (splits > 1) {
    sp.num_splits = splits;
    sp.ws_stride = ws_stride;
    sp.rows_flat = p.batch * p.q_len * p.num_heads;
    o_partial = at::empty({splits, sp.rows_flat, ws_stride}, q.options().dtype(at::kFloat));
    lse = at::empty({splits, sp.rows_flat}, q.options().dtype(at::kFloat));
    sp.o_partial = o_partial.mutable_data_ptr<float>();
    sp.lse = lse.mutable_data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(row_tiles * splits), static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(grid_z));
  kKernel<<<grid, threads, smem, stream>>>(p, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    constexpr int64_t kRowsPerBlock = attn::kMergeThreads / 32;
    const int64_t blocks = std::min<int64_t>(ceil_div(sp.rows_flat, kRowsPerBlock), int64_t{1} << 20);  // grid-stride
    merge<<<static_cast<unsigned>(blocks), attn::kMergeThreads, 0, stream>>>(p, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor masked_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                                 const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cu_seqlens,
                                 bool causal, std::optional<double> scale, const std::optional<at::Tensor>& suffix_k,
                                 const std::optional<at::Tensor>& suffix_v) {
  check_masked_attention_args(q, k, v, prefix_k, prefix_v, key_mask, cu_seqlens, causal, scale, suffix_k, suffix_v);
  TORCH_CHECK_VALUE(q.is_cuda(), "masked_attention_cuda: q must be on a CUDA device, got ", q.device());
  TORCH_CHECK_VALUE(q.size(3) <= attn::kMaxHeadDim, "masked_attention: the CUDA kernels support head_dim <= ",
                    attn::kMaxHeadDim, ", got ", q.size(3));
  TORCH_CHECK_VALUE(q.size(1) * (q.size(2) / k.size(2)) < (int64_t{1} << 31) &&
                        q.size(1) + (prefix_k.has_value() ? prefix_k->size(1) : 0) +
                                (suffix_k.has_value() ? suffix_k->size(1) : 0) <
                            (int64_t{1} << 31),
                    "masked_attention: the CUDA kernels need prefix_len + len + suffix_len and len * (heads / "
                    "kv_heads) below 2^31");
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kFloat) {
    using Cfg = attn::F32Config;
    launch<attn::masked_attention_f32_kernel>(p, attn::masked_attention_merge_kernel<float>, Cfg::kBlockM,
                                              Cfg::kBlockN, Cfg::kThreads, Cfg::kSmemBytes, Cfg::kD, q, stream);
  } else {
    HALF_SWITCH(q.scalar_type() == at::kBFloat16, elem_t, [&] {
      HEADDIM_SWITCH(p.head_dim, kHeadDim, [&] {
        using Cfg = attn::TcConfig<kHeadDim>;
        launch<attn::masked_attention_tc_kernel<elem_t, kHeadDim>>(p, attn::masked_attention_merge_kernel<elem_t>,
                                                                   Cfg::kBlockM, Cfg::kBlockN, Cfg::kThreads,
                                                                   Cfg::kSmemBytes, kHeadDim, q, stream);
      });
    });
  }
  return out;
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CUDA, m) {
  m.impl("masked_attention", &dimple_rt::masked_attention_cuda);
}
