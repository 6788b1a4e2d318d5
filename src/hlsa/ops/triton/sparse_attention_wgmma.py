"""The sparse attention forward for Hopper GPUs, written in Gluon (Triton's lower-level language) so that the tensor
cores compute the products of the neighbouring tiles while the softmax of this one runs.

`_fwd_kernel` (sparse_attention.py) computes the same o and lse, and its legend and visit order hold here. What
differs is the schedule. Triton compiles each `tl.dot` to warpgroup products (`wgmma`) and waits on them right
after issuing them, so within a warp the tile's products, exponentials and FP32 work run one after another
(docs/kernels.md). Here the products are issued asynchronously, FlashAttention-3's overlap within a warpgroup:

    for each tile j of the program:
        wait for the copies of tile j + 1
        issue o += p_{j-1} v_{j-1} and S_{j+1} = q k_{j+1}^T    (async; p_{j-1} from shared memory)
        copy tile j + STAGES - 2 into the slot of tile j - 2    (cp.async)
        softmax of S_j (mask, max, exp2, sum); store p_j        (into the p slot the product does not read)
        wait for both products; rescale o

Two things keep ptxas from undoing the overlap, both checked on the CPU in the compiled code: no product is in flight
across the loop's back edge, or where the code reads its registers (ptxas then serialises every product of the
kernel), and p goes through shared memory, stored before the wait (with p in registers ptxas moved the wait before
the exponentials, to give the next p the registers of the last one). The loop takes two steps per trip, so that
neither step's logits need copying at the back edge.

A program's tiles are one sequence, its column chunks first and then its band tiles, into a ring of STAGES
shared-memory slots: a chunk's K and V rows gathered by the positions in the column list, a band tile's consecutive
rows (cp.async reads any rows). Key k is visible to a query at position i when `lo[k] <= i < hi[k]`, with
lo = j + W + 1 and hi = column_end[j] for a column at position j, and lo = n, hi = n + W + 1 for band key n (hi = 0
for a masked or padding key); the band's interior tiles skip the test (every row of the program sees every key
there) unless there is a key mask.

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
def _issue_tile(j, n_chunks, n_col, s0, cols_row, k_slab, v_slab, k_slot, v_slot, T,
                HKV: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, ld_l: gl.constexpr,
                USE_COLS: gl.constexpr):  # fmt: skip
    """Start copying tile j's K and V rows into a slot, as one commit group: a column chunk's rows gathered by the
    positions in the column list, a band tile's consecutive rows from s0 + (j - n_chunks) BN. Rows that are not keys
    (past the column list or the sequence) are zero-filled; a j past the program's last tile copies rows no product
    reads."""
    o = gl.arange(0, BN, layout=gl.SliceLayout(1, ld_l))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_l))
    if USE_COLS and j < n_chunks:
        o_c = j * BN + o
        real = o_c < n_col
        pos = gl.load(cols_row + o_c, mask=real, other=0)
    else:
        pos = s0 + (j - n_chunks) * BN + o
        real = pos < T
    offsets = pos[:, None] * (HKV * D) + o_d[None, :]
    mask = real[:, None] & (o_d < D)[None, :]
    _copy_to_shared(k_slot, k_slab + offsets, mask=mask)
    _copy_to_shared(v_slot, v_slab + offsets, mask=mask)
    async_copy.commit_group()


@gluon.jit
def _visible_logits(s, j, n_chunks, n_col, s0, a, d, pos_r, cols_row, ce_row, km_row, T, W,
                    HKV: gl.constexpr, BN: gl.constexpr, s_l: gl.constexpr, USE_COLS: gl.constexpr,
                    USE_KM: gl.constexpr):  # fmt: skip
    """Tile j's logits `s` with the pairs its rows may not see set to -inf: key k is visible to a query at position i
    when `lo[k] <= i < hi[k]`. A column chunk's keys (gathered positions p) have lo = p + W + 1, hi = column_end[p]; a
    band tile's (n = its first key + 0, 1, ...) lo = n, hi = n + W + 1, and hi = 0 for a masked key or one past the
    sequence. The band's interior tiles [a, d) are returned as they are (every row sees every key) unless there is a
    key mask."""
    o = gl.arange(0, BN, layout=gl.SliceLayout(0, s_l))
    if USE_COLS and j < n_chunks:
        o_c = j * BN + o
        real = o_c < n_col
        pos = gl.load(cols_row + o_c, mask=real, other=0)
        hi = gl.load(ce_row + pos * HKV, mask=real, other=0)
        if USE_KM:
            hi = gl.where(gl.load(km_row + pos, mask=real, other=0).to(gl.int1), hi, 0)
        s = gl.where((pos_r[:, None] > (pos + W)[None, :]) & (pos_r[:, None] < hi[None, :]), s, float("-inf"))
    else:
        n0 = s0 + (j - n_chunks) * BN
        if (n0 < a) | (n0 >= d) | USE_KM:
            pos = n0 + o
            key = pos < T
            if USE_KM:
                key = key & gl.load(km_row + pos, mask=key, other=0).to(gl.int1)
            hi = gl.where(key, pos + W + 1, 0)
            s = gl.where((pos_r[:, None] >= pos[None, :]) & (pos_r[:, None] < hi[None, :]), s, float("-inf"))
    return s


@gluon.jit
def _step(j, acc, s, m_i, l_i, q_s, k_s, v_s, p_s, zero_s, n_chunks, n_col, s0, a, d, pos_r, cols_row, ce_row,
          km_row, k_slab, v_slab, T, W, scale, HKV: gl.constexpr, D: gl.constexpr, BN: gl.constexpr,
          STAGES: gl.constexpr, s_l: gl.constexpr, o_l: gl.constexpr, ld_l: gl.constexpr, USE_COLS: gl.constexpr,
          USE_KM: gl.constexpr):  # fmt: skip
    """Tile j's step (see the module docstring): o += p_{j-1} v_{j-1} and S_{j+1} on the tensor cores while tile j's
    logits `s` are masked and softmaxed -> (o, S_{j+1}, m, l), every product waited for."""
    AHEAD: gl.constexpr = STAGES - 2
    # Slots: j - 1 (its v being read) and j + 1 (its k being read), j, j + 2 .. j + AHEAD - 1 (copied or being
    # copied), j + AHEAD = j - 2 (free: every warp finished with tile j - 2 before the barrier below).
    async_copy.wait_group(AHEAD - 2)  # tile j + 1 has landed
    fence_async_shared()
    _thread_barrier()
    acc = warpgroup_mma(p_s.index((j + 1) % 2), v_s.index((j + STAGES - 1) % STAGES), acc, is_async=True)
    s_next = warpgroup_mma(q_s, k_s.index((j + 1) % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    ahead = j + AHEAD
    _issue_tile(ahead, n_chunks, n_col, s0, cols_row, k_slab, v_slab, k_s.index(ahead % STAGES),
                v_s.index(ahead % STAGES), T, HKV, D, BN, ld_l, USE_COLS)  # fmt: skip
    s = _visible_logits(s, j, n_chunks, n_col, s0, a, d, pos_r, cols_row, ce_row, km_row, T, W, HKV, BN, s_l, USE_COLS,
                        USE_KM)  # fmt: skip
    p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, scale)
    p_s.index(j % 2).store(p.to(p_s.dtype))  # read by the next step's product, after its fence and barrier
    acc, s_next = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
    return acc, s_next, m_i, l_i


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
    TPR: gl.constexpr = D // 8  # threads per row of a `[rows, D]` copy, 16 bytes each
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [num_warps, 1], [1, 0])
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], dtype)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BN], dtype)

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
    ce_row = ce + i_b.to(gl.int64) * T * HKV + i_hk  # column ends of the kv head, a stride HKV apart
    km_row = km + i_b.to(gl.int64) * T

    # The program's tiles: its column chunks (columns older than the band of its last row), then its band tiles
    # [s0, t_end): edge tiles [s0, a), interior [a, d) where every row sees every key, edge [d, t_end).
    n_col = 0
    if USE_COLS:
        n_col = n_columns_before(ccount, i_bk, t0 + BMQ - 1 - W, T)
    n_chunks = gl.cdiv(n_col, BN)
    s0, a, d, t_end = band_bounds(t0, T, W, BMQ, BN)
    n_tiles = n_chunks + gl.cdiv(t_end - s0, BN)

    pos_r = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_l)) % BMQ
    acc = gl.zeros([BM, D], gl.float32, layout=o_l)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_l))
    zero_s = gl.zeros([BM, BN], gl.float32, layout=s_l)

    AHEAD: gl.constexpr = STAGES - 2  # tiles copied ahead; two more slots hold the tiles whose products run
    for j in gl.static_range(AHEAD):
        _issue_tile(j, n_chunks, n_col, s0, cols_row, k_slab, v_slab, k_s.index(j), v_s.index(j), T, HKV, D, BN, ld_l,
                    USE_COLS)  # fmt: skip
    # Tile j's softmax runs while the tensor cores compute o += p_{j-1} v_{j-1} and the logits of tile j + 1; both
    # are waited for at the end of the step, so that no product is in flight across the loop's back edge (ptxas
    # serialises every product of a kernel whose code reads a product's registers while it may still run). p goes
    # through shared memory, in two slots: p_j is stored before that wait (slot j % 2; the product in flight reads the
    # other), and ptxas keeps the wait after the exponentials (with p in registers it waited first, to reuse the
    # registers of p_{j-1}; the CPU tests check the SASS). Tile 0's step adds p_{-1} v_{-1} = 0: the zeros stored here
    # into p slot 1 and into the V slot of tile -1.
    p_s = gl.allocate_shared_memory(dtype, [2, BM, BN], p_sl)
    p_s.index(1).store(gl.zeros([BM, BN], dtype, layout=s_l))
    v_s.index(STAGES - 1).store(gl.zeros([BN, D], dtype, layout=ld_l))
    async_copy.wait_group(AHEAD - 1)
    # Each thread orders its copies and stores (generic proxy) before the products' reads (async proxy), then all
    # threads meet.
    fence_async_shared()
    _thread_barrier()
    s = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), zero_s, use_acc=False)
    # Two steps per trip: each step's logits then land in registers the other step's logits left free, where one step
    # per trip would copy them at the back edge (a move per logit a thread holds).
    for j in range(0, n_tiles - 1, 2):
        acc, s, m_i, l_i = _step(j, acc, s, m_i, l_i, q_s, k_s, v_s, p_s, zero_s, n_chunks, n_col, s0, a, d, pos_r,
                                 cols_row, ce_row, km_row, k_slab, v_slab, T, W, scale, HKV, D, BN, STAGES, s_l,
                                 o_l, ld_l, USE_COLS, USE_KM)  # fmt: skip
        acc, s, m_i, l_i = _step(j + 1, acc, s, m_i, l_i, q_s, k_s, v_s, p_s, zero_s, n_chunks, n_col, s0, a, d,
                                 pos_r, cols_row, ce_row, km_row, k_slab, v_slab, T, W, scale, HKV, D, BN, STAGES,
                                 s_l, o_l, ld_l, USE_COLS, USE_KM)  # fmt: skip
    if n_tiles % 2 == 1:
        acc, s, m_i, l_i = _step(n_tiles - 1, acc, s, m_i, l_i, q_s, k_s, v_s, p_s, zero_s, n_chunks, n_col, s0, a,
                                 d, pos_r, cols_row, ce_row, km_row, k_slab, v_slab, T, W, scale, HKV, D, BN,
                                 STAGES, s_l, o_l, ld_l, USE_COLS, USE_KM)  # fmt: skip
    fence_async_shared()
    _thread_barrier()
    acc = warpgroup_mma(p_s.index((n_tiles - 1) % 2), v_s.index((n_tiles - 1) % STAGES), acc)
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
