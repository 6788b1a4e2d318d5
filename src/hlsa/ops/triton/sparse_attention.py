"""Triton kernels for `hlsa.ops.sparse_attention`: forward, dq, the column prologue and the autograd Function.

Legend: `B` batch, `T` length, `HQ`/`HKV` query/key-value heads, `G = HQ // HKV`, `D` head dim (`BD` its power-of-two
tile), `BM` query rows and `BN` keys per tile. Layout `[B, T, H, D]`, contiguous. Logits are kept in base 2
(`scale * log2(e)`), so `lse` is a base-2 log-sum-exp `[B, HQ, T]` (`+inf` for rows that see no key). Every kernel
casts `scale` to fp32 first: a direct launch passes a Python float as fp32, but torch.compile (Inductor) passes it as
fp64, which would turn the softmax's loop-carried fp32 state into fp64 (a compile error) or compute whole tiles in
fp64 (tests/ops/test_float_arguments.py). A dq program's
rows are BM positions of one query head; a forward program's rows are BM / GP positions of all G heads of one kv
head (`GP` = G rounded up to a power of two), which shortens its band and shares its K/V tiles.

Visit order for the positions `[t0, t0 + BM)` of a program (BM / GP in the forward):
1. the *compacted* columns of its kv head: keys `j` with `column_end[j] > j + W + 1` (more than the band) and
   `j + W < t0 + BM - 1`, gathered by index, masked `j + W < i < column_end[j]` (their far pairs only);
2. the band key blocks `[floor((t0 - W) / BN) * BN, t0 + BM)`, masked `i - W <= j <= i` and `key_mask[j]`; the
   blocks fully inside every query's band skip the position test.
So each visible pair is counted once (near pairs in the band, far pairs in the columns) and the work is
O(T * (W + BM + number of columns)). The backward (sparse_attention_bwd.py) splits the pairs the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hlsa.ops.triton import interpreted
from hlsa.ops.triton.rows import block_rows, load_query_rows, load_rows, query_rows, rows_descriptor, use_tma
from hlsa.ops.triton.sparse_attention_bwd import dkdv, n_columns_before
from hlsa.ops.triton.tiles import precision, tile_config

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_step(acc, m_i, l_i, b_q, b_k, b_v, vis, scale, APPLY_MASK: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over a `[BM, BN]` tile (base-2 logits `scale * q.k`).

    The running max moves, and `acc`, `l_i` are rescaled, at every tile. FlashAttention-4's conditional rescaling
    (only when a row's max grows by more than 2^8) was tried and measured slower on the H200 (forward +10%
    at D=64, +15% at D=128; docs/kernels.md): the block-wide branch costs more than the `[BM, D]` multiply it skips.
    """
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    if APPLY_MASK:
        b_s = tl.where(vis, b_s, float("-inf"))
    b_p, alpha, m_new, l_i = online_softmax(b_s, m_i, l_i, scale)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def online_softmax(s, m_i, l_i, scale):
    """One tile's step of the running softmax over raw logits `s` `[rows, keys]` (base-2 logits `scale * s`):
    (p, the factor that rescales the rows' earlier sums, the new running max, the new running sum). Shared with the
    Gluon forward (sparse_attention_wgmma.py)."""
    # The max is taken before scaling (scale > 0), so scaling and shifting below are one multiply-add per logit.
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    # A row with nothing visible yet keeps m = -inf; shifting by 0 instead avoids exp2(-inf - -inf) = nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, vis, scale, APPLY_MASK: tl.constexpr, PREC: tl.constexpr):
    """dq contribution of one `[BM, BN]` tile: p recomputed from lse, ds = p * (dp - delta)."""
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale - b_lse[:, None])
    if APPLY_MASK:
        b_p = tl.where(vis, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)


@triton.jit
def _band_vis(o_m, o_n, km, T, W, EDGE: tl.constexpr, USE_KM: tl.constexpr):
    """Visibility of band keys `o_n` to queries `o_m`; interior tiles (EDGE False) only check the key mask."""
    m_n = o_n < T
    if USE_KM:
        m_n = m_n & tl.load(km + o_n, mask=o_n < T, other=0).to(tl.int1)
    vis = m_n[None, :]
    if EDGE:
        vis = vis & (o_n[None, :] <= o_m[:, None]) & (o_m[:, None] - o_n[None, :] <= W)
    return vis


