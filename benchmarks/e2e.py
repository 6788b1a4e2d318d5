"""End-to-end efficiency of the seven 0.4B architectures (issue 7): prefill, decode, memory, roofline.

Random weights, bf16, one GPU. Writes `e2e_h200.json`, `e2e_decode.png` and `e2e_memory.png` (plots only when
matplotlib is importable; `--plot-only JSON` draws them later). Method and caveats: docs/efficiency.md.

* Prefill: batch 1, one forward of the whole prompt into an empty cache (`logits_to_keep=1`), tokens/s.
* Decode: the cache is built synthetically at context C (random contents of the exact size and validity a prefill
  of C tokens leaves: GDN random state, SWA ring full, LTE ring + buffer full, full attention/NSA C valid slots),
  then real decode steps are timed. CUDA graphs for graph-safe models (only GDN, SWA and LTE layers), eager
  otherwise (full attention grows its buffer and NSA passes `seq_len` as a Python int to its kernel).
* Roofline: (weights + batch * cache bytes a step must move) / measured device copy bandwidth.

    python benchmarks/e2e.py --quick --out DIR     # GPU, ~5 min
    python benchmarks/e2e.py --smoke --out DIR     # CPU, tiny configs, seconds
    python benchmarks/e2e.py --plot-only DIR/e2e_h200.json --out docs
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch._dynamo

from hlsa.cache import HybridCache
from hlsa.config import HybridConfig
from hlsa.layers.linear import Linear
from hlsa.model import HybridForCausalLM
from hlsa.ops.router_step import step_ring_bytes

K = 1024
ARCHS = ("gdn", "gdn_swa", "gdn_attn", "gdn_lte", "gdn_nsa", "transformer", "nsa")
REPO = Path(__file__).resolve().parent.parent
FULL_CONTEXTS = (4 * K, 16 * K, 64 * K, 128 * K)
HEADROOM = 256  # decode steps beyond C that a synthetic growing cache (full attention, NSA) holds without regrowing
INIT_STD = 0.02  # scale of random cache contents (keeps softmax and the delta rule in a normal range)


@dataclass(frozen=True)
class Plan:
    """What to measure (defaults: GPU runs); PASS/MISS use `target_contexts` (short, mid, long), `target_batches`."""

    mode: str
    decode_archs: tuple[str, ...]
    contexts: tuple[int, ...]
    prefill_archs: tuple[str, ...]
    prefill_lengths: tuple[int, ...]
    budget_s: float
    extra_contexts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-architecture extra contexts
    # Archs whose shortest context is timed again after their longest, per batch: a step's time drifts over a
    # process's lifetime (session 3: +18% after the first points, whatever the context), so the context ratio of
    # target 1 compares the long context with the mean of the two short-context timings that bracket it.
    bracket_archs: tuple[str, ...] = ("gdn_lte",)
    batches: tuple[int, ...] = (1, 16, 64)
    steps: int = 8  # decode steps per timed repeat
    repeats: int = 3
    prefill_repeats: int = 2
    copy_bytes: int = 2**31
    target_contexts: tuple[int, int, int] = (4 * K, 64 * K, 128 * K)
    target_batches: tuple[int, int] = (16, 64)
    memory_contexts: tuple[int, ...] = FULL_CONTEXTS
    config_dir: Path = REPO / "configs"
    suffix: str = "_0.4B"
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    # torch.compile the graph-captured decode steps (Inductor fuses the elementwise glue between kernels; session 6:
    # GDN+LTE 0.4B at 64K, 4.9 -> 2.4 ms per step at batch 1). Off with --no-compile.
    compile: bool = True
    # Inductor freezing for the compiled steps: weights become constants, so the concatenated weights of the
    # projections that share an input (`hlsa.layers.linear.fused_linear`) are folded once at compile time instead of
    # copied every step (session 8, when freezing's own patterns did that concatenation: GDN+LTE 0.4B at batch 64,
    # 3.80 -> 3.47 ms per step). Inference only; off with --no-freeze.
    freeze: bool = True
    # Inductor combo kernels for the compiled steps: independent small kernels (e.g. an LTE layer's sum of the k|v
    # partials and its rotations of q and k) share one launch. Session 9 measured nothing; since the step's kernels
    # run back to back in the CUDA graph, ~1 us each, session 14 measured 2.22 -> 2.19 ms at batch 64
    # (docs/efficiency.md).
    # Off with --no-combo-kernels.
    combo_kernels: bool = True
    # The projections' backend: "auto" lets `hlsa.ops.linear` pick (its split-K decode GEMM inside compiled or
    # captured steps); "torch" keeps every projection on `F.linear` (cuBLAS), the peer it was measured against
    # (session 10, docs/efficiency.md). --cublas-projections.
    projections: str = "auto"


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(
            mode="smoke", config_dir=REPO / "configs" / "tiny", suffix="", device="cpu", decode_archs=ARCHS,
            contexts=(32, 64), extra_contexts={"gdn_lte": (128,)}, batches=(1, 2, 3), prefill_archs=ARCHS,
            prefill_lengths=(16, 48), steps=2, repeats=1, prefill_repeats=1, budget_s=args.budget_s or 60.0,
            copy_bytes=2**22, target_contexts=(32, 64, 128), target_batches=(2, 3), memory_contexts=(256, 512, 1024),
            dtype=torch.float32,  # CPU bf16 kernels are ~50x slower than fp32; the GPU run is bf16
        )  # fmt: skip
    if args.quick:
        four = ("gdn_lte", "transformer", "gdn_swa", "gdn")
        return Plan(
            mode="quick", decode_archs=four, contexts=(4 * K, 64 * K), extra_contexts={"gdn_lte": (128 * K,)},
            prefill_archs=four, prefill_lengths=(4 * K, 16 * K, 64 * K), budget_s=args.budget_s or 470.0,
        )  # fmt: skip
    return Plan(mode="full", decode_archs=ARCHS, contexts=FULL_CONTEXTS, prefill_archs=ARCHS,
                prefill_lengths=FULL_CONTEXTS, budget_s=args.budget_s or 3600.0)  # fmt: skip


def median_seconds(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median seconds of `fn()` over `repeats` calls: CUDA events on the GPU, perf_counter on the CPU."""
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        if cuda:
            end.record()
            end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0)
    return statistics.median(times)


