"""The `hlsa` command: one entry point, one subcommand per job.

Subcommand modules expose `register(subparsers)`, which adds their parsers with `set_defaults(func=...)`; they keep
module-level imports light (no torch, no transformers) so that `hlsa --help` and every `hlsa COMMAND --help` answer
at once: the work's imports happen inside the functions that `func` runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from hlsa.errors import UsageError

# Modules that contribute subcommands.
SUBCOMMAND_MODULES = ("hlsa.train.cli", "hlsa.demo", "hlsa.corpus", "hlsa.eval.cli", "hlsa.generate")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to a flag's help, except where there is nothing to show (None, False) or the help
    already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from hlsa import __version__

    parser = argparse.ArgumentParser(prog="hlsa", description="Hybrid linear + sparse attention language models")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _show_warning(message: Warning | str, *_: object, **__: object) -> None:
    # A command's user needs the message, not the line of library code that raised it.
    print(f"hlsa: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # restores the warning display when main() is called from Python
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except UsageError as e:  # bad options, paths or files: one line, like argparse's errors (hlsa/errors.py)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
