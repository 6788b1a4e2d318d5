"""Where the time goes: kernel tables of decode steps and training steps.

`e2e.py` times decode steps and `train.py` training steps; this script names the kernels behind their times.
Per architecture it profiles (`torch.profiler`) a few eager decode steps of the 0.4B model on a synthetic cache
(`e2e_models.synthetic_cache`) and a few real trainer steps (`Trainer.train_step`, bf16 autocast, synthetic MQAR rows),
and reports per phase: kernels per step, device time per step, and the kernels (CPU: aten operations) with the most
total time, with their counts; for decode also the kernels of one step in launch order (`sequence`). Eager or
`--compile`d steps run launch by launch, so the host-side launch cost shows up too (wall time per step next to device
time); `--graph` profiles replays of the step captured in a CUDA graph, as `e2e.py` times it (the profile of launched
steps can disagree with the replayed step about what removing kernels saves).

    PYTHONPATH=src python3 benchmarks/kernel_profile.py [--out DIR]          # GPU: gdn_lte and gdn_swa, ~2 min
    PYTHONPATH=src python3 benchmarks/kernel_profile.py --smoke --out DIR    # CPU, tiny configs, seconds (tests)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import e2e
import e2e_models
import e2e_timing
import train as train_bench  # the LTE routers' operating point
from benchlib import add_output_args, machine, profiled, result_path, write_result
from hlsa.config import HybridConfig


def step_sequence(fn, cuda: bool) -> list[list]:
    """The kernels (CPU: aten operations) of one call of `fn`, in launch order, as `[name, microseconds, idle]` rows:
    the per-layer view that the totals of `kernel_table` hide. `idle` is the time in microseconds from the end of the
    previous row to the start of this one: on a replayed CUDA graph, the cost of a kernel boundary beyond the
    kernels' own durations."""
    device = DeviceType.CUDA if cuda else DeviceType.CPU
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = [
        e
        for e in prof.events()
        if e.device_type == device and (cuda or (e.name.startswith("aten::") and not e.cpu_parent))
    ]
    events.sort(key=lambda e: e.time_range.start)
    ends = [events[0].time_range.start if events else 0] + [e.time_range.end for e in events]
    return [
        [e.name[:160], round(e.time_range.elapsed_us(), 2), round(max(0, e.time_range.start - end), 2)]
        for e, end in zip(events, ends, strict=False)
    ]


@torch.no_grad()
def decode_profile(
    arch: str, plan: e2e_models.Plan, batch: int, context: int, steps: int, compiled: bool = False, graph: bool = False
) -> dict:
    """Kernels of eager decode steps, or with `compiled` of the `torch.compile`d step that `e2e.py` times; with
    `graph` of replays of that step captured in a CUDA graph, as `e2e.py` times it (without, host launch gaps show in
    the wall time, and the kernels run one launch at a time)."""
    model = e2e_models.build_model(arch, plan)
    cache = e2e_models.synthetic_cache(model, batch, context)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=plan.device)
    step, seen = e2e_timing.prepare_step(model, cache, token, plan, graph=graph, compiled=compiled)
    with e2e_timing.compile_options(plan, cache):  # the settings the compiled step was built under: no recompile
        table, wall_ms = profiled(step, steps, plan.device == "cuda")
        sequence = step_sequence(step, plan.device == "cuda")
    if graph:
        e2e_timing.set_seen(cache, seen + steps + 1)
    busy, idle = sum(row[1] for row in sequence), sum(row[2] for row in sequence)
    return {
        "batch": batch,
        "context": context,
        "compiled": compiled,
        "frozen": compiled and plan.freeze,
        "graph": graph,
        "wall_ms_per_step": wall_ms,
        **table,
        "sequence_busy_us": round(busy, 1),
        "sequence_idle_us": round(idle, 1),
        "sequence": sequence,
    }


