"""
Tests for L{migrate.examples.chat2}, version 2 of the demo chat: away
messages, and state carried over from version 1.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from migrate.examples import chat, chat2
from migrate.interfaces import IMigratable
from migrate.testing import abandonedRestore, roundTrip

from .test_examples import received, say


def connect(factory: Any) -> tuple[Any, StringTransport]:
    """
    Connect a new user of either version to C{factory}.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class ChatVersion2Tests(SynchronousTestCase):
    """
    Tests for L{chat2.ChatProtocol}'s new command and its state.
    """

    def setUp(self) -> None:
        self.factory = chat2.makeFactory()
        self.alice, self.aliceOut = connect(self.factory)
        say(self.alice, "/nick alice")
        self.bob, self.bobOut = connect(self.factory)
        say(self.bob, "/nick bob")
        received(self.aliceOut)
        received(self.bobOut)

    def test_interface(self) -> None:
        """
        Version 2's protocol provides L{IMigratable} with version 2.
        """
        self.assertTrue(verifyObject(IMigratable, self.alice))
        self.assertEqual(chat2.ChatProtocol.migrationVersion, 2)

    def test_selfContained(self) -> None:
        """
        The module does not import version 1: a copy of it replaces a copy
        of version 1 on its own.
        """
        source = inspect.getsource(chat2)
        self.assertNotIn("examples.chat ", source)
        self.assertNotIn("examples.chat\n", source)
        self.assertNotIn("from .chat", source)

    def test_welcomeNamesAway(self) -> None:
        """
        The welcome lists C{/away}.
        """
        _, out = connect(self.factory)
        self.assertIn("/away [MESSAGE]", received(out)[0])

    def test_awayAndBack(self) -> None:
        """
        C{/away MESSAGE} marks the user away and tells the room; C{/away}
        alone brings them back.
        """
        say(self.alice, "/away lunch")
        self.assertEqual(received(self.aliceOut), ["* You are away: lunch"])
        self.assertEqual(received(self.bobOut), ["* alice is away: lunch"])
        self.assertEqual(self.alice.away, "lunch")
        say(self.bob, "/who")
        self.assertEqual(
            received(self.bobOut), ["* In lobby: alice (away: lunch), bob"]
        )
        say(self.alice, "/away")
        self.assertEqual(received(self.aliceOut), ["* You are back."])
        self.assertEqual(received(self.bobOut), ["* alice is back"])
        self.assertIsNone(self.alice.away)
        say(self.alice, "/away")
        self.assertEqual(received(self.aliceOut), ["* You are not away."])

    def test_awayTooLong(self) -> None:
        """
        An away message longer than 200 characters is refused.
        """
        say(self.alice, "/away " + "x" * 201)
        self.assertEqual(
            received(self.aliceOut),
            ["* Usage: /away [MESSAGE] (at most 200 characters)"],
        )
        self.assertIsNone(self.alice.away)

    def test_stateHasAway(self) -> None:
        """
        Version 2's state holds the away message.
        """
        say(self.alice, "/away lunch")
        self.assertEqual(
            self.alice.getMigrationState(),
            {"nick": "alice", "room": "lobby", "unread": [], "away": "lunch"},
        )

    def test_fromVersion1(self) -> None:
        """
        State written by version 1 comes in with nobody away; the user
        keeps nickname, room and queued messages, hears the new room, and
        can go away.
        """
        old = chat.makeFactory()
        carol, _ = connect(old)
        say(carol, "/nick carol")
        carol.pauseProducing()
        carol.deliver("queued")
        moved = roundTrip(carol, self.factory)
        self.assertEqual(moved.state.version, 1)
        self.assertEqual((moved.protocol.nick, moved.protocol.away), ("carol", None))
        self.assertEqual(received(moved.transport), ["queued"])
        say(self.alice, "hi carol")
        self.assertEqual(received(moved.transport), ["<alice> hi carol"])
        moved.protocol.dataReceived(b"/away nap\n")
        self.assertEqual(received(self.aliceOut), ["* carol is away: nap"])

    def test_awayTravels(self) -> None:
        """
        Between two processes of version 2 the away message travels.
        """
        say(self.alice, "/away lunch")
        moved = roundTrip(self.alice, chat2.makeFactory())
        self.assertEqual(moved.protocol.away, "lunch")

    def test_abandon(self) -> None:
        """
        A version 1 user restored into version 2 by a module reload ahead of
        its pause, then abandoned, leaves no trace: the room and its
        nicknames are as they were, and nobody heard anything.
        """
        old = chat.makeFactory()
        carol, _ = connect(old)
        say(carol, "/nick carol")
        abandoned = abandonedRestore(
            carol, self.factory, others=[self.aliceOut, self.bobOut]
        )
        self.assertEqual(abandoned.problems, ())
        self.assertEqual(abandoned.protocol.nick, "carol")
        self.assertEqual(self.factory.nicks("lobby"), ["alice", "bob"])
        self.assertFalse(self.factory.nickInUse("carol"))

    def test_refusesNewerVersions(self) -> None:
        """
        State of versions 3 and later is refused.
        """
        state = self.alice.getMigrationState()
        error = self.assertRaises(
            ValueError, chat2.ChatProtocol().upgradeMigrationState, 3, state
        )
        self.assertIn("version 3", str(error))

    def test_refusesMalformedVersion1(self) -> None:
        """
        Version 1 state that is not a dict is refused.
        """
        self.assertRaises(
            ValueError, chat2.ChatProtocol().upgradeMigrationState, 1, ["alice"]
        )

    def test_restoreRefusesMalformedState(self) -> None:
        """
        State without the away key, or with an away message that is not
        text, is refused.
        """
        for state in [
            {"nick": "a", "room": "r", "unread": []},
            {"nick": "a", "room": "r", "unread": [], "away": 1},
        ]:
            protocol: Any = self.factory.buildProtocol(None)
            self.assertRaises(ValueError, protocol.restoreMigrationState, state)
        self.assertEqual(self.factory.nicks("r"), [])
