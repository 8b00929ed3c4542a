"""
Tests for L{migrate._rolling}: the rolling upgrade
(L{migrate._rolling._orchestrator}) against a fake HAProxy on a L{Clock},
the two kinds of server upgraders (L{migrate._rolling._upgraders}), the
report (L{migrate._rolling._report}) and the C{rolling} command
(L{migrate._rolling._command}).
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any, Callable

from attrs import Factory, define
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from migrate._cli import run
from migrate._control._client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CannotConnect,
    CommandFailed,
    HostClosedConnection,
    Output,
)
from migrate._control._commands import MigrationInProgress
from migrate._rolling._command import RollingOptions, rollingCommand
from migrate._rolling._haproxy import HAProxyClient, HAProxyUnreachable
from migrate._rolling._orchestrator import RollingUpgrade, _ServerRun
from migrate._rolling._report import RollOutcome, ServerPhase, formatRollReport
from migrate._rolling._upgraders import (
    MigrateHostUpgrader,
    RestartCommandUpgrader,
    RollRefused,
    UpgradeFailed,
    UpgradeResult,
    runShellCommand,
)

from ._fakehaproxy import FakeHAProxy, FakeServer


def _deferred(value: Any) -> Deferred[Any]:
    if isinstance(value, Deferred):
        return value
    if isinstance(value, BaseException):
        return fail(value)
    return succeed(value)


@define
class FakeUpgrader:
    """
    An L{migrate._rolling._upgraders.IServerUpgrader} with scripted answers.

    @ivar outcome: what C{upgrade} returns: an L{UpgradeResult}, an
        exception, a L{Deferred}, or a callable producing one of those.
    """

    method: str = "migrate-host"
    target: str = "/run/host.sock"
    checked: Any = "migrate host pid 1"
    outcome: Any = Factory(lambda: UpgradeResult("success"))
    upgrades: int = 0
    message: str = "the host is migrating"

    def check(self) -> Deferred[str]:
        return _deferred(self.checked)

    def upgrade(self, progress: Callable[[str], None]) -> Deferred[UpgradeResult]:
        self.upgrades += 1
        progress(self.message)
        outcome = self.outcome
        if callable(outcome) and not isinstance(outcome, Deferred):
            outcome = outcome()
        return _deferred(outcome)


def changes(fake: FakeHAProxy, *, after: int = 0) -> list[str]:
    """
    The C{set server} commands from the C{after}-th command on, shortened
    to C{"s1 drain"}.
    """
    result = []
    for command in fake.commands[after:]:
        words = command.split()
        if words[:2] == ["set", "server"]:
            result.append("{} {}".format(words[2].split("/")[1], words[4]))
    return result


class RollingTestsMixin:
    """
    A backend of three servers behind a fake HAProxy on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeHAProxy(
            {"app": [FakeServer("s1"), FakeServer("s2"), FakeServer("s3")]}
        )
        self.upgraders: dict[str, Any] = {
            name: FakeUpgrader(target="/run/{}.sock".format(name))
            for name in ("s1", "s2", "s3")
        }
        self.messages: list[str] = []
        self.fake.startChecks(self.clock, 0.1)
        self.addCleanup(self.fake.stopChecks)  # type: ignore[attr-defined]

    def finish(self, d: Deferred[Any], seconds: float = 60) -> Any:
        """
        Let time pass (health checks run) until C{d} has a result.
        """
        for _ in range(int(seconds * 10)):
            if d.called:
                break
            self.clock.advance(0.1)
        return self.successResultOf(d)  # type: ignore[attr-defined]

    def rolling(self, **options: Any) -> RollingUpgrade:
        return RollingUpgrade(
            HAProxyClient(self.fake),
            options.pop("backend", "app"),
            self.upgraders,
            self.clock,
            progress=self.messages.append,
            **options,
        )

    def status(self, name: str) -> str:
        return self.fake.server("app", name).status


