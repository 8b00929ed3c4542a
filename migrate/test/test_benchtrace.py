"""
Tests for L{migrate.bench._trace}: what a traced benchmark run records of
each process, and how it shows the events around a wait.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from typing import Any

from twisted.internet.base import ReactorBase
from twisted.trial.unittest import SynchronousTestCase

from ..bench._process import LAUNCHER
from ..bench._trace import (
    TRACE_VARIABLE,
    TraceEvent,
    TurnRecorder,
    aroundLongestWait,
    describeAround,
    processNames,
    readTraces,
    traceThisProcess,
)


class _Clocks:
    """
    The wall clock, the processor clock, the run delay and the process ID
    a L{TurnRecorder} reads, set by hand.
    """

    def __init__(self) -> None:
        self.wall = 1000.0
        self.processor = 0.0
        self.delay: float | None = 0.0
        self.pid = 41

    def recorder(self, directory: str) -> TurnRecorder:
        return TurnRecorder(
            directory,
            clock=lambda: self.wall,
            processorClock=lambda: self.processor,
            runDelay=lambda: self.delay,
            pid=lambda: self.pid,
        )

    def iterate(
        self, recorder: TurnRecorder, wall: float, processor: float, waited: float
    ) -> None:
        """
        One reactor iteration that lasted C{wall} seconds, used C{processor}
        of them and waited C{waited} for a processor.
        """
        self.wall += wall
        self.processor += processor
        if self.delay is not None:
            self.delay += waited
        recorder.iteration()


class TurnRecorderTests(SynchronousTestCase):
    """
    L{TurnRecorder} writes a line for each long turn, each wait for a
    processor and each old or long collection, and nothing else.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="migrate-trace-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))
        self.clocks = _Clocks()
        self.recorder = self.clocks.recorder(self.directory)

    def lines(self, pid: int = 41) -> list[list[str]]:
        path = os.path.join(self.directory, "{}.trace".format(pid))
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [line.split() for line in f if not line.startswith("#")]

    def test_longTurn(self) -> None:
        """
        An iteration that used more than L{migrate.bench._trace.LONG_TURN} of processor
        time is recorded from when it began, with its wall and processor
        time; a shorter one, and the first iteration (nothing before it to
        measure), are not.
        """
        self.recorder.iteration()
        self.clocks.iterate(self.recorder, 0.010, 0.003, 0)
        began = self.clocks.wall
        self.clocks.iterate(self.recorder, 0.020, 0.005, 0)
        self.assertEqual(
            self.lines(), [["{:.6f}".format(began), "turn", "0.020000", "0.005000"]]
        )

    def test_waited(self) -> None:
        """
        An iteration in which the thread waited more than
        L{migrate.bench._trace.LONG_WAIT} for a processor is recorded with that wait and
        the iteration's wall time.
        """
        self.recorder.iteration()
        self.clocks.iterate(self.recorder, 0.010, 0.001, 0.0015)
        self.clocks.iterate(self.recorder, 0.012, 0.001, 0.003)
        [[_, kind, waited, wall]] = self.lines()
        self.assertEqual((kind, waited, wall), ("waited", "0.003000", "0.012000"))

    def test_noRunDelay(self) -> None:
        """
        Where the kernel does not say how long a thread waited, long turns
        are still recorded.
        """
        self.clocks.delay = None
        self.recorder.iteration()
        self.clocks.iterate(self.recorder, 0.010, 0.008, 0)
        self.assertEqual([line[1] for line in self.lines()], ["turn"])

    def test_collections(self) -> None:
        """
        A collection of an older generation is recorded however short; one
        of the youngest only if it took more than
        L{migrate.bench._trace.LONG_COLLECTION}.
        """
        for generation, took in [(0, 0.001), (1, 0.0005), (0, 0.003), (2, 0.0)]:
            self.recorder.collection("start", {"generation": generation})
            self.clocks.wall += took
            self.recorder.collection("stop", {"generation": generation})
        self.assertEqual(
            [(kind, detail) for _, kind, _, detail in self.lines()],
            [
                ("collection", "1.000000"),
                ("collection", "0.000000"),
                ("collection", "2.000000"),
            ],
        )

    def test_forkedChild(self) -> None:
        """
        After a fork, the child writes a file of its own, which says whose
        child it is, and its first iteration is not measured against its
        parent's last.
        """
        self.recorder.started(["-c", "migrate-host"])
        self.recorder.iteration()
        self.clocks.pid = 42
        self.clocks.iterate(self.recorder, 0.010, 0.009, 0.009)
        self.clocks.iterate(self.recorder, 0.010, 0.009, 0)
        self.assertEqual(self.lines(41), [])
        self.assertEqual([line[1] for line in self.lines(42)], ["turn"])
        with open(os.path.join(self.directory, "42.trace")) as f:
            self.assertEqual(f.readline(), "# child of 41: -c migrate-host\n")

    def test_started(self) -> None:
        """
        L{TurnRecorder.started} writes the program's command line as a
        comment, which L{readTraces} skips.
        """
        self.recorder.started(["-c", "-n", "migrate-host"])
        self.recorder.iteration()
        self.clocks.iterate(self.recorder, 0.010, 0.009, 0)
        with open(os.path.join(self.directory, "41.trace")) as f:
            self.assertEqual(f.readline(), "# -c -n migrate-host\n")
        self.assertEqual([each.kind for each in readTraces(self.directory)], ["turn"])


