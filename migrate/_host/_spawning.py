# -*- test-case-name: migrate.test.test_spawning -*-
"""
Making the host's child processes cheap to start.

Twisted's C{spawnProcess} closes, in the child, every descriptor the
parent has open and does not pass on.  With C{posix_spawn} it must name
each one, so every start lists C{/proc/PID/fd} and asks each descriptor
whether it is close-on-exec, in the reactor's thread.  A host starts its
successor, or the trial of a reload or a re-exec, while ten thousand
connections are open: that listing then kept every client waiting 20 to
40 ms on an idle two-CPU machine and 70 to 120 ms on a loaded one, the
longest stall of a whole module reload.

L{spawnProcess} starts the child without the listing.  Twisted starts a
small trampoline (this process's Python, isolated, without C{site}) with
only the descriptors asked for; the trampoline closes every other
descriptor in the child with one C{close_range}, restores what its own
interpreter changed (the dispositions of C{SIGPIPE} and C{SIGXFSZ}, the
C{LC_CTYPE} that locale coercion sets), changes directory, lowers its
priority for a start in the background (L{migrate._host._priority}) and
executes the real command in place, under the same process ID.  The child's start
takes about 10 ms longer; this process pays for a C{posix_spawn} of a
handful of descriptors.

L{prepareSpawning} makes Twisted's own choice of how to list descriptors
as the host starts, while few are open, for the processes still started
by Twisted's path (the keeper's, the rolling upgrader's).  Its first call
in a process lists them three times (C{twisted.internet.process._FDDetector}).

This module is the one place that reaches into Twisted's private
C{twisted.internet.process.detector} and its C{_listOpenFDs}.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from twisted.internet.interfaces import IProcessProtocol, IProcessTransport
from twisted.logger import Logger

from ._priority import BackgroundStart

__all__ = ["prepareSpawning", "spawnProcess"]

_log = Logger()

#: what an interpreter that takes Python's command-line options is called
_INTERPRETER_NAME = re.compile(r"(python|pypy)[0-9.]*\Z")

# Runs as C{python -I -S -c _TRAMPOLINE KEEP DIRECTORY CTYPE NICE
# EXECUTABLE ARGS...}.  Written for every Python 3 the host may find on disk
# after an upgrade.
_TRAMPOLINE = """\
import os, signal, sys
_, keep, directory, ctype, nice, executable = sys.argv[:6]
keep = set(int(fd) for fd in keep.split(","))
if ctype == "-":
    os.environ.pop("LC_CTYPE", None)
else:
    os.environ["LC_CTYPE"] = ctype[1:]
for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
if directory:
    os.chdir(directory)
top = max(keep) + 1
for fd in range(top):
    if fd not in keep:
        try:
            os.close(fd)
        except OSError:
            pass
