"""
Tests for the benchmark's stall scenario (L{migrate.bench._stall}): its
options, its output and one small run against real processes.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ..bench._load import LoadGenerator, LongLivedClient
from ..bench._output import formatComparison, formatResults, formatStall, keyFigures
from ..bench._plot import MissingMatplotlib, _pyplot, plotStall, stallPlotPath
from ..bench._process import pidAlive
from ..bench._runner import BenchOptions
from ..bench._stall import (
    StallSettings,
    _checked,
    addRatios,
    measureStall,
    parseCounts,
)


class CountsTests(SynchronousTestCase):
    """
    L{parseCounts} reads C{--stall}'s value.
    """

    def test_counts(self) -> None:
        """
        Counts separated by commas come back increasing, without repeats.
        """
        self.assertEqual(parseCounts("1000,10000"), (1000, 10000))
        self.assertEqual(parseCounts("10_000, 1000,1000"), (1000, 10000))
        self.assertEqual(parseCounts("200"), (200,))

    def test_zeroSkips(self) -> None:
        """
        C{0} alone means no count at all.
        """
        self.assertEqual(parseCounts("0"), ())

    def test_invalid(self) -> None:
        """
        Anything else is refused.
        """
        for value in ("", ",", "-1", "ten", "0,1000", "1.5"):
            self.assertRaises(ValueError, parseCounts, value)


class StallOptionsTests(SynchronousTestCase):
    """
    The stall scenario's options of C{python -m migrate.bench}.
    """

    def parse(self, *arguments: str) -> BenchOptions:
        options = BenchOptions()
        options.parseOptions(list(arguments))
        return options

    def test_defaults(self) -> None:
        """
        By default 1,000 then 10,000 idle connections, 50 probes sending
        every 5 ms; the quick run measures 1,000 only.
        """
        options = self.parse()
        self.assertEqual(options["stallCounts"], (1000, 10000))
        self.assertEqual(options["probes"], 50)
        self.assertEqual(options["probe-interval"], 0.005)
        self.assertFalse(options["stall-only"])
        self.assertEqual(self.parse("--quick")["stallCounts"], (1000,))

    def test_given(self) -> None:
        """
        C{--stall}, C{--probes} and C{--probe-interval} set them;
        C{--stall 0} skips the scenario.
        """
        options = self.parse(
            "--stall", "200,50", "--probes", "5", "--probe-interval", "0.01"
        )
        self.assertEqual(options["stallCounts"], (50, 200))
        self.assertEqual(options["probes"], 5)
        self.assertEqual(options["probe-interval"], 0.01)
        self.assertEqual(self.parse("--quick", "--stall", "0")["stallCounts"], ())
        self.assertTrue(self.parse("--stall-only")["stall-only"])

    def test_invalid(self) -> None:
        """
        A bad count, no probe, a zero interval, or nothing to measure with
        C{--stall-only} is a usage error.
        """
        for arguments in (
            ["--stall", "many"],
            ["--stall", "0,10"],
            ["--probes", "0"],
            ["--probe-interval", "0"],
            ["--stall-only", "--stall", "0"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *arguments)


def _row(strategy: str, count: int, stall: float) -> dict[str, Any]:
    summary = {"count": 10, "p50": 0.001, "p99": stall * 0.9, "max": stall}
    normal = {"count": 10, "p50": 0.001, "p99": 0.002, "max": 0.003}
    moved = strategy == "capability"
    return {
        "strategy": strategy,
        "count": count,
        "idle": count,
        "probes": 5,
        "probeInterval": 0.005,
        "exitCode": 0,
        "report": {
            "outcome": "success",
            "reason": None,
            "moved": count + 5,
            "draining": 0,
            "failed": 0,
            "durations": {"connections": stall * 0.8, "commit": 0.01},
            "oldPid": 100,
            "newPid": 200 if moved else 100,
        },
        "seconds": stall * 2,
        "stall": stall,
        "stallAt": stall * 1.5,
        "probeAnswers": 100,
        "during": summary,
        "before": normal,
        "after": normal,
        "probeUnansweredAtEnd": 0,
        "probeLost": {
            "connections": 0,
            "lines": 0,
            "duplicatedLines": 0,
            "stateErrors": 0,
        },
        "idleAfter": {
            "asked": count,
            "answered": count,
            "stateIntact": count - 1,
            "onNew": count if moved else 0,
            "servers": {"200" if moved else "100": count},
        },
        "idleLost": 0,
        "probesAfter": {
            "asked": 5,
            "answered": 5,
            "stateIntact": 5,
            "onNew": 5 if moved else 0,
            "servers": {"200" if moved else "100": 5},
        },
        "oldPid": 100,
        "newPid": 200 if moved else 100,
    }


def _stall(capability: float = 0.25) -> dict[str, Any]:
    return {
        "counts": [1000, 10000],
        "probes": 5,
        "probeInterval": 0.005,
        "strategies": ["capability", "reexec"],
        "rows": [
            _row("capability", 1000, capability),
            _row("reexec", 1000, 0.3),
            {"strategy": "capability", "count": 10000, "error": "HostFailed: gone"},
            {
                "strategy": "reexec",
                "count": 10000,
                "error": "not measured: 1000 failed",
            },
        ],
        "floors": [{"count": 1005, "seconds": 0.0025, "perSecond": 402000.0}],
        "startFloor": 0.15,
    }


class StallOutputTests(SynchronousTestCase):
    """
    Printing, comparing and drawing the stall scenario's results.
    """

    def test_table(self) -> None:
        """
        One table per count: each strategy's longest stall, its ratio to
        the floor, the idle connections answering afterwards and with their
        state, which process answered, and the phases; re-exec's stall
        minus the new image's start; when the longest wait began; a failure
        as a FAILED line.
        """
        text = "\n".join(formatStall(_stall()))
        self.assertIn("== stall: 1,000 idle connections + 5 probes", text)
        self.assertIn("floor: 1,005 descriptors by send_fds 2.5 ms", text)
        self.assertIn("re-exec floor (interpreter + twistd + reactor) 150 ms", text)
        [capability] = [
            line
            for line in text.splitlines()
            if line.startswith("  capability  ") and "FAILED" not in line
        ]
        self.assertEqual(
            capability.split(),
            [
                "capability",
                "250",
                "ms",
                "225",
                "ms",
                "3.0",
                "ms",
                "100.0x",
                "0",
                "1000/1000",
                "999/1000",
                "new",
                "1000",
                "success",
            ],
        )
        self.assertIn("same pid 1000", text)
        self.assertIn(
            "capability phases: connections 200 ms, commit 10.0 ms (command 500 ms)"
            "; longest wait began 375 ms after the command",
            text,
        )
        self.assertIn("stall minus the re-exec floor 150 ms", text)
        self.assertIn("== stall: 10,000 idle connections", text)
        self.assertIn("capability  FAILED: HostFailed: gone", text)
        self.assertIn("floor: 10,005 descriptors by send_fds not measured", text)

    def test_nothingMeasured(self) -> None:
        """
        Asked only for strategies that pause no connection, it says so.
        """
        stall = _stall()
        stall.update(rows=[], strategies=[], measuredFrom=["gradual"])
        self.assertEqual(
            formatStall(stall),
            ["== stall: not measured (none of gradual pauses connections)"],
        )

    def test_inResults(self) -> None:
        """
        The whole run's text includes the stall tables.
        """
        results = {"machine": {}, "scenarios": [], "stall": _stall()}
        self.assertIn("== stall: 1,000 idle connections", formatResults(results))

    def test_compare(self) -> None:
        """
        Each measured stall is a key figure, compared with an earlier run.
        """
        old = {"stall": _stall(0.2)}
        new = {"stall": _stall(0.1)}
        figures = keyFigures(new)
        self.assertEqual(figures["stall-capability-1000"]["longest s"], 0.1)
        self.assertEqual(figures["stall-floor-1005"]["seconds"], 0.0025)
        self.assertEqual(figures["stall-reexec-floor"]["seconds"], 0.15)
        self.assertNotIn("stall-capability-10000", figures)
        self.assertIn(
            "stall-capability-1000 longest s: 0.2 -> 0.1 (-50%)",
            formatComparison(old, new),
        )

    def test_ratios(self) -> None:
        """
        L{addRatios} gives each measured row its floor and ratio, and
        re-exec's its distance from the new image's start.
        """
        stall = _stall()
        addRatios(stall)
        capability, reexec, failed, _ = stall["rows"]
        self.assertEqual(capability["floor"], 0.0025)
        self.assertAlmostEqual(capability["ratio"], 100.0)
        self.assertNotIn("aboveStartFloor", capability)
        self.assertAlmostEqual(reexec["aboveStartFloor"], 0.15)
        self.assertNotIn("ratio", failed)

    def test_ratiosMissingFloor(self) -> None:
        """
        Without a floor or a re-exec floor, the figures are L{None}.
        """
        stall = _stall()
        stall["floors"] = []
        stall["startFloor"] = None
        addRatios(stall)
        self.assertIsNone(stall["rows"][0]["ratio"])
        self.assertIsNone(stall["rows"][1]["aboveStartFloor"])

    def test_plotPath(self) -> None:
        """
        The stall picture goes beside the timeline.
        """
        self.assertEqual(stallPlotPath("out/timeline.png"), "out/timeline-stall.png")
        self.assertEqual(stallPlotPath("picture"), "picture-stall.png")

    def test_plotNothing(self) -> None:
        """
        With no stall measured there is nothing to draw.
        """
        stall = copy.deepcopy(_stall())
        stall["rows"] = stall["rows"][2:]
        self.assertRaises(ValueError, plotStall, stall, "unused.png")

    def test_plotNeedsMatplotlib(self) -> None:
        """
        Without matplotlib, drawing says which extra of the distribution
        brings it (the distribution is C{txmigrate}, not C{migrate}).
        """
        self.patch(sys, "modules", dict(sys.modules, matplotlib=None))
        raised = self.assertRaises(MissingMatplotlib, _pyplot)
        self.assertIn("pip install 'txmigrate[bench]'", str(raised))


class CheckedTests(SynchronousTestCase):
    """
    L{_checked} tells which idle connections answered afterwards, with
    their state, and from which process.
    """

    def client(self, server: bytes, count: int | None) -> LongLivedClient:
        client = LongLivedClient(LoadGenerator(MemoryReactorClock(), 1))
        client.server = server
        client.lastCount = count
        return client

    def test_checked(self) -> None:
        """
        A connection whose count went on is intact; one whose count started
        again answered but lost its state; one still waiting or lost did
        not answer.
        """
        intact = self.client(b"7", 3)
        restarted = self.client(b"7", 1)
        old = self.client(b"6", 3)
        waiting = self.client(b"7", 2)
        waiting.pending.append((5, 0.0, 2))
        lost = self.client(b"7", 3)
        lost.lost = "reset"
        result = _checked({intact: 2, restarted: 2, old: 2, waiting: 1, lost: 2}, 7)
        self.assertEqual(
            result,
            {
                "asked": 5,
                "answered": 3,
                "stateIntact": 2,
                "onNew": 2,
                "servers": {"7": 2, "6": 1},
            },
        )


class StallScenarioTests(TestCase):
    """
    The stall scenario against real hosts, small: what it reports, never
    how long anything took.
    """

    timeout = 180

    @inlineCallbacks
    def test_capability(self) -> Any:
        """
        One capability host, measured at 20 then 50 idle connections with 5
        probes: both upgrades succeed, every idle connection answers the
        new process afterwards with its count gone on, the probes were
        answered while the upgrade ran and by the new process after it, and
        every process has ended.
        """
        lines: list[str] = []
        settings = StallSettings(
            counts=(20, 50),
            probes=5,
            probeInterval=0.005,
            before=0.2,
            after=0.2,
            upgradeTimeout=60.0,
            answerTimeout=30.0,
        )
        rows = yield Deferred.fromCoroutine(
            measureStall(_reactor, "capability", settings, lines.append)
        )
        self.assertEqual([row.get("error") for row in rows], [None, None], lines)
        self.assertEqual([row["count"] for row in rows], [20, 50])
        for row in rows:
            count = row["count"]
            self.assertEqual(row["report"]["outcome"], "success")
            self.assertEqual(row["report"]["moved"], count + 5)
            self.assertNotEqual(row["newPid"], row["oldPid"])
            self.assertEqual(row["idle"], count)
            after = row["idleAfter"]
            self.assertEqual(
                (after["answered"], after["stateIntact"], after["onNew"]),
                (count, count, count),
            )
            self.assertEqual(after["servers"], {str(row["newPid"]): count})
            self.assertEqual(row["probesAfter"]["onNew"], 5)
            self.assertGreater(row["during"]["count"], 0)
            self.assertGreater(row["probeAnswers"], 0)
            self.assertIsNotNone(row["stall"])
            self.assertEqual(row["idleLost"], 0)
            self.assertEqual(
                row["probeLost"],
                {"connections": 0, "lines": 0, "duplicatedLines": 0, "stateErrors": 0},
            )
            self.assertEqual(row["probeUnansweredAtEnd"], 0)
            self.assertIn("connections", row["report"]["durations"])
        # The same host served both counts: the second upgrade started from
        # the process the first one handed over to.
        self.assertEqual(rows[1]["oldPid"], rows[0]["newPid"])
        pids = {row["oldPid"] for row in rows} | {row["newPid"] for row in rows}
        self.assertEqual([pid for pid in pids if pidAlive(pid)], [])
