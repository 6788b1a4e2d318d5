"""End-to-end efficiency of the seven 0.4B architectures: prefill, decode, memory, roofline.

Random weights, bf16, one GPU. Writes `e2e-<gpu>.json` and beside it `e2e-<gpu>.png` (decode tokens/s) and
`e2e-<gpu>-memory.png` (plots only when matplotlib is importable; `--plot-only JSON` draws them later). The models
and caches are in e2e_models.py, the timing of one point in e2e_timing.py. Method and caveats: docs/efficiency.md.

* Prefill: batch 1, one forward of the whole prompt into an empty cache (`logits_to_keep=1`), tokens/s.
* Decode: the cache is built synthetically at context C (random contents of the exact size and validity a prefill
  of C tokens leaves: GDN random state, SWA ring full, LTE ring + buffer full, full attention/NSA C valid slots),
  then real decode steps are timed: on a GPU compiled and replayed from a CUDA graph (every architecture's step reads
  its positions from the device), on the CPU (`--smoke`) eager.
* Roofline: (weights + batch * cache bytes a step must move) / measured device copy bandwidth.

    python3 benchmarks/e2e.py --quick [--out DIR]      # GPU, ~5 min (default DIR: benchmarks/results)
    python3 benchmarks/e2e.py --smoke --out DIR        # CPU, tiny configs, seconds
    python3 benchmarks/e2e.py --plot-only benchmarks/results/e2e-h200.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchlib import (
    add_output_args,
    copy_bandwidth,
    error_text,
    machine,
    positive_ints,
    result_path,
    write_result,
)
from e2e_models import (
    ARCHS,
    Plan,
    build_model,
    make_plan,
    memory_table,
    model_info,
    roofline_tokens_per_s,
    synthetic_cache,
)
from e2e_timing import decode_point, prefill_point, reset_memory
from hlsa.model import HybridForCausalLM


# --- the run ----------------------------------------------------------------------------------------------------------
def arch_points(arch: str, plan: Plan) -> list[tuple[str, int, int]]:
    """("decode", batch, context) and ("prefill", 1, length) points of one architecture, most informative first."""
    points = []
    if arch in plan.decode_archs:
        contexts = plan.contexts + plan.extra_contexts.get(arch, ())
        if arch in plan.bracket_archs:
            contexts += contexts[:1]
        points += [("decode", b, c) for b in plan.batches for c in contexts]
    if arch in plan.prefill_archs:
        points += [("prefill", 1, n) for n in plan.prefill_lengths]
    return points


def cache_beyond_memory(shapes: HybridForCausalLM, batch: int, context: int, memory_bytes: int | None) -> str | None:
    """Why a decode point cannot run, without allocating anything: its synthetic cache alone (`shapes`: the model on
    the meta device) is larger than the GPU's memory. None when it may fit (or `memory_bytes` is None: no GPU)."""
    need = batch * synthetic_cache(shapes, 1, context).nbytes()
    if memory_bytes is None or need <= memory_bytes:
        return None
    return f"oom: the cache needs {need / 2**30:.1f} GiB, the GPU has {memory_bytes / 2**30:.1f} GiB"


SKIPPED = "skipped (time budget)"  # the status of a point a run had no time left for


def run_arch(arch: str, plan: Plan, deadline: float, results: dict, path: Path) -> None:
    """Every point of one architecture. Points whose cache cannot fit on the GPU are recorded as out of memory
    without a try, points past the time budget as skipped, failures as errors, and the JSON is rewritten after each
    point so that a run cut short keeps what it measured."""
    model = build_model(arch, plan)
    shapes = build_model(arch, plan, device="meta")
    memory = torch.cuda.get_device_properties(0).total_memory if plan.device == "cuda" else None
    results["models"][arch] = model_info(model)
    weights, bandwidth = results["models"][arch]["weight_bytes"], results["copy_bandwidth_bytes_per_s"]
    compiled_batch = None  # the batch whose compiled decode step dynamo holds
    for kind, batch, n in arch_points(arch, plan):
        where = {"batch": batch, "context": n} if kind == "decode" else {"length": n}
        try:
            too_big = cache_beyond_memory(shapes, batch, n, memory) if kind == "decode" else None
            if too_big:
                row = {"arch": arch, **where, "status": too_big}
            elif time.monotonic() > deadline:
                row = {"arch": arch, **where, "status": SKIPPED}
            elif kind == "decode":
                row = decode_point(model, arch, batch, n, plan, fresh_compile=batch != compiled_batch)
                compiled_batch = batch if row.get("compiled") else None
            else:
                row = prefill_point(model, arch, n, plan)
        except Exception as err:  # one broken point must not cost the rest of a one-shot GPU run
            row = {"arch": arch, **where, "status": f"error: {error_text(err)}"}
        row["order"] = sum(len(results[k]) for k in ("decode", "prefill"))  # measurement order within the run
        if kind == "decode" and row["status"] == "ok":  # best tokens/s: bytes a step must move / copy bandwidth
            row["roofline_tokens_per_s"] = roofline_tokens_per_s(weights, row["step_bytes_per_seq"], batch, bandwidth)
            row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
        results[kind].append(row)
        print(_describe(kind, row), flush=True)
        write_result(path, results)
    del model
    reset_memory(plan)


