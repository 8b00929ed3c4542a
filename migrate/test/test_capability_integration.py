"""
Integration tests for capability transfer: established connections move,
with their state and buffered bytes, to a new process running new code.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SkipTest, TestCase

from .._host._priority import BackgroundStart
from ._hostprocess import (
    LineClient,
    LiveAppMixin,
    connectLineClient,
    fields,
    freePort,
    largestSendQueue,
    pidAlive,
    waitFor,
    writeModule,
)
from .test_gradual_integration import APP_V1

#: a migratable application; replies say which code, which process, and
#: the per-connection count carried across migrations
MIGRATABLE_V1 = textwrap.dedent("""
    import os
    from zope.interface import implementer
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver
    from migrate import IMigratable

    VERSION = b"v1"

    @implementer(IMigratable)
    class Counter(LineReceiver):
        delimiter = b"\\n"
        migrationVersion = 1

        def connectionMade(self):
            self.count = 0
            self.sendLine(b"hello " + VERSION + b" %d" % os.getpid())

        def lineReceived(self, line):
            if line.startswith(b"flood "):
                for i in range(int(line.split()[1])):
                    self.sendLine(b"f%d " % i + b"." * 100)
                return
            self.count += 1
            self.sendLine(b"%s %d %s %d" % (VERSION, os.getpid(), line, self.count))

        def getMigrationState(self):
            return {"count": self.count}

        def restoreMigrationState(self, state):
            self.count = state["count"]

        def upgradeMigrationState(self, fromVersion, state):
            raise ValueError("cannot read version %r" % (fromVersion,))

    def makeFactory():
        return Factory.forProtocol(Counter)
""")

#: version 2 renames the state's field: an upgrade carries old state over
MIGRATABLE_V2 = (
    MIGRATABLE_V1.replace('VERSION = b"v1"', 'VERSION = b"v2"')
    .replace("migrationVersion = 1", "migrationVersion = 2")
    .replace('return {"count": self.count}', 'return {"total": self.count}')
    .replace('self.count = state["count"]', 'self.count = state["total"]')
    .replace(
        'raise ValueError("cannot read version %r" % (fromVersion,))',
        'return {"total": state["count"]} if fromVersion == 1 else state',
    )
)


#: a migratable protocol for every other connection, a plain one (which
#: stays and drains) for the others
MIXED_V1 = MIGRATABLE_V1 + textwrap.dedent("""
    class Plain(LineReceiver):
        delimiter = b"\\n"

        def connectionMade(self):
            # State of its own, which nothing knows how to carry: it stays.
            self.count = 0
            self.sendLine(b"hello plain %d" % os.getpid())

        def lineReceived(self, line):
            self.count += 1
            self.sendLine(b"plain %d %s %d" % (os.getpid(), line, self.count))

    class Alternating(Factory):
        built = 0

        def buildProtocol(self, addr):
            self.built += 1
            return (Counter if self.built % 2 else Plain)()

    def makeFactory():
        return Alternating()
