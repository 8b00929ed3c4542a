"""
Unit tests for re-exec (L{migrate.strategies._reexec._outgoing}, L{migrate.strategies._reexec._state},
L{migrate.strategies._reexec._incoming}, L{migrate.strategies.reexec}): the checks, the
state document, the choice of inherited descriptors and the C{execv}
failure path, with an injected C{execv} and fake reactors.
"""

from __future__ import annotations

import base64
import errno
import gc
import io
import json
import os
import signal
import socket
from typing import Any

from attrs import evolve
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from migrate._codec import StateError
from migrate._handoff._fdpass import readMemfd
from migrate._handoff._polls import afterPolls
from migrate._handoff._trial import TrialOutcome
from migrate._host._metrics import HostMetrics
from migrate._host._service import HostedListener, MigrationHost
from migrate._host._tracking import TrackingFactory
from migrate._report import MigrationPhase
from migrate.interfaces import IMigratable, IMigrationStrategy
from migrate.state import ProtocolState, captureProtocolState
from migrate.strategies import strategyNamed, strategyNames
from migrate.strategies._reexec._check import (
    DESCRIPTOR_HEADROOM,
    Program,
    checkDescriptorLimit,
    checkHost,
    checkProgram,
    programOf,
)
from migrate.strategies._reexec._incoming import (
    ReexecInheritance,
    _waitingFirst,
    adjustTwistdOptions,
    finishPreflight,
    inheritedReexec,
    logFileAfterExec,
    restoreReexec,
)
from migrate.strategies._reexec._outgoing import (
    DescriptorMarks,
    ReexecMigration,
    inheritableDescriptors,
)
from migrate.strategies._reexec._reports import ReportChannel
from migrate.strategies._reexec._state import (
    EXEC_AT_VARIABLE,
    FORMAT_VERSION,
    PREFLIGHT_MARKER,
    PREFLIGHT_VARIABLE,
    REEXEC_SIGNALS,
    STATE_FD_VARIABLE,
    InheritedConnection,
    Precopy,
    ReexecState,
    mergePrecopy,
    readState,
    writeState,
)
from migrate.strategies.reexec import ReexecStrategy

from ._fakes import HostReactor


@implementer(IMigratable)
class Counter(LineReceiver):
    """
    A migratable line protocol counting lines.
    """

    delimiter = b"\n"
    migrationVersion = 1

    def connectionMade(self) -> None:
        self.count = 0

    def lineReceived(self, line: bytes) -> None:
        self.count += 1
        self.sendLine(b"%s %d" % (line, self.count))

    def getMigrationState(self) -> Any:
        return {"count": self.count}

    def restoreMigrationState(self, state: Any) -> None:
        self.count = state["count"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


class Blocking(Counter):
    """
    A migratable line protocol that cannot move while C{busy}.
    """

    busy = False

    def migrationBlocker(self) -> str | None:
        return "busy" if self.busy else None


class Plain(LineReceiver):
    """
    A line protocol that knows nothing about migrate.
    """

    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.sendLine(b"hello")

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(b"got " + line)


@implementer(IMigratable)
class Unserialisable(Counter):
    def getMigrationState(self) -> Any:
        return {"count": object()}


class ProgramOfTests(SynchronousTestCase):
    """
    L{programOf} finds what a Python command line runs.
    """

    def test_script(self) -> None:
        self.assertEqual(
            programOf(["python", "-u", "-X", "dev", "-Wignore", "/bin/twistd", "-n"]),
            Program("script", "/bin/twistd"),
        )

    def test_longOptionWithArgument(self) -> None:
        self.assertEqual(
            programOf(["python", "--check-hash-based-pycs", "always", "app.py"]),
            Program("script", "app.py"),
        )

    def test_doubleDash(self) -> None:
        self.assertEqual(
            programOf(["python", "--", "-odd.py"]), Program("script", "-odd.py")
        )

    def test_module(self) -> None:
        self.assertEqual(
            programOf(["python", "-I", "-m", "twisted", "web"]),
            Program("module", "twisted"),
        )
        self.assertEqual(
            programOf(["python", "-mtwisted"]), Program("module", "twisted")
        )

    def test_command(self) -> None:
        self.assertEqual(
            programOf(["python", "-uBc", "print(1)", "x"]),
            Program("command", "print(1)"),
        )

    def test_standardInput(self) -> None:
        """
        A program read from standard input cannot be read again.
        """
        self.assertRaises(ValueError, programOf, ["python", "-"])
        self.assertRaises(ValueError, programOf, ["python", "-u"])
        self.assertRaises(ValueError, programOf, ["python", "-c"])


class CheckProgramTests(SynchronousTestCase):
    """
    L{checkProgram} says why a command line cannot run again.
    """

    def check(
        self, argv: list[str], files: dict[str, int], modules: set[str] = set()
    ) -> Any:
        return checkProgram(
            argv,
            isfile=lambda path: path in files,
            access=lambda path, mode: bool(files.get(path, 0) & mode),
            findSpec=lambda name: object() if name in modules else None,
        )

    def test_fine(self) -> None:
        files = {"/python3": os.X_OK | os.R_OK, "/twistd": os.R_OK}
        self.assertIsNone(self.check(["/python3", "/twistd", "-n"], files))
        self.assertIsNone(self.check(["/python3", "-m", "twisted"], files, {"twisted"}))
        self.assertIsNone(self.check(["/python3", "-c", "pass"], files))

    def test_otherProgram(self) -> None:
        """
        A command line that does not start with a Python interpreter is only
        checked for its executable.
        """
        files = {"/bin/twistd": os.X_OK}
        self.assertIsNone(self.check(["/bin/twistd", "-n", "migrate-host"], files))

    def test_interpreter(self) -> None:
        self.assertIn("does not exist", self.check(["/gone", "x"], {}))
        self.assertIn(
            "not executable", self.check(["/python3", "x"], {"/python3": os.R_OK})
        )

    def test_program(self) -> None:
        files = {"/python3": os.X_OK, "/secret": 0}
        self.assertIn(
            "/twistd does not exist", self.check(["/python3", "/twistd"], files)
        )
        self.assertIn("not readable", self.check(["/python3", "/secret"], files))
        self.assertIn("cannot be found", self.check(["/python3", "-m", "gone"], files))
        self.assertIn("standard input", self.check(["/python3", "-"], files))

    def test_realFiles(self) -> None:
        """
        With the real file system: an interpreter that lost its execute
        permission is found out.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o644)
        self.assertIn("not executable", checkProgram([path, "-c", "pass"]))
        os.chmod(path, 0o755)
        self.assertIsNone(checkProgram([path, "-c", "pass"]))


class CheckDescriptorLimitTests(SynchronousTestCase):
    def test_limit(self) -> None:
        self.assertIsNone(checkDescriptorLimit(100, 100 + DESCRIPTOR_HEADROOM))
        self.assertIn("RLIMIT_NOFILE allows 150", checkDescriptorLimit(100, 150) or "")
        self.assertIsNone(checkDescriptorLimit(10**6, -1))


class DescriptorMarksTests(SynchronousTestCase):
    """
    L{DescriptorMarks} makes exactly the needed descriptors inheritable,
    and nothing else, and undoes it.
    """

    def apply(self, flags: dict[int, bool], keep: list[int], **kwargs: Any) -> Any:
        def getInheritable(fd: int) -> bool:
            if fd not in flags:
                raise OSError(errno.EBADF, "closed")
            return flags[fd]

        kwargs.setdefault("setInheritable", flags.__setitem__)
        return DescriptorMarks.apply(
            keep,
            openDescriptors=lambda: [0, 1, 2, 3, 4, 5, 6, 99],
            getInheritable=getInheritable,
            **kwargs,
        )

    def test_exactlyTheNeeded(self) -> None:
        """
        The kept descriptors become inheritable, a stray one close-on-exec;
        the standard streams and descriptors already right are untouched;
        one that closed meanwhile is skipped.  Undoing puts every flag back.
        """
        original = {0: True, 1: True, 2: False, 3: False, 4: True, 5: False, 6: False}
        flags = dict(original)
        marks = self.apply(flags, [3, 5])
        self.assertEqual(
            flags, {0: True, 1: True, 2: False, 3: True, 4: False, 5: True, 6: False}
        )
        self.assertEqual(marks.strays, [4])
        self.assertEqual(marks.changed, {3: False, 4: True, 5: False})
        marks.undo(setInheritable=flags.__setitem__)
        self.assertEqual(flags, original)

    def test_failureUndoes(self) -> None:
        """
        When a flag cannot be set, those already changed are put back.
        """
        flags = {0: True, 1: True, 2: True, 3: False, 4: True, 5: False, 6: False}

        def setInheritable(fd: int, value: bool) -> None:
            if fd == 5:
                raise OSError(errno.EBADF, "gone")
            flags[fd] = value

        self.assertRaises(
            OSError, self.apply, flags, [3, 5], setInheritable=setInheritable
        )
        self.assertEqual(flags[3], False)
        self.assertEqual(flags[4], True)

    def test_realDescriptors(self) -> None:
        """
        On this process's real descriptors.
        """
        keep, other = os.pipe()
        self.addCleanup(os.close, keep)
        self.addCleanup(os.close, other)
        os.set_inheritable(other, True)
        marks = DescriptorMarks.apply([keep])
        try:
            self.assertTrue(os.get_inheritable(keep))
            self.assertFalse(os.get_inheritable(other))
            self.assertIn(other, marks.strays)
            self.assertEqual([fd for fd in inheritableDescriptors() if fd > 2], [keep])
        finally:
            marks.undo()
        self.assertFalse(os.get_inheritable(keep))
        self.assertTrue(os.get_inheritable(other))


def _socketPair(case: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    case.addCleanup(ours.close)
    case.addCleanup(theirs.close)
    return ours, theirs


class _TurnByTurn:
    """
    Drive a memory reactor one iteration at a time: the calls due now, not
    those they schedule (a real reactor polls first).

    @ivar turns: how many iterations ran calls so far.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.turns = 0

    def turn(self) -> None:
        reactor = self.reactor
        due = [call for call in reactor.calls if call.getTime() <= reactor.seconds()]
        if not due:
            reactor.advance(
                min(call.getTime() for call in reactor.calls) - reactor.seconds()
            )
            return
        self.turns += 1
        for call in due:
            if call.active():
                reactor.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)

    def until(self, d: Deferred[Any]) -> None:
        """
        Run iterations until C{d} fires (at most 1,000).
        """
        for _ in range(1000):
            if d.called:
                return
            self.turn()