class ReadAndDescribeTests(SynchronousTestCase):
    """
    L{readTraces} gathers every process's events; L{describeAround} shows
    those that overlap a span.
    """

    def test_around(self) -> None:
        """
        Only the events overlapping the span are described, in the order
        they began, named by process where a name is given, times from the
        origin in milliseconds; unreadable lines and other files are
        skipped.
        """
        directory = tempfile.mkdtemp(prefix="migrate-trace-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, True))
        with open(os.path.join(directory, "7.trace"), "w") as f:
            f.write("# the old host\n")
            f.write("100.010000 turn 0.020000 0.015000\n")
            f.write("100.500000 turn 0.020000 0.015000\n")
            f.write("not a line\n")
            f.write("100.012000 fancy 0.001 0.001\n")
        with open(os.path.join(directory, "8.trace"), "w") as f:
            f.write("100.040000 waited 0.008000 0.011000\n")
            f.write("100.045000 collection 0.003000 2.000000\n")
            f.write("99.900000 waited 0.008000 0.011000\n")
        with open(os.path.join(directory, "notes.txt"), "w") as f:
            f.write("100.040000 waited 0.008000 0.011000\n")
        events = readTraces(directory)
        self.assertEqual(len(events), 5)
        self.assertEqual(events[0], TraceEvent(8, 99.9, "waited", 0.008, 0.011))
        self.assertEqual(
            describeAround(events, 100.020, 100.060, 100.0, {7: "old host"}),
            [
                "old host (7): long turn at +10.0 ms: 20.0 ms, 15.0 ms of it on "
                "a processor",
                "process 8: waited for a processor at +40.0 ms: 8.0 ms in an "
                "iteration of 11.0 ms",
                "process 8: garbage collection at +45.0 ms: generation 2, 3.0 ms",
            ],
        )
        self.assertEqual(
            describeAround(events, 100.020, 100.060, 100.0, {}, limit=1)[1:],
            ["and 2 more"],
        )


class AroundLongestWaitTests(SynchronousTestCase):
    """
    L{aroundLongestWait} shows a scenario's traced events around its
    longest wait, in a traced run only.
    """

    def test_traced(self) -> None:
        """
        With the directory in the environment, the events between the send
        of the longest-waiting request and its answer are described, the
        processes named by L{processNames}; without it, or without a
        longest wait, there is nothing to show.
        """
        directory = tempfile.mkdtemp(prefix="migrate-trace-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, True))
        with open(os.path.join(directory, "7.trace"), "w") as f:
            f.write("100.010000 turn 0.020000 0.015000\n")
            f.write("100.500000 turn 0.020000 0.015000\n")
        figures = {"stall": 0.030, "stallAt": 0.020}
        names = processNames(7, 8)
        self.patch(os, "environ", {})
        self.assertIsNone(aroundLongestWait(figures, 100.0, names))
        self.patch(os, "environ", {TRACE_VARIABLE: directory})
        self.assertEqual(
            aroundLongestWait(figures, 100.0, names),
            [
                "old host (7): long turn at +10.0 ms: 20.0 ms, 15.0 ms of it "
                "on a processor"
            ],
        )
        self.assertIsNone(aroundLongestWait({"stall": None}, 100.0, names))

    def test_processNames(self) -> None:
        """
        The benchmark is named, and the host; when the migration changed
        process, the old and the new host; an unknown one is left out.
        """
        me = os.getpid()
        self.assertEqual(
            processNames(7, 8), {me: "benchmark", 7: "old host", 8: "new host"}
        )
        self.assertEqual(processNames(7, 7), {me: "benchmark", 7: "host"})
        self.assertEqual(processNames(None, 8), {me: "benchmark", 8: "new host"})


class TraceThisProcessTests(SynchronousTestCase):
    """
    L{traceThisProcess} records every reactor's iterations from then on.
    """

    def test_reactorIterations(self) -> None:
        """
        A reactor created afterwards, of any kind, records a long turn
        between two of its iterations; the launcher of every benchmark
        host asks for it when a traced run's directory is in its
        environment.
        """
        from twisted.internet.selectreactor import SelectReactor

        directory = tempfile.mkdtemp(prefix="migrate-trace-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, True))
        self.patch(ReactorBase, "runUntilCurrent", ReactorBase.runUntilCurrent)
        collections = list(gc.callbacks)
        self.addCleanup(gc.callbacks.__setitem__, slice(None), collections)
        traceThisProcess(directory)
        reactor: Any = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        reactor.runUntilCurrent()
        busyUntil = time.thread_time() + 0.01
        while time.thread_time() < busyUntil:
            pass
        reactor.runUntilCurrent()
        kinds = [each.kind for each in readTraces(directory)]
        self.assertIn("turn", kinds)
        self.assertTrue(all(each.pid == os.getpid() for each in readTraces(directory)))
        self.assertIn(TRACE_VARIABLE, LAUNCHER)
        self.assertIn("traceThisProcess", LAUNCHER)
