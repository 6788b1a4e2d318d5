"""CPU check of benchmarks/kernel_profile.py: the `--smoke` run profiles a decode step and a training step of two
tiny architectures and writes tables whose totals add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernel_profile.py"


def test_kernel_profile_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("kernel_profile-*.json")  # one file, named after the machine's GPU ("cpu" here)
    result = json.loads(path.read_text())
    assert set(result["archs"]) == {"gdn_lte", "gdn_swa"}
    for phases in result["archs"].values():
        for phase in ("decode", "train"):
            r = phases[phase]
            assert r["kernels_per_step"] > 0 and r["wall_ms_per_step"] > 0
            top = r["top"]
            assert top == sorted(top, key=lambda row: -row["us_per_step"])
            assert sum(row["us_per_step"] for row in top) <= r["device_us_per_step"] * (1 + 1e-6)
        # the training step runs the backward: convolution gradients of the GDN short convs (both hybrids)
        assert any("convolution_backward" in row["name"] for row in phases["train"]["top"])
    # one decode step in launch order: the top-level aten operations, with their times
    for phases in result["archs"].values():
        sequence = phases["decode"]["sequence"]
        assert sequence and all(name.startswith("aten::") and us >= 0 and idle >= 0 for name, us, idle in sequence)
        assert any("addmm" in name or "mm" in name or "linear" in name for name, _, _ in sequence)
        busy, idle = (sum(row[i] for row in sequence) for i in (1, 2))
        assert busy > 0 and phases["decode"]["sequence_busy_us"] == pytest.approx(busy, abs=0.1)
        assert phases["decode"]["sequence_idle_us"] == pytest.approx(idle, abs=0.1)
    # LTE's decode step does more than SWA's (router window, eviction)
    lte, swa = result["archs"]["gdn_lte"]["decode"], result["archs"]["gdn_swa"]["decode"]
    assert lte["kernels_per_step"] > swa["kernels_per_step"]


def test_graph_profile_needs_a_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--graph", "--phases", "decode", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--graph captures CUDA graphs: it needs a GPU" in proc.stderr
