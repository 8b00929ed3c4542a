"""
Tests for L{migrate.examples}: the chat and echo demo applications.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from migrate.examples.chat import ChatFactory, ChatProtocol, makeFactory
from migrate.examples.echo import Echo, EchoFactory
from migrate.interfaces import IMigratable
from migrate.testing import abandonedRestore, roundTrip

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def connect(factory: ChatFactory) -> tuple[ChatProtocol, StringTransport]:
    """
    Connect a new user to C{factory} over a L{StringTransport}.

    @return: the protocol and its transport.
    """
    protocol = factory.buildProtocol(_ADDRESS)
    assert isinstance(protocol, ChatProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def say(protocol: ChatProtocol, text: str) -> None:
    """
    Deliver one line from the user to C{protocol}, as the network would.
    """
    protocol.dataReceived(text.encode("utf-8") + b"\n")


def received(transport: StringTransport) -> list[str]:
    """
    Return the lines written to C{transport} since the last call and forget
    them.
    """
    data = transport.value()
    transport.clear()
    assert data == b"" or data.endswith(b"\n"), data
    lines: list[str] = data.decode("utf-8").splitlines()
    return lines


def disconnect(protocol: ChatProtocol) -> None:
    """
    Tell C{protocol} its connection ended.
    """
    protocol.connectionLost(Failure(ConnectionDone()))


class ChatTests(SynchronousTestCase):
    """
    Tests for L{ChatProtocol} and L{ChatFactory}: the chat itself.
    """

    def setUp(self) -> None:
        self.factory = makeFactory()
        self.alice, self.aliceOut = connect(self.factory)
        say(self.alice, "/nick alice")
        self.bob, self.bobOut = connect(self.factory)
        say(self.bob, "/nick bob")
        received(self.aliceOut)
        received(self.bobOut)

    def test_interface(self) -> None:
        """
        L{ChatProtocol} provides L{IMigratable}.
        """
        self.assertTrue(verifyObject(IMigratable, self.alice))

    def test_makeFactory(self) -> None:
        """
        L{makeFactory} returns a new, empty L{ChatFactory} each time.
        """
        first, second = makeFactory(), makeFactory()
        self.assertIsInstance(first, ChatFactory)
        self.assertIsNot(first, second)
        self.assertEqual(first.rooms, {})

    def test_welcome(self) -> None:
        """
        A new user gets a guest nickname, a welcome line naming the commands,
        and a place in the default room, and the room hears about it.
        """
        carol, carolOut = connect(self.factory)
        self.assertEqual(carol.nick, "guest3")
        self.assertEqual(
            received(carolOut),
            [
                "* Welcome, guest3! You are in lobby. "
                "Commands: /nick NAME, /join ROOM, /who, /quit"
            ],
        )
        self.assertEqual(received(self.aliceOut), ["* guest3 joined lobby"])
        self.assertEqual(self.factory.rooms, {"lobby": {self.alice, self.bob, carol}})

    def test_nick(self) -> None:
        """
        C{/nick NAME} renames the user and tells the room.
        """
        say(self.alice, "/nick ALICE")
        self.assertEqual(self.alice.nick, "ALICE")
        self.assertEqual(received(self.aliceOut), ["* You are now ALICE."])
        self.assertEqual(received(self.bobOut), ["* alice is now ALICE"])

    def test_nickTaken(self) -> None:
        """
        C{/nick} refuses a nickname somebody else uses, in any room.
        """
        say(self.bob, "/join games")
        received(self.bobOut)
        received(self.aliceOut)
        say(self.alice, "/nick bob")
        self.assertEqual(self.alice.nick, "alice")
        self.assertEqual(received(self.aliceOut), ["* bob is taken."])
        self.assertEqual(received(self.bobOut), [])

    def test_nickInvalid(self) -> None:
        """
        C{/nick} wants one word.
        """
        for line in ["/nick", "/nick two words", "/nick " + "x" * 33]:
            say(self.alice, line)
            self.assertEqual(self.alice.nick, "alice")
            [answer] = received(self.aliceOut)
            self.assertTrue(answer.startswith("* Usage: /nick NAME"), answer)

    def test_nickFreedOnRename(self) -> None:
        """
        A nickname given up by C{/nick} can be taken by somebody else.
        """
        say(self.alice, "/nick alison")
        say(self.bob, "/nick alice")
        self.assertEqual(self.bob.nick, "alice")

    def test_carriageReturn(self) -> None:
        """
        A C{\\r} before the C{\\n} is not part of the line.
        """
        self.alice.dataReceived(b"/nick carol\r\nhello\r\n")
        self.assertEqual(self.alice.nick, "carol")
        self.assertEqual(
            received(self.bobOut), ["* alice is now carol", "<carol> hello"]
        )

    def test_broadcast(self) -> None:
        """
        A line that is not a command goes to everybody else in the room, and
        only to them.
        """
        carol, carolOut = connect(self.factory)
        say(carol, "/join games")
        received(carolOut)
        received(self.aliceOut)
        received(self.bobOut)
        say(self.alice, "hello, world")
        self.assertEqual(received(self.bobOut), ["<alice> hello, world"])
        self.assertEqual(received(self.aliceOut), [])
        self.assertEqual(received(carolOut), [])

    def test_emptyLine(self) -> None:
        """
        Blank lines are ignored.
        """
        self.alice.dataReceived(b"\n  \r\n")
        self.assertEqual(received(self.bobOut), [])
        self.assertEqual(received(self.aliceOut), [])

    def test_join(self) -> None:
        """
        C{/join ROOM} moves the user to C{ROOM}, telling both rooms, and a
        room nobody is left in disappears.
        """
        carol, carolOut = connect(self.factory)
        say(carol, "/nick carol")
        say(carol, "/join games")
        received(carolOut)
        received(self.aliceOut)
        received(self.bobOut)
        say(self.bob, "/join games")
        self.assertEqual(self.bob.room, "games")
        self.assertEqual(received(self.bobOut), ["* You are in games: bob, carol"])
        self.assertEqual(received(self.aliceOut), ["* bob left lobby"])
        self.assertEqual(received(carolOut), ["* bob joined games"])
        say(self.alice, "/join games")
        self.assertEqual(self.factory.rooms, {"games": {self.alice, self.bob, carol}})

    def test_joinSameRoom(self) -> None:
        """
        C{/join} the room the user is in changes nothing.
        """
        say(self.alice, "/join lobby")
        self.assertEqual(received(self.aliceOut), ["* You are already in lobby."])
        self.assertEqual(received(self.bobOut), [])

    def test_joinInvalid(self) -> None:
        """
        C{/join} wants one word.
        """
        say(self.alice, "/join")
        [answer] = received(self.aliceOut)
        self.assertTrue(answer.startswith("* Usage: /join ROOM"), answer)
        self.assertEqual(self.alice.room, "lobby")

    def test_who(self) -> None:
        """
        C{/who} lists the nicknames in the user's room, sorted.
        """
        carol, _ = connect(self.factory)
        say(carol, "/join games")
        received(self.bobOut)
        say(self.bob, "/who")
        self.assertEqual(received(self.bobOut), ["* In lobby: alice, bob"])

    def test_quit(self) -> None:
        """
        C{/quit} says goodbye and closes the connection; once it is closed
        the room hears that the user left.
        """
        say(self.alice, "/quit")
        self.assertEqual(received(self.aliceOut), ["* Bye, alice."])
        self.assertTrue(self.aliceOut.disconnecting)
        self.assertEqual(received(self.bobOut), [])
        disconnect(self.alice)
        self.assertEqual(received(self.bobOut), ["* alice left lobby"])
        self.assertEqual(self.factory.rooms, {"lobby": {self.bob}})
        self.assertFalse(self.factory.nickInUse("alice"))

    def test_quitIgnoresLaterLines(self) -> None:
        """
        Lines after C{/quit} in the same chunk of input are not run.
        """
        self.alice.dataReceived(b"/quit\nstill here?\n")
        self.assertEqual(received(self.bobOut), [])

    def test_unknownCommand(self) -> None:
        """
        An unknown command gets a hint and goes nowhere else.
        """
        say(self.alice, "/dance")
        self.assertEqual(
            received(self.aliceOut),
            ["* Unknown command /dance. Commands: /nick NAME, /join ROOM, /who, /quit"],
        )
        self.assertEqual(received(self.bobOut), [])

    def test_pausedQueues(self) -> None:
        """
        While the protocol is paused, messages for its user are queued in
        C{unread}; resuming writes them, oldest first.
        """
        self.alice.pauseProducing()
        say(self.bob, "one")
        say(self.bob, "two")
        self.assertEqual(received(self.aliceOut), [])
        self.assertEqual(self.alice.unread, ["<bob> one", "<bob> two"])
        self.alice.resumeProducing()
        self.assertEqual(received(self.aliceOut), ["<bob> one", "<bob> two"])
        self.assertEqual(self.alice.unread, [])

    def test_unreadBounded(self) -> None:
        """
        At most C{maxUnread} messages are queued; the oldest are dropped.
        """
        self.alice.maxUnread = 2
        self.alice.pauseProducing()
        for word in ["one", "two", "three"]:
            say(self.bob, word)
        self.assertEqual(self.alice.unread, ["<bob> two", "<bob> three"])


class ChatMigrationTests(SynchronousTestCase):
    """
    Tests for L{ChatProtocol}'s L{IMigratable} implementation.
    """

    def setUp(self) -> None:
        self.oldFactory = makeFactory()
        self.alice, self.aliceOut = connect(self.oldFactory)
        say(self.alice, "/nick alice")
        say(self.alice, "/join games")
        self.bob, _ = connect(self.oldFactory)
        say(self.bob, "/join games")
        received(self.aliceOut)
        self.newFactory = makeFactory()

    def restore(self, state: object) -> tuple[ChatProtocol, StringTransport]:
        """
        Build a protocol with the new factory and restore C{state} into it
        the way migrate does: the transport is set and C{connectionMade} is
        not called.
        """
        protocol = self.newFactory.buildProtocol(_ADDRESS)
        assert isinstance(protocol, ChatProtocol)
        transport = StringTransport()
        protocol.transport = transport
        protocol.connected = True
        protocol.restoreMigrationState(state)
        return protocol, transport

    def test_stateIsPlainData(self) -> None:
        """
        The state is JSON-compatible and holds the nickname, the room and the
        queued messages.
        """
        self.alice.pauseProducing()
        say(self.bob, "hi")
        state = self.alice.getMigrationState()
        self.assertEqual(json.loads(json.dumps(state)), state)
        self.assertEqual(
            state, {"nick": "alice", "room": "games", "unread": ["<guest2> hi"]}
        )

    def test_roundTrip(self) -> None:
        """
        A protocol restored into a new factory keeps its nickname and room,
        joins the new factory's room without any notice, and receives what
        is said there.
        """
        state = json.loads(json.dumps(self.alice.getMigrationState()))
        restored, restoredOut = self.restore(state)
        self.assertEqual((restored.nick, restored.room), ("alice", "games"))
        self.assertEqual(self.newFactory.rooms, {"games": {restored}})
        self.assertEqual(received(restoredOut), [])

        carol, carolOut = connect(self.newFactory)
        say(carol, "/nick carol")
        received(carolOut)
        say(carol, "/join games")
        self.assertEqual(received(carolOut), ["* You are in games: alice, carol"])
        say(carol, "hello")
        self.assertEqual(
            received(restoredOut), ["* carol joined games", "<carol> hello"]
        )
        say(restored, "hi carol")
        self.assertEqual(received(carolOut), ["<alice> hi carol"])

    def test_restoreDeliversUnread(self) -> None:
        """
        Messages queued on the old side are written by the restored protocol.
        """
        self.alice.pauseProducing()
        say(self.bob, "are you there?")
        _, restoredOut = self.restore(self.alice.getMigrationState())
        self.assertEqual(received(restoredOut), ["<guest2> are you there?"])

    def test_restoredNickIsTaken(self) -> None:
        """
        Restored nicknames count as used in the new factory: new guests and
        C{/nick} avoid them.
        """
        self.restore(self.bob.getMigrationState())
        self.restore(self.alice.getMigrationState())
        carol, _ = connect(self.newFactory)
        self.assertEqual(carol.nick, "guest1")
        dave, daveOut = connect(self.newFactory)
        self.assertEqual(dave.nick, "guest3")
        say(dave, "/nick alice")
        self.assertEqual(received(daveOut)[-1], "* alice is taken.")

    def test_restoreRefusesMalformedState(self) -> None:
        """
        State without the expected shape is refused with L{ValueError}, and
        the new factory is left alone.
        """
        states: list[object] = [
            None,
            [],
            {"nick": "alice", "room": "games"},
            {"nick": 1, "room": "games", "unread": []},
            {"nick": "alice", "room": "games", "unread": [1]},
        ]
        for state in states:
            self.assertRaises(ValueError, self.restore, state)
        self.assertEqual(self.newFactory.rooms, {})

    def test_abandon(self) -> None:
        """
        A user restored by a module reload ahead of its pause and abandoned
        there (its connection changed meanwhile) leaves the room it joined
        without a word; the fresh object restored in its place is then the
        room's only alice.
        """
        carol, carolOut = connect(self.newFactory)
        say(carol, "/nick carol")
        say(carol, "/join games")
        received(carolOut)
        abandoned = abandonedRestore(self.alice, self.newFactory, others=[carolOut])
        self.assertEqual(abandoned.problems, ())
        self.assertEqual(self.newFactory.rooms, {"games": {carol}})
        say(self.alice, "/nick alicia")
        moved = roundTrip(self.alice, self.newFactory)
        self.assertEqual(self.newFactory.rooms, {"games": {carol, moved.protocol}})
        self.assertEqual(self.newFactory.nicks("games"), ["alicia", "carol"])
        self.assertEqual(received(carolOut), [])

    def test_upgradeVersion1(self) -> None:
        """
        State of version 1, this code's version, is returned as it is.
        """
        self.assertEqual(ChatProtocol.migrationVersion, 1)
        state = self.alice.getMigrationState()
        self.assertEqual(ChatProtocol().upgradeMigrationState(1, state), state)

    def test_upgradeRefusesUnknownVersion(self) -> None:
        """
        State of any other version is refused with L{ValueError}, which
        leaves the connection on the code that wrote it.
        """
        state = self.alice.getMigrationState()
        for version in [0, 2, 99]:
            error = self.assertRaises(
                ValueError, ChatProtocol().upgradeMigrationState, version, state
            )
            self.assertIn(str(version), str(error))


class EchoTests(SynchronousTestCase):
    """
    Tests for L{migrate.examples.echo}.
    """

    def test_echo(self) -> None:
        """
        Every byte received is written back.
        """
        protocol = EchoFactory().buildProtocol(_ADDRESS)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"hello\r\n")
        protocol.dataReceived(b"\x00\xff")
        self.assertEqual(transport.value(), b"hello\r\n\x00\xff")

    def test_notMigratable(self) -> None:
        """
        The echo server does not opt in to carrying state.
        """
        self.assertIsInstance(EchoFactory().buildProtocol(_ADDRESS), Echo)
        self.assertFalse(IMigratable.implementedBy(Echo))
