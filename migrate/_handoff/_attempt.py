# -*- test-case-name: migrate.test.test_attempt -*-
"""
One migration attempt, whatever the strategy: what every strategy's outgoing
half does besides its own technique.  It relays each step to whoever asked
for the migration (and to the log), tells the host which phase the
migration is in, times the phases on the reactor's clock (so that tests
drive it with L{twisted.internet.task.Clock}), gathers the notes an
operator should read, and builds the L{MigrationReport}.
"""

from __future__ import annotations

from typing import Callable, Iterable

from attrs import define, field
from twisted.logger import Logger

from .._report import ListenerReport, MigrationOutcome, MigrationPhase, MigrationReport
from ..interfaces import IMigrationHost

__all__ = ["MigrationAttempt", "counted"]

_log = Logger()


def counted(count: int, noun: str) -> str:
    """
    C{"1 connection"}, C{"2 connections"}: a count with its noun, for the
    steps and reasons operators read.

    @param count: how many.
    @param noun: the noun, singular; its plural adds C{s}.
    """
    return "{} {}{}".format(count, noun, "" if count == 1 else "s")


@define
class MigrationAttempt:
    """
    A migration of one host as it runs.

    @ivar host: the serving host.
    @ivar strategy: the strategy's name, as reported.
    @ivar progress: called with each step's one-line message.
    @ivar label: what the log calls this kind of migration (C{"Re-exec"}).
    @ivar durations: seconds spent in each phase so far, by phase name.
    @ivar notes: what the report tells an operator besides the figures.
    @ivar successorLog: the new code's last output lines, for a report of
        failure.
    """

    host: IMigrationHost
    strategy: str
    progress: Callable[[str], None]
    label: str = "Migration"
    durations: dict[str, float] = field(factory=dict)
    notes: list[str] = field(factory=list)
    successorLog: list[str] = field(factory=list)
    _started: float = field(init=False, default=0.0)
    _phaseStarted: float = field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        self._started = self._phaseStarted = self.host.reactor.seconds()

    def step(self, message: str) -> None:
        """
        Tell the requester (and the log) what happens now.  A requester
        that cannot be told (it left) does not disturb the migration.
        """
        _log.info("{label}: {step}", label=self.label, step=message)
        try:
            self.progress(message)
        except Exception:
            _log.failure("Could not relay progress")

    def enter(self, phase: MigrationPhase) -> None:
        """
        The migration enters C{phase}: the host's status shows it.
        """
        self.host.enterPhase(phase)

    def startPhase(self) -> None:
        """
        A timed phase starts now; what came since the last one is not
        reported on its own (it still counts in the C{total}).
        """
        self._phaseStarted = self.host.reactor.seconds()

    def phaseDone(self, name: str) -> float:
        """
        The phase called C{name} (in the report's C{durations}) ended now;
        the next one starts.

        @return: its duration in seconds.
        """
        now = self.host.reactor.seconds()
        self.durations[name] = now - self._phaseStarted
        self._phaseStarted = now
        return self.durations[name]

    def elapsed(self) -> float:
        """
        Seconds since the attempt started.
        """
        return float(self.host.reactor.seconds() - self._started)

    def report(
        self,
        outcome: MigrationOutcome,
        reason: str | None = None,
        *,
        listeners: Iterable[ListenerReport] | None = None,
        fromGeneration: int | None = None,
        toGeneration: int | None = None,
        newPid: int | None = None,
    ) -> MigrationReport:
        """
        The report of this attempt, ending now: C{durations} gains the
        C{total} unless a strategy measured it already.  The host's metrics
        count it (a successor takes the counts over; a re-executed image,
        which reports its own success, counts that itself).

        @param listeners: per-listener counts; by default every listener of
            the host with nothing moved, drained or failed.
        @param fromGeneration: the generation that served before (default:
            the host's).
        """
        self.durations.setdefault("total", self.elapsed())
        host = self.host
        if listeners is None:
            listeners = [ListenerReport(key) for key in host.listeners]
        report = MigrationReport(
            strategy=self.strategy,
            outcome=outcome,
            reason=reason,
            fromGeneration=(
                host.generation if fromGeneration is None else fromGeneration
            ),
            toGeneration=toGeneration,
            oldPid=host.pid,
            newPid=newPid,
            listeners=listeners,
            durations=dict(self.durations),
            successorLog=(
                self.successorLog if outcome is not MigrationOutcome.success else ()
            ),
            notes=self.notes,
        )
        if host.metrics is not None:
            host.metrics.recordReport(report)
        return report

    def trialRunEnded(self, passed: bool) -> None:
        """
        The new code was tried in a child process before the point of no
        return (an in-place strategy's trial run): the metrics count it.

        @param passed: whether it imported and restored every connection's
            state there.
        """
        if self.host.metrics is not None:
            self.host.metrics.recordTrialRun(self.strategy, passed)
