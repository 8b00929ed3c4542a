# -*- test-case-name: migrate.test.test_rolling -*-
"""
What a rolling upgrade reports: where each server ended (L{ServerPhase},
L{ServerReport}), how the roll ended (L{RollOutcome}, L{RollReport}), as
JSON for C{--json} and as text for the operator (L{formatRollReport}).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from attrs import field, frozen

from .._control._format import countOf

__all__ = [
    "RollOutcome",
    "RollReport",
    "ServerPhase",
    "ServerReport",
    "formatRollReport",
]


class ServerPhase(Enum):
    """
    Where one server is in the roll.

    @cvar pending: not touched (yet).
    @cvar draining: drained in HAProxy; waiting for its sessions to end.
    @cvar upgrading: its upgrade runs.
    @cvar checking: upgraded; waiting for HAProxy's health check to report
        it up.
    @cvar done: upgraded and back in rotation.
    @cvar failed: did not come back; left in maintenance (if HAProxy could
        be told so).
    """

    pending = "pending"
    draining = "draining"
    upgrading = "upgrading"
    checking = "checking"
    done = "done"
    failed = "failed"


class RollOutcome(Enum):
    """
    How a rolling upgrade ended.

    @cvar success: every server was upgraded and is back in rotation.
    @cvar stopped: a server did not come back; the roll stopped there.
    @cvar refused: a check failed before anything was drained.
    """

    success = "success"
    stopped = "stopped"
    refused = "refused"


@frozen
class ServerReport:
    """
    What happened to one server.

    @ivar name: the server's name in the backend.
    @ivar method: C{"migrate-host"} or C{"restart-command"}.
    @ivar target: its control socket or restart command.
    @ivar phase: where it ended (L{ServerPhase.done}, L{ServerPhase.failed}
        or L{ServerPhase.pending} for untouched).
    @ivar reason: why it failed.
    @ivar sessionsAtDrain: its sessions when it was drained.
    @ivar sessionsLeft: its sessions when the upgrade started (more than 0
        when the drain timeout passed).
    @ivar summary: one line about its upgrade.
    @ivar durations: seconds per phase.
    @ivar report: the migrate host's report, if any.
    @ivar output: the restart command's last lines, if any.
    """

    name: str
    method: str
    target: str
    phase: ServerPhase = ServerPhase.pending
    reason: str | None = None
    sessionsAtDrain: int | None = None
    sessionsLeft: int | None = None
    summary: str | None = None
    durations: dict[str, float] = field(factory=dict)
    report: dict[str, Any] | None = None
    output: tuple[str, ...] = ()

    def toJSON(self) -> dict[str, Any]:
        """
        JSON-compatible data.
        """
        return {
            "name": self.name,
            "method": self.method,
            "target": self.target,
            "state": (
                "untouched" if self.phase is ServerPhase.pending else self.phase.value
            ),
            "reason": self.reason,
            "sessionsAtDrain": self.sessionsAtDrain,
            "sessionsLeft": self.sessionsLeft,
            "summary": self.summary,
            "durations": {name: round(s, 6) for name, s in self.durations.items()},
            "report": self.report,
            "output": list(self.output),
        }


@frozen
class RollReport:
    """
    The outcome of a rolling upgrade.

    @ivar backend: the HAProxy backend.
    @ivar outcome: how it ended.
    @ivar reason: why it did not succeed.
    @ivar servers: one report per server, in the backend's order.
    @ivar maxUnavailable: how many servers could be out of rotation at once.
    @ivar durations: seconds spent validating, rolling, in total.
    """

    backend: str
    outcome: RollOutcome
    reason: str | None = None
    servers: tuple[ServerReport, ...] = ()
    maxUnavailable: int = 1
    durations: dict[str, float] = field(factory=dict)

    @property
    def succeeded(self) -> bool:
        """
        Whether every server was upgraded and is back in rotation.
        """
        return self.outcome is RollOutcome.success

    def toJSON(self) -> dict[str, Any]:
        """
        JSON-compatible data (the form C{--json} prints).
        """
        return {
            "backend": self.backend,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "maxUnavailable": self.maxUnavailable,
            "upgraded": sum(1 for s in self.servers if s.phase is ServerPhase.done),
            "servers": [each.toJSON() for each in self.servers],
            "durations": {name: round(s, 6) for name, s in self.durations.items()},
        }


def formatRollReport(report: RollReport) -> str:
    """
    A readable multi-line description of a L{RollReport}.
    """
    done = sum(1 for s in report.servers if s.phase is ServerPhase.done)
    head = "Rolling upgrade of backend {}: {}, {} of {} servers upgraded".format(
        report.backend, report.outcome.value, done, len(report.servers)
    )
    total = report.durations.get("total")
    if total is not None:
        head += " in {:.1f} s".format(total)
    lines = [head]
    if report.reason:
        lines.append("Reason: {}".format(report.reason))
    width = max([len(s.name) for s in report.servers] + [1])
    for server in report.servers:
        name = server.name.ljust(width)
        if server.phase is ServerPhase.done:
            timing = ", ".join(
                "{} {:.1f} s".format(phase, seconds)
                for phase, seconds in server.durations.items()
            )
            lines.append(
                "  {}  upgraded   {}{}".format(
                    name, server.summary or "", "; " + timing if timing else ""
                )
            )
            if server.sessionsLeft:
                lines.append(
                    "  {}             {} still open when the drain timeout "
                    "passed".format(
                        " " * width, countOf(server.sessionsLeft, "session")
                    )
                )
        elif server.phase is ServerPhase.failed:
            lines.append("  {}  FAILED     {}".format(name, server.reason))
            for each in server.output[-5:]:
                lines.append("  {}             | {}".format(" " * width, each))
            log = (server.report or {}).get("successorLog")
            if isinstance(log, list):
                for each in log[-5:]:
                    lines.append("  {}             | {}".format(" " * width, each))
        elif server.phase is ServerPhase.pending:
            lines.append("  {}  untouched".format(name))
        else:
            lines.append("  {}  {}".format(name, server.phase.value))
    return "\n".join(lines)
