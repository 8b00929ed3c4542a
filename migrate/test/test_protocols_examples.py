"""
Tests for L{migrate.examples.protocols}: protocols that are not
C{LineReceiver}s, moved mid-message with L{migrate.testing.roundTrip}.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from migrate.examples import protocols
from migrate.interfaces import IMigratable
from migrate.state import RestoreError, StateError
from migrate.testing import roundTrip

_PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def connect(factory: Any) -> tuple[Any, StringTransport]:
    """
    Connect a protocol of C{factory} to a L{StringTransport}.
    """
    protocol = factory.buildProtocol(_PEER)
    transport = StringTransport(peerAddress=_PEER)
    protocol.makeConnection(transport)
    return protocol, transport


def built(factory: Any) -> Any:
    """
    A protocol of C{factory}, not connected.
    """
    return factory.buildProtocol(_PEER)


def frame(data: bytes) -> bytes:
    """
    @return: C{data} with its 32-bit length prefix.
    """
    return struct.pack("!I", len(data)) + data


def ask(tag: bytes, value: int) -> bytes:
    """
    @return: an L{protocols.Add} request box, serialised.
    """
    box = amp.AmpBox({b"_command": b"Add", b"_ask": tag, b"value": b"%d" % (value,)})
    serialised: bytes = box.serialize()
    return serialised


class InterfaceTests(SynchronousTestCase):
    """
    Every example provides L{IMigratable}.
    """

    def test_interface(self) -> None:
        for factory in [
            protocols.frameCounterFactory(),
            protocols.tallyFactory(),
            protocols.fieldBlocksFactory(),
        ]:
            protocol, _ = connect(factory)
            self.assertTrue(verifyObject(IMigratable, protocol))


class FrameCounterTests(SynchronousTestCase):
    """
    Tests for L{protocols.FrameCounter}: migrate carries the half frame.
    """

    def test_halfFrameTravels(self) -> None:
        old, oldOut = connect(protocols.frameCounterFactory())
        old.dataReceived(frame(b"hello") + frame(b"world")[:6])
        self.assertEqual(oldOut.value(), frame(b"1: hello"))
        moved = roundTrip(old, protocols.frameCounterFactory())
        self.assertEqual(moved.state.appState, {"frames": 1})
        moved.protocol.dataReceived(frame(b"world")[6:])
        self.assertEqual(moved.transport.value(), frame(b"2: world"))

    def test_refusesBadState(self) -> None:
        new = built(protocols.frameCounterFactory())
        self.assertRaises(ValueError, new.restoreMigrationState, {"frames": "1"})
        self.assertRaises(ValueError, new.upgradeMigrationState, 2, {"frames": 1})


class TallyTests(SynchronousTestCase):
    """
    Tests for L{protocols.Tally}: the box being parsed travels, answers go
    out on the new transport, and a connection waiting for an answer stays.
    """

    def test_midBox(self) -> None:
        """
        Cut anywhere in a request, the new code completes it and answers
        with the running total.
        """
        request = ask(b"2", 7)
        for cut in range(len(request)):
            old, oldOut = connect(protocols.tallyFactory())
            old.dataReceived(ask(b"1", 5))
            self.assertEqual(
                amp.parseString(oldOut.value()),
                [amp.AmpBox({b"_answer": b"1", b"total": b"5"})],
            )
            old.dataReceived(request[:cut])
            moved = roundTrip(old, protocols.tallyFactory())
            moved.protocol.dataReceived(request[cut:])
            self.assertEqual(
                amp.parseString(moved.transport.value()),
                [amp.AmpBox({b"_answer": b"2", b"total": b"12"})],
                "cut at {}".format(cut),
            )
            # Losing the connection works: restore set up what AMP logs.
            moved.protocol.connectionLost(Failure(ConnectionDone()))

    def test_awaitingAnswerStays(self) -> None:
        """
        A connection on which this side awaits an answer is not moved.
        """
        old, _ = connect(protocols.tallyFactory())
        old.callRemote(protocols.Add, value=1)
        error = self.assertRaises(StateError, roundTrip, old, protocols.tallyFactory())
        self.assertIn("1 AMP requests await an answer", str(error))

    def test_refusesBadState(self) -> None:
        old, _ = connect(protocols.tallyFactory())
        for bad in [
            {"total": 1},
            {"total": 1, "parser": "elsewhere", "box": None, "key": None},
            {"total": 1, "parser": "key", "box": [["not base64!", ""]], "key": None},
        ]:
            new = built(protocols.tallyFactory())
            new.transport = StringTransport()
            self.assertRaises(ValueError, new.restoreMigrationState, bad)
        self.assertRaises(ValueError, old.upgradeMigrationState, 0, {})


class FieldBlocksTests(SynchronousTestCase):
    """
    Tests for L{protocols.FieldBlocks}: a hand-written parser carries its
    unparsed bytes and its partial block.
    """

    def test_midBlock(self) -> None:
        old, oldOut = connect(protocols.fieldBlocksFactory())
        old.dataReceived(b"A: 1\r\nB: 2\n\nC: 3\nD: ")
        self.assertEqual(oldOut.value(), b"2 fields\n")
        moved = roundTrip(old, protocols.fieldBlocksFactory())
        self.assertEqual(
            moved.state.appState,
            {"unparsed": "RDog", "fields": [["C", "3"]], "blocks": 1},
        )
        moved.protocol.dataReceived(b"4\n\n")
        self.assertEqual(moved.transport.value(), b"2 fields\n")
        self.assertEqual(moved.protocol.blocks, 2)

    def test_refusesBadState(self) -> None:
        old, _ = connect(protocols.fieldBlocksFactory())
        old.dataReceived(b"A")
        for bad in [
            {"unparsed": "QQ==", "fields": [["A"]], "blocks": 0},
            {"unparsed": "QQ==", "fields": [], "blocks": 0, "more": 1},
        ]:
            new = built(protocols.fieldBlocksFactory())
            self.assertRaises(ValueError, new.restoreMigrationState, bad)

        class Newer(protocols.FieldBlocks):
            migrationVersion = 2

        factory = protocols.fieldBlocksFactory()
        factory.protocol = Newer
        self.assertRaises(RestoreError, roundTrip, old, factory)
