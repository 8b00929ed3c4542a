"""
The trial child for module reload: C{python -m migrate._handoff._trialchild
PKG.MOD:NAME} imports the application's new code afresh, builds its
factory, and tries it on the states its parent sends (see
L{migrate._handoff._trial}).

(Re-exec needs no such entry: its preflight runs the very command line
the new image will run, which does the same once its options are parsed.)
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """
    Load the factory named by C{argv[1]} and run the trial.

    @return: the exit status: 0 when the trial ran (whatever it found), 2
        for a bad command line, 1 when the new code does not load.
    """
    if len(argv) != 2:
        sys.stderr.write("usage: python -m migrate._handoff._trialchild PKG.MOD:NAME\n")
        return 2
    from twisted.python import usage

    from ..tap import loadFactory
    from ._trial import runChild

    try:
        factory = loadFactory(argv[1])
    except usage.UsageError as e:
        sys.stderr.write("{}\n".format(e))
        return 1
    if not runChild(factory):
        sys.stderr.write("not started as a trial child\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