""")

#: L{MIXED_V1} whose migratable protocol beats every 20 ms into
#: C{beats.log} ("PID beat"), from its start or its restore, and stops,
#: logging "PID told", when told its connection moved
HEARTBEAT_V1 = (
    MIXED_V1.replace(
        "    def getMigrationState(self):",
        textwrap.indent(
            textwrap.dedent("""
            def startBeating(self):
                from twisted.internet.task import LoopingCall
                self.heartbeat = LoopingCall(self.note, "beat")
                self.heartbeat.start(0.02, now=False)

            def note(self, what):
                with open("beats.log", "a") as log:
                    log.write("%d %s\\n" % (os.getpid(), what))

            def connectionMigrated(self):
                self.heartbeat.stop()
                self.note("told")

        """),
            "    ",
        )
        + "    def getMigrationState(self):",
    )
    .replace(
        '        self.count = 0\n        self.sendLine(b"hello " + VERSION',
        "        self.count = 0\n        self.startBeating()\n"
        '        self.sendLine(b"hello " + VERSION',
    )
    .replace(
        '        self.count = state["count"]',
        '        self.count = state["count"]\n        self.startBeating()',
    )
)

#: what the old process logs when it yields the processor to its successor
YIELDED = "connections and exits at nice 19 (SCHED_IDLE)"


def _refusingCountOne(source: str) -> str:
    """
    C{source}, a version 2 of the live application, made to refuse in its
    restore the connection whose count is 1.
    """
    return source.replace(
        'self.count = state["total"]',
        'self.count = state["total"]\n'
        '        if self.count == 1: raise RuntimeError("state refused")',
    )


class CapabilityTransferTests(LiveAppMixin, TestCase):
    """
    C{--strategy capability} with real processes.
    """

    timeout = 120
    strategy = "capability"
    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def test_connectionsMoveWithUpgradedState(self):
        """
        Every connection continues on the new code in the new process,
        with its state upgraded from version 1 to 2; nobody is disconnected
        and the old process exits since nothing is left to drain.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(5)
        for index, client in enumerate(clients):
            for n in range(index + 1):
                yield self.exchange(client, b"before")
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual((report["moved"], report["draining"]), (5, 0))
        newPid = report["newPid"]
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(
                reply, [b"v2", str(newPid).encode(), b"after", b"%d" % (index + 2,)]
            )
            self.assertFalse(client.closed.called)
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (newPid, 2))
        self.assertEqual(status["connections"], 5)
        for client in clients:
            client.transport.loseConnection()

    @inlineCallbacks
    def test_handedOnProcessYields(self):
        """
        Once its successor committed and nothing is left to drain, the old
        process (which ends once handed on: C{--keeper off}) lowers its own
        priority before it lets go of the moved connections, so that this
        and its exit take no processor from the successor serving them.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(3)
        for client in clients:
            yield self.exchange(client, b"before")
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"], report["draining"]), (0, 3, 0), err)
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")
        output = self.host.output()
        yielded = output.index("process {} lets go of 3 {}".format(oldPid, YIELDED))
        # The report was made and answered before the let-go.
        self.assertLess(output.index("Migration ended: success"), yielded)
        self.assertIn("Let go of 3 moved connections in", output[yielded:])
        for client in clients:
            reply = yield self.exchange(client, b"after")
            self.assertEqual(
                reply[1:], [str(report["newPid"]).encode(), b"after", b"2"]
            )
            client.transport.loseConnection()

    @inlineCallbacks
    def test_drainingProcessKeepsItsPriority(self):
        """
        An old process that still serves a connection after the commit (its
        protocol cannot move) keeps its priority: its clients are not slowed.
        """
        status = yield self.startHost(app=MIXED_V1)
        oldPid = status["pid"]
        before = os.getpriority(os.PRIO_PROCESS, oldPid)
        moving, staying = yield self.connectClients(2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"], report["draining"]), (0, 1, 1), err)
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, oldPid), before)
        self.assertNotIn(YIELDED, self.host.output())
        reply = yield self.exchange(staying, b"still")
        self.assertEqual(reply, [b"plain", str(oldPid).encode(), b"still", b"1"])
        reply = yield self.exchange(moving, b"moved")
        self.assertEqual(reply[1:], [str(report["newPid"]).encode(), b"moved", b"1"])
        for client in (moving, staying):
            client.transport.loseConnection()
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")

    @inlineCallbacks
    def test_oldProtocolsStopTheirTimers(self):
        """
        An old process that lives on after the commit (a connection that
        cannot move drains there) tells each moved connection's old
        protocol object, which stops its heartbeat: from the moment it is
        told, only the successor's object beats for that connection.
        """
        status = yield self.startHost(app=HEARTBEAT_V1)
        oldPid = status["pid"]
        moving, staying = yield self.connectClients(2)
        beats = self.host.workdir.child("beats.log")

        def beatsOf(pid: int, what: bytes = b"beat") -> list[int]:
            lines = beats.getContent().splitlines() if beats.exists() else []
            mark = b"%d %s" % (pid, what)
            return [index for index, line in enumerate(lines) if line == mark]

        yield waitFor(lambda: beatsOf(oldPid), what="the old object to beat")
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"], report["draining"]), (0, 1, 1), err)
        newPid = report["newPid"]
        yield waitFor(
            lambda: len(beatsOf(newPid)) >= 5, what="the new object to beat 5 times"
        )
        [told] = beatsOf(oldPid, b"told")
        self.assertLess(max(beatsOf(oldPid)), told)
        self.assertTrue(pidAlive(oldPid))
        reply = yield self.exchange(staying, b"still")
        self.assertEqual(reply, [b"plain", str(oldPid).encode(), b"still", b"1"])
        reply = yield self.exchange(moving, b"moved")
        self.assertEqual(reply[1:], [str(newPid).encode(), b"moved", b"1"])

    @inlineCallbacks
    def test_successorStartsInBackground(self):
        """
        The successor starts at the lowest priority, so that its start takes
        no processor from the clients still served, and is brought forward
        to the old process's priority, every thread of it, once it says it
        is ready, before the freeze: the new process then serves at the
        priority the service had.
        """
        if BackgroundStart.ifPossible(None, 1.0) is None:
            raise SkipTest("this process may not bring a child forward")
        # A deadline far enough that the successor is not brought forward
        # after a tenth of it, however loaded the machine.
        status = yield self.startHost("--ready-timeout", "600")
        oldPid = status["pid"]
        before = os.getpriority(os.PRIO_PROCESS, oldPid)
        [client] = yield self.connectClients(1)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 1), err)
        newPid = report["newPid"]
        output = self.host.output()
        started = output.index(
            "Started successor {} at nice 19 (SCHED_IDLE): ".format(newPid)
        )
        forward = output.index(
            "Brought process {} forward from nice 19 (SCHED_IDLE) to nice {} "
            "(SCHED_OTHER): its start is done".format(newPid, before)
        )
        self.assertLess(started, forward)
        self.assertLess(forward, output.index("froze and committed"))
        threads = os.listdir("/proc/{}/task".format(newPid))
        self.assertEqual(
            {os.getpriority(os.PRIO_PROCESS, int(each)) for each in threads}, {before}
        )
        reply = yield self.exchange(client, b"after")
        self.assertEqual(reply[1:3], [str(newPid).encode(), b"after"])
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")

    @inlineCallbacks
    def test_successorStartsInForeground(self):
        """
        With C{--child-start foreground} the successor starts at the old
        process's priority: nothing is brought forward.
        """
        status = yield self.startHost("--child-start", "foreground")
        oldPid = status["pid"]
        before = os.getpriority(os.PRIO_PROCESS, oldPid)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        newPid = report["newPid"]
        output = self.host.output()
        self.assertIn("Started successor {}: ".format(newPid), output)
        self.assertNotIn("Brought process", output)
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, newPid), before)
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")

    @inlineCallbacks
    def test_repeatedUpgradesUnderTraffic(self):
        """
        Three upgrades in a row while ten clients each send a numbered line
        every 20 ms and others connect in a loop: every line is answered
        exactly once and in order, the count goes on across every new
        version (the first upgrade converts its state from version 1 to 2),
        nobody is disconnected and no connection attempt fails.
        """
        yield self.startHost()
        clients = yield self.connectClients(10)
        sent = [0] * len(clients)

        def sendAll() -> None:
            for index, client in enumerate(clients):
                sent[index] += 1
                client.sendLine(b"n%d" % (sent[index],))

        writer = LoopingCall(sendAll)
        writer.start(0.02)
        self.addCleanup(lambda: writer.stop() if writer.running else None)
        failures: list[str] = []
        running = [True]

        @inlineCallbacks
        def churn() -> Any:
            while running[0]:
                try:
                    client = yield connectLineClient(self.port)
                    yield client.waitForLines(1, timeout=20)
                    client.transport.loseConnection()
                except Exception as e:
                    failures.append(repr(e))

        churners = [churn(), churn()]
        versions = [MIGRATABLE_V2] + [
            MIGRATABLE_V2.replace('b"v2"', 'b"v%d"' % (n,)) for n in (3, 4)
        ]
        for source in versions:
            before = min(len(client.lines) for client in clients)
            yield waitFor(
                lambda: min(len(client.lines) for client in clients) > before + 10,
                what="traffic to flow",
            )
            writeModule(self.host.workdir, "liveapp", source)
            code, report, err = yield self.host.upgrade()
            self.assertEqual((code, report["outcome"]), (0, "success"), err)
            self.assertGreaterEqual(report["moved"], len(clients))
        writer.stop()
        running[0] = False
        for each in churners:
            yield each
        for index, client in enumerate(clients):
            yield client.waitForLines(1 + sent[index])
        self.assertEqual(failures, [])
        for index, client in enumerate(clients):
            self.assertFalse(client.closed.called)
            replies = [fields(line) for line in client.lines[1:]]
            self.assertEqual(
                [reply[2:] for reply in replies],
                [[b"n%d" % (n,), b"%d" % (n,)] for n in range(1, sent[index] + 1)],
            )
            self.assertEqual(replies[-1][0], b"v4")

    @inlineCallbacks
    def test_halfLineCrossesTheHandoff(self):
        """
        The start of a line read by the old process and the rest sent to
        the new one make one line, answered once: after one more exchange,
        the client has had exactly one reply for each line it sent.
        """
        yield self.startHost()
        (client,) = yield self.connectClients(1)
        client.transport.write(b"first\nhal")
        yield client.waitForLines(2)
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual(code, 0, err)
        reply = yield self.exchange(client, b"f")
        self.assertEqual(reply[0], b"v2")
        self.assertEqual(reply[2:], [b"half", b"2"])
        # A late duplicate of either reply would come before this one.
        last = yield self.exchange(client, b"last")
        self.assertEqual(last[2:], [b"last", b"3"])
        self.assertEqual(
            [fields(line)[2:] for line in client.lines[1:]],
            [[b"first", b"1"], [b"half", b"2"], [b"last", b"3"]],
        )
        client.transport.loseConnection()

    @inlineCallbacks
    def test_queuedOutputDelivered(self):
        """
        Output the old process had queued for a client that was not reading
        arrives whole, once, in order, before the new code's replies.
        """
        yield self.startHost()
        (client,) = yield self.connectClients(1)
        lines = 200000
        client.transport.pauseProducing()
        client.sendLine(b"flood %d" % (lines,))
        # Wait until the old process really holds output it cannot write.
        yield waitFor(
            lambda: largestSendQueue(self.port) > 100000, what="queued output"
        )
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 1), err)
        client.transport.resumeProducing()
        yield client.waitForLines(1 + lines)
        reply = yield self.exchange(client, b"after")
        flood = client.lines[1 : 1 + lines]
        self.assertEqual(
            [line.split(b" ")[0] for line in flood], [b"f%d" % i for i in range(lines)]
        )
        self.assertEqual(reply[0], b"v2")
        self.assertEqual(len(client.lines), lines + 2)
        client.transport.loseConnection()

    @inlineCallbacks
    def test_nonMigratableConnectionsDrain(self):
        """
        Connections whose protocol does not provide IMigratable stay on the
        old process, which serves them until they leave.
        """
        status = yield self.startHost(app=APP_V1)
        oldPid = status["pid"]
        (client,) = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", APP_V1.replace('b"v1"', 'b"v2"'))
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"], report["draining"]), (0, 0, 1), err)
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
        status = yield self.host.status()
        self.assertEqual([d["pid"] for d in status["draining"]], [oldPid])
        client.transport.loseConnection()
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")

    @inlineCallbacks
    def test_refusedStateRollsBackEverything(self):
        """
        A restore that raises in the new code refuses the whole hand-off:
        nothing is carried (the report counts none moved or failed, and
        says why), every connection stays served by the old code with its
        state, unharmed; a later upgrade carries them all.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(3)
        yield self.exchange(clients[1], b"poison")
        writeModule(self.host.workdir, "liveapp", _refusingCountOne(MIGRATABLE_V2))
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("state refused", report["reason"])
        self.assertEqual(
            (report["moved"], report["failed"], report["newPid"]), (0, 0, None)
        )
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"ok")
            self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
            self.assertEqual(reply[3], b"2" if index == 1 else b"1")
            self.assertFalse(client.closed.called)
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 3), err)
        for client in clients:
            reply = yield self.exchange(client, b"moved")
            self.assertEqual(reply[0], b"v2")
            client.transport.loseConnection()

    @inlineCallbacks
    def test_successorDiesMidHandoff(self):
        """
        A successor that dies after the pre-copy, at the freeze, having
        restored some connections (here: one, then it exits while restoring
        the second) costs no connection: nothing is carried, the report
        says why, and the old process serves them all on with their state.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(4)
        for client in clients[2:]:
            yield self.exchange(client, b"x")
        writeModule(
            self.host.workdir,
            "liveapp",
            MIGRATABLE_V2.replace(
                'self.count = state["total"]',
                'self.count = state["total"]\n'
                '        with open("restored.log", "a") as log: log.write("one\\n")\n'
                '        if len(open("restored.log").read().split()) == 2: '
                "os._exit(7)",
            ),
        )
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertEqual(
            report["reason"], "the hand-off channel closed while committing"
        )
        self.assertEqual((report["moved"], report["failed"]), (0, 0))
        # The successor had restored one connection when it died.
        self.assertEqual(
            self.host.workdir.child("restored.log").getContent(), b"one\none\n"
        )
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"alive")
            self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
            self.assertEqual(reply[3], b"2" if index >= 2 else b"1")
            self.assertFalse(client.closed.called)
        newClient = yield connectLineClient(self.port)
        hello = yield newClient.waitForLines(1)
        self.assertEqual(hello[0].split(b" ")[1], b"v1")
        for client in clients + [newClient]:
            client.transport.loseConnection()


def _gate(name: str, indent: int) -> str:
    """
    Source of a gate in a test application, indented by C{indent} spaces:
    unless the test opened it (C{NAME.go} exists), say that this process
    waits (C{NAME.waiting}, with its process id) and wait for the test to
    open it, a minute at most.
    """
    return textwrap.indent(
        textwrap.dedent(f"""\
            if not os.path.exists("{name}.go"):
                with open("{name}.waiting", "w") as flag:
                    flag.write(str(os.getpid()))
                deadline = time.monotonic() + 60
                while not os.path.exists("{name}.go"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the test never opened the gate")
                    time.sleep(0.01)"""),
        " " * indent,
    )


#: version 2, whose factory waits in the successor's pre-copy until the
#: test opens the gate (after saying, with its process id, that it waits)
GATED_V2 = MIGRATABLE_V2.replace(
    """def makeFactory():
    return Factory.forProtocol(Counter)""",
    "import time\n"
    "\n"
    "class GatedFactory(Factory):\n"
    "    protocol = Counter\n"
    "\n"
    "    def buildProtocol(self, addr):\n" + _gate("precopy", 8) + "\n"
    "        return Factory.buildProtocol(self, addr)\n"
    "\n"
    "def makeFactory():\n"
    "    return GatedFactory()",
)
assert "GatedFactory" in GATED_V2


#: version 2, whose protocol can abandon a restore: the successor restores
#: its connections ahead of the freeze, the first one waiting until the
#: test opens a gate (after saying, with its process id, that it waits);
#: each restore registers the connection (as a chat room would), each
#: abandon unregisters it and says so, and each reply says how many are
#: registered
AHEAD_V2 = (
    MIGRATABLE_V2.replace(
        'self.count = state["total"]',
        'self.count = state["total"]\n' + _gate("ahead", 8) + "\n"
        "        REGISTERED.add(self)\n"
        "\n"
        "    def abandonMigrationState(self):\n"
        "        REGISTERED.discard(self)\n"
        '        print("abandoned a restore of count %d" % self.count, flush=True)',
    )
    .replace(
        'self.sendLine(b"%s %d %s %d" % (VERSION, os.getpid(), line, self.count))',
        'self.sendLine(b"%s %d %s %d %d" % (VERSION, os.getpid(), line, self.count, '
        "len(REGISTERED)))",
    )
    .replace('VERSION = b"v2"', 'VERSION = b"v2"\nREGISTERED = set()\nimport time')
)
assert "abandonMigrationState" in AHEAD_V2 and "len(REGISTERED)" in AHEAD_V2


#: L{AHEAD_V2}, whose abandon of a restore ahead (the re-copy's, in
#: L{PrecopyIntegrationTests.test_changesAroundTheRecopy}) waits until the
#: test opens a gate, after saying that it waits
RECOPY_V2 = AHEAD_V2.replace(
    "        REGISTERED.discard(self)",
    _gate("recopy", 8) + "\n        REGISTERED.discard(self)",
)
assert "recopy.go" in RECOPY_V2


class PrecopyIntegrationTests(LiveAppMixin, TestCase):
    """
    Pre-copy with real processes: what happens between the first copy of
    the connections and the freeze.  The new code's factory holds the
    successor inside the pre-copy until the test opens a gate.
    """

    timeout = 120
    strategy = "capability"
    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def atGate(self, name: str, where: str) -> Any:
        """
        Wait until the successor waits at the gate C{name} of its test
        application (see L{_gate}), C{where} it is; fire with its process
        id.
        """
        waiting = self.host.workdir.child(name + ".waiting")
        yield waitFor(
            lambda: waiting.exists() and waiting.getContent(),
            what="the successor to wait " + where,
        )
        return int(waiting.getContent())

    @inlineCallbacks
    def successorInPrecopy(self) -> Any:
        """
        Start an upgrade to L{GATED_V2}; fire with its L{Deferred} and the
        successor's process id once the successor waits in the pre-copy.
        """
        writeModule(self.host.workdir, "liveapp", GATED_V2)
        upgrade = self.host.upgrade()
        pid = yield self.atGate("precopy", "in the pre-copy")
        return upgrade, pid

    @inlineCallbacks
    def test_changesSinceTheCopyTravel(self):
        """
        Lines a client sends after its connection was pre-copied are
        answered by the old process; at the freeze, the state they changed
        and the half line it had read travel again: on the new process the
        count goes on from the latest state, the half line completes, and
        an untouched connection moves with its pre-copied state.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        active, quiet = yield self.connectClients(2)
        yield self.exchange(quiet, b"q")
        upgrade, _ = yield self.successorInPrecopy()
        for n in range(3):
            reply = yield self.exchange(active, b"meanwhile")
            self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
            self.assertEqual(reply[3], b"%d" % (n + 1,))
        active.transport.write(b"hal")
        self.host.workdir.child("precopy.go").touch()
        code, report, err = yield upgrade
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["moved"], 2)
        self.assertIn("precopy", report["durations"])
        newPid = str(report["newPid"]).encode()
        reply = yield self.exchange(active, b"f")
        self.assertEqual(reply, [b"v2", newPid, b"half", b"4"])
        reply = yield self.exchange(quiet, b"q")
        self.assertEqual(reply, [b"v2", newPid, b"q", b"2"])
        # Exactly one answer per line: no duplicate from either process.
        self.assertEqual(len(active.lines), 1 + 3 + 1)

    @inlineCallbacks
    def test_restoredAheadOfTheFreeze(self):
        """
        New code whose protocol defines C{abandonMigrationState} is
        restored ahead of the freeze, while the old process serves.  Lines
        two clients send meanwhile are answered by the old process; at the
        freeze, their objects restored ahead are abandoned (unregistered)
        and fresh ones restored from the latest state; the untouched
        connection keeps its object restored ahead.  Nothing is lost or
        answered twice, every count goes on, and the application knows
        each connection once.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        first, second, quiet = yield self.connectClients(3)
        yield self.exchange(quiet, b"q")
        writeModule(self.host.workdir, "liveapp", AHEAD_V2)
        upgrade = self.host.upgrade()
        yield self.atGate("ahead", "in its first restore ahead")
        for n in range(2):
            for client in (first, second):
                reply = yield self.exchange(client, b"meanwhile")
                self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
                self.assertEqual(reply[3], b"%d" % (n + 1,))
        first.transport.write(b"hal")
        self.host.workdir.child("ahead.go").touch()
        code, report, err = yield upgrade
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["moved"], 3)
        newPid = str(report["newPid"]).encode()
        reply = yield self.exchange(first, b"f")
        self.assertEqual(reply, [b"v2", newPid, b"half", b"3", b"3"])
        reply = yield self.exchange(second, b"s")
        self.assertEqual(reply, [b"v2", newPid, b"s", b"3", b"3"])
        reply = yield self.exchange(quiet, b"q")
        self.assertEqual(reply, [b"v2", newPid, b"q", b"2", b"3"])
        output = self.host.output()
        self.assertEqual(output.count("abandoned a restore of count 0"), 2, output)
        self.assertEqual(output.count("abandoned a restore"), 2, output)
        # Exactly one answer per line: no duplicate from either process.
        self.assertEqual(len(first.lines), 1 + 2 + 1)
        self.assertEqual(len(second.lines), 1 + 2 + 1)
        self.assertEqual(len(quiet.lines), 1 + 1 + 1)

    @inlineCallbacks
    def test_changesAroundTheRecopy(self):
        """
        A connection whose client sends lines after the pre-copy has its
        new state re-copied before the freeze (its object restored ahead
        abandoned, and not restored ahead again: it is active); lines and a
        half line it sends after that re-copy travel at the freeze, where
        it is restored.  Every line is answered once, by the old process
        until the freeze, by the new one after; the count goes on from the
        latest state, the half line completes, and the untouched connection
        keeps its first copy, restored ahead.
        """
        status = yield self.startHost()
        oldPid = str(status["pid"]).encode()
        active, quiet = yield self.connectClients(2)
        yield self.exchange(quiet, b"q")
        workdir = self.host.workdir
        writeModule(workdir, "liveapp", RECOPY_V2)
        upgrade = self.host.upgrade()
        yield self.atGate("ahead", "in its first restore ahead")
        for n in (1, 2):
            reply = yield self.exchange(active, b"before")
            self.assertEqual(reply, [b"v1", oldPid, b"before", b"%d" % (n,)])
        workdir.child("ahead.go").touch()
        yield self.atGate("recopy", "in the re-copy's abandon")
        reply = yield self.exchange(active, b"after")
        self.assertEqual(reply, [b"v1", oldPid, b"after", b"3"])
        active.transport.write(b"hal")
        workdir.child("recopy.go").touch()
        code, report, err = yield upgrade
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["moved"], 2)
        self.assertIn("recopy", report["durations"])
        newPid = str(report["newPid"]).encode()
        reply = yield self.exchange(active, b"f")
        self.assertEqual(reply, [b"v2", newPid, b"half", b"4", b"2"])
        reply = yield self.exchange(quiet, b"q")
        self.assertEqual(reply, [b"v2", newPid, b"q", b"2", b"2"])
        output = self.host.output()
        self.assertIn(
            "re-copy round 1: 1 connection changed since the last copy", output
        )
        self.assertIn(
            "froze and committed: 1 connection changed since their last copy", output
        )
        # Restored ahead from the pre-copy (count 0), abandoned at the
        # re-copy, and restored at the freeze only.
        self.assertEqual(output.count("abandoned a restore of count 0"), 1, output)
        self.assertEqual(output.count("abandoned a restore"), 1, output)
        # Exactly one answer per line: no duplicate from either process.
        self.assertEqual(len(active.lines), 1 + 3 + 1)
        self.assertEqual(len(quiet.lines), 1 + 1 + 1)

    @inlineCallbacks
    def test_recopiedStateOnly(self):
        """
        A connection that changed after the pre-copy and not after the
        re-copy reaches the new process with the re-copied state alone: the
        freeze finds nothing changed.
        """
        status = yield self.startHost()
        oldPid = str(status["pid"]).encode()
        once, quiet = yield self.connectClients(2)
        workdir = self.host.workdir
        workdir.child("recopy.go").touch()
        writeModule(workdir, "liveapp", RECOPY_V2)
        upgrade = self.host.upgrade()
        yield self.atGate("ahead", "in its first restore ahead")
        reply = yield self.exchange(once, b"before")
        self.assertEqual(reply, [b"v1", oldPid, b"before", b"1"])
        workdir.child("ahead.go").touch()
        code, report, err = yield upgrade
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        newPid = str(report["newPid"]).encode()
        output = self.host.output()
        self.assertIn(
            "re-copy round 1: 1 connection changed since the last copy", output
        )
        self.assertIn(
            "froze and committed: 0 connections changed since their last copy", output
        )
        reply = yield self.exchange(once, b"x")
        self.assertEqual(reply, [b"v2", newPid, b"x", b"2", b"2"])
        reply = yield self.exchange(quiet, b"q")
        self.assertEqual(reply, [b"v2", newPid, b"q", b"1", b"2"])

    @inlineCallbacks
    def test_successorDiesRestoringAhead(self):
        """
        A successor that dies while it restores connections ahead of the
        freeze costs nothing: the hand-off rolls back, and the old process,
        which never stopped serving them, goes on with every connection and
        its state.
        """
        status = yield self.startHost()
        oldPid = str(status["pid"]).encode()
        clients = yield self.connectClients(2)
        yield self.exchange(clients[0], b"x")
        writeModule(self.host.workdir, "liveapp", AHEAD_V2)
        upgrade = self.host.upgrade()
        pid = yield self.atGate("ahead", "in its first restore ahead")
        os.kill(pid, signal.SIGKILL)
        code, report, err = yield upgrade
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertEqual((report["moved"], report["failed"]), (0, 0))
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(reply, [b"v1", oldPid, b"after", b"%d" % (2 - index,)])
            self.assertFalse(client.closed.called)

    @inlineCallbacks
    def test_refusedAheadRollsBack(self):
        """
        A restore ahead of the freeze that the new code refuses refuses the
        whole hand-off, naming the connection: every connection stays
        served by the old code with its state.
        """
        status = yield self.startHost()
        oldPid = str(status["pid"]).encode()
        clients = yield self.connectClients(3)
        yield self.exchange(clients[1], b"poison")
        self.host.workdir.child("ahead.go").touch()
        writeModule(self.host.workdir, "liveapp", _refusingCountOne(AHEAD_V2))
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("state refused", report["reason"])
        self.assertIn(
            "the new code refused 1 of 3 connections (first: connection from",
            report["reason"],
        )
        self.assertEqual((report["moved"], report["failed"]), (0, 0))
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"ok")
            self.assertEqual(
                reply, [b"v1", oldPid, b"ok", b"2" if index == 1 else b"1"]
            )
            self.assertFalse(client.closed.called)

    @inlineCallbacks
    def test_successorLogsALotAtTheFreeze(self):
        """
        New code that writes more at the freeze than a pipe holds (here:
        100 KiB per connection it restores) does not stall the hand-off:
        the old process, standing still, keeps reading the successor's
        output, and logs it.
        """
        status = yield self.startHost("--freeze-timeout", "20")
        clients = yield self.connectClients(3)
        writeModule(
            self.host.workdir,
            "liveapp",
            MIGRATABLE_V2.replace(
                'self.count = state["total"]',
                'self.count = state["total"]\n'
                "        import sys\n"
                '        sys.stdout.write(("restoring %d " % self.count) * 8000 + "\\n")\n'
                '        sys.stdout.write("restored one\\n")\n'
                "        sys.stdout.flush()",
            ),
        )
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["moved"], 3)
        self.assertEqual(self.host.output().count("restored one"), 3)
        for client in clients:
            reply = yield self.exchange(client, b"after")
            self.assertEqual(reply[:2], [b"v2", str(report["newPid"]).encode()])
        self.assertNotEqual(status["pid"], report["newPid"])

    @inlineCallbacks
    def test_successorDiesDuringThePrecopy(self):
        """
        A successor that dies while it stages the pre-copied connections
        costs nothing: the old process never stopped serving them, the
        report says the hand-off rolled back, and every connection goes on
        with its state.  (L{CapabilityTransferTests.test_successorDiesMidHandoff}
        kills it later: after the pre-copy, while it restores at the
        freeze.)
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(3)
        yield self.exchange(clients[0], b"x")
        upgrade, successorPid = yield self.successorInPrecopy()
        reply = yield self.exchange(clients[1], b"during")
        self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
        os.kill(successorPid, signal.SIGKILL)
        code, report, err = yield upgrade
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertEqual((report["moved"], report["failed"]), (0, 0))
        self.assertEqual(
            report["reason"],
            "the hand-off channel closed while pre-copying connections",
        )
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
            self.assertEqual(reply[3], b"2" if index < 2 else b"1")
            self.assertFalse(client.closed.called)


