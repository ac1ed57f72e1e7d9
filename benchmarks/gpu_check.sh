#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One command for a GPU machine: build dimple_rt with its CUDA kernels, run every CUDA test, then time each CUDA
# op against its torch baseline (benchmarks/gpu_bench.py prints the table).
#
# Expects what this workplace's GPU machines have: python3 with a CUDA torch (2.11, CUDA 13), nvcc, ninja,
# pytest; no package index (nothing is downloaded). Usage: benchmarks/gpu_check.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is a CPU build'; \
assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, '| CUDA', \
torch.version.cuda, '|', torch.cuda.get_device_name())"

# The visible GPU decides the arch unless TORCH_CUDA_ARCH_LIST says otherwise; MAX_JOBS: nvcc needs ~3 GB a job.
export MAX_JOBS="${MAX_JOBS:-8}"
start=$SECONDS
python3 -m pip install --no-build-isolation --no-deps -v . >gpu_check_build.log 2>&1 || {
  tail -60 gpu_check_build.log >&2
  echo "build failed (full log: gpu_check_build.log)" >&2
  exit 1
}
echo "build: $((SECONDS - start)) s (log with the ptxas report: gpu_check_build.log)"

# -P: import the installed package (with its CUDA _C), not the source tree.
python3 -P -c "import torch, dimple_rt.ops as ops; assert ops.cuda_kernels_built(), 'built without CUDA kernels'"

status=0
python3 -P -m pytest python_tests/test_cuda_ops.py -q -rs "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "CUDA tests failed (pytest exit $status); not benchmarking" >&2
  exit "$status"
fi
# The rest of the suite with the CUDA build (CPU ops must still work there).
python3 -P -m pytest python_tests -q -x --ignore=python_tests/test_cuda_ops.py

python3 -P benchmarks/gpu_bench.py
