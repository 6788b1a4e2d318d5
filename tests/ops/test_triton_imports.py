"""The Triton modules stand on their own: an op imports its kernel module lazily, never the other way round, so
that neither is half initialised when the other is imported first and the kernel's inputs are plain values."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hlsa.ops.triton

TRITON_DIR = Path(hlsa.ops.triton.__file__).parent
MODULES = sorted(p.stem for p in TRITON_DIR.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> list[str]:
    """The modules a file imports, at any depth (lazy imports inside functions included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def _is_op_module(name: str) -> bool:
    """`hlsa.ops` and `hlsa.ops.<op>`, but not `hlsa.ops.triton` and its modules."""
    return (name == "hlsa.ops" or name.startswith("hlsa.ops.")) and not (
        name == "hlsa.ops.triton" or name.startswith("hlsa.ops.triton.")
    )


@pytest.mark.parametrize("module", MODULES)
def test_triton_module_imports_no_op_module(module: str) -> None:
    offending = [name for name in _imported(TRITON_DIR / f"{module}.py") if _is_op_module(name)]
    assert offending == [], f"hlsa/ops/triton/{module}.py imports {offending}; pass it plain values from the op"


@pytest.mark.parametrize("module", MODULES)
def test_triton_module_imports_alone(module: str) -> None:
    """In a fresh interpreter, the kernel module imports first and pulls in no op module."""
    code = (
        f"import sys, hlsa.ops.triton.{module}\n"
        "ops = [m for m in sys.modules if m.startswith('hlsa.ops.') and not m.startswith('hlsa.ops.triton')]\n"
        "assert not ops, ops\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
