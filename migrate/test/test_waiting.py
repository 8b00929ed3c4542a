"""
Tests for L{migrate._handoff._waiting}: which moved connections a
successor serves first, on real loopback and Unix sockets.
"""

from __future__ import annotations

import select
import socket
import sys
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .._handoff import _waiting
from .._handoff._waiting import lastArrivalAge, servingOrder
from ._sockets import LoopbackConnections, waitReadable


class _Transport:
    """
    What L{servingOrder} and L{lastArrivalAge} use of a Twisted transport:
    its descriptor and its socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def fileno(self) -> int:
        return self.socket.fileno()


class _Held:
    """
    Stands in for L{migrate._handoff._movement.AdoptedConnection}.
    """

    def __init__(self, name: str, transport: Any, work: bool = False) -> None:
        self.name = name
        self.transport = transport
        self.work = work

    def hasWork(self) -> bool:
        return self.work

    def __repr__(self) -> str:
        return "<{}>".format(self.name)


def _waitForAge(case: SynchronousTestCase, transport: Any, milliseconds: float) -> None:
    """
    Wait (at most ten seconds) until the kernel says the newest bytes on
    C{transport} arrived at least C{milliseconds} ago.
    """
    deadline = time.monotonic() + 10
    while (lastArrivalAge(transport) or 0) < milliseconds:
        case.assertLess(time.monotonic(), deadline, "the kernel's clock")
        select.select([], [], [], 0.005)


class _Connections:
    """
    Loopback TCP connections: the server ends held, the client ends to
    send on.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.loopback = LoopbackConnections(case)

    def connect(self, name: str, work: bool = False) -> tuple[_Held, socket.socket]:
        server, client = self.loopback.connect()
        return _Held(name, _Transport(server), work), client


def _names(connections: list[_Held]) -> list[str]:
    return [each.name for each in connections]


