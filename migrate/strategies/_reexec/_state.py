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

import json
import math
import os
import signal
from typing import Any, Mapping

from attrs import evolve, field, frozen

from ..._codec import StateError, encodeState
from ..._handoff._fdpass import readMemfd, writeMemfd

__all__ = [
    "EXEC_AT_VARIABLE",
    "FORMAT_VERSION",
    "MAX_STATE_BYTES",
    "PREFLIGHT_MARKER",
    "PREFLIGHT_VARIABLE",
    "REEXEC_SIGNALS",
    "STATE_FD_VARIABLE",
    "InheritedConnection",
    "ReexecState",
    "mergePrecopy",
    "encodePrecopyPart",
    "readState",
    "writePrecopy",
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
            **(
                {"precopy": self.precopy, "superseded": list(self.superseded)}
                if self.precopy is not None
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
            data = json.dumps(
                plain, ensure_ascii=True, allow_nan=False, separators=(",", ":")
            ).encode("ascii")
        except (TypeError, ValueError) as e:
            raise StateError("the state document is not plain data: {}".format(e))
        if len(data) > MAX_STATE_BYTES:
            raise StateError(
                "the state document takes {} bytes, more than the limit of "
                "{}".format(len(data), MAX_STATE_BYTES)
            )
    return writeMemfd(data, "migrate-reexec-state", inheritable=True)


def _refuseConstant(name: str) -> None:
    raise StateError("the document holds {}, which is not plain data".format(name))


def _parse(data: bytes, what: str) -> Any:
    """
    Parse JSON text of a document, strictly: C{NaN} and infinities are
    refused, so that every value is plain data.
    """
    try:
        return json.loads(data, parse_constant=_refuseConstant)
    except (ValueError, RecursionError) as e:
        raise StateError("the {} is not JSON: {}".format(what, e)) from e


def encodePrecopyPart(entries: list[dict[str, Any]]) -> str:
    """
    Encode some of the connections described ahead, for L{writePrecopy}.

    @param entries: their manifest entries, as L{InheritedConnection.toPlain}
        gives them, with distinct C{"id"}s.

    @return: the JSON text of the list of them.

    @raise StateError: if they are not plain data.
    """
    try:
        return json.dumps(
            entries, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as e:
        raise StateError("the pre-copy is not plain data: {}".format(e))


def writePrecopy(parts: list[str]) -> int:
    """
    Write the connections described ahead, while the old image still
    serves, into a new sealed memory file (close-on-exec until the freeze
    makes it inheritable).

    @param parts: from L{encodePrecopyPart}, each a non-empty list.

    @return: the file's descriptor; the caller closes it if the C{exec}
        does not happen.

    @raise StateError: if it would exceed L{MAX_STATE_BYTES}.
    """
    data = '{{"format":{},"connections":[{}]}}'.format(
        FORMAT_VERSION, ",".join(part[1:-1] for part in parts)
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
    Merge the pre-copy the document names into its connections: those
    described at the freeze first (they were the active ones), then every
    pre-copied one that was not superseded.  Closes the pre-copy's file.

    @raise StateError: if the pre-copy cannot be read, or names a
        connection or a descriptor twice.
    """
    assert state.precopy is not None
    try:
        data = readMemfd(state.precopy, maxBytes=MAX_STATE_BYTES)
    except Exception as e:
        raise StateError("cannot read the pre-copy: {}".format(e)) from e
    finally:
        os.close(state.precopy)
    return mergePrecopy(state, data)


def mergePrecopy(state: ReexecState, data: bytes) -> ReexecState:
    """
    Merge the pre-copy C{data} (as L{writePrecopy} wrote it) into the
    connections of C{state}: see L{_readPrecopy}.

    @raise StateError: if it cannot be read, or names a connection or a
        descriptor twice.
    """
    document = _dict(_parse(data, "pre-copy"), "pre-copy")
    version = _int(document.get("format"), "pre-copy format", 1)
    if version > FORMAT_VERSION:
        raise StateError("the pre-copy has format {}".format(version))
    superseded = set(state.superseded)
    idents = set()
    connections = list(state.connections)
    for each in state.connections:
        idents.add(each.entry.get("id"))
    for index, plain in enumerate(
        _list(document.get("connections"), "pre-copy connections")
    ):
        connection = InheritedConnection.fromPlain(
            plain, "pre-copy connections[{}]".format(index)
        )
        ident = connection.entry.get("id")
        if type(ident) is not int or ident in idents:
            raise StateError(
                "pre-copy connections[{}]: id {!r} missing or named twice".format(
                    index, ident
                )
            )
        idents.add(ident)
        if ident not in superseded:
            connections.append(connection)
    merged = evolve(state, connections=tuple(connections), precopy=None)
    named = merged.descriptors()
    if len(set(named)) != len(named):
        raise StateError("a descriptor is named twice")
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
