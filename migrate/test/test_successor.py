"""
Tests for L{migrate._handoff._successor}: starting a successor process, and what the
successor finds it inherited.

Unit tests drive the process protocol and L{spawnSuccessor} with fakes; the
integration tests start real Python children on the real reactor, each with
a deadline and killed in cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import textwrap
from typing import Any, AnyStr, Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IProcessProtocol, IReactorProcess
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import migrate
from migrate._handoff import _successor
from migrate._handoff._successor import (
    HANDOFF_FD_VARIABLE,
    OUTPUT_FDS_VARIABLE,
    HandoffEnvironmentError,
    InheritedHandoff,
    SuccessorExit,
    SuccessorProcess,
    _SuccessorProtocol,
    inheritedHandoff,
    spawnSuccessor,
    successorCommandLine,
)

_DEADLINE = 15.0
"""
Seconds any one real child may take before a test gives up on it.
"""


class SuccessorCommandLineTests(SynchronousTestCase):
    """
    L{successorCommandLine} restarts the current program with the current
    interpreter.
    """

    def test_twistdScript(self) -> None:
        """
        A program started as a script (C{twistd}) restarts the script.
        """
        self.assertEqual(
            successorCommandLine(
                "/venv/bin/python3",
                ["/usr/bin/python3", "/venv/bin/twistd", "-n", "migrate-host"],
            ),
            ["/venv/bin/python3", "/venv/bin/twistd", "-n", "migrate-host"],
        )

    def test_module(self) -> None:
        """
        A program started with C{-m} restarts the module.
        """
        self.assertEqual(
            successorCommandLine(
                "/venv/bin/python3", ["python", "-m", "twisted", "migrate-host"]
            ),
            ["/venv/bin/python3", "-m", "twisted", "migrate-host"],
        )

    def test_interpreterOptions(self) -> None:
        """
        Interpreter options given before the program are kept.
        """
        self.assertEqual(
            successorCommandLine(
                "/venv/bin/python3",
                ["python3", "-X", "dev", "-W", "error", "/venv/bin/twist", "web"],
            ),
            ["/venv/bin/python3", "-X", "dev", "-W", "error", "/venv/bin/twist", "web"],
        )

    def test_defaults(self) -> None:
        """
        By default the interpreter is L{sys.executable} and the arguments come
        from L{sys.orig_argv}.
        """
        self.assertEqual(successorCommandLine(), [sys.executable, *sys.orig_argv[1:]])

    def test_unknownInterpreter(self) -> None:
        """
        An unknown interpreter path cannot be restarted.
        """
        self.assertRaises(
            ValueError, successorCommandLine, "", ["python", "-m", "twisted"]
        )

    def test_nothingToRun(self) -> None:
        """
        An original command line without a program cannot be restarted.
        """
        self.assertRaises(ValueError, successorCommandLine, "/bin/python", ["python"])
        self.assertRaises(ValueError, successorCommandLine, "/bin/python", [])


class SuccessorExitTests(SynchronousTestCase):
    """
    L{SuccessorExit} says how a process ended.
    """

    def test_fromProcessDone(self) -> None:
        """
        A clean exit is status 0.
        """
        self.assertEqual(
            SuccessorExit.fromReason(Failure(ProcessDone(0))), SuccessorExit(0, None)
        )

    def test_fromProcessTerminated(self) -> None:
        """
        A failed exit keeps its status, a kill its signal.
        """
        self.assertEqual(
            SuccessorExit.fromReason(Failure(ProcessTerminated(exitCode=3))),
            SuccessorExit(3, None),
        )
        self.assertEqual(
            SuccessorExit.fromReason(Failure(ProcessTerminated(signal=9))),
            SuccessorExit(None, 9),
        )

    def test_describe(self) -> None:
        """
        The description names the status or the signal; it is also the
        string form.
        """
        self.assertEqual(SuccessorExit(3, None).describe(), "exited with status 3")
        self.assertEqual(
            str(SuccessorExit(None, signal.SIGKILL)), "killed by SIGKILL (9)"
        )
        self.assertEqual(SuccessorExit(None, 9).signalName, "SIGKILL")
        self.assertIsNone(SuccessorExit(0, None).signalName)
        self.assertEqual(SuccessorExit(None, 250).signalName, "signal 250")


class _FakeProcessTransport:
    """
    The part of a process transport L{SuccessorProcess} uses.
    """

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[str | int] = []

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signalID)


@implementer(IReactorProcess)
class _RecordingProcessReactor(Clock):
    """
    A reactor that records the processes it is asked to spawn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.transport = _FakeProcessTransport(4321)

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> Any:
        assert childFDs is not None
        self.spawned.append(
            dict(
                executable=executable,
                args=args,
                env=env,
                path=path,
                usePTY=usePTY,
                childFDs=dict(childFDs),
                stats={
                    child: os.fstat(parent)
                    for child, parent in childFDs.items()
                    if isinstance(parent, int)
                },
            )
        )
        processProtocol.makeConnection(self.transport)  # type: ignore[arg-type]
        return self.transport


