"""
Verified fakes for testing code that uses migrate.

L{FakeStrategy} stands in for a real L{IMigrationStrategy} in a
L{migrate.MigrationHost}: it starts no process and moves nothing, records
what the host asks of it and lets the test decide when and how each
migration ends.  It passes the same contract tests as the strategies that
ship with migrate (see C{migrate.test.test_host}).

L{roundTrip} moves one protocol to new code the way a migration moves a
connection (capture, encoding, version upgrade, restore), in the test's own
process: a unit test of an L{migrate.interfaces.IMigratable} implementation
needs no process and no socket.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from ._codec import decodeState, encodeState
from .interfaces import IMigrationHost, IMigrationStrategy
from .state import (
    ProtocolState,
    StateError,
    captureProtocolState,
    isMigratable,
    replayBufferedInput,
    restoreProtocolState,
)

__all__ = [
    "FakeStrategy",
    "FakeMigration",
    "FakeInheritance",
    "RoundTrip",
    "roundTrip",
]


@define
class FakeMigration:
    """
    One call to L{FakeStrategy.migrate}.

    @ivar host: the host that asked for the migration.
    @ivar progress: the progress callable the host gave.
    @ivar result: the L{Deferred} the strategy returned; fire it with a
        L{migrate.MigrationReport} (or fail it) to end the migration.
    """

    host: IMigrationHost
    progress: Callable[[str], None]
    result: Deferred[Any] = field(factory=Deferred)


@define
class FakeInheritance:
    """
    One call to L{FakeStrategy.inherit}.

    @ivar host: the host that inherits.
    @ivar inheritance: what it was given to inherit.
    @ivar result: the L{Deferred} the strategy returned.
    """

    host: IMigrationHost
    inheritance: Any
    result: Deferred[None] = field(factory=Deferred)


@implementer(IMigrationStrategy)
@define
class FakeStrategy:
    """
    An L{IMigrationStrategy} that records every call and returns a
    L{Deferred} the test fires.

    @ivar name: the strategy's name.
    @ivar migrations: every L{FakeMigration}, oldest first.
    @ivar inheritances: every L{FakeInheritance}, oldest first.
    """

    name: str = "fake"
    migrations: list[FakeMigration] = field(factory=list)
    inheritances: list[FakeInheritance] = field(factory=list)

    def migrate(
        self, host: IMigrationHost, progress: Callable[[str], None]
    ) -> Deferred[Any]:
        """
        Record the migration and return its unfired L{Deferred}.
        """
        call = FakeMigration(host, progress)
        self.migrations.append(call)
        return call.result

    def inherit(self, host: IMigrationHost, inheritance: Any) -> Deferred[None]:
        """
        Record the inheritance and return its unfired L{Deferred}.
        """
        call = FakeInheritance(host, inheritance)
        self.inheritances.append(call)
        return call.result


@frozen
class RoundTrip:
    """
    What L{roundTrip} made of a protocol.

    @ivar protocol: the new code's protocol, restored from the state the
        old one gave, connected to L{transport}.
    @ivar transport: the new protocol's transport, a L{StringTransport}
        with the same peer and host addresses as the old one: what the
        restored protocol writes is in C{transport.value()}.
    @ivar state: the state as it arrived on the new side (after encoding
        and decoding; before the new code upgraded it).
    @ivar size: how many bytes the state took once encoded.
    """

    protocol: Any
    transport: StringTransport
    state: ProtocolState
    size: int


def roundTrip(
    protocol: IProtocol,
    newFactory: IProtocolFactory,
    *,
    peer: IAddress | None = None,
    replay: bool = True,
) -> RoundTrip:
    """
    Move a protocol to new code the way a migration moves a connection, in
    one process and without sockets: for unit tests of
    L{IMigratable<migrate.interfaces.IMigratable>} implementations in
    trial.

    In order, as C{capability}, C{reexec} and C{reload} do: the old
    protocol's state is captured (C{getMigrationState()} and the input
    Twisted's base protocols hold), encoded as it is for another process
    and decoded and checked again; C{newFactory} builds the new protocol
    for the same peer; it is connected to a new L{StringTransport} without
    C{connectionMade}; C{upgradeMigrationState} runs if the versions
    differ, then C{restoreMigrationState}; finally the complete messages
    the restored buffers hold are delivered, as they are when the moved
    connection reads again.

    The old protocol is left as a migration leaves it: nothing is called
    on it after C{getMigrationState()} (no C{connectionLost}).  What it
    wrote to its own transport stays there; a real migration would carry
    output not yet sent, which a test's transport does not have.

    @param protocol: the old code's protocol, connected (its transport's
        C{getPeer()} names the peer unless C{peer} is given).  Call it
        between two C{dataReceived} calls, as a migration does.
    @param newFactory: the new code's factory (the same one several times
        to move several connections into one new process).
    @param peer: the peer address to give C{newFactory.buildProtocol};
        by default the old transport's peer, or 127.0.0.1 port 40000.
    @param replay: whether to deliver the complete messages held in the
        restored buffers (set C{False} to look at them first; then call
        L{migrate.state.replayBufferedInput} yourself).

    @return: the new protocol, its transport and the state that travelled.

    @raise StateError: what a migration would refuse the connection for:
        the old state is not plain data or beyond the limits, a protocol
        (old or new) does not provide C{IMigratable}, the new factory
        returns L{None}, or the new code refuses the state (a
        L{migrate.state.RestoreError}, whose C{__cause__} is the
        application's exception).
    """
    state = captureProtocolState(protocol)
    if not state.migratable:
        raise StateError(
            f"{state.className} does not provide IMigratable: its connections "
            "do not move (they drain on the old code)"
        )
    encoded = encodeState(state.toPlain())
    arrived = ProtocolState.fromPlain(decodeState(encoded), owned=True)
    oldTransport = getattr(protocol, "transport", None)
    hostAddress = None
    if peer is None and oldTransport is not None:
        peer = oldTransport.getPeer()
        hostAddress = oldTransport.getHost()
    if peer is None:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
    transport = StringTransport(hostAddress=hostAddress, peerAddress=peer)
    new = newFactory.buildProtocol(peer)
    if new is None:
        raise StateError(
            "the new factory refused the connection (buildProtocol returned None)"
        )
    if not isMigratable(new):
        raise StateError(
            f"the new code's {type(new).__qualname__} does not provide IMigratable"
        )
    app: Any = new
    app.transport = transport
    app.connected = 1
    restoreProtocolState(new, arrived)
    if replay:
        replayBufferedInput(new)
    return RoundTrip(new, transport, arrived, len(encoded))
