"""
Tests for L{migrate._host._priority}.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .._host import _priority
from .._host._priority import (
    BACKGROUND_NICENESS,
    BackgroundStart,
    describePriority,
    lowerOwnPriority,
    mayBringForward,
)

_NICE_BIT = 1 << 23


def _status(capEff: int | str) -> str:
    value = capEff if isinstance(capEff, str) else "{:016x}".format(capEff)
    return "Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{}\n".format(value)


class MayBringForwardTests(SynchronousTestCase):
    """
    L{mayBringForward} says whether a child's nice value may be lowered
    from the lowest priority back to this process's.
    """

    def test_rlimitAllows(self) -> None:
        """
        An C{RLIMIT_NICE} of C{n} allows nice values down to C{20 - n}:
        enough, without any capability, when that reaches this process's.
        """
        self.assertTrue(mayBringForward(0, _status(0), rlimitNice=20))
        self.assertTrue(mayBringForward(5, _status(0), rlimitNice=15))
        self.assertTrue(
            mayBringForward(-5, _status(0), rlimitNice=resource.RLIM_INFINITY)
        )

    def test_rlimitShort(self) -> None:
        """
        An C{RLIMIT_NICE} that stops short of this process's nice value,
        without C{CAP_SYS_NICE}, is not enough.
        """
        self.assertFalse(mayBringForward(0, _status(0), rlimitNice=0))
        self.assertFalse(mayBringForward(5, _status(0), rlimitNice=14))
        self.assertFalse(
            mayBringForward(0, _status(0xFFFFFFFF & ~_NICE_BIT), rlimitNice=19)
        )

    def test_capability(self) -> None:
        """
        C{CAP_SYS_NICE} among this process's effective capabilities is
        enough, whatever the limit.
        """
        self.assertTrue(mayBringForward(0, _status(_NICE_BIT), rlimitNice=0))
        self.assertTrue(mayBringForward(-10, _status(0x1FFFEFFFFFF), rlimitNice=0))

    def test_unreadableStatus(self) -> None:
        """
        A status without a readable C{CapEff} line grants nothing.
        """
        self.assertFalse(mayBringForward(0, _status("zz"), rlimitNice=0))
        self.assertFalse(mayBringForward(0, "Name:\tpython\n", rlimitNice=0))

    def test_thisProcess(self) -> None:
        """
        Without a status or a limit given, this process's are read: the
        answer agrees with what they say.
        """
        with open("/proc/self/status") as f:
            status = f.read()
        limit = resource.getrlimit(resource.RLIMIT_NICE)[0]
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        self.assertEqual(
            mayBringForward(niceness), mayBringForward(niceness, status, limit)
        )


class _Priorities:
    """
    Stands in for C{os.setpriority} and the listing of a process's
    threads: records what was set, and can refuse.
    """

    def __init__(self, threads: list[list[int]]) -> None:
        self.listings = threads
        self.set: list[tuple[int, int]] = []
        #: each thread's policy as set: whether the background's
        self.policies: list[tuple[int, bool]] = []
        self.refuse: dict[int, int] = {}

    def setPriority(self, which: int, who: int, value: int) -> None:
        assert which == os.PRIO_PROCESS
        if who in self.refuse:
            raise OSError(self.refuse[who], os.strerror(self.refuse[who]))
        self.set.append((who, value))

    def setPolicy(self, thread: int, idle: bool) -> None:
        self.policies.append((thread, idle))

    def threadsOf(self, pid: int) -> list[int]:
        if len(self.listings) > 1:
            return self.listings.pop(0)
        return self.listings[0]


class _BackgroundFixture(SynchronousTestCase):
    """
    A L{BackgroundStart} of child 100 with fake priorities and threads,
    and what it logs.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def _start(
        self, threads: list[list[int]], foreground: int = 0
    ) -> tuple[BackgroundStart, _Priorities]:
        fake = _Priorities(threads)
        start = BackgroundStart(
            self.clock,
            foreground,
            3.0,
            setPriority=fake.setPriority,
            threadsOf=fake.threadsOf,
            setPolicy=fake.setPolicy,
        )
        start.started(100)
        # What the start did at once (test_startedInTheBackgroundAtOnce).
        del fake.set[:], fake.policies[:]
        return start, fake

    def _logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [
            each
            for each in self.events
            if each.get("log_level") is level
            and each.get("log_namespace", "").startswith("migrate._host._priority")
        ]


