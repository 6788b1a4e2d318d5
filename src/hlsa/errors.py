"""`UsageError`: bad input from the person running a command (an option, a path, a file), not a bug in hlsa; and the
two checks of paths that every command shares: a file it reads (`check_readable_file`) and a place it writes
(`write_error`).

The `hlsa` command prints a `UsageError` as one line, `hlsa: error: ...`, with exit status 2, like argparse's own
errors; every other exception keeps its traceback, which is what finds bugs.

This module imports only the standard library, so the modules that must not import torch (the command-line
parsers, `hlsa.train.options`) can use it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class UsageError(ValueError):
    """A bad option, path or input file, with a message that names it and the fix."""


def check_readable_file(path: str | Path, what: str, *, fix: str = "check the path") -> Path:
    """`path`, refused with a `UsageError` when it is missing, a directory or special file, or unreadable.

    Args:
        what: what the file should hold, as a noun phrase ("the model weights", "a checkpoint file").
        fix: what to do when the file is missing or not a file (an unreadable one needs read access).
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file ({what}); {fix}")
    if not path.is_file():  # tested before opening: opening a FIFO would wait for a writer
        raise UsageError(f"{path} is a directory or special file, not {what}; {fix}")
    try:  # opening is the one test that root, ACLs and read-only mounts answer truthfully
        with path.open("rb"):
            pass
    except PermissionError:
        raise UsageError(
            f"{path} exists but is not readable (permission denied); give this user read access to {what}"
        ) from None
    return path


def write_error(target: Path) -> OSError | None:
    """None when this process can write `target`, else the `OSError` that writing it would raise.

    An existing directory is probed with a temporary file, removed at once; any other `target` is opened for
    appending (the one test that root and read-only file systems answer truthfully) and removed again when the
    probe created it. `target`'s directory must exist.
    """
    existed = target.exists()
    try:
        if target.is_dir():
            with tempfile.TemporaryFile(dir=target):
                pass
        else:
            with open(target, "a"):
                pass
    except OSError as e:
        return e
    if not existed:
        target.unlink()
    return None
