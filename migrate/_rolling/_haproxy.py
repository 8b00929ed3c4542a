"""
A small client for HAProxy's runtime API: the commands a rolling upgrade
needs, sent over HAProxy's stats socket (C{stats socket PATH level admin}).

HAProxy's runtime API is line-based text: in its default, non-interactive
mode it reads one command, writes the answer and closes the connection.  So
L{UnixRuntimeAPI} opens one connection per command, which needs no parsing
of prompts and leaves nothing half-read behind when a command times out.
L{HAProxyClient} builds the few commands the rolling upgrade uses on top of
any L{RuntimeAPI} (the Unix socket, or a fake in tests) and turns HAProxy's
answers into data: the server rows of C{show stat} (L{ServerStat}), the
rows of C{show servers state} (L{ServerState}), and L{HAProxyError} for
anything HAProxy refused.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
from typing import Any
from typing import Protocol as TypingProtocol

from attrs import define, frozen
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

__all__ = [
    "ADMIN_DRAIN",
    "ADMIN_MAINT",
    "HAProxyClient",
    "HAProxyError",
    "HAProxyUnreachable",
    "MAX_ANSWER_BYTES",
    "RuntimeAPI",
    "ServerStat",
    "ServerState",
    "UnexpectedAnswer",
    "UnixRuntimeAPI",
    "parseServersState",
    "parseStat",
]

MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""
The longest answer L{UnixRuntimeAPI} accepts (C{show stat} of a large
configuration is a few hundred kilobytes).
"""

ADMIN_MAINT = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
"""
The bits of C{srv_admin_state} (C{show servers state}) that mean
maintenance: forced, inherited, configured, resolution and hostname.
"""

ADMIN_DRAIN = 0x08 | 0x10
"""
The bits of C{srv_admin_state} that mean drain: forced and inherited.
"""

_RUNNING = 2
_SERVER_TYPE = "2"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_STATES = ("ready", "drain", "maint")
_HEALTHS = ("up", "stopping", "down")


class HAProxyError(Exception):
    """
    HAProxy answered a command with an error.

    @ivar command: the command sent.
    @ivar answer: what HAProxy answered, stripped.
    """

    def __init__(self, command: str, answer: str) -> None:
        super().__init__(
            "HAProxy refused {!r}: {}".format(command, answer or "(empty answer)")
        )
        self.command = command
        self.answer = answer


class UnexpectedAnswer(HAProxyError):
    """
    HAProxy's answer is not in the form the command promises (the first
    line is kept).
    """

    def __init__(self, command: str, answer: str) -> None:
        firstLine = answer.strip().split("\n", 1)[0][:200]
        HAProxyError.__init__(self, command, firstLine)
        self.args = (
            "unexpected answer from HAProxy to {!r}: {}".format(
                command, firstLine or "(empty answer)"
            ),
        )


class HAProxyUnreachable(Exception):
    """
    HAProxy's runtime API cannot be reached (or did not answer in time);
    the message says why.
    """


class RuntimeAPI(TypingProtocol):
    """
    Something that sends one command to HAProxy's runtime API.
    """

    def command(self, line: str) -> Deferred[str]:
        """
        Send C{line} (without its newline) and fire with HAProxy's whole
        answer, or fail with L{HAProxyUnreachable}.
        """


class _OneCommand(Protocol):
    """
    Send one command, collect the answer until HAProxy closes.
    """

    def __init__(self, line: bytes, maxBytes: int) -> None:
        self._line = line
        self._maxBytes = maxBytes
        self._received = bytearray()
        self.answer: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        self.transport.write(self._line)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if len(self._received) > self._maxBytes and not self.answer.called:
            self.answer.errback(
                HAProxyUnreachable(
                    "HAProxy's answer is longer than {} bytes".format(self._maxBytes)
                )
            )
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.answer.called:
            self.answer.callback(bytes(self._received))


