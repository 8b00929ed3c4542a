"""
Tests for L{migrate.state}, protocol-state persistence.
"""

from __future__ import annotations

import gc
import struct
import weakref
from typing import Any, ClassVar

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import basic
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from migrate import state as state_
from migrate._codec import MAX_DEPTH, StateError, decodeState, encodeState
from migrate.interfaces import IMigratable
from migrate.state import (
    ProtocolState,
    RestoreError,
    StateFingerprint,
    captureProtocolState,
    hasBufferedInput,
    isMigratable,
    replayBufferedInput,
    restoreProtocolState,
    unchangedSince,
)
from migrate.test.test_codec import _depth, _nested, plainData

_EXAMPLES = settings(max_examples=200, deadline=None)


# Protocols built on each of Twisted's base protocols, recording what they
# receive.


class Lines(basic.LineReceiver):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.raw: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.received.append(line)

    def rawDataReceived(self, data: bytes) -> None:
        self.raw.append(data)


class OnlyLines(basic.LineOnlyReceiver):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.received.append(line)


class _Strings:
    received: list[bytes]
    pauseAfter: int | None = None

    def stringReceived(self, string: bytes) -> None:
        self.received.append(string)
        if len(self.received) == self.pauseAfter:
            self.pauseProducing()  # type: ignore[attr-defined]


class Strings32(_Strings, basic.Int32StringReceiver):
    def __init__(self) -> None:
        self.received = []


class Strings16(_Strings, basic.Int16StringReceiver):
    def __init__(self) -> None:
        self.received = []


class Strings8(_Strings, basic.Int8StringReceiver):
    def __init__(self) -> None:
        self.received = []


class Netstrings(basic.NetstringReceiver):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def stringReceived(self, string: bytes) -> None:
        self.received.append(string)


def connected(cls: type[Protocol]) -> Any:
    """
    @return: a protocol of class C{cls}, connected to a L{StringTransport}
        as the reactor would connect it (the old side).
    """
    protocol = cls()
    protocol.makeConnection(StringTransport())
    return protocol


def fresh(cls: type[Protocol]) -> Any:
    """
    @return: a protocol of class C{cls} as a strategy makes it on the new
        side: transport and factory set, C{makeConnection} not called.
    """
    protocol = cls()
    protocol.factory = Factory()
    protocol.transport = StringTransport()
    return protocol


def transfer(state: ProtocolState) -> ProtocolState:
    """
    @return: C{state} after a trip through the plain form and the codec, as
        between two processes.
    """
    return ProtocolState.fromPlain(decodeState(encodeState(state.toPlain())))


def move(old: Protocol, newClass: type[Protocol]) -> Any:
    """
    Carry C{old}'s state to a new protocol of class C{newClass}, restore
    it and replay its buffered input.

    @return: the new protocol.
    """
    state = transfer(captureProtocolState(old))
    new = fresh(newClass)
    restoreProtocolState(new, state)
    replayBufferedInput(new)
    return new


class _BaseProtocolTestsMixin:
    """
    Tests for carrying one base protocol's buffer.

    @cvar protocolClass: a protocol class recording what it receives in
        C{received}.
    @cvar kind: the key of its buffer in L{ProtocolState.buffers}.
    """

    protocolClass: ClassVar[type[Protocol]]
    kind: ClassVar[str]

    def frame(self, message: bytes) -> bytes:
        """
        @return: C{message} as the protocol receives it.
        """
        raise NotImplementedError()

    def test_halfMessageCompletes(self: Any) -> None:
        """
        A message received in part by the old protocol is completed by the
        new one, wherever it was cut: exactly one message is delivered, by
        the new side.
        """
        data = self.frame(b"hello")
        for cut in range(1, len(data)):
            old = connected(self.protocolClass)
            old.dataReceived(data[:cut])
            new = move(old, self.protocolClass)
            self.assertEqual(new.received, [])
            new.dataReceived(data[cut:])
            self.assertEqual((old.received, new.received), ([], [b"hello"]))

    def test_completeThenHalf(self: Any) -> None:
        """
        Messages completed on the old side stay there; the half one after
        them completes on the new side.
        """
        first, second = self.frame(b"one"), self.frame(b"two")
        old = connected(self.protocolClass)
        old.dataReceived(first + second[:2])
        new = move(old, self.protocolClass)
        new.dataReceived(second[2:] + self.frame(b"three"))
        self.assertEqual(old.received, [b"one"])
        self.assertEqual(new.received, [b"two", b"three"])

    def test_bufferCaptured(self: Any) -> None:
        """
        The buffer is captured under the base class's name, as the bytes
        still to parse.
        """
        data = self.frame(b"hello")[:3]
        old = connected(self.protocolClass)
        old.dataReceived(data)
        state = captureProtocolState(old)
        self.assertEqual(list(state.buffers), [self.kind])
        self.assertEqual(state.buffers[self.kind]["buffer"], data)
        self.assertFalse(state.migratable)
        self.assertIsNone(state.version)
        self.assertIsNone(state.appState)

    def test_emptyBuffer(self: Any) -> None:
        """
        A protocol with nothing buffered, connected or not, has an empty
        buffer; the new side works from there.
        """
        for old in [connected(self.protocolClass), self.protocolClass()]:
            state = captureProtocolState(old)
            self.assertEqual(state.buffers[self.kind]["buffer"], b"")
            new = move(old, self.protocolClass)
            new.dataReceived(self.frame(b"hi"))
            self.assertEqual(new.received, [b"hi"])

    def test_completeMessagesReplayed(self: Any) -> None:
        """
        Complete messages sitting in a restored buffer are delivered by
        L{replayBufferedInput}, and only by it.
        """
        data = self.frame(b"a") + self.frame(b"b") + self.frame(b"cc")[:2]
        state = ProtocolState("Old", False, None, None, {self.kind: self.saved(data)})
        new = fresh(self.protocolClass)
        restoreProtocolState(new, transfer(state))
        self.assertEqual(new.received, [])
        replayBufferedInput(new)
        self.assertEqual(new.received, [b"a", b"b"])
        replayBufferedInput(new)
        self.assertEqual(new.received, [b"a", b"b"])
        new.dataReceived(self.frame(b"cc")[2:])
        self.assertEqual(new.received, [b"a", b"b", b"cc"])

    def test_hasBufferedInput(self: Any) -> None:
        """
        L{hasBufferedInput} says whether a restored protocol's buffer holds
        bytes not parsed yet, the start of a message included.
        """
        for data, expected in [
            (self.frame(b"a"), True),
            (self.frame(b"cc")[:2], True),
            (b"", False),
        ]:
            state = ProtocolState(
                "Old", False, None, None, {self.kind: self.saved(data)}
            )
            new = fresh(self.protocolClass)
            restoreProtocolState(new, transfer(state))
            self.assertIs(hasBufferedInput(new), expected, data)

    def saved(self, data: bytes) -> dict[str, Any]:
        """
        @return: the saved buffer values holding C{data}.
        """
        return {"buffer": data}

    def test_replayEmptyDoesNothing(self: Any) -> None:
        """
        With nothing buffered, L{replayBufferedInput} does not call the
        parser at all.
        """
        calls = []
        for base in type.mro(self.protocolClass):
            if base.__module__ == basic.__name__ and "dataReceived" in vars(base):
                self.patch(
                    base, "dataReceived", lambda protocol, data: calls.append(data)
                )
        old = connected(self.protocolClass)
        old.dataReceived(self.frame(b"x"))
        self.assertEqual(calls, [self.frame(b"x")])
        del calls[:]
        new = move(old, self.protocolClass)
        replayBufferedInput(new)
        self.assertEqual(calls, [])

    def test_homelessBytesRefused(self: Any) -> None:
        """
        Restoring buffered bytes into a class that no longer inherits from
        the base protocol that held them is refused (they would be lost);
        an empty buffer is simply dropped.
        """
        old = connected(self.protocolClass)
        old.dataReceived(self.frame(b"hello")[:2])
        state = captureProtocolState(old)
        error = self.assertRaises(
            RestoreError, restoreProtocolState, fresh(Protocol), state
        )
        self.assertIn("twisted.internet.protocol.Protocol", str(error))
        self.assertIn(f"not a {self.kind}", str(error))
        self.assertIn("2 bytes", str(error))
        empty = captureProtocolState(connected(self.protocolClass))
        restoreProtocolState(fresh(Protocol), empty)

    def test_homelessBytesRefusedBesideOtherKind(self: Any) -> None:
        """
        Buffered bytes are refused as lost also when the new class has as
        many base protocols of its own as the state has buffers (here one,
        which it restores from its initial values).
        """
        old = connected(self.protocolClass)
        old.dataReceived(self.frame(b"hello")[:2])
        state = captureProtocolState(old)
        other = OnlyLines if self.protocolClass is not OnlyLines else Netstrings
        error = self.assertRaises(
            RestoreError, restoreProtocolState, fresh(other), state
        )
        self.assertIn(f"not a {self.kind}", str(error))
        self.assertIn("2 bytes", str(error))

    def test_notBytesRefused(self: Any) -> None:
        """
        A buffer that is not C{bytes} (an application wrote to it) is
        refused at capture.
        """
        old = connected(self.protocolClass)
        for name in ["_buffer", "_unprocessed", "_remainingData"]:
            if hasattr(old, name):
                setattr(old, name, "text")
        error = self.assertRaises(StateError, captureProtocolState, old)
        self.assertIn("str, not bytes", str(error))