class _Harness:
    """
    A host on a memory reactor, with a real listening socket and real
    connections (socketpairs) it does not drive.
    """

    def __init__(self, case: SynchronousTestCase, protocol: type = Counter) -> None:
        self.case = case
        self.reactor = HostReactor()
        self.host = MigrationHost(
            self.reactor,
            Factory.forProtocol(protocol),
            [],
            ReexecStrategy(),
            controlPath=None,
            installSignalHandlers=False,
            successorArgv=["/py", "-c", "pass"],
        )
        self.factory = TrackingFactory("tcp:0", Factory.forProtocol(protocol))
        port = tcp.Port(0, self.factory, interface="127.0.0.1", reactor=self.reactor)
        port.startListening()
        case.addCleanup(port.socket.close)
        self.port = port
        self.host.listeners["tcp:0"] = HostedListener("tcp:0", self.factory, port)
        self.clients: list[socket.socket] = []
        self.executed: list[dict[str, Any]] = []

    def connect(self, factory: TrackingFactory | None = None) -> Any:
        ours, theirs = _socketPair(self.case)
        hosted: Any = (factory or self.factory).buildProtocol(None)  # type: ignore[arg-type]
        transport = unix.Server(ours, hosted, None, None, 1, self.reactor)
        hosted.makeConnection(transport)
        self.clients.append(theirs)
        return hosted

    def migration(self, **kwargs: Any) -> ReexecMigration:
        kwargs.setdefault("preflight", lambda *a, **k: succeed(TrialOutcome(None)))
        kwargs.setdefault("checkArgv", lambda argv: None)
        kwargs.setdefault("execv", self.failingExec)
        # Not the test runner's heap.
        kwargs.setdefault("freezeHeap", lambda: None)
        return ReexecMigration(self.host, lambda line: None, **kwargs)

    def failingExec(self, path: str, argv: list[str], env: dict[str, str]) -> None:
        """
        Record what C{execv} would pass on, then fail as C{execv} can.
        """
        fd = int(env[STATE_FD_VARIABLE])
        document = ReexecState.fromPlain(json.loads(readMemfd(fd, maxBytes=1 << 30)))
        state = document
        precopyFd = state.precopy
        if precopyFd is not None:
            state = mergePrecopy(state, readMemfd(precopyFd, maxBytes=1 << 30))
            # As manifest entries, after those described at the freeze.
            state = evolve(
                state,
                connections=state.connections
                + tuple(
                    InheritedConnection(each.descriptor, each.listener, each.entry())
                    for each in state.precopied
                ),
                precopied=(),
            )
        self.executed.append(
            {
                "document": document,
                "path": path,
                "argv": argv,
                "env": env,
                "state": state,
                "stateFd": fd,
                "precopyFd": precopyFd,
                "inheritable": inheritableDescriptors(),
                "blocked": set(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                "pending": set(signal.sigpending()),
            }
        )
        raise OSError(errno.E2BIG, "Argument list too long")

    def run(self, migration: ReexecMigration) -> Any:
        d = migration.run()
        self.reactor.advance(0)
        return self.case.successResultOf(d)

    def assertServesOn(self, hosted: Any, pending: bytes) -> None:
        """
        As before the migration: the connection reads, and writes with
        C{pending} still to send; the listener accepts.
        """
        case = self.case
        transport = hosted.transport
        case.assertTrue(_reading(self.reactor, hosted))
        case.assertIn(transport, self.reactor.writers)
        case.assertEqual(
            bytes(transport.dataBuffer[transport.offset :])
            + b"".join(transport._tempDataBuffer),
            pending,
        )
        case.assertIn(self.port, self.reactor.readers)


def _reading(reactor: MemoryReactorClock, hosted: Any) -> bool:
    return hosted.transport in reactor.readers


class ReexecMigrationTests(SynchronousTestCase):
    """
    The old image's side: checks, freeze and state document, C{execv}
    failure.
    """

    def test_interface(self) -> None:
        verifyObject(IMigrationStrategy, ReexecStrategy())
        self.assertIn("reexec", strategyNames())
        self.assertIsInstance(strategyNamed("reexec"), ReexecStrategy)

    def test_refusedByChecks(self) -> None:
        """
        A failed check refuses the migration before anything is touched.
        """
        harness = _Harness(self)
        hosted = harness.connect()
        report = harness.run(harness.migration(checkArgv=lambda argv: "no interpreter"))
        self.assertEqual(
            (report.outcome.value, report.reason), ("refused", "no interpreter")
        )
        self.assertTrue(_reading(harness.reactor, hosted))
        self.assertEqual(harness.executed, [])

    def test_refusedByPreflight(self) -> None:
        """
        New code that does not load refuses the migration; the preflight's
        output is in the report.
        """
        harness = _Harness(self)
        report = harness.run(
            harness.migration(
                preflight=lambda *a, **k: succeed(
                    TrialOutcome("it does not start", output=("SyntaxError",))
                )
            )
        )
        self.assertEqual(report.outcome.value, "refused")
        self.assertEqual(report.successorLog, ("SyntaxError",))
        self.assertEqual(harness.executed, [])

    def test_trialSeesEveryState(self) -> None:
        """
        The preflight process is asked to try the new code on a copy of
        every migratable connection's state, within the ready timeout,
        with the host's policy; its cost is in the report.
        """
        harness = _Harness(self)
        harness.host.metrics = HostMetrics(harness.host, harness.reactor.seconds)
        hosted = harness.connect()
        hosted.dataReceived(b"a\nb\n")
        seen: list[Any] = []

        def trial(reactor: Any, argv: Any, cases: Any, **kwargs: Any) -> Any:
            seen.append((argv, cases, kwargs))
            return succeed(
                TrialOutcome(None, tried=len(cases), duration=0.75, restoring=0.25)
            )

        report = harness.run(harness.migration(preflight=trial, trialFailure="close"))
        [(argv, cases, kwargs)] = seen
        self.assertEqual(argv, ["/py", "-c", "pass"])
        self.assertEqual([case.connection for case in cases], [hosted])
        self.assertEqual(cases[0].state["appState"], {"count": 2})
        self.assertEqual(kwargs["env"][PREFLIGHT_VARIABLE], "1")
        self.assertNotIn(STATE_FD_VARIABLE, kwargs["env"])
        self.assertEqual(kwargs["readyMarker"], PREFLIGHT_MARKER)
        self.assertEqual(kwargs["policy"], "close")
        self.assertEqual(kwargs["timeout"], harness.host.settings.readyTimeout)
        self.assertEqual(report.durations["trial"], 0.25)
        self.assertEqual(harness.host.metrics.trialRuns, {("reexec", "passed"): 1})
        self.assertIn(
            "loaded in 500.0 ms and restored 1 connection in 250.0 ms",
            report.notes[0],
        )

    def test_trialRefusalChangesNothing(self) -> None:
        """
        A trial that fails refuses the migration with its reason: nothing
        was frozen, closed or executed; the metrics count a failed trial.
        """
        harness = _Harness(self)
        harness.host.metrics = HostMetrics(harness.host, harness.reactor.seconds)
        hosted = harness.connect()
        report = harness.run(
            harness.migration(
                preflight=lambda *a, **k: succeed(
                    TrialOutcome("the new code refused the connection from x: no")
                )
            )
        )
        self.assertEqual(
            (report.outcome.value, report.reason),
            ("refused", "the new code refused the connection from x: no"),
        )
        self.assertEqual(harness.executed, [])
        self.assertTrue(_reading(harness.reactor, hosted))
        self.assertEqual(harness.host.metrics.trialRuns, {("reexec", "failed"): 1})

    def test_trialCloseClosesBeforeExec(self) -> None:
        """
        With C{--trial-failure close}, a connection the new code failed on
        is closed cleanly before the exec and not described to the new
        image; the others are.
        """
        harness = _Harness(self)
        doomed = harness.connect()
        kept = harness.connect()

        def trial(reactor: Any, argv: Any, cases: Any, **kwargs: Any) -> Any:
            [case] = [case for case in cases if case.connection is doomed]
            return succeed(TrialOutcome(None, closing=((case, "boom"),)))

        d = harness.migration(preflight=trial, trialFailure="close").run()
        harness.reactor.advance(0)
        self.assertTrue(doomed.transport.disconnecting)
        self.assertNoResult(d)
        why = doomed.transport.doWrite()
        doomed.transport.connectionLost(Failure(why))
        harness.reactor.advance(0.01)
        harness.reactor.advance(0)
        report = self.successResultOf(d)
        [executed] = harness.executed
        self.assertEqual(len(executed["state"].connections), 1)
        self.assertEqual(
            executed["state"].connections[0].descriptor, kept.transport.fileno()
        )
        self.assertEqual(report.listeners[0].failed, 1)

    def test_refusedWhileDraining(self) -> None:
        harness = _Harness(self)
        harness.host.draining[1] = {"generation": 1, "pid": 42, "connections": 3}
        self.assertIn("still draining", checkHost(harness.host) or "")

    def test_refusedWhileThreadsWork(self) -> None:
        harness = _Harness(self)

        class Pool:
            working = [object()]

        harness.reactor.threadpool = Pool()  # type: ignore[attr-defined]
        self.assertIn("thread pool", checkHost(harness.host) or "")

    def test_refusedForUnserialisableState(self) -> None:
        """
        A migratable protocol whose state is not plain data refuses the
        re-exec; every connection and the listener go on as before.
        """
        harness = _Harness(self, Unserialisable)
        hosted = harness.connect()
        report = harness.run(harness.migration())
        self.assertEqual(report.outcome.value, "refused")
        self.assertIn("cannot be carried over", report.reason)
        self.assertTrue(_reading(harness.reactor, hosted))
        self.assertIn(harness.port, harness.reactor.readers)

    def test_stateBrokenAfterPlanRollsBack(self) -> None:
        """
        A state that passed the dry run but cannot be captured once the
        clients wait (it changed in between) rolls the re-exec back before
        C{execv}: every connection goes on as it was, its pending output
        intact, and the listener accepts again.
        """
        harness = _Harness(self)
        hosted = harness.connect()
        other = harness.connect()
        other.transport.write(b"pending")
        captures: list[None] = []

        def breakingCapture() -> Any:
            captures.append(None)
            # The trial's copy and the dry run pass.
            if len(captures) > 2:
                return {"count": object()}
            return {"count": 1}

        hosted.wrappedProtocol.getMigrationState = breakingCapture
        report = harness.run(harness.migration())
        self.assertEqual(report.outcome.value, "rolled-back")
        self.assertIn("cannot be carried over", report.reason)
        # The trial's copy, the dry run (the pre-copy), the freeze's
        # comparison with it, and the capture again, which fails.
        self.assertEqual((len(captures), harness.executed), (4, []))
        self.assertTrue(_reading(harness.reactor, hosted))
        harness.assertServesOn(other, b"pending")

    def test_workQueuedAtTheLastMomentRollsBack(self) -> None:
        """
        A call queued for the reactor after the checks (from a thread, or
        by a signal handler: Twisted's stop on C{SIGTERM}) rolls the re-exec
        back rather than being lost to the exec: nothing is executed, the
        connections serve on, the queued call is still there to run.
        """
        harness = _Harness(self)
        hosted = harness.connect()
        hosted.transport.write(b"pending")
        queued: list[object] = []
        harness.reactor.threadCallQueue = queued  # type: ignore[attr-defined]
        capture = hosted.wrappedProtocol.getMigrationState
        captures: list[None] = []

        def stopRequestedMeanwhile() -> Any:
            captures.append(None)
            # After the trial's copy and the dry run: at the freeze.
            if len(captures) > 2:
                queued.append((harness.reactor.stop, (), {}))
            return capture()

        hosted.wrappedProtocol.getMigrationState = stopRequestedMeanwhile
        report = harness.run(harness.migration())
        self.assertEqual(report.outcome.value, "rolled-back")
        self.assertIn("1 calls are queued for the reactor", report.reason)
        self.assertEqual((harness.executed, len(queued)), ([], 1))
        harness.assertServesOn(hosted, b"pending")

    def test_signalDuringCaptureWaits(self) -> None:
        """
        A signal that arrives while the connections are described stays
        pending, blocked, until C{execv} (the new image unblocks it once
        its handlers are installed); when the exec fails it is delivered
        to this image's handler instead.
        """
        import threading

        harness = _Harness(self)
        hosted = harness.connect()
        caught: list[int] = []
        previous = signal.signal(
            signal.SIGUSR1, lambda signum, frame: caught.append(signum)
        )
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        capture = hosted.wrappedProtocol.getMigrationState
        captures: list[None] = []

        def signalledMeanwhile() -> Any:
            captures.append(None)
            # After the trial's copy and the dry run: at the freeze.
            if len(captures) > 2:
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            return capture()

        hosted.wrappedProtocol.getMigrationState = signalledMeanwhile
        report = harness.run(harness.migration())
        (executed,) = harness.executed
        self.assertIn(signal.SIGUSR1, executed["pending"])
        self.assertEqual(report.outcome.value, "rolled-back")
        self.assertEqual(caught, [signal.SIGUSR1])
        self.assertTrue(_reading(harness.reactor, hosted))
        self.assertIn(harness.port, harness.reactor.readers)

    def test_refusedForDescriptorLimit(self) -> None:
        harness = _Harness(self)
        harness.connect()
        report = harness.run(harness.migration(softLimit=lambda: 10))
        self.assertEqual(report.outcome.value, "refused")
        self.assertIn("RLIMIT_NOFILE", report.reason)
        self.assertIn(harness.port, harness.reactor.readers)

    def test_unknownPolicy(self) -> None:
        harness = _Harness(self)
        report = harness.run(harness.migration(unmovable="keep"))
        self.assertEqual(report.outcome.value, "refused")

    def test_precopyChangedStateSentAgain(self) -> None:
        """
        Every connection is copied ahead while the old image serves; at the
        freeze one whose state changed since is described again (and its
        copy superseded), one that did not is not: the new image gets each
        once, with its current state.
        """
        harness = _Harness(self)
        changing = harness.connect()
        idle = harness.connect()
        changing.wrappedProtocol.count = 1
        idle.wrappedProtocol.count = 7

        def change() -> None:
            changing.wrappedProtocol.count = 2

        # Runs after the pre-copy, before the freeze.
        harness.reactor.callLater(0, change)
        harness.run(harness.migration())
        (executed,) = harness.executed
        document = executed["document"]
        self.assertIsNotNone(document.precopy)
        self.assertEqual(
            [each.descriptor for each in document.connections],
            [changing.transport.fileno()],
        )
        self.assertEqual(len(document.superseded), 1)
        entries = {
            each.descriptor: each.entry["state"]["appState"]
            for each in executed["state"].connections
        }
        self.assertEqual(
            entries,
            {
                changing.transport.fileno(): {"count": 2},
                idle.transport.fileno(): {"count": 7},
            },
        )
        # The changed connection comes first: it was active last.
        self.assertEqual(
            executed["state"].connections[0].descriptor, changing.transport.fileno()
        )

    def test_slicesApartByTwoPolls(self) -> None:
        """
        The trial's cases and the pre-copy are described a slice of
        connections at a time, and the reactor polls twice between two
        slices (it reads the requests that arrived during a slice, then
        writes their answers) rather than running the next slice at once.
        """
        from migrate._handoff import _trial
        from migrate.strategies._reexec import _outgoing

        self.patch(_outgoing, "PRECOPY_SLICE", 1)
        harness = _Harness(self)
        for _ in range(3):
            harness.connect()
        driver = _TurnByTurn(harness.reactor)
        casesAt: list[int] = []
        copiesAt: list[int] = []

        def casesFrom(*args: Any, **kwargs: Any) -> Any:
            casesAt.append(driver.turns)
            return _trial.casesFrom(*args, **kwargs)

        self.patch(_outgoing, "casesFrom", casesFrom)
        copyOne = ReexecMigration._copyOne

        def copying(self: ReexecMigration, *args: Any) -> Any:
            copiesAt.append(driver.turns)
            return copyOne(self, *args)

        self.patch(ReexecMigration, "_copyOne", copying)
        d = harness.migration().run()
        driver.until(d)
        self.successResultOf(d)
        self.assertEqual(len(casesAt), 3)
        self.assertEqual(len(copiesAt), 3)
        for at in (casesAt, copiesAt):
            self.assertTrue(
                all(later - earlier >= 3 for earlier, later in zip(at, at[1:])),
                at,
            )

    def _handOverSteps(self, harness: _Harness) -> tuple[_TurnByTurn, dict[str, Any]]:
        """
        Record the reactor iteration in which the pre-copy copies its last
        connection, writes, the safe points are asked, and the plan made.
        """
        from migrate.strategies._reexec import _outgoing

        driver = _TurnByTurn(harness.reactor)
        at: dict[str, Any] = {}
        copyOne = ReexecMigration._copyOne
        write = Precopy.write
        plan = ReexecMigration._plan
        safePoints = _outgoing.atSafePoints

        def copying(self: ReexecMigration, *args: Any) -> Any:
            at["copy"] = driver.turns
            return copyOne(self, *args)

        def writing(self: Precopy) -> Any:
            at["write"] = driver.turns
            return write(self)

        def planning(self: ReexecMigration, *args: Any, **kwargs: Any) -> Any:
            at["plan"] = driver.turns
            at["planned"] = result = plan(self, *args, **kwargs)
            return result

        def asking(*args: Any, **kwargs: Any) -> Any:
            at["safepoints"] = driver.turns
            d = safePoints(*args, **kwargs)

            def waited(result: Any) -> Any:
                at["waited"] = driver.turns
                at["result"] = result
                return result

            return d.addCallback(waited)

        self.patch(ReexecMigration, "_copyOne", copying)
        self.patch(Precopy, "write", writing)
        self.patch(ReexecMigration, "_plan", planning)
        self.patch(_outgoing, "atSafePoints", asking)
        return driver, at

    def test_handOverStepsApartByTwoPolls(self) -> None:
        """
        The pre-copy's last slice, its write, the wait for the safe points
        and the plan each run in a reactor step of their own, the reactor
        polling twice in between, rather than all in one step.
        """
        harness = _Harness(self)
        for _ in range(3):
            harness.connect()
        driver, at = self._handOverSteps(harness)
        d = harness.migration().run()
        driver.until(d)
        self.successResultOf(d)
        order = [at["copy"], at["write"], at["safepoints"], at["plan"]]
        self.assertTrue(
            all(later - earlier >= 3 for earlier, later in zip(order, order[1:])),
            order,
        )
        self.assertEqual(at["planned"].moving, 3)
        self.assertEqual(len(harness.executed[0]["state"].connections), 3)

    def test_openedAfterPrecopyMoves(self) -> None:
        """
        A connection accepted between the pre-copy and the safe points is
        planned and described at the freeze, with the copied ones.
        """
        harness = _Harness(self)
        copied = harness.connect()
        driver, at = self._handOverSteps(harness)
        late: list[Any] = []
        write = Precopy.write

        def writing(precopy: Precopy) -> Any:
            harness.reactor.callLater(0, lambda: late.append(harness.connect()))
            return write(precopy)

        self.patch(Precopy, "write", writing)
        d = harness.migration().run()
        driver.until(d)
        self.successResultOf(d)
        [opened] = late
        self.assertLess(at["copy"], at["safepoints"])
        self.assertEqual(at["planned"].moving, 2)
        [executed] = harness.executed
        self.assertEqual(
            sorted(each.descriptor for each in executed["state"].connections),
            sorted([copied.transport.fileno(), opened.transport.fileno()]),
        )

    def test_closedBeforePlanNotPlanned(self) -> None:
        """
        A connection that ends between the safe points and the plan is
        neither planned nor described at the freeze.
        """
        harness = _Harness(self)
        kept = harness.connect()
        gone = harness.connect()
        driver, at = self._handOverSteps(harness)
        from migrate.strategies._reexec import _outgoing

        asking = _outgoing.atSafePoints

        def closing(*args: Any, **kwargs: Any) -> Any:
            def end(result: Any) -> Any:
                harness.reactor.callLater(
                    0, gone.transport.connectionLost, Failure(ConnectionDone())
                )
                return result

            return asking(*args, **kwargs).addCallback(end)

        self.patch(_outgoing, "atSafePoints", closing)
        d = harness.migration().run()
        driver.until(d)
        self.successResultOf(d)
        self.assertEqual(at["planned"].moving, 1)
        self.assertEqual(at["planned"].closing, [])
        [executed] = harness.executed
        self.assertEqual(
            [each.descriptor for each in executed["state"].connections],
            [kept.transport.fileno()],
        )

    def test_missedSafePointPlannedAtOnce(self) -> None:
        """
        When a connection missed its safe point (it is not held there), the
        plan follows the wait's end in the same step: a connection that
        reaches its safe point just after is still closed politely, not
        planned to move unheld (it could leave its safe point again before
        the freeze).
        """
        harness = _Harness(self, protocol=Blocking)
        harness.host.settings = evolve(harness.host.settings, safePointTimeout=0.05)
        busy = harness.connect()
        busy.wrappedProtocol.busy = True
        driver, at = self._handOverSteps(harness)
        from migrate.strategies._reexec import _outgoing

        asking = _outgoing.atSafePoints

        def freeing(*args: Any, **kwargs: Any) -> Any:
            def free(result: Any) -> Any:
                harness.reactor.callLater(
                    0, setattr, busy.wrappedProtocol, "busy", False
                )
                return result

            return asking(*args, **kwargs).addCallback(free)

        self.patch(_outgoing, "atSafePoints", freeing)
        d = harness.migration().run()
        driver.until(d)
        self.assertEqual(at["result"].missed, 1)
        self.assertEqual(at["plan"], at["waited"])
        self.assertEqual(at["planned"].moving, 0)
        self.assertEqual([hosted for key, hosted, why in at["planned"].closing], [busy])
        self.assertTrue(busy.transport.disconnecting)

    def test_precopySliceTimeLimit(self) -> None:
        """
        A pre-copy slice ends once it has run C{PRECOPY_SLICE_SECONDS}, even
        short of C{PRECOPY_SLICE} connections, after one connection at
        least; every connection is still copied ahead.
        """
        from migrate.strategies._reexec import _outgoing

        harness = _Harness(self)
        for _ in range(5):
            harness.connect()
        driver = _TurnByTurn(harness.reactor)
        copiesAt: list[int] = []
        copyOne = ReexecMigration._copyOne
        step = [0.0]

        def copying(self: ReexecMigration, *args: Any) -> Any:
            copiesAt.append(driver.turns)
            # Each copy takes this long on the reactor's clock.
            harness.reactor.rightNow += step[0]
            return copyOne(self, *args)

        self.patch(ReexecMigration, "_copyOne", copying)
        self.patch(_outgoing, "PRECOPY_SLICE_SECONDS", 0.004)
        # Two copies a slice (the second reaches the limit), then one a
        # slice when each takes longer than the limit.
        step[0] = 0.002
        d = harness.migration().run()
        driver.until(d)
        self.successResultOf(d)
        self.assertEqual(len(copiesAt), 5)
        self.assertEqual(len(set(copiesAt)), 3, copiesAt)
        [executed] = harness.executed
        self.assertIsNotNone(executed["precopyFd"])
        self.assertEqual(len(executed["state"].connections), 5)
        del copiesAt[:]
        del harness.executed[:]
        step[0] = 0.01
        d = harness.migration().run()
        driver.until(d)
        self.successResultOf(d)
        self.assertEqual(len(set(copiesAt)), 5, copiesAt)
        self.assertEqual(len(harness.executed[0]["state"].connections), 5)

    def test_precopyFreezesWhatItMade(self) -> None:
        """
        After each slice of the trial's cases and of the pre-copy, what was
        made is left out of collections (L{freezeNewObjects}: while the
        host holds the heap frozen).
        """
        from migrate.strategies._reexec import _outgoing

        self.patch(_outgoing, "PRECOPY_SLICE", 2)
        harness = _Harness(self)
        for _ in range(3):
            harness.connect()
        freezes: list[int] = []
        copies = [0]
        copyOne = ReexecMigration._copyOne

        def copying(self: ReexecMigration, *args: Any) -> Any:
            copies[0] += 1
            return copyOne(self, *args)

        def freezeNewObjects() -> bool:
            freezes.append(copies[0])
            return True

        self.patch(ReexecMigration, "_copyOne", copying)
        self.patch(_outgoing, "freezeNewObjects", freezeNewObjects)
        harness.run(harness.migration())
        # After each of the two slices of cases (no copy yet), then after
        # each of the two slices of copies.
        self.assertEqual(freezes, [0, 0, 2, 3])

    def test_dataBetweenCopyAndFreezeNotLost(self) -> None:
        """
        A connection that receives data between the pre-copy and the freeze
        travels with the state and the buffered input it has at the freeze,
        and with its output, not with its copy.
        """
        harness = _Harness(self)
        busy = harness.connect()
        busy.wrappedProtocol.count = 5
        harness.reactor.callLater(0, busy.dataReceived, b"one\npart")
        harness.run(harness.migration())
        (executed,) = harness.executed
        [entry] = [
            each.entry
            for each in executed["state"].connections
            if each.descriptor == busy.transport.fileno()
        ]
        self.assertEqual(entry["state"]["appState"], {"count": 6})
        self.assertEqual(
            base64.b64decode(entry["state"]["buffers"]["LineReceiver"]["buffer"]),
            b"part",
        )
        self.assertEqual(base64.b64decode(entry["output"]), b"one 6\n")

    def test_stateDocumentAndInheritedDescriptors(self) -> None:
        """
        What C{execv} gets: the same command line, the state descriptor in
        the environment, a document naming the listener and every
        connection with its state and pending output, exactly those
        descriptors (and the standard streams) inheritable, a stray
        inheritable descriptor made close-on-exec, and the signals blocked.
        """
        harness = _Harness(self)
        first = harness.connect()
        second = harness.connect()
        first.wrappedProtocol.count = 3
        first.transport.write(b"unsent")
        second.dataReceived(b"hal")
        stray, strayOther = os.pipe()
        self.addCleanup(os.close, stray)
        self.addCleanup(os.close, strayOther)
        os.set_inheritable(stray, True)
        harness.host.generation = 7

        harness.run(harness.migration())
        (executed,) = harness.executed
        self.assertEqual(executed["argv"], ["/py", "-c", "pass"])
        self.assertIn(EXEC_AT_VARIABLE, executed["env"])
        state = executed["state"]
        self.assertEqual(
            (state.generation, state.pid, state.strategy), (7, os.getpid(), "reexec")
        )
        self.assertEqual(state.listeners, {"tcp:0": harness.port.fileno()})
        self.assertIsNone(state.control)
        entries = {each.descriptor: each for each in state.connections}
        self.assertEqual(
            set(entries), {first.transport.fileno(), second.transport.fileno()}
        )
        firstEntry = entries[first.transport.fileno()].entry
        self.assertEqual(firstEntry["state"]["appState"], {"count": 3})
        self.assertEqual(base64.b64decode(firstEntry["output"]), b"unsent")
        self.assertFalse(entries[first.transport.fileno()].fresh)
        self.assertEqual(
            executed["inheritable"],
            sorted(
                [
                    0,
                    1,
                    2,
                    executed["stateFd"],
                    executed["precopyFd"],
                    harness.port.fileno(),
                ]
                + list(entries)
            ),
        )
        self.assertLessEqual(set(REEXEC_SIGNALS), executed["blocked"])

    def test_execvFailureRollsBack(self) -> None:
        """
        When C{execv} fails the old image resumes everything as if nothing
        happened: connections read again with their output still pending,
        the listener accepts, the inheritance flags and the signal mask are
        as before, the state file is closed, and the report says rolled
        back and why.
        """
        harness = _Harness(self)
        hosted = harness.connect()
        hosted.transport.write(b"pending")
        stray, strayOther = os.pipe()
        self.addCleanup(os.close, stray)
        self.addCleanup(os.close, strayOther)
        os.set_inheritable(stray, True)
        inheritableBefore = inheritableDescriptors()
        maskBefore = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        descriptorsBefore = sorted(os.listdir("/proc/self/fd"))

        report = harness.run(harness.migration())
        self.assertEqual(report.outcome.value, "rolled-back")
        self.assertIn("execv failed", report.reason)
        self.assertIn("Argument list too long", report.reason)
        self.assertEqual(len(harness.executed), 1)
        harness.assertServesOn(hosted, b"pending")
        self.assertEqual(inheritableDescriptors(), inheritableBefore)
        self.assertEqual(signal.pthread_sigmask(signal.SIG_BLOCK, []), maskBefore)
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), descriptorsBefore)
        self.assertIs(harness.host.phase, MigrationPhase.rollingBack)

    def test_closePolicy(self) -> None:
        """
        By default a connection whose protocol is not migratable is closed
        cleanly before the exec, counted as failed, and not in the
        document.
        """
        harness = _Harness(self)
        plainFactory = TrackingFactory("tcp:0", Factory.forProtocol(Plain))
        harness.host.listeners["tcp:0"].factory = plainFactory
        plain = harness.connect(plainFactory)
        migration = harness.migration()
        d = migration.run()
        harness.reactor.advance(0)
        self.assertTrue(plain.transport.disconnecting)
        self.assertNoResult(d)
        # What the reactor does next: write the output, then close.
        why = plain.transport.doWrite()
        self.assertIsNotNone(why)
        plain.transport.connectionLost(Failure(why))
        self.assertEqual(harness.clients[-1].recv(100), b"hello\n")
        harness.reactor.advance(0.01)
        harness.reactor.advance(0)
        report = self.successResultOf(d)
        (executed,) = harness.executed
        self.assertEqual(executed["state"].connections, ())
        self.assertEqual(executed["state"].closed, {"tcp:0": 1})
        self.assertEqual(report.listeners[0].failed, 1)

    def test_closeDeadline(self) -> None:
        """
        A connection that does not finish closing by the deadline is left
        for C{exec} to close, and the report says so.
        """
        harness = _Harness(self)
        plainFactory = TrackingFactory("tcp:0", Factory.forProtocol(Plain))
        harness.host.listeners["tcp:0"].factory = plainFactory
        harness.connect(plainFactory)
        d = harness.migration(closeTimeout=1.0).run()
        harness.reactor.advance(0)
        self.assertNoResult(d)
        harness.reactor.pump([0.005] * 250)
        report = self.successResultOf(d)
        self.assertIn("did not finish writing within 1.0 s", " ".join(report.notes))
        self.assertEqual(harness.executed[0]["state"].connections, ())

    def test_adoptPolicy(self) -> None:
        """
        With C{adopt}, such a connection is in the document, to be handed
        to a fresh protocol, with the input its protocol had buffered.
        """
        harness = _Harness(self)
        plainFactory = TrackingFactory("tcp:0", Factory.forProtocol(Plain))
        harness.host.listeners["tcp:0"].factory = plainFactory
        plain = harness.connect(plainFactory)
        plain.dataReceived(b"half")
        report = harness.run(harness.migration(unmovable="adopt"))
        self.assertEqual(report.outcome.value, "rolled-back")
        (entry,) = harness.executed[0]["state"].connections
        self.assertTrue(entry.fresh)
        self.assertFalse(entry.entry["state"]["migratable"])
        restored = ProtocolState.fromPlain(entry.entry["state"])
        self.assertIn(b"half", [each["buffer"] for each in restored.buffers.values()])


