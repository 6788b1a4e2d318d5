"""Ops: each file holds a public function, its pure-PyTorch reference and the dispatch to fast kernels."""

import torch

from hlsa.ops.triton import interpreted

# The backends every op's `backend` takes: "auto" picks the fastest implementation available for the tensors'
# device; "torch" forces pure PyTorch (the reference, or a chunked or blocked PyTorch form of it where the op has
# one); "triton" and "fla" force that kernel family, refused where the op has none or the device cannot run it.
# None is accepted as "auto". `HybridConfig.backend` takes a subset.
BACKENDS = ("auto", "torch", "triton", "fla")


def check_backend(op: str, backend: str | None, kernels: tuple[str, ...]) -> str:
    """`backend` checked against `BACKENDS` and the kernel families `kernels` that `op` has; None -> "auto"."""
    if backend is None:
        return "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} (or None, 'auto'); got {backend!r}")
    if backend not in ("auto", "torch", *kernels):
        raise ValueError(f"{op}: has no {backend!r} kernel; backend must be one of {('auto', 'torch', *kernels)}")
    return backend


def kernel_backend(op: str, backend: str | None, x: torch.Tensor) -> str:
    """The backend of an op with a Triton kernel and a reference: `backend` checked (an explicit "triton" needs CUDA
    tensors `x`, or TRITON_INTERPRET=1), and "auto" resolved to "triton" for CUDA tensors, else "torch"."""
    backend = check_backend(op, backend, ("triton",))
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not interpreted():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    return backend
