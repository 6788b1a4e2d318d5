"""benchmarks/kernel_counters.py without a GPU: reading ncu's raw page, giving each planned launch its profiled
kernels, the summary of a kernel's counters, the ncu command, and the refusal on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import kernel_counters

    return kernel_counters


def _export(names: list[str]) -> str:
    """A raw-page export as `ncu --import R --csv --page raw --print-units base` writes it, after two lines of ncu's
    own: the header, the units row, one row per kernel (with a thousands separator in a count)."""
    metrics = [
        "gpu__time_duration.sum", STALL.format("barrier"), STALL.format("wait"), STALL.format("long_scoreboard"),
        "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
        "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    ]  # fmt: skip
    fixed = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
             "Grid Size", "Device", "CC"]  # fmt: skip
    units = [""] * len(fixed) + ["nsecond", "", "", "", "%", "%", "register/thread", ""]
    lines = ["==PROF== Connected to process 4242", "==PROF== Disconnected from process 4242"]
    lines.append(",".join(f'"{h}"' for h in fixed + metrics))
    lines.append(",".join(f'"{u}"' for u in units))
    for i, name in enumerate(names):
        values = [str(845_000 + i), f"{0.5 + i}", "1.25", "0.75", f"{60 - i}", "40", "168", "1,234"]
        head = [str(i), "4242", "python3", "host", name, "1", "7", "(128, 1, 1)", "(32, 64, 1)", "0", "9.0"]
        lines.append(",".join(f'"{v}"' for v in head + values))
    return "\n".join(lines) + "\n"


def test_the_raw_page_is_read_per_kernel_with_units(counters) -> None:
    kernels, units = counters.parse_raw_csv(_export(["_fwd_kernel", "_fwd_wgmma_kernel"]))
    assert [k["name"] for k in kernels] == ["_fwd_kernel", "_fwd_wgmma_kernel"]
    assert [k["id"] for k in kernels] == [0, 1]
    metrics = kernels[1]["metrics"]
    assert metrics["gpu__time_duration.sum"] == 845_001.0 and units["gpu__time_duration.sum"] == "nsecond"
    assert metrics["l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"] == 1234.0
    assert metrics["Block Size"] == "(128, 1, 1)" and "Block Size" not in units


def test_an_export_without_the_raw_page_is_an_error(counters) -> None:
    with pytest.raises(ValueError, match="no ncu raw page"):
        counters.parse_raw_csv("==PROF== Disconnected from process 4242\n")


def test_the_summary_converts_units_and_ranks_stalls_and_pipes(counters) -> None:
    (kernel,), units = counters.parse_raw_csv(_export(["_fwd_wgmma_kernel"]))
    summary = counters.summarize(kernel, units, flops=4 * 64 * 1e9)
    assert summary["duration_us"] == pytest.approx(845.0)
    assert summary["tflops"] == pytest.approx(4 * 64 * 1e9 / 845e-6 / 1e12)
    assert list(summary["stalls"]) == ["wait", "long_scoreboard", "barrier"]
    assert summary["stalls"]["barrier"] == 0.5
    assert summary["pipes"] == {"tensor_op_gmma": 60.0, "xu": 40.0}
    assert summary["registers"] == 168.0 and summary["shared_bank_conflicts"] == 1234.0
    assert summary["issue_active_pct"] is None  # not in this export: absent, not zero
    assert "tflops" not in counters.summarize(kernel, units, flops=None)


def _launch(kernel: str, name: str) -> dict:
    return {"kernel": kernel, "D": 64, "config": [], "name": name}


def test_each_launch_gets_its_kernels_in_order(counters) -> None:
    names = ["_fwd_kernel", "_fwd_wgmma_kernel", "_dkdv_col_kernel", "_dkdv_band_kernel"]
    kernels, _ = counters.parse_raw_csv(_export(names))
    launches = [_launch("fwd", "a"), _launch("fwd", "b"), _launch("fwd", "c"), _launch("dkdv", "d"), _launch("dq", "e")]
    statuses = [{"status": "ok"}, {"status": "error: too many resources"}, {"status": "ok"}, {"status": "ok"}]
    assert counters.assign(launches, statuses, kernels) == []
    assert [[k["name"] for k in launch["kernels"]] for launch in launches] == [
        ["_fwd_kernel"], [], ["_fwd_wgmma_kernel"], ["_dkdv_col_kernel", "_dkdv_band_kernel"], []
    ]  # fmt: skip
    assert launches[1]["status"].startswith("error") and launches[4]["status"].startswith("not run")


def test_the_table_prints_every_launch(counters, capsys: pytest.CaptureFixture) -> None:
    kernels, units = counters.parse_raw_csv(_export(["_fwd_kernel", "_dkdv_col_kernel", "_dkdv_band_kernel"]))
    launches = [_launch("fwd", "128x64x4x3"), _launch("fwd", "64x64x4x4gl"), _launch("dkdv", "128x64x4x2pk")]
    counters.assign(launches, [{"status": "ok"}, {"status": "error: out of resources"}, {"status": "ok"}], kernels)
    for launch in launches:
        launch["summary"] = [counters.summarize(k, units, 1e12 if launch["kernel"] == "fwd" else None)
                             for k in launch["kernels"]]  # fmt: skip
    counters.print_table(launches)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "64x64x4x4gl: error: out of resources" in lines[2]
    assert "1183" in lines[1] and "wait 1.25" in lines[1]  # 1e12 FLOP in 845 us; the largest stall first


def test_kernels_that_do_not_fit_the_plan_are_kept_aside(counters) -> None:
    kernels, _ = counters.parse_raw_csv(_export(["_fwd_kernel", "_dq_kernel"]))
    launches = [_launch("fwd", "a"), _launch("fwd", "b"), _launch("fwd", "c")]
    leftover = counters.assign(launches, [{"status": "ok"}] * 3, kernels)
    assert [k["name"] for k in launches[0]["kernels"]] == ["_fwd_kernel"]
    assert launches[1]["status"].startswith("unassigned") and "'_dq_kernel'" in launches[1]["status"]
    assert launches[1]["kernels"] == [] and [k["name"] for k in leftover] == ["_dq_kernel"]
    assert launches[2]["status"] == launches[1]["status"] and launches[2]["kernels"] == []
    kernels, _ = counters.parse_raw_csv(_export(["_fwd_kernel", "_fwd_kernel"]))
    assert len(counters.assign([_launch("fwd", "a")], [{"status": "ok"}], kernels)) == 1


def test_the_ncu_command_profiles_the_attention_kernels_alone_with_the_clocks_left_alone(counters) -> None:
    import re

    command = counters.ncu_command("ncu", Path("/tmp/r"), ["python3", "x.py"], extra_metrics=True)
    flags = dict(zip(command[1:-2:], command[2:-2:], strict=False))
    assert flags["--clock-control"] == "none" and flags["--profile-from-start"] == "off"
    assert command[-2:] == ["python3", "x.py"] and "--export" in command
    pattern = flags["--kernel-name"].removeprefix("regex:")
    names = ["_fwd_kernel", "_fwd_wgmma_kernel", "_dq_kernel", "_dkdv_col_kernel", "_dkdv_band_kernel"]
    assert all(re.search(pattern, n) for n in names)
    assert not re.search(pattern, "_zero_column_rows_kernel") and not re.search(pattern, "_prologue_kernel")
    assert sum(c == "--section" for c in command) == len(counters.SECTIONS)
    assert "--metrics" not in counters.ncu_command("ncu", Path("/tmp/r"), ["p"], extra_metrics=False)


def test_the_plan_holds_each_kernels_default_and_the_gluon_forwards(counters) -> None:
    launches = counters.plan_launches(["fwd", "dq", "dkdv"], [64, 128], 227 * 1024)
    for D in (64, 128):
        fwd = [launch["name"] for launch in launches if launch["kernel"] == "fwd" and launch["D"] == D]
        assert not fwd[0].endswith("gl") and len(fwd) > 1 and all(name.endswith("gl") for name in fwd[1:])
        assert sum(launch["kernel"] == "dq" and launch["D"] == D for launch in launches) == 1
        assert sum(launch["kernel"] == "dkdv" and launch["D"] == D for launch in launches) == 1


def test_without_a_gpu_the_script_says_what_it_needs(compile_env: dict) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_counters.py")], capture_output=True, text=True, cwd=REPO,
        env=compile_env,
    )  # fmt: skip
    assert proc.returncode == 1 and "needs a CUDA GPU and Nsight Compute" in proc.stderr