class StateDocumentTests(SynchronousTestCase):
    """
    The state document survives the trip through a memory file, and a
    document this code cannot read is refused clearly.
    """

    def state(self) -> ReexecState:
        return ReexecState(
            pid=123,
            generation=4,
            strategy="reexec",
            listeners={"tcp:8000": 5, "unix:/s": 6},
            control=7,
            connections=(
                InheritedConnection(
                    8,
                    "tcp:8000",
                    {"id": 1, "listener": "tcp:8000", "state": {}, "output": ""},
                ),
                InheritedConnection(
                    9,
                    "unix:/s",
                    {"id": 2, "listener": "unix:/s", "state": {}, "output": "eA=="},
                    fresh=True,
                    closing=True,
                ),
            ),
            closed={"tcp:8000": 2},
            durations={"capture": 0.25},
            notes=("a note",),
            frozenAt=12.5,
            blockedSignals=(1, 15),
        )

    def test_roundTrip(self) -> None:
        state = self.state()
        fd = writeState(state)
        self.assertTrue(os.get_inheritable(fd))
        self.assertEqual(readState(fd), state)
        self.assertRaises(OSError, os.fstat, fd)

    def test_unvalidatedRoundTrip(self) -> None:
        """
        Written without the codec's walk (as while clients wait), the
        document reads back the same, and what is not plain data is still
        refused.
        """
        state = self.state()
        self.assertEqual(readState(writeState(state, validate=False)), state)
        broken = ReexecState(pid=1, generation=1, strategy="reexec", notes=(object(),))  # type: ignore[arg-type]
        self.assertRaises(StateError, writeState, broken, validate=False)
        self.assertRaises(StateError, writeState, broken)

    def test_descriptors(self) -> None:
        self.assertEqual(sorted(self.state().descriptors()), [5, 6, 7, 8, 9])

    def test_refused(self) -> None:
        plain = self.state().toPlain()
        changes: list[tuple[dict[str, Any], str]] = [
            ({"format": FORMAT_VERSION + 1}, "newer"),
            ({"generation": "4"}, "generation"),
            ({"listeners": [{"key": "a", "fd": 2}]}, "fd"),
            ({"listeners": [{"key": "a", "fd": 5}, {"key": "a", "fd": 6}]}, "twice"),
            ({"control": {"fd": 8}}, "twice"),
            ({"connections": [{"listener": "x"}]}, "fd"),
            ({"frozenAt": "soon"}, "frozenAt"),
        ]
        for change, message in changes:
            broken = dict(plain, **change)
            error = self.assertRaises(StateError, ReexecState.fromPlain, broken)
            self.assertIn(message, str(error))
        self.assertRaises(StateError, ReexecState.fromPlain, [])


