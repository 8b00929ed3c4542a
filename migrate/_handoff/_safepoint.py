# -*- test-case-name: migrate.test.test_safepoint -*-
"""
Safe points: waiting, within a bound, for connections that cannot move
I{now} (a request in flight, a WebSocket message half received, an
application protocol saying "not now") to reach a point where they can.

Before a strategy captures the connections it moves, L{waitForSafePoints}
asks each connection's L{IMigratable} (the application's, or migrate's own
mover) whether it can move now.  If all can, nothing waits.  Otherwise,
every connection that can is I{held}: the reactor stops reading it (bytes
the client sends meanwhile wait in the kernel and move with the socket),
so that it stays at its safe point; the others are watched (polled, and
told at once by movers that know when, such as the HTTP channel after a
response) and held as soon as they reach theirs.  The wait ends when none
is left, or after the bound: those still busy then stay with the old code
and drain.

A held connection only stops reading: it goes on writing (a response
still being sent is sent), and what its protocol asks of the transport
(pause, resume) is remembered and carried out when it is let go
(L{SafePoints.letGo}) if it did not move.

Two ways to use it: re-exec, which cannot move anything after its C{exec},
waits for them all before it freezes (L{atSafePoints}, holding every
connection from the plan to the exec); capability transfer moves what can
move at once, commits, and then takes each busy connection from a
L{SafePointWatch} the moment it is ready, in small batches, while the new
code already serves everyone else.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from attrs import define, field
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.tcp import Connection
from twisted.logger import Logger

from migrate._codec import StateError

from ._movers._registry import migratableFor, migrationBlocker
from ._transport import _isReading

__all__ = [
    "HeldConnection",
    "SafePointWatch",
    "SafePoints",
    "WatchedConnection",
    "atSafePoints",
    "holdReading",
    "waitForSafePoints",
]

_log = Logger()

_MISSING = object()


@define
class HeldConnection:
    """
    A connection whose reading is held at its safe point.

    @ivar transport: its C{twisted.internet.tcp.Connection}.
    """

    transport: Any
    _wantReading: bool
    _saved: dict[str, Any] = field(factory=dict)
    _held: bool = True

    def _hook(self) -> None:
        transport = self.transport
        for name in ("startReading", "stopReading"):
            self._saved[name] = vars(transport).get(name, _MISSING)
        realStop = transport.stopReading

        def startReading() -> None:
            self._wantReading = True

        def stopReading() -> None:
            self._wantReading = False
            realStop()

        transport.startReading = startReading
        transport.stopReading = stopReading

    def letGo(self) -> None:
        """
        It did not move: read again if its protocol wants to.  Does nothing
        for a connection that moved (or closed) meanwhile, or twice.
        """
        if not self._held:
            return
        self._held = False
        transport = self.transport
        if transport.disconnected or not transport.connected:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                vars(transport).pop(name, None)
            else:
                setattr(transport, name, saved)
        if self._wantReading and not transport.disconnecting:
            transport.startReading()


def holdReading(transport: Any) -> HeldConnection:
    """
    Stop a connection reading until L{HeldConnection.letGo}, whatever its
    protocol asks meanwhile (a C{resumeProducing} is remembered).

    @param transport: a C{twisted.internet.tcp.Connection}.
    """
    held = HeldConnection(transport, _isReading(transport))
    transport.stopReading()
    held._hook()
    return held


@define
class SafePoints:
    """
    The outcome of L{waitForSafePoints}.

    @ivar held: the connections held at their safe point.
    @ivar atOnce: how many could move when the wait began.
    @ivar later: how many reached their safe point while it lasted.
    @ivar missed: how many did not within the bound.
    @ivar waited: how long it lasted, in seconds.
    """

    held: list[HeldConnection] = field(factory=list)
    atOnce: int = 0
    later: int = 0
    missed: int = 0
    waited: float = 0.0

    def letGo(self) -> None:
        """
        Let every held connection that did not move read again.
        """
        held, self.held = self.held, []
        for each in held:
            each.letGo()


@define
class WatchedConnection:
    """
    A connection watched for its safe point.

    @ivar transport: its C{twisted.internet.tcp.Connection}.
    @ivar migratable: what carries its state (L{migratableFor}).
    @ivar cancel: stops the mover's watch, if it has one.
    @ivar held: its reading held at the safe point, once it is.
    @ivar listenerKey: the listener it was accepted on.
    @ivar hosted: its hosted protocol.
    """

    transport: Any
    migratable: Any
    cancel: Callable[[], None] | None = None
    held: HeldConnection | None = None
    listenerKey: str = ""
    hosted: Any = None

    def hold(self) -> None:
        """
        Hold it at its safe point (once).
        """
        if self.held is None and not self.transport.disconnecting:
            self.held = holdReading(self.transport)

    def stopWatching(self) -> None:
        """
        Stop the mover's watch (once).
        """
        if self.cancel is not None:
            self.cancel()
            self.cancel = None

    def letGo(self) -> None:
        """
        Let it read again if it did not move.
        """
        if self.held is not None:
            self.held.letGo()


def _blocker(migratable: Any) -> str | None:
    try:
        return migrationBlocker(migratable)
    except StateError:
        return None  # it cannot move at all: the capture will say why


def waitForSafePoints(
    clock: IReactorTime,
    connections: Iterable[tuple[Any, Any]],
    bound: float,
    interval: float = 0.01,
    announce: Callable[[int], None] = lambda count: None,
    holdAll: bool = False,
) -> Deferred[SafePoints]:
    """
    Wait, at most C{bound} seconds, until every connection that has a
    migratable state but cannot move now reaches a safe point; hold each
    connection that is at one, so that it stays there.

    @param clock: the clock.
    @param connections: (listener, hosted protocol) pairs, as from
        C{MigrationHost.allConnections}.
    @param bound: the longest wait, in seconds (0: do not wait).
    @param interval: how often a connection is asked again.
    @param announce: called with the number of connections waited for,
        when there are any.
    @param holdAll: hold the connections that have safe points (their
        protocol or mover has a C{migrationBlocker}) at them even when none
        is waited for (for a caller that captures them after giving the
        reactor a few more turns).  The others read on: nothing they read
        can keep them from moving, and holding them would only make their
        clients wait.

    @return: fires with the L{SafePoints} (never fails).  The caller
        captures the connections, then calls L{SafePoints.letGo}.
    """
    started = clock.seconds()
    result = SafePoints()
    ready: list[WatchedConnection] = []
    waiting: list[WatchedConnection] = []
    for _, hosted in list(connections):
        protocol = hosted.wrappedProtocol
        transport = hosted.transport
        if (
            protocol is None
            or getattr(hosted, "released", False)
            or not isinstance(transport, Connection)
            or getattr(transport, "TLS", False)
            or transport.disconnecting
        ):
            continue
        migratable = migratableFor(protocol)
        if migratable is None:
            continue
        watched = WatchedConnection(transport, migratable)
        (ready if _blocker(migratable) is None else waiting).append(watched)
    result.atOnce = len(ready)
    done: Deferred[SafePoints] = Deferred()

    def hold(watched: WatchedConnection) -> None:
        if watched.held is None and not watched.transport.disconnecting:
            watched.held = holdReading(watched.transport)
            result.held.append(watched.held)

    if not waiting or bound <= 0:
        if holdAll:
            for watched in ready:
                if getattr(watched.migratable, "migrationBlocker", None) is not None:
                    hold(watched)
        result.missed = len(waiting)
        done.callback(result)
        return done

    _log.info(
        "Waiting up to {bound} s for {count} connections to reach a safe point",
        bound=bound,
        count=len(waiting),
    )
    announce(len(waiting))

    for watched in ready:
        hold(watched)

    def reached(watched: WatchedConnection) -> Callable[[], None]:
        # Told by the mover the moment the connection may be at its safe
        # point (inside the read path, say): hold it there; the next poll
        # checks.
        return lambda: hold(watched)

    for watched in waiting:
        watch = getattr(watched.migratable, "watchSafePoint", None)
        if watch is not None:
            try:
                watched.cancel = watch(reached(watched))
            except Exception:
                _log.failure("Could not watch for a safe point")

    def finish() -> None:
        for watched in waiting:
            if watched.cancel is not None:
                watched.cancel()
            if watched.held is not None:
                watched.held.letGo()
                result.held.remove(watched.held)
        result.missed = len(waiting)
        result.waited = clock.seconds() - started
        done.callback(result)

    def poll() -> None:
        for watched in list(waiting):
            if watched.transport.disconnected:
                waiting.remove(watched)
            elif _blocker(watched.migratable) is None:
                hold(watched)
                if watched.cancel is not None:
                    watched.cancel()
                waiting.remove(watched)
                result.later += 1
        if not waiting or clock.seconds() - started >= bound:
            finish()
        else:
            clock.callLater(interval, poll)

    clock.callLater(0, poll)
    return done


@inlineCallbacks
def atSafePoints(
    host: Any,
    attempt: Any,
    holdAll: bool = False,
    missedFate: str = "they stay",
) -> Any:
    """
    Wait for the host's connections to reach their safe points, within
    C{host.settings.safePointTimeout}, telling the migration attempt.

    @param host: the L{migrate.interfaces.IMigrationHost}.
    @param attempt: the L{migrate._handoff._attempt.MigrationAttempt}: told
        a step when connections are waited for, and a note of how many
        moved later and how many did not reach a safe point.
    @param holdAll: as for L{waitForSafePoints}.
    @param missedFate: what the note says becomes of the connections that
        did not reach a safe point.

    @return: a L{Deferred} firing with the L{SafePoints}.
    """
    bound = float(host.settings.safePointTimeout)

    def announce(count: int) -> None:
        attempt.step(
            "waiting up to {} s for {} connection{} to reach a safe point".format(
                bound, count, "" if count == 1 else "s"
            )
        )

    result = yield waitForSafePoints(
        host.reactor, host.allConnections(), bound, announce=announce, holdAll=holdAll
    )
    if result.later:
        attempt.notes.append(
            "{} connection{} reached a safe point within {:.3f} s and "
            "moved".format(
                result.later, "" if result.later == 1 else "s", result.waited
            )
        )
    if result.missed:
        attempt.notes.append(
            "{} connection{} did not reach a safe point within {} s (a "
            "request in flight, a message half received): {}".format(
                result.missed, "" if result.missed == 1 else "s", bound, missedFate
            )
        )
    return result


class SafePointWatch:
    """
    Busy connections watched until each reaches its safe point, where it is
    held (it stops reading) until the caller moves it or lets it go: for a
    caller that moves each connection as soon as it can rather than all at
    once.

    @ivar waiting: the connections not at a safe point yet.
    """

    def __init__(self, connections: Iterable[tuple[str, Any]]) -> None:
        """
        @param connections: (listener key, hosted protocol) pairs.
        """
        self.waiting: list[WatchedConnection] = []
        for key, hosted in connections:
            protocol = hosted.wrappedProtocol
            migratable = None if protocol is None else migratableFor(protocol)
            if migratable is None or not isinstance(hosted.transport, Connection):
                continue
            watched = WatchedConnection(
                hosted.transport, migratable, listenerKey=key, hosted=hosted
            )
            watch = getattr(migratable, "watchSafePoint", None)
            if watch is not None:
                try:
                    watched.cancel = watch(watched.hold)
                except Exception:
                    _log.failure("Could not watch for a safe point")
            self.waiting.append(watched)

    def takeReady(self) -> list[WatchedConnection]:
        """
        The connections at their safe point now, held there, and no longer
        watched; those that closed meanwhile are forgotten.
        """
        ready = []
        for watched in list(self.waiting):
            if watched.transport.disconnected or getattr(
                watched.hosted, "released", False
            ):
                watched.stopWatching()
                watched.letGo()
                self.waiting.remove(watched)
            elif _blocker(watched.migratable) is None:
                watched.hold()
                watched.stopWatching()
                self.waiting.remove(watched)
                ready.append(watched)
        return ready

    def stop(self) -> list[WatchedConnection]:
        """
        Stop watching: the connections still busy are let go as they were.

        @return: those connections.
        """
        remaining, self.waiting = self.waiting, []
        for watched in remaining:
            watched.stopWatching()
            watched.letGo()
        return remaining