@triton.jit
def band_bounds(t0, T, W, BM: tl.constexpr, BN: tl.constexpr):
    """Band key tiles of the queries [t0, t0 + BM): edge [s0, a), interior [a, d), edge [d, t_end), in whole BN tiles
    (d = t0 rounded down to a tile: with BM < BN the diagonal tile starts before t0)."""
    s0 = (tl.maximum(t0 - W, 0) // BN) * BN
    d = (t0 // BN) * BN
    a = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(t0 + BM - 1 - W, 0), BN) * BN, s0), d)
    return s0, a, d, tl.minimum(t0 + BM, T)


@triton.jit
def _column_tile(cols, ce, p_k, p_v, i_b, i_hk, i_bk, c0, n_col, o_m, T, W, HKV: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """Chunk `[c0, c0 + BN)` of the kv head's compacted columns: the visibility of their far pairs to the rows'
    positions `o_m`, and their keys and values (gathered by position)."""
    o_c = c0 + tl.arange(0, BN)
    m_c = o_c < n_col
    b_pos = tl.load(cols + i_bk.to(tl.int64) * T + o_c, mask=m_c, other=0)
    b_ce = tl.load(ce + (i_b.to(tl.int64) * T + b_pos) * HKV + i_hk, mask=m_c, other=0)
    vis = (o_m[:, None] < b_ce[None, :]) & (o_m[:, None] - b_pos[None, :] > W)
    return vis, load_rows(p_k, b_pos, m_c, HKV, D, BD), load_rows(p_v, b_pos, m_c, HKV, D, BD)


@triton.jit
def _band_tile(p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV: tl.constexpr, D: tl.constexpr,
               BD: tl.constexpr, BN: tl.constexpr, EDGE: tl.constexpr, USE_KM: tl.constexpr,
               TMA: tl.constexpr):  # fmt: skip
    """Band keys `[n0, n0 + BN)`: their visibility to the rows' positions `o_m` (see `_band_vis`), keys and values."""
    vis = _band_vis(o_m, n0 + tl.arange(0, BN), km_b, T, W, EDGE, USE_KM)
    b_k = block_rows(p_k, k_desc, i_b, i_hk, n0, T, HKV, D, BD, BN, TMA)
    return vis, b_k, block_rows(p_v, v_desc, i_b, i_hk, n0, T, HKV, D, BD, BN, TMA)


@triton.jit
def _program_rows(k, v, km, T, HQ: tl.constexpr, HKV: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  BM: tl.constexpr):  # fmt: skip
    """The BM rows of a forward or dq program (grid `(T / (BM / GP), B * HKV)`): BM // GP positions of each of the G
    query heads of one kv head (`query_rows` with all GP heads; GP = G rounded up to a power of two). The K/V tiles
    are then loaded once for the group, and the band of a program spans W + BM // GP keys instead of W + BM.

    Returns (i_b, i_hk, i_bk, t0, the rows' positions, mask and offsets as `query_rows` gives them, and the kv head's
    slabs of k and v and row of the key mask)."""
    i_m, i_bk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    t0 = i_m * (BM // GP)
    o_m, m_row, p_row, p_lse = query_rows(i_b, i_hk, 0, t0, T, HQ, HQ // HKV, D, BM, GP)
    p_k = k + (i_b.to(tl.int64) * T * HKV + i_hk) * D
    p_v = v + (i_b.to(tl.int64) * T * HKV + i_hk) * D
    return i_b, i_hk, i_bk, t0, o_m, m_row, p_row, p_lse, p_k, p_v, km + i_b.to(tl.int64) * T


@triton.jit
def _store_program_rows(x, value, p_row, m_row, D: tl.constexpr, BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    tl.store(x + p_row[:, None] + o_d[None, :], value.to(x.dtype.element_ty), mask=m_row[:, None] & (o_d < D)[None, :])


@triton.jit
def _fwd_kernel(
    q, k, v, o, lse, ce, km, cols, ccount, scale, T, W, k_desc, v_desc, q_desc,
    HQ: tl.constexpr, HKV: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, USE_COLS: tl.constexpr, USE_KM: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    ROWS_TMA: tl.constexpr,
):  # fmt: skip
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64 (see the legend)
    i_b, i_hk, i_bk, t0, o_m, m_row, p_row, p_lse, p_k, p_v, km_b = _program_rows(k, v, km, T, HQ, HKV, GP, D, BM)
    b_q = load_query_rows(q, q_desc, p_row, m_row, i_b, i_hk, t0, T, D, BD, ROWS_TMA)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if USE_COLS:
        n_col = n_columns_before(ccount, i_bk, t0 + BM // GP - 1 - W, T)
        for c0 in range(0, n_col, BN):
            vis, b_k, b_v = _column_tile(cols, ce, p_k, p_v, i_b, i_hk, i_bk, c0, n_col, o_m, T, W, HKV, D, BD, BN)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, b_q, b_k, b_v, vis, scale, True, PREC)
    s0, a, d, t_end = band_bounds(t0, T, W, BM // GP, BN)
    for n0 in range(s0, a, BN):
        vis, b_k, b_v = _band_tile(
            p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV, D, BD, BN, True, USE_KM, TMA
        )
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, b_q, b_k, b_v, vis, scale, True, PREC)
    for n0 in range(a, d, BN):
        vis, b_k, b_v = _band_tile(
            p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV, D, BD, BN, False, USE_KM, TMA
        )
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, b_q, b_k, b_v, vis, scale, USE_KM, PREC)
    for n0 in range(d, t_end, BN):
        vis, b_k, b_v = _band_tile(
            p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV, D, BD, BN, True, USE_KM, TMA
        )
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, b_q, b_k, b_v, vis, scale, True, PREC)
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    _store_program_rows(o, acc, p_row, m_row, D, BD)
    b_lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(lse + p_lse, b_lse, mask=m_row)


@triton.jit
def _dq_kernel(
    q, k, v, o, do, dq, lse, delta, ce, km, cols, ccount, scale, T, W, k_desc, v_desc, q_desc, o_desc, do_desc,
    HQ: tl.constexpr, HKV: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, USE_COLS: tl.constexpr, USE_KM: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    ROWS_TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64 (see the legend)
    i_b, i_hk, i_bk, t0, o_m, m_row, p_row, p_lse, p_k, p_v, km_b = _program_rows(k, v, km, T, HQ, HKV, GP, D, BM)
    b_q = load_query_rows(q, q_desc, p_row, m_row, i_b, i_hk, t0, T, D, BD, ROWS_TMA)
    b_do = load_query_rows(do, do_desc, p_row, m_row, i_b, i_hk, t0, T, D, BD, ROWS_TMA)
    b_lse = tl.load(lse + p_lse, mask=m_row, other=float("inf"))
    # delta = rowsum(o * do), the softmax-gradient shift of these rows; stored for the dk/dv kernels (run next).
    b_o = load_query_rows(o, o_desc, p_row, m_row, i_b, i_hk, t0, T, D, BD, ROWS_TMA)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(delta + p_lse, b_delta, mask=m_row)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    if USE_COLS:
        n_col = n_columns_before(ccount, i_bk, t0 + BM // GP - 1 - W, T)
        for c0 in range(0, n_col, BN):
            vis, b_k, b_v = _column_tile(cols, ce, p_k, p_v, i_b, i_hk, i_bk, c0, n_col, o_m, T, W, HKV, D, BD, BN)
            b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, vis, scale, True, PREC)
    s0, a, d, t_end = band_bounds(t0, T, W, BM // GP, BN)
    for n0 in range(s0, a, BN):
        vis, b_k, b_v = _band_tile(
            p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV, D, BD, BN, True, USE_KM, TMA
        )
        b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, vis, scale, True, PREC)
    for n0 in tl.range(a, d, BN, warp_specialize=WS):
        vis, b_k, b_v = _band_tile(
            p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV, D, BD, BN, False, USE_KM, TMA
        )
        b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, vis, scale, USE_KM, PREC)
    for n0 in range(d, t_end, BN):
        vis, b_k, b_v = _band_tile(
            p_k, p_v, k_desc, v_desc, km_b, i_b, i_hk, n0, o_m, T, W, HKV, D, BD, BN, True, USE_KM, TMA
        )
        b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, b_k, b_v, vis, scale, True, PREC)
    # ds was taken w.r.t. natural logits; dq = scale * ds @ k (the base-2 factor only lives in the exponent).
    b_dq = b_dq * (scale / 1.4426950408889634)
    _store_program_rows(dq, b_dq, p_row, m_row, D, BD)


def launch_config(kernel: str, D: int, dtype: torch.dtype) -> tuple:
    """(BM, BN, num_warps, num_stages[, flag[, maxnreg]]) (`tile_config`) for `kernel` in {"fwd", "dq",
    "dkdv"}; small tiles under the interpreter.

    The launchers (`forward`, `backward_dq`, `dkdv`) take an explicit `config` instead; benchmarks/attention_tiles.py
    sweeps them and prints this table's entries."""
    if interpreted():
        return 16, 16, 1, 1
    if dtype == torch.float32:
        # fp32 is the exact-arithmetic path for checks, not a speed path. Its products run on the FP32 units
        # (`input_precision="ieee"`), whose operands and accumulators take registers the tensor cores would not:
        # in fp32 the bf16 tiles spilled 2-14 KiB per thread and took up to a minute per kernel to compile. These
        # small tiles spill at most 16 bytes at D = 48-128 with Triton 3.6 (benchmarks/kernel_resources.py --dtype
        # float32; tests/test_kernel_resources.py).
        return {"fwd": (32, 16, 8, 1), "dq": (16, 16, 8, 1), "dkdv": (16, 16, 4, 1)}[kernel]
    # The least summed time over T = 4096 and 16384 of every candidate that passed the reference check, bf16, on an
    # H100 (benchmarks/results/attention_tiles-h100.json; docs/kernels.md), where it was more than a tie: the
    # forward at D = 128 keeps (128, 32, 4, 4) over (128, 32, 4, 3), 0.2% apart in sum, and dq at D = 128 leaves out
    # the warp specialisation that timed 1% faster, at T = 16384 only, a path the GPU tests cover less. The dk/dv
    # tiles spill a little (152-176 bytes per thread at D = 64, 32-56 at D = 128; benchmarks/kernel_resources.py) and
    # were 4% and 8% faster in sum than the spill-free packed (64, 64, 4, 3) and (32, 64, 4, 3) tiles.
    table = {
        "fwd": (128, 64, 4, 3) if D <= 64 else (128, 32, 4, 4),
        "dq": (128, 64, 4, 3) if D <= 64 else (128, 64, 8, 3),
        "dkdv": (128, 64, 4, 2, True) if D <= 64 else (64, 128, 8, 3, True),
    }
    return table[kernel]


@triton.jit
def _prologue_kernel(ce, km, cols, ccount, T, W, HKV: tl.constexpr, BT: tl.constexpr, USE_KM: tl.constexpr):
    """One program per (b, kv head): a running count of the columns along T, and their positions compacted."""
    i_bk = tl.program_id(0)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    p_cols = cols + i_bk.to(tl.int64) * T
    p_count = ccount + i_bk.to(tl.int64) * (T + 1)
    tl.store(p_count, 0)
    carry = tl.zeros([], dtype=tl.int32)
    for t0 in range(0, T, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_ce = tl.load(ce + (i_b.to(tl.int64) * T + o_t) * HKV + i_hk, mask=m_t, other=0)
        is_col = m_t & (b_ce > o_t + W + 1)
        if USE_KM:
            is_col = is_col & (tl.load(km + i_b.to(tl.int64) * T + o_t, mask=m_t, other=0) != 0)
        b_count = tl.cumsum(is_col.to(tl.int32), 0) + carry
        tl.store(p_count + 1 + o_t, b_count, mask=m_t)
        tl.store(p_cols + b_count - 1, o_t, mask=is_col)
        carry += tl.sum(is_col.to(tl.int32), 0)


def column_prologue(
    column_end: torch.Tensor, key_mask: torch.Tensor | None, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact, per (b, kv head), the sorted positions of keys that outlive their band (one launch).

    Returns:
        cols int32 `[B * HKV, T]`: column positions in increasing order (entries past the count are never written);
        ccount int32 `[B * HKV, T + 1]`: `ccount[:, j]` = number of columns at positions `< j`.
    """
    B, T, HKV = column_end.shape
    cols = torch.empty(B * HKV, T, device=column_end.device, dtype=torch.int32)
    ccount = torch.empty(B * HKV, T + 1, device=column_end.device, dtype=torch.int32)
    km = key_mask if key_mask is not None else column_end  # placeholder, never read
    BT = 16 if interpreted() else 1024
    _prologue_kernel[(B * HKV,)](column_end, km, cols, ccount, T, window, HKV=HKV, BT=BT, USE_KM=key_mask is not None)
    return cols, ccount


def column_prologue_ref(
    column_end: torch.Tensor, key_mask: torch.Tensor | None, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`column_prologue` in torch (a cumsum and a scatter); the entries of `cols` past the count are 0."""
    B, T, HKV = column_end.shape
    pos = torch.arange(T, device=column_end.device, dtype=torch.int32)
    is_col = column_end > (pos + window + 1)[None, :, None]  # [B, T, HKV]
    if key_mask is not None:
        is_col = is_col & key_mask[:, :, None]
    is_col = is_col.permute(0, 2, 1).reshape(B * HKV, T)
    csum = is_col.cumsum(dim=1, dtype=torch.int32)
    ccount = torch.nn.functional.pad(csum, (1, 0))
    # Non-columns all land in the spare slot T, which is dropped.
    dest = torch.where(is_col, csum - 1, T).long()
    cols = torch.zeros(B * HKV, T + 1, device=column_end.device, dtype=torch.int32)
    cols.scatter_(1, dest, pos.expand(B * HKV, T).contiguous())
    return cols[:, :T].contiguous(), ccount


Tensor = torch.Tensor


def forward(
    q: Tensor, k: Tensor, v: Tensor, ce: Tensor, km: Tensor, cols: Tensor, ccount: Tensor,
    window_eff: int, scale: float, use_cols: bool, config: tuple | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the forward kernel -> (o [B, T, HQ, D], lse [B, HQ, T] fp32).

    `config`: (BM, BN, num_warps, num_stages[, gluon[, maxnreg]]) instead of `launch_config("fwd", ...)` (for tile
    sweeps; see `tile_config`); with the flag set, the Gluon kernel of sparse_attention_wgmma.py runs instead (bf16 or
    fp16 on a Hopper GPU)."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    tiles = tile_config(config or launch_config("fwd", D, q.dtype))
    if tiles.flag:
        from hlsa.ops.triton import sparse_attention_wgmma as wgmma

        if not wgmma.supported(q, k):
            raise ValueError(
                f"sparse attention forward: config {config} asks for the Gluon kernel, which needs bf16 or fp16 on a "
                f"Hopper GPU (sm_90) and a power-of-two head dim of 16-128; got {q.dtype}, D={D} on {q.device}: drop "
                "the config's flag for the Triton kernel"
            )
        return wgmma.forward_wgmma(q, k, v, ce, km, cols, ccount, window_eff, scale, use_cols, config=tiles)
    BN = tiles.BN
    GP = triton.next_power_of_2(HQ // HKV)
    BM = max(tiles.BM, GP)  # rows per program: BM // GP positions of each of the group's query heads
    o = torch.empty_like(q)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    tma = use_tma(k, v)  # the band's K/V tiles
    descs = (rows_descriptor(k, BN), rows_descriptor(v, BN)) if tma else (None,) * 2
    rows_tma = GP == 1 and use_tma(q)  # q: one block of one head's rows (G = 1), else rows of several heads
    _fwd_kernel[(triton.cdiv(T, BM // GP), B * HKV)](
        q, k, v, o, lse, ce, km, cols, ccount, scale * LOG2E, T, window_eff, *descs,
        rows_descriptor(q, BM) if rows_tma else None,
        HQ=HQ, HKV=HKV, GP=GP, D=D, BD=triton.next_power_of_2(D), BM=BM, BN=BN, USE_COLS=use_cols,
        USE_KM=km is not q, PREC=precision(q.dtype), TMA=tma, ROWS_TMA=rows_tma, **tiles.launch_options(),
    )  # fmt: skip
    return o, lse


def backward_dq(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor, ce: Tensor, km: Tensor, cols: Tensor,
    ccount: Tensor, window_eff: int, scale: float, use_cols: bool, config: tuple | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the dq kernel -> dq [B, T, HQ, D] and delta = rowsum(o * do) [B, HQ, T] fp32 (for `dkdv`).

    `config` as in `forward` (default `launch_config("dq", ...)`), the flag being warp specialisation of the band's
    interior loop here."""
    B, T, HQ, D = q.shape
    tiles = tile_config(config or launch_config("dq", D, q.dtype))
    BN = tiles.BN
    dq = torch.empty_like(q)
    delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    HKV = k.shape[2]
    GP = triton.next_power_of_2(HQ // HKV)
    BM = max(tiles.BM, GP)  # rows per program: BM // GP positions of each of the group's query heads
    tma = use_tma(k, v)  # the band's K/V tiles
    descs = (rows_descriptor(k, BN), rows_descriptor(v, BN)) if tma else (None,) * 2
    rows_tma = GP == 1 and use_tma(q, o, do)  # as in `forward`
    row_descs = tuple(rows_descriptor(x, BM) for x in (q, o, do)) if rows_tma else (None,) * 3
    _dq_kernel[(triton.cdiv(T, BM // GP), B * HKV)](
        q, k, v, o, do, dq, lse, delta, ce, km, cols, ccount, scale * LOG2E, T, window_eff, *descs, *row_descs,
        HQ=HQ, HKV=HKV, GP=GP, D=D, BD=triton.next_power_of_2(D), BM=BM, BN=BN, USE_COLS=use_cols,
        USE_KM=km is not q, PREC=precision(q.dtype), TMA=tma, ROWS_TMA=rows_tma, WS=tiles.flag,
        **tiles.launch_options(),
    )  # fmt: skip
    return dq, delta


class SparseAttentionFunction(torch.autograd.Function):
    """Forward and backward through the Triton kernels; the columns are compacted once and reused."""

    @staticmethod
    def forward(ctx, q, k, v, column_end, key_mask, window, scale):  # noqa: ANN001, ANN205
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        T = q.shape[1]
        # Full causal attention is a band as wide as the sequence; a band that wide leaves nothing to columns.
        window_eff = T if window is None else min(window, T)
        use_cols = column_end is not None and window_eff < T
        if use_cols:
            ce = column_end.contiguous()
            cols, ccount = column_prologue(ce, key_mask, window_eff)
        else:
            ce = cols = ccount = q  # placeholders, never read (USE_COLS is False)
        km = key_mask.contiguous() if key_mask is not None else q
        o, lse = forward(q, k, v, ce, km, cols, ccount, window_eff, scale, use_cols)
        ctx.save_for_backward(q, k, v, o, lse, ce, km, cols, ccount)
        ctx.window_eff, ctx.scale, ctx.use_cols = window_eff, scale, use_cols
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v, o, lse, ce, km, cols, ccount = ctx.saved_tensors
        do = do.contiguous()
        pattern = (ce, km, cols, ccount, ctx.window_eff, ctx.scale, ctx.use_cols)
        dq, delta = backward_dq(q, k, v, o, do, lse, *pattern)
        dk, dv = dkdv(q, k, v, do, lse, delta, *pattern, config=launch_config("dkdv", q.shape[-1], q.dtype))
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    column_end: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Triton path of `hlsa.ops.sparse_attention.sparse_attention` (inputs already validated)."""
    return SparseAttentionFunction.apply(q, k, v, column_end, key_mask, window, scale)
