"""The sparse attention forward for Hopper GPUs, written in Gluon (Triton's lower-level language) so that the logits
of the next tile are computed while the softmax of this one runs.

`_fwd_kernel` (sparse_attention.py) computes the same o and lse, and its legend and visit order hold here. What
differs is the schedule. Triton compiles each `tl.dot` to warpgroup products (`wgmma`) and waits on them right
after issuing them, so within a warp the tile's products, exponentials and FP32 work run one after another
(docs/kernels.md). Here the products are issued asynchronously, FlashAttention-3's overlap within a warpgroup:

    for each tile j of the program:
        wait for the copies of tile j + 1
        issue S_{j+1} = q k_{j+1}^T               (async; o += p_{j-1} v_{j-1} may still run)
        copy tile j + STAGES - 2 into the slot of tile j - 2 (cp.async)
        softmax of S_j (mask, max, exp2, sum)
        wait for o += p_{j-1} v_{j-1}; rescale o; issue o += p_j v_j (async)
        wait for S_{j+1}

so the tensor cores run both products of the neighbouring tiles during the exponentials of tile j. A program's
tiles are one sequence, its column chunks first and then its band tiles, each loaded by position (columns are
gathered; cp.async reads any rows), into a ring of STAGES shared-memory slots. Visibility is one rule for both kinds
of key: key k is visible to a query at position i when `lo[k] <= i < hi[k]`, with lo = j + W + 1 and hi =
column_end[j] for a column at position j, and lo = n, hi = n + W + 1 for band key n (hi = 0 for a masked or padding
key); the band's interior tiles skip the test (every row of the program sees every key there) unless there is a key
mask.

Limits: bf16 or fp16, head dim 16-128 and a power of two, a GPU with warpgroup products (sm_90). `supported` says
whether a call qualifies; `sparse_attention.forward` runs this kernel for a config whose flag is set and refuses one
it cannot take. There is no interpreter for Gluon: the CPU tests compile the kernel for sm_90
(tests/ops/test_sparse_attention_wgmma.py), the GPU tests check it against the reference.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from hlsa.ops.triton.sparse_attention import band_bounds, online_softmax
from hlsa.ops.triton.sparse_attention_bwd import n_columns_before
from hlsa.ops.triton.tiles import tile_config

LOG2E = 1.4426950408889634
# Gluon's names differ between Triton 3.6 (the GPU machines') and later versions: the masked global-to-shared copy
# (`async_copy_global_to_shared`, later `async_load`) and the barrier of a program's threads (`thread_barrier`, later
# `barrier`).
_copy_to_shared = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared
_thread_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier


@gluon.jit
def _tile_keys(j, n_chunks, n_col, s0, cols_row, T, BN: gl.constexpr, layout: gl.constexpr, USE_COLS: gl.constexpr):
    """Tile j of a program: its keys' positions `[BN]` (in `layout`), which are real keys (not past the column list
    or the sequence), and whether the tile is a column chunk (else a band tile starting at s0 + (j - n_chunks) BN)."""
    o = gl.arange(0, BN, layout=layout)
    n_pos = s0 + (j - n_chunks) * BN + o
    if USE_COLS:
        is_col = j < n_chunks
        o_c = j * BN + o
        m_c = (o_c < n_col) & is_col
        c_pos = gl.load(cols_row + o_c, mask=m_c, other=0)
        return gl.where(is_col, c_pos, n_pos), gl.where(is_col, m_c, n_pos < T), is_col
    else:
        return n_pos, n_pos < T, False


@gluon.jit
def _issue_tile(j, n_tiles, n_chunks, n_col, s0, cols_row, k_slab, v_slab, k_slot, v_slot, T,
                HKV: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, ld_l: gl.constexpr,
                USE_COLS: gl.constexpr):  # fmt: skip
    """Start copying tile j's K and V rows into a slot (one commit group; rows that are not real keys, and every row
    of a j past the last tile, are zero-filled)."""
    pos, real, _ = _tile_keys(j, n_chunks, n_col, s0, cols_row, T, BN, gl.SliceLayout(1, ld_l), USE_COLS)
    real = real & (j < n_tiles)
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_l))
    offsets = pos[:, None] * (HKV * D) + o_d[None, :]
    mask = real[:, None] & (o_d < D)[None, :]
    _copy_to_shared(k_slot, k_slab + offsets, mask=mask)
    _copy_to_shared(v_slot, v_slab + offsets, mask=mask)
    async_copy.commit_group()


@gluon.jit
def _fwd_wgmma_kernel(
    q, k, v, o, lse, ce, km, cols, ccount, scale, T, W,
    HQ: gl.constexpr, HKV: gl.constexpr, GP: gl.constexpr, D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
    STAGES: gl.constexpr, USE_COLS: gl.constexpr, USE_KM: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    scale = gl.cast(scale, gl.float32)  # as in `_fwd_kernel`: torch.compile passes Python floats as fp64
    G: gl.constexpr = HQ // HKV
    BMQ: gl.constexpr = BM // GP  # positions per program; row r is head r // BMQ, position t0 + r % BMQ
    dtype: gl.constexpr = q.dtype.element_ty
    s_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
    )
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    TPR: gl.constexpr = D // 8  # threads per row of a `[rows, D]` copy, 16 bytes each
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [num_warps, 1], [1, 0])
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], dtype)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)

    i_bk = gl.program_id(1)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    t0 = gl.program_id(0) * BMQ
    r_ld = gl.arange(0, BM, layout=gl.SliceLayout(1, ld_l))
    d_ld = gl.arange(0, D, layout=gl.SliceLayout(0, ld_l))
    g_ld, m_ld = r_ld // BMQ, t0 + r_ld % BMQ
    p_q = ((i_b.to(gl.int64) * T + m_ld) * HQ + i_hk * G + g_ld) * D
    m_q = ((g_ld < G) & (m_ld < T))[:, None] & (d_ld < D)[None, :]
    q_s = gl.allocate_shared_memory(
        dtype, [BM, D], q_sl, gl.load(q + p_q[:, None] + d_ld[None, :], mask=m_q, other=0.0)
    )
    k_s = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_sl)
    v_s = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_sl)
    k_slab = k + (i_b.to(gl.int64) * T * HKV + i_hk) * D
    v_slab = v + (i_b.to(gl.int64) * T * HKV + i_hk) * D
    cols_row = cols + i_bk.to(gl.int64) * T

    # The program's tiles: its column chunks (columns older than the band of its last row), then its band tiles
    # [s0, t_end): edge tiles [s0, a), interior [a, d) where every row sees every key, edge [d, t_end).
    n_col = 0
    if USE_COLS:
        n_col = n_columns_before(ccount, i_bk, t0 + BMQ - 1 - W, T)
    n_chunks = gl.cdiv(n_col, BN)
    s0, a, d, t_end = band_bounds(t0, T, W, BMQ, BN)
    n_tiles = n_chunks + gl.cdiv(t_end - s0, BN)

    pos_r = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_l)) % BMQ
    acc = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, layout=o_l))  # a product's result, possibly in flight
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_l))
    zero_s = gl.zeros([BM, BN], gl.float32, layout=s_l)

    AHEAD: gl.constexpr = STAGES - 2  # tiles copied ahead; two more slots hold the tiles whose products run
    for j in gl.static_range(AHEAD):
        _issue_tile(j, n_tiles, n_chunks, n_col, s0, cols_row, k_slab, v_slab, k_s.index(j), v_s.index(j), T,
                    HKV, D, BN, ld_l, USE_COLS)  # fmt: skip
    async_copy.wait_group(AHEAD - 1)
    # Each thread orders its copies (generic proxy) before the products' reads (async proxy), then all threads meet.
    fence_async_shared()
    _thread_barrier()
    s = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), zero_s, use_acc=False)
    for j in range(0, n_tiles):
        # In flight here: o += p_{j-1} v_{j-1}. Slots: j - 1 and j (values being read), j + 1 .. j + AHEAD - 1
        # (copied or being copied), j + AHEAD = j - 2 (free: every warpgroup finished with tile j - 2 before the
        # barrier below).
        async_copy.wait_group(AHEAD - 2)  # tile j + 1 has landed
        fence_async_shared()
        _thread_barrier()
        # The next tile's logits (zeros past the last tile) run on the tensor cores during this tile's softmax; they
        # are issued before the copies, whose addresses may wait on a load of column positions.
        s_next = warpgroup_mma(q_s, k_s.index((j + 1) % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        ahead = j + AHEAD
        _issue_tile(ahead, n_tiles, n_chunks, n_col, s0, cols_row, k_slab, v_slab, k_s.index(ahead % STAGES),
                    v_s.index(ahead % STAGES), T, HKV, D, BN, ld_l, USE_COLS)  # fmt: skip
        pos, real, is_col = _tile_keys(j, n_chunks, n_col, s0, cols_row, T, BN, gl.SliceLayout(0, s_l), USE_COLS)
        n0 = s0 + (j - n_chunks) * BN
        if is_col | (n0 < a) | (n0 >= d) | USE_KM:
            band_key = real
            if USE_KM:
                band_key = band_key & gl.load(km + i_b.to(gl.int64) * T + pos, mask=real, other=0).to(gl.int1)
            lo = pos
            hi = gl.where(band_key, pos + W + 1, 0)
            if USE_COLS:
                c_end = gl.load(ce + (i_b.to(gl.int64) * T + pos) * HKV + i_hk, mask=real & is_col, other=0)
                lo = gl.where(is_col, pos + W + 1, lo)
                hi = gl.where(is_col, gl.where(real, c_end, 0), hi)
            vis = (pos_r[:, None] >= lo[None, :]) & (pos_r[:, None] < hi[None, :])
            s = gl.where(vis, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, scale)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # o += p_{j-1} v_{j-1} is done, s_next may run on
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_s.index(j % STAGES), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))  # s_next is done, o += p_j v_j may run on
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    seen = l_i > 0
    l_safe = gl.where(seen, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_l))[:, None]
    r_o = gl.arange(0, BM, layout=gl.SliceLayout(1, o_l))
    d_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    g_o, m_o = r_o // BMQ, t0 + r_o % BMQ
    p_o = ((i_b.to(gl.int64) * T + m_o) * HQ + i_hk * G + g_o) * D
    m_out = ((g_o < G) & (m_o < T))[:, None] & (d_o < D)[None, :]
    gl.store(o + p_o[:, None] + d_o[None, :], out.to(dtype), mask=m_out)
    g_s = gl.arange(0, BM, layout=gl.SliceLayout(1, s_l)) // BMQ
    b_lse = gl.where(seen, m_i + gl.log2(l_safe), float("inf"))
    gl.store(lse + (i_b.to(gl.int64) * HQ + i_hk * G + g_s) * T + pos_r, b_lse, mask=(g_s < G) & (pos_r < T))


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `forward_wgmma` takes these inputs: bf16 or fp16 on a GPU with warpgroup products (sm_90: a Hopper
    GPU), head dim 16-128 and a power of two."""
    D = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and 16 <= D <= 128
        and D == triton.next_power_of_2(D)
        and torch.cuda.get_device_capability(q.device) == (9, 0)
    )