os.closerange(top, max(os.sysconf("SC_OPEN_MAX"), top))
if nice != "-":
    os.setpriority(os.PRIO_PROCESS, 0, int(nice))
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
os.execv(executable, sys.argv[6:])
"""


def prepareSpawning(detector: Any = None) -> bool:
    """
    Have Twisted decide now how it lists a process's open descriptors, if
    it has not yet.

    @param detector: Twisted's detector; L{None} for the process's own.

    @return: whether the decision was made now.
    """
    try:
        if detector is None:
            from twisted.internet import process

            detector = process.detector
        if "_listOpenFDs" in vars(detector):
            return False
        detector._listOpenFDs()
    except Exception:
        # Not worth a failed start: the first child then pays for it.
        _log.failure("Could not prepare the listing of open descriptors")
        return False
    return True


def spawnProcess(
    reactor: Any,
    protocol: IProcessProtocol,
    executable: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    childFDs: Mapping[int, int | str],
    path: str | None = None,
    background: BackgroundStart | None = None,
) -> IProcessTransport:
    """
    Start a process as C{reactor.spawnProcess} does, without listing this
    process's descriptors in the reactor's thread.

    The child gets the descriptors of C{childFDs} and no other, the
    environment C{env}, the directory C{path} and default dispositions for
    the signals this process ignores, as with Twisted's own C{posix_spawn}
    path; C{executable} is looked up in this process's C{PATH} when it
    has no slash.  A reactor other than Twisted's POSIX reactors (a fake,
    say) is simply asked to spawn.

    With C{background}, the child starts at its low priority (the
    trampoline sets it before it executes the command) and
    C{background.started} is told the child's process ID; a child Twisted
    starts itself starts at this process's priority, and C{background} is
    not told.

    @raise OSError: If C{executable} cannot be found or executed, or the
        process cannot be started.
    """
    interpreter = _trampolineInterpreter(reactor)
    if interpreter is None:
        return reactor.spawnProcess(  # type: ignore[no-any-return]
            protocol,
            executable,
            list(args),
            env=dict(env),
            path=path,
            childFDs=dict(childFDs),
        )
    target = _executablePath(executable, path)
    keep = sorted(childFDs)
    ctype = env.get("LC_CTYPE")
    trampoline = [
        interpreter,
        "-I",
        "-S",
        "-c",
        _TRAMPOLINE,
        ",".join(map(str, keep)),
        path or "",
        "-" if ctype is None else "=" + ctype,
        "-" if background is None else str(background.niceness),
        target,
        *args,
    ]
    # Twisted's posix_spawn path looks up, among the descriptors it lists,
    # those a child descriptor is taken from when both numbers are equal;
    # every such number is at most the highest child descriptor.
    with _listingOnly(range(keep[-1] + 1)):
        transport: IProcessTransport = reactor.spawnProcess(
            protocol,
            interpreter,
            trampoline,
            env=dict(env),
            path=None,
            childFDs=dict(childFDs),
        )
    if background is not None and transport.pid is not None:
        background.started(transport.pid)
    return transport


def _trampolineInterpreter(reactor: Any) -> str | None:
    """
    The Python to run the trampoline with, or L{None} when C{reactor} does
    not start processes through Twisted's POSIX process support or this
    process's executable is not a Python interpreter that can be run
    again (Twisted's own start is used then).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        from twisted.internet.posixbase import PosixReactorBase
    except ImportError:
        return None
    if not isinstance(reactor, PosixReactorBase):
        return None
    interpreter = sys.executable
    if (
        not interpreter
        or getattr(sys, "frozen", False)
        or _INTERPRETER_NAME.match(os.path.basename(interpreter)) is None
        or not os.access(interpreter, os.X_OK)
    ):
        # A frozen application's or an embedding program's executable
        # (uWSGI's, say) would not take Python's options.
        return None
    return interpreter


def _executablePath(executable: str, directory: str | None) -> str:
    """
    Where C{executable} is, as Twisted's start would find it: relative to
    C{directory} if it has a slash, in this process's C{PATH} if not.

    @raise FileNotFoundError: If there is no such file.
    @raise PermissionError: If it is not an executable file.
    """
    if os.sep in executable:
        candidate = os.path.join(directory or os.getcwd(), executable)
    else:
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), executable)
        candidate = found
    try:
        mode = os.stat(candidate).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, os.strerror(errno.ENOENT), executable
        ) from None
    if not stat.S_ISREG(mode) or not os.access(candidate, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), executable)
    return os.path.abspath(candidate)


@contextmanager
def _listingOnly(descriptors: range) -> Iterator[None]:
    """
    While in the block, Twisted's listing of open descriptors answers
    C{descriptors} instead of listing them.
    """
    from twisted.internet import process

    detector: Any = process.detector
    saved = vars(detector).get("_listOpenFDs")
    detector._listOpenFDs = lambda: list(descriptors)
    try:
        yield
    finally:
        if saved is None:
            del detector._listOpenFDs
        else:
            detector._listOpenFDs = saved
