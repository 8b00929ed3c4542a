"""
Moving established connections: freezing and describing them on the side
that lets go (or only describing them, for an image about to be replaced),
adopting and restoring them on the side that takes over.

Shared by every strategy that moves connections to another process or
image (capability transfer, re-exec): each entry is plain data that
travels in a manifest, next to the connection's descriptor.
"""

from __future__ import annotations

import base64
import socket
import sys
from typing import Any, Iterable, Iterator

from attrs import define
from twisted.internet.tcp import Connection
from twisted.logger import Logger

from .._host._tracking import HostedProtocol, PendingAdoptionFactory
from ..interfaces import IMigrationHost
from ..state import (
    NotAtSafePoint,
    ProtocolState,
    StateError,
    captureProtocolState,
    hasBufferedInput,
    isMigratable,
    replayBufferedInput,
    restoreProtocolState,
)
from ._transport import (
    DetachedTransport,
    FrozenConnection,
    abandonConnection,
    adoptConnection,
    freezeConnection,
    pendingOutput,
    resumeConnection,
)

__all__ = [
    "AdoptedConnection",
    "DescribedConnection",
    "StagedConnection",
    "MovingConnection",
    "Unmovable",
    "captureToMove",
    "describeFailure",
    "describePeer",
    "adoptEntry",
    "stageEntry",
    "describeMovable",
    "manifestEntry",
    "movableCandidates",
    "freezeMovable",
]

_log = Logger()

#: the address families a manifest may name (anything else is probed)
_families = {
    int(family): family for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
}


def describePeer(hosted: Any) -> str:
    """
    Who is at the other end of a hosted connection, for messages naming it:
    C{"127.0.0.1:40000"}, C{"unix:/run/app.sock"}.

    @param hosted: a L{HostedProtocol} (anything with C{getPeer()}).
    """
    try:
        peer = hosted.getPeer()
    except Exception:
        return "an unknown peer"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return "{}:{}".format(host, port)
    name = getattr(peer, "name", None)
    if name:
        return "unix:" + (
            name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        )
    return "a {} peer".format(type(peer).__name__)


@define
class MovingConnection:
    """
    A connection frozen on the side that lets go of it.

    @ivar ident: its number in the manifest.
    @ivar listenerKey: the listener it was accepted on.
    @ivar hosted: its L{HostedProtocol}.
    @ivar frozen: the frozen transport (to release or resume).
    @ivar entry: its manifest entry (plain data).
    """

    ident: int
    listenerKey: str
    hosted: HostedProtocol
    frozen: FrozenConnection
    entry: dict[str, Any]

    def release(self) -> None:
        """
        The other side holds it now: let go silently.
        """
        self.frozen.release()
        self.hosted.release()

    def resume(self) -> None:
        """
        It stays here: carry on as if nothing happened.
        """
        self.frozen.resume()


@define
class Unmovable:
    """
    A connection that stays where it is, and why.
    """

    listenerKey: str
    hosted: HostedProtocol
    reason: str
    #: whether it may move at its next safe point (it is busy now)
    later: bool = False


def describeFailure(error: BaseException) -> str:
    text = str(error)
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def whyNotMigratable(protocol: Any) -> str:
    """
    Why a connection whose protocol does not provide L{IMigratable} stays,
    in words an operator can act on.

    TLS inside the application (its factory wraps its protocol with
    Twisted's C{TLSMemoryBIOProtocol}, to offer ALPN, say) is named as
    such: a TLS session's keys live in OpenSSL and cannot move.
    """
    # Twisted's TLS needs pyOpenSSL, which the core does not: no instance
    # exists unless its module was imported.
    tls = sys.modules.get("twisted.protocols.tls")
    if tls is not None and isinstance(protocol, tls.TLSMemoryBIOProtocol):
        inner = getattr(protocol, "wrappedProtocol", None)
        return (
            "TLS in the application ({} over TLSMemoryBIOProtocol): a TLS "
            "session cannot move".format(type(inner).__name__)
        )
    return "{} does not provide IMigratable".format(type(protocol).__name__)


