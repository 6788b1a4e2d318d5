"""Learnable Token Eviction attention (docs/design.md): sinks + a window of W+1 + a buffer of N router-chosen
older tokens per kv head.

Training (`self.training`): every positively scored key is a column visible to all later queries ("Lambda plus
columns"), with no buffer cap, and the router learns through the straight-through value gain. With
`train_selection="buffer"` training uses the inference rule below instead, so the router must rank tokens (only the
top N count) rather than set a threshold.
Inference (eval, with or without cache): a query at `t` sees sinks, the band `t-W..t`, and the top-N positive scores
among keys older than `t - W` (docs/design.md). The authors cap the buffer once for the last query only;
we apply the rule per query, which is exactly what the constant-memory decode cache reproduces.

Decode cache per layer: `W+1` ring slots + `N` buffer slots of post-RoPE keys, their scores, and a small ring of the
last `2m+1` positions' router CNN inputs (pre-RoPE `[k || v]` and every conv's output but the last's), so that each
token is scored exactly once, as soon as its right context of `m` tokens is known, with the same numbers as a full
forward (no de-rotation of cached keys), by one new output per conv (`hlsa.ops.router_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from hlsa.layers.attention import ProjectedAttention
from hlsa.layers.eviction import Eviction, EvictionState, evict_step, inference_attention, rank_scores
from hlsa.layers.lte_router import LTERouter, router_dtype, select, value_gain
from hlsa.layers.slots import fill_ring
from hlsa.ops.linear import linear
from hlsa.ops.lte_retention import lte_column_end
from hlsa.ops.sparse_attention import sparse_attention

INT32_MAX = torch.iinfo(torch.int32).max


class LTERouting(NamedTuple):
    """Per-layer router output: `score` float [B, T, HKV] (differentiable), `selected` bool [B, T, HKV]."""

    score: torch.Tensor
    selected: torch.Tensor


@dataclass(kw_only=True)
class LTEState(EvictionState):
    """The slots of `EvictionState` (score: the router's, -inf = not scored yet / pad, +inf = sink; ties evict the
    latest token; sinks start after each row's left padding) and the router's rings."""

    router_x: torch.Tensor  # [B, HKV, 2m+1, C] in router_dtype: each conv's recent inputs (LTERouter.ring_inputs)
    router_valid: torch.Tensor  # bool [B, 2m+1]: False before the sequence start and at pads (same for all heads)


class LTEAttention(ProjectedAttention):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        window_size: int,
        buffer_size: int,
        sink_size: int,
        conv_size: tuple[int, ...] = (3, 3, 3),
        conv_dilation: tuple[int, ...] = (2, 2, 2),
        dropout_prob: float = 0.1,
        routing_method: str = "sigmoid",
        routing_grad: bool = True,
        routing_shared: str = "head",
        router_bias_init: float = 0.5,
        train_selection: str = "positive",
        router_grad_centered: bool = False,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, rope_theta=rope_theta, backend=backend
        )
        self.window_size, self.sink_size = window_size, sink_size
        self.set_eviction(Eviction(), buffer_size)
        if train_selection not in ("positive", "buffer"):
            raise ValueError(f"train_selection must be 'positive' or 'buffer'; got {train_selection!r}")
        self.train_selection = train_selection
        self.router_grad_centered = router_grad_centered
        # Warm-up (docs/design.md, "The L1 sparsity controller"): with routing disabled, training attends to every
        # earlier token (full causal).
        self.routing_enabled = True
        self.router = LTERouter(
            num_kv_heads,
            head_dim,
            conv_size=tuple(conv_size),
            conv_dilation=tuple(conv_dilation),
            dropout_prob=dropout_prob,
            routing_method=routing_method,
            routing_grad=routing_grad,
            routing_shared=routing_shared,
            bias_init=router_bias_init,
        )
        if window_size < self.router.margin:
            raise ValueError(
                f"window_size ({window_size}) must be >= the router margin ({self.router.margin}): a score reads "
                "the next `margin` tokens, which a query must already have seen"
            )

    def set_eviction(self, eviction: Eviction, buffer_size: int) -> None:
        """Inference settings: the policy whose score ranks keys for the buffer (`hlsa.layers.eviction`; training
        always ranks by the router) and the buffer size N, which sizes the next `init_state`."""
        if buffer_size < self.sink_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be >= sink_size ({self.sink_size}): sinks live in it")
        self.eviction, self.buffer_size = eviction, buffer_size

    # ------------------------------------------------------------------------------------------------------------
    def inference_scores(self, score: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Scores that rank keys at inference: sinks +inf (always kept), pads -inf (never kept). [B, T, HKV]."""
        return rank_scores(score, pad_mask, self.sink_size)

    def forward(
        self, x: torch.Tensor, *, pad_mask: torch.Tensor | None = None, state: LTEState | None = None
    ) -> tuple[torch.Tensor, LTERouting]:
        """x [B, T, d] -> (y [B, T, d], LTERouting). With `state`: prefill (empty state) or token-by-token decode."""
        if state is not None and self.training:
            raise ValueError("LTEAttention: the decode cache is for inference; call model.eval() before generating")
        if state is not None and state.seen > 0:
            outs = [self._decode(x[:, i : i + 1], state) for i in range(x.shape[1])]
            return torch.cat([y for y, _ in outs], dim=1), LTERouting(
                torch.cat([r.score for _, r in outs], dim=1), torch.cat([r.selected for _, r in outs], dim=1)
            )
        b, t, _ = x.shape
        q, k, v = self._project(x)
        score = self.router(k, v, pad_mask=pad_mask)  # [B, T, HKV], pre-RoPE keys (docs/design.md, "The LTE router")
        selected = select(score, pad_mask, self.sink_size)
        if torch.is_grad_enabled():
            # forward: v unchanged; backward: d score = sum_d(dv * v), less its mean over positions if centred
            v = value_gain(v, score, centered=self.router_grad_centered, pad_mask=pad_mask)
        k_prerope = k
        q, k = self.rotary(q, k, torch.arange(t, device=x.device))
        if not self.training:  # the eviction policy's rule, which fills the cache of a prefill
            raw = self.eviction.scores(
                score.detach(), k_prerope, torch.arange(t, device=x.device), v=v, pad_mask=pad_mask,
                memory=None if state is None else state.memory,
            )  # fmt: skip
            o = inference_attention(
                q, k, v, raw, pad_mask, eviction=self.eviction, window=self.window_size,
                buffer_size=self.buffer_size, sink_size=self.sink_size, state=state,
                empty_state=lambda: self.init_state(b, device=x.device, dtype=k.dtype),
                score_lag=self.eviction.score_lag(self.router.margin), backend=self.backend,
            )  # fmt: skip
            if state is not None:
                self._prefill_router(state, k_prerope, v, pad_mask)
        else:
            if self.train_selection == "positive" or not self.routing_enabled:
                visible = select(score, pad_mask, self.sink_size, enabled=self.routing_enabled)
                column_end = torch.where(visible, INT32_MAX, 0).to(torch.int32)
            else:  # training under the inference rule (train_selection "buffer")
                ranked = self.inference_scores(score, pad_mask)
                column_end = lte_column_end(ranked, window=self.window_size, buffer_size=self.buffer_size)
            o = sparse_attention(
                q, k, v, window=self.window_size, column_end=column_end, key_mask=pad_mask, backend=self.backend
            )
        return self.o_proj(o.flatten(2)), LTERouting(score, selected)

    # ------------------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> LTEState:
        b, h, d = batch_size, self.num_kv_heads, self.head_dim
        slots, ctx = self.window_size + 1 + self.buffer_size, 2 * self.router.margin + 1
        return LTEState.empty(
            b,
            h,
            slots,
            d,
            device=device,
            dtype=dtype,
            # float32 for a bf16 model: the router scores in full precision (hlsa.layers.lte_router)
            router_x=torch.zeros(b, h, ctx, self.router.ring_channels, device=device, dtype=router_dtype(dtype)),
            router_valid=torch.zeros(b, ctx, device=device, dtype=torch.bool),
            **self.eviction.state_extra(b, h, d, device),
        )

    def _prefill_router(
        self, state: LTEState, k_prerope: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor | None
    ) -> None:
        """After a prefill filled the slots (`inference_attention`): the router's rings. The router's
        scores of the last m tokens still lack right context: the decode steps score them (before eviction)."""
        b, t = k_prerope.shape[:2]
        real = torch.ones(b, t, device=v.device, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        # Router rings: every conv's inputs at the last 2m+1 positions, for scoring the pending tokens during decode.
        # The CNN reruns on just those positions: the values it gets wrong there (the first ones lack left context,
        # the last ones right context) are never read, since a decode step reads a conv's inputs no older than
        # 2m positions back and recomputes the newest before reading them (hlsa.ops.router_step).
        tail = slice(max(0, t - state.router_x.shape[2]), t)
        tail_mask = None if pad_mask is None else pad_mask[:, tail]
        inputs = self.router.ring_inputs(k_prerope[:, tail], v[:, tail], pad_mask=tail_mask)
        fill_ring(state.router_x, inputs, start=tail.start)
        fill_ring(state.router_valid[:, None], real[:, :, None])  # one slot row for all heads

    def _project_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1, d] -> q [B, 1, HQ, D] and kv [B, HKV, 2D], each kv head's pre-RoPE `[k || v]` (the router's input),
        as one GEMM whose k and v rows are interleaved per head: compiled, kv is then one tensor that the router and
        the eviction read, where separate k and v cost a kernel each (docs/efficiency.md, "How the step is built")."""
        hkv, d = self.num_kv_heads, self.head_dim

        def interleave(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [HKV*D, ...] twice -> [HKV*2D, ...]
            return torch.stack([k.unflatten(0, (hkv, d)), v.unflatten(0, (hkv, d))], 1).flatten(0, 2)

        weight = torch.cat([self.q_proj.weight, interleave(self.k_proj.weight, self.v_proj.weight)])
        out = linear(x, weight, backend=self.q_proj.backend)
        if self.q_proj.bias is not None:  # qkv_bias: every projection has one
            out = out + torch.cat([self.q_proj.bias, interleave(self.k_proj.bias, self.v_proj.bias)])
        q, kv = out[:, 0].split([self.num_heads * d, 2 * hkv * d], dim=-1)
        return q.view(x.shape[0], 1, self.num_heads, d), kv.view(x.shape[0], hkv, 2 * d)

    def _decode(self, x: torch.Tensor, state: LTEState) -> tuple[torch.Tensor, LTERouting]:
        m, ring = self.router.margin, self.window_size + 1
        pos = state.position
        q, kv = self._project_decode(x)  # T == 1
        k, v = kv.split(self.head_dim, dim=-1)
        # Score token j = pos - m, whose right context is now complete (the window is j-m .. j+m = pos-2m .. pos).
        # The whole validity tensor, not a view of it: compiled, a view passed to the in-place kernel is cloned and
        # copied back (two extra kernels per layer).
        # Decode scores only rank tokens for eviction, a discrete choice with no gradient: outside no_grad (an eval
        # loop that forgot it) the router's weights would require one, which the streaming op refuses.
        with torch.no_grad():
            raw = self.router.score_step(kv, state.router_x, state.router_valid, pos, backend=self.backend)
            new_score = self.eviction.scores(raw[:, None], k[:, None], pos.view(1), v=v[:, None], memory=state.memory)
            new_score = new_score[:, 0]
        # Move the token leaving the window into the buffer (if it earns its place), write the new token, then record
        # token j's score in its ring slot, ranked (sinks +inf, pads -inf), after the eviction: with a pointwise router
        # (m = 0) token j is the new token, whose slot the eviction has just taken over from the token leaving the
        # window. While j < 0 (the first m - t steps after a prompt of t < m tokens) j's slot, `pos + W + 1 - m > pos`,
        # is one no token has reached yet, and its score is written -inf (j < 0 <= offset), as it already was.
        q, k = self.rotary(q, k[:, None], pos.view(1))
        o = evict_step(
            state, q[:, 0], k[:, 0], v, new_score, eviction=self.eviction, ring_size=ring, sink_size=self.sink_size,
            score_lag=self.eviction.score_lag(m), backend=self.backend,
        )  # fmt: skip
        state.seen += 1
        state.position.add_(1)
        # Reported routing: the score of token j, the one scored at this step.
        return self.o_proj(o.flatten(1))[:, None], LTERouting(raw[:, None], raw[:, None] > 0)
