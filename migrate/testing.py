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
needs no process and no socket.  L{abandonedRestore} tests the optional
C{abandonMigrationState}: it restores a protocol into new code as module
reload does ahead of its pause, abandons it as the pause does when the
connection changed meanwhile, and says what the abandoned object left
behind (timers, registrations in its factory, bytes written to other
connections).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from ._codec import decodeState, encodeState
from ._handoff._migrated import tellMigrated
from ._leftovers import Snapshot, referencesTo
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
    "AbandonedRestore",
    "abandonedRestore",
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


def _addresses(protocol: IProtocol, peer: IAddress | None) -> tuple[IAddress, Any]:
    """
    The peer to build the new protocol for, and the host address of its
    transport: the old transport's, unless C{peer} is given; 127.0.0.1
    port 40000 without either.
    """
    oldTransport = getattr(protocol, "transport", None)
    hostAddress = None
    if peer is None and oldTransport is not None:
        peer = oldTransport.getPeer()
        hostAddress = oldTransport.getHost()
    if peer is None:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
    return peer, hostAddress


def _buildNew(newFactory: IProtocolFactory, peer: IAddress) -> Any:
    """
    The new code's protocol for C{peer}.

    @raise StateError: if C{newFactory} refuses the connection or its
        protocol does not provide C{IMigratable}.
    """
    new = newFactory.buildProtocol(peer)
    if new is None:
        raise StateError(
            "the new factory refused the connection (buildProtocol returned None)"
        )
    if not isMigratable(new):
        raise StateError(
            f"the new code's {type(new).__qualname__} does not provide IMigratable"
        )
    return new


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

    The old protocol is then told as capability transfer and module
    reload tell it (see L{IMigratable<migrate.interfaces.IMigratable>}): a
    C{TimeoutMixin} timeout cancelled, its C{connectionMigrated()} called
    if it defines one (what that raises is logged, which fails a trial
    test unless flushed).  Nothing else is called on it (no
    C{connectionLost}).  What it wrote to its own transport stays there; a
    real migration would carry output not yet sent, which a test's
    transport does not have.

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
    peer, hostAddress = _addresses(protocol, peer)
    transport = StringTransport(hostAddress=hostAddress, peerAddress=peer)
    new = _buildNew(newFactory, peer)
    app: Any = new
    app.transport = transport
    app.connected = 1
    restoreProtocolState(new, arrived)
    if replay:
        replayBufferedInput(new)
    tellMigrated(protocol)
    return RoundTrip(new, transport, arrived, len(encoded))


@frozen
class AbandonedRestore:
    """
    What L{abandonedRestore} saw: a protocol restored into new code ahead
    of a reload's pause, then abandoned.

    @ivar protocol: the new code's protocol object, restored then
        abandoned.
    @ivar state: the state it was restored from.
    @ivar held: the calls it made on its transport before it was abandoned
        (C{("write", (b"...",), {})}, ...): the reload held them, then
        dropped them when it abandoned the object.  Not a problem: what an
        abandoned object writes never reaches its client.
    @ivar written: the bytes of the C{write} and C{writeSequence} calls in
        L{held}.
    @ivar timers: the delayed calls pending on the clock after the abandon
        that were not pending before the new factory built the object:
        timers the object started and did not cancel.
    @ivar references: where the new factory (its attributes, their
        containers, the objects they hold) still refers to the abandoned
        object, as Python would write it (C{factory.rooms['games']}).
    @ivar changed: the names of the new factory's attributes that are not
        as they were before the new factory built the object (a container
        with other contents, another value).
    @ivar othersWritten: the bytes written to each of the other
        connections' transports given to L{abandonedRestore}, in their
        order (C{b""} for one left alone).
    @ivar problems: one sentence for each thing the abandoned object left
        behind, from the above; empty when the abandon undid everything
        this helper can see.
    """

    protocol: Any
    state: ProtocolState
    held: tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...]
    written: bytes
    timers: tuple[IDelayedCall, ...]
    references: tuple[str, ...]
    changed: tuple[str, ...]
    othersWritten: tuple[bytes, ...]
    problems: tuple[str, ...]


