"""
Keeping twistd's pidfile pointed at whichever process serves now.
"""

from __future__ import annotations

import os

__all__ = ["removePidfileNaming", "writePidfile"]


def writePidfile(path: str, pid: int) -> None:
    """
    Replace the pidfile at C{path} with one naming C{pid}, atomically: a
    reader sees either the old content or the new, never a partial file.

    @param path: the pidfile's path.
    @param pid: the process id to record.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(
        directory, ".{}.{}.tmp".format(os.path.basename(path), os.getpid())
    )
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(descriptor, b"%d\n" % (pid,))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def removePidfileNaming(path: str, pid: int) -> bool:
    """
    Remove the pidfile at C{path} if it names C{pid}: a process that stops
    cleanly takes its pidfile with it, which twistd does not do for a
    successor or a re-executed image (it did not write their pidfile).  A
    pidfile naming another process (the successor) stays.

    @return: whether it was removed.
    """
    try:
        with open(path, "rb") as f:
            named = f.read().strip()
    except OSError:
        return False
    if named != b"%d" % (pid,):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
