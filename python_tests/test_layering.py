# SPDX-License-Identifier: Apache-2.0
"""The layering of the package (issue 14): ``model/`` sits below ``generation/`` and never imports it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dimple_rt

PACKAGE = Path(dimple_rt.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file (TYPE_CHECKING blocks and
    function bodies included), with relative imports resolved against its package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_model_never_imports_generation_in_its_source() -> None:
    files = sorted((PACKAGE / "model").glob("*.py"))
    assert files, f"no model sources under {PACKAGE}"
    offenders = {
        path.name: sorted(name for name in _imports(path) if name.startswith("dimple_rt.generation")) for path in files
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_importing_the_model_loads_no_generation_module() -> None:
    code = (
        "import sys, dimple_rt.model.dimple, dimple_rt.model.kv_cache, dimple_rt.backend\n"
        "dimple_rt.backend.backend_for('reference')\n"
        "print(sorted(m for m in sys.modules if m.startswith('dimple_rt.generation')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


def test_the_import_walker_sees_relative_and_deferred_imports() -> None:
    """The walker itself can fail: relative imports are resolved, imports inside functions are seen."""
    assert _imports(PACKAGE / "generation" / "loop.py") >= {"dimple_rt.generation.decide", "dimple_rt.model.dimple"}
    assert "dimple_rt.model.kv_cache" in _imports(PACKAGE / "backend.py")
