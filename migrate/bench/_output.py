"""
Printing the benchmark's results: one block per scenario, the figures
against their targets, and the comparison with an earlier run's JSON.
"""

from __future__ import annotations

from typing import IO, Any

__all__ = [
    "formatResults",
    "formatComparison",
    "formatStall",
    "handoffSeconds",
    "keyFigures",
    "write",
]


def _traced(trace: list[str] | None, who: str = "  ") -> list[str]:
    """
    The lines showing what a traced run recorded around a longest wait
    (C{--trace}, L{migrate.bench._trace.aroundLongestWait}); none when the
    run was not traced.

    @param who: how the first line begins.
    """
    if trace is None:
        return []
    if not trace:
        return [who + "meanwhile, as traced: no long turn, wait or collection"]
    return [who + "meanwhile, as traced:"] + ["    " + line for line in trace]


def _sentWhen(stallAt: float | None) -> str:
    """
    When the request that waited longest was sent, against the upgrade
    command's start.
    """
    if stallAt is None:
        return ""
    if stallAt < 0:
        return ", sent {} before the upgrade command began".format(_ms(-stallAt))
    return ", sent {} after the upgrade command began".format(_ms(stallAt))


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 10:
        return "{:.1f} s".format(seconds)
    return (
        "{:.1f} ms".format(seconds * 1000)
        if seconds < 0.1
        else "{:.0f} ms".format(seconds * 1000)
    )


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else "{:.1f} us".format(seconds * 1e6)


def _mb(size: int | None) -> str:
    return "-" if size is None else "{:.1f} MB".format(size / 1e6)


def _latency(phase: dict[str, Any]) -> str:
    latency = phase["latency"]
    if not latency["count"]:
        return "no answers"
    return "{} / {} / {}  ({} answers)".format(
        _ms(latency["p50"]), _ms(latency["p99"]), _ms(latency["max"]), latency["count"]
    )


def _durations(durations: dict[str, float] | None) -> str:
    if not durations:
        return "-"
    return ", ".join(
        "{} {}".format(name, _ms(seconds)) for name, seconds in durations.items()
    )


def _ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "-"
    return "{:.1f}x".format(value / floor)


def handoffSeconds(durations: dict[str, float] | None) -> float | None:
    """
    How long established connections were frozen: the report's
    I{connections}, I{freeze} (after a pre-copy) and I{commit} phases
    (capability transfer), or its I{suspension} (re-exec).  From the
    I{connections} phase on, the listeners do not accept: new connections
    wait too.
    """
    if not durations:
        return None
    if "connections" in durations:
        return (
            durations["connections"]
            + durations.get("freeze", 0.0)
            + durations.get("commit", 0.0)
        )
    # Re-exec reports how long the service was suspended instead.
    suspension: float | None = durations.get("suspension")
    return suspension


