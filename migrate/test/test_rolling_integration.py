"""
Integration tests for C{python -m migrate rolling}: a real HAProxy on
loopback in front of three real C{twistd migrate-host} processes, a client
load through HAProxy, and the real command line.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from migrate._rolling._haproxy import HAProxyClient, UnixRuntimeAPI

from ._hostprocess import (
    HostProcess,
    ProcessOutput,
    connectLineClient,
    freePort,
    lastJSON,
    runCLI,
    waitFor,
    writeModule,
)

HAPROXY = shutil.which("haproxy") or shutil.which(
    "haproxy", path="/usr/sbin:/usr/local/sbin"
)

#: a line application whose greeting says which code serves
APP_V1 = textwrap.dedent("""
    import os
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    VERSION = b"v1"

    class Versioned(LineReceiver):
        delimiter = b"\\n"

        def connectionMade(self):
            self.sendLine(b"hello " + VERSION + b" %d" % os.getpid())

        def lineReceived(self, line):
            self.sendLine(VERSION + b" " + line)

    def makeFactory():
        return Factory.forProtocol(Versioned)
    """)

APP_V2 = APP_V1.replace('VERSION = b"v1"', 'VERSION = b"v2"')
APP_BROKEN = APP_V2 + "\ndef broken(:\n"

#: a server that is not a migrate host, speaking like the application:
#: python PLAIN_SERVER PORT VERSION PIDFILE; it waits for the port to be
#: free (its predecessor exiting), then writes its pid once it listens
PLAIN_SERVER = textwrap.dedent("""
    import asyncio, errno, os, sys

    port, version, pidfile = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]

    async def handle(reader, writer):
        writer.write(b"hello " + version + b" %d\\n" % os.getpid())
        try:
            while line := await reader.readline():
                writer.write(version + b" " + line)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main():
        for _ in range(200):
            try:
                server = await asyncio.start_server(
                    handle, "127.0.0.1", port, reuse_address=True
                )
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                await asyncio.sleep(0.05)
        else:
            raise SystemExit("port {} stayed in use".format(port))
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    """)

_CONFIG = """\
global
    stats socket {socket} mode 600 level admin
    stats timeout 10s

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend fe
    bind 127.0.0.1:{port}
    default_backend app

