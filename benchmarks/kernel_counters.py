"""Hardware counters of the training attention kernels (Nsight Compute): why each config runs at the speed it does.

attention_tiles.py says how fast each config is; this script reads what its warps waited on and which units were
busy: for the default config of each kernel (forward, dq, dk/dv), and for the forward also its Gluon configs, the
Triton kernel's schedule against FlashAttention-3's (sparse_attention_wgmma.py), on the sweep's inputs
(`attention_tiles.Case`, bf16, T = 4096 by default).

It runs itself under `ncu` with the clocks left as they are (`--clock-control none`). The child process launches
each config once to compile it, then once more between cudaProfilerStart and cudaProfilerStop, the only launch that
ncu profiles (`--profile-from-start off`). The parent reads the report's raw page (`ncu --import R --csv --page raw
--print-units base`) and keeps, per profiled kernel, every counter (`metrics`: value and unit) and a summary:

* duration (µs) and, for the forward, effective TFLOP/s (4 * D per attended pair, as attention_tiles.py counts);
* `stalls`: warps stalled per issued instruction, by reason (`barrier`: a thread barrier; `long_scoreboard`: global
  or local memory; `wait`: a fixed-latency dependency; `math_pipe_throttle`: a busy unit; ...), largest first;
* `pipes`: how busy each unit was, % of its peak (`tensor_op_gmma`: warpgroup products, `tensor_op_hmma`: mma.sync,
  `xu`: the exponentials, `fma`, `alu`, ...);
* issue slots used, achieved occupancy, registers per thread, dynamic shared memory, shared-memory bank conflicts.

    PYTHONPATH=src python3 benchmarks/kernel_counters.py [--kernels fwd,dq,dkdv] [--dims 64,128] [--out DIR]

Writes `kernel_counters-<gpu>.json` (DIR default benchmarks/results). About a minute per kernel and head dim on an
H100, most of it compiling. ncu must be on the PATH or in /opt/nvidia/nsight-compute (NCU names another binary);
counters need a machine whose runtime lets ncu read them (a failure is reported with ncu's own message).
"""

from __future__ import annotations

import argparse
import csv
import functools
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attention_tiles import HKV, HQ, KERNELS, TOKENS, Case, candidates, cfg_name, parse_kernels, smem_limit
from benchlib import add_output_args, error_text, machine, result_path, write_result

