"""Ops: each file holds a public function, its pure-PyTorch reference and the dispatch to fast kernels."""

import torch


def kernel_backend(op: str, backend: str | None, x: torch.Tensor) -> str:
    """The backend of an op with a Triton kernel and a reference: `backend` checked ("torch", "triton" or None), and
    None resolved to "triton" for CUDA tensors (`x`), else "torch"."""
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"{op}: backend must be None, 'torch' or 'triton'; got {backend!r}")
    if backend is None:
        return "triton" if x.is_cuda else "torch"
    return backend
