"""
Tests for L{migrate.chaos}: the fault campaign's options, its table and
what it reads about processes.  (The campaign itself runs real hosts; CI
runs a short seeded one.)
"""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ..chaos._campaign import CampaignOptions, Round, formatTable
from ..chaos._faults import (
    FAULTS,
    descriptorCount,
    faultsFor,
    isStopped,
    roleOf,
    sessionProcesses,
)


class OptionsTests(SynchronousTestCase):
    """
    L{CampaignOptions} checks what it is given.
    """

    def test_defaults(self) -> None:
        """
        Every strategy and fault by default; the seed given is kept.
        """
        options = CampaignOptions()
        options.parseOptions(["--seed", "7"])
        self.assertEqual(options["seed"], "7")
        self.assertEqual(
            options["strategies"], ["capability", "gradual", "reexec", "reload"]
        )
        self.assertEqual(options["faults"], [fault.name for fault in FAULTS])
        self.assertEqual(options["rounds"], 20)

    def test_unknownFault(self) -> None:
        """
        An unknown fault is refused.
        """
        self.assertRaises(
            usage.UsageError, CampaignOptions().parseOptions, ["--faults", "meteor"]
        )

    def test_unknownStrategy(self) -> None:
        """
        An unknown strategy is refused.
        """
        self.assertRaises(
            usage.UsageError, CampaignOptions().parseOptions, ["--strategies", "x"]
        )


class FaultsTests(SynchronousTestCase):
    """
    Which faults apply where.
    """

    def test_faultsFor(self) -> None:
        """
        Module reload starts no successor and takes no descriptor; re-exec
        starts a trial child, not a successor.
        """
        reload = {fault.name for fault in faultsFor("reload")}
        self.assertNotIn("kill-successor", reload)
        self.assertNotIn("fd-limit", reload)
        self.assertIn("kill-trial", reload)
        reexec = {fault.name for fault in faultsFor("reexec", ["none", "fd-limit"])}
        self.assertEqual(reexec, {"none", "fd-limit"})

    def test_thisProcess(self) -> None:
        """
        This process is found in its session, is not stopped, holds
        descriptors and is neither a successor nor a trial child.
        """
        self.assertIn(os.getpid(), sessionProcesses(os.getsid(0)))
        self.assertFalse(isStopped(os.getpid()))
        self.assertGreater(descriptorCount(os.getpid()) or 0, 2)
        self.assertEqual(roleOf(os.getpid()), "other")


class TableTests(SynchronousTestCase):
    """
    The campaign's table.
    """

    def test_table(self) -> None:
        """
        One row a round, violations spelled out, and a summary naming the
        seed and counting the rounds that broke an invariant.
        """
        good = Round(1, "reexec", "kill-trial", 0.1, "killed trial 12", "refused")
        bad = Round(2, "capability", "none", 0.2, outcome="success")
        bad.violations.append("3 connections lost")
        table = formatTable([good, bad], "9")
        lines = table.splitlines()
        self.assertTrue(lines[0].startswith("round"))
        self.assertTrue(lines[2].endswith("ok"))
        self.assertTrue(lines[3].endswith("VIOLATED: 3 connections lost"))
        self.assertIn("seed 9: 2 rounds", table)
        self.assertIn("1 rounds held every invariant, 1 broke one", table)
        self.assertEqual(bad.toJSON()["violations"], ["3 connections lost"])
