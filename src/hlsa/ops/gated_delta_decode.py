"""One decode token of a Gated DeltaNet layer, from its fused input projection to its output norm, with the decode
cache updated in place.

Per sequence and head (`hlsa.layers.gdn` computes the same for a whole sequence):

    x      = sum_s proj[s]                             the input projection: its split-K partial sums are added here
    q|k|v  = silu(conv(conv_state, x))                 depthwise causal conv over the cached W-1 inputs and x; the
                                                       cache then holds the last W-1 inputs
    q, k   = l2norm(q), l2norm(k)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    o      = one step of the gated delta rule           on the fp32 state, updated in place
    out    = rms_norm(o, norm_weight, eps, gate)        the gate projection's silu (no gate: plain rmsnorm)

Why one op: unfused, the step between two GEMMs was 9 kernels per layer at decode (the conv, two L2 norms, three
for the gates and casts, the delta step, two for the gated norm), each a few us of fixed latency on a few hundred KB
(docs/efficiency.md). On CUDA, two Triton kernels (`hlsa/ops/triton/gated_delta_decode.py`) take the projection's
partial sums (`hlsa.ops.linear.linear_partials`; Inductor cannot fuse a sum into a user kernel) and do everything up
to the delta step's output. The output norm is PyTorch on both paths: compiled, Inductor fuses it with
the sum of the gate's partials.

`proj` columns, in order: q `[H*K]`, k `[H*K]`, v `[H*V]`, then with a gate: gate `[H*V]`; then a `[H]`, b `[H]`.
The conv channels are the first `2*H*K + H*V` columns (q, k, v).

Shape legend: `S` partial sums, `B` batch, `H` heads, `K` key dim, `V` value dim, `C` conv channels, `W` conv size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hlsa.ops import kernel_backend
from hlsa.ops.gated_delta import L2NORM_EPS, gated_delta_step_ref, gdn_gates, l2norm
from hlsa.ops.linear import add_partials
from hlsa.ops.rms_norm import rms_norm


def projection_sizes(H: int, K: int, V: int, gated: bool) -> list[int]:
    """Widths of `proj`'s column groups, in order: q|k|v (the conv channels), the gate (0 without), a, b."""
    return [2 * H * K + H * V, H * V if gated else 0, H, H]


def projection_width(H: int, K: int, V: int, gated: bool) -> int:
    """Columns of `proj`: q, k, v, the gate when `gated`, a and b."""
    return sum(projection_sizes(H, K, V, gated))


def _check_inputs(
    proj: torch.Tensor,
    conv_state: torch.Tensor | None,
    conv_weight: torch.Tensor | None,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    norm_weight: torch.Tensor,
    gated: bool,
    dtype: torch.dtype,
) -> None:
    if state.dim() != 4 or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"gated_delta_decode: state must be a contiguous float32 [B, H, K, V] tensor (it is updated in place); "
            f"got {state.dtype} {tuple(state.shape)}"
        )
    B, H, K, V = state.shape
    N = projection_width(H, K, V, gated)
    if proj.dim() != 3 or proj.shape[1:] != (B, N) or proj.shape[0] < 1 or not proj.is_floating_point():
        raise ValueError(
            f"gated_delta_decode: proj must be float [S, B, N] = [S, {B}, {N}] (q, k, v{', gate' if gated else ''}, "
            f"a, b of one token per sequence, S >= 1 partial sums); got {proj.dtype} {tuple(proj.shape)}"
        )
    if (conv_state is None) != (conv_weight is None):
        raise ValueError("gated_delta_decode: give conv_state and conv_weight together (or neither: no short conv)")
    C = projection_sizes(H, K, V, gated)[0]
    if conv_weight is not None and (conv_weight.dim() != 2 or conv_weight.shape[0] != C):
        raise ValueError(f"gated_delta_decode: conv_weight must be [C={C}, W]; got {tuple(conv_weight.shape)}")
    if conv_state is not None:
        W = conv_weight.shape[1]
        if conv_state.shape != (B, C, W - 1) or conv_state.dtype != dtype or not conv_state.is_contiguous():
            raise ValueError(
                f"gated_delta_decode: conv_state must be a contiguous {dtype} [B, C, W-1] = [{B}, {C}, {W - 1}] tensor "
                f"(it is updated in place); got {conv_state.dtype} {tuple(conv_state.shape)}"
            )
    for name, t, shape in (("A_log", A_log, (H,)), ("dt_bias", dt_bias, (H,)), ("norm_weight", norm_weight, (V,))):
        if t.shape != shape:
            raise ValueError(f"gated_delta_decode: {name} must be {list(shape)}; got {tuple(t.shape)}")
    tensors = [proj, conv_state, conv_weight, A_log, dt_bias, norm_weight]
    if any(t is not None and t.device != state.device for t in tensors):
        raise ValueError("gated_delta_decode: every tensor must be on the device of state")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            "gated_delta_decode: the decode op has no gradient (it updates the caches in place); call it under "
            "torch.no_grad(), or train through the layer's sequence path"
        )


