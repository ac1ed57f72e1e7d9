# SPDX-License-Identifier: Apache-2.0
"""What every CUDA test module shares: the marks that skip it, with the reason, where no CUDA kernel can run."""

from __future__ import annotations

import pytest
import torch

from dimple_rt import ops

CUDA_ONLY = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(
        not ops.cuda_kernels_built(),
        reason="dimple_rt._C was built without CUDA kernels (needs a CUDA torch and nvcc at build time)",
    ),
]
DEVICE = "cuda"