class BackgroundStartTests(_BackgroundFixture):
    """
    L{BackgroundStart} brings a child started at the lowest priority
    forward, every thread of it, once: when told, or after its bounded
    time in the background.
    """

    def test_everyThreadMainFirst(self) -> None:
        """
        Bringing forward sets the main thread first (threads it starts
        from then on inherit its priority), then every other thread, and
        says so in the log with why.
        """
        start, fake = self._start([[100, 101, 102]], foreground=2)
        start.bringForward("the freeze begins")
        self.assertEqual(fake.set, [(100, 2), (101, 2), (102, 2)])
        self.assertEqual(fake.policies, [(100, False), (101, False), (102, False)])
        self.assertTrue(start.broughtForward)
        [info] = self._logged(LogLevel.info)
        self.assertEqual(info["why"], "the freeze begins")
        self.assertEqual((info["pid"], info["low"], info["nice"]), (100, 19, 2))

    def test_startedInTheBackgroundAtOnce(self) -> None:
        """
        Told the child started, the start gives it the background's nice
        value and policy at once (before the trampoline does), and says
        nothing if that fails.
        """
        fake = _Priorities([[100]])
        start = BackgroundStart(
            self.clock,
            0,
            3.0,
            setPriority=fake.setPriority,
            threadsOf=fake.threadsOf,
            setPolicy=fake.setPolicy,
        )
        start.started(100)
        self.assertEqual((fake.set, fake.policies), ([(100, 19)], [(100, True)]))
        fake.refuse[101] = errno.ESRCH
        start.ended()
        start.started(101)
        self.assertEqual(start.pid, 101)
        self.assertEqual(self._logged(LogLevel.error), [])

    def test_threadsStartedMeanwhile(self) -> None:
        """
        A thread that appears while the threads are brought forward (a
        thread in the background started it) is brought forward too.
        """
        start, fake = self._start([[100, 101], [100, 101, 103], [100, 101, 103]])
        start.bringForward("now")
        self.assertEqual(fake.set, [(100, 0), (101, 0), (103, 0)])

    def test_threadEndedMeanwhile(self) -> None:
        """
        A thread that ended between the listing and its turn is skipped.
        """
        start, fake = self._start([[100, 101, 102]])
        fake.refuse[101] = errno.ESRCH
        start.bringForward("now")
        self.assertEqual(fake.set, [(100, 0), (102, 0)])
        self.assertEqual(self._logged(LogLevel.error), [])

    def test_once(self) -> None:
        """
        Doing it again does nothing.
        """
        start, fake = self._start([[100]])
        start.bringForward("first")
        start.bringForward("second")
        self.assertEqual(fake.set, [(100, 0)])

    def test_afterItsTime(self) -> None:
        """
        A child still in the background after its bounded time is brought
        forward then, saying so.
        """
        start, fake = self._start([[100]])
        self.clock.advance(2.9)
        self.assertEqual(fake.set, [])
        self.clock.advance(0.1)
        self.assertEqual(fake.set, [(100, 0)])
        [info] = self._logged(LogLevel.info)
        self.assertEqual(info["why"], "still starting after 3 s")

    def test_logNamesPolicies(self) -> None:
        """
        The log names both the nice values and the policies (C{ps} shows
        the one, C{chrt -p} the other), and so do its refusals.
        """
        start, fake = self._start([[100]])
        start.bringForward("its start is done")
        [info] = self._logged(LogLevel.info)
        self.assertEqual(
            formatEvent(info),
            "Brought process 100 forward from nice 19 (SCHED_IDLE) to nice 0 "
            "(SCHED_OTHER): its start is done",
        )
        start.sendBack("it stages the pre-copy")
        [_, sent] = self._logged(LogLevel.info)
        self.assertEqual(
            formatEvent(sent),
            "Sent process 100 back from nice 0 (SCHED_OTHER) to nice 19 "
            "(SCHED_IDLE): it stages the pre-copy",
        )
        fake.refuse[100] = errno.EPERM
        start.bringForward("the freeze begins")
        [error] = self._logged(LogLevel.error)
        self.assertEqual(
            formatEvent(error),
            "Could not bring process 100 forward from nice 19 (SCHED_IDLE) to "
            "nice 0 (SCHED_OTHER) (the freeze begins): Operation not "
            "permitted; it runs on at nice 19 (SCHED_IDLE)",
        )

    def test_broughtForwardCancelsTimer(self) -> None:
        """
        Once brought forward, the deadline has nothing left to do.
        """
        start, fake = self._start([[100]])
        start.bringForward("now")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ended(self) -> None:
        """
        A child that ended is not touched again (its process ID may be
        another process's by then), nor is a deadline left behind.
        """
        start, fake = self._start([[100]])
        start.ended()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        start.bringForward("too late")
        self.assertEqual(fake.set, [])

    def test_goneMeanwhile(self) -> None:
        """
        A child that has ended before its end was noticed needs nothing,
        and nothing is logged as an error.
        """
        start, fake = self._start([[100]])
        fake.refuse[100] = errno.ESRCH
        start.bringForward("now")
        self.assertEqual(self._logged(LogLevel.error), [])

    def test_refused(self) -> None:
        """
        A refusal is logged as an error saying the child runs on at the
        low priority; nothing is raised.
        """
        start, fake = self._start([[100]])
        fake.refuse[100] = errno.EACCES
        start.bringForward("the freeze begins")
        [error] = self._logged(LogLevel.error)
        self.assertEqual(error["low"], BACKGROUND_NICENESS)
        self.assertIn("Permission denied", error["error"])

    def test_notStarted(self) -> None:
        """
        A background start never told of a child (Twisted started it, at
        this process's priority) touches nothing.
        """
        fake = _Priorities([[100]])
        start = BackgroundStart(
            self.clock, 0, 3.0, setPriority=fake.setPriority, threadsOf=fake.threadsOf
        )
        start.bringForward("now")
        self.assertEqual(fake.set, [])


