"""Sparse attention with columns (LTE training pattern) on one GPU: correctness first, then timings against peers.

Usage (GPU machine): `PYTHONPATH=src python3 benchmarks/attention.py [--out DIR] [--quick] [--no-flex]`
Writes `attention-<gpu>.json` and `attention-<gpu>.png` in DIR (default benchmarks/results) and prints a table.

Pattern per (b, kv head): causal band of W + 1 = 769 keys, 4 sinks and 512 selected columns at random positions
(`column_end = INT32_MAX`), no padding. Peers from the same run: FlexAttention (compiled, same mask), SDPA full causal
(flash backend), SDPA with the dense boolean mask (where it fits). Effective TFLOP/s count attended pairs only:
4 * D FLOPs per pair forward, 2.5x that backward.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
import torch.nn.functional as F

from benchlib import add_output_args, load_file, machine, result_path, write_result
from hlsa.ops.sparse_attention import sparse_attention, sparse_attention_ref

INT32_MAX = 2**31 - 1
WINDOW = 768
N_COLUMNS = 512
N_SINKS = 4


def make_inputs(B: int, T: int, HQ: int, HKV: int, D: int, dtype: torch.dtype, *, requires_grad: bool = True):
    """Random q, k, v `[B, T, H, D]` and a training column_end `[B, T, HKV]` (sinks + random columns)."""
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=dtype) for h in (HQ, HKV, HKV))
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    column_end = torch.zeros(B, T, HKV, device="cuda", dtype=torch.int32)
    column_end[:, :N_SINKS] = INT32_MAX
    picks = torch.rand(B, HKV, T - N_SINKS, device="cuda").argsort(dim=-1)[..., :N_COLUMNS] + N_SINKS  # [B, HKV, N]
    column_end.permute(0, 2, 1).scatter_(2, picks, INT32_MAX)
    return q, k, v, column_end


def attended_pairs(column_end: torch.Tensor, HQ: int) -> int:
    """Number of visible (query, key) pairs summed over the query heads (training pattern, no padding)."""
    B, T, HKV = column_end.shape
    band = _band_pairs(T)
    j = torch.arange(T, device=column_end.device)[None, :, None]
    far = ((column_end > j + WINDOW + 1) * (T - j - WINDOW - 1).clamp_min(0)).sum().item()
    return int((band * B * HKV + far) * (HQ // HKV))


def _band_pairs(T: int) -> int:
    w = WINDOW + 1
    return w * (w + 1) // 2 + max(T - w, 0) * w if T > w else T * (T + 1) // 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_correctness() -> list[dict]:
    """Kernel vs the fp32/fp64 reference on slices that fit the dense reference; returns one row per case."""
    rows = []
    cases = [  # (name, B, T, HQ, HKV, D, window, dtype, pad, finite column ends)
        ("bf16 T4096 D64 GQA4 W768", 2, 4096, 16, 4, 64, WINDOW, torch.bfloat16, 0, False),
        ("bf16 T4096 D128 MHA W768", 1, 4096, 8, 8, 128, WINDOW, torch.bfloat16, 0, False),
        ("fp32 T3001 D128 GQA2 W100 pad+ends", 2, 3001, 4, 2, 128, 100, torch.float32, 333, True),
        ("fp32 T2000 D64 W5", 1, 2000, 4, 1, 64, 5, torch.float32, 0, False),
        ("bf16 T4096 D64 full causal", 1, 4096, 8, 2, 64, None, torch.bfloat16, 17, False),
    ]
    for name, B, T, HQ, HKV, D, window, dtype, pad, finite in cases:
        q, k, v, ce = make_inputs(B, T, HQ, HKV, D, dtype)
        if finite:
            ends = torch.randint(0, T + 10, ce.shape, device="cuda", dtype=torch.int32)
            ce = torch.where(torch.rand(ce.shape, device="cuda") < 0.3, ends, ce)
        km = None
        if pad:
            km = torch.ones(B, T, device="cuda", dtype=torch.bool)
            km[0, :pad] = False
        o = sparse_attention(q, k, v, window=window, column_end=ce, key_mask=km)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), do)
        up = [x.detach().double() if dtype == torch.float32 else x.detach().float() for x in (q, k, v)]
        for x in up:
            x.requires_grad_(True)
        o_ref = sparse_attention_ref(*up, window=window, column_end=ce, key_mask=km)
        grads_ref = torch.autograd.grad(o_ref, up, do.to(o_ref.dtype))
        errs = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref))}
        ok = all(math.isfinite(e) and e < (2e-2 if dtype == torch.bfloat16 else 1e-5) for e in errs.values())
        rows.append({"case": name, "ok": ok, **errs})
        print(f"check {name:40s} ok={ok} " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)
        del o_ref, grads_ref, up
        torch.cuda.empty_cache()
    return rows


def bench(fn, grads: list[torch.Tensor]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, grad_to_none=grads, return_mode="median")


def time_pair(fwd, leaves: list[torch.Tensor]) -> dict:
    """Median ms of forward only and forward + backward of `fwd()`; errors are recorded, not raised."""
    out = {}
    try:
        with torch.no_grad():
            out["fwd_ms"] = bench(fwd, leaves)
        o0 = fwd()
        do = torch.randn_like(o0)
        del o0
        out["fwdbwd_ms"] = bench(lambda: fwd().backward(do), leaves)
    except (torch.OutOfMemoryError, RuntimeError) as err:  # a peer that cannot run at this size
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    torch.cuda.empty_cache()
    return out


def peers(q, k, v, column_end, *, use_flex: bool, use_dense: bool) -> dict:
    """Times of FlexAttention, SDPA full causal (flash) and dense-masked SDPA on the same inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D] views of the same leaves
    res = {}

    def causal():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            kk, vv = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
            return F.scaled_dot_product_attention(qt, kk, vv, is_causal=True)

    res["sdpa_causal_flash"] = time_pair(causal, [q, k, v])
    selected = (column_end > 0).permute(0, 2, 1).contiguous()  # [B, HKV, T]
    if use_dense:
        try:
            i = torch.arange(T, device="cuda")
            mask = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] <= WINDOW) | selected[:, :, None, :])
            mask = mask.repeat_interleave(G, 1)  # [B, HQ, T, T]

            def dense():
                kk, vv = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
                return F.scaled_dot_product_attention(qt, kk, vv, attn_mask=mask)

            res["sdpa_dense_mask"] = time_pair(dense, [q, k, v])
            del mask
        except torch.OutOfMemoryError as err:
            res["sdpa_dense_mask"] = {"error": f"OutOfMemoryError: {str(err).splitlines()[0][:200]}"}
    if use_flex:
        res["flex_compiled"] = flex_times(qt, kt, vt, selected, [q, k, v])
    torch.cuda.empty_cache()
    return res