@define
class UnixRuntimeAPI:
    """
    HAProxy's runtime API over its stats Unix socket, one connection per
    command (HAProxy's non-interactive mode).

    @ivar path: the stats socket's path.
    @ivar timeout: seconds a command may take, connecting included.
    """

    _reactor: Any
    path: str
    timeout: float = 10.0
    maxBytes: int = MAX_ANSWER_BYTES

    def _unreachable(self, why: str) -> Deferred[str]:
        return fail(
            HAProxyUnreachable(
                "cannot reach HAProxy's stats socket {}: {}".format(self.path, why)
            )
        )

    def command(self, line: str) -> Deferred[str]:
        """
        Send one command; fire with the answer.
        """
        if "\n" in line or ";" in line:
            raise ValueError("one command, without ';' or newline: {!r}".format(line))
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return self._unreachable(
                "no such file (is HAProxy running, and does its 'stats socket' "
                "line name this path?)"
            )
        except PermissionError:
            return self._unreachable(
                "permission denied (a directory on the way is not accessible to "
                "this user)"
            )
        except OSError as e:
            return self._unreachable(e.strerror or str(e))
        if not stat.S_ISSOCK(info.st_mode):
            return self._unreachable("it is not a socket")
        protocol = _OneCommand(line.encode("utf-8") + b"\n", self.maxBytes)
        d: Deferred[Any] = connectProtocol(
            UNIXClientEndpoint(self._reactor, self.path, timeout=self.timeout),
            protocol,
        )
        d.addErrback(self._explainConnectFailure)
        d.addCallback(lambda _: protocol.answer)
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(self._explainTimeout, line)
        d.addCallback(lambda data: data.decode("utf-8", "replace"))
        return d

    def _explainConnectFailure(self, reason: Failure) -> Failure:
        error = reason.value
        if not isinstance(error, ConnectError):
            return reason
        number = error.osError
        if number == errno.ECONNREFUSED:
            why = "connection refused: HAProxy does not listen there (a stale socket file?)"
        elif number in (errno.EACCES, errno.EPERM):
            why = (
                "permission denied: the socket belongs to another user (see the "
                "'mode' and 'user' of its 'stats socket' line)"
            )
        elif number == errno.ENOENT:
            why = "no such file"
        else:
            why = reason.getErrorMessage()
        return Failure(
            HAProxyUnreachable(
                "cannot reach HAProxy's stats socket {}: {}".format(self.path, why)
            )
        )

    def _explainTimeout(self, reason: Failure, line: str) -> Failure:
        if reason.check(TimeoutError):
            return Failure(
                HAProxyUnreachable(
                    "HAProxy did not answer {!r} on {} within {:g} s".format(
                        line, self.path, self.timeout
                    )
                )
            )
        return reason


# Parsing


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


@frozen
class ServerStat:
    """
    One server's row of C{show stat}.

    @ivar backend: the backend (C{pxname}).
    @ivar name: the server (C{svname}).
    @ivar status: HAProxy's status text: C{UP}, C{DOWN}, C{DRAIN},
        C{MAINT}, C{no check}, or a transition such as C{UP 1/2}.
    @ivar sessions: current sessions (C{scur}).
    @ivar checkStatus: the last health check's status (C{L4OK}, C{L7OK},
        C{L4CON}...), empty while checks are paused.
    @ivar checkDescription: the check's human-readable outcome.
    @ivar checkHealth: the health counter, L{None} when not checked.
    @ivar checkRise: successful checks needed to go up.
    @ivar checkFall: failed checks needed to go down.
    """

    backend: str
    name: str
    status: str
    sessions: int = 0
    checkStatus: str = ""
    checkDescription: str = ""
    checkHealth: int | None = None
    checkRise: int | None = None
    checkFall: int | None = None

    @property
    def up(self) -> bool:
        """
        Whether the health check sees the server fully up: C{UP}, or
        C{DRAIN} (up, but taking no new traffic); not a transition.
        """
        return self.status in ("UP", "DRAIN")

    @property
    def checked(self) -> bool:
        """
        Whether a health check watches this server.
        """
        return not self.status.startswith("no check")

    def describe(self) -> str:
        """
        The status and, when known, what the check said: C{"DOWN (Layer4
        connection problem)"}.
        """
        if self.checkDescription:
            return "{} ({})".format(self.status, self.checkDescription)
        return self.status


def parseStat(answer: str, command: str = "show stat") -> list[ServerStat]:
    """
    The server rows of a C{show stat} answer (CSV with a C{# pxname,...}
    header).

    @raise UnexpectedAnswer: if C{answer} is not such CSV (HAProxy answers
        C{"No such proxy."} for an unknown name, for example).
    """
    if not answer.startswith("# "):
        raise UnexpectedAnswer(command, answer)
    rows = list(csv.reader(io.StringIO(answer[2:])))
    header = rows[0]
    needed = ("pxname", "svname", "scur", "status", "type")
    if not all(name in header for name in needed):
        raise UnexpectedAnswer(command, answer)
    servers = []
    for row in rows[1:]:
        if not row:
            continue
        values = dict(zip(header, row))
        if values.get("type") != _SERVER_TYPE:
            continue
        servers.append(
            ServerStat(
                backend=values["pxname"],
                name=values["svname"],
                status=values["status"],
                sessions=_integer(values["scur"]) or 0,
                checkStatus=values.get("check_status", ""),
                checkDescription=values.get("check_desc", ""),
                checkHealth=_integer(values.get("check_health", "")),
                checkRise=_integer(values.get("check_rise", "")),
                checkFall=_integer(values.get("check_fall", "")),
            )
        )
    return servers


