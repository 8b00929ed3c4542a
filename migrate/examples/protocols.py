"""
Three protocols that are not C{LineReceiver}s, each carrying its state to
new code: the examples of C{doc/protocols.rst}.

  - L{FrameCounter}, length-prefixed (L{Int32StringReceiver}): like every
    protocol built on one of Twisted's base protocols, it saves only its own
    attributes; migrate carries the half-received frame.
  - L{Tally}, an L{amp.AMP} server: AMP parses boxes on top of
    C{Int16StringReceiver}, whose buffer migrate carries, but it keeps the
    box it is in the middle of parsing, and the answers it waits for, in
    attributes of its own: the protocol carries the first and refuses to
    move with the second.
  - L{FieldBlocks}, a hand-written parser on L{Protocol}: it carries its
    unparsed bytes and its parser's state itself.

They are run by the tests with L{migrate.testing.roundTrip}; any of them
can be served with C{twistd migrate-host --app
migrate.examples.protocols:NAME} (C{frameCounterFactory}, C{tallyFactory},
C{fieldBlocksFactory}).
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import amp
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from migrate.interfaces import IMigratable

__all__ = [
    "Add",
    "FieldBlocks",
    "FrameCounter",
    "Tally",
    "fieldBlocksFactory",
    "frameCounterFactory",
    "tallyFactory",
]


def _expect(state: Any, shape: dict[str, type]) -> dict[str, Any]:
    """
    Check that state restored from another process has the expected shape.

    @param state: the state.
    @param shape: the type of each key.

    @return: C{state}.

    @raise ValueError: if C{state} is not a C{dict} with exactly these keys
        of these types.
    """
    if not (
        isinstance(state, dict)
        and set(state) == set(shape)
        and all(type(state[key]) is kind for key, kind in shape.items())
    ):
        raise ValueError(f"expected state shaped like {shape!r}, not {state!r:.200}")
    return state


# Length-prefixed


@implementer(IMigratable)
class FrameCounter(Int32StringReceiver):
    """
    Answers each frame with the number of frames received so far and the
    frame itself, as C{b"3: hello"}.

    @ivar frames: how many frames this connection received.
    """

    migrationVersion = 1

    def __init__(self) -> None:
        self.frames = 0

    def stringReceived(self, string: bytes) -> None:
        self.frames += 1
        self.sendString(b"%d: %s" % (self.frames, string))

    def getMigrationState(self) -> dict[str, Any]:
        # The half-received frame is Int32StringReceiver's: migrate carries it.
        return {"frames": self.frames}

    def restoreMigrationState(self, state: Any) -> None:
        self.frames = _expect(state, {"frames": int})["frames"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        raise ValueError(f"cannot read FrameCounter state version {fromVersion}")


def frameCounterFactory() -> Factory:
    """
    @return: a factory of L{FrameCounter}s.
    """
    return Factory.forProtocol(FrameCounter)


# AMP


class Add(amp.Command):
    """
    Add a number to the connection's running total and answer the total.
    """

    arguments = [(b"value", amp.Integer())]
    response = [(b"total", amp.Integer())]


@implementer(IMigratable)
class Tally(amp.AMP):
    """
    An AMP server keeping a running total per connection.

    @ivar total: the sum of the values added on this connection.
    """

    migrationVersion = 1

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    @Add.responder
    def add(self, value: int) -> dict[str, int]:
        self.total += value
        return {"total": self.total}

    def getMigrationState(self) -> dict[str, Any]:
        # An answer this side is waiting for would reach the new process,
        # where no Deferred waits for it: refuse to move meanwhile (the
        # connection stays on the old code).  This server never asks, but a
        # peer-to-peer AMP protocol does.  (A responder returning a Deferred
        # is the same: count those in flight and refuse while any is.)
        if self._outstandingRequests:
            raise ValueError(
                f"{len(self._outstandingRequests)} AMP requests await an answer"
            )
        # The box being parsed: AMP keeps it itself, on top of the
        # Int16StringReceiver buffer (the next half key or value) that
        # migrate carries.
        box = self._currentBox
        return {
            "total": self.total,
            "parser": self.state,
            "box": (
                None
                if box is None
                else [[_text(key), _text(value)] for key, value in box.items()]
            ),
            "key": None if self._currentKey is None else _text(self._currentKey),
        }

    def restoreMigrationState(self, state: Any) -> None:
        if not (
            isinstance(state, dict)
            and set(state) == {"total", "parser", "box", "key"}
            and type(state["total"]) is int
            and state["parser"] in ("init", "key", "value")
            and (state["box"] is None or isinstance(state["box"], list))
            and (state["key"] is None or type(state["key"]) is str)
        ):
            raise ValueError(f"not the state of a Tally: {state!r:.200}")
        self.total = state["total"]
        # What makeConnection does, which a restored protocol does not go
        # through (connectionMade apart): tell the box receiver (the
        # dispatcher) where to send answers, and note the addresses AMP
        # logs when the connection is lost.
        assert self.transport is not None
        self._transportPeer = self.transport.getPeer()
        self._transportHost = self.transport.getHost()
        self.boxReceiver.startReceivingBoxes(self)
        # The parser, where the old one stopped.
        self.state = state["parser"]
        if state["box"] is not None:
            self._currentBox = amp.AmpBox(
                (_bytes(key), _bytes(value)) for key, value in state["box"]
            )
        if state["key"] is not None:
            self._currentKey = _bytes(state["key"])
        # A value may be longer than a key.
        self.MAX_LENGTH = (
            self._MAX_VALUE_LENGTH if self.state == "value" else self._MAX_KEY_LENGTH
        )

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        raise ValueError(f"cannot read Tally state version {fromVersion}")


def tallyFactory() -> Factory:
    """
    @return: a factory of L{Tally} servers.
    """
    return Factory.forProtocol(Tally)


def _text(data: bytes) -> str:
    """
    @return: C{data} as base64 text (state is plain data: no C{bytes}).
    """
    return base64.b64encode(data).decode("ascii")


def _bytes(text: Any) -> bytes:
    """
    @return: the bytes L{_text} encoded.

    @raise ValueError: if C{text} is not base64 text.
    """
    if type(text) is not str:
        raise ValueError(f"expected base64 text, not {text!r:.50}")
    return base64.b64decode(text, validate=True)


# A hand-written parser


@implementer(IMigratable)
class FieldBlocks(Protocol):
    """
    Reads blocks of C{Name: value} lines, each block ended by an empty
    line, and answers each block with C{b"N fields\\n"}.

    Its parser is its own, so it carries its own unparsed bytes and the
    fields of the block it is in the middle of.

    @ivar unparsed: bytes received but not parsed yet (an incomplete line).
    @ivar fields: the fields of the current block so far.
    @ivar blocks: how many blocks this connection sent.
    """

    migrationVersion = 1
    maxLine = 16384

    def __init__(self) -> None:
        self.unparsed = b""
        self.fields: list[tuple[str, str]] = []
        self.blocks = 0

    def dataReceived(self, data: bytes) -> None:
        self.unparsed += data
        while b"\n" in self.unparsed:
            line, self.unparsed = self.unparsed.split(b"\n", 1)
            self._lineReceived(line.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self.unparsed) > self.maxLine:
            assert self.transport is not None
            self.transport.loseConnection()

    def _lineReceived(self, line: str) -> None:
        if line:
            name, _, value = line.partition(":")
            self.fields.append((name.strip(), value.strip()))
            return
        self.blocks += 1
        assert self.transport is not None
        self.transport.write(b"%d fields\n" % (len(self.fields),))
        self.fields = []

    def getMigrationState(self) -> dict[str, Any]:
        # Called between two dataReceived calls: the unparsed bytes hold at
        # most an incomplete line.
        return {
            "unparsed": _text(self.unparsed),
            "fields": [[name, value] for name, value in self.fields],
            "blocks": self.blocks,
        }

    def restoreMigrationState(self, state: Any) -> None:
        state = _expect(state, {"unparsed": str, "fields": list, "blocks": int})
        fields = state["fields"]
        if not all(
            isinstance(field, list)
            and len(field) == 2
            and all(isinstance(part, str) for part in field)
            for field in fields
        ):
            raise ValueError(
                f"fields must be [[name, value], ...], not {fields!r:.200}"
            )
        self.unparsed = _bytes(state["unparsed"])
        self.fields = [(name, value) for name, value in fields]
        self.blocks = state["blocks"]

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        raise ValueError(f"cannot read FieldBlocks state version {fromVersion}")


def fieldBlocksFactory() -> Factory:
    """
    @return: a factory of L{FieldBlocks}.
    """
    return Factory.forProtocol(FieldBlocks)
