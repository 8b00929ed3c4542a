"""
Tests for L{migrate._host._spawning}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from types import SimpleNamespace
from typing import Any, Generator
from unittest import SkipTest

from twisted.internet import process
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from .._host._priority import BACKGROUND_NICENESS, BackgroundStart
from .._host._spawning import prepareSpawning, spawnProcess


class _CountingDetector(process._FDDetector):
    """
    Twisted's detector, counting the listings it makes.
    """

    listings = 0

    def listdir(self, path: str) -> list[str]:  # type: ignore[override]
        self.listings += 1
        return os.listdir(path)


class PrepareSpawningTests(SynchronousTestCase):
    """
    L{prepareSpawning} makes Twisted's choice of how to list the open
    descriptors before the first child process is started.
    """

    def test_decidesOnce(self) -> None:
        """
        The first call decides (listing the descriptors more than once);
        from then on a listing lists once, and another call does nothing.
        """
        detector = _CountingDetector()
        self.assertTrue(prepareSpawning(detector))
        self.assertGreater(detector.listings, 1)
        detector.listings = 0
        self.assertFalse(prepareSpawning(detector))
        self.assertEqual(detector.listings, 0)
        detector._listOpenFDs()
        self.assertEqual(detector.listings, 1)

    def test_failureLogged(self) -> None:
        """
        A detector that fails is logged, and the host starts all the same.
        """

        class Broken:
            def _listOpenFDs(self) -> None:
                raise OSError("no /proc")

        self.assertFalse(prepareSpawning(Broken()))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


_REPORTER = """\
import json, os, sys
fds = []
for fd in range(int(sys.argv[1])):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
# Python's locale coercion changes os.environ: read the environment the
# process was executed with.
with open("/proc/self/environ", "rb") as environ:
    entries = [entry.decode() for entry in environ.read().split(bytes(1)) if entry]
report = dict(
    fds=fds,
    stats=dict((fd, list(os.fstat(fd)[1:3])) for fd in fds),
    cwd=os.getcwd(),
    argv=sys.argv[1:],
    env=dict(entry.split("=", 1) for entry in entries),
    pid=os.getpid(),
    nice=os.getpriority(os.PRIO_PROCESS, 0),
    policy=os.sched_getscheduler(0),
)
os.write(1, json.dumps(report).encode())
"""

# Starts a second thread, says "ready", waits for a line, and writes the
# nice value of each of its two threads.
_WAITER = """\
import os, sys, threading
tids = [threading.get_native_id()]
go = threading.Event()
def other():
    tids.append(threading.get_native_id())
    go.wait()
threading.Thread(target=other, daemon=True).start()
while len(tids) < 2:
    pass
