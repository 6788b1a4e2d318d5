"""Graph-only against torch.compile + graph decode steps of one 0.4B architecture, in one process.

The points are interleaved (graph-only at batch 1 and 64, compiled at 1, 16 and 64, graph-only at 1 and 64 again)
so that the slow drift of step times over a process's lifetime (docs/efficiency.md) shows up as the difference
between the first and the last graph-only timings instead of passing for a compile effect. Rows are `e2e.py`
decode rows (plus `wall_s`, the seconds a point took, compile included).

    python3 benchmarks/e2e_compile.py [--out DIR] [--commit SHA]     # GPU, ~2 min for gdn_lte
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import e2e
import e2e_models
from benchlib import add_output_args, machine, result_path, write_result
from e2e_timing import decode_point

ORDER = ((False, 1), (False, 64), (True, 1), (True, 16), (True, 64), (False, 1), (False, 64))  # (compiled, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gdn_lte", choices=e2e_models.ARCHS)
    parser.add_argument("--context", type=int, default=64 * e2e_models.K)
    add_output_args(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the comparison is about CUDA graphs")
    plan = e2e_models.Plan(
        mode="compile", decode_archs=(args.arch,), contexts=(args.context,), prefill_archs=(), prefill_lengths=(),
        budget_s=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = e2e_models.build_model(args.arch, plan)
    rows = []
    with torch.no_grad():
        for order, (compiled, batch) in enumerate(ORDER):
            t0 = time.monotonic()
            row = decode_point(model, args.arch, batch, args.context, replace(plan, compile=compiled))
            rows.append({**row, "order": order, "wall_s": time.monotonic() - t0})
            print(f"compiled={compiled!s:5} B={batch:>3}  {row.get('latency_ms', float('nan')):7.3f} ms/step  "
                  f"{row.get('tokens_per_s', float('nan')):9.0f} tok/s  ({row['status']})", flush=True)  # fmt: skip
    out = {"machine": machine(args.commit), "environment": e2e.environment(plan), "decode": rows}
    print(f"wrote {write_result(result_path('e2e_compile', args.out), out)}")


if __name__ == "__main__":
    main()
