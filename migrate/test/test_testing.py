"""
Tests for L{migrate.testing.roundTrip}: a protocol moved to new code in
the test's own process, as a migration moves it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from migrate.examples import chat, chat2
from migrate.interfaces import IMigratable
from migrate.state import RestoreError, StateError
from migrate.testing import RoundTrip, roundTrip

_PEER = IPv4Address("TCP", "192.0.2.7", 51000)
_HOST = IPv4Address("TCP", "127.0.0.1", 8000)


def connect(factory: Factory) -> tuple[Any, StringTransport]:
    """
    Connect a protocol of C{factory} to a L{StringTransport}.
    """
    protocol: Any = factory.buildProtocol(_PEER)
    transport = StringTransport(hostAddress=_HOST, peerAddress=_PEER)
    protocol.makeConnection(transport)
    return protocol, transport


def lines(transport: StringTransport) -> list[str]:
    """
    The lines written to C{transport} since the last call.
    """
    data: bytes = transport.value()
    transport.clear()
    return data.decode("utf-8").splitlines()


class RoundTripTests(SynchronousTestCase):
    """
    Tests for L{roundTrip}.
    """

    def setUp(self) -> None:
        self.oldFactory = chat.makeFactory()
        self.alice, self.aliceOut = connect(self.oldFactory)
        self.alice.dataReceived(b"/nick alice\n/join games\n")
        self.bob, self.bobOut = connect(self.oldFactory)
        self.bob.dataReceived(b"/nick bob\n/join games\n")
        lines(self.aliceOut)
        lines(self.bobOut)

    def test_sameVersion(self) -> None:
        """
        The new protocol is built by the new factory, connected to a new
        transport with the old one's addresses, restored without
        C{connectionMade} (nothing written), and carries the state that
        travelled, whose encoded size is given.
        """
        newFactory = chat.makeFactory()
        moved = roundTrip(self.alice, newFactory)
        self.assertIsInstance(moved, RoundTrip)
        self.assertIsInstance(moved.protocol, chat.ChatProtocol)
        self.assertIs(moved.protocol.factory, newFactory)
        self.assertIs(moved.protocol.transport, moved.transport)
        self.assertEqual(moved.transport.getPeer(), _PEER)
        self.assertEqual(moved.transport.getHost(), _HOST)
        self.assertEqual((moved.protocol.nick, moved.protocol.room), ("alice", "games"))
        self.assertEqual(newFactory.rooms, {"games": {moved.protocol}})
        self.assertEqual(moved.transport.value(), b"")
        self.assertEqual(moved.state.version, 1)
        self.assertEqual(
            moved.state.appState, {"nick": "alice", "room": "games", "unread": []}
        )
        self.assertGreater(moved.size, 0)

    def test_oldProtocolUntouched(self) -> None:
        """
        Nothing is called on the old protocol after its state is taken: it
        stays in its room, as a migrated connection's old protocol does
        (the old process lets go of it without telling it).
        """
        roundTrip(self.alice, chat.makeFactory())
        self.assertIn(self.alice, self.oldFactory.rooms["games"])
        self.assertEqual(lines(self.bobOut), [])

    def test_versionUpgrade(self) -> None:
        """
        State of another version goes through the new code's
        C{upgradeMigrationState} first.
        """
        moved = roundTrip(self.alice, chat2.makeFactory())
        self.assertEqual(moved.state.version, 1)
        self.assertIsNone(moved.protocol.away)
        moved.protocol.dataReceived(b"/away lunch\n")
        self.assertEqual(lines(moved.transport), ["* You are away: lunch"])

    def test_refusedVersion(self) -> None:
        """
        A new code that refuses the state raises L{RestoreError}, as the
        connection would be refused by a migration; the application's own
        exception is its cause.
        """
        newer, _ = connect(chat2.makeFactory())
        error = self.assertRaises(RestoreError, roundTrip, newer, chat.makeFactory())
        self.assertIn("version 2", str(error))
        self.assertIsInstance(error.__cause__, ValueError)

    def test_halfLineTravels(self) -> None:
        """
        Input the old protocol's C{LineReceiver} had not delivered is
        carried: the new protocol completes the line.
        """
        self.alice.dataReceived(b"hel")
        newFactory = chat.makeFactory()
        carol, carolOut = connect(newFactory)
        carol.dataReceived(b"/join games\n")
        lines(carolOut)
        moved = roundTrip(self.alice, newFactory)
        self.assertEqual(moved.state.buffers["LineReceiver"]["buffer"], b"hel")
        moved.protocol.dataReceived(b"lo\n")
        self.assertEqual(lines(carolOut), ["<alice> hello"])

    def test_heldLinesReplayed(self) -> None:
        """
        Complete lines the paused old protocol held back are delivered by
        the new one, unless C{replay} is C{False}.
        """
        newFactory = chat.makeFactory()
        carol, carolOut = connect(newFactory)
        carol.dataReceived(b"/join games\n")
        lines(carolOut)
        self.alice.pauseProducing()
        self.alice.dataReceived(b"one\ntwo\n")
        self.bob.pauseProducing()
        self.bob.dataReceived(b"three\n")
        roundTrip(self.alice, newFactory)
        self.assertEqual(lines(carolOut), ["<alice> one", "<alice> two"])
        roundTrip(self.bob, newFactory, replay=False)
        self.assertEqual(lines(carolOut), [])

    def test_peer(self) -> None:
        """
        C{peer} replaces the old transport's peer.
        """
        peer = IPv4Address("TCP", "198.51.100.1", 4000)
        built: list[object] = []

        class Recording(chat.ChatFactory):
            def buildProtocol(self, addr: Any) -> Any:
                built.append(addr)
                return super().buildProtocol(addr)

        moved = roundTrip(self.alice, Recording(), peer=peer)
        self.assertEqual(built, [peer])
        self.assertEqual(moved.transport.getPeer(), peer)

    def test_notMigratable(self) -> None:
        """
        A protocol that does not provide C{IMigratable} does not move: a
        L{StateError} says so.
        """
        old, _ = connect(Factory.forProtocol(Protocol))
        error = self.assertRaises(StateError, roundTrip, old, chat.makeFactory())
        self.assertIn("does not provide IMigratable", str(error))

    def test_newNotMigratable(self) -> None:
        """
        A new factory whose protocol does not provide C{IMigratable}, or
        that refuses the connection, raises L{StateError}.
        """
        error = self.assertRaises(
            StateError, roundTrip, self.alice, Factory.forProtocol(LineReceiver)
        )
        self.assertIn("LineReceiver does not provide IMigratable", str(error))

        class Refusing(Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        error = self.assertRaises(StateError, roundTrip, self.alice, Refusing())
        self.assertIn("refused the connection", str(error))

    def test_stateNotPlainData(self) -> None:
        """
        State that is not plain data is refused with L{StateError} naming
        the offending place, as a migration refuses it.
        """

        @implementer(IMigratable)
        class Bad(Protocol):
            migrationVersion = 1

            def getMigrationState(self) -> Any:
                return {"when": {1, 2}}

            def restoreMigrationState(self, state: Any) -> None:
                pass

            def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
                return state

        old, _ = connect(Factory.forProtocol(Bad))
        error = self.assertRaises(StateError, roundTrip, old, chat.makeFactory())
        self.assertIn("['when']", str(error))
