"""
Tests for L{migrate._host._tracking}: counting an application's connections and
swapping the protocol behind a live transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from .._host import _tracking
from .._host._tracking import HostedProtocol, PendingAdoptionFactory, TrackingFactory
from ._fakes import RecordingFactory, RecordingProtocol

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def lost() -> Failure:
    return Failure(ConnectionDone())


class TrackingFactoryTests(SynchronousTestCase):
    """
    L{TrackingFactory} knows each live connection of one listener.
    """

    def setUp(self) -> None:
        self.application = RecordingFactory()
        self.changes = 0
        self.factory = TrackingFactory("tcp:8000", self.application, self.changed)

    def changed(self) -> None:
        self.changes += 1

    def connect(self) -> HostedProtocol:
        hosted = self.factory.buildProtocol(ADDRESS)
        assert hosted is not None
        hosted.makeConnection(StringTransport())
        return hosted

    def test_key(self) -> None:
        """
        The factory knows the listener it serves.
        """
        self.assertEqual(self.factory.key, "tcp:8000")
        self.assertIs(self.factory.wrappedFactory, self.application)

    def test_registersConnections(self) -> None:
        """
        A connection is counted once it is made, oldest first, and
        C{onChange} is called for each.
        """
        first = self.connect()
        second = self.connect()
        self.assertEqual(self.factory.connections, [first, second])
        self.assertEqual(self.changes, 2)
        self.assertEqual(
            [p.events for p in self.application.built],
            [[("connectionMade",)], [("connectionMade",)]],
        )

    def test_notCountedBeforeMade(self) -> None:
        """
        A protocol built but not yet connected is not counted.
        """
        self.factory.buildProtocol(ADDRESS)
        self.assertEqual(self.factory.connections, [])
        self.assertEqual(self.changes, 0)

    def test_unregistersLostConnections(self) -> None:
        """
        A lost connection is no longer counted, C{onChange} is called, and
        the application is told.
        """
        first = self.connect()
        second = self.connect()
        first.connectionLost(lost())
        self.assertEqual(self.factory.connections, [second])
        self.assertEqual(self.changes, 3)
        [event] = self.application.built[0].events[1:]
        self.assertEqual(event[0], "connectionLost")
        self.assertIsInstance(event[1].value, ConnectionDone)

    def test_unregisterUnknown(self) -> None:
        """
        Unregistering a protocol that is not registered changes nothing and
        does not call C{onChange}.
        """
        hosted = self.connect()
        self.factory.unregisterProtocol(hosted)
        self.factory.unregisterProtocol(hosted)
        self.assertEqual(self.factory.connections, [])
        self.assertEqual(self.changes, 2)

    def test_refusedConnection(self) -> None:
        """
        When the application's factory refuses a connection (returns
        L{None}), so does the tracking factory, as a listening port expects
        (it then closes the socket): nothing is counted and nothing fails.
        """
        self.application.refuse = True
        self.assertIsNone(self.factory.buildProtocol(ADDRESS))
        self.assertEqual(self.factory.connections, [])
        self.assertEqual(self.changes, 0)

    def test_buildApplicationProtocol(self) -> None:
        """
        L{TrackingFactory.buildApplicationProtocol} asks the application's
        factory for a bare protocol, wrapping and counting nothing.
        """
        protocol = self.factory.buildApplicationProtocol(ADDRESS)
        self.assertEqual(self.application.built, [protocol])
        self.assertEqual(self.factory.connections, [])

    def test_buildPendingProtocol(self) -> None:
        """
        L{TrackingFactory.buildPendingProtocol} builds a pending wrapper with
        no application protocol; the application's factory is not asked.
        """
        hosted = self.factory.buildPendingProtocol(ADDRESS)
        self.assertIsInstance(hosted, HostedProtocol)
        self.assertTrue(hosted.pending)
        self.assertIsNone(hosted.wrappedProtocol)
        self.assertEqual(self.application.built, [])

    def test_pendingAdoptionFactory(self) -> None:
        """
        L{PendingAdoptionFactory} builds pending wrappers of its listener and
        remembers the one it built.
        """
        pending = PendingAdoptionFactory(self.factory)
        hosted = pending.buildProtocol(ADDRESS)
        self.assertIs(pending.built, hosted)
        self.assertTrue(hosted.pending)
        self.assertIs(hosted.factory, self.factory)


class HostedProtocolTests(SynchronousTestCase):
    """
    L{HostedProtocol} lets the host replace, restore or let go of the
    application's protocol behind a live transport.
    """

    def setUp(self) -> None:
        self.application = RecordingFactory()
        self.changes = 0
        self.factory = TrackingFactory("tcp:8000", self.application, self.changed)
        self.transport = StringTransport()

    def changed(self) -> None:
        self.changes += 1

    def connected(self) -> tuple[HostedProtocol, RecordingProtocol]:
        hosted = self.factory.buildProtocol(ADDRESS)
        assert hosted is not None
        hosted.makeConnection(self.transport)
        return hosted, self.application.built[-1]

    def pending(self) -> HostedProtocol:
        hosted = self.factory.buildPendingProtocol(ADDRESS)
        hosted.makeConnection(self.transport)
        return hosted

    def test_applicationSeesWrapper(self) -> None:
        """
        The application's protocol has the wrapper as its transport; what
        it writes reaches the real transport, and what arrives reaches it.
        """
        hosted, app = self.connected()
        self.assertIs(app.transport, hosted)
        hosted.write(b"out")
        hosted.dataReceived(b"in")
        self.assertEqual(self.transport.value(), b"out")
        self.assertEqual(app.events[1:], [("dataReceived", b"in")])

    def test_pendingTellsApplicationNothing(self) -> None:
        """
        A pending wrapper records its transport and counts the connection,
        but builds and tells no application protocol.
        """
        hosted = self.pending()
        self.assertIs(hosted.transport, self.transport)
        self.assertTrue(hosted.connected)
        self.assertTrue(ITransport.providedBy(hosted))
        self.assertEqual(self.factory.connections, [hosted])
        self.assertEqual(self.changes, 1)
        self.assertEqual(self.application.built, [])

    def test_pendingDropsData(self) -> None:
        """
        Bytes that arrive while the wrapper is pending are dropped, not
        delivered to a protocol that does not exist yet.
        """
        hosted = self.pending()
        hosted.dataReceived(b"early")
        app = RecordingProtocol()
        hosted.attach(app)
        self.assertEqual(app.events, [])

    def test_pendingConnectionLost(self) -> None:
        """
        A pending connection that is lost is no longer counted.
        """
        hosted = self.pending()
        hosted.connectionLost(lost())
        self.assertEqual(self.factory.connections, [])
        self.assertEqual(self.changes, 2)

    def test_attach(self) -> None:
        """
        L{HostedProtocol.attach} makes a protocol the application protocol
        of a pending connection without C{connectionMade}; it then gets
        the connection's bytes and can write.
        """
        hosted = self.pending()
        app = RecordingProtocol()
        hosted.attach(app)
        self.assertFalse(hosted.pending)
        self.assertIs(hosted.wrappedProtocol, app)
        self.assertIs(app.transport, hosted)
        self.assertTrue(app.connected)
        self.assertEqual(app.events, [])
        hosted.dataReceived(b"data")
        hosted.write(b"reply")
        self.assertEqual(app.events, [("dataReceived", b"data")])
        self.assertEqual(self.transport.value(), b"reply")

    def test_replaceProtocol(self) -> None:
        """
        L{HostedProtocol.replaceProtocol} swaps the application protocol and
        returns the old one, telling neither: later bytes and the end of
        the connection reach only the new one.
        """
        hosted, old = self.connected()
        new = RecordingProtocol()
        self.assertIs(hosted.replaceProtocol(new), old)
        self.assertIs(hosted.wrappedProtocol, new)
        self.assertIs(new.transport, hosted)
        hosted.dataReceived(b"after")
        hosted.connectionLost(lost())
        self.assertEqual(old.events, [("connectionMade",)])
        self.assertEqual(
            [event[0] for event in new.events], ["dataReceived", "connectionLost"]
        )
        self.assertEqual(new.events[0], ("dataReceived", b"after"))
        self.assertEqual(self.factory.connections, [])

    def test_release(self) -> None:
        """
        L{HostedProtocol.release} stops counting the connection at once.
        """
        hosted, app = self.connected()
        hosted.release()
        self.assertTrue(hosted.released)
        self.assertEqual(self.factory.connections, [])
        self.assertEqual(self.changes, 2)

    def test_releasedTellsApplicationNothing(self) -> None:
        """
        Once released, neither the bytes nor the end of the connection
        reach the application (another process serves it now), and the end
        of the connection changes no count.
        """
        hosted, app = self.connected()
        hosted.release()
        hosted.dataReceived(b"late")
        hosted.connectionLost(lost())
        self.assertEqual(app.events, [("connectionMade",)])
        self.assertEqual(self.changes, 2)


class FinishBeforeNextEventTests(SynchronousTestCase):
    """
    L{HostedProtocol.finishBeforeNextEvent} runs work left for later once,
    before the connection's next event reaches the application.
    """

    def setUp(self) -> None:
        self.application = RecordingFactory()
        self.factory = TrackingFactory("tcp:8000", self.application)
        hosted = self.factory.buildProtocol(ADDRESS)
        assert hosted is not None
        hosted.makeConnection(StringTransport())
        self.hosted: HostedProtocol = hosted
        self.old = self.application.built[-1]
        self.new = RecordingProtocol()
        self.calls = 0

    def switch(self) -> None:
        self.calls += 1
        self.hosted.replaceProtocol(self.new)

    def test_beforeData(self) -> None:
        """
        Bytes received are delivered after the work, once, to the protocol
        the work put in place.
        """
        self.hosted.finishBeforeNextEvent(self.switch)
        self.assertEqual(self.calls, 0)
        self.hosted.dataReceived(b"one")
        self.hosted.dataReceived(b"two")
        self.assertEqual(self.calls, 1)
        self.assertEqual(self.old.events, [("connectionMade",)])
        self.assertEqual(
            self.new.events, [("dataReceived", b"one"), ("dataReceived", b"two")]
        )

    def test_beforeConnectionLost(self) -> None:
        """
        The end of the connection comes after the work too.
        """
        self.hosted.finishBeforeNextEvent(self.switch)
        self.hosted.connectionLost(lost())
        self.assertEqual(self.calls, 1)
        self.assertEqual(self.old.events, [("connectionMade",)])
        self.assertEqual([event[0] for event in self.new.events], ["connectionLost"])
        self.assertEqual(self.factory.connections, [])

    def test_finishNow(self) -> None:
        """
        L{HostedProtocol.finishNow} does the work at once, and only once;
        it says whether it did.
        """
        self.assertFalse(self.hosted.finishNow())
        self.hosted.finishBeforeNextEvent(self.switch)
        self.assertTrue(self.hosted.finishNow())
        self.assertFalse(self.hosted.finishNow())
        self.hosted.dataReceived(b"later")
        self.assertEqual(self.calls, 1)
        self.assertEqual(self.new.events, [("dataReceived", b"later")])

    def test_failureLogged(self) -> None:
        """
        Work that raises is logged; the event is delivered all the same.
        """

        def broken() -> None:
            raise ValueError("broken")

        self.hosted.finishBeforeNextEvent(broken)
        with capturedLogs() as events:
            self.hosted.dataReceived(b"data")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(events), 1)
        self.assertEqual(self.old.events[1:], [("dataReceived", b"data")])

    def test_releasedNotFinished(self) -> None:
        """
        A released connection's events reach nobody, and do not run the
        work.
        """
        self.hosted.finishBeforeNextEvent(self.switch)
        self.hosted.release()
        self.hosted.dataReceived(b"late")
        self.hosted.connectionLost(lost())
        self.assertEqual(self.calls, 0)


class HoldTests(SynchronousTestCase):
    """
    A held L{HostedProtocol} keeps what the application writes until the
    hand-off commits, then sends the previous holder's pending output first.
    """

    def setUp(self) -> None:
        self.factory = TrackingFactory("tcp:8000", RecordingFactory())
        self.hosted = HostedProtocol(self.factory, None, pending=True)
        self.transport = StringTransport()
        self.hosted.makeConnection(self.transport)
        self.hosted.hold()
        self.app = RecordingProtocol()
        self.hosted.attach(self.app)

    def test_heldUntilUnheld(self) -> None:
        """
        Nothing reaches the transport while held; on unhold the pending
        output goes first, then the application's writes in order.
        """
        self.hosted.write(b"b")
        self.hosted.writeSequence([b"c", b"d"])
        self.assertEqual(self.transport.value(), b"")
        self.hosted.unhold(b"a")
        self.assertEqual(self.transport.value(), b"abcd")
        self.hosted.write(b"e")
        self.assertEqual(self.transport.value(), b"abcde")

    def test_closeAfterOutput(self) -> None:
        """
        A close asked for while held happens after the held output is out.
        """
        self.hosted.write(b"bye")
        self.hosted.loseConnection()
        self.assertFalse(self.transport.disconnecting)
        self.hosted.unhold(b"")
        self.assertEqual(self.transport.value(), b"bye")
        self.assertTrue(self.transport.disconnecting)

    def test_holdsOutput(self) -> None:
        """
        L{HostedProtocol.holdsOutput} says whether the application wrote,
        or asked for a close, while held; not once unheld.
        """
        self.assertFalse(self.hosted.holdsOutput())
        self.hosted.write(b"a")
        self.assertTrue(self.hosted.holdsOutput())
        self.hosted.unhold(b"")
        self.assertFalse(self.hosted.holdsOutput())
        self.hosted.hold()
        self.hosted.loseConnection()
        self.assertTrue(self.hosted.holdsOutput())

    def test_abortWhileHeld(self) -> None:
        """
        An abort asked for while held is carried out on unhold, not before.
        """
        aborted = []
        self.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        self.hosted.abortConnection()
        self.assertEqual(aborted, [])
        self.hosted.unhold(b"")
        self.assertEqual(aborted, [True])


class _Echo(Protocol):
    """
    Answers each read with what it read, and fails on C{b"fail"}.
    """

    def dataReceived(self, data: bytes) -> None:
        if data == b"fail":
            raise ValueError("the application failed")
        self.transport.write(data)  # type: ignore[union-attr]


class WriteAtOnceTests(SynchronousTestCase):
    """
    L{HostedProtocol.writeAtOnceUntilRead}: what the application writes
    goes through L{migrate._handoff._transport.writeNow} until it has
    taken the next bytes received, then through the transport as usual.
    """

    def setUp(self) -> None:
        self.atOnce: list[bytes] = []

        def writeNow(transport: Any, data: bytes) -> None:
            self.atOnce.append(data)
            transport.write(data)

        self.patch(_tracking, "writeNow", writeNow)
        factory = TrackingFactory("tcp:8000", Factory.forProtocol(_Echo), lambda: None)
        hosted = factory.buildProtocol(ADDRESS)
        assert hosted is not None
        self.transport = StringTransport()
        hosted.makeConnection(self.transport)
        self.hosted = hosted

    def test_untilRead(self) -> None:
        """
        The answer to the first read after it goes out at once; the answer
        to the next one through the transport.
        """
        self.hosted.writeAtOnceUntilRead()
        self.assertTrue(self.hosted.writesAtOnce)
        self.hosted.dataReceived(b"first")
        self.assertEqual(self.atOnce, [b"first"])
        self.assertFalse(self.hosted.writesAtOnce)
        self.hosted.dataReceived(b"second")
        self.assertEqual(self.atOnce, [b"first"])
        self.assertEqual(self.transport.value(), b"firstsecond")

    def test_notAsked(self) -> None:
        """
        Without it, every write goes through the transport.
        """
        self.hosted.dataReceived(b"usual")
        self.assertEqual(self.atOnce, [])
        self.assertEqual(self.transport.value(), b"usual")

    def test_writeSequence(self) -> None:
        """
        A sequence written meanwhile goes out at once, joined.
        """
        self.hosted.writeAtOnceUntilRead()
        self.hosted.writeSequence([b"a", b"b"])
        self.assertEqual(self.atOnce, [b"ab"])
        self.assertEqual(self.transport.value(), b"ab")

    def test_unheld(self) -> None:
        """
        What was pending and what the application wrote while held go out
        at once, in that order, when the connection is unheld.
        """
        self.hosted.hold()
        self.hosted.write(b"held")
        self.hosted.writeAtOnceUntilRead()
        self.assertEqual(self.atOnce, [])
        self.hosted.unhold(b"pending ")
        self.assertEqual(self.atOnce, [b"pending held"])
        self.assertEqual(self.transport.value(), b"pending held")

    def test_failingRead(self) -> None:
        """
        A read the application fails on still ends it: the failure reaches
        the caller (the reactor logs it), and later writes go through the
        transport.
        """
        self.hosted.writeAtOnceUntilRead()
        self.assertRaises(ValueError, self.hosted.dataReceived, b"fail")
        self.assertFalse(self.hosted.writesAtOnce)
        self.hosted.dataReceived(b"after")
        self.assertEqual(self.atOnce, [])

    def test_finishFirst(self) -> None:
        """
        Work left for the next event is done before the read, which still
        writes at once.
        """
        finished: list[bool] = []
        self.hosted.finishBeforeNextEvent(lambda: finished.append(True))
        self.hosted.writeAtOnceUntilRead()
        self.hosted.dataReceived(b"x")
        self.assertEqual((finished, self.atOnce), ([True], [b"x"]))

    def test_releasedDropsData(self) -> None:
        """
        A released connection takes nothing, at once or not.
        """
        self.hosted.writeAtOnceUntilRead()
        self.hosted.release()
        self.hosted.dataReceived(b"gone")
        self.assertEqual((self.atOnce, self.transport.value()), ([], b""))
