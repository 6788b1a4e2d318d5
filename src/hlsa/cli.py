"""The `hlsa` command: one entry point, one subcommand per job.

Subcommand modules expose `register(subparsers)`, which adds their parsers with `set_defaults(func=...)`; they keep
module-level imports light so that `hlsa --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hlsa.errors import UsageError

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
    except UsageError as e:  # bad options, paths or files: one line, like argparse's errors (hlsa/errors.py)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
