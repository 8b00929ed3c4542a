"""
Tests for L{migrate._host._metrics}: what the OpenMetrics endpoint shows and
what it carries from generation to generation.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import attrs
from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from .._host._metrics import HostMetrics, clientWait, metricsSite
from .._report import ListenerReport, MigrationOutcome, MigrationReport
from ._fakes import HostReactor

#: whether the metrics extra is installed
_PROMETHEUS = importlib.util.find_spec("prometheus_client") is not None


@define
class _Factory:
    protocols: set[object] = field(factory=set)


@define
class _Listener:
    factory: _Factory = field(factory=_Factory)


@define
class _FakeHost:
    generation: int = 1
    listeners: dict[str, _Listener] = field(factory=dict)
    draining: list[dict[str, Any]] = field(factory=list)

    def drainingGenerations(self) -> list[dict[str, Any]]:
        return self.draining


def _report(
    strategy: str = "capability",
    outcome: MigrationOutcome = MigrationOutcome.success,
    **durations: float,
) -> MigrationReport:
    return MigrationReport(
        strategy=strategy,
        outcome=outcome,
        fromGeneration=1,
        oldPid=10,
        toGeneration=2,
        newPid=11,
        listeners=[
            ListenerReport("tcp:8000", moved=3, drained=1, failed=1),
            ListenerReport("unix:/s", moved=2),
        ],
        durations=durations,
    )


def _scrape(metrics: HostMetrics, accept: bytes | None = None) -> tuple[bytes, Any]:
    """
    GET /metrics over an in-memory connection; the raw answer and the
    transport.
    """
    site = metricsSite(metrics)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    channel.makeConnection(transport)
    headers = b"Host: x\r\n" + (b"Accept: " + accept + b"\r\n" if accept else b"")
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
    return transport.value(), transport


class ClientWaitTests(SynchronousTestCase):
    """
    L{clientWait} reads what each strategy measures.
    """

    def test_strategies(self) -> None:
        self.assertEqual(clientWait(_report("reexec", suspension=0.25)), 0.25)
        self.assertEqual(
            clientWait(_report("capability", connections=0.5, commit=0.25)), 0.75
        )
        # After a pre-copy: the freeze too, not the pre-copy nor the let-go
        # (the successor serves by then).
        self.assertEqual(
            clientWait(
                _report(
                    "capability",
                    precopy=4.0,
                    connections=0.125,
                    freeze=0.25,
                    commit=0.5,
                    letgo=2.0,
                )
            ),
            0.875,
        )
        # A pre-copy step longer than the freeze: every client waited for it.
        slowStep = {"connections": 0.01, "freeze": 0.02, "precopy slice": 0.125}
        self.assertEqual(
            clientWait(_report("capability", MigrationOutcome.success, **slowStep)),
            0.125,
        )
        self.assertEqual(clientWait(_report("reload", commit=0.125)), 0.125)
        slices = {
            "pause": 0.03,
            "commit": 0.01,
            "precopy slice": 0.005,
            "switch slice": 0.04,
        }
        self.assertEqual(
            clientWait(_report("reload", MigrationOutcome.success, **slices)), 0.04
        )
        self.assertIsNone(clientWait(_report("gradual", listeners=0.1)))


class RecordingTests(SynchronousTestCase):
    """
    Migrations and trial runs are counted.
    """

    def setUp(self) -> None:
        self.host = _FakeHost()
        self.metrics = HostMetrics(self.host, lambda: 1000.0)

    def test_report(self) -> None:
        """
        A report counts one migration by strategy and outcome and adds its
        connections by fate; it becomes the last migration.
        """
        self.metrics.recordReport(_report(connections=0.5, total=1.0))
        self.metrics.recordReport(_report(outcome=MigrationOutcome.rolledBack))
        self.assertEqual(
            self.metrics.migrations,
            {("capability", "success"): 1, ("capability", "rolled-back"): 1},
        )
        self.assertEqual(
            self.metrics.connections,
            {"moved": 10, "moved-later": 0, "drained": 2, "failed": 2},
        )
        last = self.metrics.lastMigration
        assert last is not None
        self.assertEqual(
            (last.succeeded, last.endedAt, last.phases), (False, 1000.0, {})
        )

    def test_trialRun(self) -> None:
        self.metrics.recordTrialRun("reexec", True)
        self.metrics.recordTrialRun("reexec", False)
        self.metrics.recordTrialRun("reexec", False)
        self.assertEqual(
            self.metrics.trialRuns, {("reexec", "passed"): 1, ("reexec", "failed"): 2}
        )
        self.assertEqual(self.metrics.lastTrialRun, ("reexec", False))


class CarryTests(SynchronousTestCase):
    """
    The counters cross to the next generation as JSON data.
    """

    def test_roundTrip(self) -> None:
        """
        What L{HostMetrics.carried} returns survives JSON and, given to
        the next generation's L{HostMetrics.carry}, gives the same counts.
        """
        old = HostMetrics(_FakeHost(), lambda: 5.0)
        old.recordReport(_report(suspension=0.2, total=0.3))
        old.recordTrialRun("reexec", True)
        new = HostMetrics(_FakeHost(generation=2), lambda: 6.0)
        self.assertTrue(new.carry(json.loads(json.dumps(old.carried()))))
        self.assertEqual(new.carried(), old.carried())
        self.assertEqual(new.migrations, {("capability", "success"): 1})
        self.assertEqual(new.lastTrialRun, ("reexec", True))

    def test_malformed(self) -> None:
        """
        Malformed carried data is logged and ignored: the counters start
        from zero, and the migration goes on.
        """
        for bad in [
            None,
            {"version": 99},
            {"version": 1, "migrations": "x", "connections": {}, "trialRuns": []},
            {
                "version": 1,
                "migrations": [{"strategy": "s", "outcome": "o", "count": -1}],
                "connections": {},
                "trialRuns": [],
            },
            {
                "version": 1,
                "migrations": [],
                "connections": {"moved": True},
                "trialRuns": [],
            },
        ]:
            metrics = HostMetrics(_FakeHost(), lambda: 0.0)
            with capturedLogs() as events:
                self.assertFalse(metrics.carry(bad))
            self.assertEqual(metrics.migrations, {})
            self.assertEqual(len(events), 1)


class ExpositionTests(SynchronousTestCase):
    """
    The endpoint answers a scrape in Prometheus' text format, or in
    OpenMetrics' when asked, and closes the connection after it.
    """

    def setUp(self) -> None:
        if not _PROMETHEUS:
            raise self.skipTest("prometheus-client is not installed")
        self.host = _FakeHost(
            generation=3,
            listeners={
                "tcp:8000": _Listener(_Factory({object(), object()})),
            },
            draining=[{"generation": 2, "pid": 9, "connections": 4}],
        )
        self.metrics = HostMetrics(self.host, lambda: 1234.5)

    def test_scrape(self) -> None:
        self.metrics.recordReport(_report(connections=0.5, commit=0.25, total=1.0))
        self.metrics.recordTrialRun("reexec", False)
        answer, transport = _scrape(self.metrics)
        head, body = answer.split(b"\r\n\r\n", 1)
        self.assertIn(b"HTTP/1.1 200", head)
        self.assertIn(b"Connection: close", head)
        self.assertTrue(transport.disconnecting)
        text = body.decode("utf-8")
        for line in [
            "migrate_generation 3.0",
            'migrate_connections{listener="tcp:8000"} 2.0',
            "migrate_draining_generations 1.0",
            "migrate_draining_connections 4.0",
            'migrate_migrations_total{outcome="success",strategy="capability"} 1.0',
            'migrate_migrated_connections_total{fate="moved"} 5.0',
            'migrate_migrated_connections_total{fate="moved-later"} 0.0',
            'migrate_migrated_connections_total{fate="drained"} 1.0',
            'migrate_migrated_connections_total{fate="failed"} 1.0',
            'migrate_last_migration_phase_seconds{phase="total"} 1.0',
            "migrate_last_migration_client_wait_seconds 0.75",
            'migrate_last_migration_succeeded{strategy="capability"} 1.0',
            "migrate_last_migration_timestamp_seconds 1234.5",
            'migrate_trial_runs_total{result="failed",strategy="reexec"} 1.0',
            'migrate_last_trial_run_passed{strategy="reexec"} 0.0',
        ]:
            self.assertIn(line + "\n", text)

    def test_openMetrics(self) -> None:
        answer, transport = _scrape(
            self.metrics, accept=b"application/openmetrics-text; version=1.0.0"
        )
        head, body = answer.split(b"\r\n\r\n", 1)
        self.assertIn(b"application/openmetrics-text", head)
        self.assertIn(b"# EOF", body)
        self.assertIn(b"migrate_generation 3", body)

    def test_nothingYet(self) -> None:
        """
        Before any migration the counters are zero and the last
        migration's gauges are absent.
        """
        answer, transport = _scrape(self.metrics)
        self.assertIn(b"migrate_migrated_connections_total", answer)
        self.assertNotIn(b"migrate_last_migration_succeeded", answer)
        self.assertNotIn(b"migrate_last_trial_run_passed", answer)


class MetricsOptionTests(SynchronousTestCase):
    """
    C{twistd migrate-host --metrics ENDPOINT}.
    """

    def parse(self, *argv: str) -> Any:
        from .. import tap

        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_default(self) -> None:
        """
        Without C{--metrics}, the host serves no metrics.
        """
        from .. import tap

        options = self.parse()
        self.assertIsNone(options["metrics"])
        host = tap.buildHost(HostReactor(), options)
        self.assertIsNone(host.metrics)

    def test_endpoint(self) -> None:
        """
        C{--metrics} takes a server endpoint description, which the host
        listens on when it starts, with its metrics' site.
        """
        if not _PROMETHEUS:
            raise self.skipTest("prometheus-client is not installed")
        from .. import tap

        options = self.parse("--listen", "tcp:0", "--metrics", "tcp:9123")
        self.assertEqual(options["metrics"], "tcp:9123")
        reactor = HostReactor()
        host = tap.buildHost(reactor, options)
        self.assertEqual(host.settings.metricsEndpoint, "tcp:9123")
        self.assertIsInstance(host.metrics, HostMetrics)
        host.settings = attrs.evolve(host.settings, controlPath=None)
        host.startService()
        self.addCleanup(host.stopService)
        ports = [each[0] for each in reactor.tcpServers]
        self.assertIn(9123, ports)
        self.assertIsNotNone(host.metricsPort)

    def test_badEndpoint(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--metrics", "nonsense:1")
        self.assertIn("--metrics 'nonsense:1'", str(raised.exception))

    def test_withoutPrometheus(self) -> None:
        """
        Without C{prometheus-client}, C{--metrics} is a usage error that
        says how to install it.
        """
        import importlib.util

        real = importlib.util.find_spec

        def findSpec(name: str, *args: Any) -> Any:
            return None if name == "prometheus_client" else real(name, *args)

        self.patch(importlib.util, "find_spec", findSpec)
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--metrics", "tcp:9123")
        self.assertIn("txmigrate[metrics]", str(raised.exception))
