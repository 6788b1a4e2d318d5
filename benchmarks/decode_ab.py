"""Decode-step A/B between two source trees, on one machine and in one call.

The GDN+LTE batch-64 step moves by ~1% between processes and the roofline, with the bandwidth each process measures,
by ~2% between machine starts (docs/efficiency.md): more than most single changes save. This script times the decode
step of each tree (`e2e_timing.decode_point`: compiled and graph-replayed on the GPU) in processes of its own,
alternating the trees, so that all see the same machine; it prints every process's ms per step and each tree's median
against the first tree's (the base).

    git archive REV src benchmarks configs | tar -x -C /tmp/base       # a tree: src/, benchmarks/ and configs/
    python3 benchmarks/decode_ab.py /tmp/base . [/tmp/other ...] [--arch gdn_lte] [--batch 64] [--context 4096]
        [--rounds 2]

`--smoke`: the tiny configs on the CPU, eager (tests). Writes `decode_ab-<gpu>.json` to `--out DIR` (default
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchlib import add_output_args, machine, result_path, write_result

POINTS = 3  # timed points per process: the first compiles, the others reuse its graph


def worker(args: argparse.Namespace) -> None:
    """In a tree's root: time its step `POINTS` times and print `{"ms": [...]}` as the last line."""
    sys.path.insert(0, str(Path("benchmarks").resolve()))  # the tree's own benchmark modules, ahead of this file's
    import e2e_models
    import e2e_timing

    plan = e2e_models.make_plan(argparse.Namespace(smoke=args.smoke, quick=not args.smoke, budget_s=None))
    model = e2e_models.build_model(args.arch, plan)
    with torch.no_grad():
        rows = [
            e2e_timing.decode_point(model, args.arch, args.batch, args.context, plan, fresh_compile=i == 0)
            for i in range(POINTS)
        ]
    if any(row["status"] != "ok" for row in rows):
        raise SystemExit(f"decode_ab: a point failed: {rows}")
    print(json.dumps({"ms": [row["latency_ms"] for row in rows], "mode": rows[0]["mode"]}))


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    """One worker process in `tree` (its `src/` first on the path)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--arch", args.arch, "--batch",
               str(args.batch), "--context", str(args.context)] + (["--smoke"] if args.smoke else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"decode_ab: the worker in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", type=Path, nargs="*", help="two or more source trees, the base first")
    parser.add_argument("--arch", default="gdn_lte")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2, help="processes per tree, alternating A, B, ..., A, B, ...")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (tests)")
    add_output_args(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if len(args.trees) < 2:
        parser.error("give two or more trees, the base first")
    trees = [tree.resolve() for tree in args.trees]
    for tree in trees:
        if not (tree / "src" / "hlsa").is_dir() or not (tree / "benchmarks" / "e2e_timing.py").is_file():
            parser.error(f"{tree} is not a source tree: it needs src/hlsa and benchmarks/e2e_timing.py")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    names = [chr(ord("A") + i) for i in range(len(trees))]
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name, tree in zip(names, trees):
            got = run_tree(tree, args)
            ms[name] += got["ms"]
            print(
                f"round {r + 1} {name} ({tree}): {got['mode']}, ms per step " + " ".join(f"{t:.4f}" for t in got["ms"])
            )
    median = {name: statistics.median(values) for name, values in ms.items()}
    diff_us = {name: (median[name] - median["A"]) * 1e3 for name in names[1:]}
    print(
        f"median ms per step: {', '.join(f'{name} {median[name]:.4f}' for name in names)}; "
        + ", ".join(f"{name} - A = {d:+.1f} us" for name, d in diff_us.items())
        + " per step"
    )
    result = {
        "machine": machine(args.commit),
        "trees": {name: str(tree) for name, tree in zip(names, trees)},
        "arch": args.arch,
        "batch": args.batch,
        "context": args.context,
        "ms_per_step": ms,
        "median_ms": median,
        "minus_a_us": diff_us,
    }
    print(f"wrote {write_result(result_path('decode_ab', args.out), result)}")


if __name__ == "__main__":
    main()