def _descriptorCount(pid: int) -> int:
    return len(os.listdir("/proc/{}/fd".format(pid)))


def _ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class CapabilityFamiliesTests(LiveAppMixin, TestCase):
    """
    Capability transfer over every kind of stream connection a host serves:
    TCP over IPv4 and IPv6 and Unix sockets move; TLS connections, whose
    session lives in OpenSSL's memory, stay and drain.
    """

    timeout = 120
    strategy = "capability"
    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def startFamilies(self, *extra: str):
        self.unixPath = "/tmp/migrate-cap-{}.sock".format(os.getpid())
        self.addCleanup(
            lambda: os.unlink(self.unixPath) if os.path.exists(self.unixPath) else None
        )
        listen = ["--listen", "unix:" + self.unixPath]
        self.port6: int | None = None
        if _ipv6Loopback():
            self.port6 = freePort()
            listen += ["--listen", "tcp6:{}:interface=\\:\\:1".format(self.port6)]
        status = yield self.startHost(*(listen + list(extra)))
        return status

    @inlineCallbacks
    def connectOver(self, endpoint):
        client = yield endpoint.connect(Factory.forProtocol(LineClient))
        yield client.waitForLines(1)
        return client

    @inlineCallbacks
    def test_everyFamilyMoves(self):
        """
        Connections over IPv4, IPv6 and a Unix socket all move with their
        state; the old process exits.
        """
        status = yield self.startFamilies()
        oldPid = status["pid"]
        clients = [
            (
                yield self.connectOver(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
                )
            )
        ]
        clients.append(
            (yield self.connectOver(UNIXClientEndpoint(reactor, self.unixPath)))
        )
        if self.port6 is not None:
            clients.append(
                (yield self.connectOver(TCP6ClientEndpoint(reactor, "::1", self.port6)))
            )
        for client in clients:
            yield self.exchange(client, b"before")
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual(
            (code, report["moved"], report["draining"]), (0, len(clients), 0), err
        )
        for client in clients:
            reply = yield self.exchange(client, b"after")
            self.assertEqual(reply[0::3], [b"v2", b"2"])
            self.assertEqual(reply[1], str(report["newPid"]).encode())
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")
        for client in clients:
            client.transport.loseConnection()
        if self.port6 is None:
            raise SkipTest("no IPv6 loopback here: IPv4 and Unix moved")

    @inlineCallbacks
    def test_noDescriptorLeak(self):
        """
        Generation after generation, the serving process holds the same
        number of descriptors: nothing handed over is left open anywhere.
        """
        yield self.startHost()
        clients = yield self.connectClients(5)
        counts = []
        for generation in range(4):
            status = yield self.host.status()
            counts.append(_descriptorCount(status["pid"]))
            # Version 2 of the state, with the code changing each time.
            writeModule(
                self.host.workdir,
                "liveapp",
                MIGRATABLE_V2.replace('b"v2"', 'b"v2.%d"' % (generation,)),
            )
            code, report, err = yield self.host.upgrade()
            self.assertEqual((code, report["moved"]), (0, 5), err)
            yield waitFor(
                lambda: not pidAlive(report["oldPid"]), what="the old process to exit"
            )
        status = yield self.host.status()
        counts.append(_descriptorCount(status["pid"]))
        self.assertEqual(len(set(counts[1:])), 1, counts)
        for client in clients:
            client.transport.loseConnection()

    @inlineCallbacks
    def test_tlsDrains(self):
        """
        A TLS connection cannot move (its keys live in OpenSSL's memory): it
        stays on the old process, which keeps serving it, while plain TCP
        connections move.
        """
        try:
            from twisted.internet.ssl import CertificateOptions
        except ImportError:
            raise SkipTest("pyOpenSSL is not installed (the dev extra installs it)")
        import twisted.test
        from twisted.internet.endpoints import SSL4ClientEndpoint

        pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
        self.tlsPort = freePort()
        status = yield self.startHost(
            "--listen",
            "ssl:{}:interface=127.0.0.1:privateKey={}".format(self.tlsPort, pem),
        )
        oldPid = status["pid"]
        plain = yield connectLineClient(self.port)
        yield plain.waitForLines(1)
        secure = yield self.connectOver(
            SSL4ClientEndpoint(reactor, "127.0.0.1", self.tlsPort, CertificateOptions())
        )
        yield self.exchange(secure, b"over tls")
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"], report["draining"]), (0, 1, 1), err)
        reply = yield self.exchange(secure, b"still tls")
        self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
        reply = yield self.exchange(plain, b"moved")
        self.assertEqual(reply[0], b"v2")
        secure.transport.loseConnection()
        plain.transport.loseConnection()
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")