backend app
    option tcp-check
    tcp-check expect rstring ^hello
    default-server inter 200ms fall 2 rise 2
{servers}
"""


class HAProxyProcess:
    """
    A real HAProxy in the foreground with a private configuration, ended in
    cleanup.
    """

    def __init__(self, testCase: TestCase, servers: dict[str, int]) -> None:
        directory = tempfile.mkdtemp(prefix="migrate-hx-", dir="/tmp")
        testCase.addCleanup(shutil.rmtree, directory, True)
        self.directory = FilePath(directory)
        self.socket = self.directory.child("haproxy.sock").path
        self.port = freePort()
        self.config = self.directory.child("haproxy.cfg")
        self.config.setContent(
            _CONFIG.format(
                socket=self.socket,
                port=self.port,
                servers="\n".join(
                    "    server {} 127.0.0.1:{} check".format(name, port)
                    for name, port in servers.items()
                ),
            ).encode("ascii")
        )
        self.protocol = ProcessOutput(echo=bool(os.environ.get("MIGRATE_TEST_ECHO")))
        self.process: Any = None
        self.client = HAProxyClient(UnixRuntimeAPI(reactor, self.socket, timeout=5))
        testCase.addCleanup(self.stop)

    def start(self) -> Deferred[Any]:
        """
        Start HAProxy; fire once its stats socket answers.
        """
        assert HAPROXY is not None
        self.process = reactor.spawnProcess(
            self.protocol,
            HAPROXY,
            [HAPROXY, "-db", "-f", self.config.path],
            env=dict(os.environ),
            path=self.directory.path,
        )
        return waitFor(self._answers, timeout=20, what="HAProxy's stats socket")

    @inlineCallbacks
    def _answers(self) -> Any:
        if self.protocol.ended.called:
            raise AssertionError(
                "haproxy exited:\n" + self.protocol.output.decode("utf-8", "replace")
            )
        if not os.path.exists(self.socket):
            return False
        yield self.client.serverStats("app")
        return True

    @inlineCallbacks
    def allUp(self) -> Any:
        stats = yield self.client.serverStats("app")
        return all(each.status == "UP" for each in stats)

    @inlineCallbacks
    def states(self) -> Any:
        """
        Each server's administrative state and status.
        """
        states = yield self.client.serversState("app")
        stats = yield self.client.serverStats("app")
        status = {each.name: each.status for each in stats}
        return {each.name: (each.describeAdmin(), status[each.name]) for each in states}

    def stop(self) -> Deferred[Any] | None:
        if self.process is None or self.protocol.ended.called:
            return None
        for signalNumber in (signal.SIGTERM,):
            try:
                os.kill(self.process.pid, signalNumber)
            except ProcessLookupError:
                pass
        timer = reactor.callLater(5, self._kill)
        d: Deferred[Any] = Deferred()

        def ended(_: Any) -> None:
            if timer.active():
                timer.cancel()
            d.callback(None)

        self.protocol.ended.addBoth(ended)
        return d

    def _kill(self) -> None:
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Load:
    """
    Clients through HAProxy in a tight loop (connect, greeting, one line,
    close) and a few long-lived ones exchanging lines; every failure is
    recorded.
    """

    def __init__(self, port: int, churners: int = 4, longLived: int = 2) -> None:
        self.port = port
        self.failures: list[str] = []
        self.attempts = 0
        self.versions: list[bytes] = []
        self.running = True
        self.churnerCount = churners
        self.longLivedCount = longLived
        self.tasks: list[Deferred[Any]] = []
        self.longLived: list[Any] = []

    @inlineCallbacks
    def start(self) -> Any:
        for _ in range(self.longLivedCount):
            client = yield connectLineClient(self.port)
            yield client.waitForLines(1, timeout=10)
            self.longLived.append(client)
        self.tasks = [self._churn() for _ in range(self.churnerCount)]
        self.tasks += [self._talk(client) for client in self.longLived]

    @inlineCallbacks
    def _churn(self) -> Any:
        while self.running:
            self.attempts += 1
            try:
                client = yield connectLineClient(self.port)
                lines = yield client.waitForLines(1, timeout=10)
                client.sendLine(b"x")
                lines = yield client.waitForLines(2, timeout=10)
                if not lines[1].endswith(b" x"):
                    raise AssertionError("bad reply {!r}".format(lines[1]))
                self.versions.append(lines[0].split()[1])
                client.transport.loseConnection()
            except Exception as e:
                self.failures.append(repr(e))

    @inlineCallbacks
    def _talk(self, client: Any) -> Any:
        number = 0
        while self.running:
            number += 1
            before = len(client.lines)
            client.sendLine(b"n%d" % (number,))
            try:
                lines = yield client.waitForLines(before + 1, timeout=10)
            except Exception as e:
                self.failures.append("long-lived: " + repr(e))
                return
            if not lines[before].endswith(b" n%d" % (number,)):
                self.failures.append("long-lived: bad reply {!r}".format(lines[before]))
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def stop(self) -> Any:
        self.running = False
        yield gatherResults(self.tasks)
        for client in self.longLived:
            client.transport.loseConnection()


class RollingIntegrationTests(TestCase):
    """
    C{python -m migrate rolling} against a real HAProxy and real hosts.
    """

    timeout = 60

    def setUp(self) -> Any:
        if HAPROXY is None:
            raise SkipTest(
                "haproxy is not installed (apt-get install haproxy; .ci/run "
                "installs it)"
            )

    @inlineCallbacks
    def startFleet(self, count: int = 3, extra: dict[str, int] | None = None) -> Any:
        """
        Start C{count} migrate hosts (C{s1}, C{s2}, ...) and HAProxy in front
        of them and of the C{extra} servers (name to port).
        """
        self.hosts: dict[str, HostProcess] = {}
        self.ports: dict[str, int] = {}
        for index in range(1, count + 1):
            name = "s{}".format(index)
            port = freePort()
            host = HostProcess(
                self,
                [
                    "--app",
                    "liveapp:makeFactory",
                    "--listen",
                    "tcp:{}:interface=127.0.0.1".format(port),
                    "--strategy",
                    "gradual",
                ],
            )
            writeModule(host.workdir, "liveapp", APP_V1)
            self.hosts[name] = host
            self.ports[name] = port
        yield gatherResults([host.start() for host in self.hosts.values()])
        self.ports.update(extra or {})
        self.haproxy = HAProxyProcess(self, self.ports)
        yield self.haproxy.start()
        yield waitFor(self.haproxy.allUp, timeout=20, what="every server UP in HAProxy")

    def roll(self, *extra: str) -> Deferred[Any]:
        arguments = ["rolling", "--haproxy", self.haproxy.socket, "--backend", "app"]
        for name, host in self.hosts.items():
            arguments += ["--control", "{}={}".format(name, host.control)]
        return runCLI(
            arguments + ["--json"] + list(extra),
            cwd=self.haproxy.directory.path,
            timeout=50,
        )

    @inlineCallbacks
    def greeting(self, port: int) -> Any:
        client = yield connectLineClient(port)
        lines = yield client.waitForLines(1, timeout=10)
        client.transport.loseConnection()
        return lines[0].split()[1]

    @inlineCallbacks
    def test_rollUnderLoad(self) -> Any:
        """
        Every server is upgraded in turn while clients keep connecting
        through HAProxy: no request fails, long-lived connections keep being
        answered, every backend runs the new code afterwards and is back in
        rotation.
        """
        yield self.startFleet()
        load = Load(self.haproxy.port)
        yield load.start()
        for host in self.hosts.values():
            writeModule(host.workdir, "liveapp", APP_V2)
        code, out, err = yield self.roll(
            "--drain-timeout", "1", "--ready-timeout", "15"
        )
        attemptsDuringRoll = load.attempts
        yield load.stop()
        report = lastJSON(out)
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(
            [(s["name"], s["state"]) for s in report["servers"]],
            [("s1", "done"), ("s2", "done"), ("s3", "done")],
        )
        for server in report["servers"]:
            self.assertEqual(server["report"]["outcome"], "success")
            self.assertEqual(server["report"]["toGeneration"], 2)
        self.assertIn("[migrate] app/s1: draining", err)
        self.assertIn("[migrate] app/s3: up (", err)
        self.assertEqual(load.failures, [])
        self.assertGreater(attemptsDuringRoll, 20)
        self.assertIn(b"v1", load.versions)
        self.assertEqual(load.versions[-1], b"v2")
        for name, port in self.ports.items():
            version = yield self.greeting(port)
            self.assertEqual(version, b"v2", name)
        for _ in range(6):
            version = yield self.greeting(self.haproxy.port)
            self.assertEqual(version, b"v2")
        states = yield self.haproxy.states()
        self.assertEqual(states, {name: ("ready", "UP") for name in ("s1", "s2", "s3")})

    def startPlainServer(self, name: str) -> Deferred[Any]:
        """
        Add a server that is not a migrate host (see L{PLAIN_SERVER}) to the
        fleet; fire once it listens.  Return the command that restarts it on
        version 2, as an operator would give C{--restart-command}.
        """
        directory = FilePath(tempfile.mkdtemp(prefix="migrate-plain-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, directory.path, True)
        script = directory.child("plain.py")
        script.setContent(PLAIN_SERVER.encode("ascii"))
        port = freePort()
        self.ports[name] = port
        first = directory.child("v1.pid").path
        second = directory.child("v2.pid").path
        protocol = ProcessOutput(echo=bool(os.environ.get("MIGRATE_TEST_ECHO")))
        reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, script.path, str(port), "v1", first],
            env=dict(os.environ),
            path=directory.path,
        )

        def stop() -> None:
            for path in (first, second):
                try:
                    with open(path) as f:
                        os.kill(int(f.read()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass

        self.addCleanup(stop)
        self.restartCommand = (
            "kill $(cat {first}) && "
            "{python} {script} {port} v2 {second} </dev/null >/dev/null 2>&1 & "
            "while [ ! -s {second} ]; do sleep 0.05; done; "
            "echo restarted as $(cat {second})"
        ).format(
            first=first,
            second=second,
            python=sys.executable,
            script=script.path,
            port=port,
        )
        return waitFor(lambda: os.path.exists(first), what="the plain server")

    @inlineCallbacks
    def test_twoAtOnceWithARestartCommand(self) -> Any:
        """
        C{--max-unavailable 2} over three migrate hosts and a server that
        is not one (upgraded by C{--restart-command}): two servers, never
        more, are out of rotation at a time, clients through HAProxy see no
        failure, and every server runs the new code afterwards, back in
        rotation.
        """
        self.ports = {}
        yield self.startPlainServer("s4")
        plainPort = self.ports["s4"]
        yield self.startFleet(extra={"s4": plainPort})
        load = Load(self.haproxy.port, longLived=0)
        yield load.start()
        for host in self.hosts.values():
            writeModule(host.workdir, "liveapp", APP_V2)
        outOfRotation: list[int] = []
        sampling = [True]

        @inlineCallbacks
        def sample() -> Any:
            while sampling[0]:
                states = yield self.haproxy.states()
                outOfRotation.append(
                    sum(1 for admin, status in states.values() if admin != "ready")
                )
                yield deferLater(reactor, 0.02, lambda: None)

        sampler = sample()
        code, out, err = yield self.roll(
            "--max-unavailable",
            "2",
            "--restart-command",
            "s4=" + self.restartCommand,
            "--drain-timeout",
            "1",
            "--ready-timeout",
            "15",
        )
        sampling[0] = False
        yield sampler
        yield load.stop()
        report = lastJSON(out)
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["maxUnavailable"], 2)
        self.assertEqual(
            [(s["name"], s["method"], s["state"]) for s in report["servers"]],
            [
                ("s1", "migrate-host", "done"),
                ("s2", "migrate-host", "done"),
                ("s3", "migrate-host", "done"),
                ("s4", "restart-command", "done"),
            ],
        )
        self.assertTrue(report["servers"][3]["output"][-1].startswith("restarted as "))
        self.assertEqual(max(outOfRotation), 2, outOfRotation)
        self.assertEqual(outOfRotation[-1], 0)
        self.assertEqual(load.failures, [])
        self.assertGreater(load.attempts, 20)
        for name, port in self.ports.items():
            version = yield self.greeting(port)
            self.assertEqual(version, b"v2", name)
        states = yield self.haproxy.states()
        self.assertEqual(
            states, {name: ("ready", "UP") for name in ("s1", "s2", "s3", "s4")}
        )

    @inlineCallbacks
    def test_failedUpgradeStopsTheRoll(self) -> Any:
        """
        A server whose new code does not import stops the roll: it is left
        in maintenance (its old code still runs), the servers after it are
        untouched, the fleet keeps serving, and the command exits non-zero
        naming the server and why.
        """
        yield self.startFleet()
        load = Load(self.haproxy.port, longLived=0)
        yield load.start()
        writeModule(self.hosts["s1"].workdir, "liveapp", APP_V2)
        writeModule(self.hosts["s2"].workdir, "liveapp", APP_BROKEN)
        writeModule(self.hosts["s3"].workdir, "liveapp", APP_V2)
        code, out, err = yield self.roll(
            "--drain-timeout", "1", "--ready-timeout", "15"
        )
        # The fleet keeps serving after the roll stopped.
        yield waitFor(lambda: load.attempts > 0)
        before = load.attempts
        yield waitFor(lambda: load.attempts > before + 10, what="more requests")
        yield load.stop()
        report = lastJSON(out)
        self.assertEqual(code, 1, err)
        self.assertEqual(report["outcome"], "stopped")
        self.assertEqual(
            [(s["name"], s["state"]) for s in report["servers"]],
            [("s1", "done"), ("s2", "failed"), ("s3", "untouched")],
        )
        self.assertIn("app/s2: upgrade failed: migration rolled-back", report["reason"])
        self.assertIn("left in maintenance", report["reason"])
        self.assertIn(
            "SyntaxError", "\n".join(report["servers"][1]["report"]["successorLog"])
        )
        self.assertIn("rolling upgrade stopped: app/s2", err)
        self.assertEqual(load.failures, [])
        states = yield self.haproxy.states()
        self.assertEqual(
            states,
            {"s1": ("ready", "UP"), "s2": ("maint", "MAINT"), "s3": ("ready", "UP")},
        )
        versions = []
        for name in ("s1", "s2", "s3"):
            version = yield self.greeting(self.ports[name])
            versions.append(version)
        self.assertEqual(versions, [b"v2", b"v1", b"v1"])
        s3 = yield self.hosts["s3"].status()
        self.assertEqual((s3["generation"], s3["lastReport"]), (1, None))

    @inlineCallbacks
    def test_refusedBeforeDraining(self) -> Any:
        """
        A wrong socket, an unknown backend or server, a dead host: a clear
        message, and nothing drained.
        """
        yield self.startFleet(count=2)
        code, out, err = yield runCLI(
            [
                "rolling",
                "--haproxy",
                self.haproxy.socket + ".nope",
                "--backend",
                "app",
                "--control",
                "s1=/tmp/none.sock",
            ],
            cwd=self.haproxy.directory.path,
        )
        self.assertEqual(code, 3)
        self.assertIn("cannot reach HAProxy's stats socket", err)

        code, out, err = yield self.roll("--backend", "www")
        self.assertEqual(code, 1)
        self.assertIn("HAProxy has no backend named 'www'", err)

        code, out, err = yield runCLI(
            [
                "rolling",
                "--haproxy",
                self.haproxy.socket,
                "--backend",
                "app",
                "--control",
                "s1={}".format(self.hosts["s1"].control),
                "--control",
                "s2={}".format(self.hosts["s2"].control),
                "--control",
                "s7=/tmp/none.sock",
            ],
            cwd=self.haproxy.directory.path,
        )
        self.assertEqual(code, 1)
        self.assertIn("backend app has no server named s7 (its servers: s1, s2)", err)

        self.hosts["s2"].stopAll()
        yield waitFor(
            lambda: self.haproxy.states().addCallback(lambda s: s["s2"][1] == "DOWN"),
            what="s2 DOWN in HAProxy",
        )
        code, out, err = yield self.roll()
        self.assertEqual(code, 1)
        self.assertIn("nothing was drained: app/s2 is DOWN", err)
        states = yield self.haproxy.states()
        self.assertEqual(states, {"s1": ("ready", "UP"), "s2": ("ready", "DOWN")})
        s1 = yield self.hosts["s1"].status()
        self.assertEqual(s1["generation"], 1)
