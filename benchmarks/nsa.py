"""NSA on one GPU: fla-core's training path against the reference, then one decode step at long context.

Decode peers, same run, bf16, HQ=32, HKV=2, D=64, block 64, S=16, W=511 (the authors' config):
* ours: `hlsa.ops.nsa.nsa_decode` (one Triton launch) over the head-major cache and the incremental compressed cache;
* full: SDPA (flash) over the whole cache, the G query heads of a kv head folded into the query axis;
* fla: recomputing with fla's `parallel_nsa` at TQ=1 over the whole cache (it re-pools every block each step, as the
  authors' layer does), plus SDPA over the last W+1 keys for the window (fla would call flash-attn).
Bandwidth counts the bytes each method must read once: ours the compressed cache + S blocks + the window, full and
fla the whole cache (fla must pool it). Times are medians of `do_bench` (L2 flushed) over CUDA-graph replays.

Usage: `python3 benchmarks/nsa.py [--out DIR]` on the GPU writes `nsa-<gpu>.json` (default folder
benchmarks/results); `python3 benchmarks/nsa.py --plot FILE.json` draws the PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import add_output_args, machine, result_path, write_result

HQ, HKV, D, BS, S, W = 32, 2, 64, 64, 16, 511
CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 16, 64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_training(dtype: torch.dtype) -> dict:
    """fla path (`nsa(backend='fla')`) against the reference in fp32 from the same inputs: forward and gradients."""
    from hlsa.ops.nsa import nsa

    B, T = 2, 1280
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[1, :203] = False
    xs = [torch.randn(B, T, h, D, device="cuda") for h in (HQ, HKV, HKV)]
    xs += [torch.rand(B, T, HQ, device="cuda") for _ in range(3)]
    fast = [x.to(dtype).requires_grad_() for x in xs]
    ref = [x.detach().float().requires_grad_() for x in fast]
    kw = dict(block_size=BS, block_counts=S, window=W, key_mask=mask)
    o_fast, o_ref = nsa(*fast, **kw, backend="fla"), nsa(*ref, **kw, backend="torch")
    do = torch.randn_like(o_ref)
    (o_fast.float() * do).sum().backward()
    (o_ref * do).sum().backward()
    names = ("q", "k", "v", "g_cmp", "g_slc", "g_swa")
    out = {"o": rel(o_fast, o_ref)}
    out.update({f"d{n}": rel(a.grad, b.grad) for n, a, b in zip(names, fast, ref)})
    return out


def make_decode(B: int, N: int, dtype: torch.dtype, pads: tuple[int, ...] = ()) -> dict:
    """Random decode inputs in both layouts; compressed cache pooled from each row's first real slot."""
    k = torch.randn(B, HKV, N, D, device="cuda", dtype=dtype)
    v = torch.randn(B, HKV, N, D, device="cuda", dtype=dtype)
    start = torch.zeros(B, dtype=torch.int32, device="cuda")
    start[: len(pads)] = torch.tensor(pads, dtype=torch.int32)
    k_cmp = torch.zeros(B, HKV, N // BS + 1, D, device="cuda", dtype=dtype)
    v_cmp = torch.zeros_like(k_cmp)
    for b in range(B):
        s0 = int(start[b])
        n = (N - s0) // BS
        k_cmp[b, :, :n] = k[b, :, s0 : s0 + n * BS].unflatten(1, (n, BS)).mean(2)
        v_cmp[b, :, :n] = v[b, :, s0 : s0 + n * BS].unflatten(1, (n, BS)).mean(2)
    q = torch.randn(B, HQ, D, device="cuda", dtype=dtype)
    gates = [torch.rand(B, HQ, device="cuda", dtype=dtype) for _ in range(3)]
    # seq_len on the device, as the layer passes it: an int would add a fill kernel to every timed step
    seq_len = torch.full((), N, dtype=torch.int64, device="cuda")
    return dict(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gates=gates, start=start, seq_len=seq_len)


def ours(x: dict, backend: str = "triton") -> torch.Tensor:
    from hlsa.ops.nsa import nsa_decode

    return nsa_decode(
        x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], *x["gates"], start=x["start"], seq_len=x["seq_len"],
        block_size=BS, block_counts=S, window=W, backend=backend,
    )  # fmt: skip