class RollTests(RollingTestsMixin, SynchronousTestCase):
    """
    L{RollingUpgrade.run} drains, upgrades, checks and restores every
    server in turn.
    """

    def test_everyServerInTurn(self) -> None:
        """
        Each server is drained, upgraded and set ready before the next one
        is drained; the report says every server was upgraded.
        """
        report = self.finish(self.rolling().run())
        self.assertEqual(report.outcome, RollOutcome.success)
        self.assertTrue(report.succeeded)
        self.assertIsNone(report.reason)
        # The first "ready" is validation's no-op admin check; "down" forces
        # a fresh health verdict about the new code.
        self.assertEqual(
            changes(self.fake),
            [
                "s1 ready",
                "s1 drain",
                "s1 down",
                "s1 ready",
                "s2 drain",
                "s2 down",
                "s2 ready",
                "s3 drain",
                "s3 down",
                "s3 ready",
            ],
        )
        self.assertEqual([u.upgrades for u in self.upgraders.values()], [1, 1, 1])
        self.assertEqual(
            [(s.name, s.phase) for s in report.servers],
            [(n, ServerPhase.done) for n in ("s1", "s2", "s3")],
        )
        self.assertEqual([self.status(n) for n in ("s1", "s2", "s3")], ["UP"] * 3)
        self.assertIn("app/s1: the host is migrating", self.messages)
        self.assertIn(
            "app/s3: up (Layer4 check passed); back in rotation", self.messages
        )

    def test_multiLineProgress(self) -> None:
        """
        Progress lines from a server are prefixed with its name, and their
        continuation lines indented.
        """
        self.upgraders["s1"].message = "starting:\nline two"
        self.finish(self.rolling().run())
        self.assertIn("app/s1: starting:\n    line two", self.messages)

    def test_oneOutOfRotationAtATime(self) -> None:
        """
        While one server's upgrade runs, no other server is drained.
        """
        pending: Deferred[UpgradeResult] = Deferred()
        self.upgraders["s1"].outcome = pending
        d = self.rolling().run()
        self.assertNoResult(d)
        self.assertEqual(
            [self.status(n) for n in ("s1", "s2", "s3")], ["DRAIN", "UP", "UP"]
        )
        self.assertEqual(self.upgraders["s2"].upgrades, 0)
        pending.callback(UpgradeResult("success"))
        self.assertEqual(self.finish(d).outcome, RollOutcome.success)

    def test_maxUnavailable(self) -> None:
        """
        With C{maxUnavailable=2}, two servers are upgraded at once, and the
        third starts when one of them is back.
        """
        self.fake.backends["app"].append(FakeServer("s4"))
        self.upgraders["s4"] = FakeUpgrader()
        pending: dict[str, Deferred[UpgradeResult]] = {
            n: Deferred() for n in ("s1", "s2")
        }
        for name, d in pending.items():
            self.upgraders[name].outcome = d
        result = self.rolling(maxUnavailable=2).run()
        self.assertEqual(
            [self.status(n) for n in ("s1", "s2", "s3", "s4")],
            ["DRAIN", "DRAIN", "UP", "UP"],
        )
        self.clock.pump([0.1] * 10)
        self.assertEqual(self.upgraders["s3"].upgrades, 0)
        pending["s2"].callback(UpgradeResult("success"))
        self.clock.pump([0.1] * 10)
        self.assertEqual(self.upgraders["s3"].upgrades, 1)
        self.assertEqual(self.upgraders["s4"].upgrades, 1)
        self.assertEqual(self.status("s1"), "DRAIN")
        pending["s1"].callback(UpgradeResult("success"))
        report = self.finish(result)
        self.assertEqual(report.outcome, RollOutcome.success)
        self.assertEqual(report.maxUnavailable, 2)

    def test_drainWaitsForSessions(self) -> None:
        """
        The upgrade starts once the drained server's sessions are gone.
        """
        server = self.fake.server("app", "s1")
        server.sessions = 2
        d = self.rolling(drainTimeout=30).run()
        self.clock.advance(5)
        self.assertEqual(self.upgraders["s1"].upgrades, 0)
        self.assertIn("app/s1: draining (2 sessions)", self.messages)
        server.sessions = 0
        self.clock.advance(0.2)
        self.assertEqual(self.upgraders["s1"].upgrades, 1)
        report = self.finish(d)
        s1 = report.servers[0]
        self.assertEqual((s1.sessionsAtDrain, s1.sessionsLeft), (2, 0))
        self.assertAlmostEqual(s1.durations["draining"], 5.2)

    def test_drainTimeout(self) -> None:
        """
        After the drain timeout the server is upgraded anyway, and the report
        says how many sessions were left.
        """
        self.fake.server("app", "s1").sessions = 3
        d = self.rolling(drainTimeout=2).run()
        self.clock.advance(1.8)
        self.assertEqual(self.upgraders["s1"].upgrades, 0)
        self.clock.advance(0.2)
        self.assertEqual(self.upgraders["s1"].upgrades, 1)
        report = self.finish(d)
        self.assertEqual(report.servers[0].sessionsLeft, 3)
        self.assertIn(
            "app/s1: drain timeout (2 s) passed with 3 sessions still open; "
            "upgrading anyway",
            self.messages,
        )
        self.assertIn(
            "3 sessions still open when the drain timeout", formatRollReport(report)
        )

    def test_upgradeFailsStopsTheRoll(self) -> None:
        """
        A server whose upgrade fails is left in maintenance, the servers not
        yet touched stay as they were, and the report says which and why.
        """
        hostReport = {"outcome": "rolled-back", "reason": "successor crashed"}
        self.upgraders["s2"].outcome = UpgradeFailed(
            "migration rolled-back: successor crashed", report=hostReport
        )
        report = self.finish(self.rolling().run())
        self.assertEqual(report.outcome, RollOutcome.stopped)
        self.assertEqual(
            report.reason,
            "app/s2: upgrade failed: migration rolled-back: successor crashed; "
            "left in maintenance",
        )
        self.assertEqual(
            [self.status(n) for n in ("s1", "s2", "s3")], ["UP", "MAINT", "UP"]
        )
        self.assertNotIn("s3", " ".join(changes(self.fake)))
        self.assertEqual(self.upgraders["s3"].upgrades, 0)
        s1, s2, s3 = report.servers
        self.assertEqual(
            (s1.phase, s2.phase, s3.phase),
            (ServerPhase.done, ServerPhase.failed, ServerPhase.pending),
        )
        self.assertEqual(s2.report, hostReport)
        json = report.toJSON()
        self.assertEqual(
            [s["state"] for s in json["servers"]], ["done", "failed", "untouched"]
        )
        self.assertEqual(json["upgraded"], 1)
        text = formatRollReport(report)
        self.assertIn("stopped, 1 of 3 servers upgraded", text)
        self.assertIn("s2  FAILED     upgrade failed", text)
        self.assertIn("s3  untouched", text)
        self.assertIn("stopping the roll: s3 left untouched", self.messages)

    def test_failureWithOthersInProgress(self) -> None:
        """
        With several servers in progress, a failure lets the others finish
        but starts no new one.
        """
        self.fake.backends["app"].append(FakeServer("s4"))
        self.upgraders["s4"] = FakeUpgrader()
        pending: Deferred[UpgradeResult] = Deferred()
        self.upgraders["s1"].outcome = pending
        self.upgraders["s2"].outcome = UpgradeFailed("no")
        d = self.rolling(maxUnavailable=2).run()
        self.assertEqual(self.upgraders["s3"].upgrades, 0)
        self.assertNoResult(d)
        pending.callback(UpgradeResult("success"))
        report = self.finish(d)
        self.assertEqual(
            [s.phase for s in report.servers],
            [
                ServerPhase.done,
                ServerPhase.failed,
                ServerPhase.pending,
                ServerPhase.pending,
            ],
        )
        self.assertEqual(
            [self.status(n) for n in ("s1", "s2", "s3", "s4")],
            ["UP", "MAINT", "UP", "UP"],
        )

    def test_notUpInTime(self) -> None:
        """
        An upgraded server the health check does not report up within the
        ready timeout is left in maintenance.
        """

        def breaks() -> UpgradeResult:
            self.fake.server("app", "s1").healthy = False
            return UpgradeResult("success")

        self.upgraders["s1"].outcome = breaks
        d = self.rolling(readyTimeout=5).run()
        self.clock.pump([0.1] * 49)
        self.assertNoResult(d)
        report = self.finish(d)
        self.assertEqual(report.outcome, RollOutcome.stopped)
        self.assertEqual(
            report.reason,
            "app/s1: not reported up by HAProxy within 5 s (last status: DOWN "
            "(Layer4 connection problem)); left in maintenance",
        )
        self.assertEqual(self.status("s1"), "MAINT")
        self.assertEqual(self.upgraders["s2"].upgrades, 0)

    def test_upgradedServerRechecked(self) -> None:
        """
        An upgraded server is forced down in HAProxy's eyes, and set ready
        only after the health check has seen it up again.
        """
        self.fake.stopChecks()
        self.fake.startChecks(self.clock, 0.5)
        statusWhenReady = []

        def watch(command: str) -> None:
            if (
                command == "set server app/s1 state ready"
                and self.fake.commands.count(command) == 2
            ):
                statusWhenReady.append(self.status("s1"))

        self.fake.onCommand = watch
        d = self.rolling().run()
        self.assertEqual(changes(self.fake)[:3], ["s1 ready", "s1 drain", "s1 down"])
        self.assertEqual(self.status("s1"), "DOWN")
        self.assertNoResult(d)
        self.clock.pump([0.1] * 9)
        self.assertEqual(self.status("s1"), "DOWN 1/2")
        self.assertEqual(statusWhenReady, [])
        self.clock.pump([0.1] * 2)
        self.assertEqual(statusWhenReady, ["DRAIN"])
        self.assertEqual(self.finish(d).outcome, RollOutcome.success)

    def test_cannotDrain(self) -> None:
        """
        HAProxy refusing to drain a server stops the roll with the server
        unchanged.
        """
        self.fake.overrides["set server app/s2 state drain"] = "No such server.\n\n"
        report = self.finish(self.rolling().run())
        self.assertEqual(report.outcome, RollOutcome.stopped)
        self.assertIn("app/s2: could not drain it: HAProxy refused", report.reason)
        self.assertIn("No such server.", report.reason)
        self.assertEqual(self.upgraders["s2"].upgrades, 0)
        self.assertEqual(self.upgraders["s3"].upgrades, 0)

    def test_cannotPutInMaintenance(self) -> None:
        """
        When HAProxy cannot be told to put a failed server in maintenance,
        the report says so.
        """
        self.upgraders["s1"].outcome = UpgradeFailed("broken")
        self.fake.overrides["set server app/s1 state maint"] = "Permission denied\n\n"
        report = self.successResultOf(self.rolling().run())
        self.assertIn(
            "upgrade failed: broken; and it could not be put in maintenance: "
            "HAProxy refused 'set server app/s1 state maint': Permission denied",
            report.reason,
        )

    def test_haproxyLostDuringDrain(self) -> None:
        """
        HAProxy unreachable while a server drains: the roll stops when the
        drain timeout passes.
        """
        self.fake.server("app", "s1").sessions = 1

        def lose(command: str) -> None:
            if command.startswith("show stat") and (
                "set server app/s1 state drain" in self.fake.commands
            ):
                self.fake.unreachable = True

        self.fake.onCommand = lose
        d = self.rolling(drainTimeout=1).run()
        report = self.finish(d)
        self.assertEqual(report.outcome, RollOutcome.stopped)
        self.assertIn("could not watch it drain", report.reason)
        self.assertIn("could not be put in maintenance", report.reason)
        self.assertEqual(self.upgraders["s1"].upgrades, 0)

    def test_unexpectedErrorStopsTheRoll(self) -> None:
        """
        A bug in an upgrader is reported, logged, and stops the roll.
        """
        self.upgraders["s1"].outcome = ZeroDivisionError("oops")
        report = self.successResultOf(self.rolling().run())
        self.assertEqual(report.outcome, RollOutcome.stopped)
        self.assertIn("internal error: ZeroDivisionError('oops')", report.reason)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_durations(self) -> None:
        """
        The report has the time spent in each phase.
        """

        def later() -> Deferred[UpgradeResult]:
            d: Deferred[UpgradeResult] = Deferred()
            self.clock.callLater(3, d.callback, UpgradeResult("ok"))
            return d

        self.upgraders["s1"].outcome = later
        report = self.finish(self.rolling().run())
        durations = report.servers[0].durations
        self.assertEqual(sorted(durations), ["checking", "draining", "upgrading"])
        self.assertEqual(durations["draining"], 0)
        self.assertAlmostEqual(durations["upgrading"], 3)
        self.assertTrue(0 < durations["checking"] <= 0.4, durations)
        total = sum(sum(s.durations.values()) for s in report.servers)
        self.assertAlmostEqual(report.durations["total"], total)
        self.assertAlmostEqual(report.toJSON()["durations"]["rolling"], total)

    def test_transitions(self) -> None:
        """
        A server's phases only move forward along the roll.
        """
        server = _ServerRun("s1", FakeUpgrader())
        self.assertRaises(RuntimeError, server.enter, ServerPhase.done, 0)
        server.enter(ServerPhase.draining, 0)
        self.assertRaises(RuntimeError, server.enter, ServerPhase.pending, 1)
        server.enter(ServerPhase.failed, 1)
        self.assertRaises(RuntimeError, server.enter, ServerPhase.draining, 2)


