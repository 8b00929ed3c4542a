"""
Tests for L{migrate._handoff._movers._http}: twisted.web's HTTP/1.1
channel moves between requests to the new code's L{Site}.
"""

from __future__ import annotations

from typing import Any
from unittest import SkipTest

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from migrate._codec import StateError, decodeState, encodeState
from migrate._handoff._migrated import tellMigrated
from migrate._handoff._movers._http import GenericChannelMover
from migrate._handoff._movers._registry import IMover, NotAtSafePoint, movers
from migrate.state import (
    ProtocolState,
    captureProtocolState,
    replayBufferedInput,
    restoreProtocolState,
)

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def _mover(protocol: object) -> Any:
    """
    The registered mover of a protocol, which must have one.
    """
    mover = movers.moverFor(protocol)
    assert mover is not None
    return mover


class Answer(Resource):
    """
    Answers every request with its version and the request's path and body;
    or, when C{hold} is set, keeps the request open in C{held}.
    """

    isLeaf = True

    def __init__(self, version: bytes, hold: bool = False) -> None:
        super().__init__()
        self.version = version
        self.hold = hold
        self.held: list[Request] = []

    def render(self, request: Any) -> Any:
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"%s %s %s" % (self.version, request.path, request.content.read())


def _site(resource: Resource, clock: Clock) -> Site:
    site = Site(resource, reactor=clock)
    site.timeOut = 60
    return site


def _connect(site: Site) -> tuple[Any, StringTransport]:
    protocol = site.buildProtocol(_ADDRESS)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _travel(state: ProtocolState) -> ProtocolState:
    """
    Send a state through the codec, as it crosses processes.
    """
    return ProtocolState.fromPlain(decodeState(encodeState(state.toPlain())))


def _adopt(site: Site, state: ProtocolState) -> tuple[Any, StringTransport]:
    """
    Build the new code's protocol and restore it as the hand-off does: its
    transport is set, it is not connected.
    """
    protocol = site.buildProtocol(_ADDRESS)
    transport = StringTransport()
    protocol.transport = transport
    restoreProtocolState(protocol, _travel(state), copyState=False)
    replayBufferedInput(protocol)
    return protocol, transport


_GET = b"GET /%s HTTP/1.1\r\nHost: example\r\n\r\n"