def newMigratableProtocol(factory: Any, peer: Any) -> Any:
    """
    The new code's protocol for a connection that moves in: built by its
    listener's C{factory} (C{buildApplicationProtocol}) for C{peer}.

    @raise StateError: if the factory refuses the connection, or its
        protocol does not provide L{IMigratable}; what C{buildProtocol}
        raises passes through.
    """
    protocol = factory.buildApplicationProtocol(peer)
    if protocol is None:
        raise StateError("the new factory refused the connection")
    if not isMigratable(protocol):
        raise StateError(
            "the new code's {} does not provide IMigratable".format(
                type(protocol).__name__
            )
        )
    return protocol


def movableCandidates(
    connections: Iterable[tuple[Any, HostedProtocol]], staying: list[Unmovable]
) -> Iterator[tuple[str, HostedProtocol, Any, Any]]:
    """
    The live connections that may move if their state can be captured, as
    (listener key, hosted protocol, protocol, transport); those that cannot
    move whatever their state are added to C{staying}, with the reason.
    """
    for listener, hosted in list(connections):
        key = listener.key
        protocol = hosted.wrappedProtocol
        transport = hosted.transport
        if protocol is None or hosted.released:
            continue
        if not isinstance(transport, Connection) or getattr(transport, "TLS", False):
            staying.append(Unmovable(key, hosted, "not a plain stream socket"))
        elif not isMigratable(protocol):
            staying.append(Unmovable(key, hosted, whyNotMigratable(protocol)))
        else:
            yield key, hosted, protocol, transport


def manifestEntry(
    ident: int, key: str, transport: Any, state: ProtocolState, output: bytes
) -> dict[str, Any]:
    return {
        "id": ident,
        "listener": key,
        "family": int(transport.socket.family),
        "state": state.toPlain(),
        "output": base64.b64encode(output).decode("ascii"),
    }


def captureToMove(key: str, protocol: Any) -> ProtocolState:
    """
    Capture a migratable protocol's state for the manifest, logging why not.

    @raise Exception: if it cannot be captured.
    """
    try:
        # Encoded into the manifest before the application runs again:
        # no snapshot copy needed.
        return captureProtocolState(protocol, snapshot=False)
    except NotAtSafePoint as e:
        _log.debug(
            "Connection on {listener} cannot move now: {why}",
            listener=key,
            why=str(e),
        )
        raise
    except Exception as e:
        _log.warn(
            "Connection on {listener} cannot move, it stays: {why}",
            listener=key,
            why=describeFailure(e),
        )
        raise


def freezeMovable(
    connections: Iterable[tuple[Any, HostedProtocol]],
) -> tuple[list[MovingConnection], list[Unmovable]]:
    """
    Freeze every connection that can move and describe it; leave the others
    untouched.

    A connection can move when it is a plain stream socket (TCP or Unix; not
    TLS) and its protocol provides L{migrate.IMigratable} and gives a state
    the codec accepts.

    @param connections: (listener, hosted protocol) pairs, as from
        L{migrate.MigrationHost.allConnections}.

    @return: the frozen connections, and those that stay.
    """
    moving: list[MovingConnection] = []
    staying: list[Unmovable] = []
    for key, hosted, protocol, transport in movableCandidates(connections, staying):
        try:
            frozen = freezeConnection(transport)
        except ValueError as e:
            staying.append(Unmovable(key, hosted, str(e)))
            continue
        try:
            state = captureToMove(key, protocol)
        except Exception as e:
            frozen.resume()
            staying.append(
                Unmovable(
                    key, hosted, describeFailure(e), later=isinstance(e, NotAtSafePoint)
                )
            )
            continue
        ident = len(moving) + 1
        entry = manifestEntry(ident, key, transport, state, frozen.pendingOutput)
        moving.append(MovingConnection(ident, key, hosted, frozen, entry))
    return moving, staying


