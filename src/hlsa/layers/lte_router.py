"""The LTE router: a small per-KV-head CNN over time that scores tokens for eviction (docs/design.md, "The LTE router").

Each KV head's pre-RoPE key and value, `x = [k || v]` (`[B, T, HKV, 2D]`), goes through a non-causal 1-D CNN:
per conv `(k_i, d_i)`: dropout, a dilated conv that halves the channels ('same' zero padding), the padding mask,
SiLU; then a 1x1 projection to one logit per head. The score is `sigmoid(logit) - 0.5` (or `relu(logit)`); a token
is selected (kept beyond the window) when its score is positive, and the first `sink_size` real tokens always are.

The router runs in float32 (float64 for a float64 model) whatever the model's dtype (its input is upcast, autocast is
off inside it, and the decode ring is float32): in bf16, `sigmoid(x) - 0.5` is exactly 0 for `|x|` below about 8e-3,
so slightly positive scores drop out of the selection, and the scores left are so coarse (8 mantissa bits) that the
top-N ranking of the inference rule is decided by ties. The CNN is small next to the attention it steers, so float32
costs little.

Every conv output is multiplied by the padding mask, so a pad behaves exactly like the zero padding beyond the
sequence ends. That makes streaming scoring exact: the score of token `j` depends only on the router inputs of
tokens `[j - margin, j + margin]`, and each conv output only on its `2 r + 1` inputs, so a decode step
(`LTERouter.score_step`) computes one new output per conv from a ring of every conv's recent inputs
(`ring_inputs` fills it at prefill) and scores token `position - margin`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hlsa.ops.router_step import router_step_logits

ROUTING_METHODS = ("sigmoid", "relu")
ROUTING_SHARED = ("head", "layer")


class _FlatConv(torch.autograd.Function):
    """A dilated conv along one flat time axis as `k` GEMMs, one per tap, accumulated in place.

    `x [G, N, C]`, `w [G, k, C, O]` (tap-major), `bias [G, O]` -> `y [G, N, O]` with
    `y[:, p] = bias + sum_t x[:, p + (t - (k - 1) / 2) * d] @ w[:, t]` where that window lies inside `[0, N)`, and
    `y[:, p] = 0` on the `(k - 1) / 2 * d` border rows at each end. The backward is the same GEMMs transposed, again
    accumulated in place: no per-tap slices of a `k`-times larger tensor and no zero-filled slice gradients, which
    is where autograd's version of this spent most of an LTE layer's extra training time on the H200.
    """

    @staticmethod
    def forward(  # noqa: ANN205
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, d: int
    ):
        G, N, _ = x.shape
        k, h = w.shape[1], (w.shape[1] - 1) // 2 * d
        n = N - 2 * h
        y = x.new_empty(G, N, w.shape[3])
        y[:, :h].zero_()
        y[:, N - h :].zero_()
        mid = y[:, h : h + n]
        mid.copy_(bias[:, None, :].expand_as(mid))
        for t in range(k):
            mid.baddbmm_(x[:, t * d : t * d + n], w[:, t])
        ctx.save_for_backward(x, w)
        ctx.d = d
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: torch.Tensor):  # noqa: ANN205
        x, w = ctx.saved_tensors
        d, N, k = ctx.d, x.shape[1], w.shape[1]
        h = (k - 1) // 2 * d
        n = N - 2 * h
        gm = gy[:, h : h + n]
        gx = torch.zeros_like(x)
        for t in range(k):
            gx[:, t * d : t * d + n].baddbmm_(gm, w[:, t].transpose(1, 2))
        gw = torch.stack([torch.bmm(x[:, t * d : t * d + n].transpose(1, 2), gm) for t in range(k)], dim=1)
        return gx, gw, gm.sum(1), None


class ConvStack(nn.Module):
    """`groups` independent CNNs over time (or one, shared by every head), each mapping a head's channels to one logit.

    `forward(x [H, B, L, C], mask [B, L] | None)` -> logits `[H, B, L]` ('same' zero padding at every conv).
    `conv_inputs` gives every conv's input, and `decode_layers` the weights in the layout of the decode op
    (`hlsa.ops.router_step`).

    The weights live in `nn.Conv1d` modules (PyTorch's layout and init, and the names of the authors' checkpoints),
    but every conv runs as per-tap GEMMs over one flat time axis (`_FlatConv`): the rows of all heads sharing a CNN
    are laid end to end, each with `R` zeros on both sides (`R` the largest conv radius), and after every conv the
    mask zeroes those pads again (and left-padding tokens), so no row ever reads another row's values.
    cuDNN's grouped convolution spent most of an LTE decode step in layout transforms (NCHW <-> NHWC, ~20 kernels
    per conv) and is slow in bf16 training. `tests/layers/test_lte_router.py` checks this against `F.conv1d` per
    head, gradients included.
    """

    def __init__(
        self,
        in_channels: int,
        groups: int,
        *,
        conv_size: Sequence[int],
        conv_dilation: Sequence[int],
        dropout_prob: float,
        bias_init: float = 0.5,
    ) -> None:
        super().__init__()
        self.bias_init = bias_init
        if len(conv_size) == 0 or len(conv_size) != len(conv_dilation):
            raise ValueError(f"conv_size, conv_dilation need one entry per conv; got {conv_size}, {conv_dilation}")
        if any(k < 1 or k % 2 == 0 for k in conv_size):
            raise ValueError(f"conv_size must hold odd kernel sizes ('same' padding is symmetric); got {conv_size}")
        if any(d < 1 for d in conv_dilation):
            raise ValueError(f"conv_dilation must hold dilations >= 1; got {conv_dilation}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1); got {dropout_prob}")
        # Symmetric 'same' padding of a dilated kernel: (k - 1) * d / 2 zeros on each side (odd k).
        self.radii = tuple((k - 1) // 2 * d for k, d in zip(conv_size, conv_dilation))
        self.groups = groups
        self.dropout = nn.Dropout(dropout_prob)
        channels = [in_channels // 2**i for i in range(len(conv_size) + 1)]
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, c_out, k, dilation=d, padding=r, groups=groups)
            for c_in, c_out, k, d, r in zip(channels, channels[1:], conv_size, conv_dilation, self.radii)
        )
        self.proj = nn.Conv1d(channels[-1], groups, 1, groups=groups)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal weights, default conv biases, projection bias `bias_init` (the authors' 0.5: almost every
        token is kept at first; a negative bias starts with almost none kept, i.e. as sliding-window attention)."""
        for conv in self.convs:
            conv.reset_parameters()  # the default uniform bias is what the authors keep
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.constant_(self.proj.bias, self.bias_init)

    @property
    def ring_channels(self) -> int:
        """Channels of the decode ring: every conv's input channels per CNN, summed (`hlsa.ops.router_step`)."""
        return sum(conv.in_channels // self.groups for conv in self.convs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        H, B, L, _ = x.shape
        inputs, pad = self._layer_inputs(x, mask)
        return self._conv(inputs[-1], self.proj).view(H, B, L + 2 * pad)[:, :, pad : pad + L]

    def conv_inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Every conv's input `[H, B, L, C_i]`, as `forward` computes it: `x`, then each conv's output but the
        last's."""
        H, B, L, _ = x.shape
        inputs, pad = self._layer_inputs(x, mask)
        return [h.view(H, B, L + 2 * pad, h.shape[-1])[:, :, pad : pad + L] for h in inputs[:-1]]

    def decode_layers(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """`(weight, bias, dilation)` of every conv, then of the logit projection, in `dtype` and the tap-major
        layout of `hlsa.ops.router_step`."""
        return [self._tap_major(conv, dtype) for conv in (*self.convs, self.proj)]

    def _layer_inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[torch.Tensor], int]:
        """The input of every conv and of the projection, flat `[g, (H/g) * B * Lp, C_i]`, and the padding `pad`
        on each side of a row (`Lp = L + 2 * pad`)."""
        H, B, L, C = x.shape
        keep = torch.ones(B, L, device=x.device, dtype=torch.bool) if mask is None else mask
        pad = max(self.radii)
        keep = F.pad(keep, (pad, pad))  # [B, Lp]: False on the zero padding and on left-padding tokens
        x = F.pad(x, (0, 0, pad, pad)).reshape(self.groups, -1, C)  # [g, (H/g) * B * Lp, C], rows end to end
        keep = keep.to(x.dtype).repeat(H // self.groups, 1).view(1, -1, 1)
        inputs = [x]
        for conv in self.convs:
            inputs.append(F.silu(self._conv(self.dropout(inputs[-1]), conv) * keep))
        return inputs, pad

    def _conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        return _FlatConv.apply(x, *self._tap_major(conv, x.dtype))

    def _tap_major(self, conv: nn.Conv1d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`(weight [g, k, C, O], bias [g, O], dilation)` of `conv` (weight `[g * O, C, k]`), the layout of the flat
        conv's GEMMs and of the decode op."""
        g, (k,) = self.groups, conv.kernel_size
        weight = conv.weight.view(g, conv.out_channels // g, -1, k).permute(0, 3, 2, 1).contiguous().to(dtype)
        return weight, conv.bias.view(g, -1).to(dtype), conv.dilation[0]


class LTERouter(nn.Module):
    """Scores each token of each KV head from its pre-RoPE key and value and those of its neighbours.

    Args:
        num_kv_heads: `HKV`.
        head_dim: `D`; the per-head input has `2D` channels, halved by each conv (`2D` must divide by `2**len`).
        conv_size, conv_dilation: odd kernel sizes and dilations of the convs (same length).
        dropout_prob: dropout before each conv (training only).
        routing_method: "sigmoid" (`score = sigmoid(logit) - 0.5`) or "relu" (`score = relu(logit)`).
        routing_grad: if False the router input is detached (no router gradient into the k/v projections).
        routing_shared: "head" (one CNN per KV head: a grouped conv) or "layer" (one CNN for all heads; unlike the
            authors' code, which skips it there, the per-conv padding mask is applied in this mode too).
        bias_init: initial bias of the logit projection (see `ConvStack.reset_parameters`).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        *,
        conv_size: Sequence[int] = (3, 3, 3),
        conv_dilation: Sequence[int] = (2, 2, 2),
        dropout_prob: float = 0.1,
        routing_method: str = "sigmoid",
        routing_grad: bool = True,
        routing_shared: str = "head",
        bias_init: float = 0.5,
    ) -> None:
        super().__init__()
        if num_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"num_kv_heads and head_dim must be positive; got {num_kv_heads}, {head_dim}")
        if routing_method not in ROUTING_METHODS:
            raise ValueError(f"routing_method must be one of {ROUTING_METHODS}; got {routing_method!r}")
        if routing_shared not in ROUTING_SHARED:
            raise ValueError(f"routing_shared must be one of {ROUTING_SHARED}; got {routing_shared!r}")
        if (2 * head_dim) % 2 ** len(conv_size) != 0:
            raise ValueError(f"2 * head_dim = {2 * head_dim} must divide by 2**len(conv_size): each conv halves it")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.routing_method, self.routing_grad, self.routing_shared = routing_method, routing_grad, routing_shared
        groups = num_kv_heads if routing_shared == "head" else 1
        self.conv_stack = ConvStack(
            2 * head_dim * groups,
            groups,
            conv_size=conv_size,
            conv_dilation=conv_dilation,
            dropout_prob=dropout_prob,
            bias_init=bias_init,
        )

    @property
    def receptive_field(self) -> int:
        """Tokens that one score depends on: `1 + sum((k_i - 1) * d_i)` (13 for the default)."""
        return 1 + 2 * sum(self.conv_stack.radii)

    @property
    def margin(self) -> int:
        """Neighbours on each side that one score depends on: `receptive_field // 2` (6 for the default)."""
        return self.receptive_field // 2

    def reset_parameters(self) -> None:
        self.conv_stack.reset_parameters()

    def forward(self, k: torch.Tensor, v: torch.Tensor, *, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of a whole sequence.

        Args:
            k: pre-RoPE keys `[B, T, HKV, D]`.
            v: values `[B, T, HKV, D]`.
            pad_mask: bool `[B, T]`, False at (left) pads, or None. Pads' scores are meaningless: use `select`.

        Returns:
            score `[B, T, HKV]` in `router_dtype` (float32 for a bf16 model), differentiable (selection is `score > 0`).
        """
        self._check_sequence(k, v, pad_mask)
        x = _upcast(torch.cat([k, v], dim=-1))  # [B, T, HKV, 2D]
        if not self.routing_grad:
            x = x.detach()
        return self._score(self._logits(x, pad_mask))

    @property
    def ring_channels(self) -> int:
        """Channels of the decode ring `LTEState.router_x`: every conv's input (`2D`, then halving), summed."""
        return self.conv_stack.ring_channels

    def ring_inputs(self, k: torch.Tensor, v: torch.Tensor, *, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the decode ring holds for each position: every conv's input, concatenated, `[B, T, HKV, C_ring]`
        in `router_dtype` (the masked router input `[k || v]`, then each conv's output but the last's). Inputs as in
        `forward`."""
        self._check_sequence(k, v, pad_mask)
        x = self._head_major(_upcast(torch.cat([k, v], dim=-1)), pad_mask)
        with _no_autocast(x):
            return torch.cat(self.conv_stack.conv_inputs(x, pad_mask), dim=-1).permute(1, 2, 0, 3)

    def score_step(
        self,
        kv: torch.Tensor,
        x_ring: torch.Tensor,
        valid: torch.Tensor,
        position: torch.Tensor,
        *,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Decode: take token `position` into the ring and return the score of token `position - margin`, whose
        right context it completes (streaming scoring; `hlsa.ops.router_step`).

        Equals (up to conv round-off) the score `forward` gives that token once `margin` tokens follow it, when
        ring slot `p % R` holds `ring_inputs` of every earlier position `p` within the last `R` and `valid` is
        False before the sequence start and at pads. No dropout (inference); no host sync.

        Args:
            kv: `[B, HKV, 2D]` the new token's router input, each head's pre-RoPE key and value `[k || v]` (a decode
                token is real, never a pad), in any float dtype (upcast).
            x_ring: `[B, HKV, R, ring_channels]` in `router_dtype(kv.dtype)`, `R >= 2 * margin + 1`, updated in place.
            valid: bool `[B, R]`, per slot, updated in place (the new token's slot is marked valid).
            position: 0-d int64 tensor, the new token's position.
            backend: of `hlsa.ops.router_step_logits` ("torch", "triton", or "auto": Triton on CUDA).

        Returns:
            score `[B, HKV]` in `router_dtype` of token `position - margin` (meaningless while that is negative).
        """
        B, R = valid.shape[0], x_ring.shape[2] if x_ring.dim() == 4 else 0
        expected = (B, self.num_kv_heads, R, self.ring_channels)
        if kv.shape != (B, self.num_kv_heads, 2 * self.head_dim):
            raise ValueError(
                f"kv must have shape [B, HKV, 2D] = {[B, self.num_kv_heads, 2 * self.head_dim]}; got {list(kv.shape)}"
            )
        if x_ring.shape != expected or R < self.receptive_field:
            raise ValueError(
                f"x_ring must have shape [B, HKV, R, ring_channels] = {list(expected)} with R >= 2 * margin + 1 = "
                f"{self.receptive_field}; got {list(x_ring.shape)}"
            )
        kv = _upcast(kv)
        with _no_autocast(kv):
            layers = self.conv_stack.decode_layers(kv.dtype)
            return self._score(router_step_logits(kv, x_ring, valid, position, layers, backend=backend))

    def _check_sequence(self, k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor | None) -> None:
        expected = (*k.shape[:2], self.num_kv_heads, self.head_dim)
        if k.shape != expected or v.shape != expected:
            raise ValueError(f"k and v must have shape [B, T, HKV, D] = {list(expected)}; got {k.shape}, {v.shape}")
        if pad_mask is not None and (pad_mask.dtype != torch.bool or pad_mask.shape != k.shape[:2]):
            raise ValueError(f"pad_mask must be a bool tensor of shape [B, T] = {list(k.shape[:2])}, or None")

    def _head_major(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`x [B, L, HKV, 2D]` -> `[HKV, B, L, 2D]`, the layout of the per-head GEMMs, zeroed at pads."""
        x = x.permute(2, 0, 1, 3)
        return x if mask is None else x * mask[None, :, :, None].to(x.dtype)

    def _logits(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`x [B, L, HKV, 2D]` (upcast), `mask [B, L] | None` -> logits `[B, L, HKV]` in `x`'s dtype."""
        with _no_autocast(x):
            return self.conv_stack(self._head_major(x, mask), mask).permute(1, 2, 0)

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) - 0.5 if self.routing_method == "sigmoid" else F.relu(logits)


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the router computes in for a model in `dtype`: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(router_dtype(x.dtype))


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """Autocast off on `x`'s device: under bf16 autocast (the trainer's GPU default) the convs would run in bf16."""
    return torch.autocast(x.device.type, enabled=False)


def sink_mask(pad_mask: torch.Tensor, sink_size: int) -> torch.Tensor:
    """bool `[B, T]`: True on the first `sink_size` non-pad tokens of each row (`pad_mask` bool `[B, T]`)."""
    return pad_mask & (pad_mask.cumsum(dim=1) <= sink_size)


def select(score: torch.Tensor, pad_mask: torch.Tensor | None, sink_size: int, *, enabled: bool = True) -> torch.Tensor:
    """Tokens kept beyond the window, bool `[B, T, HKV]`: positive score or a sink (first real tokens); no pad.

    Args:
        score: `[B, T, HKV]` from `LTERouter.forward`.
        pad_mask: bool `[B, T]` (False at pads) or None.
        sink_size: `s >= 0`; rows with fewer than `s` real tokens make all of them sinks.
        enabled: False (the L1 warm-up, the authors' `router.enabled=False`) selects every real token.
    """
    if score.dim() != 3 or sink_size < 0:
        raise ValueError(f"score must be [B, T, HKV] and sink_size >= 0; got {list(score.shape)}, {sink_size}")
    if pad_mask is None:
        pad_mask = torch.ones(score.shape[:2], dtype=torch.bool, device=score.device)
    elif pad_mask.dtype != torch.bool or pad_mask.shape != score.shape[:2]:
        raise ValueError(f"pad_mask must be a bool tensor of shape [B, T] = {list(score.shape[:2])}, or None")
    if not enabled:
        return pad_mask[:, :, None].expand(score.shape).clone()
    return ((score > 0) | sink_mask(pad_mask, sink_size)[:, :, None]) & pad_mask[:, :, None]


class _ValueGain(torch.autograd.Function):
    """Straight-through gradient of a per-token value gain `v * alpha` at `alpha = 1` (docs/design.md)."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx: torch.autograd.function.FunctionCtx, v: torch.Tensor, score: torch.Tensor, weights: torch.Tensor | None
    ):
        ctx.save_for_backward(v, weights)
        ctx.score_dtype = score.dtype
        return v.view_as(v)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # noqa: ANN205
        v, weights = ctx.saved_tensors
        g = (grad * v).sum(dim=-1)
        if weights is not None:  # centred: less the mean over each row's real positions, per head (in fp32)
            g = g.to(router_dtype(g.dtype))
            mean = (g * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
            g = (g - mean) * weights
        return grad, g.to(ctx.score_dtype), None


def value_gain(
    v: torch.Tensor, score: torch.Tensor, *, centered: bool = False, pad_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`v [B, T, HKV, D]` (per KV head, before GQA expansion) unchanged; `score [B, T, HKV]` gets its gradient.

    Backward: `grad_v = g`, `grad_score = sum_d g * v`, the gradients of `v * (1 + score - score.detach())[..., None]`
    without the multiply. This is how the router learns from the attention loss. `centered` subtracts, per row and
    head, the mean of `grad_score` over the row's real positions (`pad_mask`, None: all) and leaves pads at 0.
    """
    if score.shape != v.shape[:-1]:
        raise ValueError(f"score must have shape v.shape[:-1] = {list(v.shape[:-1])}; got {list(score.shape)}")
    weights = None
    if centered:
        real = torch.ones(score.shape[:2], dtype=torch.bool, device=v.device) if pad_mask is None else pad_mask
        weights = real[:, :, None].float().expand(score.shape)
    return _ValueGain.apply(v, score, weights)