class ValidationTests(RollingTestsMixin, SynchronousTestCase):
    """
    Everything is checked before anything is drained.
    """

    def assertRefused(self, *texts: str, **options: Any) -> str | None:
        report = self.successResultOf(self.rolling(**options).run())
        self.assertEqual(report.outcome, RollOutcome.refused)
        for text in texts:
            self.assertIn(text, report.reason)
        self.assertEqual([c for c in changes(self.fake) if not c.endswith("ready")], [])
        self.assertEqual(sum(u.upgrades for u in self.upgraders.values()), 0)
        self.assertEqual(report.servers, ())
        return report.reason

    def test_validPlan(self) -> None:
        """
        L{RollingUpgrade.validate} fires with the servers in the backend's
        order and describes each.
        """
        plan = self.successResultOf(self.rolling().validate())
        self.assertEqual(plan, ["s1", "s2", "s3"])
        self.assertIn("app/s2: migrate host pid 1", self.messages)

    def test_unknownBackend(self) -> None:
        """
        A backend HAProxy does not have.
        """
        self.assertRefused(
            "HAProxy has no backend named 'www'", "No such proxy.", backend="www"
        )

    def test_badBackendName(self) -> None:
        """
        A name HAProxy could not hold.
        """
        self.assertRefused("not a valid HAProxy backend name", backend="a b")

    def test_unknownServer(self) -> None:
        """
        An upgrader for a server the backend does not have.
        """
        self.upgraders["s9"] = FakeUpgrader()
        self.assertRefused(
            "backend app has no server named s9 (its servers: s1, s2, s3)"
        )

    def test_serverWithoutUpgrader(self) -> None:
        """
        Every server needs a way to be upgraded.
        """
        del self.upgraders["s3"]
        self.assertRefused("no way to upgrade app/s3: give --control")

    def test_noServers(self) -> None:
        """
        An empty backend.
        """
        self.fake.backends["app"] = []
        self.upgraders.clear()
        self.assertRefused("backend app has no servers")

    def test_unhealthyServers(self) -> None:
        """
        Every server must be up, checked and ready; every problem is named.
        """
        self.fake.server("app", "s1").healthy = False
        self.fake.server("app", "s1").health = 0
        self.fake.server("app", "s2").admin = "maint"
        self.fake.server("app", "s3").checked = False
        self.assertRefused(
            "app/s1 is DOWN (Layer4 connection problem)",
            "app/s2 is in maint",
            "app/s3 has no health check",
        )

    def test_drainingServer(self) -> None:
        """
        A server someone else drained.
        """
        self.fake.server("app", "s2").admin = "drain"
        self.assertRefused("app/s2 is in drain")

    def test_goingDown(self) -> None:
        """
        A server whose last check failed is not fully up.
        """
        self.fake.server("app", "s2").health = 2
        self.assertRefused("app/s2 is UP 1/2")

    def test_maxUnavailableTooLarge(self) -> None:
        """
        The backend must keep at least one server in rotation.
        """
        self.assertRefused(
            "--max-unavailable 3 would take all 3 servers", maxUnavailable=3
        )
        self.assertRefused("at least 1", maxUnavailable=0)

    def test_notAdmin(self) -> None:
        """
        A stats socket without admin level is found out before draining.
        """
        self.fake.level = "operator"
        self.assertRefused("'level admin'", "Permission denied")

    def test_upgraderRefuses(self) -> None:
        """
        An upgrader's own check (a control socket that does not answer).
        """
        self.upgraders["s2"].checked = RollRefused("cannot connect to /run/s2.sock")
        self.assertRefused("app/s2: cannot connect to /run/s2.sock")

    def test_unreachable(self) -> None:
        """
        L{RollingUpgrade.validate} fails with L{HAProxyUnreachable};
        L{RollingUpgrade.run} reports a refusal.
        """
        self.fake.unreachable = True
        self.failureResultOf(self.rolling().validate(), HAProxyUnreachable)
        self.assertRefused("cannot reach HAProxy")


