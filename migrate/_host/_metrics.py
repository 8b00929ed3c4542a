# -*- test-case-name: migrate.test.test_metrics -*-
"""
The host's metrics for the people on call: an OpenMetrics endpoint
(C{twistd migrate-host --metrics ENDPOINT}) that Prometheus scrapes.

The endpoint is a listener like the application's: it is handed to every
new generation with the others, so that one address keeps answering, and
the counters travel with it (L{HostMetrics.carried}, L{HostMetrics.carry}):
they count since the service started, not since the last migration.  A
migration is counted by the process that serves after it: the successor
for one that moved the service, the same process for one that rolled back
or ran in place.  The exposition format is C{prometheus-client}'s (the
C{metrics} extra); it is imported only where metrics are asked for.

Each scrape gets a connection of its own (the answer says
C{Connection: close}), so that the next scrape reaches whichever process
serves then, not a draining one over a kept-alive connection.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from attrs import define, field
from twisted.logger import Logger

from .._report import MigrationOutcome, MigrationReport
from .._version import __version__

__all__ = [
    "CONNECTION_FATES",
    "HostMetrics",
    "MetricsUnavailable",
    "adoptMetrics",
    "clientWait",
    "listenMetrics",
    "metricsSite",
]

_log = Logger()

#: what a migration did with a connection, as the C{fate} label says
CONNECTION_FATES = ("moved", "moved-later", "drained", "failed")

#: at most this many (strategy, outcome) pairs are carried: the names are
#: strategies' and outcomes', a handful, but the data crosses processes
_MAX_CARRIED_SERIES = 64

#: the version of the carried counters' form
_CARRIED_VERSION = 1


class MetricsUnavailable(Exception):
    """
    C{prometheus-client} is not installed (the C{metrics} extra).
    """


class _Host(Protocol):
    """
    What the metrics read from the host they describe.
    """

    @property
    def generation(self) -> int: ...

    @property
    def listeners(self) -> Mapping[str, Any]: ...

    def drainingGenerations(self) -> list[dict[str, Any]]: ...


def clientWait(report: MigrationReport) -> float | None:
    """
    The longest time a client's connection was held still by the migration
    of C{report}, where the strategy measures it; L{None} where it does
    not (gradual transfer moves no connection: nobody waits but new
    connections in the kernel's backlog for the listeners' hand-off).

    Re-exec measures its suspension; capability transfer holds the
    connections it moves from their freeze (C{connections}, then after a
    pre-copy C{freeze}) to the commit, and every client for its longest
    pre-copy step (C{precopy slice}, when longer);
    module reload serves nothing during its C{pause} (import, prepare,
    commit) and the longest of its slices before and after it (older
    reports: its commit).
    """
    durations = report.durations
    if report.strategy == "reload" and "pause" in durations:
        return max(
            durations["pause"],
            durations.get("precopy slice", 0.0),
            durations.get("switch slice", 0.0),
        )
    if "suspension" in durations:
        return durations["suspension"]
    if "connections" in durations:
        return max(
            durations["connections"]
            + durations.get("freeze", 0.0)
            + durations.get("commit", 0.0),
            durations.get("precopy slice", 0.0),
        )
    if report.strategy == "reload" and "commit" in durations:
        return durations["commit"]
    return None


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("not a count: {!r}".format(value))
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not seconds: {!r}".format(value))
    if not math.isfinite(value):
        raise ValueError("not seconds: {!r}".format(value))
    return float(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ValueError("not a name: {!r}".format(value))
    return value


@define
class _LastMigration:
    """
    The last migration, as the gauges show it.
    """

    strategy: str
    succeeded: bool
    endedAt: float
    phases: dict[str, float] = field(factory=dict)
    clientWait: float | None = None

    def toJSON(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "succeeded": self.succeeded,
            "endedAt": self.endedAt,
            "phases": dict(self.phases),
            "clientWait": self.clientWait,
        }

    @classmethod
    def fromJSON(cls, data: Any) -> "_LastMigration":
        phases = data.get("phases", {})
        if not isinstance(phases, dict) or len(phases) > _MAX_CARRIED_SERIES:
            raise ValueError("not phases: {!r}".format(phases))
        wait = data.get("clientWait")
        succeeded = data["succeeded"]
        if not isinstance(succeeded, bool):
            raise ValueError("not a flag: {!r}".format(succeeded))
        return cls(
            strategy=_name(data["strategy"]),
            succeeded=succeeded,
            endedAt=_seconds(data["endedAt"]),
            phases={_name(k): _seconds(v) for k, v in phases.items()},
            clientWait=None if wait is None else _seconds(wait),
        )


@define(eq=False)
class HostMetrics:
    """
    The metrics of one host: the counters it carries from generation to
    generation, and what it reads from the host when scraped.

    @ivar migrations: migrations by (strategy, outcome).
    @ivar connections: connections by what migrations did with them (one
        of L{CONNECTION_FATES}).
    @ivar trialRuns: the in-place strategies' trial runs of the new code in
        a child process, by (strategy, C{"passed"} or C{"failed"}).
    @ivar lastTrialRun: the last trial run's strategy and whether it
        passed.
    """

    host: _Host
    now: Callable[[], float]
    migrations: dict[tuple[str, str], int] = field(factory=dict)
    connections: dict[str, int] = field(
        factory=lambda: {fate: 0 for fate in CONNECTION_FATES}
    )
    trialRuns: dict[tuple[str, str], int] = field(factory=dict)
    lastTrialRun: tuple[str, bool] | None = None
    lastMigration: _LastMigration | None = None

    # Recording

    def recordReport(self, report: MigrationReport) -> None:
        """
        Count the migration C{report} describes; call it in the process
        that serves after it.
        """
        key = (report.strategy, report.outcome.value)
        if key in self.migrations or len(self.migrations) < _MAX_CARRIED_SERIES:
            self.migrations[key] = self.migrations.get(key, 0) + 1
        for listener in report.listeners:
            self.connections["moved"] += listener.moved
            self.connections["moved-later"] += int(getattr(listener, "movedLater", 0))
            self.connections["drained"] += listener.drained
            self.connections["failed"] += listener.failed
        self.lastMigration = _LastMigration(
            strategy=report.strategy,
            succeeded=report.outcome is MigrationOutcome.success,
            endedAt=self.now(),
            phases=dict(report.durations),
            clientWait=clientWait(report),
        )

    def recordTrialRun(self, strategy: str, passed: bool) -> None:
        """
        An in-place strategy tried the new code in a child process (the
        trial run) before its point of no return.

        @param strategy: the strategy's name.
        @param passed: whether the new code imported and restored every
            connection's state there.
        """
        key = (strategy, "passed" if passed else "failed")
        if key in self.trialRuns or len(self.trialRuns) < _MAX_CARRIED_SERIES:
            self.trialRuns[key] = self.trialRuns.get(key, 0) + 1
        self.lastTrialRun = (strategy, passed)

    # Carrying across generations

    def carried(self) -> dict[str, Any]:
        """
        The counters and last values, as JSON-compatible data for the next
        generation (L{carry}).
        """
        return {
            "version": _CARRIED_VERSION,
            "migrations": [
                {"strategy": strategy, "outcome": outcome, "count": count}
                for (strategy, outcome), count in sorted(self.migrations.items())
            ],
            "connections": dict(self.connections),
            "trialRuns": [
                {"strategy": strategy, "result": result, "count": count}
                for (strategy, result), count in sorted(self.trialRuns.items())
            ],
            "lastTrialRun": (
                None
                if self.lastTrialRun is None
                else {"strategy": self.lastTrialRun[0], "passed": self.lastTrialRun[1]}
            ),
            "lastMigration": (
                None if self.lastMigration is None else self.lastMigration.toJSON()
            ),
        }

    def carry(self, data: Any) -> bool:
        """
        Take over what the previous generation counted (what its
        L{carried} returned).  Malformed data is logged and ignored: the
        counters start from zero rather than fail a migration.

        @return: whether C{data} was taken over.
        """
        try:
            migrations, connections, trialRuns, lastTrial, last = _parseCarried(data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            _log.warn("Ignoring the previous generation's metrics: {why}", why=str(e))
            return False
        self.migrations = migrations
        self.connections = connections
        self.trialRuns = trialRuns
        self.lastTrialRun = lastTrial
        self.lastMigration = last
        return True

    # Exposition

    def collect(self) -> Iterator[Any]:
        """
        The metric families, for C{prometheus-client}'s registry.
        """
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        yield InfoMetricFamily(
            "migrate_build", "The migrate release serving.", {"version": __version__}
        )
        yield GaugeMetricFamily(
            "migrate_generation",
            "The serving generation: 1 at start, one more for each migration "
            "to a new process or image.",
            value=self.host.generation,
        )
        serving = GaugeMetricFamily(
            "migrate_connections",
            "Connections this process serves, by listener.",
            labels=["listener"],
        )
        for key, listener in sorted(self.host.listeners.items()):
            serving.add_metric([key], len(listener.factory.protocols))
        yield serving
        draining = self.host.drainingGenerations()
        yield GaugeMetricFamily(
            "migrate_draining_generations",
            "Older generations still finishing their connections.",
            value=len(draining),
        )
        yield GaugeMetricFamily(
            "migrate_draining_connections",
            "Connections the older generations still serve.",
            value=sum(int(each.get("connections", 0)) for each in draining),
        )
        migrations = CounterMetricFamily(
            "migrate_migrations",
            "Migrations, by strategy and outcome (success, rolled-back, refused).",
            labels=["strategy", "outcome"],
        )
        for (strategy, outcome), count in sorted(self.migrations.items()):
            migrations.add_metric([strategy, outcome], count)
        yield migrations
        fates = CounterMetricFamily(
            "migrate_migrated_connections",
            "Connections migrations dealt with, by fate: moved to the new code, "
            "moved later (at a safe point), drained on the old code, failed "
            "(closed).",
            labels=["fate"],
        )
        for fate in CONNECTION_FATES:
            fates.add_metric([fate], self.connections.get(fate, 0))
        yield fates
        yield from self._lastMigrationFamilies(GaugeMetricFamily)
        trials = CounterMetricFamily(
            "migrate_trial_runs",
            "Trial runs of new code in a child process before an in-place "
            "migration's point of no return, by strategy and result.",
            labels=["strategy", "result"],
        )
        for (strategy, result), count in sorted(self.trialRuns.items()):
            trials.add_metric([strategy, result], count)
        yield trials
        if self.lastTrialRun is not None:
            passed = GaugeMetricFamily(
                "migrate_last_trial_run_passed",
                "1 if the last trial run of new code passed, 0 if it failed.",
                labels=["strategy"],
            )
            passed.add_metric([self.lastTrialRun[0]], 1 if self.lastTrialRun[1] else 0)
            yield passed

    def _lastMigrationFamilies(self, gauge: Any) -> Iterable[Any]:
        last = self.lastMigration
        if last is None:
            return
        yield gauge(
            "migrate_last_migration_timestamp_seconds",
            "When the last migration ended (Unix time).",
            value=last.endedAt,
        )
        succeeded = gauge(
            "migrate_last_migration_succeeded",
            "1 if the last migration succeeded, 0 if not.",
            labels=["strategy"],
        )
        succeeded.add_metric([last.strategy], 1 if last.succeeded else 0)
        yield succeeded
        phases = gauge(
            "migrate_last_migration_phase_seconds",
            "How long each phase of the last migration took (total included).",
            labels=["phase"],
        )
        for phase, seconds in sorted(last.phases.items()):
            phases.add_metric([phase], seconds)
        yield phases
        if last.clientWait is not None:
            yield gauge(
                "migrate_last_migration_client_wait_seconds",
                "The longest a client's connection was held still by the last "
                "migration.",
                value=last.clientWait,
            )


def _parseCarried(data: Any) -> tuple[
    dict[tuple[str, str], int],
    dict[str, int],
    dict[tuple[str, str], int],
    tuple[str, bool] | None,
    _LastMigration | None,
]:
    if not isinstance(data, dict) or data.get("version") != _CARRIED_VERSION:
        raise ValueError("not version {} metrics".format(_CARRIED_VERSION))

    def series(entries: Any, label: str) -> dict[tuple[str, str], int]:
        if not isinstance(entries, list) or len(entries) > _MAX_CARRIED_SERIES:
            raise ValueError("not a list of counts")
        return {
            (_name(each["strategy"]), _name(each[label])): _count(each["count"])
            for each in entries
        }

    connections = {fate: 0 for fate in CONNECTION_FATES}
    carriedConnections = data["connections"]
    if not isinstance(carriedConnections, dict):
        raise ValueError("not connection counts")
    for fate in CONNECTION_FATES:
        connections[fate] = _count(carriedConnections.get(fate, 0))
    lastTrial = data.get("lastTrialRun")
    if lastTrial is not None:
        if not isinstance(lastTrial["passed"], bool):
            raise ValueError("not a flag")
        lastTrial = (_name(lastTrial["strategy"]), lastTrial["passed"])
    last = data.get("lastMigration")
    return (
        series(data["migrations"], "outcome"),
        connections,
        series(data["trialRuns"], "result"),
        lastTrial,
        None if last is None else _LastMigration.fromJSON(last),
    )


def metricsSite(metrics: HostMetrics) -> Any:
    """
    The HTTP site that serves C{metrics} at C{/metrics}, one scrape per
    connection, without an access log line per scrape.

    @raise MetricsUnavailable: if C{prometheus-client} is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
    except ImportError:
        raise MetricsUnavailable(
            "--metrics needs prometheus-client: pip install 'txmigrate[metrics]'"
        )
    from twisted.web.http import HTTPChannel
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)

    class MetricsResource(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            accept = request.getHeader(b"accept")
            encoder, contentType = choose_encoder(
                accept.decode("latin-1") if accept else ""
            )
            request.setHeader(b"content-type", contentType.encode("ascii"))
            return bytes(encoder(registry))

    class OneScrapeChannel(HTTPChannel):
        def checkPersistence(self, request: Any, version: bytes) -> bool:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False

    class MetricsSite(Site):
        # HTTP/1.1 alone: no TLS, so no protocol negotiation to make.
        protocol = OneScrapeChannel  # type: ignore[assignment]
        noisy = False

        def log(self, request: Any) -> None:
            pass

    root = Resource()
    root.putChild(b"metrics", MetricsResource())
    return MetricsSite(root)


def listenMetrics(reactor: Any, description: str, metrics: HostMetrics) -> Any:
    """
    Serve C{metrics} on the server endpoint C{description} (or the socket
    systemd passed under that name), at once.

    @return: the listening port.
    @raise MetricsUnavailable: if C{prometheus-client} is not installed.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.python.failure import Failure

    from .._systemd import activatedEndpoint

    site = metricsSite(metrics)
    endpoint = activatedEndpoint(reactor, description) or serverFromString(
        reactor, description
    )
    result: list[Any] = []
    endpoint.listen(site).addBoth(result.append)
    if not result:
        raise RuntimeError(
            "metrics endpoint {!r} did not start at once".format(description)
        )
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]


def adoptMetrics(reactor: Any, descriptor: int, metrics: HostMetrics) -> Any:
    """
    Serve C{metrics} on the listening socket C{descriptor}, handed on by
    the previous generation, not accepting until resumed.

    @return: the listening port.
    """
    from .._handoff._listeners import adoptListener

    return adoptListener(reactor, descriptor, metricsSite(metrics), accepting=False)
