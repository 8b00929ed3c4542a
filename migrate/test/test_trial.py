"""
Tests for L{migrate._handoff._trial}: trying the new code in a child
process before the point of no return.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

import attrs
from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from .._codec import decodeState, encodeState
from .._handoff._trial import (
    MAX_RESTARTS,
    TRIAL_VARIABLE,
    TrialCase,
    casesFrom,
    runChild,
    runTrial,
)
from .._host._priority import BACKGROUND_NICENESS, BackgroundStart
from ..interfaces import IMigratable
from ..state import captureProtocolState
from ..strategies._reload._safety import ImportTimedOut, boundedImport
from ._hostprocess import SOURCE_ROOT, writeModule


@implementer(IMigratable)
class Counting(LineReceiver):
    """
    A migratable protocol whose restore refuses a negative count.
    """

    migrationVersion = 1

    def __init__(self) -> None:
        self.count = 0

    def getMigrationState(self) -> Any:
        return {"count": self.count}

    def restoreMigrationState(self, state: Any) -> None:
        if state["count"] < 0:
            raise ValueError("negative count")
        self.count = state["count"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


class FakeHosted:
    """
    Stands in for a L{HostedProtocol}.
    """

    released = False

    def __init__(self, protocol: Any, peer: Any = None) -> None:
        self.wrappedProtocol = protocol
        self.peer = peer

    def getPeer(self) -> Any:
        from twisted.internet.address import IPv4Address

        return self.peer or IPv4Address("TCP", "127.0.0.1", 4321)


def _case(ident: int, count: int, listener: str = "tcp:1") -> TrialCase:
    protocol = Counting()
    protocol.count = count
    return TrialCase(
        ident,
        listener,
        ["tcp4", "127.0.0.1", 1000 + ident],
        "Counting",
        captureProtocolState(protocol).toPlain(),
    )


class CasesFromTests(SynchronousTestCase):
    """
    L{casesFrom} copies the state of migratable connections.
    """

    def test_migratableOnly(self) -> None:
        """
        Only migratable protocols are tried; each case names its listener,
        peer and class, and carries a copy of the state.
        """
        counting = Counting()
        counting.count = 7
        cases = casesFrom(
            [
                ("tcp:1", FakeHosted(counting)),
                ("tcp:1", FakeHosted(Protocol())),
                ("tcp:2", FakeHosted(None)),
            ]
        )
        self.assertEqual(len(cases), 1)
        [case] = cases
        self.assertEqual(case.ident, 1)
        self.assertEqual(case.peer, ["tcp4", "127.0.0.1", 4321])
        self.assertEqual(case.state["appState"], {"count": 7})
        counting.count = 8
        self.assertEqual(case.state["appState"], {"count": 7})
        self.assertIn("127.0.0.1:4321 on tcp:1", case.describe())
        self.assertIn("Counting", case.describe())

    def test_encodedAhead(self) -> None:
        """
        With C{encode}, each case's line is encoded as the state is
        captured: a later change of the application's state does not reach
        the child.
        """
        counting = Counting()
        counting.count = 7
        [case] = casesFrom([("tcp:1", FakeHosted(counting))], 5, encode=True)
        counting.count = 8
        line = case.toLine()
        self.assertTrue(line.endswith(b"\n"))
        decoded = decodeState(line)
        self.assertEqual(decoded["id"], 5)
        self.assertEqual(decoded["state"]["appState"], {"count": 7})

    def test_uncapturableLeftOut(self) -> None:
        """
        A state that cannot be captured is not tried (the strategy's own
        checks refuse it).
        """

        @implementer(IMigratable)
        class Broken(Protocol):
            migrationVersion = 1

            def getMigrationState(self) -> Any:
                return {"set": set()}

            def restoreMigrationState(self, state: Any) -> None:
                pass

            def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
                return state

        self.assertEqual(casesFrom([("tcp:1", FakeHosted(Broken()))]), [])


class RunChildTests(SynchronousTestCase):
    """
    L{runChild} tries each state it reads and answers as it goes.
    """

    def _answersOf(self, factory: Any, cases: list[TrialCase]) -> list[Any]:
        caseRead, caseWrite = os.pipe()
        answerRead, answerWrite = os.pipe()
        self.addCleanup(os.close, answerRead)
        with os.fdopen(caseWrite, "wb") as stream:
            for case in cases:
                stream.write(case.toLine())
        try:
            ran = runChild(
                factory, {TRIAL_VARIABLE: "{},{}".format(caseRead, answerWrite)}
            )
        finally:
            os.close(answerWrite)
        self.assertTrue(ran)
        data = b""
        while True:
            chunk = os.read(answerRead, 65536)
            if not chunk:
                break
            data += chunk
        return [decodeState(line) for line in data.splitlines()]

    def test_notAChild(self) -> None:
        """
        Without L{TRIAL_VARIABLE}, nothing happens.
        """
        self.assertFalse(runChild(Factory.forProtocol(Counting), {}))

    def test_passesAndRefusals(self) -> None:
        """
        Each case is announced before it is tried, then passed or refused
        with the new code's reason.
        """
        answers = self._answersOf(
            Factory.forProtocol(Counting), [_case(1, 3), _case(2, -1), _case(3, 0)]
        )
        self.assertEqual(answers[0], {"loaded": True, "factory": True})
        self.assertEqual(answers[1:3], [{"trying": 1}, {"passed": 1}])
        self.assertEqual(answers[3], {"trying": 2})
        self.assertEqual(answers[4]["refused"], 2)
        self.assertIn("negative count", answers[4]["reason"])
        self.assertIn("restoreMigrationState", answers[4]["reason"])
        self.assertEqual(answers[5:], [{"trying": 3}, {"passed": 3}, {"done": 3}])

    def test_restoredOnAStandIn(self) -> None:
        """
        The protocol is restored on a stand-in transport that knows the
        peer address, and what it writes goes nowhere.
        """
        seen = []

        @implementer(IMigratable)
        class Writing(Counting):
            def restoreMigrationState(self, state: Any) -> None:
                transport: Any = self.transport
                transport.write(b"hello\r\n")
                seen.append(transport.getPeer().port)

        answers = self._answersOf(Factory.forProtocol(Writing), [_case(1, 3)])
        self.assertEqual(seen, [1001])
        self.assertEqual(answers[-1], {"done": 1})

    def test_factoryRefuses(self) -> None:
        """
        A factory that builds no protocol refuses the connection.
        """

        class Refusing(Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        answers = self._answersOf(Refusing(), [_case(1, 3)])
        self.assertIn("buildProtocol returned None", answers[2]["reason"])

    def test_factoryDoesNotStart(self) -> None:
        """
        A factory whose C{startFactory} raises fails the trial.
        """

        class NotStarting(Factory):
            protocol = Counting

            def startFactory(self) -> None:
                raise RuntimeError("no database")

        answers = self._answersOf(NotStarting(), [_case(1, 3)])
        self.assertEqual(
            answers[1],
            {"failed": "the new factory does not start: RuntimeError: no database"},
        )

    def test_about(self) -> None:
        """
        What the child says about itself comes with its first answer.
        """
        caseRead, caseWrite = os.pipe()
        os.close(caseWrite)
        answerRead, answerWrite = os.pipe()
        self.addCleanup(os.close, answerRead)
        try:
            runChild(
                None,
                {TRIAL_VARIABLE: "{},{}".format(caseRead, answerWrite)},
                about={"format": 3, "caretaker": 2},
            )
        finally:
            os.close(answerWrite)
        first = os.read(answerRead, 65536).splitlines()[0]
        self.assertEqual(
            decodeState(first),
            {"loaded": True, "factory": False, "about": {"format": 3, "caretaker": 2}},
        )

    def test_noFactory(self) -> None:
        """
        A process that cannot build a factory before it starts (a hosted
        plugin) says so and tries nothing.
        """
        answers = self._answersOf(None, [_case(1, 3)])
        self.assertEqual(answers, [{"loaded": True, "factory": False}, {"done": 0}])


class FakeProcess:
    def __init__(self) -> None:
        self.signals: list[str] = []
        self.closed: list[int] = []
        self.written: dict[int, bytes] = {}

    def closeStdin(self) -> None:
        self.closed.append(0)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written[fd] = self.written.get(fd, b"") + data

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeProcessReactor(Clock):
    """
    A clock that records the processes it is asked to start.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess, dict[str, str], dict[int, Any]]] = []

    def spawnProcess(
        self,
        protocol: Any,
        executable: str,
        args: Any,
        env: Any,
        path: Any,
        childFDs: Any,
    ) -> FakeProcess:
        process = FakeProcess()
        protocol.makeConnection(process)
        self.spawned.append((protocol, process, env, childFDs))
        return process


