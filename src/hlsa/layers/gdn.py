"""Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh, arXiv 2412.06464), with fla's layer layout and parameter names.

Shape legend: `B` batch, `T` length, `d` hidden size, `H` heads, `K` key head dim, `Vh` value head dim,
`C` channels of a short convolution (`H*K` for q and k, `H*Vh` for v), `W` conv size.

Per token: q, k, v projections -> depthwise causal conv (size W) + SiLU -> q, k L2-normalised per head;
`beta = sigmoid(b_proj x)`, `g = -exp(A_log) * softplus(a_proj x + dt_bias)` (log decay per head);
gated delta rule (`hlsa.ops.gated_delta`); `o_norm(o, g_proj x) = rmsnorm(o) * weight * silu(gate)` per head; o_proj.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hlsa.layers.linear import Linear, fused_linear, fused_weight
from hlsa.layers.norm import RMSNorm
from hlsa.ops.gated_delta import chunk_gated_delta_rule, gdn_gates, l2norm
from hlsa.ops.gated_delta_decode import gated_delta_decode, projection_sizes
from hlsa.ops.linear import linear_partials
from hlsa.ops.rms_norm import rms_norm

# fla's GatedDeltaNet initialisation of the decay (Mamba2's dt recipe): A ~ U(0, 16), dt log-uniform in
# [DT_MIN, DT_MAX], floored at DT_FLOOR.
A_INIT_RANGE = (0.0, 16.0)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


@dataclass
class GDNState:
    """Decode state of one GDN layer, updated in place by `GatedDeltaNet.forward`.

    `conv`: `[B, 2*H*K + H*Vh, W-1]` the last inputs of the short convolutions, q, k and v channels in that order
    (`None` without short convs); `recurrent`: `[B, H, K, Vh]` fp32 delta-rule state; `seen`: tokens consumed so far
    (pads included).
    """

    conv: torch.Tensor | None
    recurrent: torch.Tensor
    seen: int = 0


class GatedRMSNorm(RMSNorm):
    """`rmsnorm(x) * weight * silu(gate)` over the last dim, in fp32 (fla's `FusedRMSNormGated`, swish gate).

    A subclass of `RMSNorm` so that a model-wide init that resets RMSNorm weights to ones covers it too.
    """

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return rms_norm(x, self.weight, self.eps, gate)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer, following the mixer contract of docs/design.md.

    Parameter names and shapes match the authors' checkpoints (fla's layer). `A_log` and `dt_bias` get fla's decay
    initialisation here and are marked `_no_weight_decay`; a model-wide init must not overwrite them (call
    `reset_decay_parameters()` again after materialising a meta-device model). Every other parameter may be
    re-initialised by the model (`o_norm.weight` starts at ones).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = True,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        head_v_dim = head_dim * expand_v
        if expand_v <= 0 or not math.isclose(head_v_dim, round(head_v_dim)):
            raise ValueError(f"expand_v * head_dim must be a positive integer, got {expand_v} * {head_dim}")
        if use_short_conv and conv_size < 1:
            raise ValueError(f"conv_size must be >= 1 when use_short_conv=True, got {conv_size}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim, self.head_v_dim = head_dim, int(round(head_v_dim))
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self.use_short_conv, self.conv_size, self.use_gate = use_short_conv, conv_size, use_gate
        self.backend = backend

        # Registration order = the authors' state dict order.
        self.A_log = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.q_proj = Linear(hidden_size, self.key_dim, bias=False, backend=backend)
        self.k_proj = Linear(hidden_size, self.key_dim, bias=False, backend=backend)
        self.v_proj = Linear(hidden_size, self.value_dim, bias=False, backend=backend)
        self.a_proj = Linear(hidden_size, num_heads, bias=False, backend=backend)
        self.b_proj = Linear(hidden_size, num_heads, bias=False, backend=backend)
        if use_short_conv:
            self.q_conv1d = _depthwise_conv(self.key_dim, conv_size)
            self.k_conv1d = _depthwise_conv(self.key_dim, conv_size)
            self.v_conv1d = _depthwise_conv(self.value_dim, conv_size)
        if use_gate:
            self.g_proj = Linear(hidden_size, self.value_dim, bias=False, backend=backend)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = Linear(self.value_dim, hidden_size, bias=False, backend=backend)
        self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self) -> None:
        """fla's init: `A_log = log(U(0, 16))`; `dt_bias = softplus^-1(dt)`, dt log-uniform in [1e-3, 1e-1]."""
        A = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*A_INIT_RANGE)
        self.A_log.copy_(torch.log(A))
        log_dt = torch.rand_like(self.dt_bias, dtype=torch.float32) * (math.log(DT_MAX) - math.log(DT_MIN))
        dt = torch.exp(log_dt + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 for accuracy at small dt.
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch_size: int, *, device: torch.device | str, dtype: torch.dtype) -> GDNState:
        """Zero state: conv history `[B, 2*H*K + H*Vh, W-1]` in `dtype`, recurrent state `[B, H, K, Vh]` in fp32."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        conv = None
        if self.use_short_conv:
            channels = 2 * self.key_dim + self.value_dim
            conv = torch.zeros(batch_size, channels, self.conv_size - 1, device=device, dtype=dtype)
        recurrent = torch.zeros(
            batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=torch.float32
        )
        return GDNState(conv=conv, recurrent=recurrent)

    def forward(
        self, x: torch.Tensor, *, pad_mask: torch.Tensor | None = None, state: GDNState | None = None
    ) -> tuple[torch.Tensor, None]:
        """Mix `x [B, T, d]`; returns `(y [B, T, d], None)`.

        `pad_mask` (bool `[B, T]`, False at left pads) is only checked: the Block zeroes hidden states at pads, and
        a zero input keeps a zero state (k = 0 writes nothing) and feeds the convs the zeros of a sequence start,
        so real tokens see exactly what they would see unpadded. With a `state`, the chunk (any length) continues
        from it and the state is updated in place (detached: no gradient flows through the cache). One token with a
        state and no gradient (decode), with backend "auto" or "torch", goes through `hlsa.ops.gated_delta_decode`
        (`_decode`); it computes in the dtype of `x` (under autocast the sequence path rounds to autocast's dtype in
        places instead).
        """
        self._check_forward(x, pad_mask, state)
        B, T, _ = x.shape
        H, K, Vh = self.num_heads, self.head_k_dim, self.head_v_dim
        if state is not None and T == 1 and self.backend in ("auto", "torch") and not torch.is_grad_enabled():
            return self._decode(x, state), None
        # One GEMM for the projections of x (a decode token takes `_decode`, with the same concatenated weight).
        qkv, gate, a, b = fused_linear(x, self._in_projections()).split(self._in_sizes(), dim=-1)
        if self.use_short_conv:
            qkv = self._short_conv(qkv, None if state is None else state.conv)
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2norm(q.reshape(B, T, H, K))  # [B, T, H, K]
        k = l2norm(k.reshape(B, T, H, K))  # [B, T, H, K]
        v = v.reshape(B, T, H, Vh)  # [B, T, H, Vh]
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)  # [B, T, H] each
        o, final_state = chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=None if state is None else state.recurrent,
            output_final_state=state is not None,
            backend=self.backend,
        )  # [B, T, H, Vh], [B, H, K, Vh]
        if state is not None:
            state.recurrent.copy_(final_state.detach())
            state.seen += T

        if self.use_gate:
            o = self.o_norm(o, gate.reshape(B, T, H, Vh))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, H * Vh)), None

    def _in_projections(self) -> list[Linear]:
        """The projections of x, in the order of the fused GEMM's columns: q, k, v, (gate), a, b."""
        gates = [self.g_proj] if self.use_gate else []
        return [self.q_proj, self.k_proj, self.v_proj, *gates, self.a_proj, self.b_proj]

    def _in_sizes(self) -> list[int]:
        """Widths of the fused GEMM's column groups: q|k|v, gate (0 without), a, b (the decode op's layout)."""
        return projection_sizes(self.num_heads, self.head_k_dim, self.head_v_dim, self.use_gate)

    def _conv_weight(self) -> torch.Tensor:
        """The q, k, v short convs' taps as one depthwise conv over the concatenated channels: `[C, 1, W]`."""
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])

    def _decode(self, x: torch.Tensor, state: GDNState) -> torch.Tensor:
        """One token per sequence, `x [B, 1, d]`: the input GEMM's partial sums, then one op for everything up to the
        output projection (`hlsa.ops.gated_delta_decode`: 9 small kernels unfused), updating the state in place. The
        projections have no biases (the layer builds them without)."""
        proj = linear_partials(x[:, 0], fused_weight(self._in_projections()), backend=self.q_proj.backend)
        conv_weight = None
        if self.use_short_conv:
            conv_weight = self._conv_weight()[:, 0]
        o = gated_delta_decode(
            proj,
            conv_state=state.conv,
            conv_weight=conv_weight,
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            state=state.recurrent,
            norm_weight=self.o_norm.weight,
            norm_eps=self.o_norm.eps,
            gated=self.use_gate,
            dtype=x.dtype,
            backend=self.backend,
        )  # [B, H*Vh]
        state.seen += 1
        return self.o_proj(o[:, None])

    def _short_conv(self, x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
        """Depthwise causal convs + SiLU of `x [B, T, C]` (q, k, v channels) after the `W-1` inputs in
        `cache [B, C, W-1]` (zeros when `None`, as at a sequence start); the cache is then updated in place to the
        last `W-1` inputs. The three convs run as one over the concatenated channels."""
        B, T, C = x.shape
        weight = self._conv_weight().to(x.dtype)  # [C, 1, W]
        history = x.new_zeros(B, C, self.conv_size - 1) if cache is None else cache.to(x.dtype)
        x_BCT = torch.cat([history, x.transpose(1, 2)], dim=-1)  # [B, C, W-1+T]
        # No padding: the history is the left context. (Decode tokens take `hlsa.ops.gated_delta_decode` instead.)
        y_BCT = F.conv1d(x_BCT, weight, groups=C)  # [B, C, T]
        if cache is not None:
            cache.copy_(x_BCT[:, :, T:].detach())
        return F.silu(y_BCT).transpose(1, 2)

    def _check_forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None, state: GDNState | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        if pad_mask is not None and (pad_mask.dtype != torch.bool or pad_mask.shape != (B, T)):
            raise ValueError(f"pad_mask must be bool [B, T] = [{B}, {T}], got {pad_mask.dtype} {tuple(pad_mask.shape)}")
        if state is None:
            return
        expected = (B, self.num_heads, self.head_k_dim, self.head_v_dim)
        if state.recurrent.shape != expected:
            raise ValueError(
                f"state.recurrent must be {expected}, got {tuple(state.recurrent.shape)}; "
                f"build the state with init_state(batch_size={B}, ...)"
            )
        if self.use_short_conv and state.conv is None:
            raise ValueError("state has no conv history but the layer uses short convs; build it with init_state")


def _depthwise_conv(channels: int, size: int) -> nn.Conv1d:
    # weight [C, 1, W] like the authors' `*_conv1d.weight`; causality comes from the history prepended in forward.
    return nn.Conv1d(channels, channels, kernel_size=size, groups=channels, bias=False)
