# -*- test-case-name: migrate.test.test_control -*-
"""
The control channel, server side: the Unix socket through which an operator
(C{python -m migrate}) asks a running host for its status and tells it to
migrate.

The channel speaks AMP over a Unix socket that only the host's own user and
root can reach: the socket file is created with mode 0600 and every
connection's peer credentials are checked before a single byte is answered.
Each message is bounded (L{MAX_BOX_BYTES}, L{MAX_BOX_KEYS}) and anything that
does not parse is logged and disconnected; nothing a client sends can raise
into the reactor or reach the host except a well-formed command.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .._handoff._listeners import adoptListener
from ._commands import MigrationInProgress, Progress, Status, Stop, Upgrade
from ._limits import BoundedBoxParser

__all__ = [
    "MAX_BOX_BYTES",
    "MAX_BOX_KEYS",
    "MAX_REPLY_BYTES",
    "ControlFactory",
    "ControlProtocol",
    "ControlSocketError",
    "ControlSocketInUse",
    "IControlledHost",
    "adoptControl",
    "bindControlSocket",
    "controlSocketLive",
    "encodeReport",
    "encodeStatus",
    "listenControl",
]

MAX_BOX_BYTES = 64 * 1024
"""
The largest AMP box a client may send, counting every length prefix, key,
value and the terminating empty key.
"""

MAX_BOX_KEYS = 32
"""
The most keys one AMP box from a client may hold.
"""

MAX_REPLY_BYTES = 60000
"""
The JSON answers (status, report) are kept below this many bytes, well under
AMP's 65,535-byte value limit.
"""

_MAX_PROGRESS_CHARS = 4000
_MAX_ENTRY_CHARS = 4000
_PEERCRED = struct.Struct("3i")


class ControlSocketError(Exception):
    """
    The control socket cannot be created at the requested path.
    """


class ControlSocketInUse(ControlSocketError):
    """
    Another live host already serves the control socket at this path.

    @ivar path: the path of the socket.
    """

    def __init__(self, path: str) -> None:
        super().__init__(
            "control socket {} is in use by another live host (a connection "
            "to it succeeded); stop that host or choose another "
            "--control path".format(path)
        )
        self.path = path


_COMMANDS: dict[bytes, type[amp.Command]] = {
    Status.commandName: Status,
    Upgrade.commandName: Upgrade,
    Stop.commandName: Stop,
}


class IControlledHost(Protocol):
    """
    What the control channel needs from the host it controls.
    """

    def statusSnapshot(self) -> dict[str, Any]:
        """
        Describe the host now as JSON-compatible data (Status JSON).
        """

    def requestUpgrade(
        self,
        strategyName: str | None,
        progress: Callable[[str], None],
        overrides: Mapping[str, float] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Migrate with the named strategy, or the configured one for L{None}.

        @param progress: called with one line of text at each step.
        @param overrides: host settings for this migration only, by name
            (C{readyTimeout}, C{drainTimeout}).
        @return: a L{Deferred} firing with the report (Report JSON) or
            failing with L{migrate._control._commands.MigrationInProgress} or
            L{migrate._control._commands.UnknownStrategy}.
        """


# Bounding the JSON answers


def _encodedLength(value: object) -> int:
    return len(json.dumps(value).encode("utf-8"))


def _clip(text: object, limit: int = _MAX_ENTRY_CHARS) -> str:
    text = str(text)
    if len(text) <= limit:
        return text
    return text[:limit] + " [...{} characters cut]".format(len(text) - limit)


