"""Training options: one dataclass per section, read from a TOML or YAML file, overridable on the command line.

Every field is addressed as `section.field` (`optim.lr`, `data.seq_len`); on the command line it becomes
`--optim.lr 1e-3`. A file holds the same names as tables (`[optim]` then `lr = 1e-3`) or nested mappings (YAML).
Precedence: command line > options file > the defaults below (the authors' flame/torchtitan recipe).
`build_options` checks every value's range (`Options.validate`) before anything is built from it.

This module imports only the standard library (and PyYAML lazily), so the CLI can build its parser cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hlsa.errors import UsageError, check_readable_file

# Accepted values of the string-valued choices; the trainer (`_autocast`) and `hlsa.train.distributed` (`pick_device`,
# `parallelize`) act on exactly these.
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp2")


class OptionsError(UsageError):
    """A bad option name or value, or a malformed options file."""


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
    clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainOptions:
    """The loop itself."""

    steps: int = 1000
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    parallel: str = "ddp"  # ddp | fsdp2 (only used under torchrun with WORLD_SIZE > 1)
    skip_nan_inf: bool = True
    # Stop with an error after this many skipped steps in a row (0 = never): a run whose every step is non-finite
    # (a learning rate far too high) has diverged, and its weights must not be exported as a trained model.
    max_consecutive_skips: int = 20
    threads: int = 0  # torch.set_num_threads on CPU; 0 = leave torch's default
    log_every: int = 10
    # fla refuses its gated chunk backward (GDN) on Hopper GPUs under Triton < 3.7.1 (a bug in fla's Hopper check);
    # true lets it run (our GPU tests check its gradients against the reference there). Ignored without CUDA.
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

    def validate(self) -> None:
        """Raise `OptionsError` naming every option outside its accepted range (a run would otherwise fail late, after
        its directory exists, or worse, "succeed" without updates)."""
        problems = []
        for section, name, kind, _ in option_fields():
            key, value = f"{section}.{name}", getattr(getattr(self, section), name)
            of_type, described = _TYPES[kind]
            if not of_type(value):
                problems.append(f"{key} = {value!r} is invalid: it must be {described}")
            elif key in _CHECKS and not _CHECKS[key][0](value):
                problems.append(f"{key} = {value!r} is invalid: it must be {_CHECKS[key][1]}")
        if problems:
            raise OptionsError("; ".join(problems))


# The type every option of a kind must have. A bool is an int in Python, but `true` where a count belongs is a
# mistake; a float option takes an int (`lr = 1`) but never NaN or an infinity, which no option means.
_TYPES: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "a finite number",
    ),
    str: (lambda v: isinstance(v, str), "a string"),
}


# `section.name` -> (accepts(value), the accepted range in words), checked after the option's type (`_TYPES`).
# Options not listed accept any value of their type (strings are checked where they are used: paths, sources,
# tokenizers; `data.task_vocab` and how many pairs and digits fit in a row are checked by the synthetic tasks when
# the stream is built, before the run directory exists).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.seq_len": (lambda v: v >= 2, ">= 2 (a row holds inputs and their next-token targets)"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.num_pairs": (lambda v: v >= 1, ">= 1"),
    "data.num_queries": (lambda v: v >= 1, ">= 1 (without queries an MQAR row has no target)"),
    "data.passkey_digits": (lambda v: v >= 1, ">= 1"),
    "optim.lr": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    "optim.eps": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),
    "optim.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0 (0 = no warm-up)"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.grad_accum": (lambda v: v >= 1, ">= 1 (micro-batches per optimizer step)"),
    "optim.clip": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "data.task_vocab": (lambda v: v >= 1, ">= 1"),
    "train.steps": (lambda v: v >= 1, ">= 1"),
    "train.seed": (lambda v: v >= 0, ">= 0 (the synthetic tasks seed numpy with it)"),
    "train.device": (lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    "train.dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "train.parallel": (lambda v: v in PARALLEL, f"one of {', '.join(PARALLEL)}"),
    "train.threads": (lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.max_consecutive_skips": (lambda v: v >= 0, ">= 0 (0 = never stop for skipped steps)"),
    "checkpoint.interval": (lambda v: v >= 0, ">= 0 (0 = save only at the end)"),
    # save_checkpoint never deletes the newest checkpoint (`latest` and --resume point at it), so 0 would keep one
    "checkpoint.keep": (lambda v: v >= 1, ">= 1 (the newest checkpoint is always kept)"),
}


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
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {kind.__name__}, got {text!r}") from None


def read_options_file(path: str | Path) -> dict[str, Any]:
    """Load a `.toml`, `.yaml` or `.yml` file into nested dicts (`OptionsError` when it is malformed, the `UsageError`
    of `check_readable_file` when it is missing or unreadable)."""
    path = check_readable_file(path, "the options file", fix="pass an existing .toml or .yaml file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        with path.open("rb") as fh:
            try:
                return tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:  # its message gives line and column but not the file
                raise OptionsError(f"options file {str(path)!r}: {e}") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        with path.open() as fh:
            try:
                values = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise OptionsError(f"options file {str(path)!r}: {e}") from None
        if not isinstance(values, dict):
            raise OptionsError(f"options file {str(path)!r} must hold a mapping of sections, got {values!r}")
        return values
    raise OptionsError(f"options file {str(path)!r}: unknown suffix {suffix!r}; use .toml, .yaml or .yml")


def build_options(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Options:
    """Defaults, then `file_values` (nested `{section: {name: value}}`), then flat `overrides` (`{"optim.lr": 1e-3}`),
    then `Options.validate`.

    Unknown sections or names raise `OptionsError` listing the valid ones, so a typo never goes unnoticed; so do
    values of the wrong type or outside their range, with the option's dotted name first.
    """
    opts = Options()
    for section, values in (file_values or {}).items():
        if section in FOREIGN_SECTIONS:
            continue
        if not isinstance(values, dict):
            raise OptionsError(f"options file: [{section}] must be a table of options, got {values!r}")
        for name, value in values.items():
            _set(opts, section, name, value)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        _set(opts, section, name, value)
    opts.validate()
    warmup, steps = opts.optim.warmup_steps, opts.train.steps
    if warmup >= steps:
        # legal, and fine for a smoke test, but a real run that does this never trains at its intended LR
        warnings.warn(
            f"optim.warmup_steps ({warmup}) >= train.steps ({steps}): the learning rate is still warming up when "
            f"training ends (at most {steps}/{warmup} of optim.lr, on the last step) and never decays to "
            f"optim.min_lr_ratio x optim.lr; set optim.warmup_steps below train.steps for the full schedule",
            UserWarning,
            stacklevel=2,  # point at the code that built the options
        )
    return opts


def _set(opts: Options, section: str, name: str, value: Any) -> None:
    if section not in SECTIONS:
        raise OptionsError(f"unknown options section {section!r}; valid sections are {list(SECTIONS)}")
    target = getattr(opts, section)
    names = [f.name for f in dataclasses.fields(target)]
    if name not in names:
        raise OptionsError(f"unknown option {section}.{name}; valid options of [{section}] are {names}")
    current = getattr(target, name)
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = parse_value(value, type(current))
        except ValueError as e:  # parse_value knows the text, not which option it was meant for
            raise OptionsError(f"{section}.{name}: {e}") from None
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif type(value) is not type(current):
        raise OptionsError(f"{section}.{name}: expected {type(current).__name__}, got {value!r}")
    setattr(target, name, value)