class PrecopyTests(SynchronousTestCase):
    """
    The compact pre-copy: written by L{Precopy}, read back strictly by
    L{mergePrecopy}, after the connections described at the freeze.
    """

    def precopy(self, rows: list[Any]) -> bytes:
        precopy = Precopy()
        precopy.add(rows)
        fd = precopy.write()
        try:
            return readMemfd(fd, maxBytes=1 << 20)
        finally:
            os.close(fd)

    def state(self, **kwargs: Any) -> ReexecState:
        return ReexecState(pid=1, generation=1, strategy="reexec", precopy=20, **kwargs)

    def test_roundTrip(self) -> None:
        """
        Each connection comes back with its state (buffers decoded) and
        addresses; a superseded one does not; those described at the
        freeze stay first.
        """
        first = Counter()
        first.count = 3
        first.dataReceived(b"par")
        second = Counter()
        second.count = 4
        firstState = captureProtocolState(first)
        data = self.precopy(
            [
                (1, 10, "tcp:0", 2, firstState, ["1.2.3.4", 5], ["5.6.7.8", 9]),
                (2, 11, "tcp:0", 2, captureProtocolState(second), None, None),
            ]
        )
        frozen = InheritedConnection(12, "tcp:0", {"id": 3})
        merged = mergePrecopy(self.state(connections=(frozen,)), data)
        self.assertEqual(merged.connections, (frozen,))
        self.assertIsNone(merged.precopy)
        self.assertEqual(
            [(each.ident, each.descriptor, each.peer) for each in merged.precopied],
            [(1, 10, ["1.2.3.4", 5]), (2, 11, None)],
        )
        self.assertEqual(merged.precopied[0].state, firstState)
        self.assertEqual(
            merged.precopied[0].state.buffers["LineReceiver"]["buffer"], b"par"
        )
        superseded = mergePrecopy(self.state(superseded=(1,)), data)
        self.assertEqual([each.ident for each in superseded.precopied], [2])

    def test_refused(self) -> None:
        """
        A malformed pre-copy, one naming a connection or a descriptor twice,
        or holding a non-finite number, is refused.
        """
        counter = Counter()
        counter.count = 0
        state = captureProtocolState(counter)
        good = self.precopy([(1, 10, "tcp:0", 2, state, None, None)])
        document = json.loads(good)
        row = document["connections"][0]
        broken: list[tuple[Any, str]] = [
            (dict(document, connections=[row[:6]]), "malformed"),
            (dict(document, connections=[[1, 2] + row[2:]]), "malformed"),
            (dict(document, connections=[row[:2] + [5] + row[3:]]), "malformed"),
            (dict(document, connections=[row, row]), "twice"),
            (
                dict(document, connections=[row[:4] + [[["%%", True]]] + row[5:]]),
                "base64",
            ),
            (dict(document, connections=[row[:4] + [[]] + row[5:]]), "buffers"),
            (
                dict(document, shapes=[dict(document["shapes"][0], listener=1)]),
                "listener",
            ),
        ]
        for each, message in broken:
            error = self.assertRaises(
                StateError,
                mergePrecopy,
                self.state(),
                json.dumps(each).encode(),
            )
            self.assertIn(message, str(error))
        self.assertRaises(
            StateError,
            mergePrecopy,
            self.state(connections=(InheritedConnection(10, "tcp:0", {"id": 7}),)),
            good,
        )
        self.assertRaises(
            StateError,
            mergePrecopy,
            self.state(),
            good.replace(b'"count":0', b'"count":NaN'),
        )