class LineReceiverTests(_BaseProtocolTestsMixin, SynchronousTestCase):
    """
    Carrying a L{basic.LineReceiver}'s buffer and mode.
    """

    protocolClass = Lines
    kind = "LineReceiver"

    def frame(self, message: bytes) -> bytes:
        return message + b"\r\n"

    def saved(self, data: bytes) -> dict[str, Any]:
        return {"buffer": data, "lineMode": True}

    def test_captureWhileBusyRefused(self) -> None:
        """
        Capturing a L{basic.LineReceiver} from inside its C{dataReceived}
        raises L{StateError}: its buffer is not consistent then.
        """
        errors = []

        class Capturing(Lines):
            def lineReceived(self, line: bytes) -> None:
                errors.append(self.capture())

            def capture(self) -> Exception | None:
                try:
                    captureProtocolState(self)
                except StateError as e:
                    return e
                return None

        protocol = connected(Capturing)
        protocol.dataReceived(b"a\r\nb")
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0], StateError)
        self.assertIn("inside dataReceived", str(errors[0]))
        self.assertIn("Capturing", str(errors[0]))
        self.assertIsInstance(protocol.capture(), type(None))

    def test_modeCaptured(self) -> None:
        """
        The mode is captured as a C{bool}.
        """
        old = connected(Lines)
        self.assertEqual(
            captureProtocolState(old).buffers["LineReceiver"]["lineMode"], True
        )
        old.setRawMode()
        self.assertEqual(
            captureProtocolState(old).buffers["LineReceiver"]["lineMode"], False
        )

    def test_rawModeCarried(self) -> None:
        """
        A protocol in raw mode is still in raw mode on the new side.
        """
        old = connected(Lines)
        old.setRawMode()
        new = move(old, Lines)
        self.assertEqual(new.line_mode, 0)
        new.dataReceived(b"raw\r\n")
        self.assertEqual((new.raw, new.received), ([b"raw\r\n"], []))

    def test_lineModeCarried(self) -> None:
        """
        Line mode is restored as line mode even onto a class whose default
        is raw mode.
        """

        class RawByDefault(Lines):
            line_mode = 0

        new = move(connected(Lines), RawByDefault)
        self.assertEqual(new.line_mode, 1)
        new.dataReceived(b"x\r\n")
        self.assertEqual(new.received, [b"x"])

    def test_pausedLinesReplayed(self) -> None:
        """
        Lines held back while the old protocol was paused are delivered
        by the new one on replay.
        """
        old = connected(Lines)
        old.pauseProducing()
        old.dataReceived(b"a\r\nb\r\nc")
        self.assertEqual(old.received, [])
        new = move(old, Lines)
        self.assertEqual(new.received, [b"a", b"b"])
        new.dataReceived(b"\r\n")
        self.assertEqual(new.received, [b"a", b"b", b"c"])

    def test_pausedRawDataReplayed(self) -> None:
        """
        Raw data held back while paused is delivered on replay.
        """
        old = connected(Lines)
        old.setRawMode()
        old.pauseProducing()
        old.dataReceived(b"abc")
        new = move(old, Lines)
        self.assertEqual(new.raw, [b"abc"])

    def test_replayRespectsPause(self) -> None:
        """
        A protocol that paused itself while being restored keeps its lines
        until it resumes.
        """

        @implementer(IMigratable)
        class PausingLines(Lines):
            migrationVersion = 1

            def getMigrationState(self) -> Any:
                return None

            def restoreMigrationState(self, state: Any) -> None:
                self.pauseProducing()

            def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
                return state

        old = connected(PausingLines)
        old.pauseProducing()
        old.dataReceived(b"a\r\n")
        new = move(old, PausingLines)
        self.assertEqual(new.received, [])
        new.resumeProducing()
        self.assertEqual(new.received, [b"a"])

    def test_replayBypassesOverride(self) -> None:
        """
        Buffered bytes already went through the protocol's own
        C{dataReceived}: replay does not pass them through it again.
        """
        seen = []

        class Counting(Lines):
            def dataReceived(self, data: bytes) -> None:
                seen.append(data)
                super().dataReceived(data)

        old = connected(Counting)
        old.pauseProducing()
        old.dataReceived(b"a\r\n")
        new = move(old, Counting)
        self.assertEqual(new.received, [b"a"])
        self.assertEqual(seen, [b"a\r\n"])

    def test_newLimitsApply(self) -> None:
        """
        The restored buffer is parsed against the new code's limits.
        """

        class Short(Lines):
            MAX_LENGTH = 4

        old = connected(Lines)
        old.pauseProducing()
        old.dataReceived(b"much too long\r\n")
        new = move(old, Short)
        self.assertEqual(new.received, [])
        self.assertTrue(new.transport.disconnecting)


class LineOnlyReceiverTests(_BaseProtocolTestsMixin, SynchronousTestCase):
    """
    Carrying a L{basic.LineOnlyReceiver}'s buffer.
    """

    protocolClass = OnlyLines
    kind = "LineOnlyReceiver"

    def frame(self, message: bytes) -> bytes:
        return message + b"\r\n"


class _IntNStringReceiverTestsMixin(_BaseProtocolTestsMixin):
    """
    Carrying an L{basic.IntNStringReceiver}'s buffer.
    """

    kind = "IntNStringReceiver"
    structFormat: ClassVar[str]

    def frame(self, message: bytes) -> bytes:
        return struct.pack(self.structFormat, len(message)) + message

    def test_captureWhileDeliveringRefused(self: Any) -> None:
        """
        Capturing from inside C{stringReceived} raises L{StateError}: the
        strings after it are still to be delivered by the old code.
        """
        errors = []

        class Capturing(self.protocolClass):
            def stringReceived(self, string: bytes) -> None:
                try:
                    captureProtocolState(self)
                except StateError as e:
                    errors.append(e)

        protocol = connected(Capturing)
        protocol.dataReceived(self.frame(b"a") + self.frame(b"b")[:1])
        self.assertEqual(len(errors), 1)
        self.assertIn("inside dataReceived", str(errors[0]))
        captureProtocolState(protocol)

    def test_pausedStringsReplayed(self: Any) -> None:
        """
        Strings held back by a pause are delivered by the new side.
        """
        old = connected(self.protocolClass)
        old.pauseAfter = 1
        old.dataReceived(self.frame(b"a") + self.frame(b"b") + self.frame(b"c"))
        self.assertEqual(old.received, [b"a"])
        new = move(old, self.protocolClass)
        self.assertEqual(new.received, [b"b", b"c"])


