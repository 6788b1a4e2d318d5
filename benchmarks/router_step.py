"""The LTE router's decode step on one GPU: `hlsa.ops.router_step`'s kernel against its reference and the floor.

The shape is a GDN+LTE 0.4B LTE layer (16 KV heads, head dim 64, the paper's three (3, 2) convs, a ring of 13
slots, bf16) at batch 1, 16 and 64. The bytes are the CNN's weights, the ring's older taps (read), every conv's
fresh input (written), the new token's k and v, validity and the logits; the floor is those bytes over the copy
bandwidth measured in the same run, though the kernel is latency-bound far above it (docs/efficiency.md). Each
point is a CUDA graph over enough layer copies to exceed the L2 cache, as in a decode step, where the other layers'
traffic evicts the router's weights. The peer is the op's PyTorch reference in the same graph. The
last copy is checked against the reference first (logits and ring); a mismatch stops the run.

`--kernel FILE` times another version of `hlsa/ops/triton/router_step.py` beside this tree's (e.g. one taken with
`git show REV:src/hlsa/ops/triton/router_step.py > /tmp/old.py`), for A/B runs in one process.

    python3 benchmarks/router_step.py [--out DIR] [--kernel /tmp/old.py]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchlib import add_output_args, copy_bandwidth, load_file, machine, result_path, time_graph, write_result
from hlsa.ops.router_step import ring_channels, router_step_logits_ref, step_ring_bytes
from hlsa.ops.triton import router_step as this_kernel

DTYPE = torch.bfloat16
L2_ROTATE_BYTES = 256 * 2**20
HKV, D, RING = 16, 64, 13
CONVS = ((3, 2), (3, 2), (3, 2))
BATCHES = (1, 16, 64)
CHECK_TOLERANCE = 2e-2  # bf16 logits against the fp64 reference


def _layers() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Tap-major weights per head CNN, channels halving from 2D, then the 1 x 1 logit projection."""
    channels, layers = [2 * D // 2**i for i in range(len(CONVS) + 1)], []
    for (k, d), c_in, c_out in zip(CONVS, channels, channels[1:]):
        w = torch.randn(HKV, k, c_in, c_out, device="cuda") / (k * c_in) ** 0.5
        layers.append((w.to(DTYPE), (torch.randn(HKV, c_out, device="cuda") * 0.5).to(DTYPE), d))
    projection = torch.randn(HKV, 1, channels[-1], 1, device="cuda") / channels[-1] ** 0.5
    layers.append((projection.to(DTYPE), torch.randn(HKV, 1, device="cuda").to(DTYPE), 1))
    return layers


def _step(B: int) -> dict:
    """One layer's inputs mid-generation: each head's [k || v] as a strided view of a q|k|v projection (its k|v
    columns interleaved per head, as `hlsa.layers.lte` lays them out), a full valid ring."""
    layers = _layers()
    qkv = torch.randn(B, 3 * HKV * D, device="cuda").to(DTYPE)
    return {
        "kv": qkv[:, HKV * D :].view(B, HKV, 2 * D),
        "x": torch.randn(B, HKV, RING, sum(ring_channels(layers)), device="cuda").to(DTYPE),
        "valid": torch.rand(B, RING, device="cuda") < 0.9,
        "position": torch.tensor(1000, device="cuda"),
        "layers": layers,
    }


def _bytes(step: dict) -> int:
    B, size = step["kv"].shape[0], DTYPE.itemsize
    weights = sum(w.numel() + b.numel() for w, b, _ in step["layers"]) * size
    ring = step_ring_bytes(step["layers"], HKV, size)  # as e2e.py counts it
    return weights + B * (ring + HKV * (2 * D + 1) * size)  # + the new token's k and v, and the logits


def bench_batch(B: int, kernels: dict[str, object], bandwidth: float) -> dict:
    steps = [_step(B) for _ in range(max(2, -(-L2_ROTATE_BYTES // _bytes(_step(B)))))]
    moved = _bytes(steps[0])
    row = {"B": B, "bytes": moved, "floor_us": moved / bandwidth * 1e6}
    last = steps[-1]
    ref_inputs = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in last.items()}
    ref_inputs["layers"] = [(w.double(), b.double(), d) for w, b, d in last["layers"]]
    for name in ("kv", "x"):
        ref_inputs[name] = ref_inputs[name].double()
    want = router_step_logits_ref(**ref_inputs)
    for label, module in kernels.items():
        inputs = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in last.items()}
        got = module.router_step_triton(**inputs)
        err = (got.double() - want).abs().max().item()
        ring_err = (inputs["x"].double() - ref_inputs["x"]).abs().max().item()
        if err > CHECK_TOLERANCE or ring_err > CHECK_TOLERANCE:
            raise SystemExit(f"{label} B={B}: the kernel disagrees with the reference (logits {err}, ring {ring_err})")
        row[f"{label}_us"] = time_graph([lambda s=s, m=module: m.router_step_triton(**s) for s in steps])
        row[f"{label}_err"] = err
    row["reference_us"] = time_graph([lambda s=s: router_step_logits_ref(**s) for s in steps])
    cells = "  ".join(f"{label} {row[f'{label}_us']:6.2f} us" for label in kernels)
    print(f"B={B:3d}  floor {row['floor_us']:5.2f} us  {cells}  reference {row['reference_us']:6.1f} us", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--kernel", type=Path, default=None, help="another version of the kernel file, timed beside")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    kernels = {"kernel": this_kernel}
    if args.kernel is not None:
        kernels["other"] = load_file(args.kernel)
    bandwidth = copy_bandwidth()["peer"] * 1e9
    rows = [bench_batch(B, kernels, bandwidth) for B in BATCHES]
    meta = {"machine": machine(args.commit), "dtype": str(DTYPE), "copy_gbs": bandwidth / 1e9,
            "other_kernel": str(args.kernel), "rows": rows}  # fmt: skip
    path = write_result(result_path("router_step", args.out), meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
