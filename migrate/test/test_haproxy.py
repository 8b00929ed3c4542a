"""
Tests for L{migrate._rolling._haproxy}: parsing HAProxy's answers (captured from a
real HAProxy 2.6), the commands L{HAProxyClient} sends, and
L{UnixRuntimeAPI} over a real Unix socket served by a fake.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from migrate._rolling._haproxy import (
    HAProxyClient,
    HAProxyError,
    HAProxyUnreachable,
    ServerStat,
    ServerState,
    UnexpectedAnswer,
    UnixRuntimeAPI,
    parseServersState,
    parseStat,
)

from ._fakehaproxy import (
    SERVERS_STATE_ANSWER,
    STAT_ANSWER,
    STAT_HEADER,
    FakeHAProxy,
    FakeServer,
    RuntimeAPIServer,
)


class ParseStatTests(SynchronousTestCase):
    """
    L{parseStat} reads the server rows of C{show stat}.
    """

    def test_realAnswer(self) -> None:
        """
        The server rows of a real answer become L{ServerStat}s.
        """
        s1, s2 = parseStat(STAT_ANSWER)
        self.assertEqual(
            s1,
            ServerStat(
                backend="app",
                name="s1",
                status="DRAIN",
                sessions=0,
                checkStatus="L4OK",
                checkDescription="Layer4 check passed",
                checkHealth=3,
                checkRise=2,
                checkFall=2,
            ),
        )
        self.assertTrue(s1.up)
        self.assertTrue(s1.checked)
        self.assertEqual((s2.status, s2.up, s2.checkHealth), ("DOWN", False, 0))
        self.assertEqual(s2.describe(), "DOWN (Layer4 connection problem)")

    def test_sessions(self) -> None:
        """
        C{scur} is the number of current sessions.
        """
        fake = FakeServer("web1", sessions=7)
        [stat] = parseStat(STAT_HEADER + "\n" + fake.statRow("www") + "\n\n")
        self.assertEqual((stat.backend, stat.name, stat.sessions), ("www", "web1", 7))

    def test_onlyServers(self) -> None:
        """
        Frontend and backend rows are left out.
        """
        answer = (
            STAT_HEADER
            + "\n"
            + "fe,FRONTEND,,,0,0,9985,0,0,0,0,0,0,,,,,OPEN"
            + ",0" * 15
            + "\n"
        )
        columns = STAT_HEADER[2:].split(",")
        row = dict.fromkeys(columns, "")
        row.update(pxname="app", svname="BACKEND", type="1", status="UP", scur="0")
        answer += ",".join(row[c] for c in columns) + "\n"
        self.assertEqual(parseStat(answer), [])

    def test_transitions(self) -> None:
        """
        A server going down (C{UP 1/2}), going up (C{DOWN 1/2}), in
        maintenance or without a check is not up.
        """
        for status in ("UP 1/2", "DOWN 1/2", "MAINT", "no check", "NOLB"):
            self.assertFalse(ServerStat("b", "s", status).up, status)
        self.assertFalse(ServerStat("b", "s", "no check").checked)

    def test_errors(self) -> None:
        """
        An answer that is not CSV raises L{UnexpectedAnswer} with its first
        line.
        """
        for answer in ("No such proxy.\n\n", "", "Permission denied\n\n"):
            error = self.assertRaises(
                UnexpectedAnswer, parseStat, answer, "show stat x 4 -1"
            )
            self.assertEqual(error.answer, answer.strip())
            self.assertIn("show stat x 4 -1", str(error))

    def test_headerWithoutColumns(self) -> None:
        """
        A header without the columns needed is unexpected.
        """
        self.assertRaises(UnexpectedAnswer, parseStat, "# a,b,c\n1,2,3\n")


class ParseServersStateTests(SynchronousTestCase):
    """
    L{parseServersState} reads C{show servers state}.
    """

    def test_realAnswer(self) -> None:
        """
        Each row becomes a L{ServerState}; admin state 8 is drain.
        """
        s1, s2 = parseServersState(SERVERS_STATE_ANSWER)
        self.assertEqual(s1, ServerState("app", "s1", "127.0.0.1", 2, 8))
        self.assertEqual(
            (s1.running, s1.draining, s1.inMaintenance, s1.ready),
            (True, True, False, False),
        )
        self.assertEqual(s1.describeAdmin(), "drain")
        self.assertEqual((s2.running, s2.ready), (False, True))
        self.assertEqual(s2.describeAdmin(), "ready")

    def test_maintenance(self) -> None:
        """
        Every maintenance bit counts (forced, inherited, configured,
        resolution, hostname).
        """
        for bits in (0x01, 0x02, 0x04, 0x20, 0x40):
            state = ServerState("b", "s", "a", 2, bits)
            self.assertTrue(state.inMaintenance, bits)
            self.assertEqual(state.describeAdmin(), "maint")
        self.assertTrue(ServerState("b", "s", "a", 2, 0x10).draining)

    def test_errors(self) -> None:
        """
        HAProxy's error texts, another format version and malformed rows
        raise L{UnexpectedAnswer}.
        """
        header = SERVERS_STATE_ANSWER.split("\n")[1]
        for answer in (
            "Can't find backend.\n\n",
            "",
            "2\n" + header + "\n",
            "1\n" + header + "\n3 app 1 s1 127.0.0.1 x 0\n",
            "1\n# be_id be_name\n",
        ):
            self.assertRaises(UnexpectedAnswer, parseServersState, answer)


class HAProxyClientTests(SynchronousTestCase):
    """
    L{HAProxyClient} sends the runtime API commands and reads the answers.
    """

    def setUp(self) -> None:
        self.fake = FakeHAProxy(
            {"app": [FakeServer("s1", sessions=2), FakeServer("s2", healthy=False)]}
        )
        self.client = HAProxyClient(self.fake)

    def test_serverStats(self) -> None:
        """
        C{show stat BACKEND 4 -1}.
        """
        stats = self.successResultOf(self.client.serverStats("app"))
        self.assertEqual(self.fake.commands, ["show stat app 4 -1"])
        self.assertEqual(
            [(s.name, s.status, s.sessions) for s in stats],
            [("s1", "UP", 2), ("s2", "DOWN", 0)],
        )

    def test_serverStatsUnknownBackend(self) -> None:
        """
        HAProxy's "No such proxy." is an L{HAProxyError}.
        """
        failure = self.failureResultOf(self.client.serverStats("nope"), HAProxyError)
        self.assertEqual(failure.value.answer, "No such proxy.")

    def test_serversState(self) -> None:
        """
        C{show servers state BACKEND}.
        """
        states = self.successResultOf(self.client.serversState("app"))
        self.assertEqual(self.fake.commands, ["show servers state app"])
        self.assertEqual(
            [(s.name, s.running) for s in states], [("s1", True), ("s2", False)]
        )
        failure = self.failureResultOf(self.client.serversState("nope"), HAProxyError)
        self.assertEqual(failure.value.answer, "Can't find backend.")

    def test_setServerState(self) -> None:
        """
        C{set server BACKEND/SERVER state STATE}; HAProxy's empty answer is
        success.
        """
        self.assertIsNone(
            self.successResultOf(self.client.setServerState("app", "s1", "drain"))
        )
        self.assertEqual(self.fake.commands, ["set server app/s1 state drain"])
        self.assertEqual(self.fake.server("app", "s1").admin, "drain")

    def test_setServerStateErrors(self) -> None:
        """
        Anything but an empty answer is an L{HAProxyError} carrying it.
        """
        for backend, server, answer in [
            ("app", "nope", "No such server."),
            ("nope", "s1", "No such backend."),
        ]:
            failure = self.failureResultOf(
                self.client.setServerState(backend, server, "drain"), HAProxyError
            )
            self.assertEqual(failure.value.answer, answer)
            self.assertEqual(
                failure.value.command,
                "set server {}/{} state drain".format(backend, server),
            )
        self.fake.level = "operator"
        failure = self.failureResultOf(
            self.client.setServerState("app", "s1", "ready"), HAProxyError
        )
        self.assertEqual(failure.value.answer, "Permission denied")

    def test_setServerHealth(self) -> None:
        """
        C{set server BACKEND/SERVER health down}.
        """
        self.successResultOf(self.client.setServerHealth("app", "s1", "down"))
        self.assertEqual(self.fake.commands, ["set server app/s1 health down"])
        self.assertEqual(self.fake.server("app", "s1").status, "DOWN")

    def test_badNames(self) -> None:
        """
        Names HAProxy could not hold, states and healths it does not know,
        are refused before anything is sent.
        """
        self.assertRaises(ValueError, self.client.serverStats, "a b")
        self.assertRaises(ValueError, self.client.serversState, "a;show")
        self.assertRaises(
            ValueError, self.client.setServerState, "app", "s1/x", "drain"
        )
        self.assertRaises(ValueError, self.client.setServerState, "app", "s1", "off")
        self.assertRaises(ValueError, self.client.setServerHealth, "app", "s1", "fine")
        self.assertEqual(self.fake.commands, [])

    def test_unreachable(self) -> None:
        """
        L{HAProxyUnreachable} passes through.
        """
        self.fake.unreachable = True
        self.failureResultOf(self.client.serverStats("app"), HAProxyUnreachable)


class UnixRuntimeAPITests(TestCase):
    """
    L{UnixRuntimeAPI} over a real Unix socket.
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="migrate-hx-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        self.directory = FilePath(directory)
        self.path = self.directory.child("haproxy.sock").path
        self.fake = FakeHAProxy({"app": [FakeServer("s1", sessions=3)]})
        self.server = RuntimeAPIServer(self.fake)

    def listen(self) -> None:
        port = cast(Any, reactor).listenUNIX(self.path, self.server.factory())
        self.addCleanup(port.stopListening)

    @inlineCallbacks
    def test_command(self) -> Any:
        """
        One command per connection: the answer is everything HAProxy wrote
        before closing.
        """
        self.listen()
        api = UnixRuntimeAPI(reactor, self.path, timeout=10)
        answer = yield api.command("show servers state app")
        self.assertEqual(self.server.received, ["show servers state app"])
        self.assertTrue(answer.startswith("1\n# be_id"))
        stats = yield HAProxyClient(api).serverStats("app")
        self.assertEqual([(s.name, s.sessions) for s in stats], [("s1", 3)])
        answer = yield api.command("set server app/s1 state drain")
        self.assertEqual(answer, "\n")

    def assertUnreachable(self, d: Deferred[Any], *texts: str) -> Deferred[Any]:
        def check(error: HAProxyUnreachable) -> None:
            for text in texts:
                self.assertIn(text, str(error))

        return self.assertFailure(d, HAProxyUnreachable).addCallback(check)

    def test_missing(self) -> Deferred[Any]:
        """
        No file at the path: say so and name the path.
        """
        api = UnixRuntimeAPI(reactor, self.path)
        return self.assertUnreachable(
            api.command("show stat"), self.path, "no such file"
        )

    def test_notASocket(self) -> Deferred[Any]:
        """
        A regular file at the path is not a socket.
        """
        self.directory.child("haproxy.sock").setContent(b"")
        api = UnixRuntimeAPI(reactor, self.path)
        return self.assertUnreachable(api.command("show stat"), "not a socket")

    def test_refused(self) -> Deferred[Any]:
        """
        A socket file nobody listens on (HAProxy died) is refused.
        """
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        api = UnixRuntimeAPI(reactor, self.path)
        return self.assertUnreachable(api.command("show stat"), "connection refused")

    def test_timeout(self) -> Deferred[Any]:
        """
        A socket that never answers fails after the timeout, and the
        connection is closed.
        """
        self.server.silent = True
        self.listen()
        api = UnixRuntimeAPI(reactor, self.path, timeout=0.3)
        return self.assertUnreachable(
            api.command("show stat"), "did not answer 'show stat'", "0.3 s"
        )

    def test_tooLong(self) -> Deferred[Any]:
        """
        An answer longer than C{maxBytes} is refused.
        """
        self.listen()
        api = UnixRuntimeAPI(reactor, self.path, maxBytes=100)
        return self.assertUnreachable(
            api.command("show stat app 4 -1"), "longer than 100"
        )

    def test_oneCommandOnly(self) -> None:
        """
        A line holding several commands (HAProxy splits on ';') or a
        newline is refused.
        """
        api = UnixRuntimeAPI(reactor, self.path)
        self.assertRaises(ValueError, api.command, "show stat; shutdown sessions")
        self.assertRaises(ValueError, api.command, "show stat\nshow info")
