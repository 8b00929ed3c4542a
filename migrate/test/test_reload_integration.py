"""
Integration tests for module reload: a real C{twistd migrate-host
--strategy reload}, real loopback connections, the real control CLI.  The
process never changes; its code does.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import (
    HostProcess,
    LiveAppMixin,
    fields,
    freePort,
    waitFor,
    writeModule,
)
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2, THREADED_V1
from .test_gradual_integration import APP_V1


class ModuleReloadTests(LiveAppMixin, TestCase):
    """
    C{--strategy reload} with a real host process.
    """

    timeout = 120
    strategy = "reload"
    initialApp = APP_V1

    @inlineCallbacks
    def startHost(self, app: str, *extra: str):  # type: ignore[override]
        status = yield LiveAppMixin.startHost(self, *extra, app=app)
        self.pid = status["pid"]
        return status

    def change(self, app: str) -> None:
        writeModule(self.host.workdir, "liveapp", app)

    @inlineCallbacks
    def test_liveConnectionsRunTheNewCode(self):
        """
        Established connections of a protocol that knows nothing of
        migrate answer with the new code from their next line, with their
        attributes kept; new connections get the new code; the process is
        the same.
        """
        yield self.startHost(APP_V1)
        clients = yield self.connectClients(3)
        for index, client in enumerate(clients):
            for _ in range(index + 1):
                yield self.exchange(client, b"before")
        self.change(APP_V1.replace('b"v1"', 'b"v2"'))
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual((report["moved"], report["draining"]), (3, 0))
        self.assertEqual((report["oldPid"], report["newPid"]), (self.pid, self.pid))
        self.assertIn("reloaded: liveapp", report["notes"])
        pid = str(self.pid).encode()
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(reply, [b"v2", pid, b"after", b"%d" % (index + 2,)])
            self.assertFalse(client.closed.called)
        (fresh,) = yield self.connectClients(1)
        self.assertEqual(fresh.lines[0], b"hello v2 " + pid)
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (self.pid, 2))
        self.assertEqual(status["connections"], 4)

    @inlineCallbacks
    def test_stateUpgraded(self):
        """
        Migratable connections are rebuilt by the new code, their state
        upgraded from version 1 to 2.
        """
        yield self.startHost(MIGRATABLE_V1)
        clients = yield self.connectClients(4)
        for index, client in enumerate(clients):
            for _ in range(index + 1):
                yield self.exchange(client, b"before")
        self.change(MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 4), err
        )
        self.assertIn(
            "4 migratable connections rebuilt by the new code from state version 1 "
            "upgraded to 2",
            report["notes"],
        )
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(
                reply, [b"v2", str(self.pid).encode(), b"after", b"%d" % (index + 2,)]
            )

    @inlineCallbacks
    def test_syntaxErrorKeepsOldCode(self):
        """
        New code that does not compile changes nothing; the report names
        the module and the error; once fixed, the reload goes through.
        """
        yield self.startHost(MIGRATABLE_V1)
        clients = yield self.connectClients(2)
        yield self.exchange(clients[0], b"one")
        self.change(MIGRATABLE_V2 + "\ndef broken(:\n    pass\n")
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        # The trial in a child process finds it: refused, nothing imported here.
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("liveapp", report["reason"])
        self.assertIn("SyntaxError", report["reason"])
        for client in clients:
            reply = yield self.exchange(client, b"still")
            self.assertEqual(reply[:2], [b"v1", str(self.pid).encode()])
        (fresh,) = yield self.connectClients(1)
        self.assertEqual(fields(fresh.lines[0])[1], b"v1")
        status = yield self.host.status()
        self.assertEqual(status["generation"], 1)
        self.change(MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 3), err)
        reply = yield self.exchange(clients[0], b"fixed")
        self.assertEqual(reply, [b"v2", str(self.pid).encode(), b"fixed", b"3"])

    @inlineCallbacks
    def test_refusedStateKeepsOldCode(self):
        """
        A restore that raises for one connection leaves every connection
        on the old code, unharmed and without stray output; the report
        names the connection and the error.
        """
        yield self.startHost(MIGRATABLE_V1)
        clients = yield self.connectClients(3)
        yield self.exchange(clients[1], b"poison")
        self.change(
            MIGRATABLE_V2.replace(
                'self.count = state["total"]',
                'self.count = state["total"]\n'
                '        self.sendLine(b"restored")\n'
                '        if self.count == 1: raise RuntimeError("state refused")',
            )
        )
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        # The trial in a child process finds it: refused, nothing imported here.
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("state refused", report["reason"])
        self.assertIn(
            "127.0.0.1:{}".format(clients[1].transport.getHost().port), report["reason"]
        )
        for client in clients:
            reply = yield self.exchange(client, b"ok")
            self.assertEqual(reply[:2], [b"v1", str(self.pid).encode()])
            self.assertNotIn(b"restored", client.lines)
            self.assertFalse(client.closed.called)

    @inlineCallbacks
    def test_repeatedReloads(self):
        """
        Reload after reload, the same connections follow the code; the
        process and its connections stay.
        """
        yield self.startHost(MIGRATABLE_V1)
        (client,) = yield self.connectClients(1)
        source = MIGRATABLE_V2
        for n in range(2, 8):
            source = MIGRATABLE_V2.replace('b"v2"', 'b"v%d"' % n)
            self.change(source)
            code, report, err = yield self.host.upgrade()
            self.assertEqual((code, report["moved"]), (0, 1), err)
            reply = yield self.exchange(client, b"n")
            self.assertEqual(
                reply, [b"v%d" % n, str(self.pid).encode(), b"n", b"%d" % (n - 1,)]
            )
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["toGeneration"], report["moved"]), (0, None, 0))
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (self.pid, 7))

    @inlineCallbacks
    def test_hangup(self):
        """
        C{SIGHUP} reloads with the configured strategy.
        """
        yield self.startHost(APP_V1)
        (client,) = yield self.connectClients(1)
        self.change(APP_V1.replace('b"v1"', 'b"v2"'))
        os.kill(self.pid, signal.SIGHUP)

        @inlineCallbacks
        def reloaded():
            status = yield self.host.status()
            return status["generation"] == 2

        yield waitFor(reloaded, what="the reload")
        reply = yield self.exchange(client, b"x")
        self.assertEqual(reply[:2], [b"v2", str(self.pid).encode()])

    @inlineCallbacks
    def test_chatUsersKeepTheirRoom(self):
        """
        The demo chat (the default application) reloads with its users in
        their rooms: the new factory learns about them as each is rebuilt,
        so they still hear each other.
        """
        self.port = freePort()
        self.host = HostProcess(
            self,
            [
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(self.port),
                "--strategy",
                "reload",
            ],
        )
        yield self.host.start()
        alice, bob = yield self.connectClients(2)
        yield alice.waitForLines(2)
        alice.sendLine(b"/nick alice")
        yield alice.waitForLines(3)
        yield bob.waitForLines(2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 2), err
        )
        self.assertIn("migrate.examples.chat", report["notes"][0])
        bob.sendLine(b"/who")
        lines = yield bob.waitForLines(len(bob.lines) + 1)
        self.assertEqual(lines[-1], b"* In lobby: alice, guest2")
        before = len(bob.lines)
        alice.sendLine(b"still here")
        lines = yield bob.waitForLines(before + 1)
        self.assertEqual(lines[-1], b"<alice> still here")


class ReloadThreadWorkTests(LiveAppMixin, TestCase):
    """
    A migratable connection whose answer a thread computes
    (C{deferToThread}) looks idle, but its old protocol object owes the
    client that answer: module reload waits for it before the pause, and
    rolls back rather than have it written by an object already replaced
    (into nowhere).
    """

    timeout = 120
    strategy = "reload"
    initialApp = THREADED_V1

    @inlineCallbacks
    def threadAnswering(self) -> Any:
        """
        Connect a client and ask for a slow answer; fire with the client
        once the thread computes it.
        """
        [client] = yield self.connectClients(1)
        yield self.exchange(client, b"before")
        client.sendLine(b"slow")
        started = self.host.workdir.child("thread.started")
        yield waitFor(
            lambda: started.exists() and started.getContent(),
            what="the thread to compute the answer",
        )
        return client

    @inlineCallbacks
    def test_answerArrivesBeforeThePause(self):
        """
        The reload waits, saying so, until the old protocol object has
        written the thread's answer; then the connection is rebuilt by the
        new code, which answers the next line with the state carried over.
        The client gets each answer exactly once.
        """
        status = yield self.startHost()
        pid = str(status["pid"]).encode()
        client = yield self.threadAnswering()
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        upgrade = self.host.upgrade()
        yield waitFor(
            lambda: upgrade.called
            or "waiting for threads before the pause" in self.host.output(),
            what="the reload to wait for the thread",
        )
        self.assertEqual(len(client.lines), 2)
        self.host.workdir.child("thread.go").touch()
        code, report, err = yield upgrade
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["moved"], 1)
        # Written by the old object before the pause (it would otherwise be
        # written into nowhere, once the connection is the new object's).
        lines = yield client.waitForLines(3, timeout=10)
        self.assertEqual(fields(lines[2]), [b"v1", pid, b"slow"])
        self.assertIn("before the pause", err)
        reply = yield self.exchange(client, b"after")
        self.assertEqual(reply, [b"v2", pid, b"after", b"2"])
        self.assertEqual(len(client.lines), 4)
        self.assertFalse(client.closed.called)

    @inlineCallbacks
    def test_answerTooSlowRollsBack(self):
        """
        A thread still computing at C{--safe-point-timeout} rolls the
        reload back: the old code serves on, and the answer, when it
        comes, reaches the client.
        """
        status = yield self.startHost("--safe-point-timeout", "0.5")
        pid = str(status["pid"]).encode()
        client = yield self.threadAnswering()
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("threads still owed answers after 0.5 s", report["reason"])
        self.host.workdir.child("thread.go").touch()
        lines = yield client.waitForLines(3)
        self.assertEqual(fields(lines[2]), [b"v1", pid, b"slow"])
        reply = yield self.exchange(client, b"after")
        self.assertEqual(reply, [b"v1", pid, b"after", b"2"])
        status = yield self.host.status()
        self.assertEqual(status["generation"], 1)
