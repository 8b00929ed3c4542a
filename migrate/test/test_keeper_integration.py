"""
The keeper and the host's lifecycle with real processes: as PID 1 of a PID
namespace the test makes (C{unshare --pid --fork --mount-proc}, what a
container runtime does) and under tini there; twistd's default daemon mode;
Ctrl-C in a terminal after an upgrade.

Pids that the host reports are pids inside the namespace: they are compared,
never signalled from here.  Every process the namespace holds ends when
C{unshare} (started with C{--kill-child}) is killed at cleanup.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from ._hostprocess import (
    SOURCE_ROOT,
    LineClient,
    ProcessOutput,
    connectLineClient,
    freePort,
    lastJSON,
    runCLI,
    waitFor,
)

_UNSHARE = shutil.which("unshare")
_TINI = shutil.which("tini")
_NAMESPACE = ["--pid", "--fork", "--mount-proc", "--kill-child"]
_problem: list[str | None] = []

#: twistd, run by this interpreter (a successor runs it again the same way),
#: in the session and process group it was started in: the namespace's, or
#: tini's, or the terminal's
_TWISTD = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; run()"
)


def _namespaceProblem() -> str | None:
    """
    Why this machine cannot make a PID namespace, if it cannot (checked
    once).
    """
    if not _problem:
        if _UNSHARE is None:
            _problem.append("unshare (util-linux) is not installed")
        else:
            try:
                done = subprocess.run(
                    [_UNSHARE, *_NAMESPACE, "true"],
                    capture_output=True,
                    timeout=20,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                _problem.append("unshare failed: {}".format(e))
            else:
                _problem.append(
                    None
                    if done.returncode == 0
                    else "unshare --pid --fork --mount-proc is not permitted here "
                    "(it needs root or user namespaces): {}".format(
                        done.stderr.decode("utf-8", "replace").strip()
                    )
                )
    return _problem[0]


def _parent(pid: int) -> int:
    with open("/proc/{}/stat".format(pid), "rb") as stat:
        text = stat.read()
    return int(text[text.rindex(b")") + 2 :].split()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _parent(int(entry)) == pid:
                    found.append(int(entry))
            except (OSError, ValueError):
                pass
    return found


def _processesIn(namespace: str) -> list[dict[str, Any]]:
    """
    Every process of the PID namespace C{namespace} (a C{ns/pid} link):
    its pid outside and inside, its state and its command line.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink("/proc/{}/ns/pid".format(entry)) != namespace:
                continue
            with open("/proc/{}/status".format(entry)) as status:
                fields = dict(
                    line.split(":", 1)
                    for line in status.read().splitlines()
                    if ":" in line
                )
            with open("/proc/{}/cmdline".format(entry), "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        found.append(
            {
                "outer": int(entry),
                "inner": int(fields["NSpid"].split()[-1]),
                "state": fields["State"].split()[0],
                "command": command,
            }
        )
    return found


def _twistdArguments(
    workdir: FilePath, hostArguments: list[str], *, foreground: bool = True
) -> list[str]:
    return (
        [sys.executable, "-c", _TWISTD]
        + (["-n"] if foreground else [])
        + ["--pidfile", workdir.child("twistd.pid").path, "--logfile"]
        + (["-"] if foreground else [workdir.child("twistd.log").path])
        + ["migrate-host", "--control", workdir.child("control.sock").path]
        + hostArguments
    )