class AfterPollsTests(TestCase):
    """
    L{afterPolls} lets the real reactor read and answer before the freeze.
    """

    def test_answeredBeforeFreeze(self) -> Any:
        """
        A request that arrived while the reactor was busy (as during the
        plan, which runs from an I/O event) is read and answered (written
        out) once two polls are over; one poll would only have queued the
        answer.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import Protocol
        from twisted.protocols.wire import Echo

        def serve(protocol: Protocol) -> socket.socket:
            server, client = socket.socketpair()
            self.addCleanup(client.close)
            transport = reactor.adoptStreamConnection(  # type: ignore[attr-defined]
                server.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: protocol)
            )
            server.close()
            self.addCleanup(transport.loseConnection)
            client.setblocking(False)
            return client

        echoed = serve(Echo())
        done: Deferred[bytes] = Deferred()

        class Busy(Protocol):
            def dataReceived(self, data: bytes) -> None:
                echoed.sendall(b"ping")
                d = afterPolls(reactor, 2)
                d.addCallback(lambda _: echoed.recv(16))
                d.chainDeferred(done)

        serve(Busy()).sendall(b"go")
        done.addCallback(self.assertEqual, b"ping")
        return done


class _NeverRuns:
    """
    A migration that records nothing and never ends.
    """

    def run(self) -> Deferred[Any]:
        return Deferred()


class OptionsTests(SynchronousTestCase):
    """
    C{--reexec-unmovable} reaches the host's strategy options.
    """

    def test_policy(self) -> None:
        from twisted.python import usage

        from migrate.tap import Options, buildHost

        options = Options()
        options.parseOptions(["--reexec-unmovable", "adopt", "--control", "c.sock"])
        self.assertEqual(options["reexec-unmovable"], "adopt")
        host = buildHost(HostReactor(), options)
        self.assertEqual(
            host.settings.strategyOptions,
            {
                "reexec-unmovable": "adopt",
                "reexec-caretaker": "fork",
                "trial-failure": "refuse",
            },
        )
        default = Options()
        default.parseOptions(["--control", "c.sock"])
        self.assertEqual(default["reexec-unmovable"], "close")
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--reexec-unmovable", "keep"]
        )

    def test_caretakerPolicy(self) -> None:
        """
        C{--reexec-caretaker} is C{fork} (the default) or C{none}; the
        strategy asks for a caretaker unless it is C{none}.
        """
        from twisted.python import usage

        from migrate.tap import Options, buildHost

        options = Options()
        options.parseOptions(["--reexec-caretaker", "none", "--control", "c.sock"])
        host = buildHost(HostReactor(), options)
        self.assertEqual(host.settings.strategyOptions["reexec-caretaker"], "none")
        made = []

        def migration(**kwargs: Any) -> Any:
            made.append(kwargs["caretaker"])
            return _NeverRuns()

        ReexecStrategy(migration).migrate(host, lambda line: None)
        default = Options()
        default.parseOptions(["--control", "c.sock"])
        ReexecStrategy(migration).migrate(
            buildHost(HostReactor(), default), lambda line: None
        )
        self.assertEqual(made, [False, True])
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--reexec-caretaker", "thread"]
        )


class IncomingTests(SynchronousTestCase):
    """
    The new image finds its inheritance and keeps twistd from redoing what
    the process did already.
    """

    def test_notReexecuted(self) -> None:
        self.assertIsNone(inheritedReexec({}))

    def test_found(self) -> None:
        fd = writeState(StateDocumentTests.state(self))  # type: ignore[arg-type]
        environ = {STATE_FD_VARIABLE: str(fd), EXEC_AT_VARIABLE: "10.5", "OTHER": "1"}
        inheritance = inheritedReexec(environ)
        assert inheritance is not None
        self.assertEqual(inheritance.state.generation, 4)
        self.assertEqual(inheritance.execAt, 10.5)
        self.assertEqual(environ, {"OTHER": "1"})

    def test_unreadable(self) -> None:
        """
        An unreadable document costs the inherited descriptors (closed) but
        not the service: the host starts afresh.
        """
        a, b = os.pipe()
        self.addCleanup(os.close, b)
        memfd = os.memfd_create("bad")
        os.write(memfd, b"{not json")
        environ = {STATE_FD_VARIABLE: str(memfd)}
        self.assertIsNone(inheritedReexec(environ, inherited=lambda: [a]))
        self.assertRaises(OSError, os.fstat, a)
        self.assertRaises(OSError, os.fstat, memfd)
        self.assertEqual(environ, {})
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_adjustTwistdOptions(self) -> None:
        """
        A re-executed image does not check or write the pidfile through
        twistd, nor daemonise, change root or directory, or switch user
        again; a daemon keeps logging to twistd.log.
        """
        parent = {
            "pidfile": "twistd.pid",
            "nodaemon": False,
            "logfile": None,
            "syslog": False,
            "chroot": "/jail",
            "uid": 1000,
            "gid": 1000,
            "rundir": "/srv",
        }
        adjustTwistdOptions(parent, {STATE_FD_VARIABLE: "9"})
        self.assertEqual(
            parent,
            {
                "pidfile": "",
                "nodaemon": True,
                "logfile": "twistd.log",
                "syslog": False,
                "chroot": None,
                "uid": None,
                "gid": None,
                "rundir": ".",
            },
        )
        parent = {"pidfile": "twistd.pid", "nodaemon": False}
        adjustTwistdOptions(parent, {PREFLIGHT_VARIABLE: "1"})
        self.assertEqual(parent, {"pidfile": "", "nodaemon": False})
        adjustTwistdOptions(parent, {})
        parent = {"pidfile": "twistd.pid"}
        adjustTwistdOptions(parent, {})
        self.assertEqual(parent, {"pidfile": "twistd.pid"})

    def test_finishPreflight(self) -> None:
        out = io.StringIO()
        finishPreflight({}, out)
        self.assertEqual(out.getvalue(), "")
        error = self.assertRaises(
            SystemExit, finishPreflight, {PREFLIGHT_VARIABLE: "1"}, out
        )
        self.assertEqual(error.code, 0)
        self.assertEqual(out.getvalue(), PREFLIGHT_MARKER + "\n")

    def test_preflightOpensTheLogFile(self) -> None:
        """
        The preflight opens the log file the new image will open, as
        twistd does (creating it), and fails, saying why, if it cannot:
        the new image would exit before restoring anything.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "host.log")

        def preflight() -> tuple[object, str]:
            out = io.StringIO()
            error = self.assertRaises(
                SystemExit,
                finishPreflight,
                {PREFLIGHT_VARIABLE: "1"},
                out,
                twistdOptions={"logfile": path, "nodaemon": True},
            )
            return error.code, out.getvalue()

        self.assertEqual(preflight(), (0, PREFLIGHT_MARKER + "\n"))
        self.assertTrue(os.path.isfile(path))
        os.unlink(path)
        os.mkdir(path)
        code, output = preflight()
        self.assertEqual(code, 1)
        self.assertIn("could not open its log file " + path, output)
        self.assertNotIn(PREFLIGHT_MARKER, output)

    def test_logFileAfterExec(self) -> None:
        """
        The new image logs where the old one did; a daemon that logged to
        C{twistd.log} by default keeps it (the new image does not
        daemonise); standard output and syslog are no file.
        """
        cases: list[tuple[dict[str, Any], str | None]] = [
            ({"logfile": "x.log", "nodaemon": True}, "x.log"),
            ({"logfile": "x.log", "nodaemon": False}, "x.log"),
            ({"logfile": None, "nodaemon": False}, "twistd.log"),
            ({"logfile": None, "nodaemon": True}, None),
            ({"logfile": "-", "nodaemon": True}, None),
            ({"logfile": None, "nodaemon": False, "syslog": True}, None),
            ({}, None),
        ]
        for options, expected in cases:
            self.assertEqual(logFileAfterExec(options), expected, options)


