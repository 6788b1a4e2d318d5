"""benchmarks/kernel_resources.py on the CPU: the training attention's kernels compiled ahead of time for sm_90 (no
GPU needed), their registers and spills read from the cubin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernel_resources.py"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles, it does not interpret
    return {**env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'benchmarks'}"}


def _has_cuda_toolchain() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.skipif(not _has_cuda_toolchain(), reason="this Triton has no NVIDIA backend tools (cuobjdump)")
def test_default_dkdv_tiles_compile_for_sm90_with_their_resources(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernels", "dkdv", "--dims", "64", "--defaults-only", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernel_resources-sm90.json").read_text())
    assert result["target"] == "sm_90" and result["triton"] and result["machine"]["command"]
    (row,) = result["rows"]
    assert row["kernel"] == "dkdv" and row["D"] == 64 and row["default"]
    compiled = {c["name"]: c for c in row["compiled"]}
    assert set(compiled) == {"_dkdv_col_kernel", "_dkdv_band_kernel"}  # the prologue's launch is left out
    for c in compiled.values():
        assert 0 < c["regs"] <= 255 and c["stack"] >= 0 and c["shared"] > 0
    assert "_dkdv_band_kernel regs=" in proc.stdout


def test_bad_kernel_names_are_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernels", "dkdv,bwd", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert proc.returncode != 0 and "--kernels: expected a comma-separated subset" in proc.stderr