def _socketpair(testCase: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    testCase.addCleanup(ours.close)
    testCase.addCleanup(theirs.close)
    return ours, theirs


class SpawnSuccessorTests(SynchronousTestCase):
    """
    L{spawnSuccessor} asks the reactor for the successor's descriptors and
    environment.
    """

    def setUp(self) -> None:
        self.reactor = _RecordingProcessReactor()
        self.ours, self.theirs = _socketpair(self)

    def spawn(self, **kwargs: Any) -> SuccessorProcess:
        arguments: dict[str, Any] = dict(
            env={"PATH": "/bin"}, handoffSocket=self.theirs
        )
        arguments.update(kwargs)
        return spawnSuccessor(self.reactor, ["/bin/python", "app.py"], **arguments)

    def test_fakeReactor(self) -> None:
        """
        The fake reactor provides L{IReactorProcess}.
        """
        verifyObject(IReactorProcess, self.reactor)

    def test_commandLine(self) -> None:
        """
        The first argument is the executable; the command line is passed
        whole; the working directory is passed on; no PTY.
        """
        process = self.spawn(cwd="/srv")
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["executable"], "/bin/python")
        self.assertEqual(spawned["args"], ["/bin/python", "app.py"])
        self.assertEqual(spawned["path"], "/srv")
        self.assertFalse(spawned["usePTY"])
        self.assertEqual(process.pid, 4321)

    def test_descriptors(self) -> None:
        """
        The successor gets our input, two pipes for its output, the hand-off
        socket as 3 and our output and error as 4 and 5.
        """
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            self.spawn(outputDescriptors=(out.fileno(), err.fileno()))
            [spawned] = self.reactor.spawned
            childFDs = spawned["childFDs"]
            self.assertEqual(
                {fd: childFDs[fd] for fd in (1, 2, 3, 4, 5)},
                {
                    1: "r",
                    2: "r",
                    3: self.theirs.fileno(),
                    4: out.fileno(),
                    5: err.fileno(),
                },
            )
            self.assertEqual(sorted(childFDs), [0, 1, 2, 3, 4, 5])

    def test_defaultOutputDescriptors(self) -> None:
        """
        By default the successor inherits our standard output and error.
        """
        self.spawn()
        [spawned] = self.reactor.spawned
        stats = spawned["stats"]
        for child, ours in [(0, 0), (4, 1), (5, 2)]:
            try:
                expected = os.fstat(ours)
            except OSError:
                continue
            self.assertEqual(
                (stats[child].st_dev, stats[child].st_ino),
                (expected.st_dev, expected.st_ino),
            )

    def test_closedDescriptorBecomesDevNull(self) -> None:
        """
        A descriptor we do not have open is replaced by C{/dev/null}, which
        is closed again once the successor started.
        """
        read, write = os.pipe()
        os.close(read)
        os.close(write)
        self.spawn(outputDescriptors=(read, write))
        [spawned] = self.reactor.spawned
        devnull = os.stat(os.devnull)
        for child in (4, 5):
            self.assertEqual(spawned["stats"][child].st_rdev, devnull.st_rdev)
            self.assertRaises(OSError, os.fstat, spawned["childFDs"][child])

    def test_environment(self) -> None:
        """
        The successor's environment is C{env} and C{extraEnv} with the
        hand-off variables, which override stale ones.
        """
        self.spawn(
            env={"PATH": "/bin", HANDOFF_FD_VARIABLE: "9"},
            extraEnv={"STRATEGY": "gradual"},
        )
        [spawned] = self.reactor.spawned
        self.assertEqual(
            spawned["env"],
            {
                "PATH": "/bin",
                "STRATEGY": "gradual",
                HANDOFF_FD_VARIABLE: "3",
                OUTPUT_FDS_VARIABLE: "4,5",
            },
        )

    def test_extraEnvironmentClash(self) -> None:
        """
        C{extraEnv} may not set the hand-off variables.
        """
        exception = self.assertRaises(
            ValueError, self.spawn, extraEnv={OUTPUT_FDS_VARIABLE: "1,2"}
        )
        self.assertIn(OUTPUT_FDS_VARIABLE, str(exception))
        self.assertEqual(self.reactor.spawned, [])

    def test_badArguments(self) -> None:
        """
        An empty command line, a negative tail or a closed socket is
        refused before anything starts.
        """
        self.assertRaises(
            ValueError,
            spawnSuccessor,
            self.reactor,
            [],
            env={},
            handoffSocket=self.theirs,
        )
        self.assertRaises(ValueError, self.spawn, tailLines=-1)
        self.theirs.close()
        self.assertRaises(ValueError, self.spawn)
        self.assertEqual(self.reactor.spawned, [])

    def test_signals(self) -> None:
        """
        L{SuccessorProcess.kill} and L{SuccessorProcess.terminate} signal
        the running process.
        """
        process = self.spawn()
        process.terminate()
        process.kill()
        self.assertEqual(self.reactor.transport.signals, ["TERM", "KILL"])

    def test_signalsAfterExit(self) -> None:
        """
        Once the process ended, signalling it does nothing, even when Twisted
        has already forgotten its pid.
        """
        process = self.spawn()
        self.reactor.transport.pid = None
        process.kill()
        process.terminate()
        process._protocol.processExited(Failure(ProcessDone(0)))
        process.kill()
        self.assertEqual(self.reactor.transport.signals, [])


