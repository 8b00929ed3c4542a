"""
Tests for the re-exec benchmark's summary (L{migrate.bench.reexec}): its
figures against the floor, and its verdicts.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ..bench.reexec import summarize


def _round(suspension: float, clientMax: float) -> dict[str, Any]:
    """
    One round's result as L{migrate.bench.reexec} records it, in seconds.
    """
    return {
        "suspension": suspension,
        "clientMax": clientMax,
        "capture": 0.002,
        "exec": 0.2,
        "restore": 0.007,
    }


class SummaryTests(SynchronousTestCase):
    """
    L{summarize} gives each count's medians, says whether they are above
    or below the floor, and gives the verdict that count has a target for.
    """

    def test_belowTheFloor(self) -> None:
        """
        With the caretaker serving while the new image starts, the clients
        wait less than that start: the summary says "below", not a
        negative "above", and 1,000 connections get the suspension's
        verdict.
        """
        rounds = [_round(0.010, 0.021), _round(0.011, 0.020), _round(0.009, 0.022)]
        summary = summarize(1000, rounds, 0.218)
        self.assertEqual(
            summary,
            "1,000 connections: suspension 10 ms (median of 3 rounds, 9 to 11; "
            "capture 2, exec 200, restore 7), 208 ms below the floor; longest "
            "client wait 21 ms (median), 197 ms below the floor; the suspension "
            "meets the 300 ms target",
        )

    def test_issue16Verdict(self) -> None:
        """
        At 10,000 connections the verdict is issue 16's: the clients'
        longest wait (median) at most 50 ms above the floor.
        """
        rounds = [_round(0.085, 0.127)]
        self.assertTrue(
            summarize(10000, rounds, 0.218).endswith(
                "longest client wait 127 ms (median), 91 ms below the floor; the "
                "wait meets the target (the floor + 50 ms)"
            )
        )
        late = [_round(0.250, 0.280)]
        self.assertTrue(
            summarize(10000, late, 0.218).endswith(
                "longest client wait 280 ms (median), 62 ms above the floor; the "
                "wait misses the target (the floor + 50 ms)"
            )
        )

    def test_otherCounts(self) -> None:
        """
        Other counts have no target: no verdict.
        """
        summary = summarize(200, [_round(0.4, 0.45)], 0.218)
        self.assertNotIn("target", summary)
        self.assertIn("182 ms above the floor", summary)
