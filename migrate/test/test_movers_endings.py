"""
Tests for L{migrate._handoff._movers._endings}: connections that did not
move are ended politely at the drain deadline.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from migrate._handoff._movers._endings import closeAllPolitely, closePolitely
from migrate._host._tracking import TrackingFactory

from .test_movers_websocket import NO_WEBSOCKET, Chat, ChatFactory

if NO_WEBSOCKET is None:
    from twisted.web.websocket import WebSocketResource
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class Slow(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.held.append(request)
        return NOT_DONE_YET


class PoliteEndingTests(SynchronousTestCase):
    """
    L{closePolitely} and L{closeAllPolitely} on hosted connections.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.slow = Slow()
        root = Resource()
        root.putChild(b"slow", self.slow)
        if NO_WEBSOCKET is None:
            root.putChild(b"chat", WebSocketResource(ChatFactory(Chat, "old")))
        self.tracking = TrackingFactory("tcp:0", Site(root, reactor=self.clock))

    def connect(self) -> tuple[Any, StringTransport]:
        hosted = self.tracking.buildProtocol(_ADDRESS)
        assert hosted is not None
        transport = StringTransport()
        hosted.makeConnection(transport)
        return hosted, transport

    def test_idleHTTP(self) -> None:
        """
        An idle HTTP/1.1 connection is closed at once.
        """
        hosted, transport = self.connect()
        self.assertTrue(closePolitely(hosted))
        self.assertTrue(transport.disconnecting)

    def test_midResponseWaits(self) -> None:
        """
        An HTTP/1.1 connection whose response is being written is closed
        once the response is complete, not before.
        """
        hosted, transport = self.connect()
        hosted.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.slow.held[0].write(b"partial")
        stop = closeAllPolitely(self.clock, [hosted], interval=0.05)
        self.clock.advance(0.1)
        self.assertFalse(transport.disconnecting)
        self.slow.held.pop().finish()
        self.clock.advance(0.05)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stop(), 0)

    def test_stop(self) -> None:
        """
        Stopping reports how many connections still wait for a polite
        ending.
        """
        hosted, transport = self.connect()
        hosted.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.slow.held[0].write(b"partial")
        stop = closeAllPolitely(self.clock, [hosted], interval=0.05)
        self.assertEqual(stop(), 1)
        self.clock.advance(1)
        self.assertFalse(transport.disconnecting)

    def test_webSocketGoingAway(self) -> None:
        """
        A WebSocket connection that does not move is closed with a close
        frame, code 1001.
        """
        if NO_WEBSOCKET is not None:
            raise SkipTest(NO_WEBSOCKET)
        hosted, transport = self.connect()
        client = WSConnection(ConnectionType.CLIENT)
        hosted.dataReceived(client.send(Request(host="x", target="/chat")))
        client.receive_data(transport.value())
        transport.clear()
        self.assertIsInstance(next(client.events()), AcceptConnection)
        self.assertTrue(closePolitely(hosted))
        client.receive_data(transport.value())
        [closing] = [e for e in client.events() if isinstance(e, CloseConnection)]
        self.assertEqual(closing.code, 1001)
        self.assertTrue(transport.disconnecting)

    def test_otherProtocols(self) -> None:
        """
        A protocol without a mover is closed as before.
        """
        tracking = TrackingFactory("tcp:0", Factory.forProtocol(Protocol))
        hosted = tracking.buildProtocol(_ADDRESS)
        assert hosted is not None
        transport = StringTransport()
        hosted.makeConnection(transport)
        self.assertTrue(closePolitely(hosted))
        self.assertTrue(transport.disconnecting)

    def test_underAWrapper(self) -> None:
        """
        An application protocol under a protocol wrapper (TLS, when the
        application wraps its own factory) is ended by its mover: an
        HTTP/1.1 response being written is not cut short.
        """
        self.tracking = TrackingFactory(
            "tcp:0", WrappingFactory(self.tracking.wrappedFactory)
        )
        hosted, transport = self.connect()
        hosted.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.slow.held[0].write(b"partial")
        self.assertFalse(closePolitely(hosted))
        self.assertFalse(transport.disconnecting)
        self.slow.held.pop().finish()
        self.assertTrue(closePolitely(hosted))
        self.assertTrue(transport.disconnecting)

    def test_otherProtocolsUnderAWrapper(self) -> None:
        """
        A protocol without a mover under a protocol wrapper is closed
        through the wrapper, so that the wrapper ends its own layer (TLS
        sends its close_notify) instead of having the connection closed
        under it.
        """
        tracking = TrackingFactory(
            "tcp:0", WrappingFactory(Factory.forProtocol(Protocol))
        )
        hosted = tracking.buildProtocol(_ADDRESS)
        assert hosted is not None
        transport = StringTransport()
        hosted.makeConnection(transport)
        self.assertTrue(closePolitely(hosted))
        wrapper: Any = hosted.wrappedProtocol
        self.assertTrue(wrapper.disconnecting)
        self.assertTrue(transport.disconnecting)