os.write(1, b"ready\\n")
sys.stdin.readline()
os.write(1, (" ".join(str(os.getpriority(os.PRIO_PROCESS, t)) for t in tids) + "\\n").encode())
go.set()
"""


class _Collecting(ProcessProtocol):
    """
    Collects a child's standard output and error and says when it ended.
    """

    def __init__(self) -> None:
        self.output: dict[int, bytes] = {1: b"", 2: b""}
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output[childFD] = self.output.get(childFD, b"") + data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


def _twistedSpawn(reactor: Any, *args: Any, **kwargs: Any) -> Any:
    return reactor.spawnProcess(*args, **kwargs)


class _CountingListing:
    """
    Stands in for the detector's listing of open descriptors, and counts
    the listings.
    """

    def __init__(self, listing: Any) -> None:
        self.listing = listing
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.listing()


class SpawnProcessTests(TestCase):
    """
    L{spawnProcess} starts a real child with exactly the descriptors,
    environment, directory and signals Twisted's own start gives it,
    without listing this process's descriptors.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        detector = process.detector
        prepareSpawning(detector)
        self.listing = _CountingListing(detector._listOpenFDs)
        self.patch(detector, "_listOpenFDs", self.listing)

    def _descriptor(self, inheritable: bool) -> int:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        os.set_inheritable(read, inheritable)
        return read

    @inlineCallbacks
    def _start(
        self, executable: str, args: list[str], **kwargs: Any
    ) -> Generator[Any, Any, tuple[_Collecting, Failure]]:
        protocol = _Collecting()
        kwargs.setdefault("env", {"PATH": os.environ.get("PATH", "")})
        kwargs.setdefault("childFDs", {0: "w", 1: "r", 2: "r"})
        transport = spawnProcess(self.reactor, protocol, executable, args, **kwargs)
        self.assertIsNotNone(transport.pid)
        yield protocol.ended.addTimeout(30, self.reactor)
        assert protocol.reason is not None
        return protocol, protocol.reason

    @inlineCallbacks
    def _report(
        self, childFDs: dict[int, Any], **kwargs: Any
    ) -> Generator[Any, Any, dict[str, Any]]:
        stray = self._descriptor(inheritable=True)
        top = max([stray, *childFDs]) + 1
        protocol, reason = yield self._start(
            sys.executable,
            [sys.executable, "-c", _REPORTER, str(top)],
            childFDs=childFDs,
            **kwargs,
        )
        reason.trap(ProcessDone)
        report: dict[str, Any] = json.loads(protocol.output[1])
        self.assertNotIn(stray, report["fds"])
        return report

    @inlineCallbacks
    def test_onlyTheDescriptorsAskedFor(self) -> Generator[Any, Any, None]:
        """
        The child has the descriptors of C{childFDs} at their numbers, and
        not a descriptor of ours that is inheritable; Twisted's listing of
        our descriptors is not used.
        """
        passed = self._descriptor(inheritable=False)
        report = yield self._report({0: "w", 1: "r", 2: "r", 4: passed})
        self.assertEqual(report["fds"], [0, 1, 2, 4])
        self.assertEqual(report["stats"]["4"], list(os.fstat(passed)[1:3]))
        self.assertEqual(self.listing.calls, 0)

    @inlineCallbacks
    def _reportInPlace(
        self, **kwargs: Any
    ) -> Generator[Any, Any, tuple[int, dict[str, Any]]]:
        """
        Start the reporter without an environment; fire with its process ID
        (as the transport said it at the start) and its report.
        """
        protocol = _Collecting()
        transport = spawnProcess(
            self.reactor,
            protocol,
            sys.executable,
            [sys.executable, "-c", _REPORTER, "3"],
            env={},
            childFDs={0: "w", 1: "r", 2: "r"},
            **kwargs,
        )
        pid = transport.pid
        yield protocol.ended.addTimeout(30, self.reactor)
        assert protocol.reason is not None
        protocol.reason.trap(ProcessDone)
        return pid, json.loads(protocol.output[1])

    @inlineCallbacks
    def test_sameProcess(self) -> Generator[Any, Any, None]:
        """
        The transport's process ID is the command's: the trampoline runs it
        in place.
        """
        pid, report = yield self._reportInPlace()
        self.assertEqual(report["pid"], pid)

    @inlineCallbacks
    def test_sameNiceness(self) -> Generator[Any, Any, None]:
        """
        Without a background start the child runs at this process's
        priority.
        """
        report = yield self._report({0: "w", 1: "r", 2: "r"})
        self.assertEqual(report["nice"], os.getpriority(os.PRIO_PROCESS, 0))
        self.assertEqual(report["policy"], os.sched_getscheduler(0))

    @inlineCallbacks
    def test_background(self) -> Generator[Any, Any, None]:
        """
        With a background start, the command itself runs at the lowest
        priority (the trampoline set it before executing it), and the
        background start is told the child's process ID.
        """
        start = BackgroundStart(self.reactor, 0, 30.0)
        self.addCleanup(start.ended)
        pid, report = yield self._reportInPlace(background=start)
        self.assertEqual(start.pid, pid)
        self.assertEqual(report["nice"], BACKGROUND_NICENESS)
        self.assertEqual(report["policy"], os.SCHED_IDLE)

    @inlineCallbacks
    def _startWaiter(
        self,
    ) -> Generator[Any, Any, tuple[BackgroundStart, Any, _Collecting]]:
        """
        Start L{_WAITER} in the background, and wait until both its threads
        run.

        @return: the background start, the process transport and its
            protocol.
        """
        start = BackgroundStart.ifPossible(self.reactor, 300.0)
        if start is None:
            raise SkipTest("this process may not bring a child forward")
        self.addCleanup(start.ended)
        protocol = _Collecting()
        ready: Deferred[None] = Deferred()

        def received(childFD: int, data: bytes) -> None:
            _Collecting.childDataReceived(protocol, childFD, data)
            if b"ready\n" in protocol.output[1] and not ready.called:
                ready.callback(None)

        protocol.childDataReceived = received  # type: ignore[method-assign]
        transport = spawnProcess(
            self.reactor,
            protocol,
            sys.executable,
            [sys.executable, "-c", _WAITER],
            env={},
            childFDs={0: "w", 1: "r", 2: "r"},
            background=start,
        )
        yield ready.addTimeout(30, self.reactor)
        return start, transport, protocol

    @inlineCallbacks
    def test_broughtForward(self) -> Generator[Any, Any, None]:
        """
        A child started in the background and brought forward runs, every
        thread of it, at this process's priority again.
        """
        foreground = os.getpriority(os.PRIO_PROCESS, 0)
        start, transport, protocol = yield self._startWaiter()
        start.bringForward("the test says so")
        niceness = yield self._finishWaiter(transport, protocol)
        self.assertEqual(niceness, [foreground, foreground])

    @inlineCallbacks
    def _finishWaiter(
        self, transport: Any, protocol: _Collecting
    ) -> Generator[Any, Any, list[int]]:
        """
        Tell L{_WAITER} to go on, and wait until it ended.

        @return: the nice values its two threads reported.
        """
        transport.write(b"go\n")
        yield protocol.ended.addTimeout(30, self.reactor)
        assert protocol.reason is not None
        protocol.reason.trap(ProcessDone)
        reported = protocol.output[1].split(b"ready\n", 1)[1].split()
        return [int(each) for each in reported]

    @inlineCallbacks
    def test_sentBack(self) -> Generator[Any, Any, None]:
        """
        A child brought forward and sent back runs, every thread of it, at
        the lowest priority again, until it is brought forward again.
        """
        foreground = os.getpriority(os.PRIO_PROCESS, 0)
        start, transport, protocol = yield self._startWaiter()

        def priorities() -> list[tuple[int, int]]:
            return [
                (
                    os.getpriority(os.PRIO_PROCESS, int(thread)),
                    os.sched_getscheduler(int(thread)),
                )
                for thread in sorted(os.listdir("/proc/{}/task".format(start.pid)))
            ]

        background = (BACKGROUND_NICENESS, os.SCHED_IDLE)
        self.assertEqual(priorities(), [background, background])
        start.bringForward("its start is done")
        normal = (foreground, os.SCHED_OTHER)
        self.assertEqual(priorities(), [normal, normal])
        start.sendBack("it stages the pre-copy")
        self.assertEqual(priorities(), [background, background])
        start.bringForward("the freeze begins")
        niceness = yield self._finishWaiter(transport, protocol)
        self.assertEqual(niceness, [foreground, foreground])

    @inlineCallbacks
    def test_environmentDirectoryArguments(self) -> Generator[Any, Any, None]:
        """
        The child gets the environment as given (no C{LC_CTYPE} added by the
        trampoline's locale coercion), runs in C{path} and gets the
        command line whole.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        report = yield self._report(
            {0: "w", 1: "r", 2: "r"}, env={"LANG": "C", "A": "b"}, path=directory
        )
        self.assertEqual(report["env"], {"LANG": "C", "A": "b"})
        self.assertEqual(report["cwd"], os.path.abspath(directory))
        self.assertEqual(report["argv"][1:], [])

    @inlineCallbacks
    def test_givenLocaleKept(self) -> Generator[Any, Any, None]:
        """
        An C{LC_CTYPE} of C{C} in the environment reaches the child as it
        was, though Python coerces it in the trampoline.
        """
        report = yield self._report({0: "w", 1: "r", 2: "r"}, env={"LC_CTYPE": "C"})
        self.assertEqual(report["env"], {"LC_CTYPE": "C"})

    @inlineCallbacks
    def test_signalsAsTwistedLeavesThem(self) -> Generator[Any, Any, None]:
        """
        The child ignores the signals a child started by Twisted ignores,
        and not C{SIGPIPE} or C{SIGXFSZ}, which the trampoline's Python
        ignores.
        """
        cat = shutil.which("cat")
        if cat is None:
            raise SkipTest("no cat")
        ignored = []
        for start in [spawnProcess, _twistedSpawn]:
            protocol = _Collecting()
            start(
                self.reactor,
                protocol,
                cat,
                ["cat", "/proc/self/status"],
                env={},
                childFDs={0: "w", 1: "r", 2: "r"},
            )
            yield protocol.ended.addTimeout(30, self.reactor)
            assert protocol.reason is not None
            protocol.reason.trap(ProcessDone)
            [mask] = [
                line.split()[1]
                for line in protocol.output[1].decode().splitlines()
                if line.startswith("SigIgn:")
            ]
            ignored.append(int(mask, 16))
        self.assertEqual(ignored[0], ignored[1])
        for number in [signal.SIGPIPE, signal.SIGXFSZ]:
            self.assertFalse(ignored[0] & (1 << (number - 1)))

    @inlineCallbacks
    def test_lookedUpInPath(self) -> Generator[Any, Any, None]:
        """
        An executable without a slash is looked up in this process's
        C{PATH}.
        """
        if shutil.which("true") is None:
            raise SkipTest("no true")
        protocol, reason = yield self._start("true", ["true"], env={})
        reason.trap(ProcessDone)

    def test_missingExecutable(self) -> None:
        """
        A command that does not exist raises L{FileNotFoundError} and starts
        nothing; one that is not executable raises L{PermissionError}.
        """
        spawned: list[object] = []
        self.patch(self.reactor, "spawnProcess", lambda *a, **k: spawned.append(a))
        notExecutable = self.mktemp()
        with open(notExecutable, "w"):
            pass
        for executable, error in [
            (self.mktemp(), FileNotFoundError),
            ("no-such-command-for-migrate", FileNotFoundError),
            (notExecutable, PermissionError),
            (os.path.dirname(sys.executable), PermissionError),
        ]:
            self.assertRaises(
                error,
                spawnProcess,
                self.reactor,
                ProcessProtocol(),
                executable,
                [executable],
                env={},
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        self.assertEqual(spawned, [])

    def test_otherReactorAsked(self) -> None:
        """
        A reactor that is not one of Twisted's POSIX reactors is asked to
        spawn the command itself.
        """
        asked: list[tuple[Any, ...]] = []

        class Fake:
            def spawnProcess(self, *args: Any, **kwargs: Any) -> str:
                asked.append((args, kwargs))
                return "transport"

        protocol = ProcessProtocol()
        self.assertEqual(
            spawnProcess(
                Fake(), protocol, "prog", ["prog", "x"], env={"A": "b"}, childFDs={0: 0}
            ),
            "transport",
        )
        self.assertEqual(
            asked,
            [
                (
                    (protocol, "prog", ["prog", "x"]),
                    dict(env={"A": "b"}, path=None, childFDs={0: 0}),
                )
            ],
        )

    def test_notAnInterpreter(self) -> None:
        """
        When this process's executable is not a Python interpreter (a
        frozen application, a program embedding Python) or cannot be run,
        Twisted starts the command itself.
        """
        from .._host import _spawning

        asked: list[Any] = []

        def spawn(*args: Any, **kwargs: Any) -> str:
            asked.append(args)
            return "started"

        self.patch(self.reactor, "spawnProcess", spawn)
        for executable, frozen in [
            ("/usr/bin/uwsgi", False),
            (sys.executable, True),
            ("", False),
            (os.path.join(self.mktemp(), "python3"), False),
        ]:
            self.patch(
                _spawning,
                "sys",
                SimpleNamespace(
                    platform=sys.platform, executable=executable, frozen=frozen
                ),
            )
            del asked[:]
            spawnProcess(
                self.reactor,
                ProcessProtocol(),
                "/bin/true",
                ["true"],
                env={},
                childFDs={0: "w"},
            )
            [(protocol, executable_, args)] = asked
            self.assertEqual((executable_, args), ("/bin/true", ["true"]))

    def test_listingRestored(self) -> None:
        """
        Twisted's listing is back in place after a start, and after a start
        that failed.
        """
        detector = process.detector

        def failing(*args: Any, **kwargs: Any) -> None:
            self.assertIsNot(detector._listOpenFDs, self.listing)
            raise OSError("cannot")

        self.patch(self.reactor, "spawnProcess", failing)
        self.assertRaises(
            OSError,
            spawnProcess,
            self.reactor,
            ProcessProtocol(),
            sys.executable,
            [sys.executable],
            env={},
            childFDs={0: "w"},
        )
        self.assertIs(detector._listOpenFDs, self.listing)