# --- models and synthetic caches -------------------------------------------------------------------------------------
def build_model(arch: str, plan: Plan, device: str | None = None) -> HybridForCausalLM:
    """Random-weight model in eval mode and `plan.dtype`, initialised directly on `device` (default the plan's), its
    projections on `plan.projections`."""
    config = HybridConfig.from_json_file(str(plan.config_dir / f"{arch}{plan.suffix}.json"))
    with torch.device(device or plan.device):
        model = HybridForCausalLM(config)
    for module in model.modules():
        if isinstance(module, Linear):
            module.backend = None if plan.projections == "auto" else plan.projections
    return model.to(plan.dtype).eval()


def graph_blocker(model: HybridForCausalLM) -> str | None:
    """Why a decode step of `model` cannot be replayed from a CUDA graph here, or None when it can.

    Full attention can: its decode reads the position from the device, and its only host-side decision, growing the
    KV buffer when it is full, never fires within a point (`HEADROOM` spare slots hold every step of a point, checked
    in `decode_point`). A generation that outgrows its buffer reallocates, which a captured graph cannot follow."""
    kinds = {block.kind for block in model.model.layers}
    reasons = {
        "nsa": "NSA passes seq_len and RoPE positions as Python ints (they would be baked into a captured graph)",
    }
    return "; ".join(reason for kind, reason in reasons.items() if kind in kinds) or None


