"""
Tests for L{migrate.testing.roundTrip}: a protocol moved to new code in
the test's own process, as a migration moves it; and for
L{migrate.testing.abandonedRestore}: a protocol restored ahead of a
reload's pause, then abandoned, as the pause abandons it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from migrate.examples import chat, chat2
from migrate.interfaces import IMigratable
from migrate.state import RestoreError, StateError
from migrate.testing import AbandonedRestore, RoundTrip, abandonedRestore, roundTrip

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
        Nothing but C{connectionMigrated} (which the example does not
        define) is called on the old protocol after its state is taken: it
        stays in its room, as a migrated connection's old protocol does
        (the old process lets go of it without telling its room).
        """
        roundTrip(self.alice, chat.makeFactory())
        self.assertIn(self.alice, self.oldFactory.rooms["games"])
        self.assertEqual(lines(self.bobOut), [])

    def test_oldProtocolTold(self) -> None:
        """
        Once the new protocol is restored, the old one is told
        C{connectionMigrated()}, as capability transfer and module reload
        tell it.
        """
        newFactory = chat.makeFactory()
        told: list[Any] = []
        self.alice.connectionMigrated = lambda: told.append(
            {each.nick for each in newFactory.rooms.get("games", ())}
        )
        roundTrip(self.alice, newFactory)
        self.assertEqual(told, [{"alice"}])

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


class Forgetful(chat.ChatProtocol):
    """
    A chat user whose abandon forgets to leave the room its restore joined.
    """

    def abandonMigrationState(self) -> None:
        pass


class Announcing(chat.ChatProtocol):
    """
    A chat user whose restore tells the room it is back: that cannot be
    taken back.
    """

    def restoreMigrationState(self, state: Any) -> None:
        super().restoreMigrationState(state)
        self.factory.broadcast(self.room, f"* {self.nick} is back", self)


class Faulty(chat.ChatProtocol):
    """
    A chat user whose abandon fails.
    """

    def abandonMigrationState(self) -> None:
        raise RuntimeError("cannot leave")


class ChatOf(chat.ChatFactory):
    """
    A chat factory that builds another kind of user.
    """

    def __init__(self, protocol: type[chat.ChatProtocol]) -> None:
        super().__init__()
        self.protocol = protocol


@implementer(IMigratable)
class Pinger(LineReceiver):
    """
    Sends C{ping} every ten seconds, and hangs up after a minute without a
    line: timers its restore starts again, from the time left, and its
    abandon cancels (all of them, unless C{forgets} names one).

    @ivar forgets: the name of the timer abandon leaves running, or
        L{None}.
    """

    migrationVersion = 1
    forgets: str | None = None

    def connectionMade(self) -> None:
        self.startTimers(60)

    def startTimers(self, idleLeft: float) -> None:
        clock = self.factory.clock
        transport: Any = self.transport
        self.idle = clock.callLater(idleLeft, transport.loseConnection)
        self.ping = LoopingCall(self.sendLine, b"ping")
        self.ping.clock = clock
        self.ping.start(10, now=False)

    def lineReceived(self, line: bytes) -> None:
        self.idle.reset(60)

    def getMigrationState(self) -> Any:
        return {"idleLeft": self.idle.getTime() - self.factory.clock.seconds()}

    def restoreMigrationState(self, state: Any) -> None:
        self.startTimers(state["idleLeft"])

    def abandonMigrationState(self) -> None:
        if self.forgets != "idle":
            self.idle.cancel()
        if self.forgets != "ping":
            self.ping.stop()

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


class PingerFactory(Factory):
    """
    Builds L{Pinger}s on a given clock, and runs a timer of its own.
    """

    protocol = Pinger

    def __init__(self, clock: Clock, forgets: str | None = None) -> None:
        self.clock = clock
        self.forgets = forgets
        self.sweep = clock.callLater(3600, lambda: None)

    def buildProtocol(self, addr: Any) -> Any:
        protocol: Any = super().buildProtocol(addr)
        protocol.forgets = self.forgets
        return protocol