class _Lineage:
    """
    A host for one test, started by a command line given whole; its
    output collected, its end awaited.
    """

    def __init__(self, testCase: TestCase) -> None:
        self.testCase = testCase
        self.workdir = FilePath(tempfile.mkdtemp(prefix="migrate-keep-", dir="/tmp"))
        testCase.addCleanup(shutil.rmtree, self.workdir.path, True)
        self.control = self.workdir.child("control.sock").path
        self.pidfile = self.workdir.child("twistd.pid").path
        self.port = freePort()
        self.protocol = ProcessOutput(echo=bool(os.environ.get("MIGRATE_TEST_ECHO")))
        self.process: Any = None

    def spawn(self, argv: list[str], usePTY: bool = False) -> None:
        self.process = _globalReactor.spawnProcess(
            self.protocol,
            argv[0],
            argv,
            env=self.environment(),
            path=self.workdir.path,
            usePTY=usePTY,
        )

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_")}
        env["PYTHONPATH"] = os.pathsep.join([self.workdir.path, SOURCE_ROOT])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def hostArguments(self, *extra: str) -> list[str]:
        return [
            "--keeper",
            "auto",
            "--listen",
            "tcp:{}:interface=127.0.0.1".format(self.port),
            "--drain-timeout",
            "20",
        ] + list(extra)

    def output(self) -> str:
        return self.protocol.output.decode("utf-8", "replace")

    @inlineCallbacks
    def status(self) -> Any:
        code, out, err = yield runCLI(
            ["status", "--control", self.control, "--json"], cwd=self.workdir.path
        )
        if code != 0:
            raise AssertionError("status failed ({}): {}{}".format(code, out, err))
        return lastJSON(out)

    @inlineCallbacks
    def answers(self, daemon: bool = False) -> Any:
        if self.protocol.ended.called and not daemon:
            raise AssertionError("the host ended early:\n" + self.output())
        if not os.path.exists(self.control):
            return None
        code, out, err = yield runCLI(
            ["status", "--control", self.control, "--json"], cwd=self.workdir.path
        )
        return lastJSON(out) if code == 0 else None

    @inlineCallbacks
    def upgrade(self, strategy: str) -> Any:
        code, out, err = yield runCLI(
            ["upgrade", "--control", self.control, "--json", "--strategy", strategy],
            cwd=self.workdir.path,
        )
        report = lastJSON(out)
        if code != 0 or report.get("outcome") != "success":
            raise AssertionError(
                "upgrade with {} failed ({}): {}\n{}\nhost output:\n{}".format(
                    strategy, code, report, err, self.output()
                )
            )
        return report

    def pidfilePid(self) -> int | None:
        try:
            return int(FilePath(self.pidfile).getContent().strip())
        except (OSError, ValueError):
            return None

    def ended(self, timeout: float = 30.0) -> Any:
        """
        Fire with the exit code (C{-N} for signal C{N}) within C{timeout}.
        """
        return waitFor(
            lambda: self.protocol.ended.called,
            timeout=timeout,
            what="the host to end",
        ).addCallback(lambda _: self.protocol.ended.result)


class _ChatClient:
    """
    A chat user with a nick of its own: the state a migration must keep.
    """

    def __init__(self, client: LineClient, nick: str) -> None:
        self.client = client
        self.nick = nick

    @inlineCallbacks
    def ask(self, line: bytes, prefix: bytes) -> Any:
        """
        Send C{line}; fire with the first line after it that starts with
        C{prefix} (the room's chatter comes in between).
        """
        start = len(self.client.lines)
        self.client.sendLine(line)
        while True:
            for each in self.client.lines[start:]:
                if each.startswith(prefix):
                    return each
            yield self.client.waitForLines(len(self.client.lines) + 1, timeout=20)

    @inlineCallbacks
    def checkServed(self) -> Any:
        """
        The user's nick survived: C{/who} names it.
        """
        answer = yield self.ask(b"/who", b"* In ")
        if self.nick.encode() not in answer:
            raise AssertionError("{} not in {!r}".format(self.nick, answer))


@inlineCallbacks
def _chatUser(port: int, nick: str, testCase: TestCase) -> Any:
    client = yield connectLineClient(port)
    testCase.addCleanup(client.transport.loseConnection)
    yield client.waitForLines(1)
    user = _ChatClient(client, nick)
    yield user.ask("/nick {}".format(nick).encode(), b"* You are now")
    return user


