"""Ops: each file holds a public function, its pure-PyTorch reference and the dispatch to fast kernels."""

import torch

from hlsa.ops.triton import interpreted


def kernel_backend(op: str, backend: str | None, x: torch.Tensor) -> str:
    """The backend of an op with a Triton kernel and a reference: `backend` checked ("torch", "triton" or None; an
    explicit "triton" needs CUDA tensors `x`, or TRITON_INTERPRET=1), and None resolved to "triton" for CUDA tensors,
    else "torch"."""
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"{op}: backend must be None, 'torch' or 'triton'; got {backend!r}")
    if backend is None:
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not interpreted():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    return backend
