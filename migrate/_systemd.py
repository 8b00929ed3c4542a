# -*- test-case-name: migrate.test.test_systemd -*-
"""
Fitting into systemd: the notification protocol (C{sd_notify}) spoken
directly over C{$NOTIFY_SOCKET}, and socket activation across generations.

Who says what, so that systemd (with C{NotifyAccess=all}) always tracks the
process that serves:

    - the process that starts serving (the first one, or a successor once
      its hand-off committed) says C{READY=1} and C{MAINPID=} its own pid,
      with a C{STATUS=} line.  A successor does not wait for the old process
      to announce it: from its commit on it is the only process that
      accepts, so it claims the main pid at once, and its C{READY=1} ends a
      reload systemd is waiting for;
    - the serving process says C{RELOADING=1} with C{MONOTONIC_USEC=} when a
      migration starts (C{Type=notify-reload} waits for it after sending
      C{SIGHUP}), and C{READY=1} again if the migration rolls back (it still
      serves: nobody else will end the reload).  A C{SIGHUP} that arrives
      while a migration runs starts none, but gets C{RELOADING=1} again with
      the current time, so that the reload it stands for ends with the
      running migration rather than at systemd's timeout;
    - the old process, once the hand-off committed, says C{MAINPID=} the new
      pid (systemd trusts the current main process most: this works even
      where the successor's own claim was refused) and then says nothing
      more: its C{STATUS=} would overwrite the serving process's, and a
      late C{READY=1} could end the next reload early.  It drains and exits
      as an ordinary process of the unit; systemd, which already watches the
      new main pid, does not take that exit for the service's;
    - while it serves, a process refreshes C{STATUS=} when its generation,
      connection count, draining generations or migration phase change
      (checked every L{SystemdNotifier.statusInterval} seconds).

Every message is one datagram, sent without blocking; a failure to send is
logged once and otherwise ignored: systemd's bookkeeping must never stop a
service.

Socket activation: the first process reads C{LISTEN_FDS}, C{LISTEN_PID} and
C{LISTEN_FDNAMES} through Twisted's C{systemd:} endpoint parser (once, when
C{twisted.internet.endpoints} is imported).  Successors never read them:
C{LISTEN_PID} would name the old process and descriptor 3 is the hand-off
socket there.  They inherit the very same listening sockets through the
hand-off, under the same key (the endpoint description), so
L{successorEnvironment} removes the variables from what they inherit and
L{checkActivatedListener} does not look the descriptor up in a successor.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from ._handoff._listeners import adoptListener

__all__ = [
    "ACTIVATION_VARIABLES",
    "NOTIFY_SOCKET_VARIABLE",
    "SystemdNotifier",
    "activatedEndpoint",
    "checkActivatedListener",
    "inheritsListeners",
    "isActivated",
    "mainPidMessage",
    "notifierFromEnvironment",
    "notifyAddress",
    "readyMessage",
    "reloadingMessage",
    "statusLine",
    "statusMessage",
    "successorEnvironment",
]

NOTIFY_SOCKET_VARIABLE = "NOTIFY_SOCKET"
"""
Where systemd listens for notifications: a path, or C{@NAME} for a socket
in the abstract namespace.
"""

ACTIVATION_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
"""
The socket activation variables, meant only for the process systemd
started.
"""

_ACTIVATED_PREFIX = "systemd:"

_INHERITING_VARIABLES = (
    "MIGRATE_HANDOFF_FD",
    "MIGRATE_REEXEC_STATE_FD",
    "MIGRATE_REEXEC_PREFLIGHT",
)
"""
Set in processes that inherit their listeners from a previous generation
(see L{migrate._handoff._successor} and the re-exec strategy).
"""

_MAX_STATUS_CHARACTERS = 1000
"""
Longer status lines are cut (systemd takes datagrams up to 4 kB).
"""


# Messages


def _monotonicMicroseconds() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _oneLine(text: str) -> str:
    line = " ".join(text.split())
    if len(line) > _MAX_STATUS_CHARACTERS:
        line = line[: _MAX_STATUS_CHARACTERS - 3] + "..."
    return line


def _message(*assignments: tuple[str, object]) -> bytes:
    return "".join("{}={}\n".format(name, value) for name, value in assignments).encode(
        "utf-8"
    )


def statusMessage(status: str) -> bytes:
    """
    C{STATUS=}: a line for C{systemctl status}.

    @param status: the text; whitespace runs (newlines included) become
        single spaces, and a very long text is cut.
    """
    return _message(("STATUS", _oneLine(status)))


def readyMessage(pid: int, status: str) -> bytes:
    """
    C{READY=1}: process C{pid} serves, and is the service's main process.
    """
    return _message(("READY", 1), ("MAINPID", pid), ("STATUS", _oneLine(status)))


def reloadingMessage(monotonicMicroseconds: int, status: str) -> bytes:
    """
    C{RELOADING=1}: a migration starts.  C{MONOTONIC_USEC} (C{CLOCK_MONOTONIC}
    in microseconds) tells C{Type=notify-reload} that this reload began
    after the signal it sent.
    """
    return _message(
        ("RELOADING", 1),
        ("MONOTONIC_USEC", monotonicMicroseconds),
        ("STATUS", _oneLine(status)),
    )


def mainPidMessage(pid: int) -> bytes:
    """
    C{MAINPID=}: process C{pid} is the service's main process now.
    """
    return _message(("MAINPID", pid))


def _connections(count: int) -> str:
    return "1 connection" if count == 1 else "{} connections".format(count)


def statusLine(snapshot: Mapping[str, Any]) -> str:
    """
    Describe a host in one line, from its status snapshot
    (L{migrate.MigrationHost.statusSnapshot}): generation, pid, connections,
    draining generations and, during a migration, its phase.

    For example C{generation 3 in pid 4242, 17 connections; draining:
    generation 2 in pid 4100, 3 connections}.
    """
    parts = [
        "generation {} in pid {}, {}".format(
            snapshot.get("generation"),
            snapshot.get("pid"),
            _connections(int(snapshot.get("connections") or 0)),
        )
    ]
    draining = snapshot.get("draining") or []
    if draining:
        parts.append(
            "draining: "
            + ", ".join(
                "generation {} in pid {}, {}".format(
                    each.get("generation"),
                    each.get("pid"),
                    _connections(int(each.get("connections") or 0)),
                )
                for each in draining
            )
        )
    else:
        parts.append("draining: none")
    phase = snapshot.get("phase")
    if phase and phase != "idle":
        parts.append("migrating: {}".format(phase))
    return "; ".join(parts)


# Sending


def notifyAddress(value: str) -> bytes:
    """
    The address to send notifications to, from C{$NOTIFY_SOCKET}.

    @param value: an absolute path, or C{@NAME} for the abstract namespace.

    @return: a Unix datagram address (abstract names start with a NUL).

    @raise ValueError: for anything else (systemd's C{vsock:} addresses,
        relative paths, an empty value).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    raise ValueError(
        "{}={!r} is neither an absolute path nor an abstract socket name "
        "(@NAME)".format(NOTIFY_SOCKET_VARIABLE, value)
    )