class Int32StringReceiverTests(_IntNStringReceiverTestsMixin, SynchronousTestCase):
    protocolClass = Strings32
    structFormat = "!I"


class Int16StringReceiverTests(_IntNStringReceiverTestsMixin, SynchronousTestCase):
    protocolClass = Strings16
    structFormat = "!H"


class Int8StringReceiverTests(_IntNStringReceiverTestsMixin, SynchronousTestCase):
    protocolClass = Strings8
    structFormat = "!B"


class NetstringReceiverTests(_BaseProtocolTestsMixin, SynchronousTestCase):
    """
    Carrying a L{basic.NetstringReceiver}'s partial netstring.
    """

    protocolClass = Netstrings
    kind = "NetstringReceiver"

    def frame(self, message: bytes) -> bytes:
        return b"%d:%s," % (len(message), message)

    def test_payloadPhaseCapturedAsReceived(self) -> None:
        """
        A netstring whose length is parsed and whose payload is in part
        received is captured as the bytes received.
        """
        old = connected(Netstrings)
        old.dataReceived(b"11:hello")
        old.dataReceived(b" wo")
        self.assertEqual(old._state, old._PARSING_PAYLOAD)
        state = captureProtocolState(old)
        self.assertEqual(state.buffers[self.kind]["buffer"], b"11:hello wo")

    def test_lastPayloadNotCaptured(self) -> None:
        """
        The payload of the last complete netstring, still in the parser,
        is not captured.
        """
        old = connected(Netstrings)
        old.dataReceived(b"5:hello,2")
        self.assertEqual(captureProtocolState(old).buffers[self.kind]["buffer"], b"2")

    def test_restoreIntoConnected(self) -> None:
        """
        A new protocol that did go through C{makeConnection} is restored
        too.
        """
        old = connected(Netstrings)
        old.dataReceived(b"5:he")
        new = connected(Netstrings)
        new.dataReceived(b"3:ab")
        restoreProtocolState(new, transfer(captureProtocolState(old)))
        new.dataReceived(b"llo,")
        self.assertEqual(new.received, [b"hello"])

    def test_parserSetUpWithoutOldBuffer(self) -> None:
        """
        A new netstring protocol restored from a protocol that was not one
        has a working parser although C{makeConnection} was not called.
        """
        new = move(connected(Lines), Netstrings)
        new.dataReceived(b"2:ok,")
        self.assertEqual(new.received, [b"ok"])

    def test_brokenPeerRefused(self) -> None:
        """
        A protocol that received an invalid netstring (its connection is
        being dropped) is refused.
        """
        old = connected(Netstrings)
        old.dataReceived(b"x:")
        self.assertTrue(old.brokenPeer)
        error = self.assertRaises(StateError, captureProtocolState, old)
        self.assertIn("invalid netstring", str(error))

    def test_inconsistentParserRefused(self) -> None:
        """
        A parser state that does not hang together is refused.
        """
        old = connected(Netstrings)
        old.dataReceived(b"5:he")
        old._currentPayloadSize = 9
        self.assertRaises(StateError, captureProtocolState, old)
        old._currentPayloadSize = 2
        old._payload = None
        self.assertRaises(StateError, captureProtocolState, old)

    def test_newLimitsApply(self) -> None:
        """
        The restored bytes are parsed against the new code's limits.
        """

        class Short(Netstrings):
            MAX_LENGTH = 5

        old = connected(Netstrings)
        old.dataReceived(b"10:abc")
        new = move(old, Short)
        self.assertTrue(new.brokenPeer)
        self.assertTrue(new.transport.disconnecting)


# Migratable protocols: version 1 and version 2 of a small chat.