def _largestFitting(fits: Callable[[int], bool], upper: int) -> int | None:
    """
    The largest C{n} in C{[0, upper]} for which C{fits(n)} holds, assuming
    C{fits} is monotone (true up to some point), or L{None} if none does.
    """
    if not fits(0):
        return None
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def encodeReport(report: dict[str, Any], limit: int = MAX_REPLY_BYTES) -> str:
    """
    Encode a migration report as JSON text of fewer than C{limit} bytes.

    A report that does not fit loses the oldest lines of its C{successorLog}
    first, then the last of its C{notes}, and says so in a note; a report
    that still does not fit is cut down to its summary fields.

    @param report: Report JSON (a L{dict}).
    @param limit: the size the encoded text must stay below.
    @return: the JSON text.
    """
    text = json.dumps(report)
    if len(text.encode("utf-8")) < limit:
        return text
    log = [_clip(line) for line in report.get("successorLog") or []]
    notes = [_clip(note) for note in report.get("notes") or []]

    def candidate(keepLog: int, keepNotes: int) -> dict[str, Any]:
        bounded = dict(report)
        bounded["successorLog"] = log[len(log) - keepLog :]
        bounded["notes"] = notes[:keepNotes] + [
            "report truncated to fit the control channel: {} of {} successor "
            "log lines and {} of {} notes omitted".format(
                len(log) - keepLog, len(log), len(notes) - keepNotes, len(notes)
            )
        ]
        return bounded

    def fits(value: object) -> bool:
        return _encodedLength(value) < limit

    keepLog = _largestFitting(lambda n: fits(candidate(n, len(notes))), len(log))
    if keepLog is not None:
        return json.dumps(candidate(keepLog, len(notes)))
    keepNotes = _largestFitting(lambda n: fits(candidate(0, n)), len(notes))
    if keepNotes is not None:
        return json.dumps(candidate(0, keepNotes))
    summary: dict[str, Any] = {
        key: report.get(key)
        for key in (
            "fromGeneration",
            "toGeneration",
            "oldPid",
            "newPid",
            "moved",
            "draining",
            "failed",
        )
        if isinstance(report.get(key), int)
    }
    summary["strategy"] = _clip(report.get("strategy"), 200)
    summary["outcome"] = _clip(report.get("outcome"), 200)
    reason = report.get("reason")
    summary["reason"] = None if reason is None else _clip(reason, 2000)
    summary["listeners"] = []
    summary["durations"] = {}
    summary["successorLog"] = []
    summary["notes"] = [
        "report truncated to its summary to fit the control channel "
        "(it was {} bytes)".format(len(text.encode("utf-8")))
    ]
    return json.dumps(summary)


