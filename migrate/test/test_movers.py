"""
Tests for L{migrate._handoff._movers._registry}: the mover registry and
how the state layer uses it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from migrate._codec import StateError
from migrate._handoff._movers._registry import (
    IMover,
    MoverRegistry,
    NotAtSafePoint,
    migratableFor,
    migrationBlocker,
    movers,
)
from migrate.interfaces import IMigratable
from migrate.state import (
    captureProtocolState,
    hasBufferedInput,
    isMigratable,
    replayBufferedInput,
    restoreProtocolState,
)


class Plain(Protocol):
    """
    A protocol nobody registered a mover for.
    """

    value = 0


class Derived(Plain):
    pass


@implementer(IMover)
class PlainMover:
    """
    A mover for L{Plain}, recording what it is asked.
    """

    migrationVersion = 1
    blocked: str | None = None
    replayed = 0

    def __init__(self, protocol: Plain) -> None:
        self.protocol = protocol

    def migrationBlocker(self) -> str | None:
        return type(self).blocked

    def getMigrationState(self) -> Any:
        return {"value": self.protocol.value}

    def restoreMigrationState(self, state: Any) -> None:
        self.protocol.value = state["value"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state

    def replayBufferedInput(self) -> None:
        type(self).replayed += 1

    def closePolitely(self, code: int) -> bool:
        return True


@implementer(IMigratable)
class Opted(Protocol):
    """
    An application protocol that opts in, and may say "not now".
    """

    migrationVersion = 1
    reason: Any = None

    def migrationBlocker(self) -> Any:
        return self.reason

    def getMigrationState(self) -> Any:
        return {}

    def restoreMigrationState(self, state: Any) -> None:
        pass

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class MoverRegistryTests(SynchronousTestCase):
    """
    L{MoverRegistry} finds a mover by the class (or a base class) of a
    protocol.
    """

    def setUp(self) -> None:
        PlainMover.blocked = None
        PlainMover.replayed = 0

    def test_interface(self) -> None:
        """
        The test mover provides L{IMover}.
        """
        verifyObject(IMover, PlainMover(Plain()))

    def test_none(self) -> None:
        """
        A protocol whose classes have no mover has none.
        """
        self.assertIsNone(MoverRegistry().moverFor(Plain()))

    def test_baseClass(self) -> None:
        """
        A mover registered for a class serves its subclasses.
        """
        registry = MoverRegistry()
        registry.register(_name(Plain), PlainMover)
        protocol = Derived()
        mover = registry.moverFor(protocol)
        self.assertIsInstance(mover, PlainMover)
        self.assertIs(mover.protocol, protocol)  # type: ignore[union-attr]

    def test_lazyName(self) -> None:
        """
        A mover may be named as C{"module:name"}, imported when first used.
        """
        registry = MoverRegistry()
        registry.register(_name(Plain), f"{__name__}:PlainMover")
        self.assertIsInstance(registry.moverFor(Plain()), PlainMover)

    def test_registerClearsCache(self) -> None:
        """
        A registration after a look-up is seen by the next look-up.
        """
        registry = MoverRegistry()
        self.assertIsNone(registry.moverFor(Plain()))
        registry.register(_name(Plain), PlainMover)
        self.assertIsInstance(registry.moverFor(Plain()), PlainMover)

    def test_webRegistered(self) -> None:
        """
        The default registry has a mover for twisted.web's HTTP channel.
        """
        from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

        protocol = _GenericHTTPChannelProtocol(HTTPChannel())
        self.assertTrue(IMover.providedBy(movers.moverFor(protocol)))
        self.assertTrue(isMigratable(protocol))

    def test_migratableForApplication(self) -> None:
        """
        An L{IMigratable} protocol is its own migratable, whatever movers
        are registered.
        """
        registry = MoverRegistry()
        registry.register(_name(Protocol), PlainMover)
        protocol = Opted()
        self.assertIs(migratableFor(protocol, registry), protocol)
        self.assertIsNone(migratableFor(Plain()))


class MigrationBlockerTests(SynchronousTestCase):
    """
    L{migrationBlocker} asks whether a connection can move now.
    """

    def test_optional(self) -> None:
        """
        An application protocol without C{migrationBlocker} can always
        move.
        """

        self.assertIsNone(migrationBlocker(object()))

    def test_reason(self) -> None:
        """
        A reason is returned as it is.
        """
        protocol = Opted()
        protocol.reason = "a command is outstanding"
        self.assertEqual(migrationBlocker(protocol), "a command is outstanding")

    def test_badReason(self) -> None:
        """
        Something else than L{None} or a C{str} is a L{StateError}.
        """
        protocol = Opted()
        protocol.reason = 3
        self.assertRaises(StateError, migrationBlocker, protocol)

    def test_raises(self) -> None:
        """
        An exception from C{migrationBlocker} becomes a L{StateError}.
        """
        protocol = Opted()
        protocol.migrationBlocker = lambda: 1 / 0  # type: ignore[method-assign]
        error = self.assertRaises(StateError, migrationBlocker, protocol)
        self.assertIsInstance(error.__cause__, ZeroDivisionError)

    def test_captureNotNow(self) -> None:
        """
        L{captureProtocolState} raises L{NotAtSafePoint} for an application
        protocol that says "not now".
        """
        protocol = Opted()
        protocol.reason = "busy"
        error = self.assertRaises(NotAtSafePoint, captureProtocolState, protocol)
        self.assertIn("busy", str(error))
        protocol.reason = None
        self.assertTrue(captureProtocolState(protocol).migratable)


class StateLayerTests(SynchronousTestCase):
    """
    The state layer captures, restores and replays through a mover.
    """

    def setUp(self) -> None:
        PlainMover.blocked = None
        PlainMover.replayed = 0
        movers.register(_name(Plain), PlainMover)
        self.addCleanup(movers._factories.pop, _name(Plain))
        self.addCleanup(movers._cache.clear)

    def test_roundTrip(self) -> None:
        """
        A protocol with a mover is migratable; its state goes through the
        mover both ways, and the mover replays its input.
        """
        old = Plain()
        old.value = 7
        self.assertTrue(isMigratable(old))
        state = captureProtocolState(old)
        self.assertEqual((state.migratable, state.version), (True, 1))
        new = Plain()
        new.makeConnection(StringTransport())
        restoreProtocolState(new, state)
        self.assertEqual(new.value, 7)
        replayBufferedInput(new)
        self.assertEqual(PlainMover.replayed, 1)

    def test_bufferedInputUnknown(self) -> None:
        """
        A protocol moved by a mover may hold buffered input
        (L{hasBufferedInput} says so): the mover cannot tell, so its
        connection is served at once after a move.  An L{IMigratable}
        protocol with nothing buffered has none.
        """
        self.assertTrue(hasBufferedInput(Plain()))
        self.assertFalse(hasBufferedInput(Opted()))

    def test_notNow(self) -> None:
        """
        A mover saying "not now" makes the capture raise L{NotAtSafePoint}.
        """
        PlainMover.blocked = "a request is in flight"
        self.assertRaises(NotAtSafePoint, captureProtocolState, Plain())
