# -*- test-case-name: migrate.test.test_cli -*-
"""
The client of the control channel, shared by the C{python -m migrate}
commands (L{migrate._cli}) and the rolling upgrade (L{migrate._rolling}).

L{ControlClient} is the seam: one connection to a host, which tests replace
with a fake through a L{Connector}; L{connectControl} is the real connector
(AMP over the host's Unix control socket, with every reason a connection can
fail explained in words).  A L{Session} is what one command run needs on
top: deadlines, polling the status across reconnections, and
L{recoverReport}, which learns a migration's outcome after the control
connection was lost during it (a re-exec ends it).  L{Output} is where a
command's words go; L{CommandFailed} ends a command with an exit status.

Exit status: L{EXIT_OK} when the host answered or the migration succeeded;
L{EXIT_FAILED} for a rolled-back or refused migration or an error the host
reported; L{EXIT_USAGE} for bad arguments; L{EXIT_UNREACHABLE} when the host
cannot be reached; L{EXIT_TIMEOUT} when a deadline runs out.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import IO, Any, Callable, Mapping, NoReturn, Protocol

from attrs import define
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure

from ._commands import Progress, Status, Stop, Upgrade

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "POLL_INTERVAL",
    "UNREACHABLE_GRACE",
    "BadReply",
    "CannotConnect",
    "CommandFailed",
    "Connector",
    "ControlClient",
    "HostClosedConnection",
    "Output",
    "Session",
    "connectControl",
    "recoverReport",
    "secondsOption",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4

POLL_INTERVAL = 0.2
"""
Seconds between two looks at the host's status while waiting for an outcome.
"""

UNREACHABLE_GRACE = 5.0
"""
Seconds the control socket may refuse connections before the host is taken
for gone while waiting for an outcome.
"""


def secondsOption(
    name: str, *, allowZero: bool = False, doc: str | None = "Seconds."
) -> Callable[[str], float]:
    """
    The coercer of a command-line option given in seconds: a positive (or,
    with C{allowZero}, non-negative) finite number, or a usage error that
    names the option.

    @param name: the option as the user types it (C{--timeout}).
    @param doc: what C{--help} says of its values, if anything.
    """

    def coerce(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        low = 0 <= seconds if allowZero else 0 < seconds
        if not (low and seconds < float("inf")):
            raise ValueError(
                "{} needs a {} number of seconds, not {!r}".format(
                    name, "non-negative" if allowZero else "positive", value
                )
            )
        return seconds

    if doc is not None:
        coerce.coerceDoc = doc  # type: ignore[attr-defined]
    return coerce


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

    def upgrade(
        self, strategy: str | None, overrides: Mapping[str, float] | None = None
    ) -> Deferred[dict[str, Any]]:
        """
        Migrate; fires with the report (Report JSON), or fails with
        L{MigrationInProgress <migrate._control._commands.MigrationInProgress>}
        or L{UnknownStrategy <migrate._control._commands.UnknownStrategy>}.

        @param overrides: host settings for this migration only, by the
            L{Upgrade <migrate._control._commands.Upgrade>} argument's name
            (C{readyTimeout}, C{drainTimeout}).
        """

    def stop(self, drainTimeout: float | None) -> Deferred[dict[str, Any]]:
        """
        Stop every generation politely; fires with the host's summary once
        every generation has ended, or fails with L{MigrationInProgress
        <migrate._control._commands.MigrationInProgress>}.
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

    def upgrade(
        self, strategy: str | None, overrides: Mapping[str, float] | None = None
    ) -> Deferred[dict[str, Any]]:
        arguments: dict[str, Any] = dict(overrides or {})
        if strategy is not None:
            arguments["strategy"] = strategy
        d: Deferred[Any] = self._protocol.callRemote(Upgrade, **arguments)
        d.addCallback(lambda answer: _decodeObject(answer["report"], "report"))
        d.addErrback(_closedBeforeAnswer)
        return d

    def stop(self, drainTimeout: float | None) -> Deferred[dict[str, Any]]:
        arguments = {} if drainTimeout is None else {"drainTimeout": drainTimeout}
        d: Deferred[Any] = self._protocol.callRemote(Stop, **arguments)
        d.addCallback(lambda answer: _decodeObject(answer["result"], "result"))
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


# What a command says