class _NamespaceMixin:
    """
    A host as PID 1 of a PID namespace (or as tini's child there), through
    every strategy, then C{SIGTERM} as C{docker stop} sends it.
    """

    wrapper: list[str] = []

    def setUp(self) -> None:
        problem = _namespaceProblem()
        if problem is not None:
            raise SkipTest(problem)
        if self.wrapper and _TINI is None:
            raise SkipTest("tini is not installed (apt-get install tini)")

    @inlineCallbacks
    def startNamespace(self) -> Any:
        assert _UNSHARE is not None
        self.lineage = lineage = _Lineage(self)  # type: ignore[arg-type]
        argv = (
            [_UNSHARE, *_NAMESPACE]
            + self.wrapper
            + _twistdArguments(lineage.workdir, lineage.hostArguments())
        )
        lineage.spawn(argv)
        unsharePid = lineage.process.pid
        self.addCleanup(self._kill, unsharePid)  # type: ignore[attr-defined]
        [init] = yield waitFor(
            lambda: _children(unsharePid), what="unshare to start the namespace"
        )
        self.namespace = os.readlink("/proc/{}/ns/pid".format(init))
        self.init = init
        status = yield waitFor(lineage.answers, what="the host to answer")
        return status

    def _kill(self, pid: int) -> Deferred[Any] | None:
        if self.lineage.protocol.ended.called:
            return None
        os.kill(pid, signal.SIGKILL)
        return self.lineage.protocol.ended

    def processes(self) -> list[dict[str, Any]]:
        return _processesIn(self.namespace)

    def keeperProcess(self) -> dict[str, Any]:
        [keeper] = [
            each for each in self.processes() if "_keeper.py" in each["command"]
        ]
        return keeper

    @inlineCallbacks
    def settled(self, servingPid: int) -> Any:
        """
        Wait until the namespace holds only the keeper (and tini), the
        serving generation and generations still draining, and no zombie.
        """
        expected = 2 + len(self.wrapper[:1])

        def check() -> bool:
            processes = self.processes()
            if any(each["state"] == "Z" for each in processes):
                return False
            return len(processes) == expected + self.draining

        yield waitFor(check, what="old generations to end and be reaped")
        inner = {each["inner"] for each in self.processes()}
        self.assertIn(servingPid, inner)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_everyStrategyThenStop(self) -> Any:
        """
        Users keep their state through capability, gradual, re-exec,
        reload and capability again; each is served after each migration,
        and so is a new user; the pidfile and C{status} name the serving
        process, the keeper holds the first one's place, and no zombie is
        left.  C{SIGTERM} to the first process ends every process of the
        namespace with twistd's status for it (143), closing every
        connection.
        """
        status = yield self.startNamespace()
        lineage = self.lineage
        keeperPid = 1 + len(self.wrapper[:1])
        self.assertEqual(status["pid"], keeperPid)  # type: ignore[attr-defined]
        self.assertEqual(status["keeper"]["mode"], "auto")  # type: ignore[attr-defined]
        users = [(yield _chatUser(lineage.port, "first", self))]  # type: ignore[arg-type]
        self.draining = 0
        for number, strategy in enumerate(
            ["capability", "gradual", "reexec", "reload", "capability", "gradual"]
        ):
            report = yield lineage.upgrade(strategy)
            for user in users:
                yield user.checkServed()
            if strategy == "gradual" and number < 5:
                # Its users stay on the previous generation, which drains;
                # re-exec waits for no draining generation: they leave.
                for user in users:
                    user.client.sendLine(b"/quit")
                    yield user.client.closed
                users = []
            elif strategy == "gradual":
                # These stay: the stop below ends a draining generation too.
                self.draining += 1
            newUser = yield _chatUser(
                lineage.port, "user{}".format(number), self  # type: ignore[arg-type]
            )
            yield newUser.checkServed()
            users.append(newUser)
            status = yield lineage.status()
            serving = report.get("newPid") or status["pid"]
            self.assertEqual(status["pid"], serving)  # type: ignore[attr-defined]
            self.assertEqual(lineage.pidfilePid(), serving)  # type: ignore[attr-defined]
            self.assertEqual(status["keeper"]["pid"], keeperPid)  # type: ignore[attr-defined]
            yield self.settled(serving)
            self.assertEqual(  # type: ignore[attr-defined]
                self.keeperProcess()["inner"], keeperPid
            )
        self.assertEqual(  # type: ignore[attr-defined]
            len(lineage.output().split("keeps the service")), 2, lineage.output()
        )
        keeperOuter = self.keeperProcess()["outer"]
        # It handed everything on with capability transfer and stays: it
        # kept its priority (only a process that ends lowers its own).
        self.assertEqual(  # type: ignore[attr-defined]
            os.getpriority(os.PRIO_PROCESS, keeperOuter),
            os.getpriority(os.PRIO_PROCESS, 0),
        )
        os.kill(keeperOuter, signal.SIGTERM)
        code = yield lineage.ended(timeout=25)
        self.assertEqual(code, 143, lineage.output())  # type: ignore[attr-defined]
        for user in users:
            yield user.client.closed
        self.assertEqual(self.processes(), [])  # type: ignore[attr-defined]
        self.assertFalse(os.path.exists(lineage.pidfile))  # type: ignore[attr-defined]


