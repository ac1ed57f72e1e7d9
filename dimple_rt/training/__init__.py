# SPDX-License-Identifier: Apache-2.0
"""Training Dimple: JSONL conversations → samples (data), AR and diffusion objectives (losses), the loop (trainer).

``dimple-rt train CONFIG`` (or ``torchrun --nproc-per-node N -m dimple_rt.training CONFIG``) runs it.
"""

from __future__ import annotations

from .config import TrainConfig, TrainConfigError

__all__ = ["TrainConfig", "TrainConfigError"]
