"""
The command-line client of the control channel: C{python -m migrate status}
and C{python -m migrate upgrade}.

The commands are coroutines over a small L{ControlClient} seam, so that
tests drive them with a fake connection layer; L{connectControl} is the real
one (AMP over the host's Unix control socket).

Exit status: L{EXIT_OK} when the host answered (status) or the migration
succeeded (upgrade); L{EXIT_FAILED} for a rolled-back or refused migration
or an error the host reported; L{EXIT_USAGE} for bad arguments;
L{EXIT_UNREACHABLE} when the host cannot be reached; L{EXIT_TIMEOUT} when
C{--timeout} runs out.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from typing import IO, Any, Callable, Coroutine, NoReturn, Protocol, Sequence

from attrs import define
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.task import deferLater, react
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from ._control._server import (
    MigrationInProgress,
    Progress,
    Status,
    UnknownStrategy,
    Upgrade,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "BadReply",
    "CannotConnect",
    "ControlClient",
    "HostClosedConnection",
    "MigrateOptions",
    "connectControl",
    "formatReport",
    "formatStatus",
    "main",
    "run",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4

DEFAULT_CONTROL = "./migrate-host.sock"
POLL_INTERVAL = 0.2

#: seconds the control socket may refuse connections before the host is
#: taken for gone while waiting for an outcome
UNREACHABLE_GRACE = 5.0
_LOG_LINES_SHOWN = 20


class CannotConnect(Exception):
    """
    The control socket cannot be reached; the message says why.
    """


class HostClosedConnection(Exception):
    """
    The host closed the control connection before answering.
    """


class BadReply(Exception):
    """
    The host's answer is not the JSON object the protocol promises.
    """


class ControlClient(Protocol):
    """
    One connection to a host's control channel.
    """

    def status(self) -> Deferred[dict[str, Any]]:
        """
        The host's status (Status JSON).
        """

    def upgrade(self, strategy: str | None) -> Deferred[dict[str, Any]]:
        """
        Migrate; fires with the report (Report JSON), or fails with
        L{MigrationInProgress} or L{UnknownStrategy}.
        """

    def disconnect(self) -> None:
        """
        Close the connection.
        """


Connector = Callable[[Any, str, Callable[[str], None]], "Deferred[ControlClient]"]
"""
C{connect(reactor, path, onProgress)}: connect to the control socket at
C{path}; C{onProgress} receives every L{Progress} message.  Fails with
L{CannotConnect}.
"""


# The real connection layer


class _ClientProtocol(amp.AMP):
    """
    The client's end of the control channel: relays L{Progress}.
    """

    def __init__(self, onProgress: Callable[[str], None]) -> None:
        super().__init__()
        self._onProgress = onProgress

    @Progress.responder
    def progress(self, message: str) -> dict[str, Any]:
        self._onProgress(message)
        return {}


def _decodeObject(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise BadReply("the host sent a malformed {}: {}".format(what, e)) from e
    if not isinstance(value, dict):
        raise BadReply("the host sent a {} that is not a JSON object".format(what))
    return value


def _closedBeforeAnswer(reason: Failure) -> NoReturn:
    reason.trap(ConnectionClosed)
    raise HostClosedConnection(
        "the host closed the control connection before answering ({})".format(
            reason.getErrorMessage()
        )
    )


@define
class _AMPControlClient:
    """
    L{ControlClient} over a connected L{_ClientProtocol}.
    """

    _protocol: _ClientProtocol

    def status(self) -> Deferred[dict[str, Any]]:
        d: Deferred[Any] = self._protocol.callRemote(Status)
        d.addCallback(lambda answer: _decodeObject(answer["status"], "status"))
        d.addErrback(_closedBeforeAnswer)
        return d

    def upgrade(self, strategy: str | None) -> Deferred[dict[str, Any]]:
        arguments = {} if strategy is None else {"strategy": strategy}
        d: Deferred[Any] = self._protocol.callRemote(Upgrade, **arguments)
        d.addCallback(lambda answer: _decodeObject(answer["report"], "report"))
        d.addErrback(_closedBeforeAnswer)
        return d

    def disconnect(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.loseConnection()


def _explainConnectFailure(reason: Failure, path: str) -> Failure:
    error = reason.value
    if not isinstance(error, ConnectError):
        return reason
    number = error.osError
    if number == errno.ECONNREFUSED:
        why = "connection refused: no host listens there (a stale socket file?)"
    elif number in (errno.EACCES, errno.EPERM):
        why = (
            "permission denied: the socket belongs to another user (run as "
            "that user or root)"
        )
    elif number == errno.ENOENT:
        why = "no such file (is the host running, and is --control right?)"
    else:
        why = reason.getErrorMessage()
    return Failure(CannotConnect("cannot connect to {}: {}".format(path, why)))


def connectControl(
    reactor: Any, path: str, onProgress: Callable[[str], None]
) -> Deferred[ControlClient]:
    """
    Connect to the control socket at C{path}: the real L{Connector}.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return fail(
            CannotConnect(
                "cannot connect to {}: no such file (is the host running, and "
                "is --control right?)".format(path)
            )
        )
    except PermissionError:
        return fail(
            CannotConnect(
                "cannot connect to {}: permission denied (a directory on the "
                "way is not accessible to this user)".format(path)
            )
        )
    except OSError as e:
        return fail(CannotConnect("cannot connect to {}: {}".format(path, e.strerror)))
    if not stat.S_ISSOCK(info.st_mode):
        return fail(
            CannotConnect(
                "cannot connect to {}: it is not a socket (is --control "
                "right?)".format(path)
            )
        )
    d: Deferred[Any] = connectProtocol(
        UNIXClientEndpoint(reactor, path), _ClientProtocol(onProgress)
    )
    d.addCallback(_AMPControlClient)
    return d.addErrback(_explainConnectFailure, path)


