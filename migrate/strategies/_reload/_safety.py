# -*- test-case-name: migrate.test.test_trial -*-
"""
What keeps the serving process safe from module reload's new code: the
trial in a child process first (L{trialInChild}), then a bound on the
import in the serving process (L{boundedImport}).

The new code is tried first in a child process (L{migrate._handoff._trial})
and imported into the serving process only once it passed there.  It can
still block at import in the serving process alone (a lock or a server
only that process waits for, code that blocks at random): then a timer
interrupts it.  C{SIGALRM}'s handler runs in the main thread between two
bytecodes, and from inside a blocking system call that Python retries
(C{time.sleep}, socket calls: PEP 475), and raises L{ImportTimedOut}
there; the reload fails and puts C{sys.modules} back as it was.  What it
cannot interrupt is a C extension blocking without ever returning to
Python: the serving process then stays blocked, as it would without the
bound.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from twisted.internet.defer import Deferred

from ..._handoff._trial import TrialCase, runTrial
from ...interfaces import IMigrationHost

__all__ = ["ImportTimedOut", "boundedImport", "trialInChild"]


def trialInChild(
    host: IMigrationHost, cases: Sequence[TrialCase], policy: str
) -> Deferred[Any]:
    """
    Try the application's new code in a child process that imports it
    afresh (C{python -m migrate._handoff._trialchild SPEC}), with this
    process's module search path and working directory.

    @return: a L{Deferred} firing with the
        L{migrate._handoff._trial.TrialOutcome}.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        entry or os.getcwd() for entry in sys.path if isinstance(entry, str)
    )
    for name in list(env):
        if name.startswith("MIGRATE_"):
            del env[name]
    spec = host.settings.applicationSpec or ""
    argv = [sys.executable, "-m", "migrate._handoff._trialchild", spec]
    result: Deferred[Any] = runTrial(
        host.reactor,
        argv,
        cases,
        env=env,
        timeout=host.settings.readyTimeout,
        policy=policy,
        path=os.getcwd(),
        background=host.settings.startInBackground,
    )
    return result


class ImportTimedOut(Exception):
    """
    The new code took longer to import than the bound allows; the import
    was interrupted.
    """


@contextmanager
def boundedImport(seconds: float, *, signals: Any = signal) -> Iterator[bool]:
    """
    Interrupt the block inside this context, with L{ImportTimedOut}, once
    C{seconds} have passed.

    Only the main thread receives signals, and another user of C{SIGALRM}
    keeps it: the block is then not bounded.

    @return: a context manager whose value says whether the block is
        bounded.
    """
    if (
        seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or signals.getsignal(signals.SIGALRM) not in (signals.SIG_DFL, None)
        or signals.getitimer(signals.ITIMER_REAL)[0] > 0
    ):
        yield False
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise ImportTimedOut(
            "the import took longer than {} s in the serving process, which "
            "interrupted it (the same code imported in time in the trial "
            "process)".format(seconds)
        )

    previous = signals.signal(signals.SIGALRM, interrupt)
    signals.setitimer(signals.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signals.setitimer(signals.ITIMER_REAL, 0)
        signals.signal(signals.SIGALRM, previous)
