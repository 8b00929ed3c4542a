"""
Fault injection with real processes: successors that stop, run out of
descriptors or are aborted, clients that leave or keep talking in the
middle of a hand-off, garbage on the control socket, a second host on the
same control path, and a state too large to move.

After every fault the same promises hold: the service keeps answering,
every connection is either still served or handed over whole, new clients
are accepted, the host's log and the report say what happened, and a later
clean upgrade succeeds.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import textwrap
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.trial.unittest import SkipTest, TestCase

from ._hostprocess import (
    HostProcess,
    LiveAppMixin,
    connectLineClient,
    fields,
    freePort,
    pidAlive,
    waitFor,
    writeModule,
)

#: a migratable line counter: every reply says which code and process
#: answered, the line, and how many lines this connection sent in all (the
#: count moves with the connection).  C{big N} makes the connection's state
#: N characters larger.  The module-level knobs are changed by the
#: successor's code to inject faults.
FAULT_APP = textwrap.dedent("""
    import os, time
    from zope.interface import implementer
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver
    from migrate import IMigratable

    VERSION = b"v1"
    #: seconds each restore takes (a slow successor keeps connections frozen)
    RESTORE_DELAY = 0.0
    #: a file created at the first restore
    RESTORE_MARK = None
    # A file restores wait for after the mark (bounded), so that a test acts
    # while the successor is surely still adopting, whatever the timing.
    RESTORE_GATE = None
    # Restores wait (bounded) until the process that started this one is
    # gone: a test kills it while this one is surely still adopting.
    RESTORE_UNTIL_ORPHANED = False
    #: a file created when this code first builds a protocol for a
    #: connection handed over (capability's pre-copy stages it)
    BUILD_MARK = None
    # Building protocols waits (bounded) until the process that started this
    # one is gone: a test kills it while this one surely stages.
    BUILD_UNTIL_ORPHANED = False
    _PARENT = os.getppid()

    @implementer(IMigratable)
    class Counter(LineReceiver):
        delimiter = b"\\n"
        migrationVersion = 1

        def connectionMade(self):
            self.count = 0
            self.big = ""
            self.sendLine(b"hello " + VERSION + b" %d" % os.getpid())

        def lineReceived(self, line):
            if line.startswith(b"big "):
                self.big = "x" * int(line.split()[1])
            self.count += 1
            self.sendLine(b"%s %d %s %d" % (VERSION, os.getpid(), line, self.count))

        def getMigrationState(self):
            return {"count": self.count, "big": self.big}

        def restoreMigrationState(self, state):
            if RESTORE_MARK is not None and not os.path.exists(RESTORE_MARK):
                open(RESTORE_MARK, "w").close()
            _until = time.monotonic() + 30
            while RESTORE_GATE and not os.path.exists(RESTORE_GATE):
                if time.monotonic() > _until:
                    raise RuntimeError("the test never opened the gate")
                time.sleep(0.01)
            while RESTORE_UNTIL_ORPHANED and os.getppid() == _PARENT:
                if time.monotonic() > _until:
                    raise RuntimeError("the test never killed the old process")
                time.sleep(0.01)
            if RESTORE_DELAY:
                time.sleep(RESTORE_DELAY)
            self.count = state["count"]
            self.big = state["big"]

    class CounterFactory(Factory):
        protocol = Counter

        def buildProtocol(self, addr):
            if BUILD_MARK is not None and not os.path.exists(BUILD_MARK):
                open(BUILD_MARK, "w").close()
            _until = time.monotonic() + 30
            while BUILD_UNTIL_ORPHANED and os.getppid() == _PARENT:
                if time.monotonic() > _until:
                    raise RuntimeError("the test never killed the old process")
                time.sleep(0.01)
            return Factory.buildProtocol(self, addr)

    def makeFactory():
        return CounterFactory()
    """)

FAULT_APP_V2 = FAULT_APP.replace('VERSION = b"v1"', 'VERSION = b"v2"')


def newCode(*lines: str) -> str:
    """
    Version 2 of L{FAULT_APP}, with C{lines} run at the end of its import.
    """
    return FAULT_APP_V2 + "\n" + "\n".join(lines) + "\n"


def childrenOf(pid: int) -> list[int]:
    """
    The live (not zombie) processes whose parent is C{pid}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry)) as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(parent) == pid and state != "Z":
            found.append(int(entry))
    return found