class SuccessorProtocolTests(SynchronousTestCase):
    """
    The successor's process protocol logs and keeps its output, and reports
    when it ended.
    """

    def setUp(self) -> None:
        self.process = self.startProcess()

    def startProcess(self, tailLines: int = 3) -> SuccessorProcess:
        ours, theirs = _socketpair(self)
        self.reactor = _RecordingProcessReactor()
        return spawnSuccessor(
            self.reactor,
            ["python"],
            env={},
            handoffSocket=theirs,
            tailLines=tailLines,
        )

    @property
    def protocol(self) -> _SuccessorProtocol:
        return self.process._protocol

    def test_linesAcrossChunks(self) -> None:
        """
        Lines are reassembled across writes, on both streams; carriage
        returns before newlines go.
        """
        self.protocol.childDataReceived(1, b"he")
        self.protocol.childDataReceived(2, b"oops\r\n")
        self.protocol.childDataReceived(1, b"llo\nwor")
        self.protocol.childDataReceived(1, b"ld\n")
        self.assertEqual(self.process.logTail(), ["oops", "hello", "world"])

    def test_tailIsBounded(self) -> None:
        """
        Only the last C{tailLines} lines are kept.
        """
        self.protocol.childDataReceived(1, b"".join(b"%d\n" % i for i in range(10)))
        self.assertEqual(self.process.logTail(), ["7", "8", "9"])

    def test_noTail(self) -> None:
        """
        With C{tailLines=0} nothing is kept.
        """
        self.process = self.startProcess(tailLines=0)
        self.protocol.childDataReceived(1, b"a\nb")
        self.assertEqual(self.process.logTail(), [])

    def test_partialLine(self) -> None:
        """
        An incomplete last line shows in the tail while the process runs,
        and is completed when its stream closes.
        """
        self.protocol.childDataReceived(1, b"one\ntw")
        self.assertEqual(self.process.logTail(), ["one", "tw"])
        with capturedLogs() as events:
            self.protocol.childConnectionLost(1)
        self.assertEqual(self.process.logTail(), ["one", "tw"])
        self.assertEqual([event["line"] for event in events], ["tw"])

    def test_longLine(self) -> None:
        """
        A line longer than the limit keeps its beginning and the count of
        the rest, however it arrives.
        """
        self.patch(_successor, "_MAX_LINE_BYTES", 10)
        self.process = self.startProcess()
        self.protocol.childDataReceived(1, b"x" * 8)
        self.protocol.childDataReceived(1, b"y" * 1000)
        self.assertEqual(self.process.logTail(), ["xxxxxxxxyy... [998 more bytes]"])
        self.protocol.childDataReceived(1, b"y" * 1000 + b"\nshort\n")
        self.assertEqual(
            self.process.logTail(), ["xxxxxxxxyy... [1998 more bytes]", "short"]
        )

    def test_undecodable(self) -> None:
        """
        Bytes that are not UTF-8 are escaped, not lost.
        """
        self.protocol.childDataReceived(1, "é\n".encode("utf-8") + b"\xff\n")
        self.assertEqual(self.process.logTail(), ["é", "\\xff"])

    def test_otherDescriptorsIgnored(self) -> None:
        """
        Only standard output and error are lines of output.
        """
        self.protocol.childDataReceived(7, b"what\n")
        self.assertEqual(self.process.logTail(), [])

    def test_logged(self) -> None:
        """
        Every line is logged with the successor's pid and stream.
        """
        with capturedLogs() as events:
            self.protocol.childDataReceived(1, b"out\n")
            self.protocol.childDataReceived(2, b"err\n")
        self.assertEqual(
            [(e["log_format"], e["pid"], e["line"], e["stream"]) for e in events],
            [
                ("successor {pid}: {line}", 4321, "out", "stdout"),
                ("successor {pid}: {line}", 4321, "err", "stderr"),
            ],
        )

    def test_whenEnded(self) -> None:
        """
        Every L{SuccessorProcess.whenEnded} fires, once the process exited
        and its output is complete, with how it ended; later ones at once.
        """
        first = self.process.whenEnded()
        second = self.process.whenEnded()
        self.assertIsNot(first, second)
        self.protocol.childDataReceived(2, b"Traceback")
        self.assertFalse(self.process.exited)
        self.protocol.processExited(Failure(ProcessTerminated(exitCode=3)))
        self.assertTrue(self.process.exited)
        self.assertNoResult(first)
        self.protocol.processEnded(Failure(ProcessTerminated(exitCode=3)))
        self.assertEqual(self.successResultOf(first), SuccessorExit(3, None))
        self.assertEqual(self.successResultOf(second), SuccessorExit(3, None))
        self.assertEqual(
            self.successResultOf(self.process.whenEnded()), SuccessorExit(3, None)
        )
        self.assertEqual(self.process.logTail(), ["Traceback"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_whenEndedCancelled(self) -> None:
        """
        A cancelled L{SuccessorProcess.whenEnded} fails with
        L{CancelledError} and is forgotten; the others still fire.
        """
        cancelled = self.process.whenEnded()
        kept = self.process.whenEnded()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.assertEqual(self.protocol._endedWaiters, [kept])
        self.protocol.processExited(Failure(ProcessDone(0)))
        self.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(kept), SuccessorExit(0, None))

    def test_outputHeldOpen(self) -> None:
        """
        If the output stays open after the process exited (a process it
        started holds it), L{SuccessorProcess.whenEnded} fires after a grace
        period anyway, and the output is still logged.
        """
        ended = self.process.whenEnded()
        closed = self.process._whenOutputClosed()
        self.protocol.processExited(Failure(ProcessTerminated(signal=9)))
        self.reactor.advance(_successor._OUTPUT_GRACE_SECONDS - 0.01)
        self.assertNoResult(ended)
        self.reactor.advance(0.01)
        self.assertEqual(self.successResultOf(ended), SuccessorExit(None, 9))
        self.assertNoResult(closed)
        self.protocol.childDataReceived(1, b"late\n")
        self.protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertIsNone(self.successResultOf(closed))
        self.assertEqual(self.process.logTail(), ["late"])
        self.assertIsNone(self.successResultOf(self.process._whenOutputClosed()))

    def test_exitLogged(self) -> None:
        """
        The end of the process is logged.
        """
        with capturedLogs() as events:
            self.protocol.processExited(Failure(ProcessTerminated(exitCode=2)))
        [event] = events
        self.assertEqual(event["pid"], 4321)
        self.assertEqual(event["how"], "exited with status 2")


def _pythonPath() -> str:
    """
    The directory to import C{migrate} from.
    """
    package = os.path.dirname(os.path.abspath(migrate.__file__))
    return os.pathsep.join(
        filter(None, [os.path.dirname(package), os.environ.get("PYTHONPATH")])
    )


def _childEnvironment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = _pythonPath()
    # Children buffer their output as they would in production.
    env.pop("PYTHONUNBUFFERED", None)
    return env


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


class RealSuccessorTests(TestCase):
    """
    L{spawnSuccessor} starts real processes on the real reactor.
    """

    timeout = 4 * _DEADLINE

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.ours, self.theirs = _socketpair(self)

    def spawn(self, code: str, **kwargs: Any) -> SuccessorProcess:
        """
        Start a Python child running C{code}; kill it in cleanup.
        """
        kwargs.setdefault("env", _childEnvironment())
        kwargs.setdefault("handoffSocket", self.theirs)
        process = spawnSuccessor(self.reactor, _python(code), **kwargs)
        self.theirs.close()
        self.addCleanup(self.reap, process)
        return process

    def reap(self, process: SuccessorProcess) -> Deferred[None]:
        process.kill()
        return self.within(process._whenOutputClosed())

    def within(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(_DEADLINE, self.reactor)

    def ended(self, process: SuccessorProcess) -> Deferred[SuccessorExit]:
        return self.within(process.whenEnded())

    @inlineCallbacks
    def test_handoffSocket(self) -> Any:
        """
        The successor finds the hand-off socket as descriptor 3 and talks to
        us over it.
        """
        self.ours.sendall(b"ping")
        process = self.spawn("""
            import os, socket, sys
            print(os.environ["MIGRATE_HANDOFF_FD"], os.environ["MIGRATE_OUTPUT_FDS"])
            handoff = socket.socket(fileno=int(os.environ["MIGRATE_HANDOFF_FD"]))
            handoff.sendall(b"pong:" + handoff.recv(4))
            """)
        status = yield self.ended(process)
        self.assertEqual(
            (status, process.logTail()), (SuccessorExit(0, None), ["3 4,5"])
        )
        self.ours.settimeout(_DEADLINE)
        self.assertEqual(self.ours.recv(100), b"pong:ping")
        self.assertEqual(self.ours.recv(100), b"")

    @inlineCallbacks
    def test_output(self) -> Any:
        """
        What the successor writes to its standard output and error is in
        the log tail and in our log, with its pid.
        """
        with capturedLogs() as events:
            process = self.spawn("""
                import sys
                print("hello")
                sys.stdout.flush()
                print("oh no", file=sys.stderr)
                sys.stderr.flush()
                sys.stdout.write("no newline")
                """)
            yield self.ended(process)
        # The two pipes are read in no particular order.
        self.assertEqual(sorted(process.logTail()), ["hello", "no newline", "oh no"])
        self.assertEqual(
            sorted(
                (event["line"], event["stream"])
                for event in events
                if event.get("log_format") == "successor {pid}: {line}"
                and event["pid"] == process.pid
            ),
            [("hello", "stdout"), ("no newline", "stdout"), ("oh no", "stderr")],
        )

    @inlineCallbacks
    def test_exitStatus(self) -> Any:
        """
        The successor's exit status is reported.
        """
        process = self.spawn("raise SystemExit(3)")
        self.assertEqual((yield self.ended(process)), SuccessorExit(3, None))
        self.assertTrue(process.exited)

    @inlineCallbacks
    def test_crashTraceback(self) -> Any:
        """
        A crashing successor's traceback is in the tail by the time it is
        reported ended.
        """
        process = self.spawn("raise RuntimeError('broken successor')")
        self.assertEqual((yield self.ended(process)), SuccessorExit(1, None))
        self.assertEqual(process.logTail()[-1], "RuntimeError: broken successor")

    @inlineCallbacks
    def test_kill(self) -> Any:
        """
        L{SuccessorProcess.kill} ends a successor that would run forever;
        killing it again is harmless.
        """
        process = self.spawn("import time\nwhile True: time.sleep(60)")
        process.kill()
        status = yield self.ended(process)
        self.assertEqual(status, SuccessorExit(None, signal.SIGKILL))
        process.kill()
        process.terminate()

    @inlineCallbacks
    def test_terminate(self) -> Any:
        """
        L{SuccessorProcess.terminate} sends C{SIGTERM}.
        """
        process = self.spawn("import time\nwhile True: time.sleep(60)")
        process.terminate()
        status = yield self.ended(process)
        self.assertEqual(status, SuccessorExit(None, signal.SIGTERM))

    @inlineCallbacks
    def test_killedBySignal(self) -> Any:
        """
        A successor killed by a signal nobody here sent reports it.
        """
        process = self.spawn("import os, signal\nos.kill(os.getpid(), signal.SIGUSR1)")
        status = yield self.ended(process)
        self.assertEqual(status.signalName, "SIGUSR1")

    @inlineCallbacks
    def test_descriptors(self) -> Any:
        """
        The successor has descriptors 0 to 5 and nothing else, even when we
        hold an inheritable one; 3, 4 and 5 are what we passed.
        """
        stray, strayWrite = os.pipe()
        self.addCleanup(os.close, stray)
        self.addCleanup(os.close, strayWrite)
        os.set_inheritable(stray, True)
        # TestCase.enterContext is Python 3.11's.
        out = tempfile.TemporaryFile()
        self.addCleanup(out.close)
        err = tempfile.TemporaryFile()
        self.addCleanup(err.close)
        expected = {
            str(child): [os.fstat(fd).st_dev, os.fstat(fd).st_ino]
            for child, fd in [
                (3, self.theirs.fileno()),
                (4, out.fileno()),
                (5, err.fileno()),
            ]
        }
        process = self.spawn(
            """
            import json, os
            fds = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    os.readlink("/proc/self/fd/" + name)
                except OSError:
                    continue  # listdir's own descriptor
                fds.append(int(name))
            print(json.dumps({
                "fds": sorted(fds),
                "stats": {
                    str(fd): [os.fstat(fd).st_dev, os.fstat(fd).st_ino]
                    for fd in (3, 4, 5)
                },
            }))
            """,
            outputDescriptors=(out.fileno(), err.fileno()),
        )
        yield self.ended(process)
        [line] = process.logTail()
        report = json.loads(line)
        self.assertEqual(report["fds"], [0, 1, 2, 3, 4, 5])
        self.assertEqual(report["stats"], expected)

    @inlineCallbacks
    def test_takeOverOutput(self) -> Any:
        """
        After L{InheritedHandoff.takeOverOutput} the successor writes to
        what we passed as our output and error, not to the pipes we log;
        the hand-off variables are gone from its environment and the
        hand-off socket will not leak into what it starts.
        """
        # TestCase.enterContext is Python 3.11's.
        out = tempfile.TemporaryFile()
        self.addCleanup(out.close)
        err = tempfile.TemporaryFile()
        self.addCleanup(err.close)
        process = self.spawn(
            """
            import os, sys
            from migrate._handoff._successor import inheritedHandoff
            handoff = inheritedHandoff()
            print("before", sys.stdout.fileno())
            print("before-err", file=sys.stderr)
            sys.stdout.write("buffered ")
            handoff.takeOverOutput()
            handoff.takeOverOutput()
            print("after", handoff.handoffDescriptor, handoff.outputDescriptors)
            print(sorted(k for k in os.environ if k.startswith("MIGRATE_")))
            print(os.get_inheritable(3), os.get_inheritable(1))
            for fd in (4, 5):
                try:
                    os.fstat(fd)
                except OSError:
                    print(fd, "closed")
            print("after-err", file=sys.stderr)
            """,
            outputDescriptors=(out.fileno(), err.fileno()),
        )
        status = yield self.ended(process)
        self.assertEqual(status, SuccessorExit(0, None))
        self.assertEqual(
            sorted(process.logTail()), ["before 1", "before-err", "buffered "]
        )
        out.seek(0)
        err.seek(0)
        self.assertEqual(
            out.read().decode().splitlines(),
            ["after 3 (4, 5)", "[]", "False True", "4 closed", "5 closed"],
        )
        self.assertEqual(err.read(), b"after-err\n")

    @inlineCallbacks
    def test_outputHeldOpen(self) -> Any:
        """
        A successor that exits while a process it started still holds its
        output is reported ended anyway.
        """
        self.patch(_successor, "_OUTPUT_GRACE_SECONDS", 0.2)
        process = self.spawn("""
            import subprocess, sys
            child = subprocess.Popen(
                [sys.executable, "-c", "import time\\nwhile True: time.sleep(60)"]
            )
            print(child.pid)
            """)
        status = yield self.ended(process)
        self.assertEqual(status, SuccessorExit(0, None))
        grandchild = int(process.logTail()[0])
        closed = process._whenOutputClosed()
        self.assertNoResult(closed)
        os.kill(grandchild, signal.SIGKILL)
        yield self.within(closed)

    @inlineCallbacks
    def test_workingDirectory(self) -> Any:
        """
        The successor starts in C{cwd}, with the same descriptors (Twisted
        forks rather than uses C{posix_spawn} then).
        """
        directory = os.path.realpath(self.mktemp())
        os.mkdir(directory)
        process = self.spawn(
            """
            import os
            print(os.getcwd())
            print(sorted(int(fd) for fd in os.listdir("/proc/self/fd")
                         if os.path.exists("/proc/self/fd/" + fd)))
            print(os.environ["MIGRATE_HANDOFF_FD"])
            """,
            cwd=directory,
        )
        yield self.ended(process)
        self.assertEqual(process.logTail(), [directory, "[0, 1, 2, 3, 4, 5]", "3"])

    def test_spawnFailure(self) -> None:
        """
        A successor that cannot be started at all raises.
        """
        self.assertRaises(
            OSError,
            spawnSuccessor,
            self.reactor,
            ["/nonexistent/python"],
            env={},
            handoffSocket=self.theirs,
        )


class InheritedHandoffTests(SynchronousTestCase):
    """
    L{inheritedHandoff} reads and checks what the successor inherited.
    """

    def setUp(self) -> None:
        self.handoff, other = _socketpair(self)
        self.stdout, self.stderr = os.pipe()
        self.addCleanup(os.close, self.stdout)
        self.addCleanup(os.close, self.stderr)
        for fd in (self.handoff.fileno(), self.stdout, self.stderr):
            os.set_inheritable(fd, True)

    def environ(self, handoff: object = None, output: object = None) -> dict[str, str]:
        environ = {"PATH": "/bin"}
        if handoff is not None:
            environ[HANDOFF_FD_VARIABLE] = str(handoff)
        if output is not None:
            environ[OUTPUT_FDS_VARIABLE] = str(output)
        return environ

    def valid(self) -> dict[str, str]:
        return self.environ(self.handoff.fileno(), f"{self.stdout},{self.stderr}")

    def assertRejected(self, environ: dict[str, str], *fragments: str) -> None:
        exception = self.assertRaises(
            HandoffEnvironmentError, inheritedHandoff, environ
        )
        self.assertIsInstance(exception, ValueError)
        for fragment in fragments:
            self.assertIn(fragment, str(exception))
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_absent(self) -> None:
        """
        Without the variables this process is not a successor.
        """
        environ = self.environ()
        self.assertIsNone(inheritedHandoff(environ))
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_inherited(self) -> None:
        """
        The descriptors are read, the variables removed and the descriptors
        made close-on-exec.
        """
        environ = self.valid()
        handoff = inheritedHandoff(environ)
        self.assertEqual(
            handoff,
            InheritedHandoff(self.handoff.fileno(), (self.stdout, self.stderr)),
        )
        self.assertEqual(environ, {"PATH": "/bin"})
        for fd in (self.handoff.fileno(), self.stdout, self.stderr):
            self.assertFalse(os.get_inheritable(fd))

    def test_osEnviron(self) -> None:
        """
        By default the variables come from, and are removed from,
        L{os.environ}.
        """
        environ = self.valid()
        self.patch(os, "environ", environ)
        self.assertIsNotNone(inheritedHandoff())
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_withoutOutput(self) -> None:
        """
        A hand-off without output descriptors is accepted; taking over the
        output then does nothing.
        """
        handoff = inheritedHandoff(self.environ(self.handoff.fileno()))
        assert handoff is not None
        self.assertIsNone(handoff.outputDescriptors)
        handoff.takeOverOutput()

    def test_outputWithoutHandoff(self) -> None:
        """
        Output descriptors without a hand-off descriptor are an error.
        """
        self.assertRejected(
            self.environ(output=f"{self.stdout},{self.stderr}"),
            HANDOFF_FD_VARIABLE,
            "is not",
        )

    def test_notNumbers(self) -> None:
        """
        Descriptors must be plain decimal numbers.
        """
        for bad in ["three", "", " 3", "3 ", "-3", "+3", "\u0663", "3.0", "9" * 20]:
            self.assertRejected(self.environ(bad), HANDOFF_FD_VARIABLE, repr(bad))

    def test_standardDescriptors(self) -> None:
        """
        Standard input, output and error are never the hand-off or the
        output descriptors.
        """
        self.assertRejected(self.environ("2"), "standard")
        self.assertRejected(
            self.environ(self.handoff.fileno(), f"1,{self.stderr}"), "standard"
        )

    def test_notOpen(self) -> None:
        """
        A descriptor that is not open is an error.
        """
        read, write = os.pipe()
        os.close(read)
        os.close(write)
        self.assertRejected(self.environ(read), str(read), "not open")
        self.assertRejected(
            self.environ(self.handoff.fileno(), f"{self.stdout},{read}"),
            OUTPUT_FDS_VARIABLE,
            "not open",
        )

    def test_handoffNotSocket(self) -> None:
        """
        The hand-off descriptor must be a socket.
        """
        self.assertRejected(self.environ(self.stdout), "not a socket")

    def test_outputNotPair(self) -> None:
        """
        Output descriptors come in a pair of distinct descriptors, distinct
        from the hand-off.
        """
        handoff = self.handoff.fileno()
        self.assertRejected(self.environ(handoff, f"{self.stdout}"), "two")
        self.assertRejected(
            self.environ(handoff, f"{self.stdout},{self.stderr},{self.stderr}"),
            "two",
        )
        self.assertRejected(self.environ(handoff, f"{self.stdout},x"), "'x'")
        self.assertRejected(
            self.environ(handoff, f"{self.stdout},{self.stdout}"), "twice"
        )
        self.assertRejected(self.environ(handoff, f"{self.stdout},{handoff}"), "twice")


class KillNowTests(SynchronousTestCase):
    """
    L{SuccessorProcess.killNow} kills a successor and waits until it is
    dead, without reaping it.
    """

    def test_deadNotReaped(self) -> None:
        """
        After it returns C{True}, the process is dead (a zombie until its
        parent reaps it, as the reactor does).
        """
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(child.wait)

        class Transport:
            pid = child.pid

            def signalProcess(self, name: str) -> None:
                os.kill(child.pid, getattr(signal, "SIG" + name))

        class Protocol:
            exit = None

        successor = _successor.SuccessorProcess(
            child.pid, Transport(), Protocol()  # type: ignore[arg-type]
        )
        self.assertTrue(successor.killNow(10.0))
        with open("/proc/{}/stat".format(child.pid)) as stat:
            self.assertEqual(stat.read().rsplit(")", 1)[1].split()[0], "Z")
        self.assertEqual(child.wait(), -signal.SIGKILL)