class AbandonedRestoreTests(SynchronousTestCase):
    """
    Tests for L{abandonedRestore}.
    """

    def setUp(self) -> None:
        self.oldFactory = chat.makeFactory()
        self.alice, self.aliceOut = connect(self.oldFactory)
        self.alice.dataReceived(b"/nick alice\n/join games\n")
        lines(self.aliceOut)

    def joined(self, factory: chat.ChatFactory) -> tuple[Any, StringTransport]:
        """
        A user of C{factory}, in the games room, whose transport holds
        nothing yet.
        """
        carol, carolOut = connect(factory)
        carol.dataReceived(b"/nick carol\n/join games\n")
        lines(carolOut)
        return carol, carolOut

    def test_abandonUndoesRestore(self) -> None:
        """
        The demo chat's user, restored into the new code as a reload
        restores it ahead of its pause, joins its room; abandoned, it
        leaves it, and nothing is left behind: the new factory is as it was
        before, and nobody heard anything.
        """
        newFactory = chat.makeFactory()
        carol, carolOut = self.joined(newFactory)
        rooms = {"games": {carol}}
        self.assertEqual(newFactory.rooms, rooms)
        seen: list[object] = []

        class Watching(chat.ChatProtocol):
            def restoreMigrationState(self, state: Any) -> None:
                super().restoreMigrationState(state)
                seen.append(set(self.factory.rooms["games"]))

        newFactory.protocol = Watching
        abandoned = abandonedRestore(self.alice, newFactory, others=[carolOut])
        self.assertIsInstance(abandoned, AbandonedRestore)
        self.assertEqual(abandoned.problems, ())
        self.assertIsInstance(abandoned.protocol, Watching)
        self.assertEqual(seen, [{carol, abandoned.protocol}])
        self.assertEqual(
            (abandoned.protocol.nick, abandoned.protocol.room), ("alice", "games")
        )
        self.assertEqual(newFactory.rooms, rooms)
        self.assertEqual(
            (abandoned.timers, abandoned.references, abandoned.changed),
            ((), (), ()),
        )
        self.assertEqual(abandoned.othersWritten, (b"",))
        self.assertEqual(abandoned.state.appState["nick"], "alice")

    def test_freshRestoreAfter(self) -> None:
        """
        After the abandon, L{roundTrip} into the same factory restores the
        fresh object, as the pause does: the room holds each user once.
        """
        newFactory = chat.makeFactory()
        abandonedRestore(self.alice, newFactory)
        self.alice.dataReceived(b"/nick alicia\n")
        moved = roundTrip(self.alice, newFactory)
        self.assertEqual(newFactory.rooms, {"games": {moved.protocol}})
        self.assertEqual(newFactory.nicks("games"), ["alicia"])

    def test_oldProtocolUntouched(self) -> None:
        """
        The old protocol still serves, in its room.
        """
        abandonedRestore(self.alice, chat.makeFactory())
        self.assertEqual(self.oldFactory.rooms, {"games": {self.alice}})
        self.alice.dataReceived(b"/who\n")
        self.assertEqual(lines(self.aliceOut), ["* In games: alice"])

    def test_writesHeldAndDropped(self) -> None:
        """
        What the restored object writes is held, then dropped with it: it
        is reported, but is not a problem.
        """
        self.alice.pauseProducing()
        self.alice.deliver("queued")
        abandoned = abandonedRestore(self.alice, chat.makeFactory())
        self.assertEqual(abandoned.written, b"queued\n")
        self.assertEqual(abandoned.held, (("write", (b"queued\n",), {}),))
        self.assertEqual(abandoned.problems, ())

    def test_noEventReachesIt(self) -> None:
        """
        Complete lines the old protocol holds are restored but not
        delivered: no event reaches an object restored ahead.
        """
        newFactory = chat.makeFactory()
        carol, carolOut = self.joined(newFactory)
        self.alice.pauseProducing()
        self.alice.dataReceived(b"hello\n")
        abandoned = abandonedRestore(self.alice, newFactory, others=[carolOut])
        self.assertEqual(abandoned.problems, ())
        self.assertEqual(lines(carolOut), [])

    def test_registrationLeft(self) -> None:
        """
        An abandon that forgets to undo the restore's registration is
        caught: the factory still refers to the object, and its attributes
        changed.
        """
        newFactory = ChatOf(Forgetful)
        abandoned = abandonedRestore(self.alice, newFactory)
        self.assertEqual(abandoned.references, ("factory.rooms['games']",))
        self.assertEqual(abandoned.changed, ("_nicks", "rooms"))
        self.assertEqual(len(abandoned.problems), 3)
        self.assertIn(
            "the factory still refers to the object: factory.rooms['games']",
            abandoned.problems,
        )
        self.assertIn("factory._nicks is not as it was", abandoned.problems[1])

    def test_wroteToOthers(self) -> None:
        """
        A restore that writes to another connection is caught: that cannot
        be taken back.
        """
        newFactory = ChatOf(Announcing)
        _, carolOut = self.joined(newFactory)
        abandoned = abandonedRestore(self.alice, newFactory, others=[carolOut])
        self.assertEqual(abandoned.othersWritten, (b"* alice is back\n",))
        self.assertEqual(
            abandoned.problems,
            (
                "the restore or the abandon wrote to another connection "
                "(others[0]): b'* alice is back\\n'",
            ),
        )

    def test_timersCancelled(self) -> None:
        """
        Timers the restore starts and the abandon cancels are not
        reported, nor are the factory's own.
        """
        clock = Clock()
        old, _ = connect(PingerFactory(clock))
        clock.advance(15)
        newFactory = PingerFactory(clock)
        abandoned = abandonedRestore(old, newFactory, clock=clock)
        self.assertEqual(abandoned.problems, ())
        self.assertEqual(abandoned.state.appState, {"idleLeft": 45.0})
        self.assertTrue(newFactory.sweep.active())

    def test_timerLeft(self) -> None:
        """
        A timer the abandon forgets to cancel is caught, whether a
        C{callLater} or a C{LoopingCall}.
        """
        clock = Clock()
        old, _ = connect(PingerFactory(clock))
        for forgets in ["idle", "ping"]:
            abandoned = abandonedRestore(
                old, PingerFactory(clock, forgets), clock=clock
            )
            self.assertEqual(len(abandoned.timers), 1)
            self.assertEqual(len(abandoned.problems), 1)
            self.assertTrue(
                abandoned.problems[0].startswith(
                    "a timer is still pending on the clock: <DelayedCall"
                ),
                abandoned.problems[0],
            )
            abandoned.timers[0].cancel()

    def test_elapsed(self) -> None:
        """
        C{elapsed} advances the clock between the restore and the abandon:
        timers the restore started run the new code, and what they write
        is held and dropped like the rest.  The old protocol's timers,
        which run and start again meanwhile, are not the abandoned
        object's.
        """
        clock = Clock()
        old, oldOut = connect(PingerFactory(clock))
        abandoned = abandonedRestore(old, PingerFactory(clock), clock=clock, elapsed=15)
        self.assertEqual(abandoned.written, b"ping\r\n")
        self.assertEqual(oldOut.value(), b"ping\r\n")
        self.assertEqual(abandoned.problems, ())
        self.assertEqual(clock.seconds(), 15)

    def test_elapsedTimerLeft(self) -> None:
        """
        A timer the abandon forgets is caught after C{elapsed} too: one the
        restore started that has not run yet, or one that ran and started
        again.
        """
        clock = Clock()
        old, _ = connect(PingerFactory(clock))
        for forgets in ["idle", "ping"]:
            abandoned = abandonedRestore(
                old, PingerFactory(clock, forgets), clock=clock, elapsed=15
            )
            self.assertEqual(len(abandoned.timers), 1, forgets)
            self.assertEqual(len(abandoned.problems), 1)
            abandoned.timers[0].cancel()
        self.assertRaises(
            ValueError, abandonedRestore, self.alice, chat.makeFactory(), elapsed=1
        )

    def test_abandonFails(self) -> None:
        """
        An abandon that raises rolls a reload back: L{StateError}, with the
        application's exception as its cause.
        """
        error = self.assertRaises(
            StateError, abandonedRestore, self.alice, ChatOf(Faulty)
        )
        self.assertIn("Faulty.abandonMigrationState() failed", str(error))
        self.assertIsInstance(error.__cause__, RuntimeError)

    def test_cannotAbandon(self) -> None:
        """
        A reload restores ahead only connections whose old and new code
        both define C{abandonMigrationState}: otherwise L{StateError} says
        so, as it does for a protocol that does not migrate, or a factory
        that refuses the connection.
        """
        old, _ = connect(chat2.makeFactory())

        class Plain(chat.ChatProtocol):
            abandonMigrationState = None  # type: ignore[assignment]

        error = self.assertRaises(StateError, abandonedRestore, old, ChatOf(Plain))
        self.assertIn("Plain does not define abandonMigrationState", str(error))
        self.assertIn("the new code's", str(error))
        plain, _ = connect(ChatOf(Plain))
        error = self.assertRaises(
            StateError, abandonedRestore, plain, chat.makeFactory()
        )
        self.assertIn("Plain does not define abandonMigrationState", str(error))
        error = self.assertRaises(
            StateError,
            abandonedRestore,
            self.alice,
            Factory.forProtocol(LineReceiver),
        )
        self.assertIn("does not provide IMigratable", str(error))

        class Refusing(Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        error = self.assertRaises(StateError, abandonedRestore, self.alice, Refusing())
        self.assertIn("refused the connection", str(error))

    def test_restoreRefused(self) -> None:
        """
        A state the new code refuses raises L{RestoreError}, as
        L{roundTrip} does.
        """
        newer, _ = connect(chat2.makeFactory())
        newer.dataReceived(b"/away lunch\n")
        error = self.assertRaises(
            RestoreError, abandonedRestore, newer, chat.makeFactory()
        )
        self.assertIn("version 2", str(error))

    def test_peer(self) -> None:
        """
        The new object is built for the old transport's peer, which its
        transport names, or for C{peer}.
        """
        abandoned = abandonedRestore(self.alice, chat.makeFactory())
        self.assertEqual(abandoned.protocol.transport.getPeer(), _PEER)
        self.assertEqual(abandoned.protocol.transport.getHost(), _HOST)
        peer = IPv4Address("TCP", "198.51.100.1", 4000)
        abandoned = abandonedRestore(self.alice, chat.makeFactory(), peer=peer)
        self.assertEqual(abandoned.protocol.transport.getPeer(), peer)