def forward_wgmma(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ce: torch.Tensor, km: torch.Tensor, cols: torch.Tensor,
    ccount: torch.Tensor, window_eff: int, scale: float, use_cols: bool, config: tuple,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(o `[B, T, HQ, D]`, lse `[B, HQ, T]` fp32), as `sparse_attention.forward` computes them, with the inputs
    and placeholders it takes (`supported` must hold). `config` = (BM, BN, num_warps, stages): BM rows (BM // GP
    positions of each query head of the group; at least 16 rows per warp), BN keys per tile, 4 or 8 warps, STAGES >= 4
    shared-memory slots for K and V (STAGES - 2 tiles copied ahead), and no cap on registers."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    tiles = tile_config(config)
    if tiles.stages < 4 or tiles.warps not in (4, 8) or tiles.BM < 16 * tiles.warps or tiles.maxnreg:
        raise ValueError(
            f"forward_wgmma: config {config} needs stages >= 4, 4 or 8 warps, BM >= 16 * warps and no register cap"
        )
    GP = triton.next_power_of_2(HQ // HKV)
    BM = max(tiles.BM, GP)
    o = torch.empty_like(q)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    _fwd_wgmma_kernel[(triton.cdiv(T, BM // GP), B * HKV)](
        q, k, v, o, lse, ce, km, cols, ccount, scale * LOG2E, T, window_eff,
        HQ=HQ, HKV=HKV, GP=GP, D=D, BM=BM, BN=tiles.BN, STAGES=tiles.stages, USE_COLS=use_cols, USE_KM=km is not q,
        num_warps=tiles.warps,
    )  # fmt: skip
    return o, lse
