# -*- test-case-name: migrate.test.test_stopping -*-
"""
Stopping a service politely (C{python -m migrate stop}): the serving
process stops accepting, every generation drains, and at the deadline what
is left is closed cleanly and the generations still draining are stopped;
then the serving process exits.

The serving process drains the way an old generation does after a hand-off
(L{migrate._host._draining.DrainTracker}), with nobody to hand on to.  The
older generations, still draining, are other processes: at the deadline
each gets C{SIGTERM} (twistd's stop, which closes its connections), except
the process that will stay as the keeper (L{migrate._host._keeping}), which
is asked over the keeper's socket to close its connections only: a
C{SIGTERM} would make it stop the serving generation too, which stops by
itself.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

__all__ = ["DEFAULT_STOP_DRAIN_SECONDS", "StopAttempt"]

DEFAULT_STOP_DRAIN_SECONDS = 30.0
"""
How long generations drain before a stop closes what is left, when neither
the command nor the host (C{--drain-timeout}) says.
"""

_log = Logger()


def _connections(count: int) -> str:
    return "1 connection" if count == 1 else "{} connections".format(count)


@define
class StopAttempt:
    """
    One polite stop of the whole service, run by the serving host.

    @ivar host: the serving L{migrate.MigrationHost}.
    @ivar drainTimeout: seconds every generation may drain.
    @ivar progress: told each step.
    """

    host: Any
    drainTimeout: float
    progress: Callable[[str], None]
    _kill: Callable[[int, int], None] = os.kill
    _done: Deferred[dict[str, Any]] = field(factory=Deferred)
    _deadline: IDelayedCall | None = None
    _started: float = 0.0
    _deadlinePassed: bool = False
    _stopped: set[int] = field(factory=set)

    def run(self) -> Deferred[dict[str, Any]]:
        """
        Stop the service.

        @return: fires, once every generation has ended (or this one's last
            connections are closing), with a JSON-compatible summary; the
            process exits moments later.
        """
        host = self.host
        self._started = host.reactor.seconds()
        older = [
            each for each in host.drainingGenerations() if each.get("pid") != host.pid
        ]
        self._step(
            "generation {} (process {}) stops accepting; {} here and {} draining "
            "generation{} have {} s to finish".format(
                host.generation,
                host.pid,
                _connections(host.connectionCount()),
                len(older),
                "" if len(older) == 1 else "s",
                self.drainTimeout,
            )
        )
        host.stopAccepting()
        self._deadline = host.reactor.callLater(self.drainTimeout, self._timeIsUp)
        host.drainToStop(self._reported, self.drainTimeout)
        return self._done

    def _step(self, message: str) -> None:
        _log.info("Stop: {message}", message=message)
        try:
            self.progress(message)
        except Exception:
            _log.failure("Could not relay the stop's progress")

    def _reported(self, entries: list[dict[str, Any]]) -> None:
        if self._done.called:
            return
        own = [each for each in entries if each.get("pid") == self.host.pid]
        others = [each for each in entries if each.get("pid") != self.host.pid]
        if others or any(each.get("connections") for each in own):
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._step("every generation has ended")
        self._done.callback(
            {
                "generation": self.host.generation,
                "pid": self.host.pid,
                "closedAtDeadline": self._deadlinePassed,
                "stopped": sorted(self._stopped),
                "seconds": round(self.host.reactor.seconds() - self._started, 3),
            }
        )

    def _timeIsUp(self) -> None:
        self._deadlinePassed = True
        host = self.host
        keeperPid = getattr(host.keeper, "keeperPid", None)
        for each in host.drainingGenerations():
            pid = each.get("pid")
            if not isinstance(pid, int) or pid == host.pid:
                continue
            self._stopped.add(pid)
            if pid == keeperPid:
                self._step(
                    "drain deadline: process {} (the keeper-to-be) closes its {}".format(
                        pid, _connections(int(each.get("connections") or 0))
                    )
                )
                host.keeper.tell(b"stop-draining")
                continue
            self._step(
                "drain deadline: stopping generation {} (process {}, {})".format(
                    each.get("generation"),
                    pid,
                    _connections(int(each.get("connections") or 0)),
                )
            )
            try:
                self._kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except OSError as e:
                self._step("cannot stop process {}: {}".format(pid, e.strerror))
        remaining = host.connectionCount()
        if remaining:
            self._step(
                "drain deadline: closing the {} left here cleanly".format(
                    _connections(remaining)
                )
            )