def _loadBlock(
    result: dict[str, Any], floors: dict[int, dict[str, Any]], out: list[str]
) -> None:
    report = result["report"]
    load = result["load"]
    requests = load["requests"]
    short = load["short"]
    clients = result["clients"]
    lost = sum(load["lost"].values())
    title = result["name"]
    if result["kind"] == "migration":
        title = "strategy {}".format(result["name"])
    out.append(
        "== {}: {} ({})".format(title, report["outcome"], report.get("reason") or "ok")
    )
    if clients.get("samePid"):
        where = "all in the same process, pid {}".format(report.get("oldPid"))
    else:
        where = "{} answered by the new process, {} by the old".format(
            clients["onNew"], clients["onOld"]
        )
    out.append(
        "  long-lived connections: {} kept ({}), {} lost{}; report: moved {}, "
        "draining {}, failed {}".format(
            clients["kept"],
            where,
            lost,
            " {}".format(load["lost"]) if load["lost"] else "",
            report.get("moved"),
            report.get("draining"),
            report.get("failed"),
        )
    )
    out.append(
        "  new connections: {} started, {} answered, {} refused, {} reset, {} timed out".format(
            short["started"],
            short["answered"],
            short["refused"],
            short["reset"],
            short["timedOut"],
        )
    )
    out.append(
        "  bytes: {} lost ({} lines), {} duplicated ({} lines); state errors {}; "
        "unanswered at the end {}".format(
            requests["lostBytes"],
            requests["lostLines"],
            requests["duplicatedBytes"],
            requests["duplicatedLines"],
            requests["stateErrors"],
            clients["unansweredAtEnd"],
        )
    )
    out.append(
        "  longest client stall: {}{}{}{}".format(
            _ms(result["stall"]),
            _sentWhen(result.get("stallAt")),
            (
                " (to its answer's arrival; {} as the load generator read it)".format(
                    _ms(result["readStall"])
                )
                if result.get("readStall") is not None
                else ""
            ),
            " (among answers; {} connections were lost)".format(lost) if lost else "",
        )
    )
    out.extend(_traced(result.get("trace")))
    for name in ("before", "during", "after"):
        phase = result["phases"][name]
        out.append("  latency p50/p99/max {:6}: {}".format(name, _latency(phase)))
    during = result["phases"]["during"]
    if "readLatency" in during:
        out.append(
            "  latency p50/p99/max during, as the load generator read the "
            "answers: {}".format(_latency({"latency": during["readLatency"]}))
        )
    wholeRun = result.get("wholeRunStall")
    if (
        wholeRun is not None
        and result["stall"] is not None
        and wholeRun > result["stall"]
    ):
        out.append(
            "  the whole run's longest wait: {}{} (not the migration's)".format(
                _ms(wholeRun), _sentWhen(result.get("wholeRunStallAt"))
            )
        )
    cpu = result.get("cpu") or {}
    if cpu.get("host") is not None:
        out.append(
            "  CPU per request answered before: host {}, load generator {}".format(
                _us(cpu["host"]), _us(cpu.get("generator"))
            )
        )
    out.append(
        "  new connections' connect+answer p99 before/during/after: {}".format(
            " / ".join(
                _ms(result["phases"][name]["shortLatency"]["p99"])
                for name in ("before", "during", "after")
            )
        )
    )
    out.append(
        "  migration {} by phase: {}".format(
            _ms(result["seconds"]), _durations(report.get("durations"))
        )
    )
    frozen = handoffSeconds(report.get("durations"))
    if frozen is not None:
        floor = floors.get(report.get("moved") or 0)
        out.append(
            "  connections frozen {} for {} moved; floor {} -> {}".format(
                _ms(frozen),
                report.get("moved"),
                _ms(floor["seconds"]) if floor else "-",
                _ratio(frozen, floor["seconds"] if floor else None),
            )
        )
    rss = result["rss"]
    out.append(
        "  RSS: old {} (before), new {}{}".format(
            _mb(rss["old"]),
            _mb(rss["new"]),
            (
                ""
                if rss.get("oldAfter") is None
                else ", old while draining {}".format(_mb(rss["oldAfter"]))
            ),
        )
    )


def _idleBlock(
    result: dict[str, Any], floors: dict[int, dict[str, Any]], out: list[str]
) -> None:
    report = result["report"]
    durations = report.get("durations") or {}
    out.append(
        "== {} idle connections moved with {}: {} ({})".format(
            result["count"],
            result["strategy"],
            report["outcome"],
            report.get("reason") or "ok",
        )
    )
    out.append(
        "  report: moved {}, draining {}, failed {}; afterwards {} of {} answered, {} by "
        "the new process; lost {}, state errors {}".format(
            report.get("moved"),
            report.get("draining"),
            report.get("failed"),
            result["answeredAfter"],
            result["connected"],
            result["onNew"],
            sum(result["load"]["lost"].values()),
            result["load"]["requests"]["stateErrors"],
        )
    )
    out.append(
        "  migration {} by phase: {}".format(
            _ms(result["seconds"]), _durations(durations)
        )
    )
    floor = floors.get(result["count"])
    frozen = handoffSeconds(durations)
    out.append(
        "  connections frozen {} (aim <= 100 ms); floor {} ({:.0f} connections/s) -> {} "
        "(aim <= 4x)".format(
            _ms(frozen),
            _ms(floor["seconds"]) if floor else "-",
            floor["perSecond"] if floor else 0,
            _ratio(frozen, floor["seconds"] if floor else None),
        )
    )
    rss = result["rss"]
    out.append(
        "  RSS: empty host {}, host that accepted them itself {}, successor that "
        "adopted them {} ({})".format(
            _mb(rss["empty"]),
            _mb(rss["old"]),
            _mb(rss["new"]),
            _ratio(rss["new"], rss["old"]),
        )
    )