class PidOneTests(_NamespaceMixin, TestCase):
    """
    The host as PID 1, as C{docker run IMAGE twistd -n migrate-host}.
    """

    @inlineCallbacks
    def test_orphansReaped(self) -> Any:
        """
        A process orphaned in the namespace once the keeper keeps it (a
        shell's background job whose shell exited) is reaped when it ends:
        no zombie is left.
        """
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise SkipTest("nsenter (util-linux) is not installed")
        yield self.startNamespace()
        yield self.lineage.upgrade("capability")
        yield waitFor(
            lambda: any("_keeper.py" in each["command"] for each in self.processes()),
            what="the first process to become the keeper",
        )
        subprocess.run(
            [nsenter, "-t", str(self.init), "-p", "--", "sh", "-c", "(sleep 1 &)"],
            check=True,
            timeout=10,
        )

        def orphans() -> list[dict[str, Any]]:
            return [
                each for each in self.processes() if each["command"].startswith("sleep")
            ]

        # Orphaned at once (its shell exits): reparented to the keeper as
        # PID 1, to tini otherwise; either reaps it.
        def zombies() -> list[dict[str, Any]]:
            return [each for each in self.processes() if each["state"] == "Z"]

        yield waitFor(orphans, what="the orphan to run")
        # A zombie has no command line: the orphan, once ended, is seen as
        # gone before it is reaped.  Reaped means no zombie is left.
        yield waitFor(
            lambda: not orphans() and not zombies(),
            what="the orphan to end and be reaped",
        )
        self.assertEqual(zombies(), [])

    @inlineCallbacks
    def test_servingKilled(self) -> Any:
        """
        C{SIGKILL} of the serving generation ends the keeper with a non-zero
        status, so that a restart policy starts the service again.
        """
        yield self.startNamespace()
        report = yield self.lineage.upgrade("capability")
        [serving] = [
            each for each in self.processes() if each["inner"] == report["newPid"]
        ]
        os.kill(serving["outer"], signal.SIGKILL)
        code = yield self.lineage.ended()
        self.assertEqual(code, 128 + signal.SIGKILL)
        self.assertEqual(self.processes(), [])

    @inlineCallbacks
    def test_stopWhileFirstDrains(self) -> Any:
        """
        C{SIGTERM} to PID 1 while it still drains a user after a gradual
        transfer (it is not the keeper yet): it closes that user, becomes
        the keeper, and stops the serving generation; the namespace ends
        with twistd's status for C{SIGTERM}.
        """
        yield self.startNamespace()
        lineage = self.lineage
        staying = yield _chatUser(lineage.port, "staying", self)
        yield lineage.upgrade("gradual")
        newcomer = yield _chatUser(lineage.port, "newcomer", self)
        yield staying.checkServed()
        os.kill(self.init, signal.SIGTERM)
        code = yield lineage.ended()
        self.assertEqual(code, 143, lineage.output())
        yield staying.client.closed
        yield newcomer.client.closed
        self.assertEqual(self.processes(), [])
        self.assertIn(
            "SIGTERM: closing the connections still draining here", lineage.output()
        )

    @inlineCallbacks
    def test_stopCommand(self) -> Any:
        """
        C{python -m migrate stop} stops every generation within the drain
        deadline: the first process, still draining a user after a gradual
        transfer, closes it and becomes the keeper; the serving generation
        closes its own and exits 0, and so does the keeper, with the
        namespace.  The command exits 0 once every generation has ended.
        """
        yield self.startNamespace()
        lineage = self.lineage
        staying = yield _chatUser(lineage.port, "staying", self)
        yield lineage.upgrade("gradual")
        moving = yield _chatUser(lineage.port, "moving", self)
        yield lineage.upgrade("capability")
        yield moving.checkServed()
        yield staying.checkServed()
        code, out, err = yield runCLI(
            ["stop", "--control", lineage.control, "--drain-timeout", "1", "--json"],
            cwd=lineage.workdir.path,
        )
        self.assertEqual(code, 0, out + err + lineage.output())
        result = lastJSON(out)
        self.assertTrue(result["closedAtDeadline"])
        self.assertIn(1, result["stopped"])
        yield staying.client.closed
        yield moving.client.closed
        exitCode = yield lineage.ended()
        self.assertEqual(exitCode, 0, lineage.output())
        self.assertEqual(self.processes(), [])
        self.assertFalse(os.path.exists(lineage.pidfile))


