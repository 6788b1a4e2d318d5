"""A short deterministic CPU run reproduces the committed per-step losses (see tests/train/tiny_losses.py for what
is run and how to regenerate the file after an intended change)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.tiny_losses import GOLDEN, OPTIONS, run_losses


def test_tiny_run_reproduces_the_committed_losses(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert golden["options"] == OPTIONS, "tiny_losses.py changed: regenerate the file (see its docstring)"
    losses = run_losses(golden["options"], tmp_path / "run")
    assert len(losses) == len(golden["losses"]) == OPTIONS["train.steps"]
    # fp32 on one thread is deterministic on a machine; rtol leaves room for other CPUs' vector instructions
    assert losses == pytest.approx(golden["losses"], rel=1e-5, abs=0), "regenerate with tests/train/tiny_losses.py"
