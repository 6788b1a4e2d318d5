"""Linear projection `x @ weight^T` with a decode fast path: few rows, bound by streaming the weight.

A decode step multiplies one token per sequence by every weight matrix of the model. With batch 64 those GEMMs are
`[64, K] x [K, N]`; cuBLAS runs them at a fraction of the memory bandwidth. The Triton kernel
(`hlsa.ops.triton.linear`) splits K so that every SM streams a slab of the weight, and returns fp32 partial sums.
Under torch.compile they are added as pointwise terms, which Inductor fuses into the kernel that consumes the
output (a norm, an activation); a `.sum(0)` would be a reduction of its own, which a following norm cannot absorb.

The kernel saves GPU time but costs more host time per launch than cuBLAS, so `backend="auto"` uses it only where
launches are not on the host's clock: inside torch.compile or a CUDA graph capture (the compiled, graph-replayed
decode step of `benchmarks/e2e.py`). Eager calls take `F.linear`.

The reference is `F.linear`. It also serves everything the kernel does not: more than `MAX_ROWS` rows (prefill,
training), gradients, fp32, CPU tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hlsa.ops import kernel_backend

# Rows (tokens) the Triton kernel takes in one tile: a decode batch of up to 64 sequences.
MAX_ROWS = 64
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x must be [..., K] and weight [N, K] with the same K; got x {tuple(x.shape)}, weight "
            f"{tuple(weight.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"linear: x and weight must be on one device; got {x.device} and {weight.device}")


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(1, x.shape[-1])
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # Different dtypes (autocast's mixed precision) are F.linear's to reconcile.
    return 0 < rows <= MAX_ROWS and x.dtype == weight.dtype and x.dtype in KERNEL_DTYPES and not grad


def _launches_off_the_clock() -> bool:
    """Whether kernel launches are compiled or captured, so the kernel's host cost per launch does not count."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def linear_partials(x: torch.Tensor, weight: torch.Tensor, *, backend: str | None = "auto") -> torch.Tensor:
    """`x @ weight^T` as `S` partial sums over splits of K: `[S, ..., N]`, their sum the product.

    For a consumer that adds the splits itself: a user Triton kernel, which Inductor cannot fuse a sum into (the GDN
    decode step, `hlsa.ops.gated_delta_decode`). `S = 1` (the product itself, in F.linear's dtype or x's) on
    `F.linear` and when the kernel does not split K; else the kernel's fp32 partials. Arguments as `linear`.
    """
    _check_inputs(x, weight)
    chosen = kernel_backend("linear", backend, x)
    if chosen == "triton" and not _kernel_applies(x, weight):
        if backend == "triton":
            raise ValueError(
                f"linear: the Triton kernel takes 1 to {MAX_ROWS} rows and a weight of one bf16/fp16 dtype, without "
                f"gradients; got {x.numel() // max(1, x.shape[-1])} rows of {x.dtype}, weight {weight.dtype} (requires "
                f"grad: {x.requires_grad or weight.requires_grad}); use backend='torch' or 'auto'"
            )
        chosen = "torch"
    if chosen == "triton" and backend != "triton" and not _launches_off_the_clock():  # "auto"
        chosen = "torch"
    if chosen == "torch":
        return F.linear(x, weight)[None]
    from hlsa.ops.triton.linear import linear_partials_triton

    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = linear_partials_triton(rows, weight.contiguous())
    return out.reshape(-1, *x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str | None = "auto") -> torch.Tensor:
    """`x @ weight^T` (no bias).

    Args:
        x: `[..., K]`.
        weight: `[N, K]`, on the device of `x` (a different dtype, as under autocast, takes `F.linear`).
        backend: "torch" (`F.linear`), "triton" (at most `MAX_ROWS` rows of bf16/fp16, no gradient), or "auto"
            (Triton for CUDA tensors where it applies, when compiling or capturing a CUDA graph; else `F.linear`).

    Returns:
        `[..., N]` in the dtype of `x`.
    """
    partials = linear_partials(x, weight, backend=backend)
    if partials.shape[0] == 1:
        return partials[0]  # in F.linear's dtype (autocast's, under autocast)
    return add_partials(partials, x.dtype)


def add_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of `linear_partials`' terms `[S, ...]`, in `dtype`. Under torch.compile the terms are added pointwise,
    which fuses into the consumer (a norm, an activation); a reduction over S would be a kernel of its own."""
    if partials.shape[0] == 1:
        return partials[0].to(dtype)
    out = sum(p.float() for p in partials.unbind(0)) if torch.compiler.is_compiling() else partials.float().sum(0)
    return out.to(dtype)
