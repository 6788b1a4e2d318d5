"""Where training metrics go: a tqdm bar, `log.jsonl` in the checkpoint directory, TensorBoard (when installed) and
W&B (only when `log.wandb = true`). Only rank 0 writes anything."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


class Monitor:
    """Rank 0's sinks for per-step metrics; every method is a no-op on other ranks."""

    def __init__(self, opts: Any, *, rank: int, start_step: int, total_steps: int, run_dir: Path) -> None:
        self.active = rank == 0
        self.every = max(opts.train.log_every, 1)
        self.bar = self.tb = self.wandb = None
        self.jsonl = None
        self._t0 = time.perf_counter()
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(run_dir / "log.jsonl", start_step)
        self.jsonl = (run_dir / "log.jsonl").open("a")
        if opts.log.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if opts.log.tensorboard:
            self.tb = _tensorboard(run_dir / "tb", purge_step=start_step + 1)
        if opts.log.wandb:
            self.wandb = _wandb(opts)

    def step(self, step: int, metrics: dict[str, float], *, tokens: int) -> None:
        """Record one optimizer step; `tokens` is the global token count of that step."""
        if not self.active:
            return
        now = time.perf_counter()
        metrics = {**metrics, "tokens_per_s": tokens / max(now - self._t0, 1e-9)}
        self._t0 = now
        self._log(lambda f: f.write(json.dumps({"step": step, **metrics}) + "\n"))
        if self.bar is not None:
            self.bar.update(1)
            short = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
            short["lr"] = f"{metrics['lr']:.2e}"
            if "lte/num_kept" in metrics:
                short["kept"] = f"{metrics['lte/num_kept']:.1f}"
            self.bar.set_postfix(short, refresh=False)
        if step % self.every == 0:
            self._log(lambda f: f.flush())
            if self.tb is not None:
                for k, v in metrics.items():
                    self.tb.add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log(metrics, step=step)

    def sync(self) -> None:
        """Make `log.jsonl` durable up to now (called before each checkpoint, so no logged step the checkpoint holds
        can be lost to a kill; rows after the checkpoint are dropped on resume anyway)."""
        self._log(lambda f: (f.flush(), os.fsync(f.fileno())))

    def _log(self, write: Callable[[TextIO], object]) -> None:
        """`write(log.jsonl)`; when it fails (a full disk), say so once and stop logging there: the log must not
        end the run, and the checkpoint that follows reports the full disk with what it costs."""
        if self.jsonl is None:
            return
        try:
            write(self.jsonl)
        except OSError as e:
            jsonl, self.jsonl = self.jsonl, None
            self.message(f"log.jsonl: cannot write ({e.strerror or e}); no further steps are logged there")
            try:
                jsonl.close()
            except OSError:
                pass  # its buffered rows are what could not be written

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        self._log(lambda f: f.close())
        for sink in (self.bar, self.tb):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records after `step` (the checkpoint a run resumes from): the steps after it are trained again, and
    would otherwise appear twice. A line a kill cut short is dropped too. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (row := _row(line)) is not None and row.get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _row(line: str) -> dict[str, Any] | None:
    """A complete record of `log.jsonl`, or None for a blank or torn line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and line.endswith("\n") else None


def _tensorboard(path: Path, *, purge_step: int) -> Any:
    """A SummaryWriter that drops events from `purge_step` on (a resumed run's), or None when TensorBoard is not
    installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def _wandb(opts: Any) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ValueError(
            "log.wandb = true needs the wandb package (pip install wandb), or set log.wandb = false"
        ) from e
    wandb.init(project=opts.log.wandb_project, config=opts.to_dict())
    return wandb