# Output


@define
class _Output:
    """
    Where the command's words go: results on stdout (one JSON object on the
    last line with C{--json}), progress and errors on stderr.
    """

    stdout: IO[str]
    stderr: IO[str]
    asJSON: bool = False
    printed: bool = False

    def progress(self, message: str) -> None:
        self.stderr.write("[migrate] {}\n".format(message))
        self.stderr.flush()

    def error(self, message: str) -> None:
        self.stderr.write("migrate: {}\n".format(message))
        self.stderr.flush()

    def result(self, value: dict[str, Any], human: str) -> None:
        if self.asJSON:
            self.stdout.write(json.dumps(value, sort_keys=True) + "\n")
        else:
            self.stdout.write(human + "\n")
        self.stdout.flush()
        self.printed = True


def _text(value: object) -> str:
    return "?" if value is None else str(value)


def _count(value: object, noun: str) -> str:
    if isinstance(value, int):
        return "{} {}{}".format(value, noun, "" if value == 1 else "s")
    return "? {}s".format(noun)


def _dicts(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [each for each in value if isinstance(each, dict)]


def _reportSummary(report: dict[str, Any]) -> str:
    return "{} with strategy {}, generation {} -> {} (pid {} -> {})".format(
        _text(report.get("outcome")),
        _text(report.get("strategy")),
        _text(report.get("fromGeneration")),
        _text(report.get("toGeneration")),
        _text(report.get("oldPid")),
        _text(report.get("newPid")),
    )


def formatStatus(status: dict[str, Any]) -> str:
    """
    A readable multi-line description of Status JSON.
    """
    lines = [
        "Host pid {}, generation {}, strategy {}, phase {}".format(
            _text(status.get("pid")),
            _text(status.get("generation")),
            _text(status.get("strategy")),
            _text(status.get("phase")),
        ),
        "Connections: {}".format(_text(status.get("connections"))),
    ]
    listeners = _dicts(status.get("listeners"))
    lines.append("Listeners:" if listeners else "Listeners: none")
    for each in listeners:
        lines.append(
            "  {} on {}: {}".format(
                _text(each.get("key")),
                _text(each.get("address")),
                _count(each.get("connections"), "connection"),
            )
        )
    draining = _dicts(status.get("draining"))
    lines.append("Draining:" if draining else "Draining: none")
    for each in draining:
        lines.append(
            "  generation {} (pid {}): {} left".format(
                _text(each.get("generation")),
                _text(each.get("pid")),
                _count(each.get("connections"), "connection"),
            )
        )
    last = status.get("lastReport")
    if isinstance(last, dict):
        lines.append("Last migration: " + _reportSummary(last))
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
    lines = [
        "Migration " + _reportSummary(report),
        "Connections: {} moved, {} draining, {} failed".format(
            _text(report.get("moved")),
            _text(report.get("draining")),
            _text(report.get("failed")),
        ),
    ]
    if report.get("reason"):
        lines.append("Reason: {}".format(report["reason"]))
    listeners = _dicts(report.get("listeners"))
    if listeners:
        lines.append("Listeners:")
    for each in listeners:
        lines.append(
            "  {}: {} moved, {} drained, {} failed".format(
                _text(each.get("key")),
                _text(each.get("moved")),
                _text(each.get("drained")),
                _text(each.get("failed")),
            )
        )
    durations = report.get("durations")
    if isinstance(durations, dict) and durations:
        parts = []
        for phase, seconds in durations.items():
            if isinstance(seconds, (int, float)):
                parts.append("{} {:.3f}s".format(phase, seconds))
            else:
                parts.append("{} {}".format(phase, _text(seconds)))
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


# Options


def _positiveSeconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(
            "--timeout needs a positive number of seconds, not {!r}".format(value)
        )
    return seconds


_positiveSeconds.coerceDoc = "A positive number of seconds."  # type: ignore[attr-defined]


class _CommandOptions(usage.Options):
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
        "[--control PATH] [--strategy NAME] [--json] [--wait] [--timeout SECONDS]"
    )
    longdesc = (
        "Migrate the running host to new code now; progress goes to standard "
        "error and the report to standard output."
    )
    optFlags: list[list[Any]] = [
        [
            "wait",
            "w",
            "After a successful migration, wait until the old generation's "
            "connections have drained.",
        ],
    ]
    optParameters: list[list[Any]] = [
        ["strategy", "s", None, "The strategy to use (default: the host's)."],
        [
            "timeout",
            "t",
            120.0,
            "Give up waiting for the report after this many seconds (and, "
            "with --wait, for the drain after as many again).",
            _positiveSeconds,
        ],
    ]

    def postOptions(self) -> None:
        if self["strategy"] is not None and not self["strategy"].strip():
            raise usage.UsageError("--strategy needs a name")


