"""Decode-step cost of each eviction policy against `learned`: the 0.4B GDN+LTE model on one GPU, batch 1 and 64.

`model.set_eviction(policy)` changes which older tokens an LTE layer's buffer keeps (`hlsa.layers.eviction`); the
cache layout and the kernels stay the same. What a decode step computes besides differs: every policy runs the
router's step (its score is only used under `learned`), `random` hashes the position, `key_norm` takes the norm
of the new key, `delta_write` takes one delta-rule step of its memory (`D x D` floats per kv head, read and written),
`window` and `snapkv` score the new token 0, and `h2o` / `tova` also take the softmax weights of the step's own
attention (the Triton kernel writes the logits and log-sum-exp, a torch pass over `[B, HQ, S]` floats normalises
them) and rewrite every slot's score.

* Model: `configs/gdn_lte_0.4B.json` with random weights (a step's work, hence its time, does not depend on the
  values), bf16, the projections on hlsa's decode GEMM (`e2e_models.build_model`); every policy gets the same buffer
  (`--buffer-size`, default the config's N), so the same cache bytes.
* Cache: `e2e_models.synthetic_cache` at each context, the state a prefill of that many tokens leaves under the
  policy: ring and buffer full, but under `window` (no token scores positively) a buffer of the sinks alone, whose
  other slots decode attention does not fetch. No kernel's work depends on the scores otherwise, so no real prefill
  is needed (`tests/test_arena_decode_smoke.py` checks the valid slots against real prefills of the tiny model).
* Step: `e2e_timing.prepare_step`, two eager warm-up steps, then one step captured in a CUDA graph, without
  torch.compile (a compile with freezing costs about a minute per policy and batch, more than this run's budget;
  `e2e.py` and `e2e_compile.py` time the compiled `learned` step). A policy whose capture fails is timed eagerly and
  recorded as such (`mode`, `graph_error`); its launch gaps then count, so its ratio is not comparable.
* Timing: every policy of a (batch, context) point is prepared first, each with a cache and a graph of its own
  (at batch 64 about 4.4 GiB each); then `--rounds` rounds replay `--steps` steps of each policy in turn, in reverse
  order every other round, so that the drift of step times over a process's lifetime (docs/efficiency.md) falls
  on every policy alike. `ms_per_step` is the median over rounds; `ratio_to_learned` the median over rounds of the
  policy's time over `learned`'s in the same round.
* Bytes and roofline: `step_bytes_per_seq` (the cache bytes a step must move per sequence, `e2e_models`) and the
  roofline of `e2e.py`, (weights + batch x those bytes) / the eager device copy bandwidth; `roofline_fraction` is
  the roofline step time over the measured one. The `[B, HQ, S]` float pass of `h2o` / `tova` is scratch, not
  cache, and is not counted.
* `oracle` is not timed: it attends over every key of the context, so it has no constant cache (a prefill into a
  decode cache refuses it) and no decode step.

    python3 benchmarks/arena_decode.py [--out DIR]          # GPU, ~2 min (default DIR: benchmarks/results)
    python3 benchmarks/arena_decode.py --smoke --out DIR    # CPU, tiny config, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchlib import (
    REPO,
    add_output_args,
    copy_bandwidth,
    error_text,
    machine,
    median_seconds,
    positive_ints,
    result_path,
    write_result,
)
from e2e import environment
from e2e_models import (
    K,
    Plan,
    build_model,
    model_info,
    retained_slots,
    roofline_tokens_per_s,
    step_bytes_per_seq,
    synthetic_cache,
)
from e2e_timing import gpu_state, peak_memory, prepare_step, reset_memory, set_seen
from hlsa.layers.eviction import POLICIES
from hlsa.model import HybridForCausalLM

ARCH = "gdn_lte"
SKIPPED = {
    "oracle": "no constant cache: it attends over every key of the context, so a prefill into a decode cache "
    "refuses it and there is no decode step to time",
}
TIMED = tuple(p for p in POLICIES if p not in SKIPPED)
WEIGHTS_NOTE = "random weights: a decode step's work, hence its time, does not depend on the weights' values"


def make_plan(args: argparse.Namespace) -> Plan:
    """The GPU run (0.4B, bf16, CUDA graphs) or the smoke run (tiny config, fp32, CPU, eager); `repeats` are the
    rounds, `steps` the steps of one policy per round."""
    common = {"decode_archs": (ARCH,), "prefill_archs": (), "prefill_lengths": (), "bracket_archs": (),
              "compile": False}  # fmt: skip
    if args.smoke:
        return Plan(
            mode="smoke", config_dir=REPO / "configs" / "tiny", suffix="", device="cpu", dtype=torch.float32,
            contexts=args.contexts or (64,), batches=args.batches or (1, 2), steps=args.steps or 2,
            repeats=args.rounds or 2, budget_s=args.budget_s or 60.0, copy_bytes=2**22, **common,
        )  # fmt: skip
    return Plan(
        mode="gpu", contexts=args.contexts or (4 * K,), batches=args.batches or (1, 64), steps=args.steps or 16,
        repeats=args.rounds or 15, budget_s=args.budget_s or 120.0, **common,
    )  # fmt: skip


# --- one (batch, context) point --------------------------------------------------------------------------------------
def prepare_policy(
    model: HybridForCausalLM, policy: str, batch: int, context: int, plan: Plan, buffer_size: int | None
) -> dict:
    """One policy's synthetic cache and its decode step, ready to replay (`prepare_step`): a CUDA graph on the GPU,
    an eager call otherwise or when the capture fails (then `graph_error`). Also the bytes of its cache and step."""
    model.set_eviction(policy, buffer_size=buffer_size)
    entry = {"policy": policy, "mode": "graph" if plan.device == "cuda" else "eager"}
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=plan.device)
    cache = synthetic_cache(model, batch, context)
    try:
        step, seen = prepare_step(model, cache, token, plan, graph=entry["mode"] == "graph", compiled=False)
    except Exception as err:  # a failed capture is reported, then the policy is timed eagerly
        if entry["mode"] == "eager" or isinstance(err, torch.OutOfMemoryError):
            raise
        entry.update(mode="eager", graph_error=error_text(err))
        cache = synthetic_cache(model, batch, context)
        step, seen = prepare_step(model, cache, token, plan, graph=False, compiled=False)
    lte = next(block.attn for block in model.model.layers if block.kind == "lte")
    return {
        **entry, "cache": cache, "step": step, "seen": seen, "seconds": [], "buffer_kept": retained_slots(lte),
        "step_bytes_per_seq": step_bytes_per_seq(model, cache, context, batch),
        "cache_bytes_per_seq": cache.nbytes() // batch,
    }  # fmt: skip


def time_rounds(
    model: HybridForCausalLM, entries: list[dict], plan: Plan, deadline: float, buffer_size: int | None
) -> int:
    """`plan.repeats` rounds (fewer past the deadline, at least one), each timing `plan.steps` steps of every
    policy, in reverse order every other round; appends seconds per step to each entry. Returns the rounds run."""
    cuda = plan.device == "cuda"
    for r in range(plan.repeats):
        if r and time.monotonic() > deadline:
            return r
        for entry in entries if r % 2 == 0 else entries[::-1]:
            model.set_eviction(entry["policy"], buffer_size=buffer_size)  # an eager step reads it at each call

            def run(step: object = entry["step"]) -> None:
                for _ in range(plan.steps):
                    step()

            entry["seconds"].append(median_seconds(run, 1, cuda) / plan.steps)
            entry["seen"] += plan.steps  # a replay moves the device positions, not the host counters
            set_seen(entry["cache"], entry["seen"])
    return plan.repeats


def point_rows(entries: list[dict], batch: int, context: int, weights: int, bandwidth: float | None) -> list[dict]:
    """The rows of one point's timed policies: ms per step, ratio to `learned` (per round, then the median), bytes
    and roofline (None without a bandwidth, as in the smoke run)."""
    learned = next((e["seconds"] for e in entries if e["policy"] == "learned"), None)
    rows = []
    for e in entries:
        seconds = statistics.median(e["seconds"])
        row = {"policy": e["policy"], "batch": batch, "context": context, "status": "ok", "mode": e["mode"],
               "ms_per_step": seconds * 1e3, "round_ms": [s * 1e3 for s in e["seconds"]],
               "tokens_per_s": batch / seconds,
               "ratio_to_learned": statistics.median(s / t for s, t in zip(e["seconds"], learned)) if learned else None,
               "buffer_kept": e["buffer_kept"], "step_bytes_per_seq": e["step_bytes_per_seq"],
               "cache_bytes_per_seq": e["cache_bytes_per_seq"], "roofline_ms": None,
               "roofline_fraction": None}  # fmt: skip
        if "graph_error" in e:
            row["graph_error"] = e["graph_error"]
        if bandwidth:
            roofline_s = batch / roofline_tokens_per_s(weights, e["step_bytes_per_seq"], batch, bandwidth)
            row.update(roofline_ms=roofline_s * 1e3, roofline_fraction=roofline_s / seconds)
        rows.append(row)
    return rows


def run_point(
    model: HybridForCausalLM, batch: int, context: int, policies: tuple[str, ...], plan: Plan, deadline: float,
    buffer_size: int | None, weights: int, bandwidth: float | None,
) -> list[dict]:  # fmt: skip
    """Every policy at one (batch, context): prepared, timed in interleaved rounds, then freed. A policy that runs
    out of memory or fails is recorded (`status`) and the others are timed without it."""
    reset_memory(plan)
    entries, failed = [], []
    for policy in policies:
        try:
            entries.append(prepare_policy(model, policy, batch, context, plan, buffer_size))
        except torch.OutOfMemoryError:
            failed.append({"policy": policy, "batch": batch, "context": context, "status": "oom"})
        except Exception as err:  # one broken policy must not cost the rest of a one-shot GPU run
            status = f"error: {error_text(err)}"
            failed.append({"policy": policy, "batch": batch, "context": context, "status": status})
    rounds = time_rounds(model, entries, plan, deadline, buffer_size) if entries else 0
    rows = point_rows(entries, batch, context, weights, bandwidth)
    shared = {"rounds": rounds, "steps_per_round": plan.steps, "gpu": gpu_state(plan),
              "point_peak_memory_bytes": peak_memory(plan)}  # fmt: skip
    del entries
    reset_memory(plan)
    return [{**row, **shared} for row in rows] + failed


# --- the run ---------------------------------------------------------------------------------------------------------
def describe(row: dict) -> str:
    head = f"B={row['batch']:>3} C={row['context']:>6}  {row['policy']:9s}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    ratio = "-" if row["ratio_to_learned"] is None else f"{row['ratio_to_learned']:.3f}"
    roofline = "-" if row["roofline_fraction"] is None else f"{row['roofline_fraction']:.0%}"
    return (
        f"{head} {row['mode']:5s} {row['ms_per_step']:9.3f} ms/step  x{ratio:>6} learned  "
        f"{row['step_bytes_per_seq'] / 2**20:9.3f} MiB/seq  roofline {roofline:>4}"
    )


def parse_policies(text: str | None) -> tuple[str, ...]:
    """The policies to time, `learned` (the reference) first and always included."""
    names = TIMED if text is None else tuple(x for x in text.split(",") if x)
    for name in names:
        if name in SKIPPED:
            raise SystemExit(f"--policies: {name} is not timed: {SKIPPED[name]}")
        if name not in TIMED:
            raise SystemExit(f"--policies: unknown {name!r}; choose from {','.join(TIMED)}")
    return ("learned", *dict.fromkeys(n for n in names if n != "learned"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, eager steps, no roofline (tests)")
    add_output_args(parser)
    parser.add_argument("--batches", default=None, help="comma-separated batches (default 1,64; smoke 1,2)")
    parser.add_argument("--contexts", default=None, help="comma-separated contexts (default 4096; smoke 64)")
    parser.add_argument("--policies", default=None, help=f"comma-separated subset of {','.join(TIMED)} (learned "
                        "is always timed: the reference)")  # fmt: skip
    parser.add_argument("--buffer-size", type=int, default=None, help="buffer slots N of every LTE layer "
                        "(default: the config's)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per point (default 15; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per policy and round (default 16; smoke 2)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no point and no further round after "
                        "this many seconds (default 120; smoke 60)")  # fmt: skip
    args = parser.parse_args()
    args.batches, args.contexts = (
        None if text is None else positive_ints(text, option)
        for text, option in ((args.batches, "--batches"), (args.contexts, "--contexts"))
    )
    if (args.rounds is not None and args.rounds < 1) or (args.steps is not None and args.steps < 1):
        raise SystemExit("--rounds and --steps must be positive")
    policies = parse_policies(args.policies)
    plan = make_plan(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke for the CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend (CI runs tests in parallel)
        args.out = args.out or Path(tempfile.mkdtemp(prefix="arena_decode_smoke_"))
    deadline = time.monotonic() + plan.budget_s
    path = result_path("arena_decode", args.out)
    print(f"{ARCH}: {WEIGHTS_NOTE}", flush=True)
    for policy, reason in SKIPPED.items():
        print(f"{policy}: skipped, {reason}", flush=True)
    torch.manual_seed(0)
    model = build_model(ARCH, plan)
    lte = next(block.attn for block in model.model.layers if block.kind == "lte")
    info = model_info(model)
    results = {
        "machine": machine(args.commit),
        "environment": {
            **environment(plan),
            "arch": ARCH,
            "config": f"{ARCH}{plan.suffix}.json",
            "buffer_size": args.buffer_size or lte.buffer_size,
            "window_size": lte.window_size,
            "sink_size": lte.sink_size,
            "policies": list(policies),
            "compiled": False,
        },
        "note": WEIGHTS_NOTE,
        "skipped_policies": SKIPPED,
        "model": info,
        "copy_bandwidth_bytes_per_s": None,
        "decode": [],
    }
    with torch.no_grad():
        if plan.device == "cuda":  # the eager copy, as e2e.py uses: the rooflines of the two are comparable
            results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(plan.device, plan.copy_bytes)["eager"] * 1e9
            print(f"copy bandwidth (read + write): {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
        for batch in plan.batches:
            for context in plan.contexts:
                if time.monotonic() > deadline:
                    rows = [{"policy": p, "batch": batch, "context": context, "status": "skipped (time budget)"}
                            for p in policies]  # fmt: skip
                else:
                    rows = run_point(
                        model, batch, context, policies, plan, deadline, args.buffer_size, info["weight_bytes"],
                        results["copy_bandwidth_bytes_per_s"],
                    )  # fmt: skip
                for row in rows:
                    print(describe(row), flush=True)
                results["decode"] += rows
                write_result(path, results)  # a run cut short keeps what it measured
    print(f"wrote {path}")
    print("\nsummary (ratio: the policy's step over learned's, same rounds):")
    for row in results["decode"]:
        print(describe(row))


if __name__ == "__main__":
    main()