@define
class DescribedConnection:
    """
    A connection described, not frozen, for the image that replaces this
    one (see L{describeMovable}).

    @ivar listenerKey: the listener it was accepted on.
    @ivar transport: its transport, left as it was.
    @ivar entry: its manifest entry (plain data).
    """

    listenerKey: str
    transport: Any
    entry: dict[str, Any]

    def descriptor(self) -> int:
        """
        The connection's descriptor, for the new image.
        """
        return int(self.transport.fileno())


def describeMovable(
    connections: Iterable[tuple[Any, HostedProtocol]],
    firstIdent: int = 1,
) -> tuple[list[DescribedConnection], list[Unmovable]]:
    """
    Describe every connection that can move, as L{freezeMovable} does, but
    without freezing it: for a caller that replaces the process image
    (C{execv}) before the reactor runs again, so that nothing reads,
    writes or serves a connection between its capture and the new image.
    Freezing each one would only cost the clients time, and if the C{exec}
    fails there is nothing to undo.

    @param firstIdent: the number of the first connection described (the
        ones before were described ahead, by a pre-copy).

    @return: the described connections, and those that stay.
    """
    moving: list[DescribedConnection] = []
    staying: list[Unmovable] = []
    for key, hosted, protocol, transport in movableCandidates(connections, staying):
        try:
            state = captureToMove(key, protocol)
        except Exception as e:
            staying.append(Unmovable(key, hosted, describeFailure(e)))
            continue
        try:
            # After the state: output its capture wrote is not lost.
            output = pendingOutput(transport)
        except ValueError as e:
            staying.append(Unmovable(key, hosted, str(e)))
            continue
        entry = manifestEntry(firstIdent + len(moving), key, transport, state, output)
        moving.append(DescribedConnection(key, transport, entry))
    return moving, staying


@define
class AdoptedConnection:
    """
    A connection adopted and restored, held (neither reading nor writing)
    until the hand-off commits.
    """

    hosted: HostedProtocol
    transport: Any
    pendingOutput: bytes = b""

    def commit(self) -> None:
        """
        Serve it: send what was pending, read, and deliver complete
        messages already buffered.  What the application answers to the
        requests its client sent meanwhile goes out at once
        (L{HostedProtocol.writeAtOnceUntilRead}).
        """
        self.hosted.writeAtOnceUntilRead()
        self.hosted.unhold(self.pendingOutput)
        resumeConnection(self.transport)
        protocol = self.hosted.wrappedProtocol
        if protocol is not None:
            try:
                replayBufferedInput(protocol)
            except Exception:
                _log.failure("Replaying buffered input failed")

    def hasWork(self) -> bool:
        """
        Whether serving it does something for its client even if nothing
        more arrives: output to send (the old process's, or what the new
        code wrote, or a close it asked for, while held), or buffered input
        to deliver (L{hasBufferedInput}).
        """
        if self.pendingOutput or self.hosted.holdsOutput():
            return True
        protocol = self.hosted.wrappedProtocol
        return protocol is not None and hasBufferedInput(protocol)

    def abandon(self) -> None:
        """
        Give it back untouched: the other side keeps serving it.
        """
        abandonConnection(self.transport)
        self.hosted.release()


