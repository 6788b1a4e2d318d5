"""Training checkpoints: written to a temporary directory and renamed into place, so a crash never leaves a torn one.

Layout of `<checkpoint.dir>/`:

* `step-00001000/` - `config.json` + `model.safetensors` (a directory `HybridForCausalLM.from_pretrained` can load;
  the LTE controller's `l1_lambda` / `num_kept` buffers are in it), the training tokenizer's files when the data has
  one (so `hlsa generate` / `hlsa eval` find it), `optimizer.pt` (full, unsharded AdamW state keyed by parameter
  name), `trainer.pt` (step, scheduler, skip counters, options, and per rank its RNG states and data position);
* `latest` - a text file naming the newest complete step directory (replaced atomically after the rename).

Every file is fsynced before the rename and the directory after it, so a power loss cannot leave `latest` naming
a directory with truncated files. A save that fails (a full disk, a kill) leaves at most a `.tmp-step-*` directory,
which the next save or run removes; `latest` and the step it names are untouched.

Nothing read back can run code: `optimizer.pt` and `trainer.pt` hold only tensors and plain data (numbers,
strings, lists, tuples, dicts; the numpy RNG state is stored as such a tuple) and are loaded with
`torch.load(weights_only=True)`, which refuses any other pickled object; `latest` must name a step directory inside
the run directory.

State dicts go through `torch.distributed.checkpoint.state_dict` with `full_state_dict=True`, which gives the same
unsharded names for a plain module, DDP and FSDP2; only rank 0 writes, and every rank reads the same files.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hlsa.errors import UsageError, check_readable_file

LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
STEP_DIR = re.compile(r"step-\d{8}")
# Leftovers of an interrupted save: its temporary directory, or the old copy of a step being re-saved.
STALE_PREFIXES = (".tmp-step-", ".old-step-")
# the fix for a damaged or missing file of a step directory
EARLIER_STEP = "delete this step directory and point latest at an earlier one, or start afresh"


class CheckpointWriteError(UsageError):
    """A checkpoint or export could not be written (a full disk, a directory that became unwritable): the partial
    copy is removed and the last complete checkpoint is kept. A UsageError, so that `hlsa train` reports it in one line:
    the fix (free space, fix permissions, then `--resume`) is the user's."""


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
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def clean_stale(root: str | Path) -> None:
    """Remove what interrupted saves left in `root` (rank 0, before writing). A `.old-step-*` copy whose step
    directory is missing (killed between the two renames of a re-save) is the complete one: it is put back."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(f".{LATEST}.tmp-") and p.is_file():
            p.unlink(missing_ok=True)
        elif p.name.startswith(STALE_PREFIXES) and p.is_dir():
            name = p.name[1:].split("-", 1)[1].rsplit("-", 1)[0]  # ".old-step-00000005-123" -> "step-00000005"
            if p.name.startswith(".old-") and STEP_DIR.fullmatch(name) and not (root / name).exists():
                os.replace(p, root / name)
            else:
                shutil.rmtree(p, ignore_errors=True)


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
    clean_stale(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # clone: tied weights share storage, which safetensors refuses; both names are stored (a few MB at most)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_sd.items()}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        torch.save(optim_sd, tmp / OPTIM_FILE)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        _match_umask(tmp.iterdir())
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
    except BaseException as e:  # a full disk, or an interrupt: the partial copy must not accumulate
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_error(e, final, root) from e
        raise
    _prune(root, keep, current=final)
    return final


def _write_error(e: OSError, final: Path, root: Path) -> CheckpointWriteError:
    last = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    kept = f"the last complete checkpoint ({root / last}) is kept" if last else "there is no earlier checkpoint"
    cause = "the disk is full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
    return CheckpointWriteError(
        f"cannot write checkpoint {final.name} in {root}: {cause}; the partial copy was removed and {kept}. "
        "Free space (or fix the directory), then rerun with --resume"
    )


def _match_umask(files: Iterable[Path]) -> None:
    """Give `files` the permissions of any other file the process creates (0666 less the umask): safetensors
    writes through a 0600 temporary file, which would make the weights unreadable to the rest of the run's group."""
    mask = os.umask(0)
    os.umask(mask)
    for f in files:
        if f.is_file():
            f.chmod(0o666 & ~mask)


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
    name = _read(marker, lambda p: p.read_text()).strip()
    # `latest` is data, and data may be crafted: follow it only to a step directory of this run.
    if not STEP_DIR.fullmatch(name):
        raise UsageError(
            f"{marker} names {name!r}, which is not a step directory of {root} (step-NNNNNNNN); "
            f"write the name of one of its step directories into {marker}, or delete it to start afresh"
        )
    path = Path(root) / name
    if path.resolve().parent != Path(root).resolve():  # a step-* symlink to elsewhere
        raise UsageError(f"{marker} names {path}, which leads outside {root}; refusing to load it")
    if not all((path / name).is_file() for name in (MODEL_FILE, OPTIM_FILE, TRAINER_FILE)):
        raise UsageError(f"{marker} names {path.name}, which is incomplete; delete {marker} to start afresh")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`(model_sd, optim_sd, trainer_state)` read from a step directory (onto the CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    model_sd = _read(path / MODEL_FILE, lambda p: load_file(str(p)))
    optim_sd = _read(path / OPTIM_FILE, _load_plain)
    trainer_state = _read(path / TRAINER_FILE, _load_plain)
    return model_sd, optim_sd, trainer_state


def _load_plain(path: Path) -> Any:
    """Tensors and plain data only: `weights_only=True` refuses any other pickled object instead of building it
    (which is how a crafted file would run code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(path: Path, load: Any) -> Any:
    """`load(path)`, with every way a checkpoint file can be unusable turned into a UsageError naming it."""
    import pickle

    from safetensors import SafetensorError

    check_readable_file(path, "a checkpoint file", fix=f"the checkpoint is incomplete; {EARLIER_STEP}")
    try:
        return load(path)
    except pickle.UnpicklingError as e:  # weights_only stopped at an object it does not allow: never built or run
        reason = str(e).partition("WeightsUnpickler error:")[2].partition(" Please use")[0].strip()
        # trainer.pt files of hlsa before RNG states were plain data hold numpy's as an array
        older = (
            "; an older hlsa's trainer.pt holds a numpy array: such a run cannot be resumed, but its weights can "
            f"be trained further with --config {path.parent} and a new --out"
            if "numpy" in reason
            else ""
        )
        raise UsageError(
            f"refusing to load {path}: it is damaged, or holds pickled Python objects besides tensors and plain "
            f"data, which could run code ({reason or e.__class__.__name__}){older}; only load checkpoints written by "
            "hlsa from a source you trust"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as e:  # truncated or garbage
        raise UsageError(
            f"{path} is unreadable: truncated or not a checkpoint file ({e.__class__.__name__}: {e}); {EARLIER_STEP}"
        ) from None


def export_pretrained(config: Any, model_sd: dict[str, Any], out_dir: str | Path, *, tokenizer: Any = None) -> Path:
    """A plain HF directory (`config.json` + `model.safetensors`, and `tokenizer`'s files when given) for
    `HybridForCausalLM.from_pretrained`, `hlsa generate` and `hlsa eval`."""
    from hlsa.model import HybridForCausalLM

    out_dir = Path(out_dir)
    model = HybridForCausalLM(config)
    model.load_state_dict(model_sd)
    model.save_pretrained(out_dir, safe_serialization=True)
    _match_umask(out_dir.glob("*.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (dropout in the LTE router; data is seeded by index, not by these)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", uint32 array, ...): stored as plain data
    numpy = (str(kind), keys.tolist(), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
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
