"""Softmax attention with RoPE and GQA: full causal (`window_size=None`) or sliding window (band of W+1 tokens).

Caches: SWA keeps a ring of `W + 1` slots (constant memory); full attention keeps every token in a buffer that grows
by doubling (the baseline whose memory grows with the context), unless an eviction policy is set
(`Attention.set_eviction`): then, at inference, it keeps sinks + a window + a buffer of N tokens chosen by the policy
in the constant cache of an LTE layer (`hlsa.layers.eviction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hlsa.layers.eviction import Eviction, EvictionState, evict_step, inference_attention
from hlsa.layers.linear import Linear, fused_linear
from hlsa.layers.rotary import RotaryEmbedding
from hlsa.layers.slots import fill_ring, grow_slots, write_slot
from hlsa.ops.decode_attention import decode_attention
from hlsa.ops.sparse_attention import sparse_attention


@dataclass
class KVState:
    """Head-major key/value slots with a validity mask. For SWA `S = W + 1` (a ring); for full attention `S` grows."""

    k: torch.Tensor  # [B, HKV, S, D], keys after RoPE
    v: torch.Tensor  # [B, HKV, S, D]
    valid: torch.Tensor  # bool [B, HKV, S]
    position: torch.Tensor  # int64 [], next token's position (device copy of `seen`, for sync-free decode)
    seen: int = 0


class ProjectedAttention(nn.Module):
    """What every softmax mixer with RoPE shares: q/k/v/o projections (the authors' parameter names), GQA head
    counts and the rotary embedding. `Attention` and `LTEAttention` build on it."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.backend = backend
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias, backend=backend)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, backend=backend)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, backend=backend)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False, backend=backend)
        self.rotary = RotaryEmbedding(head_dim, base=rope_theta)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> q [B, T, HQ, D], k, v [B, T, HKV, D] (before RoPE)."""
        b, t, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = fused_linear(x, [self.q_proj, self.k_proj, self.v_proj]).split([q_size, kv_size, kv_size], -1)
        return (
            q.view(b, t, self.num_heads, self.head_dim),
            k.view(b, t, self.num_kv_heads, self.head_dim),
            v.view(b, t, self.num_kv_heads, self.head_dim),
        )


class Attention(ProjectedAttention):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        window_size: int | None = None,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, rope_theta=rope_theta, backend=backend
        )
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size must be >= 1 or None for full attention (got {window_size})")
        self.window_size = window_size
        self.set_eviction(None)

    def set_eviction(
        self, eviction: Eviction | None, *, window: int = 0, buffer_size: int = 0, sink_size: int = 0
    ) -> None:
        """Inference setting of a full-attention layer, which sizes the next `init_state`: None keeps every token
        (as trained); an `Eviction` keeps, for each query and kv head, the first `sink_size` tokens, the band of the
        last `window + 1` and `buffer_size - sink_size` older tokens chosen by its policy, with the rule, cache
        (`EvictionState`) and bytes of an LTE layer of that window and buffer size. `learned` needs an LTE router, so
        it is refused here."""
        if eviction is not None:
            if self.window_size is not None:
                raise ValueError("set_eviction: a sliding-window layer's cache is constant already; eviction policies "
                                 "apply to full-attention layers")  # fmt: skip
            if eviction.policy == "learned":
                raise ValueError(
                    "eviction policy 'learned' needs an LTE router, which a full-attention layer does not have; use a "
                    "training-free policy (window, random, key_norm, delta_write, h2o, tova, snapkv) or oracle"
                )
            if window < 0 or buffer_size < sink_size or sink_size < 0:
                raise ValueError(
                    f"set_eviction: need window >= 0 and buffer_size >= sink_size >= 0 (sinks live in the buffer); "
                    f"got window={window}, buffer_size={buffer_size}, sink_size={sink_size}"
                )
        self.eviction = eviction
        self.evict_window, self.buffer_size, self.sink_size = window, buffer_size, sink_size

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._project(x)
        q, k = self.rotary(q, k, positions)
        return q, k, v

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> KVState | EvictionState:
        if self.eviction is not None:
            slots = self.evict_window + 1 + self.buffer_size
            extra = self.eviction.state_extra(batch_size, self.num_kv_heads, self.head_dim, device)
            return EvictionState.empty(
                batch_size, self.num_kv_heads, slots, self.head_dim, device=device, dtype=dtype, **extra
            )
        # Full attention starts small and doubles; SWA allocates its whole ring once.
        slots = self.window_size + 1 if self.window_size is not None else 256
        shape = (batch_size, self.num_kv_heads, slots, self.head_dim)
        return KVState(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            valid=torch.zeros(shape[:3], device=device, dtype=torch.bool),
            position=torch.zeros((), device=device, dtype=torch.long),
        )

    def forward(
        self, x: torch.Tensor, *, pad_mask: torch.Tensor | None = None, state: KVState | None = None
    ) -> tuple[torch.Tensor, None]:
        """x [B, T, d] -> (y [B, T, d], None). With `state`, a prefill (empty state) or token-by-token continuation."""
        if self.eviction is not None:
            return self._forward_evicting(x, pad_mask, state), None
        if state is not None and state.seen > 0:
            ys = [self._decode(x[:, i : i + 1], state) for i in range(x.shape[1])]
            return torch.cat(ys, dim=1), None
        t = x.shape[1]
        q, k, v = self._qkv(x, torch.arange(t, device=x.device))
        o = sparse_attention(q, k, v, window=self.window_size, key_mask=pad_mask, backend=self.backend)
        if state is not None:
            self._prefill(state, k, v, pad_mask)
        return self.o_proj(o.flatten(2)), None

    def _prefill(self, state: KVState, k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor | None) -> None:
        b, t = k.shape[:2]
        if self.window_size is None and t > state.k.shape[2]:
            self._grow(state, t)
        valid = torch.ones(b, t, device=k.device, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        fill_ring(state.k, k)
        fill_ring(state.v, v)
        fill_ring(state.valid, valid[:, :, None].expand(b, t, self.num_kv_heads))
        state.seen = t
        state.position.fill_(t)

    def _decode(self, x: torch.Tensor, state: KVState) -> torch.Tensor:
        if self.window_size is None and state.seen == state.k.shape[2]:
            self._grow(state, 2 * state.seen)
        q, k, v = self._qkv(x, state.position.view(1))
        write_slot(state.k, k[:, 0], state.position)
        write_slot(state.v, v[:, 0], state.position)
        write_slot(state.valid, torch.ones_like(state.valid[:, :, 0]), state.position)
        o = decode_attention(q[:, 0], state.k, state.v, valid=state.valid, backend=self.backend)
        state.seen += 1
        state.position.add_(1)
        return self.o_proj(o.flatten(1))[:, None]

    def _forward_evicting(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None, state: EvictionState | None
    ) -> torch.Tensor:
        """`forward` under an eviction policy: the LTE layer's inference path, with the policy's scores alone."""
        assert self.eviction is not None
        if state is not None and state.seen > 0:  # decode
            outs = []
            for i in range(x.shape[1]):
                q, k, v = self._project(x[:, i : i + 1])
                new_score = self.eviction.scores(None, k, state.position.view(1), v=v, memory=state.memory)[:, 0]
                q, k = self.rotary(q, k, state.position.view(1))
                o = evict_step(
                    state, q[:, 0], k[:, 0], v[:, 0], new_score, eviction=self.eviction,
                    ring_size=self.evict_window + 1, sink_size=self.sink_size, backend=self.backend,
                )  # fmt: skip
                outs.append(o[:, None])
                state.seen += 1
                state.position.add_(1)
            return self.o_proj(torch.cat(outs, dim=1).flatten(2))
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device)
        q, k, v = self._project(x)
        memory = None if state is None else state.memory
        raw = self.eviction.scores(None, k, positions, v=v, pad_mask=pad_mask, memory=memory)
        q, k = self.rotary(q, k, positions)
        o = inference_attention(
            q, k, v, raw, pad_mask, eviction=self.eviction, window=self.evict_window, buffer_size=self.buffer_size,
            sink_size=self.sink_size, state=state, backend=self.backend,
            empty_state=lambda: self.init_state(b, device=x.device, dtype=k.dtype),
        )  # fmt: skip
        return self.o_proj(o.flatten(2))

    @staticmethod
    def _grow(state: KVState, slots: int) -> None:
        """Full attention only: enlarge the buffers to `slots` (amortised doubling; slot p holds position p)."""
        for name in ("k", "v", "valid"):
            setattr(state, name, grow_slots(getattr(state, name), slots, used=state.seen))
