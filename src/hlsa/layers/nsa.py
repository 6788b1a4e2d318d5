"""Native Sparse Attention mixer (docs/nsa.md) with an incremental decode cache.

The cache keeps the FULL key/value history (O(T) memory: `2 * B * HKV * T * D` elements, plus `1 / block_size` of
that for the compressed cache), as the authors' layer does; it is preallocated in chunks and doubles when full, so a
decode step writes one slot and copies nothing. The compressed cache is incremental: when a token completes a block
of its row, that block alone is pooled and written once (the authors re-pool the whole history every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hlsa.layers.linear import Linear, fused_linear
from hlsa.layers.rotary import RotaryEmbedding
from hlsa.layers.slots import grow_slots, write_slot
from hlsa.ops.nsa import left_pad_starts, nsa, nsa_decode

# Cache slots are allocated in multiples of this many tokens (then doubled) so decode steps rarely reallocate.
_CACHE_CHUNK = 1024


@dataclass
class NSAState:
    """Decode cache of one NSA layer (head-major, docs/design.md).

    k, v: `[B, HKV, N, D]` keys (with RoPE) and values of every consumed token, pads included (slot = position).
    k_cmp, v_cmp: `[B, HKV, N // block_size + 1, D]`; slot `c` of row `b` is the mean of slots
        `start[b] + c * block_size ...` of one complete block (blocks start at the row's first real token).
    start: int32 `[B]` first real slot of each row (number of left pads), set by the prefill.
    position: int64 `[]` the next token's position and slot (a device copy of `seen`): a decode step reads only it,
        so the step needs no host value and can be compiled and replayed from a CUDA graph.
    seen: tokens consumed so far (pads included); host-side, for the decision to grow the caches.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    start: torch.Tensor
    position: torch.Tensor
    seen: int = 0


class NativeSparseAttention(nn.Module):
    """NSA mixer: compressed + selected + window attention with sigmoid gates per query head.

    `window_size` is in hlsa's convention: W means a band of W + 1 tokens including the current one, so the
    authors' `window_size=512` (flash-attn window (511, 0)) is `window_size=511` here.
    `backend`: "auto" (fla / Triton kernels on CUDA, references on CPU), "torch" (references), or "triton" (the
    Triton decode kernel, which also runs under TRITON_INTERPRET=1; whole sequences as for "auto").
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        block_counts: int = 16,
        window_size: int,
        rope_theta: float = 1e4,
        qkv_bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"NSA: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if block_size < 1 or block_counts < 1 or window_size < 0:
            raise ValueError(
                f"NSA: need block_size >= 1, block_counts >= 1, window_size >= 0; got {block_size}, "
                f"{block_counts}, {window_size}"
            )
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"NSA: backend must be 'auto', 'torch' or 'triton'; got {backend!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.block_counts, self.window_size = block_size, block_counts, window_size
        self.backend = backend
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias, backend=backend)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, backend=backend)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, backend=backend)
        self.g_proj = Linear(hidden_size, num_heads * 3, bias=False, backend=backend)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False, backend=backend)
        self.rotary = RotaryEmbedding(head_dim, base=rope_theta)

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> NSAState:
        """An empty cache of `_CACHE_CHUNK` slots (grown by doubling as tokens arrive)."""
        kv = (batch_size, self.num_kv_heads, _CACHE_CHUNK, self.head_dim)
        cmp = (batch_size, self.num_kv_heads, _CACHE_CHUNK // self.block_size + 1, self.head_dim)
        return NSAState(
            k=torch.zeros(kv, device=device, dtype=dtype),
            v=torch.zeros(kv, device=device, dtype=dtype),
            k_cmp=torch.zeros(cmp, device=device, dtype=dtype),
            v_cmp=torch.zeros(cmp, device=device, dtype=dtype),
            start=torch.zeros(batch_size, device=device, dtype=torch.int32),
            position=torch.zeros((), device=device, dtype=torch.long),
        )

    def forward(
        self, x: torch.Tensor, *, pad_mask: torch.Tensor | None = None, state: NSAState | None = None
    ) -> tuple[torch.Tensor, None]:
        """x `[B, T, d]` -> (y `[B, T, d]`, None).

        `pad_mask` bool `[B, T]` (False = left pad) is read only for a whole sequence or the prefill chunk
        (`state.seen == 0`); continuation chunks take the pads from the state. Pad positions output zeros.
        """
        B, T, _ = x.shape
        HQ, HKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        decoding = state is not None and state.seen > 0
        projections = [self.q_proj, self.k_proj, self.v_proj, self.g_proj]
        q, k, v, g = fused_linear(x, projections).split([p.out_features for p in projections], -1)
        q, k, v = q.view(B, T, HQ, D), k.view(B, T, HKV, D), v.view(B, T, HKV, D)
        # The authors' layout: g_proj's output is (head, branch) with the branch fastest, branches cmp, slc, swa.
        g_cmp, g_slc, g_swa = torch.sigmoid(g).view(B, T, HQ, 3).unbind(-1)
        positions = torch.arange(T, device=x.device)
        q, k = self.rotary(q, k, positions + state.position if decoding else positions)
        if decoding:
            steps = [
                self._decode_step(state, q[:, i], k[:, i], v[:, i], g_cmp[:, i], g_slc[:, i], g_swa[:, i])
                for i in range(T)
            ]
            o = torch.stack(steps, dim=1)
        else:
            o = nsa(
                q, k, v, g_cmp, g_slc, g_swa, block_size=self.block_size, block_counts=self.block_counts,
                window=self.window_size, key_mask=pad_mask, backend="torch" if self.backend == "torch" else "auto",
            )  # fmt: skip
            if state is not None:
                self._prefill_cache(state, k, v, pad_mask)
        return self.o_proj(o.reshape(B, T, HQ * D)), None

    def _grow(self, state: NSAState, needed: int) -> None:
        """Reallocate the caches to hold `needed` slots (at least doubling), copying the used prefix once."""
        cap = state.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(2 * cap, -(-needed // _CACHE_CHUNK) * _CACHE_CHUNK)
        for name, slots, used in (
            ("k", new_cap, state.seen),
            ("v", new_cap, state.seen),
            ("k_cmp", new_cap // self.block_size + 1, state.k_cmp.shape[2]),
            ("v_cmp", new_cap // self.block_size + 1, state.v_cmp.shape[2]),
        ):
            setattr(state, name, grow_slots(getattr(state, name), slots, used=used))

    def _prefill_cache(self, state: NSAState, k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor | None) -> None:
        """Store the prefill keys/values and pool the complete blocks of each row (from its first real token)."""
        B, T = k.shape[:2]
        BS = self.block_size
        self._grow(state, T)
        start = left_pad_starts(pad_mask) if pad_mask is not None else torch.zeros_like(state.start)
        state.start.copy_(start)
        state.k[:, :, :T] = k.transpose(1, 2)
        state.v[:, :, :T] = v.transpose(1, 2)
        nc = T // BS
        if nc > 0:
            slot = (start[:, None] + torch.arange(nc * BS, device=k.device)).clamp_max(T - 1)  # [B, nc * BS]
            valid = torch.arange(nc, device=k.device) < ((T - start) // BS)[:, None]  # [B, nc]
            for src, dst in ((state.k, state.k_cmp), (state.v, state.v_cmp)):
                blocks = src.gather(2, slot[:, None, :, None].expand(B, src.shape[1], -1, src.shape[3]))
                pooled = blocks.unflatten(2, (nc, BS)).mean(dim=3)  # [B, HKV, nc, D]
                dst[:, :, :nc] = torch.where(valid[:, None, :, None], pooled, 0.0)
        state.seen = T
        state.position.fill_(T)

    def _decode_step(self, state: NSAState, q, k, v, g_cmp, g_slc, g_swa) -> torch.Tensor:
        """One token: q `[B, HQ, D]`, k/v `[B, HKV, D]`, gates `[B, HQ]` -> o `[B, HQ, D]`.

        Only `_grow` reads the host-side `seen`; everything else is indexed by the device `position`, so the step
        has no host sync and a captured graph of it stays right at later positions (while the caches do not grow).
        """
        BS = self.block_size
        self._grow(state, state.seen + 1)
        write_slot(state.k, k, state.position)
        write_slot(state.v, v, state.position)
        n = state.position + 1  # slots used, this token's included
        # Rows whose real length is now a multiple of BS just completed a block: pool it once, write slot c. Every
        # step gathers the last BS slots (clamped at 0 while fewer are used), and only the rows that completed a
        # block keep the mean.
        real = n - state.start.long()
        done = ((real >= BS) & (real % BS == 0))[:, None, None]
        c = (real // BS - 1).clamp_min(0)
        rows = torch.arange(k.shape[0], device=k.device)
        last = (n - BS + torch.arange(BS, device=k.device)).clamp_min(0)
        for src, dst in ((state.k, state.k_cmp), (state.v, state.v_cmp)):
            dst[rows, :, c] = torch.where(done, src.index_select(2, last).mean(dim=2), dst[rows, :, c])
        state.seen += 1
        state.position.add_(1)
        return nsa_decode(
            q, state.k, state.v, state.k_cmp, state.v_cmp, g_cmp, g_slc, g_swa, start=state.start,
            seq_len=state.position, block_size=BS, block_counts=self.block_counts, window=self.window_size,
            backend=self.backend,
        )  # fmt: skip
