"""benchmarks/benchlib.py's `step_timeline` on a hand-built Chrome trace: which work belongs to which step, the GPU's
busy and idle time, and the host calls that explain a gap."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def benchlib(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import benchlib

    return benchlib


def _trace(benchlib) -> list[dict]:
    """Two steps. Step 1 (0-100): kernels A (launched at 10, runs 20-60) and B (launched at 30, runs 60-90: no gap).
    Step 2 (200-400): kernel C (launched at 210, runs 220-260), then the host spends 250-330 in a `cudaFree` and
    launches a memset at 335-340 that runs 345-355: a gap of 85 us, launched 80 us after C ended; kernel D, with no
    launch in the trace, runs 370-380 after a gap of 15 us."""

    def x(cat: str, name: str, ts: float, dur: float, corr: int | None = None) -> dict:
        return {
            "ph": "X",
            "cat": cat,
            "name": name,
            "ts": ts,
            "dur": dur,
            **({"args": {"correlation": corr}} if corr else {}),
        }

    return [
        x("user_annotation", benchlib.STEP, 0, 100),
        x("user_annotation", benchlib.STEP, 200, 200),
        x("user_annotation", "other annotation", 0, 400),
        x("cuda_driver", "cuLaunchKernelEx", 10, 2, 1),
        x("kernel", "A", 20, 40, 1),
        x("cuda_driver", "cuLaunchKernelEx", 30, 2, 2),
        x("kernel", "B", 60, 30, 2),
        x("cuda_driver", "cuLaunchKernelEx", 210, 2, 3),
        x("kernel", "C", 220, 40, 3),
        x("cpu_op", "aten::empty", 240, 100),
        x("cuda_runtime", "cudaFree", 250, 80),
        x("cuda_runtime", "cudaMemsetAsync", 335, 5, 4),
        x("gpu_memset", "Memset (Device)", 345, 10, 4),
        x("kernel", "D", 370, 10, 98),
        x("kernel", "after every step", 500, 10, 99),
        {"ph": "f", "name": "ac2g", "ts": 20},  # flow events carry no duration
    ]


def test_busy_idle_and_the_gap_explained(benchlib) -> None:
    out = benchlib.step_timeline(_trace(benchlib))
    assert out["steps"] == 2
    assert out["busy_us"] == pytest.approx((70 + 60) / 2)
    assert out["span_us"] == pytest.approx((70 + 160) / 2)
    assert out["idle_us"] == pytest.approx(100 / 2)
    assert [w["name"] for w in out["work"]] == ["A", "B"]
    late, unlaunched = out["gaps_of_worst_step"]
    assert (late["before"], late["after"], late["gap_us"]) == ("C", "Memset (Device)", 85)
    assert late["launched_late_us"] == pytest.approx(80)
    assert [h["name"] for h in late["host_between"]] == ["aten::empty", "cudaFree"]
    assert (unlaunched["after"], unlaunched["gap_us"], unlaunched["launched_late_us"]) == ("D", 15, None)


def test_short_gaps_and_a_trace_without_steps(benchlib) -> None:
    out = benchlib.step_timeline(_trace(benchlib), min_gap_us=90)
    assert out["gaps_of_worst_step"] == []
    assert benchlib.step_timeline([{"ph": "X", "cat": "kernel", "name": "A", "ts": 0, "dur": 1}]) == {"steps": 0}
