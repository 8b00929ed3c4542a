# -*- test-case-name: migrate.test.test_reexec -*-
"""
What a host checks before it re-executes, while it still serves: that its
command line can run again (L{checkProgram}), that what it serves can be
carried across C{exec} (L{checkHost}, L{checkDescriptorLimit}).  That the
new code loads and restores every connection is tried in a child process
(L{migrate._handoff._trial.runTrial}).

Once C{execv} has succeeded there is no way back: whatever is found here
refuses the migration and changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

from attrs import frozen
from twisted.logger import Logger

from ..._handoff._threadwork import workInFlight as threadWorkInFlight
from ..._handoff._threadwork import workingThreads
from ...interfaces import IMigrationHost
from ._reports import quietChannel

__all__ = [
    "DESCRIPTOR_HEADROOM",
    "Program",
    "checkDescriptorLimit",
    "checkHost",
    "checkProgram",
    "programOf",
    "refusalReason",
    "workInFlight",
]

_log = Logger()

DESCRIPTOR_HEADROOM = 64
"""
Descriptors the new image needs beyond those it inherits: standard
streams, the reactor's own, log files, one duplicate per adoption, and
some to spare for the first new connections.
"""


@frozen
class Program:
    """
    What a Python command line runs.

    @ivar kind: C{"script"} (a file), C{"module"} (C{-m NAME}) or
        C{"command"} (C{-c TEXT}).
    @ivar value: the file's path, the module's name or the command.
    """

    kind: str
    value: str


def programOf(argv: Sequence[str]) -> Program:
    """
    Find the program a Python command line runs, past the interpreter's
    own options.

    @param argv: the command line, the interpreter first.

    @raise ValueError: if it runs no program (an interactive interpreter)
        or reads its program from standard input, which cannot be read
        again.
    """
    args = list(argv[1:])
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            index += 1
            break
        if arg == "-":
            break
        if arg.startswith("--"):
            index += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        if not arg.startswith("-"):
            break
        letters = arg[1:]
        consumed = 1
        for position, letter in enumerate(letters):
            if letter in "cmWX":
                rest = letters[position + 1 :]
                if rest:
                    value: str | None = rest
                else:
                    value = args[index + 1] if index + 1 < len(args) else None
                    consumed = 2
                if letter in "cm":
                    if value is None:
                        raise ValueError("-{} needs an argument".format(letter))
                    return Program("command" if letter == "c" else "module", value)
                break
        index += consumed
    if index >= len(args):
        raise ValueError("the command line {!r} runs no program".format(list(argv)))
    if args[index] == "-":
        raise ValueError(
            "the program was read from standard input, which cannot be read again"
        )
    return Program("script", args[index])


def _isPython(path: str) -> bool:
    """
    Whether C{path} names a Python interpreter (this one, or one called
    C{python...}), whose options L{programOf} understands.
    """
    if os.path.basename(path).startswith("python"):
        return True
    try:
        return os.path.realpath(path) == os.path.realpath(sys.executable)
    except (OSError, ValueError):
        return False


def checkProgram(
    argv: Sequence[str],
    *,
    access: Callable[[str, int], bool] = os.access,
    isfile: Callable[[str], bool] = os.path.isfile,
    findSpec: Callable[[str], object] = importlib.util.find_spec,
) -> str | None:
    """
    Check that C{argv} can be executed again: the interpreter is an
    executable file and the program it runs is still there.

    @param argv: the command line, the interpreter first.

    @return: why it cannot, or L{None}.
    """
    if not argv:
        return "the command line is empty"
    interpreter = argv[0]
    if not isfile(interpreter):
        return "the interpreter {} does not exist".format(interpreter)
    if not access(interpreter, os.X_OK):
        return "the interpreter {} is not executable".format(interpreter)
    if not _isPython(interpreter):
        # Some other program (a successorArgv of the embedding application's
        # choosing): its arguments are its own business.
        return None
    try:
        program = programOf(argv)
    except ValueError as e:
        return str(e)
    if program.kind == "script":
        if not isfile(program.value):
            return "the program {} does not exist (relative to {})".format(
                program.value, os.getcwd()
            )
        if not access(program.value, os.R_OK):
            return "the program {} is not readable".format(program.value)
    elif program.kind == "module":
        try:
            found = findSpec(program.value)
        except Exception as e:
            found = None
            _log.debug("find_spec failed: {why}", why=str(e))
        if found is None:
            return "the module {} run with -m cannot be found".format(program.value)
    return None


def checkDescriptorLimit(inherited: int, softLimit: int) -> str | None:
    """
    Check that the new image can hold C{inherited} descriptors and the
    ones it opens itself (L{DESCRIPTOR_HEADROOM}).

    @param inherited: descriptors that survive the exec, standard streams
        and the state file included.
    @param softLimit: the soft C{RLIMIT_NOFILE} (which C{exec} keeps).

    @return: why it cannot, or L{None}.
    """
    if softLimit < 0:  # RLIM_INFINITY
        return None
    needed = inherited + DESCRIPTOR_HEADROOM
    if needed > softLimit:
        return (
            "the new image would need {} descriptors ({} inherited and {} of "
            "headroom) but RLIMIT_NOFILE allows {}".format(
                needed, inherited, DESCRIPTOR_HEADROOM, softLimit
            )
        )
    return None


def _isStreamPort(port: Any) -> bool:
    from twisted.internet import tcp, unix

    return isinstance(port, (tcp.Port, unix.Port))


def workInFlight(reactor: Any) -> str | None:
    """
    Check, at the last moment before C{exec}, for work the reactor has been
    handed since the checks and would do after this turn, which C{exec}
    would lose: calls queued from other threads or from signal handlers
    (a stop request on C{SIGTERM}, a thread's result), and thread pool jobs
    started meanwhile (see L{migrate._handoff._threadwork}).

    @return: what would be lost, or L{None}.
    """
    work = threadWorkInFlight(reactor)
    if work is None:
        return None
    if work.queued:
        return (
            "{} calls are queued for the reactor (from a thread or a signal "
            "handler, a stop request for one), which exec would lose; they "
            "run now instead".format(work.queued)
        )
    return (
        "{} thread pool jobs started during the migration are still "
        "running, and exec keeps no threads".format(work.working)
    )


def checkHost(host: IMigrationHost) -> str | None:
    """
    Check what the host serves can be carried across C{exec}.

    @return: why it cannot, or L{None}.
    """
    channels = host.reportChannels
    for generation in sorted(host.draining):
        entry = host.draining[generation]
        # Its report channel crosses exec like any other descriptor (see
        # _reports); one that is not there, or not quiet, cannot.
        channel = channels.get(entry.get("via"))
        why = "its report channel is gone" if channel is None else quietChannel(channel)
        if why is not None:
            return (
                "generation {} (process {}) is still draining and {}: wait "
                "until it has drained, or use another strategy".format(
                    generation, entry.get("pid", "?"), why
                )
            )
    working = workingThreads(host.reactor)
    if working:
        return (
            "{} thread pool jobs are running, and exec keeps no threads: try "
            "again once they have finished".format(working)
        )
    for listener in host.listeners.values():
        port = listener.port
        if port is None or not _isStreamPort(port):
            return "listener {} is not a listening TCP or Unix socket".format(
                listener.key
            )
        # Without pyOpenSSL nothing serves TLS (and the module cannot load).
        tls = sys.modules.get("twisted.protocols.tls")
        tlsFactory = getattr(tls, "TLSMemoryBIOFactory", None)
        if tlsFactory is not None and isinstance(
            getattr(port, "factory", None), tlsFactory
        ):
            return (
                "listener {} serves TLS, which the new image could not set up "
                "again on the inherited socket".format(listener.key)
            )
    if host.controlPort is not None and not _isStreamPort(host.controlPort):
        return "the control channel is not a Unix listening socket"
    if host.metricsPort is not None and not _isStreamPort(host.metricsPort):
        return "the metrics endpoint is not a TCP or Unix listening socket"
    return None


def refusalReason(
    host: IMigrationHost,
    argv: Sequence[str],
    *,
    checkArgv: Callable[[Sequence[str]], str | None] = checkProgram,
) -> str | None:
    """
    Everything that can be checked about the host and the command line
    before anything is touched.

    @return: why the host cannot re-execute, or L{None}.
    """
    return checkArgv(argv) or checkHost(host)
