"""Training options: one dataclass per section, read from a TOML or YAML file, overridable on the command line.

Every field is addressed as `section.field` (`optim.lr`, `data.seq_len`); on the command line it becomes
`--optim.lr 1e-3`. A file holds the same names as tables (`[optim]` then `lr = 1e-3`) or nested mappings (YAML).
Precedence: command line > options file > the defaults below (SPEC section 4, the authors' flame/torchtitan recipe).

This module imports only the standard library (and PyYAML lazily), so the CLI can build its parser cheaply.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelOptions:
    """What to train: a `HybridConfig` JSON (fresh init) or a directory saved by `save_pretrained` (its weights are
    the starting point: fine-tuning)."""

    config: str = ""


@dataclass
class DataOptions:
    """Where tokens come from (`data.md` in docs/training.md lists the source grammar)."""

    source: str = ""  # path(s) joined by ',', a hub dataset name, or synthetic:mqar / synthetic:passkey
    tokenizer: str = "byte"  # "byte" (built in, offline) or any HF tokenizer name/path
    text_field: str = "text"  # jsonl / parquet / hub column holding the text
    hub_config: str = ""  # hub dataset config name (e.g. "sample-100BT")
    split: str = "train"
    seq_len: int = 4096
    batch_size: int = 8  # sequences per micro-batch per rank
    repeat: bool = True  # loop over local files (epochs); hub streams are read once
    # synthetic tasks (token ids live in [0, task_vocab); see hlsa.train.tasks)
    task_vocab: int = 256
    num_pairs: int = 8  # MQAR key/value pairs per sequence
    num_queries: int = 8  # MQAR queries per sequence
    passkey_digits: int = 5


@dataclass
class OptimOptions:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr` (flame/torchtitan)."""

    lr: float = 3e-4
    eps: float = 1e-15
    beta1: float = 0.9  # torchtitan's AdamW betas; not stated in the authors' files
    beta2: float = 0.95
    weight_decay: float = 0.1  # torchtitan default (fla.toml leaves it unset)
    warmup_steps: int = 512
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    clip: float = 1.0  # max global grad norm; <= 0 disables clipping


@dataclass
class TrainOptions:
    """The loop itself."""

    steps: int = 1000
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    parallel: str = "ddp"  # ddp | fsdp2 (only used under torchrun with WORLD_SIZE > 1)
    skip_nan_inf: bool = True
    threads: int = 0  # torch.set_num_threads on CPU; 0 = leave torch's default
    log_every: int = 10
    # fla refuses its gated chunk backward (GDN) on Hopper GPUs under Triton < 3.7.1 (fla issue #640); true lets it
    # run (our GPU tests check its gradients against the reference there). Ignored without CUDA.
    fla_hopper_bypass: bool = False


@dataclass
class CheckpointOptions:
    """Where and how often state is saved; `resume` continues the latest checkpoint in `dir`."""

    dir: str = "runs/default"
    interval: int = 500
    keep: int = 2  # how many step-* directories to keep
    resume: bool = False
    export: str = ""  # after training, also write a plain HF directory here


@dataclass
class LogOptions:
    """Progress bar always; TensorBoard when installed; W&B only when asked for."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "hlsa"
    progress: bool = True


@dataclass
class Options:
    """All sections."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    log: LogOptions = field(default_factory=LogOptions)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Options))
# Tables an options file may hold for other commands: `[demo]` is the shape of `hlsa demo`'s models
# (`hlsa.demo.arch_configs`); `hlsa train` builds its model from `model.config` and skips the table.
FOREIGN_SECTIONS = ("demo",)


def option_fields() -> list[tuple[str, str, type, Any]]:
    """Every overridable option as `(section, name, type, default)`."""
    out = []
    defaults = Options()
    for sec in dataclasses.fields(Options):
        section = getattr(defaults, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            out.append((sec.name, f.name, type(value), value))
    return out


def parse_value(text: str, kind: type) -> Any:
    """Command-line string -> the option's type (`bool` accepts true/false/1/0/yes/no)."""
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    return kind(text)


def read_options_file(path: str | Path) -> dict[str, Any]:
    """Load a `.toml`, `.yaml` or `.yml` file into nested dicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"options file {str(path)!r} does not exist; pass an existing .toml or .yaml file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        with path.open("rb") as fh:
            return tomllib.load(fh)
    if suffix in (".yaml", ".yml"):
        import yaml

        with path.open() as fh:
            return yaml.safe_load(fh) or {}
    raise ValueError(f"options file {str(path)!r}: unknown suffix {suffix!r}; use .toml, .yaml or .yml")


def build_options(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Options:
    """Defaults, then `file_values` (nested `{section: {name: value}}`), then flat `overrides` (`{"optim.lr": 1e-3}`).

    Unknown sections or names raise `ValueError` listing the valid ones, so a typo never goes unnoticed.
    """
    opts = Options()
    for section, values in (file_values or {}).items():
        if section in FOREIGN_SECTIONS:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"options file: [{section}] must be a table of options, got {values!r}")
        for name, value in values.items():
            _set(opts, section, name, value)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        _set(opts, section, name, value)
    return opts


def _set(opts: Options, section: str, name: str, value: Any) -> None:
    if section not in SECTIONS:
        raise ValueError(f"unknown options section {section!r}; valid sections are {list(SECTIONS)}")
    target = getattr(opts, section)
    names = [f.name for f in dataclasses.fields(target)]
    if name not in names:
        raise ValueError(f"unknown option {section}.{name}; valid options of [{section}] are {names}")
    current = getattr(target, name)
    if isinstance(value, str) and not isinstance(current, str):
        value = parse_value(value, type(current))
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif type(value) is not type(current):
        raise ValueError(f"option {section}.{name} expects {type(current).__name__}, got {value!r}")
    setattr(target, name, value)
