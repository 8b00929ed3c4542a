# -*- test-case-name: migrate.test.test_cli -*-
"""
The command line: C{python -m migrate status}, C{python -m migrate upgrade}
and C{python -m migrate rolling}.

The commands are coroutines over the control client shared with the rolling
upgrade (L{migrate._control._client}): its L{ControlClient
<migrate._control._client.ControlClient>} seam lets tests drive them with a
fake connection layer; L{connectControl} is the real one (AMP over the
host's Unix control socket).  The C{rolling} command's code is imported only
when it runs (L{migrate._rolling._command}), so that a host, which imports
this module's neighbours, never loads it.

Exit status (the values are in L{migrate._control._client}): C{EXIT_OK} (0)
when the host answered (status) or the migration succeeded (upgrade);
C{EXIT_FAILED} (1) for a rolled-back or refused migration or an error the
host reported; C{EXIT_USAGE} (2) for bad arguments; C{EXIT_UNREACHABLE} (3)
when the host cannot be reached; C{EXIT_TIMEOUT} (4) when C{--timeout} runs
out.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Callable, Coroutine, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater, react
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from ._control._client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    BadReply,
    CannotConnect,
    CommandFailed,
    Connector,
    HostClosedConnection,
    Output,
    Session,
    connectControl,
    secondsOption,
)
from ._control._commands import MigrationInProgress, UnknownStrategy
from ._control._format import countOf, dictsIn, formatReport, formatStatus, textOf
from .strategies import strategyNames

__all__ = [
    "DEFAULT_CONTROL",
    "MigrateOptions",
    "VersionOption",
    "StatusOptions",
    "UpgradeOptions",
    "main",
    "migrateVersion",
    "run",
]

DEFAULT_CONTROL = "./migrate-host.sock"


# Options


_positiveSeconds = secondsOption("--timeout", doc="A positive number of seconds.")


def _overrideSeconds(option: str) -> Callable[[str], float]:
    """
    The coercer of an C{upgrade} option overriding a host setting in
    seconds.
    """
    return secondsOption(option, doc=None)


#: upgrade options that override a host setting for one migration, with
#: the Upgrade command's argument for each
_OVERRIDES = {"ready-timeout": "readyTimeout", "drain-timeout": "drainTimeout"}

_TYPE_ENFORCEMENT = "Parameter type enforcement failed: "


def migrateVersion() -> str:
    """
    The version of the installed migrate distribution, whatever it is named.
    """
    from importlib.metadata import (
        PackageNotFoundError,
        packages_distributions,
        version,
    )

    for name in packages_distributions().get("migrate", []):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown (not installed)"


class VersionOption:
    """
    C{--version} prints migrate's version, not Twisted's.
    """

    def opt_version(self) -> None:
        """Display migrate's version and exit."""  # One line: it is the help.
        from twisted import __version__ as twistedVersion

        print(
            "migrate {} (Twisted {}, Python {})".format(
                migrateVersion(), twistedVersion, sys.version.split()[0]
            )
        )
        raise SystemExit(0)


class _CommandOptions(VersionOption, usage.Options):
    optFlags: list[list[Any]] = [
        ["json", None, "Print one JSON object on the last line of standard output."],
    ]
    optParameters: list[list[Any]] = [
        ["control", "c", DEFAULT_CONTROL, "The host's control socket."],
    ]

    def parseArgs(self) -> None:
        """
        No positional arguments.
        """


class StatusOptions(_CommandOptions):
    synopsis = "[--control PATH] [--json] [--timeout SECONDS]"
    longdesc = (
        "Describe the running host: listeners, connections, draining "
        "generations and the last migration."
    )
    optParameters: list[list[Any]] = [
        ["timeout", "t", 30.0, "Give up after this many seconds.", _positiveSeconds],
    ]


