"""The per-step losses of a short deterministic CPU run, committed in `tests/train/data/tiny_losses.json` and checked
by `test_golden_losses.py`, so that a change which shifts training (initialisation, data, loss, optimizer, LR
schedule, the LTE controller) shows up as a failing test rather than as a quietly different model.

After an intended change, regenerate the file and commit it with the change:

    PYTHONPATH=src python tests/train/tiny_losses.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("data") / "tiny_losses.json"

# configs/tiny/gdn_lte.json (GDN + LTE layers, so the sparsity controller runs), on MQAR, fp32, one thread.
OPTIONS: dict[str, Any] = {
    "model.config": "configs/tiny/gdn_lte.json",
    "data.source": "synthetic:mqar",
    "data.seq_len": 64,
    "data.batch_size": 4,
    "data.num_pairs": 4,
    "data.num_queries": 4,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 5,
    "train.steps": 20,
    "train.seed": 0,
    "train.device": "cpu",
    "train.dtype": "fp32",
    "train.threads": 1,
    "checkpoint.interval": 0,
    "log.progress": False,
    "log.tensorboard": False,
}


def run_losses(options: dict[str, Any], run_dir: Path) -> list[float]:
    """The per-step loss of training with `options` (paths relative to the repository) into `run_dir`."""
    from hlsa.train.options import build_options
    from hlsa.train.trainer import Trainer

    over = {**options, "model.config": str(REPO / options["model.config"]), "checkpoint.dir": str(run_dir)}
    return [m["loss"] for m in Trainer(build_options(overrides=over)).run()]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_losses(OPTIONS, Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"options": OPTIONS, "losses": losses}, indent=2) + "\n")
    print(f"wrote {len(losses)} losses to {GOLDEN}")


if __name__ == "__main__":
    main()
