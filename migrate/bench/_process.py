"""
Running a real C{twistd -n migrate-host} for the benchmark: start it in
its own session, talk to its control socket (status, upgrade), measure its
processes and end every process of its lineage.

The benchmark's own small launcher: it does not depend on trial or on the
test suite's helpers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

import migrate

from . import _app
from ._app import APP_MODULE

__all__ = [
    "HostProcess",
    "twistdCommandLine",
    "HostFailed",
    "freePort",
    "pidAlive",
    "readRSS",
    "waitFor",
    "SOURCE_ROOT",
]

#: the directory holding the C{migrate} package the benchmark runs
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(migrate.__file__)))

#: how twistd is started: in a new session, so that the whole lineage of
#: host processes can be ended together; a successor, a preflight check or
#: a re-executed image (already the session's leader) stays in it
_LAUNCHER = textwrap.dedent("""
    import os, sys
    if os.getsid(0) != os.getpid() and not any(name in os.environ for name in (
            "MIGRATE_HANDOFF_FD", "MIGRATE_REEXEC_STATE_FD",
            "MIGRATE_REEXEC_PREFLIGHT")):
        os.setsid()
    from twisted.scripts.twistd import run
    sys.argv[0] = "twistd"
    run()
    """)


#: names the reactor the hosts run on (C{twistd --reactor=NAME}: epoll,
#: poll, select, asyncio), so that the tests and the benchmark can be run on
#: each; unset, twistd's default
REACTOR_VARIABLE = "MIGRATE_TEST_REACTOR"


def twistdCommandLine(
    pidfile: str, twistdArguments: list[str], hostArguments: list[str]
) -> list[str]:
    """
    The command line of a C{twistd -n migrate-host} in its own session,
    logging to its standard output, on the reactor named by
    C{$MIGRATE_TEST_REACTOR} if set.

    @param pidfile: twistd's pidfile.
    @param twistdArguments: more options for twistd itself.
    @param hostArguments: the options of C{migrate-host} (and a plugin's).
    """
    reactor = os.environ.get(REACTOR_VARIABLE)
    return (
        [sys.executable, "-c", _LAUNCHER, "-n", "--pidfile", pidfile, "--logfile", "-"]
        + (["--reactor=" + reactor] if reactor else [])
        + twistdArguments
        + ["migrate-host"]
        + hostArguments
    )


class HostFailed(Exception):
    """
    The host did not start, answer or stop as expected.
    """


def freePort() -> int:
    """
    A loopback TCP port nobody listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pidAlive(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie.
    """
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def readRSS(pid: int | None) -> int | None:
    """
    The resident set size of process C{pid} in bytes (C{VmRSS} in
    C{/proc/PID/status}), or L{None} if it is gone.
    """
    if pid is None:
        return None
    try:
        with open("/proc/{}/status".format(pid)) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None


def waitFor(
    reactor: Any,
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> Deferred[Any]:
    """
    Call C{condition} (which may return a L{Deferred}) every C{interval}
    seconds until it gives a true value; fail with L{HostFailed} after
    C{timeout} seconds.
    """

    @inlineCallbacks
    def loop() -> Any:
        deadline = reactor.seconds() + timeout
        while True:
            try:
                result = yield condition()
            except HostFailed:
                raise
            except Exception:
                result = None
            if result:
                return result
            if reactor.seconds() > deadline:
                raise HostFailed(
                    "timed out after {} s waiting for {}".format(timeout, what)
                )
            yield deferLater(reactor, interval, lambda: None)

    d: Deferred[Any] = loop()
    return d


class _Ended(ProcessProtocol):
    """
    Notices when the first process of a host ends.
    """

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        code = 0
        if reason.check(ProcessTerminated):
            value: Any = reason.value
            code = value.exitCode
            if code is None:
                code = -(value.signal or 1)
        self.ended.callback(code)


class _ProgressLines(io.StringIO):
    """
    A text stream passing each complete line to a callable.
    """

    def __init__(self, onLine: Callable[[str], None]) -> None:
        super().__init__()
        self.onLine = onLine
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self.onLine(line)
        return len(text)


class HostProcess:
    """
    One C{twistd -n migrate-host} serving L{migrate.bench._app} (copied
    into its working directory) or another app on a loopback port, with its
    log in a file.

    @ivar workdir: its working directory (control socket, pidfile, log).
    @ivar pids: every process of its lineage seen so far.
    @ivar servingPid: the process serving now, as far as we know.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        strategy: str,
        *,
        app: str | None = None,
        backlog: int = 4096,
        workdir: str | None = None,
        extra: list[str] | None = None,
        twistdArguments: list[str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.strategy = strategy
        self.app = app or "{}:makeFactory".format(APP_MODULE)
        self.backlog = backlog
        self.ownWorkdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="migrate-bench-", dir="/tmp")
        if app is None:
            shutil.copyfile(
                _app.__file__, os.path.join(self.workdir, APP_MODULE + ".py")
            )
        self.control = os.path.join(self.workdir, "control.sock")
        self.pidfile = os.path.join(self.workdir, "twistd.pid")
        self.logPath = os.path.join(self.workdir, "host.log")
        self.extra = list(extra or [])
        self.twistdArguments = list(twistdArguments or [])
        self.pids: set[int] = set()
        self.sessionIds: list[int] = []
        self.servingPid: int | None = None
        self._ended: _Ended | None = None

    @property
    def listen(self) -> str:
        """
        The endpoint description the host listens on.
        """
        return "tcp:{}:interface=127.0.0.1:backlog={}".format(self.port, self.backlog)

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [self.workdir, SOURCE_ROOT]
            + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def start(self, timeout: float = 60.0) -> Deferred[dict[str, Any]]:
        """
        Start the host; fire with its status once its control channel
        answers.
        """
        argv = twistdCommandLine(
            self.pidfile,
            self.twistdArguments,
            [
                "--control",
                self.control,
                "--app",
                self.app,
                "--listen",
                self.listen,
                "--strategy",
                self.strategy,
            ]
            + self.extra,
        )
        log = os.open(self.logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._ended = _Ended()
            process = self.reactor.spawnProcess(
                self._ended,
                sys.executable,
                argv,
                env=self._environment(),
                path=self.workdir,
                childFDs={0: "w", 1: log, 2: log},
            )
        finally:
            os.close(log)
        self.sessionIds.append(process.pid)
        self.pids.add(process.pid)
        ended = self._ended

        def answering() -> Any:
            if ended.ended.called:
                raise HostFailed("the host exited early:\n" + self.logTail())
            if not os.path.exists(self.control):
                return None
            return self.status()

        d = waitFor(self.reactor, answering, timeout, "the host to answer")

        def started(status: dict[str, Any]) -> dict[str, Any]:
            self.servingPid = int(status["pid"])
            self.pids.add(self.servingPid)
            return status

        return d.addCallback(started)

    def logTail(self, lines: int = 30) -> str:
        """
        The end of the host's log.
        """
        try:
            with open(self.logPath, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 20000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def status(self) -> Deferred[dict[str, Any]]:
        """
        The host's status (the control channel's Status JSON).
        """
        from .._cli import connectControl

        d: Deferred[Any] = connectControl(
            self.reactor, self.control, lambda message: None
        )

        def ask(client: Any) -> Deferred[dict[str, Any]]:
            answer: Deferred[dict[str, Any]] = client.status()
            answer.addBoth(lambda result: (client.disconnect(), result)[1])
            return answer

        d.addCallback(ask)

        def note(status: dict[str, Any]) -> dict[str, Any]:
            self.pids.add(int(status["pid"]))
            for each in status.get("draining", []):
                self.pids.add(int(each["pid"]))
            return status

        result: Deferred[dict[str, Any]] = d.addCallback(note)
        return result

    def upgrade(
        self,
        strategy: str | None,
        progress: Callable[[str], None],
        timeout: float = 300.0,
    ) -> Deferred[tuple[int, dict[str, Any]]]:
        """
        Run C{python -m migrate upgrade --json} (its code, in this process).

        @return: a L{Deferred} firing with (exit status, report JSON).
        """
        from .._cli import run

        argv = [
            "upgrade",
            "--control",
            self.control,
            "--json",
            "--timeout",
            str(timeout),
        ]
        if strategy is not None:
            argv += ["--strategy", strategy]
        out = io.StringIO()
        d = run(self.reactor, argv, stdout=out, stderr=_ProgressLines(progress))

        def parse(code: int) -> tuple[int, dict[str, Any]]:
            lines = [line for line in out.getvalue().splitlines() if line.strip()]
            try:
                report = json.loads(lines[-1])
            except (IndexError, ValueError):
                raise HostFailed(
                    "upgrade printed no report (exit {}):\n{}".format(
                        code, self.logTail()
                    )
                )
            for key in ("oldPid", "newPid"):
                if report.get(key):
                    self.pids.add(int(report[key]))
            if code == 0 and report.get("newPid"):
                self.servingPid = int(report["newPid"])
            return code, report

        return d.addCallback(parse)

    def livePids(self) -> list[int]:
        """
        The processes of this host's lineage still alive.
        """
        return sorted(pid for pid in self.pids if pidAlive(pid))

    def stop(self, timeout: float = 10.0) -> Deferred[None]:
        """
        End every process of the lineage: C{SIGTERM}, then C{SIGKILL} after
        C{timeout} seconds.
        """
        for pid in self.livePids():
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

        def gone() -> bool:
            return not self.livePids()

        d = waitFor(self.reactor, gone, timeout, "the host to exit")

        def force(failure: Failure) -> None:
            failure.trap(HostFailed)
            self.kill()

        return d.addCallbacks(lambda _: None, force)

    def kill(self) -> None:
        """
        C{SIGKILL} every process of the lineage at once.
        """
        for session in self.sessionIds:
            try:
                os.killpg(session, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.livePids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def cleanup(self) -> None:
        """
        Kill what is left and remove the working directory (if ours).
        """
        self.kill()
        if self.ownWorkdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
