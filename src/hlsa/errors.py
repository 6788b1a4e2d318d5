"""`UsageError`: bad input from the person running a command (an option, a path, a file), not a bug in hlsa.

The `hlsa` command prints it as one line, `hlsa: error: ...`, with exit status 2, like argparse's own errors; every
other exception keeps its traceback, which is what finds bugs.
"""


class UsageError(ValueError):
    """A bad option, path or input file, with a message that names it and the fix."""
