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
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hlsa.cache import HybridCache
from hlsa.config import HybridConfig
from hlsa.model import HybridForCausalLM

K = 1024
ARCHS = ("gdn", "gdn_swa", "gdn_attn", "gdn_lte", "gdn_nsa", "transformer", "nsa")
REPO = Path(__file__).resolve().parent.parent
# Decode steps beyond C that a synthetic growing cache (full attention, NSA) has room for, so no step reallocates.
HEADROOM = 256
INIT_STD = 0.02  # scale of random cache contents (keeps softmax and the delta rule in a normal range)


@dataclass(frozen=True)
class Plan:
    """What to measure. `targets` = (short, mid, long) contexts and (mid, big) batches for the PASS/MISS lines."""

    mode: str
    config_dir: Path
    suffix: str
    device: str
    decode_archs: tuple[str, ...]
    contexts: tuple[int, ...]
    extra_contexts: dict[str, tuple[int, ...]]
    batches: tuple[int, ...]
    prefill_archs: tuple[str, ...]
    prefill_lengths: tuple[int, ...]
    steps: int
    repeats: int
    prefill_repeats: int
    budget_s: float
    copy_bytes: int
    target_contexts: tuple[int, int, int]
    target_batches: tuple[int, int]
    dtype: torch.dtype = torch.bfloat16
    memory_contexts: tuple[int, ...] = field(default=(4 * K, 16 * K, 64 * K, 128 * K))


def make_plan(args: argparse.Namespace) -> Plan:
    full_ctx = (4 * K, 16 * K, 64 * K, 128 * K)
    common = dict(config_dir=REPO / "configs", suffix="_0.4B", device="cuda", target_batches=(16, 64))
    if args.smoke:
        return Plan(
            mode="smoke", config_dir=REPO / "configs" / "tiny", suffix="", device="cpu", decode_archs=ARCHS,
            contexts=(32, 64), extra_contexts={"gdn_lte": (128,)}, batches=(1, 2, 3), prefill_archs=ARCHS,
            prefill_lengths=(16, 48), steps=2, repeats=1, prefill_repeats=1, budget_s=args.budget_s or 60.0,
            copy_bytes=2**22, target_contexts=(32, 64, 128), target_batches=(2, 3), memory_contexts=(32, 64, 128),
        )  # fmt: skip
    if args.quick:
        four = ("gdn_lte", "transformer", "gdn_swa", "gdn")
        return Plan(
            mode="quick", decode_archs=four, contexts=(4 * K, 64 * K), extra_contexts={"gdn_lte": (128 * K,)},
            batches=(1, 16, 64), prefill_archs=four, prefill_lengths=(4 * K, 16 * K, 64 * K), steps=8, repeats=3,
            prefill_repeats=2, budget_s=args.budget_s or 420.0, copy_bytes=2**31,
            target_contexts=(4 * K, 64 * K, 128 * K), **common,
        )  # fmt: skip
    return Plan(
        mode="full", decode_archs=ARCHS, contexts=full_ctx, extra_contexts={}, batches=(1, 16, 64),
        prefill_archs=ARCHS, prefill_lengths=full_ctx, steps=8, repeats=3, prefill_repeats=2,
        budget_s=args.budget_s or 1800.0, copy_bytes=2**31, target_contexts=(4 * K, 64 * K, 128 * K), **common,
    )  # fmt: skip


