# -*- test-case-name: migrate.test.test_rolling -*-
"""
The command line of the rolling upgrade: C{python -m migrate rolling}'s
options (L{RollingOptions}) and the command itself (L{rollingCommand}),
which builds the upgraders and the L{RollingUpgrade}, runs the roll and
prints its report.

L{migrate._cli} imports this module only when the C{rolling} command is
asked for, so that a host never loads the rolling code.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python import usage

from .._cli import VersionOption
from .._control._client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    CommandFailed,
    Connector,
    Output,
    connectControl,
    secondsOption,
)
from ._haproxy import HAProxyClient, HAProxyUnreachable, RuntimeAPI, UnixRuntimeAPI
from ._orchestrator import RollingUpgrade
from ._report import formatRollReport
from ._upgraders import (
    IServerUpgrader,
    MigrateHostUpgrader,
    RestartCommandUpgrader,
    RollRefused,
    runShellCommand,
)

__all__ = ["RollingOptions", "rollingCommand"]


def _seconds(name: str, allowZero: bool) -> Callable[[str], float]:
    return secondsOption(name, allowZero=allowZero, doc="Seconds.")


def _atLeastOne(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(
            "--max-unavailable needs a whole number of at least 1, not "
            "{!r}".format(value)
        )
    return number


_atLeastOne.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


class RollingOptions(VersionOption, usage.Options):
    """
    C{python -m migrate rolling}.
    """

    synopsis = (
        "--haproxy SOCKET --backend NAME [--control SERVER=PATH ...] "
        "[--restart-command SERVER=COMMAND ...] [options]"
    )
    longdesc = (
        "Upgrade every server of an HAProxy backend in turn: drain it, wait "
        "for its sessions to end, upgrade it (through its migrate host's "
        "control socket, or with a restart command), wait until HAProxy's "
        "health check reports it up, put it back in rotation.  A server that "
        "does not come back stops the roll and is left in maintenance."
    )
    optFlags: list[list[Any]] = [
        ["json", None, "Print one JSON object on the last line of standard output."],
    ]
    optParameters: list[list[Any]] = [
        ["haproxy", None, None, "HAProxy's stats socket ('level admin')."],
        ["backend", None, None, "The backend whose servers are upgraded."],
        [
            "strategy",
            "s",
            None,
            "The strategy migrate hosts use (default: each host's own).",
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "Upgrade a drained server after this many seconds even if "
            "sessions remain.",
            _seconds("--drain-timeout", True),
        ],
        [
            "ready-timeout",
            None,
            30.0,
            "Seconds an upgraded server has to be reported up by HAProxy.",
            _seconds("--ready-timeout", False),
        ],
        [
            "upgrade-timeout",
            None,
            120.0,
            "Seconds one server's upgrade may take.",
            _seconds("--upgrade-timeout", False),
        ],
        [
            "max-unavailable",
            None,
            1,
            "Servers out of rotation at once.",
            _atLeastOne,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["control"] = {}
        self["restart-command"] = {}

    def _mapping(self, option: str, value: str) -> None:
        server, sep, target = value.partition("=")
        server, target = server.strip(), target.strip()
        if not sep or not server or not target:
            raise usage.UsageError(
                "--{} needs SERVER=VALUE, not {!r}".format(option, value)
            )
        if server in self["control"] or server in self["restart-command"]:
            raise usage.UsageError(
                "server {} is given more than one --control or "
                "--restart-command".format(server)
            )
        self[option][server] = target

    def opt_control(self, value: str) -> None:
        """
        SERVER=PATH: the control socket of the migrate host SERVER (repeat).
        """
        self._mapping("control", value)

    def opt_restart_command(self, value: str) -> None:
        """
        SERVER=COMMAND: restarts SERVER, not a migrate host, on new code.
        """
        self._mapping("restart-command", value)

    def parseArgs(self) -> None:
        """
        No positional arguments.
        """

    def postOptions(self) -> None:
        for name in ("haproxy", "backend"):
            if not self[name]:
                raise usage.UsageError("--{} is required".format(name))
        if not self["control"] and not self["restart-command"]:
            raise usage.UsageError(
                "give --control SERVER=PATH or --restart-command SERVER=COMMAND "
                "for each server of the backend"
            )
        if self["strategy"] is not None and not self["strategy"].strip():
            raise usage.UsageError("--strategy needs a name")


async def rollingCommand(
    reactor: Any,
    options: RollingOptions,
    out: Output,
    connect: Connector = connectControl,
    *,
    runtimeAPI: Callable[[Any, str], RuntimeAPI] = UnixRuntimeAPI,
    runCommand: Callable[
        [Any, str, float], Deferred[tuple[int, str]]
    ] = runShellCommand,
) -> int:
    """
    Run C{python -m migrate rolling}: validate, roll, print the report.

    @raise CommandFailed: with the exit status and the message to print.
    """
    upgraders: dict[str, IServerUpgrader] = {}
    for server, path in options["control"].items():
        upgraders[server] = MigrateHostUpgrader(
            reactor,
            path,
            strategy=options["strategy"],
            timeout=options["upgrade-timeout"],
            connect=connect,
        )
    for server, command in options["restart-command"].items():
        upgraders[server] = RestartCommandUpgrader(
            command, options["upgrade-timeout"], partial(runCommand, reactor)
        )
    rolling = RollingUpgrade(
        HAProxyClient(runtimeAPI(reactor, options["haproxy"])),
        options["backend"],
        upgraders,
        reactor,
        drainTimeout=options["drain-timeout"],
        readyTimeout=options["ready-timeout"],
        maxUnavailable=options["max-unavailable"],
        progress=out.progress,
    )
    try:
        plan = await rolling.validate()
    except HAProxyUnreachable as e:
        raise CommandFailed(EXIT_UNREACHABLE, str(e)) from None
    except RollRefused as e:
        raise CommandFailed(EXIT_FAILED, "nothing was drained: {}".format(e)) from None
    report = await rolling.roll(plan)
    out.result(report.toJSON(), formatRollReport(report))
    if not report.succeeded:
        raise CommandFailed(
            EXIT_FAILED, "rolling upgrade stopped: {}".format(report.reason)
        )
    return EXIT_OK
