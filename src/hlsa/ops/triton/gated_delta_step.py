"""Triton kernel for `hlsa.ops.gated_delta.gated_delta_rule_step`: one decode token of the gated delta rule, with the
fp32 state updated in place.

fla's fused recurrent kernel returns the new state in a fresh tensor, which a static decode cache must copy back:
at batch 64 that copy moved as many bytes as the kernel itself (33.5 MB per 0.4B GDN layer, read and written).
Here each program reads its `[K, BV]` block of the state once, applies the step, writes the block back to the same
place and emits its `BV` outputs. Blocks never overlap, so the in-place write is safe; nothing is read on the host,
so the step can be captured in a CUDA graph.

Legend: `B` batch, `H` heads, `K` key dim, `V` value dim, `BV` value columns per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gated_delta_step_kernel(q, k, v, g, beta, state, o, scale, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr):  # fmt: skip
    """Program (b * H + h, value block): S <- exp(g) S; S += beta k (v - S^T k)^T; o = scale S^T q (S is `[K, V]`)."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = state + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_state, mask=m_kv, other=0.0).to(tl.float32)
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_s = b_s * tl.exp(tl.load(g + i_bh).to(tl.float32))
    # The delta rule moves the value the decayed state returns for k towards v, by a step of beta.
    b_delta = tl.load(beta + i_bh).to(tl.float32) * (b_v - tl.sum(b_s * b_k[:, None], 0))
    b_s = b_s + b_k[:, None] * b_delta[None, :]
    b_o = scale * tl.sum(b_s * b_q[:, None], 0)
    tl.store(p_state, b_s.to(state.dtype.element_ty), mask=m_kv)
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def gated_delta_step_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """Triton path of `gated_delta_rule_step` (inputs already validated; `state` contiguous)."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty_like(v)
    # BV = 32: at K = 128 a [128, 32] fp32 block is 32 values per thread with 4 warps; B * H * V / 32 programs.
    BV = min(32, triton.next_power_of_2(V))
    gated_delta_step_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, v, g, beta, state, o, float(scale), K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, num_warps=4
    )
    return o
