"""LTE router decode step: the router CNN advanced by one token, with a ring of each conv's recent inputs.

A decode step scores the token whose right context has just completed (docs/design.md, `router_step`): token
`j = position - m`, `m = sum_i r_i` the router's margin, `r_i = (k_i - 1) * d_i / 2` the reach of conv `i`
(`k_i` odd taps of dilation `d_i`). Recomputing its CNN from the `2m + 1` router inputs around it redoes every
conv over a shrinking window (9, 5 and 1 positions for the paper's three `(3, 2)` convs) and chains four dependent
layers through memory. Each conv output depends only on the `2 r_i + 1` inputs around it, though, so a step needs
just one new output per conv, if the recent inputs of every conv are kept:

    conv `i` at step `position` outputs position `p_i = position - (r_0 + ... + r_i)` from its inputs at
    `p_i - r_i + t * d_i` (t < k_i); its last tap is `p_i + r_i = p_{i-1}`, the output the previous conv (or,
    for conv 0, the new token) has just produced.

So every layer reads `k_i - 1` older inputs from the ring and one fresh input, and the logit projection (1 x 1)
reads the last conv's fresh output: the logit of `p_last = position - m = j`. The outputs are exact, not
approximations: an output once computed never changes (its inputs are all known), and every masked value is what
the full-sequence forward's zero padding gives (`hlsa.layers.lte_router.ConvStack`).

State: one ring `x [B, H, R, sum_i C_i]` (`R >= 2m + 1` slots, position `p` in slot `p % R`), conv `i`'s input in
channels `[sum_{l<i} C_l, sum_{l<=i} C_l)`: the router inputs `[k || v]` (pre-RoPE), then each conv's output but
the last's. `valid [B, R]` per slot: False before the sequence start and at pads. A step writes the new token's
inputs, each conv's fresh output and the new token's validity (a decode token is real) into its slot; every read
position is masked by its validity, so slots outside the window may hold anything.

After each conv: `silu(conv(x) * keep)`, `keep` the validity of the output's position. `layers` are
`(weight [g, k, C_in, C_out] tap-major (`ConvStack._tap_major`), bias [g, C_out], dilation)` per conv, then the
logit projection `(weight [g, 1, C, 1], bias [g, 1], 1)`; `g` CNNs shared by `H / g` heads each (head `h` uses CNN
`h // (H / g)`), the same `g` in every layer.

Shape legend: `B` batch, `H` kv-heads, `D` head dim, `R` ring slots, `C_i` conv `i`'s input channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hlsa.ops import kernel_backend

Layer = tuple[torch.Tensor, torch.Tensor, int]


def reach(layer: Layer) -> int:
    """`r = (k - 1) * d / 2`: the neighbours on each side that one output of a 'same'-padded conv reads."""
    weight, _, dilation = layer
    return (weight.shape[1] - 1) * dilation // 2


def ring_channels(layers: Sequence[Layer]) -> list[int]:
    """`C_i` per conv (its input channels): the ring's channel blocks, in order."""
    return [weight.shape[2] for weight, _, _ in layers[:-1]]


def step_ring_bytes(layers: Sequence[Layer], num_heads: int, itemsize: int) -> int:
    """Ring bytes per sequence one step moves: per head, each conv's `k - 1` older inputs read and its fresh input
    written; and the validity bytes of the slots read (one row for all heads). For the benchmarks' byte counts."""
    read = sum((weight.shape[1] - 1) * weight.shape[2] for weight, _, _ in layers[:-1])
    slots = sum(weight.shape[1] - 1 for weight, _, _ in layers[:-1])
    return num_heads * (read + sum(ring_channels(layers))) * itemsize + slots


def _check_inputs(
    kv: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, position: torch.Tensor, layers: Sequence
) -> None:
    if kv.dim() != 3 or not kv.is_floating_point():
        raise ValueError(
            f"router_step_logits: kv must be float [B, H, 2D] (each head's [k || v]); got {kv.dtype} {tuple(kv.shape)}"
        )
    B, H, channels = kv.shape
    if len(layers) < 2:
        raise ValueError("router_step_logits: layers must hold at least one conv and the logit projection")
    R = x.shape[2] if x.dim() == 4 else 0
    if x.shape != (B, H, R, sum(ring_channels(layers))) or x.dtype != kv.dtype:
        raise ValueError(
            f"router_step_logits: x must be a [B, H, R, sum of the convs' input channels] = [{B}, {H}, R, "
            f"{sum(ring_channels(layers))}] ring in {kv.dtype}; got {x.dtype} {tuple(x.shape)}"
        )
    if valid.shape != (B, R) or valid.dtype != torch.bool:
        raise ValueError(
            f"router_step_logits: valid must be bool [B, R] = {(B, R)}; got {valid.dtype} {tuple(valid.shape)}"
        )
    if position.dim() != 0 or position.dtype != torch.int64:
        raise ValueError(
            f"router_step_logits: position must be a 0-d int64 tensor; got {position.dtype} {tuple(position.shape)}"
        )
    for i, (w, b, d) in enumerate(layers):
        g, taps, c_in, c_out = w.shape if w.dim() == 4 else (0, 0, 0, 0)
        if g < 1 or H % g != 0 or c_in != channels or b.shape != (g, c_out) or d < 1 or taps % 2 == 0:
            raise ValueError(
                f"router_step_logits: layer {i} must be weight [g, k, {channels}, C_out] with g dividing H={H} "
                f"and k odd, bias [g, C_out], dilation >= 1; got weight {tuple(w.shape)}, bias {tuple(b.shape)}, "
                f"dilation {d}"
            )
        if w.dtype != kv.dtype or b.dtype != kv.dtype:
            raise ValueError(f"router_step_logits: layer {i}'s weight and bias must be {kv.dtype}; got {w.dtype}")
        if g != layers[0][0].shape[0]:
            raise ValueError(
                f"router_step_logits: every layer needs the same number of CNNs g (one per head group); layer 0 has "
                f"{layers[0][0].shape[0]}, layer {i} has {g}"
            )
        channels = c_out
    if layers[-1][0].shape[1] != 1 or channels != 1:
        raise ValueError(
            "router_step_logits: the last layer must be the logit projection: 1 tap, 1 output channel; got weight "
            f"{tuple(layers[-1][0].shape)}"
        )
    if 2 * sum(reach(layer) for layer in layers) + 1 > R:
        raise ValueError(
            f"router_step_logits: the ring (R={R}) must hold the 2 * margin + 1 = "
            f"{2 * sum(reach(layer) for layer in layers) + 1} positions one score depends on"
        )
    tensors = [x, valid, position, *(t for w, b, _ in layers for t in (w, b))]
    if any(t.device != kv.device for t in tensors):
        raise ValueError("router_step_logits: kv, x, valid, position and the layers' tensors must be on one device")


