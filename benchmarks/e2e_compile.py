"""Graph-only against torch.compile + graph decode steps of one 0.4B architecture (issue 7), in one process.

The points are interleaved (graph-only at batch 1 and 64, compiled at 1, 16 and 64, graph-only at 1 and 64 again)
so that the slow drift of step times over a process's lifetime (docs/efficiency.md) shows up as the difference
between the first and the last graph-only timings instead of passing for a compile effect. Rows are `e2e.py`
decode rows (plus `wall_s`, the seconds a point took, compile included).

    python3 benchmarks/e2e_compile.py --out DIR --commit SHA     # GPU, ~2 min for gdn_lte
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the sibling benchmark: models, synthetic caches, decode timing)

ORDER = ((False, 1), (False, 64), (True, 1), (True, 16), (True, 64), (False, 1), (False, 64))  # (compiled, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gdn_lte", choices=e2e.ARCHS)
    parser.add_argument("--context", type=int, default=64 * e2e.K)
    parser.add_argument("--out", type=Path, default=e2e.REPO / "benchmarks" / "results")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the comparison is about CUDA graphs")
    plan = e2e.Plan(
        mode="compile", decode_archs=(args.arch,), contexts=(args.context,), prefill_archs=(), prefill_lengths=(),
        budget_s=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = e2e.build_model(args.arch, plan)
    if e2e.graph_blocker(model) is not None:
        raise SystemExit(f"{args.arch}: {e2e.graph_blocker(model)}; only graph-safe architectures are compiled")
    rows = []
    with torch.no_grad():
        for order, (compiled, batch) in enumerate(ORDER):
            t0 = time.monotonic()
            row = e2e.decode_point(model, args.arch, batch, args.context, replace(plan, compile=compiled))
            rows.append({**row, "order": order, "wall_s": time.monotonic() - t0})
            print(f"compiled={compiled!s:5} B={batch:>3}  {row.get('latency_ms', float('nan')):7.3f} ms/step  "
                  f"{row.get('tokens_per_s', float('nan')):9.0f} tok/s  ({row['status']})", flush=True)  # fmt: skip
    out = {"environment": e2e.environment(plan, args.commit), "decode": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e_compile_h200.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out / 'e2e_compile_h200.json'}")


if __name__ == "__main__":
    main()