def _stallFloor(stall: dict[str, Any], count: int) -> dict[str, Any] | None:
    """
    The descriptor floor measured for C{count} idle connections and the
    probes.
    """
    floors: list[dict[str, Any]] = stall.get("floors", [])
    for floor in floors:
        if int(floor["count"]) == count + stall["probes"]:
            return floor
    return None


def _answered(row: dict[str, Any]) -> str:
    after = row["idleAfter"]
    return "{}/{}".format(after["answered"], row["idle"])


def _answeredBy(row: dict[str, Any]) -> str:
    after = row["idleAfter"]
    servers = after["servers"]
    if row["newPid"] == row["oldPid"]:
        same = servers.get(str(row["newPid"]), 0)
        others = after["answered"] - same
        return "same pid {}{}".format(
            same, ", other {}".format(others) if others else ""
        )
    old = servers.get(str(row["oldPid"]), 0)
    return "new {}{}".format(after["onNew"], ", old {}".format(old) if old else "")


def formatStall(stall: dict[str, Any]) -> list[str]:
    """
    The stall scenario's lines: one table per connection count, then each
    upgrade's phases as its report gives them.
    """
    out: list[str] = []
    if not stall["rows"]:
        return [
            "== stall: not measured (none of {} pauses connections)".format(
                ", ".join(stall.get("measuredFrom") or ["the strategies asked for"])
            )
        ]
    probes = stall["probes"]
    startFloor = stall.get("startFloor")
    columns = "  {:<11} {:>8} {:>9} {:>8} {:>8} {:>6} {:>13} {:>8} {:>13}  {}"
    for count in stall["counts"]:
        rows = [r for r in stall["rows"] if r["count"] == count]
        if not rows:
            continue
        floor = _stallFloor(stall, count)
        out.append(
            "== stall: {:,} idle connections + {} probes (a line every {} each); "
            "floor: {:,} descriptors by send_fds {}{}".format(
                count,
                probes,
                _ms(stall["probeInterval"]),
                count + probes,
                _ms(floor["seconds"]) if floor else "not measured",
                (
                    "; re-exec floor (interpreter + twistd + reactor) {}".format(
                        _ms(startFloor)
                    )
                    if startFloor is not None and "reexec" in stall["strategies"]
                    else ""
                ),
            )
        )
        out.append(
            columns.format(
                "strategy",
                "longest",
                "p99 upgr",
                "before",
                "x floor",
                "lost",
                "answered",
                "state",
                "answered by",
                "outcome",
            )
        )
        phases = []
        for row in rows:
            if row.get("error"):
                out.append("  {:<11} FAILED: {}".format(row["strategy"], row["error"]))
                continue
            report = row["report"]
            lost = (
                row["idleLost"]
                + row["probeLost"]["connections"]
                + row["probeLost"]["lines"]
            )
            out.append(
                columns.format(
                    row["strategy"],
                    _ms(row["stall"]),
                    _ms(row["during"]["p99"]),
                    _ms(row["before"]["max"]),
                    _ratio(row["stall"], floor["seconds"] if floor else None),
                    lost,
                    _answered(row),
                    "{}/{}".format(row["idleAfter"]["stateIntact"], row["idle"]),
                    _answeredBy(row),
                    "{}{}".format(
                        report.get("outcome"),
                        (
                            " ({})".format(report["reason"])
                            if report.get("reason")
                            else ""
                        ),
                    ),
                )
            )
            extra = ""
            if row["strategy"] == "reexec" and startFloor is not None:
                extra = "; stall minus the re-exec floor {}".format(
                    _ms(row["stall"] - startFloor) if row["stall"] is not None else "-"
                )
            if row.get("stallAt") is not None:
                extra += "; longest wait began {} after the command".format(
                    _ms(row["stallAt"])
                )
            phases.append(
                "  {} phases: {} (command {}){}".format(
                    row["strategy"],
                    _durations(report.get("durations")),
                    _ms(row["seconds"]),
                    extra,
                )
            )
            phases.extend(_traced(row.get("trace"), "  {} ".format(row["strategy"])))
        out.extend(phases)
    if stall["rows"]:
        out.append(
            "  longest: the probes' longest wait from the upgrade command until "
            "0.5 s after it returned; p99 upgr: their p99 while it ran; before: "
            "their longest wait in the 0.5 s before; lost: connections and lines "
            "lost; answered, state: idle connections answering afterwards, and "
            "with their count gone on"
        )
    return out


