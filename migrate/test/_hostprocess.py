"""
Running real C{twistd migrate-host} processes, the control CLI and line
clients for integration tests, with bounded waits and full cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
from typing import Any, Callable

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.filepath import FilePath

from ..bench import _process
from ..bench._process import freePort, pidAlive

__all__ = [
    "HostExited",
    "HostProcess",
    "LiveAppMixin",
    "LineClient",
    "connectLineClient",
    "fields",
    "freePort",
    "largestSendQueue",
    "lastJSON",
    "pidAlive",
    "runCLI",
    "waitFor",
    "writeModule",
    "SOURCE_ROOT",
]

#: the directory holding the C{migrate} package under test, and how twistd
#: is started (in its own session, so that the whole lineage of host
#: processes can be ended together): the benchmark's, so that both run
#: hosts the same way
SOURCE_ROOT = _process.SOURCE_ROOT
_LAUNCHER = _process._LAUNCHER


def writeModule(directory: FilePath, name: str, source: str) -> None:
    """
    Write a Python module C{name} into C{directory}, making sure a reload
    in the same second sees the change (stale bytecode otherwise).
    """
    path = directory.child(name + ".py")
    path.setContent(textwrap.dedent(source).encode("utf-8"))
    cache = directory.child("__pycache__")
    if cache.exists():
        cache.remove()


class HostExited(AssertionError):
    """
    The host process ended while a test waited for it.
    """


@inlineCallbacks
def waitFor(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """
    Poll C{condition} (which may return a Deferred) until it returns a true
    value; fail after C{timeout} seconds.
    """
    deadline = _globalReactor.seconds() + timeout
    while True:
        try:
            result = yield condition()
        except HostExited:
            raise
        except Exception:
            result = None
            if _globalReactor.seconds() > deadline:
                raise
        if result:
            return result
        if _globalReactor.seconds() > deadline:
            raise AssertionError(
                "timed out after {} s waiting for {}".format(timeout, what)
            )
        yield deferLater(_globalReactor, interval, lambda: None)


class _Collect(ProcessProtocol):
    def __init__(self, echo: bool = False) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.echo = echo

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        if self.echo:
            sys.stderr.write(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(ProcessTerminated) else 0
        if reason.check(ProcessTerminated) and code is None:
            code = -(reason.value.signal or 1)
        self.ended.callback(code)


def _environment(pythonPath: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(pythonPath + [SOURCE_ROOT])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for key in list(env):
        if key.startswith("MIGRATE_"):
            del env[key]
    return env


@inlineCallbacks
def runCLI(arguments: list[str], *, cwd: str, timeout: float = 120.0) -> Any:
    """
    Run C{python -m migrate ARGUMENTS}; fire with (exit code, stdout text,
    stderr text).
    """
    collect = _Collect()
    out = bytearray()
    err = bytearray()

    class Split(_Collect):
        def childDataReceived(self, fd: int, data: bytes) -> None:
            (out if fd == 1 else err).extend(data)

    protocol = Split()
    _globalReactor.spawnProcess(
        protocol,
        sys.executable,
        [sys.executable, "-m", "migrate"] + arguments,
        env=_environment([]),
        path=cwd,
    )
    timer = _globalReactor.callLater(timeout, lambda: None)
    code = yield protocol.ended
    if timer.active():
        timer.cancel()
    del collect
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def lastJSON(text: str) -> Any:
    """
    The JSON object on the last non-empty line of C{text}.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise AssertionError("no output")
    return json.loads(lines[-1])