# The kernels each launcher runs that ncu profiles, in launch order (dk/dv's row-zeroing kernel is left out).
PROFILED = {
    "fwd": ("_fwd_kernel|_fwd_wgmma_kernel",),
    "dq": ("_dq_kernel",),
    "dkdv": ("_dkdv_col_kernel", "_dkdv_band_kernel"),
}
SECTIONS = (
    "SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats",
    "SchedulerStats", "InstructionStats",
)  # fmt: skip
STALL_REASONS = (
    "barrier", "long_scoreboard", "short_scoreboard", "wait", "math_pipe_throttle", "mio_throttle", "lg_throttle",
    "not_selected", "selected", "dispatch_stall", "membar", "branch_resolving", "no_instruction", "sleeping", "drain",
    "tex_throttle", "imc_miss", "misc",
)  # fmt: skip
# Counters asked for by name besides the sections' (the sections may or may not hold them). An ncu that does not know
# one of them refuses the whole run: it is then run again with the sections alone.
EXTRA_METRICS = (
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    *(f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in STALL_REASONS),
)
SCALARS = {  # summary name: ncu counter
    "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers": "launch__registers_per_thread",
    "dynamic_shared_bytes": "launch__shared_mem_per_block_dynamic",
    "dram_throughput_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "shared_bank_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
PIPE = re.compile(r"^sm__(?:inst_executed_)?pipe_(\w+?)(?:_cycles_active)?\.avg\.pct_of_peak_sustained_active$")
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


# --- the profiled process --------------------------------------------------------------------------------------------
def child(plan_path: Path, status_path: Path) -> None:
    """Launch each planned config twice, the second time alone between cudaProfilerStart and Stop; append one status
    line per config to `status_path` (with the inputs' attended pairs; a config that fails is reported there and
    profiled no further)."""
    plan = json.loads(plan_path.read_text())
    torch.manual_seed(0)
    cases: dict[int, Case] = {}
    with status_path.open("w") as status:
        for item in plan["launches"]:
            D = item["D"]
            if D not in cases:
                cases.clear()  # one head dim's inputs at a time
                torch.cuda.empty_cache()
                cases[D] = Case(TOKENS // plan["T"], plan["T"], D)
            launch = functools.partial(cases[D].call, item["kernel"], tuple(item["config"]))
            try:
                launch()  # compiles, off the profile
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                try:
                    launch()
                    torch.cuda.synchronize()
                finally:  # a failed launch must not leave the next config's compile under the profiler
                    torch.cuda.profiler.stop()
                line = {"status": "ok", "pairs": cases[D].pairs}
            except Exception as err:  # one config's failure must not cost the others' counters
                line = {"status": f"error: {error_text(err, 300)}"}
            status.write(json.dumps(line) + "\n")
            status.flush()


# --- the parent: run ncu, read its report ----------------------------------------------------------------------------
def find_ncu() -> str | None:
    """The ncu binary: $NCU, else the PATH, else the newest /opt/nvidia/nsight-compute/*/ncu."""
    if os.environ.get("NCU"):
        return os.environ["NCU"]
    installed = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return shutil.which("ncu") or (installed[-1] if installed else None)


def ncu_command(ncu: str, report: Path, program: list[str], extra_metrics: bool) -> list[str]:
    """Profile, with the clocks left alone, every launch of the attention kernels that `program` makes between
    cudaProfilerStart and Stop, into `report`.ncu-rep."""
    names = "|".join(name for names in PROFILED.values() for name in names)
    command = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
               "--kernel-name", f"regex:^({names})$", "--force-overwrite", "--export", str(report)]  # fmt: skip
    for section in SECTIONS:
        command += ["--section", section]
    if extra_metrics:
        command += ["--metrics", ",".join(EXTRA_METRICS)]
    return command + program


def parse_raw_csv(text: str) -> tuple[list[dict], dict[str, str]]:
    """ncu's raw page as CSV (a header row of counter names, a row of their units, then one row per profiled kernel;
    any line before the header is ignored) -> (per kernel `{"id", "name", "metrics": {counter: value}}` in profiling
    order, `{counter: unit}`). Numbers lose their thousands separators; other values stay text."""
    rows = list(csv.reader(io.StringIO(text)))
    start = next((i for i, row in enumerate(rows) if row[:1] == ["ID"] and "Kernel Name" in row), None)
    if start is None:
        raise ValueError(f"no ncu raw page in the export (first lines: {text[:300]!r})")
    header, rows = rows[start], rows[start + 1 :]
    units = rows.pop(0) if rows and not rows[0][0].strip() else [""] * len(header)
    kernels = []
    for row in rows:
        if row and row[0].strip().isdigit():
            metrics = {name: _number(value) for name, value in zip(header, row, strict=False)}
            kernels.append({"id": int(row[0]), "name": metrics["Kernel Name"], "metrics": metrics})
    return sorted(kernels, key=lambda k: k["id"]), {name: unit for name, unit in zip(header, units) if unit}


def _number(text: str) -> float | str:
    plain = text.replace(",", "").strip()
    try:
        return float(plain)
    except ValueError:
        return text


def assign(launches: list[dict], statuses: list[dict], kernels: list[dict]) -> list[dict]:
    """Give each planned launch its profiled kernels, in order: `PROFILED[kind]` many for a launch that ran (none for
    one that failed or never ran), each checked against the name it must have. At the first kernel that does not
    fit, that launch records why and the assignment stops. Returns the kernels left over (kept in the results, so that
    nothing the profiler measured is lost)."""
    queue, stopped = list(kernels), None
    for i, launch in enumerate(launches):
        launch["status"] = statuses[i]["status"] if i < len(statuses) else "not run (the profiled process ended)"
        launch["kernels"] = []
        if launch["status"] != "ok":
            continue
        if stopped:
            launch["status"] = f"unassigned: {stopped}"
            continue
        for pattern in PROFILED[launch["kernel"]]:
            if not queue or not re.fullmatch(pattern, queue[0]["name"]):
                got = queue[0]["name"] if queue else "nothing"
                stopped = f"launch {i} expected a kernel {pattern!r}, the profile had {got!r} next"
                launch["status"], launch["kernels"] = f"unassigned: {stopped}", []
                break
            launch["kernels"].append(queue.pop(0))
    return queue


def summarize(kernel: dict, units: dict[str, str], flops: float | None) -> dict:
    """The counters that say where a kernel's time went (see the module docstring), from its `metrics`."""
    metrics = kernel["metrics"]

    def value(name: str) -> float | None:
        found = metrics.get(name)
        return found if isinstance(found, float) else None

    out: dict = {"name": kernel["name"]}
    duration = value("gpu__time_duration.sum")
    if duration is not None:
        out["duration_us"] = duration * TO_US.get(units.get("gpu__time_duration.sum", ""), float("nan"))
        if flops:
            out["tflops"] = flops / (out["duration_us"] * 1e-6) / 1e12
    out |= {key: value(name) for key, name in SCALARS.items()}
    stalls = {m.group(1): value(name) for name in metrics if (m := STALL.match(name)) and value(name) is not None}
    out["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1]))
    pipes = {m.group(1): value(name) for name in metrics if (m := PIPE.match(name)) and value(name) is not None}
    out["pipes"] = dict(sorted(pipes.items(), key=lambda kv: -kv[1]))
    return out


def plan_launches(kernels: list[str], dims: list[int], smem: int) -> list[dict]:
    """Per head dim, the default config of each kernel, and for the forward also the Gluon configs that fit the
    shared memory (`attention_tiles.candidates(..., flagged_only=True)`)."""
    launches = []
    for D in dims:
        for kernel in kernels:
            configs = candidates(kernel, D, smem, flagged_only=True)[0]
            for cfg in configs if kernel == "fwd" else configs[:1]:
                launches.append({"kernel": kernel, "D": D, "config": list(cfg), "name": cfg_name(cfg, kernel)})
    return launches


def run_ncu(ncu: str, launches: list[dict], T: int, timeout_s: float) -> tuple[list[dict], str, dict]:
    """Profile `launches` in one child process -> (its status lines, the raw page CSV, what the run did)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan, status, report = tmp / "plan.json", tmp / "status.jsonl", tmp / "report"
        plan.write_text(json.dumps({"T": T, "launches": launches}))
        program = [sys.executable, str(Path(__file__).resolve()), "--child", str(plan), "--status", str(status)]
        env = dict(os.environ)
        if not os.access(env.get("HOME", "/nonexistent"), os.W_OK):  # ncu unpacks its section files under HOME
            env["HOME"] = str(tmp)
        info: dict = {}
        for extra in (True, False):
            command = ncu_command(ncu, report, program, extra_metrics=extra)
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
            info = {"command": command[: command.index(sys.executable)], "returncode": proc.returncode}
            if proc.returncode == 0 and (tmp / "report.ncu-rep").exists():
                break
            info["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
            print(f"ncu failed (extra metrics: {extra}):\n{info['output_tail']}", flush=True)
        if not (tmp / "report.ncu-rep").exists():
            raise RuntimeError(f"ncu wrote no report; its output ends:\n{info.get('output_tail', '')}")
        statuses = [json.loads(line) for line in status.read_text().splitlines()] if status.exists() else []
        export = [ncu, "--import", str(tmp / "report.ncu-rep"), "--csv", "--page", "raw", "--print-units", "base"]
        text = subprocess.run(export, capture_output=True, text=True, env=env, check=True, timeout=300).stdout
    return statuses, text, info


COLUMNS = (  # the printed table: header, summary key (pipes: "pipes." + unit), width, decimals
    ("us", "duration_us", 8, 1), ("TF/s", "tflops", 6, 0), ("gmma%", "pipes.tensor_op_gmma", 6, 1),
    ("xu%", "pipes.xu", 5, 1), ("issue%", "issue_active_pct", 6, 1), ("occ%", "achieved_occupancy_pct", 5, 1),
    ("regs", "registers", 4, 0),
)  # fmt: skip


def print_table(launches: list[dict]) -> None:
    """One line per profiled kernel: the columns of COLUMNS, then its four largest stall reasons."""
    head = " ".join(f"{h:>{w}}" for h, _, w, _ in COLUMNS)
    print(f"{'kernel':24} {'config':>14} {head}  stalls per issued instruction")
    for launch in launches:
        if launch["status"] != "ok":
            print(f"{launch['kernel']} D{launch['D']} {launch['name']}: {launch['status']}")
        for s in launch.get("summary", []):
            cells = []
            for _, key, width, decimals in COLUMNS:
                value = s["pipes"].get(key[6:]) if key.startswith("pipes.") else s.get(key)
                cells.append(f"{value:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}")
            stalls = " ".join(f"{k} {v:.2f}" for k, v in list(s["stalls"].items())[:4])
            print(f"{s['name'][:20] + ' D' + str(launch['D']):24} {launch['name']:>14} {' '.join(cells)}  {stalls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of fwd,dq,dkdv")
    parser.add_argument("--dims", default="64,128", help="head dims (default 64,128)")
    parser.add_argument("--length", type=int, default=4096, help="T (B = 65536 / T; default 4096)")
    parser.add_argument("--timeout-s", type=float, default=480.0, help="limit for the profiled run (default 480)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.status)
        return
    if not torch.cuda.is_available():
        sys.exit("kernel_counters.py reads a GPU's hardware counters: it needs a CUDA GPU and Nsight Compute (ncu)")
    ncu = find_ncu()
    if ncu is None:
        sys.exit("kernel_counters.py: no ncu on the PATH or in /opt/nvidia/nsight-compute; set NCU to the binary")
    names, dims = parse_kernels(args.kernels), [int(x) for x in args.dims.split(",")]
    launches = plan_launches(names, dims, smem_limit())
    print(f"profiling {len(launches)} launches with {ncu}", flush=True)
    statuses, text, info = run_ncu(ncu, launches, args.length, args.timeout_s)
    kernels, units = parse_raw_csv(text)
    leftover = assign(launches, statuses, kernels)
    for i, launch in enumerate(launches):  # the forward's FLOPs: 4 * D per attended pair
        pairs = statuses[i].get("pairs") if i < len(statuses) else None
        flops = 4 * launch["D"] * pairs if launch["kernel"] == "fwd" and pairs else None
        launch["summary"] = [summarize(k, units, flops) for k in launch["kernels"]]
    result = {"machine": machine(args.commit), "dtype": "bfloat16", "HQ": HQ, "HKV": HKV, "T": args.length,
              "B": TOKENS // args.length, "ncu": info, "units": units, "launches": launches,
              "unassigned_kernels": leftover}  # fmt: skip
    path = write_result(result_path("kernel_counters", args.out), result)
    print_table(launches)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
