# -*- test-case-name: migrate.test.test_cli -*-
"""
Readable text for what the control channel answers: a host's status and a
migration's report (the JSON of L{migrate._control._commands.Status} and
L{migrate._control._commands.Upgrade}), for the C{python -m migrate}
commands and the rolling upgrade's report.

Every function takes the JSON as the host sent it and copes with missing or
mistyped fields (shown as C{?}).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "countOf",
    "dictsIn",
    "formatReport",
    "formatStatus",
    "reportSummary",
    "textOf",
]

_LOG_LINES_SHOWN = 20


def textOf(value: object) -> str:
    """
    C{value} as text; C{?} for a field the host did not send.
    """
    return "?" if value is None else str(value)


def countOf(value: object, noun: str) -> str:
    """
    C{"1 connection"}, C{"3 connections"}, or C{"? connections"} when
    C{value} is not a number.
    """
    if isinstance(value, int):
        return "{} {}{}".format(value, noun, "" if value == 1 else "s")
    return "? {}s".format(noun)


def dictsIn(value: object) -> list[dict[str, Any]]:
    """
    The JSON objects of the list C{value} (nothing if it is not a list).
    """
    if not isinstance(value, list):
        return []
    return [each for each in value if isinstance(each, dict)]


def _failed(report: dict[str, Any]) -> bool:
    """
    Whether Report JSON says the old generation still serves.
    """
    return report.get("outcome") in ("rolled-back", "refused")


def reportSummary(report: dict[str, Any]) -> str:
    """
    One line about Report JSON: outcome, strategy, generations and pids; the
    process that serves now is named, or said to be the same one.
    """
    head = "{} with strategy {}".format(
        textOf(report.get("outcome")), textOf(report.get("strategy"))
    )
    oldPid, newPid = report.get("oldPid"), report.get("newPid")
    if _failed(report):
        return "{}: generation {} (pid {}) still serves; no new generation".format(
            head, textOf(report.get("fromGeneration")), textOf(oldPid)
        )
    if newPid is not None and newPid == oldPid:
        pids = "pid {}, the same process".format(oldPid)
    else:
        pids = "pid {} -> {}".format(textOf(oldPid), textOf(newPid))
    fromGeneration = textOf(report.get("fromGeneration"))
    toGeneration = report.get("toGeneration")
    if report.get("outcome") == "success" and toGeneration is None:
        # Nothing to do (a reload with no module changed): no new generation.
        return "{}, generation {} unchanged ({})".format(head, fromGeneration, pids)
    return "{}, generation {} -> {} ({})".format(
        head, fromGeneration, textOf(toGeneration), pids
    )


def formatStatus(status: dict[str, Any]) -> str:
    """
    A readable multi-line description of Status JSON.
    """
    lines = [
        "Host pid {}, generation {}, strategy {}, phase {}".format(
            textOf(status.get("pid")),
            textOf(status.get("generation")),
            textOf(status.get("strategy")),
            textOf(status.get("phase")),
        ),
        "Connections: {}".format(textOf(status.get("connections"))),
    ]
    listeners = dictsIn(status.get("listeners"))
    lines.append("Listeners:" if listeners else "Listeners: none")
    for each in listeners:
        lines.append(
            "  {} on {}: {}".format(
                textOf(each.get("key")),
                textOf(each.get("address")),
                countOf(each.get("connections"), "connection"),
            )
        )
    draining = dictsIn(status.get("draining"))
    limit = status.get("maxDraining")
    bound = " (at most {} at once)".format(limit) if isinstance(limit, int) else ""
    lines.append(("Draining:" if draining else "Draining: none") + bound)
    for each in draining:
        lines.append(
            "  generation {} (pid {}): {} left{}".format(
                textOf(each.get("generation")),
                textOf(each.get("pid")),
                countOf(each.get("connections"), "connection"),
                ", closing them to make room" if each.get("closing") is True else "",
            )
        )
    keeper = status.get("keeper")
    if isinstance(keeper, dict):
        lines.append(
            "Keeper: {} ({}: {})".format(
                "none" if keeper.get("pid") is None else "pid {}".format(keeper["pid"]),
                textOf(keeper.get("mode")),
                textOf(keeper.get("why")),
            )
        )
        if keeper.get("problem"):
            lines.append("  {}".format(keeper["problem"]))
    last = status.get("lastReport")
    if isinstance(last, dict):
        lines.append("Last migration: " + reportSummary(last))
        if last.get("reason"):
            lines.append("  reason: {}".format(last["reason"]))
    else:
        lines.append("Last migration: none")
    if status.get("truncated"):
        lines.append("(the host shortened this status to fit; use --json)")
    return "\n".join(lines)


def formatReport(report: dict[str, Any]) -> str:
    """
    A readable multi-line description of Report JSON.
    """
    counts = [report.get(key) for key in ("moved", "draining", "failed")]
    unchanged = _failed(report) and counts == [0, 0, 0]
    if unchanged:
        # Nothing moved, nothing was closed: saying "0 failed" would hide
        # that every connection is still served, as before.
        connections = "Connections: none moved; the old code serves them all, as before"
    else:
        # "draining": connections left on the old code, which serves them
        # until they leave; not yet drained.
        connections = "Connections: {} moved, {} draining, {} failed".format(
            *(textOf(count) for count in counts)
        )
    lines = ["Migration " + reportSummary(report), connections]
    if report.get("reason"):
        lines.append("Reason: {}".format(report["reason"]))
    listeners = [] if unchanged else dictsIn(report.get("listeners"))
    if listeners:
        lines.append("Listeners:")
    for each in listeners:
        lines.append(
            "  {}: {} moved, {} draining, {} failed".format(
                textOf(each.get("key")),
                textOf(each.get("moved")),
                textOf(each.get("drained")),
                textOf(each.get("failed")),
            )
        )
    durations = report.get("durations")
    if isinstance(durations, dict) and durations:
        parts = []
        for phase, seconds in durations.items():
            if isinstance(seconds, (int, float)):
                parts.append("{} {:.3f}s".format(phase, seconds))
            else:
                parts.append("{} {}".format(phase, textOf(seconds)))
        lines.append("Durations: " + ", ".join(parts))
    notes = report.get("notes")
    if isinstance(notes, list) and notes:
        lines.append("Notes:")
        lines.extend("  - {}".format(note) for note in notes)
    log = report.get("successorLog")
    if isinstance(log, list) and log:
        shown = log[-_LOG_LINES_SHOWN:]
        if len(shown) < len(log):
            lines.append(
                "Successor log (last {} of {} lines; --json has all):".format(
                    len(shown), len(log)
                )
            )
        else:
            lines.append("Successor log:")
        lines.extend("  | {}".format(line) for line in shown)
    return "\n".join(lines)
