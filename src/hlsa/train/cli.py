"""`hlsa train` (registered by `hlsa.cli`). Only argparse at import time; torch loads when a command runs.

Every training option is a flag named `--<section>.<name>` (`--optim.lr 1e-3`, `--data.seq_len 512`), taking
precedence over `--options FILE` (TOML or YAML with the same sections), which takes precedence over the defaults.
Shortcuts: `--config` = `--model.config`, `--data` = `--data.source`, `--out` = `--checkpoint.dir`,
`--steps` = `--train.steps`, `--resume` = `--checkpoint.resume true`.

SIGTERM or Ctrl-C saves the current step and exits with status 130 without writing `--checkpoint.export`; a second
one abandons the step in progress (the last checkpoint is kept). Rerun with `--resume` to continue.

Exit status 2 (`hlsa: error: ...`): bad options, paths or files, found before the first step (output directories
that cannot be written, a step too large for the free memory); a run that diverged (`train.max_consecutive_skips`
skipped steps in a row; nothing saved or exported); a checkpoint that could not be written (a full disk; the last
complete one is kept).
"""

from __future__ import annotations

import argparse

SHORTCUTS = {
    "config": "model.config",
    "data": "data.source",
    "out": "checkpoint.dir",
    "steps": "train.steps",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    from hlsa.train.options import option_fields

    train = subparsers.add_parser(
        "train",
        help="train a model (synthetic tasks, local text files or hub datasets)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--options", metavar="FILE", help="options file (.toml, .yaml)")
    train.add_argument("--config", metavar="PATH", help="HybridConfig JSON, or a model directory to fine-tune")
    train.add_argument("--data", metavar="SOURCE", help="files (a,b,...), a hub dataset name, or synthetic:mqar")
    train.add_argument("--out", metavar="DIR", help="checkpoint directory")
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    for section, name, kind, default in option_fields():
        train.add_argument(
            f"--{section}.{name}",
            dest=f"opt:{section}.{name}",
            metavar=kind.__name__.upper(),
            default=argparse.SUPPRESS,
            help=f"(default: {default!r})",
        )
    train.set_defaults(func=run_train)


def collect_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Flat `{"section.name": value}` from the parsed flags (file values are applied before these)."""
    out: dict[str, object] = {}
    for key, value in vars(args).items():
        if key.startswith("opt:"):
            out[key[4:]] = value
    for short, full in SHORTCUTS.items():
        value = getattr(args, short, None)
        if value is not None:
            out[full] = value
    if getattr(args, "resume", False):
        out["checkpoint.resume"] = True
    return out


# Exit status of a run stopped by SIGTERM / Ctrl-C (the shell's 128 + SIGINT): its checkpoint is saved, its export
# is not written, and a job script must not mistake it for a finished run.
INTERRUPTED = 130


def run_train(args: argparse.Namespace) -> int:
    import sys

    from hlsa.train.options import build_options, read_options_file
    from hlsa.train.trainer import Trainer, TrainingInterruptedError

    file_values = read_options_file(args.options) if args.options else {}
    opts = build_options(file_values, collect_overrides(args))
    try:
        Trainer(opts).run()
    except TrainingInterruptedError as e:
        print(f"hlsa train: {e}", file=sys.stderr)
        return INTERRUPTED
    return 0