class _Sender(Protocol):
    def sendto(self, data: bytes, address: bytes) -> int: ...

    def close(self) -> None: ...


def _datagramSocket() -> _Sender:
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # A full receive queue must not block the reactor: drop the message.
    sender.setblocking(False)
    return sender


class SystemdNotifier:
    """
    Tells systemd about a L{migrate.MigrationHost}'s life: a lifecycle
    observer (C{host.addObserver}) speaking C{sd_notify}.  See the module
    docstring for which process says what, and why.

    @ivar address: where the messages go (see L{notifyAddress}).
    @ivar statusInterval: seconds between checks for a changed status line
        while serving; L{None} to send status only with lifecycle changes.
    @ivar handedOnTo: the process this one handed its service on to, if it
        did (it says nothing more then).
    """

    _log = Logger()

    def __init__(
        self,
        address: bytes,
        *,
        statusInterval: float | None = 2.0,
        monotonicMicroseconds: Callable[[], int] = _monotonicMicroseconds,
        socketFactory: Callable[[], _Sender] = _datagramSocket,
    ) -> None:
        """
        @param address: see L{notifyAddress}.
        @param statusInterval: see L{statusInterval}.
        @param monotonicMicroseconds: reads C{CLOCK_MONOTONIC} in
            microseconds.
        @param socketFactory: makes the unconnected datagram socket the
            messages are sent with.
        """
        self.address = address
        self.statusInterval = statusInterval
        self.handedOnTo: int | None = None
        self._monotonicMicroseconds = monotonicMicroseconds
        self._socketFactory = socketFactory
        self._socket: _Sender | None = None
        self._failing = False
        self._lastStatus: str | None = None
        self._refresh: Any = None

    def __repr__(self) -> str:
        return "<SystemdNotifier {!r}>".format(self.address)

    # Lifecycle observer

    def serving(self, host: Any) -> None:
        """
        The host serves: C{READY=1}, C{MAINPID=} its pid, C{STATUS=}.
        """
        self.handedOnTo = None
        status = self._status(host)
        self.send(readyMessage(host.pid, status))
        # Say the status once more at the first check, even unchanged: the
        # previous generation may refresh its own between this process's
        # commit and its hand-on, and systemd keeps the last one it got.
        self._lastStatus = None
        self._watch(host)

    def migrationStarted(self, host: Any) -> None:
        """
        A migration starts: C{RELOADING=1} with C{MONOTONIC_USEC=}.
        """
        if self.handedOnTo is not None:
            return
        self.send(reloadingMessage(self._monotonicMicroseconds(), self._status(host)))

    def reloadJoined(self, host: Any) -> None:
        """
        C{SIGHUP} during a migration (C{Type=notify-reload} sent it for a
        new reload): C{RELOADING=1} again with the current
        C{MONOTONIC_USEC}, which systemd needs to see to take this reload
        as begun; the running migration's C{READY=1} ends it.
        """
        self.migrationStarted(host)

    def handedOn(self, host: Any, newPid: int) -> None:
        """
        The service belongs to C{newPid} now: C{MAINPID=newPid}, then
        silence (the new process speaks for the service).
        """
        self.handedOnTo = newPid
        self._stopWatching()
        self.send(mainPidMessage(newPid))

    def migrationEnded(self, host: Any, report: Any) -> None:
        """
        A migration ended.  Rolled back (or crashed): this process still
        serves, so it says C{READY=1} to end the reload.  Committed: the
        new process already said it.
        """
        if self.handedOnTo is not None:
            return
        self.send(readyMessage(host.pid, self._status(host)))

    # Status

    def _status(self, host: Any) -> str:
        line = statusLine(host.statusSnapshot())
        self._lastStatus = line
        return line

    def _watch(self, host: Any) -> None:
        self._stopWatching()
        if self.statusInterval is None:
            return

        def check() -> None:
            self._refresh = None
            if self.handedOnTo is not None or not host.serving:
                return
            try:
                line = statusLine(host.statusSnapshot())
            except Exception:
                self._log.failure("Could not describe the host for systemd")
            else:
                if line != self._lastStatus:
                    self._lastStatus = line
                    self.send(statusMessage(line))
            self._refresh = host.reactor.callLater(self.statusInterval, check)

        self._refresh = host.reactor.callLater(self.statusInterval, check)

    def _stopWatching(self) -> None:
        if self._refresh is not None and self._refresh.active():
            self._refresh.cancel()
        self._refresh = None

    # Sending

    def send(self, message: bytes) -> bool:
        """
        Send one notification datagram.

        @return: whether it was sent.  A failure is logged the first time
            (and again only after a later message got through); it never
            raises.
        """
        try:
            if self._socket is None:
                self._socket = self._socketFactory()
            self._socket.sendto(message, self.address)
        except Exception as e:
            if not self._failing:
                self._failing = True
                self._log.warn(
                    "Cannot notify systemd at {address!r}: {error} (further "
                    "failures are not logged)",
                    address=self.address,
                    error=str(e) or type(e).__name__,
                    message=message,
                )
            return False
        if self._failing:
            self._failing = False
            self._log.info("Notifying systemd works again")
        return True

    def close(self) -> None:
        """
        Stop refreshing the status and close the socket.
        """
        self._stopWatching()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def notifierFromEnvironment(
    environ: Mapping[str, str] | None = None,
) -> SystemdNotifier | None:
    """
    A L{SystemdNotifier} for C{$NOTIFY_SOCKET}, or L{None} when systemd (or
    another supervisor speaking its protocol) did not ask for notifications.

    The variable stays in the environment: successors inherit it and speak
    for the service once they serve.  An unusable value is logged and
    ignored.

    @param environ: the environment, L{os.environ} by default.
    """
    if environ is None:
        environ = os.environ
    value = environ.get(NOTIFY_SOCKET_VARIABLE)
    if not value:
        return None
    try:
        address = notifyAddress(value)
    except ValueError as e:
        SystemdNotifier._log.warn("Not notifying systemd: {why}", why=str(e))
        return None
    return SystemdNotifier(address)


