"""
Tests for L{migrate._handoff._migrated}: what the old code's protocol
object is told once its connection is served by the new code.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.policies import TimeoutMixin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from .._handoff._migrated import cancelIdleTimeout, tellMigrated
from ..interfaces import IMigratable


class Heartbeat(Protocol):
    """
    A migratable protocol whose C{connectionMigrated} stops a timer it
    started, as an application's would (its state methods play no part
    here, and are left out: it declares the interface itself).
    """

    def __init__(self, clock: Clock) -> None:
        directlyProvides(self, IMigratable)
        self.clock = clock
        self.beats = 0
        self.told = 0

    def connectionMade(self) -> None:
        self.call = self.clock.callLater(1, self.beat)

    def beat(self) -> None:
        self.beats += 1
        self.call = self.clock.callLater(1, self.beat)

    def connectionMigrated(self) -> None:
        self.told += 1
        self.call.cancel()


class Idle(Protocol, TimeoutMixin):
    """
    A protocol with Twisted's idle timeout, and no hook of its own.
    """

    def __init__(self, clock: Clock) -> None:
        self.callLater = clock.callLater  # type: ignore[assignment]
        self.timedOut = 0

    def connectionMade(self) -> None:
        self.setTimeout(5)

    def timeoutConnection(self) -> None:
        self.timedOut += 1


class TellMigratedTests(SynchronousTestCase):
    """
    L{tellMigrated} stops what the old object scheduled, and never raises.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_hookCalled(self) -> None:
        """
        A migratable protocol's C{connectionMigrated} is called once; the
        timer it stops does not fire again.
        """
        protocol = Heartbeat(self.clock)
        protocol.makeConnection(StringTransport())
        self.clock.advance(1)
        tellMigrated(protocol)
        self.clock.advance(5)
        self.assertEqual((protocol.told, protocol.beats), (1, 1))

    def test_idleTimeoutCancelled(self) -> None:
        """
        A C{TimeoutMixin} protocol's idle timeout is cancelled: its
        C{timeoutConnection} would act on a connection that is no longer
        its own.
        """
        protocol = Idle(self.clock)
        protocol.makeConnection(StringTransport())
        tellMigrated(protocol)
        self.clock.advance(10)
        self.assertEqual(protocol.timedOut, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleTimeoutAlreadyFired(self) -> None:
        """
        Cancelling an idle timeout that has fired, or none, does nothing.
        """
        fired = Idle(self.clock)
        fired.makeConnection(StringTransport())
        self.clock.advance(5)
        cancelIdleTimeout(fired)
        self.assertEqual(fired.timedOut, 1)
        never = Idle(self.clock)
        cancelIdleTimeout(never)
        cancelIdleTimeout(Protocol())

    def test_notMigratable(self) -> None:
        """
        A protocol that is neither migratable nor has a mover is left
        alone, even if it has a method of that name; L{None} is nothing.
        """
        protocol = Protocol()
        told: list[bool] = []
        protocol.connectionMigrated = lambda: told.append(True)  # type: ignore[attr-defined]
        tellMigrated(protocol)
        tellMigrated(None)
        self.assertEqual(told, [])

    def test_failureLogged(self) -> None:
        """
        A C{connectionMigrated} that raises is logged with the protocol's
        class, and does not raise: the migration is done.
        """
        protocol = Heartbeat(self.clock)

        def broken() -> None:
            raise ValueError("no timer")

        protocol.connectionMigrated = broken  # type: ignore[method-assign]
        with capturedLogs() as events:
            tellMigrated(protocol)
        [failure] = self.flushLoggedErrors(ValueError)
        self.assertEqual(
            [formatEvent(event) for event in events],
            [
                "Heartbeat.connectionMigrated failed (its connection is served by "
                "the new code all the same)"
            ],
        )
