"""
Integration tests for upgrades back to back, in any order of strategies,
with real hosts: a re-exec while older generations still drain, and a
long mixed sequence under load that loses nothing.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from ._hostprocess import LiveAppMixin, fields, pidAlive, waitFor, writeModule
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2

#: the strategies of a mixed sequence, in turn
CYCLE = ("capability", "reexec", "reload", "gradual")

#: upgrades in the mixed sequence (three of each strategy; the issue's 100
#: with MIGRATE_BACKTOBACK_UPGRADES=100, outside CI)
UPGRADES = int(os.environ.get("MIGRATE_BACKTOBACK_UPGRADES", "12"))


def _version(n: int) -> str:
    """
    Version C{n} (2 or more) of the migratable application.
    """
    return MIGRATABLE_V2.replace('b"v2"', 'b"v%d"' % (n,))


class BackToBackTests(LiveAppMixin, TestCase):
    """
    Upgrades one after the other, whatever the strategy.
    """

    timeout = 120 + 15 * UPGRADES
    strategy = "gradual"
    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def test_reexecWhileOlderGenerationDrains(self):
        """
        A re-exec goes through while an older generation still drains: its
        report channel crosses the exec, so the re-executed image shows it
        in C{status} until it has drained, and then forgets it.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        (client,) = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", _version(2))
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        servingPid = report["newPid"]
        writeModule(self.host.workdir, "liveapp", _version(3))
        code, report, err = yield self.host.upgrade("--strategy", "reexec")
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (servingPid, 3))
        self.assertEqual(
            [(each["pid"], each["connections"]) for each in status["draining"]],
            [(oldPid, 1)],
        )
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
        client.transport.loseConnection()
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")

        @inlineCallbacks
        def forgotten() -> Any:
            status = yield self.host.status()
            return status["draining"] == []

        yield waitFor(forgotten, what="the re-executed image to forget it")

    @inlineCallbacks
    def test_mixedSequenceUnderLoad(self):
        """
        Twelve upgrades in a row (L{UPGRADES}), cycling through the four
        strategies, while clients each send a numbered line every 20 ms:
        every upgrade succeeds, every line is answered exactly once and in
        order, with the connection's count carried along, and nobody is
        disconnected.  The clients a gradual transfer leaves on the old
        generation are checked and leave; fresh ones carry on through the
        next upgrades.
        """
        yield self.startHost()
        clients = yield self.connectClients(5)
        sent: dict[Any, int] = {client: 0 for client in clients}

        def sendAll() -> None:
            for client in list(sent):
                sent[client] += 1
                client.sendLine(b"n%d" % (sent[client],))

        writer = LoopingCall(sendAll)
        writer.start(0.02)
        self.addCleanup(lambda: writer.stop() if writer.running else None)

        @inlineCallbacks
        def check(client: Any, count: int) -> Any:
            yield client.waitForLines(1 + count)
            self.assertFalse(client.closed.called)
            replies = [fields(line) for line in client.lines[1:]]
            self.assertEqual(
                [reply[2] for reply in replies],
                [b"n%d" % (n,) for n in range(1, count + 1)],
            )
            self.assertEqual(
                [reply[3] for reply in replies],
                [b"%d" % (n,) for n in range(1, count + 1)],
            )

        outcomes = []
        for n in range(UPGRADES):
            strategy = CYCLE[n % len(CYCLE)]
            before = min(len(client.lines) for client in sent)
            yield waitFor(
                lambda: min(len(client.lines) for client in sent) > before + 3,
                what="traffic to flow",
            )
            writeModule(self.host.workdir, "liveapp", _version(n + 2))
            code, report, err = yield self.host.upgrade("--strategy", strategy)
            outcomes.append((n, strategy, code, report.get("reason")))
            if strategy == "gradual" and code == 0:
                # They stay on the old generation: check them, let them go
                # (it then exits), and carry on with fresh clients.
                retired = dict(sent)
                sent.clear()
                for client, count in retired.items():
                    yield check(client, count)
                    client.transport.loseConnection()
                fresh = yield self.connectClients(5)
                sent.update({client: 0 for client in fresh})
        writer.stop()
        self.assertEqual(
            [each for each in outcomes if each[2] != 0], [], "refused or failed"
        )
        for client, count in sent.items():
            yield check(client, count)
            client.transport.loseConnection()


class MaxDrainingTests(LiveAppMixin, TestCase):
    """
    C{--max-draining N} bounds the generations left draining.
    """

    timeout = 120
    strategy = "gradual"
    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def test_oldestClosesFirst(self):
        """
        With C{--max-draining 1}, a second gradual transfer first has the
        oldest draining generation close its connections cleanly (its
        client sees a clean close, not a reset), waits for it to end, then
        hands off: one generation drains at a time, and C{status} shows the
        limit.
        """
        status = yield self.startHost("--max-draining", "1")
        firstPid = status["pid"]
        (first,) = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", _version(2))
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        secondPid = report["newPid"]
        (second,) = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", _version(3))
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertIn(
            "--max-draining 1: generation 1 closed its connections first",
            report["notes"],
        )
        yield first.closed
        self.assertTrue(first.lostReason.check(ConnectionDone), first.lostReason)
        self.assertFalse(pidAlive(firstPid))
        status = yield self.host.status()
        self.assertEqual(status["maxDraining"], 1)
        self.assertEqual(
            [(each["pid"], each["connections"]) for each in status["draining"]],
            [(secondPid, 1)],
        )
        reply = yield self.exchange(second, b"still")
        self.assertEqual(reply[:2], [b"v2", str(secondPid).encode()])
        second.transport.loseConnection()

    @inlineCallbacks
    def test_relayedThroughNewer(self):
        """
        The oldest generation reports through the newer ones, and is told
        to close through them too: with C{--max-draining 2}, the third
        gradual transfer has generation 1 (reached through generation 2)
        close first, and generation 2 keeps draining.
        """
        status = yield self.startHost("--max-draining", "2")
        pids = [status["pid"]]
        clients = []
        for n in (2, 3, 4):
            (client,) = yield self.connectClients(1)
            clients.append(client)
            writeModule(self.host.workdir, "liveapp", _version(n))
            code, report, err = yield self.host.upgrade()
            self.assertEqual((code, report["outcome"]), (0, "success"), err)
            pids.append(report["newPid"])
        yield clients[0].closed
        self.assertTrue(clients[0].lostReason.check(ConnectionDone))
        status = yield self.host.status()
        self.assertEqual(
            [each["pid"] for each in status["draining"]], [pids[1], pids[2]]
        )
        for client in clients[1:]:
            self.assertFalse(client.closed.called)
            client.transport.loseConnection()