@implementer(IMigratable)
class ChatV1(basic.LineReceiver):
    migrationVersion = 1

    def __init__(self) -> None:
        self.nick = "guest"
        self.rooms: Any = ["lobby"]
        self.received: list[bytes] = []
        self.calls: list[tuple[Any, ...]] = []

    def lineReceived(self, line: bytes) -> None:
        self.received.append(line)

    def getMigrationState(self) -> Any:
        return {"nick": self.nick, "rooms": self.rooms}

    def restoreMigrationState(self, state: Any) -> None:
        self.calls.append(("restore", state, self._buffer))
        self.nick = state["nick"]
        self.rooms = state["rooms"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        self.calls.append(("upgrade", fromVersion, state))
        return state


@implementer(IMigratable)
class ChatV2(ChatV1):
    migrationVersion = 2

    def restoreMigrationState(self, state: Any) -> None:
        self.calls.append(("restore", state, self._buffer))
        self.nick = state["name"]
        self.rooms = state["rooms"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        self.calls.append(("upgrade", fromVersion, state, self._buffer))
        if fromVersion != 1:
            raise ValueError(f"cannot read version {fromVersion}")
        return {"name": state["nick"], "rooms": state["rooms"]}


class NotMigratable(Lines):
    """
    Has the methods, but does not declare L{IMigratable}.
    """

    migrationVersion = 1
    calls: list[str] = []

    def getMigrationState(self) -> Any:
        self.calls.append("get")
        return {}

    def restoreMigrationState(self, state: Any) -> None:
        self.calls.append("restore")

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        self.calls.append("upgrade")
        return state


class MigratableTests(SynchronousTestCase):
    """
    Capturing and restoring the state of L{IMigratable} protocols.
    """

    def test_interface(self) -> None:
        """
        The test protocols provide L{IMigratable} faithfully.
        """
        verifyObject(IMigratable, ChatV1())
        verifyObject(IMigratable, ChatV2())

    def test_isMigratable(self) -> None:
        """
        L{isMigratable} is whether L{IMigratable} is provided, not whether
        the methods exist.
        """
        self.assertTrue(isMigratable(ChatV1()))
        self.assertFalse(isMigratable(NotMigratable()))
        self.assertFalse(isMigratable(Protocol()))
        self.assertFalse(isMigratable(None))

    def test_capture(self) -> None:
        """
        The application state and version are captured with the buffers
        and the class name.
        """
        old = connected(ChatV1)
        old.nick = "alice"
        old.dataReceived(b"hal")
        state = captureProtocolState(old)
        self.assertEqual(
            state,
            ProtocolState(
                className=f"{__name__}.ChatV1",
                migratable=True,
                version=1,
                appState={"nick": "alice", "rooms": ["lobby"]},
                buffers={"LineReceiver": {"buffer": b"hal", "lineMode": True}},
            ),
        )

    def test_captureCopies(self) -> None:
        """
        The captured state is a normalised copy: tuples become lists, and
        what the application changes later does not change it.
        """
        old = connected(ChatV1)
        old.rooms = ("lobby", ["x"])
        state = captureProtocolState(old)
        old.rooms[1].append("y")
        self.assertEqual(state.appState["rooms"], ["lobby", ["x"]])

    def test_captureNotPlainRefused(self) -> None:
        """
        Application state that is not plain data is refused with the class
        and the path named.
        """
        old = connected(ChatV1)
        old.rooms = ["a", "b", "c", {"d"}]
        error = self.assertRaises(StateError, captureProtocolState, old)
        self.assertIn(f"{__name__}.ChatV1.getMigrationState() returned", str(error))
        self.assertIn("state['rooms'][3]: set is not plain data", str(error))

    def test_captureDepthLeavesRoomForWrapper(self) -> None:
        """
        Application state may nest one level less than the codec allows, so
        that the whole L{ProtocolState} encodes within the default limits.
        """
        old = connected(ChatV1)
        old.rooms = _nested(MAX_DEPTH - 2)
        state = captureProtocolState(old)
        self.assertEqual(_depth(state.toPlain()), MAX_DEPTH)
        encodeState(state.toPlain())
        old.rooms = _nested(MAX_DEPTH - 1)
        self.assertRaises(StateError, captureProtocolState, old)

    def test_captureTooLargeRefused(self) -> None:
        """
        Application state beyond the size limit is refused.
        """
        old = connected(ChatV1)
        old.rooms = ["x" * (1 << 20)]
        error = self.assertRaises(StateError, captureProtocolState, old)
        self.assertIn("limit", str(error))

    def test_captureFailureWrapped(self) -> None:
        """
        An exception from C{getMigrationState} becomes a L{StateError}
        naming the class, with the original as its cause.
        """
        old = connected(ChatV1)
        failure = KeyError("oops")
        old.getMigrationState = lambda: (_ for _ in ()).throw(failure)
        error = self.assertRaises(StateError, captureProtocolState, old)
        self.assertIn("ChatV1.getMigrationState() failed", str(error))
        self.assertIn("KeyError('oops')", str(error))
        self.assertIs(error.__cause__, failure)

    def test_captureBadVersionRefused(self) -> None:
        """
        A C{migrationVersion} that is not an C{int} is refused.
        """
        for version in [True, "1", 1.0, None]:
            old = connected(ChatV1)
            old.migrationVersion = version
            error = self.assertRaises(StateError, captureProtocolState, old)
            self.assertIn("migrationVersion must be an int", str(error))

    def test_notMigratableCapture(self) -> None:
        """
        A protocol that does not declare L{IMigratable} has only its buffers
        captured; its methods are not called.
        """
        NotMigratable.calls = []
        old = connected(NotMigratable)
        old.dataReceived(b"x")
        state = captureProtocolState(old)
        self.assertEqual(
            (state.migratable, state.version, state.appState), (False, None, None)
        )
        self.assertEqual(state.buffers["LineReceiver"]["buffer"], b"x")
        self.assertEqual(NotMigratable.calls, [])

    def test_sameVersion(self) -> None:
        """
        With the same version, the state goes to C{restoreMigrationState}
        as it was, after the buffers are restored, and nothing is upgraded.
        """
        old = connected(ChatV1)
        old.nick = "alice"
        old.dataReceived(b"hel")
        new = move(old, ChatV1)
        self.assertEqual(
            new.calls,
            [("restore", {"nick": "alice", "rooms": ["lobby"]}, b"hel")],
        )
        new.dataReceived(b"lo\r\n")
        self.assertEqual((old.received, new.received), ([], [b"hello"]))

    def test_upgradeOnce(self) -> None:
        """
        From version 1 to version 2, C{upgradeMigrationState} is called
        exactly once, with C{fromVersion} 1 and the old state, before the
        buffers are restored; C{restoreMigrationState} gets its result.
        """
        old = connected(ChatV1)
        old.nick = "alice"
        old.dataReceived(b"hel")
        new = move(old, ChatV2)
        self.assertEqual(
            new.calls,
            [
                ("upgrade", 1, {"nick": "alice", "rooms": ["lobby"]}, b""),
                ("restore", {"name": "alice", "rooms": ["lobby"]}, b"hel"),
            ],
        )
        self.assertEqual(new.nick, "alice")
        new.dataReceived(b"lo\r\n")
        self.assertEqual(new.received, [b"hello"])

    def test_downgradeAlsoAsks(self) -> None:
        """
        Any difference of version goes through C{upgradeMigrationState},
        a lower one included.
        """
        new = fresh(ChatV1)
        restoreProtocolState(new, captureProtocolState(connected(ChatV2)))
        self.assertEqual(
            [call[:2] for call in new.calls],
            [("upgrade", 2), ("restore", {"nick": "guest", "rooms": ["lobby"]})],
        )

    def test_upgradeFailureWrapped(self) -> None:
        """
        An exception from C{upgradeMigrationState} becomes a
        L{RestoreError} naming the class, the versions and the original
        exception; nothing more is restored.
        """
        old = connected(ChatV1)
        old.migrationVersion = 7
        old.dataReceived(b"partial")
        new = fresh(ChatV2)
        error = self.assertRaises(
            RestoreError, restoreProtocolState, new, transfer(captureProtocolState(old))
        )
        self.assertIn(f"{__name__}.ChatV2.upgradeMigrationState()", str(error))
        self.assertIn("version 7", str(error))
        self.assertIn("cannot read version 7", str(error))
        self.assertIsInstance(error.__cause__, ValueError)
        self.assertEqual([call[0] for call in new.calls], ["upgrade"])
        self.assertEqual(new._buffer, b"")

    def test_restoreFailureWrapped(self) -> None:
        """
        An exception from C{restoreMigrationState} becomes a
        L{RestoreError} naming the class and the original exception.
        """
        old = connected(ChatV1)
        old.nick = None
        new = fresh(ChatV2)
        failure = RuntimeError("no nick")

        def restore(state: Any) -> None:
            raise failure

        new.restoreMigrationState = restore
        error = self.assertRaises(
            RestoreError, restoreProtocolState, new, captureProtocolState(old)
        )
        self.assertIn(f"{__name__}.ChatV2.restoreMigrationState() failed", str(error))
        self.assertIn("RuntimeError('no nick')", str(error))
        self.assertIs(error.__cause__, failure)

    def test_unprintableExceptionWrapped(self) -> None:
        """
        An application exception whose C{repr} fails is still wrapped.
        """

        class Unprintable(Exception):
            def __repr__(self) -> str:
                raise RuntimeError("no repr")

        new = fresh(ChatV1)

        def restore(state: Any) -> None:
            raise Unprintable()

        new.restoreMigrationState = restore
        error = self.assertRaises(
            RestoreError,
            restoreProtocolState,
            new,
            captureProtocolState(connected(ChatV1)),
        )
        self.assertIn("Unprintable (whose repr failed)", str(error))

    def test_restoreErrorIsStateError(self) -> None:
        """
        L{RestoreError} is a L{StateError}.
        """
        self.assertTrue(issubclass(RestoreError, StateError))

    def test_migratableStateIntoNotMigratableRefused(self) -> None:
        """
        Application state cannot be restored into a class that does not
        provide L{IMigratable}.
        """
        NotMigratable.calls = []
        error = self.assertRaises(
            RestoreError,
            restoreProtocolState,
            fresh(NotMigratable),
            captureProtocolState(connected(ChatV1)),
        )
        self.assertIn("does not provide IMigratable", str(error))
        self.assertEqual(NotMigratable.calls, [])

    def test_notMigratableStateRestoresBuffersOnly(self) -> None:
        """
        State without application state restores the buffers into a
        migratable class and calls nothing else.
        """
        old = connected(Lines)
        old.dataReceived(b"hel")
        new = move(old, ChatV2)
        self.assertEqual(new.calls, [])
        self.assertEqual(new.nick, "guest")
        new.dataReceived(b"lo\r\n")
        self.assertEqual(new.received, [b"hello"])

    def test_newVersionMustBeInt(self) -> None:
        """
        A new class whose C{migrationVersion} is not an C{int} is refused
        before any of its code runs.
        """
        new = fresh(ChatV2)
        new.migrationVersion = "2"
        error = self.assertRaises(
            RestoreError,
            restoreProtocolState,
            new,
            captureProtocolState(connected(ChatV1)),
        )
        self.assertIn("migrationVersion must be an int", str(error))
        self.assertEqual(new.calls, [])

    def test_stateNotChangedByApplication(self) -> None:
        """
        What the application does to the state it is given does not change
        the L{ProtocolState}.
        """
        state = captureProtocolState(connected(ChatV1))
        new = fresh(ChatV1)
        restoreProtocolState(new, state)
        new.rooms.append("changed")
        self.assertEqual(state.appState, {"nick": "guest", "rooms": ["lobby"]})

    def test_invalidBuffersRefused(self) -> None:
        """
        A L{ProtocolState} built by hand with malformed buffers is refused
        by L{restoreProtocolState} before anything is called.
        """
        for buffers in [
            {"Unknown": {"buffer": b""}},
            {"LineReceiver": {"buffer": "text", "lineMode": True}},
            {"LineReceiver": {"buffer": b""}},
            [],
        ]:
            new = fresh(ChatV1)
            state = ProtocolState("Old", True, 1, {}, buffers)  # type: ignore[arg-type]
            self.assertRaises(RestoreError, restoreProtocolState, new, state)
            self.assertEqual(new.calls, [])


# Hypothesis strategies for the plain form.

_buffers = st.fixed_dictionaries(
    {},
    optional={
        "LineReceiver": st.fixed_dictionaries(
            {"buffer": st.binary(max_size=50), "lineMode": st.booleans()}
        ),
        "LineOnlyReceiver": st.fixed_dictionaries({"buffer": st.binary(max_size=50)}),
        "IntNStringReceiver": st.fixed_dictionaries({"buffer": st.binary(max_size=50)}),
        "NetstringReceiver": st.fixed_dictionaries({"buffer": st.binary(max_size=50)}),
    },
)
protocolStates = st.builds(
    ProtocolState,
    className=st.text(),
    migratable=st.just(True),
    version=st.integers(-(2**63), 2**63),
    appState=plainData.filter(lambda value: _depth(value) < MAX_DEPTH),
    buffers=_buffers,
) | st.builds(
    ProtocolState,
    className=st.text(),
    migratable=st.just(False),
    version=st.none(),
    appState=st.none(),
    buffers=_buffers,
)


class _Hostile:
    """
    An object whose every special method raises, but for C{__hash__} (so
    that it can be a key).
    """

    def _raise(self, *args: object, **kwargs: object) -> Any:
        raise AssertionError("foreign code ran")

    __hash__ = object.__hash__
    __eq__ = __len__ = __iter__ = __bool__ = __repr__ = __str__ = _raise
    __index__ = __int__ = __float__ = __getitem__ = __contains__ = _raise


_anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.builds(_Hostile)
    | st.sampled_from(
        ["LineReceiver", "NetstringReceiver", "buffer", "lineMode", "QUJD", "=", ""]
    ),
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(
        st.text(max_size=10)
        | st.integers()
        | st.sampled_from(["buffer", "lineMode", "LineReceiver"]),
        children,
        max_size=4,
    )
    | st.frozensets(st.integers(), max_size=3),
    max_leaves=10,
)


def _plainBuffers(buffers: Any) -> Any:
    """
    @return: the plain form of C{buffers}.
    """
    return ProtocolState("", False, None, None, buffers).toPlain()["buffers"]


class ProtocolStateTests(SynchronousTestCase):
    """
    L{ProtocolState}'s plain form.
    """

    def test_frozen(self) -> None:
        """
        A L{ProtocolState} cannot be changed.
        """
        state = ProtocolState("C", False, None, None)
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError, setattr, state, "version", 1
        )
        self.assertEqual(state.buffers, {})

    def test_toPlain(self) -> None:
        """
        The plain form has the fields by name, and buffers in base64.
        """
        state = ProtocolState(
            "m.C",
            True,
            3,
            {"a": [1]},
            {"LineReceiver": {"buffer": b"\x00\xffhi", "lineMode": False}},
        )
        self.assertEqual(
            state.toPlain(),
            {
                "className": "m.C",
                "migratable": True,
                "version": 3,
                "appState": {"a": [1]},
                "buffers": {"LineReceiver": {"buffer": "AP9oaQ==", "lineMode": False}},
            },
        )

    @_EXAMPLES
    @given(protocolStates)
    def test_roundTrip(self, state: ProtocolState) -> None:
        """
        The plain form encodes within the codec's default limits and comes
        back equal.
        """
        self.assertEqual(transfer(state), state)
        self.assertEqual(ProtocolState.fromPlain(state.toPlain()), state)

    def assertRefused(self, plain: object, fragment: str = "") -> None:
        """
        Assert that L{ProtocolState.fromPlain} refuses C{plain} with a
        L{StateError} whose message contains C{fragment}.
        """
        error = self.assertRaises(StateError, ProtocolState.fromPlain, plain)
        self.assertIn(fragment, str(error))

    def valid(self, **changes: Any) -> dict[str, Any]:
        """
        @return: a valid plain form, with C{changes}.
        """
        plain = ProtocolState(
            "m.C",
            True,
            1,
            {"a": 1},
            {
                "LineReceiver": {"buffer": b"abc", "lineMode": True},
                "NetstringReceiver": {"buffer": b""},
            },
        ).toPlain()
        plain.update(changes)
        return plain

    def test_valid(self) -> None:
        """
        The plain form used below is valid.
        """
        ProtocolState.fromPlain(self.valid())

    def test_refusals(self) -> None:
        """
        Every deviation from the plain form is refused with L{StateError}.
        """
        self.assertRefused(None, "must be a dict")
        self.assertRefused([], "must be a dict")
        plain = self.valid()
        del plain["buffers"]
        self.assertRefused(plain, "missing buffers")
        self.assertRefused(self.valid(extra=1), "unexpected key 'extra'")
        withIntKey: dict[object, object] = {}
        withIntKey.update(self.valid())
        withIntKey[1] = 1
        self.assertRefused(withIntKey, "unexpected key of type int")
        self.assertRefused(self.valid(className=b"m.C"), "className")
        self.assertRefused(self.valid(migratable=1), "migratable")
        self.assertRefused(self.valid(version=True), "version")
        self.assertRefused(self.valid(version=1.0), "version")
        self.assertRefused(self.valid(version=None), "version")
        self.assertRefused(
            self.valid(appState={"a": {1, 2}}), "state['a']: set is not plain data"
        )
        self.assertRefused(self.valid(appState={1: 1}), "key of type int")
        self.assertRefused(self.valid(appState=_nested(MAX_DEPTH)), "nested deeper")
        self.assertRefused(self.valid(migratable=False), "must be None")
        self.assertRefused(self.valid(migratable=False, version=None), "must be None")
        self.assertRefused(self.valid(buffers=[]), "buffers must be a dict")
        self.assertRefused(
            self.valid(buffers={"Pickle": {"buffer": ""}}),
            "unknown buffer kind 'Pickle'",
        )
        self.assertRefused(
            self.valid(buffers={1: {"buffer": ""}}), "unknown buffer kind of type int"
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": "QUJD"}), "must be a dict"
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {}}), "missing 'buffer'"
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": "", "x": 1}}),
            "unexpected key 'x'",
        )
        self.assertRefused(
            self.valid(buffers={"LineReceiver": {"buffer": ""}}), "missing 'lineMode'"
        )
        self.assertRefused(
            self.valid(buffers={"LineReceiver": {"buffer": "", "lineMode": 1}}),
            "must be bool",
        )
        for text in ["QUJ", "QU=D", "QUJD\n", "Q\u00e9JD", "QR==", "====", "QUJD===="]:
            self.assertRefused(
                self.valid(buffers={"LineOnlyReceiver": {"buffer": text}}), "base64"
            )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": b"QUJD"}}), "base64 text"
        )

    def test_refusalsNameThePlace(self) -> None:
        """
        A refused buffer is named in full in the message, the key in it
        included.
        """
        self.assertRefused(
            self.valid(buffers={"LineReceiver": {"buffer": "", "lineMode": 1}}),
            "protocol state: buffers['LineReceiver']['lineMode'] must be bool, "
            "not int",
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": "QR=="}}),
            "protocol state: buffers['LineOnlyReceiver']['buffer'] is not "
            "canonical base64",
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": "QU=D"}}),
            "protocol state: buffers['LineOnlyReceiver']['buffer'] is not "
            "valid base64",
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": b""}}),
            "protocol state: buffers['LineOnlyReceiver']['buffer'] must be "
            "base64 text, not bytes",
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {}}),
            "protocol state: buffers['LineOnlyReceiver']: missing 'buffer'",
        )
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": []}),
            "protocol state: buffers['LineOnlyReceiver'] must be a dict, not list",
        )

    def test_emptyBuffer(self) -> None:
        """
        An empty buffer is the empty string, exactly: a C{str} subclass is
        refused, however empty.
        """

        class Text(str):
            pass

        state = ProtocolState.fromPlain(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": ""}})
        )
        self.assertEqual(state.buffers, {"LineOnlyReceiver": {"buffer": b""}})
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": Text("")}}),
            "must be base64 text, not ",
        )

    def test_withApplicationState(self) -> None:
        """
        L{ProtocolState.withApplicationState} gives the same state with
        another application state, checked as L{ProtocolState.fromPlain}
        checks one (copied unless owned); a state that is not migratable
        takes none.
        """
        state = ProtocolState.fromPlain(self.valid())
        new = {"rooms": ["a"]}
        changed = state.withApplicationState(new)
        self.assertEqual(changed, attrs.evolve(state, appState=new))
        self.assertIsNot(changed.appState, new)
        self.assertIs(state.withApplicationState(new, owned=True).appState, new)
        for appState, fragment in [
            (
                {"a": {1, 2}},
                "protocol state: appState: state['a']: set is not plain data",
            ),
            ({1: 1}, "key of type int"),
            (_nested(MAX_DEPTH), "nested deeper"),
            (_Hostile(), "protocol state: appState"),
        ]:
            for owned in (False, True):
                error = self.assertRaises(
                    StateError, state.withApplicationState, appState, owned=owned
                )
                self.assertIn(fragment, str(error))
        plain = ProtocolState.fromPlain(
            self.valid(migratable=False, version=None, appState=None)
        )
        error = self.assertRaises(StateError, plain.withApplicationState, {})
        self.assertIn("did not provide IMigratable", str(error))

    def test_hostileObjectsNotTouched(self) -> None:
        """
        Objects that raise from every special method are refused without
        any of their code running, wherever they are.
        """
        hostile = _Hostile()
        self.assertRefused(hostile)
        self.assertRefused({hostile: 1})
        for key in ["className", "migratable", "version", "appState", "buffers"]:
            self.assertRefused(self.valid(**{key: hostile}))
            self.assertRefused(self.valid(**{key: [hostile]}))
        self.assertRefused(self.valid(buffers={hostile: {}}))
        self.assertRefused(self.valid(buffers={"LineOnlyReceiver": {hostile: 1}}))
        self.assertRefused(
            self.valid(buffers={"LineOnlyReceiver": {"buffer": hostile}})
        )
        self.assertRefused(self.valid(appState={"a": {"b": hostile}}))

    @_EXAMPLES
    @given(_anything)
    def test_hostileValues(self, plain: object) -> None:
        """
        Random values are refused with L{StateError}, never anything else.
        """
        try:
            state = ProtocolState.fromPlain(plain)
        except StateError:
            return
        self.assertEqual(ProtocolState.fromPlain(state.toPlain()), state)

    @_EXAMPLES
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "className": _anything,
                "migratable": st.booleans() | _anything,
                "version": st.integers() | st.none() | _anything,
                "appState": plainData | _anything,
                "buffers": _buffers.map(_plainBuffers)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "LineReceiver",
                            "LineOnlyReceiver",
                            "IntNStringReceiver",
                            "NetstringReceiver",
                            "x",
                        ]
                    ),
                    st.dictionaries(
                        st.sampled_from(["buffer", "lineMode", "x"]),
                        _anything | st.text(alphabet="QUJD=+/a\n", max_size=8),
                        max_size=3,
                    ),
                    max_size=3,
                )
                | _anything,
            },
        )
    )
    def test_hostileFields(self, plain: dict[str, Any]) -> None:
        """
        Plain forms with random fields are accepted only when valid, and
        otherwise refused with L{StateError}, never anything else.
        """
        try:
            state = ProtocolState.fromPlain(plain)
        except StateError:
            return
        self.assertEqual(ProtocolState.fromPlain(state.toPlain()), state)

    @_EXAMPLES
    @given(st.binary(max_size=300))
    def test_hostileEncodings(self, data: bytes) -> None:
        """
        Random bytes through the codec and L{ProtocolState.fromPlain} raise
        nothing but L{StateError}.
        """
        try:
            ProtocolState.fromPlain(decodeState(data))
        except StateError:
            pass


