"""
Tests for L{migrate._handoff._threadwork}: what the reactor's threads still
owe it, and waiting, within a bound, until they owe it nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from .._handoff._threadwork import (
    THREAD_WORK_POLL,
    ThreadWork,
    waitForThreadWork,
    workInFlight,
    workingThreads,
)
from ._fakes import ThreadedFakeReactor


class _EndsWhenLookedAt:
    """
    A reactor whose one thread job ends, its answer queued, right after
    the first look at either the pool's busy workers or the queue of calls
    from threads: as a worker thread may, between two looks of the
    reactor's thread.

    @ivar looks: what was looked at, in order.
    """

    def __init__(self) -> None:
        self.looks: list[str] = []
        self._working = ["job"]
        self._queued: list[Any] = []
        reactor = self

        class Pool:
            @property
            def working(self) -> list[str]:
                return reactor._look("working", reactor._working)

        self.threadpool = Pool()

    @property
    def threadCallQueue(self) -> list[Any]:
        return self._look("threadCallQueue", self._queued)

    def _look(self, name: str, seen: list[Any]) -> list[Any]:
        self.looks.append(name)
        snapshot = list(seen)
        if self._working:
            self._queued.append("answer")
            del self._working[:]
        return snapshot


class WorkInFlightTests(SynchronousTestCase):
    """
    L{workInFlight} and L{workingThreads} count the calls queued from
    threads and the thread pool's jobs.
    """

    def test_nothing(self) -> None:
        """
        A reactor with no thread pool yet (or no queue at all) owes
        nothing.
        """
        self.assertIsNone(workInFlight(object()))
        self.assertEqual(workingThreads(object()), 0)
        self.assertIsNone(workInFlight(ThreadedFakeReactor()))

    def test_counted(self) -> None:
        """
        Jobs running and calls queued are both counted, and said.
        """
        reactor = ThreadedFakeReactor()
        reactor.startJob("one", print)
        reactor.startJob("two", print)
        reactor.callFromThread(print)
        work = workInFlight(reactor)
        self.assertEqual(work, ThreadWork(queued=1, working=2))
        assert work is not None
        self.assertEqual(
            work.describe(),
            "1 call queued for the reactor by another thread and 2 jobs of "
            "the reactor's thread pool (deferToThread) running",
        )
        self.assertEqual(
            ThreadWork(queued=0, working=1).describe(),
            "1 job of the reactor's thread pool (deferToThread) running",
        )

    def test_jobWaitingForAWorker(self) -> None:
        """
        A job Twisted's thread pool holds for a worker (none free, or the
        pool not started yet) counts as running: it will answer later too.
        """
        pool = ThreadPool(0, 1)
        pool.callInThread(lambda: None)

        class Reactor:
            threadpool = pool

        self.assertEqual(workingThreads(Reactor()), 1)

    def test_jobEndingBetweenTheLooks(self) -> None:
        """
        A job that ends between the look at the pool and the look at the
        reactor's queue is still seen: a worker of Twisted's pool queues
        its answer (C{callFromThread}) before it stops counting as busy, so
        the pool is looked at first, the queue last.
        """
        reactor = _EndsWhenLookedAt()
        self.assertEqual(workInFlight(reactor), ThreadWork(queued=1, working=1))
        self.assertEqual(reactor.looks, ["working", "threadCallQueue"])


class WaitForThreadWorkTests(SynchronousTestCase):
    """
    L{waitForThreadWork} lets the reactor run until its threads owe it
    nothing, within a deadline.
    """

    def test_nothingInFlight(self) -> None:
        """
        With nothing in flight it fires at once, in the caller's step.
        """
        reactor = ThreadedFakeReactor()
        self.assertIsNone(self.successResultOf(waitForThreadWork(reactor, 1.0)))

    def test_answerLandsFirst(self) -> None:
        """
        It fires once the job has finished and its answer was delivered
        (the queued call ran), not before.
        """
        reactor = ThreadedFakeReactor()
        answers: list[Any] = []
        finish = reactor.startJob("job", answers.append)
        d = waitForThreadWork(reactor, 1.0)
        reactor.advance(THREAD_WORK_POLL)
        self.assertNoResult(d)
        seen: list[list[Any]] = []

        def fired(result: Any) -> Any:
            seen.append(list(answers))
            return result

        d.addCallback(fired)
        finish("answer")
        self.assertNoResult(d)
        reactor.advance(THREAD_WORK_POLL)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(seen, [["answer"]])

    def test_deadline(self) -> None:
        """
        Past the deadline it fires with what is still in flight.
        """
        reactor = ThreadedFakeReactor()
        reactor.startJob("job", print)
        d = waitForThreadWork(reactor, 0.5)
        reactor.advance(0.4)
        self.assertNoResult(d)
        for _ in range(200):
            reactor.advance(THREAD_WORK_POLL)
        self.assertEqual(self.successResultOf(d), ThreadWork(queued=0, working=1))