class UpgradeOptions(_CommandOptions):
    synopsis = (
        "[--control PATH] [--strategy NAME] [--json] [--wait] [--timeout SECONDS] "
        "[--ready-timeout SECONDS] [--drain-timeout SECONDS]"
    )
    longdesc = (
        "Migrate the running host to new code now; progress goes to standard "
        "error and the report to standard output. --ready-timeout and "
        "--drain-timeout replace the host's own settings for this migration "
        "only."
    )
    optFlags: list[list[Any]] = [
        [
            "wait",
            "w",
            "Wait for a migration already running to end (retrying until the "
            "timeout), and after a successful migration, until the old "
            "generation's connections have drained.",
        ],
    ]
    optParameters: list[list[Any]] = [
        [
            "strategy",
            "s",
            None,
            "The strategy to use: {} (default: the host's).".format(
                ", ".join(strategyNames())
            ),
        ],
        [
            "timeout",
            "t",
            120.0,
            "Give up waiting for the report after this many seconds (and, "
            "with --wait, for the drain after as many again); the migration "
            "goes on.",
            _positiveSeconds,
        ],
        [
            "ready-timeout",
            None,
            None,
            "Seconds the new process (or re-executed image) may take to become "
            "ready before the migration rolls back (default: the host's "
            "--ready-timeout).",
            _overrideSeconds("--ready-timeout"),
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds the old process keeps serving the connections that stay "
            "with it before closing them cleanly (default: the host's "
            "--drain-timeout).",
            _overrideSeconds("--drain-timeout"),
        ],
    ]

    def postOptions(self) -> None:
        strategy = self["strategy"]
        if strategy is not None and strategy not in strategyNames():
            raise usage.UsageError(
                "--strategy must be one of {}, not {!r}".format(
                    ", ".join(strategyNames()), strategy
                )
            )

    def overrides(self) -> dict[str, float]:
        """
        The host settings given for this migration, by the Upgrade
        command's argument name.
        """
        return {
            argument: self[option]
            for option, argument in _OVERRIDES.items()
            if self[option] is not None
        }


def _rollingOptions() -> usage.Options:
    """
    The options of C{rolling}, imported only when that command is asked for
    (see the module's docstring).
    """
    from ._rolling._command import RollingOptions

    return RollingOptions()


def _stopOptions() -> usage.Options:
    """
    The options of C{stop} (L{migrate._control._stop}).
    """
    from ._control._stop import StopOptions

    return StopOptions()


class MigrateOptions(VersionOption, usage.Options):
    """
    C{python -m migrate COMMAND [options]}.
    """

    synopsis = "Usage: python -m migrate"

    def __init__(self, program: str = "python -m migrate") -> None:
        super().__init__()
        self.synopsis = "Usage: " + program

    def getSynopsis(self) -> str:
        if self.subCommand is None:
            return self.synopsis + " COMMAND [options]"
        return self.synopsis

    longdesc = (
        "Control a running migrate host through its control socket "
        "(--control; by default {} in the current directory). Exit status: 0 success, 1 migration rolled back or "
        "refused (or the host refused the request), 2 usage error, 3 host "
        "unreachable, 4 timeout.".format(DEFAULT_CONTROL.removeprefix("./"))
    )
    subCommands = [
        ["status", None, StatusOptions, "Describe the running host."],
        ["upgrade", None, UpgradeOptions, "Migrate the running host now."],
        ["stop", None, _stopOptions, "Stop every generation of the host politely."],
        [
            "rolling",
            None,
            _rollingOptions,
            "Upgrade every server of an HAProxy backend in turn.",
        ],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "a command is needed: status, upgrade, stop or rolling"
            )


# The commands


async def _statusCommand(session: Session, options: StatusOptions) -> int:
    deadline = session.reactor.seconds() + options["timeout"]
    client, status = await session.statusOnce(None, deadline)
    client.disconnect()
    session.out.result(status, formatStatus(status))
    return EXIT_OK


async def _waitForDrain(session: Session, generation: object, deadline: float) -> None:
    remaining: list[int] = []

    def check(status: dict[str, Any]) -> bool | None:
        left = [
            each
            for each in dictsIn(status.get("draining"))
            if each.get("generation") == generation
        ]
        if not left:
            session.out.progress("generation {} has drained".format(generation))
            return True
        count = 0
        for each in left:
            connections = each.get("connections")
            if isinstance(connections, int):
                count += connections
        if remaining != [count]:
            remaining[:] = [count]
            session.out.progress(
                "waiting for generation {} to drain: {} left".format(
                    generation, countOf(count, "connection")
                )
            )
        return None

    await session.poll(
        deadline,
        lambda: "timed out waiting for generation {} to drain ({} left)".format(
            generation, countOf(remaining[0] if remaining else None, "connection")
        ),
        check,
    )


#: seconds between two tries of C{upgrade --wait} while another migration runs
RETRY_INTERVAL = 1.0