@implementer(IMigratable)
class _Holder(Protocol):
    """
    A migratable protocol whose state is whatever it is given.
    """

    migrationVersion = 1

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def getMigrationState(self) -> Any:
        return self.state

    def restoreMigrationState(self, state: Any) -> None:
        self.state = state

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        return state


class BulkPathTests(SynchronousTestCase):
    """
    The no-copy paths used when thousands of connections move at once
    check exactly as much as the copying ones.
    """

    def test_captureWithoutSnapshot(self) -> None:
        """
        C{snapshot=False} keeps the application's own object, checked.
        """
        live = {"users": [1, 2]}
        state = captureProtocolState(_Holder(live), snapshot=False)
        self.assertIs(state.appState, live)
        self.assertIsNot(captureProtocolState(_Holder(live)).appState, live)
        self.assertRaises(
            StateError, captureProtocolState, _Holder({"s": {1}}), snapshot=False
        )
        self.assertRaises(
            StateError,
            captureProtocolState,
            _Holder(_nested(MAX_DEPTH + 1)),
            snapshot=False,
        )

    def test_fromPlainOwned(self) -> None:
        """
        C{owned=True} takes the decoded state as it is, and refuses what
        the copying path refuses.
        """
        plain = captureProtocolState(_Holder({"n": 1})).toPlain()
        self.assertIs(
            ProtocolState.fromPlain(plain, owned=True).appState, plain["appState"]
        )
        for bad in [b"bytes", {"k": float("nan")}, _nested(MAX_DEPTH + 1)]:
            hostile = dict(plain, appState=bad)
            self.assertRaises(StateError, ProtocolState.fromPlain, hostile, owned=True)
            self.assertRaises(StateError, ProtocolState.fromPlain, hostile)

    def test_restoreWithoutCopy(self) -> None:
        """
        C{copyState=False} hands the state itself to the application.
        """
        state = captureProtocolState(_Holder({"n": 1}))
        copied, shared = _Holder(), _Holder()
        restoreProtocolState(copied, state)
        restoreProtocolState(shared, state, copyState=False)
        self.assertEqual(copied.state, state.appState)
        self.assertIsNot(copied.state, state.appState)
        self.assertIs(shared.state, state.appState)

    def test_quickRestore(self) -> None:
        """
        Restoring without a copy or a check (as a transfer's freeze does)
        into a C{LineReceiver} that provides L{IMigratable} itself, from a
        state of its own version: the buffer and mode first, then the
        application state itself, as the general way does.
        """
        old = connected(ChatV1)
        old.nick = "ann"
        old.dataReceived(b"half a li")
        old.setRawMode()
        state = captureProtocolState(old)
        new = fresh(ChatV1)
        restoreProtocolState(new, state, copyState=False, validate=False)
        self.assertEqual(new.calls, [("restore", state.appState, b"half a li")])
        self.assertIs(new.calls[0][1], state.appState)
        self.assertEqual(
            (new.nick, new._buffer, new.line_mode), ("ann", b"half a li", 0)
        )

    def test_quickRestoreRefused(self) -> None:
        """
        A refusal of C{restoreMigrationState} is a L{RestoreError} naming
        the class, there too.
        """
        state = captureProtocolState(connected(ChatV2))
        new = fresh(ChatV2)
        failure = RuntimeError("no nick")

        def restore(state: Any) -> None:
            raise failure

        new.restoreMigrationState = restore
        error = self.assertRaises(
            RestoreError,
            restoreProtocolState,
            new,
            state,
            copyState=False,
            validate=False,
        )
        self.assertIn(f"{__name__}.ChatV2.restoreMigrationState() failed", str(error))
        self.assertIs(error.__cause__, failure)

    def test_quickRestoreUpgrades(self) -> None:
        """
        A state of another version is upgraded first, as always.
        """
        old = connected(ChatV1)
        old.dataReceived(b"half")
        state = captureProtocolState(old)
        new = fresh(ChatV2)
        restoreProtocolState(new, state, copyState=False, validate=False)
        self.assertEqual([call[0] for call in new.calls], ["upgrade", "restore"])
        self.assertEqual((new.nick, new._buffer), ("guest", b"half"))