def _describe(kind: str, row: dict) -> str:
    where = f"B={row['batch']:>3} C={row['context']:>6}" if kind == "decode" else f"T={row['length']:>6}"
    head = f"{kind:7s} {row['arch']:12s} {where}"
    if row["status"] != "ok" or kind == "prefill":
        return f"{head}  {row['tokens_per_s']:12.0f} tok/s" if row["status"] == "ok" else f"{head}  {row['status']}"
    return (
        f"{head}  {row['mode']:5s} {row['tokens_per_s']:10.0f} tok/s  {row['latency_ms']:8.3f} ms/step  "
        f"roofline {row['roofline_tokens_per_s']:10.0f} tok/s ({row['roofline_fraction']:.0%})  "
        f"{row['point_seconds']:.0f} s ({row['graphs_compiled']} graphs compiled)"
    )


def mean_by_point(rows: list[dict]) -> dict[tuple[str, int, int], dict]:
    """Decode rows by (arch, batch, context); a point timed twice (`bracket_archs`) gets the mean of its tokens/s."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["batch"], r["context"]), []).append(r)
    return {key: {**rs[-1], "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs)} for key, rs in groups.items()}


def check_targets(results: dict, plan: Plan) -> list[dict]:
    """The efficiency targets (docs/efficiency.md) as PASS / MISS / NOT MEASURED lines."""

    def _check(name: str, value: float | None, threshold: float) -> dict:
        verdict = "NOT MEASURED" if value is None else ("PASS" if value >= threshold else "MISS")
        return {"target": name, "value": value, "threshold": threshold, "verdict": verdict}

    tps = mean_by_point([r for r in results["decode"] if r["status"] == "ok"])
    short, mid, long = plan.target_contexts
    b_mid, b_big = plan.target_batches
    checks = []
    for b in plan.batches:
        lo, hi = tps.get(("gdn_lte", b, short)), tps.get(("gdn_lte", b, long))
        value = hi["tokens_per_s"] / lo["tokens_per_s"] if lo and hi else None
        checks.append(_check(f"gdn_lte decode B={b}: tok/s at C={long} / at C={short} >= 0.90", value, 0.9))
    lte, base = tps.get(("gdn_lte", b_mid, mid)), tps.get(("transformer", b_mid, mid))
    value = lte["tokens_per_s"] / base["tokens_per_s"] if lte and base else None
    checks.append(_check(f"C={mid} B={b_mid}: gdn_lte / transformer decode tok/s >= 5", value, 5.0))
    # No Transformer decode beats its roofline, so this bound holds for any implementation of it; it needs only the
    # cache shapes (the memory table) and, over merged runs, the highest copy bandwidth any of them measured.
    shapes = {(r["arch"], r["context"]): r for r in results["memory"] if "step_bytes_per_seq" in r}
    bandwidth = max(results.get("copy_bandwidth_per_run", [results["copy_bandwidth_bytes_per_s"]]))
    base = shapes.get(("transformer", mid))
    best = base and roofline_tokens_per_s(base["weight_bytes"], base["step_bytes_per_seq"], b_mid, bandwidth)
    value = lte["tokens_per_s"] / best if lte and best else None
    checks.append(_check(f"C={mid} B={b_mid}: gdn_lte / the transformer's roofline tok/s >= 5", value, 5.0))
    for c in sorted({c for arch, b, c in tps if arch == "gdn_lte" and b == b_big}):
        value = tps[("gdn_lte", b_big, c)]["roofline_fraction"]
        checks.append(_check(f"gdn_lte decode B={b_big} C={c}: fraction of roofline >= 0.60", value, 0.6))
    return checks


def environment(plan: Plan) -> dict:
    """What the run measured with: dtype and plan (the machine, commit and versions are `results["machine"]`)."""
    plan_dict = {k: v for k, v in asdict(plan).items() if k not in ("config_dir", "dtype")}
    return {"dtype": str(plan.dtype), "plan": plan_dict}


def merge(results: list[dict]) -> dict:
    """One results dict from runs split over calls with `--archs` (e.g. when one call cannot hold them all): models,
    decode and prefill rows joined (each row tagged with its `run`), the first run's machine, plan and memory
    table, every run's GPU, commit, command and copy bandwidth, and the targets checked again on the joined rows.

    An input may itself be a merged file (it stands for the runs it joined). Where several runs measured one point
    (architecture, batch, context or prompt length), the last of them counts: its rows of that point replace the
    earlier runs', so re-timed points can be merged into an existing table; a run left with no rows is dropped. A
    point a run skipped for its time budget was not measured there, so it does not replace an earlier measurement."""
    if not results:
        raise ValueError("merge: no runs given")
    runs = [run for result in results for run in _runs_of(result)]
    kinds = ("decode", "prefill")
    rows = [(i, _point(kind, row), row) for i, run in enumerate(runs) for kind in kinds for row in run[kind]]
    last = {point: i for i, point, _ in rows} | {point: i for i, point, row in rows if not _skipped(row)}
    for i, run in enumerate(runs):
        for kind in kinds:
            run[kind] = [row for row in run[kind] if last[_point(kind, row)] == i]
    runs = [run for run in runs if run["decode"] or run["prefill"]]
    first = runs[0]
    merged = {
        "machine": {
            **first["machine"],
            "merged_runs": [{k: r["machine"].get(k) for k in ("gpu", "commit", "command")} for r in runs],
        },
        "environment": first["environment"],
        "models": {},
        "decode": [],
        "prefill": [],
        "copy_bandwidth_bytes_per_s": first["copy_bandwidth_bytes_per_s"],
        "copy_bandwidth_per_run": [r["copy_bandwidth_bytes_per_s"] for r in runs],
        "memory": first["memory"],
    }
    for i, run in enumerate(runs):
        archs = {row["arch"] for kind in ("decode", "prefill") for row in run[kind]}
        merged["models"].update({arch: model for arch, model in run["models"].items() if arch in archs})
        for kind in ("decode", "prefill"):
            merged[kind] += [{**row, "run": i} for row in run[kind]]
    fields = {k: v for k, v in first["environment"]["plan"].items() if k in Plan.__dataclass_fields__}
    merged["targets"] = check_targets(merged, Plan(**fields))
    return merged


def _skipped(row: dict) -> bool:
    return row.get("status") == SKIPPED


def _point(kind: str, row: dict) -> tuple:
    return kind, row["arch"], row.get("batch"), row.get("context"), row.get("length")


def _runs_of(result: dict) -> list[dict]:
    """A results dict as the runs it holds: itself, or each run a merged file joined (rows untagged again)."""
    joined = result["machine"].get("merged_runs")
    if not joined:
        return [{**result, "decode": list(result["decode"]), "prefill": list(result["prefill"])}]
    machine = {k: v for k, v in result["machine"].items() if k != "merged_runs"}
    return [
        {
            **result,
            "machine": {**machine, **run_machine},
            "copy_bandwidth_bytes_per_s": result["copy_bandwidth_per_run"][i],
            **{
                kind: [{k: v for k, v in row.items() if k != "run"} for row in result[kind] if row["run"] == i]
                for kind in ("decode", "prefill")
            },
        }
        for i, run_machine in enumerate(joined)
    ]


# --- outputs ---------------------------------------------------------------------------------------------------------
def plot(results: dict, json_path: Path) -> None:
    """Draw `<json stem>.png` (decode tokens/s against context, one panel per batch) and `<json stem>-memory.png`
    (cache bytes per sequence against context, peak prefill memory) beside the results file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (run --plot-only on the JSON elsewhere)")
        return
    decode = list(mean_by_point([r for r in results["decode"] if r["status"] == "ok"]).values())
    batches = sorted({r["batch"] for r in decode}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        _lines(
            ax, [r for r in decode if r["batch"] == batch], "context", "tokens_per_s", f"decode tok/s, batch {batch}"
        )
    device = results["machine"]["gpu"] or "CPU"
    fig.suptitle(f"0.4B models, random weights, {results['environment']['dtype']}, {device}")
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=120)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _lines(left, results["memory"], "context", "cache_bytes_per_seq", "decode cache bytes per sequence")
    prefill = [r for r in results["prefill"] if r["status"] == "ok" and r.get("peak_memory_bytes")]
    _lines(right, prefill, "length", "peak_memory_bytes", "peak GPU bytes, prefill at batch 1")
    fig.tight_layout()
    fig.savefig(json_path.with_name(f"{json_path.stem}-memory.png"), dpi=120)
    plt.close("all")


