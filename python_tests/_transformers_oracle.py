# SPDX-License-Identifier: Apache-2.0
"""The transformers oracle of the comparison tests, or a module-level skip that says why it is unusable.

The tests compare against transformers' internals (module paths, processor backends, tokenizer behaviour),
which move between releases, so only the version pinned in pyproject.toml's ``test`` extra counts as the
oracle. Elsewhere (a GPU image with another version, or none) these modules skip instead of failing to import.
"""

from __future__ import annotations

from types import ModuleType

import pytest

PINNED_TRANSFORMERS = "5.23.0"  # pyproject.toml: [project.optional-dependencies] test


def require_transformers() -> ModuleType:
    """transformers at the pinned version; otherwise skip the calling test module with the reason."""
    transformers = pytest.importorskip(
        "transformers", reason=f"transformers is not installed (the oracle is transformers=={PINNED_TRANSFORMERS})"
    )
    if transformers.__version__ != PINNED_TRANSFORMERS:
        pytest.skip(
            f"transformers {transformers.__version__} is installed; the oracle is the pinned "
            f"transformers=={PINNED_TRANSFORMERS} (its internals differ between releases)",
            allow_module_level=True,
        )
    return transformers
