"""
Tests for L{migrate._handoff._attempt.MigrationAttempt}: progress, the
host's phase, phase timing on the reactor's clock, and the report.
"""

from __future__ import annotations

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from .._handoff._attempt import MigrationAttempt
from .._report import ListenerReport, MigrationOutcome, MigrationPhase
from .test_host import harness


class MigrationAttemptTests(SynchronousTestCase):
    """
    L{MigrationAttempt} does for every strategy what is not its technique.
    """

    def setUp(self) -> None:
        self.h = harness(self, listen=("tcp:8000", "unix:/tmp/x.sock"))
        self.lines: list[str] = []
        self.attempt = MigrationAttempt(
            self.h.host, "mine", self.lines.append, label="Mine"
        )

    def test_stepRelaysAndLogs(self) -> None:
        """
        Each step reaches the requester and the log, under the label.
        """
        with capturedLogs() as events:
            self.attempt.step("doing it")
        self.assertEqual(self.lines, ["doing it"])
        self.assertEqual(
            [(e["label"], e["step"]) for e in events if "label" in e],
            [("Mine", "doing it")],
        )

    def test_requesterGone(self) -> None:
        """
        A requester that cannot be told any more does not stop the step.
        """

        def gone(line: str) -> None:
            raise ConnectionError("left")

        attempt = MigrationAttempt(self.h.host, "mine", gone)
        with capturedLogs() as events:
            attempt.step("still going")
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertTrue(any("still going" == e.get("step") for e in events))

    def test_enterTellsTheHost(self) -> None:
        """
        The host's phase is the phase the attempt entered.
        """
        self.attempt.enter(MigrationPhase.committing)
        self.assertIs(self.h.host.phase, MigrationPhase.committing)

    def test_phasesOnTheReactorsClock(self) -> None:
        """
        Phases are timed on the reactor's clock, one after the other; a
        phase started with C{startPhase} leaves out what came before.
        """
        self.h.reactor.advance(2.0)
        self.assertEqual(self.attempt.phaseDone("spawn"), 2.0)
        self.h.reactor.advance(0.5)
        self.attempt.startPhase()
        self.h.reactor.advance(0.25)
        self.attempt.phaseDone("commit")
        self.assertEqual(self.attempt.durations, {"spawn": 2.0, "commit": 0.25})
        self.assertEqual(self.attempt.elapsed(), 2.75)

    def test_report(self) -> None:
        """
        The report names the strategy, the host's generation and PID, every
        listener by default, the phases and the total, and the notes.
        """
        self.h.reactor.advance(1.0)
        self.attempt.phaseDone("spawn")
        self.attempt.notes.append("a note")
        self.attempt.successorLog.append("a line")
        report = self.attempt.report(MigrationOutcome.rolledBack, "why")
        self.assertEqual(
            (
                report.strategy,
                report.outcome,
                report.reason,
                report.fromGeneration,
                report.oldPid,
                report.toGeneration,
                report.newPid,
            ),
            (
                "mine",
                MigrationOutcome.rolledBack,
                "why",
                1,
                self.h.host.pid,
                None,
                None,
            ),
        )
        self.assertEqual(
            report.listeners,
            (ListenerReport("tcp:8000"), ListenerReport("unix:/tmp/x.sock")),
        )
        self.assertEqual(report.durations, {"spawn": 1.0, "total": 1.0})
        self.assertEqual(
            (report.notes, report.successorLog), (("a note",), ("a line",))
        )

    def test_successHasNoSuccessorLog(self) -> None:
        """
        A successful migration's report carries no failure output, and a
        C{total} a strategy measured itself is kept.
        """
        self.attempt.successorLog.append("noise")
        self.attempt.durations["total"] = 0.125
        self.h.reactor.advance(3.0)
        report = self.attempt.report(
            MigrationOutcome.success, toGeneration=2, newPid=4242
        )
        self.assertEqual(
            (report.successorLog, report.durations["total"], report.newPid),
            ((), 0.125, 4242),
        )