class UnchangedSinceTests(SynchronousTestCase):
    """
    L{unchangedSince} tells whether a state captured earlier still
    describes its protocol.
    """

    def setUp(self) -> None:
        self.protocol = connected(ChatV2)
        self.protocol.dataReceived(b"half a li")
        self.state = captureProtocolState(self.protocol)

    def fingerprintOf(
        self, state: ProtocolState, protocol: Any = None
    ) -> StateFingerprint:
        """
        The fingerprint of C{state}, taken without saying what protocol it
        was captured from: every comparison takes the full way.
        """
        return StateFingerprint.of(state)

    def test_unchanged(self) -> None:
        """
        Nothing changed: the state still describes the protocol.
        """
        self.assertTrue(unchangedSince(self.protocol, self.fingerprintOf(self.state)))

    def test_applicationState(self) -> None:
        """
        A change in the application's state is seen, also deep inside it.
        """
        self.protocol.rooms.append("kitchen")
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(self.state)))

    def test_buffer(self) -> None:
        """
        Bytes received since are seen, as is a change of mode.
        """
        self.protocol.dataReceived(b"ne")
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(self.state)))
        protocol = connected(ChatV2)
        state = captureProtocolState(protocol)
        fingerprint = self.fingerprintOf(state, protocol)
        protocol.setRawMode()
        self.assertFalse(unchangedSince(protocol, fingerprint))

    def test_version(self) -> None:
        """
        Another C{migrationVersion} means another state.
        """
        self.protocol.migrationVersion = 3
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(self.state)))

    def test_failureIsChange(self) -> None:
        """
        A C{getMigrationState} that raises, or a protocol that cannot move
        now, answers C{False} rather than raising.
        """

        def broken() -> Any:
            raise ValueError("broken")

        self.protocol.getMigrationState = broken
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(self.state)))
        del self.protocol.getMigrationState
        self.protocol.migrationBlocker = lambda: "busy"
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(self.state)))

    def test_otherBuffers(self) -> None:
        """
        A state whose buffers are not the protocol's kinds is not its
        state.
        """
        state = attrs.evolve(self.state, buffers={})
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(state)))

    def test_exact(self) -> None:
        """
        A value changed to another that Python finds equal but the new code
        would receive as another type (C{1} to C{True}) is a change.
        """
        self.protocol.rooms = [1]
        fingerprint = self.fingerprintOf(captureProtocolState(self.protocol))
        self.protocol.rooms = [True]
        self.assertFalse(unchangedSince(self.protocol, fingerprint))

    def test_packedForm(self) -> None:
        """
        A fingerprint keeps the application state's C{marshal} form, and an
        unchanged state is recognised by it.
        """
        fingerprint = self.fingerprintOf(self.state)
        self.assertIsNotNone(fingerprint.packedAppState)
        self.assertTrue(unchangedSince(self.protocol, fingerprint))

    def test_packedExact(self) -> None:
        """
        What the JSON encoding tells apart, the C{marshal} form does too: an
        integer become a float, or a key order changed, is a change.
        """
        self.protocol.rooms = [1]
        fingerprint = self.fingerprintOf(captureProtocolState(self.protocol))
        self.protocol.rooms = [1.0]
        self.assertFalse(unchangedSince(self.protocol, fingerprint))
        self.protocol.rooms = {"a": 1, "b": 2}
        fingerprint = self.fingerprintOf(captureProtocolState(self.protocol))
        self.protocol.rooms = {"b": 2, "a": 1}
        self.assertFalse(unchangedSince(self.protocol, fingerprint))

    def test_packedDiffersEncodingDecides(self) -> None:
        """
        Where the C{marshal} forms differ but the JSON encodings do not (a
        tuple where the state captured had a list), the encodings decide,
        as before there was a C{marshal} form: unchanged.
        """
        self.protocol.rooms = ("lobby", "kitchen")
        fingerprint = self.fingerprintOf(captureProtocolState(self.protocol))
        self.assertTrue(unchangedSince(self.protocol, fingerprint))

    def test_unpackableEncodingDecides(self) -> None:
        """
        A value C{marshal} refuses (a C{str} subclass, which the JSON
        encoder writes as a C{str}) leaves the decision to the JSON
        encodings, on either side.
        """

        class Name(str):
            pass

        fingerprint = self.fingerprintOf(self.state)
        self.protocol.nick = Name(self.protocol.nick)
        self.assertTrue(unchangedSince(self.protocol, fingerprint))
        refused = self.fingerprintOf(
            attrs.evolve(
                self.state, appState={"nick": Name("guest"), "rooms": ["lobby"]}
            )
        )
        self.assertIsNone(refused.packedAppState)
        self.protocol.nick = "guest"
        self.assertTrue(unchangedSince(self.protocol, refused))
        self.protocol.nick = "host"
        self.assertFalse(unchangedSince(self.protocol, refused))

    def test_busyLineReceiver(self) -> None:
        """
        A L{basic.LineReceiver} inside C{dataReceived} is a change (its
        buffer is not consistent), as is a buffer that is not C{bytes}.
        """
        fingerprint = self.fingerprintOf(self.state)
        self.protocol._busyReceiving = True
        self.assertFalse(unchangedSince(self.protocol, fingerprint))
        self.protocol._busyReceiving = False
        self.assertTrue(unchangedSince(self.protocol, fingerprint))
        self.protocol._buffer = bytearray(self.protocol._buffer)
        self.assertFalse(unchangedSince(self.protocol, fingerprint))

    def test_lineModeAsSaved(self) -> None:
        """
        The saved mode compares as a capture compares it: a saved C{1} is
        line mode.
        """
        state = attrs.evolve(
            self.state,
            buffers={"LineReceiver": {"buffer": b"half a li", "lineMode": 1}},
        )
        self.assertTrue(unchangedSince(self.protocol, self.fingerprintOf(state)))
        state = attrs.evolve(
            self.state,
            buffers={
                "LineReceiver": {"buffer": b"half a li", "lineMode": True, "x": 1}
            },
        )
        self.assertFalse(unchangedSince(self.protocol, self.fingerprintOf(state)))


