"""
Pre-copy, on the side that lets go: hand the process taking over each
connection's descriptor and a first copy of its state while this process
still serves it, so that the freeze only has to carry what changed since.  Between the two, a few
re-copy rounds (L{recopyChanged}) send again the state of every connection
that changed since its last copy, so that the freeze, under load, finds
few changed: the longer since a connection's copy, the likelier its client
has sent something since.

Live migration of virtual machines does the same with memory pages.  Here
the "pages" are connections: L{precopyMovable} describes every connection
that can move (without freezing it) and keeps a L{StateFingerprint} of the
state it sent; at the freeze, L{freezeDelta} compares each connection with
its fingerprint (its encoded application state, its base-protocol buffers)
and describes again only those that changed, plus the output Twisted still
holds for any of them.  A connection that closed meanwhile, started closing,
or is busy (not at a safe point) is I{withdrawn}: the process taking over
drops its copy, and this process keeps it.

Nothing here freezes a connection: the caller does the freeze and the
commit in one reactor step (nothing reads or writes any connection in
between), and lets go of the moved ones (L{PrecopiedConnection.release})
before the reactor runs again.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Iterable, Iterator, Sequence, cast

from attrs import define, field

from .._host._tracking import HostedProtocol
from ..state import (
    _UNSURE,
    NotAtSafePoint,
    StateFingerprint,
    captureProtocolState,
)
from ._movement import (
    Unmovable,
    captureToMove,
    describeFailure,
    manifestEntry,
    movableCandidates,
)
from ._transport import letGo, stillMovable, unsentOutput

__all__ = [
    "FreezeDelta",
    "PrecopiedConnection",
    "freezeDelta",
    "freezeInParts",
    "precopyMovable",
    "recopyChanged",
]


@define
class PrecopiedConnection:
    """
    A connection whose descriptor and first state copy went to the process
    taking over, while this one goes on serving it.

    @ivar ident: its number in the manifests.
    @ivar listenerKey: the listener it was accepted on.
    @ivar hosted: its L{HostedProtocol}.
    @ivar transport: its transport, not frozen.
    @ivar fingerprint: what decides, at the freeze, whether its state
        changed since the copy.
    """

    ident: int
    listenerKey: str
    hosted: HostedProtocol
    transport: Any
    fingerprint: StateFingerprint

    def liveDescriptor(self) -> int | None:
        """
        The connection's descriptor, to send now, or L{None} if it has
        closed since the copy.
        """
        transport = self.transport
        if transport.disconnected or not transport.connected:
            return None
        return int(transport.fileno())

    def release(self) -> None:
        """
        The other process serves it now: let go silently, before the
        reactor runs again.
        """
        letGo(self.transport)
        self.hosted.release()


def precopyMovable(
    connections: Iterable[tuple[Any, HostedProtocol]], firstIdent: int = 1
) -> tuple[list[PrecopiedConnection], str]:
    """
    Describe every connection of C{connections} that can move now, without
    freezing any.

    A connection that cannot move now (busy, or a state the codec refuses)
    is left out: the freeze looks at it again, as it looks at connections
    accepted after the pre-copy.  Call it for a few hundred connections at
    a time, between reactor turns, so that the clients of this process do
    not wait for all of them: each batch is encoded at once, as its
    fingerprints are taken.

    @param connections: (listener, hosted protocol) pairs, as from
        L{migrate.MigrationHost.allConnections}.
    @param firstIdent: the manifest number of the first one described.

    @return: the pre-copied connections, and their manifest entries in the
        same order, encoded as JSON array items without the brackets (each
        carries no output: what Twisted holds then may still be written
        here, and travels at the freeze).
    """
    precopied: list[PrecopiedConnection] = []
    entries: list[dict[str, Any]] = []
    ignored: list[Unmovable] = []
    for key, hosted, protocol, transport in movableCandidates(connections, ignored):
        if not stillMovable(transport):
            continue
        try:
            # Encoded below (and fingerprinted) before the application runs
            # again: no snapshot copy needed.
            state = captureProtocolState(protocol, snapshot=False)
        except Exception:
            continue
        ident = firstIdent + len(precopied)
        entries.append(manifestEntry(ident, key, transport, state, b""))
        precopied.append(
            PrecopiedConnection(
                ident, key, hosted, transport, StateFingerprint.of(state, protocol)
            )
        )
    # Each state was checked as it was captured.
    encoded = json.dumps(
        entries, ensure_ascii=True, allow_nan=False, separators=(",", ":")
    )
    return precopied, encoded[1:-1]


def recopyChanged(
    precopied: Iterable[PrecopiedConnection],
) -> tuple[list[tuple[PrecopiedConnection, StateFingerprint]], str]:
    """
    Copy again the state of every pre-copied connection whose state
    changed since its last copy (its fingerprint no longer matches),
    without freezing any: a re-copy round between the pre-copy and the
    freeze.

    A connection that closed, started closing, is busy (not at a safe
    point) or whose state cannot be captured now is left for the freeze,
    which looks at every connection again.  Nothing is changed here: the
    caller sets each connection's new fingerprint once the other process
    has taken the new states (if it never does, the freeze still compares
    with the state it has).  Call it for a few hundred connections at a
    time, between reactor turns, as L{precopyMovable}.

    @return: each connection copied again with the fingerprint of the
        state now copied, and their entries in the same order, encoded as
        JSON array items without the brackets: C{{"id", "state"}}, no
        descriptor and no output (what Twisted holds may still be written
        here; it travels at the freeze).
    """
    recopied: list[tuple[PrecopiedConnection, StateFingerprint]] = []
    entries: list[dict[str, Any]] = []
    for each in precopied:
        hosted = each.hosted
        transport = each.transport
        protocol = hosted.wrappedProtocol
        if hosted.released or protocol is None or transport.disconnected:
            continue
        if not stillMovable(transport):
            continue
        try:
            if each.fingerprint.matches(protocol):
                continue
            # Encoded below (and fingerprinted) before the application runs
            # again: no snapshot copy needed.
            state = captureProtocolState(protocol, snapshot=False)
        except Exception:
            # Busy, or failing now: the freeze says why, if it still is.
            continue
        entries.append({"id": each.ident, "state": state.toPlain()})
        recopied.append((each, StateFingerprint.of(state, protocol)))
    # Each state was checked as it was captured.
    encoded = json.dumps(
        entries, ensure_ascii=True, allow_nan=False, separators=(",", ":")
    )
    return recopied, encoded[1:-1]


@define
class FreezeDelta:
    """
    What the freeze found among the pre-copied connections.

    @ivar moving: the connections that move at the commit, those that
        changed first (they were active most recently).
    @ivar changes: one entry per connection of C{moving} that changed or
        has output to send: C{{"id", "output"}}, plus C{"state"} when the
        state changed, or C{"appState"} when only the application state
        did and the other process takes that (see L{freezeDelta}).
    @ivar withdrawn: the connections that do not move with the commit:
        closed or closing, busy (C{later}), or no longer capturable; the
        other process drops its copy of each.  A closed one comes with
        L{None}: it needs no report.
    """

    moving: list[PrecopiedConnection] = field(factory=list)
    changes: list[dict[str, Any]] = field(factory=list)
    withdrawn: list[tuple[PrecopiedConnection, Unmovable | None]] = field(factory=list)

    def absorb(self, part: FreezeDelta) -> None:
        """
        Add what the freeze found in another part of the connections.
        """
        self.moving.extend(part.moving)
        self.changes.extend(part.changes)
        self.withdrawn.extend(part.withdrawn)

    def toPlain(self) -> dict[str, Any]:
        """
        The message the other process applies before it restores (it
        serves the changed connections first).
        """
        return {
            "changes": self.changes,
            "withdrawn": [each.ident for each, _ in self.withdrawn],
        }


def freezeDelta(
    precopied: Iterable[PrecopiedConnection], appStateOnly: bool = False
) -> FreezeDelta:
    """
    Compare every pre-copied connection with its fingerprint, from outside
    any connection's C{dataReceived}, in the reactor step that commits.

    @param appStateOnly: whether the process taking over takes a change of
        the application state alone (it said so, see
        L{migrate.strategies._transfer._channel.PrecopyConnections}): a
        connection of which only the application state changed (not its
        version nor its buffers, as under load: whole lines answered) is
        then described by C{"appState"} instead of a whole C{"state"},
        a quarter of the bytes to encode, send, decode and check.

    @return: what moves, what changed, and what stays here (with why, or
        L{None} for a connection that has closed).
    """
    delta = FreezeDelta()
    changed: list[PrecopiedConnection] = []
    unchanged: list[PrecopiedConnection] = []
    for each in precopied:
        hosted = each.hosted
        transport = each.transport
        protocol = hosted.wrappedProtocol
        if hosted.released or protocol is None or transport.disconnected:
            delta.withdrawn.append((each, None))
            continue
        if not stillMovable(transport):
            delta.withdrawn.append(
                (each, Unmovable(each.listenerKey, hosted, "closing"))
            )
            continue
        try:
            # One look at the application state and the buffers where it
            # can (a class whose instances the fingerprint compares the
            # quick way); the general way where it cannot tell.
            found = each.fingerprint.changeIfChanged(protocol, appStateOnly)
            if found is _UNSURE:
                same = each.fingerprint.matches(protocol)
                found = (
                    None
                    if same
                    else {"state": captureToMove(each.listenerKey, protocol).toPlain()}
                )
        except NotAtSafePoint as e:
            delta.withdrawn.append(
                (each, Unmovable(each.listenerKey, hosted, str(e), later=True))
            )
            continue
        except Exception as e:
            delta.withdrawn.append(
                (each, Unmovable(each.listenerKey, hosted, describeFailure(e)))
            )
            continue
        output = unsentOutput(transport)
        if found is None and not output:
            unchanged.append(each)
            continue
        change: dict[str, Any] = {
            "id": each.ident,
            "output": base64.b64encode(output).decode("ascii") if output else "",
        }
        if found is not None:
            change.update(cast(dict, found))
        delta.changes.append(change)
        changed.append(each)
    delta.moving = changed + unchanged
    return delta


def freezeInParts(
    precopied: Sequence[PrecopiedConnection],
    size: int,
    compare: Callable[[Sequence[PrecopiedConnection]], FreezeDelta] = freezeDelta,
    changedPerPart: int | None = None,
    step: int = 50,
) -> tuple[FreezeDelta, Iterator[dict[str, Any]], Callable[[], dict[str, Any]]]:
    """
    L{freezeDelta} a part at a time, for a freeze that streams its delta:
    the process taking over restores the connections of one part while
    this one compares the next.

    A part ends after C{size} connections, or as soon as C{changedPerPart}
    of them changed: restoring a changed connection costs the other process
    far more than an unchanged one, so that under load (every connection
    changed) the parts stay short and the two processes work side by side,
    instead of the other waiting for this one to compare a thousand.

    @param precopied: the pre-copied connections, in the order of their
        manifest numbers.
    @param size: the most connections a part covers.
    @param compare: makes the delta of a part (L{freezeDelta}).
    @param changedPerPart: the most changed connections a part carries
        (L{None}: no such bound); parts are then compared C{step}
        connections at a time.

    @return: the whole delta (filled in as the parts are made), the
        messages of the parts before the last (each made when it is asked
        for, saying C{"more": true} and, as C{"upTo"}, the manifest number
        of the last connection it covers), and a callable making the last
        message, the one the other process commits with.
    """
    delta = FreezeDelta()
    compared = 0

    def nextPart() -> FreezeDelta:
        nonlocal compared
        end = min(compared + size, len(precopied))
        if changedPerPart is None:
            part = compare(precopied[compared:end])
            compared = end
        else:
            pieces: list[FreezeDelta] = []
            changed = 0
            while compared < end and changed < changedPerPart:
                piece = compare(precopied[compared : min(compared + step, end)])
                compared = min(compared + step, end)
                pieces.append(piece)
                changed += len(piece.changes)
            part = _joined(pieces)
        delta.absorb(part)
        return part

    def parts() -> Iterator[dict[str, Any]]:
        while True:
            part = nextPart()
            if compared >= len(precopied):
                # Compared to the end: the last message carries it.
                parked.append(part)
                return
            plain = part.toPlain()
            plain["more"] = True
            plain["upTo"] = precopied[compared - 1].ident
            yield plain

    parked: list[FreezeDelta] = []

    def last() -> dict[str, Any]:
        if parked:
            return parked.pop().toPlain()
        if compared < len(precopied):
            raise RuntimeError("the last part asked for before the others")
        return FreezeDelta().toPlain()

    return delta, parts(), last


def _joined(pieces: Sequence[FreezeDelta]) -> FreezeDelta:
    """
    One part made of the deltas of consecutive runs of connections: the
    changed ones first, as in each.
    """
    part = FreezeDelta()
    for piece in pieces:
        part.changes.extend(piece.changes)
        part.withdrawn.extend(piece.withdrawn)
        part.moving.extend(piece.moving[: len(piece.changes)])
    for piece in pieces:
        part.moving.extend(piece.moving[len(piece.changes) :])
    return part
