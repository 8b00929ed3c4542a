# -*- test-case-name: migrate.test.test_stopping -*-
"""
C{python -m migrate stop}: stop every generation of a host politely, within
a drain deadline.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from ._client import (
    EXIT_FAILED,
    EXIT_OK,
    CannotConnect,
    CommandFailed,
    HostClosedConnection,
    Session,
    secondsOption,
)
from ._commands import MigrationInProgress

__all__ = ["StopOptions", "formatStop", "stopCommand"]


_drainSeconds = secondsOption("--drain-timeout", doc="A positive number of seconds.")
_timeoutSeconds = secondsOption("--timeout", doc="A positive number of seconds.")


class StopOptions(usage.Options):
    synopsis = "[--control PATH] [--drain-timeout SECONDS] [--json] [--timeout SECONDS]"
    longdesc = (
        "Stop the running host and every older generation still draining: "
        "no new connections, the remaining ones get --drain-timeout seconds "
        "to finish, then they are closed cleanly and every process exits."
    )
    optFlags: list[list[Any]] = [
        ["json", None, "Print one JSON object on the last line of standard output."],
    ]
    optParameters: list[list[Any]] = [
        ["control", "c", "./migrate-host.sock", "The host's control socket."],
        [
            "drain-timeout",
            "d",
            None,
            "Seconds every generation may drain before what is left is "
            "closed (default: the host's --drain-timeout, or 30)",
            _drainSeconds,
        ],
        [
            "timeout",
            "t",
            None,
            "Give up waiting after this many seconds (default: the drain "
            "deadline plus 60)",
            _timeoutSeconds,
        ],
    ]

    def parseArgs(self) -> None:
        """
        No positional arguments.
        """


def formatStop(result: dict[str, Any]) -> str:
    """
    Say how the stop went, for people.
    """
    stopped = result.get("stopped") or []
    line = "Stopped generation {} (pid {}) and every older generation in {} s".format(
        result.get("generation", "?"),
        result.get("pid", "?"),
        result.get("seconds", "?"),
    )
    if result.get("closedAtDeadline"):
        line += "; connections left at the drain deadline were closed cleanly"
        if stopped:
            line += " (draining processes stopped: {})".format(
                ", ".join(str(each) for each in stopped)
            )
    return line + "."


async def stopCommand(session: Session, options: StopOptions) -> int:
    """
    Run C{stop}: ask the serving process, wait for every generation to end.
    """
    drain = options["drain-timeout"]
    timeout = options["timeout"] or (drain or 30.0) + 60.0
    deadline = session.reactor.seconds() + timeout
    client = await session.open(deadline)
    try:
        result = await session.within(
            client.stop(drain), deadline, "waiting for every generation to end"
        )
    except HostClosedConnection:
        # The host went before its answer did: gone is what was asked.
        try:
            other = await session.open(session.reactor.seconds() + 5.0)
        except CannotConnect:
            result = {"stopped": [], "seconds": None}
        else:
            other.disconnect()
            raise CommandFailed(
                EXIT_FAILED, "the host closed the connection but still answers"
            ) from None
    except MigrationInProgress as e:
        raise CommandFailed(EXIT_FAILED, str(e)) from None
    finally:
        client.disconnect()
    session.out.result(result, formatStop(result))
    return EXIT_OK