#: C{slow} is answered from a thread of the reactor's pool (deferToThread),
#: once the test creates C{thread.go}; C{thread.started} says it waits
THREADED_V1 = MIGRATABLE_V1.replace(
    """    def lineReceived(self, line):
""",
    """    def lineReceived(self, line):
        if line == b"slow":
            from twisted.internet.threads import deferToThread

            deferToThread(self.slowly).addCallback(self.sendLine)
            return
""",
).replace(
    """    def getMigrationState(self):""",
    """    def slowly(self):
        import time

        with open("thread.started", "w") as flag:
            flag.write(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not os.path.exists("thread.go"):
            if time.monotonic() > deadline:
                raise RuntimeError("the test never opened the gate")
            time.sleep(0.01)
        return b"%s %d slow" % (VERSION, os.getpid())

    def getMigrationState(self):""",
)
assert "deferToThread" in THREADED_V1 and "def slowly" in THREADED_V1


class ThreadWorkIntegrationTests(LiveAppMixin, TestCase):
    """
    A connection whose answer a thread computes (C{deferToThread}) looks
    idle: capability transfer waits for the answer before it freezes, and
    rolls back rather than lose it.
    """

    timeout = 120
    strategy = "capability"
    initialApp = THREADED_V1

    @inlineCallbacks
    def threadAnswering(self) -> Any:
        """
        Connect a client and ask for a slow answer; fire with the client
        once the old process's thread computes it.
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
    def test_answerArrivesBeforeTheMove(self):
        """
        The upgrade waits, saying so, until the thread's answer has been
        sent from the old process; then the connection moves, and the new
        code answers the next line with the state carried over.  The
        client gets each answer exactly once.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        client = yield self.threadAnswering()
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        upgrade = self.host.upgrade()
        yield waitFor(
            lambda: upgrade.called
            or "Waiting for threads before the freeze" in self.host.output(),
            what="the old process to wait for its thread",
        )
        self.assertEqual(len(client.lines), 2)
        self.host.workdir.child("thread.go").touch()
        code, report, err = yield upgrade
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["moved"], 1)
        lines = yield client.waitForLines(3, timeout=10)
        self.assertEqual(fields(lines[2]), [b"v1", str(oldPid).encode(), b"slow"])
        self.assertIn("before the freeze", err)
        reply = yield self.exchange(client, b"after")
        self.assertEqual(reply, [b"v2", str(report["newPid"]).encode(), b"after", b"2"])
        self.assertEqual(len(client.lines), 4)
        self.assertFalse(client.closed.called)

    @inlineCallbacks
    def test_answerTooSlowRollsBack(self):
        """
        A thread still computing at C{--safe-point-timeout} rolls the
        upgrade back: the old process serves on, and the answer, when it
        comes, reaches the client from there.
        """
        status = yield self.startHost("--safe-point-timeout", "0.5")
        oldPid = status["pid"]
        client = yield self.threadAnswering()
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("threads still owed answers after 0.5 s", report["reason"])
        self.host.workdir.child("thread.go").touch()
        lines = yield client.waitForLines(3)
        self.assertEqual(fields(lines[2]), [b"v1", str(oldPid).encode(), b"slow"])
        reply = yield self.exchange(client, b"after")
        self.assertEqual(reply, [b"v1", str(oldPid).encode(), b"after", b"2"])
