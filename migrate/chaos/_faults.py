"""
The faults a campaign injects, and what it reads about processes to
inject them and to check what they left behind (Linux C{/proc}).
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

from attrs import frozen

__all__ = [
    "FAULTS",
    "Fault",
    "childrenOf",
    "descriptorCount",
    "faultsFor",
    "isStopped",
    "roleOf",
    "sessionProcesses",
    "setLimit",
]


@frozen
class Fault:
    """
    One kind of fault.

    @ivar name: its name in the table and on the command line.
    @ivar strategies: the strategies it applies to.
    @ivar what: a sentence for the documentation and C{--help}.
    """

    name: str
    strategies: tuple[str, ...]
    what: str


_ALL = ("capability", "gradual", "reexec", "reload")
_SPAWNING = ("capability", "gradual")
_TRYING = ("reexec", "reload")

FAULTS = (
    Fault("none", _ALL, "no fault: the migration under load alone"),
    Fault("kill-old", _ALL, "SIGKILL of the serving process at a random moment"),
    Fault(
        "stop-old",
        _ALL,
        "SIGSTOP of the serving process at a random moment, SIGCONT 0.2-1.5 s later",
    ),
    Fault("kill-successor", _SPAWNING, "SIGKILL of the successor once it runs"),
    Fault(
        "stop-successor",
        _SPAWNING,
        "SIGSTOP of the successor once it runs (never continued by the campaign)",
    ),
    Fault("kill-trial", _TRYING, "SIGKILL of the preflight/trial child once it runs"),
    Fault(
        "stop-trial",
        _TRYING,
        "SIGSTOP of the preflight/trial child once it runs (never continued)",
    ),
    Fault(
        "client-reset",
        _ALL,
        "a third of the clients reset their connection at a random moment",
    ),
    Fault(
        "fd-limit",
        ("capability", "gradual", "reexec"),
        "the new process's descriptor limit exhausted (RLIMIT_NOFILE lowered "
        "to what it holds)",
    ),
    Fault(
        "disk-full",
        _ALL,
        "no file may grow (RLIMIT_FSIZE 0, as a full disk) during the migration",
    ),
)


def faultsFor(strategy: str, names: list[str] | None = None) -> list[Fault]:
    """
    The faults that apply to C{strategy}, among C{names} if given.
    """
    return [
        fault
        for fault in FAULTS
        if strategy in fault.strategies and (names is None or fault.name in names)
    ]


def _stat(pid: int) -> list[str] | None:
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[-1].split()
    except (OSError, IndexError):
        return None


def sessionProcesses(session: int) -> list[int]:
    """
    The live (not zombie) processes of session C{session}.
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is None or len(fields) < 4 or fields[0] == "Z":
            continue
        if fields[3] == str(session):
            found.append(int(name))
    return sorted(found)


def isStopped(pid: int) -> bool:
    """
    Whether C{pid} is stopped by a signal.
    """
    fields = _stat(pid)
    return fields is not None and fields[0] == "T"


def childrenOf(pid: int) -> list[int]:
    """
    The children of C{pid}.
    """
    try:
        with open("/proc/{}/task/{}/children".format(pid, pid)) as f:
            return [int(each) for each in f.read().split()]
    except OSError:
        return []


def roleOf(pid: int) -> str:
    """
    What a child of a host is, from its environment: C{"successor"},
    C{"trial"} or C{"other"}.
    """
    try:
        with open("/proc/{}/environ".format(pid), "rb") as f:
            names = {
                entry.partition(b"=")[0] for entry in f.read().split(b"\0") if entry
            }
    except OSError:
        return "other"
    if b"MIGRATE_HANDOFF_FD" in names:
        return "successor"
    if b"MIGRATE_REEXEC_PREFLIGHT" in names or b"MIGRATE_TRIAL_FDS" in names:
        return "trial"
    return "other"


def descriptorCount(pid: int) -> int | None:
    """
    How many descriptors C{pid} holds, or L{None} if it is gone.
    """
    try:
        return len(os.listdir("/proc/{}/fd".format(pid)))
    except OSError:
        return None


def setLimit(pid: int, which: int, soft: int | None) -> Any:
    """
    Set a process's soft limit (L{None}: as high as its hard limit).

    @return: the previous (soft, hard) limits, or L{None} if the process
        is gone.
    """
    try:
        previous = resource.prlimit(pid, which)
        hard = previous[1]
        resource.prlimit(pid, which, (hard if soft is None else soft, hard))
    except (OSError, ValueError):
        return None
    return previous


def signalQuietly(pid: int, number: int = signal.SIGKILL) -> bool:
    """
    Send a signal to C{pid} if it still exists.

    @return: whether it was sent.
    """
    try:
        os.kill(pid, number)
    except (ProcessLookupError, PermissionError):
        return False
    return True
