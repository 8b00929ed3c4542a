# -*- test-case-name: migrate.test.test_threadwork -*-
"""
Work that threads owe the reactor: answers being computed in the reactor's
thread pool (C{deferToThread}) and calls they queued for the reactor
(C{callFromThread}) that it has not run yet.

Such work belongs to no connection a migration can see: a protocol waiting
for a thread's answer looks idle (at a safe point) to its buffers.  The
answer arrives later, in I{this} process, through C{callFromThread}.  A
connection handed over meanwhile is no longer this process's to write to:
the answer would be lost.  So every strategy that moves connections out of
this process lets that work finish first (L{waitForThreadWork}), and checks
again (L{workInFlight}) in the very reactor step in which it freezes.

Twisted's private attributes reached into here: C{reactor.threadCallQueue}
(the calls queued from other threads, run at the start of the reactor's
next turn) and C{reactor.threadpool} (the pool C{deferToThread} uses,
which L{ReactorBase.getThreadPool} creates when first asked; its
C{working} list and its C{_queue} of jobs no worker has taken yet).
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

__all__ = [
    "THREAD_WORK_POLL",
    "ThreadWork",
    "waitForThreadWork",
    "workInFlight",
    "workingThreads",
]

THREAD_WORK_POLL = 0.005
"""
Seconds between two looks at work still in flight: short, since each look
is cheap and every turn waited is a turn the migration stands still.
"""


@frozen
class ThreadWork:
    """
    Work the reactor's threads still owe it.

    @ivar queued: calls queued for the reactor from other threads (a
        thread's answer) or from signal handlers, not yet run.
    @ivar working: the reactor thread pool's jobs running, or waiting for
        a worker.
    """

    queued: int
    working: int

    def describe(self) -> str:
        """
        Say what is in flight, for a log line or a report.
        """
        parts = []
        if self.queued:
            parts.append(
                "{} call{} queued for the reactor by another thread".format(
                    self.queued, "" if self.queued == 1 else "s"
                )
            )
        if self.working:
            parts.append(
                "{} job{} of the reactor's thread pool (deferToThread) "
                "running".format(self.working, "" if self.working == 1 else "s")
            )
        return " and ".join(parts)


def workingThreads(reactor: Any) -> int:
    """
    How many jobs the reactor's thread pool runs, or holds for a worker;
    0 when it has no pool yet.
    """
    pool = getattr(reactor, "threadpool", None)
    if pool is None:
        return 0
    working = len(getattr(pool, "working", ()) or ())
    waiting = getattr(pool, "_queue", None)
    try:
        working += int(waiting.qsize()) if waiting is not None else 0
    except (AttributeError, TypeError, ValueError):
        pass
    return working


def workInFlight(reactor: Any) -> ThreadWork | None:
    """
    What the reactor's threads still owe it now, if anything.

    @return: the work in flight, or L{None} when there is none.
    """
    # The pool first, the queue last: a worker of Twisted's pool queues its
    # answer (callFromThread) before it stops counting as busy, so a job
    # ending between the two looks is seen by the second; the other way
    # round, it would be seen by neither.
    working = workingThreads(reactor)
    queued = len(getattr(reactor, "threadCallQueue", ()) or ())
    if queued or working:
        return ThreadWork(queued, working)
    return None


@inlineCallbacks
def waitForThreadWork(
    reactor: Any, deadline: float, interval: float = THREAD_WORK_POLL
) -> Any:
    """
    Let the reactor run (queued calls first, as it always does at the start
    of a turn) until its threads owe it nothing, looking every C{interval}
    seconds, at most until C{deadline}.

    When the L{Deferred} fires with L{None}, it does so in the reactor step
    of the last look: a caller that freezes at once, in that same step,
    freezes with no answer on its way.

    @param reactor: an L{IReactorTime} (and usually L{IReactorThreads}).
    @param deadline: the reactor's C{seconds()} after which it stops waiting.

    @return: a L{Deferred} firing with L{None} once nothing is in flight,
        or with the L{ThreadWork} still in flight at the deadline.
    """
    work = workInFlight(reactor)
    while work is not None and reactor.seconds() < deadline:
        yield deferLater(reactor, interval, lambda: None)
        work = workInFlight(reactor)
    return work
