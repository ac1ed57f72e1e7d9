# SPDX-License-Identifier: Apache-2.0
"""dimple_rt: a runtime for Dimple, the discrete-diffusion multimodal LLM (arXiv 2505.16990)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["Runtime", "__version__"]


def __getattr__(name: str) -> Any:
    # Import lazily so that `import dimple_rt` stays cheap and the C++ extension loads only when used.
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'dimple_rt' has no attribute {name!r}")