def _writtenIn(calls: Iterable[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> bytes:
    """
    The bytes of the C{write} and C{writeSequence} calls among C{calls}.
    """
    data = []
    for name, args, kwargs in calls:
        if name == "write":
            data.append(bytes(args[0] if args else kwargs.get("data", b"")))
        elif name == "writeSequence":
            data.extend(bytes(each) for each in (args[0] if args else ()))
    return b"".join(data)


def _startedBy(
    call: IDelayedCall, objects: tuple[object, ...], skip: tuple[object, ...]
) -> bool:
    """
    Whether a delayed call made while the clock advanced (timers of other
    objects fire and start again too) belongs to one of C{objects}: its
    function or arguments refer to it (a bound method, a C{LoopingCall}
    calling one).
    """
    return any(referencesTo(each, call, "call", skip=skip) for each in objects)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def abandonedRestore(
    protocol: IProtocol,
    newFactory: IProtocolFactory,
    *,
    clock: Clock | None = None,
    elapsed: float = 0.0,
    others: Iterable[StringTransport] = (),
    peer: IAddress | None = None,
) -> AbandonedRestore:
    """
    Restore a protocol into new code the way module reload does ahead of
    its pause, then abandon the new object the way the pause does when the
    connection changed (or closed) meanwhile, and say what the abandoned
    object left behind: for unit tests of C{abandonMigrationState} (see
    L{IMigratable<migrate.interfaces.IMigratable>}).  Capability
    transfer's successor restores ahead of its freeze and abandons in the
    same way, from the state decoded off the hand-off channel.

    In order, as C{reload} does: the old protocol's state is captured and
    copied (in one process: no encoding); C{newFactory} builds the new
    protocol for the same peer; its transport is one that holds every
    call (C{write}, C{loseConnection}, ...) until the reload commits,
    without C{connectionMade}; C{upgradeMigrationState} runs if the
    versions differ, then C{restoreMigrationState}; the buffered input is
    not replayed (no event reaches an object restored ahead).  If
    C{elapsed} is given, C{clock} advances by that much (the reload's
    pause comes later, and timers the restore started may run the new
    code meanwhile).  Then the held calls are dropped and
    C{abandonMigrationState()} is called, as the pause does.

    After it, this helper looks at what it can see: C{clock}'s delayed
    calls, C{newFactory}'s attributes and what they hold, and the
    transports in C{others}, each compared with what it was before
    C{newFactory} built the object (a fresh object for the connection is
    built and restored next, by the same factory: a registration left
    behind would count that connection twice).  What the abandoned object
    changed elsewhere (module globals, objects the factory does not hold)
    is the test's to check.  Follow with L{roundTrip} into the same
    factory to check the fresh object's restore.

    The old protocol is left as the reload leaves it meanwhile: serving,
    untouched.

    @param protocol: the old code's protocol, connected (its transport's
        C{getPeer()} names the peer unless C{peer} is given).  Its class
        must define C{abandonMigrationState}, as the new one's must: a
        reload restores a connection ahead of its pause only if the code
        serving it can abandon it too.
    @param newFactory: the new code's factory.
    @param clock: the clock the new code starts its timers on (a
        L{Clock} the test gives the factory), or L{None} if it starts
        none.
    @param elapsed: how many seconds C{clock} advances between the restore
        and the abandon.
    @param others: the transports of other connections (L{StringTransport}
        instances) that neither the restore nor the abandon may write to:
        what C{restoreMigrationState} writes to another connection cannot
        be taken back.
    @param peer: the peer address to give C{newFactory.buildProtocol}; by
        default the old transport's peer, or 127.0.0.1 port 40000.

    @return: what the abandoned object left behind; C{problems} is empty
        when it left nothing this helper can see.

    @raise StateError: what a reload would refuse or roll back for: the
        old state is not plain data, a protocol (old or new) does not
        provide C{IMigratable} or does not define C{abandonMigrationState}
        (the reload restores such a connection in its pause, and never
        abandons it), the new factory returns L{None}, the new code refuses
        the state (a L{migrate.state.RestoreError}), or
        C{abandonMigrationState} raises (its exception is the
        C{__cause__}).
    @raise ValueError: if C{elapsed} is given without C{clock}.
    """
    from .strategies._reload._attempt import _canAbandon as canAbandon
    from .strategies._reload._attempt import _plainCopy as plainCopy
    from .strategies._reload._modules import HeldTransport

    if elapsed and clock is None:
        raise ValueError("elapsed needs the clock to advance")
    if not canAbandon(type(protocol)):
        raise StateError(
            f"{type(protocol).__qualname__} does not define abandonMigrationState: "
            "a reload restores its connections in its pause, never ahead of it"
        )
    taken = captureProtocolState(protocol, snapshot=False)
    if not taken.migratable:
        raise StateError(
            f"{taken.className} does not provide IMigratable: its connections "
            "are not restored"
        )
    state = ProtocolState(
        taken.className,
        taken.migratable,
        taken.version,
        plainCopy(taken.appState),
        taken.buffers,
    )
    peer, hostAddress = _addresses(protocol, peer)
    watched = list(others)
    before = [each.value() for each in watched]
    pending = set() if clock is None else set(clock.getDelayedCalls())
    factoryBefore = Snapshot.of(newFactory)
    new = _buildNew(newFactory, peer)
    if not canAbandon(type(new)):
        raise StateError(
            f"the new code's {type(new).__qualname__} does not define "
            "abandonMigrationState: a reload restores its connections in its "
            "pause, never ahead of it"
        )
    held = HeldTransport(StringTransport(hostAddress=hostAddress, peerAddress=peer))
    app: Any = new
    app.transport = held
    app.connected = 1
    restoreProtocolState(new, state, copyState=False, validate=False)
    started = set() if clock is None else set(clock.getDelayedCalls()) - pending
    if clock is not None and elapsed:
        clock.advance(elapsed)
    calls = tuple(held.held)
    held.discard()
    try:
        app.abandonMigrationState()
    except Exception as e:
        raise StateError(
            f"{type(new).__qualname__}.abandonMigrationState() failed: {e!r} "
            "(a reload rolls back)"
        ) from e

    problems = []
    timers = tuple(
        call
        for call in (() if clock is None else clock.getDelayedCalls())
        if call.active()
        and call not in pending
        and (call in started or _startedBy(call, (new, held), (clock, newFactory)))
    )
    for call in timers:
        problems.append(
            "a timer is still pending on the clock: {}".format(_short(call))
        )
    references = tuple(
        referencesTo(new, newFactory, "factory", skip=(clock,) if clock else ())
    )
    for place in references:
        problems.append("the factory still refers to the object: {}".format(place))
    changed = tuple(factoryBefore.changed(newFactory))
    for name in changed:
        problems.append(
            "factory.{} is not as it was before the restore: {}".format(
                name, _short(getattr(newFactory, name, "(removed)"))
            )
        )
    othersWritten = tuple(
        each.value()[len(was) :] if each.value().startswith(was) else each.value()
        for each, was in zip(watched, before)
    )
    for index, data in enumerate(othersWritten):
        if data:
            problems.append(
                "the restore or the abandon wrote to another connection "
                "(others[{}]): {}".format(index, _short(data))
            )
    return AbandonedRestore(
        new,
        state,
        calls,
        _writtenIn(calls),
        timers,
        references,
        changed,
        othersWritten,
        tuple(problems),
    )
