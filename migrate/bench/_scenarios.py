"""
The benchmark's scenarios, each against a real C{twistd migrate-host}:

  - L{migrateUnderLoad}: long-lived clients and new short connections run
    while the host migrates with one strategy;
  - L{restartUnderLoad}: the same load while the service is naively stopped
    and started again (the baseline every strategy must beat);
  - L{moveIdle}: many idle connections with small state moved by one
    strategy, timed, with the processes' memory before and after.

Each returns JSON-compatible results; L{migrate.bench._output} prints them.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from attrs import frozen
from twisted.internet.task import deferLater

from ._load import LoadGenerator, latencyBins, summarize
from ._output import handoffSeconds
from ._process import BenchHost, freePort, pidAlive, readCPU, readRSS, waitFor
from ._trace import aroundLongestWait, processNames

__all__ = [
    "LoadSettings",
    "migrateUnderLoad",
    "restartUnderLoad",
    "moveIdle",
    "REPORT_KEYS",
    "relayProgress",
    "sleep",
]

TIMELINE_BIN = 0.1
"""
Seconds per point of the timeline.
"""

#: what a scenario keeps of a migration's report
REPORT_KEYS = (
    "outcome",
    "reason",
    "moved",
    "draining",
    "failed",
    "durations",
    "oldPid",
    "newPid",
)


@frozen
class LoadSettings:
    """
    What a load scenario runs.

    @ivar connections: long-lived connections.
    @ivar interval: seconds between two requests of one long-lived client.
    @ivar rate: new short connections per second.
    @ivar warmup: seconds of load before measuring starts.
    @ivar before: seconds measured before the migration.
    @ivar after: seconds measured after it.
    @ivar upgradeTimeout: seconds a migration may take before the
        benchmark gives up on it.
    """

    connections: int
    interval: float
    rate: float
    warmup: float
    before: float
    after: float
    upgradeTimeout: float = 120.0


def relayProgress(progress: Callable[[str], None]) -> Callable[[str], None]:
    """
    Pass on the upgrade command's progress lines, shortened (a successor's
    command line can span many lines).
    """

    def relay(line: str) -> None:
        if line.startswith("[migrate]") or line.startswith("migrate:"):
            progress("  " + (line if len(line) <= 150 else line[:147] + "..."))

    return relay


def sleep(reactor: Any, seconds: float) -> Any:
    """
    @return: a L{Deferred} that fires after C{seconds} on C{reactor}.
    """
    return deferLater(reactor, seconds, lambda: None)


def _phases(
    load: LoadGenerator, start: float, end: float, stop: float, measured: float
) -> dict[str, Any]:
    """
    Latency and short-connection outcomes before, during and after the
    window [C{start}, C{end}): the long-lived clients' latencies to their
    answers' arrival (C{latency}) and to the load generator's reading them
    (C{readLatency}).
    """
    windows = {
        "before": (measured, start),
        "during": (start, end),
        "after": (end, stop),
    }
    result = {}
    for name, (low, high) in windows.items():
        outcomes = load.shortOutcomesWithin(low, high)
        result[name] = {
            "latency": summarize(load.samples.within(low, high)),
            "readLatency": summarize(load.readSamples.within(low, high)),
            "shortLatency": summarize(load.shortSamples.within(low, high)),
            "short": {
                "answered": outcomes.get("answered", 0),
                "refused": outcomes.get("refused", 0),
                "reset": outcomes.get("reset", 0) + outcomes.get("closed", 0),
                "timedOut": outcomes.get("timedOut", 0),
                "other": outcomes.get("other", 0),
            },
            "seconds": max(0.0, high - low),
        }
    return result


def _timeline(load: LoadGenerator, origin: float) -> dict[str, Any]:
    rows = latencyBins(load.samples, origin, TIMELINE_BIN)
    failures: dict[int, int] = {}
    for started, outcome in load.shortOutcomeTimes:
        if outcome != "answered":
            index = int((started - origin) // TIMELINE_BIN)
            failures[index] = failures.get(index, 0) + 1
    return {
        "bin": TIMELINE_BIN,
        "rows": [[round(v, 6) for v in row] for row in rows],
        "shortFailures": sorted(failures.items()),
        "lost": [round(t - origin, 3) for t in load.lostTimes],
    }


def _stalls(load: LoadGenerator, start: float, stop: float) -> dict[str, Any]:
    """
    The longest waits of the requests sent from the upgrade command
    (C{start}) until the measurement ended (C{stop}), when their answers
    arrived (C{stall}, the headline) and when the load generator read them
    (C{readStall}), with when each request was sent against C{start}; and
    the longest wait of the whole run (C{wholeRunStall}), which may fall
    before the command and then says nothing about the migration.
    """
    figures: dict[str, Any] = {}
    for name, samples, low, high in [
        ("stall", load.samples, start, stop),
        ("readStall", load.readSamples, start, stop),
        ("wholeRunStall", load.samples, float("-inf"), float("inf")),
    ]:
        longest = samples.longest(low, high)
        figures[name] = None if longest is None else longest[1]
        figures[name + "At"] = None if longest is None else longest[0] - start
    return figures


async def _startLoad(
    reactor: Any,
    host: BenchHost,
    settings: LoadSettings,
    progress: Callable[[str], None],
) -> LoadGenerator:
    load = LoadGenerator(
        reactor,
        host.port,
        interval=settings.interval,
        rate=settings.rate,
        onProgress=progress,
    )
    connected = await load.connect(settings.connections)
    if connected != settings.connections:
        progress(
            "only {} of {} connections opened: {}".format(
                connected, settings.connections, dict(load.connectFailures)
            )
        )
    missing = await load.pingAll(timeout=30.0)
    if missing:
        progress("{} first requests unanswered".format(missing))
    load.start()
    progress(
        "load running: {} connections, a request every {} ms each, {} new "
        "connections/s".format(connected, int(settings.interval * 1000), settings.rate)
    )
    await sleep(reactor, settings.warmup)
    return load


async def migrateUnderLoad(
    reactor: Any,
    strategy: str,
    settings: LoadSettings,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """
    Migrate a host with C{strategy} while the load runs.
    """
    host = BenchHost(reactor, freePort(), strategy)
    try:
        progress("starting migrate-host --strategy {}".format(strategy))
        status = await host.start()
        oldPid = int(status["pid"])
        load = await _startLoad(reactor, host, settings, progress)
        origin = load._started or reactor.seconds()
        measured = reactor.seconds()
        cpuFrom = _cpu(load, oldPid)
        await sleep(reactor, settings.before)
        cpu = _cpuPerRequest(cpuFrom, _cpu(load, oldPid))
        rssOld = readRSS(oldPid)
        progress("migrating with {}".format(strategy))
        start = reactor.seconds()
        code, report, _ = await host.upgrade(
            "--strategy",
            strategy,
            "--timeout",
            str(settings.upgradeTimeout),
            progress=relayProgress(progress),
        )
        end = reactor.seconds()
        newPid = report.get("newPid") or oldPid
        progress(
            "{} in {:.0f} ms; measuring after".format(
                report.get("outcome"), (end - start) * 1000
            )
        )
        await sleep(reactor, settings.after)
        stop = reactor.seconds()
        unanswered = await load.stop()
        rssNew = readRSS(newPid)
        rssOldAfter = readRSS(oldPid) if newPid != oldPid else None
        servers = load.servers()
        result: dict[str, Any] = {
            "name": strategy,
            "kind": "migration",
            "strategy": strategy,
            "exitCode": code,
            "report": {key: report.get(key) for key in REPORT_KEYS + ("notes",)},
            "window": [start - origin, end - origin],
            "handoffWindow": _handoffWindow(report, start - origin, end - origin),
            "seconds": end - start,
            "clients": {
                "kept": len(load.alive()),
                "onNew": servers.get(b"%d" % newPid, 0),
                "onOld": servers.get(b"%d" % oldPid, 0) if newPid != oldPid else 0,
                "samePid": newPid == oldPid,
                "unansweredAtEnd": unanswered,
            },
            "load": load.outcomes(),
            **_stalls(load, start, stop),
            "phases": _phases(load, start, end, stop, measured),
            "rss": {"old": rssOld, "new": rssNew, "oldAfter": rssOldAfter},
            "cpu": cpu,
            "timeline": _timeline(load, origin),
        }
        result["trace"] = aroundLongestWait(result, start, processNames(oldPid, newPid))
        await load.closeAll()
        if newPid != oldPid:
            # Gradual: the old process exits once its clients have gone.
            drainStart = reactor.seconds()
            try:
                await waitFor(
                    reactor,
                    lambda: not pidAlive(oldPid),
                    15.0,
                    "the old process to exit",
                )
                result["oldExitedAfterClose"] = reactor.seconds() - drainStart
            except Exception:
                result["oldExitedAfterClose"] = None
        return result
    finally:
        await host.stop()
        host.cleanup()


def _cpu(load: LoadGenerator, hostPid: int) -> tuple[float | None, float | None, int]:
    """
    The processor time the host and this process (the load generator) have
    used so far, and the requests answered so far.
    """
    return readCPU(hostPid), readCPU(), load.answered


def _cpuPerRequest(
    start: tuple[float | None, float | None, int],
    end: tuple[float | None, float | None, int],
) -> dict[str, Any]:
    """
    The processor time the host and the load generator spent per request
    answered between C{start} and C{end} (from L{_cpu}): what serving a
    request costs each side in the steady state, which other work on the
    machine disturbs less than it disturbs latencies.

    @return: C{host} and C{generator} in seconds per request (L{None} if
        unknown), and C{answered}.
    """
    answered = end[2] - start[2]

    def per(before: float | None, after: float | None) -> float | None:
        if before is None or after is None or answered <= 0:
            return None
        return (after - before) / answered

    return {
        "host": per(start[0], end[0]),
        "generator": per(start[1], end[1]),
        "answered": answered,
    }


def _handoffWindow(
    report: dict[str, Any], start: float, end: float
) -> list[float] | None:
    """
    When connections were frozen: from the end of the report's I{spawn},
    I{listeners} and I{precopy} phases to the end of its I{commit} phase, or the
    I{suspension} of a re-exec (an estimate: the report's clock is the
    host's).
    """
    durations = report.get("durations") or {}
    if "connections" not in durations:
        if "suspension" in durations:
            # Re-exec: the report arrives once the new image has restored.
            return [max(start, end - durations["suspension"]), end]
        return None
    frozenFrom = (
        start
        + durations.get("spawn", 0.0)
        + durations.get("listeners", 0.0)
        + durations.get("precopy", 0.0)
    )
    frozenTo = frozenFrom + (handoffSeconds(durations) or 0.0)
    return [frozenFrom, min(frozenTo, end)]


async def restartUnderLoad(
    reactor: Any,
    settings: LoadSettings,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """
    The baseline: stop the service (C{SIGTERM}) and start it again on the
    same port while the load runs.
    """
    port = freePort()
    host = BenchHost(reactor, port, "gradual")
    second: BenchHost | None = None
    try:
        progress("starting migrate-host for the naive restart")
        status = await host.start()
        oldPid = int(status["pid"])
        load = await _startLoad(reactor, host, settings, progress)
        origin = load._started or reactor.seconds()
        measured = reactor.seconds()
        await sleep(reactor, settings.before)
        rssOld = readRSS(oldPid)
        progress("stopping the host (SIGTERM) and starting it again")
        start = reactor.seconds()
        os.kill(oldPid, signal.SIGTERM)
        await waitFor(
            reactor,
            lambda: not pidAlive(oldPid),
            30.0,
            "the host to stop",
            interval=0.005,
        )
        stopped = reactor.seconds()
        second = BenchHost(reactor, port, "gradual")
        status = await second.start()
        end = reactor.seconds()
        newPid = int(status["pid"])
        progress(
            "serving again after {:.0f} ms; measuring after".format(
                (end - start) * 1000
            )
        )
        await sleep(reactor, settings.after)
        stop = reactor.seconds()
        unanswered = await load.stop()
        result: dict[str, Any] = {
            "name": "naive-restart",
            "kind": "baseline",
            "strategy": None,
            "exitCode": 0,
            "report": {
                "outcome": "restarted",
                "reason": None,
                "moved": 0,
                "draining": 0,
                "failed": None,
                "durations": {
                    "stop": stopped - start,
                    "start": end - stopped,
                    "total": end - start,
                },
                "oldPid": oldPid,
                "newPid": newPid,
                "notes": [],
            },
            "window": [start - origin, end - origin],
            "handoffWindow": None,
            "seconds": end - start,
            "clients": {
                "kept": len(load.alive()),
                "onNew": 0,
                "onOld": 0,
                "samePid": False,
                "unansweredAtEnd": unanswered,
            },
            "load": load.outcomes(),
            **_stalls(load, start, stop),
            "phases": _phases(load, start, end, stop, measured),
            "rss": {"old": rssOld, "new": readRSS(newPid), "oldAfter": None},
            "timeline": _timeline(load, origin),
        }
        await load.closeAll()
        return result
    finally:
        await host.stop()
        host.cleanup()
        if second is not None:
            await second.stop()
            second.cleanup()


async def moveIdle(
    reactor: Any,
    strategy: str,
    count: int,
    progress: Callable[[str], None],
    upgradeTimeout: float = 120.0,
) -> dict[str, Any]:
    """
    Move C{count} idle connections (each has answered one request, so
    each carries a small state) with C{strategy}; check every one answers
    from the new process with its state intact.
    """
    host = BenchHost(reactor, freePort(), strategy)
    try:
        progress(
            "starting migrate-host --strategy {} for {} idle connections".format(
                strategy, count
            )
        )
        status = await host.start()
        oldPid = int(status["pid"])
        rssEmpty = readRSS(oldPid)
        load = LoadGenerator(reactor, host.port, onProgress=progress)
        started = reactor.seconds()
        connected = await load.connect(count)
        missing = await load.pingAll(timeout=60.0)
        progress(
            "{} connections open in {:.1f} s ({} unanswered)".format(
                connected, reactor.seconds() - started, missing
            )
        )
        await sleep(reactor, 0.5)
        rssOld = readRSS(oldPid)
        progress("moving them with {}".format(strategy))
        start = reactor.seconds()
        code, report, _ = await host.upgrade(
            "--strategy",
            strategy,
            "--timeout",
            str(upgradeTimeout),
            progress=relayProgress(progress),
        )
        end = reactor.seconds()
        newPid = report.get("newPid") or oldPid
        moved = newPid != oldPid
        missingAfter = await load.pingAll(timeout=60.0)
        await sleep(reactor, 0.5)
        rssNew = readRSS(newPid)
        servers = load.servers()
        result = {
            "name": "idle-{}".format(strategy),
            "kind": "idle",
            "strategy": strategy,
            "count": count,
            "connected": connected,
            "exitCode": code,
            "report": {key: report.get(key) for key in REPORT_KEYS},
            "seconds": end - start,
            "answeredAfter": connected - missingAfter,
            "onNew": servers.get(b"%d" % newPid, 0) if moved else 0,
            "load": load.outcomes(),
            "rss": {"empty": rssEmpty, "old": rssOld, "new": rssNew if moved else None},
            "samePid": not moved,
        }
        await load.closeAll(timeout=30.0)
        return result
    finally:
        await host.stop()
        host.cleanup()