class HostProcess:
    """
    A C{twistd -n migrate-host} in its own session, for one test.

    @ivar workdir: its working directory (control socket, pidfile, app code).
    """

    def __init__(
        self,
        testCase: Any,
        arguments: list[str],
        *,
        workdir: FilePath | None = None,
        twistdArguments: list[str] | None = None,
        extraEnv: dict[str, str] | None = None,
        childFDs: dict[int, int | str] | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        """
        @param extraEnv: more environment variables for the first process.
        @param childFDs: more descriptors for the first process (0, 1 and 2
            are always C{"w"}, C{"r"}, C{"r"} unless given).
        @param wrapper: a command line that runs first and execs the rest
            (argv after its own), as a supervisor would; successors re-run
            only the twistd command line.
        """
        self.testCase = testCase
        self.extraEnv = extraEnv or {}
        self.childFDs = childFDs or {}
        self.wrapper = wrapper or []
        if workdir is None:
            # Short: a Unix socket path must fit in 108 bytes, and trial's
            # own temporary paths are longer.
            workdir = FilePath(tempfile.mkdtemp(prefix="migrate-test-", dir="/tmp"))
            testCase.addCleanup(shutil.rmtree, workdir.path, True)
        self.workdir = workdir
        if not self.workdir.exists():
            self.workdir.makedirs()
        self.control = self.workdir.child("control.sock").path
        self.pidfile = self.workdir.child("twistd.pid").path
        self.arguments = arguments
        self.twistdArguments = twistdArguments or []
        self.protocol = _Collect(echo=bool(os.environ.get("MIGRATE_TEST_ECHO")))
        self.sessionId: int | None = None
        self.seenPids: set[int] = set()
        testCase.addCleanup(self.stopAll)

    def start(self) -> Deferred[Any]:
        """
        Start the host; fire with its status once its control channel
        answers.
        """
        argv = _process.twistdCommandLine(
            self.pidfile,
            self.twistdArguments,
            ["--control", self.control] + self.arguments,
        )
        argv = self.wrapper + argv
        process = _globalReactor.spawnProcess(
            self.protocol,
            argv[0],
            argv,
            env=dict(_environment([self.workdir.path]), **self.extraEnv),
            path=self.workdir.path,
            childFDs={0: "w", 1: "r", 2: "r", **self.childFDs},
        )
        self.sessionId = process.pid
        self.seenPids.add(process.pid)
        return waitFor(
            self._statusOrNone, what="the host to answer on its control socket"
        )

    def output(self) -> str:
        """
        What the first process (and its successors) wrote so far.
        """
        return self.protocol.output.decode("utf-8", "replace")

    @inlineCallbacks
    def _statusOrNone(self) -> Any:
        if self.protocol.ended.called:
            raise HostExited("host exited early:\n" + self.output())
        if not os.path.exists(self.control):
            return None
        code, out, err = yield runCLI(
            ["status", "--control", self.control, "--json"], cwd=self.workdir.path
        )
        if code != 0:
            return None
        return lastJSON(out)

    @inlineCallbacks
    def status(self) -> Any:
        """
        Fire with C{status --json}.
        """
        code, out, err = yield runCLI(
            ["status", "--control", self.control, "--json"], cwd=self.workdir.path
        )
        if code != 0:
            raise AssertionError("status failed ({}): {}{}".format(code, out, err))
        result = lastJSON(out)
        self.seenPids.add(result["pid"])
        for each in result.get("draining", []):
            self.seenPids.add(each["pid"])
        return result

    @inlineCallbacks
    def upgrade(self, *extra: str) -> Any:
        """
        Run C{upgrade --json}; fire with (exit code, report, stderr).
        """
        code, out, err = yield runCLI(
            ["upgrade", "--control", self.control, "--json"] + list(extra),
            cwd=self.workdir.path,
        )
        try:
            report = lastJSON(out)
        except (ValueError, AssertionError):
            raise AssertionError(
                "upgrade printed no JSON ({}):\n{}\n{}\nhost output:\n{}".format(
                    code, out, err, self.output()
                )
            )
        for key in ("oldPid", "newPid"):
            if report.get(key):
                self.seenPids.add(report[key])
        return code, report, err

    def stopAll(self) -> Deferred[Any] | None:
        """
        End every process of this host's session.
        """
        if self.sessionId is None:
            return None
        for pid in [self.sessionId]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.seenPids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.protocol.ended.called:
            return None
        d: Deferred[Any] = Deferred()
        self.protocol.ended.addBoth(lambda _: d.callback(None))
        return d


class LineClient(LineReceiver):
    """
    A client that records every line it receives and can wait for the
    next ones.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.closed: Deferred[None] = Deferred()
        self._waiters: list[tuple[int, Deferred[list[bytes]]]] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.rstrip(b"\r"))
        self._fire()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)
        for count, waiter in self._waiters:
            if not waiter.called:
                waiter.errback(
                    AssertionError(
                        "connection closed; lines so far: {!r}".format(self.lines[-5:])
                    )
                )
        self._waiters = []

    def waitForLines(self, count: int, timeout: float = 30.0) -> Deferred[list[bytes]]:
        """
        Fire with all lines once at least C{count} arrived in total.
        """
        d: Deferred[list[bytes]] = Deferred()
        self._waiters.append((count, d))
        self._fire()

        def expire() -> None:
            if not d.called:
                d.errback(
                    AssertionError(
                        "timed out waiting for {} lines; have {}: {!r}".format(
                            count, len(self.lines), self.lines[-5:]
                        )
                    )
                )

        call = _globalReactor.callLater(timeout, expire)

        def stopTimer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        d.addBoth(stopTimer)
        return d

    def _fire(self) -> None:
        ready = [(c, d) for c, d in self._waiters if len(self.lines) >= c]
        self._waiters = [(c, d) for c, d in self._waiters if len(self.lines) < c]
        for count, waiter in ready:
            if not waiter.called:
                waiter.callback(list(self.lines))


def connectLineClient(
    port: int | None = None, path: str | None = None
) -> Deferred[LineClient]:
    """
    Connect a L{LineClient} to 127.0.0.1:C{port} or the Unix socket C{path}.
    """
    endpoint: Any
    if path is not None:
        endpoint = UNIXClientEndpoint(_globalReactor, path, timeout=10)
    else:
        assert port is not None
        endpoint = TCP4ClientEndpoint(_globalReactor, "127.0.0.1", port, timeout=10)
    connected: Deferred[LineClient] = endpoint.connect(Factory.forProtocol(LineClient))
    return connected


def largestSendQueue(port: int) -> int:
    """
    The most bytes the kernel holds unsent on any established connection
    from local TCP port C{port} (C{ss}'s Send-Q), 0 if there is none.

    A flood far larger than that means Twisted buffers the rest itself.
    """
    import subprocess

    out = subprocess.run(
        ["ss", "-tn", "state", "established", "( sport = :{} )".format(port)],
        capture_output=True,
        text=True,
    ).stdout
    queued = [0]
    for line in out.splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 2 and columns[1].isdigit():
            queued.append(int(columns[1]))
    return max(queued)


def fields(line: bytes) -> list[bytes]:
    """
    The space-separated fields of a reply line.
    """
    return line.split(b" ")


class LiveAppMixin:
    """
    For integration tests: a host running the module C{liveapp} (written by
    the test) on one loopback TCP port with a given strategy, and line
    clients talking to it.

    @cvar strategy: the C{--strategy} of the host.
    @cvar initialApp: the source of C{liveapp} the host starts with.
    """

    strategy: str
    initialApp: str

    @inlineCallbacks
    def startHost(
        self,
        *extra: str,
        app: str | None = None,
        twistdArguments: list[str] | None = None,
    ) -> Any:
        self.port = freePort()
        self.host = HostProcess(
            self,
            [
                "--app",
                "liveapp:makeFactory",
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(self.port),
                "--strategy",
                self.strategy,
            ]
            + list(extra),
            twistdArguments=twistdArguments,
        )
        writeModule(self.host.workdir, "liveapp", app or self.initialApp)
        status = yield self.host.start()
        return status

    @inlineCallbacks
    def exchange(self, client: LineClient, text: bytes) -> Any:
        """
        Send a line; fire with the fields of the reply.
        """
        before = len(client.lines)
        client.sendLine(text)
        lines = yield client.waitForLines(before + 1)
        return fields(lines[before])

    @inlineCallbacks
    def connectClients(self, count: int) -> Any:
        """
        Connect C{count} clients, each past its greeting.
        """
        clients = []
        for _ in range(count):
            client = yield connectLineClient(self.port)
            yield client.waitForLines(1)
            clients.append(client)
            self.addCleanup(client.transport.loseConnection)  # type: ignore[attr-defined]
        return clients