def encodeStatus(status: dict[str, Any], limit: int = MAX_REPLY_BYTES) -> str:
    """
    Encode a status snapshot as JSON text of fewer than C{limit} bytes.

    An oversized snapshot has its C{lastReport} bounded to half the room,
    then its C{listeners} and C{draining} lists shortened; C{"truncated": true} is
    added whenever anything was cut.

    @param status: Status JSON (a L{dict}).
    @param limit: the size the encoded text must stay below.
    @return: the JSON text.
    """
    text = json.dumps(status)
    if len(text.encode("utf-8")) < limit:
        return text
    bounded = dict(status)
    bounded["truncated"] = True
    lastReport = status.get("lastReport")
    if isinstance(lastReport, dict):
        bounded["lastReport"] = json.loads(encodeReport(lastReport, limit // 2))
    listeners = list(status.get("listeners") or [])
    draining = list(status.get("draining") or [])

    def candidate(keep: int) -> dict[str, Any]:
        shortened = dict(bounded)
        shortened["listeners"] = listeners[:keep]
        shortened["draining"] = draining[:keep]
        return shortened

    keep = _largestFitting(
        lambda n: _encodedLength(candidate(n)) < limit,
        max(len(listeners), len(draining)),
    )
    if keep is not None:
        return json.dumps(candidate(keep))
    return json.dumps(
        {
            key: status.get(key)
            for key in ("pid", "generation", "connections")
            if isinstance(status.get(key), int)
        }
        | {"truncated": True, "listeners": [], "draining": [], "lastReport": None}
    )


# The protocol


def _peerCredentials(transport: object) -> tuple[int, int, int] | None:
    """
    The (pid, uid, gid) of the process at the other end of a Unix socket
    transport, or L{None} if they cannot be read.
    """
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        raw = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
    except Exception:
        return None
    return pid, uid, gid


class ControlProtocol(BoundedBoxParser, amp.AMP):
    """
    One control connection: answers L{Status}, L{Upgrade} and L{Stop} for the host,
    and sends L{Progress} while an upgrade runs.

    Only the host's own user and root may talk to it; every box is bounded
    (L{BoundedBoxParser}, to L{MAX_BOX_BYTES} and L{MAX_BOX_KEYS}) and
    validated before dispatch, so malformed input is logged and the
    connection dropped without disturbing the host.

    @ivar peer: the peer's (pid, uid, gid), once known.
    """

    _log = Logger()

    maxBoxBytes = MAX_BOX_BYTES
    maxBoxKeys = MAX_BOX_KEYS

    def __init__(self, host: IControlledHost) -> None:
        super().__init__()
        self._host = host
        self._dropped = False
        self.peer: tuple[int, int, int] | None = None

    # Who may talk

    def makeConnection(self, transport: Any) -> None:
        """
        Connect without L{amp.AMP}'s log line at info level: a monitoring
        loop asking for the status every second would flood the host's
        log.  The connection is logged at debug level instead.
        """
        # What amp.AMP.makeConnection sets, for its connectionLost.
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        self._log.debug("Control connection opened")
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Disconnected: logged at debug level (see L{makeConnection}).
        """
        self._log.debug(
            "Control connection closed: {reason}", reason=reason.getErrorMessage()
        )
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def connectionMade(self) -> None:
        """
        Check the peer's credentials; cut anyone but this user and root.
        """
        self.peer = _peerCredentials(self.transport)
        if self.peer is None:
            self._log.warn(
                "Rejected a control connection: cannot read its peer credentials"
            )
            self._drop()
            return
        pid, uid, gid = self.peer
        if uid not in (os.getuid(), 0):
            self._log.warn(
                "Rejected a control connection from pid {pid} uid {uid}: only "
                "uid {allowed} and root may control this host",
                pid=pid,
                uid=uid,
                allowed=os.getuid(),
            )
            self._drop()

    def _drop(self, why: str | None = None) -> None:
        """
        Stop reading and disconnect at once, logging C{why} if given.
        """
        if self._dropped:
            return
        self._dropped = True
        self.stopParsing()
        if why is not None:
            pid = None if self.peer is None else self.peer[0]
            self._log.warn(
                "Dropped the control connection from pid {pid}: {why}",
                pid=pid,
                why=why,
            )
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # Bounded parsing

    def dataReceived(self, data: bytes) -> None:
        """
        Parse boxes from C{data}; nothing it contains escapes as an
        exception.
        """
        if self._dropped:
            return
        try:
            super().dataReceived(data)
        except Exception as e:
            self._drop("malformed input ({})".format(_clip(repr(e), 200)))

    def boxRefused(self, why: str) -> None:
        """
        A box broke a bound of L{BoundedBoxParser}: drop the connection.
        """
        self._drop(why)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        """
        Nobody passes descriptors over the control channel: close it and
        disconnect.
        """
        try:
            os.close(descriptor)
        finally:
            self._drop("unexpected file descriptor received")

    # Validated dispatch

    def locateResponder(self, name: bytes) -> Any:
        """
        Only L{Status}, L{Upgrade} and L{Stop} are answered (not AMP's built-in
        StartTLS, nor C{amp_*} methods).
        """
        if name not in _COMMANDS:
            return None
        return super().locateResponder(name)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        """
        Dispatch a well-formed command; drop the connection for anything
        else (answers we never asked for, boxes without a command,
        commands whose arguments do not parse).
        """
        if self._dropped:
            return
        if amp.COMMAND not in box or amp.ASK not in box:
            self._drop("message is not a command expecting an answer")
            return
        command = _COMMANDS.get(box[amp.COMMAND])
        if command is not None:
            try:
                command.parseArguments(box, self)
            except Exception as e:
                self._drop(
                    "malformed {} command ({})".format(
                        command.__name__, _clip(repr(e), 200)
                    )
                )
                return
        super().ampBoxReceived(box)

    # Commands

    @Status.responder
    def status(self) -> dict[str, str]:
        return {"status": encodeStatus(self._host.statusSnapshot())}

    @Upgrade.responder
    def upgrade(
        self,
        strategy: str | None = None,
        readyTimeout: float | None = None,
        drainTimeout: float | None = None,
    ) -> Deferred[dict[str, str]]:
        given = {"readyTimeout": readyTimeout, "drainTimeout": drainTimeout}
        overrides = {name: value for name, value in given.items() if value is not None}
        if overrides:
            d = maybeDeferred(
                self._host.requestUpgrade, strategy or None, self._progress, overrides
            )
        else:
            # A host that takes no overrides (an embedding's own) still works.
            d = maybeDeferred(
                self._host.requestUpgrade, strategy or None, self._progress
            )

        def encode(report: Any) -> dict[str, str]:
            if not isinstance(report, dict) and hasattr(report, "toJSON"):
                report = report.toJSON()
            return {"report": encodeReport(report)}

        return d.addCallback(encode)

    @Stop.responder
    def stop(self, drainTimeout: float | None = None) -> Deferred[dict[str, str]]:
        # A host that can stop (L{migrate.MigrationHost.requestStop}); the
        # control channel needs nothing more of the others.
        requestStop = getattr(self._host, "requestStop", None)
        if requestStop is None:
            return fail(MigrationInProgress("this host cannot stop on request"))
        d = maybeDeferred(requestStop, drainTimeout, self._progress)
        # A handful of keys and one pid per generation: far below AMP's
        # limit.
        return d.addCallback(lambda result: {"result": json.dumps(result)})

    def _progress(self, message: str) -> None:
        """
        Tell the client how the upgrade goes; a client that has gone away
        is no reason to disturb the migration.
        """
        if self._dropped or self.transport is None:
            return
        try:
            self.callRemote(Progress, message=_clip(message, _MAX_PROGRESS_CHARS))
        except Exception as e:
            self._log.debug(
                "Progress not delivered to the control client: {error}",
                error=repr(e),
            )


class ControlFactory(Factory):
    """
    Builds a L{ControlProtocol} bound to C{host} for every control
    connection.
    """

    noisy = False

    def __init__(self, host: IControlledHost) -> None:
        self.host = host

    def buildProtocol(self, addr: object) -> ControlProtocol:
        protocol = ControlProtocol(self.host)
        protocol.factory = self
        return protocol


# The socket


def controlSocketLive(path: str) -> bool:
    """
    Whether a process accepts connections on the Unix socket at C{path}.

    @raise ControlSocketError: if that cannot be told.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (BlockingIOError, InterruptedError):
            return True  # Accept backlog full: somebody listens.
        except ConnectionRefusedError:
            return False
        except FileNotFoundError:
            return False
        except OSError as e:
            raise ControlSocketError(
                "cannot tell whether the existing control socket {} is in use "
                "({}); remove it if no host serves it".format(path, e.strerror)
            ) from e
        return True
    finally:
        probe.close()


def bindControlSocket(path: str, *, mode: int = 0o600) -> socket.socket:
    """
    Create the listening control socket at C{path}.

    The socket file has C{mode} from the first instant (it is bound under a
    tightened umask).  A stale socket file left by a dead host is replaced;
    anything else at C{path} is left alone.

    @param path: the socket's filesystem path.  Bound by its absolute path
        when that fits in a socket address, so that a later change of
        directory does not matter.
    @param mode: the permission bits of the socket file.
    @return: a listening, non-blocking C{AF_UNIX} socket.
    @raise ControlSocketInUse: if a live host already serves C{path}.
    @raise ControlSocketError: if C{path} exists and is not a socket, or
        its directory does not exist, or binding fails otherwise.
    """
    path = os.fsdecode(path)
    absolute = os.path.abspath(path)
    if len(os.fsencode(absolute)) < 108:
        path = absolute
    directory = os.path.dirname(absolute)
    if not os.path.isdir(directory):
        raise ControlSocketError(
            "cannot create control socket {}: directory {} does not "
            "exist".format(path, directory)
        )
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ControlSocketError(
            "cannot create control socket {}: {}".format(path, e.strerror)
        ) from e
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ControlSocketError(
                "cannot create control socket {}: a file that is not a socket "
                "is in the way (left untouched; remove it or choose another "
                "--control path)".format(path)
            )
        if controlSocketLive(path):
            raise ControlSocketInUse(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        previous = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(previous)
        bound = True
        os.chmod(path, mode)
        sock.listen(50)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if bound:
            try:
                os.unlink(path)
            except OSError:
                pass
        if e.errno == errno.EADDRINUSE:
            raise ControlSocketInUse(path) from e
        raise ControlSocketError(
            "cannot create control socket {}: {}".format(path, e.strerror or e)
        ) from e
    return sock


def listenControl(reactor: Any, path: str, host: IControlledHost) -> IListeningPort:
    """
    Serve the control channel for C{host} on a new Unix socket at C{path}
    with C{reactor} (an C{IReactorSocket} posix reactor)
    (mode 0600 from the first instant, see L{bindControlSocket}; Twisted's
    chmod to 0666 is prevented by C{adoptListener}).

    @raise ControlSocketError: see L{bindControlSocket}.
    """
    sock = bindControlSocket(path)
    try:
        return adoptListener(
            reactor, os.dup(sock.fileno()), ControlFactory(host), accepting=True
        )
    finally:
        sock.close()


def adoptControl(
    reactor: Any,
    fd: int,
    host: IControlledHost,
    *,
    accepting: bool = True,
) -> IListeningPort:
    """
    Serve the control channel for C{host} on a listening Unix socket
    inherited from a previous process.

    @param fd: the descriptor; consumed (closed), even on error.
    @param accepting: C{False} to leave connections waiting in the backlog
        until C{resumeListener} (a successor that has not committed yet).
    @raise ValueError: if C{fd} is not a listening stream socket.
    """
    return adoptListener(reactor, fd, ControlFactory(host), accepting=accepting)