def gated_delta_decode_ref(
    proj: torch.Tensor,
    conv_state: torch.Tensor | None,
    conv_weight: torch.Tensor | None,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    gated: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Readable reference up to the output norm (the delta step's output `[B, H, V]` in `dtype`), rounding to `dtype`
    where the layer's sequence path does."""
    B, H, K, V = state.shape
    x = add_partials(proj, dtype)  # [B, N]
    qkv, _, a, b = x.split(projection_sizes(H, K, V, gated), dim=-1)
    if conv_state is not None:
        window = torch.cat([conv_state, qkv[:, :, None]], dim=-1)  # [B, C, W]: the cached inputs, then x
        qkv = (window.float() * conv_weight.float()).sum(-1).to(dtype)  # the conv's one output position
        conv_state.copy_(window[:, :, 1:])
    q, k, v = F.silu(qkv).split([H * K, H * K, H * V], dim=-1)
    g, beta = gdn_gates(a, b, A_log, dt_bias)  # [B, H] each
    q, k = l2norm(q.view(B, H, K)), l2norm(k.view(B, H, K))
    new_state, o = gated_delta_step_ref(state, q, k, v.view(B, H, V), g, beta, K**-0.5)
    state.copy_(new_state)
    return o.to(dtype)


def gated_delta_decode(
    proj: torch.Tensor,
    *,
    conv_state: torch.Tensor | None,
    conv_weight: torch.Tensor | None,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_eps: float,
    gated: bool,
    dtype: torch.dtype,
    backend: str | None = "auto",
) -> torch.Tensor:
    """One decode token of a GDN layer between its projections; the caches are updated in place (no host sync, no
    gradient).

    Args:
        proj: `[S, B, N]` the fused input projection of the token (columns in the module docstring's order), as `S`
            partial sums (any float dtype; `S = 1`: the projection itself).
        conv_state: `[B, C, W-1]` in `dtype`, the last `W-1` inputs of the q, k, v short convs (None: no short conv).
        conv_weight: `[C, W]` the depthwise conv taps, oldest input first (None: no short conv).
        A_log, dt_bias: `[H]` the decay parameters.
        state: `[B, H, K, V]` fp32, contiguous, the delta-rule state.
        norm_weight: `[V]` the output norm's weight; `norm_eps` its epsilon.
        gated: whether `proj` holds the gate columns (a gated output norm).
        dtype: the activations' dtype: the projection, conv, norms and output are rounded to it as in the layer.
        backend: "torch" (the reference), "triton", or "auto" (Triton for CUDA tensors, else the reference).

    Returns:
        `[B, H*V]` in `dtype`: the normed output, the input of the output projection.
    """
    _check_inputs(proj, conv_state, conv_weight, A_log, dt_bias, state, norm_weight, gated, dtype)
    args = (proj, conv_state, conv_weight, A_log, dt_bias, state, gated, dtype)
    if kernel_backend("gated_delta_decode", backend, state) == "torch":
        o = gated_delta_decode_ref(*args)
    else:
        from hlsa.ops.triton.gated_delta_decode import gated_delta_decode_triton

        o = gated_delta_decode_triton(*args, L2NORM_EPS)
    # The norm is PyTorch on both paths: compiled, Inductor fuses it with the sum of the gate's partials.
    B, H, K, V = state.shape
    gate = None
    if gated:
        gate = add_partials(proj.split(projection_sizes(H, K, V, gated), dim=-1)[1], dtype).view(B, H, V)
    return rms_norm(o, norm_weight, norm_eps, gate).reshape(B, H * V)