def _say(protocol: Any, *answers: Any) -> None:
    protocol.childDataReceived(
        4, b"".join(encodeState(each) + b"\n" for each in answers)
    )


def _end(protocol: Any, code: int | None = 0, signal: int | None = None) -> None:
    if code == 0:
        protocol.processEnded(Failure(ProcessDone(0)))
    else:
        protocol.processEnded(Failure(ProcessTerminated(code, signal)))


class RunTrialTests(SynchronousTestCase):
    """
    L{runTrial} follows the child and decides.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.cases = [_case(1, 1), _case(2, 2, "tcp:2"), _case(3, 3)]

    def _trial(self, policy: str = "refuse", **kwargs: Any) -> Any:
        return runTrial(
            self.reactor,
            ["python", "child"],
            self.cases,
            env={"A": "b"},
            timeout=5.0,
            policy=policy,
            timer=self.reactor.seconds,
            **kwargs,
        )

    def test_feedsTheCases(self) -> None:
        """
        The child gets the cases on its own pipe, closed after the last,
        and the descriptors in its environment; it passes when it tried
        them all and exited 0.
        """
        d = self._trial()
        protocol, process, env, childFDs = self.reactor.spawned[0]
        self.assertEqual(env, {"A": "b", TRIAL_VARIABLE: "3,4"})
        self.assertEqual(childFDs[3], "w")
        self.assertEqual(childFDs[4], "r")
        lines = process.written[3].splitlines()
        self.assertEqual([decodeState(line)["id"] for line in lines], [1, 2, 3])
        self.assertIn(3, process.closed)
        self.reactor.advance(2)
        _say(protocol, {"loaded": True, "factory": True})
        self.reactor.advance(1)
        for ident in (1, 2, 3):
            _say(protocol, {"trying": ident}, {"passed": ident})
        _say(protocol, {"done": 3})
        _end(protocol)
        outcome = self.successResultOf(d)
        self.assertTrue(outcome.passed)
        self.assertEqual((outcome.tried, outcome.children), (3, 1))
        self.assertEqual((outcome.duration, outcome.restoring), (3, 1))
        self.assertIn("restored 3 connections", outcome.notes()[0])

    def test_refusedNamesTheConnection(self) -> None:
        """
        By default a connection the new code refuses refuses the whole
        migration, naming it and the reason.
        """
        d = self._trial()
        protocol = self.reactor.spawned[0][0]
        _say(
            protocol,
            {"loaded": True},
            {"trying": 1},
            {"passed": 1},
            {"trying": 2},
            {"refused": 2, "reason": "restoreMigrationState() failed: boom"},
            {"trying": 3},
            {"passed": 3},
            {"done": 3},
        )
        _end(protocol)
        outcome = self.successResultOf(d)
        self.assertFalse(outcome.passed)
        self.assertIs(outcome.tripped, self.cases[1])
        self.assertEqual(
            outcome.reason,
            "the new code refused the connection from 127.0.0.1:1002 on tcp:2 "
            "(Counting): restoreMigrationState() failed: boom",
        )

    def test_refusedClosed(self) -> None:
        """
        With the C{close} policy the refused connection is to be closed and
        the migration goes on.
        """
        d = self._trial("close")
        protocol = self.reactor.spawned[0][0]
        _say(
            protocol,
            {"loaded": True},
            {"trying": 1},
            {"refused": 1, "reason": "no"},
            {"trying": 2},
            {"passed": 2},
            {"trying": 3},
            {"passed": 3},
            {"done": 3},
        )
        _end(protocol)
        outcome = self.successResultOf(d)
        self.assertTrue(outcome.passed)
        self.assertEqual(outcome.closing, ((self.cases[0], "no"),))
        self.assertIn("--trial-failure close", outcome.notes()[-1])

    def test_importHangs(self) -> None:
        """
        New code that does not load within the timeout is killed, and the
        migration refused.
        """
        d = self._trial()
        protocol, process = self.reactor.spawned[0][:2]
        self.reactor.advance(4.9)
        self.assertEqual(process.signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(process.signals, ["KILL"])
        _end(protocol, None, 9)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.reason, "the new code did not load within 5.0 s")
        self.assertIsNone(outcome.tripped)

    def test_restoreHangs(self) -> None:
        """
        Loading restarts the clock: the restores get the timeout again, and
        a hang is pinned on the connection being tried.
        """
        d = self._trial()
        protocol, process = self.reactor.spawned[0][:2]
        self.reactor.advance(4)
        _say(protocol, {"loaded": True}, {"trying": 1}, {"passed": 1}, {"trying": 2})
        self.reactor.advance(4.9)
        self.assertEqual(process.signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(process.signals, ["KILL"])
        _end(protocol, None, 9)
        outcome = self.successResultOf(d)
        self.assertIs(outcome.tripped, self.cases[1])
        self.assertIn(
            "did not restore the connection from 127.0.0.1:1002", outcome.reason
        )

    def test_crashPinned(self) -> None:
        """
        A child that dies while trying a connection names that connection
        and its last output.
        """
        d = self._trial()
        protocol = self.reactor.spawned[0][0]
        _say(protocol, {"loaded": True}, {"trying": 1})
        protocol.childDataReceived(2, b"Segmentation fault\n")
        _end(protocol, 3)
        outcome = self.successResultOf(d)
        self.assertIs(outcome.tripped, self.cases[0])
        self.assertEqual(
            outcome.reason,
            "the trial process exited with status 3 while the new code restored "
            "the connection from 127.0.0.1:1001 on tcp:1 (Counting): "
            "Segmentation fault",
        )

    def test_crashClosedAndRetried(self) -> None:
        """
        With the C{close} policy, the connection that crashed the child is
        set aside and the connections after it are tried in a new child.
        """
        d = self._trial("close")
        first = self.reactor.spawned[0][0]
        _say(first, {"loaded": True}, {"trying": 1}, {"passed": 1}, {"trying": 2})
        _end(first, None, 9)
        second, process = self.reactor.spawned[1][:2]
        self.assertEqual(
            [decodeState(line)["id"] for line in process.written[3].splitlines()], [3]
        )
        _say(second, {"loaded": True}, {"trying": 3}, {"passed": 3}, {"done": 1})
        _end(second)
        outcome = self.successResultOf(d)
        self.assertTrue(outcome.passed)
        self.assertEqual((outcome.tried, outcome.children), (2, 2))
        self.assertEqual([case for case, why in outcome.closing], [self.cases[1]])

    def test_restartsBounded(self) -> None:
        """
        At most L{MAX_RESTARTS} crashing connections are set aside.
        """
        self.cases = [_case(n, n) for n in range(1, MAX_RESTARTS + 3)]
        d = self._trial("close")
        for index in range(MAX_RESTARTS + 1):
            protocol = self.reactor.spawned[index][0]
            _say(protocol, {"loaded": True}, {"trying": index + 1})
            _end(protocol, None, 9)
        outcome = self.successResultOf(d)
        self.assertFalse(outcome.passed)
        self.assertEqual(outcome.children, MAX_RESTARTS + 1)

    def test_exitedEarly(self) -> None:
        """
        A child that exits 0 without trying every connection fails the
        trial.
        """
        d = self._trial()
        protocol = self.reactor.spawned[0][0]
        _say(protocol, {"loaded": True}, {"trying": 1}, {"passed": 1})
        _end(protocol)
        outcome = self.successResultOf(d)
        self.assertIn("before trying every connection", outcome.reason)

    def test_about(self) -> None:
        """
        The outcome keeps what the child said about itself as it loaded,
        as far as it is names and whole numbers; a child that says nothing
        (older code) leaves it empty.
        """
        d = self._trial()
        protocol = self.reactor.spawned[0][0]
        _say(
            protocol,
            {
                "loaded": True,
                "about": {"format": 2, "caretaker": 1, "x": "y", "b": True, "f": 1.5},
            },
            {"done": 0},
        )
        _end(protocol)
        self.assertEqual(self.successResultOf(d).about, {"format": 2, "caretaker": 1})
        d = self._trial()
        protocol = self.reactor.spawned[1][0]
        _say(protocol, {"loaded": True, "about": [1]}, {"done": 0})
        _end(protocol)
        self.assertEqual(self.successResultOf(d).about, {})

    def test_readyMarker(self) -> None:
        """
        When a ready marker is asked for, the child passes only once it has
        printed it.
        """
        d = self._trial(readyMarker="ready!")
        protocol = self.reactor.spawned[0][0]
        _say(protocol, {"loaded": True}, {"done": 0})
        protocol.childDataReceived(1, b"the log file cannot be opened\n")
        _end(protocol, 1)
        outcome = self.successResultOf(d)
        self.assertIn("the log file cannot be opened", outcome.reason)

    def test_oversizeCaseLeftOut(self) -> None:
        """
        A case too large for one line is not sent (nor tried); the others
        are, and the trial still ends.
        """
        huge = attrs.evolve(self.cases[1], state={"appState": "x" * (5 << 20)})
        self.cases[1] = huge
        with capturedLogs() as events:
            d = self._trial()
        protocol, process = self.reactor.spawned[0][:2]
        self.assertEqual(
            [decodeState(line)["id"] for line in process.written[3].splitlines()],
            [1, 3],
        )
        self.assertTrue(any("not trying" in e["log_format"] for e in events))
        _say(protocol, {"loaded": True}, {"done": 2})
        _end(protocol)
        self.assertTrue(self.successResultOf(d).passed)

    def test_unknownPolicy(self) -> None:
        """
        An unknown policy is refused before anything starts.
        """
        outcome = self.successResultOf(self._trial("maybe"))
        self.assertIn("maybe", outcome.reason)
        self.assertEqual(self.reactor.spawned, [])


class ChildProcessTests(TestCase):
    """
    The trial child for module reload (L{migrate._handoff._trialchild}),
    run for real on new code that misbehaves.
    """

    def setUp(self) -> None:
        self.workdir = FilePath(tempfile.mkdtemp(prefix="migrate-trial-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.workdir.path, True)

    def _trialOf(
        self,
        source: str,
        cases: list[TrialCase],
        policy: str = "refuse",
        background: bool = False,
        timeout: float = 10.0,
    ) -> Any:
        writeModule(self.workdir, "trialapp", source)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.workdir.path, SOURCE_ROOT])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return runTrial(
            _globalReactor,
            [sys.executable, "-m", "migrate._handoff._trialchild", "trialapp:factory"],
            cases,
            env=env,
            timeout=timeout,
            policy=policy,
            background=background,
        )

    _APP = """
        import os, time
        from twisted.internet.protocol import Factory
        from twisted.protocols.basic import LineReceiver
        from zope.interface import implementer
        from migrate import IMigratable

        {top}

        @implementer(IMigratable)
        class Counting(LineReceiver):
            migrationVersion = 2

            def getMigrationState(self):
                return {{"count": 0}}

            def upgradeMigrationState(self, fromVersion, state):
                return state

            def restoreMigrationState(self, state):
                if state["count"] == 2:
                    {onTwo}

        factory = Factory.forProtocol(Counting)
    """

    @inlineCallbacks
    def test_passes(self) -> Any:
        """
        New code that restores every state passes, each state upgraded from
        version 1 to 2.
        """
        outcome = yield self._trialOf(
            self._APP.format(top="", onTwo="pass"), [_case(1, 1), _case(2, 2)]
        )
        self.assertIsNone(outcome.reason, outcome.output)
        self.assertEqual(outcome.tried, 2)

    @inlineCallbacks
    def test_background(self) -> Any:
        """
        With C{background}, the child tries the new code at the lowest
        priority (it serves nobody); without, at this process's.
        """
        if BackgroundStart.ifPossible(None, 1.0) is None:
            raise SkipTest("this process may not bring a child forward")
        source = self._APP.format(
            top="",
            onTwo='raise ValueError("at nice %d" % os.getpriority(os.PRIO_PROCESS, 0))',
        )
        # A deadline far enough that the child is not brought forward
        # after a tenth of it, however loaded the machine.
        outcome = yield self._trialOf(
            source, [_case(2, 2)], background=True, timeout=600.0
        )
        self.assertIn("at nice {}".format(BACKGROUND_NICENESS), outcome.reason)
        outcome = yield self._trialOf(source, [_case(2, 2)])
        self.assertIn(
            "at nice {}".format(os.getpriority(os.PRIO_PROCESS, 0)), outcome.reason
        )

    @inlineCallbacks
    def test_importHangs(self) -> Any:
        """
        New code that blocks at import is killed and refused.
        """
        source = self._APP.format(top="time.sleep(60)", onTwo="pass")
        writeModule(self.workdir, "trialapp", source)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.workdir.path, SOURCE_ROOT])
        outcome = yield runTrial(
            _globalReactor,
            [sys.executable, "-m", "migrate._handoff._trialchild", "trialapp:factory"],
            [_case(1, 1)],
            env=env,
            timeout=1.0,
        )
        self.assertEqual(outcome.reason, "the new code did not load within 1.0 s")

    @inlineCallbacks
    def test_restoreExits(self) -> Any:
        """
        A restore that ends the process is pinned on its connection.
        """
        outcome = yield self._trialOf(
            self._APP.format(top="", onTwo="os._exit(7)"),
            [_case(1, 1), _case(2, 2), _case(3, 3)],
        )
        self.assertIs(outcome.tripped.ident, 2)
        self.assertIn("exited with status 7", outcome.reason)
        self.assertIn("127.0.0.1:1002", outcome.reason)

    @inlineCallbacks
    def test_restoreExitsClosed(self) -> Any:
        """
        With the C{close} policy the rest are tried in a new process.
        """
        outcome = yield self._trialOf(
            self._APP.format(top="", onTwo="os._exit(7)"),
            [_case(1, 1), _case(2, 2), _case(3, 3)],
            policy="close",
        )
        self.assertIsNone(outcome.reason)
        self.assertEqual((outcome.tried, outcome.children), (2, 2))
        self.assertEqual([case.ident for case, why in outcome.closing], [2])

    @inlineCallbacks
    def test_restoreRaises(self) -> Any:
        """
        A restore that raises refuses with the exception.
        """
        outcome = yield self._trialOf(
            self._APP.format(top="", onTwo="raise KeyError('nick')"),
            [_case(1, 1), _case(2, 2)],
        )
        self.assertIs(outcome.tripped.ident, 2)
        self.assertIn("KeyError('nick')", outcome.reason)

    @inlineCallbacks
    def test_importFails(self) -> Any:
        """
        New code that does not import is refused with its error.
        """
        outcome = yield self._trialOf(
            self._APP.format(top="import nosuchmodule", onTwo="pass"), [_case(1, 1)]
        )
        self.assertIn(
            "the new code does not start (exited with status 1)", outcome.reason
        )
        self.assertIn("nosuchmodule", outcome.reason)


class BoundedImportTests(SynchronousTestCase):
    """
    L{boundedImport} interrupts a block that takes too long.
    """

    def test_interrupts(self) -> None:
        """
        A sleep longer than the bound is interrupted with
        L{ImportTimedOut}, and C{SIGALRM} is as it was afterwards.
        """
        import signal
        import time

        before = signal.getsignal(signal.SIGALRM)
        with self.assertRaises(ImportTimedOut) as caught:
            with boundedImport(0.05) as bounded:
                self.assertTrue(bounded)
                time.sleep(30)
        self.assertIn("longer than 0.05 s", str(caught.exception))
        self.assertEqual(signal.getsignal(signal.SIGALRM), before)
        self.assertEqual(signal.getitimer(signal.ITIMER_REAL)[0], 0)

    def test_quickBlockUntouched(self) -> None:
        """
        A block within the bound runs to its end, and the timer is
        cancelled.
        """
        import signal

        with boundedImport(30) as bounded:
            self.assertTrue(bounded)
        self.assertEqual(signal.getitimer(signal.ITIMER_REAL)[0], 0)

    def test_otherUserKeepsTheSignal(self) -> None:
        """
        When something else handles C{SIGALRM}, the block is not bounded.
        """
        import signal

        previous = signal.signal(signal.SIGALRM, lambda *a: None)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        with boundedImport(0.01) as bounded:
            self.assertFalse(bounded)
