// SPDX-License-Identifier: Apache-2.0
// confident_select (CUDA launcher): the shared argument checks, then, on the current stream (design note:
// kernels/confident_select.cuh):
//   one memset   of a small workspace (error slots, split and row counters);
//   stats_kernel rows x splits blocks, one pass: token + confidence for greedy plain/margin, else row stats;
//   rows_kernel  one block per row for sampling / an active filter / neg_entropy;
//   commit_kernel one block per group, unless the commit is fused into the block that finishes the last row.
// Then one device-to-host copy of the error slots, so that bad tensor values raise the CPU op's exact
// ValueError (n < 0, row_ids order/range, uniforms outside [0, 1), a row without a finite maximum). That copy
// waits for the kernels; under CUDA graph capture it is impossible and is skipped (documented in the header).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <string_view>
#include <tuple>

#include "common/confident_select.h"
#include "cuda/kernels/confident_select.cuh"
#include "cuda/kernels/static_switch.h"
#include "ops.h"

namespace dimple_rt {
namespace {

namespace sel = cuda::select;

constexpr int64_t kMaxDevices = 64;
constexpr int64_t kBlocksPerSm = 4;           // stats_kernel blocks per SM that saturate HBM
constexpr int64_t kMinVecsPerSplit = 512;     // 16-byte vectors per split block (2 per thread): no tiny blocks
constexpr int64_t kMaxFusedRows = 4096;       // one block commits every group after the last row...
constexpr int64_t kMaxFusedGroups = 8;        // ...when the batch is this small
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;  // gridDim.x

int64_t sm_count(int device) {
  static std::array<int, kMaxDevices> cache{};
  static std::mutex mu;
  const std::lock_guard<std::mutex> lock(mu);
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "confident_select: CUDA device index ", device, " out of range");
  if (cache[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cache[device];
}

// Blocks per row for stats_kernel: enough rows x splits to fill the GPU, each split at least kMinVecsPerSplit
// vectors (the vocabulary of a few rows split across SMs; many rows get one block each).
int64_t vocab_splits(int64_t rows, int64_t vocab, int64_t elem_size, int device) {
  const int64_t nvec = vocab * elem_size / 16;
  const int64_t want = (kBlocksPerSm * sm_count(device) + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, nvec / kMinVecsPerSplit));
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Raises the CPU op's ValueError for the first failing check, in the CPU op's order (n, row_ids, uniforms,
// rows). errors: the kernels' error slots (~lowest offending index, 0 = none), copied to the host.
void raise_value_errors(const at::Tensor& errors_dev, const at::Tensor& row_ids, const at::Tensor& n,
                        const at::Tensor& uniforms, bool batch_coupled) {
  const at::Tensor errors = errors_dev.cpu();  // waits for the kernels
  const int64_t* e = errors.const_data_ptr<int64_t>();
  auto index = [&](int slot) { return static_cast<int64_t>(~static_cast<uint64_t>(e[slot])); };
  if (e[sel::kErrN] != 0) {
    const int64_t g = index(sel::kErrN);
    TORCH_CHECK_VALUE(false, "confident_select: n must be >= 0, got n[", g, "] = ", n[g].item<int64_t>());
  }
  if (e[sel::kErrRowIds] != 0) {
    const int64_t i = index(sel::kErrRowIds);
    const int64_t rid = row_ids[i].item<int64_t>();
    TORCH_CHECK_VALUE(rid >= 0 && (i == 0 || rid >= row_ids[i - 1].item<int64_t>()),
                      "confident_select: row_ids must be non-decreasing and >= 0, got row_ids[", i, "] = ", rid);
    TORCH_CHECK_VALUE(batch_coupled, "confident_select: row_ids[", i, "] = ", rid, " has no entry in n (", n.size(0),
                      " groups)");
  }
  if (e[sel::kErrUniforms] != 0) {
    const int64_t i = index(sel::kErrUniforms);
    TORCH_CHECK_VALUE(false, "confident_select: uniforms must be in [0, 1), got uniforms[", i,
                      "] = ", uniforms[i].item<float>());
  }
  if (e[sel::kErrLogits] != 0) {
    TORCH_CHECK_VALUE(false, "confident_select: logits row ", index(sel::kErrLogits),
                      " has no finite maximum (every entry -inf, or +inf/NaN present)");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> confident_select_cuda(
    const at::Tensor& logits_in, const at::Tensor& row_ids_in, const at::Tensor& n_in, double temperature,
    std::optional<double> top_p, std::optional<int64_t> top_k, const std::optional<at::Tensor>& uniforms_in,
    c10::string_view confidence, bool use_original_confidence, std::optional<double> threshold, bool batch_coupled) {
  const std::string_view kind_name(confidence.data(), confidence.size());
  check_confident_select_args(logits_in, row_ids_in, n_in, temperature, top_p, top_k, uniforms_in, kind_name, threshold,
                              batch_coupled);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "confident_select_cuda: logits must be on a CUDA device, got ",
                    logits_in.device());
  const int64_t N = logits_in.size(0), V = logits_in.size(1), groups = n_in.size(0);
  TORCH_CHECK_VALUE(N < kMaxBlocks, "confident_select: the CUDA kernels support up to 2^31 - 2 rows, got ", N);
  TORCH_CHECK_VALUE(groups < kMaxBlocks, "confident_select: the CUDA kernels support up to 2^31 - 2 groups in n, got ",
                    groups);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const ConfidentSelectInputs in = confident_select_inputs(logits_in, row_ids_in, n_in, temperature, uniforms_in);
  const at::Tensor &logits = in.logits, &row_ids = in.row_ids, &n = in.n, &uniforms = in.uniforms;

  at::Tensor x0 = at::empty({N}, logits.options().dtype(at::kLong));
  at::Tensor conf = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor commit = at::empty({N}, logits.options().dtype(at::kBool));

  sel::SelectArgs a;
  a.p = confident_select_params(logits, uniforms, temperature, top_p, top_k, kind_name, use_original_confidence, x0,
                                conf);
  a.c = confident_commit_params(a.p.confidence, row_ids, n, threshold, batch_coupled, commit);
  const bool sampling = a.p.temperature > 0.0f;
  const bool need_filtered = !use_original_confidence || sampling;
  const bool filter_on = need_filtered && (a.p.top_p < 1.0 || (a.p.top_k > 0 && a.p.top_k < V));
  a.final_stats = !sampling && !filter_on && a.p.kind != ConfidenceKind::kNegEntropy;
  a.splits = N == 0 ? 1 : static_cast<int>(vocab_splits(N, V, logits.element_size(), logits.get_device()));
  TORCH_CHECK_VALUE(N * a.splits < kMaxBlocks, "confident_select: too many rows for the CUDA grid: ", N);
  a.fuse_commit = N > 0 && N <= kMaxFusedRows && groups <= kMaxFusedGroups;

  // Workspace (int64 words): [errors | rows_done | row_arrivals (N u32) | stats (N) or partials (N x splits)];
  // the part up to the counters' end is zeroed.
  constexpr int64_t kStatsWords = sizeof(sel::RowStats) / 8, kPartialWords = sizeof(sel::SplitPartial) / 8;
  static_assert(sizeof(sel::RowStats) % 8 == 0 && sizeof(sel::SplitPartial) % 8 == 0);
  const int64_t counter_words = a.splits > 1 ? (N + 1) / 2 : 0;
  const int64_t zeroed_words = sel::kNumErrorSlots + 1 + counter_words;
  const int64_t stats_words = a.final_stats ? 0 : N * kStatsWords;
  const int64_t partial_words = a.splits > 1 ? N * a.splits * kPartialWords : 0;
  at::Tensor ws = at::empty({zeroed_words + stats_words + partial_words}, logits.options().dtype(at::kLong));
  int64_t* w = ws.mutable_data_ptr<int64_t>();
  a.errors = reinterpret_cast<unsigned long long*>(w);
  a.rows_done = reinterpret_cast<unsigned*>(w + sel::kNumErrorSlots);
  a.row_arrivals = a.splits > 1 ? reinterpret_cast<unsigned*>(w + sel::kNumErrorSlots + 1) : nullptr;
  a.stats = a.final_stats ? nullptr : reinterpret_cast<sel::RowStats*>(w + zeroed_words);
  a.partials = a.splits > 1 ? reinterpret_cast<sel::SplitPartial*>(w + zeroed_words + stats_words) : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(w, 0, zeroed_words * sizeof(int64_t), stream));
  if (N > 0) {
    const cuda::ElementKind kind = logits.scalar_type() == at::kBFloat16 ? cuda::ElementKind::kBFloat16
                                   : logits.scalar_type() == at::kHalf   ? cuda::ElementKind::kFloat16
                                                                         : cuda::ElementKind::kFloat32;
    ELEMENT_SWITCH(kind, elem_t, [&] {
      sel::stats_kernel<elem_t><<<static_cast<unsigned>(N * a.splits), sel::kStatsThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!a.final_stats) {
        sel::rows_kernel<elem_t><<<static_cast<unsigned>(N), sel::kRowThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (!a.fuse_commit) {  // also with N == 0: it checks n >= 0 as the CPU op does
    sel::commit_kernel<<<static_cast<unsigned>(groups), sel::kCommitThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!capturing(stream)) {
    raise_value_errors(ws.narrow(0, 0, sel::kNumErrorSlots), row_ids, n, uniforms, batch_coupled);
  }
  return {x0, conf, commit};
}

}  // namespace dimple_rt

TORCH_LIBRARY_IMPL(dimple_rt, CUDA, m) {
  m.impl("confident_select", &dimple_rt::confident_select_cuda);
}