def _lines(ax: object, rows: list[dict], x: str, y: str, title: str) -> None:
    """One line per architecture (labelled with its decode mode where the rows have one), log-log axes."""
    for arch in ARCHS:
        mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r[x])
        if mine:
            label = f"{arch} ({mine[0]['mode']})" if "mode" in mine[0] else arch
            ax.plot([r[x] for r in mine], [r[y] for r in mine], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel=x, title=title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the trimmed GPU run (~5 min)")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny configs, a few tokens (tests)")
    mode.add_argument("--plot-only", type=Path, metavar="JSON", help="draw the figures of an existing JSON")
    mode.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON",
        help="join runs split with --archs (a later run's points replace earlier rows of them), then plot",
    )  # fmt: skip
    add_output_args(parser)
    parser.add_argument("--budget-s", type=float, default=None, help="skip points once this many seconds have passed")
    parser.add_argument(
        "--no-compile", action="store_true", help="graph-capture decode steps without torch.compile (default: compile)"
    )
    parser.add_argument(
        "--no-freeze", action="store_true", help="compile decode steps without Inductor freezing (default: freeze)"
    )
    parser.add_argument(
        "--no-combo-kernels", action="store_true", help="compile decode steps without Inductor combo kernels"
    )
    parser.add_argument(
        "--cublas-projections",
        action="store_true",
        help="run every projection on F.linear (cuBLAS) instead of hlsa's decode GEMM kernel (default: the kernel)",
    )
    parser.add_argument("--archs", default=None, help="comma-separated subset of the mode's architectures")
    parser.add_argument("--batches", default=None, help="comma-separated decode batches (default: the mode's)")
    parser.add_argument(
        "--contexts", default=None, help="comma-separated decode contexts for every architecture (default: the mode's)"
    )
    parser.add_argument("--no-prefill", action="store_true", help="time decode only (no prefill points)")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only)
        return
    if args.merge:
        merged = merge([json.loads(path.read_text()) for path in args.merge])
        # named after the GPU the runs measured, not the machine that merges them
        path = write_result(result_path("e2e", args.out, gpu=merged["machine"]["gpu"]), merged)
        print(f"wrote {path}")
        plot(merged, path)
        return
    plan = replace(
        make_plan(args), compile=not args.no_compile, freeze=not args.no_freeze,
        combo_kernels=not args.no_combo_kernels, projections="torch" if args.cublas_projections else "auto",
    )  # fmt: skip
    if args.archs:
        keep = args.archs.split(",")
        unknown = sorted(set(keep) - set(ARCHS))
        if unknown:
            raise SystemExit(f"--archs: unknown {unknown}; choose from {', '.join(ARCHS)}")
        plan = replace(
            plan,
            decode_archs=tuple(a for a in plan.decode_archs if a in keep),
            prefill_archs=tuple(a for a in plan.prefill_archs if a in keep),
        )
    if args.batches:
        plan = replace(plan, batches=positive_ints(args.batches, "--batches"))
    if args.contexts:  # the same contexts for every architecture: the mode's extra ones are dropped
        plan = replace(plan, contexts=positive_ints(args.contexts, "--contexts"), extra_contexts={})
    if args.no_prefill:
        plan = replace(plan, prefill_archs=())
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke for the CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend (CI runs tests in parallel)
        args.out = args.out or Path(tempfile.mkdtemp(prefix="e2e_smoke_"))
    path = result_path("e2e", args.out)
    deadline = time.monotonic() + plan.budget_s
    torch.manual_seed(0)
    results = {"machine": machine(args.commit), "environment": environment(plan), "models": {}, "decode": []}
    results["prefill"] = []
    with torch.no_grad():
        # the eager copy, as every e2e run so far has used: the roofline of the results files is comparable
        results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(plan.device, plan.copy_bytes)["eager"] * 1e9
        print(f"copy bandwidth (read + write): {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
        results["memory"] = memory_table(plan)
        for arch in dict.fromkeys(plan.decode_archs + plan.prefill_archs):
            run_arch(arch, plan, deadline, results, path)
    results["targets"] = check_targets(results, plan)
    write_result(path, results)
    print(f"wrote {path}")
    for check in results["targets"]:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        print(f"{check['verdict']:12s} {check['target']}  (measured {value})")
    plot(results, path)


if __name__ == "__main__":
    main()
