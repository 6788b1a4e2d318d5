"""Decode-time ops on one GPU: decode attention (LTE, SWA and full caches) and the fused LTE eviction.

Prints a table and writes `decode-<gpu>.json` (+ `.png` when matplotlib is present) to `--out`. Times are CUDA-graph
replays (launch gaps removed), median of several replays, with the inputs rotated over enough copies to exceed the
L2 cache. Bandwidth counts the bytes a decode step must read or write: K and V of the valid slots, q and the output
(the 1-byte-per-slot validity mask is reported apart). The peer is a device-to-device `copy_` measured in the same
run (bytes read + written) and `scaled_dot_product_attention` on the same cache.

    python3 benchmarks/decode.py [--out DIR] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import add_output_args, copy_bandwidth, machine, result_path, time_graph, write_result
from hlsa.ops.decode_attention import decode_attention, decode_attention_ref
from hlsa.ops.lte_evict import lte_evict, lte_evict_ref

RING, BUFFER = 769, 512  # the released LTE configs: W = 768 (ring W + 1), N = 512
START = 10_000  # position of the first decoded token in the LTE eviction checks
HQ, DTYPE = 16, torch.bfloat16
L2_ROTATE_BYTES = 256 * 2**20  # rotate inputs until one pass covers this much (H200 L2 is 60 MB)
MAX_CACHE_BYTES = 16 * 2**30


def make_cache(B: int, HKV: int, S: int, D: int, copies: int) -> list[tuple[torch.Tensor, ...]]:
    """`copies` independent (q, k, v, valid) sets with every slot valid."""
    out = []
    for _ in range(copies):
        q = torch.randn(B, HQ, D, device="cuda", dtype=DTYPE)
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=DTYPE)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=DTYPE)
        out.append((q, k, v, torch.ones(B, HKV, S, device="cuda", dtype=torch.bool)))
    return out


def bench_decode(kind: str, B: int, HKV: int, D: int, S: int, copy_gbs: float, with_sdpa: bool) -> dict:
    esize = torch.finfo(DTYPE).bits // 8
    kv_bytes = 2 * B * HKV * S * D * esize
    row = {"kind": kind, "B": B, "HQ": HQ, "HKV": HKV, "D": D, "S": S}
    if kv_bytes > MAX_CACHE_BYTES:
        return row | {"skipped": "cache over 16 GiB"}
    copies = min(64, max(1, math.ceil(L2_ROTATE_BYTES / kv_bytes)))
    sets = make_cache(B, HKV, S, D, copies)
    calls = [lambda s=s: decode_attention(s[0], s[1], s[2], valid=s[3]) for s in sets] * max(1, 8 // copies)
    us = time_graph(calls)
    moved = kv_bytes + 2 * B * HQ * D * esize
    row |= {"us": us, "bytes": moved, "mask_bytes": B * HKV * S, "gbs": moved / us / 1e3}
    row["frac_copy_bw"] = row["gbs"] / copy_gbs
    if with_sdpa and kv_bytes * (HQ // HKV) <= 2 * MAX_CACHE_BYTES:  # a GQA fallback may expand K and V
        # Same bytes, every slot valid, so no mask: PyTorch may pick its flash or memory-efficient kernel.
        sdpa = [lambda s=s: F.scaled_dot_product_attention(s[0][:, :, None], s[1], s[2], enable_gqa=True) for s in sets]
        try:
            row["sdpa_us"] = time_graph(sdpa * max(1, 8 // copies))
            row["sdpa_gbs"] = moved / row["sdpa_us"] / 1e3
        except (RuntimeError, torch.OutOfMemoryError) as err:  # backend refusals are results, not crashes
            row["sdpa_error"] = str(err).splitlines()[0][:200]
    del sets
    torch.cuda.empty_cache()
    return row


def lte_state(B: int, HKV: int, D: int, *, seed: int) -> tuple[torch.Tensor, ...]:
    """A mid-generation LTE cache: full ring, half-full buffers (per-head lengths), random positive-ish scores."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = RING + BUFFER
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=DTYPE, generator=g)
    score = torch.randn(B, HKV, S, device="cuda", generator=g)
    buffer_len = torch.randint(0, BUFFER + 1, (B, HKV), device="cuda", dtype=torch.int32, generator=g)
    valid = torch.ones(B, HKV, S, device="cuda", dtype=torch.bool)
    valid[:, :, RING:] = torch.arange(BUFFER, device="cuda") < buffer_len[:, :, None]
    # Positions before the token at START: the ring holds the last RING of them, the buffers distinct older ones.
    pos = torch.empty(B, HKV, S, device="cuda", dtype=torch.int32)
    ring_pos = torch.arange(START - RING, START, device="cuda")
    pos[:, :, ring_pos % RING] = ring_pos.int()
    older = torch.rand(B, HKV, START - RING, device="cuda", generator=g).argsort(dim=2)
    pos[:, :, RING:] = older[:, :, :BUFFER].int()
    return k, v, score, valid, buffer_len, pos


