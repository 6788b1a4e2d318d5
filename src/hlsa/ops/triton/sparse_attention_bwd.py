"""Triton dk/dv kernels for `hlsa.ops.sparse_attention` (legend in sparse_attention.py).

The visible pairs split as in the forward: *near* pairs (`i - W <= j <= i`) and *far* pairs of column keys
(`j + W < i < column_end[j]`). One program owns a block of BN keys of one (b, kv head) and loops over the G query heads
of that kv head, so dk and dv are each written once, without atomics. A query tile holds BM rows: BM positions of one
head, or, *packed*, BM // GP positions of each of the GP heads of the group at once (GP = G rounded up to a power of
two; as the forward and dq programs do), which turns the loop over heads and positions into one loop:
1. `_dkdv_col_kernel` (run first): one program per segment of QS queries; it walks the compacted columns older than
   the segment's band in chunks of BN and accumulates their far pairs with the segment's queries; the fp32 partials
   are atomically added into a compact buffer indexed like the column list (several segments share a column, and a
   program per chunk instead would leave a few programs walking all T queries: 36 programs at T=65536, B=1), whose
   used rows `zero_column_rows` zeroes first.
2. `_dkdv_band_kernel`: per key block `[n0, n0 + BN)`, starting from the column partial of its keys, the near pairs
   over queries `[n0, n0 + BN + W)`; the sum is written in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hlsa.ops.triton.rows import load_query_rows, query_rows, rows_descriptor, use_tma
from hlsa.ops.triton.tiles import precision, tile_config

LOG2E = 1.4426950408889634


@triton.jit
def n_columns_before(ccount, i_bk, j, T):
    """How many columns of (b, kv head) `i_bk` sit at positions `< j` (j clamped to [0, T]); shared with the forward
    and dq kernels."""
    return tl.load(ccount + i_bk.to(tl.int64) * (T + 1) + tl.minimum(tl.maximum(j, 0), T))


@triton.jit
def _dkdv_step(b_dk, b_dv, b_k, b_v, b_q, b_do, lse, delta, p_lse, m_row, vis, scale,
               APPLY_MASK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Transposed tile `[BN keys, BM query rows]`: dv += p^T do, dk += ds^T q (ds w.r.t. natural logits). Rows
    outside `m_row` get lse = +inf, so p = 0 there even without a mask."""
    b_lse = tl.load(lse + p_lse, mask=m_row, other=float("inf"))
    b_delta = tl.load(delta + p_lse, mask=m_row, other=0.0)
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale - b_lse[None, :])
    if APPLY_MASK:
        b_pt = tl.where(vis, b_pt, 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def _query_tile(q, do, q_desc, do_desc, i_b, i_hk, g0, m0, T, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                BD: tl.constexpr, BM: tl.constexpr, HP: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """q and do of the tile's rows (`query_rows`), with the rows' positions, mask and `[B, HQ, T]` offsets."""
    o_m, m_row, p_row, p_lse = query_rows(i_b, i_hk, g0, m0, T, HQ, G, D, BM, HP)
    b_q = load_query_rows(q, q_desc, p_row, m_row, i_b, i_hk * G + g0, m0, T, D, BD, TMA)
    b_do = load_query_rows(do, do_desc, p_row, m_row, i_b, i_hk * G + g0, m0, T, D, BD, TMA)
    return b_q, b_do, o_m, m_row, p_lse


@triton.jit
def _dkdv_band_tile(b_dk, b_dv, b_k, b_v, o_n, m_key, q, do, q_desc, do_desc, lse, delta, i_b, i_hk, g0, m0,
                    T, W, scale, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                    BM: tl.constexpr, HP: tl.constexpr, EDGE: tl.constexpr, USE_KM: tl.constexpr,
                    PREC: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """Near pairs of the key block `o_n` with the query tile at (`g0`, `m0`); an interior tile (EDGE False, every
    position of the tile sees every key of the block) tests only the key mask."""
    b_q, b_do, o_m, m_row, p_lse = _query_tile(q, do, q_desc, do_desc, i_b, i_hk, g0, m0, T, HQ, G, D, BD, BM, HP, TMA)
    if EDGE:
        vis = (o_n[:, None] <= o_m[None, :]) & (o_m[None, :] - o_n[:, None] <= W) & m_key[:, None] & m_row[None, :]
        return _dkdv_step(b_dk, b_dv, b_k, b_v, b_q, b_do, lse, delta, p_lse, m_row, vis, scale, True, PREC)
    else:
        vis = m_key[:, None]
        return _dkdv_step(b_dk, b_dv, b_k, b_v, b_q, b_do, lse, delta, p_lse, m_row, vis, scale, USE_KM, PREC)


@triton.jit
def _dkdv_col_kernel(
    q, k, v, do, lse, delta, ce, cols, ccount, dk_col, dv_col, scale, T, W, q_desc, do_desc,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HP: tl.constexpr, QS: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64 (sparse_attention.py's legend)
    i_s, i_bk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    G: tl.constexpr = HQ // HKV
    BMQ: tl.constexpr = BM // HP  # positions per query tile
    s_lo = i_s * QS
    s_hi = tl.minimum(s_lo + QS, T)
    # Only columns older than this segment's band reach it: j + W < i < s_hi.
    n_col = n_columns_before(ccount, i_bk, s_hi - 1 - W, T)
    o_d = tl.arange(0, BD)
    for c0 in range(0, n_col, BN):
        o_c = c0 + tl.arange(0, BN)
        m_c = o_c < n_col
        b_pos = tl.load(cols + i_bk.to(tl.int64) * T + o_c, mask=m_c, other=0)
        b_ce = tl.load(ce + (i_b.to(tl.int64) * T + b_pos) * HKV + i_hk, mask=m_c, other=0)
        m_kd = m_c[:, None] & (o_d < D)[None, :]
        p_kv = (i_b.to(tl.int64) * T * HKV + i_hk) * D + b_pos[:, None] * (HKV * D) + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_kd, other=0.0)
        b_v = tl.load(v + p_kv, mask=m_kd, other=0.0)
        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)
        # Positions are sorted, so the chunk's first column has the earliest far query.
        q_lo = tl.maximum(tl.min(tl.where(m_c, b_pos, T)) + W + 1, s_lo)
        q_hi = tl.minimum(tl.max(b_ce), s_hi)
        for g0 in range(0, G, HP):
            for m0 in range(q_lo, q_hi, BMQ):
                b_q, b_do, o_m, m_row, p_lse = _query_tile(
                    q, do, q_desc, do_desc, i_b, i_hk, g0, m0, T, HQ, G, D, BD, BM, HP, TMA
                )
                m_row = m_row & (o_m < q_hi)
                vis = (o_m[None, :] - b_pos[:, None] > W) & (o_m[None, :] < b_ce[:, None]) & m_row[None, :]
                b_dk, b_dv = _dkdv_step(
                    b_dk, b_dv, b_k, b_v, b_q, b_do, lse, delta, p_lse, m_row, vis, scale, True, PREC
                )
        # Several query segments add into the same column rows.
        p_out = i_bk.to(tl.int64) * T * D + o_c[:, None] * D + o_d[None, :]
        if q_lo < q_hi:
            tl.atomic_add(dk_col + p_out, b_dk, mask=m_kd, sem="relaxed")
            tl.atomic_add(dv_col + p_out, b_dv, mask=m_kd, sem="relaxed")


@triton.jit
def _dkdv_band_kernel(
    q, k, v, do, dk, dv, lse, delta, km, ccount, dk_col, dv_col, scale, T, W, q_desc, do_desc,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HP: tl.constexpr, USE_COLS: tl.constexpr, USE_KM: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64 (sparse_attention.py's legend)
    i_n, i_bk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    G: tl.constexpr = HQ // HKV
    BMQ: tl.constexpr = BM // HP  # positions per query tile
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < T
    o_d = tl.arange(0, BD)
    m_kd = m_n[:, None] & (o_d < D)[None, :]
    # A 64-bit offset for the (b, kv head) slab, 32-bit offsets in it: the `[BN, BD]` offset tile lives until the
    # final store, and int64 would hold twice the registers.
    slab = (i_b.to(tl.int64) * T * HKV + i_hk) * D
    p_kv = o_n[:, None] * (HKV * D) + o_d[None, :]
    b_k = tl.load(k + slab + p_kv, mask=m_kd, other=0.0)
    b_v = tl.load(v + slab + p_kv, mask=m_kd, other=0.0)
    m_key = m_n
    if USE_KM:
        m_key = m_key & tl.load(km + i_b.to(tl.int64) * T + o_n, mask=m_n, other=0).to(tl.int1)
    if USE_COLS:
        # Keys that are columns start from their far-pair partial (the column kernel ran first), stored at their
        # index in the column list. Read here, where little else is live: added after the loops, the partial tiles
        # and their offsets made the kernel spill registers.
        p_cnt = ccount + i_bk.to(tl.int64) * (T + 1) + o_n
        b_idx = tl.load(p_cnt, mask=m_n, other=0)
        is_col = (tl.load(p_cnt + 1, mask=m_n, other=0) > b_idx) & m_n
        p_part = b_idx[:, None] * D + o_d[None, :]
        m_part = is_col[:, None] & (o_d < D)[None, :]
        b_dk = tl.load(dk_col + i_bk.to(tl.int64) * T * D + p_part, mask=m_part, other=0.0)
        b_dv = tl.load(dv_col + i_bk.to(tl.int64) * T * D + p_part, mask=m_part, other=0.0)
    else:
        b_dk = tl.zeros([BN, BD], dtype=tl.float32)
        b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    # Query tiles at positions [m0, m0 + BMQ) over [start, q_hi): the interior ones [lo, hi) see every key of the
    # block (m0 >= n0 + BN - 1, m0 + BMQ - 1 <= n0 + W, all positions < T) and test at most the key mask.
    start, q_hi = (n0 // BMQ) * BMQ, tl.minimum(n0 + BN + W, T)
    lo = tl.minimum(tl.cdiv(n0 + BN - 1, BMQ) * BMQ, q_hi)
    hi = lo + tl.maximum(tl.minimum(n0 + W + 1, T) - lo, 0) // BMQ * BMQ
    if n0 + BN > T:
        hi = lo  # the last key block has keys past T: no interior tiles
    for g0 in range(0, G, HP):
        for m0 in range(start, lo, BMQ):
            b_dk, b_dv = _dkdv_band_tile(
                b_dk, b_dv, b_k, b_v, o_n, m_key, q, do, q_desc, do_desc, lse, delta, i_b, i_hk, g0, m0,
                T, W, scale, HQ, G, D, BD, BM, HP, True, USE_KM, PREC, TMA,
            )  # fmt: skip
        for m0 in range(lo, hi, BMQ):
            b_dk, b_dv = _dkdv_band_tile(
                b_dk, b_dv, b_k, b_v, o_n, m_key, q, do, q_desc, do_desc, lse, delta, i_b, i_hk, g0, m0,
                T, W, scale, HQ, G, D, BD, BM, HP, False, USE_KM, PREC, TMA,
            )  # fmt: skip
        for m0 in range(hi, q_hi, BMQ):
            b_dk, b_dv = _dkdv_band_tile(
                b_dk, b_dv, b_k, b_v, o_n, m_key, q, do, q_desc, do_desc, lse, delta, i_b, i_hk, g0, m0,
                T, W, scale, HQ, G, D, BD, BM, HP, True, USE_KM, PREC, TMA,
            )  # fmt: skip
    # ds was taken w.r.t. natural logits; dk = scale * ds^T q (column partials are stored unscaled too).
    b_dk = b_dk * (scale / 1.4426950408889634)
    tl.store(dk + slab + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_kd)
    tl.store(dv + slab + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_kd)


@triton.jit
def _zero_column_rows_kernel(dk_col, dv_col, ccount, T, D: tl.constexpr, BD: tl.constexpr, ROWS: tl.constexpr):
    i_r, i_bk = tl.program_id(0), tl.program_id(1)
    r0 = i_r * ROWS
    n_col = n_columns_before(ccount, i_bk, T, T)
    if r0 < n_col:  # blocks past the column count have nothing to do
        o_r = r0 + tl.arange(0, ROWS)
        o_d = tl.arange(0, BD)
        m = (o_r < n_col)[:, None] & (o_d < D)[None, :]
        p = i_bk.to(tl.int64) * T * D + o_r[:, None] * D + o_d[None, :]
        zero = tl.zeros([ROWS, BD], dtype=tl.float32)
        tl.store(dk_col + p, zero, mask=m)
        tl.store(dv_col + p, zero, mask=m)


def zero_column_rows(dk_col: torch.Tensor, dv_col: torch.Tensor, ccount: torch.Tensor) -> None:
    """Zero rows `[0, n_col)` of each (b, kv head) `bk` of the column partials `[B*HKV, T, D]` fp32, where n_col =
    `ccount[bk, T]` is read on the device; rows past it, which nothing reads, are left as they are.

    The buffers are sized for every key being a column, but on the benchmark pattern about 1/8 of the rows are used:
    a memset of both wrote 134 MB per backward at B*T = 65536, HKV = 4, D = 64 (~1.5% of forward + backward)."""
    BHKV, T, D = dk_col.shape
    ROWS = 32
    _zero_column_rows_kernel[(triton.cdiv(T, ROWS), BHKV)](
        dk_col, dv_col, ccount, T, D=D, BD=triton.next_power_of_2(D), ROWS=ROWS
    )


def query_segment(T: int, n_heads: int, BM: int) -> int:
    """Queries per program of the column kernel: about 512 programs in all, 1024 queries at most, a BM multiple."""
    per = triton.cdiv(T * n_heads, 512)
    return min(max(triton.cdiv(per, BM) * BM, BM), max(1024, BM))


def dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    ce: torch.Tensor,
    km: torch.Tensor,
    cols: torch.Tensor,
    ccount: torch.Tensor,
    window_eff: int,
    scale: float,
    use_cols: bool,
    *,
    config: tuple,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv `[B, T, HKV, D]` from q, do `[B, T, HQ, D]`, lse, delta `[B, HQ, T]` fp32 and the column prologue.

    `km is q` means no key mask and `use_cols=False` means no columns (placeholders are never read).
    `config` = (BM, BN, num_warps, num_stages[, packed[, maxnreg]]) (`tile_config`).
    """
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    if T * HKV * D >= 2**31:  # the band kernel's offsets within one sequence's K and V are 32-bit
        raise ValueError(f"sparse attention backward: T * HKV * D = {T * HKV * D} must be below 2**31 per sequence")
    tiles = tile_config(config)
    BN = tiles.BN
    HP = triton.next_power_of_2(HQ // HKV) if tiles.flag else 1  # query heads per tile (packed tiles)
    BM = max(tiles.BM, HP)
    BD = triton.next_power_of_2(D)
    prec = precision(q.dtype)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    tma = HP == 1 and use_tma(q, do)  # a TMA block holds consecutive positions of one head
    descs = (rows_descriptor(q, BM), rows_descriptor(do, BM)) if tma else (None, None)
    if use_cols:
        # Sized for the worst case (every key a column) so that no host sync reads the count; only the rows of
        # the columns are zeroed (and used).
        dk_col = torch.empty(B * HKV, T, D, device=q.device, dtype=torch.float32)
        dv_col = torch.empty_like(dk_col)
        zero_column_rows(dk_col, dv_col, ccount)
        QS = query_segment(T, B * HKV, BM)
        _dkdv_col_kernel[(triton.cdiv(T, QS), B * HKV)](
            q, k, v, do, lse, delta, ce, cols, ccount, dk_col, dv_col, scale * LOG2E, T, window_eff, *descs,
            HQ=HQ, HKV=HKV, D=D, BD=BD, BM=BM, BN=BN, HP=HP, QS=QS, PREC=prec, TMA=tma,
            **tiles.launch_options(),
        )  # fmt: skip
    else:
        dk_col = dv_col = lse  # placeholders, never read
    _dkdv_band_kernel[(triton.cdiv(T, BN), B * HKV)](
        q, k, v, do, dk, dv, lse, delta, km, ccount, dk_col, dv_col, scale * LOG2E, T, window_eff, *descs,
        HQ=HQ, HKV=HKV, D=D, BD=BD, BM=BM, BN=BN, HP=HP, USE_COLS=use_cols, USE_KM=km is not q, PREC=prec, TMA=tma,
        **tiles.launch_options(),
    )  # fmt: skip
    return dk, dv