def flex_times(qt, kt, vt, selected, leaves) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, HQ, T, _ = qt.shape
    G = HQ // kt.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx <= WINDOW) | selected[b, h // G, kv_idx])

    try:
        block_mask = create_block_mask(mask_mod, B, HQ, T, T, device="cuda", _compile=True)
        flex = torch.compile(flex_attention)
        return time_pair(lambda: flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True), leaves)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def run_benchmarks(args) -> list[dict]:
    rows = []
    shapes = [(T, hkv, D) for T in (4096, 16384, 65536) for hkv in (16, 4) for D in (64, 128)]
    if args.quick:
        shapes = [(4096, 4, 64), (16384, 4, 64), (65536, 4, 64), (4096, 16, 128)]
    for T, HKV, D in shapes:
        B, HQ = 65536 // T, 16
        q, k, v, ce = make_inputs(B, T, HQ, HKV, D, torch.bfloat16)
        pairs = attended_pairs(ce, HQ)
        row = {"B": B, "T": T, "HQ": HQ, "HKV": HKV, "D": D, "window": WINDOW, "pairs": pairs}
        ours = functools.partial(sparse_attention, q, k, v, window=WINDOW, column_end=ce)
        row["ours"] = time_pair(ours, [q, k, v])
        use_flex = not args.no_flex and T <= args.flex_max_t and D == 64
        row.update(peers(q, k, v, ce, use_flex=use_flex, use_dense=T <= 4096))
        flops = 4 * D * pairs
        ours = row["ours"]
        if "fwd_ms" in ours:
            ours["fwd_tflops"] = flops / ours["fwd_ms"] / 1e9
            ours["fwdbwd_tflops"] = 3.5 * flops / ours["fwdbwd_ms"] / 1e9
        row["ratios"] = {
            f"{peer}_{kind}": ours[f"{kind}_ms"] / row[peer][f"{kind}_ms"]
            for peer in ("sdpa_causal_flash", "sdpa_dense_mask", "flex_compiled")
            for kind in ("fwd", "fwdbwd")
            if peer in row and f"{kind}_ms" in row[peer] and f"{kind}_ms" in ours
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, ce
        torch.cuda.empty_cache()
    return rows


def sweep() -> list[dict]:
    """Time block configs of each kernel (others at their defaults) at T=4096, kv 4, D 64 and 128."""
    import hlsa.ops.triton.sparse_attention as kernels

    default = kernels.launch_config
    candidates = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)]
    candidates += [(64, 64, 4, 2), (32, 128, 4, 2), (32, 64, 4, 3), (128, 64, 8, 2)]
    rows = []
    for D in (64, 128):
        q, k, v, ce = make_inputs(16, 4096, 16, 4, D, torch.bfloat16)
        ours = functools.partial(sparse_attention, q, k, v, window=WINDOW, column_end=ce)
        for kernel in ("fwd", "dq", "dkdv"):
            for cfg in candidates:
                kernels.launch_config = lambda name, d, dtype, kernel=kernel, cfg=cfg: (
                    cfg if name == kernel else default(name, d, dtype)
                )
                t = time_pair(ours, [q, k, v])
                rows.append({"D": D, "kernel": kernel, "config": cfg, **t})
                print(json.dumps(rows[-1]), flush=True)
        kernels.launch_config = default
    return rows


