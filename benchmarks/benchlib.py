"""What every benchmark shares: the machine description, the device copy bandwidth, timing, kernel tables from the
profiler, and result files.

A benchmark writes one JSON per GPU kind, `benchmarks/results/<benchmark>-<gpu slug>.json` (a rerun overwrites it),
whose `machine` entry names the commit, the GPU, the library versions and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import runpy
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LIBRARIES = ("triton", "transformers", "fla")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """`--out DIR` (where the results file goes) and `--commit SHA` (what it records), the same in every benchmark."""
    parser.add_argument(
        "--out", type=Path, default=None, help="folder of the results file (default benchmarks/results)"
    )
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")


def gpu_slug(name: str | None = None) -> str:
    """Short lower-case name of the GPU `name` ("NVIDIA H100 80GB HBM3" -> "h100"), by default this machine's GPU,
    or "cpu" without CUDA."""
    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name()
    name = name.lower()
    found = re.search(r"\b([a-z]+\d+[a-z]*)\b", name.replace("nvidia", ""))
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def result_path(benchmark: str, out: Path | None = None, suffix: str = ".json", gpu: str | None = None) -> Path:
    """`out/<benchmark>-<gpu slug><suffix>`, `out` defaulting to benchmarks/results and `gpu` (a GPU's name, as a
    results file's `machine` records it) to this machine's GPU."""
    return Path(out or RESULTS) / f"{benchmark}-{gpu_slug(gpu)}{suffix}"


def git_commit(commit: str | None = None) -> str:
    """The commit to record: `commit` if given, else HLSA_COMMIT, else `git rev-parse HEAD` of the repository (a GPU
    machine may get a copy of the tree without .git, so pass `--commit` or set HLSA_COMMIT there)."""
    commit = commit or os.environ.get("HLSA_COMMIT")
    if commit:
        return commit
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; pass --commit or set HLSA_COMMIT)"
    return head.stdout.strip()


def machine(commit: str | None = None) -> dict:
    """The GPU (or CPU), library versions, commit and the exact command of this run."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # absent or broken: recorded, not fatal
            versions[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"gpu": props.name, "sms": props.multi_processor_count}
    else:
        device = {"gpu": None, "cpu": platform.processor() or platform.machine()}
    return {
        **device,
        "versions": versions,
        "commit": git_commit(commit),
        "command": shlex.join(["python3", *sys.argv]),
    }


def write_result(path: Path, result: dict) -> Path:
    """Write `result` as indented JSON (folders created); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


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


def time_graph(calls: list[Callable[[], object]], replays: int = 7) -> float:
    """Median microseconds per call of a CUDA graph that runs `calls` once each, in order (launch gaps removed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton compilation) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def kernel_table(prof: torch.profiler.profile, steps: int, cuda: bool, top: int = 25) -> dict:
    """Per-step totals and the `top` entries: CUDA kernels on the GPU, aten operations on the CPU."""
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for evt in prof.key_averages():
        if evt.device_type != device or (not cuda and not evt.key.startswith("aten::")):
            continue
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        totals[evt.key][0] += evt.count
        totals[evt.key][1] += us
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])
    return {
        "unit": "CUDA kernels" if cuda else "aten operations (views included)",
        "kernels_per_step": sum(c for c, _ in totals.values()) / steps,
        "device_us_per_step": sum(t for _, t in totals.values()) / steps,
        "top": [{"name": k[:160], "per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in rows[:top]],
    }


def profiled(fn: Callable[[], object], steps: int, cuda: bool) -> tuple[dict, float]:
    """Run `fn` `steps` times under the profiler; the table and the wall milliseconds per step."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    return kernel_table(prof, steps, cuda), wall_ms


STEP = "benchlib_step"  # the profiler annotation around each step of `device_timeline`
DEVICE_WORK = ("kernel", "gpu_memset", "gpu_memcpy")  # trace categories of work on the GPU
LAUNCHES = ("cuda_runtime", "cuda_driver")  # trace categories of host calls into CUDA


def device_timeline(fn: Callable[[], object], steps: int, cuda: bool, sustain_s: float = 0.2) -> dict:
    """Run `fn` `steps` times under the profiler and say where each step's GPU time goes: `step_timeline` of the
    exported trace, plus `host_us`, the host's microseconds per call timed without the profiler (calls that return
    long before their kernels end leave the GPU no reason to wait on the host). The profiled steps follow
    `sustain_s` seconds of calls, as long as `do_bench` keeps the GPU busy, so that they run at the clocks a timing
    sees. On the CPU only `host_us` is measured (`steps` 0)."""
    import tempfile

    sync = torch.cuda.synchronize if cuda else lambda: None
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host_us = (time.perf_counter() - t0) * 1e6 / steps
    sync()
    while time.perf_counter() - t0 < sustain_s:  # one call at a time: the host must not queue seconds of work
        fn()
        sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            with torch.profiler.record_function(STEP):  # the step's work runs inside its annotation
                fn()
                sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return {"host_us": host_us, **step_timeline(events)}


def host_profile(fn: Callable[[], object], steps: int, top: int = 20) -> list[dict]:
    """Where the host's time per call of `fn` goes (cProfile over `steps` calls, no device profiler): the `top`
    functions by cumulative time, microseconds per call, with their own time apart."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][3])[:top]
    return [
        {"function": f"{Path(file).name}:{line}({name})", "calls": calls / steps, "cum_us": cum * 1e6 / steps,
         "own_us": own * 1e6 / steps}
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]  # fmt: skip


def step_timeline(events: list[dict], min_gap_us: float = 5.0, top: int = 6) -> dict:
    """Per step (a `STEP` annotation that ends after the step's work: `device_timeline` synchronises inside it) of a
    Chrome trace: the GPU's busy time, its span (first start to last end) and the idle time between, averaged over
    the steps; the work items of one step in order; and the gaps of the step with the most idle time. Each gap longer
    than `min_gap_us` names the work before and after it, `launched_late_us` (how long after the work before it ended
    the host finished launching the work after it: > 0 means the GPU waited for the host; None where the trace has
    no launch for it) and the `top` longest host calls that ran in the gap."""
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == STEP), key=_ts)
    launches = {
        e["args"]["correlation"]: e for e in events if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    work = sorted((e for e in events if e.get("cat") in DEVICE_WORK), key=_ts)
    host = [e for e in events if e.get("cat") in ("cpu_op", *LAUNCHES)]
    per_step = []
    for step in steps:
        items = [w for w in work if step["ts"] <= w["ts"] <= step["ts"] + step["dur"]]
        if not items:
            continue
        busy = sum(w["dur"] for w in items)
        span = items[-1]["ts"] + items[-1]["dur"] - items[0]["ts"]
        gaps = []
        for before, after in zip(items, items[1:], strict=False):
            end = before["ts"] + before["dur"]
            if after["ts"] - end <= min_gap_us:
                continue
            launch = launches.get(after.get("args", {}).get("correlation"))
            until = launch["ts"] if launch else after["ts"]
            between = sorted((e for e in host if e["ts"] < until and e["ts"] + e["dur"] > end), key=lambda e: -e["dur"])
            gaps.append({
                "before": before["name"][:80], "after": after["name"][:80], "gap_us": after["ts"] - end,
                "launched_late_us": launch["ts"] + launch["dur"] - end if launch else None,
                "host_between": [{"name": e["name"][:80], "us": e["dur"]} for e in between[:top]],
            })  # fmt: skip
        per_step.append({"busy": busy, "span": span, "items": items, "gaps": gaps})
    if not per_step:
        return {"steps": 0}
    worst = max(per_step, key=lambda s: s["span"] - s["busy"])
    busy, span = (statistics.fmean(s[key] for s in per_step) for key in ("busy", "span"))
    return {
        "steps": len(per_step),
        "busy_us": busy,
        "span_us": span,
        "idle_us": span - busy,
        "work": [{"name": w["name"][:80], "us": w["dur"]} for w in per_step[0]["items"]],
        "gaps_of_worst_step": worst["gaps"],
    }


def _ts(event: dict) -> float:
    return event["ts"]


def copy_bandwidth(device: str = "cuda", nbytes: int = 2**31) -> dict:
    """GB/s of a device-to-device `copy_` of `nbytes`, counting bytes read plus bytes written: `eager` (median of 5
    after a warm-up copy), on CUDA also `graph` (CUDA-graph replayed); `peer` is the higher of the two, the bound a
    memory-bound kernel is compared with."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = src.clone()  # also the warm-up copy
    moved = 2 * nbytes
    out = {"eager": moved / median_seconds(lambda: dst.copy_(src), 5, device == "cuda") / 1e9}
    if device == "cuda":
        out["graph"] = moved / time_graph([lambda: dst.copy_(src)] * 4) / 1e3
    out["peer"] = max(out.values())
    return out


def load_file(path: Path) -> SimpleNamespace:
    """The globals of a Python file run as a module (another version of a kernel file, for A/B runs in one process:
    e.g. `git show REV:src/hlsa/ops/triton/router_step.py > /tmp/old.py`)."""
    return SimpleNamespace(**runpy.run_path(str(path), run_name=f"ab_{Path(path).stem}"))


def positive_ints(text: str, option: str) -> tuple[int, ...]:
    """`"1,16,64"` -> `(1, 16, 64)` for a command-line option; anything else is a usage error that names it."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise SystemExit(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


def error_text(err: BaseException, limit: int = 600) -> str:
    """An exception as `Type: message` for a results file, a long message cut in the middle: a compile that fails in
    a worker process (Inductor's, Triton's) puts the whole traceback first and its cause last."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return text if len(text) <= limit else f"{text[: limit // 3]} ... {text[-(limit - limit // 3) :]}"
