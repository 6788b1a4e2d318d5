"""Triton decode attention (flash-decoding) for `hlsa.ops.decode_attention`.

One program per (b, kv-head, split) loads the `G` query heads of its kv-head as one `[BG, D]` tile, so each key
and value is read from memory once for the whole group, and runs an online softmax over its range of slots. When
`B * HKV` programs cannot fill the GPU, the slots are split across programs (flash-decoding) and a second small
kernel merges the partial `(max, sum, acc)` triples. Nothing reads tensor values on the host, so a call can be
captured in a CUDA graph.

With `return_weights` (the eviction policies that score from attention weights), the first kernel also writes every
slot's logit and the last kernel each query's log-sum-exp, and a small torch pass turns them into the softmax
weights: it reads `[B, HQ, S]` floats, not the K/V cache.

Legend: `B` batch, `HQ` query heads, `HKV` kv-heads, `G = HQ // HKV`, `S` slots, `D` head dim, `NS` splits.
Scores are kept in the log2 domain (`qk_scale = scale * log2(e)`) so the kernel can use `exp2`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hlsa.ops.triton import interpreted

# Shared memory a program may plan on (Hopper: 228 KB per SM). The K and V tiles of every pipeline stage live there,
# so it bounds how many programs are resident per SM, which sets the size of one "wave" of programs.
SMEM_PER_SM = 220 * 1024
# Under the interpreter a fixed small split count keeps the split path (and its uneven last split) tested on CPU.
INTERPRET_SPLITS = 3
LOG2E = 1.4426950408889634


# Lengths vary per call; specialising on them (divisibility by 16) would only multiply compilations.
@triton.jit(do_not_specialize=["S", "blocks_per_split", "NS"])
def decode_attention_fwd_kernel(
    q,
    k,
    v,
    valid,
    o,
    m_part,
    l_part,
    acc_part,
    s_out,
    lse_out,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ab,
    stride_ah,
    stride_ob,
    stride_oh,
    qk_scale,
    S,
    blocks_per_split,
    NS,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BG: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    WEIGHTS: tl.constexpr,
):
    i_bh, i_split = tl.program_id(0), tl.program_id(1)
    # torch.compile (Inductor) passes Python floats as fp64 scalars; fp32 keeps the loop-carried softmax state fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    # int64 batch index: a cache of 2^31 elements or more (e.g. B=128, HKV=16, S=16K, D=128) overflows int32 offsets.
    i_b, i_h = (i_bh // HKV).to(tl.int64), i_bh % HKV
    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, BD)
    o_s = tl.arange(0, BS)
    m_g = o_g < G
    m_d = o_d < D

    p_q = q + i_b * stride_qb + (i_h * G + o_g[:, None]) * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0)  # [BG, BD]
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_a = valid + i_b * stride_ab + i_h * stride_ah

    s_start = i_split * blocks_per_split * BS
    s_end = tl.minimum(s_start + blocks_per_split * BS, S)
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    for i_s in range(s_start, s_end, BS):
        o_ss = i_s + o_s
        b_valid = tl.load(p_a + o_ss, mask=o_ss < s_end, other=0) != 0  # [BS]
        # Invalid slots are never fetched: the masked rows cost no memory traffic.
        m_kv = b_valid[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_ss[:, None] * stride_ks + o_d[None, :], mask=m_kv, other=0.0)  # [BS, BD]
        b_v = tl.load(p_v + o_ss[:, None] * stride_vs + o_d[None, :], mask=m_kv, other=0.0)  # [BS, BD]
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_s = tl.where(b_valid[None, :], b_s * qk_scale, float("-inf"))  # [BG, BS]
        if WEIGHTS:  # logits [B * HQ, S] in the log2 domain, -inf on invalid slots
            p_s = s_out + (i_bh * G + o_g[:, None]).to(tl.int64) * S + o_ss[None, :]
            tl.store(p_s, b_s, mask=m_g[:, None] & (o_ss < s_end)[None, :])
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A row with no valid slot so far keeps max -inf; shifting by 0 instead avoids inf - inf = nan.
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp2(b_s - b_shift[:, None])
        b_alpha = tl.exp2(b_m - b_shift)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if IEEE:
            b_pv = tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
        else:
            b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_m_new

    if IS_SPLIT:
        # Partials are [B * HQ, NS] (m, l) and [B * HQ, NS, D] (acc), fp32 and contiguous.
        o_row = (i_bh * G + o_g) * NS + i_split  # [BG]
        tl.store(m_part + o_row, b_m, mask=m_g)
        tl.store(l_part + o_row, b_l, mask=m_g)
        tl.store(acc_part + o_row[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])
    else:
        if WEIGHTS:  # log2-sum-exp2 per query head; l >= 1 with a valid slot (its max adds 1), else m = -inf
            tl.store(lse_out + i_bh * G + o_g, b_m + tl.log2(tl.maximum(b_l, 1.0)), mask=m_g)
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # no valid slot: acc is 0, so is the output
        p_o = o + i_b * stride_ob + (i_h * G + o_g[:, None]) * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_g[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["NS"])
def decode_attention_combine_kernel(
    m_part,
    l_part,
    acc_part,
    o,
    lse_out,
    stride_ob,
    stride_oh,
    NS,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BNS: tl.constexpr,
    BD: tl.constexpr,
    WEIGHTS: tl.constexpr,
):
    i_bq = tl.program_id(0)
    i_b, i_q = (i_bq // HQ).to(tl.int64), i_bq % HQ
    o_n = tl.arange(0, BNS)
    o_d = tl.arange(0, BD)
    m_n = o_n < NS
    m_d = o_d < D
    b_m = tl.load(m_part + i_bq * NS + o_n, mask=m_n, other=float("-inf"))  # [BNS]
    b_l = tl.load(l_part + i_bq * NS + o_n, mask=m_n, other=0.0)
    p_acc = acc_part + (i_bq * NS + o_n[:, None]) * D + o_d[None, :]
    b_acc = tl.load(p_acc, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BNS, BD]
    b_max = tl.max(b_m, 0)
    b_w = tl.exp2(b_m - tl.where(b_max == float("-inf"), 0.0, b_max))  # empty splits weigh 0
    b_l_all = tl.sum(b_w * b_l, 0)
    b_o = tl.sum(b_w[:, None] * b_acc, 0) / tl.where(b_l_all > 0, b_l_all, 1.0)
    if WEIGHTS:
        tl.store(lse_out + i_bq, b_max + tl.log2(tl.maximum(b_l_all, 1.0)))  # as in the unsplit kernel
    tl.store(o + i_b * stride_ob + i_q * stride_oh + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


def _pick_num_splits(n_programs: int, n_blocks: int, resident: int) -> int:
    """Splits per (b, kv-head) for `n_programs = B * HKV` programs of `n_blocks` blocks, `resident` at a time.

    Programs that fill every resident place stream at the bandwidth unsplit: splitting only adds partials and a
    combine launch (measured on the H200, LTE cache at D=64: B=64, HKV=16 with (32, 2, 4) tiles, 85.8 us unsplit,
    92.0 in 3 splits, which the cost model below picks; B=128, HKV=4 with (128, 4, 2), 47.1 unsplit, 51.7 in the
    model's 2). Otherwise, a cost model in block iterations: waves x
    blocks per program, plus one for the combine launch, over the powers of two up to the first that fills 4 waves.
    Powers of two because a sweep on the H200 timed 3 splits, which the model then picked for 256 programs on 396
    places, slower than 2 and 4 in every case (Transformer cache B=16, HKV=16, S=64K: 1,107 us against 963 and 962;
    LTE caches B=16 / HKV=16 and B=64 / HKV=4: 30.0 and 31.0 us against 28.4-29.4).
    H200 sweep (B=64, HKV=4, LTE cache): 256 programs on 264 places run best unsplit, where splitting in 2 doubles the
    waves (27 -> 33 us at D=64).
    """
    if n_programs >= resident:
        return 1
    candidates, ns = {1}, 1
    while ns < n_blocks and n_programs * ns < 4 * resident:
        ns *= 2
        candidates.add(min(ns, n_blocks))

    def cost(ns: int) -> int:
        return math.ceil(n_programs * ns / resident) * math.ceil(n_blocks / ns) + (ns > 1)

    return min(sorted(candidates), key=cost)


def _resident(config: tuple[int, int, int], D: int, itemsize: int, sms: int) -> int:
    """Programs of `config = (BS, num_warps, num_stages)` resident at once: shared memory holds the K and V tiles of
    every stage."""
    BS, _, num_stages = config
    return max(1, SMEM_PER_SM // (num_stages * 2 * BS * D * itemsize)) * sms


def _pick_config(D: int, dtype: torch.dtype, n_programs: int, sms: int) -> tuple[int, int, int]:
    """(BS, num_warps, num_stages) for `n_programs = B * HKV` programs on `sms` multiprocessors: one fixed config
    per case (autotune cannot run under the interpreter or in a capture).

    32 KB of K+V per stage was best or within noise of the best on the H200 sweeps
    (benchmarks/results/decode-h200.json, "sweep"). At D=128, 3 stages (e.g. B=64, HKV=16: 165 us against 179 with
    2); at D=64 (BS=128), 2 stages on all three batch-64 caches swept (B=64, HKV=16, S=1285, the GDN+LTE 0.4B step:
    86.5 us, 92% of copy bandwidth, against 92.5 with 3). When 16-bit
    programs at D <= 64 fill every place of four 8 KB stages of 2 warps (six per multiprocessor), those do better,
    unsplit: on the 0.4B step's cache 85.8 us against 87.6 (92% of the 4.2 TB/s read bandwidth measured in the same
    run), 55.4 against 57.8 for an SWA ring of 769 slots, 164.9 against 167.9 at B=128;
    in the compiled step 90.3 us per layer against 92.5.
    """
    if interpreted():
        return 16, 1, 1
    narrow = (32, 2, 4)
    if dtype != torch.float32 and D <= 64 and n_programs >= _resident(narrow, D, dtype.itemsize, sms):
        return narrow
    BS = min(128, max(16, 16384 // (D * dtype.itemsize)))
    return (BS, 4, 2) if dtype == torch.float32 or D <= 64 else (BS, 4, 3)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    valid: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: tuple[int, int, int] | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the decode kernels; inputs are validated by `hlsa.ops.decode_attention.decode_attention`.

    Args:
        q: `[B, HQ, D]`; k_cache, v_cache: `[B, HKV, S, D]`; valid: bool `[B, HKV, S]`; scale: softmax scale.
        num_splits: slot splits per (b, kv-head), or None for the occupancy heuristic (tests force 1 or more).
        config: `(BS, num_warps, num_stages)` or None for the fixed per-dtype config (benchmarks sweep it).
        return_weights: also return the softmax weights, float32 `[B, HKV, S]` summed over each kv head's queries.

    Returns:
        `[B, HQ, D]` in the dtype of q; with `return_weights`, the pair (output, weights).
    """
    B, HQ, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HKV
    sms = 1 if interpreted() else torch.cuda.get_device_properties(q.device).multi_processor_count
    BS, num_warps, num_stages = _pick_config(D, q.dtype, B * HKV, sms) if config is None else config
    n_blocks = max(1, triton.cdiv(S, BS))
    if num_splits is None and interpreted():
        num_splits = INTERPRET_SPLITS
    if num_splits is None:
        resident = _resident((BS, num_warps, num_stages), D, q.element_size(), sms)
        num_splits = _pick_num_splits(B * HKV, n_blocks, resident)
    # Recompute the split count from the blocks per split so that no split is empty.
    blocks_per_split = triton.cdiv(n_blocks, min(num_splits, n_blocks))
    NS = triton.cdiv(n_blocks, blocks_per_split)

    # Unit stride along D lets the kernel address rows with plain offsets; caches built by the layers already are.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    valid = valid if valid.stride(-1) == 1 else valid.contiguous()
    o = torch.empty(B, HQ, D, device=q.device, dtype=q.dtype)
    if NS > 1:
        m_part = torch.empty(B * HQ, NS, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(B * HQ, NS, D, device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = o  # unused by the no-split specialisation
    if return_weights:
        s_out = torch.empty(B * HQ, S, device=q.device, dtype=torch.float32)
        lse_out = torch.empty(B * HQ, device=q.device, dtype=torch.float32)
    else:
        s_out = lse_out = o  # unused without weights
    BD = triton.next_power_of_2(D)
    decode_attention_fwd_kernel[(B * HKV, NS)](
        q,
        k_cache,
        v_cache,
        valid,
        o,
        m_part,
        l_part,
        acc_part,
        s_out,
        lse_out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        valid.stride(0),
        valid.stride(1),
        o.stride(0),
        o.stride(1),
        qk_scale=scale * LOG2E,
        S=S,
        blocks_per_split=blocks_per_split,
        NS=NS,
        HKV=HKV,
        G=G,
        D=D,
        BG=max(16, triton.next_power_of_2(G)),  # tl.dot needs at least 16 rows
        BS=BS,
        BD=BD,
        IS_SPLIT=NS > 1,
        IEEE=q.dtype == torch.float32,
        WEIGHTS=return_weights,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if NS > 1:
        decode_attention_combine_kernel[(B * HQ,)](
            m_part,
            l_part,
            acc_part,
            o,
            lse_out,
            o.stride(0),
            o.stride(1),
            NS=NS,
            HQ=HQ,
            D=D,
            BNS=triton.next_power_of_2(NS),
            BD=BD,
            WEIGHTS=return_weights,
            num_warps=4 if BD >= 128 else 2,
        )
    if not return_weights:
        return o
    # Rows with no valid slot have logits and lse all -inf: exp2 of their nan difference is set to 0.
    weights = torch.exp2(s_out - lse_out[:, None]).nan_to_num(0.0)
    return o, weights.view(B, HKV, G, S).sum(2)
