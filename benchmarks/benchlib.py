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