# Socket activation


def successorEnvironment(environ: Mapping[str, str]) -> dict[str, str]:
    """
    The environment for a successor: C{environ} without the socket
    activation variables (L{ACTIVATION_VARIABLES}), which are meant only
    for the process systemd started.  C{NOTIFY_SOCKET} stays.

    @param environ: this process's environment (typically L{os.environ}).
    """
    return {
        name: value
        for name, value in environ.items()
        if name not in ACTIVATION_VARIABLES
    }


def isActivated(description: str) -> bool:
    """
    Whether an endpoint description names a socket systemd passes
    (Twisted's C{systemd:} endpoint).
    """
    return description.startswith(_ACTIVATED_PREFIX)


class _ParseOnly:
    """
    Stands in for a reactor while an endpoint description is parsed.
    """


def _activatedDescriptor(description: str) -> tuple[int, int]:
    """
    Find the descriptor and address family Twisted's C{systemd:} parser
    resolves C{description} to.

    @raise ValueError: if systemd passed no such socket.
    """
    try:
        from twisted.internet.endpoints import serverFromString

        endpoint: Any = serverFromString(_ParseOnly(), description)
    except (IndexError, KeyError):
        raise ValueError(
            "systemd passed no socket for {!r} (this process was not started "
            "with LISTEN_FDS, LISTEN_PID naming it, and LISTEN_FDNAMES for "
            "name=)".format(description)
        ) from None
    except AttributeError:
        raise ValueError(
            "{!r}: domain must be an address family such as INET, INET6 "
            "or UNIX".format(description)
        ) from None
    return int(endpoint.fileno), int(endpoint.addressFamily)