class TiniTests(_NamespaceMixin, TestCase):
    """
    The host under tini as PID 1, as C{docker run --init}.
    """

    wrapper = ["tini", "--"]


class PidOneWithoutKeeperTests(TestCase):
    """
    PID 1 without a keeper refuses what would end it.
    """

    def setUp(self) -> None:
        problem = _namespaceProblem()
        if problem is not None:
            raise SkipTest(problem)

    @inlineCallbacks
    def test_refused(self) -> Any:
        """
        With C{--keeper off}, a transfer strategy is refused with a reason
        that names the fix; re-exec still works; the host serves on, and
        its pidfile goes when it stops.
        """
        assert _UNSHARE is not None
        lineage = _Lineage(self)
        lineage.spawn(
            [_UNSHARE, *_NAMESPACE]
            + _twistdArguments(
                lineage.workdir, lineage.hostArguments("--keeper", "off")
            )
        )

        def cleanup() -> Any:
            if lineage.protocol.ended.called:
                return None
            os.kill(lineage.process.pid, signal.SIGKILL)
            return lineage.protocol.ended

        self.addCleanup(cleanup)
        yield waitFor(lineage.answers, what="the host to answer")
        code, out, err = yield runCLI(
            ["upgrade", "--control", lineage.control, "--strategy", "gradual"],
            cwd=lineage.workdir.path,
        )
        self.assertEqual(code, 1)
        self.assertIn("PID 1", err)
        self.assertIn("--keeper on", err)
        yield lineage.upgrade("reexec")
        status = yield lineage.status()
        self.assertEqual(status["pid"], 1)
        self.assertIn("problem", status["keeper"])
        self.assertEqual(lineage.pidfilePid(), 1)
        # A clean stop after a re-exec takes the pidfile with it.
        [init] = _children(lineage.process.pid)
        os.kill(init, signal.SIGTERM)
        code = yield lineage.ended()
        # twistd re-raises SIGTERM to end by it, which PID 1 cannot: 0.
        self.assertEqual(code, 0, lineage.output())
        self.assertFalse(os.path.exists(lineage.pidfile))


