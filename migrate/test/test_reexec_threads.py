"""
Tests for L{migrate.strategies._reexec._threads}: when re-exec may fork its
caretaker beside other threads, and the caretaker's own thread pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any, Sequence

from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from migrate.strategies._reexec._threads import (
    forkRefusal,
    freshThreadPool,
    osThreadCount,
)

#: how long a test waits for a thread of its own
_WAIT = 10.0


class _Reactor:
    """
    What L{forkRefusal} looks at in a reactor: its thread pool, if any.
    """

    def __init__(self, threadpool: Any = None) -> None:
        self.threadpool = threadpool


def _startedPool(case: SynchronousTestCase) -> ThreadPool:
    """
    A started thread pool with one worker that has done its work and waits
    for more (idle).
    """
    pool = ThreadPool(0, 2, "twisted.internet.reactor")
    pool.start()
    case.addCleanup(pool.stop)
    done = threading.Event()
    pool.callInThread(done.set)
    case.assertTrue(done.wait(_WAIT), "the pool's worker never ran")
    _waitUntil(case, lambda: not pool.working, "the worker idle")
    return pool


def _waitUntil(case: SynchronousTestCase, condition: Any, what: str) -> None:
    event = threading.Event()
    for _ in range(int(_WAIT / 0.01)):
        if condition():
            return
        event.wait(0.01)
    case.fail("timed out waiting for " + what)


def _refusal(pool: Any, others: Sequence[threading.Thread] = ()) -> str | None:
    """
    L{forkRefusal} for a reactor with C{pool}, seeing this thread, the
    pool's workers and C{others}: not the threads other tests of this
    process may have left running.
    """
    current = threading.current_thread()
    workers = list(getattr(pool, "threads", ()))

    def threads() -> list[threading.Thread]:
        return [current, *workers, *others]

    return forkRefusal(_Reactor(pool), threads=threads, countOSThreads=lambda: None)


class ForkRefusalTests(SynchronousTestCase):
    """
    L{forkRefusal} allows the fork beside idle workers of the reactor's
    thread pool only.
    """

    def test_aloneAllowed(self) -> None:
        """
        With no other thread the fork is safe.
        """
        current = threading.current_thread()
        self.assertIsNone(
            forkRefusal(_Reactor(), threads=lambda: [current], countOSThreads=lambda: 1)
        )

    def test_idlePoolWorkersAllowed(self) -> None:
        """
        The reactor's thread pool, started and idle, does not refuse it.
        """
        pool = _startedPool(self)
        self.assertTrue(pool.threads)
        self.assertIsNone(_refusal(pool))

    def test_busyPoolRefused(self) -> None:
        """
        A worker still working would never finish in the child: refused,
        saying so.
        """
        pool = _startedPool(self)
        release = threading.Event()
        self.addCleanup(release.set)
        running = threading.Event()

        def work() -> None:
            running.set()
            release.wait(_WAIT)

        pool.callInThread(work)
        self.assertTrue(running.wait(_WAIT))
        self.assertEqual(
            _refusal(pool),
            "the reactor's thread pool is busy (1 working)",
        )
        release.set()
        _waitUntil(self, lambda: not pool.working, "the worker idle again")
        self.assertIsNone(_refusal(pool))

    def test_otherThreadRefused(self) -> None:
        """
        A thread that is not one of the reactor pool's workers refuses the
        fork, named in the reason, even beside the reactor's idle pool.
        """
        pool = _startedPool(self)
        release = threading.Event()
        stranger = threading.Thread(
            target=release.wait, args=(_WAIT,), name="application-poller"
        )
        stranger.start()
        # Run last to first: released, then joined.
        self.addCleanup(stranger.join)
        self.addCleanup(release.set)
        reason = _refusal(pool, [stranger])
        self.assertIsNotNone(reason)
        self.assertIn("application-poller", str(reason))
        self.assertIn("application-poller", str(_refusal(None, [stranger])))

    def test_threadsPythonDoesNotKnowRefused(self) -> None:
        """
        The kernel counting more threads than Python knows (a C extension
        started them) refuses the fork.
        """
        current = threading.current_thread()
        self.assertEqual(
            forkRefusal(
                _Reactor(), threads=lambda: [current], countOSThreads=lambda: 3
            ),
            "2 threads run that Python did not start",
        )
        self.assertIsNone(
            forkRefusal(
                _Reactor(), threads=lambda: [current], countOSThreads=lambda: None
            )
        )

    def test_osThreadCount(self) -> None:
        """
        The kernel's count includes a thread just started: counted in a
        process of its own, where no other test's threads come and go.
        """
        if osThreadCount() is None:
            self.skipTest("no /proc/self/task here")
        counted = subprocess.run(
            [
                sys.executable,
                "-c",
                "import threading\n"
                "from migrate.strategies._reexec._threads import osThreadCount\n"
                "before = osThreadCount()\n"
                "release = threading.Event()\n"
                "thread = threading.Thread(target=release.wait)\n"
                "thread.start()\n"
                "print(before, osThreadCount())\n"
                "release.set()\n"
                "thread.join()\n",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        self.assertEqual(counted.returncode, 0, counted.stderr)
        before, after = (int(each) for each in counted.stdout.split())
        self.assertEqual(after, before + 1)


class FreshThreadPoolTests(SynchronousTestCase):
    """
    L{freshThreadPool} makes the caretaker's reactor start a pool of its
    own.
    """

    def test_forgetsTheOldPool(self) -> None:
        """
        The old pool is forgotten (its workers are not in the caretaker):
        the reactor's C{getThreadPool} makes a new one.
        """
        from twisted.internet.selectreactor import SelectReactor

        reactor = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        old = reactor.getThreadPool()
        freshThreadPool(reactor)
        new = reactor.getThreadPool()
        self.assertIsNot(new, old)
        self.assertIsNotNone(new)
        freshThreadPool(_Reactor(None))