class SignalTests(SynchronousTestCase):
    """
    The signals the old image blocked across the exec are unblocked once
    the new image's reactor runs (its handlers installed), not before.
    """

    def setUp(self) -> None:
        # restoreReexec keeps the collector off until every socket is
        # adopted, which a test's fake reactor never finishes: the next
        # test must find it as this one did.
        if gc.isenabled():
            self.addCleanup(gc.enable)

    def test_unblockedWhenRunning(self) -> None:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        self.addCleanup(signal.pthread_sigmask, signal.SIG_SETMASK, before)
        reactor = HostReactor()
        state = ReexecState(
            pid=os.getpid(),
            generation=1,
            strategy="reexec",
            blockedSignals=(int(signal.SIGUSR1),),
        )
        host = MigrationHost(
            reactor,
            Factory.forProtocol(Counter),
            [],
            ReexecStrategy(),
            controlPath=None,
            installSignalHandlers=False,
            inheritance=ReexecInheritance(state, 0.0),
        )
        report = restoreReexec(host, host.inheritance)
        self.assertEqual((report.toGeneration, host.generation), (2, 2))
        self.assertIn(signal.SIGUSR1, signal.pthread_sigmask(signal.SIG_BLOCK, []))
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
        self.assertNotIn(signal.SIGUSR1, signal.pthread_sigmask(signal.SIG_BLOCK, []))


