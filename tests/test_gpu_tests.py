"""benchmarks/gpu_tests.py on the CPU: its reading of pytest's JUnit reports, one run (the GPU tests skip here), the
files that passed earlier at the same commit left alone, and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_tests.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_tests  # noqa: E402

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.ops.test_x" name="test_ok" time="0.1"/>
<testcase classname="tests.ops.test_x" name="test_bad[bf16]" time="0.2"><failure message="assert 0.3 &lt; 0.02">long
traceback</failure></testcase>
<testcase classname="tests.ops.test_x" name="test_broken" time="0.0"><error message="fixture 'gpu' not found"/>
</testcase>
<testcase classname="tests.ops.test_x" name="test_cuda" time="0.0"><skipped message="needs CUDA"/></testcase>
</testsuite></testsuites>
"""


def test_junit_outcomes_counts_failures_errors_and_skips(tmp_path: Path) -> None:
    path = tmp_path / "report.xml"
    path.write_text(REPORT)
    got = gpu_tests.junit_outcomes(path)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 2, 1)
    assert got["failures"] == [
        {"test": "tests.ops.test_x::test_bad[bf16]", "message": "assert 0.3 < 0.02"},
        {"test": "tests.ops.test_x::test_broken", "message": "fixture 'gpu' not found"},
    ]


def run_script(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=300, env=env
    )


def test_a_run_records_each_file_and_keeps_what_passed_at_this_commit(tmp_path: Path, compile_env: dict) -> None:
    files = "tests/ops/test_linear.py,tests/ops/test_router_step.py"
    proc = run_script(["--files", files, "--out", str(tmp_path), "--commit", "abc123"], compile_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_tests-*.json")
    result = json.loads(path.read_text())
    assert result["machine"]["commit"] == "abc123" and list(result["files"]) == files.split(",")
    for entry in result["files"].values():  # no GPU here: every gpu test skips
        assert entry["status"] == "skipped" and entry["skipped"] > 0 and entry["passed"] == entry["failed"] == 0

    result["files"]["tests/ops/test_linear.py"] = {"status": "passed", "seconds": 1.0, "passed": 3}
    path.write_text(json.dumps(result))
    one = "tests/ops/test_linear.py"
    again = run_script(["--files", one, "--out", str(tmp_path), "--commit", "abc123"], compile_env)
    assert "tests/ops/test_linear.py: passed earlier at this commit" in again.stdout
    assert json.loads(path.read_text())["files"]["tests/ops/test_linear.py"]["passed"] == 3

    other = run_script(["--files", one, "--out", str(tmp_path), "--commit", "def456"], compile_env)
    assert "passed earlier" not in other.stdout  # another commit starts afresh
    assert json.loads(path.read_text())["files"]["tests/ops/test_linear.py"]["status"] == "skipped"


def test_a_file_past_its_time_limit_is_recorded_as_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    entry = gpu_tests.run_file("tests/test_e2e_smoke.py", timeout_s=0.5)
    assert entry["status"] == "timeout" and entry["seconds"] < 30


def test_a_file_stopped_by_the_budget_is_not_called_a_timeout(tmp_path: Path, compile_env: dict) -> None:
    """The run's budget (1 s, less than pytest takes to start) cuts the file short: recorded as stopped, to run
    again, not as a file that hangs past its own limit."""
    args = ["--files", "tests/test_e2e_smoke.py", "--out", str(tmp_path), "--budget-s", "1", "--file-timeout-s", "300"]
    proc = run_script(args, compile_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_tests-*.json")
    assert json.loads(path.read_text())["files"]["tests/test_e2e_smoke.py"]["status"] == "stopped (time budget)"


def test_bad_arguments_are_refused(tmp_path: Path, compile_env: dict) -> None:
    proc = run_script(["--files", "tests/no_such_test.py", "--out", str(tmp_path)], compile_env)
    assert proc.returncode != 0 and "no such test file: tests/no_such_test.py" in proc.stderr
    proc = run_script(["--out", str(tmp_path)], {**compile_env, "TRITON_INTERPRET": "1"})
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
