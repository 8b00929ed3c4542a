# -*- test-case-name: migrate.test.test_state -*-
"""
Protocol-state persistence: what a connection's protocol takes with it
when the connection moves to new code.

Two things travel, gathered in a L{ProtocolState}:

  - the application's own state, for protocols that provide
    L{IMigratable}: what C{getMigrationState()} returns (plain data) and
    the C{migrationVersion} of the code that returned it;

  - the input Twisted's own base protocols hold for the protocol and have
    not delivered yet: a half-received line (C{LineReceiver},
    C{LineOnlyReceiver}), a half-received frame (the C{IntNStringReceiver}
    family, C{NetstringReceiver}), or whole messages held back while the
    protocol was paused.  Every protocol has these, migratable or not, and
    no application has to save them itself.

On the new side, L{restoreProtocolState} rebuilds a freshly made protocol
of the new code from a L{ProtocolState}, upgrading the application state
first when the versions differ; once the connection reads again,
L{replayBufferedInput} delivers the messages already complete in the
restored buffers.

Base-protocol buffers are read from (and written to) private attributes of
Twisted's classes; all of that is in this module, in one small adapter per
base class (L{_BufferKind}), so that a Twisted upgrade that changes them
breaks this one place.  Buffers are stored as the raw, unparsed bytes still
to be parsed (a half netstring is stored as the bytes that were received,
not as the parser's internal state), so that the new code parses them
afresh, against its own limits.
"""

from __future__ import annotations

import base64
import binascii
import copy
import marshal
import weakref
from io import BytesIO
from typing import Any, Callable, Mapping

from attrs import field, frozen
from twisted.protocols import basic

from migrate._codec import (
    MAX_DEPTH,
    MAX_STATE_BYTES,
    StateError,
    _checkPlain,
    _encodeCompact,
    decodeState,
    encodeState,
)
from migrate._handoff._movers._registry import (
    NotAtSafePoint,
    migratableFor,
    migrationBlocker,
    movers,
)
from migrate.interfaces import IMigratable

__all__ = [
    "NotAtSafePoint",
    "ProtocolState",
    "RestoreError",
    "StateError",
    "StateFingerprint",
    "captureProtocolState",
    "hasBufferedInput",
    "isMigratable",
    "replayBufferedInput",
    "restoreProtocolState",
    "unchangedSince",
]


class RestoreError(StateError):
    """
    A protocol could not be restored from a L{ProtocolState}: the new code
    refused the state (its C{upgradeMigrationState} or
    C{restoreMigrationState} raised), or the state does not fit the new
    protocol class.

    The protocol it was raised for is half restored and must not be used;
    the connection stays with the old code (or is closed, where there is no
    old code to go back to).  The original exception, if any, is the
    C{__cause__}.
    """