def kernel_times() -> list[dict]:
    """Median ms of each kernel of one training step alone (forward, column prologue, dq + delta, dk/dv) and of the
    whole forward / forward + backward, at the quick shapes: where the time of `time_pair` goes."""
    rows = []
    for T, HKV, D in ((4096, 4, 64), (16384, 4, 64), (4096, 16, 128)):
        rows.append(_kernel_row(T, HKV, D))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def _kernel_row(T: int, HKV: int, D: int) -> dict:
    import hlsa.ops.triton.sparse_attention as kernels
    from hlsa.ops.triton.sparse_attention_bwd import dkdv

    q, k, v, ce = make_inputs(65536 // T, T, 16, HKV, D, torch.bfloat16)
    scale = D**-0.5
    cols, ccount = kernels.column_prologue(ce, None, WINDOW)
    pattern = (ce, q, cols, ccount, WINDOW, scale, True)  # `km is q`: no key mask
    row = {"T": T, "HKV": HKV, "D": D}
    with torch.no_grad():
        o, lse = kernels.forward(q, k, v, *pattern)
        do = torch.randn_like(o)
        _, delta = kernels.backward_dq(q, k, v, o, do, lse, *pattern)
        row["fwd_ms"] = bench(functools.partial(kernels.forward, q, k, v, *pattern), [])
        row["prologue_ms"] = bench(functools.partial(kernels.column_prologue, ce, None, WINDOW), [])
        row["dq_ms"] = bench(functools.partial(kernels.backward_dq, q, k, v, o, do, lse, *pattern), [])
        config = kernels.launch_config("dkdv", D, torch.bfloat16)
        row["dkdv_ms"] = bench(functools.partial(dkdv, q, k, v, do, lse, delta, *pattern, config=config), [])
    ours = functools.partial(sparse_attention, q, k, v, window=WINDOW, column_end=ce)
    row.update({f"total_{key}": value for key, value in time_pair(ours, [q, k, v]).items()})
    return row


def baseline_kernels(path: str) -> list[dict]:
    """A/B of the forward and dq kernels: another version of `hlsa/ops/triton/sparse_attention.py` (a file, e.g.
    from `git show COMMIT:src/hlsa/ops/triton/sparse_attention.py`), loaded as its own module, against the current
    one on the same inputs in the same process: median ms of each `forward` (prologue excluded) and `backward_dq`,
    and the largest differences of their outputs. The old file must still import against today's package (`rows`,
    `sparse_attention_bwd`) and have today's `forward` / `backward_dq` signatures."""
    import hlsa.ops.triton.sparse_attention as current

    base = load_file(path)
    rows = []
    for T, HKV, D in ((4096, 4, 64), (16384, 4, 64), (4096, 16, 128)):
        q, k, v, ce = make_inputs(65536 // T, T, 16, HKV, D, torch.bfloat16, requires_grad=False)
        row = {"T": T, "HKV": HKV, "D": D, "baseline": path}
        do = torch.randn_like(q)
        outs = {}
        for name, module in (("baseline", base), ("current", current)):
            cols, ccount = module.column_prologue(ce, None, WINDOW)
            pattern = (ce, q, cols, ccount, WINDOW, D**-0.5, True)  # `km is q`: no key mask
            o, lse = module.forward(q, k, v, *pattern)
            outs[name] = (o, module.backward_dq(q, k, v, o, do, lse, *pattern)[0])
            row[f"{name}_fwd_ms"] = bench(functools.partial(module.forward, q, k, v, *pattern), [])
            row[f"{name}_dq_ms"] = bench(functools.partial(module.backward_dq, q, k, v, o, do, lse, *pattern), [])
        for i, out in enumerate(("o", "dq")):
            diff = outs["baseline"][i].float() - outs["current"][i].float()
            row[f"max_abs_diff_{out}"] = diff.abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, ce, do, outs
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'T':>6} {'HKV':>3} {'D':>4} | {'ours fwd':>8} {'f+b':>7} {'TF/s f':>6} {'TF/s fb':>7} | "
    print(head + f"{'sdpa f':>7} {'f+b':>7} | {'dense f':>7} {'f+b':>7} | {'flex f':>7} {'f+b':>7}")
    for r in rows:
        cells = []
        for peer in ("ours", "sdpa_causal_flash", "sdpa_dense_mask", "flex_compiled"):
            t = r.get(peer, {})
            cells.append(f"{t.get('fwd_ms', float('nan')):7.3f} {t.get('fwdbwd_ms', float('nan')):7.3f}")
            if peer == "ours":
                cells[-1] += f" {t.get('fwd_tflops', float('nan')):6.0f} {t.get('fwdbwd_tflops', float('nan')):7.0f}"
        print(f"{r['T']:>6} {r['HKV']:>3} {r['D']:>4} | " + " | ".join(cells))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"T{r['T']}\nkv{r['HKV']} D{r['D']}" for r in rows]
    peers_ = ("ours", "sdpa_causal_flash", "sdpa_dense_mask", "flex_compiled")
    for ax, kind in zip(axes, ("fwd", "fwdbwd")):
        width = 0.2
        for n, peer in enumerate(peers_):
            vals = [r.get(peer, {}).get(f"{kind}_ms", float("nan")) for r in rows]
            ax.bar([x + n * width for x in range(len(rows))], vals, width, label=peer)
        ax.set_xticks([x + 1.5 * width for x in range(len(rows))], labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{kind}: B*T=65536, HQ=16, W=768, 4 sinks + 512 columns, bf16")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--flex-max-t", type=int, default=4096)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time block configs of each kernel")
    parser.add_argument("--kernels", action="store_true", help="also time each kernel of a step alone")
    parser.add_argument("--baseline", metavar="FILE", help="also A/B forward and dq against this sparse_attention.py")
    args = parser.parse_args()
    torch.manual_seed(0)
    checks = [] if args.skip_check else check_correctness()
    tuning = sweep() if args.sweep else []
    per_kernel = kernel_times() if args.kernels else []
    ab = baseline_kernels(args.baseline) if args.baseline else []
    rows = run_benchmarks(args)
    print_table(rows)
    result = {"machine": machine(args.commit), "dtype": "bfloat16", "checks": checks, "window": WINDOW}
    result |= {"columns": N_COLUMNS, "sinks": N_SINKS, "rows": rows, "sweep": tuning, "kernels": per_kernel}
    result["baseline"] = ab
    path = write_result(result_path("attention", args.out), result)
    print(result["machine"])
    plot(rows, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
