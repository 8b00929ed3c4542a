# -*- test-case-name: migrate.test.test_benchtrace -*-
"""
What each process of a benchmark run did around its longest wait:
C{python -m migrate.bench --trace DIR}.

A client's longest wait says how long, not why.  With C{--trace}, every
process of the run that has a Twisted reactor (the benchmark, which is
also the load generator; each host; each successor or re-executed image,
started by the same launcher) records in C{DIR/PID.trace}:

  - each reactor iteration (from one C{runUntilCurrent} to the next) that
    used more than L{LONG_TURN} of processor time: a long turn, which
    keeps every other client of that process waiting;
  - each iteration in which its thread waited more than L{LONG_WAIT} for
    a processor while ready to run (the run delay of
    C{/proc/thread-self/schedstat}): the machine, not the process, was
    busy;
  - each garbage collection of an older generation, or one longer than
    L{LONG_COLLECTION}.

The results then list, for each migration under load and each upgrade
of the stall scenario, those events of every process between the send
of the request that waited longest and its answer (L{aroundLongestWait}).  Tracing costs each iteration two clock
reads and one C{pread(2)}, a few microseconds, which a traced run's
figures include.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import IO, Any, Callable, Iterable, Mapping

from attrs import frozen

__all__ = [
    "LONG_COLLECTION",
    "LONG_TURN",
    "LONG_WAIT",
    "TRACE_VARIABLE",
    "TraceEvent",
    "TurnRecorder",
    "aroundLongestWait",
    "describeAround",
    "processNames",
    "readTraces",
    "traceThisProcess",
]

#: the environment variable naming the directory a traced run writes to;
#: the benchmark sets it, and the launcher of every host it starts reads it
TRACE_VARIABLE = "MIGRATE_BENCH_TRACE"

#: processor seconds an iteration must use to be recorded as a long turn
LONG_TURN = 0.004
#: seconds a thread must have waited for a processor within one iteration
#: to be recorded
LONG_WAIT = 0.002
#: seconds a collection of the youngest generation must take to be
#: recorded (older generations always are)
LONG_COLLECTION = 0.002

#: the most events shown for one longest wait (all are in the files)
SHOWN_EVENTS = 40

#: what each kind of event is called in the results
_KINDS = {
    "turn": "long turn",
    "waited": "waited for a processor",
    "collection": "garbage collection",
}


@frozen
class TraceEvent:
    """
    One recorded event of one process.

    @ivar pid: the process.
    @ivar at: when it began (seconds since the epoch, as C{time.time()}).
    @ivar kind: C{"turn"}, C{"waited"} or C{"collection"}.
    @ivar seconds: a turn's and a collection's wall time; for C{"waited"},
        the time spent waiting.
    @ivar detail: a turn's processor seconds; the wall time of the
        iteration a wait fell in; a collection's generation.
    """

    pid: int
    at: float
    kind: str
    seconds: float
    detail: float

    @property
    def end(self) -> float:
        """
        When the span the event covers ended.
        """
        if self.kind == "waited":
            return self.at + self.detail
        return self.at + self.seconds


def _runDelayReader() -> Callable[[], float | None]:
    """
    A reader of the calling thread's time spent ready to run but not
    running, in seconds (C{/proc/thread-self/schedstat}), opened on its
    first call (so, in the thread that calls it); L{None} where the kernel
    does not say.
    """
    state: dict[str, Any] = {}

    def read() -> float | None:
        descriptor = state.get("descriptor")
        if descriptor is not None and state.get("pid") != os.getpid():
            # A forked child: the descriptor names its parent's thread.
            os.close(descriptor)
            descriptor = state["descriptor"] = None
        if descriptor is None:
            if state.get("failed"):
                return None
            try:
                descriptor = state["descriptor"] = os.open(
                    "/proc/thread-self/schedstat", os.O_RDONLY
                )
            except OSError:
                state["failed"] = True
                return None
            state["pid"] = os.getpid()
        try:
            return int(os.pread(descriptor, 100, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    return read


class TurnRecorder:
    """
    Records one process's long turns, waits for a processor and
    collections into C{DIRECTORY/PID.trace}, a line each (C{at kind
    seconds detail}), written at once: a process may end with
    C{os._exit}.  A forked child writes its own file.

    @ivar directory: where the files go.
    """

    def __init__(
        self,
        directory: str,
        clock: Callable[[], float] = time.time,
        processorClock: Callable[[], float] = time.thread_time,
        runDelay: Callable[[], float | None] | None = None,
        pid: Callable[[], int] = os.getpid,
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._processorClock = processorClock
        self._runDelay = runDelay if runDelay is not None else _runDelayReader()
        self._pid = pid
        self._file: IO[str] | None = None
        self._filePid: int | None = None
        self._program: tuple[int, str] | None = None
        self._last: tuple[int, float, float, float | None] | None = None
        self._collecting: float | None = None

    def _path(self, pid: int) -> str:
        """
        The file of process C{pid}.
        """
        return os.path.join(self.directory, "{}.trace".format(pid))

    def _write(self, at: float, kind: str, seconds: float, detail: float) -> None:
        pid = self._pid()
        if self._file is None or self._filePid != pid:
            # A forked child starts a file of its own, saying so.
            self._file = open(self._path(pid), "a", buffering=1)
            self._filePid = pid
            if self._program is not None and self._program[0] != pid:
                self._file.write(
                    "# child of {}: {}\n".format(self._program[0], self._program[1])
                )
        self._file.write("{:.6f} {} {:.6f} {:.6f}\n".format(at, kind, seconds, detail))

    def started(self, argv: Iterable[str]) -> None:
        """
        Note which program this process runs (a comment line, so that a
        reader can tell the processes apart).
        """
        pid = self._pid()
        program = " ".join(argv)[:300].replace("\n", " ")
        self._program = (pid, program)
        with open(self._path(pid), "a") as f:
            f.write("# {}\n".format(program))

    def iteration(self) -> None:
        """
        A reactor iteration begins: record the one that ended, if it was a
        long turn or waited for a processor.
        """
        pid = self._pid()
        now = self._clock()
        used = self._processorClock()
        delay = self._runDelay()
        last, self._last = self._last, (pid, now, used, delay)
        if last is None or last[0] != pid:
            # The first iteration, or the first of a forked child.
            return
        _, began, usedBefore, delayBefore = last
        if used - usedBefore > LONG_TURN:
            self._write(began, "turn", now - began, used - usedBefore)
        if delay is not None and delayBefore is not None:
            if delay - delayBefore > LONG_WAIT:
                self._write(began, "waited", delay - delayBefore, now - began)

    def collection(self, phase: str, info: Mapping[str, Any]) -> None:
        """
        A C{gc.callbacks} entry: record a collection of an older
        generation, or a long one.
        """
        if phase == "start":
            self._collecting = self._clock()
            return
        began, self._collecting = self._collecting, None
        if began is None:
            return
        took = self._clock() - began
        generation = int(info.get("generation", 0))
        if generation >= 1 or took > LONG_COLLECTION:
            self._write(began, "collection", took, generation)


def traceThisProcess(directory: str) -> TurnRecorder:
    """
    Record this process's reactor iterations and collections into
    C{directory} from now on (see the module's docstring): wraps
    C{ReactorBase.runUntilCurrent}, which the main loop of every reactor
    built on it (epoll, poll, select: whichever is installed later) calls
    once per iteration.  The asyncio reactor calls it only when a timer is
    due: there, an "iteration" spans from one timer to the next.
    """
    from twisted.internet.base import ReactorBase

    recorder = TurnRecorder(directory)
    recorder.started(sys.argv)
    original = ReactorBase.runUntilCurrent

    def runUntilCurrent(self: Any) -> None:
        recorder.iteration()
        original(self)

    ReactorBase.runUntilCurrent = runUntilCurrent  # type: ignore[method-assign]
    gc.callbacks.append(recorder.collection)
    return recorder


def readTraces(directory: str) -> list[TraceEvent]:
    """
    Every event recorded in C{directory}, in the order they began; lines
    that cannot be read are skipped.
    """
    events = []
    for name in os.listdir(directory):
        stem, dot, extension = name.partition(".")
        if extension != "trace" or not stem.isdigit():
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                fields = line.split()
                if len(fields) != 4 or fields[1] not in _KINDS:
                    continue
                try:
                    at, seconds, detail = (float(fields[i]) for i in (0, 2, 3))
                except ValueError:
                    continue
                events.append(TraceEvent(int(stem), at, fields[1], seconds, detail))
    events.sort(key=lambda event: event.at)
    return events


def describeAround(
    events: Iterable[TraceEvent],
    low: float,
    high: float,
    origin: float,
    names: Mapping[int, str],
    limit: int | None = None,
) -> list[str]:
    """
    Describe the events that overlap the span from C{low} to C{high}, one
    line each, in the order they began, times in milliseconds from
    C{origin} (the upgrade command).

    @param names: what to call each process (C{"old host"}), by process
        ID; others are called by their ID alone.
    @param limit: describe at most this many, and say how many more there
        were (a wait of seconds on a busy machine spans hundreds).
    """
    lines: list[str] = []
    more = 0
    for event in events:
        if event.end < low or event.at > high:
            continue
        if limit is not None and len(lines) >= limit:
            more += 1
            continue
        who = names.get(event.pid)
        process = (
            "process {}".format(event.pid)
            if who is None
            else "{} ({})".format(who, event.pid)
        )
        at = (event.at - origin) * 1000
        if event.kind == "turn":
            what = "{:.1f} ms, {:.1f} ms of it on a processor".format(
                event.seconds * 1000, event.detail * 1000
            )
        elif event.kind == "waited":
            what = "{:.1f} ms in an iteration of {:.1f} ms".format(
                event.seconds * 1000, event.detail * 1000
            )
        else:
            what = "generation {}, {:.1f} ms".format(
                int(event.detail), event.seconds * 1000
            )
        lines.append(
            "{}: {} at {:+.1f} ms: {}".format(process, _KINDS[event.kind], at, what)
        )
    if more:
        lines.append("and {} more".format(more))
    return lines


def aroundLongestWait(
    figures: Mapping[str, Any], start: float, names: Mapping[int, str]
) -> list[str] | None:
    """
    In a traced run (L{TRACE_VARIABLE} names a directory), what each
    process recorded between the send of the request that waited longest
    after the upgrade command and its answer: L{describeAround}, at most
    L{SHOWN_EVENTS} of them.

    @param figures: a scenario's results, with the longest wait
        (C{"stall"}) and when its request was sent after the command
        (C{"stallAt"}), in seconds.
    @param start: when the upgrade command began.
    @param names: what to call each process, by process ID.

    @return: L{None} when the run is not traced or nothing was answered.
    """
    directory = os.environ.get(TRACE_VARIABLE)
    if not directory or figures.get("stall") is None or figures.get("stallAt") is None:
        return None
    sent = start + figures["stallAt"]
    return describeAround(
        readTraces(directory),
        sent,
        sent + figures["stall"],
        start,
        names,
        limit=SHOWN_EVENTS,
    )


def processNames(oldPid: int | None, newPid: int | None) -> dict[int, str]:
    """
    What the results call the processes of one migration: this one (the
    benchmark, with its load generator or probes), and the host, or the
    old and the new host when the migration changed process (either
    unknown: L{None}).
    """
    names = {os.getpid(): "benchmark"}
    same = newPid == oldPid
    if oldPid is not None:
        names[oldPid] = "host" if same else "old host"
    if newPid is not None:
        names[newPid] = "host" if same else "new host"
    return names