class ServingOrderTests(SynchronousTestCase):
    """
    L{servingOrder} puts first the connections whose clients wait, the
    longest-waiting first, and leaves the others for later.
    """

    def test_waitingFirst(self) -> None:
        """
        A connection with bytes to read is served at once; the quiet ones
        are left for later, in the order given.
        """
        connections = _Connections(self)
        a, _ = connections.connect("a")
        b, bClient = connections.connect("b")
        c, _ = connections.connect("c")
        bClient.sendall(b"request\n")
        waitReadable(b.transport.socket)
        waiting, quiet = servingOrder([a, b, c])
        self.assertEqual((_names(waiting), _names(quiet)), (["b"], ["a", "c"]))

    def test_nothingWaiting(self) -> None:
        """
        With nothing to read anywhere, every connection is left for later.
        """
        connections = _Connections(self)
        held = [connections.connect(name)[0] for name in "abc"]
        self.assertEqual(servingOrder(held), ([], held))

    def test_longestWaitingFirst(self) -> None:
        """
        Of the connections with bytes to read, the one whose newest bytes
        arrived longest ago comes first; one whose age is unknown comes
        before them.
        """
        connections = _Connections(self)
        held = []
        for name in "abc":
            each, client = connections.connect(name)
            client.sendall(b"request\n")
            waitReadable(each.transport.socket)
            held.append(each)
        ages = {"a": 5.0, "b": 9.0, "c": None}
        waiting, quiet = servingOrder(
            held, age=lambda transport: ages[_nameOf(held, transport)]
        )
        self.assertEqual((_names(waiting), quiet), (["c", "b", "a"], []))

    def test_kernelAge(self) -> None:
        """
        By default the age is the kernel's (L{lastArrivalAge}): a client
        that sent a tick of the kernel's clock earlier than another is
        served first, although given last.
        """
        connections = _Connections(self)
        older, olderClient = connections.connect("older")
        newer, newerClient = connections.connect("newer")
        olderClient.sendall(b"first\n")
        waitReadable(older.transport.socket)
        _waitForAge(self, older.transport, 20)
        newerClient.sendall(b"second\n")
        waitReadable(newer.transport.socket)
        self.assertEqual(_names(servingOrder([newer, older])[0]), ["older", "newer"])

    if sys.platform != "linux":
        test_kernelAge.skip = "TCP_INFO is read on Linux only"  # type: ignore[attr-defined]

    def test_hangUp(self) -> None:
        """
        A connection its client closed without sending anything while it
        was held is served at once, after those with a request however
        old its close: there is only an end to read.
        """
        connections = _Connections(self)
        quiet, _ = connections.connect("quiet")
        closed, closedClient = connections.connect("closed")
        asking, askingClient = connections.connect("asking")
        closedClient.close()
        waitReadable(closed.transport.socket)
        askingClient.sendall(b"request\n")
        waitReadable(asking.transport.socket)
        waiting, others = servingOrder(
            [quiet, closed, asking], age=lambda transport: 0.0
        )
        self.assertEqual(
            (_names(waiting), _names(others)), (["asking", "closed"], ["quiet"])
        )

    def test_requestThenHangUp(self) -> None:
        """
        A client that sent a request, then closed, is served with those
        waiting for an answer, by its age.
        """
        connections = _Connections(self)
        early, earlyClient = connections.connect("early")
        late, lateClient = connections.connect("late")
        lateClient.sendall(b"request\n")
        lateClient.close()
        earlyClient.sendall(b"request\n")
        waitReadable(early.transport.socket)
        waitReadable(late.transport.socket)
        held = [early, late]
        ages = {"early": 1.0, "late": 5.0}
        waiting, _ = servingOrder(
            held, age=lambda transport: ages[_nameOf(held, transport)]
        )
        self.assertEqual(_names(waiting), ["late", "early"])

    def test_work(self) -> None:
        """
        A connection with nothing to read but work of its own (output to
        send, buffered input) is served at once, before those with bytes
        to read.
        """
        connections = _Connections(self)
        a, aClient = connections.connect("a")
        b, _ = connections.connect("b", work=True)
        c, _ = connections.connect("c")
        aClient.sendall(b"request\n")
        waitReadable(a.transport.socket)
        waiting, quiet = servingOrder([a, b, c])
        self.assertEqual((_names(waiting), _names(quiet)), (["b", "a"], ["c"]))

    def test_pollFails(self) -> None:
        """
        If asking the kernel fails, every connection is served at once, in
        the order given, and the failure is logged.
        """

        class Broken:
            def register(self, *args: Any) -> None:
                pass

            def poll(self, timeout: int) -> Any:
                raise OSError("no poll today")

        connections = _Connections(self)
        held = [connections.connect(name)[0] for name in "ab"]
        self.patch(_waiting.select, "poll", Broken)
        self.assertEqual(servingOrder(held), (held, []))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_oddDescriptors(self) -> None:
        """
        A connection whose descriptor is not a plain number, or the same
        as another's, is served at once, first.
        """

        class Odd:
            def __init__(self, descriptor: Any) -> None:
                self.descriptor = descriptor

            def fileno(self) -> Any:
                return self.descriptor

        connections = _Connections(self)
        a, _ = connections.connect("a")
        text = _Held("text", Odd(str(a.transport.fileno())))
        same = _Held("same", Odd(a.transport.fileno()))
        waiting, quiet = servingOrder([a, text, same])
        self.assertEqual((_names(waiting), _names(quiet)), (["text", "same"], ["a"]))

    def test_unixSocket(self) -> None:
        """
        A Unix connection with bytes to read is served at once, its age
        unknown.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.sendall(b"request\n")
        held = _Held("unix", _Transport(ours))
        self.assertIsNone(lastArrivalAge(held.transport))
        self.assertEqual(servingOrder([held]), ([held], []))

    def test_noDescriptor(self) -> None:
        """
        A connection whose descriptor cannot be had is served at once,
        first.
        """

        class Closed:
            def fileno(self) -> int:
                raise ValueError("closed")

        connections = _Connections(self)
        a, aClient = connections.connect("a")
        aClient.sendall(b"request\n")
        waitReadable(a.transport.socket)
        gone = _Held("gone", Closed())
        self.assertEqual(_names(servingOrder([a, gone])[0]), ["gone", "a"])


def _nameOf(held: list[_Held], transport: Any) -> str:
    for each in held:
        if each.transport is transport:
            return each.name
    raise KeyError(transport)


class LastArrivalAgeTests(SynchronousTestCase):
    """
    L{lastArrivalAge} reads the kernel's time since the newest bytes
    arrived.
    """

    if sys.platform != "linux":
        skip = "TCP_INFO is read on Linux only"

    def test_tcp(self) -> None:
        """
        For a TCP connection, the age grows from the arrival of the
        newest bytes, in milliseconds.
        """
        connections = _Connections(self)
        held, client = connections.connect("a")
        before = time.monotonic()
        client.sendall(b"request\n")
        waitReadable(held.transport.socket)
        _waitForAge(self, held.transport, 30)
        age = lastArrivalAge(held.transport)
        assert age is not None
        # The kernel counts in ticks (up to 10 ms each).
        self.assertLessEqual(age, (time.monotonic() - before) * 1000 + 10)

    def test_notTCP(self) -> None:
        """
        Without a socket, or for a socket that is not TCP, the age is
        unknown.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.assertIsNone(lastArrivalAge(_Transport(ours)))
        self.assertIsNone(lastArrivalAge(object()))
