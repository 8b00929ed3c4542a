"""
The metrics endpoint with real processes: one address answers through every
migration, and the counters carry from generation to generation.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from ._hostprocess import LiveAppMixin, freePort, waitFor, writeModule
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2

_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def _samples(text: str) -> dict[str, float]:
    """
    The samples of a scrape in Prometheus' text format, by name and labels.
    """
    found = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            found[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return found


class _Scraping(LiveAppMixin, TestCase):
    """
    A host with C{--metrics}, scraped over HTTP.
    """

    timeout = 120
    initialApp = MIGRATABLE_V1
    skip = (
        None
        if importlib.util.find_spec("prometheus_client") is not None
        else "prometheus-client is not installed"
    )

    @inlineCallbacks
    def startWithMetrics(self) -> Any:
        self.metricsPort = freePort()
        status = yield self.startHost(
            "--metrics", "tcp:{}:interface=127.0.0.1".format(self.metricsPort)
        )
        return status

    @inlineCallbacks
    def scrape(self) -> Any:
        response = yield Agent(reactor).request(
            b"GET", b"http://127.0.0.1:%d/metrics" % (self.metricsPort,)
        )
        self.assertEqual(response.code, 200)
        body = yield readBody(response)
        return _samples(body.decode("utf-8"))


class MetricsAcrossMigrationsTests(_Scraping):
    """
    C{--metrics} on a host upgraded with capability transfer, then re-exec,
    then a migration that rolls back.
    """

    strategy = "capability"

    @inlineCallbacks
    def test_countersCarried(self) -> Any:
        """
        The endpoint answers at the same address in every generation; the
        counters count every migration whichever process served it: one
        capability transfer to a new process, one re-exec, one capability
        transfer that rolls back (the new code does not import).
        """
        status = yield self.startWithMetrics()
        [client] = yield self.connectClients(1)
        before = yield self.scrape()
        self.assertEqual(before["migrate_generation"], 1.0)
        self.assertEqual(
            before[
                'migrate_connections{listener="tcp:%d:interface=127.0.0.1"}'
                % (self.port,)
            ],
            1.0,
        )
        self.assertNotIn("migrate_last_migration_succeeded", str(before))

        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertNotEqual(report["newPid"], status["pid"])
        after = yield self.scrape()
        self.assertEqual(after["migrate_generation"], 2.0)
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="capability"}'],
            1.0,
        )
        self.assertEqual(after['migrate_migrated_connections_total{fate="moved"}'], 1.0)
        self.assertEqual(
            after['migrate_last_migration_succeeded{strategy="capability"}'], 1.0
        )
        self.assertIn('migrate_last_migration_phase_seconds{phase="total"}', after)
        self.assertIn("migrate_last_migration_client_wait_seconds", after)

        code, report, err = yield self.host.upgrade("--strategy", "reexec")
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        after = yield self.scrape()
        self.assertEqual(after["migrate_generation"], 3.0)
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="capability"}'],
            1.0,
        )
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="reexec"}'], 1.0
        )
        self.assertEqual(after['migrate_migrated_connections_total{fate="moved"}'], 2.0)

        writeModule(self.host.workdir, "liveapp", "raise ImportError('broken')\n")
        code, report, err = yield self.host.upgrade()
        self.assertEqual(report["outcome"], "rolled-back", err)
        after = yield self.scrape()
        self.assertEqual(after["migrate_generation"], 3.0)
        self.assertEqual(
            after[
                'migrate_migrations_total{outcome="rolled-back",strategy="capability"}'
            ],
            1.0,
        )
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="reexec"}'], 1.0
        )
        self.assertEqual(
            after['migrate_last_migration_succeeded{strategy="capability"}'], 0.0
        )
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply[0], b"v2")


class MetricsWhileDrainingTests(_Scraping):
    """
    C{--metrics} on a host upgraded with gradual transfer, whose old
    generation drains, then with module reload in place.
    """

    strategy = "gradual"

    @inlineCallbacks
    def test_drainingShown(self) -> Any:
        """
        While the old generation drains, the serving one reports it and its
        connections; once the client leaves, neither; a reload in place is
        counted by the same process.
        """
        yield self.startWithMetrics()
        [client] = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["draining"]), (0, 1), err)
        after = yield waitFor(
            lambda: self.scrape().addCallback(
                lambda found: (
                    found if found["migrate_draining_connections"] == 1.0 else None
                )
            ),
            what="the successor to hear of the draining generation",
        )
        self.assertEqual(after["migrate_draining_generations"], 1.0)
        self.assertEqual(
            after['migrate_migrated_connections_total{fate="drained"}'], 1.0
        )
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="gradual"}'],
            1.0,
        )
        self.assertNotIn("migrate_last_migration_client_wait_seconds", after)
        client.transport.loseConnection()
        yield waitFor(
            lambda: self.scrape().addCallback(
                lambda found: found["migrate_draining_generations"] == 0.0
            ),
            what="the old generation to finish draining",
        )

        code, report, err = yield self.host.upgrade("--strategy", "reload")
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        after = yield self.scrape()
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="reload"}'],
            1.0,
        )
        self.assertEqual(
            after['migrate_migrations_total{outcome="success",strategy="gradual"}'],
            1.0,
        )
