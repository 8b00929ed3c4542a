"""
Tests for L{migrate._handoff._movement}: describing frozen connections on the side
that lets go, adopting and restoring them on the side that takes over.

Real Unix socketpairs stand in for client connections (freezing and
adopting need real descriptors); the host is a small fake.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any
from unittest import SkipTest

from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from .._handoff._movement import (
    adoptEntry,
    describeMovable,
    freezeMovable,
    stageEntry,
    whyNotMigratable,
)
from .._handoff._polls import afterPolls
from .._handoff._transport import DetachedTransport
from .._handoff._waiting import servingOrder
from .._host._tracking import TrackingFactory
from ..interfaces import IMigratable
from ..state import StateError


@implementer(IMigratable)
class Counter(LineReceiver):
    """
    A migratable line protocol that counts lines and says hello.
    """

    delimiter = b"\n"
    migrationVersion = 1
    made = 0

    def __init__(self) -> None:
        self.count = 0
        self.restored: Any = None

    def connectionMade(self) -> None:
        Counter.made += 1
        self.sendLine(b"hello")

    def lineReceived(self, line: bytes) -> None:
        self.count += 1
        self.sendLine(b"%d %s" % (self.count, line))

    def getMigrationState(self) -> Any:
        if self.count < 0:
            raise RuntimeError("cannot describe myself")
        return {"count": self.count}

    def restoreMigrationState(self, state: Any) -> None:
        self.restored = state
        self.count = state["count"]
        self.sendLine(b"restored")

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


class WatchedCounter(Counter):
    """
    A L{Counter} that records, after each answer, whether its transport
    waits for the reactor to write it.
    """

    def __init__(self) -> None:
        Counter.__init__(self)
        self.registered: list[bool] = []

    def lineReceived(self, line: bytes) -> None:
        Counter.lineReceived(self, line)
        transport: Any = self.transport
        self.registered.append(transport.transport in reactor.getWriters())


class QuietCounter(Counter):
    """
    A L{Counter} that says nothing when restored.
    """

    def restoreMigrationState(self, state: Any) -> None:
        self.restored = state
        self.count = state["count"]


class AbandoningCounter(Counter):
    """
    A L{Counter} that can abandon a restore: it records that it was told.
    """

    abandoned: list["AbandoningCounter"] = []

    def restoreMigrationState(self, state: Any) -> None:
        Counter.restoreMigrationState(self, state)
        # As a protocol that streams to its client would.
        transport: Any = self.transport
        transport.registerProducer(self, True)

    def abandonMigrationState(self) -> None:
        AbandoningCounter.abandoned.append(self)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Plain(Protocol):
    """
    A protocol that knows nothing of migrate.
    """


@define
class _Listener:
    key: str
    factory: TrackingFactory


@define
class FakeHost:
    """
    The parts of L{migrate.MigrationHost} that moving connections uses.
    """

    reactor: Any
    listeners: dict[str, _Listener] = field(factory=dict)

    def listen(self, key: str, protocol: type[Protocol]) -> _Listener:
        listener = _Listener(key, TrackingFactory(key, Factory.forProtocol(protocol)))
        self.listeners[key] = listener
        return listener

    def listenerNamed(self, key: str) -> _Listener:
        return self.listeners[key]

    def allConnections(self) -> Any:
        for listener in self.listeners.values():
            for hosted in listener.factory.connections:
                yield listener, hosted


class ServedSocketpairs(TestCase):
    """
    A base for tests of moving connections: one end of a socketpair
    served by a fake host, the other the client's.
    """

    host: FakeHost
    received: dict[socket.socket, bytes]

    def setUp(self) -> None:
        self.host = FakeHost(reactor)
        self.received: dict[socket.socket, bytes] = {}

    def serve(self, key: str, protocol: type[Protocol]) -> tuple[Any, socket.socket]:
        """
        Serve one end of a socketpair on listener C{key}; return the hosted
        protocol and the client's end.
        """
        listener = self.host.listeners.get(key) or self.host.listen(key, protocol)
        server, client = socket.socketpair()
        self.addCleanup(client.close)
        transport = reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            server.fileno(), socket.AF_UNIX, listener.factory
        )
        server.close()
        self.addCleanup(lambda: transport.loseConnection())
        return transport.protocol, client

    @inlineCallbacks
    def readLines(self, client: socket.socket, count: int) -> Any:
        """
        Let the reactor run until the client has C{count} lines (bounded).
        """
        client.setblocking(False)
        data = self.received.get(client, b"")
        deadline = reactor.seconds() + 10
        while data.count(b"\n") < count:
            try:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            except BlockingIOError:
                if reactor.seconds() > deadline:
                    raise AssertionError("no {} lines in {!r}".format(count, data))
                yield deferLater(reactor, 0.01, lambda: None)
        lines = data.split(b"\n")
        self.received[client] = b"\n".join(lines[count:])
        return lines[:count]


class MovementTests(ServedSocketpairs):
    """
    L{freezeMovable} and L{adoptEntry} over real sockets.
    """

    def test_describesMovableConnections(self) -> None:
        """
        A migratable connection is frozen and described: its listener, its
        socket family, its state, the half line Twisted read and the output
        it had not written.
        """
        hosted, client = self.serve("tcp:1", Counter)
        hosted.wrappedProtocol.count = 3
        hosted.wrappedProtocol.dataReceived(b"hal")
        hosted.transport.stopWriting()
        hosted.transport.write(b"unsent\n")
        moving, staying = freezeMovable(self.host.allConnections())
        self.assertEqual(staying, [])
        (each,) = moving
        entry = each.entry
        self.assertEqual((entry["id"], entry["listener"]), (1, "tcp:1"))
        self.assertEqual(entry["family"], int(socket.AF_UNIX))
        self.assertEqual(entry["state"]["appState"], {"count": 3})
        self.assertIn("LineReceiver", entry["state"]["buffers"])
        self.assertTrue(base64.b64decode(entry["output"]).endswith(b"unsent\n"))
        each.resume()

    @inlineCallbacks
    def test_describeLeavesConnectionsAlone(self) -> Any:
        """
        L{describeMovable} describes each connection as L{freezeMovable}
        does (output written while its state is captured included), and
        touches nothing: the connection reads and writes on, and those
        that cannot move stay with the reason.
        """
        self.serve("tcp:plain", Plain)
        hosted, client = self.serve("tcp:1", Counter)
        yield self.readLines(client, 1)
        hosted.wrappedProtocol.count = 3
        hosted.wrappedProtocol.dataReceived(b"hal")
        transport = hosted.transport
        transport.stopWriting()
        transport.write(b"unsent\n")
        capture = hosted.wrappedProtocol.getMigrationState

        def writingCapture() -> Any:
            transport.write(b"while captured\n")
            return capture()

        hosted.wrappedProtocol.getMigrationState = writingCapture
        described, staying = describeMovable(self.host.allConnections())
        (each,) = described
        self.assertEqual(
            (each.listenerKey, each.descriptor()), ("tcp:1", transport.fileno())
        )
        entry = each.entry
        self.assertEqual((entry["id"], entry["listener"]), (1, "tcp:1"))
        self.assertEqual(entry["family"], int(socket.AF_UNIX))
        self.assertEqual(entry["state"]["appState"], {"count": 3})
        self.assertIn("LineReceiver", entry["state"]["buffers"])
        self.assertEqual(base64.b64decode(entry["output"]), b"unsent\nwhile captured\n")
        self.assertEqual(
            [each.reason for each in staying], ["Plain does not provide IMigratable"]
        )
        del hosted.wrappedProtocol.getMigrationState
        transport.startWriting()
        client.sendall(b"f\n")
        lines = yield self.readLines(client, 3)
        self.assertEqual(lines, [b"unsent", b"while captured", b"4 half"])

    @inlineCallbacks
    def test_unmovableStay(self) -> Any:
        """
        A protocol that does not provide IMigratable, and one whose state
        cannot be captured, stay where they are (the latter resumed), each
        with the reason.
        """
        self.serve("tcp:plain", Plain)
        hosted, client = self.serve("tcp:1", Counter)
        hosted.wrappedProtocol.count = -1
        moving, staying = freezeMovable(self.host.allConnections())
        self.assertEqual(moving, [])
        reasons = sorted(each.reason for each in staying)
        self.assertIn("Plain does not provide IMigratable", reasons[0])
        self.assertIn("cannot describe myself", reasons[1])
        # Resumed: it reads and answers again.
        client.sendall(b"still\n")
        lines = yield self.readLines(client, 2)
        self.assertEqual(lines, [b"hello", b"0 still"])

    @inlineCallbacks
    def test_adoptRestoresHeldUntilCommit(self) -> Any:
        """
        The taking side restores the protocol instead of telling it
        connectionMade, and holds everything (the pending output first, then
        what the restored protocol wrote) until the commit; after it, the
        half line completes with the next bytes.
        """
        hosted, client = self.serve("tcp:1", Counter)
        hello = yield self.readLines(client, 1)
        self.assertEqual(hello, [b"hello"])
        hosted.wrappedProtocol.count = 7
        hosted.wrappedProtocol.dataReceived(b"hal")
        hosted.transport.stopWriting()
        hosted.transport.write(b"pending\n")
        (each,), _ = freezeMovable(self.host.allConnections())
        descriptor = os.dup(each.frozen.descriptor())
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", Counter)
        made = Counter.made
        adopted = adoptEntry(taker, each.entry, descriptor)
        each.release()
        protocol: Any = adopted.hosted.wrappedProtocol
        self.assertEqual((protocol.restored, Counter.made), ({"count": 7}, made))
        # Held: nothing reaches the client before the commit, however many
        # times the reactor polls (counted in polls, not time), and the
        # transport is not even registered to write.
        yield afterPolls(reactor, 10)
        self.assertNotIn(adopted.transport, reactor.getWriters())
        client.setblocking(False)
        self.assertRaises(BlockingIOError, client.recv, 1)
        adopted.commit()
        client.sendall(b"f\n")
        lines = yield self.readLines(client, 3)
        self.assertEqual(lines, [b"pending", b"restored", b"8 half"])
        adopted.transport.loseConnection()

    @inlineCallbacks
    def test_firstAnswersLeaveAtOnce(self) -> Any:
        """
        Once committed, a moved connection answers what its client sent
        meanwhile at once, each answer sent as it is written (the
        transport never registered for writing); later answers go through
        the reactor as usual.
        """
        hosted, client = self.serve("tcp:1", WatchedCounter)
        yield self.readLines(client, 1)
        (each,), _ = freezeMovable(self.host.allConnections())
        descriptor = os.dup(each.frozen.descriptor())
        # Sent while frozen, as a client whose connection is moving would.
        client.sendall(b"a\nb\n")
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", WatchedCounter)
        adopted = adoptEntry(taker, each.entry, descriptor)
        each.release()
        protocol: Any = adopted.hosted.wrappedProtocol
        adopted.commit()
        lines = yield self.readLines(client, 3)
        self.assertEqual(lines, [b"restored", b"1 a", b"2 b"])
        self.assertEqual(protocol.registered, [False, False])
        client.sendall(b"c\n")
        lines = yield self.readLines(client, 1)
        self.assertEqual(lines, [b"3 c"])
        self.assertEqual(protocol.registered, [False, False, True])
        adopted.transport.loseConnection()

    @inlineCallbacks
    def test_waitingServedFirst(self) -> Any:
        """
        Of the connections adopted held, L{servingOrder} puts first the one
        whose client sent while it was frozen and leaves the quiet one for
        later; served, the waiting one answers what its client sent.
        """
        served = [self.serve("tcp:1", QuietCounter) for _ in range(2)]
        for count, (hosted, client) in zip((10, 20), served):
            yield self.readLines(client, 1)
            hosted.wrappedProtocol.count = count
        moving, _ = freezeMovable(self.host.allConnections())
        descriptors = [os.dup(each.frozen.descriptor()) for each in moving]
        waitingClient = served[1][1]
        waitingClient.sendall(b"a\n")
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", QuietCounter)
        adopted = [
            adoptEntry(taker, each.entry, descriptor)
            for each, descriptor in zip(moving, descriptors)
        ]
        for frozen in moving:
            frozen.release()
        waiting, quiet = servingOrder(adopted)

        def counts(connections: list[Any]) -> list[int]:
            return [each.hosted.wrappedProtocol.count for each in connections]

        self.assertEqual((counts(waiting), counts(quiet)), ([20], [10]))
        for held in waiting + quiet:
            held.commit()
        lines = yield self.readLines(waitingClient, 1)
        self.assertEqual(lines, [b"21 a"])
        for held in adopted:
            held.transport.loseConnection()

    @inlineCallbacks
    def test_hasWork(self) -> Any:
        """
        An adopted connection has work of its own when the old process left
        output unsent, or its protocol holds bytes not parsed yet; not
        otherwise.
        """
        served = [self.serve("tcp:1", QuietCounter) for _ in range(3)]
        for hosted, client in served:
            yield self.readLines(client, 1)
        unsent, partial = served[1][0], served[2][0]
        unsent.transport.stopWriting()
        unsent.transport.write(b"unsent\n")
        partial.wrappedProtocol.dataReceived(b"hal")
        for count, (hosted, _) in enumerate(served):
            hosted.wrappedProtocol.count = count
        moving, _ = freezeMovable(self.host.allConnections())
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", QuietCounter)
        adopted = [
            adoptEntry(taker, each.entry, os.dup(each.frozen.descriptor()))
            for each in moving
        ]
        for frozen in moving:
            frozen.release()
        protocols: list[Any] = [held.hosted.wrappedProtocol for held in adopted]
        self.assertEqual(
            sorted(
                (protocol.count, held.hasWork())
                for protocol, held in zip(protocols, adopted)
            ),
            [(0, False), (1, True), (2, True)],
        )
        for held in adopted:
            held.commit()
            held.transport.loseConnection()

    @inlineCallbacks
    def test_restoreAheadThenAgain(self) -> Any:
        """
        A staged connection whose new protocol can abandon a restore is
        restored ahead, held; abandoned, that object is told so, what it
        wrote is dropped and what it writes later goes nowhere; a fresh
        protocol is attached and restored from the new state, and only
        what the fresh one wrote reaches the client at the commit.
        """
        self.patch(AbandoningCounter, "abandoned", [])
        hosted, client = self.serve("tcp:1", Counter)
        yield self.readLines(client, 1)
        hosted.wrappedProtocol.count = 3
        (each,), _ = freezeMovable(self.host.allConnections())
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", AbandoningCounter)
        staged = stageEntry(taker, each.entry, os.dup(each.frozen.descriptor()))
        each.release()
        self.assertTrue(staged.canRestoreAhead())
        staged.restoreAhead()
        stale = staged.protocol
        self.assertEqual((staged.restoredAhead, stale.count), (True, 3))
        staged.update({"state": dict(each.entry["state"], appState={"count": 5})})
        staged.abandonAhead()
        self.assertFalse(staged.restoredAhead)
        self.assertEqual(AbandoningCounter.abandoned, [stale])
        self.assertIsInstance(stale.transport, DetachedTransport)
        # The connection's addresses, as the connection gives them.
        self.assertEqual(
            (stale.transport.getPeer(), stale.transport.getHost()),
            (staged.transport.getPeer(), staged.transport.getHost()),
        )
        self.assertIsNone(staged.transport.producer)
        stale.sendLine(b"from the stale object")
        staged.rebuild()
        fresh = staged.protocol
        self.assertIsNot(fresh, stale)
        self.assertIs(staged.hosted.wrappedProtocol, fresh)
        adopted = staged.restore()
        self.assertEqual(fresh.count, 5)
        self.assertIs(staged.transport.producer, fresh)
        adopted.commit()
        client.sendall(b"x\n")
        lines = yield self.readLines(client, 2)
        self.assertEqual(lines, [b"restored", b"6 x"])
        adopted.transport.loseConnection()

    @inlineCallbacks
    def test_restoredAheadKept(self) -> Any:
        """
        A connection restored ahead and unchanged is served by the object
        restored ahead, with what it wrote; one whose new protocol cannot
        abandon a restore is not restored ahead.
        """
        hosted, client = self.serve("tcp:1", Counter)
        other, otherClient = self.serve("tcp:2", Counter)
        yield self.readLines(client, 1)
        yield self.readLines(otherClient, 1)
        moving, _ = freezeMovable(self.host.allConnections())
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", AbandoningCounter)
        taker.listen("tcp:2", Counter)
        staged = [
            stageEntry(taker, each.entry, os.dup(each.frozen.descriptor()))
            for each in moving
        ]
        self.assertEqual(
            sorted(each.canRestoreAhead() for each in staged), [False, True]
        )
        for each in moving:
            if each.listenerKey == "tcp:2":
                each.resume()
            else:
                each.release()
        [ahead] = [each for each in staged if each.canRestoreAhead()]
        [plain] = [each for each in staged if not each.canRestoreAhead()]
        plain.abandon()
        ahead.restoreAhead()
        adopted = ahead.held()
        adopted.commit()
        client.sendall(b"x\n")
        lines = yield self.readLines(client, 2)
        self.assertEqual(lines, [b"restored", b"1 x"])
        adopted.transport.loseConnection()
        otherClient.sendall(b"y\n")
        lines = yield self.readLines(otherClient, 1)
        self.assertEqual(lines, [b"1 y"])

    @inlineCallbacks
    def test_abandonLeavesTheOriginalServing(self) -> Any:
        """
        An adopted connection given back (the hand-off failed) leaves the
        original holder serving it, unharmed.
        """
        hosted, client = self.serve("tcp:1", Counter)
        yield self.readLines(client, 1)
        (each,), _ = freezeMovable(self.host.allConnections())
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", Counter)
        adopted = adoptEntry(taker, each.entry, os.dup(each.frozen.descriptor()))
        adopted.abandon()
        each.resume()
        client.sendall(b"x\n")
        lines = yield self.readLines(client, 1)
        self.assertEqual(lines, [b"1 x"])

    def test_badEntriesRefused(self) -> None:
        """
        A malformed entry, an unknown listener, or new code whose protocol
        is not migratable is refused with a clear error, and the descriptor
        is closed.
        """
        hosted, client = self.serve("tcp:1", Counter)
        (each,), _ = freezeMovable(self.host.allConnections())
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:plain", Plain)
        for entry, expected in [
            ("not a dict", "not an object"),
            (dict(each.entry, listener="tcp:9"), "tcp:9"),
            (dict(each.entry, output="!!"), "bad manifest entry"),
            (dict(each.entry, listener="tcp:plain"), "does not provide IMigratable"),
        ]:
            descriptor = os.dup(each.frozen.descriptor())
            with self.assertRaises(StateError) as raised:
                adoptEntry(taker, entry, descriptor)
            self.assertIn(expected, str(raised.exception))
            self.assertRaises(OSError, os.fstat, descriptor)
        each.resume()


class WhyNotMigratableTests(SynchronousTestCase):
    """
    L{whyNotMigratable} says why a connection stays in words an operator
    can act on.
    """

    def test_plain(self) -> None:
        """
        A protocol that does not provide L{IMigratable} is named.
        """
        self.assertEqual(
            whyNotMigratable(Plain()), "Plain does not provide IMigratable"
        )

    def test_tlsInTheApplication(self) -> None:
        """
        TLS inside the application is named as such, with the protocol it
        wraps.
        """
        try:
            from twisted.protocols.tls import TLSMemoryBIOFactory
        except ImportError:
            raise SkipTest("no pyOpenSSL")
        from twisted.internet.ssl import CertificateOptions

        factory = TLSMemoryBIOFactory(
            CertificateOptions(), False, Factory.forProtocol(Plain)
        )
        protocol = factory.buildProtocol(None)
        self.assertEqual(
            whyNotMigratable(protocol),
            "TLS in the application (Plain over TLSMemoryBIOProtocol): a TLS "
            "session cannot move",
        )