def _fill_lte(state: object, context: int, ring: int, buffer: int) -> None:
    """Ring and buffer full of positively scored tokens, as after a long prompt whose buffer has filled up."""
    state.score.uniform_(0.1, 1.0)
    state.valid.fill_(True)
    state.buffer_len.fill_(buffer)
    # Ring slot s holds the token at the position p in [C - ring, C) with p % ring == s; buffer: older tokens.
    p = torch.arange(context - ring, context, device=state.k.device)
    ring_pos = torch.empty(ring, dtype=torch.int32, device=state.k.device)
    ring_pos[p % ring] = p.to(torch.int32)
    older = torch.linspace(0, max(0, context - ring - 1), buffer, device=state.k.device).to(torch.int32)
    state.token_pos.copy_(torch.cat([ring_pos, older])[None, None].expand_as(state.token_pos))
    state.router_x.normal_(0.0, INIT_STD)
    state.router_valid.fill_(True)
    state.offset.zero_()


def synthetic_cache(model: HybridForCausalLM, batch: int, context: int, headroom: int = HEADROOM) -> HybridCache:
    """A cache holding `context` tokens per sequence, with random contents of the size a real prefill leaves.

    Growing caches (full attention, NSA) get `context + headroom` slots (rounded up) so that the timed decode steps
    never reallocate; the first `context` slots are valid. Every state's `seen`/`position` is set to `context`.
    """
    cache = model.allocate_cache(batch)
    for block, state in zip(model.model.layers, cache.states):
        for name in ("k", "v", "recurrent", "conv"):
            tensor = getattr(state, name, None)
            if tensor is not None:
                tensor.normal_(0.0, INIT_STD)
        kind, mixer = block.kind, block.attn
        if kind == "swa":
            state.valid.fill_(True)
        elif kind == "attn":
            slots = -(-(context + headroom) // 256) * 256
            shape = (batch, mixer.num_kv_heads, slots, mixer.head_dim)
            state.k = torch.empty(shape, device=state.k.device, dtype=state.k.dtype).normal_(0.0, INIT_STD)
            state.v = torch.empty_like(state.k).normal_(0.0, INIT_STD)
            state.valid = torch.zeros(shape[:3], device=state.k.device, dtype=torch.bool)
            state.valid[:, :, :context] = True
        elif kind == "nsa":
            mixer._grow(state, context + headroom)  # zero-filled, rounded up to whole chunks
            for tensor in (state.k, state.v, state.k_cmp, state.v_cmp):
                tensor.normal_(0.0, INIT_STD)
        elif kind == "lte":
            _fill_lte(state, context, mixer.window_size + 1, mixer.buffer_size)
        if hasattr(state, "position"):
            state.position.fill_(context)
        state.seen = context
    cache.seen = context
    return cache


def step_bytes_per_seq(model: HybridForCausalLM, cache: HybridCache, context: int, batch: int) -> int:
    """Cache bytes one decode step must move per sequence.

    GDN: its whole state is read and rewritten (x2). SWA/LTE: the whole fixed-size state is read (ring/buffer slots,
    scores, validity), except LTE's router ring, of which a step reads each conv's older taps and writes each conv's
    fresh input (`hlsa.ops.router_step`; the ring holds 2m+1 positions of every conv's input). Full attention: K, V
    and validity of the `context` valid slots. NSA: K and V of the compressed blocks, the selected blocks and the
    window. Scalar counters (positions) are shared by the batch, not per sequence, and are left out.
    """

    def batched_bytes(state: object) -> int:
        tensors = (v for v in vars(state).values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        return sum(t.nbytes for t in tensors)

    total = 0
    for block, state in zip(model.model.layers, cache.states):
        kind, mixer = block.kind, block.attn
        if kind == "gdn":
            total += 2 * batched_bytes(state) // batch
        elif kind == "swa":
            total += batched_bytes(state) // batch
        elif kind == "lte":
            ring = state.router_x.nbytes + state.router_valid.nbytes
            layers = mixer.router.conv_stack.decode_layers(state.router_x.dtype)
            moved = step_ring_bytes(layers, mixer.num_kv_heads, state.router_x.element_size())
            total += (batched_bytes(state) - ring) // batch + moved
        elif kind == "attn":
            total += context * mixer.num_kv_heads * (2 * mixer.head_dim * state.k.element_size() + 1)
        else:
            slots = context // mixer.block_size + min(context, mixer.block_counts * mixer.block_size)
            slots += min(context, mixer.window_size + 1)
            total += slots * mixer.num_kv_heads * 2 * mixer.head_dim * state.k.element_size()
    return total


def weight_bytes(model: HybridForCausalLM) -> int:
    """Bytes of distinct parameters, read once per decode step: `parameters()` yields a shared parameter once (the
    tied embedding / LM head), and, unlike storage pointers, that also holds on the meta device."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def roofline_tokens_per_s(weights: int, step_bytes_per_seq: int, batch: int, bandwidth: float) -> float:
    """Best decode tokens/s: a step must move the weights once and every sequence's cache bytes, at `bandwidth`."""
    return batch * bandwidth / (weights + batch * step_bytes_per_seq)


# --- measurements ----------------------------------------------------------------------------------------------------
def copy_bandwidth(plan: Plan) -> float:
    """Device-to-device `copy_` bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(plan.copy_bytes // 2, dtype=torch.bfloat16, device=plan.device).normal_()
    dst = src.clone()  # also the warm-up copy
    seconds = median_seconds(lambda: dst.copy_(src), 5, plan.device == "cuda")
    return 2 * plan.copy_bytes / seconds


def _set_seen(cache: HybridCache, seen: int) -> None:  # all layers consumed the same tokens
    cache.seen = seen
    for state in cache.states:
        state.seen = seen


def compile_options(plan: Plan, cache: HybridCache) -> contextlib.AbstractContextManager:
    """The settings a compiled `decode_step` is built under (they apply when a call compiles): Inductor freezing
    (`plan.freeze`) and combo kernels (`plan.combo_kernels`), and the cache's host-side token counters marked dynamic
    from the first compile. Without that,
    dynamo specialises the first compile on `seen` and recompiles with it symbolic at the next step: two compiles
    per model and batch, ~1 min each with freezing."""
    counters = ["L['cache'].seen", *(f"L['cache'].states[{i}].seen" for i in range(len(cache.states)))]
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(freezing=plan.freeze, combo_kernels=plan.combo_kernels))
    stack.enter_context(torch.compiler.config.patch(dynamic_sources=",".join(counters)))
    return stack


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
    batch reuse (`fresh_compile=False`; caches of other contexts have the same shapes). A fresh compile drops
    all earlier ones: dynamo gives up (runs eagerly) after 8 recompiles of a frame, and every model and batch
    adds some.

    Capturing runs the Python code (which increments the host-side `seen` counters) but no kernels, and a replay
    moves the device `position` tensors but no Python counter: the counters are restored after the capture, and a
    caller that replays `n` times sets them to `seen + n` (`_set_seen`) to keep the cache consistent.
    """
    if compiled and fresh_compile:
        torch._dynamo.reset()
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
                _set_seen(cache, before)
            step = cuda_graph.replay
            step()  # the first replay uploads the graph: keep it out of any timing
            before += 1
    return step, before


def time_decode(
    model: HybridForCausalLM,
    cache: HybridCache,
    token: torch.Tensor,
    plan: Plan,
    *,
    graph: bool,
    compiled: bool,
    fresh_compile: bool = True,
) -> float:
    """Median seconds per decode step over `plan.repeats` runs of `plan.steps` steps: eager calls, or replays of a
    CUDA graph that holds one step (`prepare_step`)."""
    step, before = prepare_step(model, cache, token, plan, graph=graph, compiled=compiled, fresh_compile=fresh_compile)

    def run() -> None:
        for _ in range(plan.steps):
            step()

    seconds = median_seconds(run, plan.repeats, plan.device == "cuda") / plan.steps
    _set_seen(cache, before + plan.steps * plan.repeats)
    return seconds


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


def decode_step(model: HybridForCausalLM, token: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    return model(token, cache=cache).logits


def decode_point(
    model: HybridForCausalLM, arch: str, batch: int, context: int, plan: Plan, fresh_compile: bool = True
) -> dict:
    """One decode measurement at (batch, context); OOM is recorded, not raised. `fresh_compile`: see `prepare_step`."""
    row = {"arch": arch, "batch": batch, "context": context}
    # Warm-up (3), capture (1), upload (1) and timed steps must fit in a growing cache's spare slots: see graph_blocker.
    if 5 + plan.steps * plan.repeats > HEADROOM:
        raise ValueError(f"{plan.steps} x {plan.repeats} timed steps exceed the {HEADROOM} spare cache slots")
    _reset_memory(plan)
    try:
        cache = synthetic_cache(model, batch, context)
        token = torch.randint(0, model.config.vocab_size, (batch, 1), device=plan.device)
        row["mode"] = "graph" if plan.device == "cuda" and graph_blocker(model) is None else "eager"
        row["compiled"] = plan.compile and row["mode"] == "graph"  # only graph-safe steps are compiled
        row["frozen"] = row["compiled"] and plan.freeze
        row["combo_kernels"] = row["compiled"] and plan.combo_kernels
        row["projections"] = plan.projections
        try:
            step = time_decode(
                model, cache, token, plan, graph=row["mode"] == "graph", compiled=row["compiled"],
                fresh_compile=fresh_compile,
            )  # fmt: skip
        except Exception as err:  # a failed compile or capture is reported, then the point is timed without it
            if row["mode"] == "eager" or isinstance(err, torch.OutOfMemoryError):
                raise
            if row["compiled"]:
                row.update(compiled=False, compile_error=f"{type(err).__name__}: {str(err)[:300]}")
            else:
                row.update(mode="eager", graph_error=f"{type(err).__name__}: {str(err)[:300]}")
            cache = synthetic_cache(model, batch, context)
            step = time_decode(model, cache, token, plan, graph=row["mode"] == "graph", compiled=False)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    per_seq = step_bytes_per_seq(model, cache, context, batch)  # before the cache is freed
    return {**row, "status": "ok", "latency_ms": step * 1e3, "tokens_per_s": batch / step, "gpu": gpu_state(plan),
            "step_bytes_per_seq": per_seq,
            "cache_bytes_per_seq": cache.nbytes() // batch, "peak_memory_bytes": _peak_memory(plan)}  # fmt: skip


def prefill_point(model: HybridForCausalLM, arch: str, length: int, plan: Plan) -> dict:
    """Batch-1 prefill of `length` random tokens into an empty cache (one warm-up, then the median of repeats)."""
    row = {"arch": arch, "length": length}
    _reset_memory(plan)
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
            "cache_bytes": caches[0].nbytes(), "peak_memory_bytes": _peak_memory(plan)}  # fmt: skip


def _reset_memory(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(plan: Plan) -> int | None:
    return torch.cuda.max_memory_allocated() if plan.device == "cuda" else None


def memory_table(plan: Plan) -> list[dict]:
    """Cache bytes per sequence, decode-step bytes per sequence and weight bytes against context for every
    architecture (shapes only: meta-device models), at the memory contexts and the targets' contexts."""
    rows = []
    for arch in ARCHS:
        model = build_model(arch, plan, device="meta")
        weights = weight_bytes(model)
        for c in sorted(set(plan.memory_contexts) | set(plan.target_contexts)):
            cache = synthetic_cache(model, 1, c, headroom=0)
            step = step_bytes_per_seq(model, cache, c, 1)
            rows.append({"arch": arch, "context": c, "cache_bytes_per_seq": cache.nbytes(), "step_bytes_per_seq": step,
                         "weight_bytes": weights})  # fmt: skip
    return rows


# --- the run ----------------------------------------------------------------------------------------------------------
def model_info(model: HybridForCausalLM) -> dict:
    config, kinds, blocker = model.config, [block.kind for block in model.model.layers], graph_blocker(model)
    return {"mixers": {kind: kinds.count(kind) for kind in sorted(set(kinds))}, "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes(model),
            "decode_mode": "eager" if blocker else "graph", "graph_blocker": blocker}  # fmt: skip


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


def run_arch(arch: str, plan: Plan, deadline: float, results: dict, path: Path) -> None:
    """Every point of one architecture. Points past the time budget are recorded as skipped, failures as errors,
    and the JSON is rewritten after each point so that a run cut short keeps what it measured."""
    model = build_model(arch, plan)
    results["models"][arch] = model_info(model)
    weights, bandwidth = results["models"][arch]["weight_bytes"], results["copy_bandwidth_bytes_per_s"]
    compiled_batch = None  # the batch whose compiled decode step dynamo holds
    for kind, batch, n in arch_points(arch, plan):
        where = {"batch": batch, "context": n} if kind == "decode" else {"length": n}
        try:
            if time.monotonic() > deadline:
                row = {"arch": arch, **where, "status": "skipped (time budget)"}
            elif kind == "decode":
                row = decode_point(model, arch, batch, n, plan, fresh_compile=batch != compiled_batch)
                compiled_batch = batch if row.get("compiled") else None
            else:
                row = prefill_point(model, arch, n, plan)
        except Exception as err:  # one broken point must not cost the rest of a one-shot GPU run
            row = {"arch": arch, **where, "status": f"error: {type(err).__name__}: {str(err)[:300]}"}
        row["order"] = sum(len(results[k]) for k in ("decode", "prefill"))  # measurement order within the run
        if kind == "decode" and row["status"] == "ok":  # best tokens/s: bytes a step must move / copy bandwidth
            row["roofline_tokens_per_s"] = roofline_tokens_per_s(weights, row["step_bytes_per_seq"], batch, bandwidth)
            row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
        results[kind].append(row)
        print(_describe(kind, row), flush=True)
        path.write_text(json.dumps(results, indent=1))
    del model
    _reset_memory(plan)


def _describe(kind: str, row: dict) -> str:
    where = f"B={row['batch']:>3} C={row['context']:>6}" if kind == "decode" else f"T={row['length']:>6}"
    head = f"{kind:7s} {row['arch']:12s} {where}"
    if row["status"] != "ok" or kind == "prefill":
        return f"{head}  {row['tokens_per_s']:12.0f} tok/s" if row["status"] == "ok" else f"{head}  {row['status']}"
    return (
        f"{head}  {row['mode']:5s} {row['tokens_per_s']:10.0f} tok/s  {row['latency_ms']:8.3f} ms/step  "
        f"roofline {row['roofline_tokens_per_s']:10.0f} tok/s ({row['roofline_fraction']:.0%})"
    )


def mean_by_point(rows: list[dict]) -> dict[tuple[str, int, int], dict]:
    """Decode rows by (arch, batch, context); a point timed twice (`bracket_archs`) gets the mean of its tokens/s."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["batch"], r["context"]), []).append(r)
    return {key: {**rs[-1], "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs)} for key, rs in groups.items()}


def check_targets(results: dict, plan: Plan) -> list[dict]:
    """Issue 7's targets as PASS / MISS / NOT MEASURED lines."""

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


def environment(plan: Plan, commit: str | None) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "fla"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # absent or broken: recorded, not fatal
            versions[name] = None
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    except OSError:  # no git on the machine
        commit = ""
    commit = commit.strip() or "unknown (no git checkout; pass --commit)"
    device = torch.cuda.get_device_name() if plan.device == "cuda" else platform.processor() or "cpu"
    plan_dict = {k: v for k, v in asdict(plan).items() if k not in ("config_dir", "dtype")}
    return {"versions": versions, "git_commit": commit, "device": device, "dtype": str(plan.dtype), "plan": plan_dict}


def merge(runs: list[dict]) -> dict:
    """One results dict from runs split over calls with `--archs` (e.g. when one call cannot hold them all): models,
    decode and prefill rows joined (each row tagged with its `run`), the first run's environment, plan and memory
    table, every run's copy bandwidth and commit, and the targets checked again on the joined rows."""
    if not runs:
        raise ValueError("merge: no runs given")
    first = runs[0]
    merged = {
        "environment": {**first["environment"], "merged_runs": [r["environment"]["git_commit"] for r in runs]},
        "models": {},
        "decode": [],
        "prefill": [],
        "copy_bandwidth_bytes_per_s": first["copy_bandwidth_bytes_per_s"],
        "copy_bandwidth_per_run": [r["copy_bandwidth_bytes_per_s"] for r in runs],
        "memory": first["memory"],
    }
    for i, run in enumerate(runs):
        merged["models"].update(run["models"])
        for kind in ("decode", "prefill"):
            merged[kind] += [{**row, "run": i} for row in run[kind]]
    fields = {k: v for k, v in first["environment"]["plan"].items() if k in Plan.__dataclass_fields__}
    merged["targets"] = check_targets(merged, Plan(**fields))
    return merged


# --- outputs ---------------------------------------------------------------------------------------------------------
def plot(results: dict, out: Path) -> None:
    """Draw e2e_decode.png (decode tokens/s against context, one panel per batch) and e2e_memory.png into `out`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (run --plot-only on the JSON elsewhere)")
        return
    out.mkdir(parents=True, exist_ok=True)
    decode = list(mean_by_point([r for r in results["decode"] if r["status"] == "ok"]).values())
    batches = sorted({r["batch"] for r in decode}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        _lines(
            ax, [r for r in decode if r["batch"] == batch], "context", "tokens_per_s", f"decode tok/s, batch {batch}"
        )
    fig.suptitle(f"0.4B models, random weights, {results['environment']['dtype']}, {results['environment']['device']}")
    fig.tight_layout()
    fig.savefig(out / "e2e_decode.png", dpi=120)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _lines(left, results["memory"], "context", "cache_bytes_per_seq", "decode cache bytes per sequence")
    prefill = [r for r in results["prefill"] if r["status"] == "ok" and r.get("peak_memory_bytes")]
    _lines(right, prefill, "length", "peak_memory_bytes", "peak GPU bytes, prefill at batch 1")
    fig.tight_layout()
    fig.savefig(out / "e2e_memory.png", dpi=120)
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
    mode.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="join runs split with --archs, then plot")
    parser.add_argument("--out", type=Path, default=None, help="where JSON/PNGs go (default benchmarks/results, docs)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip points once this many seconds have passed")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
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
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.out or REPO / "docs")
        return
    if args.merge:
        merged = merge([json.loads(path.read_text()) for path in args.merge])
        json_dir = args.out or REPO / "benchmarks" / "results"
        json_dir.mkdir(parents=True, exist_ok=True)
        (json_dir / "e2e_h200.json").write_text(json.dumps(merged, indent=1))
        print(f"wrote {json_dir / 'e2e_h200.json'}")
        plot(merged, args.out or REPO / "docs")
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
        try:
            batches = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            batches = ()
        if not batches or min(batches) < 1:
            raise SystemExit(f"--batches: expected comma-separated positive integers, got {args.batches!r}")
        plan = replace(plan, batches=batches)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke for the CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend (CI runs tests in parallel)
        args.out = args.out or Path(tempfile.mkdtemp(prefix="e2e_smoke_"))
    json_dir = args.out or REPO / "benchmarks" / "results"
    json_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + plan.budget_s
    torch.manual_seed(0)
    results = {"environment": environment(plan, args.commit), "models": {}, "decode": [], "prefill": []}
    with torch.no_grad():
        results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(plan)
        print(f"copy bandwidth (read + write): {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
        results["memory"] = memory_table(plan)
        for arch in dict.fromkeys(plan.decode_archs + plan.prefill_archs):
            run_arch(arch, plan, deadline, results, json_dir / "e2e_h200.json")
    results["targets"] = check_targets(results, plan)
    (json_dir / "e2e_h200.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {json_dir / 'e2e_h200.json'}")
    for arch, info in results["models"].items():
        print(f"{arch:12s} decode {info['decode_mode']:5s} {info['graph_blocker'] or ''}")
    for check in results["targets"]:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        print(f"{check['verdict']:12s} {check['target']}  (measured {value})")
    plot(results, args.out or REPO / "docs")


if __name__ == "__main__":
    main()
