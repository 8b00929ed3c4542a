# -*- test-case-name: migrate.test.test_host -*-
"""
Draining: the old side of a committed hand-off.  The process no longer
serves; it finishes the connections that stayed with it, keeps the serving
process told how many are left (its own and those of older generations it
relays for), closes the stragglers cleanly at the drain deadline (politely
for twisted.web: see L{migrate._handoff._movers._endings}), and ends
the process once nothing is left.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .._handoff._movers._endings import closeAllPolitely

__all__ = ["DrainTracker"]

#: seconds a connection closed cleanly at the drain deadline may take to
#: finish (a peer that never reads would otherwise keep it open) before it
#: is aborted
ABORT_GRACE_SECONDS = 5.0

#: seconds the answers already written (an upgrade's report, a status) get
#: to reach their readers before a drained process ends
ANSWER_GRACE_SECONDS = 0.2

_log = Logger()


@define
class DrainTracker:
    """
    What a host knows about draining: the older generations that report
    through it while it serves, and, once it has handed on, its own drain.

    @ivar draining: older generations still draining, by generation number:
        JSON-compatible dictionaries, each with the C{via} PID that
        reported it.
    @ivar channels: the channels they report over, by C{via} PID.
    """

    _reactor: Any
    _connections: Callable[[], Iterable[tuple[Any, Any]]]
    _ownEntry: Callable[[], dict[str, Any] | None]
    _exit: Callable[[], None]
    draining: dict[int, dict[str, Any]] = field(factory=dict)
    channels: dict[int, Any] = field(factory=dict)
    _reporter: Callable[[list[dict[str, Any]]], None] | None = None
    _lastReport: list[dict[str, Any]] | None = None
    _deadline: IDelayedCall | None = None
    _handedOn: bool = False
    _exiting: bool = False
    _stopPolite: Callable[[], int] | None = None
    closing: bool = False

    def generations(self) -> list[dict[str, Any]]:
        """
        The generations still draining, oldest first, this process included
        once it drains.
        """
        entries = {
            generation: {key: value for key, value in entry.items() if key != "via"}
            for generation, entry in self.draining.items()
        }
        own = self._ownEntry()
        if own is not None:
            entries[int(own["generation"])] = own
        return [entries[key] for key in sorted(entries)]

    def start(
        self,
        reporter: Callable[[list[dict[str, Any]]], None],
        drainTimeout: float | None,
    ) -> None:
        """
        This process has handed on: report its draining from now on, close
        what is left at the deadline, and end the process once drained.

        @param reporter: called with L{generations} whenever it changes.
        @param drainTimeout: seconds until the remaining connections are
            closed; L{None}: no deadline.
        """
        self._handedOn = True
        self._reporter = reporter
        self._report()
        if drainTimeout is not None:
            self._deadline = self._reactor.callLater(
                drainTimeout, self._closeStragglers
            )
        self._checkDrained()

    def connectionsChanged(self) -> None:
        """
        A connection of this process opened or closed.
        """
        if self._handedOn:
            self._reactor.callLater(0, self._afterChange)

    def update(self, entries: list[dict[str, Any]], viaPid: int) -> None:
        """
        An older generation (or one it relays for) reports its draining.
        """
        for generation in [
            g for g, entry in self.draining.items() if entry.get("via") == viaPid
        ]:
            del self.draining[generation]
        for entry in entries:
            self.draining[int(entry["generation"])] = dict(entry, via=viaPid)
        self._afterChange()

    def _afterChange(self) -> None:
        self._report()
        self._checkDrained()

    def _count(self) -> int:
        return sum(1 for _ in self._connections())

    def _report(self) -> None:
        if self._reporter is None:
            return
        current = self.generations()
        if current != self._lastReport:
            self._lastReport = current
            try:
                self._reporter(current)
            except Exception:
                _log.failure("Could not report draining progress")

    def closeNow(self, makeRoom: bool = False) -> None:
        """
        Close the remaining connections now, as the deadline would: the
        service stops, or (C{makeRoom}) a newer generation needs the room
        (C{--max-draining}), which this process's drain reports then say.
        """
        if not self._handedOn or self._exiting or self.closing:
            return
        if makeRoom:
            _log.info("Asked to make room for a newer generation")
            self.closing = True
            self._report()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._closeStragglers()
        self._checkDrained()

    def _closeStragglers(self) -> None:
        remaining = list(self._connections())
        _log.info(
            "Drain deadline: closing {count} remaining connections cleanly",
            count=len(remaining),
        )
        # Politely where migrate knows the protocol: HTTP/1.1 only between
        # requests (asked again until it is), HTTP/2 GOAWAY, WebSocket 1001.
        self._stopPolite = closeAllPolitely(
            self._reactor, [protocol for listener, protocol in remaining]
        )
        # A peer that never reads would keep a cleanly closing connection
        # (and this process) alive forever: abort what is left after a grace.
        self._reactor.callLater(ABORT_GRACE_SECONDS, self._abortStragglers)

    def _abortStragglers(self) -> None:
        if self._stopPolite is not None:
            self._stopPolite()
        remaining = list(self._connections())
        if not remaining:
            return
        _log.warn(
            "{count} connections did not close within {grace} s of the drain "
            "deadline; aborting them",
            count=len(remaining),
            grace=ABORT_GRACE_SECONDS,
        )
        for listener, protocol in remaining:
            transport = protocol.transport
            if transport is not None and hasattr(transport, "abortConnection"):
                transport.abortConnection()

    def _checkDrained(self) -> None:
        if not self._handedOn or self._exiting:
            return
        if self._count() or self.draining:
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._exiting = True
        own = self._ownEntry() or {}
        _log.info(
            "Generation {generation} drained; process {pid} exits",
            generation=own.get("generation"),
            pid=own.get("pid"),
        )
        self._report()
        # Let the answers already written (an upgrade report, a status) reach
        # their readers before the process goes.
        self._reactor.callLater(ANSWER_GRACE_SECONDS, self._exit)
