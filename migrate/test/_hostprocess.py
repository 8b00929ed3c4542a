"""
Running real C{twistd migrate-host} processes, the control CLI and line
clients for integration tests, with bounded waits and full cleanup.

The host processes are the benchmark's (L{migrate.bench._process}), with
what a test needs on top: among it, a L{Watchdog} beside each, so that a
test process that dies without its cleanups (killed, or a crash) takes
its hosts with it instead of leaving them serving.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any, Callable

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.filepath import FilePath

from ..bench import _process
from ..bench._process import (
    SOURCE_ROOT,
    HostFailed,
    ProcessOutput,
    freePort,
    lastJSON,
    pidAlive,
)

__all__ = [
    "CLITimedOut",
    "SOURCE_ROOT",
    "HostExited",
    "HostProcess",
    "LiveAppMixin",
    "LineClient",
    "Watchdog",
    "ProcessOutput",
    "connectLineClient",
    "fields",
    "freePort",
    "largestSendQueue",
    "lastJSON",
    "pidAlive",
    "runCLI",
    "waitFor",
    "writeModule",
]


def writeModule(directory: FilePath[str], name: str, source: str) -> None:
    """
    Write a Python module C{name} into C{directory}, making sure a reload
    in the same second sees the change (stale bytecode otherwise).
    """
    path = directory.child(name + ".py")
    path.setContent(textwrap.dedent(source).encode("utf-8"))
    cache = directory.child("__pycache__")
    if cache.exists():
        cache.remove()


class HostExited(HostFailed, AssertionError):
    """
    The host process ended while a test waited for it.
    """


def waitFor(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Deferred[Any]:
    """
    Poll C{condition} (which may return a Deferred) until it returns a true
    value; fail after C{timeout} seconds (L{migrate.bench._process.waitFor}
    on the global reactor).
    """
    return _process.waitFor(_globalReactor, condition, timeout, what, interval)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SOURCE_ROOT
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for key in list(env):
        if key.startswith("MIGRATE_"):
            del env[key]
    return env


class CLITimedOut(AssertionError):
    """
    The control CLI did not end in time, and was killed.

    @ivar pid: its process.
    """

    pid: int = 0


@inlineCallbacks
def runCLI(arguments: list[str], *, cwd: str, timeout: float = 120.0) -> Any:
    """
    Run C{python -m migrate ARGUMENTS}; fire with (exit code, stdout text,
    stderr text), or fail with L{CLITimedOut} (having killed it) if it has
    not ended after C{timeout} seconds.
    """
    out = bytearray()
    err = bytearray()

    class Split(ProcessOutput):
        def childDataReceived(self, fd: int, data: bytes) -> None:
            (out if fd == 1 else err).extend(data)

    protocol = Split()
    process = _globalReactor.spawnProcess(
        protocol,
        sys.executable,
        [sys.executable, "-m", "migrate"] + arguments,
        env=_environment(),
        path=cwd,
    )
    timedOut: list[bool] = []

    def kill() -> None:
        timedOut.append(True)
        try:
            process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    timer = _globalReactor.callLater(timeout, kill)
    code = yield protocol.ended
    if timer.active():
        timer.cancel()
    if timedOut:
        failure = CLITimedOut(
            "python -m migrate {} did not end within {} s (killed); it wrote:\n"
            "{}{}".format(
                " ".join(arguments),
                timeout,
                out.decode("utf-8", "replace"),
                err.decode("utf-8", "replace"),
            )
        )
        failure.pid = process.pid
        raise failure
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


_WATCHDOG = textwrap.dedent("""
    import os, signal, sys
    # Out of the test process's group and deaf to its signals (Ctrl-C), so
    # that it outlives the test process; it ends when its input does.
    os.setsid()
    for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(each, signal.SIG_IGN)
    if not sys.stdin.buffer.read(1):
        # The test process died without releasing the host: end its
        # session (the host and every successor), and the first process
        # itself in case it had not made its session yet.
        pid = int(sys.argv[1])
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
    """)


class Watchdog(ProcessProtocol):
    """
    A small process that kills a host's whole session when the test
    process dies without having released it.

    The watchdog waits for its standard input, a pipe only the test
    process holds: the kernel closes it whenever the test process ends,
    C{SIGKILL} included.  An end without the release byte means the test
    process died: the watchdog kills the session.  Nothing changes in the
    host itself (unlike C{PR_SET_PDEATHSIG}, which would cover only the
    first process: a successor's parent is the old host, which exits
    after every hand-off), and the lineage stays in the session the
    launcher made (L{migrate.bench._process.LAUNCHER}).

    @ivar ended: fires once the watchdog has exited.
    """

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    @classmethod
    def watch(cls, pid: int) -> "Watchdog":
        """
        Start a watchdog for the session that process C{pid} leads.
        """
        watchdog = cls()
        _globalReactor.spawnProcess(
            watchdog,
            sys.executable,
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pid)],
            env={},
            childFDs={0: "w"},
        )
        return watchdog

    def release(self) -> Deferred[None]:
        """
        The test ends the host itself: let the watchdog go without killing
        anything (the session's number may be reused by then).

        @return: L{ended}.
        """
        if not self.ended.called:
            assert self.transport is not None
            self.transport.write(b"x")
            self.transport.closeStdin()
        return self.ended

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class HostProcess(_process.HostProcess):
    """
    A L{migrate.bench._process.HostProcess} for one test: on the global
    reactor, ended and its working directory removed when the test ends,
    its output collected through pipes (echoed with C{MIGRATE_TEST_ECHO}
    set), and controlled through C{python -m migrate} run as a subprocess,
    as an operator would.
    """

    def __init__(
        self,
        testCase: Any,
        arguments: list[str],
        *,
        workdir: FilePath[str] | None = None,
        twistdArguments: list[str] | None = None,
        extraEnv: dict[str, str] | None = None,
        childFDs: dict[int, int | str] | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        """
        @param testCase: the test; it ends the host when it ends.
        @param arguments: see L{migrate.bench._process.HostProcess}, as are
            the other parameters.
        """
        super().__init__(
            _globalReactor,
            arguments,
            workdir=workdir,
            prefix="migrate-test-",
            twistdArguments=twistdArguments,
            extraEnv=extraEnv,
            childFDs=childFDs,
            wrapper=wrapper,
            logToFile=False,
            echo=bool(os.environ.get("MIGRATE_TEST_ECHO")),
        )
        self.testCase = testCase
        self.watchdogs: list[Watchdog] = []
        testCase.addCleanup(self.stopAll)

    def spawn(self) -> Deferred[int]:
        """
        Start the host, with a L{Watchdog} for its session.
        """
        ended = super().spawn()
        assert self.sessionId is not None
        self.watchdogs.append(Watchdog.watch(self.sessionId))
        return ended

    def start(self, timeout: float = 30.0) -> Deferred[dict[str, Any]]:
        """
        Start the host; fire with its status once its control channel
        answers.
        """
        return super().start(timeout)

    def exitedEarly(self) -> HostFailed:
        return HostExited("host exited early:\n" + self.output())

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
        return self.noteStatus(lastJSON(out))

    @inlineCallbacks
    def upgrade(
        self, *extra: str, progress: Callable[[str], None] | None = None
    ) -> Any:
        """
        Run C{upgrade --json}; fire with (exit code, report, stderr).
        """
        code, out, err = yield runCLI(
            ["upgrade", "--control", self.control, "--json"] + list(extra),
            cwd=self.workdir.path,
        )
        if progress is not None:
            for line in err.splitlines():
                progress(line)
        try:
            report = lastJSON(out)
        except ValueError:
            raise AssertionError(
                "upgrade printed no JSON ({}):\n{}\n{}\nhost output:\n{}".format(
                    code, out, err, self.output()
                )
            )
        self.noteReport(code, report)
        return code, report, err

    def stopAll(self) -> Deferred[None] | None:
        """
        End every process of this host's session and remove its working
        directory (if it made it), once they are gone.
        """
        if self.sessionId is None:
            self.cleanup()
            return None
        self.kill()
        d: Deferred[None] = Deferred()
        self.ended.addBoth(lambda _: d.callback(None))
        d.addCallback(lambda _: self.cleanup())
        return d.addCallback(lambda _: self.releaseWatchdogs())

    def releaseWatchdogs(self) -> Deferred[None]:
        """
        Let every watchdog go (the host is ended); fire once they have.
        """
        released = [each.release() for each in self.watchdogs]
        self.watchdogs = []
        return gatherResults(released).addCallback(lambda _: None)


class LineClient(LineReceiver):
    """
    A client that records every line it receives and can wait for the
    next ones.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.closed: Deferred[None] = Deferred()
        self.lostReason: Any = None
        self._waiters: list[tuple[int, Deferred[list[bytes]]]] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.rstrip(b"\r"))
        self._fire()

    def connectionLost(self, reason: Any = None) -> None:
        self.lostReason = reason
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
