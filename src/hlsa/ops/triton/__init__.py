"""Triton kernels, imported lazily by the op dispatch in `hlsa.ops` (never at `import hlsa`)."""

import os


def interpreted() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1): launchers then pick small fixed tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
