"""
Integration tests for gradual transfer: real C{twistd migrate-host}
processes, real loopback sockets, the real control CLI.
"""

from __future__ import annotations

import os
import signal
import textwrap

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import (
    LiveAppMixin,
    connectLineClient,
    fields,
    pidAlive,
    waitFor,
    writeModule,
)

#: a small application whose replies say which code and process served them
APP_V1 = textwrap.dedent("""
    import os
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    VERSION = b"v1"

    class Counter(LineReceiver):
        delimiter = b"\\n"

        def connectionMade(self):
            self.count = 0
            self.sendLine(b"hello " + VERSION + b" %d" % os.getpid())

        def lineReceived(self, line):
            self.count += 1
            self.sendLine(b"%s %d %s %d" % (VERSION, os.getpid(), line, self.count))

    def makeFactory():
        return Factory.forProtocol(Counter)
""")

APP_V2 = APP_V1.replace('VERSION = b"v1"', 'VERSION = b"v2"')


class GradualTransferTests(LiveAppMixin, TestCase):
    """
    C{--strategy gradual} with real processes.
    """

    timeout = 120
    strategy = "gradual"
    initialApp = APP_V1

    @inlineCallbacks
    def test_upgradeNewConnectionsReachNewCode(self):
        """
        After an upgrade, new connections reach the new code in a new
        process, the existing connection stays on the old code until it
        leaves, and then the old process exits.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        self.assertEqual(status["generation"], 1)
        old = yield connectLineClient(self.port)
        yield old.waitForLines(1)
        reply = yield self.exchange(old, b"a")
        self.assertEqual(reply, [b"v1", str(oldPid).encode(), b"a", b"1"])

        writeModule(self.host.workdir, "liveapp", APP_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["oldPid"], oldPid)
        newPid = report["newPid"]
        self.assertNotEqual(newPid, oldPid)
        self.assertEqual(report["listeners"][0]["drained"], 1)

        new = yield connectLineClient(self.port)
        hello = yield new.waitForLines(1)
        self.assertEqual(fields(hello[0])[:2], [b"hello", b"v2"])
        reply = yield self.exchange(new, b"b")
        self.assertEqual(reply[:2], [b"v2", str(newPid).encode()])

        reply = yield self.exchange(old, b"c")
        self.assertEqual(reply, [b"v1", str(oldPid).encode(), b"c", b"2"])

        status = yield self.host.status()
        self.assertEqual(status["pid"], newPid)
        self.assertEqual(status["generation"], 2)
        self.assertEqual(
            (status["lastReport"]["outcome"], status["lastReport"]["newPid"]),
            ("success", newPid),
        )
        self.assertEqual(
            [(d["generation"], d["pid"], d["connections"]) for d in status["draining"]],
            [(1, oldPid, 1)],
        )
        with open(self.host.pidfile) as f:
            self.assertEqual(int(f.read()), newPid)

        old.transport.loseConnection()
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")
        status = yield waitFor(
            self._noDraining, what="status to show no draining generation"
        )
        self.assertEqual(status["pid"], newPid)
        with open(self.host.pidfile) as f:
            self.assertEqual(int(f.read()), newPid)
        new.transport.loseConnection()

    @inlineCallbacks
    def test_upgradeWaitWaitsForTheDrain(self):
        """
        C{upgrade --wait} returns only once the old generation has drained:
        while a client is still on the old process it keeps waiting, and it
        ends, successfully, once that client leaves.
        """
        yield self.startHost()
        old = yield connectLineClient(self.port)
        yield old.waitForLines(1)
        writeModule(self.host.workdir, "liveapp", APP_V2)
        upgrading = self.host.upgrade("--wait")
        status = yield waitFor(self._draining, what="the old generation to drain")
        self.assertEqual(status["draining"][0]["connections"], 1)
        self.assertFalse(upgrading.called)
        reply = yield self.exchange(old, b"still here")
        self.assertEqual(reply[0], b"v1")
        old.transport.loseConnection()
        code, report, err = yield upgrading
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        status = yield self.host.status()
        self.assertEqual(status["draining"], [])

    @inlineCallbacks
    def _draining(self):
        status = yield self.host.status()
        return status if status["draining"] else None

    @inlineCallbacks
    def _noDraining(self):
        status = yield self.host.status()
        return status if not status["draining"] else None

    @inlineCallbacks
    def test_repeatedUpgradesRefuseNothing(self):
        """
        Three upgrades in a row while clients keep connecting in a tight
        loop and long-lived clients keep exchanging lines: no connection is
        refused or reset, every line is answered exactly once and in order,
        and every old process exits once its clients leave.
        """
        yield self.startHost("--drain-timeout", "30")
        longLived = []
        for _ in range(5):
            client = yield connectLineClient(self.port)
            yield client.waitForLines(1)
            longLived.append(client)
        failures = []
        attempts = [0]
        running = [True]

        @inlineCallbacks
        def churn():
            while running[0]:
                attempts[0] += 1
                try:
                    client = yield connectLineClient(self.port)
                    yield client.waitForLines(1, timeout=20)
                    client.sendLine(b"x")
                    yield client.waitForLines(2, timeout=20)
                    client.transport.loseConnection()
                except Exception as e:
                    failures.append(repr(e))

        churners = [churn() for _ in range(4)]
        counters = [0] * len(longLived)

        @inlineCallbacks
        def talk(index, client):
            counters[index] += 1
            number = counters[index]
            reply = yield self.exchange(client, b"n%d" % (number,))
            self.assertEqual(reply[2:], [b"n%d" % (number,), b"%d" % (number,)])

        pids = []
        for generation in range(3):
            for index, client in enumerate(longLived):
                yield talk(index, client)
            writeModule(
                self.host.workdir, "liveapp", APP_V1 if generation % 2 else APP_V2
            )
            code, report, err = yield self.host.upgrade()
            self.assertEqual((code, report["outcome"]), (0, "success"), err)
            self.assertEqual(report["toGeneration"], generation + 2)
            pids.append(report["oldPid"])
            for index, client in enumerate(longLived):
                yield talk(index, client)
        running[0] = False
        for each in churners:
            yield each
        self.assertEqual(failures, [])
        self.assertGreater(attempts[0], 20)
        for client in longLived:
            # Each long-lived client is still on the first process.
            self.assertEqual(fields(client.lines[-1])[1], str(pids[0]).encode())
            client.transport.loseConnection()
        for pid in pids:
            yield waitFor(
                lambda: not pidAlive(pid), what="process {} to exit".format(pid)
            )
        status = yield self.host.status()
        self.assertEqual(status["generation"], 4)
        self.assertEqual(status["draining"], [])

    @inlineCallbacks
    def assertStillServing(self, oldPid):
        client = yield connectLineClient(self.port)
        hello = yield client.waitForLines(1)
        self.assertEqual(fields(hello[0])[1:3], [b"v1", str(oldPid).encode()])
        client.transport.loseConnection()
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (oldPid, 1))
        self.assertEqual(status["phase"], "idle")

    @inlineCallbacks
    def test_successorCrashesAtImport(self):
        """
        A successor whose code does not import is reported with its last
        output; the old process never stopped serving, and a later upgrade
        with fixed code succeeds.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        client = yield connectLineClient(self.port)
        yield client.waitForLines(1)
        writeModule(self.host.workdir, "liveapp", APP_V2 + "\ndef broken(:\n")
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("SyntaxError", "\n".join(report["successorLog"]))
        yield self.assertStillServing(oldPid)
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])

        writeModule(self.host.workdir, "liveapp", APP_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        client.transport.loseConnection()

    @inlineCallbacks
    def test_successorExitsNonZero(self):
        """
        A successor that exits with an error status before it is ready is
        reported with that status; the old process keeps serving.
        """
        status = yield self.startHost()
        writeModule(
            self.host.workdir,
            "liveapp",
            APP_V2
            + "\nimport sys\nprint('refusing to start', flush=True)\nsys.exit(3)\n",
        )
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("refusing to start", "\n".join(report["successorLog"]))
        yield self.assertStillServing(status["pid"])

    @inlineCallbacks
    def test_successorNotReadyInTime(self):
        """
        A successor that is not ready within C{--ready-timeout} is killed;
        the old process keeps serving.
        """
        status = yield self.startHost("--ready-timeout", "2")
        writeModule(
            self.host.workdir,
            "liveapp",
            APP_V2
            + "\nimport time\nprint('loading slowly', flush=True)\ntime.sleep(600)\n",
        )
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("not ready within 2", report["reason"])
        self.assertIn("loading slowly", "\n".join(report["successorLog"]))
        yield self.assertStillServing(status["pid"])

    @inlineCallbacks
    def test_secondUpgradeWhileRunning(self):
        """
        An upgrade requested while another runs waits for it; once that
        one has handed on, this process no longer serves and says so, with
        a hint to try again, which C{--wait} does: the second upgrade then
        migrates the successor.
        """
        yield self.startHost()
        go = self.host.workdir.child("go").path
        # The first successor loads until the test lets it (bounded).
        writeModule(
            self.host.workdir,
            "liveapp",
            APP_V2
            + "\nimport os, time\n_until = time.monotonic() + 60\n"
            + "while not os.path.exists({!r}) and time.monotonic() < _until:\n".format(
                go
            )
            + "    time.sleep(0.02)\n",
        )
        first = self.host.upgrade()
        yield waitFor(self._migrating, what="the first migration to start")
        refused = self.host.upgrade()
        second = self.host.upgrade("--wait")
        yield waitFor(
            lambda: self.host.output().count("An upgrade request waits") == 2,
            what="both requests to wait",
        )
        open(go, "w").close()
        code, report, err = yield first
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        firstPid = report["newPid"]
        code, report, err = yield refused
        self.assertEqual(code, 1)
        self.assertIn("no longer serves", err)
        self.assertIn("try again", err)
        code, report, err = yield second
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual((report["oldPid"], report["fromGeneration"]), (firstPid, 2))

    @inlineCallbacks
    def _migrating(self):
        status = yield self.host.status()
        return status["phase"] != "idle"

    @inlineCallbacks
    def test_hangupUpgrades(self):
        """
        C{SIGHUP} runs the configured strategy.
        """
        status = yield self.startHost()
        writeModule(self.host.workdir, "liveapp", APP_V2)
        os.kill(status["pid"], signal.SIGHUP)
        status = yield waitFor(self._generationTwo, what="generation 2 to serve")
        self.assertNotEqual(status["pid"], self.host.sessionId)
        client = yield connectLineClient(self.port)
        hello = yield client.waitForLines(1)
        self.assertEqual(fields(hello[0])[1], b"v2")
        client.transport.loseConnection()

    @inlineCallbacks
    def _generationTwo(self):
        status = yield self.host.status()
        return status if status["generation"] == 2 else None