def train_profile(
    arch: str, plan: e2e_models.Plan, batch: int, seq_len: int, steps: int, workdir: Path, lte_kept: int | None = None
) -> dict:
    config = workdir / f"{arch}.json"
    HybridConfig.from_json_file(str(plan.config_dir / f"{arch}{plan.suffix}.json")).to_json_file(str(config))
    trainer, _ = train_bench.synthetic_trainer(
        config,
        batch=batch,
        seq_len=seq_len,
        steps=steps + 2,
        workdir=workdir,
        device=plan.device,
        dtype="bf16" if plan.device == "cuda" else "fp32",
        lte_kept=lte_kept,  # the controller's steady state (train.py)
    )
    for s in (1, 2):  # warm-up: compilation, autotuning, the optimizer's state allocation
        trainer.train_step(s)
    counter = iter(range(3, steps + 3))
    table, wall_ms = profiled(lambda: trainer.train_step(next(counter)), steps, plan.device == "cuda")
    return {"batch": batch, "seq_len": seq_len, "wall_ms_per_step": wall_ms, **table}


def show(arch: str, phase: str, r: dict) -> None:
    print(
        f"\n{arch} {phase}: {r['kernels_per_step']:.0f} {r['unit']}/step, "
        f"{r['device_us_per_step'] / 1e3:.2f} ms device, {r['wall_ms_per_step']:.2f} ms wall"
    )
    if "sequence_idle_us" in r:
        print(f"  one step: {r['sequence_busy_us']:.1f} us busy, {r['sequence_idle_us']:.1f} us idle between rows")
    for row in r["top"][:12]:
        print(f"  {row['us_per_step']:10.1f} us  x{row['per_step']:6.1f}  {row['name'][:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs (tests)")
    parser.add_argument("--archs", default="gdn_lte,gdn_swa")
    parser.add_argument("--batch", type=int, default=16, help="decode batch")
    parser.add_argument("--context", type=int, default=65536, help="decode context")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phases", default="decode,train", help="comma-separated subset of decode,train")
    parser.add_argument(
        "--lte-kept", type=train_bench.kept_arg, default=512, help="LTE tokens kept per head while training, or 'init'"
    )
    parser.add_argument("--compile", action="store_true", help="profile the torch.compiled decode step (GPU)")
    parser.add_argument("--graph", action="store_true", help="profile replays of the decode step's CUDA graph (GPU)")
    add_output_args(parser)
    args = parser.parse_args()
    if args.smoke:
        plan = e2e_models.Plan(mode="smoke", config_dir=e2e_models.REPO / "configs" / "tiny", suffix="", device="cpu",
                        dtype=torch.float32, decode_archs=(), contexts=(), prefill_archs=(), prefill_lengths=(),
                        budget_s=0.0)  # fmt: skip
        args.batch, args.context, args.train_batch, args.seq_len, args.lte_kept = 2, 48, 2, 32, 8
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --smoke for the CPU check")
        plan = e2e_models.Plan(
            mode="profile", decode_archs=(), contexts=(), prefill_archs=(), prefill_lengths=(), budget_s=0.0
        )
    if args.graph and plan.device != "cuda":
        raise SystemExit("--graph captures CUDA graphs: it needs a GPU (not --smoke)")
    results = {"machine": machine(args.commit), "environment": e2e.environment(plan), "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        phases = args.phases.split(",")
        for arch in args.archs.split(","):
            results["archs"][arch] = mine = {}
            if "decode" in phases:
                mine["decode"] = decode_profile(
                    arch, plan, args.batch, args.context, args.steps, args.compile, args.graph
                )
                show(arch, f"decode B={args.batch} C={args.context}", mine["decode"])
            if "train" in phases:
                mine["train"] = train_profile(
                    arch, plan, args.train_batch, args.seq_len, args.steps, Path(tmp), args.lte_kept
                )
                show(arch, f"train {args.train_batch}x{args.seq_len}", mine["train"])
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    path = write_result(result_path("kernel_profile", args.out), results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