def inheritsListeners(environ: Mapping[str, str] | None = None) -> bool:
    """
    Whether this process gets its listeners from a previous generation (a
    successor, a re-executed image, or its pre-flight check) rather than
    from systemd.

    @param environ: the environment, L{os.environ} by default; read before
        the hand-off variables are consumed (while options are parsed).
    """
    if environ is None:
        environ = os.environ
    return any(name in environ for name in _INHERITING_VARIABLES)


def checkActivatedListener(description: str, *, inheriting: bool | None = None) -> bool:
    """
    Check a C{--listen} description if it names a systemd-activated socket.

    In the process systemd started, the socket must have been passed and be
    a listening stream socket of the given domain.  In a successor, nothing
    is looked up: the listener arrives through the hand-off under the same
    description (the old process checks the keys match).

    @param description: the endpoint description.
    @param inheriting: whether this process inherits its listeners from a
        previous generation; by default, L{inheritsListeners}.

    @return: L{False} if C{description} is not a C{systemd:} one (the caller
        checks it as usual), L{True} once checked.

    @raise ValueError: with a clear message, if it cannot work.
    """
    if not isActivated(description):
        return False
    if inheriting is None:
        inheriting = inheritsListeners()
    if inheriting:
        return True
    fd, family = _activatedDescriptor(description)
    try:
        with socket.socket(fileno=os.dup(fd)) as probe:
            if probe.type != socket.SOCK_STREAM or not probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise ValueError(
                    "{!r}: descriptor {} is not a listening stream socket "
                    "(a socket unit with Accept=yes is not supported)".format(
                        description, fd
                    )
                )
            if probe.family != family:
                raise ValueError(
                    "{!r}: descriptor {} is an {} socket".format(
                        description, fd, probe.family.name
                    )
                )
    except OSError as e:
        raise ValueError(
            "{!r}: descriptor {} is not a usable socket: {}".format(
                description, fd, e.strerror
            )
        ) from None
    return True


class _ActivatedEndpoint:
    """
    Listens on a socket systemd passed, the way listeners handed over
    between generations are adopted (L{migrate._handoff._listeners.adoptListener}):
    non-blocking, and a Unix socket keeps the mode its socket unit gave it
    (Twisted's own adoption makes it 0666 and, when it stops, shuts the
    socket down and unlinks its path, which breaks the socket unit).
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd: int | None = fd

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        fd, self._fd = self._fd, None
        if fd is None:
            return fail(RuntimeError("a systemd socket is adopted once"))
        try:
            return succeed(adoptListener(self._reactor, fd, factory, accepting=True))
        except Exception:
            return fail()


def activatedEndpoint(reactor: Any, description: str) -> Any:
    """
    An endpoint for C{description} if it names a socket systemd passed,
    else L{None}.

    Stop a port it made with L{migrate._handoff._listeners.releaseListener}, never
    C{stopListening}: systemd keeps the socket for the next activation.

    @raise ValueError: if systemd passed no such socket.
    """
    if not isActivated(description):
        return None
    fd, family = _activatedDescriptor(description)
    return _ActivatedEndpoint(reactor, fd)
