# -*- test-case-name: migrate.test.test_keeper -*-
"""
twistd's default mode, the daemon: what a successor must not do again.

A successor runs the original command line.  Without C{-n} twistd would
daemonise it again: its first process would exit at once (status 0), which
the old process takes for a successor that died, and the process that
serves would not be the old one's child.  So a successor of a daemon stays
in the foreground, logging where the daemon logs; the daemon did the rest
(directory, umask, root, user) once for the whole lineage.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Mapping, MutableMapping

__all__ = [
    "DAEMON_LOG_FILE",
    "AppendingLogFile",
    "appendToLogFile",
    "sharedLogFile",
    "isForeground",
    "keepSuccessorInForeground",
    "skipProcessSetUp",
    "stayInForeground",
]

DAEMON_LOG_FILE = "twistd.log"
"""
Where twistd logs as a daemon when not told (C{--logfile}, C{--syslog}).
"""

_INHERITING = ("MIGRATE_HANDOFF_FD",)


def isForeground(parent: Mapping[str, Any] | None) -> bool:
    """
    Whether twistd runs in the foreground: C{-n}, or a runner with no
    daemon mode (C{twist}, an embedding application).

    @param parent: twistd's options, if any.
    """
    if parent is None or "nodaemon" not in parent:
        return True
    return bool(parent["nodaemon"])


def keepSuccessorInForeground(
    parent: MutableMapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """
    In a successor, keep twistd from daemonising again.

    @param parent: twistd's options.
    @return: whether it changed them (a successor of a daemon).
    """
    if environ is None:
        environ = os.environ
    if parent is None or not any(name in environ for name in _INHERITING):
        return False
    if "nodaemon" not in parent or parent["nodaemon"]:
        return False
    stayInForeground(parent)
    skipProcessSetUp(parent)
    return True


def stayInForeground(parent: MutableMapping[str, Any]) -> None:
    """
    Keep twistd in the foreground, logging where it logs as a daemon
    unless told otherwise.

    @param parent: twistd's options.
    """
    parent["nodaemon"] = True
    if not parent.get("logfile") and not parent.get("syslog"):
        parent["logfile"] = DAEMON_LOG_FILE


def skipProcessSetUp(parent: MutableMapping[str, Any]) -> None:
    """
    Keep twistd from setting up again what the first process of the
    lineage set up once for all of it: its root, its user and group, its
    working directory.

    @param parent: twistd's options.
    """
    for name in ("chroot", "uid", "gid"):
        if parent.get(name) is not None:
            parent[name] = None
    if "rundir" in parent:
        parent["rundir"] = "."


def sharedLogFile(parent: Mapping[str, Any] | None) -> str | None:
    """
    The file twistd logs to, which every generation of a lineage writes
    (a successor logs where the daemon logs), if any.

    @param parent: twistd's options.

    @return: its absolute path; L{None} for standard output, syslog, or no
        twistd.
    """
    if parent is None:
        return None
    path = parent.get("logfile")
    if not path or path == "-" or parent.get("syslog"):
        return None
    return os.path.abspath(str(path))


def appendToLogFile(path: str) -> int:
    """
    Make this process's writes to the log file at C{path} go to its end
    (C{O_APPEND}), whatever another process wrote there since it was
    opened.

    twistd opens its log file for writing at the end as it was then, not in
    append mode, so two generations writing it at once (the old one
    draining, its successor serving) would each write over the other's
    lines.  Set on every descriptor of this process open on that file, once
    twistd has opened it (when the reactor runs), and again as each
    migration starts (L{AppendingLogFile}): a rotation opens the file anew
    without it.

    The descriptors are recognised by the file they are open on (its device
    and inode), with one C{fstat} each: a re-executed image holds thousands
    of inherited sockets when this runs, just as it starts serving, and
    reading each one's link in C{/proc} took tens of milliseconds of every
    client's time there.

    @return: how many descriptors were set.
    """
    done = 0
    try:
        wanted = os.stat(path)
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    target = (wanted.st_dev, wanted.st_ino)
    for name in names:
        try:
            fd = int(name)
            found = os.fstat(fd)
            if (found.st_dev, found.st_ino) != target:
                continue
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
        except (OSError, ValueError):
            continue
        done += 1
    return done


class AppendingLogFile:
    """
    A host's lifecycle observer that makes this process append to the log
    file generations share again as each migration starts.

    twistd's log file reopens the file without C{O_APPEND} when it rotates
    (by size, or on C{SIGUSR1}); a process that rotated while it served
    alone would otherwise write over its successor's lines while it drains.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: the shared log file's absolute path.
        """
        self.path = path

    def migrationStarted(self, host: Any) -> None:
        appendToLogFile(self.path)
