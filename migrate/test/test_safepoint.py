"""
Tests for L{migrate._handoff._safepoint}: waiting, within a bound, for
connections to reach a point where they can move.
"""

from __future__ import annotations

import socket
from typing import Any

from attrs import define
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from migrate._handoff._safepoint import (
    SafePointWatch,
    holdReading,
    waitForSafePoints,
)

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
_GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Slow(Resource):
    """
    Keeps every request open in C{held}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.held.append(request)
        return NOT_DONE_YET


class _Connection(tcp.Connection):
    """
    A TCP transport with addresses, never connected to a real reactor.
    """

    def getPeer(self) -> IPv4Address:
        return _ADDRESS

    def getHost(self) -> IPv4Address:
        return _ADDRESS

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass  # a Unix socketpair


@define
class Hosted:
    """
    Stands for a L{migrate._host._tracking.HostedProtocol}.
    """

    wrappedProtocol: Any
    transport: Any
    released: bool = False


class _HTTPConnectionsMixin(SynchronousTestCase):
    """
    HTTP channels on real TCP transports (of a socketpair, with a memory
    reactor): C{connect} makes one.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.clock = Clock()
        self.resource = Slow()
        self.site = Site(self.resource, reactor=self.clock)

    def connect(self) -> tuple[Any, Any]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        protocol = self.site.buildProtocol(_ADDRESS)
        transport = _Connection(ours, protocol, self.reactor)
        transport.connected = 1
        protocol.makeConnection(transport)
        transport.startReading()
        return Hosted(protocol, transport), transport

    def reading(self, transport: Any) -> bool:
        return transport in self.reactor.getReaders()


class SafePointTests(_HTTPConnectionsMixin):
    """
    L{waitForSafePoints}.
    """

    def test_nothingToWaitFor(self) -> None:
        """
        When every connection can move now, nothing waits and nothing is
        held.
        """
        hosted, transport = self.connect()
        result = self.successResultOf(
            waitForSafePoints(self.clock, [(None, hosted)], 3.0)
        )
        self.assertEqual((result.atOnce, result.later, result.missed), (1, 0, 0))
        self.assertEqual(result.held, [])
        self.assertTrue(self.reading(transport))

    def test_waitsForResponse(self) -> None:
        """
        A connection with a request in flight is waited for; the idle one
        is held meanwhile; the busy one is held the moment its response is
        done, and the wait ends.
        """
        idle, idleTransport = self.connect()
        busy, busyTransport = self.connect()
        busy.wrappedProtocol.dataReceived(_GET)
        waiting = waitForSafePoints(self.clock, [(None, idle), (None, busy)], 3.0)
        self.assertNoResult(waiting)
        self.assertFalse(self.reading(idleTransport))
        self.assertTrue(self.reading(busyTransport))
        self.clock.advance(0.5)
        self.assertNoResult(waiting)
        self.resource.held.pop().finish()
        self.assertFalse(self.reading(busyTransport))
        self.clock.advance(0.01)
        result = self.successResultOf(waiting)
        self.assertEqual((result.atOnce, result.later, result.missed), (1, 1, 0))
        self.assertEqual(len(result.held), 2)
        result.letGo()
        self.assertTrue(self.reading(idleTransport))
        self.assertTrue(self.reading(busyTransport))

    def test_bound(self) -> None:
        """
        A connection still busy at the bound is left as it was (it stays
        and drains) and the wait ends.
        """
        busy, busyTransport = self.connect()
        busy.wrappedProtocol.dataReceived(_GET)
        waiting = waitForSafePoints(self.clock, [(None, busy)], 2.0)
        self.clock.pump([0.5] * 5)
        result = self.successResultOf(waiting)
        self.assertEqual((result.atOnce, result.later, result.missed), (0, 0, 1))
        self.assertEqual(result.held, [])
        self.assertNotIn("requestDone", vars(busy.wrappedProtocol._channel))
        self.resource.held.pop().finish()
        self.assertTrue(self.reading(busyTransport))

    def test_zeroBound(self) -> None:
        """
        A bound of 0 waits for nothing.
        """
        busy, _ = self.connect()
        busy.wrappedProtocol.dataReceived(_GET)
        result = self.successResultOf(waitForSafePoints(self.clock, [(None, busy)], 0))
        self.assertEqual(result.missed, 1)


class SafePointWatchTests(_HTTPConnectionsMixin):
    """
    L{SafePointWatch} holds each busy connection the moment it reaches its
    safe point and hands it over when asked.
    """

    def test_takeReady(self) -> None:
        """
        A connection is ready (and held) once its response is done, not
        before; one still busy is let go as it was when the watch stops.
        """
        first, firstTransport = self.connect()
        second, secondTransport = self.connect()
        first.wrappedProtocol.dataReceived(_GET)
        second.wrappedProtocol.dataReceived(_GET)
        watch = SafePointWatch([("a", first), ("b", second)])
        self.assertEqual(watch.takeReady(), [])
        self.resource.held.pop(0).finish()
        self.assertFalse(self.reading(firstTransport))
        [ready] = watch.takeReady()
        self.assertEqual((ready.listenerKey, ready.hosted), ("a", first))
        self.assertFalse(self.reading(firstTransport))
        ready.letGo()
        self.assertTrue(self.reading(firstTransport))
        [remaining] = watch.stop()
        self.assertIs(remaining.hosted, second)
        self.assertTrue(self.reading(secondTransport))
        self.assertNotIn("requestDone", vars(second.wrappedProtocol._channel))

    def test_closedForgotten(self) -> None:
        """
        A connection that closed while watched is forgotten.
        """
        busy, transport = self.connect()
        busy.wrappedProtocol.dataReceived(_GET)
        watch = SafePointWatch([("a", busy)])
        transport.disconnected = 1
        self.assertEqual(watch.takeReady(), [])
        self.assertEqual(watch.waiting, [])


class HoldReadingTests(SynchronousTestCase):
    """
    L{holdReading} keeps a connection from reading, whatever its protocol
    asks, until let go.
    """

    def test_resumeRemembered(self) -> None:
        """
        A C{resumeProducing} while held is carried out when let go.
        """
        reactor = MemoryReactorClock()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        transport = _Connection(ours, Protocol(), reactor)
        transport.connected = 1
        transport.startReading()
        held = holdReading(transport)
        self.assertNotIn(transport, reactor.getReaders())
        transport.pauseProducing()
        transport.resumeProducing()
        self.assertNotIn(transport, reactor.getReaders())
        held.letGo()
        self.assertIn(transport, reactor.getReaders())
        self.assertNotIn("startReading", vars(transport))

    def test_pauseRemembered(self) -> None:
        """
        A C{pauseProducing} while held is honoured when let go.
        """
        reactor = MemoryReactorClock()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        transport = _Connection(ours, Protocol(), reactor)
        transport.connected = 1
        transport.startReading()
        held = holdReading(transport)
        transport.pauseProducing()
        held.letGo()
        self.assertNotIn(transport, reactor.getReaders())