class ChangeIfChangedTests(SynchronousTestCase):
    """
    L{StateFingerprint.changeIfChanged} answers as L{StateFingerprint.matches}
    and then L{captureProtocolState} and L{ProtocolState.toPlain} would,
    asking the application once, or says it cannot tell.
    """

    def setUp(self) -> None:
        self.protocol = connected(ChatV2)
        self.protocol.dataReceived(b"half a li")
        self.fingerprint = StateFingerprint.of(
            captureProtocolState(self.protocol), self.protocol
        )

    def assertCaptured(self, appStateOnly: bool = False) -> None:
        """
        It says the state changed, and gives the plain form of the state a
        capture would, encoded the same.
        """
        found: Any = self.fingerprint.changeIfChanged(self.protocol, appStateOnly)
        expected = captureProtocolState(self.protocol, snapshot=False).toPlain()
        self.assertEqual(found, {"state": expected})
        self.assertEqual(encodeState(found["state"]), encodeState(expected))

    def test_unchanged(self) -> None:
        """
        Nothing changed: L{None}.
        """
        self.assertIsNone(self.fingerprint.changeIfChanged(self.protocol))
        self.assertIsNone(self.fingerprint.changeIfChanged(self.protocol, True))

    def test_applicationState(self) -> None:
        """
        The application state changed: the state captured now, once even
        where Python equality would see no change (C{1 == True}).
        """
        self.protocol.rooms = ["lobby", "kitchen"]
        self.assertCaptured()
        self.protocol.rooms = ["lobby", 1]
        fingerprint = StateFingerprint.of(
            captureProtocolState(self.protocol), self.protocol
        )
        self.protocol.rooms = ["lobby", True]
        found: Any = fingerprint.changeIfChanged(self.protocol)
        self.assertEqual(
            encodeState(found["state"]),
            encodeState(captureProtocolState(self.protocol, snapshot=False).toPlain()),
        )

    def test_applicationStateOnly(self) -> None:
        """
        Asked for the application state alone where only it changed, it
        gives that (the state the other process holds, with it, is the
        state captured now); where the buffers changed too, the whole
        state.
        """
        self.protocol.rooms = ["lobby", "kitchen"]
        found: Any = self.fingerprint.changeIfChanged(self.protocol, True)
        self.assertEqual(
            found, {"appState": {"nick": "guest", "rooms": self.protocol.rooms}}
        )
        held = captureProtocolState(self.protocol).withApplicationState(
            {"nick": "guest", "rooms": ["lobby"]}
        )
        self.assertEqual(
            held.withApplicationState(found["appState"]),
            captureProtocolState(self.protocol),
        )
        self.protocol.dataReceived(b"ne")
        self.assertCaptured(appStateOnly=True)
        self.protocol.rooms = ["lobby"]
        self.assertCaptured(appStateOnly=True)

    def test_buffers(self) -> None:
        """
        The line buffer or the mode changed: the state captured now.
        """
        self.protocol.dataReceived(b"ne")
        self.assertCaptured()
        self.protocol.dataReceived(b"\n")
        self.assertCaptured()
        self.protocol.setRawMode()
        self.assertCaptured()

    def test_unsure(self) -> None:
        """
        Where anything is unusual, it cannot tell (the general way then
        says why), and it raises nothing.
        """
        unsure = state_._UNSURE
        protocol = self.protocol
        self.protocol.rooms = ["lobby", {"a", "set"}]
        self.assertIs(self.fingerprint.changeIfChanged(protocol), unsure)
        self.assertRaises(StateError, captureProtocolState, protocol)
        self.protocol.rooms = ["lobby"]
        protocol._busyReceiving = True
        self.assertIs(self.fingerprint.changeIfChanged(protocol), unsure)
        protocol._busyReceiving = False
        protocol.migrationVersion = True
        self.assertIs(self.fingerprint.changeIfChanged(protocol), unsure)
        del protocol.migrationVersion
        protocol.migrationBlocker = lambda: "a request is in flight"
        self.assertIs(self.fingerprint.changeIfChanged(protocol), unsure)
        del protocol.migrationBlocker
        protocol.getMigrationState = lambda: 1 // 0
        self.assertIs(self.fingerprint.changeIfChanged(protocol), unsure)
        del protocol.getMigrationState
        protocol._buffer = "text"
        self.assertIs(self.fingerprint.changeIfChanged(protocol), unsure)
        protocol._buffer = b"half a li"
        self.assertIsNone(self.fingerprint.changeIfChanged(protocol))
        other = connected(ChatV1)
        self.assertIs(self.fingerprint.changeIfChanged(other), unsure)
        general = StateFingerprint.of(captureProtocolState(protocol))
        self.assertIs(general.changeIfChanged(protocol), unsure)


