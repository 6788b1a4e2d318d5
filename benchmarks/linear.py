"""Decode GEMMs on one GPU: `hlsa.ops.linear`'s split-K Triton kernel against cuBLAS (`F.linear`).

The shapes are the 0.4B models' projections at decode (one token per sequence, so M = batch). Each point is a CUDA
graph that runs the GEMM over enough weight copies to exceed the L2 cache, so the weights stream from HBM as in a
real step; the time is per GEMM. Bandwidth counts the weight bytes (the activations are a few hundred KB). The
Triton time is the kernel alone: in the model, torch.compile folds the sum of its K-split partials into the
elementwise kernel that follows every projection (`sum_us` is that sum as a separate kernel, for reference).
`--sweep` also times a grid of tile configurations per shape and reports the best.

    python3 benchmarks/linear.py [--out DIR] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import traceback

import torch
import torch.nn.functional as F

from benchlib import add_output_args, copy_bandwidth, machine, result_path, time_graph, write_result
from hlsa.ops.linear import linear
from hlsa.ops.triton.linear import Tiles, linear_partials_triton, pick_tiles

DTYPE = torch.bfloat16
L2_ROTATE_BYTES = 256 * 2**20
# (name, N, K) of the 0.4B configs (hidden 1024, MLP 2816): GDN's fused input projection (q, k, v, gate, a, b),
# the attention layers' q|k|v, the MLP's gate|up and down, an output projection, the tied LM head.
SHAPES = (
    ("gdn_in", 4112, 1024),
    ("qkv", 3072, 1024),
    ("o_proj", 1024, 1024),
    ("mlp_gate_up", 5632, 1024),
    ("mlp_down", 1024, 2816),
    ("lm_head", 32000, 1024),
)
BATCHES = (1, 16, 64)


def _weights(N: int, K: int) -> list[torch.Tensor]:
    copies = max(2, -(-L2_ROTATE_BYTES // (N * K * 2)))
    return [torch.randn(N, K, device="cuda", dtype=DTYPE) * K**-0.5 for _ in range(copies)]


def sweep_tiles(N: int, K: int) -> list[Tiles]:
    blocks = [(bn, bk) for bn, bk in itertools.product((32, 64, 128), (64, 128, 256))]
    out = []
    for (BN, BK), splits, stages in itertools.product(blocks, (1, 2, 4, 8, 16), (3, 4)):
        if splits <= -(-K // BK) and -(-N // BN) * splits <= 4096:
            out.append(Tiles(BN=BN, BK=BK, splits=splits, num_warps=8 if BN == 128 else 4, num_stages=stages))
    return out


def bench_shape(name: str, M: int, N: int, K: int, sweep: bool) -> dict:
    weights = _weights(N, K)
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    ref = F.linear(x, weights[0]).float()
    got = linear(x, weights[0], backend="triton").float()  # auto would take F.linear here: an eager call
    err = ((got - ref).norm() / ref.norm()).item()
    cublas = time_graph([lambda w=w: F.linear(x, w) for w in weights])
    tiles = pick_tiles(N, K, torch.cuda.get_device_properties(0).multi_processor_count)
    ours = time_graph([lambda w=w: linear_partials_triton(x, w, tiles) for w in weights])
    partials = linear_partials_triton(x, weights[0], tiles)
    sum_us = time_graph([lambda: partials.sum(0).to(DTYPE)]) if partials.dim() == 3 else 0.0
    row = {"shape": name, "M": M, "N": N, "K": K, "rel_err": err, "cublas_us": cublas, "triton_us": ours,
           "sum_us": sum_us, "tiles": tiles._asdict(), "weight_mb": N * K * 2 / 1e6,
           "cublas_gbs": N * K * 2 / cublas / 1e3, "triton_gbs": N * K * 2 / ours / 1e3}  # fmt: skip
    if sweep:
        timed = []
        for t in sweep_tiles(N, K):
            try:
                timed.append((time_graph([lambda w=w, t=t: linear_partials_triton(x, w, t) for w in weights], 3), t))
            except Exception as failure:  # noqa: BLE001  (a config that does not fit shared memory is skipped)
                print(f"  {t}: {type(failure).__name__}")
        timed.sort(key=lambda pair: pair[0])
        row["sweep_best"] = [{"us": us, **t._asdict()} for us, t in timed[:5]]
    print(
        f"{name:12s} M={M:3d} N={N:6d} K={K:5d}: cuBLAS {cublas:6.2f} us ({row['cublas_gbs']:5.0f} GB/s), "
        f"Triton {ours:6.2f} us ({row['triton_gbs']:5.0f} GB/s) {tiles}, sum {sum_us:.2f} us, err {err:.1e}"
        + (f"; best {row['sweep_best'][0]}" if sweep and row["sweep_best"] else "")
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile configurations per shape")
    args = parser.parse_args()
    path = result_path("linear", args.out)
    result = {"machine": machine(args.commit), "dtype": str(DTYPE), "copy": copy_bandwidth(), "rows": []}
    print("machine:", result["machine"], "copy GB/s:", result["copy"])
    for (name, N, K), M in itertools.product(SHAPES, BATCHES):
        try:
            result["rows"].append(bench_shape(name, M, N, K, args.sweep))
        except Exception:  # one shape's failure keeps the others' numbers; the traceback goes into the JSON
            result["rows"].append({"shape": name, "M": M, "error": traceback.format_exc()})
            print(result["rows"][-1]["error"])
        write_result(path, result)


if __name__ == "__main__":
    main()