@define
class FakeClient:
    """
    A L{migrate._control._client.ControlClient} with scripted answers.
    """

    statuses: list[Any] = Factory(list)
    upgradeResult: Any = None
    upgrades: list[str | None] = Factory(list)
    onProgress: Callable[[str], None] | None = None
    disconnected: int = 0

    def status(self) -> Deferred[Any]:
        return _deferred(self.statuses.pop(0))

    def upgrade(self, strategy: str | None) -> Deferred[Any]:
        self.upgrades.append(strategy)
        assert self.onProgress is not None
        self.onProgress("spawning the successor")
        return _deferred(self.upgradeResult)

    def disconnect(self) -> None:
        self.disconnected += 1


@define
class FakeConnector:
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


IDLE = {
    "pid": 10,
    "generation": 1,
    "strategy": "gradual",
    "phase": "idle",
    "lastReport": None,
}
SUCCESS = {
    "strategy": "gradual",
    "outcome": "success",
    "reason": None,
    "fromGeneration": 1,
    "toGeneration": 2,
    "oldPid": 10,
    "newPid": 11,
}


class MigrateHostUpgraderTests(SynchronousTestCase):
    """
    L{MigrateHostUpgrader} runs C{upgrade} through the control channel
    with the command line's client code.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.messages: list[str] = []

    def upgrader(self, *results: Any, **options: Any) -> MigrateHostUpgrader:
        self.connector = FakeConnector(list(results))
        return MigrateHostUpgrader(
            self.clock, "/run/s1.sock", connect=self.connector, **options
        )

    def test_checkIdle(self) -> None:
        """
        An idle host passes the check, described.
        """
        client = FakeClient([IDLE])
        description = self.successResultOf(self.upgrader(client).check())
        self.assertEqual(
            description, "migrate host pid 10, generation 1, strategy gradual"
        )
        self.assertEqual(client.disconnected, 1)

    def test_checkUnknownStrategy(self) -> None:
        """
        A strategy migrate does not know is refused before connecting.
        """
        upgrader = self.upgrader(strategy="teleport")
        failure = self.failureResultOf(upgrader.check(), RollRefused)
        self.assertIn("unknown strategy 'teleport' (known: ", str(failure.value))
        self.assertIn("gradual", str(failure.value))
        self.assertEqual(self.connector.paths, [])

    def test_checkBusy(self) -> None:
        """
        A host already migrating is refused.
        """
        client = FakeClient([dict(IDLE, phase="handing-off")])
        failure = self.failureResultOf(self.upgrader(client).check(), RollRefused)
        self.assertIn("busy (phase handing-off)", str(failure.value))

    def test_checkUnreachable(self) -> None:
        """
        A control socket that cannot be reached is refused with the CLI's
        explanation.
        """
        upgrader = self.upgrader(
            CannotConnect("cannot connect to /run/s1.sock: no such file")
        )
        failure = self.failureResultOf(upgrader.check(), RollRefused)
        self.assertEqual(
            str(failure.value), "cannot connect to /run/s1.sock: no such file"
        )

    def test_checkTimeout(self) -> None:
        """
        A host that does not answer its status is refused after a while.
        """
        d = self.upgrader(FakeClient([Deferred()])).check()
        self.clock.advance(30)
        failure = self.failureResultOf(d, RollRefused)
        self.assertIn("timed out", str(failure.value))

    def test_success(self) -> None:
        """
        The host's report becomes the result; its progress is relayed; the
        strategy is passed on.
        """
        client = FakeClient([IDLE], upgradeResult=SUCCESS)
        result = self.successResultOf(
            self.upgrader(client, strategy="capability").upgrade(self.messages.append)
        )
        self.assertEqual(result.report, SUCCESS)
        self.assertEqual(
            result.summary,
            "success with strategy gradual, generation 1 -> 2 (pid 10 -> 11)",
        )
        self.assertEqual(client.upgrades, ["capability"])
        self.assertEqual(self.messages, ["spawning the successor"])

    def test_rolledBack(self) -> None:
        """
        A migration that rolled back fails with the host's report.
        """
        report = dict(SUCCESS, outcome="rolled-back", reason="successor crashed")
        client = FakeClient([IDLE], upgradeResult=report)
        failure = self.failureResultOf(
            self.upgrader(client).upgrade(self.messages.append), UpgradeFailed
        )
        self.assertEqual(
            failure.value.reason, "migration rolled-back: successor crashed"
        )
        self.assertEqual(failure.value.report, report)

    def test_refusedByHost(self) -> None:
        """
        A host that refuses (another migration runs) fails the upgrade.
        """
        client = FakeClient(
            [IDLE], upgradeResult=MigrationInProgress("already running")
        )
        failure = self.failureResultOf(
            self.upgrader(client).upgrade(self.messages.append), UpgradeFailed
        )
        self.assertEqual(failure.value.reason, "already running")

    def test_timeout(self) -> None:
        """
        No report within the timeout fails the upgrade, saying that the
        migration goes on in that host and how to learn its outcome.
        """
        client = FakeClient([IDLE], upgradeResult=Deferred())
        d = self.upgrader(client, timeout=10).upgrade(self.messages.append)
        self.clock.advance(10)
        failure = self.failureResultOf(d, UpgradeFailed)
        self.assertEqual(
            failure.value.reason,
            "timed out waiting for the migration report; the migration goes on "
            "in the host: `python -m migrate status --control /run/s1.sock` "
            "shows how it ended (Last migration)",
        )

    def test_connectionLostReportRecovered(self) -> None:
        """
        A re-exec closes the control connection: the outcome is learnt from
        the status, as C{python -m migrate upgrade} does.
        """
        first = FakeClient([IDLE], upgradeResult=HostClosedConnection("closed"))
        later = FakeClient([dict(IDLE, pid=10, generation=2, lastReport=SUCCESS)])
        upgrader = self.upgrader(first, later)
        result = self.successResultOf(upgrader.upgrade(self.messages.append))
        self.assertEqual(result.report, SUCCESS)
        self.assertIn("reconnecting to learn the outcome", self.messages[-1])


class RestartCommandUpgraderTests(SynchronousTestCase):
    """
    L{RestartCommandUpgrader} runs a command; status 0 is success.
    """

    def upgrader(self, result: Any) -> RestartCommandUpgrader:
        self.calls: list[tuple[str, float]] = []

        def run(command: str, timeout: float) -> Deferred[tuple[int, str]]:
            self.calls.append((command, timeout))
            return _deferred(result)

        return RestartCommandUpgrader("systemctl restart app@1", 60.0, run)

    def test_success(self) -> None:
        """
        Exit status 0; the output is kept.
        """
        messages: list[str] = []
        upgrader = self.upgrader((0, "restarted\n"))
        self.assertEqual(
            self.successResultOf(upgrader.check()),
            "restart command 'systemctl restart app@1'",
        )
        result = self.successResultOf(upgrader.upgrade(messages.append))
        self.assertEqual(result.output, ("restarted",))
        self.assertEqual(self.calls, [("systemctl restart app@1", 60.0)])
        self.assertEqual(messages, ["running 'systemctl restart app@1'"])

    def test_failure(self) -> None:
        """
        Another status fails with the last lines of output.
        """
        output = "".join("line {}\n".format(n) for n in range(30))
        failure = self.failureResultOf(
            self.upgrader((3, output)).upgrade(lambda m: None), UpgradeFailed
        )
        self.assertEqual(
            failure.value.reason, "the restart command exited with status 3"
        )
        self.assertEqual(len(failure.value.output), 20)
        self.assertEqual(failure.value.output[-1], "line 29")

    def test_killed(self) -> None:
        """
        A negative status is a signal.
        """
        failure = self.failureResultOf(
            self.upgrader((-9, "")).upgrade(lambda m: None), UpgradeFailed
        )
        self.assertEqual(
            failure.value.reason, "the restart command was killed by signal 9"
        )


class RunShellCommandTests(TestCase):
    """
    L{runShellCommand} with real processes.
    """

    @inlineCallbacks
    def test_statusAndOutput(self) -> Any:
        """
        The exit status and both output streams.
        """
        code, output = yield runShellCommand(
            reactor, "echo out; echo err >&2; exit 3", 20
        )
        self.assertEqual(code, 3)
        self.assertIn("out", output)
        self.assertIn("err", output)

    @inlineCallbacks
    def test_timeout(self) -> Any:
        """
        A command still running after the timeout is killed.
        """
        d = runShellCommand(reactor, "echo started; exec sleep 30", 0.5)
        error = yield self.assertFailure(d, UpgradeFailed)
        self.assertEqual(
            error.reason, "the restart command did not finish within 0.5 s (killed)"
        )
        self.assertEqual(error.output, ("started",))


class RollingCommandTests(RollingTestsMixin, SynchronousTestCase):
    """
    C{python -m migrate rolling}.
    """

    def setUp(self) -> None:
        RollingTestsMixin.setUp(self)
        self.stdout = StringIO()
        self.stderr = StringIO()

    def command(self, argv: list[str], *clients: Any, asJSON: bool = False) -> Any:
        options = RollingOptions()
        options.parseOptions(argv)
        out = Output(self.stdout, self.stderr, asJSON=asJSON)
        self.connector = FakeConnector(list(clients))
        return Deferred.fromCoroutine(
            rollingCommand(
                self.clock,
                options,
                out,
                self.connector,
                runtimeAPI=lambda reactor, path: self.fake,
                runCommand=lambda reactor, command, timeout: succeed((0, "")),
            )
        )

    def hostArguments(self) -> list[str]:
        return [
            "--haproxy",
            "/run/haproxy.sock",
            "--backend",
            "app",
            "--control",
            "s1=/run/s1.sock",
            "--control",
            "s2=/run/s2.sock",
            "--restart-command",
            "s3=systemctl restart app@3",
        ]

    def test_success(self) -> None:
        """
        Status 0, progress on standard error, the report on standard
        output; migrate hosts through their control socket and the other
        server with its command.
        """
        clients = [
            FakeClient([IDLE]),
            FakeClient([IDLE]),
            FakeClient([IDLE], upgradeResult=SUCCESS),
            FakeClient([IDLE], upgradeResult=SUCCESS),
        ]
        d = self.command(self.hostArguments() + ["--json"], *clients, asJSON=True)
        self.assertEqual(self.finish(d), EXIT_OK)
        self.assertEqual(
            self.connector.paths,
            ["/run/s1.sock", "/run/s2.sock", "/run/s1.sock", "/run/s2.sock"],
        )
        result = json.loads(self.stdout.getvalue().splitlines()[-1])
        self.assertEqual(result["outcome"], "success")
        self.assertEqual(
            [(s["name"], s["method"], s["state"]) for s in result["servers"]],
            [
                ("s1", "migrate-host", "done"),
                ("s2", "migrate-host", "done"),
                ("s3", "restart-command", "done"),
            ],
        )
        self.assertEqual(result["servers"][0]["report"], SUCCESS)
        self.assertIn("[migrate] app/s1: drain", self.stderr.getvalue())
        self.assertIn("set server app/s3 health down", self.fake.commands)

    def test_stopped(self) -> None:
        """
        A failed server: the report, then the reason on standard error, and
        status 1.
        """
        failed = dict(SUCCESS, outcome="rolled-back", reason="SyntaxError")
        clients = [
            FakeClient([IDLE]),
            FakeClient([IDLE]),
            FakeClient([IDLE], upgradeResult=failed),
        ]
        d = self.command(self.hostArguments(), *clients)
        failure = self.failureResultOf(d, CommandFailed)
        self.assertEqual(failure.value.code, EXIT_FAILED)
        self.assertEqual(
            failure.value.message,
            "rolling upgrade stopped: app/s1: upgrade failed: migration "
            "rolled-back: SyntaxError; left in maintenance",
        )
        self.assertIn("s1  FAILED", self.stdout.getvalue())
        self.assertIn("s3  untouched", self.stdout.getvalue())

    def test_refused(self) -> None:
        """
        A failed check: status 1, nothing drained.
        """
        clients = [FakeClient([IDLE]), CannotConnect("cannot connect to /run/s2.sock")]
        failure = self.failureResultOf(
            self.command(self.hostArguments(), *clients), CommandFailed
        )
        self.assertEqual(failure.value.code, EXIT_FAILED)
        self.assertEqual(
            failure.value.message,
            "nothing was drained: app/s2: cannot connect to /run/s2.sock",
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_unreachable(self) -> None:
        """
        HAProxy unreachable: status 3.
        """
        self.fake.unreachable = True
        failure = self.failureResultOf(
            self.command(self.hostArguments()), CommandFailed
        )
        self.assertEqual(failure.value.code, EXIT_UNREACHABLE)


class RollingOptionsTests(SynchronousTestCase):
    """
    The options of C{rolling}, and the command through C{python -m
    migrate}.
    """

    def parse(self, argv: list[str]) -> RollingOptions:
        options = RollingOptions()
        options.parseOptions(argv)
        return options

    def test_mappings(self) -> None:
        """
        C{--control} and C{--restart-command} map servers.
        """
        options = self.parse(
            [
                "--haproxy",
                "/h.sock",
                "--backend",
                "app",
                "--control",
                "s1=/a.sock",
                "--restart-command",
                "s2=sv restart x=1",
                "--max-unavailable",
                "2",
                "--drain-timeout",
                "0",
            ]
        )
        self.assertEqual(options["control"], {"s1": "/a.sock"})
        self.assertEqual(options["restart-command"], {"s2": "sv restart x=1"})
        self.assertEqual(options["max-unavailable"], 2)
        self.assertEqual(options["drain-timeout"], 0)
        self.assertEqual(options["ready-timeout"], 30)

    def assertUsage(self, argv: list[str], text: str) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, argv)
        self.assertIn(text, str(error))

    def test_errors(self) -> None:
        """
        Missing or malformed options are usage errors.
        """
        base = ["--haproxy", "/h.sock", "--backend", "app"]
        self.assertUsage(
            ["--backend", "app", "--control", "s1=/a"], "--haproxy is required"
        )
        self.assertUsage(
            ["--haproxy", "/h", "--control", "s1=/a"], "--backend is required"
        )
        self.assertUsage(base, "give --control SERVER=PATH")
        self.assertUsage(base + ["--control", "s1"], "SERVER=VALUE")
        self.assertUsage(base + ["--control", "=/a"], "SERVER=VALUE")
        self.assertUsage(
            base + ["--control", "s1=/a", "--restart-command", "s1=x"], "more than one"
        )
        self.assertUsage(
            base + ["--control", "s1=/a", "--max-unavailable", "0"], "at least 1"
        )
        self.assertUsage(
            base + ["--control", "s1=/a", "--ready-timeout", "0"], "positive"
        )
        self.assertUsage(
            base + ["--control", "s1=/a", "--drain-timeout", "-1"], "non-negative"
        )
        self.assertUsage(
            base + ["--control", "s1=/a", "--strategy", " "], "needs a name"
        )

    def runCLI(self, argv: list[str]) -> tuple[int, str, str]:
        stdout, stderr = StringIO(), StringIO()
        codes: list[int] = []
        run(Clock(), argv, stdout=stdout, stderr=stderr).addCallback(codes.append)
        return codes[0], stdout.getvalue(), stderr.getvalue()

    def test_usageThroughCLI(self) -> None:
        """
        C{python -m migrate rolling} with bad arguments exits with status 2.
        """
        code, out, err = self.runCLI(["rolling", "--backend", "app"])
        self.assertEqual(code, EXIT_USAGE)
        self.assertIn("--haproxy is required", err)

    def test_unreachableThroughCLI(self) -> None:
        """
        A stats socket that does not exist: status 3, said on standard
        error, and with C{--json} an error object.
        """
        argv = [
            "rolling",
            "--haproxy",
            "/nonexistent/haproxy.sock",
            "--backend",
            "app",
            "--control",
            "s1=/run/s1.sock",
            "--json",
        ]
        code, out, err = self.runCLI(argv)
        self.assertEqual(code, EXIT_UNREACHABLE)
        self.assertIn(
            "cannot reach HAProxy's stats socket /nonexistent/haproxy.sock", err
        )
        self.assertEqual(json.loads(out.splitlines()[-1])["exitCode"], EXIT_UNREACHABLE)