@define
class StagedConnection:
    """
    A connection adopted held, with the new code's protocol built and
    attached but not restored yet: pre-copy stages connections while the
    old process still serves them, and restores them at the commit, from
    the state as it was then (see L{migrate._handoff._precopy}).

    @ivar ident: its number in the manifest.
    @ivar hosted: its L{HostedProtocol}, holding what the protocol writes.
    @ivar transport: the adopted transport, not reading.
    @ivar protocol: the new code's protocol, attached to C{hosted}.
    @ivar state: the state to restore it from.
    @ivar pendingOutput: what the old process had not written; sent first
        when the connection is served.
    """

    ident: Any
    hosted: HostedProtocol
    transport: Any
    protocol: Any
    state: ProtocolState
    pendingOutput: bytes = b""
    #: whether C{protocol} was restored ahead of the freeze (see
    #: L{restoreAhead}) and not abandoned since
    restoredAhead: bool = False
    #: the peer's address, if known already (a connection's peer never
    #: changes): L{rebuild} and L{abandonAhead} need it at the freeze
    peer: Any = None

    def _peer(self) -> Any:
        """
        The peer's address, asked of the transport once.
        """
        peer = self.peer
        if peer is None:
            peer = self.peer = self.transport.getPeer()
        return peer

    def canRestoreAhead(self) -> bool:
        """
        Whether the new code's protocol can abandon a restore (its class
        defines C{abandonMigrationState}, see L{migrate.IMigratable}): only
        then may it be restored ahead of the freeze.
        """
        return callable(getattr(type(self.protocol), "abandonMigrationState", None))

    def update(self, entry: Any) -> bool:
        """
        Take what changed since the pre-copy, from a freeze's entry: a new
        C{"state"} (if the state changed), or a new C{"appState"} alone
        (if only the application state did, see
        L{migrate._handoff._precopy.freezeDelta}), and the C{"output"}
        still to send.

        @return: whether the state changed.

        @raise StateError: if the entry is malformed; nothing changes then.
        """
        try:
            if not isinstance(entry, dict):
                raise StateError("not an object")
            if "state" in entry:
                if "appState" in entry:
                    raise StateError("both a state and an application state")
                state = ProtocolState.fromPlain(entry["state"], owned=True)
            elif "appState" in entry:
                state = self.state.withApplicationState(entry["appState"], owned=True)
            else:
                state = self.state
            output = entry.get("output", "")
            # No output, as for almost every connection: nothing to decode.
            output = (
                b""
                if type(output) is str and not output
                else base64.b64decode(output, validate=True)
            )
        except Exception as e:
            raise StateError(
                "bad change for connection {}: {}".format(
                    self.ident, describeFailure(e)
                )
            )
        changed = state is not self.state
        self.state = state
        self.pendingOutput = output
        return changed

    def updateState(self, plain: Any) -> None:
        """
        Take a fresh copy of the state (in plain form), from a re-copy
        between the pre-copy and the freeze: the old process still serves
        the connection, and still holds its output.

        @raise StateError: if it is malformed; nothing changes then.
        """
        try:
            state = ProtocolState.fromPlain(plain, owned=True)
        except Exception as e:
            raise StateError(
                "bad re-copy of connection {}: {}".format(
                    self.ident, describeFailure(e)
                )
            )
        self.state = state

    def restore(self) -> AdoptedConnection:
        """
        Restore the protocol from its state, in place of C{connectionMade}.

        @return: the connection, held until its commit.

        @raise Exception: why the new code refused the state; the connection
            must then be abandoned.
        """
        if not self.state.migratable:
            raise StateError("the old protocol did not provide IMigratable")
        # The state was checked as it was decoded (ProtocolState.fromPlain).
        restoreProtocolState(self.protocol, self.state, copyState=False, validate=False)
        return AdoptedConnection(self.hosted, self.transport, self.pendingOutput)

    def restoreAhead(self) -> None:
        """
        Restore the protocol now, from the state pre-copied, ahead of the
        freeze: what it writes is held, nothing reaches it, and nothing is
        served.  At the freeze, L{held} serves it as it is, if its
        connection did not change since; or L{abandonAhead} lets go of it
        and a fresh protocol is restored from the new state.

        @raise Exception: why the new code refused the state; the
            connection must then be abandoned (L{abandonAhead} first).
        """
        self.restore()
        self.restoredAhead = True

    def held(self) -> AdoptedConnection:
        """
        The connection restored ahead (L{restoreAhead}), held until its
        commit: nothing to restore again.
        """
        return AdoptedConnection(self.hosted, self.transport, self.pendingOutput)

    def abandonAhead(self) -> None:
        """
        Let go of the protocol restored ahead of the freeze, which will
        never serve: what it wrote is dropped (and a producer it registered
        on the connection unregistered), it is told
        C{abandonMigrationState()} (undoing what its restore registered
        outside the object, cancelling its timers), and it is left with a
        transport that goes nowhere.  A fresh protocol of the new code is
        then attached in its place (L{rebuild}), or the connection is
        abandoned.

        @raise Exception: what C{abandonMigrationState} raised; the object
            is let go of all the same.
        """
        if not self.restoredAhead:
            return
        self.restoredAhead = False
        stale = self.protocol
        # What it wrote (and any close it asked for) never leaves.
        self.hosted.hold()
        # The connection was adopted with no producer: one registered since
        # was registered by that restore (or its timers), for it.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        try:
            stale.abandonMigrationState()
        finally:
            stale.transport = DetachedTransport.lazily(
                self._peer(), self.transport.getHost
            )
            stale.connected = 0

    def rebuild(self) -> None:
        """
        Attach a fresh protocol of the new code, built by its factory as
        for a new connection, for L{restore} to restore from the state now
        (after L{abandonAhead}).

        @raise StateError: if the new factory refuses the connection.
        """
        try:
            protocol = newMigratableProtocol(self.hosted.factory, self._peer())
        except StateError:
            raise
        except Exception as e:
            raise StateError(
                "the new factory's buildProtocol failed: {}".format(describeFailure(e))
            )
        self.hosted.attach(protocol)
        self.protocol = protocol

    def abandon(self) -> None:
        """
        Give it back untouched: the old process keeps serving it.  A
        protocol restored ahead is let go of first (L{abandonAhead}); if
        its C{abandonMigrationState} fails, that is logged, and the
        connection is given back all the same.
        """
        try:
            self.abandonAhead()
        except Exception:
            _log.failure(
                "The new code failed to abandon connection {ident}, restored "
                "ahead of the freeze",
                ident=self.ident,
            )
        abandonConnection(self.transport)
        self.hosted.release()


