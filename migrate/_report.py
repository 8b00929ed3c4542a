"""
What a migration reports when it ends: the outcome, why, and what happened
to every listener and connection.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterable

from attrs import field, frozen

__all__ = ["ListenerReport", "MigrationOutcome", "MigrationReport", "MigrationPhase"]


class MigrationOutcome(Enum):
    """
    How a migration ended.

    @cvar success: the new code serves.
    @cvar rolledBack: something failed; the old code still serves everything.
    @cvar refused: the migration was not attempted (a check failed first).
    """

    success = "success"
    rolledBack = "rolled-back"
    refused = "refused"


class MigrationPhase(Enum):
    """
    The phases of a migration as the serving host sees them.
    """

    idle = "idle"
    spawning = "spawning"
    handingOff = "handing-off"
    committing = "committing"
    rollingBack = "rolling-back"


@frozen
class ListenerReport:
    """
    What happened to one listener's connections.

    @ivar key: the listener's endpoint description, as given to C{--listen}.
    @ivar moved: connections now served by the new code.
    @ivar drained: connections left to finish on the old code.
    @ivar failed: connections that could not be kept (closed cleanly).
    """

    key: str
    moved: int = 0
    drained: int = 0
    failed: int = 0

    def toJSON(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "moved": self.moved,
            "drained": self.drained,
            "failed": self.failed,
        }


def _listenerReports(reports: Iterable[ListenerReport]) -> tuple[ListenerReport, ...]:
    return tuple(reports)


def _lines(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(lines)


@frozen
class MigrationReport:
    """
    The outcome of one migration, as shown to operators.

    @ivar strategy: the strategy's name.
    @ivar outcome: how it ended.
    @ivar reason: why it did not succeed (L{None} on success).
    @ivar fromGeneration: the generation that served before.
    @ivar toGeneration: the generation that serves now, if it changed.
    @ivar oldPid: the process that served before.
    @ivar newPid: the process that serves now, if another one.
    @ivar listeners: per-listener connection counts.
    @ivar durations: seconds spent in each phase, by phase name.
    @ivar successorLog: the successor's last log lines, on failure.
    @ivar notes: anything else an operator should read.
    """

    strategy: str
    outcome: MigrationOutcome
    fromGeneration: int
    oldPid: int
    reason: str | None = None
    toGeneration: int | None = None
    newPid: int | None = None
    listeners: tuple[ListenerReport, ...] = field(
        default=(), converter=_listenerReports
    )
    durations: dict[str, float] = field(factory=dict)
    successorLog: tuple[str, ...] = field(default=(), converter=_lines)
    notes: tuple[str, ...] = field(default=(), converter=_lines)

    @property
    def succeeded(self) -> bool:
        """
        Whether the new code serves.
        """
        return self.outcome is MigrationOutcome.success

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> "MigrationReport":
        """
        Read a report written by L{toJSON} (in another process).

        @raise ValueError: if C{data} is not such a report.
        """
        try:
            return cls(
                strategy=str(data["strategy"]),
                outcome=MigrationOutcome(data["outcome"]),
                fromGeneration=int(data["fromGeneration"]),
                oldPid=int(data["oldPid"]),
                reason=None if data.get("reason") is None else str(data["reason"]),
                toGeneration=(
                    None
                    if data.get("toGeneration") is None
                    else int(data["toGeneration"])
                ),
                newPid=None if data.get("newPid") is None else int(data["newPid"]),
                listeners=[
                    ListenerReport(
                        str(each["key"]),
                        moved=int(each["moved"]),
                        drained=int(each["drained"]),
                        failed=int(each["failed"]),
                    )
                    for each in data.get("listeners", [])
                ],
                durations={
                    str(name): float(seconds)
                    for name, seconds in dict(data.get("durations", {})).items()
                },
                successorLog=[str(line) for line in data.get("successorLog", [])],
                notes=[str(note) for note in data.get("notes", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError("not a migration report: {}".format(e))

    def toJSON(self) -> dict[str, Any]:
        """
        Describe this report as JSON-compatible data (the form the control
        channel and C{--json} use).
        """
        return {
            "strategy": self.strategy,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "fromGeneration": self.fromGeneration,
            "toGeneration": self.toGeneration,
            "oldPid": self.oldPid,
            "newPid": self.newPid,
            "listeners": [each.toJSON() for each in self.listeners],
            "moved": sum(each.moved for each in self.listeners),
            "draining": sum(each.drained for each in self.listeners),
            "failed": sum(each.failed for each in self.listeners),
            "durations": {
                name: round(seconds, 6) for name, seconds in self.durations.items()
            },
            "successorLog": list(self.successorLog),
            "notes": list(self.notes),
        }
