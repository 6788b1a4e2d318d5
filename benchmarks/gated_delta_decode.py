"""The GDN decode op on one GPU: `hlsa.ops.gated_delta_decode`'s two kernels against the bandwidth floor.

They do a GDN layer's decode token up to its output norm (docs/efficiency.md). Their bytes are the fp32
state, read and written (33.5 MB per 0.4B layer at batch 64), plus the projection's partial sums and the conv cache
(4.6 MB more); the floor is those bytes over the copy bandwidth measured in the same run. Each point is a CUDA graph
over enough layer copies to exceed the L2 cache, so the state streams from HBM as in a real step. The last copy is
checked against the reference first (output, state and conv cache); a mismatch stops the run.

    python3 benchmarks/gated_delta_decode.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchlib import add_output_args, copy_bandwidth, machine, result_path, time_graph, write_result
from hlsa.ops.gated_delta import L2NORM_EPS
from hlsa.ops.gated_delta_decode import gated_delta_decode_ref, projection_width
from hlsa.ops.triton.gated_delta_decode import gated_delta_decode_triton

DTYPE = torch.bfloat16
L2_ROTATE_BYTES = 256 * 2**20
# (name, H, K = V) of the GDN layers: 0.4B and 1.4B configs.
SHAPES = (("gdn_0.4B", 8, 128), ("gdn_1.4B", 8, 256))
BATCHES = (1, 16, 64)
SPLITS = 2  # partial sums of the input projection (hlsa.ops.linear's split at batch 64, 0.4B)
CONV = 4
CHECK_TOLERANCE = 1e-2  # relative error of the bf16 output and the fp32 state against the reference


def _layer(B: int, H: int, K: int) -> dict:
    C = 3 * H * K
    return {
        "proj": torch.randn(SPLITS, B, projection_width(H, K, K, True), device="cuda"),
        "conv_state": torch.randn(B, C, CONV - 1, device="cuda", dtype=DTYPE),
        "conv_weight": torch.randn(C, CONV, device="cuda", dtype=DTYPE) * 0.5,
        "A_log": torch.randn(H, device="cuda") * 0.5,
        "dt_bias": torch.randn(H, device="cuda") * 0.5,
        "state": torch.randn(B, H, K, K, device="cuda") * 0.1,
        "gated": True,
        "dtype": DTYPE,
    }


def _bytes(layer: dict) -> int:
    state, proj, conv = layer["state"], layer["proj"], layer["conv_state"]
    out = state.shape[0] * state.shape[1] * state.shape[3] * 2
    return 2 * state.numel() * 4 + proj.numel() * 4 + 2 * conv.numel() * 2 + out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(name: str, B: int, H: int, K: int, bandwidth: float) -> dict:
    layers = [_layer(B, H, K) for _ in range(max(2, -(-L2_ROTATE_BYTES // (B * H * K * K * 4))))]
    moved = _bytes(layers[0])
    check = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in layers[-1].items()}
    got = gated_delta_decode_triton(**layers[-1], l2_eps=L2NORM_EPS)
    want = gated_delta_decode_ref(**check)
    row = {"name": name, "B": B, "H": H, "K": K, "bytes": moved, "floor_us": moved / bandwidth * 1e6}
    row.update(rel_err_out=_rel_err(got, want), rel_err_state=_rel_err(layers[-1]["state"], check["state"]))
    if row["rel_err_out"] > CHECK_TOLERANCE or row["rel_err_state"] > CHECK_TOLERANCE:
        raise SystemExit(f"{name} B={B}: the kernels disagree with the reference: {row}")
    if not torch.equal(layers[-1]["conv_state"], check["conv_state"]):
        raise SystemExit(f"{name} B={B}: the conv cache after the kernels differs from the reference's")
    row["us"] = time_graph(
        [lambda layer=layer: gated_delta_decode_triton(**layer, l2_eps=L2NORM_EPS) for layer in layers]
    )
    row["of_floor"] = row["floor_us"] / row["us"]
    print(
        f"{name:9s} B={B:3d}  floor {row['floor_us']:6.1f} us  kernels {row['us']:6.1f} us ({row['of_floor']:.0%})  "
        f"err {row['rel_err_out']:.1e}/{row['rel_err_state']:.1e}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    bandwidth = copy_bandwidth()["peer"] * 1e9
    rows = [bench_shape(name, B, H, K, bandwidth) for (name, H, K), B in itertools.product(SHAPES, BATCHES)]
    result = {"machine": machine(args.commit), "dtype": str(DTYPE), "copy_gbs": bandwidth / 1e9, "rows": rows}
    path = write_result(result_path("gated_delta_decode", args.out), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
