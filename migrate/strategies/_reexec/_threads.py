# -*- test-case-name: migrate.test.test_reexec_threads -*-
"""
Threads and the caretaker's fork: when forking the old image is safe, and
the thread pool the caretaker serves with.

Only the forking thread goes on in a child.  A lock another thread held at
the fork stays held there for ever, and work queued to a thread that is
gone is never done.  So re-exec forks its caretaker only when every other
thread of the process is an idle worker of the reactor's thread pool: such
a worker waits on the pool's own queue, holding nothing the caretaker
takes.  That pool is common (C{deferToThread}, C{adbapi}, a successor that
received descriptors from a thread): refusing it would turn the caretaker
off for most applications.  The caretaker then never uses the old pool,
whose workers it does not have: it gets a new one the first time it asks
(C{reactor.threadpool}, which L{ReactorBase.getThreadPool} fills when
empty, is the attribute reached into here).

Threads started outside Python's C{threading} module (by a C extension)
are counted from C{/proc/self/task}: any such thread refuses the fork.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable

__all__ = ["forkRefusal", "freshThreadPool", "osThreadCount"]


def osThreadCount() -> int | None:
    """
    How many threads this process has, as the kernel counts them; L{None}
    where C{/proc} does not say.
    """
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def forkRefusal(
    reactor: Any,
    threads: Callable[[], Iterable[threading.Thread]] = threading.enumerate,
    countOSThreads: Callable[[], int | None] = osThreadCount,
) -> str | None:
    """
    Why forking now could leave the child waiting for ever, if it could:
    a thread other than this one runs that is not an idle worker of the
    reactor's thread pool.

    @param reactor: the reactor whose thread pool (C{threadpool}) is
        accepted.
    @param threads: the threads Python knows (C{threading.enumerate}).
    @param countOSThreads: the threads the kernel knows (L{osThreadCount}).

    @return: the reason, for the report's notes; L{None} when it is safe.
    """
    current = threading.current_thread()
    others = [each for each in threads() if each is not current and each.is_alive()]
    counted = countOSThreads()
    if counted is not None and counted > len(others) + 1:
        return "{} threads run that Python did not start".format(
            counted - len(others) - 1
        )
    if not others:
        return None
    pool = getattr(reactor, "threadpool", None)
    workers = set(getattr(pool, "threads", ()))
    strangers = sorted(each.name for each in others if each not in workers)
    if strangers:
        return "{} other threads run ({})".format(len(others), ", ".join(strangers))
    assert pool is not None  # every other thread is one of its workers
    busy = len(pool.working)
    if busy:
        return "the reactor's thread pool is busy ({} working)".format(busy)
    return None


def freshThreadPool(reactor: Any) -> None:
    """
    In the caretaker: forget the old image's thread pool (its workers are
    not in this process), so that the first call that needs one starts a
    new pool here.
    """
    if getattr(reactor, "threadpool", None) is not None:
        reactor.threadpool = None