def bench_evict(B: int, HKV: int, D: int) -> dict:
    state = lte_state(B, HKV, D, seed=0)
    position = torch.tensor(START, device="cuda")
    new = torch.randn(B, HKV, D, device="cuda", dtype=DTYPE)

    def step() -> None:
        lte_evict(*state, position=position, k_new=new, v_new=new, ring_size=RING)

    return {"B": B, "HKV": HKV, "D": D, "S": RING + BUFFER, "us": time_graph([step] * 20)}


def check_decode() -> list[dict]:
    """Triton against the fp64 reference on awkward shapes, both split paths, fp32 and bf16."""
    from hlsa.ops.triton.decode_attention import decode_attention_triton

    out = []
    for B, HKV, S, D, dtype, ns in [
        (3, 4, 1281, 128, torch.float32, None),
        (2, 16, 300, 64, torch.float32, 1),
        (1, 4, 7000, 128, torch.bfloat16, None),
        (64, 4, 1281, 64, torch.bfloat16, 1),
        (5, 1, 77, 128, torch.bfloat16, 4),
    ]:
        q = torch.randn(B, HQ, D, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, HKV, S, D, device="cuda", dtype=dtype) for _ in range(2))
        valid = torch.rand(B, HKV, S, device="cuda") < 0.6
        valid[0, 0] = False
        o = decode_attention_triton(q, k, v, valid=valid, scale=D**-0.5, num_splits=ns)
        ref = decode_attention_ref(q.double(), k.double(), v.double(), valid=valid)
        err = ((o.double() - ref).norm() / ref.norm()).item()
        out.append(
            {
                "B": B,
                "HKV": HKV,
                "S": S,
                "D": D,
                "dtype": str(dtype),
                "num_splits": ns,
                "rel_err": err,
                "finite": bool(torch.isfinite(o).all()),
                "empty_row_zero": bool((o[0, : HQ // HKV] == 0).all()),
            }
        )
    return out


def check_evict_and_graph(steps: int = 40) -> dict:
    """Eager Triton vs reference (exact) over `steps` decode steps, then a captured step replayed on a clone."""
    B, HKV, D = 4, 4, 128
    ref_state = lte_state(B, HKV, D, seed=1)
    eager_state = tuple(t.clone() for t in ref_state)
    graph_state = tuple(t.clone() for t in ref_state)
    position = torch.full((), START, dtype=torch.int64, device="cuda")
    q_in, k_in, v_in = (torch.zeros(B, n, D, device="cuda", dtype=DTYPE) for n in (HQ, HKV, HKV))

    def step(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        lte_evict(*state, position=position, k_new=k_in, v_new=v_in, ring_size=RING)
        return decode_attention(q_in, state[0], state[1], valid=state[3])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile both kernels on a throw-away copy before the capture
        step(tuple(t.clone() for t in ref_state))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture records graph_state's tensors without running the kernels
        o_graph = step(graph_state)
    evict_ok = graph_ok = True
    max_attn_err = 0.0
    for t in range(steps):
        q, kn, vn = (torch.randn_like(x) for x in (q_in, k_in, v_in))
        scores = torch.randn(B, HKV, device="cuda") + 0.5  # the router refresh of the leaving token
        s = (START + t) % RING
        for state in (ref_state, eager_state, graph_state):
            state[2][:, :, s] = scores
        position.fill_(START + t)
        for static, fresh in ((q_in, q), (k_in, kn), (v_in, vn)):
            static.copy_(fresh)
        lte_evict_ref(*ref_state, position=position, k_new=kn, v_new=vn, ring_size=RING)
        o_ref = decode_attention_ref(q.double(), ref_state[0].double(), ref_state[1].double(), valid=ref_state[3])
        o_eager = step(eager_state)
        graph.replay()
        evict_ok &= all(torch.equal(a, b) for a, b in zip(eager_state, ref_state))
        graph_ok &= torch.equal(o_graph, o_eager) and all(torch.equal(a, b) for a, b in zip(graph_state, eager_state))
        max_attn_err = max(max_attn_err, ((o_eager.double() - o_ref).norm() / o_ref.norm()).item())
    return {
        "steps": steps,
        "evict_triton_equals_ref": evict_ok,
        "graph_replay_equals_eager": graph_ok,
        "attn_rel_err_vs_fp64_ref": max_attn_err,
        "moved_any": bool((ref_state[4] > 0).any()),
    }


# (B, HKV, D, S) of the sweep: batch-64 LTE and SWA caches (where fixed costs weigh most); the last is the GDN+LTE
# 0.4B decode step's (16 kv-heads of 64 channels, 769 ring + 512 buffer + 4 slots of headroom).
SWEEP_SHAPES = ((64, 4, 64, 1281), (64, 4, 64, 769), (64, 4, 128, 1281), (64, 16, 128, 1281), (64, 16, 64, 1285))


# Tile configs (BS, num_warps, num_stages) of the sweep; None = the kernel's own pick.
SWEEP_CONFIGS = (None, (16, 4, 4), (32, 4, 3), (32, 4, 4), (32, 2, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 2, 3),
                 (128, 4, 2), (128, 4, 3), (128, 8, 3))  # fmt: skip
SWEEP_SPLITS = (None, 1, 2, 3, 4, 8)  # None = the occupancy heuristic's pick


def sweep(
    copy_gbs: float,
    shapes: tuple[tuple[int, int, int, int], ...] = SWEEP_SHAPES,
    configs: tuple[tuple[int, int, int] | None, ...] = SWEEP_CONFIGS,
    splits: tuple[int | None, ...] = SWEEP_SPLITS,
) -> list[dict]:
    """Tile configs x split counts on `shapes` (B, HKV, D, S)."""
    from hlsa.ops.triton.decode_attention import decode_attention_triton

    rows = []
    for B, HKV, D, S in shapes:
        kv_bytes = 2 * B * HKV * S * D * 2
        sets = make_cache(B, HKV, S, D, min(64, max(1, math.ceil(L2_ROTATE_BYTES / kv_bytes))))
        for config in configs:
            for ns in splits:
                calls = [
                    lambda s=s, c=config, n=ns: decode_attention_triton(
                        s[0], s[1], s[2], valid=s[3], scale=s[0].shape[-1] ** -0.5, num_splits=n, config=c
                    )
                    for s in sets
                ]
                row = {"B": B, "HKV": HKV, "D": D, "S": S, "config": config, "num_splits": ns}
                try:
                    us = time_graph(calls * max(1, 8 // len(sets)), replays=5)
                except Exception as err:  # e.g. Triton's OutOfResources for a too-large tile: a result, not a crash
                    rows.append(row | {"error": str(err)[:200]})
                    continue
                gbs = (kv_bytes + 2 * B * HQ * D * 2) / us / 1e3
                rows.append(row | {"us": us, "gbs": gbs, "frac_copy_bw": gbs / copy_gbs})
                print(f"sweep B={B} HKV={HKV} D={D} S={S} config={config} splits={ns}: {us:7.1f} us {gbs:6.0f} GB/s")
        del sets
    return rows


def evict_rows() -> list[dict]:
    rows = [bench_evict(B, HKV, D) for B in (1, 64, 128) for HKV in (4, 16) for D in (64, 128)]
    for r in rows:
        print(f"lte_evict B={r['B']:3d} HKV={r['HKV']:2d} D={r['D']:3d}: {r['us']:6.2f} us/step")
    return rows


def decode_rows(copy_gbs: float) -> list[dict]:
    rows = []
    shapes = [("lte", RING + BUFFER), ("swa", RING)] + [(f"full{s // 1024}k", s) for s in (4096, 16384, 131072)]
    for kind, S in shapes:
        for D in (64, 128):
            for HKV in (4, 16):
                for B in (1, 16, 64, 128):
                    row = bench_decode(kind, B, HKV, D, S, copy_gbs, with_sdpa=True)
                    rows.append(row)
                    if "us" in row:
                        peer = f"{row['sdpa_us']:8.1f}" if "sdpa_us" in row else "     n/a"
                        print(
                            f"{kind:>8} D={D:3d} HKV={HKV:2d} B={B:3d}: {row['us']:8.1f} us {row['gbs']:6.0f} GB/s "
                            f"({100 * row['frac_copy_bw']:5.1f}% of copy)  sdpa {peer} us"
                        )
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    copy_gbs = result["copy_gbs"]
    for ax, D in zip(axes, (64, 128)):
        for kind in ("lte", "swa", "full4k", "full16k", "full128k"):
            for HKV, style in ((4, "-"), (16, "--")):
                pts = [
                    r for r in result["decode"] if r["kind"] == kind and r["D"] == D and r["HKV"] == HKV and "us" in r
                ]
                if pts:
                    ax.plot(
                        [r["B"] for r in pts], [r["gbs"] for r in pts], style, marker="o", label=f"{kind} HKV={HKV}"
                    )
        ax.axhline(copy_gbs, color="k", lw=1, label="copy_ (read+write)")
        ax.axhline(0.7 * copy_gbs, color="gray", ls=":", label="70% target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(f"decode_attention, HQ={HQ}, D={D}, bf16")
    axes[0].set_ylabel("GB/s (K+V of valid slots + q + out)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result['machine']['gpu']}: CUDA-graph replay, cold L2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs and split counts")
    parser.add_argument(
        "--sweep-shapes",
        nargs="+",
        metavar="B,HKV,D,S",
        help="sweep only these cache shapes, and skip the other sections (default: all sections, SWEEP_SHAPES)",
    )
    parser.add_argument(
        "--sweep-splits",
        help="comma-separated split counts to sweep besides the heuristic's (default: 1,2,3,4,8)",
    )
    parser.add_argument(
        "--sweep-own-config", action="store_true", help="sweep only the kernel's own tile config, not the others"
    )
    parser.add_argument("--plot-only", type=Path, help="only draw the PNG of an existing JSON (no GPU needed)")
    args = parser.parse_args()
    splits = SWEEP_SPLITS
    if args.sweep_splits:
        try:
            splits = (None, *(int(v) for v in args.sweep_splits.split(",")))
        except ValueError:
            splits = ()
        if len(splits) < 2 or min(n for n in splits if n is not None) < 1:
            raise SystemExit(f"--sweep-splits: expected comma-separated positive integers, got {args.sweep_splits!r}")
    configs = (None,) if args.sweep_own_config else SWEEP_CONFIGS
    shapes = SWEEP_SHAPES
    if args.sweep_shapes:
        try:
            shapes = tuple(tuple(int(v) for v in shape.split(",")) for shape in args.sweep_shapes)
        except ValueError:
            shapes = ()
        if not shapes or any(len(shape) != 4 or min(shape) < 1 for shape in shapes):
            raise SystemExit(f"--sweep-shapes: expected B,HKV,D,S of positive integers, got {args.sweep_shapes}")
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    json_path = result_path("decode", args.out)
    result = {"machine": machine(args.commit), "dtype": str(DTYPE)}
    print("machine:", result["machine"])
    result["copy"] = copy_bandwidth()
    result["copy_gbs"] = result["copy"]["peer"]
    print(f"device-to-device copy (read + write), GB/s: {result['copy']}")
    sections = [
        ("check_decode", check_decode),
        ("check_evict_graph", check_evict_and_graph),
        ("evict", evict_rows),
        ("decode", lambda: decode_rows(result["copy_gbs"])),
        (
            "sweep",
            lambda: sweep(result["copy_gbs"], shapes, configs, splits) if args.sweep or args.sweep_shapes else None,
        ),
    ]
    if args.sweep_shapes:
        sections = sections[-1:]
    for name, section in sections:
        try:
            result[name] = section()
        except Exception:  # a benchmark keeps the other sections' numbers; the traceback goes into the JSON
            result[name] = {"error": traceback.format_exc()}
            print(f"{name} failed:\n{result[name]['error']}")
        if name.startswith("check"):
            print(f"{name}: {result[name]}")
        write_result(json_path, result)  # written after each section: a timeout keeps the rest
    try:
        if isinstance(result.get("decode"), list):
            plot(result, json_path.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: draw the PNG elsewhere with --plot-only <json>")


if __name__ == "__main__":
    main()
