"""`benchmarks/demo_sweep.py` end to end on the CPU: a two-run grid, results.jsonl, the summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_sweep_smoke(tmp_path: Path) -> None:
    grid = {
        "common": {"data.seq_len": 48, "data.num_pairs": 4, "data.num_queries": 4, "data.batch_size": 2},
        "variants": {"tiny": {"train.steps": 2, "demo.layers": 2, "demo.router_bias_init": -1.0}},
        "archs": ["gdn_lte"],
        "seeds": [0],
        "extra": [{"variant": "tiny", "arch": "gdn_swa", "seed": 3}],
    }
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "benchmarks" / "demo_sweep.py"), "--grid", str(tmp_path / "grid.json")]
    cmd += ["--out", str(tmp_path / "out"), "--jobs", "2", "--device", "cpu", "--examples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["arch"], r["seed"]) for r in rows) == [("gdn_lte", 0), ("gdn_swa", 3)]
    lte = next(r for r in rows if r["arch"] == "gdn_lte")
    assert lte["last_log"]["step"] == 2 and sum(lte["queries"].values()) == 2 * 4
    config = json.loads((tmp_path / "out" / "tiny__gdn_lte__s0" / "export" / "config.json").read_text())
    assert config["mixers"] == ["gdn", "lte"] and config["lte"]["router_bias_init"] == -1.0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| tiny | gdn_lte | 1 |" in summary and "| tiny | gdn_swa | 1 |" in summary