def stageEntry(host: IMigrationHost, entry: Any, descriptor: int) -> StagedConnection:
    """
    Adopt one connection held, with the new code's protocol built for it,
    without restoring it yet.

    @param host: the L{migrate.MigrationHost} taking over.
    @param entry: the connection's manifest entry.
    @param descriptor: its descriptor (always consumed).

    @raise Exception: why it is refused; the connection is then let go of
        without disturbing it.
    """
    try:
        if not isinstance(entry, dict):
            raise StateError("manifest entry is not an object")
        listener = host.listenerNamed(entry["listener"])
        state = ProtocolState.fromPlain(entry["state"], owned=True)
        output = base64.b64decode(entry["output"], validate=True)
        family = _families.get(entry.get("family"))  # type: ignore[arg-type]
    except Exception as e:
        import os

        os.close(descriptor)
        raise StateError("bad manifest entry: {}".format(describeFailure(e)))
    pending = PendingAdoptionFactory(listener.factory)
    transport = adoptConnection(host.reactor, descriptor, pending, family, hold=False)
    hosted = pending.built
    assert hosted is not None
    hosted.hold()
    try:
        if not state.migratable:
            raise StateError("the old protocol did not provide IMigratable")
        peer = transport.getPeer()
        protocol = newMigratableProtocol(listener.factory, peer)
        hosted.attach(protocol)
    except Exception:
        abandonConnection(transport)
        hosted.release()
        raise
    return StagedConnection(
        entry.get("id"), hosted, transport, protocol, state, output, peer=peer
    )


def adoptEntry(host: IMigrationHost, entry: Any, descriptor: int) -> AdoptedConnection:
    """
    Adopt one connection held, with the new code's protocol restored from
    its manifest entry.

    @param host: the L{migrate.MigrationHost} taking over.
    @param entry: the connection's manifest entry.
    @param descriptor: its descriptor (always consumed).

    @raise Exception: why it is refused; the connection is then let go of
        without disturbing it.
    """
    staged = stageEntry(host, entry, descriptor)
    try:
        return staged.restore()
    except Exception:
        staged.abandon()
        raise
