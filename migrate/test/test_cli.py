"""
Tests for L{migrate._cli}: C{python -m migrate status} and C{upgrade}, over
the control client they share with the rolling upgrade
(L{migrate._control._client}, L{migrate._control._format}).

The commands run against a fake connection layer on a L{Clock}; the real
connector is tested against real Unix sockets, and one end-to-end class runs
the CLI as a subprocess against a control channel served by this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
from io import StringIO
from typing import Any, Callable, Mapping

from attrs import Factory, define
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

import migrate
from migrate._cli import (
    RETRY_INTERVAL,
    MigrateOptions,
    StatusOptions,
    UpgradeOptions,
    migrateVersion,
    run,
)
from migrate._control._client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    BadReply,
    CannotConnect,
    HostClosedConnection,
    Output,
    connectControl,
)
from migrate._control._commands import MigrationInProgress, UnknownStrategy
from migrate._control._format import formatReport, formatStatus
from migrate._control._server import listenControl

STATUS = {
    "pid": 1234,
    "generation": 3,
    "strategy": "capability",
    "phase": "idle",
    "listeners": [{"key": "tcp:8000", "address": "0.0.0.0:8000", "connections": 2}],
    "connections": 2,
    "draining": [],
    "lastReport": None,
}


def makeStatus(**changes: Any) -> dict[str, Any]:
    status = dict(STATUS)
    status.update(changes)
    return status


def makeReport(**changes: Any) -> dict[str, Any]:
    report = {
        "strategy": "capability",
        "outcome": "success",
        "reason": None,
        "fromGeneration": 3,
        "toGeneration": 4,
        "oldPid": 1234,
        "newPid": 1300,
        "listeners": [{"key": "tcp:8000", "moved": 2, "drained": 0, "failed": 0}],
        "moved": 2,
        "draining": 0,
        "failed": 0,
        "durations": {"spawning": 0.25, "handing-off": 0.01},
        "successorLog": ["successor started"],
        "notes": ["all moved"],
    }
    report.update(changes)
    return report


def draining(generation: int, connections: int) -> dict[str, Any]:
    return makeStatus(
        generation=generation + 1,
        draining=[{"generation": generation, "pid": 1234, "connections": connections}],
    )


def _deferred(value: Any) -> Deferred[Any]:
    if isinstance(value, Deferred):
        return value
    if isinstance(value, BaseException):
        return fail(value)
    return succeed(value)


@define
class FakeClient:
    """
    A L{migrate._control._client.ControlClient}: answers from scripted lists.
    """

    statuses: list[Any] = Factory(list)
    upgradeResult: Any = None
    progress: list[str] = Factory(list)
    onProgress: Callable[[str], None] | None = None
    upgrades: list[str | None] = Factory(list)
    overrides: list[dict[str, float]] = Factory(list)
    disconnected: int = 0

    def status(self) -> Deferred[Any]:
        return _deferred(self.statuses.pop(0))

    def upgrade(
        self, strategy: str | None, overrides: dict[str, float] | None = None
    ) -> Deferred[Any]:
        self.upgrades.append(strategy)
        self.overrides.append(dict(overrides or {}))
        assert self.onProgress is not None
        for message in self.progress:
            self.onProgress(message)
        return _deferred(self.upgradeResult)

    def disconnect(self) -> None:
        self.disconnected += 1


@define
class FakeConnector:
    """
    A L{migrate._control._client.Connector} handing out scripted clients (or failures).
    """

    results: list[Any] = Factory(list)
    paths: list[str] = Factory(list)

    def __call__(
        self, reactor: Any, path: str, onProgress: Callable[[str], None]
    ) -> Deferred[Any]:
        self.paths.append(path)
        result = self.results.pop(0)
        if isinstance(result, FakeClient):
            result.onProgress = onProgress
        return _deferred(result)


@define
class Outcome:
    code: int | None
    stdout: str
    stderr: str

    @property
    def lastJSON(self) -> Any:
        return json.loads(self.stdout.splitlines()[-1])


class CommandTestsMixin:
    """
    Runs commands against a fake connector on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.stdout = StringIO()
        self.stderr = StringIO()
        self.codes: list[int] = []

    def start(self, argv: list[str], *results: Any) -> FakeConnector:
        self.connector = FakeConnector(list(results))
        run(
            self.clock,
            argv,
            connect=self.connector,
            stdout=self.stdout,
            stderr=self.stderr,
        ).addCallback(self.codes.append)
        return self.connector

    @property
    def outcome(self) -> Outcome:
        return Outcome(
            self.codes[0] if self.codes else None,
            self.stdout.getvalue(),
            self.stderr.getvalue(),
        )

    def runCommand(self, argv: list[str], *results: Any) -> Outcome:
        self.setUp()
        self.start(argv, *results)
        assert self.codes, "command did not finish"
        return self.outcome


