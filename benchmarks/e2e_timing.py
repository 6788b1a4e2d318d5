"""Timing of one decode or prefill point for benchmarks/e2e.py: the decode step (eager, compiled, replayed from a
CUDA graph), its median time, and the GPU's clocks and temperature after each point."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchlib import error_text, median_seconds
from e2e_models import HEADROOM, Plan, mark_growing_dynamic, step_bytes_per_seq, synthetic_cache
from hlsa.cache import HybridCache
from hlsa.model import HybridForCausalLM


def set_seen(cache: HybridCache, seen: int) -> None:  # all layers consumed the same tokens
    cache.seen = seen
    for state in cache.states:
        state.seen = seen


def compile_options(plan: Plan, cache: HybridCache) -> contextlib.AbstractContextManager:
    """The settings a compiled `decode_step` is built under (they apply when a call compiles): Inductor freezing
    (`plan.freeze`) and combo kernels (`plan.combo_kernels`), and the cache's host-side token counters marked dynamic
    from the first compile. Without that,
    dynamo bakes the first compile's `seen` in and recompiles with it symbolic at the next step: two compiles
    per model and batch, ~1 min each with freezing."""
    counters = ["L['cache'].seen", *(f"L['cache'].states[{i}].seen" for i in range(len(cache.states)))]
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(freezing=plan.freeze, combo_kernels=plan.combo_kernels))
    stack.enter_context(torch.compiler.config.patch(dynamic_sources=",".join(counters)))
    return stack


@dataclass(frozen=True)
class GraphStep:
    """A decode step replayed from a CUDA graph, holding the token and the cache that the graph reads and writes: a
    graph records their addresses, not references, so once freed their memory would go to later allocations and every
    replay would read those (token ids out of the vocabulary: a device-side assert in the embedding)."""

    graph: torch.cuda.CUDAGraph
    token: torch.Tensor
    cache: HybridCache

    def __call__(self) -> None:
        self.graph.replay()


def prepare_step(
    model: HybridForCausalLM,
    cache: HybridCache,
    token: torch.Tensor,
    plan: Plan,
    *,
    graph: bool,
    compiled: bool,
    fresh_compile: bool = True,
) -> tuple[Callable[[], object], int]:
    """The decode step ready to run: `(step, seen)`, where `step()` advances the cache by one token (an eager call,
    or the replay of a CUDA graph that holds one step) and `seen` is the host-side count of tokens the cache holds.

    With `compiled` the step is `torch.compile`d first (the replays then run Inductor's fused kernels), under
    `compile_options`: the host-side token counters are symbolic from the first compile, so the warm-up leaves one
    reusable graph (`tests/test_e2e_smoke.py` checks this on the CPU), which later points of the same model and
    batch reuse (`fresh_compile=False`): constant-size caches have the same shapes at every context, and the slots
    of growing ones are marked dynamic (`mark_growing_dynamic`). A fresh compile drops
    all earlier ones: dynamo gives up (runs eagerly) after 8 recompiles of a frame, and every model and batch
    adds some.

    Capturing runs the Python code (which increments the host-side `seen` counters) but no kernels, and a replay
    moves the device `position` tensors but no Python counter: the counters are restored after the capture, and a
    caller that replays `n` times sets them to `seen + n` (`set_seen`) to keep the cache consistent. A replayed step
    holds `token` and `cache` (`GraphStep`), so a caller may keep only the step.
    """
    if compiled and fresh_compile:
        torch._dynamo.reset()
    if compiled:
        mark_growing_dynamic(model, cache)
    forward = torch.compile(decode_step) if compiled else decode_step
    with compile_options(plan, cache):
        for _ in range(3 if compiled else 2):  # warm-up outside any capture: compiles and autotunes every kernel
            forward(model, token, cache)
        step, before = functools.partial(forward, model, token, cache), cache.seen
        if graph:
            torch.cuda.synchronize()
            cuda_graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(cuda_graph):
                    forward(model, token, cache)
            finally:
                set_seen(cache, before)
            step = GraphStep(cuda_graph, token, cache)
            step()  # the first replay uploads the graph: keep it out of any timing
            before += 1
    return step, before


def time_decode(
    model: HybridForCausalLM, cache: HybridCache, token: torch.Tensor, plan: Plan, **how: bool
) -> tuple[float, float]:
    """`(median seconds per decode step, seconds the preparation took)`: the median over `plan.repeats` runs of
    `plan.steps` steps, eager calls or replays of a CUDA graph that holds one step, and the time `prepare_step`
    (which takes `how`: graph, compiled, fresh_compile) spent compiling, warming up and capturing."""
    start = time.perf_counter()
    step, before = prepare_step(model, cache, token, plan, **how)
    prepare = time.perf_counter() - start

    def run() -> None:
        for _ in range(plan.steps):
            step()

    seconds = median_seconds(run, plan.repeats, plan.device == "cuda") / plan.steps
    set_seen(cache, before + plan.steps * plan.repeats)
    return seconds, prepare


# What nvidia-smi reports with each decode point, to find what slows a long run's later steps (docs/efficiency.md):
# clocks (MHz), power (W), temperature (C) and the active clock-event (throttle) reasons, a hex bitmask.
GPU_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active")


def parse_gpu_state(line: str) -> dict[str, float | str | None]:
    """One `nvidia-smi --query-gpu=<GPU_FIELDS> --format=csv,noheader,nounits` line -> `{field: value}`."""
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(GPU_FIELDS):
        raise ValueError(f"nvidia-smi gave {len(values)} values for {len(GPU_FIELDS)} fields: {line!r}")

    def value(v: str) -> float | str | None:
        if v.startswith("[") or v == "":  # [N/A], [Not Supported]
            return None
        try:
            return v if v.startswith("0x") else float(v)
        except ValueError:
            return v

    return {name: value(v) for name, v in zip(GPU_FIELDS, values, strict=True)}


def gpu_state(plan: Plan) -> dict[str, float | str | None] | None:
    """The GPU's state right after a timed point (the first GPU nvidia-smi lists: e2e runs on one); None off CUDA,
    without nvidia-smi, or if it fails (a measurement must not depend on it)."""
    if plan.device != "cuda":
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return parse_gpu_state(out.stdout.splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def compile_phase_seconds() -> dict[str, float]:
    """Seconds this process has spent so far in each phase of torch.compile that dynamo times (the whole frame's
    compile, dynamo's tracing, AOT autograd, Inductor's lowering and code generation, waiting for the kernels'
    compiles, ...; the phases nest, so they do not add up), by phase."""
    return {phase: sum(times) for phase, times in torch._dynamo.utils.compilation_time_metrics.items()}


def phases_since(before: dict[str, float], least_s: float = 0.01) -> dict[str, float]:
    """The phases of `compile_phase_seconds` that took some time, at least `least_s`, since `before`, the longest
    first."""
    spent = {phase: seconds - before.get(phase, 0.0) for phase, seconds in compile_phase_seconds().items()}
    return {phase: round(s, 3) for phase, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s > 0 and s >= least_s}


def decode_step(model: HybridForCausalLM, token: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    return model(token, cache=cache).logits


def decode_point(
    model: HybridForCausalLM, arch: str, batch: int, context: int, plan: Plan, fresh_compile: bool = True
) -> dict:
    """One decode measurement at (batch, context); OOM is recorded, not raised. `fresh_compile`: see `prepare_step`.
    The row also records where the point's wall time went (`point_seconds`, of which `prepare_seconds` compiled,
    warmed up and captured the step) and how many graphs dynamo compiled for it (`graphs_compiled`, 0 when an
    earlier point's compile was reused), which is what a run's length depends on, and where the compile's time went
    (`compile_phases`, `phases_since`)."""
    row = {"arch": arch, "batch": batch, "context": context}
    start, graphs, phases = time.perf_counter(), counters["stats"]["unique_graphs"], compile_phase_seconds()
    # Warm-up (3), capture (1), upload (1) and timed steps must fit in a growing cache's spare slots: see HEADROOM.
    if 5 + plan.steps * plan.repeats > HEADROOM:
        raise ValueError(f"{plan.steps} x {plan.repeats} timed steps exceed the {HEADROOM} spare cache slots")
    reset_memory(plan)
    try:
        cache = synthetic_cache(model, batch, context)
        token = torch.randint(0, model.config.vocab_size, (batch, 1), device=plan.device)
        row["mode"] = "graph" if plan.device == "cuda" else "eager"
        row["compiled"] = plan.compile and row["mode"] == "graph"  # the CPU smoke run times eager steps
        row["frozen"] = row["compiled"] and plan.freeze
        row["combo_kernels"] = row["compiled"] and plan.combo_kernels
        row["projections"] = plan.projections
        try:
            step, prepare = time_decode(
                model, cache, token, plan, graph=row["mode"] == "graph", compiled=row["compiled"],
                fresh_compile=fresh_compile,
            )  # fmt: skip
        except Exception as err:  # a failed compile or capture is reported, then the point is timed without it
            if row["mode"] == "eager" or isinstance(err, torch.OutOfMemoryError):
                raise
            if row["compiled"]:
                row.update(compiled=False, compile_error=error_text(err))
            else:
                row.update(mode="eager", graph_error=error_text(err))
            cache = synthetic_cache(model, batch, context)
            step, prepare = time_decode(model, cache, token, plan, graph=row["mode"] == "graph", compiled=False)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    per_seq = step_bytes_per_seq(model, cache, context, batch)  # before the cache is freed
    return {**row, "status": "ok", "latency_ms": step * 1e3, "tokens_per_s": batch / step, "gpu": gpu_state(plan),
            "step_bytes_per_seq": per_seq,
            "cache_bytes_per_seq": cache.nbytes() // batch, "peak_memory_bytes": peak_memory(plan),
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs, "prepare_seconds": prepare,
            "compile_phases": phases_since(phases), "point_seconds": time.perf_counter() - start}  # fmt: skip


def prefill_point(model: HybridForCausalLM, arch: str, length: int, plan: Plan) -> dict:
    """Batch-1 prefill of `length` random tokens into an empty cache (one warm-up, then the median of repeats)."""
    row = {"arch": arch, "length": length}
    reset_memory(plan)
    caches = []

    def run() -> None:
        caches[:] = [model.allocate_cache(1)]
        model(ids, cache=caches[0], logits_to_keep=1)

    try:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=plan.device)
        run()
        seconds = median_seconds(run, plan.prefill_repeats, plan.device == "cuda")
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    return {**row, "status": "ok", "seconds": seconds, "tokens_per_s": length / seconds,
            "cache_bytes": caches[0].nbytes(), "peak_memory_bytes": peak_memory(plan)}  # fmt: skip


def reset_memory(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(plan: Plan) -> int | None:
    return torch.cuda.max_memory_allocated() if plan.device == "cuda" else None
