# -*- test-case-name: migrate.test.test_reexec -*-
"""
The re-exec state document: everything one image of a host leaves to the
next one when it replaces itself with C{execv}.

The old image writes the document into an anonymous memory file that
survives C{exec} (L{writeState}) and names that file's descriptor in the
environment of the new image (L{STATE_FD_VARIABLE}); the new image reads
it back (L{readState}).  The document is plain data (JSON through
L{migrate._codec}), never a pickle: the new image runs other code.

It holds, by descriptor number (the numbers survive C{exec}):

  - each listening socket, by the key it was configured with;
  - the control socket;
  - the metrics endpoint, with the counters so far;
  - each established connection with its manifest entry (see
    L{migrate._handoff._movement.freezeMovable}): the protocol's state, the output
    Twisted had not written yet, and whether it is I{restored} (an
    L{migrate.IMigratable} protocol) or handed to a I{fresh} protocol of the
    new code (C{--reexec-unmovable adopt});

and the generation, the start of the report the new image completes, the
signals the old image blocked across C{exec}, and when it froze the
connections (C{CLOCK_MONOTONIC}, which C{exec} does not reset), so that the
new image can say how long clients waited.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import signal
from typing import Any, Iterable, Mapping

from attrs import evolve, field, frozen

from ..._codec import StateError, encodeCheckedState, encodeState, loadCheckedJSON
from ..._handoff._fdpass import readMemfd, writeMemfd
from ...state import ProtocolState

__all__ = [
    "EXEC_AT_VARIABLE",
    "FORMAT_VERSION",
    "MAX_STATE_BYTES",
    "PREFLIGHT_MARKER",
    "PREFLIGHT_VARIABLE",
    "REEXEC_SIGNALS",
    "STATE_FD_VARIABLE",
    "afterCaretaker",
    "InheritedConnection",
    "ReexecState",
    "mergePrecopy",
    "Precopy",
    "PrecopiedConnection",
    "readState",
    "writeState",
]

STATE_FD_VARIABLE = "MIGRATE_REEXEC_STATE_FD"
"""
The environment variable naming, in the new image, the descriptor of the
memory file that holds the state document.
"""

EXEC_AT_VARIABLE = "MIGRATE_REEXEC_EXEC_AT"
"""
The environment variable holding the C{time.monotonic()} of the moment the
old image called C{execv}.
"""

PREFLIGHT_VARIABLE = "MIGRATE_REEXEC_PREFLIGHT"
"""
Set in the environment of the short-lived process that checks, before a
re-exec, that the command line still starts and loads the application; it
stops once its options are parsed (see L{migrate.strategies._reexec._incoming}).
"""

PREFLIGHT_MARKER = "migrate re-exec preflight: ready"
"""
What the preflight process prints once its options parsed and the
application loaded.
"""

REEXEC_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""
The signals blocked across C{exec}: their default action ends the process,
and the new image has no handler for them until the reactor and the host
install theirs.
"""

FORMAT_VERSION = 1
"""
The version of the document this code writes.  A reader accepts every
version up to its own: an image never runs older code than the one that
wrote its state, and newer code keeps reading older documents.
"""

MAX_STATE_BYTES = 1 << 30
"""
The largest document accepted: the state of every connection plus the
output Twisted held for each.
"""

_MAX_DEPTH = 48