def formatResults(results: dict[str, Any]) -> str:
    """
    The human-readable report of a whole run.
    """
    floors = {int(f["count"]): f for f in results.get("floors", [])}
    out: list[str] = []
    machine = results.get("machine", {})
    out.append(
        "migrate benchmark: {} CPUs, Python {}, Twisted {}, RLIMIT_NOFILE {}, load "
        "average {} at start, {} at end{}".format(
            machine.get("cpus"),
            machine.get("python"),
            machine.get("twisted"),
            machine.get("nofile"),
            (machine.get("loadAverageAtStart") or ["?"])[0],
            (machine.get("loadAverageAtEnd") or ["?"])[0],
            " (quick)" if results.get("options", {}).get("quick") else "",
        )
    )
    for note in results.get("skipped", []):
        out.append("skipped: " + note)
    for result in results.get("scenarios", []):
        if result.get("error"):
            out.append("== {}: FAILED: {}".format(result["name"], result["error"]))
        elif result["kind"] == "idle":
            _idleBlock(result, floors, out)
        else:
            _loadBlock(result, floors, out)
    if results.get("stall"):
        out.extend(formatStall(results["stall"]))
    for floor in results.get("floors", []):
        out.append(
            "== floor: {} descriptors by send_fds in batches of 253 + socket objects: "
            "{} ({:.0f}/s)".format(
                floor["count"], _ms(floor["seconds"]), floor["perSecond"]
            )
        )
    return "\n".join(out)


def keyFigures(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """
    The figures worth comparing between runs, by scenario name.
    """
    figures: dict[str, dict[str, float | None]] = {}
    for result in results.get("scenarios", []):
        if result.get("error"):
            continue
        durations = result["report"].get("durations") or {}
        entry: dict[str, float | None] = {
            "migration s": result.get("seconds"),
            "frozen s": handoffSeconds(durations),
        }
        if result["kind"] == "idle":
            entry["successor RSS MB"] = (result["rss"]["new"] or 0) / 1e6
        else:
            load = result["load"]
            entry["stall s"] = result.get("stall")
            entry["p99 during s"] = result["phases"]["during"]["latency"]["p99"]
            entry["p99 after s"] = result["phases"]["after"]["latency"]["p99"]
            entry["lost connections"] = sum(load["lost"].values())
            entry["failed new connections"] = (
                load["short"]["refused"]
                + load["short"]["reset"]
                + load["short"]["timedOut"]
            )
            entry["lost bytes"] = load["requests"]["lostBytes"]
        figures[result["name"]] = entry
    for floor in results.get("floors", []):
        figures["floor-{}".format(floor["count"])] = {"seconds": floor["seconds"]}
    stall = results.get("stall") or {}
    for row in stall.get("rows", []):
        if row.get("error"):
            continue
        figures["stall-{}-{}".format(row["strategy"], row["count"])] = {
            "longest s": row["stall"],
            "p99 during s": row["during"]["p99"],
        }
    for floor in stall.get("floors", []):
        figures["stall-floor-{}".format(floor["count"])] = {"seconds": floor["seconds"]}
    if stall.get("startFloor") is not None:
        figures["stall-reexec-floor"] = {"seconds": stall["startFloor"]}
    return figures


def formatComparison(old: dict[str, Any], new: dict[str, Any]) -> str:
    """
    The key figures of C{new} next to those of an earlier run C{old}.
    """
    before, after = keyFigures(old), keyFigures(new)
    out = ["== compared with the earlier run"]
    for name in after:
        if name not in before:
            out.append("  {}: not in the earlier run".format(name))
            continue
        for figure, value in after[name].items():
            was = before[name].get(figure)
            if value is None or was is None:
                continue
            change = ""
            if was:
                change = " ({:+.0f}%)".format((value - was) / was * 100)
            out.append(
                "  {} {}: {:.4g} -> {:.4g}{}".format(name, figure, was, value, change)
            )
    return "\n".join(out)


def write(stream: IO[str], text: str) -> None:
    """
    Print C{text} and flush.
    """
    stream.write(text + "\n")
    stream.flush()
