"""
Tests for the kernel's arrival stamps on the benchmark clients' reads
(L{migrate.bench._arrival}), on real loopback sockets.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from typing import Any

from twisted.internet import main
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ..bench._arrival import stampArrivals
from ._sockets import LoopbackConnections, waitReadable


class _TransportLike:
    """
    The parts of a Twisted TCP transport that L{stampArrivals} uses, over a
    real socket, recording what reaches the protocol.
    """

    bufferSize = 65536

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.received: list[bytes] = []

    def doRead(self) -> Any:
        raise AssertionError("the original doRead must have been replaced")

    def _dataReceived(self, data: bytes) -> Any:
        self.received.append(data)
        return main.CONNECTION_DONE if not data else None


def _connectedPair(case: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """
    Two ends of a loopback TCP connection, non-blocking on the reading
    end, closed at the end of the test.
    """
    reader, writer = LoopbackConnections(case).connect()
    reader.setblocking(False)
    return reader, writer


class StampArrivalsTests(SynchronousTestCase):
    """
    L{stampArrivals} times each read by the kernel's arrival stamp.
    """

    if sys.platform != "linux":
        skip = "arrival stamps are read on Linux only"

    def stamped(self) -> tuple[_TransportLike, socket.socket, list[float | None]]:
        """
        A stamped connection, once the kernel stamps what arrives on it:
        the first socket to ask turns the stamping on for the whole
        system, and the kernel does that a little later (a deferred work
        item), so the first segments may come without stamps.

        @return: the reading transport, the writing socket, and the list
            of stamps its reads report (empty).
        """
        reader, writer = _connectedPair(self)
        transport = _TransportLike(reader)
        stamps: list[float | None] = []
        self.assertTrue(stampArrivals(transport, stamps.append))
        deadline = time.monotonic() + 10
        while not stamps or stamps[-1] is None:
            self.assertLess(time.monotonic(), deadline, "no stamp within 10 s")
            writer.sendall(b".")
            waitReadable(reader)
            transport.doRead()
        del stamps[:]
        del transport.received[:]
        return transport, writer, stamps

    def test_stampIsArrivalNotRead(self) -> None:
        """
        The stamp handed over with a read is when the bytes arrived: after
        the send began and before the read, not the read's own time; the
        bytes reach the protocol unchanged.
        """
        transport, writer, stamps = self.stamped()
        before = time.time()
        writer.sendall(b"hello\n")
        waitReadable(transport.socket)
        readAt = time.time()
        self.assertIsNone(transport.doRead())
        self.assertEqual(transport.received, [b"hello\n"])
        (stamp,) = stamps
        assert stamp is not None
        self.assertTrue(before <= stamp <= readAt, (before, stamp, readAt))

    def test_latestSegmentStamped(self) -> None:
        """
        A read that takes two segments is stamped with the later one's
        arrival: no line is timed earlier than it arrived.
        """
        transport, writer, stamps = self.stamped()
        writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.sendall(b"one\n")
        waitReadable(transport.socket)
        between = time.time()
        writer.sendall(b"two\n")
        deadline = time.monotonic() + 10
        while transport.socket.recv(16, socket.MSG_PEEK) != b"one\ntwo\n":
            self.assertLess(time.monotonic(), deadline, "the second segment")
            waitReadable(transport.socket)
        readAt = time.time()
        transport.doRead()
        self.assertEqual(transport.received, [b"one\ntwo\n"])
        (stamp,) = stamps
        assert stamp is not None
        self.assertTrue(between <= stamp <= readAt, (between, stamp, readAt))

    def test_nothingToRead(self) -> None:
        """
        A read that would block hands nothing over and reports nothing.
        """
        transport, writer, stamps = self.stamped()
        self.assertIsNone(transport.doRead())
        self.assertEqual((transport.received, stamps), ([], []))

    def test_endOfStream(self) -> None:
        """
        The peer's close reaches the transport as an empty read, as with
        C{recv}.
        """
        transport, writer, stamps = self.stamped()
        writer.close()
        waitReadable(transport.socket)
        self.assertIs(transport.doRead(), main.CONNECTION_DONE)
        self.assertEqual(transport.received, [b""])

    def test_reset(self) -> None:
        """
        A reset connection is lost, as C{doRead} reports it.
        """
        transport, writer, stamps = self.stamped()
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        waitReadable(transport.socket)
        self.assertIs(transport.doRead(), main.CONNECTION_LOST)
        self.assertEqual(transport.received, [])


class NoStampTests(SynchronousTestCase):
    """
    Where there is nothing to stamp, the transport is left as it was.
    """

    def test_noSocket(self) -> None:
        """
        A transport without a socket (a test's L{StringTransport}) is not
        stamped.
        """
        transport = StringTransport()
        self.assertFalse(stampArrivals(transport, lambda stamp: None))
        self.assertNotIn("doRead", vars(transport))

    def test_optionRefused(self) -> None:
        """
        A socket that refuses the option is read as before.
        """

        class Refusing:
            def recvmsg(self, *args: Any) -> Any:
                raise AssertionError("not to be used")

            def setsockopt(self, *args: Any) -> None:
                raise OSError("not supported")

        transport = _TransportLike(Refusing())  # type: ignore[arg-type]
        self.assertFalse(stampArrivals(transport, lambda stamp: None))
        self.assertNotIn("doRead", vars(transport))