def _int(value: object, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise StateError(
            "{} must be an int of at least {}, not {!r}".format(what, minimum, value)
        )
    return value


def _str(value: object, what: str) -> str:
    if type(value) is not str:
        raise StateError(
            "{} must be a str, not {!r}".format(what, type(value).__name__)
        )
    return value


def _dict(value: object, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise StateError(
            "{} must be an object, not {}".format(what, type(value).__name__)
        )
    return value


def _list(value: object, what: str) -> list[Any]:
    if type(value) is not list:
        raise StateError("{} must be a list, not {}".format(what, type(value).__name__))
    return value


@frozen
class InheritedConnection:
    """
    One established connection in the document.

    @ivar descriptor: its socket's descriptor number.
    @ivar listener: the key of the listener that accepted it.
    @ivar entry: its manifest entry (as from
        L{migrate._handoff._movement.freezeMovable}, for L{migrate._handoff._movement.adoptEntry}).
    @ivar fresh: C{True} if a fresh protocol of the new code takes it over
        (told C{connectionMade}), C{False} if its protocol is restored from
        its state.
    @ivar closing: whether the old code had asked to close it once its
        output was written; the new image does so after resuming it.
    """

    descriptor: int
    listener: str
    entry: dict[str, Any]
    fresh: bool = False
    closing: bool = False

    def toPlain(self) -> dict[str, Any]:
        return dict(
            self.entry, fd=self.descriptor, fresh=self.fresh, closing=self.closing
        )

    @classmethod
    def fromPlain(cls, data: object, where: str) -> InheritedConnection:
        entry = dict(_dict(data, where))
        descriptor = entry.pop("fd", None)
        if type(descriptor) is not int or descriptor < 3:
            _int(descriptor, where + ".fd", 3)
        fresh = entry.pop("fresh", False)
        closing = entry.pop("closing", False)
        if type(fresh) is not bool or type(closing) is not bool:
            raise StateError(where + ": fresh and closing must be booleans")
        listener = entry.get("listener")
        if type(listener) is not str:
            _str(listener, where + ".listener")
        return cls(descriptor, listener, entry, fresh, closing)  # type: ignore[arg-type]


def _plainDurations(value: object, where: str) -> dict[str, float]:
    durations = {}
    for name, seconds in _dict(value, where).items():
        if type(seconds) not in (int, float) or not math.isfinite(seconds):
            raise StateError("{}[{!r}] must be a number".format(where, name))
        durations[name] = float(seconds)
    return durations


@frozen
class ReexecState:
    """
    What an image leaves to the next one.

    @ivar pid: the process (the same in both images).
    @ivar generation: the generation the old image served.
    @ivar strategy: the name of the strategy that re-executed.
    @ivar listeners: descriptor of each listening socket, by key.
    @ivar control: descriptor of the control socket, if any.
    @ivar metrics: descriptor of the metrics endpoint, if any.
    @ivar metricsCarried: the metrics' counters so far, as plain data
        (L{migrate._host._metrics.HostMetrics.carried}), if any.
    @ivar connections: the established connections.
    @ivar closed: by listener key, connections the old image closed (or
        left to C{exec} to close) because they could not be carried over.
    @ivar durations: seconds the old image spent in each phase.
    @ivar notes: what the report should tell the operator.
    @ivar frozenAt: C{time.monotonic()} when the connections froze.
    @ivar blockedSignals: the signals the old image blocked across C{exec}
        that the new image unblocks once its handlers are installed.
    @ivar reporters: the channels older generations report their draining
        over: (descriptor, PID at the other end).
    @ivar draining: what they last reported: JSON-compatible entries with
        C{generation}, C{pid}, C{connections} and C{via}.
    @ivar precopy: in the old image's document, the descriptor of the
        memory file holding the pre-copy: the connections described while
        the old image still served (L{writePrecopy}); L{readState} merges
        them into L{connections} and sets it to L{None}.
    @ivar superseded: the numbers (C{"id"}) of pre-copied connections that
        changed or went away before the freeze: the new image ignores their
        pre-copied entries (a changed one is in L{connections} again).
    @ivar precopied: in the new image, the pre-copied connections that
        still hold, after L{connections}.
    @ivar version: the document's format version.
    """

    pid: int
    generation: int
    strategy: str
    listeners: Mapping[str, int] = field(factory=dict)
    control: int | None = None
    metrics: int | None = None
    metricsCarried: Any = None
    connections: tuple[InheritedConnection, ...] = ()
    closed: Mapping[str, int] = field(factory=dict)
    durations: Mapping[str, float] = field(factory=dict)
    notes: tuple[str, ...] = ()
    frozenAt: float = 0.0
    blockedSignals: tuple[int, ...] = ()
    reporters: tuple[tuple[int, int], ...] = ()
    draining: tuple[Mapping[str, int], ...] = ()
    precopy: int | None = None
    superseded: tuple[int, ...] = ()
    precopied: tuple[PrecopiedConnection, ...] = ()
    version: int = FORMAT_VERSION

    def descriptors(self) -> list[int]:
        """
        Every descriptor the new image inherits through this document
        (not counting the document's own).
        """
        found = list(self.listeners.values())
        if self.control is not None:
            found.append(self.control)
        if self.metrics is not None:
            found.append(self.metrics)
        if self.precopy is not None:
            found.append(self.precopy)
        found.extend(each.descriptor for each in self.connections)
        found.extend(each.descriptor for each in self.precopied)
        found.extend(fd for fd, via in self.reporters)
        return found

    def toPlain(self) -> dict[str, Any]:
        """
        Describe this state as plain data for L{encodeState}.
        """
        return {
            "format": self.version,
            "pid": self.pid,
            "generation": self.generation,
            "strategy": self.strategy,
            "listeners": [{"key": key, "fd": fd} for key, fd in self.listeners.items()],
            "control": None if self.control is None else {"fd": self.control},
            "metrics": (
                None
                if self.metrics is None
                else {"fd": self.metrics, "carried": self.metricsCarried}
            ),
            "connections": [each.toPlain() for each in self.connections],
            "closed": dict(self.closed),
            "durations": dict(self.durations),
            "notes": list(self.notes),
            "frozenAt": self.frozenAt,
            "blockedSignals": [int(each) for each in self.blockedSignals],
            # Only when there are some: an older migrate reading the
            # document ignores what it does not know.
            **(
                {
                    "reporters": [{"fd": fd, "via": via} for fd, via in self.reporters],
                    "draining": [dict(each) for each in self.draining],
                }
                if self.reporters
                else {}
            ),
            **({"precopy": self.precopy} if self.precopy is not None else {}),
            # A caretaker's document names no pre-copy (the new image read
            # it from the old image's prelude) but supersedes some of it.
            **(
                {"superseded": list(self.superseded)}
                if self.precopy is not None or self.superseded
                else {}
            ),
        }

    @classmethod
    def fromPlain(cls, data: object) -> ReexecState:
        """
        Read back what L{toPlain} returned, strictly.

        @raise StateError: naming what is wrong, for a document this code
            cannot read (a newer format, a missing or mistyped field, a
            descriptor named twice).
        """
        document = _dict(data, "document")
        version = _int(document.get("format"), "format", 1)
        if version > FORMAT_VERSION:
            raise StateError(
                "the document has format {}, newer than this code's {}".format(
                    version, FORMAT_VERSION
                )
            )
        listeners: dict[str, int] = {}
        for index, each in enumerate(_list(document.get("listeners"), "listeners")):
            where = "listeners[{}]".format(index)
            each = _dict(each, where)
            key = _str(each.get("key"), where + ".key")
            if key in listeners:
                raise StateError("listener {!r} named twice".format(key))
            listeners[key] = _int(each.get("fd"), where + ".fd", 3)
        control = document.get("control")
        controlFd = None
        if control is not None:
            controlFd = _int(_dict(control, "control").get("fd"), "control.fd", 3)
        metrics = document.get("metrics")
        metricsFd = None
        metricsCarried = None
        if metrics is not None:
            metrics = _dict(metrics, "metrics")
            metricsFd = _int(metrics.get("fd"), "metrics.fd", 3)
            # Checked by HostMetrics.carry, which ignores what it cannot read.
            metricsCarried = metrics.get("carried")
        connections = tuple(
            InheritedConnection.fromPlain(each, "connections[{}]".format(index))
            for index, each in enumerate(
                _list(document.get("connections"), "connections")
            )
        )
        closed = {
            _str(key, "closed key"): _int(count, "closed[{!r}]".format(key))
            for key, count in _dict(document.get("closed", {}), "closed").items()
        }
        precopy = document.get("precopy")
        if precopy is not None:
            precopy = _int(precopy, "precopy", 3)
        superseded = tuple(
            _int(each, "superseded[]", 1)
            for each in _list(document.get("superseded", []), "superseded")
        )
        frozenAt = document.get("frozenAt", 0.0)
        if type(frozenAt) not in (int, float) or not math.isfinite(frozenAt):
            raise StateError("frozenAt must be a number")
        state = cls(
            pid=_int(document.get("pid"), "pid", 1),
            generation=_int(document.get("generation"), "generation", 1),
            strategy=_str(document.get("strategy"), "strategy"),
            listeners=listeners,
            control=controlFd,
            metrics=metricsFd,
            metricsCarried=metricsCarried,
            connections=connections,
            closed=closed,
            durations=_plainDurations(document.get("durations", {}), "durations"),
            notes=tuple(
                _str(each, "notes[]")
                for each in _list(document.get("notes", []), "notes")
            ),
            frozenAt=float(frozenAt),
            blockedSignals=tuple(
                _int(each, "blockedSignals[]", 1)
                for each in _list(document.get("blockedSignals", []), "blockedSignals")
            ),
            reporters=tuple(
                (
                    _int(_dict(each, "reporters[]").get("fd"), "reporters[].fd", 3),
                    _int(_dict(each, "reporters[]").get("via"), "reporters[].via", 1),
                )
                for each in _list(document.get("reporters", []), "reporters")
            ),
            draining=tuple(
                {
                    name: _int(
                        _dict(each, "draining[]").get(name), "draining[]." + name
                    )
                    for name in ("generation", "pid", "connections", "via")
                }
                for each in _list(document.get("draining", []), "draining")
            ),
            precopy=precopy,
            superseded=superseded,
            version=version,
        )
        named = state.descriptors()
        if len(set(named)) != len(named):
            raise StateError("a descriptor is named twice")
        return state


def writeState(state: ReexecState, *, validate: bool = True) -> int:
    """
    Write C{state} into a new sealed memory file that survives C{exec}.

    @param validate: whether to check the whole document with
        L{encodeState}; C{False} when every connection's state was checked
        as it was captured.

    @return: the file's descriptor (inheritable); the caller closes it if
        the C{exec} does not happen.

    @raise StateError: if the state is not plain data or exceeds
        L{MAX_STATE_BYTES}.
    """
    plain = state.toPlain()
    if validate:
        data = encodeState(plain, maxBytes=MAX_STATE_BYTES, maxDepth=_MAX_DEPTH)
    else:
        # Same encoding as encodeState, without walking every connection's
        # state again: it was checked when it was captured, and this runs
        # while the clients wait.
        try:
            data = encodeCheckedState(plain, maxBytes=MAX_STATE_BYTES)
        except StateError as e:
            raise StateError("the state document: {}".format(e))
    return writeMemfd(data, "migrate-reexec-state", inheritable=True)


def _parse(data: bytes, what: str) -> Any:
    """
    Parse JSON text of a document, strictly: C{NaN} and infinities are
    refused, so that every value is plain data.
    """
    return loadCheckedJSON(data, what)


class PrecopiedConnection:
    """
    One connection of the pre-copy, as the new image reads it back: what a
    manifest entry says, in a compact form (see L{Precopy}).

    @ivar ident: its number in the manifest.
    @ivar descriptor: its socket's descriptor.
    @ivar listener: the key of the listener that accepted it.
    @ivar family: its socket's address family.
    @ivar state: its protocol's state, as captured (buffers decoded).
    @ivar peer: the peer's address as C{getpeername} gave it (a list), or
        L{None} for a socket that is not TCP.
    @ivar local: its own address, likewise.
    """

    __slots__ = (
        "ident",
        "descriptor",
        "listener",
        "family",
        "state",
        "peer",
        "local",
    )

    def __init__(
        self,
        ident: int,
        descriptor: int,
        listener: str,
        family: int,
        state: ProtocolState,
        peer: list[Any] | None,
        local: list[Any] | None,
    ) -> None:
        self.ident = ident
        self.descriptor = descriptor
        self.listener = listener
        self.family = family
        self.state = state
        self.peer = peer
        self.local = local

    def entry(self) -> dict[str, Any]:
        """
        The manifest entry this connection would have had in the state
        document.
        """
        return {
            "id": self.ident,
            "listener": self.listener,
            "family": self.family,
            "state": self.state.toPlain(),
            "output": "",
            **(
                {"peer": self.peer, "local": self.local}
                if self.peer is not None
                else {}
            ),
        }


class Precopy:
    """
    Writes the connections described ahead, while the old image still
    serves, in a compact form: what many connections share (listener,
    address family, protocol class, version, buffer kinds) once, as a
    I{shape}; each connection as a list C{[id, descriptor, shape,
    appState, buffers, peer, local]}, its buffers as lists of values.
    It is parsed several times faster than the state document's entries.
    """

    def __init__(self) -> None:
        self._shapes: dict[tuple[Any, ...], int] = {}
        self._parts: list[str] = []

    def add(
        self,
        rows: list[tuple[int, int, str, int, ProtocolState, Any, Any]],
    ) -> None:
        """
        Encode some connections now (a slice of them, between reactor turns).

        @param rows: (id, descriptor, listener key, family, captured state,
            peer, local) of each; the states must be migratable and captured
            just now (their plain data is encoded here, before the
            application runs again).

        @raise StateError: if a state is not plain data.
        """
        encoded = []
        shapes = self._shapes
        for ident, descriptor, listener, family, state, peer, local in rows:
            buffers = state.buffers
            kinds = tuple(
                (name, tuple(sorted(key for key in saved if key != "buffer")))
                for name, saved in buffers.items()
            )
            key = (listener, family, state.className, state.version, kinds)
            shape = shapes.get(key)
            if shape is None:
                shape = shapes[key] = len(shapes)
            encoded.append(
                [
                    ident,
                    descriptor,
                    shape,
                    state.appState,
                    [
                        [base64.b64encode(buffers[name]["buffer"]).decode("ascii")]
                        + [buffers[name][field] for field in fields]
                        for name, fields in kinds
                    ],
                    peer,
                    local,
                ]
            )
        if not encoded:
            return
        try:
            self._parts.append(
                json.dumps(
                    encoded, ensure_ascii=True, allow_nan=False, separators=(",", ":")
                )[1:-1]
            )
        except (TypeError, ValueError) as e:
            raise StateError("the pre-copy is not plain data: {}".format(e))

    def write(self) -> int:
        """
        Write everything added into a new sealed memory file (close-on-exec
        until the freeze makes it inheritable).

        @return: the file's descriptor; the caller closes it if the C{exec}
            does not happen.

        @raise StateError: if it would exceed L{MAX_STATE_BYTES}.
        """
        shapes = [
            {
                "listener": listener,
                "family": family,
                "className": className,
                "version": version,
                "buffers": [[name, list(fields)] for name, fields in kinds],
            }
            for (listener, family, className, version, kinds) in self._shapes
        ]
        data = '{{"format":{},"shapes":{},"connections":[{}]}}'.format(
            FORMAT_VERSION,
            json.dumps(shapes, ensure_ascii=True, separators=(",", ":")),
            ",".join(self._parts),
        ).encode("ascii")
        if len(data) > MAX_STATE_BYTES:
            raise StateError(
                "the pre-copy takes {} bytes, more than the limit of {}".format(
                    len(data), MAX_STATE_BYTES
                )
            )
        return writeMemfd(data, "migrate-reexec-precopy", inheritable=False)


def _readPrecopy(state: ReexecState) -> ReexecState:
    """
    Read the pre-copy the document names (see L{mergePrecopy}), and close
    its file.
    """
    assert state.precopy is not None
    try:
        data = readMemfd(state.precopy, maxBytes=MAX_STATE_BYTES)
    except Exception as e:
        raise StateError("cannot read the pre-copy: {}".format(e)) from e
    finally:
        os.close(state.precopy)
    return mergePrecopy(state, data)


def _buffer(text: object) -> bytes:
    """
    Decode a buffer's canonical base64 text, strictly.
    """
    if text == "":
        return b""
    if type(text) is not str:
        raise StateError("a buffer must be base64 text")
    try:
        encoded = text.encode("ascii")
        decoded = base64.b64decode(encoded, validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise StateError("a buffer is not valid base64: {}".format(e)) from e
    if base64.b64encode(decoded) != encoded:
        raise StateError("a buffer is not canonical base64")
    return decoded


def _shapes(document: dict[str, Any]) -> list[tuple[str, int, str, int, Any]]:
    found = []
    for index, each in enumerate(_list(document.get("shapes"), "pre-copy shapes")):
        where = "pre-copy shapes[{}]".format(index)
        each = _dict(each, where)
        kinds = []
        for kind in _list(each.get("buffers"), where + ".buffers"):
            kind = _list(kind, where + ".buffers[]")
            if len(kind) != 2:
                raise StateError(where + ": malformed buffer kind")
            fields = _list(kind[1], where + ".buffers[] fields")
            kinds.append(
                (
                    _str(kind[0], where + ".buffers[] name"),
                    tuple(_str(field, where + ".buffers[] field") for field in fields),
                )
            )
        found.append(
            (
                _str(each.get("listener"), where + ".listener"),
                _int(each.get("family"), where + ".family"),
                _str(each.get("className"), where + ".className"),
                _int(each.get("version"), where + ".version", -(1 << 62)),
                tuple(kinds),
            )
        )
    return found


def mergePrecopy(state: ReexecState, data: bytes) -> ReexecState:
    """
    Read the pre-copy C{data} (as L{Precopy} wrote it) into C{state}: every
    pre-copied connection not superseded, after the connections described
    at the freeze (they were the active ones).

    Read strictly (the structure, every type, the buffers' canonical
    base64, no connection or descriptor named twice), but each application
    state is not walked again: the file was sealed by this process's
    previous image, which checked every state as it captured it, and
    C{json.loads} (non-finite numbers refused) gives plain data only.

    @raise StateError: if it cannot be read.
    """
    document = _dict(_parse(data, "pre-copy"), "pre-copy")
    version = _int(document.get("format"), "pre-copy format", 1)
    if version > FORMAT_VERSION:
        raise StateError("the pre-copy has format {}".format(version))
    shapes = _shapes(document)
    superseded = set(state.superseded)
    idents = {each.entry.get("id") for each in state.connections}
    precopied = []
    for row in _list(document.get("connections"), "pre-copy connections"):
        if type(row) is not list or len(row) != 7:
            raise StateError("pre-copy: a malformed connection")
        ident, descriptor, shape, appState, buffers, peer, local = row
        if (
            type(ident) is not int
            or type(descriptor) is not int
            or descriptor < 3
            or type(shape) is not int
            or not 0 <= shape < len(shapes)
            or type(buffers) is not list
        ):
            raise StateError("pre-copy: a malformed connection")
        if ident in idents:
            raise StateError("pre-copy: connection {} named twice".format(ident))
        idents.add(ident)
        if ident in superseded:
            continue
        listener, family, className, classVersion, kinds = shapes[shape]
        if len(buffers) != len(kinds):
            raise StateError("pre-copy: connection {}'s buffers".format(ident))
        saved = {}
        for (name, fields), values in zip(kinds, buffers):
            if type(values) is not list or len(values) != len(fields) + 1:
                raise StateError("pre-copy: connection {}'s buffers".format(ident))
            kind = dict(zip(fields, values[1:]))
            kind["buffer"] = _buffer(values[0])
            saved[name] = kind
        for address in (peer, local):
            if address is not None and type(address) is not list:
                raise StateError("pre-copy: connection {}'s address".format(ident))
        precopied.append(
            PrecopiedConnection(
                ident,
                descriptor,
                listener,
                family,
                ProtocolState(className, True, classVersion, appState, saved),
                peer,
                local,
            )
        )
    merged = evolve(state, precopied=tuple(precopied), precopy=None)
    named = merged.descriptors()
    if len(set(named)) != len(named):
        raise StateError("a descriptor is named twice")
    return merged


def afterCaretaker(
    prelude: ReexecState, final: ReexecState, inherited: Iterable[int] | None = None
) -> ReexecState:
    """
    What the new image restores when a caretaker served while it started
    (see L{migrate.strategies._reexec._caretaker}): the caretaker's document,
    and the connections of the pre-copy the new image read from the old
    image's C{prelude} that still hold (not superseded by the caretaker).

    @param inherited: the descriptors the new image inherited, if known:
        the caretaker's document may name no other.

    @raise StateError: if the two do not fit together.
    """
    if final.precopy is not None or final.precopied:
        raise StateError("the caretaker's document names a pre-copy")
    if (final.pid, final.generation) != (prelude.pid, prelude.generation):
        raise StateError("the caretaker's document is of another generation")
    superseded = set(final.superseded)
    merged = evolve(
        final,
        precopied=tuple(
            each for each in prelude.precopied if each.ident not in superseded
        ),
        superseded=(),
        blockedSignals=prelude.blockedSignals,
    )
    named = merged.descriptors()
    if len(set(named)) != len(named):
        raise StateError("a descriptor is named twice")
    if inherited is not None:
        strangers = set(named) - set(inherited)
        if strangers:
            raise StateError(
                "the caretaker's document names descriptors this image did not "
                "inherit: {}".format(sorted(strangers)[:10])
            )
    return merged


def readState(descriptor: int) -> ReexecState:
    """
    Read the state the previous image left in the memory file
    C{descriptor}, and close that file.

    @raise StateError: if the document cannot be read (see
        L{ReexecState.fromPlain}).
    """
    try:
        data = readMemfd(descriptor, maxBytes=MAX_STATE_BYTES)
    except Exception as e:
        raise StateError("cannot read the state document: {}".format(e)) from e
    finally:
        os.close(descriptor)
    # Parsed without the codec's depth scan: the document was written by
    # this process's previous image a moment ago, into a sealed file, and
    # the clients wait.  Each connection's state is checked again as it is
    # restored.
    state = ReexecState.fromPlain(_parse(data, "state document"))
    if state.precopy is not None:
        state = _readPrecopy(state)
    return state