class DaemonTests(TestCase):
    """
    twistd's default mode (no C{-n}): twistd daemonises, and every
    strategy works; the pidfile and C{status} name the serving process.
    """

    @inlineCallbacks
    def test_daemon(self) -> Any:
        lineage = _Lineage(self)
        seen: set[int] = set()

        def cleanup() -> None:
            # Every process of this lineage names the test's directory on
            # its command line: none is left, whatever the test saw.
            marker = lineage.workdir.path.encode()
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open("/proc/{}/cmdline".format(entry), "rb") as f:
                        named = marker in f.read()
                    if named:
                        os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass

        self.addCleanup(cleanup)
        lineage.spawn(
            _twistdArguments(lineage.workdir, lineage.hostArguments(), foreground=False)
        )
        code = yield lineage.ended()
        self.assertEqual(code, 0, lineage.output())
        status = yield waitFor(
            lambda: lineage.answers(daemon=True), what="the daemon to answer"
        )
        seen.add(status["pid"])
        # The daemon, not the process twistd started, which has exited.
        self.assertEqual(status["pid"], lineage.pidfilePid())
        os.kill(status["pid"], 0)
        self.assertIsNone(status["keeper"]["pid"])
        for number, strategy in enumerate(
            ["capability", "gradual", "reexec", "reload", "capability"]
        ):
            user = yield _chatUser(lineage.port, "daemon{}".format(number), self)
            report = yield lineage.upgrade(strategy)
            yield user.checkServed()
            user.client.sendLine(b"/quit")
            yield user.client.closed
            status = yield waitFor(
                lambda: lineage.status().addCallback(
                    lambda status: None if status["draining"] else status
                ),
                what="no generation draining",
            )
            seen.add(status["pid"])
            self.assertEqual(status["pid"], report.get("newPid") or status["pid"])
            self.assertEqual(lineage.pidfilePid(), status["pid"])
            os.kill(status["pid"], 0)
        serving = lineage.pidfilePid()
        assert serving is not None
        os.kill(serving, signal.SIGTERM)

        def gone() -> bool:
            try:
                os.kill(serving, 0)
            except ProcessLookupError:
                return True
            return False

        yield waitFor(gone, what="the daemon to stop")
        yield waitFor(
            lambda: not os.path.exists(lineage.pidfile), what="the pidfile to go"
        )
        log = lineage.workdir.child("twistd.log").getContent().decode()
        self.assertIn("Generation 6 serves", log)


class TerminalTests(TestCase):
    """
    In a terminal, after an upgrade, Ctrl-C stops the service: the process
    the shell started is still there, as the keeper.
    """

    @inlineCallbacks
    def test_controlC(self) -> Any:
        lineage = _Lineage(self)
        lineage.spawn(
            _twistdArguments(lineage.workdir, lineage.hostArguments()), usePTY=True
        )
        session = lineage.process.pid

        def cleanup() -> None:
            try:
                os.killpg(session, signal.SIGKILL)
            except OSError:
                pass

        self.addCleanup(cleanup)
        yield waitFor(lineage.answers, what="the host to answer")
        user = yield _chatUser(lineage.port, "term", self)
        yield lineage.upgrade("capability")
        report = yield lineage.upgrade("gradual")
        yield user.checkServed()
        self.assertFalse(lineage.protocol.ended.called)
        # What Ctrl-C sends: the terminal's interrupt character.
        lineage.process.write(b"\x03")
        code = yield lineage.ended()
        self.assertEqual(code, -signal.SIGINT, lineage.output())
        yield user.client.closed
        for pid in (session, report["newPid"], report["oldPid"]):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            self.fail(
                "process {} is left: {}\n{}".format(
                    pid,
                    open("/proc/{}/status".format(pid)).read()[:300],
                    lineage.output()[-3000:],
                )
            )
        self.assertNotIn("Unhandled Error", lineage.output())