@implementer(IMigratable)
class Refusing(Counter):
    def restoreMigrationState(self, state: Any) -> None:
        raise ValueError("refused")


class _Restored:
    """
    A restored connection as L{_waitingFirst} sees one (an
    L{AdoptedConnection}): its transport, and no work of its own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.transport = sock

    def hasWork(self) -> bool:
        return False


class WaitingFirstTests(SynchronousTestCase):
    """
    L{_waitingFirst}: the order in which the new image serves the
    connections it restored at once.
    """

    def test_waitingFirst(self) -> None:
        """
        The connections whose clients sent while the process re-executed
        come first, each with its own inherited record, then the others
        in the order given.
        """
        pairs = [socket.socketpair() for _ in range(3)]
        for ours, theirs in pairs:
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
        pairs[2][1].sendall(b"waiting\n")
        adopted: Any = [
            (_Restored(ours), InheritedConnection(n, "tcp:0", {"id": n}))
            for n, (ours, _) in enumerate(pairs)
        ]
        self.assertEqual(
            [
                (each.descriptor, connection.transport)
                for connection, each in _waitingFirst(adopted)
            ],
            [(2, pairs[2][0]), (0, pairs[0][0]), (1, pairs[1][0])],
        )


class RestoreTests(TestCase):
    """
    L{restoreReexec} on the real reactor with real sockets: the new image
    adopts the listener and the connections before it serves.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        # See SignalTests.setUp.
        if gc.isenabled():
            self.addCleanup(gc.enable)

    def connection(self) -> tuple[int, socket.socket]:
        ours, theirs = socket.socketpair()
        theirs.settimeout(5)
        self.addCleanup(theirs.close)
        return ours.detach(), theirs

    @inlineCallbacks
    def test_restore(self) -> Any:
        """
        A restored connection serves its state on the new code, with the
        old output first; one the new code refuses is closed cleanly after
        its pending output and counted as failed; a fresh one is told
        connectionMade; the listener accepts; the report and the generation
        are the host's.
        """
        from twisted.internet.task import deferLater

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        address = listening.getsockname()
        old = Counter()
        old.count = 41
        goodFd, good = self.connection()
        badFd, bad = self.connection()
        freshFd, fresh = self.connection()

        def entry(ident: int, protocol: Any, output: bytes) -> dict[str, Any]:
            return {
                "id": ident,
                "listener": "tcp:0",
                "state": captureProtocolState(protocol).toPlain(),
                "output": base64.b64encode(output).decode(),
            }

        refused = Counter()
        refused.count = 1
        plain = Plain()
        state = ReexecState(
            pid=os.getpid(),
            generation=3,
            strategy="reexec",
            listeners={"tcp:0": listening.detach()},
            connections=(
                InheritedConnection(goodFd, "tcp:0", entry(1, old, b"old\n")),
                InheritedConnection(badFd, "tcp:0", entry(2, refused, b"bye\n")),
                InheritedConnection(freshFd, "tcp:0", entry(3, plain, b""), fresh=True),
            ),
            closed={"tcp:0": 1},
            frozenAt=1.0,
        )

        class Factory2(Factory):
            def buildProtocol(self, addr: Any) -> Any:
                built = self.count = getattr(self, "count", 0) + 1
                return [Counter, Refusing, Plain][built - 1]()

        host = MigrationHost(
            self.reactor,
            Factory2(),
            ["tcp:0"],
            ReexecStrategy(),
            controlPath=None,
            installSignalHandlers=False,
            inheritance=ReexecInheritance(state, 2.0, 1.5),
        )
        report = restoreReexec(host, host.inheritance)
        port: Any = host.listeners["tcp:0"].port
        self.addCleanup(port.stopListening)
        self.assertEqual(
            (host.generation, host.serving, host.lastReport), (4, True, report)
        )
        self.assertEqual(
            (report.outcome.value, report.fromGeneration, report.toGeneration),
            ("success", 3, 4),
        )
        self.assertEqual(
            (report.listeners[0].moved, report.listeners[0].failed), (2, 2)
        )
        # The capture runs from the freeze to execv (state written); the
        # phases add up to what the clients waited.
        durations = report.durations
        self.assertEqual(durations["capture"], 0.5)
        self.assertAlmostEqual(
            durations["capture"] + durations["exec"] + durations["restore"],
            durations["suspension"],
        )

        good.sendall(b"x\n")
        bad.sendall(b"y\n")
        deadline = self.reactor.seconds() + 10
        for client, expected in [
            (good, b"old\nx 42\n"),
            (bad, b"bye\n"),
            (fresh, b"hello\n"),
        ]:
            received = b""
            while len(received) < len(expected):
                self.assertLess(
                    self.reactor.seconds(), deadline, "only {!r}".format(received)
                )
                chunk = yield deferLater(self.reactor, 0.01, _receive, client)
                if chunk == b"":
                    break
                received += chunk or b""
            self.assertEqual(received, expected)
        # The refused connection ends cleanly (FIN, read as b""), and no
        # more bytes come first: read until the end, within the deadline.
        rest = b""
        while True:
            self.assertLess(
                self.reactor.seconds(), deadline, "no end after {!r}".format(rest)
            )
            chunk = yield deferLater(self.reactor, 0.01, _receive, bad)
            if chunk == b"":
                break
            rest += chunk or b""
        self.assertEqual(rest, b"")
        probe = socket.create_connection(address, timeout=5)
        self.addCleanup(probe.close)
        for hosted in list(host.listeners["tcp:0"].factory.protocols):
            self.addCleanup(hosted.transport.loseConnection)