class ClassCacheTests(SynchronousTestCase):
    """
    What the state layer caches about each protocol class does not keep
    the class alive: after a module reload, the old classes (and their
    modules' globals) can be freed once their last connection ends.
    """

    def test_classFreed(self) -> None:
        """
        A class captured, compared and restored is freed when nothing else
        holds it, and the caches forget it.
        """

        class Replaced(ChatV1):
            pass

        protocol = connected(Replaced)
        protocol.dataReceived(b"half a li")
        state = captureProtocolState(protocol)
        self.assertTrue(unchangedSince(protocol, StateFingerprint.of(state)))
        restoreProtocolState(fresh(Replaced), state)
        key = id(Replaced)
        self.assertIn(key, state_._kindsByClass)
        self.assertIn(key, state_._blockingClasses)
        gone = weakref.ref(Replaced)
        del Replaced, protocol, state
        gc.collect()
        self.assertIsNone(gone())
        self.assertNotIn(key, state_._kindsByClass)
        self.assertNotIn(key, state_._blockingClasses)
        self.assertNotIn(key, state_._classesSeen)

    def test_cachedWhileAlive(self) -> None:
        """
        A class still alive keeps its entries: the look-up is made once.
        """
        state = captureProtocolState(connected(ChatV2))
        self.assertTrue(unchangedSince(connected(ChatV2), StateFingerprint.of(state)))
        gc.collect()
        self.assertIn(id(ChatV2), state_._kindsByClass)
        self.assertIs(state_._classesSeen[id(ChatV2)](), ChatV2)


class QuickUnchangedSinceTests(UnchangedSinceTests):
    """
    The same, with fingerprints that know the protocol they were taken
    from: a protocol of its class (a C{LineReceiver} that provides
    L{IMigratable} itself and has no blocker) is compared the quick way,
    with the same answers.
    """

    def fingerprintOf(
        self, state: ProtocolState, protocol: Any = None
    ) -> StateFingerprint:
        """
        The fingerprint of C{state}, taken from C{protocol} (by default
        the test's protocol).
        """
        return StateFingerprint.of(
            state, self.protocol if protocol is None else protocol
        )

    def test_quickClass(self) -> None:
        """
        The fingerprint knows the class it may compare the quick way, and
        the buffer taken.
        """
        fingerprint = self.fingerprintOf(self.state)
        self.assertIs(fingerprint.quickClass, ChatV2)
        self.assertEqual(
            (fingerprint.lineBuffer, fingerprint.lineMode), (b"half a li", True)
        )

    def test_notQuick(self) -> None:
        """
        A class with a C{migrationBlocker}, or built on another base
        protocol than C{LineReceiver}, takes the full way.
        """

        @implementer(IMigratable)
        class Blocking(ChatV2):
            def migrationBlocker(self) -> str | None:
                return None

        @implementer(IMigratable)
        class Framed(_Strings, basic.Int32StringReceiver):
            migrationVersion = 1

            def __init__(self) -> None:
                self.received = []

            def getMigrationState(self) -> Any:
                return {}

            def restoreMigrationState(self, state: Any) -> None:
                pass

            def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
                return state

        for protocol in (connected(Blocking), connected(Framed)):
            fingerprint = self.fingerprintOf(captureProtocolState(protocol), protocol)
            self.assertIsNone(fingerprint.quickClass)
            self.assertTrue(unchangedSince(protocol, fingerprint))

    def test_classFreed(self) -> None:
        """
        A class compared and restored the quick way is freed when nothing
        else holds it (its fingerprint included), and the quick way's cache
        forgets it.
        """

        @implementer(IMigratable)
        class Replaced(ChatV1):
            pass

        protocol = connected(Replaced)
        state = captureProtocolState(protocol)
        fingerprint = self.fingerprintOf(state, protocol)
        self.assertIs(fingerprint.quickClass, Replaced)
        self.assertTrue(unchangedSince(protocol, fingerprint))
        restoreProtocolState(fresh(Replaced), state, copyState=False, validate=False)
        key = id(Replaced)
        self.assertIn(key, state_._quickKindsByClass)
        gone = weakref.ref(Replaced)
        del Replaced, protocol, state, fingerprint
        gc.collect()
        self.assertIsNone(gone())
        self.assertNotIn(key, state_._quickKindsByClass)

    def test_otherClass(self) -> None:
        """
        A protocol of another class than the one the fingerprint was taken
        from is compared the full way.
        """

        @implementer(IMigratable)
        class Other(ChatV2):
            pass

        fingerprint = self.fingerprintOf(self.state)
        other = connected(Other)
        other.dataReceived(b"half a li")
        self.assertTrue(unchangedSince(other, fingerprint))
        other.nick = "someone"
        self.assertFalse(unchangedSince(other, fingerprint))