@define
class Output:
    """
    Where the command's words go: results on stdout (one JSON object on the
    last line with C{--json}), progress and errors on stderr.
    """

    stdout: IO[str]
    stderr: IO[str]
    asJSON: bool = False
    printed: bool = False
    _announcement: str | None = None

    def announce(self, message: str) -> None:
        """
        Say C{message} as progress once the host has accepted: just before
        the host's first progress line (L{hostProgress}), and never if an
        error comes first (a command must not claim to be doing what the
        host refuses).
        """
        self._announcement = message

    def progress(self, message: str) -> None:
        """
        Say what this command does now.
        """
        self.stderr.write("[migrate] {}\n".format(message))
        self.stderr.flush()

    def hostProgress(self, message: str) -> None:
        """
        Say what the host says it does (its L{Progress} messages), after
        the announcement the host's first step confirms.
        """
        announcement, self._announcement = self._announcement, None
        if announcement is not None:
            self.progress(announcement)
        self.progress(message)

    def error(self, message: str) -> None:
        self._announcement = None
        self.stderr.write("migrate: {}\n".format(message))
        self.stderr.flush()

    def result(self, value: dict[str, Any], human: str) -> None:
        if self.asJSON:
            self.stdout.write(json.dumps(value, sort_keys=True) + "\n")
        else:
            self.stdout.write(human + "\n")
        self.stdout.flush()
        self.printed = True


class CommandFailed(Exception):
    """
    The command ends with C{code}, saying C{message} on stderr.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# One command run


@define
class Session:
    """
    What one command run needs: the reactor, the connector, the output.
    """

    reactor: Any
    connect: Connector
    out: Output
    path: str

    async def within(self, d: Deferred[Any], deadline: float, what: str) -> Any:
        """
        Wait for C{d} until C{deadline}; L{CommandFailed} with L{EXIT_TIMEOUT}
        after.
        """
        remaining = max(0.0, deadline - self.reactor.seconds())
        d.addTimeout(remaining, self.reactor)
        try:
            return await d
        except TimeoutError:
            raise CommandFailed(EXIT_TIMEOUT, "timed out " + what) from None

    async def open(self, deadline: float) -> ControlClient:
        client: ControlClient = await self.within(
            self.connect(self.reactor, self.path, self.out.hostProgress),
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
                            raise CommandFailed(EXIT_UNREACHABLE, str(e))
                    else:
                        unreachableSince = None
                except CommandFailed as e:
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
                        raise CommandFailed(EXIT_UNREACHABLE, str(lastError))
                    raise CommandFailed(EXIT_TIMEOUT, timeoutMessage())
                await deferLater(self.reactor, POLL_INTERVAL, lambda: None)
        finally:
            if client is not None:
                client.disconnect()

    async def upgrade(
        self,
        strategy: str | None,
        deadline: float,
        announce: Callable[[dict[str, Any]], None] = lambda before: None,
        overrides: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """
        Migrate the host and return its report (Report JSON), whatever the
        outcome: the status first (given to C{announce}), then the upgrade;
        if the host closes the control connection meanwhile (a re-exec ends
        it), the outcome is learnt with L{recoverReport}.

        @param strategy: the strategy's name, or L{None} for the host's own.
        @param deadline: when to give up (L{CommandFailed} with
            L{EXIT_TIMEOUT}, whose message says that the migration goes on
            and how to learn its outcome).
        @param overrides: host settings for this migration only (see
            L{ControlClient.upgrade}).
        @raise migrate._control._commands.MigrationInProgress: see
            L{ControlClient.upgrade}.
        @raise migrate._control._commands.UnknownStrategy: see
            L{ControlClient.upgrade}.
        """
        client, before = await self.statusOnce(None, deadline)
        try:
            announce(before)
            try:
                report: dict[str, Any] = await self.within(
                    (
                        client.upgrade(strategy, overrides)
                        if overrides
                        else client.upgrade(strategy)
                    ),
                    deadline,
                    "waiting for the migration report",
                )
            except HostClosedConnection:
                client.disconnect()
                report = await recoverReport(self, before, deadline)
        except CommandFailed as e:
            if e.code != EXIT_TIMEOUT:
                raise
            raise CommandFailed(EXIT_TIMEOUT, self.goesOn(e.message)) from None
        finally:
            client.disconnect()
        return report

    def goesOn(self, message: str) -> str:
        """
        C{message} about a migration this command stopped waiting for,
        followed by what happens to it and how to learn its outcome.
        """
        return (
            "{}; the migration goes on in the host: `python -m migrate status "
            "--control {}` shows how it ended (Last migration)".format(
                message, self.path
            )
        )


async def recoverReport(
    session: Session, before: dict[str, Any], deadline: float
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
        raise CommandFailed(
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