def _receive(client: socket.socket) -> bytes | None:
    client.setblocking(False)
    try:
        return client.recv(65536)
    except BlockingIOError:
        return None


class StateWriteFailureTests(SynchronousTestCase):
    """
    A failure writing the re-exec state (no memory for the memfd, a full
    tmpfs) happens before C{execv}: everything resumes, as when C{execv}
    fails.
    """

    def test_writeFailureRollsBack(self) -> None:
        """
        The old image resumes every connection with its pending output and
        keeps accepting; nothing was executed; the report says why.
        """
        from ..strategies._reexec import _outgoing as _reexec

        def failingWrite(state: object, validate: bool = True) -> int:
            raise OSError(28, "No space left on device")

        self.patch(_reexec, "writeState", failingWrite)
        harness = _Harness(self)
        hosted = harness.connect()
        hosted.transport.write(b"pending")
        descriptorsBefore = sorted(os.listdir("/proc/self/fd"))
        report = harness.run(harness.migration())
        self.assertEqual(report.outcome.value, "rolled-back")
        self.assertIn("No space left on device", report.reason)
        self.assertEqual(harness.executed, [])
        harness.assertServesOn(hosted, b"pending")
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), descriptorsBefore)


class ReportChannelTests(SynchronousTestCase):
    """
    The channels older generations report their draining over cross the
    exec (L{migrate.strategies._reexec._reports}).
    """

    def _channel(self, harness: _Harness, viaPid: int) -> Any:
        """
        A report channel on a real socket pair, as a transfer leaves it.
        """
        ours, theirs = _socketPair(self)
        channel = ReportChannel(harness.host, viaPid)
        transport = unix.Server(ours, channel, None, None, 1, harness.reactor)
        channel.makeConnection(transport)
        harness.host.reportChannels[viaPid] = channel
        harness.host.updateDraining(
            [{"generation": 1, "pid": viaPid, "connections": 3}], viaPid
        )
        return channel, theirs

    def test_drainingDoesNotRefuse(self) -> None:
        """
        An older generation still draining no longer refuses a re-exec when
        its report channel is here and quiet; one whose channel is gone, or
        holds half a report, still does.
        """
        harness = _Harness(self)
        channel, theirs = self._channel(harness, 42)
        self.assertIsNone(checkHost(harness.host))
        channel.dataReceived(b"\x00\x04_ask")
        self.assertIn("half received", checkHost(harness.host) or "")
        del harness.host.reportChannels[42]
        self.assertIn("report channel is gone", checkHost(harness.host) or "")

    def test_channelsDescribed(self) -> None:
        """
        The state document names each report channel's descriptor and what
        it last reported; the descriptor is inheritable for the exec only.
        """
        harness = _Harness(self)
        channel, theirs = self._channel(harness, 42)
        report = harness.run(harness.migration())
        self.assertEqual(report.outcome.value, "rolled-back")
        [executed] = harness.executed
        fd = channel.transport.fileno()
        self.assertEqual(executed["state"].reporters, ((fd, 42),))
        self.assertEqual(
            executed["state"].draining,
            ({"generation": 1, "pid": 42, "connections": 3, "via": 42},),
        )
        self.assertIn(fd, executed["inheritable"])
        self.assertFalse(os.get_inheritable(fd))

    def test_reportsUpdateTheHost(self) -> None:
        """
        The new image's end of a report channel updates the host's draining
        generations, and forgets them (and the channel) when it closes.
        """
        harness = _Harness(self)
        channel, theirs = self._channel(harness, 42)
        box = amp.AmpBox(
            _command=b"DrainStatus",
            draining=b'[{"generation": 1, "pid": 42, "connections": 1}]',
        )
        channel.dataReceived(box.serialize())
        self.assertEqual(harness.host.draining[1]["connections"], 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((harness.host.draining, harness.host.reportChannels), ({}, {}))

    def test_stateRoundTrip(self) -> None:
        """
        Report channels and their generations survive the state document;
        a document without them has none.
        """
        state = ReexecState(
            pid=1,
            generation=3,
            strategy="reexec",
            reporters=((9, 42),),
            draining=({"generation": 1, "pid": 40, "connections": 2, "via": 42},),
        )
        self.assertEqual(readState(writeState(state)), state)
        self.assertEqual(state.descriptors(), [9])
        plain = ReexecState(pid=1, generation=3, strategy="reexec").toPlain()
        self.assertNotIn("reporters", plain)
