"""
Tests for L{migrate._handoff._movers._websocket}: a twisted.web.websocket
connection moves at a message boundary to the new code's
C{WebSocketResource}.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from migrate._codec import StateError, decodeState, encodeState
from migrate._handoff._migrated import tellMigrated
from migrate._handoff._movers._registry import NotAtSafePoint, movers
from migrate._handoff._movers._websocket import _holdsPart
from migrate.interfaces import IMigratable
from migrate.state import (
    ProtocolState,
    captureProtocolState,
    replayBufferedInput,
    restoreProtocolState,
)

try:
    from twisted.web.websocket import WebSocketResource, WebSocketTransport
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection,
        CloseConnection,
        Request,
        TextMessage,
    )
except ImportError as e:
    #: why these tests cannot run here: WebSockets need a Twisted that has
    #: twisted.web.websocket, and its websocket extra (wsproto)
    NO_WEBSOCKET: str | None = "needs twisted.web.websocket and wsproto " + (
        "(pip install 'twisted[websocket]'): {}".format(e)
    )
else:
    NO_WEBSOCKET = None

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def _mover(protocol: object) -> Any:
    """
    The registered mover of a protocol, which must have one.
    """
    mover = movers.moverFor(protocol)
    assert mover is not None
    return mover


class Chat:
    """
    A WebSocket protocol answering each message with its version, a count
    of messages on this connection and the message.
    """

    def __init__(self, version: str, request: Any) -> None:
        self.version = version
        self.path = request.path
        self.count = 0
        self.events: list[str] = []

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        self.transport = transport
        self.events.append("started")

    def negotiationFinished(self) -> None:
        self.events.append("finished")

    def pongReceived(self, payload: bytes) -> None:
        pass

    def textMessageReceived(self, message: str) -> None:
        self.count += 1
        self.transport.sendTextMessage(f"{self.version} {self.count} {message}")

    def bytesMessageReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.events.append("lost")


@implementer(IMigratable)
class MigratableChat(Chat):
    migrationVersion = 1

    def getMigrationState(self) -> Any:
        return {"count": self.count}

    def restoreMigrationState(self, state: Any) -> None:
        self.count = state["count"]
        self.events.append("restored")

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


class ChatFactory:
    def __init__(self, cls: type, version: str) -> None:
        self.cls = cls
        self.version = version
        self.built: list[Chat] = []

    def buildProtocol(self, request: Any) -> Any:
        chat: Chat = self.cls(self.version, request)
        self.built.append(chat)
        return chat


def _site(factory: ChatFactory) -> Site:
    root = Resource()
    root.putChild(b"chat", WebSocketResource(factory))
    return Site(root, reactor=Clock())


class Client:
    """
    A wsproto client speaking to a server protocol over a StringTransport.
    """

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.received: list[Any] = []

    def open(self, protocol: Any, transport: StringTransport) -> None:
        protocol.dataReceived(self.ws.send(Request(host="example", target="/chat")))
        self.read(transport)
        assert isinstance(self.received.pop(0), AcceptConnection)

    def read(self, transport: StringTransport) -> None:
        self.ws.receive_data(transport.value())
        transport.clear()
        self.received.extend(self.ws.events())

    def texts(self) -> list[str]:
        return [e.data for e in self.received if isinstance(e, TextMessage)]


def _travel(state: ProtocolState) -> ProtocolState:
    return ProtocolState.fromPlain(decodeState(encodeState(state.toPlain())))


class WebSocketMoverTests(SynchronousTestCase):
    """
    A WebSocket connection moves at a message boundary, with its
    application state and the bytes of a frame not complete yet.
    """

    skip = NO_WEBSOCKET

    def setUp(self) -> None:
        self.oldFactory = ChatFactory(MigratableChat, "old")
        self.newFactory = ChatFactory(MigratableChat, "new")
        self.protocol = _site(self.oldFactory).buildProtocol(_ADDRESS)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.client = Client()
        self.client.open(self.protocol, self.transport)

    def send(self, protocol: Any, text: str, cut: int | None = None) -> bytes:
        data = self.client.ws.send(TextMessage(text))
        protocol.dataReceived(data[:cut])
        return data[cut:] if cut is not None else b""

    def adopt(self) -> tuple[Any, StringTransport]:
        state = _travel(captureProtocolState(self.protocol))
        new = _site(self.newFactory).buildProtocol(_ADDRESS)
        transport = StringTransport()
        new.transport = transport
        restoreProtocolState(new, state, copyState=False)
        replayBufferedInput(new)
        return new, transport

    def test_moves(self) -> None:
        """
        Between messages the connection moves; the new code's protocol is
        built from a request like the upgrade request, started, restored in
        place of C{negotiationFinished}, and answers the next message with
        the state it was given.
        """
        self.send(self.protocol, "a")
        self.client.read(self.transport)
        self.assertEqual(self.client.texts(), ["old 1 a"])
        self.assertIsNone(_mover(self.protocol).migrationBlocker())
        new, transport = self.adopt()
        [chat] = self.newFactory.built
        self.assertEqual(chat.events, ["started", "restored"])
        self.assertEqual(chat.path, b"/chat")
        self.send(new, "b")
        self.client.read(transport)
        self.assertEqual(self.client.texts(), ["old 1 a", "new 2 b"])

    def test_applicationTold(self) -> None:
        """
        Once the new code serves the connection, the old WebSocket's
        application protocol is told C{connectionMigrated()} (through the
        channel's mover), as any migratable protocol is.
        """
        [chat] = self.oldFactory.built
        chat.connectionMigrated = lambda: chat.events.append("migrated")  # type: ignore[attr-defined]
        tellMigrated(self.protocol)
        self.assertEqual(chat.events[-1:], ["migrated"])

    def test_partOfAMessage(self) -> None:
        """
        Part of a message held in the wire protocol's reassembly buffer
        (Twisted 26.4 and later) keeps the connection from moving; a wire
        protocol without such buffers (Twisted 25.5, which hands the
        application each chunk) holds no part.
        """
        self.assertFalse(_holdsPart(SimpleNamespace(), "_textBuffer"))
        empty = SimpleNamespace(_textBuffer=SimpleNamespace(data=""))
        self.assertFalse(_holdsPart(empty, "_textBuffer"))
        part = SimpleNamespace(_bytesBuffer=SimpleNamespace(data=b"ab"))
        self.assertTrue(_holdsPart(part, "_bytesBuffer"))

    def test_partialFrameHeader(self) -> None:
        """
        The bytes of a frame header not complete yet move with it.
        """
        rest = self.send(self.protocol, "x" * 300, cut=1)
        self.assertIsNone(_mover(self.protocol).migrationBlocker())
        new, transport = self.adopt()
        new.dataReceived(rest)
        self.client.read(transport)
        self.assertEqual(self.client.texts(), ["new 1 " + "x" * 300])

    def test_halfMessage(self) -> None:
        """
        A message half received keeps the connection until it is complete.
        """
        rest = self.send(self.protocol, "x" * 300, cut=20)
        reason = _mover(self.protocol).migrationBlocker()
        self.assertIn("half received", reason)
        self.assertRaises(NotAtSafePoint, captureProtocolState, self.protocol)
        self.protocol.dataReceived(rest)
        self.assertIsNone(_mover(self.protocol).migrationBlocker())

    def test_notOptedIn(self) -> None:
        """
        A WebSocket protocol that does not provide L{IMigratable} never
        moves.
        """
        factory = ChatFactory(Chat, "old")
        protocol = _site(factory).buildProtocol(_ADDRESS)
        transport = StringTransport()
        protocol.makeConnection(transport)
        Client().open(protocol, transport)
        self.assertIsNone(_mover(protocol).migrationBlocker())
        error = self.assertRaises(StateError, captureProtocolState, protocol)
        self.assertNotIsInstance(error, NotAtSafePoint)
        self.assertIn("IMigratable", str(error))

    def test_closePolitely(self) -> None:
        """
        A WebSocket connection is closed with a close frame carrying the
        code given (1001, going away).
        """
        self.assertTrue(_mover(self.protocol).closePolitely(1001))
        self.client.read(self.transport)
        [closing] = [e for e in self.client.received if isinstance(e, CloseConnection)]
        self.assertEqual(closing.code, 1001)
        self.assertTrue(self.transport.disconnecting)

    def test_noResourceAnyMore(self) -> None:
        """
        New code without a WebSocket resource at that URI refuses the
        state.
        """
        state = _travel(captureProtocolState(self.protocol))
        new = Site(Resource(), reactor=Clock()).buildProtocol(_ADDRESS)
        new.transport = StringTransport()
        self.assertRaises(StateError, restoreProtocolState, new, state)