class GenericChannelMoverTests(SynchronousTestCase):
    """
    An HTTP/1.1 channel moves between requests.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.old = Answer(b"old")
        self.oldSite = _site(self.old, self.clock)
        self.newClock = Clock()
        self.newSite = _site(Answer(b"new"), self.newClock)

    def test_interface(self) -> None:
        """
        L{GenericChannelMover} provides L{IMover}.
        """
        protocol, _ = _connect(self.oldSite)
        verifyObject(IMover, GenericChannelMover(protocol))
        self.assertIsInstance(movers.moverFor(protocol), GenericChannelMover)

    def test_idleMoves(self) -> None:
        """
        A keep-alive channel between requests moves; its next request is
        answered by the new code.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"one")
        self.assertIn(b"old /one", transport.value())
        self.assertIsNone(_mover(protocol).migrationBlocker())
        state = captureProtocolState(protocol)
        new, newTransport = _adopt(self.newSite, state)
        new.dataReceived(_GET % b"two")
        self.assertIn(b"new /two", newTransport.value())
        self.assertNotIn(b"old", newTransport.value())

    def test_oldChannelTold(self) -> None:
        """
        Once the new code serves the connection, the old channel is told
        (L{tellMigrated}): its idle timeout, which would time the client
        out from the old code and log that it did, is cancelled.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"one")
        tellMigrated(protocol)
        self.clock.advance(61)
        self.assertFalse(transport.disconnecting)
        control, controlTransport = _connect(self.oldSite)
        self.clock.advance(61)
        self.assertTrue(controlTransport.disconnecting)

    def test_halfReceivedRequestMoves(self) -> None:
        """
        The bytes of a request line not complete yet move, and the new code
        answers once the rest arrives.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"one" + b"POST /tw")
        state = captureProtocolState(protocol)
        new, newTransport = _adopt(self.newSite, state)
        self.assertEqual(newTransport.value(), b"")
        new.dataReceived(b"o HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        self.assertIn(b"new /two body", newTransport.value())

    def test_halfReceivedHeadersMove(self) -> None:
        """
        A request whose line and some headers arrived, but not the end of
        its headers, moves: the new code parses it whole, its body included
        once it arrives.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(
            b"POST /two HTTP/1.1\r\nContent-Length: 4\r\nX-Folded: a\r\n b\r\nHo"
        )
        self.assertEqual(len(protocol._channel.requests), 1)
        self.assertIsNone(_mover(protocol).migrationBlocker())
        self.assertFalse(_mover(protocol).closePolitely(1001))
        state = captureProtocolState(protocol)
        new, newTransport = _adopt(self.newSite, state)
        self.assertEqual(newTransport.value(), b"")
        new.dataReceived(b"st: x\r\n\r\nbody")
        self.assertIn(b"new /two body", newTransport.value())
        self.assertEqual(transport.value(), b"")

    def test_requestInFlight(self) -> None:
        """
        A channel with a request being processed cannot move now; it can
        once the response is finished.
        """
        self.old.hold = True
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"slow")
        mover = _mover(protocol)
        self.assertEqual(mover.migrationBlocker(), "a request is in flight")
        self.assertRaises(NotAtSafePoint, captureProtocolState, protocol)
        request = self.old.held.pop()
        request.write(b"done")
        request.finish()
        self.assertIsNone(mover.migrationBlocker())
        self.assertTrue(captureProtocolState(protocol).migratable)

    def test_pipelined(self) -> None:
        """
        Pipelined requests waiting behind a slow one keep the channel until
        they are all answered: none is lost or answered twice.
        """
        self.old.hold = True
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"a" + _GET % b"b" + b"GET /c")
        mover = _mover(protocol)
        self.assertIsNotNone(mover.migrationBlocker())
        self.old.hold = False
        request = self.old.held.pop()
        request.finish()
        # /b was answered by the old code; /c is half received and moves.
        self.assertIn(b"old /b", transport.value())
        self.assertIsNone(mover.migrationBlocker())
        new, newTransport = _adopt(self.newSite, captureProtocolState(protocol))
        new.dataReceived(b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"new /c", newTransport.value())
        self.assertNotIn(b"/b", newTransport.value())

    def test_pipelinedCompleteRequestReplayed(self) -> None:
        """
        A complete request the channel holds unparsed when it moves is
        answered by the new code as soon as the connection reads again.
        """
        protocol, transport = _connect(self.oldSite)
        channel = protocol._channel
        # As if the bytes were buffered but not parsed yet (the channel
        # was paused between them).
        channel._buffer = _GET % b"held"
        state = captureProtocolState(protocol)
        new, newTransport = _adopt(self.newSite, state)
        self.assertIn(b"new /held", newTransport.value())

    def test_idleTimeoutCarried(self) -> None:
        """
        What is left of the idle timeout carries on: the client is timed
        out when it would have been on the old code.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"one")
        self.clock.advance(20)
        state = captureProtocolState(protocol)
        new, newTransport = _adopt(self.newSite, state)
        self.newClock.advance(39)
        self.assertFalse(newTransport.disconnecting)
        self.newClock.advance(1.5)
        self.assertTrue(newTransport.disconnecting)
        # Later requests get the full timeout again.
        self.assertEqual(new._channel.timeOut, 60)

    def test_notPersistent(self) -> None:
        """
        A channel closing after its last response never moves.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIsNone(_mover(protocol).migrationBlocker())
        error = self.assertRaises(StateError, captureProtocolState, protocol)
        self.assertNotIsInstance(error, NotAtSafePoint)

    def test_http2(self) -> None:
        """
        An HTTP/2 channel never moves.
        """
        protocol, transport = _connect(self.oldSite)
        protocol._channel = object()
        mover = _mover(protocol)
        self.assertIsNone(mover.migrationBlocker())
        error = self.assertRaises(StateError, captureProtocolState, protocol)
        self.assertIn("HTTP/2", str(error))

    def _h2(self) -> tuple[Any, Any, StringTransport, Any]:
        """
        A channel switched to HTTP/2 (Twisted's own C{H2Connection}, as
        after ALPN C{h2}) and an C{h2} client connected to it.

        @return: the channel's generic protocol, its HTTP/2 channel, the
            transport and the client's C{h2} connection.
        """
        try:
            from h2.config import H2Configuration
            from h2.connection import H2Connection as Client
            from twisted.web._http2 import H2Connection
        except ImportError:
            raise SkipTest("h2 is not installed (the test and dev extras install it)")
        protocol, ignored = _connect(self.oldSite)
        channel: Any = H2Connection(reactor=self.clock)
        channel.requestFactory = self.oldSite.requestFactory
        channel.site = self.oldSite
        channel.factory = self.oldSite
        channel.timeOut = None
        transport = StringTransport()
        channel.makeConnection(transport)
        # As _GenericHTTPChannelProtocol does after ALPN h2.
        transport.registerProducer(channel, True)
        protocol._channel = channel
        client = Client(H2Configuration(client_side=True))
        client.initiate_connection()
        channel.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        transport.clear()
        return protocol, channel, transport, client

    def _get(self, channel: Any, client: Any, path: str) -> None:
        streamID = client.get_next_available_stream_id()
        client.send_headers(
            streamID,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "x"),
                (":path", path),
            ],
            end_stream=True,
        )
        channel.dataReceived(client.data_to_send())

    def _goAways(self, client: Any, transport: StringTransport) -> list[Any]:
        from h2.events import ConnectionTerminated

        events = client.receive_data(transport.value())
        transport.clear()
        return [
            (event.last_stream_id, event.error_code)
            for event in events
            if isinstance(event, ConnectionTerminated)
        ]

    def test_http2GoAway(self) -> None:
        """
        An idle HTTP/2 connection is ended politely: GOAWAY, NO_ERROR,
        naming the last stream it answered, then a clean close (the channel,
        the transport's producer, let go first: a TLS transport waits for
        its producer before its close_notify).
        """
        protocol, channel, transport, client = self._h2()
        self._get(channel, client, "/one")
        self.clock.advance(0)
        self.assertTrue(GenericChannelMover(protocol).closePolitely(1001))
        self.assertEqual(self._goAways(client, transport), [(1, 0)])
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_http2StreamsInFlightFinish(self) -> None:
        """
        An HTTP/2 connection with a stream in flight is asked again until
        the stream finishes (C{h2} would count a frame received after its
        GOAWAY, a window update for the response, as a protocol error);
        then it gets its GOAWAY, once, and is closed.
        """
        self.old.hold = True
        protocol, channel, transport, client = self._h2()
        self._get(channel, client, "/one")
        mover = GenericChannelMover(protocol)
        self.assertFalse(mover.closePolitely(1001))
        self.assertEqual(self._goAways(client, transport), [])
        self.assertFalse(transport.disconnecting)
        self.old.held.pop().finish()
        self.clock.advance(0)
        self.assertTrue(mover.closePolitely(1001))
        self.assertEqual(self._goAways(client, transport), [(1, 0)])
        self.assertTrue(transport.disconnecting)

    def test_useFactory(self) -> None:
        """
        In the same process, a channel given the new code's L{Site} answers
        its next request from it.
        """
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"one")
        self.assertTrue(GenericChannelMover(protocol).useFactory(self.newSite))
        protocol.dataReceived(_GET % b"two")
        self.assertIn(b"new /two", transport.value())
        self.assertIs(protocol.factory, self.newSite)

    def test_useFactoryNotASite(self) -> None:
        """
        A factory that is not a L{Site} is not given to the channel.
        """
        protocol, transport = _connect(self.oldSite)
        self.assertFalse(GenericChannelMover(protocol).useFactory(object()))
        self.assertIs(protocol.factory, self.oldSite)

    def test_badState(self) -> None:
        """
        Malformed state is refused.
        """
        protocol = self.newSite.buildProtocol(_ADDRESS)
        protocol.transport = StringTransport()
        mover = GenericChannelMover(protocol)
        for state in (
            None,
            {"kind": "ftp"},
            {"kind": "http/1.1", "buffer": 3},
            {"kind": "http/1.1", "buffer": "", "firstLine": 0, "persistent": True},
        ):
            self.assertRaises(StateError, mover.restoreMigrationState, state)

    def test_closeIdle(self) -> None:
        """
        An idle channel closes politely at once.
        """
        protocol, transport = _connect(self.oldSite)
        self.assertTrue(GenericChannelMover(protocol).closePolitely(1001))
        self.assertTrue(transport.disconnecting)

    def test_closeAfterResponse(self) -> None:
        """
        A channel whose request is in flight and whose response has not
        started closes after it, and the response says so.
        """
        self.old.hold = True
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"slow")
        self.assertTrue(GenericChannelMover(protocol).closePolitely(1001))
        self.assertFalse(transport.disconnecting)
        request = self.old.held.pop()
        request.write(b"late")
        request.finish()
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_noCloseMidResponse(self) -> None:
        """
        A channel whose response is being written is not closed now.
        """
        self.old.hold = True
        protocol, transport = _connect(self.oldSite)
        protocol.dataReceived(_GET % b"slow")
        self.old.held[0].write(b"started")
        self.assertFalse(GenericChannelMover(protocol).closePolitely(1001))
        self.assertFalse(transport.disconnecting)
