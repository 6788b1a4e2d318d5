"""Split-K weight-streaming GEMM for a few rows: `x [M, K] @ w[N, K]^T` with M <= 64 (decode).

At decode the rows are the batch (one token each): a layer's GEMMs read megabytes of weights to multiply a few
dozen rows. cuBLAS's kernels for the 0.4B models' projections at batch 64 read the weights at 11-45% of the H200's
copy bandwidth (`benchmarks/results/linear-h200.json`, docs/efficiency.md); the smaller the weight, the further
below. Here every program streams its own `BN x (K / S)` slab of the weight: `ceil(N / BN) * S` programs cover the
GPU even for N = 1024.

The dot is computed swapped, `w_tile @ x_tile^T` (`[BN, BM]`), so that the weight tile is the MMA's wide side and
M can be as small as 16. Split `s` writes its partial sum to `partials[s]` in fp32; the caller sums them (under
torch.compile that sum fuses into the elementwise kernel that follows the GEMM: a norm, an activation, a residual
add). With one split the kernel writes the output in the input dtype directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hlsa.ops.triton import interpreted


@triton.jit
def linear_partials_kernel(x, w, out, M, N, K, stride_xm, stride_wn, stride_os, k_split,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    i_n, i_s, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_n = i_n * BN + tl.arange(0, BN)
    o_m = i_m * BM + tl.arange(0, BM)
    m_n, m_m = o_n < N, o_m < M
    p_w = w + o_n[:, None].to(tl.int64) * stride_wn
    p_x = x + o_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    k_lo = i_s * k_split  # k_split is a multiple of BK: splits never share a K block
    for k in range(k_lo, tl.minimum(k_lo + k_split, K), BK):
        o_k = k + tl.arange(0, BK)
        m_k = o_k < K
        b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = tl.load(p_x + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        acc = tl.dot(b_w, tl.trans(b_x), acc)
    p_out = out + i_s.to(tl.int64) * stride_os + o_m[None, :].to(tl.int64) * N + o_n[:, None]
    tl.store(p_out, acc.to(out.dtype.element_ty), mask=m_n[:, None] & m_m[None, :])


class Tiles(NamedTuple):
    """One launch configuration: tile sizes, splits of K, warps and pipeline stages."""

    BN: int
    BK: int
    splits: int
    num_warps: int = 4
    num_stages: int = 4


def pick_tiles(N: int, K: int, sms: int) -> Tiles:
    """Tiles for `[M, K] x [N, K]^T` (any M <= 64: the time goes to the weight): weight tiles of 64 rows, K split
    until the programs fill every SM once; an N wide enough for two waves of 64-row tiles (the LM head) takes 128-row
    tiles, unsplit.

    Chosen from `benchmarks/linear.py --sweep` on the H200 at the 0.4B shapes (benchmarks/results/linear-h200.json):
    within 2% of the best configuration swept at batch 64, within 7% at batches 1 and 16."""
    if interpreted():
        return Tiles(BN=32, BK=32, splits=2 if K > 32 else 1, num_warps=1, num_stages=1)
    if triton.cdiv(N, 64) >= 2 * sms:
        return Tiles(BN=128, BK=64, splits=1, num_warps=8, num_stages=3)
    BN, BK = 64, 128
    splits = max(1, min(triton.cdiv(K, BK), sms // triton.cdiv(N, BN)))
    return Tiles(BN=BN, BK=BK, splits=splits)


def linear_partials_triton(x: torch.Tensor, w: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """`x [M, K]` (unit stride in K) times `w [N, K]^T` (contiguous): `[M, N]` in x's dtype with one split, else
    fp32 partial sums `[S, M, N]` (inputs already validated). `tiles`: a fixed configuration (benchmarks)."""
    M, K = x.shape
    N = w.shape[0]
    if tiles is None:
        sms = 1 if interpreted() else torch.cuda.get_device_properties(x.device).multi_processor_count
        tiles = pick_tiles(N, K, sms)
    k_split = triton.cdiv(triton.cdiv(K, tiles.splits), tiles.BK) * tiles.BK
    splits = triton.cdiv(K, k_split)  # a split with no K left would only write zeros
    if splits == 1:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    else:
        out = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    BM = max(16, triton.next_power_of_2(M))
    linear_partials_kernel[(triton.cdiv(N, tiles.BN), splits, triton.cdiv(M, BM))](
        x, w, out, M, N, K, x.stride(0), w.stride(0), M * N, k_split, BM=BM, BN=tiles.BN, BK=tiles.BK,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out