def _className(cls: type) -> str:
    """
    @param cls: a class.

    @return: its qualified name, module included.
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(error: BaseException) -> str:
    """
    Describe an exception raised by application code for an error message.

    @param error: the exception.

    @return: its C{repr}, shortened to a bounded length; its type's name if
        its C{repr} itself fails.
    """
    try:
        text = repr(error)
    except Exception:
        text = f"{type(error).__qualname__} (whose repr failed)"
    return text if len(text) <= 500 else text[:497] + "..."


def _bytesAttribute(protocol: object, name: str, default: bytes = b"") -> bytes:
    """
    Read a buffer attribute of a base protocol, checking its type.

    @param protocol: the protocol.
    @param name: the attribute's name.
    @param default: its value when unset (the protocol was never connected).

    @return: the buffer.

    @raise StateError: if it is not C{bytes}.
    """
    value = getattr(protocol, name, default)
    if type(value) is not bytes:
        raise StateError(
            f"{_className(type(protocol))}.{name} is "
            f"{type(value).__qualname__}, not bytes"
        )
    return value


@frozen
class _BufferKind:
    """
    How to carry the input buffer of one of Twisted's base protocols.

    @ivar name: the key in L{ProtocolState.buffers}.
    @ivar base: the base class.
    @ivar fields: the names of the values saved besides C{"buffer"} (the
        raw bytes still to parse, which every kind saves), with their types.
    @ivar capture: returns the values to save from a protocol, C{"buffer"}
        included; raises L{StateError} when the buffer is not consistent.
    @ivar restore: writes saved values into a freshly made protocol.
    @ivar pending: returns the bytes a protocol holds unparsed.
    @ivar initial: for a base class whose parser is set up by
        C{makeConnection} (which a restored protocol does not go through),
        the values to restore when the old protocol had no such buffer;
        L{None} when the class's own defaults do.
    @ivar same: whether C{capture} would now return values equal to
        saved ones, answered without building them (C{False} where
        C{capture} would raise L{StateError}); for the comparisons made of
        every connection while every client waits (L{StateFingerprint}).
        L{None}: C{capture} and compare.
    """

    name: str
    base: type
    fields: Mapping[str, type]
    capture: Callable[[Any], dict[str, Any]]
    restore: Callable[[Any, Mapping[str, Any]], None]
    pending: Callable[[Any], bytes]
    initial: Mapping[str, Any] | None = None
    same: Callable[[Any, Mapping[str, Any]], bool] | None = None


def _captureLineReceiver(protocol: basic.LineReceiver) -> dict[str, Any]:
    """
    Save a L{basic.LineReceiver}'s buffer and mode.

    @param protocol: the protocol.

    @return: C{{"buffer": bytes, "lineMode": bool}}.

    @raise StateError: if the protocol is inside C{dataReceived}: lines
        already taken from the buffer would then be lost or delivered twice.
    """
    if protocol._busyReceiving:
        raise StateError(
            f"{_className(type(protocol))} is inside dataReceived: its "
            "LineReceiver buffer is not consistent; capture it from outside "
            "the read path"
        )
    return {
        "buffer": _bytesAttribute(protocol, "_buffer"),
        "lineMode": bool(protocol.line_mode),
    }


def _sameLineReceiver(protocol: basic.LineReceiver, saved: Mapping[str, Any]) -> bool:
    """
    Whether L{_captureLineReceiver} would now return C{saved}: the same
    test as comparing a new capture with it (C{False} where the capture
    would raise), without building the capture.
    """
    if protocol._busyReceiving:
        return False
    buffer = getattr(protocol, "_buffer", b"")
    return (
        type(buffer) is bytes
        and len(saved) == 2
        and saved.get("buffer") == buffer
        and saved.get("lineMode", None) == bool(protocol.line_mode)
    )


def _restoreLineReceiver(
    protocol: basic.LineReceiver, saved: Mapping[str, Any]
) -> None:
    """
    Restore a L{basic.LineReceiver}'s buffer and mode.

    @param protocol: the protocol.
    @param saved: what L{_captureLineReceiver} returned.
    """
    protocol._buffer = saved["buffer"]
    protocol.line_mode = 1 if saved["lineMode"] else 0


def _captureLineOnlyReceiver(protocol: basic.LineOnlyReceiver) -> dict[str, Any]:
    """
    Save a L{basic.LineOnlyReceiver}'s buffer (it has no busy flag: capture
    it from outside C{dataReceived}).

    @param protocol: the protocol.

    @return: C{{"buffer": bytes}}.
    """
    return {"buffer": _bytesAttribute(protocol, "_buffer")}


def _restoreLineOnlyReceiver(
    protocol: basic.LineOnlyReceiver, saved: Mapping[str, Any]
) -> None:
    """
    Restore a L{basic.LineOnlyReceiver}'s buffer.

    @param protocol: the protocol.
    @param saved: what L{_captureLineOnlyReceiver} returned.
    """
    protocol._buffer = saved["buffer"]


def _captureIntNStringReceiver(protocol: basic.IntNStringReceiver) -> dict[str, Any]:
    """
    Save the unparsed input of an L{basic.IntNStringReceiver} (C{Int32},
    C{Int16} or C{Int8StringReceiver}).

    C{_compatibilityOffset} is non-zero only while C{dataReceived} is
    delivering a string (the strings after it are still to be delivered by
    the old code), after a length over C{MAX_LENGTH} or after
    C{stringReceived} raised (the connection is then being dropped): in all
    these cases the buffer is not consistent.

    @param protocol: the protocol.

    @return: C{{"buffer": bytes}}.

    @raise StateError: if the buffer is not consistent.
    """
    offset = getattr(protocol, "_compatibilityOffset", 0)
    if offset != 0 or "recvd" in getattr(protocol, "__dict__", {}):
        raise StateError(
            f"{_className(type(protocol))} is inside dataReceived (or its "
            "last string failed): its IntNStringReceiver buffer is not "
            "consistent; capture it from outside the read path"
        )
    return {"buffer": _bytesAttribute(protocol, "_unprocessed")}


def _restoreIntNStringReceiver(
    protocol: basic.IntNStringReceiver, saved: Mapping[str, Any]
) -> None:
    """
    Restore the unparsed input of an L{basic.IntNStringReceiver}.

    @param protocol: the protocol.
    @param saved: what L{_captureIntNStringReceiver} returned.
    """
    protocol._unprocessed = saved["buffer"]
    protocol._compatibilityOffset = 0


def _captureNetstringReceiver(protocol: basic.NetstringReceiver) -> dict[str, Any]:
    """
    Save the unparsed input of a L{basic.NetstringReceiver}, as the bytes
    received.

    Its parser keeps a partial netstring in pieces: the length, already
    parsed, in C{_expectedPayloadSize}; the payload so far in C{_payload};
    what follows in C{_remainingData}.  They are put back together into
    the bytes that were received, which the new side parses afresh (there
    is no busy flag: capture from outside C{dataReceived}).

    @param protocol: the protocol.

    @return: C{{"buffer": bytes}}.

    @raise StateError: if the peer sent an invalid netstring (the
        connection is being dropped) or the parser's state is not
        consistent.
    """
    name = _className(type(protocol))
    if getattr(protocol, "brokenPeer", 0):
        raise StateError(
            f"{name} received an invalid netstring; its connection is closing"
        )
    remaining = _bytesAttribute(protocol, "_remainingData")
    if (
        getattr(protocol, "_state", protocol._PARSING_LENGTH)
        != protocol._PARSING_PAYLOAD
    ):
        return {"buffer": remaining}
    expected = getattr(protocol, "_expectedPayloadSize", None)
    current = getattr(protocol, "_currentPayloadSize", None)
    payload = getattr(protocol, "_payload", None)
    if (
        type(expected) is not int
        or type(current) is not int
        or not isinstance(payload, BytesIO)
        or not 0 <= current < expected
    ):
        raise StateError(f"{name}'s NetstringReceiver state is not consistent")
    received = payload.getvalue()[:current]
    if len(received) != current:
        raise StateError(f"{name}'s NetstringReceiver state is not consistent")
    # _expectedPayloadSize counts the trailing comma.
    return {"buffer": b"%d:" % (expected - 1,) + received + remaining}


def _restoreNetstringReceiver(
    protocol: basic.NetstringReceiver, saved: Mapping[str, Any]
) -> None:
    """
    Restore the unparsed input of a L{basic.NetstringReceiver}, and set up
    its parser as C{makeConnection} does (the restored protocol was not
    necessarily connected with it).

    @param protocol: the protocol.
    @param saved: what L{_captureNetstringReceiver} returned.
    """
    protocol._remainingData = saved["buffer"]
    protocol._currentPayloadSize = 0
    protocol._payload = BytesIO()
    protocol._state = protocol._PARSING_LENGTH
    protocol._expectedPayloadSize = 0
    protocol.brokenPeer = 0


_KINDS: tuple[_BufferKind, ...] = (
    _BufferKind(
        name="LineReceiver",
        base=basic.LineReceiver,
        fields={"lineMode": bool},
        capture=_captureLineReceiver,
        restore=_restoreLineReceiver,
        pending=lambda protocol: protocol._buffer,
        same=_sameLineReceiver,
    ),
    _BufferKind(
        name="LineOnlyReceiver",
        base=basic.LineOnlyReceiver,
        fields={},
        capture=_captureLineOnlyReceiver,
        restore=_restoreLineOnlyReceiver,
        pending=lambda protocol: protocol._buffer,
    ),
    _BufferKind(
        name="IntNStringReceiver",
        base=basic.IntNStringReceiver,
        fields={},
        capture=_captureIntNStringReceiver,
        restore=_restoreIntNStringReceiver,
        pending=lambda protocol: protocol._unprocessed,
    ),
    _BufferKind(
        name="NetstringReceiver",
        base=basic.NetstringReceiver,
        fields={},
        capture=_captureNetstringReceiver,
        restore=_restoreNetstringReceiver,
        pending=lambda protocol: getattr(protocol, "_remainingData", b""),
        initial={"buffer": b""},
    ),
)

_KINDS_BY_NAME = {kind.name: kind for kind in _KINDS}

#: for each buffer kind's name, the keys its C{dict} holds, with their types
_EXPECTED_BY_NAME: dict[str, dict[str, type]] = {
    kind.name: {"buffer": bytes, **kind.fields} for kind in _KINDS
}

#: the buffer kinds of each protocol class seen, by the class's C{id}
_kindsByClass: dict[int, tuple[_BufferKind, ...]] = {}

#: whether each protocol class seen may have a C{migrationBlocker}, by the
#: class's C{id}
_blockingClasses: dict[int, bool] = {}

#: for each protocol class seen, by the class's C{id}, its buffer kinds if
#: L{StateFingerprint} may compare its instances the quick way (and a
#: restore may take the quick way), else L{None}
_quickKindsByClass: dict[int, tuple[_BufferKind, ...] | None] = {}

#: a weak reference to each class the caches above know, by its C{id}
_classesSeen: dict[int, weakref.ref[type]] = {}


def _forget(key: int) -> None:
    """
    A class the caches knew is gone (a module reload replaced it and its
    last instance ended): forget it, since its C{id} may be reused.
    """
    _kindsByClass.pop(key, None)
    _blockingClasses.pop(key, None)
    _quickKindsByClass.pop(key, None)
    _classesSeen.pop(key, None)


def _remember(cache: dict[int, Any], cls: type, value: Any) -> Any:
    """
    Cache C{value} for C{cls} without keeping C{cls} alive.

    The caches are keyed by C{id(cls)}, with a weak reference whose
    callback forgets the class when it goes, rather than by the class
    itself: a dictionary keyed by classes would keep every class of every
    reloaded module alive (with its module's globals), and a
    C{WeakKeyDictionary} costs two and a half times a plain dictionary's
    look-up, which the freeze makes for each of thousands of connections.

    @return: C{value}
    """
    key = id(cls)
    if key not in _classesSeen:

        def gone(reference: weakref.ref[type]) -> None:
            _forget(key)

        _classesSeen[key] = weakref.ref(cls, gone)
    cache[key] = value
    return value


def _mayBlock(app: object) -> bool:
    """
    Whether C{app} may have a C{migrationBlocker} (its class has one, or
    the instance was given one), without the cost of a failed attribute
    look-up on each of thousands of protocols.
    """
    cls = type(app)
    try:
        blocking = _blockingClasses[id(cls)]
    except KeyError:
        blocking = _remember(
            _blockingClasses,
            cls,
            hasattr(cls, "migrationBlocker") or hasattr(cls, "__getattr__"),
        )
    return blocking or "migrationBlocker" in getattr(app, "__dict__", ())


def _kindsOf(cls: type) -> tuple[_BufferKind, ...]:
    """
    The base protocols of L{_KINDS} that C{cls} inherits from, looked up
    once per class.
    """
    kinds = _kindsByClass.get(id(cls))
    if kinds is None:
        kinds = _remember(
            _kindsByClass,
            cls,
            tuple(kind for kind in _KINDS if issubclass(cls, kind.base)),
        )
    return kinds


_PLAIN_KEYS = frozenset(["className", "migratable", "version", "appState", "buffers"])


def _validateBuffers(buffers: object, *, encoded: bool) -> dict[str, dict[str, Any]]:
    """
    Check the structure of L{ProtocolState.buffers} (or of its plain form)
    strictly, running no foreign code.

    @param buffers: the candidate buffers.
    @param encoded: whether each C{"buffer"} is base64 text (the plain form)
        rather than C{bytes}.

    @return: a new dict of the buffers, with C{bytes} buffers.

    @raise StateError: if C{buffers} is not exactly a C{dict} from known
        kind names to C{dict}s of exactly that kind's values, each of the
        right type.
    """
    if type(buffers) is not dict:
        raise StateError(
            f"protocol state: buffers must be a dict, not {type(buffers).__qualname__}"
        )
    # Called for each connection restored while every client waits: the
    # place named in an error message is made only for an error.
    result: dict[str, dict[str, Any]] = {}
    for name, saved in buffers.items():
        if type(name) is not str or name not in _KINDS_BY_NAME:
            raise StateError(
                f"protocol state: unknown buffer kind {_safeRepr(name)}; "
                f"known: {', '.join(sorted(_KINDS_BY_NAME))}"
            )
        if type(saved) is not dict:
            raise StateError(
                f"{_bufferPlace(name)} must be a dict, not {type(saved).__qualname__}"
            )
        expected = _EXPECTED_BY_NAME[name]
        for key in saved:
            if type(key) is not str or key not in expected:
                raise StateError(
                    f"{_bufferPlace(name)}: unexpected key {_safeRepr(key)}"
                )
        values: dict[str, Any] = {}
        for key, wanted in expected.items():
            if key not in saved:
                raise StateError(f"{_bufferPlace(name)}: missing {key!r}")
            value = saved[key]
            if key == "buffer" and encoded:
                if type(value) is str and not value:
                    # The canonical encoding of no bytes.
                    value = b""
                else:
                    value = _decodeBase64(value, name, key)
            elif type(value) is not wanted:
                raise StateError(
                    f"{_bufferPlace(name, key)} must be {wanted.__qualname__}, not "
                    f"{type(value).__qualname__}"
                )
            values[key] = value
        result[name] = values
    return result


def _bufferPlace(name: str, key: str | None = None) -> str:
    """
    Name a place in L{ProtocolState.buffers} for an error message.

    @param name: a buffer kind's name.
    @param key: a key in that kind's C{dict}, if the place is one.
    """
    where = f"protocol state: buffers[{name!r}]"
    return where if key is None else f"{where}[{key!r}]"


def _plainBuffer(buffer: bytes) -> str:
    """
    A buffer's bytes as a state's plain form carries them: base64 text,
    and no encoding at all for an empty one (the canonical encoding of no
    bytes, which L{_validateBuffers} takes without decoding).
    """
    return binascii.b2a_base64(buffer, newline=False).decode("ascii") if buffer else ""


def _safeRepr(value: object) -> str:
    """
    Describe a value of unknown type for an error message without running
    its code.

    @param value: anything.

    @return: a short C{repr} for a C{str}, the type's name otherwise.
    """
    if type(value) is str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"of type {type(value).__qualname__}"


def _decodeBase64(value: object, name: str, key: str) -> bytes:
    """
    Decode base64 text strictly: only the canonical encoding of some bytes
    is accepted.

    @param value: the candidate text.
    @param name: the buffer kind it is in, for the error message.
    @param key: its key in that kind's C{dict}, for the error message.

    @return: the bytes.

    @raise StateError: if C{value} is not a C{str} holding canonical base64.
    """
    if type(value) is not str:
        raise StateError(
            f"{_bufferPlace(name, key)} must be base64 text, not "
            f"{type(value).__qualname__}"
        )
    try:
        encoded = value.encode("ascii")
        decoded = base64.b64decode(encoded, validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise StateError(f"{_bufferPlace(name, key)} is not valid base64: {e}") from e
    if base64.b64encode(decoded) != encoded:
        raise StateError(f"{_bufferPlace(name, key)} is not canonical base64")
    return decoded


@frozen
class ProtocolState:
    """
    What one connection's protocol carries to new code.

    @ivar className: the qualified name of the old protocol's class (for
        messages and reports; the new class is whatever the new code's
        factory builds).
    @ivar migratable: whether the old protocol provided L{IMigratable}.
    @ivar version: the old code's C{migrationVersion}, or L{None} if not
        C{migratable}.
    @ivar appState: the plain data C{getMigrationState()} returned (a
        normalised copy: tuples became lists), or L{None} if not
        C{migratable}.
    @ivar buffers: the input held by Twisted's base protocols: a C{dict}
        from the name of a base class (C{"LineReceiver"},
        C{"LineOnlyReceiver"}, C{"IntNStringReceiver"},
        C{"NetstringReceiver"}) to a C{dict} with the unparsed bytes under
        C{"buffer"} and, for C{LineReceiver}, the mode under C{"lineMode"}
        (a C{bool}).
    """

    className: str
    migratable: bool
    version: int | None
    appState: Any
    buffers: dict[str, dict[str, Any]] = field(factory=dict)

    def toPlain(self) -> dict[str, Any]:
        """
        Convert to plain data, for L{migrate._codec.encodeState}.

        @return: a C{dict} of plain data, in which buffers are base64 text.
            Its C{"appState"} is this object's, not a copy.
        """
        # Made for each changed connection while every client waits: no
        # comprehension per buffer, and nothing to encode for an empty one.
        buffers = {}
        for name, saved in self.buffers.items():
            plain = dict(saved)
            if "buffer" in plain:
                plain["buffer"] = _plainBuffer(plain["buffer"])
            buffers[name] = plain
        return {
            "className": self.className,
            "migratable": self.migratable,
            "version": self.version,
            "appState": self.appState,
            "buffers": buffers,
        }

    @classmethod
    def fromPlain(
        cls, data: object, *, owned: bool = False, parsedJSON: bool = False
    ) -> ProtocolState:
        """
        Convert back what L{toPlain} returned, validating it strictly: it
        comes from another process and may be corrupt or hostile.

        @param data: the plain form, as decoded by
            L{migrate._codec.decodeState}.
        @param owned: C{True} when the caller gives C{data} away (it was
            just decoded and nothing else holds it): its application state
            is then checked in place instead of copied, which matters when
            thousands of connections move at once.
        @param parsedJSON: C{True} (with C{owned}) when C{data} was just
            parsed by C{json.loads} from a bounded document, non-finite
            numbers refused: every value in it is then plain data by
            construction, and the application state is not walked again
            (the structure around it, the types and the buffers still are).
            Its depth was checked when the state was captured; use it only
            for a document that cannot have been changed since (the sealed
            memory file a re-executed image inherits from its own previous
            image).

        @return: the state.

        @raise StateError: if C{data} is not exactly the plain form of a
            L{ProtocolState}; never any other exception.
        """
        if type(data) is not dict:
            raise StateError(
                f"protocol state must be a dict, not {type(data).__qualname__}"
            )
        for key in data:
            if type(key) is not str or key not in _PLAIN_KEYS:
                raise StateError(f"protocol state: unexpected key {_safeRepr(key)}")
        # Every key is a distinct expected one: as many as expected means
        # none is missing (the set of those missing is made only then).
        if len(data) != len(_PLAIN_KEYS):
            missing = _PLAIN_KEYS.difference(data)
            raise StateError(f"protocol state: missing {', '.join(sorted(missing))}")
        className = data["className"]
        migratable = data["migratable"]
        version = data["version"]
        appState = data["appState"]
        if type(className) is not str:
            raise StateError("protocol state: className must be a str")
        if type(migratable) is not bool:
            raise StateError("protocol state: migratable must be a bool")
        if migratable:
            if type(version) is not int:
                raise StateError(
                    "protocol state: version of migratable state must be an int"
                )
            try:
                if not (owned and parsedJSON):
                    appState = (
                        _checkApplicationState(appState)
                        if owned
                        else _normalise(appState)
                    )
            except StateError as e:
                raise StateError(f"protocol state: appState: {e}") from e
        elif version is not None or appState is not None:
            raise StateError(
                "protocol state: version and appState must be None when not migratable"
            )
        buffers = _validateBuffers(data["buffers"], encoded=True)
        return cls(className, migratable, version, appState, buffers)

    def withApplicationState(
        self, appState: object, *, owned: bool = False
    ) -> ProtocolState:
        """
        This state with another application state: what a freeze sends for
        a connection of which only the application state changed since the
        copy the process taking over holds (see
        L{StateFingerprint.changeIfChanged}), checked as L{fromPlain} checks
        one.

        @param appState: the new application state, plain data, as decoded
            by L{migrate._codec.decodeState} or L{json.loads}: it comes from
            another process and may be corrupt or hostile.
        @param owned: as for L{fromPlain}: C{appState} is checked in place
            instead of copied.

        @return: a new state, of the same class name, version and buffers.

        @raise StateError: if this state is not migratable, or C{appState}
            is not plain data within the codec's limits; never any other
            exception.
        """
        if not self.migratable:
            raise StateError(
                "protocol state: an application state for a protocol that "
                "did not provide IMigratable"
            )
        try:
            appState = (
                _checkApplicationState(appState) if owned else _normalise(appState)
            )
        except StateError as e:
            raise StateError(f"protocol state: appState: {e}") from e
        return ProtocolState(self.className, True, self.version, appState, self.buffers)


def _checkApplicationState(appState: object) -> Any:
    """
    Check, without copying, that application state is plain data within
    the limits L{_normalise} applies.

    @return: C{appState} itself.

    @raise StateError: naming the offending place.
    """
    _checkPlain(appState, maxBytes=MAX_STATE_BYTES, maxDepth=MAX_DEPTH - 1)
    return appState


def _normalise(appState: object) -> Any:
    """
    Check that application state is plain data within the codec's limits,
    and make a normalised copy of it.

    The depth allowed is one less than the codec's, as the application
    state sits inside the plain form of a L{ProtocolState}.

    @param appState: the candidate state.

    @return: a copy, with lists for tuples, sharing nothing with C{appState}.

    @raise StateError: naming the offending place.
    """
    return decodeState(
        encodeState(appState, maxBytes=MAX_STATE_BYTES, maxDepth=MAX_DEPTH - 1),
        maxBytes=MAX_STATE_BYTES,
        maxDepth=MAX_DEPTH - 1,
    )


def isMigratable(protocol: object) -> bool:
    """
    @param protocol: a protocol.

    @return: whether it provides L{IMigratable} (declares it; its
        C{migrationVersion} is checked when it is used), or migrate has a
        mover for it (twisted.web's HTTP channel).
    """
    return migratableFor(protocol) is not None


def captureProtocolState(protocol: object, *, snapshot: bool = True) -> ProtocolState:
    """
    Take what a protocol carries to new code.

    Call it on a frozen connection (no bytes are read meanwhile) and from
    outside the protocol's C{dataReceived}: the base protocols' buffers are
    only consistent between two reads.

    @param protocol: the protocol of the connection that moves.
    @param snapshot: C{False} when the caller encodes the state before the
        application can run again (in the same reactor step): the state
        is then checked but not copied.

    @return: its state: for an L{IMigratable} protocol, its application
        state (a normalised copy) and version; for every protocol, the
        input buffers of the Twisted base protocols it inherits from.

    @raise StateError: if the application state is not plain data or is
        beyond the codec's limits (the message names the offending place),
        if C{getMigrationState} raised (the original exception is the
        C{__cause__}), if C{migrationVersion} is not an C{int}, or if a
        base protocol is in the middle of parsing.
    """
    cls = type(protocol)
    name = _className(cls)
    app: Any = migratableFor(protocol)
    migratable = app is not None
    version: int | None = None
    appState: Any = None
    if migratable:
        reason = migrationBlocker(app)
        if reason is not None:
            raise NotAtSafePoint(f"{name} cannot move now: {reason}")
        version = getattr(app, "migrationVersion", None)
        if type(version) is not int:
            raise StateError(
                f"{name}.migrationVersion must be an int, not "
                f"{type(version).__qualname__}"
            )
        try:
            raw = app.getMigrationState()
        except Exception as e:
            raise StateError(
                f"{name}.getMigrationState() failed: {_describe(e)}"
            ) from e
        try:
            appState = _normalise(raw) if snapshot else _checkApplicationState(raw)
        except StateError as e:
            raise StateError(f"{name}.getMigrationState() returned {e}") from e
    buffers: dict[str, dict[str, Any]] = {}
    for kind in _KINDS:
        if isinstance(protocol, kind.base):
            buffers[kind.name] = kind.capture(protocol)
    return ProtocolState(name, migratable, version, appState, buffers)


#: encodes application state the way the codec does, for comparisons only
_encodeForComparison = _encodeCompact

#: a cheaper comparison key for application state (L{StateFingerprint}):
#: C{marshal}'s form, only ever compared in this process, never loaded
_packForComparison = marshal.dumps

#: C{marshal}'s format 2: no references between objects (format 3 on marks
#: an object shared or not by its reference count, so that equal values
#: could differ), no interned strings (format 3 on marks them), floats in
#: binary; every exact type of plain data has a code of its own (C{True}
#: is not C{1}, a C{tuple} not a C{list}) and containers keep their order
_PACK_VERSION = 2


#: L{StateFingerprint.changeIfChanged}'s answer when it cannot tell
_UNSURE = object()


@frozen
class StateFingerprint:
    """
    What tells whether a protocol's state changed since it was captured,
    cheaply enough to ask of every connection while all of them wait: its
    application state as the codec would encode it, and the buffers of
    Twisted's base protocols.

    Pre-copy (see L{migrate._handoff._precopy}) sends a first copy of each
    connection's state while the old process still serves; at the freeze,
    only the connections whose fingerprint no longer matches travel again.
    The comparison is exact: the encoded application state, not Python
    equality (under which C{True == 1 == 1.0}), so what the new code
    receives is byte for byte what a fresh capture would have sent.

    The application state is first compared by its C{marshal} form
    (L{_packForComparison}), which is several times cheaper to make than
    its JSON encoding for a small state: two trees of the exact JSON types
    (as a captured state is) with the same C{marshal} form are the same
    tree, types, values and key order, so they encode to the same JSON.
    Where the two forms differ (or C{marshal} refuses the value), the JSON
    encodings decide, as before.  The C{marshal} form is a comparison key
    kept in this process, never sent anywhere nor loaded.

    @ivar migratable: as in the L{ProtocolState} taken.
    @ivar version: as in the L{ProtocolState} taken.
    @ivar encodedAppState: the application state, encoded as the codec
        does; L{None} if not migratable.
    @ivar buffers: the base protocols' buffers, as in the L{ProtocolState}.
    @ivar packedAppState: the application state's C{marshal} form, for the
        cheap comparison; L{None} if not migratable or C{marshal} refused it.
    @ivar quickClass: the class of the protocol the state was taken from,
        when a protocol of exactly that class can be compared the quick way
        (see L{_quickKinds}); L{None} otherwise.
    @ivar lineBuffer: with C{quickClass}, the C{LineReceiver} buffer
        taken, or L{None} if the class is no C{LineReceiver}.
    @ivar lineMode: with C{lineBuffer}, the C{LineReceiver} mode taken.
    @ivar className: with C{quickClass}, the state's C{className} (that
        class's qualified name).
    """

    migratable: bool
    version: int | None
    encodedAppState: str | None
    buffers: dict[str, dict[str, Any]]
    packedAppState: bytes | None = None
    quickClass: type | None = None
    lineBuffer: bytes | None = None
    lineMode: bool | None = None
    className: str | None = None

    @classmethod
    def of(
        cls, state: ProtocolState, protocol: object | None = None
    ) -> StateFingerprint:
        """
        Take the fingerprint of a state just captured (before the
        application runs again, if it was captured without a snapshot).

        @param state: from L{captureProtocolState}.
        @param protocol: the protocol it was captured from, if the caller
            knows it: L{matches} then compares a protocol of the same
            class the quick way, when the class allows it.
        """
        packed = None
        if state.migratable:
            try:
                packed = _packForComparison(state.appState, _PACK_VERSION)
            except Exception:
                packed = None
        quickClass = lineBuffer = lineMode = None
        if packed is not None and protocol is not None:
            kinds = _quickKinds(type(protocol))
            saved = state.buffers.get("LineReceiver")
            if kinds is not None and len(kinds) == len(state.buffers):
                if not kinds:
                    quickClass = type(protocol)
                elif (
                    saved is not None
                    and len(saved) == 2
                    and type(saved.get("buffer")) is bytes
                    and type(saved.get("lineMode")) is bool
                ):
                    quickClass = type(protocol)
                    lineBuffer = saved["buffer"]
                    lineMode = saved["lineMode"]
        return cls(
            state.migratable,
            state.version,
            (_encodeForComparison(state.appState) if state.migratable else None),
            state.buffers,
            packed,
            quickClass,
            lineBuffer,
            lineMode,
            state.className if quickClass is not None else None,
        )

    def matches(self, protocol: object) -> bool:
        """
        Would L{captureProtocolState} give the same state now?

        Anything unusual (the application's C{getMigrationState} raised,
        returned something the encoder refuses, a base protocol is busy)
        counts as changed, so that a full capture runs and says what is
        wrong.

        @param protocol: the protocol the fingerprinted state was taken
            from.

        @raise NotAtSafePoint: if the protocol cannot move now (a request
            in flight); it may at a later safe point.
        """
        if type(protocol) is self.quickClass and "migrationBlocker" not in (
            protocol.__dict__
        ):
            return self._matchesQuickly(protocol)
        # Asked of every connection while every client waits: the look-ups
        # of migratableFor, _mayBlock and _kindsOf are made inline, and a
        # base protocol's buffers compared without building a capture.
        app: Any = (
            protocol if IMigratable.providedBy(protocol) else movers.moverFor(protocol)
        )
        if (app is not None) is not self.migratable:
            return False
        if app is not None:
            blocking = _blockingClasses.get(id(type(app)))
            if (
                blocking is None
                or blocking
                or "migrationBlocker" in getattr(app, "__dict__", ())
            ):
                try:
                    reason = migrationBlocker(app) if _mayBlock(app) else None
                except StateError:
                    return False
                if reason is not None:
                    raise NotAtSafePoint(
                        f"{_className(type(protocol))} cannot move now: {reason}"
                    )
            if getattr(app, "migrationVersion", None) != self.version:
                return False
            try:
                appState = app.getMigrationState()
            except Exception:
                return False
            packed = self.packedAppState
            try:
                samePacked = (
                    packed is not None
                    and _packForComparison(appState, _PACK_VERSION) == packed
                )
            except Exception:
                samePacked = False
            if not samePacked:
                # The JSON encodings decide (a tuple now where a list was,
                # say, encodes the same).
                try:
                    if _encodeForComparison(appState) != self.encodedAppState:
                        return False
                except Exception:
                    return False
        buffers = self.buffers
        cls = type(protocol)
        kinds = _kindsByClass.get(id(cls))
        if kinds is None:
            kinds = _kindsOf(cls)
        if len(kinds) != len(buffers):
            return False
        for kind in kinds:
            saved = buffers.get(kind.name)
            if saved is None:
                return False
            compare = kind.same
            try:
                if compare is not None:
                    if not compare(protocol, saved):
                        return False
                elif kind.capture(protocol) != saved:
                    return False
            except StateError:
                return False
        return True

    def changeIfChanged(
        self, protocol: object, appStateOnly: bool = False
    ) -> dict[str, Any] | None | object:
        """
        L{matches} and, if it does not match, the plain form
        (L{ProtocolState.toPlain}) of L{captureProtocolState} (without a
        snapshot) in one, for a protocol of C{quickClass} without a
        C{migrationBlocker} of its own: the application state is asked for
        once, and the buffers read once, where the two calls ask twice, and
        the plain form is made at once.  A pre-copy's freeze makes both for
        each of thousands of changed connections while every client waits.

        A state whose C{marshal} form differs from the one fingerprinted
        is taken as changed without comparing the JSON encodings (the rare
        state that differs only as a tuple differs from a list encodes the
        same: it is sent again, as any change is, and restored the same).

        It never raises: where anything is unusual (another class, a
        blocker of its own, a version that is no longer the C{int} taken,
        a failing C{getMigrationState}, a busy or odd buffer, state the
        codec would refuse), it answers C{_UNSURE}, and the caller takes
        the general way (L{matches}, then L{captureProtocolState}), with
        its errors.

        @param protocol: the protocol the fingerprinted state was taken
            from.
        @param appStateOnly: whether the process taking over the connection
            holds the state fingerprinted, and takes a new application
            state alone (see L{ProtocolState.withApplicationState}): where
            only the application state changed (not the version, nor the
            buffers), only it is given then.

        @return: L{None} if the state did not change; if it did, what
            changed: C{{"state": plain form}}, or C{{"appState":
            application state}} (it is the application's, not a copy:
            encode it before the application runs again); or C{_UNSURE}.
        """
        cls = type(protocol)
        if cls is not self.quickClass or "migrationBlocker" in protocol.__dict__:
            return _UNSURE
        # quickClass is set only for a class that provides IMigratable
        # itself and defines no blocker, and only for a state that was
        # fingerprinted with its marshal form (see _quickKinds).
        app: Any = protocol
        version = getattr(app, "migrationVersion", None)
        if type(version) is not int or version != self.version:
            return _UNSURE
        try:
            appState = app.getMigrationState()
            samePacked = (
                _packForComparison(appState, _PACK_VERSION) == self.packedAppState
            )
        except Exception:
            return _UNSURE
        lineBuffer = self.lineBuffer
        buffers: dict[str, dict[str, Any]]
        if lineBuffer is None:
            if samePacked:
                return None
            sameBuffers = True
            buffers = {}
        else:
            if app._busyReceiving:
                return _UNSURE
            buffer = getattr(app, "_buffer", b"")
            if type(buffer) is not bytes:
                return _UNSURE
            lineMode = bool(app.line_mode)
            sameBuffers = lineMode is self.lineMode and buffer == lineBuffer
            if samePacked and sameBuffers:
                return None
            # As _captureLineReceiver returns them, as toPlain writes them.
            buffers = {
                "LineReceiver": {
                    "buffer": _plainBuffer(buffer),
                    "lineMode": lineMode,
                }
            }
        try:
            # As captureProtocolState checks it (the clients wait, and the
            # state is encoded before the application runs again: no copy).
            _checkApplicationState(appState)
        except StateError:
            return _UNSURE
        if appStateOnly and sameBuffers:
            # Same class (so same className), version and buffers.
            return {"appState": appState}
        return {
            "state": {
                "className": self.className or _className(cls),
                "migratable": True,
                "version": version,
                "appState": appState,
                "buffers": buffers,
            }
        }

    def _matchesQuickly(self, protocol: Any) -> bool:
        """
        L{matches}, for a protocol of C{quickClass} without a
        C{migrationBlocker} of its own: the same comparisons, minus the
        look-ups its class settled once (it provides L{IMigratable} itself,
        has no blocker, and its only base protocol buffer, if any, is a
        C{LineReceiver}'s).  A few microseconds less per connection, for
        ten thousand connections while every client waits.
        """
        if getattr(protocol, "migrationVersion", None) != self.version:
            return False
        try:
            appState = protocol.getMigrationState()
        except Exception:
            return False
        try:
            same = _packForComparison(appState, _PACK_VERSION) == self.packedAppState
        except Exception:
            same = False
        if not same:
            try:
                if _encodeForComparison(appState) != self.encodedAppState:
                    return False
            except Exception:
                return False
        lineBuffer = self.lineBuffer
        if lineBuffer is None:
            return True
        if protocol._busyReceiving:
            return False
        buffer = getattr(protocol, "_buffer", b"")
        return (
            type(buffer) is bytes
            and buffer == lineBuffer
            and bool(protocol.line_mode) is self.lineMode
        )


def _quickKinds(cls: type) -> tuple[_BufferKind, ...] | None:
    """
    The base protocol buffer kinds of C{cls} if L{StateFingerprint} may
    compare its instances the quick way (L{StateFingerprint._matchesQuickly}),
    L{None} if not: the class itself provides L{IMigratable} (so every
    instance does: an interface a class implements cannot be taken from
    an instance), defines no C{migrationBlocker} and no C{__getattr__} (an
    instance may still have a C{migrationBlocker} of its own: that one
    takes the full comparison), its instances have a C{__dict__}, and it
    inherits from no base protocol but C{LineReceiver}.
    """
    try:
        return _quickKindsByClass[id(cls)]
    except KeyError:
        pass
    kinds: tuple[_BufferKind, ...] | None = _kindsOf(cls)
    if (
        not IMigratable.implementedBy(cls)
        or hasattr(cls, "migrationBlocker")
        or hasattr(cls, "__getattr__")
        or "__dict__" not in dir(cls)
        or any(kind.name != "LineReceiver" for kind in kinds or ())
    ):
        kinds = None
    return _remember(_quickKindsByClass, cls, kinds)  # type: ignore[no-any-return]


def unchangedSince(protocol: object, fingerprint: StateFingerprint) -> bool:
    """
    Whether C{protocol} would capture now as it did when C{fingerprint}
    was taken: for reusing a copy taken earlier (while the connection still
    served) when nothing changed since.

    It never raises: anything unusual (a blocker, a failing
    C{getMigrationState}, a different version, a buffer in the middle of
    parsing) answers C{False}, and the caller captures afresh, with that
    capture's own errors.

    @param protocol: the protocol the fingerprinted state was captured from.
    @param fingerprint: L{StateFingerprint.of} that state.
    """
    try:
        return fingerprint.matches(protocol)
    except Exception:
        return False


def restoreProtocolState(
    protocol: object,
    state: ProtocolState,
    *,
    copyState: bool = True,
    validate: bool = True,
) -> None:
    """
    Rebuild a freshly made protocol of the new code from a state taken from
    the old code, in place of C{connectionMade}.

    The caller has set C{protocol.transport} and C{protocol.factory}.  In
    order: if C{state} is migratable and its version differs from the new
    class's C{migrationVersion}, C{upgradeMigrationState(state.version,
    appState)} is called once (going through intermediate versions is the
    application's business); the base protocols' buffers are restored into
    whichever of those base classes the new protocol has (a
    C{NetstringReceiver}'s parser is set up even when there is nothing to
    restore, as C{makeConnection} would); then
    C{restoreMigrationState(appState)} is called (it may look at, or change,
    the restored buffers and mode).  For state that is not migratable only
    the buffers are restored: nothing else is called, and whether the
    connection is welcome is the caller's decision.

    No bytes are parsed here: once the connection reads again, call
    L{replayBufferedInput}.

    @param protocol: the new protocol, not connected with
        C{makeConnection}.
    @param state: the old protocol's state.
    @param copyState: C{False} when C{state} is used once and may be given
        to the application as it is (it was just decoded for this
        connection): saves a deep copy per connection.
    @param validate: C{False} when C{state} was made by
        L{ProtocolState.fromPlain} or L{captureProtocolState}, which check
        its buffers, and nothing changed them since: saves checking them
        again, which matters when thousands of connections are restored
        while their clients wait.

    @raise RestoreError: if the new code refused the state (the original
        exception is the C{__cause__}), if migratable state meets a class
        that does not provide L{IMigratable} or has no C{int}
        C{migrationVersion}, or if buffered input would be lost because the
        new class no longer inherits from the base class that held it.
        C{protocol} must then not be used.
    """
    # Run for every connection while every client waits (module reload's
    # pause, the commit of a transfer): the protocol's name is made only
    # for an error, and the common case (the saved buffers are exactly
    # those of the new class's base protocols) walks them once.
    cls = type(protocol)
    if not (validate or copyState) and state.migratable:
        quick = _quickKinds(cls)
        if quick is not None and _restoreQuickly(protocol, state, quick):
            return
    try:
        buffers = (
            _validateBuffers(state.buffers, encoded=False)
            if validate
            else state.buffers
        )
    except StateError as e:
        raise RestoreError(f"cannot restore {_className(cls)}: {e}") from e
    classKinds = _kindsByClass.get(id(cls))
    if classKinds is None:
        classKinds = _kindsOf(cls)
    kinds: list[tuple[_BufferKind, Mapping[str, Any]]] = []
    found = 0
    for kind in classKinds:
        if kind.name in buffers:
            kinds.append((kind, buffers[kind.name]))
            found += 1
        elif kind.initial is not None:
            kinds.append((kind, kind.initial))
    if found != len(buffers):
        # Some buffer belongs to a base protocol the new class lacks.
        for kindName, saved in buffers.items():
            kind = _KINDS_BY_NAME[kindName]
            if not isinstance(protocol, kind.base) and saved["buffer"]:
                raise RestoreError(
                    f"cannot restore {_className(cls)}: it is not a "
                    f"{kind.name}, and the {len(saved['buffer'])} bytes "
                    f"{state.className} had buffered as one would be lost"
                )

    appState: Any = None
    app: Any = (
        protocol if IMigratable.providedBy(protocol) else movers.moverFor(protocol)
    )
    if state.migratable:
        if app is None:
            raise RestoreError(
                f"cannot restore {_className(cls)}: it does not provide "
                f"IMigratable, and {state.className} left application state"
            )
        newVersion = getattr(app, "migrationVersion", None)
        if type(newVersion) is not int:
            raise RestoreError(
                f"cannot restore {_className(cls)}: its migrationVersion must "
                f"be an int, not {type(newVersion).__qualname__}"
            )
        # The application may change what it is given; the state stays as
        # it was taken.
        appState = copy.deepcopy(state.appState) if copyState else state.appState
        if state.version != newVersion:
            try:
                appState = app.upgradeMigrationState(state.version, appState)
            except Exception as e:
                raise RestoreError(
                    f"{_className(cls)}.upgradeMigrationState() refused state "
                    f"version {state.version} (this code reads version "
                    f"{newVersion}): "
                    f"{_describe(e)}"
                ) from e

    for kind, values in kinds:
        kind.restore(protocol, values)

    if state.migratable:
        try:
            app.restoreMigrationState(appState)
        except Exception as e:
            raise RestoreError(
                f"{_className(cls)}.restoreMigrationState() failed: {_describe(e)}"
            ) from e


def _restoreQuickly(
    protocol: Any, state: ProtocolState, kinds: tuple[_BufferKind, ...]
) -> bool:
    """
    L{restoreProtocolState} without a copy or a check of C{state}, for a
    protocol whose class L{_quickKinds} accepts (C{kinds} are its buffer
    kinds), in the common case only: the state is of the new class's
    version and carries exactly the buffers of its base protocols.  The
    same steps, minus the look-ups the class settled once: ten thousand
    connections are restored so while every client waits.

    @return: whether it restored C{protocol}; if not, nothing was done and
        the caller takes the general way.

    @raise RestoreError: as L{restoreProtocolState}.
    """
    buffers = state.buffers
    if len(buffers) != len(kinds):
        return False
    version = getattr(protocol, "migrationVersion", None)
    if type(version) is not int or version != state.version:
        return False
    if kinds:
        saved = buffers.get("LineReceiver")
        if saved is None:
            return False
        _restoreLineReceiver(protocol, saved)
    try:
        protocol.restoreMigrationState(state.appState)
    except Exception as e:
        raise RestoreError(
            f"{_className(type(protocol))}.restoreMigrationState() failed: "
            f"{_describe(e)}"
        ) from e
    return True


def hasBufferedInput(protocol: object) -> bool:
    """
    Whether L{replayBufferedInput} may have messages to deliver: a
    restored protocol's buffers hold bytes not parsed yet (complete
    messages among them, or only the start of one), or it is moved by a
    registered mover, which cannot say.

    @param protocol: a protocol restored by L{restoreProtocolState}.
    """
    for kind in _kindsOf(type(protocol)):
        if kind.pending(protocol):
            return True
    return not IMigratable.providedBy(protocol) and migratableFor(protocol) is not None


def replayBufferedInput(protocol: object) -> None:
    """
    Deliver the messages already complete in a restored protocol's buffers.

    Call it once the connection reads again (bytes that arrive later are
    parsed after these).  The base class's own C{dataReceived} is called
    with no new bytes, not the protocol's override: buffered bytes already
    went through any override when they were received.  A paused protocol
    keeps its messages until it resumes, as Twisted's base protocols do.
    Nothing happens when the buffers are empty.

    Exceptions raised by the application's message handlers propagate, as
    they would from C{dataReceived}.

    @param protocol: a protocol restored by L{restoreProtocolState}.
    """
    for kind in _KINDS:
        if isinstance(protocol, kind.base) and kind.pending(protocol):
            kind.base.dataReceived(protocol, b"")  # type: ignore[attr-defined]
    if not IMigratable.providedBy(protocol):
        mover: Any = migratableFor(protocol)
        if mover is not None:
            mover.replayBufferedInput()