@frozen
class ServerState:
    """
    One server's row of C{show servers state}.

    @ivar backend: the backend's name.
    @ivar name: the server's name.
    @ivar address: its address.
    @ivar operationalState: C{srv_op_state}: 0 stopped, 1 starting,
        2 running, 3 stopping.
    @ivar adminState: C{srv_admin_state}, a bit field (L{ADMIN_MAINT},
        L{ADMIN_DRAIN}).
    """

    backend: str
    name: str
    address: str
    operationalState: int
    adminState: int

    @property
    def running(self) -> bool:
        """
        Whether HAProxy considers the server running.
        """
        return self.operationalState == _RUNNING

    @property
    def inMaintenance(self) -> bool:
        """
        Whether the server is in maintenance, for any reason.
        """
        return bool(self.adminState & ADMIN_MAINT)

    @property
    def draining(self) -> bool:
        """
        Whether the server is draining.
        """
        return bool(self.adminState & ADMIN_DRAIN)

    @property
    def ready(self) -> bool:
        """
        Whether the server's administrative state is C{ready}.
        """
        return not (self.inMaintenance or self.draining)

    def describeAdmin(self) -> str:
        """
        C{"ready"}, C{"drain"} or C{"maint"}.
        """
        if self.inMaintenance:
            return "maint"
        if self.draining:
            return "drain"
        return "ready"


def parseServersState(
    answer: str, command: str = "show servers state"
) -> list[ServerState]:
    """
    The rows of a C{show servers state} answer (format version 1: a version
    line, a C{# be_id be_name ...} header, space-separated rows).

    @raise UnexpectedAnswer: if C{answer} is not in that format (HAProxy
        answers C{"Can't find backend."} for an unknown name, for example).
    """
    lines = answer.split("\n")
    if len(lines) < 2 or lines[0].strip() != "1" or not lines[1].startswith("# "):
        raise UnexpectedAnswer(command, answer)
    header = lines[1][2:].split()
    needed = ("be_name", "srv_name", "srv_addr", "srv_op_state", "srv_admin_state")
    if not all(name in header for name in needed):
        raise UnexpectedAnswer(command, answer)
    states = []
    for line in lines[2:]:
        if not line.strip():
            continue
        values = dict(zip(header, line.split()))
        operational = _integer(values.get("srv_op_state", ""))
        admin = _integer(values.get("srv_admin_state", ""))
        if operational is None or admin is None or "srv_name" not in values:
            raise UnexpectedAnswer(command, line)
        states.append(
            ServerState(
                backend=values["be_name"],
                name=values["srv_name"],
                address=values["srv_addr"],
                operationalState=operational,
                adminState=admin,
            )
        )
    return states


def _checkName(what: str, name: str) -> str:
    if not _NAME.match(name):
        raise ValueError("not a valid HAProxy {} name: {!r}".format(what, name))
    return name


def _expectEmpty(answer: str, command: str) -> None:
    if answer.strip():
        raise HAProxyError(command, answer.strip())


@define
class HAProxyClient:
    """
    The runtime API commands a rolling upgrade uses.

    Every method fails with L{HAProxyUnreachable} when HAProxy cannot be
    reached, L{HAProxyError} when it refuses the command, and L{ValueError}
    (at once) for a name HAProxy could not hold.
    """

    _api: RuntimeAPI

    def _send(self, command: str) -> Deferred[str]:
        return self._api.command(command)

    def serverStats(self, backend: str) -> Deferred[list[ServerStat]]:
        """
        C{show stat BACKEND 4 -1}: the server rows of one backend.
        """
        command = "show stat {} 4 -1".format(_checkName("backend", backend))
        return self._send(command).addCallback(parseStat, command)

    def serversState(self, backend: str) -> Deferred[list[ServerState]]:
        """
        C{show servers state BACKEND}.
        """
        command = "show servers state {}".format(_checkName("backend", backend))
        return self._send(command).addCallback(parseServersState, command)

    def setServerState(self, backend: str, server: str, state: str) -> Deferred[None]:
        """
        C{set server BACKEND/SERVER state STATE}, STATE one of C{ready},
        C{drain}, C{maint}.
        """
        if state not in _STATES:
            raise ValueError("state must be one of {}: {!r}".format(_STATES, state))
        command = "set server {}/{} state {}".format(
            _checkName("backend", backend), _checkName("server", server), state
        )
        return self._send(command).addCallback(_expectEmpty, command)

    def setServerHealth(self, backend: str, server: str, health: str) -> Deferred[None]:
        """
        C{set server BACKEND/SERVER health HEALTH}, HEALTH one of C{up},
        C{stopping}, C{down}.  Forcing C{down} makes HAProxy prove the
        server healthy again with C{rise} successful checks in a row.
        """
        if health not in _HEALTHS:
            raise ValueError("health must be one of {}: {!r}".format(_HEALTHS, health))
        command = "set server {}/{} health {}".format(
            _checkName("backend", backend), _checkName("server", server), health
        )
        return self._send(command).addCallback(_expectEmpty, command)
