"""
The stall scenario: the longest pause any client sees while a host holding
many idle connections upgrades, measured by probe clients rather than by
the host's own timers.

One real C{twistd migrate-host} per strategy holds N idle connections
(each has answered one request, so each carries a small state, as in
L{migrate.bench._scenarios.moveIdle}) and a few I{probe} connections, each
sending a numbered line every few milliseconds and timing every answer.
The host upgrades once; the probes' longest wait from the start of the
upgrade command until a short while after it returned is the stall, and
their p99 while the command ran says whether the stall was one client's
bad luck or everyone's.  Afterwards every idle connection sends one more
line: it must be answered, with its count going on (its state travelled),
and the answer names the process that served it.  Before each upgrade
the application's source changes (a comment line more), so that every
strategy loads new code: module reload has nothing to do otherwise.

For several counts the same host is reused, from the smallest count up:
the connections already open stay and more are opened (they have all
answered at least one request, as the new ones have), so the slow part,
opening 10,000 connections, is paid once per strategy.

The floors are measured by the caller (L{migrate.bench._floor}): passing
as many descriptors with C{send_fds}, and for re-exec the new image's
start.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from attrs import frozen
from twisted.internet import defer

from ._app import APP_MODULE
from ._load import LoadGenerator, LongLivedClient, summarize
from ._process import BenchHost, HostFailed, freePort
from ._scenarios import REPORT_KEYS, relayProgress, sleep
from ._trace import aroundLongestWait, processNames

__all__ = [
    "STALL_STRATEGIES",
    "StallSettings",
    "addRatios",
    "measureStall",
    "parseCounts",
]

STALL_STRATEGIES = ("capability", "reexec", "reload")
"""
The strategies whose upgrade pauses the connections a host holds (gradual
moves none: its clients never wait for it).
"""


def parseCounts(value: str) -> tuple[int, ...]:
    """
    Parse C{--stall}'s value: connection counts separated by commas, in
    increasing order without repeats; C{0} alone means none.

    @raise ValueError: for anything else.
    """
    counts = set()
    for each in value.split(","):
        each = each.strip().replace("_", "")
        if not each:
            continue
        number = int(each)
        if number < 0:
            raise ValueError("a connection count must not be negative")
        counts.add(number)
    if not counts:
        raise ValueError("no connection count")
    if counts == {0}:
        return ()
    if 0 in counts:
        raise ValueError("0 (skip) cannot be given with other counts")
    return tuple(sorted(counts))


@frozen
class StallSettings:
    """
    What the stall scenario measures.

    @ivar counts: idle connection counts, increasing; one upgrade each.
    @ivar probes: probe connections (besides the idle ones).
    @ivar probeInterval: seconds between two lines of one probe.
    @ivar before: seconds the probes run before the upgrade (their normal
        latency, printed for comparison).
    @ivar after: seconds the probes go on after the upgrade command
        returned (a strategy may finish restoring connections after it).
    @ivar upgradeTimeout: seconds one upgrade may take.
    @ivar answerTimeout: seconds the idle connections' answers may take,
        at each check.
    @ivar openTimeout: seconds opening the idle connections for one count
        may take (a host that stops accepting would otherwise keep each
        attempt waiting for its own connect timeout, 100 at a time).
    """

    counts: tuple[int, ...]
    probes: int = 50
    probeInterval: float = 0.005
    before: float = 0.5
    after: float = 0.5
    upgradeTimeout: float = 120.0
    answerTimeout: float = 60.0
    openTimeout: float = 120.0


def _request(clients: Sequence[LongLivedClient], now: float) -> dict[Any, Any]:
    """
    Send one line on each live client of C{clients}.

    @return: each client's count before (to check it goes on).
    """
    before = {}
    for client in clients:
        if client.lost is None and not client.closing:
            before[client] = client.lastCount
            client.request(now)
    return before


def _checked(before: dict[Any, Any], newPid: int | None) -> dict[str, Any]:
    """
    What became of the requests L{_request} sent, once answered or given
    up on: how many were answered, how many with the count going on, and
    by which process.
    """
    answered = intact = onNew = 0
    servers: dict[str, int] = {}
    for client, count in before.items():
        if client.lost is not None or client.pending:
            continue
        answered += 1
        if count is not None and client.lastCount == count + 1:
            intact += 1
        server = (client.server or b"?").decode("ascii", "replace")
        servers[server] = servers.get(server, 0) + 1
        if newPid is not None and server == str(newPid):
            onNew += 1
    return {
        "asked": len(before),
        "answered": answered,
        "stateIntact": intact,
        "onNew": onNew,
        "servers": servers,
    }


def _changeCode(host: BenchHost, label: str) -> None:
    """
    Give the host's application a new version: a comment line more, so
    that every upgrade loads changed code (module reload leaves a module
    whose source did not change alone, and would then have nothing to do).
    """
    with open(host.workdir.child(APP_MODULE + ".py").path, "a") as f:
        f.write("\n# stall scenario: upgrade with {}\n".format(label))


async def _open(
    reactor: Any,
    idle: LoadGenerator,
    count: int,
    settings: StallSettings,
    progress: Callable[[str], None],
) -> int:
    """
    Open idle connections until C{count} are open, and have each new one
    answer one request.

    @return: how many idle connections are open.
    """
    have = len(idle.clients)
    started = reactor.seconds()
    if count > have:
        opening = idle.connect(count - have)
        opening.addTimeout(settings.openTimeout, reactor)
        try:
            await opening
        except defer.TimeoutError:
            raise HostFailed(
                "opening {} connections took more than {} s ({} open)".format(
                    count - have, settings.openTimeout, len(idle.alive())
                )
            )
    fresh = idle.clients[have:]
    _request(fresh, reactor.seconds())
    missing = await idle.settle(settings.answerTimeout)
    alive = len(idle.alive())
    progress(
        "{} idle connections open ({} new in {:.1f} s; {} unanswered{})".format(
            alive,
            len(fresh),
            reactor.seconds() - started,
            missing,
            (
                "; failed to connect: {}".format(dict(idle.connectFailures))
                if idle.connectFailures
                else ""
            ),
        )
    )
    return alive


async def _measureOne(
    reactor: Any,
    host: BenchHost,
    strategy: str,
    count: int,
    idle: LoadGenerator,
    probes: LoadGenerator,
    settings: StallSettings,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """
    One upgrade of C{host} holding C{count} idle connections, with the
    probes running.
    """
    held = await _open(reactor, idle, count, settings, progress)
    oldPid = host.servingPid
    lostBefore = sum(idle.lostConnections.values())
    probeLostBefore = sum(probes.lostConnections.values())
    probeStateBefore = probes.stateErrors
    probeLinesBefore = probes.lostLines
    probeDuplicatesBefore = probes.duplicatedLines
    _changeCode(host, "{} connections".format(count))
    probes.start()
    await sleep(reactor, settings.before)
    progress(
        "upgrading with {} ({} idle, {} probes)".format(strategy, held, settings.probes)
    )
    start = reactor.seconds()
    upgrade = host.upgrade(
        "--strategy",
        strategy,
        "--timeout",
        str(settings.upgradeTimeout),
        progress=relayProgress(progress),
    )
    # The command has its own deadline; this one bounds the benchmark even
    # if the command's does not fire.
    bound = settings.upgradeTimeout + 30
    upgrade.addTimeout(bound, reactor)
    try:
        code, report, errors = await upgrade
    except defer.TimeoutError:
        raise HostFailed("the upgrade command did not end within {} s".format(bound))
    end = reactor.seconds()
    await sleep(reactor, settings.after)
    stop = reactor.seconds()
    unanswered = await probes.stop(settleTimeout=settings.answerTimeout)
    newPid = report.get("newPid") or oldPid
    progress(
        "{} in {:.0f} ms; checking every idle connection".format(
            report.get("outcome"), (end - start) * 1000
        )
    )
    checkStarted = reactor.seconds()
    before = _request(idle.clients, checkStarted)
    await idle.settle(settings.answerTimeout)
    idleAfter = _checked(before, newPid)
    before = _request(probes.clients, reactor.seconds())
    await probes.settle(settings.answerTimeout)
    probeAfter = _checked(before, newPid)
    samples = probes.samples
    longest = samples.within(start, stop)
    result: dict[str, Any] = {
        "strategy": strategy,
        "count": count,
        "idle": held,
        "probes": len(probes.alive()),
        "probeInterval": settings.probeInterval,
        "exitCode": code,
        "report": {key: report.get(key) for key in REPORT_KEYS},
        "seconds": end - start,
        "stall": max(longest) if longest else None,
        "stallAt": _sentAfter(samples.longest(start, stop), start),
        "probeAnswers": len(longest),
        "during": summarize(samples.within(start, end)),
        "before": summarize(samples.within(start - settings.before, start)),
        "after": summarize(samples.within(end, stop)),
        "probeUnansweredAtEnd": unanswered,
        "probeLost": {
            "connections": sum(probes.lostConnections.values()) - probeLostBefore,
            "lines": probes.lostLines - probeLinesBefore,
            "duplicatedLines": probes.duplicatedLines - probeDuplicatesBefore,
            "stateErrors": probes.stateErrors - probeStateBefore,
        },
        "idleAfter": idleAfter,
        "idleLost": sum(idle.lostConnections.values()) - lostBefore,
        "probesAfter": probeAfter,
        "oldPid": oldPid,
        "newPid": newPid,
    }
    result["trace"] = aroundLongestWait(result, start, processNames(oldPid, newPid))
    if not report.get("outcome"):
        said = [line for line in errors.splitlines() if line.strip()]
        result["error"] = "the upgrade gave no outcome (exit status {}){}".format(
            code, ": " + said[-1].strip() if said else ""
        )
    return result


def _sentAfter(longest: tuple[float, float] | None, start: float) -> float | None:
    """
    How long after C{start} the slowest request of C{longest} was sent.
    """
    return None if longest is None else longest[0] - start


def _failed(strategy: str, count: int, error: str) -> dict[str, Any]:
    return {"strategy": strategy, "count": count, "error": error}


async def measureStall(
    reactor: Any,
    strategy: str,
    settings: StallSettings,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """
    Measure the stall of C{strategy} for every count of C{settings}, on one
    host, from the smallest count up.

    @return: one result per count; a count not measured (the host or an
        earlier count failed) has an C{error}.
    """
    host = BenchHost(reactor, freePort(), strategy)
    idle = LoadGenerator(reactor, host.port, onProgress=progress)
    probes = LoadGenerator(reactor, host.port, interval=settings.probeInterval)
    rows: list[dict[str, Any]] = []
    counts = sorted(settings.counts)
    try:
        try:
            progress("starting migrate-host --strategy {}".format(strategy))
            await host.start()
            opened = await probes.connect(settings.probes)
            missing = await probes.pingAll(timeout=settings.answerTimeout)
            if opened != settings.probes or missing:
                raise RuntimeError(
                    "{} of {} probes connected, {} unanswered".format(
                        opened, settings.probes, missing
                    )
                )
        except Exception as e:
            error = "{}: {}".format(type(e).__name__, e)
            progress("FAILED: {}".format(error))
            return [_failed(strategy, count, error) for count in counts]
        for index, count in enumerate(counts):
            try:
                row = await _measureOne(
                    reactor, host, strategy, count, idle, probes, settings, progress
                )
            except Exception as e:
                error = "{}: {}".format(type(e).__name__, e)
                progress("FAILED at {} connections: {}".format(count, error))
                rows.append(_failed(strategy, count, error))
                for later in counts[index + 1 :]:
                    rows.append(
                        _failed(
                            strategy, later, "not measured: {} failed".format(count)
                        )
                    )
                break
            rows.append(row)
            if row.get("error"):
                progress("FAILED at {} connections: {}".format(count, row["error"]))
            if row["report"].get("outcome") != "success":
                for later in counts[index + 1 :]:
                    rows.append(
                        _failed(
                            strategy,
                            later,
                            "not measured: the upgrade at {} ended {}".format(
                                count, row["report"].get("outcome")
                            ),
                        )
                    )
                break
        return rows
    finally:
        if probes._ticker is not None:
            await probes.stop(settleTimeout=1.0)
        await probes.closeAll(timeout=10.0)
        await idle.closeAll(timeout=30.0)
        await host.stop()
        host.cleanup()


def addRatios(stall: dict[str, Any]) -> None:
    """
    Set each measured row's C{floor} (the descriptor floor for as many
    connections as its host held: the idle ones and the probes), C{ratio}
    (its stall over that floor) and, for re-exec, C{aboveStartFloor} (its
    stall minus the new image's start), once the floors are known; L{None}
    where a figure is missing.

    @param stall: the scenario's results: C{rows}, C{floors}, C{probes}
        and C{startFloor}.
    """
    floors = {int(floor["count"]): floor["seconds"] for floor in stall["floors"]}
    startFloor = stall.get("startFloor")
    for row in stall["rows"]:
        if row.get("error"):
            continue
        floor = floors.get(row["count"] + stall["probes"])
        row["floor"] = floor
        row["ratio"] = (
            row["stall"] / floor if floor and row["stall"] is not None else None
        )
        if row["strategy"] == "reexec":
            row["aboveStartFloor"] = (
                row["stall"] - startFloor
                if startFloor is not None and row["stall"] is not None
                else None
            )
