"""The `hlsa` command: one entry point, one subcommand per job.

Subcommand modules expose `register(subparsers)`, which adds their parsers with `set_defaults(func=...)`; they keep
module-level imports light so that `hlsa --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hlsa.train.options import OptionsError

# Modules that contribute subcommands (train/demo, eval/convert, generate).
SUBCOMMAND_MODULES = ("hlsa.train.cli", "hlsa.eval.cli", "hlsa.generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlsa", description="Hybrid linear + sparse attention language models")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OptionsError as e:
        # A bad option or options file (`hlsa train`, `hlsa demo --train`'s recipe) is a usage error like argparse's:
        # one line and status 2. Only this type is caught, and only options.py raises it (while options are read and
        # checked, before any work starts); errors from deeper code keep their tracebacks, which is what finds bugs.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
