"""CPU checks of benchmarks/decode_ab.py: this tree against itself (three times) on the tiny configs, and bad trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "decode_ab.py"


def test_smoke_ab_of_a_tree_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    command = [sys.executable, str(SCRIPT), str(REPO), str(REPO), str(REPO), "--smoke", "--batch", "2", "--context",
               "32", "--rounds", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("decode_ab-*.json")  # one file, named after the machine's GPU
    result = json.loads(path.read_text())
    assert result["machine"]["command"].startswith("python3 ")
    assert set(result["ms_per_step"]) == {"A", "B", "C"}
    for times in result["ms_per_step"].values():
        assert len(times) == 3 and all(t > 0 for t in times)
    for name in "BC":
        want = 1e3 * (result["median_ms"][name] - result["median_ms"]["A"])
        assert abs(result["minus_a_us"][name] - want) < 1e-6
        assert f"{name} - A" in proc.stdout


def test_one_tree_is_refused() -> None:
    command = [sys.executable, str(SCRIPT), str(REPO), "--smoke"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "two or more trees" in proc.stderr


def test_a_directory_without_sources_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(REPO), "--smoke"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "is not a source tree" in proc.stderr
