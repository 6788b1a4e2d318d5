"""Search for a demo recipe on a GPU: many tiny trainings side by side, recall by query distance for each.

Each run is the demo recipe (`configs/train/demo.toml` or `--recipe`) with some `section.key` values replaced (a
grid variant), trained for one architecture and seed by `hlsa.demo.train_arch` (the trainer behind
`hlsa demo --train`) and evaluated by `hlsa.demo.evaluate`, exactly as the demo does. Runs share the GPU, one
process each; every result is appended to `results.jsonl` as soon as it exists, so a sweep cut short by a time
limit still reports what finished. The summary gives, per variant and architecture, the mean and range over seeds.

The grid is a JSON file:

    {"common": {"train.steps": 1500}, "variants": {"p32_l2": {"data.num_pairs": 32, "demo.layers": 2}, ...},
     "archs": ["gdn_swa", "gdn_lte"], "seeds": [0, 1],
     "extra": [{"variant": "p32_l2", "arch": "transformer", "seed": 0}]}

    PYTHONPATH=src python benchmarks/demo_sweep.py --grid GRID.json --out DIR --jobs 12
    PYTHONPATH=src python benchmarks/demo_sweep.py --summary DIR/results.jsonl   # the table again
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hlsa import demo


def grid_jobs(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (variant, arch, seed) of the grid, seeds outermost so that a cut-short sweep has whole first seeds."""
    jobs = [
        {"variant": v, "arch": a, "seed": s} for s in grid["seeds"] for v in grid["variants"] for a in grid["archs"]
    ]
    jobs += grid.get("extra", [])
    unknown = sorted({j["variant"] for j in jobs} - set(grid["variants"]))
    if unknown:
        raise ValueError(f"grid: jobs name unknown variants {unknown}")
    return jobs


def recipe_for(base: dict[str, Any], overrides: dict[str, Any], seed: int, device: str) -> dict[str, Any]:
    """The base recipe with `section.key` overrides, the seed, the device, no progress bar and one checkpoint."""
    recipe = copy.deepcopy(base)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"grid override {dotted!r}: use section.key (data.num_pairs, demo.layers, ...)")
        recipe.setdefault(section, {})[key] = value
    recipe["train"].update(seed=seed, device=device)
    recipe["log"].update(progress=False, tensorboard=False)
    recipe["checkpoint"].update(interval=recipe["train"]["steps"], keep=1)
    return recipe


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one run (in a pool process)."""
    import torch

    from hlsa.model import HybridForCausalLM

    out = Path(job["out"]) / f"{job['variant']}__{job['arch']}__s{job['seed']}"
    recipe = job["recipe"]
    start = time.time()
    demo.train_arch(job["arch"], recipe, out / "export", out / "run", threads=1)
    seconds = time.time() - start
    model = HybridForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    result = demo.evaluate(model, demo.recipe_task(recipe), job["examples"], demo.recipe_window(recipe))
    log = [json.loads(line) for line in (out / "export" / "train_log.jsonl").read_text().splitlines()]
    tail = log[-max(1, len(log) // 10) :]
    return {
        **{k: job[k] for k in ("variant", "arch", "seed")},
        "overrides": job["overrides"],
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "final_loss": statistics.fmean(r["loss"] for r in tail),
        "loss_curve": [round(statistics.fmean(r["loss"] for r in log[i : i + 10]), 3) for i in range(0, len(log), 10)],
        "last_log": log[-1],
        **result,
    }


def _cell(values: list[float]) -> str:
    """A percentage, or the mean [min-max] of several."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} [{100 * min(values):.0f}-{100 * max(values):.0f}]"


def summary(rows: list[dict[str, Any]]) -> str:
    """Mean [min, max] over seeds of the recall per bucket, per variant and architecture."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["arch"]), []).append(r)
    head = ["variant", "arch", "seeds", *demo.BUCKET_NAMES, "overall", "loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (variant, arch), rs in sorted(groups.items()):
        accs = [_cell([r["accuracy"][b] for r in rs]) for b in demo.BUCKET_NAMES]
        loss = statistics.fmean(r["final_loss"] for r in rs)
        lines.append(
            f"| {variant} | {arch} | {len(rs)} | "
            + " | ".join(accs)
            + f" | {_cell([r['overall'] for r in rs])} | {loss:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="grid JSON (see above)")
    p.add_argument("--out", help="directory for runs, results.jsonl and summary.md")
    p.add_argument("--recipe", default=str(demo.DEFAULT_RECIPE), help="base recipe (default: the demo's)")
    p.add_argument("--jobs", type=int, default=8, help="runs at a time (processes sharing the device)")
    p.add_argument("--device", default="auto", help="train.device of every run")
    p.add_argument("--examples", type=int, default=256, help="evaluation sequences per run")
    p.add_argument("--summary", help="print the summary of an existing results.jsonl and exit")
    args = p.parse_args()
    if args.summary:
        print(summary([json.loads(line) for line in Path(args.summary).read_text().splitlines()]))
        return 0
    if not (args.grid and args.out):
        p.error("--grid and --out are required (or --summary)")
    grid = json.loads(Path(args.grid).read_text())
    base = demo.load_recipe(Path(args.recipe))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        {
            **j,
            "out": str(out),
            "examples": args.examples,
            "overrides": overrides,
            "recipe": recipe_for(base, overrides, j["seed"], args.device),
        }
        for j in grid_jobs(grid)
        for overrides in [{**grid.get("common", {}), **grid["variants"][j["variant"]]}]
    ]
    print(f"[sweep] {len(jobs)} runs, {args.jobs} at a time -> {out}", flush=True)
    rows = []
    with mp.get_context("spawn").Pool(args.jobs) as pool, (out / "results.jsonl").open("a") as sink:
        for row in pool.imap_unordered(run_job, jobs):
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            acc = " ".join(f"{b} {100 * row['accuracy'][b]:.1f}" for b in demo.BUCKET_NAMES)
            print(
                f"[sweep] {row['variant']} {row['arch']} s{row['seed']}: {acc} loss {row['final_loss']:.2f} "
                f"({row['train_seconds']:.0f} s)",
                flush=True,
            )
    table = summary(rows)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