class Clock:
    """Median seconds of `fn()` over repeats: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median(self, fn: Callable[[], object], repeats: int) -> float:
        times = []
        for _ in range(repeats):
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


# --- models and synthetic caches -------------------------------------------------------------------------------------
def build_model(arch: str, plan: Plan, device: str | None = None) -> HybridForCausalLM:
    """Random-weight model in eval mode and `plan.dtype`, initialised directly on `device` (default the plan's)."""
    config = HybridConfig.from_json_file(str(plan.config_dir / f"{arch}{plan.suffix}.json"))
    with torch.device(device or plan.device):
        model = HybridForCausalLM(config)
    return model.to(plan.dtype).eval()


def graph_blocker(model: HybridForCausalLM) -> str | None:
    """Why a decode step of `model` cannot be replayed from a CUDA graph, or None when it can."""
    kinds = {block.kind for block in model.model.layers}
    reasons = []
    if "attn" in kinds:
        reasons.append("full attention grows its KV buffer by reallocation (Python-side length check)")
    if "nsa" in kinds:
        reasons.append("NSA passes seq_len and RoPE positions as Python ints (baked into a captured graph)")
    return "; ".join(reasons) or None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _fill_lte(state: object, context: int, ring: int, buffer: int) -> None:
    """Ring and buffer full of positively scored tokens, as after a long prompt whose buffer has filled up."""
    device = state.k.device
    state.score.uniform_(0.1, 1.0)
    state.valid.fill_(True)
    state.buffer_len.fill_(buffer)
    # Ring slot s holds the token at the position p in [C - ring, C) with p % ring == s; buffer: older tokens.
    p = torch.arange(context - ring, context, device=device)
    ring_pos = torch.empty(ring, dtype=torch.int32, device=device)
    ring_pos[p % ring] = p.to(torch.int32)
    older = torch.linspace(0, max(0, context - ring - 1), buffer, device=device).to(torch.int32)
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
        for name in ("k", "v", "recurrent", "conv_q", "conv_k", "conv_v"):
            tensor = getattr(state, name, None)
            if tensor is not None:
                tensor.normal_(0.0, INIT_STD)
        kind, mixer = block.kind, block.attn
        if kind == "swa":
            state.valid.fill_(True)
        elif kind == "attn":
            slots = _round_up(context + headroom, 256)
            shape = (batch, mixer.num_kv_heads, slots, mixer.head_dim)
            state.k = torch.empty(shape, device=state.k.device, dtype=state.k.dtype).normal_(0.0, INIT_STD)
            state.v = torch.empty_like(state.k).normal_(0.0, INIT_STD)
            state.valid = torch.zeros(shape[:3], device=state.k.device, dtype=torch.bool)
            state.valid[:, :, :context] = True
        elif kind == "nsa":
            _fill_nsa(mixer, state, context, headroom)
        elif kind == "lte":
            _fill_lte(state, context, mixer.window_size + 1, mixer.buffer_size)
        if hasattr(state, "position"):
            state.position.fill_(context)
        state.seen = context
    cache.seen = context
    return cache


def _fill_nsa(mixer: torch.nn.Module, state: object, context: int, headroom: int) -> None:
    mixer._grow(state, _round_up(context + headroom, 1024))  # zero-filled; the used prefix is empty
    for name in ("k", "v", "k_cmp", "v_cmp"):
        getattr(state, name).normal_(0.0, INIT_STD)
    state.start.zero_()


def state_bytes(state: object) -> int:
    return HybridCache([state]).nbytes()


def step_bytes_per_seq(model: HybridForCausalLM, cache: HybridCache, context: int, batch: int) -> int:
    """Cache bytes one decode step must move per sequence.

    GDN: its whole state is read and rewritten (x2). SWA/LTE: the whole fixed-size state is read (ring/buffer slots,
    scores, validity). Full attention: K, V and validity of the `context` valid slots. NSA: K and V of the compressed
    blocks, the selected blocks and the window.
    """
    total = 0
    for block, state in zip(model.model.layers, cache.states):
        kind, mixer = block.kind, block.attn
        if kind == "gdn":
            total += 2 * state_bytes(state) // batch
        elif kind in ("swa", "lte"):
            total += state_bytes(state) // batch
        elif kind == "attn":
            total += context * mixer.num_kv_heads * (2 * mixer.head_dim * state.k.element_size() + 1)
        else:
            slots = context // mixer.block_size + min(context, mixer.block_counts * mixer.block_size)
            slots += min(context, mixer.window_size + 1)
            total += slots * mixer.num_kv_heads * 2 * mixer.head_dim * state.k.element_size()
    return total


def weight_bytes(model: HybridForCausalLM) -> int:
    """Bytes of distinct parameters (the tied embedding / LM head counted once): read once per decode step."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# --- measurements ----------------------------------------------------------------------------------------------------
def copy_bandwidth(plan: Plan, clock: Clock) -> float:
    """Device-to-device `copy_` bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(plan.copy_bytes // 2, dtype=torch.bfloat16, device=plan.device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = clock.median(lambda: dst.copy_(src), 5)
    return 2 * plan.copy_bytes / seconds


def _seen(cache: HybridCache) -> list[int]:
    return [cache.seen] + [state.seen for state in cache.states]


def _set_seen(cache: HybridCache, values: list[int], advance: int = 0) -> None:
    cache.seen = values[0] + advance
    for state, value in zip(cache.states, values[1:]):
        state.seen = value + advance


def time_decode_eager(model: HybridForCausalLM, cache: HybridCache, token: torch.Tensor, plan: Plan, clock: Clock):
    """Median seconds per decode step, eager: two warm-up steps (kernel compilation), then `steps` per repeat."""
    for _ in range(2):
        model(token, cache=cache)

    def run() -> None:
        for _ in range(plan.steps):
            model(token, cache=cache)

    return clock.median(run, plan.repeats) / plan.steps


def time_decode_graph(model: HybridForCausalLM, cache: HybridCache, token: torch.Tensor, plan: Plan, clock: Clock):
    """Median seconds per decode step replayed from a CUDA graph of one step.

    Capturing runs the Python code (which increments the host-side `seen` counters) but no kernels, and a replay
    moves the device `position` tensors but no Python counter: the counters are restored after the capture and
    advanced by the number of replays, so the cache stays consistent.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles and autotunes every kernel
        for _ in range(2):
            model(token, cache=cache)
    torch.cuda.current_stream().wait_stream(side)
    before = _seen(cache)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            model(token, cache=cache)
    finally:
        _set_seen(cache, before)
    graph.replay()
    _set_seen(cache, before, 1)

    def run() -> None:
        for _ in range(plan.steps):
            graph.replay()

    seconds = clock.median(run, plan.repeats) / plan.steps
    _set_seen(cache, before, 1 + plan.steps * plan.repeats)
    return seconds


def decode_point(model: HybridForCausalLM, arch: str, batch: int, context: int, plan: Plan, clock: Clock) -> dict:
    """One decode measurement at (batch, context); OOM is recorded, not raised."""
    row = {"arch": arch, "batch": batch, "context": context}
    _reset_memory(plan)
    try:
        cache = synthetic_cache(model, batch, context)
        token = torch.randint(0, model.config.vocab_size, (batch, 1), device=plan.device)
        row["mode"] = "graph" if plan.device == "cuda" and graph_blocker(model) is None else "eager"
        if row["mode"] == "graph":
            try:
                step = time_decode_graph(model, cache, token, plan, clock)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # a failed capture is reported, then the point is measured eagerly
                row.update(mode="eager", graph_error=str(err)[:300])
                cache = synthetic_cache(model, batch, context)
        if row["mode"] == "eager":
            step = time_decode_eager(model, cache, token, plan, clock)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    per_seq = step_bytes_per_seq(model, cache, context, batch)
    row.update(
        status="ok",
        latency_ms=step * 1e3,
        tokens_per_s=batch / step,
        cache_bytes_per_seq=cache.nbytes() // batch,
        step_bytes_per_seq=per_seq,
        peak_memory_bytes=_peak_memory(plan),
    )
    return row


def prefill_point(model: HybridForCausalLM, arch: str, length: int, plan: Plan, clock: Clock) -> dict:
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
        seconds = clock.median(run, plan.prefill_repeats)
    except torch.OutOfMemoryError:
        return {**row, "status": "oom"}
    return {
        **row,
        "status": "ok",
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "cache_bytes": caches[0].nbytes(),
        "peak_memory_bytes": _peak_memory(plan),
    }


def _reset_memory(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(plan: Plan) -> int | None:
    return torch.cuda.max_memory_allocated() if plan.device == "cuda" else None


def memory_table(plan: Plan) -> list[dict]:
    """Cache bytes per sequence against context for every architecture (shapes only: meta-device models)."""
    rows = []
    for arch in ARCHS:
        model = build_model(arch, plan, device="meta")
        for context in plan.memory_contexts:
            cache = synthetic_cache(model, 1, context, headroom=0)
            rows.append({"arch": arch, "context": context, "cache_bytes_per_seq": cache.nbytes()})
    return rows


def roofline(row: dict, weights: int, bandwidth: float) -> None:
    """Adds the best achievable tokens/s (bytes a step must move / copy bandwidth) and our fraction of it."""
    step_bytes = weights + row["batch"] * row["step_bytes_per_seq"]
    row["roofline_tokens_per_s"] = row["batch"] * bandwidth / step_bytes
    row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]


# --- the run ----------------------------------------------------------------------------------------------------------
def model_info(model: HybridForCausalLM) -> dict:
    config = model.config
    kinds = [block.kind for block in model.model.layers]
    return {
        "mixers": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
        "decode_mode": "eager" if graph_blocker(model) else "graph",
        "graph_blocker": graph_blocker(model),
    }


def arch_points(arch: str, plan: Plan) -> list[tuple[str, int, int]]:
    """("decode", batch, context) and ("prefill", 1, length) points of one architecture, most informative first."""
    points = []
    if arch in plan.decode_archs:
        contexts = plan.contexts + plan.extra_contexts.get(arch, ())
        points += [("decode", b, c) for c in contexts for b in plan.batches]
    if arch in plan.prefill_archs:
        points += [("prefill", 1, n) for n in plan.prefill_lengths]
    return points


def run_arch(arch: str, plan: Plan, clock: Clock, deadline: float, results: dict) -> None:
    """Every point of one architecture; points past the time budget are recorded as skipped."""
    model = build_model(arch, plan)
    results["models"][arch] = model_info(model)
    weights = results["models"][arch]["weight_bytes"]
    for kind, batch, n in arch_points(arch, plan):
        if time.monotonic() > deadline:
            skipped = {"arch": arch, "status": "skipped (time budget)"}
            key = {"decode": {"batch": batch, "context": n}, "prefill": {"length": n}}[kind]
            results[kind].append({**skipped, **key})
            continue
        if kind == "decode":
            row = decode_point(model, arch, batch, n, plan, clock)
            if row["status"] == "ok":
                roofline(row, weights, results["copy_bandwidth_bytes_per_s"])
        else:
            row = prefill_point(model, arch, n, plan, clock)
        results[kind].append(row)
        print(_describe(kind, row), flush=True)
    del model
    _reset_memory(plan)


def _describe(kind: str, row: dict) -> str:
    where = f"B={row['batch']:>3} C={row['context']:>6}" if kind == "decode" else f"T={row['length']:>6}"
    head = f"{kind:7s} {row['arch']:12s} {where}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    if kind == "prefill":
        return f"{head}  {row['tokens_per_s']:12.0f} tok/s  {row['seconds'] * 1e3:9.1f} ms"
    return (
        f"{head}  {row['mode']:5s} {row['tokens_per_s']:10.0f} tok/s  {row['latency_ms']:8.3f} ms/step  "
        f"roofline {row['roofline_tokens_per_s']:10.0f} tok/s ({row['roofline_fraction']:.0%})"
    )


def check_targets(results: dict, plan: Plan) -> list[dict]:
    """Issue 7's targets as PASS / MISS / NOT MEASURED lines."""
    tps = {(r["arch"], r["batch"], r["context"]): r for r in results["decode"] if r["status"] == "ok"}
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
    for c in sorted({c for arch, b, c in tps if arch == "gdn_lte" and b == b_big}):
        value = tps[("gdn_lte", b_big, c)]["roofline_fraction"]
        checks.append(_check(f"gdn_lte decode B={b_big} C={c}: fraction of roofline >= 0.60", value, 0.6))
    return checks


def _check(name: str, value: float | None, threshold: float) -> dict:
    verdict = "NOT MEASURED" if value is None else ("PASS" if value >= threshold else "MISS")
    return {"target": name, "value": value, "threshold": threshold, "verdict": verdict}


def environment(plan: Plan, commit: str | None) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "fla"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # absent or broken: recorded, not fatal
            versions[name] = None
    if commit is None:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        commit = git.stdout.strip() or "unknown (no git checkout)"
    device = torch.cuda.get_device_name() if plan.device == "cuda" else platform.processor() or "cpu"
    plan_dict = {k: v for k, v in asdict(plan).items() if k not in ("config_dir", "dtype")}
    return {"versions": versions, "git_commit": commit, "device": device, "dtype": str(plan.dtype), "plan": plan_dict}


# --- outputs ---------------------------------------------------------------------------------------------------------
def plot(results: dict, out: Path) -> list[str]:
    """Draw e2e_decode.png and e2e_memory.png into `out`; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (run --plot-only on the JSON elsewhere)")
        return []
    decode = [r for r in results["decode"] if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in decode}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for arch in ARCHS:
            rows = sorted((r for r in decode if r["arch"] == arch and r["batch"] == batch), key=lambda r: r["context"])
            if rows:
                label = f"{arch} ({rows[0]['mode']})"
                ax.plot([r["context"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=label)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title=f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode throughput, 0.4B models, {results['environment']['device']}")
    fig.tight_layout()
    fig.savefig(out / "e2e_decode.png", dpi=120)
    plt.close(fig)
    _plot_memory(plt, results, out)
    return [str(out / "e2e_decode.png"), str(out / "e2e_memory.png")]


def _plot_memory(plt: object, results: dict, out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    prefill = [r for r in results["prefill"] if r["status"] == "ok" and r.get("peak_memory_bytes")]
    for arch in ARCHS:
        rows = [r for r in results["memory"] if r["arch"] == arch]
        if rows:
            left.plot([r["context"] for r in rows], [r["cache_bytes_per_seq"] / 2**20 for r in rows], "o-", label=arch)
        rows = [r for r in prefill if r["arch"] == arch]
        if rows:
            right.plot([r["length"] for r in rows], [r["peak_memory_bytes"] / 2**30 for r in rows], "o-", label=arch)
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB per sequence")
    right.set(xscale="log", xlabel="prompt length (batch 1)", ylabel="peak GPU memory in prefill (GiB)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "e2e_memory.png", dpi=120)
    plt.close(fig)


def report(results: dict) -> None:
    for arch, info in results["models"].items():
        print(
            f"{arch:12s} decode {info['decode_mode']:5s}"
            + (f"  ({info['graph_blocker']})" if info["graph_blocker"] else "")
        )
    for check in results["targets"]:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        print(f"{check['verdict']:12s} {check['target']}  (measured {value})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the trimmed GPU run (~5 min)")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny configs, a few tokens (tests)")
    mode.add_argument("--plot-only", type=Path, metavar="JSON", help="draw the figures of an existing JSON")
    parser.add_argument("--out", type=Path, default=None, help="where JSON/PNGs go (default benchmarks/results, docs)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip points once this many seconds have passed")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.out or REPO / "docs")
        return
    plan = make_plan(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke for the CPU check")
    json_dir = args.out or (Path(tempfile.mkdtemp(prefix="e2e_")) if args.smoke else REPO / "benchmarks" / "results")
    json_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + plan.budget_s
    clock = Clock(plan.device)
    torch.manual_seed(0)
    results = {"environment": environment(plan, args.commit), "models": {}, "decode": [], "prefill": []}
    with torch.no_grad():
        results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(plan, clock)
        print(f"copy bandwidth (read + write): {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
        results["memory"] = memory_table(plan)
        for arch in dict.fromkeys(plan.decode_archs + plan.prefill_archs):
            run_arch(arch, plan, clock, deadline, results)
    results["targets"] = check_targets(results, plan)
    path = json_dir / "e2e_h200.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    report(results)
    plot(results, args.out or REPO / "docs")


if __name__ == "__main__":
    main()