class UsageTests(CommandTestsMixin, SynchronousTestCase):
    """
    Bad arguments exit with status 2 and a hint, without connecting.
    """

    def assertUsage(self, argv: list[str], text: str) -> None:
        outcome = self.runCommand(argv)
        self.assertEqual(outcome.code, EXIT_USAGE)
        self.assertIn(text, outcome.stderr)
        self.assertIn("--help", outcome.stderr)
        self.assertEqual(outcome.stdout, "")

    def test_noCommand(self) -> None:
        self.assertUsage([], "a command is needed")

    def test_unknownCommand(self) -> None:
        self.assertUsage(["frobnicate"], "frobnicate")

    def test_unknownOption(self) -> None:
        self.assertUsage(["status", "--bogus"], "bogus")

    def test_badTimeout(self) -> None:
        self.assertUsage(["upgrade", "--timeout", "-1"], "--timeout needs")
        self.assertUsage(["upgrade", "--timeout", "soon"], "'soon'")
        self.assertUsage(["status", "--timeout", "inf"], "--timeout needs")
        self.assertUsage(["upgrade", "--ready-timeout", "0"], "--ready-timeout needs")
        self.assertUsage(["upgrade", "--drain-timeout", "x"], "--drain-timeout needs")

    def test_optionErrorsSayWhatIsWrong(self) -> None:
        """
        An option's error is its own message, without usage's "Parameter
        type enforcement failed:" in front.
        """
        outcome = self.runCommand(["upgrade", "--timeout", "soon"])
        self.assertTrue(
            outcome.stderr.startswith(
                "migrate: --timeout needs a positive number of seconds, not 'soon'\n"
            ),
            outcome.stderr,
        )
        self.assertNotIn("enforcement", outcome.stderr)

    def test_programNamed(self) -> None:
        """
        The hint after a usage error names the command the user ran:
        C{python -m migrate} unless told otherwise (the C{txmigrate}
        command says C{txmigrate}).
        """
        outcome = self.runCommand(["frobnicate"])
        self.assertIn("Try 'python -m migrate --help'", outcome.stderr)
        self.setUp()
        run(
            self.clock,
            ["frobnicate"],
            connect=FakeConnector([]),
            stdout=self.stdout,
            stderr=self.stderr,
            program="txmigrate",
        ).addCallback(self.codes.append)
        self.assertEqual(self.outcome.code, EXIT_USAGE)
        self.assertIn(
            "Try 'txmigrate --help' or 'txmigrate COMMAND --help'.",
            self.outcome.stderr,
        )

    def test_synopsisNamesProgram(self) -> None:
        """
        The usage line of C{--help}, the command's and each subcommand's,
        names the program it was given.
        """
        options = MigrateOptions("txmigrate")
        self.assertEqual(options.getSynopsis(), "Usage: txmigrate COMMAND [options]")
        options.parseOptions(["status"])
        self.assertIn("Usage: txmigrate status", str(options.subOptions))
        self.assertEqual(
            MigrateOptions().getSynopsis(), "Usage: python -m migrate COMMAND [options]"
        )

    def test_emptyStrategy(self) -> None:
        self.assertUsage(["upgrade", "--strategy", " "], "--strategy")

    def test_unknownStrategy(self) -> None:
        """
        An unknown strategy is a usage error listing the strategies; the
        host is not asked, and nothing claims an upgrade.
        """
        outcome = self.runCommand(["upgrade", "--strategy", "fast"])
        self.assertEqual(outcome.code, EXIT_USAGE)
        self.assertTrue(
            outcome.stderr.startswith(
                "migrate: --strategy must be one of capability, gradual, reexec, "
                "reload, not 'fast'\n"
            ),
            outcome.stderr,
        )
        self.assertNotIn("upgrading", outcome.stderr)

    def test_positionalArgument(self) -> None:
        self.assertUsage(["status", "extra"], "")

    def test_version(self) -> None:
        """
        C{--version}, alone or after a command, prints migrate's version
        (and Twisted's and Python's after it) and exits with status 0.
        """
        for argv in [["--version"], ["upgrade", "--version"], ["rolling", "--version"]]:
            output = StringIO()
            self.patch(sys, "stdout", output)
            outcome = self.runCommand(argv)
            self.assertEqual(outcome.code, EXIT_OK)
            self.assertTrue(
                output.getvalue().startswith(
                    "migrate {} (Twisted ".format(migrateVersion())
                ),
                output.getvalue(),
            )

    def test_helpHasNoRunsOfSpaces(self) -> None:
        """
        The help's descriptions are single-spaced.
        """
        for options in [MigrateOptions(), UpgradeOptions(), StatusOptions()]:
            texts = [getattr(options, "longdesc")] + list(options.docs.values())
            for text in texts:
                self.assertIsNone(re.search(r"\S\s{2,}\S", text or ""), text)


class StatusCommandTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{python -m migrate status}.
    """

    def test_human(self) -> None:
        client = FakeClient(statuses=[STATUS])
        outcome = self.runCommand(["status"], client)
        self.assertEqual(outcome.code, EXIT_OK)
        self.assertEqual(outcome.stdout, formatStatus(STATUS) + "\n")
        self.assertEqual(outcome.stderr, "")
        self.assertEqual(self.connector.paths, ["./migrate-host.sock"])
        self.assertEqual(client.disconnected, 1)

    def test_json(self) -> None:
        outcome = self.runCommand(
            ["status", "--control", "/run/x.sock", "--json"],
            FakeClient(statuses=[STATUS]),
        )
        self.assertEqual(outcome.code, EXIT_OK)
        self.assertEqual(outcome.lastJSON, STATUS)
        self.assertEqual(len(outcome.stdout.splitlines()), 1)
        self.assertEqual(self.connector.paths, ["/run/x.sock"])

    def test_cannotConnect(self) -> None:
        outcome = self.runCommand(
            ["status"], CannotConnect("cannot connect to x: connection refused")
        )
        self.assertEqual(outcome.code, EXIT_UNREACHABLE)
        self.assertEqual(
            outcome.stderr, "migrate: cannot connect to x: connection refused\n"
        )
        self.assertEqual(outcome.stdout, "")

    def test_cannotConnectJSON(self) -> None:
        outcome = self.runCommand(["status", "--json"], CannotConnect("refused"))
        self.assertEqual(outcome.code, EXIT_UNREACHABLE)
        self.assertEqual(outcome.lastJSON, {"error": "refused", "exitCode": 3})

    def test_hostClosed(self) -> None:
        client = FakeClient(statuses=[HostClosedConnection("closed before answering")])
        outcome = self.runCommand(["status"], client)
        self.assertEqual(outcome.code, EXIT_UNREACHABLE)
        self.assertIn("closed before answering", outcome.stderr)
        self.assertEqual(client.disconnected, 1)

    def test_badReply(self) -> None:
        outcome = self.runCommand(
            ["status"],
            FakeClient(statuses=[BadReply("the host sent a malformed status")]),
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("malformed status", outcome.stderr)

    def test_connectTimeout(self) -> None:
        self.start(["status", "--timeout", "2"], Deferred())
        self.clock.advance(1.9)
        self.assertEqual(self.codes, [])
        self.clock.advance(0.2)
        self.assertEqual(self.outcome.code, EXIT_TIMEOUT)
        self.assertIn(
            "timed out connecting to ./migrate-host.sock", self.outcome.stderr
        )

    def test_answerTimeout(self) -> None:
        client = FakeClient(statuses=[Deferred()])
        self.start(["status"], client)
        self.clock.advance(30)
        self.assertEqual(self.outcome.code, EXIT_TIMEOUT)
        self.assertIn("timed out waiting for the host's status", self.outcome.stderr)
        self.assertEqual(client.disconnected, 1)

    def test_unexpectedErrorExplained(self) -> None:
        """
        A bug shows as an internal error with its traceback, exit 1.
        """
        outcome = self.runCommand(
            ["status"], FakeClient(statuses=[ZeroDivisionError()])
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("internal error", outcome.stderr)
        self.assertIn("ZeroDivisionError", outcome.stderr)


class UpgradeCommandTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{python -m migrate upgrade}.
    """

    def test_success(self) -> None:
        client = FakeClient(
            statuses=[STATUS],
            upgradeResult=makeReport(),
            progress=["spawning successor", "handing off 2 connections"],
        )
        outcome = self.runCommand(["upgrade"], client)
        self.assertEqual(outcome.code, EXIT_OK)
        self.assertEqual(outcome.stdout, formatReport(makeReport()) + "\n")
        self.assertEqual(
            outcome.stderr,
            "[migrate] upgrading generation 3 (pid 1234) with strategy capability\n"
            "[migrate] spawning successor\n"
            "[migrate] handing off 2 connections\n",
        )
        self.assertEqual(client.upgrades, [None])

    def test_json(self) -> None:
        client = FakeClient(
            statuses=[STATUS], upgradeResult=makeReport(), progress=["spawning"]
        )
        outcome = self.runCommand(["upgrade", "--json", "-s", "reload"], client)
        self.assertEqual(outcome.code, EXIT_OK)
        self.assertEqual(outcome.lastJSON, makeReport())
        self.assertEqual(client.upgrades, ["reload"])
        self.assertIn("[migrate] spawning\n", outcome.stderr)

    def test_rolledBack(self) -> None:
        report = makeReport(outcome="rolled-back", reason="successor not ready in 10 s")
        outcome = self.runCommand(
            ["upgrade", "--json"], FakeClient(statuses=[STATUS], upgradeResult=report)
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertEqual(outcome.lastJSON, report)
        self.assertIn(
            "migrate: migration rolled-back: successor not ready in 10 s\n",
            outcome.stderr,
        )

    def test_refused(self) -> None:
        report = makeReport(outcome="refused", reason="no strategy can run")
        outcome = self.runCommand(
            ["upgrade"], FakeClient(statuses=[STATUS], upgradeResult=report)
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("migration refused: no strategy can run", outcome.stderr)

    def test_migrationInProgress(self) -> None:
        """
        A host already migrating refuses: the error alone, exit 1, and no
        line claiming an upgrade.
        """
        outcome = self.runCommand(
            ["upgrade", "--json"],
            FakeClient(
                statuses=[STATUS],
                upgradeResult=MigrationInProgress("a migration is already running"),
            ),
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertEqual(outcome.stderr, "migrate: a migration is already running\n")
        self.assertEqual(outcome.lastJSON["exitCode"], EXIT_FAILED)

    def test_announcementNeedsTheHost(self) -> None:
        """
        The announcement of an upgrade is said before the host's first
        progress line, not before this command's own lines, and never after
        an error.
        """
        stderr = StringIO()
        out = Output(StringIO(), stderr)
        out.announce("upgrading")
        out.progress("local")
        out.hostProgress("spawning")
        out.hostProgress("ready")
        out.announce("upgrading again")
        out.error("a migration is already running")
        out.hostProgress("late")
        self.assertEqual(
            stderr.getvalue(),
            "[migrate] local\n"
            "[migrate] upgrading\n"
            "[migrate] spawning\n"
            "[migrate] ready\n"
            "migrate: a migration is already running\n"
            "[migrate] late\n",
        )

    def test_hostDoesNotKnowStrategy(self) -> None:
        """
        A host (of another version) that does not know the strategy: a
        usage error, exit 2, and no line claiming an upgrade.
        """
        outcome = self.runCommand(
            ["upgrade", "--strategy", "reload"],
            FakeClient(
                statuses=[STATUS],
                upgradeResult=UnknownStrategy("unknown strategy 'reload'"),
            ),
        )
        self.assertEqual(outcome.code, EXIT_USAGE)
        self.assertEqual(outcome.stderr, "migrate: unknown strategy 'reload'\n")

    def test_overrides(self) -> None:
        """
        C{--ready-timeout} and C{--drain-timeout} go to the host with the
        upgrade, for this migration only; without them nothing is sent.
        """
        client = FakeClient(statuses=[STATUS], upgradeResult=makeReport())
        outcome = self.runCommand(
            ["upgrade", "--ready-timeout", "5", "--drain-timeout", "2.5"], client
        )
        self.assertEqual(outcome.code, EXIT_OK)
        self.assertEqual(client.overrides, [{"readyTimeout": 5.0, "drainTimeout": 2.5}])
        client = FakeClient(statuses=[STATUS], upgradeResult=makeReport())
        self.runCommand(["upgrade"], client)
        self.assertEqual(client.overrides, [{}])

    def test_remoteError(self) -> None:
        outcome = self.runCommand(
            ["upgrade"],
            FakeClient(
                statuses=[STATUS],
                upgradeResult=amp.UnknownRemoteError("Code<UNKNOWN>: Unknown Error"),
            ),
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("the host failed", outcome.stderr)

    def test_timeout(self) -> None:
        client = FakeClient(statuses=[STATUS], upgradeResult=Deferred())
        self.start(["upgrade", "--timeout", "5"], client)
        self.clock.advance(4.9)
        self.assertEqual(self.codes, [])
        self.clock.advance(0.2)
        self.assertEqual(self.outcome.code, EXIT_TIMEOUT)
        self.assertEqual(
            self.outcome.stderr,
            "migrate: timed out waiting for the migration report; the migration "
            "goes on in the host: `python -m migrate status --control "
            "./migrate-host.sock` shows how it ended (Last migration)\n",
        )
        self.assertEqual(client.disconnected, 1)

    def test_cannotConnect(self) -> None:
        outcome = self.runCommand(["upgrade"], CannotConnect("no such file"))
        self.assertEqual(outcome.code, EXIT_UNREACHABLE)

    def test_wait(self) -> None:
        """
        With C{--wait}, the command reconnects and polls until the old
        generation has no connection left, saying how many remain.
        """
        first = FakeClient(statuses=[STATUS], upgradeResult=makeReport())
        second = FakeClient(
            statuses=[draining(3, 5), draining(3, 5), draining(3, 2), draining(2, 1)]
        )
        self.start(["upgrade", "--wait", "--json"], first, second)
        self.assertEqual(self.codes, [])
        self.assertEqual(self.outcome.lastJSON, makeReport())
        for _ in range(3):
            self.clock.advance(0.2)
        self.assertEqual(self.outcome.code, EXIT_OK)
        self.assertEqual(self.connector.paths, ["./migrate-host.sock"] * 2)
        self.assertEqual(
            [line for line in self.outcome.stderr.splitlines() if "drain" in line],
            [
                "[migrate] waiting for generation 3 to drain: 5 connections left",
                "[migrate] waiting for generation 3 to drain: 2 connections left",
                "[migrate] generation 3 has drained",
            ],
        )
        self.assertEqual(second.disconnected, 1)

    def test_waitTimeout(self) -> None:
        first = FakeClient(statuses=[STATUS], upgradeResult=makeReport())
        second = FakeClient(statuses=[draining(3, 1)] * 100)
        self.start(["upgrade", "--wait", "--timeout", "1"], first, second)
        self.clock.pump([0.2] * 10)
        self.assertEqual(self.outcome.code, EXIT_TIMEOUT)
        self.assertIn(
            "timed out waiting for generation 3 to drain (1 connection left)",
            self.outcome.stderr,
        )
        self.assertIn("Migration success", self.outcome.stdout)

    def test_waitRetriesConnecting(self) -> None:
        first = FakeClient(statuses=[STATUS], upgradeResult=makeReport())
        self.start(
            ["upgrade", "--wait"],
            first,
            CannotConnect("refused"),
            FakeClient(statuses=[makeStatus(generation=4)]),
        )
        self.clock.advance(0.2)
        self.assertEqual(self.outcome.code, EXIT_OK)

    def test_waitUnreachableToTheEnd(self) -> None:
        first = FakeClient(statuses=[STATUS], upgradeResult=makeReport())
        self.start(
            ["upgrade", "--wait", "--timeout", "1"],
            first,
            *[CannotConnect("cannot connect to x: refused")] * 10,
        )
        self.clock.pump([0.2] * 10)
        self.assertEqual(self.outcome.code, EXIT_UNREACHABLE)
        self.assertIn("cannot connect to x: refused", self.outcome.stderr)

    def test_noWaitAfterRollback(self) -> None:
        report = makeReport(outcome="rolled-back", reason="boom")
        outcome = self.runCommand(
            ["upgrade", "--wait"], FakeClient(statuses=[STATUS], upgradeResult=report)
        )
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertEqual(len(self.connector.paths), 1)

    def test_lostConnectionReportRecovered(self) -> None:
        """
        A re-exec ends the control connection: the report is then read from
        the status of whichever process serves.
        """
        report = makeReport(strategy="reexec", oldPid=1234, newPid=1234)
        first = FakeClient(
            statuses=[STATUS], upgradeResult=HostClosedConnection("closed")
        )
        second = FakeClient(
            statuses=[
                makeStatus(phase="spawning"),
                makeStatus(generation=4, lastReport=report),
            ]
        )
        self.start(["upgrade", "--json"], first, second)
        self.clock.advance(0.2)
        self.assertEqual(self.outcome.code, EXIT_OK)
        self.assertEqual(self.outcome.lastJSON, report)
        self.assertIn("reconnecting", self.outcome.stderr)

    def test_lostConnectionHostGone(self) -> None:
        """
        When the host is gone (the control socket refuses connections for
        longer than a migration ever lets it), the upgrade command says so
        with the cannot-connect status instead of waiting out its timeout.
        """
        first = FakeClient(
            statuses=[STATUS], upgradeResult=HostClosedConnection("closed")
        )
        self.start(
            ["upgrade", "--json"],
            first,
            *[CannotConnect("cannot connect to x: connection refused")] * 40,
        )
        self.clock.pump([0.2] * 24)
        self.assertIsNone(self.outcome.code)
        self.clock.pump([0.2] * 2)
        self.assertEqual(self.outcome.code, EXIT_UNREACHABLE)
        self.assertIn("connection refused", self.outcome.stderr)

    def test_lostConnectionOldReportIgnored(self) -> None:
        """
        A rolled-back report already there before this upgrade is not its
        outcome.
        """
        old = makeReport(outcome="rolled-back", toGeneration=None)
        first = FakeClient(
            statuses=[makeStatus(lastReport=old)],
            upgradeResult=HostClosedConnection("closed"),
        )
        second = FakeClient(
            statuses=[
                makeStatus(lastReport=old, phase="spawning"),
                makeStatus(generation=4),
            ]
        )
        self.start(["upgrade", "--json"], first, second)
        self.clock.advance(0.2)
        self.assertEqual(self.outcome.code, EXIT_OK)
        recovered = self.outcome.lastJSON
        self.assertEqual(
            (
                recovered["outcome"],
                recovered["fromGeneration"],
                recovered["toGeneration"],
            ),
            ("success", 3, 4),
        )
        self.assertIn("no report reached this client", recovered["notes"][0])

    def test_lostConnectionNothingChanged(self) -> None:
        first = FakeClient(
            statuses=[STATUS], upgradeResult=HostClosedConnection("closed")
        )
        second = FakeClient(statuses=[makeStatus()])
        outcome = self.runCommand(["upgrade"], first, second)
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("did not complete", outcome.stderr)


class FormatTests(SynchronousTestCase):
    """
    The human-readable summaries.
    """

    def test_status(self) -> None:
        status = makeStatus(
            draining=[{"generation": 2, "pid": 1100, "connections": 1}],
            lastReport=makeReport(outcome="rolled-back", reason="boom"),
        )
        self.assertEqual(
            formatStatus(status),
            "Host pid 1234, generation 3, strategy capability, phase idle\n"
            "Connections: 2\n"
            "Listeners:\n"
            "  tcp:8000 on 0.0.0.0:8000: 2 connections\n"
            "Draining:\n"
            "  generation 2 (pid 1100): 1 connection left\n"
            "Last migration: rolled-back with strategy capability: generation 3 "
            "(pid 1234) still serves; no new generation\n"
            "  reason: boom",
        )

    def test_statusMaxDraining(self) -> None:
        """
        The bound on draining generations shows, and which one is closing
        its connections to make room.
        """
        status = makeStatus(
            draining=[
                {"generation": 1, "pid": 1000, "connections": 4, "closing": True}
            ],
            maxDraining=1,
        )
        text = formatStatus(status)
        self.assertIn("Draining: (at most 1 at once)\n", text)
        self.assertIn(
            "  generation 1 (pid 1000): 4 connections left, closing them to make "
            "room\n",
            text,
        )

    def test_statusEmpty(self) -> None:
        text = formatStatus(makeStatus(listeners=[]))
        self.assertIn("Listeners: none", text)
        self.assertIn("Draining: none", text)
        self.assertIn("Last migration: none", text)

    def test_report(self) -> None:
        self.assertEqual(
            formatReport(makeReport(reason="all good")),
            "Migration success with strategy capability, generation 3 -> 4 "
            "(pid 1234 -> 1300)\n"
            "Connections: 2 moved, 0 draining, 0 failed\n"
            "Reason: all good\n"
            "Listeners:\n"
            "  tcp:8000: 2 moved, 0 draining, 0 failed\n"
            "Durations: spawning 0.250s, handing-off 0.010s\n"
            "Notes:\n"
            "  - all moved\n"
            "Successor log:\n"
            "  | successor started",
        )

    def test_sameProcess(self) -> None:
        """
        A migration in place (re-exec, module reload) names the process
        that serves: the same one.
        """
        report = makeReport(strategy="reload", newPid=1234)
        self.assertEqual(
            formatReport(report).splitlines()[0],
            "Migration success with strategy reload, generation 3 -> 4 "
            "(pid 1234, the same process)",
        )

    def test_nothingToDo(self) -> None:
        """
        A successful migration that changed nothing (a reload with no
        module changed) says the generation is unchanged.
        """
        report = makeReport(strategy="reload", newPid=1234, toGeneration=None)
        self.assertEqual(
            formatReport(report).splitlines()[0],
            "Migration success with strategy reload, generation 3 unchanged "
            "(pid 1234, the same process)",
        )

    def test_rolledBack(self) -> None:
        """
        A rollback says that the old generation still serves every
        connection, not "0 failed", and names no new process.
        """
        report = makeReport(
            outcome="rolled-back",
            reason="the new code refused connection from 127.0.0.1:4000",
            toGeneration=None,
            newPid=None,
            moved=0,
            draining=0,
            failed=0,
            listeners=[{"key": "tcp:8000", "moved": 0, "drained": 0, "failed": 0}],
            durations={},
            successorLog=[],
            notes=[],
        )
        self.assertEqual(
            formatReport(report),
            "Migration rolled-back with strategy capability: generation 3 "
            "(pid 1234) still serves; no new generation\n"
            "Connections: none moved; the old code serves them all, as before\n"
            "Reason: the new code refused connection from 127.0.0.1:4000",
        )

    def test_gradualDraining(self) -> None:
        """
        Connections left on the old process are said to be draining, not
        drained.
        """
        report = makeReport(
            strategy="gradual",
            moved=0,
            draining=1,
            listeners=[{"key": "tcp:8000", "moved": 0, "drained": 1, "failed": 0}],
        )
        text = formatReport(report)
        self.assertIn("Connections: 0 moved, 1 draining, 0 failed\n", text)
        self.assertIn("  tcp:8000: 0 moved, 1 draining, 0 failed\n", text)
        self.assertNotIn("drained", text)

    def test_longSuccessorLog(self) -> None:
        text = formatReport(makeReport(successorLog=[str(n) for n in range(50)]))
        self.assertIn("Successor log (last 20 of 50 lines; --json has all):", text)
        self.assertTrue(text.endswith("  | 49"))
        self.assertNotIn("  | 29\n", text)

    def test_tolerant(self) -> None:
        """
        Missing or ill-typed fields (another version's host) do not break
        the summaries.
        """
        for value in [{}, {"listeners": "x", "draining": [1, None], "lastReport": 3}]:
            self.assertIn("Host pid ?", formatStatus(value))
        weird = {
            "listeners": [None, {}],
            "durations": {"a": "b"},
            "notes": [],
            "successorLog": 7,
        }
        self.assertIn("Migration ? with strategy ?", formatReport(weird))


def shortTemporaryDirectory(case: SynchronousTestCase) -> str:
    directory = tempfile.mkdtemp(prefix="migrate-cli-")
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


class ConnectControlTests(TestCase):
    """
    The real connector's explanations, against real paths.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.directory = shortTemporaryDirectory(self)

    @inlineCallbacks
    def assertCannotConnect(self, path: str, text: str) -> Any:
        d = connectControl(self.reactor, path, lambda message: None)
        with self.assertRaises(CannotConnect) as caught:
            yield d.addTimeout(10, self.reactor)
        self.assertIn(text, str(caught.exception))
        self.assertIn(path, str(caught.exception))

    def test_missing(self) -> Deferred[Any]:
        return self.assertCannotConnect(
            os.path.join(self.directory, "none.sock"), "no such file"
        )

    def test_notASocket(self) -> Deferred[Any]:
        path = os.path.join(self.directory, "file")
        with open(path, "w"):
            pass
        return self.assertCannotConnect(path, "not a socket")

    def test_refused(self) -> Deferred[Any]:
        path = os.path.join(self.directory, "stale.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        return self.assertCannotConnect(path, "connection refused")


@define
class ScriptedHost:
    """
    A host for the end-to-end tests: fixed status, scripted upgrade.
    """

    report: dict[str, Any] | None = None
    error: Exception | None = None

    def statusSnapshot(self) -> dict[str, Any]:
        return dict(STATUS)

    def requestUpgrade(
        self,
        strategyName: str | None,
        progress: Callable[[str], None],
        overrides: Mapping[str, float] | None = None,
    ) -> Deferred[dict[str, Any]]:
        if self.error is not None:
            return fail(self.error)
        progress("spawning successor")
        progress("strategy {}".format(strategyName))
        if overrides:
            progress("overrides {}".format(sorted(overrides.items())))
        assert self.report is not None
        return succeed(self.report)


class EndToEndTests(TestCase):
    """
    C{python -m migrate} as a subprocess against a control channel served
    by this process.
    """

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.path = os.path.join(shortTemporaryDirectory(self), "c.sock")
        self.host = ScriptedHost()
        port = listenControl(reactor, self.path, self.host)
        self.addCleanup(port.stopListening)

    @inlineCallbacks
    def cli(self, *arguments: str) -> Any:
        root = os.path.dirname(os.path.dirname(os.path.abspath(migrate.__file__)))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "migrate", *arguments, "--timeout", "20"],
            env=dict(os.environ),
            path=root,
            reactor=self.reactor,
        ).addTimeout(40, self.reactor)
        return Outcome(code, out.decode("utf-8"), err.decode("utf-8"))

    @inlineCallbacks
    def test_status(self) -> Any:
        outcome = yield self.cli("status", "--control", self.path, "--json")
        self.assertEqual(
            (outcome.code, outcome.lastJSON), (EXIT_OK, STATUS), outcome.stderr
        )

    @inlineCallbacks
    def test_upgradeSuccess(self) -> Any:
        self.host.report = makeReport()
        outcome = yield self.cli(
            "upgrade", "--control", self.path, "--json", "--strategy", "reload"
        )
        self.assertEqual(outcome.code, EXIT_OK, outcome.stderr)
        self.assertEqual(outcome.lastJSON, makeReport())
        self.assertIn("[migrate] spawning successor\n", outcome.stderr)
        self.assertIn("[migrate] strategy reload\n", outcome.stderr)

    @inlineCallbacks
    def test_upgradeOverrides(self) -> Any:
        """
        C{--ready-timeout} and C{--drain-timeout} reach the host.
        """
        self.host.report = makeReport()
        outcome = yield self.cli(
            "upgrade",
            "--control",
            self.path,
            "--ready-timeout",
            "5",
            "--drain-timeout",
            "2.5",
        )
        self.assertEqual(outcome.code, EXIT_OK, outcome.stderr)
        self.assertIn(
            "[migrate] overrides [('drainTimeout', 2.5), ('readyTimeout', 5.0)]\n",
            outcome.stderr,
        )

    @inlineCallbacks
    def test_upgradeRolledBack(self) -> Any:
        self.host.report = makeReport(outcome="rolled-back", reason="not ready")
        outcome = yield self.cli("upgrade", "--control", self.path)
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("Migration rolled-back", outcome.stdout)
        self.assertIn("migrate: migration rolled-back: not ready", outcome.stderr)
        self.assertNotIn("Traceback", outcome.stderr)

    @inlineCallbacks
    def test_migrationInProgress(self) -> Any:
        self.host.error = MigrationInProgress("a migration is already running")
        outcome = yield self.cli("upgrade", "--control", self.path)
        self.assertEqual(outcome.code, EXIT_FAILED)
        self.assertIn("migrate: a migration is already running", outcome.stderr)

    @inlineCallbacks
    def test_unreachable(self) -> Any:
        missing = self.path + ".missing"
        outcome = yield self.cli("status", "--control", missing, "--json")
        self.assertEqual(outcome.code, EXIT_UNREACHABLE)
        self.assertIn("no such file", outcome.stderr)
        self.assertEqual(outcome.lastJSON["exitCode"], EXIT_UNREACHABLE)
        self.assertNotIn("Traceback", outcome.stderr)


class UpgradeWaitTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{upgrade --wait} tries again while another migration runs.
    """

    def test_retriesUntilItRuns(self) -> None:
        """
        A refusal because a migration runs is tried again every
        L{RETRY_INTERVAL} seconds, saying so, until the host takes it.
        """
        busy = MigrationInProgress("process 12 no longer serves; try again")
        connector = self.start(
            ["upgrade", "--wait", "--timeout", "30"],
            FakeClient(statuses=[STATUS], upgradeResult=busy),
            FakeClient(statuses=[STATUS], upgradeResult=makeReport()),
            FakeClient(statuses=[dict(STATUS, draining=[])]),
        )
        self.assertEqual(self.codes, [])
        self.assertIn("no longer serves; try again; trying again", self.outcome.stderr)
        self.clock.advance(RETRY_INTERVAL)
        self.assertEqual(self.outcome.code, EXIT_OK)
        self.assertEqual(connector.results, [])

    def test_withoutWaitRefused(self) -> None:
        """
        Without C{--wait} the refusal is final.
        """
        outcome = self.runCommand(
            ["upgrade"],
            FakeClient(statuses=[STATUS], upgradeResult=MigrationInProgress("busy")),
        )
        self.assertEqual(outcome.code, EXIT_FAILED)

    def test_waitBounded(self) -> None:
        """
        With C{--wait}, a host that stays busy until the timeout is given up
        on, with its reason.
        """
        busy = MigrationInProgress("busy")
        self.start(
            ["upgrade", "--wait", "--timeout", "1.5"],
            FakeClient(statuses=[STATUS], upgradeResult=busy),
            FakeClient(statuses=[STATUS], upgradeResult=busy),
        )
        self.clock.advance(RETRY_INTERVAL)
        self.assertEqual(self.outcome.code, EXIT_FAILED)
        self.assertIn("migrate: busy\n", self.outcome.stderr)