def _rollingOptions() -> usage.Options:
    """
    The options of C{rolling}, imported late: L{migrate._rolling._orchestrator} imports
    this module.
    """
    from ._rolling._orchestrator import RollingOptions

    return RollingOptions()


class MigrateOptions(usage.Options):
    """
    C{python -m migrate COMMAND [options]}.
    """

    synopsis = "Usage: python -m migrate"

    def getSynopsis(self) -> str:
        if self.subCommand is None:
            return self.synopsis + " COMMAND [options]"
        return self.synopsis

    longdesc = (
        "Control a running migrate host through its control socket "
        "(default {}).  Exit status: 0 success, 1 migration rolled back or "
        "refused (or the host refused the request), 2 usage error, 3 host "
        "unreachable, 4 timeout.".format(DEFAULT_CONTROL)
    )
    subCommands = [
        ["status", None, StatusOptions, "Describe the running host."],
        ["upgrade", None, UpgradeOptions, "Migrate the running host now."],
        [
            "rolling",
            None,
            _rollingOptions,
            "Upgrade every server of an HAProxy backend in turn.",
        ],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is needed: status, upgrade or rolling")


# The commands


class _Failed(Exception):
    """
    The command ends with C{code}, saying C{message} on stderr.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@define
class _Session:
    """
    What one command run needs: the reactor, the connector, the output.
    """

    reactor: Any
    connect: Connector
    out: _Output
    path: str

    async def within(self, d: Deferred[Any], deadline: float, what: str) -> Any:
        """
        Wait for C{d} until C{deadline}; L{_Failed} with L{EXIT_TIMEOUT}
        after.
        """
        remaining = max(0.0, deadline - self.reactor.seconds())
        d.addTimeout(remaining, self.reactor)
        try:
            return await d
        except TimeoutError:
            raise _Failed(EXIT_TIMEOUT, "timed out " + what) from None

    async def open(self, deadline: float) -> ControlClient:
        client: ControlClient = await self.within(
            self.connect(self.reactor, self.path, self.out.progress),
            deadline,
            "connecting to {}".format(self.path),
        )
        return client

    async def statusOnce(
        self, client: ControlClient | None, deadline: float
    ) -> tuple[ControlClient, dict[str, Any]]:
        if client is None:
            client = await self.open(deadline)
        try:
            status = await self.within(
                client.status(), deadline, "waiting for the host's status"
            )
        except BaseException:
            client.disconnect()
            raise
        return client, status

    async def poll(
        self,
        deadline: float,
        timeoutMessage: Callable[[], str],
        check: Callable[[dict[str, Any]], Any],
    ) -> Any:
        """
        Ask for the status every L{POLL_INTERVAL} seconds, reconnecting as
        needed, until C{check(status)} returns something other than
        L{None}, and return that.
        """
        client: ControlClient | None = None
        lastError: Exception | None = None
        unreachableSince: float | None = None
        try:
            while True:
                try:
                    client, status = await self.statusOnce(client, deadline)
                except (CannotConnect, HostClosedConnection, BadReply) as e:
                    client, lastError = None, e
                    if isinstance(e, CannotConnect):
                        # Nobody holds the control socket any more: every
                        # migration keeps it listening (connections wait in
                        # its backlog), so the host is gone, not busy.
                        now = self.reactor.seconds()
                        if unreachableSince is None:
                            unreachableSince = now
                        elif now - unreachableSince >= UNREACHABLE_GRACE:
                            raise _Failed(EXIT_UNREACHABLE, str(e))
                    else:
                        unreachableSince = None
                except _Failed as e:
                    if e.code != EXIT_TIMEOUT:
                        raise
                    client = None
                else:
                    lastError = None
                    unreachableSince = None
                    result = check(status)
                    if result is not None:
                        return result
                if self.reactor.seconds() + POLL_INTERVAL > deadline:
                    if isinstance(lastError, CannotConnect):
                        raise _Failed(EXIT_UNREACHABLE, str(lastError))
                    raise _Failed(EXIT_TIMEOUT, timeoutMessage())
                await deferLater(self.reactor, POLL_INTERVAL, lambda: None)
        finally:
            if client is not None:
                client.disconnect()


async def _statusCommand(session: _Session, options: StatusOptions) -> int:
    deadline = session.reactor.seconds() + options["timeout"]
    client, status = await session.statusOnce(None, deadline)
    client.disconnect()
    session.out.result(status, formatStatus(status))
    return EXIT_OK


async def _recoverReport(
    session: _Session, before: dict[str, Any], deadline: float
) -> dict[str, Any]:
    """
    The control connection was lost during the upgrade (a re-exec ends it):
    learn the outcome from the status of whichever process now serves.
    """
    session.out.progress(
        "the host closed the control connection during the upgrade; "
        "reconnecting to learn the outcome"
    )
    generation = before.get("generation")

    def check(status: dict[str, Any]) -> dict[str, Any] | None:
        last = status.get("lastReport")
        if (
            isinstance(last, dict)
            and last != before.get("lastReport")
            and last.get("fromGeneration") == generation
        ):
            return last
        if status.get("phase") != "idle":
            return None
        if status.get("generation") != generation:
            return {
                "strategy": status.get("strategy"),
                "outcome": "success",
                "reason": None,
                "fromGeneration": generation,
                "toGeneration": status.get("generation"),
                "oldPid": before.get("pid"),
                "newPid": status.get("pid"),
                "notes": [
                    "no report reached this client: the control connection was "
                    "lost, and the host now serves generation {}".format(
                        status.get("generation")
                    )
                ],
            }
        raise _Failed(
            EXIT_FAILED,
            "the control connection was lost during the upgrade and the host "
            "still serves generation {} without a new report: the migration "
            "did not complete".format(generation),
        )

    report: dict[str, Any] = await session.poll(
        deadline,
        lambda: "timed out waiting for the outcome of the upgrade",
        check,
    )
    return report


async def _waitForDrain(session: _Session, generation: object, deadline: float) -> None:
    remaining: list[int] = []

    def check(status: dict[str, Any]) -> bool | None:
        left = [
            each
            for each in _dicts(status.get("draining"))
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
                    generation, _count(count, "connection")
                )
            )
        return None

    await session.poll(
        deadline,
        lambda: "timed out waiting for generation {} to drain ({} left)".format(
            generation, _count(remaining[0] if remaining else None, "connection")
        ),
        check,
    )


async def _upgradeCommand(session: _Session, options: UpgradeOptions) -> int:
    deadline = session.reactor.seconds() + options["timeout"]
    strategy = options["strategy"]
    client, before = await session.statusOnce(None, deadline)
    try:
        session.out.progress(
            "upgrading generation {} (pid {}) with strategy {}".format(
                _text(before.get("generation")),
                _text(before.get("pid")),
                strategy or _text(before.get("strategy")),
            )
        )
        try:
            report = await session.within(
                client.upgrade(strategy), deadline, "waiting for the migration report"
            )
        except HostClosedConnection:
            client.disconnect()
            report = await _recoverReport(session, before, deadline)
        except (MigrationInProgress, UnknownStrategy) as e:
            raise _Failed(EXIT_FAILED, str(e)) from None
    finally:
        client.disconnect()
    session.out.result(report, formatReport(report))
    outcome = report.get("outcome")
    if outcome != "success":
        raise _Failed(
            EXIT_FAILED,
            "migration {}: {}".format(
                _text(outcome), report.get("reason") or "no reason given"
            ),
        )
    if options["wait"]:
        await _waitForDrain(
            session,
            report.get("fromGeneration"),
            session.reactor.seconds() + options["timeout"],
        )
    return EXIT_OK


def _explain(reason: Failure, out: _Output) -> int:
    """
    Turn a command's failure into an exit status, saying why on stderr.
    """
    error = reason.value
    if isinstance(error, BrokenPipeError):
        # Our reader went away (| head): nobody to tell.
        return EXIT_FAILED
    if isinstance(error, _Failed):
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
) -> Deferred[int]:
    """
    Run one C{python -m migrate} command.

    @param reactor: the reactor (a clock and a connector's reactor).
    @param argv: the arguments after the program name.
    @param connect: the L{Connector} (L{connectControl} unless testing).
    @return: a L{Deferred} firing with the exit status; it never fails.
    """
    out = _Output(stdout or sys.stdout, stderr or sys.stderr)
    options = MigrateOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        out.error(str(e))
        out.stderr.write(
            "Try 'python -m migrate --help' or 'python -m migrate COMMAND --help'.\n"
        )
        return succeed(EXIT_USAGE)
    except SystemExit as e:  # --help
        return succeed(e.code if isinstance(e.code, int) else EXIT_OK)
    except BrokenPipeError:  # --help | head
        return succeed(EXIT_FAILED)
    sub = options.subOptions
    out.asJSON = bool(sub["json"])
    if options.subCommand == "rolling":
        from ._rolling._orchestrator import rollingCommand

        rolling = rollingCommand(reactor, sub, out, connect)
        return Deferred.fromCoroutine(rolling).addErrback(_explain, out)
    session = _Session(reactor, connect, out, sub["control"])
    command: Coroutine[Any, Any, int]
    if options.subCommand == "status":
        command = _statusCommand(session, sub)
    else:
        command = _upgradeCommand(session, sub)
    result: Deferred[int] = Deferred.fromCoroutine(command).addErrback(_explain, out)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{python -m migrate} entry point: run and exit with the status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        code = await run(reactor, arguments)
        if code:
            raise SystemExit(code)

    react(_main)
