"""Training checkpoints: written to a temporary directory and renamed into place, so a crash never leaves a torn one.

Layout of `<checkpoint.dir>/`:

* `step-00001000/` - `config.json` + `model.safetensors` (a directory `HybridForCausalLM.from_pretrained` can load;
  the LTE controller's `l1_lambda` / `num_kept` buffers are in it), the training tokenizer's files when the data has
  one (so `hlsa generate` / `hlsa eval` find it), `optimizer.pt` (full, unsharded AdamW state keyed by parameter
  name), `trainer.pt` (step, scheduler, skip counter, options, and per rank its RNG states and data position);
* `latest` - a text file naming the newest complete step directory (replaced atomically after the rename).

Every file is fsynced before the rename and the directory after it, so a power loss cannot leave `latest` naming
a directory with truncated files.

State dicts go through `torch.distributed.checkpoint.state_dict` with `full_state_dict=True`, which gives the same
unsharded names for a plain module, DDP and FSDP2; only rank 0 writes, and every rank reads the same files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hlsa.errors import UsageError

LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded `(model, optimizer)` state dicts on the CPU (collective under FSDP2: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Any], optim_sd: dict[str, Any]
) -> None:
    """Inverse of `full_state` (every rank passes the full dicts it read)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries (renames, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def existing_steps(root: str | Path) -> list[Path]:
    """The step directories under `root`, oldest first."""
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir())


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    config: Any,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
    tokenizer: Any = None,
) -> Path:
    """Write `root/step-XXXXXXXX` atomically, point `root/latest` at it and keep the newest `keep` (rank 0 only).
    `tokenizer` (the training data's, or None) is saved beside the model."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    # clone: tied weights share storage, which safetensors refuses; both names are stored (a few MB at most)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_sd.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    torch.save(optim_sd, tmp / OPTIM_FILE)
    torch.save(trainer_state, tmp / TRAINER_FILE)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. interrupted right after a scheduled save): swap, then delete
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _atomic_write_text(root / LATEST, final.name)
    _prune(root, keep, current=final)
    return final


def _prune(root: Path, keep: int, *, current: Path) -> None:
    """Delete all but the newest `keep` steps up to `current`; `current` (what `latest` names) is always kept."""
    steps = [p for p in existing_steps(root) if p.name <= current.name]
    for p in steps[: max(len(steps) - max(keep, 1), 0)]:
        shutil.rmtree(p)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory `root/latest` names, or None when there is no complete checkpoint."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    if not all((path / name).is_file() for name in (MODEL_FILE, OPTIM_FILE, TRAINER_FILE)):
        raise UsageError(f"{marker} names {path.name}, which is incomplete; delete {marker} to start afresh")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`(model_sd, optim_sd, trainer_state)` read from a step directory (onto the CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    model_sd = load_file(str(path / MODEL_FILE))
    optim_sd = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=False)
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    return model_sd, optim_sd, trainer_state


def export_pretrained(config: Any, model_sd: dict[str, Any], out_dir: str | Path, *, tokenizer: Any = None) -> Path:
    """A plain HF directory (`config.json` + `model.safetensors`, and `tokenizer`'s files when given) for
    `HybridForCausalLM.from_pretrained`, `hlsa generate` and `hlsa eval`."""
    from hlsa.model import HybridForCausalLM

    out_dir = Path(out_dir)
    model = HybridForCausalLM(config)
    model.load_state_dict(model_sd)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (dropout in the LTE router; data is seeded by index, not by these)."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