def processState(pid: int) -> str | None:
    """
    The state letter of process C{pid} (C{"T"}: stopped), or L{None}.
    """
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def assertCleanOutput(testCase: TestCase, output: str) -> None:
    """
    Nothing in a host's output says that an error escaped.
    """
    for marker in ("Traceback", "Unhandled"):
        testCase.assertNotIn(marker, output)


if TYPE_CHECKING:
    _TestCaseForTyping = TestCase
else:
    _TestCaseForTyping = object


class FaultMixin(LiveAppMixin, _TestCaseForTyping):
    """
    Shared checks for the fault tests.
    """

    timeout = 30
    initialApp = FAULT_APP

    @inlineCallbacks
    def assertServedBy(self, clients, pid, version=b"v1"):
        """
        Every client in C{clients} is answered by C{pid} running C{version},
        and its count went up by one.
        """
        for client in clients:
            before = int(fields(client.lines[-1])[-1]) if len(client.lines) > 1 else 0
            reply = yield self.exchange(client, b"check")
            self.assertEqual(
                reply, [version, str(pid).encode(), b"check", b"%d" % (before + 1,)]
            )
            self.assertFalse(client.closed.called)

    @inlineCallbacks
    def assertNewClientsServed(self, pid, version=b"v1"):
        """
        A new client is accepted and greeted by C{pid} running C{version}.
        """
        client = yield connectLineClient(self.port)
        hello = yield client.waitForLines(1)
        self.assertEqual(fields(hello[0])[1:], [version, str(pid).encode()])
        client.transport.loseConnection()

    @inlineCallbacks
    def assertStillServing(self, pid, clients=()):
        """
        After a rolled-back migration: C{pid} serves generation 1, idle, its
        clients and new ones.
        """
        status = yield self.host.status()
        self.assertEqual(
            (status["pid"], status["generation"], status["phase"]), (pid, 1, "idle")
        )
        yield self.assertServedBy(clients, pid)
        yield self.assertNewClientsServed(pid)

    @inlineCallbacks
    def cleanUpgrade(self, clients=(), moved=None):
        """
        A clean upgrade to version 2 succeeds and the clients continue on
        the new process.
        """
        writeModule(self.host.workdir, "liveapp", FAULT_APP_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        if moved is not None:
            self.assertEqual(report["moved"], moved)
        yield self.assertServedBy(clients, report["newPid"], b"v2")
        yield self.assertNewClientsServed(report["newPid"], b"v2")
        return report

    def closeAll(self, clients):
        for client in clients:
            if client.transport is not None:
                client.transport.loseConnection()


class SuccessorFaultTests(FaultMixin, TestCase):
    """
    Successors that cannot take over: stopped, out of descriptors, or
    aborted because the old process is told to stop.
    """

    strategy = "capability"

    @inlineCallbacks
    def test_oldKilledMidHandoff(self):
        """
        The old process killed (C{SIGKILL}, nothing runs) while its
        successor stages the pre-copied connections: the successor, never
        told to commit, gives back everything it adopted and exits by
        itself; no orphan is left half-serving the listeners.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        yield self.connectClients(3)
        mark = self.host.workdir.child("adopting").path
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode("BUILD_MARK = {!r}".format(mark), "BUILD_UNTIL_ORPHANED = True"),
        )
        upgrading = self.host.upgrade()
        yield waitFor(lambda: os.path.exists(mark), what="the successor to adopt")
        (successor,) = childrenOf(oldPid)
        os.kill(oldPid, signal.SIGKILL)
        yield waitFor(lambda: not pidAlive(successor), what="the successor to give up")
        self.assertFalse(pidAlive(oldPid))
        yield upgrading.addErrback(lambda failure: None)
        self.assertIn(
            "closed the hand-off channel before committing", self.host.output()
        )

    @inlineCallbacks
    def test_oldKilledAtTheFreeze(self):
        """
        The old process killed (C{SIGKILL}) after it sent the freeze, while
        its successor restores: the commit was sent, and the old process
        read nothing since it took the delta, so the successor serves every
        connection on, with its state.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(3)
        yield self.exchange(clients[0], b"x")
        mark = self.host.workdir.child("restoring").path
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode(
                "RESTORE_MARK = {!r}".format(mark), "RESTORE_UNTIL_ORPHANED = True"
            ),
        )
        upgrading = self.host.upgrade()
        yield waitFor(lambda: os.path.exists(mark), what="the successor to restore")
        (successor,) = childrenOf(oldPid)
        os.kill(oldPid, signal.SIGKILL)
        yield upgrading.addErrback(lambda failure: None)
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(reply[:2], [b"v2", str(successor).encode()])
            self.assertEqual(reply[3], b"2" if index == 0 else b"1")
        self.closeAll(clients)

    @inlineCallbacks
    def test_freezeTimeout(self):
        """
        A successor that does not finish restoring within C{--freeze-timeout}
        makes the hand-off roll back at that bound (the old process stood
        still only that long, not for the whole C{--handoff-timeout}): it is
        killed, and every connection goes on in the old process with its
        state.
        """
        status = yield self.startHost("--freeze-timeout", "1")
        oldPid = status["pid"]
        clients = yield self.connectClients(2)
        yield self.exchange(clients[0], b"x")
        never = self.host.workdir.child("never").path
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode("RESTORE_GATE = {!r}".format(never)),
        )
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertEqual(
            report["reason"], "successor did not answer within 1.0 s while committing"
        )
        yield self.assertStillServing(oldPid, clients)
        reply = yield self.exchange(clients[0], b"y")
        self.assertEqual(reply[3], b"3")
        self.closeAll(clients)

    @inlineCallbacks
    def test_stoppedSuccessorKilledAtReadyTimeout(self):
        """
        A successor stopped with C{SIGSTOP} before it is ready is killed at
        the ready deadline (C{SIGKILL} ends a stopped process too); the old
        process keeps serving and a later upgrade succeeds.
        """
        status = yield self.startHost("--ready-timeout", "3")
        oldPid = status["pid"]
        clients = yield self.connectClients(2)
        go = self.host.workdir.child("go").path
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode(
                "_until = time.monotonic() + 20",
                "while not os.path.exists({!r}) and time.monotonic() < _until:".format(
                    go
                ),
                "    time.sleep(0.02)",
            ),
        )
        upgrading = self.host.upgrade()
        (successor,) = yield waitFor(
            lambda: childrenOf(oldPid), what="the successor to start"
        )
        os.kill(successor, signal.SIGSTOP)
        yield waitFor(lambda: processState(successor) == "T", what="it to stop")
        # Were it not stopped, it would now become ready at once.
        open(go, "w").close()
        code, report, err = yield upgrading
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("not ready within 3", report["reason"])
        self.assertFalse(pidAlive(successor))
        self.assertEqual(childrenOf(oldPid), [])
        self.assertIn(
            "Hand-off failed, rolling back: not ready within 3", self.host.output()
        )
        yield self.assertStillServing(oldPid, clients)
        yield self.cleanUpgrade(clients, moved=2)
        assertCleanOutput(self, self.host.output())
        self.closeAll(clients)

    @inlineCallbacks
    def test_successorOutOfDescriptors(self):
        """
        A successor whose descriptor limit is below what adopting every
        connection needs notices the truncated transfer (C{MSG_CTRUNC}) at
        once instead of waiting for descriptors that never come; the
        hand-off rolls back and every client stays on the old process.
        """
        status = yield self.startHost("--handoff-timeout", "20")
        oldPid = status["pid"]
        clients = yield self.connectClients(60)
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode(
                "import resource",
                "_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)",
                "resource.setrlimit(resource.RLIMIT_NOFILE, (40, _hard))",
            ),
        )
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("MSG_CTRUNC", report["reason"])
        # Detected, not waited out: far below the 20 s hand-off deadline.
        self.assertLess(report["durations"]["total"], 10)
        self.assertIn("MSG_CTRUNC", self.host.output())
        yield self.assertStillServing(oldPid, clients)
        yield self.cleanUpgrade(clients, moved=60)
        assertCleanOutput(self, self.host.output())
        self.closeAll(clients)

    @inlineCallbacks
    def test_terminatedDuringMigration(self):
        """
        C{SIGTERM} to the old process while its successor is still loading
        aborts the migration: the successor is killed, the upgrade command
        hears of the rollback (or of a clean disconnection), and both
        processes are gone without a traceback.
        """
        status = yield self.startHost("--ready-timeout", "25")
        oldPid = status["pid"]
        clients = yield self.connectClients(2)
        never = self.host.workdir.child("never").path
        # The successor loads until the test is over (bounded), whatever the
        # time the command takes to start.
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode(
                "_until = time.monotonic() + 60",
                "while not os.path.exists({!r}) and time.monotonic() < _until:".format(
                    never
                ),
                "    time.sleep(0.02)",
            ),
        )
        upgrading = self.host.upgrade("--timeout", "10")
        (successor,) = yield waitFor(
            lambda: childrenOf(oldPid), what="the successor to start"
        )
        os.kill(oldPid, signal.SIGTERM)
        code, report, err = yield upgrading
        # The report reaches the caller before the host closes its
        # connection.
        self.assertNotEqual(code, 0)
        self.assertEqual(report.get("outcome"), "rolled-back", report)
        self.assertIn("aborted: this process is stopping", report["reason"])
        exitCode = yield self.host.ended
        # twistd ends with the signal that stopped it, as is the custom.
        self.assertIn(exitCode, (0, -signal.SIGTERM), self.host.output())
        self.assertFalse(os.path.exists(self.host.control))
        self.assertFalse(pidAlive(successor))
        self.assertFalse(pidAlive(oldPid))
        self.assertIn(
            "Stopping during a migration: aborting it first", self.host.output()
        )
        assertCleanOutput(self, self.host.output())
        for client in clients:
            yield client.closed