class SendBackTests(_BackgroundFixture):
    """
    L{BackgroundStart.sendBack} puts a child brought forward back to the
    lowest priority, every thread of it, until it is brought forward
    again: when told, or after the same bounded time.
    """

    def _forward(self, threads: list[list[int]]) -> tuple[BackgroundStart, _Priorities]:
        start, fake = self._start(threads, foreground=2)
        start.bringForward("its start is done")
        del fake.set[:]
        del self.events[:]
        return start, fake

    def test_everyThreadBack(self) -> None:
        """
        Every thread goes back to the lowest priority, the main thread
        first, and the log says so with why.
        """
        start, fake = self._forward([[100, 101, 102]])
        del fake.policies[:]
        start.sendBack("it stages the pre-copy")
        self.assertEqual(fake.set, [(100, 19), (101, 19), (102, 19)])
        self.assertEqual(fake.policies, [(100, True), (101, True), (102, True)])
        self.assertFalse(start.broughtForward)
        [info] = self._logged(LogLevel.info)
        self.assertEqual(info["why"], "it stages the pre-copy")
        self.assertEqual((info["pid"], info["low"], info["nice"]), (100, 19, 2))

    def test_broughtForwardAgain(self) -> None:
        """
        Brought forward again, every thread (those started meanwhile too)
        runs at this process's priority, and the deadline is cancelled.
        """
        start, fake = self._forward([[100, 101]])
        start.sendBack("it stages the pre-copy")
        fake.listings[:] = [[100, 101, 103]]
        del fake.set[:]
        start.bringForward("the freeze begins")
        self.assertEqual(fake.set, [(100, 2), (101, 2), (103, 2)])
        self.assertTrue(start.broughtForward)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_afterItsTime(self) -> None:
        """
        A child still sent back after the bounded time is brought forward
        then, saying so.
        """
        start, fake = self._forward([[100]])
        start.sendBack("it stages the pre-copy")
        del fake.set[:]
        self.clock.advance(2.9)
        self.assertEqual(fake.set, [])
        self.clock.advance(0.1)
        self.assertEqual(fake.set, [(100, 2)])
        self.assertEqual(
            self._logged(LogLevel.info)[-1]["why"], "in the background again for 3 s"
        )

    def test_notForward(self) -> None:
        """
        A child still in the background, or ended, is not touched.
        """
        start, fake = self._start([[100]])
        start.sendBack("too early")
        self.assertEqual(fake.set, [])
        start.bringForward("now")
        start.ended()
        del fake.set[:]
        start.sendBack("too late")
        self.assertEqual(fake.set, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_goneMeanwhile(self) -> None:
        """
        A child that has ended meanwhile needs nothing, and nothing is
        logged as an error.
        """
        start, fake = self._forward([[100]])
        fake.refuse[100] = errno.ESRCH
        start.sendBack("it stages the pre-copy")
        self.assertEqual(self._logged(LogLevel.error), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused(self) -> None:
        """
        A refusal part way is logged as an error saying the child runs on
        at this process's priority, and the threads sent back already are
        brought forward again; nothing is raised.
        """
        start, fake = self._forward([[100, 101]])
        fake.refuse[101] = errno.EPERM
        start.sendBack("it stages the pre-copy")
        error = self._logged(LogLevel.error)[0]
        self.assertEqual((error["low"], error["nice"]), (19, 2))
        self.assertIn("Operation not permitted", error["error"])
        self.assertEqual(fake.set, [(100, 19), (100, 2)])
        self.assertTrue(start.broughtForward)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LowerOwnPriorityTests(SynchronousTestCase):
    """
    L{lowerOwnPriority} gives the calling thread the background's nice
    value and policy, for good.
    """

    def test_callingThread(self) -> None:
        """
        The calling thread (a thread of this test's own, which ends with
        it) takes the nice value and C{SCHED_IDLE}; the other threads keep
        theirs.
        """
        if not hasattr(os, "SCHED_IDLE"):
            raise SkipTest("no SCHED_IDLE here")
        seen: list[tuple[int, int]] = []

        def lower() -> None:
            lowerOwnPriority(BACKGROUND_NICENESS)
            seen.append((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)))

        before = (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0))
        thread = threading.Thread(target=lower)
        thread.start()
        thread.join(30)
        self.assertEqual(seen, [(BACKGROUND_NICENESS, os.SCHED_IDLE)])
        self.assertEqual(
            (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)), before
        )