async def _upgradeCommand(session: Session, options: UpgradeOptions) -> int:
    deadline = session.reactor.seconds() + options["timeout"]
    strategy = options["strategy"]

    def announce(before: dict[str, Any]) -> None:
        # Said once the host has accepted (its first progress line), never
        # before a refusal.
        session.out.announce(
            "upgrading generation {} (pid {}) with strategy {}".format(
                textOf(before.get("generation")),
                textOf(before.get("pid")),
                strategy or textOf(before.get("strategy")),
            )
        )

    while True:
        try:
            report = await session.upgrade(
                strategy, deadline, announce, options.overrides()
            )
        except MigrationInProgress as e:
            # The host waits for a running migration itself, within a bound;
            # past it, or once the process handed on, --wait tries again.
            if not options["wait"] or session.reactor.seconds() + RETRY_INTERVAL > (
                deadline
            ):
                raise CommandFailed(EXIT_FAILED, str(e)) from None
            session.out.progress("{}; trying again".format(e))
            await deferLater(session.reactor, RETRY_INTERVAL, lambda: None)
            continue
        except UnknownStrategy as e:
            # This client knew the name; the host, another version, does not.
            raise CommandFailed(EXIT_USAGE, str(e)) from None
        break
    session.out.result(report, formatReport(report))
    outcome = report.get("outcome")
    if outcome != "success":
        raise CommandFailed(
            EXIT_FAILED,
            "migration {}: {}".format(
                textOf(outcome), report.get("reason") or "no reason given"
            ),
        )
    if options["wait"]:
        await _waitForDrain(
            session,
            report.get("fromGeneration"),
            session.reactor.seconds() + options["timeout"],
        )
    return EXIT_OK


def _explain(reason: Failure, out: Output) -> int:
    """
    Turn a command's failure into an exit status, saying why on stderr.
    """
    error = reason.value
    if isinstance(error, BrokenPipeError):
        # Our reader went away (| head): nobody to tell.
        return EXIT_FAILED
    if isinstance(error, CommandFailed):
        code, message = error.code, error.message
    elif isinstance(error, (CannotConnect, HostClosedConnection)):
        code, message = EXIT_UNREACHABLE, str(error)
    elif isinstance(error, (MigrationInProgress, UnknownStrategy, BadReply)):
        code, message = EXIT_FAILED, str(error)
    elif isinstance(error, (amp.RemoteAmpError, amp.UnknownRemoteError)):
        code, message = EXIT_FAILED, "the host failed: {}".format(
            reason.getErrorMessage()
        )
    else:
        out.error("internal error: {}".format(reason.getErrorMessage()))
        out.stderr.write(reason.getTraceback())
        return EXIT_FAILED
    out.error(message)
    if out.asJSON and not out.printed:
        out.result({"error": message, "exitCode": code}, message)
    return code


def run(
    reactor: Any,
    argv: Sequence[str],
    *,
    connect: Connector = connectControl,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    program: str = "python -m migrate",
) -> Deferred[int]:
    """
    Run one C{python -m migrate} command.

    @param reactor: the reactor (a clock and a connector's reactor).
    @param argv: the arguments after the program name.
    @param program: how the user ran it (C{python -m migrate} or
        C{txmigrate}), for the usage and the hint after a usage error.
    @param connect: the L{Connector} (L{connectControl} unless testing).
    @return: a L{Deferred} firing with the exit status; it never fails.
    """
    out = Output(stdout or sys.stdout, stderr or sys.stderr)
    options = MigrateOptions(program)
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        # A coercer's own message says what is wrong: usage's prefix adds
        # nothing.
        out.error(str(e).replace(_TYPE_ENFORCEMENT, "", 1))
        out.stderr.write("Try '{0} --help' or '{0} COMMAND --help'.\n".format(program))
        return succeed(EXIT_USAGE)
    except SystemExit as e:  # --help
        return succeed(e.code if isinstance(e.code, int) else EXIT_OK)
    except BrokenPipeError:  # --help | head
        return succeed(EXIT_FAILED)
    sub = options.subOptions
    out.asJSON = bool(sub["json"])
    if options.subCommand == "rolling":
        from ._rolling._command import rollingCommand

        rolling = rollingCommand(reactor, sub, out, connect)
        return Deferred.fromCoroutine(rolling).addErrback(_explain, out)
    session = Session(reactor, connect, out, sub["control"])
    command: Coroutine[Any, Any, int]
    if options.subCommand == "status":
        command = _statusCommand(session, sub)
    elif options.subCommand == "stop":
        from ._control._stop import stopCommand

        command = stopCommand(session, sub)
    else:
        command = _upgradeCommand(session, sub)
    result: Deferred[int] = Deferred.fromCoroutine(command).addErrback(_explain, out)
    return result


def main(argv: Sequence[str] | None = None, program: str = "python -m migrate") -> None:
    """
    The C{python -m migrate} entry point: run and exit with the status.

    @param program: how the user ran it, for the usage text.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        code = await run(reactor, arguments, program=program)
        if code:
            raise SystemExit(code)

    react(_main)
