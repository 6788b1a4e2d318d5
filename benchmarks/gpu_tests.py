"""The GPU checks of `tests/` (`pytest -m gpu`), one test file at a time, each under a time limit, into a results file.

Usage: `python3 benchmarks/gpu_tests.py [--files tests/ops/test_nsa.py,...] [--file-timeout-s 300] [--budget-s 540]
[--rerun] [--out DIR]`

All GPU checks together compile every kernel at many shapes and take longer than one sitting on a lent machine, and a
pytest killed at a time limit says nothing about the tests it ran. So this runs one pytest per file (the files that
hold `-m gpu` tests, in collection order, or `--files`), reads each run's JUnit XML, and rewrites
`gpu_tests-<gpu>.json` after every file: per file its status (`passed`, `failed`, `timeout` past its own limit,
`stopped (time budget)` where the run's budget ran out first, `skipped` where the machine has no GPU), counts, seconds,
and each failure's message. A second run at the same commit on the same GPU keeps the files that passed and runs the
others (`--rerun`: all of them again), so that the whole suite can be covered over several calls. A run at another
commit starts a new file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchlib import REPO, add_output_args, machine, result_path, write_result


def gpu_test_files() -> list[str]:
    """The test files that hold `-m gpu` tests, in pytest's collection order (collection needs no GPU)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest --collect-only failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    ids = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    return list(dict.fromkeys(ids))


def junit_outcomes(xml_path: Path) -> dict:
    """Counts of passed / failed / skipped tests and each failure's id and message, from a JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = " ".join((problem.get("message") or problem.text or "").split())
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "message": message[-600:]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def run_file(path: str, timeout_s: float) -> dict:
    """One pytest of the `-m gpu` tests of `path`, stopped after `timeout_s` seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", f"--junitxml={report}"]
        try:
            proc = subprocess.run([*command, path], capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            tail = (err.stdout or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"status": "timeout", "seconds": round(time.perf_counter() - start, 1), "output_tail": tail}
        seconds = round(time.perf_counter() - start, 1)
        if not report.exists():
            return {"status": "error", "seconds": seconds, "output_tail": (proc.stdout + proc.stderr)[-1500:]}
        outcome = junit_outcomes(report)
    if outcome["failed"] or proc.returncode not in (0, 5):
        status = "failed"
    elif outcome["passed"]:
        status = "passed"
    else:
        status = "skipped"
    return {"status": status, "seconds": seconds, **outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--files", default=None, help="comma-separated test files (default: every file with gpu tests)")
    parser.add_argument("--file-timeout-s", type=float, default=300.0, help="time limit of one file (default 300)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no file once this many seconds have passed, and stop the running one then",
    )
    parser.add_argument("--rerun", action="store_true", help="run the files that already passed at this commit too")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_tests.py runs the compiled kernels: unset TRITON_INTERPRET")
    files = args.files.split(",") if args.files else gpu_test_files()
    missing = [f for f in files if not (REPO / f).is_file()]
    if missing:
        sys.exit(f"--files: no such test file: {', '.join(missing)}")
    path = result_path("gpu_tests", args.out)
    result = {"machine": machine(args.commit), "files": {}}
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier["machine"]["commit"] == result["machine"]["commit"]:
            result["files"] = earlier["files"]
    start = time.monotonic()
    for name in files:
        if not args.rerun and result["files"].get(name, {}).get("status") == "passed":
            print(f"{name}: passed earlier at this commit", flush=True)
            continue
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
        if left is not None and left <= 0:
            print(f"{name}: not run (time budget)", flush=True)
            continue
        limit = args.file_timeout_s if left is None else min(args.file_timeout_s, left)
        entry = run_file(name, limit)
        if entry["status"] == "timeout" and limit < args.file_timeout_s:
            # Stopped by the run's budget, not by its own limit: it says nothing of a file that hangs.
            entry["status"] = "stopped (time budget)"
        result["files"][name] = entry
        counts = ", ".join(f"{entry[k]} {k}" for k in ("passed", "failed", "skipped") if k in entry)
        print(f"{name}: {entry['status']} in {entry['seconds']:.0f} s{f' ({counts})' if counts else ''}", flush=True)
        for failure in entry.get("failures", []):
            print(f"  {failure['test']}: {failure['message'][:300]}", flush=True)
        write_result(path, result)
    write_result(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