class IfPossibleTests(SynchronousTestCase):
    """
    L{BackgroundStart.ifPossible} gives a background start only where the
    child can be brought forward again.
    """

    def test_possible(self) -> None:
        """
        Where it may, the start comes back to this process's nice value
        after a tenth of the deadline.
        """
        self.patch(_priority, "mayBringForward", lambda niceness: True)
        self.patch(os, "getpriority", lambda which, who: 3)
        if hasattr(os, "SCHED_OTHER"):
            self.patch(os, "sched_getscheduler", lambda pid: os.SCHED_OTHER)
        start = BackgroundStart.ifPossible(Clock(), 30.0)
        assert start is not None
        self.assertEqual((start.foreground, start.atMost), (3, 3.0))
        self.assertEqual(start.niceness, BACKGROUND_NICENESS)

    def test_notPermitted(self) -> None:
        """
        Where this process could not bring the child forward, there is no
        background start: the child starts at this process's priority.
        """
        self.patch(_priority, "mayBringForward", lambda niceness: False)
        self.assertIsNone(BackgroundStart.ifPossible(Clock(), 30.0))

    def test_alreadyLowest(self) -> None:
        """
        A process at the lowest priority itself has nothing to gain.
        """
        self.patch(_priority, "mayBringForward", lambda niceness: True)
        self.patch(os, "getpriority", lambda which, who: BACKGROUND_NICENESS)
        self.assertIsNone(BackgroundStart.ifPossible(Clock(), 30.0))

    def test_otherPolicy(self) -> None:
        """
        A process under another scheduling policy than the normal one
        (C{SCHED_BATCH}, a real-time one, C{SCHED_IDLE}) gets no background
        start: bringing a child forward gives the normal policy, not its
        own.
        """
        if not hasattr(os, "SCHED_BATCH"):
            raise SkipTest("no scheduling policies here")
        self.patch(_priority, "mayBringForward", lambda niceness: True)
        self.patch(os, "getpriority", lambda which, who: 0)
        for policy in (os.SCHED_BATCH, os.SCHED_IDLE, os.SCHED_FIFO):
            self.patch(os, "sched_getscheduler", lambda pid, policy=policy: policy)
            self.assertIsNone(BackgroundStart.ifPossible(Clock(), 30.0), policy)
        self.patch(os, "sched_getscheduler", lambda pid: os.SCHED_OTHER)
        self.assertIsNotNone(BackgroundStart.ifPossible(Clock(), 30.0))


class DescribePriorityTests(SynchronousTestCase):
    """
    L{describePriority} names a nice value and, where the system has
    them, its policy.
    """

    def test_policies(self) -> None:
        """
        The background's policy is C{SCHED_IDLE}, the other C{SCHED_OTHER}.
        """
        if not hasattr(os, "SCHED_IDLE"):
            raise SkipTest("no SCHED_IDLE here")
        self.assertEqual(describePriority(19, True), "nice 19 (SCHED_IDLE)")
        self.assertEqual(describePriority(-5, False), "nice -5 (SCHED_OTHER)")

    def test_noPolicies(self) -> None:
        """
        Where the system has no such policies, only the nice value.
        """
        self.patch(_priority, "_IDLE_POLICY", None)
        self.assertEqual(describePriority(19, True), "nice 19")