def router_step_logits_ref(
    kv: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor,
    position: torch.Tensor,
    layers: Sequence[Layer],
) -> torch.Tensor:
    """Readable reference: per conv, write its fresh input into the ring, gather its taps, one matmul per tap."""
    _check_inputs(kv, x, valid, position, layers)
    H, R = kv.shape[1], x.shape[2]
    valid.index_fill_(1, (position % R).view(1), True)  # the new token is real

    def per_head(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w.repeat_interleave(H // w.shape[0], 0), b.repeat_interleave(
            H // b.shape[0], 0
        )  # head h: CNN h // (H/g)

    fresh = kv  # [B, H, C_0]: conv 0's input at `position`
    lag, channel = 0, 0  # lag: how far behind `position` the current conv's fresh input is
    for w, b, d in layers[:-1]:
        ring = x[..., channel : channel + w.shape[2]]
        ring.index_copy_(2, ((position - lag) % R).view(1), fresh[:, :, None])
        r = reach((w, b, d))
        slots = (position - lag - 2 * r + d * torch.arange(w.shape[1], device=x.device)) % R  # the taps' slots
        taps = ring.index_select(2, slots) * valid.index_select(1, slots)[:, None, :, None].to(x.dtype)
        w_h, b_h = per_head(w, b)
        y = b_h + torch.einsum("bhtc,htco->bho", taps, w_h)
        lag, channel = lag + r, channel + w.shape[2]
        keep = valid.index_select(1, ((position - lag) % R).view(1)).to(y.dtype)  # [B, 1]: output's validity
        fresh = F.silu(y * keep[:, :, None])
    w_h, b_h = per_head(*layers[-1][:2])
    return (b_h + torch.einsum("bhc,hco->bho", fresh, w_h[:, 0]))[..., 0]


def router_step_logits(
    kv: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor,
    position: torch.Tensor,
    layers: Sequence[Layer],
    *,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Write the decode token at `position` into the router's rings and return the logit of token `position - m`.

    No host sync, no gradient; `x` and `valid` are updated in place.

    Args:
        kv: `[B, H, 2D]` the new token's router input `[k || v]`, its pre-RoPE key and value per head (any strides
            but a contiguous last dim: the decode projection computes it as one slice, `hlsa.layers.lte`).
        x: `[B, H, R, sum_i C_i]` ring of each conv's recent inputs (module docstring), in the dtype of `kv`.
        valid: bool `[B, R]`, per slot: False before the sequence start and at pads.
        position: 0-d int64 tensor, the new token's position (below 2**31: the kernel computes slots in int32).
        layers: `(weight [g, k, C_in, C_out], bias [g, C_out], dilation)` per conv, then the 1 x 1 logit
            projection (`C_out = 1`); in the dtype of `kv`.
        backend: "torch" (reference), "triton" (at most 3 convs, `hlsa.ops.triton.router_step.MAX_CONVS`), or "auto"
            (Triton for CUDA tensors and CNNs of up to 3 convs, else the reference).

    Returns:
        logits `[B, H]` of token `position - m` in the dtype of `kv` (meaningless while it is negative; the caller
        masks it).
    """
    chosen = kernel_backend("router_step_logits", backend, kv)
    if chosen == "triton":  # imported only here: `import hlsa` never imports Triton
        from hlsa.ops.triton.router_step import MAX_CONVS, router_step_triton

        if len(layers) - 1 > MAX_CONVS:
            if backend == "triton":
                raise ValueError(
                    f"router_step_logits: the Triton kernel takes at most {MAX_CONVS} convs (then the logit "
                    f"projection), got {len(layers) - 1}; use backend='torch' or 'auto' for deeper CNNs"
                )
            chosen = "torch"  # auto: a deeper CNN than the kernel's runs the reference
    if torch.is_grad_enabled() and any(t.requires_grad for t in (kv, *(t for w, b, _ in layers for t in (w, b)))):
        raise ValueError("router_step_logits: decode scoring has no gradient; call it under torch.no_grad()")
    if chosen == "torch":
        return router_step_logits_ref(kv, x, valid, position, layers)
    _check_inputs(kv, x, valid, position, layers)
    return router_step_triton(kv, x, valid, position, layers)