class ClientFaultTests(FaultMixin, TestCase):
    """
    Clients that leave, or keep talking, while their connections move.
    """

    strategy = "capability"

    @inlineCallbacks
    def test_clientsLeaveDuringHandoff(self):
        """
        Clients closing (cleanly or with a reset) while their connections
        are frozen and being adopted cause no error: the others move with
        their state and the new process counts only the living.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(30)
        for client in clients:
            yield self.exchange(client, b"before")
        mark = self.host.workdir.child("restoring").path
        gate = self.host.workdir.child("go").path
        writeModule(
            self.host.workdir,
            "liveapp",
            newCode(
                "RESTORE_MARK = {!r}".format(mark), "RESTORE_GATE = {!r}".format(gate)
            ),
        )
        upgrading = self.host.upgrade()
        yield waitFor(lambda: os.path.exists(mark), what="the restores to start")
        leaving, staying = clients[:20], clients[20:]
        for client in leaving[:10]:
            client.transport.loseConnection()
        for client in leaving[10:]:
            client.transport.abortConnection()
        yield waitFor(
            lambda: all(client.closed.called for client in leaving),
            what="the leaving clients to be gone",
        )
        # The successor restores the rest only now.
        open(gate, "w").close()
        code, report, err = yield upgrading
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(
            (report["moved"], report["draining"], report["failed"]), (30, 0, 0)
        )
        # Those that left during the hand-off were handed over, not refused:
        # the new process sees them close.
        newPid = report["newPid"]
        yield self.assertServedBy(staying, newPid, b"v2")
        status = yield waitFor(
            lambda: self.host.status().addCallback(
                lambda s: s if s["connections"] == 10 else None
            ),
            what="the new process to count 10 connections",
        )
        self.assertEqual(status["pid"], newPid)
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")
        yield self.assertNewClientsServed(newPid, b"v2")
        writeModule(self.host.workdir, "liveapp", FAULT_APP)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 10), err)
        yield self.assertServedBy(staying, report["newPid"])
        assertCleanOutput(self, self.host.output())
        self.closeAll(staying)

    @inlineCallbacks
    def test_linesDuringPauseAnsweredOnce(self):
        """
        Clients writing lines without pause while their connections move
        get every line answered exactly once, in order, by the old code
        and then the new.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(3)
        sent = [0] * len(clients)

        def sendAll():
            for index, client in enumerate(clients):
                sent[index] += 1
                client.sendLine(b"n%d" % (sent[index],))

        writer = LoopingCall(sendAll)
        writer.start(0.01)
        self.addCleanup(lambda: writer.stop() if writer.running else None)
        yield waitFor(lambda: min(sent) > 20, what="the writers to start")
        writeModule(self.host.workdir, "liveapp", newCode("RESTORE_DELAY = 0.2"))
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 3), err)
        newPid = report["newPid"]
        target = min(sent) + 20
        yield waitFor(lambda: min(sent) > target, what="more lines after the upgrade")
        writer.stop()
        for index, client in enumerate(clients):
            lines = yield client.waitForLines(1 + sent[index])
            replies = [fields(line) for line in lines[1:]]
            self.assertEqual(len(replies), sent[index])
            self.assertEqual(
                [(reply[2], reply[3]) for reply in replies],
                [(b"n%d" % (n,), b"%d" % (n,)) for n in range(1, sent[index] + 1)],
            )
            versions = [(reply[0], reply[1]) for reply in replies]
            switch = versions.index((b"v2", str(newPid).encode()))
            self.assertGreater(switch, 0)
            self.assertEqual(set(versions[:switch]), {(b"v1", str(oldPid).encode())})
            self.assertEqual(set(versions[switch:]), {(b"v2", str(newPid).encode())})
        assertCleanOutput(self, self.host.output())
        self.closeAll(clients)

    @inlineCallbacks
    def test_oversizeStateStaysAndDrains(self):
        """
        A connection whose state is over the codec's limit (1 MiB) cannot
        move: it stays on the old process, which serves it until it leaves;
        the others move, and the report and the log say why one stayed.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(3)
        yield self.exchange(clients[1], b"big %d" % (1100 * 1024,))
        writeModule(self.host.workdir, "liveapp", FAULT_APP_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual((report["moved"], report["draining"]), (2, 1))
        prefix = "1 connection cannot move and stays on process {}: ".format(oldPid)
        self.assertTrue(
            any(
                note.startswith(prefix) and "limit of 1048576 bytes" in note
                for note in report["notes"]
            ),
            report["notes"],
        )
        self.assertIn("cannot move, it stays", self.host.output())
        newPid = report["newPid"]
        yield self.assertServedBy([clients[0], clients[2]], newPid, b"v2")
        yield self.assertServedBy([clients[1]], oldPid, b"v1")
        status = yield self.host.status()
        self.assertEqual(
            [(each["pid"], each["connections"]) for each in status["draining"]],
            [(oldPid, 1)],
        )
        yield self.assertNewClientsServed(newPid, b"v2")
        clients[1].transport.loseConnection()
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")
        writeModule(self.host.workdir, "liveapp", FAULT_APP)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 2), err)
        assertCleanOutput(self, self.host.output())
        self.closeAll([clients[0], clients[2]])


# The control socket


def box(**values: bytes) -> bytes:
    """
    An AMP box on the wire.
    """
    wire: bytes = amp.AmpBox({k.encode(): v for k, v in values.items()}).serialize()
    return wire


def readBox(sock: socket.socket) -> dict[bytes, bytes]:
    """
    Read one AMP box from a blocking socket (with a timeout set).
    """
    data = b""

    def take(size: int) -> bytes:
        nonlocal data
        while len(data) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("closed after {!r}".format(data[:200]))
            data += chunk
        taken: bytes = data[:size]
        data = data[size:]
        return taken

    result: dict[bytes, bytes] = {}
    while True:
        (length,) = struct.unpack("!H", take(2))
        if not length:
            return result
        key = take(length)
        (length,) = struct.unpack("!H", take(2))
        result[key] = take(length)


def isCut(sock: socket.socket) -> bool:
    """
    Whether the other side closed C{sock} (within its timeout).
    """
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


class ControlFaultTests(FaultMixin, TestCase):
    """
    Bad input on the control socket, and a second host on the same path.
    """

    strategy = "capability"

    def controlConnection(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        sock.connect(self.host.control)
        return sock

    @inlineCallbacks
    def test_garbageOnControlSocket(self):
        """
        Random bytes, oversize boxes, unknown commands, descriptors and
        abrupt disconnects on the control socket leave the host answering
        C{status} and able to migrate; a connection announcing a value
        larger than a box may hold is cut at once.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(2)

        # A huge length prefix, for a key and for a value: cut.
        sock = self.controlConnection()
        sock.sendall(b"\xff\xff")
        self.assertTrue(isCut(sock))
        sock = self.controlConnection()
        sock.sendall(b"\x00\x08_command\xff\xff")
        self.assertTrue(isCut(sock))
        # Too many keys, then values over the box limit: cut.
        sock = self.controlConnection()
        sock.sendall(box(**{"k%d" % i: b"v" for i in range(40)}))
        self.assertTrue(isCut(sock))
        sock = self.controlConnection()
        sock.sendall(box(_command=b"Status", _ask=b"1", a=b"x" * 40000, b=b"y" * 40000))
        self.assertTrue(isCut(sock))
        # A descriptor: cut.
        sock = self.controlConnection()
        with open(os.devnull) as devnull:
            sock.sendmsg(
                [b"\x00"],
                [
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_RIGHTS,
                        struct.pack("i", devnull.fileno()),
                    )
                ],
            )
        self.assertTrue(isCut(sock))
        # An unknown command is answered with an error; the same
        # connection then gets its status.
        sock = self.controlConnection()
        sock.sendall(box(_command=b"Explode", _ask=b"1"))
        answer = readBox(sock)
        self.assertEqual(answer[b"_error"], b"1")
        sock.sendall(box(_command=b"Status", _ask=b"2"))
        answer = readBox(sock)
        self.assertEqual(answer[b"_answer"], b"2")
        self.assertIn(b'"pid": %d' % (oldPid,), answer[b"status"])
        # Random bytes and abrupt disconnects (some mid-box, some reset).
        rng = random.Random(9)
        for round in range(20):
            sock = self.controlConnection()
            if round % 3:
                sock.sendall(
                    bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000)))
                )
            else:
                sock.sendall(box(_command=b"Status", _ask=b"1")[: rng.randrange(1, 20)])
            if round % 2:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            sock.close()
        yield self.assertStillServing(oldPid, clients)
        self.assertIn("Dropped the control connection", self.host.output())
        yield self.cleanUpgrade(clients, moved=2)
        assertCleanOutput(self, self.host.output())
        self.closeAll(clients)

    @inlineCallbacks
    def test_upgraderDisconnectsAtOnce(self):
        """
        An upgrade requested by a client that disconnects at once still
        runs to its end; the report is kept for C{status}.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(2)
        writeModule(self.host.workdir, "liveapp", FAULT_APP_V2)
        sock = self.controlConnection()
        sock.sendall(box(_command=b"Upgrade", _ask=b"1"))
        sock.close()
        status = yield waitFor(
            lambda: self.host.status().addCallback(
                lambda s: s if s["generation"] == 2 else None
            ),
            what="generation 2 to serve",
        )
        self.assertEqual(status["lastReport"]["outcome"], "success")
        self.assertEqual(status["lastReport"]["oldPid"], oldPid)
        yield self.assertServedBy(clients, status["pid"], b"v2")
        writeModule(self.host.workdir, "liveapp", FAULT_APP)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["moved"]), (0, 2), err)
        assertCleanOutput(self, self.host.output())
        self.closeAll(clients)

    def launch(self, hostProcess: HostProcess, port: int) -> Deferred[int]:
        """
        Start a host without waiting for its control channel; fire with its
        exit code.
        """
        hostProcess.arguments = [
            "--app",
            "liveapp:makeFactory",
            "--listen",
            "tcp:{}:interface=127.0.0.1".format(port),
            "--strategy",
            self.strategy,
        ]
        return hostProcess.spawn()

    @inlineCallbacks
    def test_strangerCutBeforeAnyAnswer(self):
        """
        A process of another user that reaches the control socket anyway
        (its mode loosened by mistake) is cut off before any answer, even to
        a well-formed C{Status}; the host logs who it was and keeps
        answering its own user.
        """
        if os.getuid() != 0:
            raise SkipTest("needs root, to connect as another user")
        yield self.startHost()
        os.chmod(self.host.workdir.path, 0o711)
        os.chmod(self.host.control, 0o666)
        stranger = textwrap.dedent("""
            import socket, sys
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(sys.argv[1])
            received = b""
            try:
                # Cut at once, the host may not even read the request.
                sock.sendall(sys.stdin.buffer.read())
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass
            print(repr(received))
            """)
        request = box(_command=b"Status", _ask=b"1")

        # The stranger needs no more than the standard library, from an
        # interpreter another user may run (this one may live in root's home).
        interpreter = "/usr/bin/python3"
        if not os.access(interpreter, os.X_OK):
            raise SkipTest("no system Python for the stranger to run")

        def connectAsNobody() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [interpreter, "-c", stranger, self.host.control],
                input=request,
                capture_output=True,
                user=65534,
                timeout=20,
            )

        result = yield deferToThread(connectAsNobody)
        self.assertEqual(result.stdout.strip(), b"b''", result.stderr)
        status = yield self.host.status()
        self.assertEqual(status["phase"], "idle")
        yield waitFor(
            lambda: "uid 65534" in self.host.output(), what="the refusal in the log"
        )

    @inlineCallbacks
    def test_secondHostOnSameControlPath(self):
        """
        A second host started with the control path of a running one
        refuses to start, saying why, and the first is unharmed.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        clients = yield self.connectClients(2)
        second = HostProcess(self, [])
        writeModule(second.workdir, "liveapp", FAULT_APP)
        second.control = self.host.control
        exitCode = yield self.launch(second, freePort())
        self.assertNotEqual(exitCode, 0)
        # Refused before it opened anything, with a usage error, not a
        # traceback.
        self.assertIn(
            "control socket {} is in use by another live host".format(
                self.host.control
            ),
            second.output(),
        )
        self.assertNotIn("Listening on", second.output())
        assertCleanOutput(self, second.output())
        self.assertTrue(os.path.exists(self.host.control))
        yield self.assertStillServing(oldPid, clients)
        yield self.cleanUpgrade(clients, moved=2)
        self.closeAll(clients)

    @inlineCallbacks
    def test_staleControlSocketReplaced(self):
        """
        The control socket file left by a host killed with C{SIGKILL} is
        replaced when a host starts again on the same path.
        """
        yield self.startHost()
        first = self.host
        assert first.sessionId is not None
        os.killpg(first.sessionId, signal.SIGKILL)
        yield first.ended
        self.assertTrue(os.path.exists(first.control))
        self.host = HostProcess(
            self,
            [
                "--app",
                "liveapp:makeFactory",
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(self.port),
                "--strategy",
                self.strategy,
            ],
            workdir=first.workdir,
        )
        status = yield self.host.start()
        self.assertEqual(status["generation"], 1)
        clients = yield self.connectClients(1)
        yield self.assertStillServing(status["pid"], clients)
        yield self.cleanUpgrade(clients, moved=1)
        self.closeAll(clients)
