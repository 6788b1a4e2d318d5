"""Triton kernels, imported lazily by the op dispatch in `hlsa.ops` (never at `import hlsa`)."""