def full_attention(x: dict) -> torch.Tensor:
    B = x["q"].shape[0]
    q = x["q"].view(B, HKV, HQ // HKV, D)  # one query token: the group's heads become the query axis
    return F.scaled_dot_product_attention(q, x["k"], x["v"]).view(B, HQ, D)


def fla_recompute(x: dict, k_t: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    from fla.ops.nsa.parallel import parallel_nsa

    B = x["q"].shape[0]
    g_cmp, g_slc, g_swa = (g[:, None] for g in x["gates"])
    o = parallel_nsa(x["q"][:, None], k_t, v_t, g_cmp, g_slc, None, block_counts=S, block_size=BS)[:, 0]
    q = x["q"].view(B, HKV, HQ // HKV, D)
    o_swa = F.scaled_dot_product_attention(q, x["k"][:, :, -(W + 1) :], x["v"][:, :, -(W + 1) :]).view(B, HQ, D)
    return o + g_swa[:, 0, :, None] * o_swa


def check_decode() -> dict:
    """Triton decode vs the reference (fp32, bf16, left padding) and vs fla's TQ=1 recompute (bf16)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = make_decode(3, 3000, dtype, pads=(0, 77, 2950))
        out[f"ours_vs_ref_{str(dtype)[6:]}"] = rel(ours(x), ours(x, backend="torch"))
    x = make_decode(2, 8192, torch.bfloat16)
    k_t, v_t = x["k"].transpose(1, 2).contiguous(), x["v"].transpose(1, 2).contiguous()
    out["ours_vs_fla_recompute_bf16"] = rel(ours(x), fla_recompute(x, k_t, v_t))
    return out


def timed(fn) -> tuple[float, bool]:
    """Median ms of `fn` replayed from a CUDA graph (plain calls if capture fails), L2 flushed between runs."""
    import triton

    fn()
    torch.cuda.synchronize()
    run, graphed = fn, False
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, graphed = graph.replay, True
    except Exception:  # fla's launcher may sync (e.g. `.item()`): time it without a graph
        torch.cuda.synchronize()
    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median"), graphed


def bench_decode() -> list[dict]:
    rows = []
    for N in CONTEXTS:
        for B in BATCHES:
            x = make_decode(B, N, torch.bfloat16)
            k_t, v_t = x["k"].transpose(1, 2).contiguous(), x["v"].transpose(1, 2).contiguous()
            full_bytes = 2 * B * HKV * N * D * 2
            ours_bytes = 2 * B * HKV * (N // BS + min(S, N // BS) * BS + W + 1) * D * 2
            row = dict(context=N, batch=B)
            for name, fn, nbytes in (
                ("ours", partial(ours, x), ours_bytes),
                ("full", partial(full_attention, x), full_bytes),
                ("fla", partial(fla_recompute, x, k_t, v_t), full_bytes),
            ):
                try:
                    ms, graphed = timed(fn)
                    row[name] = dict(ms=ms, tok_s=B / ms * 1e3, gb_s=nbytes / ms / 1e6, bytes=nbytes, graphed=graphed)
                except Exception as e:  # record and keep going: one failing peer must not lose the table
                    row[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            del x, k_t, v_t
            torch.cuda.empty_cache()
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    cells = [f"{row['context']:>7} {row['batch']:>3}"]
    for name in ("ours", "full", "fla"):
        r = row[name]
        cells.append(f"{name} {r['ms'] * 1e3:8.1f}us {r['gb_s']:7.0f}GB/s" if "ms" in r else f"{name} ERR")
    if "ms" in row["ours"]:
        for peer in ("full", "fla"):
            if "ms" in row[peer]:
                cells.append(f"x{row[peer]['ms'] / row['ours']['ms']:.1f} vs {peer}")
    return " | ".join(cells)


def main_gpu(out: Path | None, commit: str | None) -> None:
    result = {
        "machine": machine(commit),
        "shapes": dict(HQ=HQ, HKV=HKV, D=D, block_size=BS, block_counts=S, window=W, dtype="bfloat16"),
    }
    print(f"# {result['machine']}", flush=True)
    for key, fn in (
        ("training_fp32", lambda: check_training(torch.float32)),
        ("training_bf16", lambda: check_training(torch.bfloat16)),
        ("decode_check", check_decode),
    ):
        try:
            result[key] = fn()
        except Exception:
            result[key] = {"error": traceback.format_exc()[-1500:]}
        print(key, json.dumps(result[key]), flush=True)
    result["decode"] = bench_decode()
    write_result(result_path("nsa", out), result)


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        result = json.load(f)
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 4), sharey=False)
    for ax, B in zip(axes, BATCHES):
        rows = [r for r in result["decode"] if r["batch"] == B]
        for name in ("ours", "full", "fla"):
            pts = [(r["context"], r[name]["tok_s"]) for r in rows if "tok_s" in r[name]]
            ax.plot(*zip(*pts), marker="o", label=name) if pts else None
        ax.set(xscale="log", yscale="log", xlabel="context", ylabel="tokens/s", title=f"NSA decode, batch {B}")
        ax.legend()
    fig.suptitle(f"{result['machine']['gpu']}: bf16 HQ=32 HKV=2 D=64 block 64 S=16 W=511")
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--plot", help="draw the PNG next to this JSON instead of running")
    args = parser.parse_args()
    plot(args.plot) if args.plot else main_gpu(args.out, args.commit)
