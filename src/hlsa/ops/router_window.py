"""LTE router decode scoring: the logit of the centre token of one window of router inputs, read from a ring.

At decode, each step scores the token whose right context has just completed: its router CNN sees exactly the
`L = 1 + sum((k_i - 1) * d_i)` router inputs around it (`hlsa.layers.lte_router.ConvStack` with 'same' padding
restricted to one receptive field, docs/design.md "Streaming scores"). The inputs live in a ring of `R >= L` slots,
the window starting at slot `start`. Every conv shrinks the window by its reach, so the last layer (the logit
projection, one output channel) leaves one position: the centre.

After each conv but the last: `silu(conv(x) * keep)`, `keep` the validity of the output's centre positions (tokens
before the sequence start, pads, or past its end contribute zeros, as the full-sequence forward's zero padding
does). The input itself is masked by validity too.

`layers` are `(weight, bias, dilation)` per conv, the logit projection last: `weight [g, k, C_in, C_out]` in
tap-major layout (`ConvStack._tap_major`), `bias [g, C_out]`, `g` CNNs shared by `H / g` heads each (head `h`
uses CNN `h // (H / g)`).

Shape legend: `B` batch, `H` kv-heads, `R` ring slots, `C` input channels (`2 * head_dim`), `L` window length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hlsa.ops import kernel_backend

Layer = tuple[torch.Tensor, torch.Tensor, int]
# Layers the Triton kernel computes in one launch: the paper's router (3 convs + the logit projection).
MAX_LAYERS = 4


def window_length(layers: Sequence[Layer]) -> int:
    """`L = 1 + sum((k - 1) * d)`: the inputs one centre logit depends on."""
    return 1 + sum((w.shape[1] - 1) * d for w, _, d in layers)


def _check_inputs(x: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, layers: Sequence[Layer]) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"router_window_logits: x must be a float [B, H, R, C] ring; got {x.dtype} {tuple(x.shape)}")
    B, H, R, C = x.shape
    if valid.shape != (B, R) or valid.dtype != torch.bool:
        raise ValueError(
            f"router_window_logits: valid must be bool [B, R] = {(B, R)}; got {valid.dtype} {tuple(valid.shape)}"
        )
    if start.dim() != 0 or start.dtype != torch.int64:
        raise ValueError(
            f"router_window_logits: start must be a 0-d int64 tensor (a ring slot); got {start.dtype} "
            f"{tuple(start.shape)}"
        )
    if not layers:
        raise ValueError("router_window_logits: layers must hold at least the logit projection")
    channels = C
    for i, (w, b, d) in enumerate(layers):
        g, k, c_in, c_out = w.shape if w.dim() == 4 else (0, 0, 0, 0)
        if g < 1 or H % g != 0 or c_in != channels or b.shape != (g, c_out) or d < 1 or w.dtype != x.dtype:
            raise ValueError(
                f"router_window_logits: layer {i} must be weight [g, k, {channels}, C_out] in {x.dtype} with g "
                f"dividing H={H}, bias [g, C_out], dilation >= 1; got weight {w.dtype} {tuple(w.shape)}, bias "
                f"{tuple(b.shape)}, dilation {d}"
            )
        channels = c_out
    if channels != 1:
        raise ValueError(
            f"router_window_logits: the last layer (the logit projection) must have 1 output channel, got {channels}"
        )
    if window_length(layers) > R:
        raise ValueError(f"router_window_logits: the window ({window_length(layers)} inputs) must fit the ring (R={R})")
    tensors = [valid, start, *(t for w, b, _ in layers for t in (w, b))]
    if any(t.device != x.device for t in tensors):
        raise ValueError("router_window_logits: x, valid, start and the layers' tensors must be on one device")


def router_window_logits_ref(
    x: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, layers: Sequence[Layer]
) -> torch.Tensor:
    """Readable reference: gather the window, then each conv as a sum over taps of per-head matmuls."""
    _check_inputs(x, valid, start, layers)
    H, L = x.shape[1], window_length(layers)
    slots = (start + torch.arange(L, device=x.device)) % x.shape[2]
    keep = valid.index_select(1, slots).to(x.dtype)  # [B, L]

    def conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
        """Unpadded conv `h [B, H, n_in, C_in]` -> `[B, H, n_in - (k - 1) * d, C_out]`; head h uses CNN h // (H/g)."""
        k, n = w.shape[1], h.shape[2] - (w.shape[1] - 1) * d
        w_h, b_h = w.repeat_interleave(H // w.shape[0], 0), b.repeat_interleave(H // b.shape[0], 0)  # per head
        taps = (torch.einsum("bhnc,hco->bhno", h[:, :, t * d : t * d + n], w_h[:, t]) for t in range(k))
        return b_h[None, :, None, :] + sum(taps)

    h = x.index_select(2, slots) * keep[:, None, :, None]  # [B, H, L, C]
    lo = 0  # window position of the current layer's first output
    for w, b, d in layers[:-1]:
        h = conv(h, w, b, d)
        lo += (w.shape[1] - 1) * d // 2
        h = F.silu(h * keep[:, None, lo : lo + h.shape[2], None])
    return conv(h, *layers[-1])[:, :, 0, 0]  # the one position left: the centre


def router_window_logits(
    x: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    layers: Sequence[Layer],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Centre logit of the window of router inputs starting at ring slot `start` (no host sync, no gradient).

    Args:
        x: `[B, H, R, C]` ring of router inputs; slot `(start + i) % R` holds window position `i`.
        valid: bool `[B, R]`, per slot: False before the sequence start, at pads, and past its end.
        start: 0-d int64 tensor, the ring slot of the window's first position.
        layers: `(weight [g, k, C_in, C_out], bias [g, C_out], dilation)` per conv, the logit projection last
            (`C_out = 1`); weights in the dtype of `x`.
        backend: "torch" (reference), "triton" (at most `MAX_LAYERS` = 4 layers), or None (Triton for CUDA tensors
            and CNNs of up to 4 layers, else the reference).

    Returns:
        logits `[B, H]` in the dtype of `x`.
    """
    chosen = kernel_backend("router_window_logits", backend, x)
    if chosen == "triton" and len(layers) > MAX_LAYERS:
        if backend == "triton":
            raise ValueError(
                f"router_window_logits: the Triton kernel takes at most {MAX_LAYERS} layers (convs + the logit "
                f"projection), got {len(layers)}; use backend='torch' or None for deeper CNNs"
            )
        chosen = "torch"  # auto: a deeper CNN than the kernel's runs the reference
    if chosen == "torch":
        return router_window_logits_ref(x, valid, start, layers)
    _check_inputs(x, valid, start, layers)
    from hlsa.ops.triton.router_window import router_window_triton

    return router_window_triton(x, valid, start, layers)
