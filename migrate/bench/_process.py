# -*- test-case-name: migrate.test.test_benchload -*-
"""
Running a real C{twistd -n migrate-host}: start it in its own session, talk
to its control socket (status, upgrade), measure its processes and end
every process of its lineage.

L{HostProcess} serves the benchmark (L{BenchHost}) and the integration
tests, which layer their own features on it (C{migrate.test._hostprocess}:
a test case's cleanup, the CLI run as a subprocess).  This module depends
on neither trial nor the test suite.
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
from twisted.python.filepath import FilePath

import migrate

from . import _app
from ._app import APP_MODULE
from ._trace import TRACE_VARIABLE

__all__ = [
    "LAUNCHER",
    "SOURCE_ROOT",
    "BenchHost",
    "HostFailed",
    "HostProcess",
    "ProcessOutput",
    "freePort",
    "lastJSON",
    "pidAlive",
    "readCPU",
    "readRSS",
    "twistdCommandLine",
    "waitFor",
]

#: the directory holding the C{migrate} package the benchmark runs
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(migrate.__file__)))

LAUNCHER = textwrap.dedent("""
    import os, sys
    if os.getsid(0) != os.getpid() and not any(name in os.environ for name in (
            "MIGRATE_HANDOFF_FD", "MIGRATE_REEXEC_STATE_FD",
            "MIGRATE_REEXEC_PREFLIGHT")):
        os.setsid()
    if os.environ.get("TRACE_VARIABLE"):
        from migrate.bench._trace import traceThisProcess
        traceThisProcess(os.environ["TRACE_VARIABLE"])
    from twisted.scripts.twistd import run
    sys.argv[0] = "twistd"
    run()
    """).replace("TRACE_VARIABLE", TRACE_VARIABLE)
"""
How twistd is started (C{python -c LAUNCHER TWISTD-ARGUMENTS}): in a new
session, so that the whole lineage of host processes can be ended together;
a successor, a preflight check or a re-executed image (already the
session's leader) stays in it.  In a traced run (C{--trace}), each of them
records its reactor's turns (L{migrate.bench._trace}).
"""


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
        The host has no keeper (C{--keeper off}) unless these say otherwise:
        the caller follows the whole lineage itself, and measures and waits
        for each old process's end.
    """
    reactor = os.environ.get(REACTOR_VARIABLE)
    return (
        [sys.executable, "-c", LAUNCHER, "-n", "--pidfile", pidfile, "--logfile", "-"]
        + (["--reactor=" + reactor] if reactor else [])
        + twistdArguments
        + ["migrate-host", "--keeper", "off"]
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


def readCPU(pid: int | None = None) -> float | None:
    """
    The processor time (user and system, every thread) process C{pid} has
    used so far, in seconds (C{utime} and C{stime} in C{/proc/PID/stat}),
    or L{None} if it is gone; this process's own with no C{pid}.
    """
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in parentheses, may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    C{timeout} seconds (naming the error C{condition} last raised, if it
    did), or as soon as C{condition} raises L{HostFailed}.
    """

    @inlineCallbacks
    def loop() -> Any:
        deadline = reactor.seconds() + timeout
        lastError: Exception | None = None
        while True:
            try:
                result = yield condition()
            except HostFailed:
                raise
            except Exception as e:
                result, lastError = None, e
            else:
                lastError = None
            if result:
                return result
            if reactor.seconds() > deadline:
                raise HostFailed(
                    "timed out after {} s waiting for {}{}".format(
                        timeout,
                        what,
                        "" if lastError is None else " (last: {!r})".format(lastError),
                    )
                )
            yield deferLater(reactor, interval, lambda: None)

    d: Deferred[Any] = loop()
    return d


class ProcessOutput(ProcessProtocol):
    """
    Collects what a process writes through pipes and fires L{ended} with
    its exit status (negative: the signal that killed it).

    With pipes, Twisted reports the end only once every process holding
    them has closed them: for a host, its whole lineage, not only the first
    process.

    @ivar output: what it wrote on its standard output and error so far.
    @ivar ended: fires with its exit status.
    @ivar echo: copy the output to this process's standard error as it
        comes.
    """

    def __init__(self, echo: bool = False) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.echo = echo

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        if self.echo:
            sys.stderr.write(data.decode("utf-8", "replace"))

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
    A text stream keeping what is written and passing each complete line
    to a callable.
    """

    def __init__(self, onLine: Callable[[str], None]) -> None:
        super().__init__()
        self.onLine = onLine
        self._partial = ""

    def write(self, text: str) -> int:
        super().write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self.onLine(line)
        return len(text)


def lastJSON(text: str) -> Any:
    """
    The JSON value on the last non-empty line of C{text}.

    @raise ValueError: if there is none.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    return json.loads(lines[-1])


class HostProcess:
    """
    One C{twistd -n migrate-host} in its own session: started, asked for
    its status and upgraded through its control socket, and ended with
    every process of its lineage.

    The benchmark (L{BenchHost}) and the integration tests
    (C{migrate.test._hostprocess}) both run hosts with it.

    @ivar reactor: the reactor that runs it.
    @ivar arguments: the options of C{migrate-host} (and a plugin's), after
        C{--control}.
    @ivar workdir: its working directory (control socket, pidfile, log, an
        app's code), first on its C{PYTHONPATH}.
    @ivar control: its control socket.
    @ivar pidfile: twistd's pidfile.
    @ivar logPath: the file its output goes to, or L{None} when it goes
        through pipes into memory (see L{output}).
    @ivar pids: every process of its lineage seen so far.
    @ivar sessionIds: the first process of each start, each the leader of
        its own session.
    @ivar servingPid: the process serving now, as far as we know.
    """

    def __init__(
        self,
        reactor: Any,
        arguments: list[str],
        *,
        workdir: FilePath[str] | None = None,
        prefix: str = "migrate-host-",
        twistdArguments: list[str] | None = None,
        extraEnv: dict[str, str] | None = None,
        childFDs: dict[int, int | str] | None = None,
        wrapper: list[str] | None = None,
        logToFile: bool = True,
        echo: bool = False,
    ) -> None:
        """
        @param workdir: the working directory; a new one (removed by
            L{cleanup}) if L{None}.
        @param prefix: the name of a new working directory starts so.
        @param twistdArguments: more options for twistd itself.
        @param extraEnv: more environment variables for the first process.
        @param childFDs: more descriptors for the first process (0, 1 and 2
            are given unless set here).
        @param wrapper: a command line that runs first and execs the rest
            (argv after its own), as a supervisor would; successors re-run
            only the twistd command line.
        @param logToFile: write the output to C{host.log} in C{workdir}
            (else collect it through pipes).
        @param echo: with pipes, copy the output to this process's standard
            error as it comes.
        """
        self.reactor = reactor
        self.arguments = list(arguments)
        self.ownWorkdir = workdir is None
        if workdir is None:
            # Short: a Unix socket path must fit in 108 bytes.
            workdir = FilePath(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        elif not workdir.exists():
            workdir.makedirs()
        self.workdir = workdir
        self.control = workdir.child("control.sock").path
        self.pidfile = workdir.child("twistd.pid").path
        self.logPath = workdir.child("host.log").path if logToFile else None
        self.twistdArguments = list(twistdArguments or [])
        self.extraEnv = dict(extraEnv or {})
        self.childFDs = dict(childFDs or {})
        self.wrapper = list(wrapper or [])
        self.pids: set[int] = set()
        self.sessionIds: list[int] = []
        self.servingPid: int | None = None
        self._watcher = ProcessOutput(echo=echo)

    @property
    def ended(self) -> Deferred[int]:
        """
        Fires with the exit status of the last started first process once
        it has ended (with pipes: once its whole lineage has closed them).
        """
        return self._watcher.ended

    @property
    def sessionId(self) -> int | None:
        """
        The last started first process, leader of its session.
        """
        return self.sessionIds[-1] if self.sessionIds else None

    def environment(self) -> dict[str, str]:
        """
        The first process's environment: this one's without C{MIGRATE_*}
        (but a traced run's directory, L{TRACE_VARIABLE}), with the working
        directory and the C{migrate} source first on C{PYTHONPATH}.
        """
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MIGRATE_") or k == TRACE_VARIABLE
        }
        env["PYTHONPATH"] = os.pathsep.join(
            [self.workdir.path, SOURCE_ROOT]
            + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(self.extraEnv)
        return env

    def spawn(self) -> Deferred[int]:
        """
        Start the host without waiting for it to answer.

        @return: L{ended}.
        """
        argv = self.wrapper + twistdCommandLine(
            self.pidfile,
            self.twistdArguments,
            ["--control", self.control] + self.arguments,
        )
        if self._watcher.ended.called:
            self._watcher = ProcessOutput(echo=self._watcher.echo)
        childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        log = None
        if self.logPath is not None:
            log = os.open(self.logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            childFDs.update({1: log, 2: log})
        childFDs.update(self.childFDs)
        try:
            process = self.reactor.spawnProcess(
                self._watcher,
                argv[0],
                argv,
                env=self.environment(),
                path=self.workdir.path,
                childFDs=childFDs,
            )
        finally:
            if log is not None:
                os.close(log)
        self.sessionIds.append(process.pid)
        self.pids.add(process.pid)
        return self.ended

    def start(self, timeout: float = 60.0) -> Deferred[dict[str, Any]]:
        """
        Start the host; fire with its status once its control channel
        answers, or fail with L{HostFailed} if it exits first or does not
        answer within C{timeout} seconds.
        """
        ended = self.spawn()

        def answering() -> Any:
            if ended.called:
                raise self.exitedEarly()
            if not os.path.exists(self.control):
                return None
            return self.status()

        d = waitFor(self.reactor, answering, timeout, "the host to answer")

        def started(status: dict[str, Any]) -> dict[str, Any]:
            self.servingPid = int(status["pid"])
            self.pids.add(self.servingPid)
            return status

        return d.addCallback(started)

    def exitedEarly(self) -> HostFailed:
        """
        The error for a host that ended before it answered.
        """
        return HostFailed("the host exited early:\n" + self.logTail())

    def output(self) -> str:
        """
        Everything the host's lineage wrote so far.
        """
        if self.logPath is None:
            return self._watcher.output.decode("utf-8", "replace")
        try:
            with open(self.logPath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def logTail(self, lines: int = 30) -> str:
        """
        The end of the host's output.
        """
        if self.logPath is None:
            text = self.output()
        else:
            try:
                with open(self.logPath, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 20000))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                return ""
        return "\n".join(text.splitlines()[-lines:])

    def noteStatus(self, status: dict[str, Any]) -> dict[str, Any]:
        """
        Remember the processes a status names; return it.
        """
        self.pids.add(int(status["pid"]))
        for each in status.get("draining", []):
            self.pids.add(int(each["pid"]))
        return status

    def noteReport(self, code: int, report: dict[str, Any]) -> None:
        """
        Remember the processes an upgrade's report names, and which serves.
        """
        for key in ("oldPid", "newPid"):
            if report.get(key):
                self.pids.add(int(report[key]))
        if code == 0 and report.get("newPid"):
            self.servingPid = int(report["newPid"])

    def status(self) -> Deferred[dict[str, Any]]:
        """
        The host's status (the control channel's Status JSON), asked in
        this process.
        """
        from .._control._client import connectControl

        d: Deferred[Any] = connectControl(
            self.reactor, self.control, lambda message: None
        )

        def ask(client: Any) -> Deferred[dict[str, Any]]:
            answer: Deferred[dict[str, Any]] = client.status()
            answer.addBoth(lambda result: (client.disconnect(), result)[1])
            return answer

        d.addCallback(ask)
        result: Deferred[dict[str, Any]] = d.addCallback(self.noteStatus)
        return result

    def upgrade(
        self, *extra: str, progress: Callable[[str], None] | None = None
    ) -> Deferred[tuple[int, dict[str, Any], str]]:
        """
        Run C{python -m migrate upgrade --json EXTRA} (its code, in this
        process).

        @param extra: more options (C{--strategy}, C{--timeout}, ...).
        @param progress: called with each line of progress as it comes.
        @return: a L{Deferred} firing with (exit status, report JSON, what
            it wrote on standard error), or failing with L{HostFailed} if it
            printed no report.
        """
        from .._cli import run

        out = io.StringIO()
        err = _ProgressLines(progress or (lambda line: None))
        d = run(
            self.reactor,
            ["upgrade", "--control", self.control, "--json"] + list(extra),
            stdout=out,
            stderr=err,
        )

        def parse(code: int) -> tuple[int, dict[str, Any], str]:
            try:
                report = lastJSON(out.getvalue())
            except ValueError:
                raise HostFailed(
                    "upgrade printed no report (exit {}):\n{}{}\nhost output:\n"
                    "{}".format(code, out.getvalue(), err.getvalue(), self.logTail())
                )
            self.noteReport(code, report)
            return code, report, err.getvalue()

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
            shutil.rmtree(self.workdir.path, ignore_errors=True)


class BenchHost(HostProcess):
    """
    A host serving L{migrate.bench._app} (copied into its working
    directory) or another app on a loopback port, with its output in a file.

    @ivar port: the loopback TCP port it listens on.
    @ivar strategy: its C{--strategy}.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        strategy: str,
        *,
        app: str | None = None,
        backlog: int = 4096,
        extra: list[str] | None = None,
        twistdArguments: list[str] | None = None,
    ) -> None:
        self.port = port
        self.strategy = strategy
        self.backlog = backlog
        super().__init__(
            reactor,
            [
                "--app",
                app or "{}:makeFactory".format(APP_MODULE),
                "--listen",
                self.listen,
                "--strategy",
                strategy,
            ]
            + list(extra or []),
            prefix="migrate-bench-",
            twistdArguments=twistdArguments,
        )
        if app is None:
            shutil.copyfile(_app.__file__, self.workdir.child(APP_MODULE + ".py").path)

    @property
    def listen(self) -> str:
        """
        The endpoint description the host listens on.
        """
        return "tcp:{}:interface=127.0.0.1:backlog={}".format(self.port, self.backlog)
