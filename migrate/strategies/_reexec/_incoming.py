# -*- test-case-name: migrate.test.test_reexec -*-
"""
The new image's side of a re-exec: find the state the old image left
(L{inheritedReexec}), keep twistd from redoing what the process has done
already (L{adjustTwistdOptions}), and adopt the listening sockets and the
control socket and restore every connection's protocol before serving
anything (L{restoreReexec}); the sockets of TCP connections are adopted
afterwards (L{migrate.strategies._reexec._late}).

There is no old image to give anything back to: a connection whose state
the new code refuses is closed cleanly (its pending output written first)
with a log line naming its peer and listener, and counted as failed in the
report.

Also here: the preflight check the old image runs before it re-executes
(L{finishPreflight}): the same command line, which stops once its options
are parsed and the application's factory is built.
"""

from __future__ import annotations

import base64
import gc
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Mapping, MutableMapping, Sequence, TextIO

from attrs import define, evolve, field
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from ..._codec import StateError
from ..._control._server import adoptControl
from ..._handoff._attempt import counted
from ..._handoff._listeners import adoptListener
from ..._handoff._movement import (
    AdoptedConnection,
    adoptEntry,
    newMigratableProtocol,
)
from ..._handoff._transport import adoptConnection, resumeConnection
from ..._handoff._waiting import servingOrder
from ..._host._daemon import DAEMON_LOG_FILE, skipProcessSetUp, stayInForeground
from ..._host._heap import collectionsPaused
from ..._host._tracking import PendingAdoptionFactory
from ..._report import ListenerReport, MigrationOutcome, MigrationReport
from ...interfaces import IMigrationHost
from ...state import ProtocolState, restoreProtocolState
from ._caretaker import CARETAKER_PROTOCOL, Caretaker, CaretakerError
from ._late import LateAdoption, addressesFrom, addressesOf
from ._reports import ReportChannel
from ._state import (
    EXEC_AT_VARIABLE,
    FORMAT_VERSION,
    PREFLIGHT_MARKER,
    PREFLIGHT_VARIABLE,
    REEXEC_SIGNALS,
    STATE_FD_VARIABLE,
    InheritedConnection,
    ReexecState,
    afterCaretaker,
    readState,
)

__all__ = [
    "ReexecInheritance",
    "adjustTwistdOptions",
    "adoptFresh",
    "finishPreflight",
    "inheritedReexec",
    "logFileAfterExec",
    "newImageSpeaks",
    "restoreReexec",
]

_log = Logger()


@define
class ReexecInheritance:
    """
    What this image inherited from the one it replaced.

    @ivar state: the state document.
    @ivar foundAt: C{time.monotonic()} when this image read it.
    @ivar execAt: C{time.monotonic()} when the old image called C{execv},
        if known.
    @ivar caretaker: the old image's caretaker, serving the connections until
        this image asks for them (see L{migrate.strategies._reexec._caretaker}),
        if it left one; L{state} is then the old image's prelude until
        L{restoreReexec} replaces it with the caretaker's document.
    @ivar inherited: with a caretaker, every descriptor this image
        inherited for it: those the caretaker's document does not name are
        closed.
    @ivar identities: by descriptor, the device and inode each of
        L{inherited} had when listed (C{fstat}): one whose number names
        something else by the time it would be closed is left alone.
    """

    state: ReexecState
    foundAt: float
    execAt: float | None = None
    caretaker: Caretaker | None = None
    inherited: list[int] = field(factory=list)
    askedAt: float | None = None
    identities: dict[int, tuple[int, int]] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for fd in self.inherited:
            if fd not in self.identities:
                identity = _identity(fd)
                if identity is not None:
                    self.identities[fd] = identity

    def stillInherited(self, fd: int) -> bool:
        """
        Whether descriptor C{fd} is still what this image inherited under
        that number (the same device and inode), so that closing it closes
        nothing else: between the listing and the caretaker's hand-over,
        the application's start may have closed it and opened another
        file under the same number.  One that is not is logged.
        """
        identity = self.identities.get(fd)
        if identity is not None and _identity(fd) == identity:
            return True
        _log.warn(
            "Re-exec: descriptor {fd} is no longer the one this image "
            "inherited under that number; left open",
            fd=fd,
        )
        return False


def _identity(fd: int) -> tuple[int, int] | None:
    """
    The device and inode descriptor C{fd} names, or L{None} if it is not
    open.
    """
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def _inheritableDescriptors() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def inheritedReexec(
    environ: MutableMapping[str, str] | None = None,
    *,
    inherited: Callable[[], list[int]] = _inheritableDescriptors,
) -> ReexecInheritance | None:
    """
    Find the state a previous image of this process left, if it
    re-executed.

    The variables are removed from the environment, so that nothing this
    process starts inherits them.  If the document cannot be read, every
    descriptor this image inherited is closed (with a critical log line:
    those connections are lost) and L{None} is returned, so that the host
    starts afresh rather than not at all.

    @param environ: the environment, L{os.environ} by default.
    @param inherited: lists the inheritable descriptors above 2.

    @return: what was inherited, or L{None}.
    """
    if environ is None:
        environ = os.environ
    raw = environ.pop(STATE_FD_VARIABLE, None)
    rawExecAt = environ.pop(EXEC_AT_VARIABLE, None)
    if raw is None:
        return None
    foundAt = time.monotonic()
    execAt: float | None = None
    try:
        execAt = float(rawExecAt) if rawExecAt is not None else None
    except ValueError:
        execAt = None
    caretaker: Caretaker | None = None
    try:
        caretaker = Caretaker.fromEnvironment(environ)
        if not raw.isdigit():
            raise StateError(
                "{}={!r} is not a descriptor".format(STATE_FD_VARIABLE, raw)
            )
        # No collector passes over the thousands of objects the document
        # is parsed into: the clients wait (unless a caretaker serves them).
        with collectionsPaused():
            state = readState(int(raw))
    except (StateError, CaretakerError) as e:
        if caretaker is not None:
            caretaker.kill()
        lost = inherited()
        for fd in lost:
            os.close(fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, REEXEC_SIGNALS)
        _log.critical(
            "Re-exec: the state the previous image left cannot be read ({why}); "
            "closed the {count} descriptors it passed on and starting afresh",
            why=str(e),
            count=len(lost),
        )
        return None
    if caretaker is None:
        return ReexecInheritance(state, foundAt, execAt)
    # The connections' sockets, among others: those the caretaker's
    # document will not name are closed then.  Listed now, while the
    # caretaker serves.
    return ReexecInheritance(
        state, foundAt, execAt, caretaker=caretaker, inherited=inherited()
    )


def adjustTwistdOptions(
    parent: MutableMapping[str, Any], environ: MutableMapping[str, str] | None = None
) -> None:
    """
    In a re-executed image, keep twistd from redoing what the process did
    already: the pidfile names this very process (twistd would refuse to
    start), and daemonising again, changing root or directory or dropping
    privileges again would fail or change the PID.

    @param parent: twistd's options.
    """
    if environ is None:
        environ = os.environ
    if STATE_FD_VARIABLE not in environ and PREFLIGHT_VARIABLE not in environ:
        return
    if "pidfile" in parent:
        parent["pidfile"] = ""
    if STATE_FD_VARIABLE not in environ:
        return
    if "nodaemon" in parent and not parent["nodaemon"]:
        stayInForeground(parent)
    skipProcessSetUp(parent)


def logFileAfterExec(parent: Mapping[str, Any]) -> str | None:
    """
    The log file twistd opens in a re-executed image, which does not
    daemonise again (see L{adjustTwistdOptions}), or L{None} if it logs
    to its standard output or to syslog.

    @param parent: twistd's options, as given.
    """
    if parent.get("syslog"):
        return None
    path = parent.get("logfile")
    if not path:
        if "nodaemon" not in parent or parent["nodaemon"]:
            return None
        path = DAEMON_LOG_FILE
    return None if path == "-" else str(path)


def _logFileProblem(parent: Mapping[str, Any]) -> str | None:
    """
    Why the re-executed image could not open its log file, if it could
    not: twistd would exit before restoring anything, and every inherited
    connection would be lost.  It opens the file as twistd will, as the
    user the process runs as now (a process that dropped privileges after
    opening a root-owned log file could not open it again).
    """
    path = logFileAfterExec(parent)
    if path is None:
        return None
    from twisted.python.logfile import LogFile

    try:
        LogFile.fromFullPath(path).close()
    except OSError as e:
        return "the new image could not open its log file {}: {}".format(path, e)
    return None


def newImageSpeaks() -> dict[str, int]:
    """
    What this code, as a re-executed image, can take from the image it
    replaces, for the old image's preflight (L{finishPreflight}): the
    newest state document format it reads (it reads every older one) and
    the caretaker's protocol it speaks (see
    L{migrate.strategies._reexec._caretaker.CARETAKER_PROTOCOL}).
    """
    return {"format": FORMAT_VERSION, "caretaker": CARETAKER_PROTOCOL}


def finishPreflight(
    environ: MutableMapping[str, str] | None = None,
    out: TextIO | None = None,
    *,
    twistdOptions: Mapping[str, Any] | None = None,
    factory: Any = None,
) -> None:
    """
    End the preflight process once its options are parsed and the
    application is loaded: the old image only wanted to know the new code
    gets that far, that the new image will be able to open twistd's log
    file, and (when it asks for a trial, L{migrate._handoff._trial}) that
    the new code restores every connection's state.  It tells the old
    image what it speaks (L{newImageSpeaks}) with its first answer.

    @param twistdOptions: twistd's options, if known.
    @param factory: the new code's protocol factory, for the trial
        (L{None} for a hosted plugin, which builds its own when it starts).

    @raise SystemExit: in the preflight process: 0 if the re-exec may go
        on, 1 (having said why) if not.
    """
    if environ is None:
        environ = os.environ
    if PREFLIGHT_VARIABLE not in environ:
        return
    stream = out if out is not None else sys.stdout
    problem = _logFileProblem(twistdOptions) if twistdOptions is not None else None
    if problem is not None:
        stream.write(problem + "\n")
        stream.flush()
        raise SystemExit(1)
    from ..._handoff._trial import runChild

    runChild(factory, environ, about=newImageSpeaks())
    stream.write(PREFLIGHT_MARKER + "\n")
    stream.flush()
    raise SystemExit(0)


def adoptFresh(host: IMigrationHost, entry: Any, descriptor: int) -> AdoptedConnection:
    """
    Adopt one connection held, with a fresh protocol of the new code that
    is told C{connectionMade} (its old protocol did not provide
    L{migrate.IMigratable}): the output the old code had not written goes
    first, the input the old protocol had buffered is parsed by the new one.

    @param descriptor: consumed.

    @raise Exception: why it cannot be adopted; the descriptor is let go
        of without disturbing the connection.
    """
    try:
        listener = host.listenerNamed(entry["listener"])
        state = ProtocolState.fromPlain(entry["state"])
        output = base64.b64decode(entry["output"], validate=True)
    except Exception as e:
        os.close(descriptor)
        raise StateError("bad entry: {}: {}".format(type(e).__name__, e))
    pending = PendingAdoptionFactory(listener.factory)
    transport = adoptConnection(host.reactor, descriptor, pending)
    hosted = pending.built
    assert hosted is not None
    adopted = AdoptedConnection(hosted, transport)
    try:
        protocol = listener.factory.buildApplicationProtocol(transport.getPeer())
        if protocol is None:
            raise StateError("the new factory refused the connection")
        if output:
            transport.write(output)
        hosted.attach(protocol)
        restoreProtocolState(protocol, state)
        protocol.connectionMade()
    except Exception:
        adopted.abandon()
        raise
    return adopted


class _Closing(Protocol):
    """
    Writes what the old code left for a connection nobody can serve, then
    closes it without a reset: it sends C{FIN} once the output is out,
    discards what the peer still sends, and closes when the peer has closed
    its side (or after L{lingerSeconds}).  Closing a socket whose input was
    not read would send C{RST} instead.
    """

    lingerSeconds = 10.0

    def __init__(self, reactor: Any, output: bytes) -> None:
        self.reactor = reactor
        self.output = output
        self._deadline: Any = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.output:
            transport.write(self.output)
        transport.loseWriteConnection()
        self._deadline = self.reactor.callLater(
            self.lingerSeconds, transport.loseConnection
        )

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()


_INET_FAMILIES = {int(each): each for each in (socket.AF_INET, socket.AF_INET6)}


class _NotRestored(Exception):
    """
    A connection the new code could not restore.

    @ivar why: the reason, for the log.
    @ivar descriptor: its socket's descriptor, to close cleanly, or L{None}
        if it was let go of already.
    """

    def __init__(self, why: str, descriptor: int | None) -> None:
        Exception.__init__(self, why)
        self.why = why
        self.descriptor = descriptor


def _entryState(
    inherited: InheritedConnection,
) -> tuple[ProtocolState, bytes, socket.AddressFamily]:
    """
    The state, output and address family of a connection described at the
    freeze, from its manifest entry.

    The entry comes from the sealed memory file this process's previous
    image wrote, parsed with non-finite numbers refused: its structure and
    types are checked strictly, its application state is not walked again
    (see L{ProtocolState.fromPlain}'s C{parsedJSON}).

    @raise _NotRestored: if the entry is malformed.
    """
    entry = inherited.entry
    try:
        state = ProtocolState.fromPlain(entry["state"], owned=True, parsedJSON=True)
        text = entry["output"]
        output = base64.b64decode(text, validate=True) if text else b""
        family = _INET_FAMILIES[entry["family"]]
    except Exception as e:
        raise _NotRestored("bad manifest entry: " + _why(e), inherited.descriptor)
    return state, output, family


def _restoreLater(
    host: IMigrationHost,
    late: LateAdoption,
    listenerKey: str,
    descriptor: int,
    family: socket.AddressFamily,
    state: ProtocolState,
    output: bytes,
    closing: bool,
    addresses: tuple[Any, Any],
) -> None:
    """
    Restore one connection's protocol onto a stand-in transport; its socket
    is adopted later (see L{migrate.strategies._reexec._late}).

    @param descriptor: the socket's, consumed.

    @raise _NotRestored: if the new code cannot restore it.
    """
    peer, local = addresses
    try:
        listener = host.listenerNamed(listenerKey)
        if not state.migratable:
            raise StateError("the old protocol did not provide IMigratable")
        factory = listener.factory
        protocol = newMigratableProtocol(factory, peer)
    except Exception as e:
        raise _NotRestored(_why(e), descriptor)
    hosted = factory.buildPendingProtocol(peer)
    standIn = late.standIn(hosted, descriptor, family, peer, local, output, closing)
    try:
        hosted.attach(protocol)
        restoreProtocolState(protocol, state, copyState=False)
    except Exception as e:
        raise _NotRestored(_why(e), late.forget(standIn))


def _restoreConnections(
    host: IMigrationHost,
    state: ReexecState,
    late: LateAdoption,
    adoptedNow: Callable[[InheritedConnection], None],
    notRestored: Callable[[str, Any, _NotRestored, bytes], None],
    moved: dict[str, int],
    failed: dict[str, int],
    consumed: set[int],
) -> None:
    """
    Restore every connection of C{state}, held: those described at the
    freeze first (they were the active ones), adopted now or restored on a
    stand-in whose socket is adopted once this image serves (C{late}); then
    those copied ahead.  A connection the new code cannot restore is closed
    cleanly and counted in C{failed}; the others are counted in C{moved}.

    @param consumed: gains each descriptor as it is handed on.
    """
    reactor = host.reactor
    for each in state.connections:
        consumed.add(each.descriptor)
        try:
            addresses = None if each.fresh else addressesOf(each.entry)
        except StateError:
            addresses = None
        if addresses is None:
            adoptedNow(each)
            continue
        # Restored now, its socket adopted once this image serves.
        try:
            restored, output, family = _entryState(each)
            _restoreLater(
                host,
                late,
                each.listener,
                each.descriptor,
                family,
                restored,
                output,
                each.closing,
                addresses,
            )
        except _NotRestored as e:
            notRestored(each.listener, addresses, e, _output(each.entry))
        else:
            moved[each.listener] = moved.get(each.listener, 0) + 1
    for copied in state.precopied:
        consumed.add(copied.descriptor)
        if copied.peer is None:
            adoptedNow(
                InheritedConnection(copied.descriptor, copied.listener, copied.entry())
            )
            continue
        try:
            family = _INET_FAMILIES[copied.family]
            addresses = addressesFrom(family, copied.peer, copied.local)
        except (KeyError, StateError):
            _log.error(
                "Re-exec: a connection on {listener} cannot be restored (its "
                "addresses are malformed); closing it cleanly",
                listener=copied.listener,
            )
            failed[copied.listener] = failed.get(copied.listener, 0) + 1
            closeCleanly(reactor, copied.descriptor, b"")
            continue
        try:
            _restoreLater(
                host,
                late,
                copied.listener,
                copied.descriptor,
                family,
                copied.state,
                b"",
                False,
                addresses,
            )
        except _NotRestored as e:
            notRestored(copied.listener, addresses, e, b"")
        else:
            moved[copied.listener] = moved.get(copied.listener, 0) + 1


def _letGoOfCopies(
    inheritance: ReexecInheritance,
    state: ReexecState,
    adopted: list[tuple[AdoptedConnection, InheritedConnection]],
    late: LateAdoption,
    consumed: set[int],
) -> int:
    """
    Restoring failed before this image served: let go of its copies of
    every connection, adopted (held), restored on a stand-in, or not
    reached yet, without shutting any down (the caretaker, which holds
    them too, closes them politely).

    @return: how many connections there were.
    """
    for connection, _ in adopted:
        try:
            connection.abandon()
        except Exception:
            _log.failure("Re-exec: letting go of an adopted connection failed")
    for descriptor in late.forgetAll():
        os.close(descriptor)
    descriptors = [each.descriptor for each in state.connections] + [
        each.descriptor for each in state.precopied
    ]
    for descriptor in descriptors:
        if descriptor not in consumed and inheritance.stillInherited(descriptor):
            os.close(descriptor)
    return len(descriptors)


def _closePolitely(transport: Any) -> None:
    """
    Close a connection whose serving failed half way, after what it holds
    for the client (C{loseConnection}); it is resumed first, if it was
    still held, so that its output can leave.  A failure is logged.
    """
    try:
        resumeConnection(transport)
    except Exception:
        # Resumed already, or never held: closing is what matters.
        pass
    try:
        transport.loseConnection()
    except Exception:
        _log.failure("Re-exec: closing a connection failed")


def _why(error: BaseException) -> str:
    return "{}: {}".format(type(error).__name__, error)


def _peerOf(peer: Any) -> str:
    return "{}:{}".format(peer.host, peer.port)


def _waitingFirst(
    adopted: list[tuple[AdoptedConnection, InheritedConnection]],
) -> list[tuple[AdoptedConnection, InheritedConnection]]:
    """
    The connections restored at once, in the order to serve them: those
    whose clients are waiting first, the longest-waiting first, so that the
    new image's first reactor turn answers them in that order (see
    L{servingOrder}); then the others.
    """
    byConnection = {id(connection): each for connection, each in adopted}
    waiting, quiet = servingOrder([connection for connection, _ in adopted])
    return [
        (connection, byConnection[id(connection)]) for connection in waiting + quiet
    ]


def _peerOfDescriptor(descriptor: int) -> str:
    """
    Who is at the other end of a socket, for a log line.
    """
    try:
        with socket.socket(fileno=os.dup(descriptor)) as probe:
            name = probe.getpeername()
    except OSError:
        return "an unknown peer"
    if isinstance(name, tuple):
        return "{}:{}".format(name[0], name[1])
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return "unix:" + str(name) if name else "an unnamed Unix peer"


def closeCleanly(reactor: Any, descriptor: int, output: bytes) -> None:
    """
    Close a connection nobody can serve: write C{output}, then close it
    cleanly (see L{_Closing}).

    @param descriptor: consumed.
    """
    try:
        with socket.socket(fileno=os.dup(descriptor)) as probe:
            family = probe.family
        reactor.adoptStreamConnection(
            descriptor, family, Factory.forProtocol(lambda: _Closing(reactor, output))
        )
    except Exception:
        _log.failure("Could not close descriptor {fd} cleanly", fd=descriptor)
    finally:
        os.close(descriptor)


def _output(entry: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(entry.get("output", ""), validate=True)
    except Exception:
        return b""


def _adoptMetrics(host: Any, fd: int, carried: Any, notes: list[str]) -> None:
    """
    Serve the metrics endpoint the old image left, counting on from its
    counters; this code without metrics closes it.
    """
    from ..._host._metrics import adoptMetrics

    if host.metrics is None:
        os.close(fd)
        return
    try:
        port = adoptMetrics(host.reactor, fd, host.metrics)
    except Exception as e:
        note = (
            "the metrics endpoint could not be adopted ({}: {}); a new one is "
            "opened".format(type(e).__name__, e)
        )
        _log.error("Re-exec: {note}", note=note)
        notes.append(note)
        host.metrics.carry(carried)
    else:
        host.adoptMetricsPort(port, carried)


def _listenToReporters(
    host: IMigrationHost, state: ReexecState, notes: list[str]
) -> None:
    """
    Listen again on the channels older generations report their draining
    over, and show what they last reported.
    """
    for fd, viaPid in state.reporters:
        try:
            channel = ReportChannel(host, viaPid)
            host.reactor.adoptStreamConnection(
                fd, socket.AF_UNIX, Factory.forProtocol(lambda: channel)
            )
        except Exception as e:
            note = (
                "the report channel of process {} could not be adopted ({}: "
                "{}); its draining is no longer shown".format(
                    viaPid, type(e).__name__, e
                )
            )
            _log.error("Re-exec: {note}", note=note)
            notes.append(note)
            continue
        finally:
            os.close(fd)
        host.reportChannels[viaPid] = channel
        host.updateDraining(
            [
                {key: value for key, value in entry.items() if key != "via"}
                for entry in state.draining
                if entry.get("via") == viaPid
            ],
            viaPid,
        )


def restoreReexec(
    host: IMigrationHost, inheritance: ReexecInheritance
) -> MigrationReport:
    """
    Take over what the previous image left, then serve: the listening
    sockets and the control socket (adopted paused), every connection
    (restored or handed to a fresh protocol, held; a TCP connection's
    protocol restored on a stand-in transport), then commit: the host
    serves generation + 1, listeners accept, connections resume.  No event
    is processed in between, so nothing is served before every protocol
    is restored.  The sockets of the connections on stand-ins are adopted
    from the next reactor turn on (L{LateAdoption}), those described at the
    freeze (the active ones) before those copied ahead.

    @return: the report, also the host's C{lastReport}.
    """
    # As in the old image: no collector passes while the clients wait, nor
    # until every socket is adopted (a first full pass over the thousands
    # of objects the restore made would stall every client again, just
    # after the image serves).
    collecting = gc.isenabled()
    gc.disable()
    resumed: list[bool] = []

    def resumeCollecting() -> None:
        if collecting and not resumed:
            resumed.append(True)
            gc.enable()

    caretaker = inheritance.caretaker
    try:
        # While a caretaker still serves the connections.
        listenerNotes = _adoptListeners(host, inheritance.state)
        if caretaker is not None and not _takeFromCaretaker(
            host, inheritance, caretaker
        ):
            # Ended, or closing the connections itself.
            caretaker = None
        try:
            report = _restore(
                host,
                inheritance,
                resumeCollecting,
                listenerNotes,
                handBack=caretaker is not None,
            )
        except _HandedBack as e:
            # This image let go of its copies: the caretaker, which still
            # holds the protocols and their unwritten output, closes every
            # connection politely, then exits.
            assert caretaker is not None
            if caretaker.abort():
                _log.critical(
                    "Re-exec: restoring failed after the caretaker handed the "
                    "connections over ({why}); the caretaker closes the {count} "
                    "connections politely",
                    why=e.why,
                    count=e.count,
                )
                caretaker.reap(host.reactor, host.settings.handoffTimeout + 10.0)
            else:
                _log.critical(
                    "Re-exec: restoring failed after the caretaker handed the "
                    "connections over ({why}), and the caretaker could not be "
                    "told to close them: the {count} connections are lost",
                    why=e.why,
                    count=e.count,
                )
            caretaker = None
            raise
        if caretaker is not None:
            # Every connection is this image's now, before it serves any:
            # the caretaker exits without touching a socket.
            caretaker.committed()
            caretaker.reap(host.reactor)
        return report
    except BaseException:
        resumeCollecting()
        if caretaker is not None:
            caretaker.kill()
        raise
    finally:
        blocked = list(inheritance.state.blockedSignals)
        if blocked:
            # Once the reactor has installed its handlers (and the host its
            # SIGHUP handler, on commit): a signal that arrived since the
            # exec is delivered then.
            host.reactor.callWhenRunning(
                signal.pthread_sigmask, signal.SIG_UNBLOCK, blocked
            )


def _takeFromCaretaker(
    host: IMigrationHost, inheritance: ReexecInheritance, caretaker: Caretaker
) -> bool:
    """
    Ask the caretaker for the connections (it freezes them, and describes
    those that changed since the pre-copy), and make its document, with
    what the pre-copy still holds, the state this image restores.  The
    descriptors inherited for the caretaker that the document does not name
    are closed.

    If the caretaker's document cannot be read, the caretaker is told so
    (L{Caretaker.abort}) and closes every connection politely itself (it
    still holds their protocols and unwritten output), while this image
    lets go of its copies.  If the caretaker does not hand over in time,
    it is ended and every connection closed cleanly here.  Either way,
    with a critical log line, the connections are counted as failed: the
    old code's latest state is lost, and the pre-copy may be stale.

    @return: whether the connections are this image's (if not, the
        caretaker was ended or is closing them: do not tell it
        L{Caretaker.committed}).
    """
    prelude = inheritance.state
    inheritance.askedAt = time.monotonic()
    settings = host.settings
    timeout = settings.safePointTimeout + settings.handoffTimeout + 10.0
    try:
        document = caretaker.freeze(timeout)
        with collectionsPaused():
            state = afterCaretaker(prelude, readState(document), inheritance.inherited)
    except (CaretakerError, StateError) as e:
        # One that handed over waits for the answer, and can still close
        # its connections politely; one that did not is ended.
        politely = caretaker.handedOver and caretaker.abort()
        if politely:
            # It closes them, then exits: collected once it has had the
            # time its own closing may take.
            caretaker.reap(host.reactor, settings.handoffTimeout + 10.0)
        else:
            caretaker.kill()
        _giveUpConnections(host, inheritance, str(e), politely)
        return False
    named = set(state.descriptors())
    for fd in inheritance.inherited:
        if fd not in named and inheritance.stillInherited(fd):
            # Left to close (the caretaker closed its own copy or exits).
            os.close(fd)
    inheritance.state = state
    return True


def _giveUpConnections(
    host: IMigrationHost, inheritance: ReexecInheritance, why: str, politely: bool
) -> None:
    """
    The caretaker did not hand the connections over: let go of this
    image's copies (when the caretaker closes them politely) or close them
    cleanly here (when it was ended), count them as failed, and serve the
    rest of the prelude (the listeners, the control socket).
    """
    prelude = inheritance.state
    state = evolve(prelude, precopied=(), connections=(), superseded=())
    named = set(state.descriptors())
    lost = [
        fd
        for fd in inheritance.inherited
        if fd not in named and inheritance.stillInherited(fd)
    ]
    _log.critical(
        "Re-exec: the caretaker did not hand the connections over ({why}); "
        "{who} the {count} it served",
        why=why,
        who="it closes" if politely else "closing",
        count=len(lost),
    )
    listenerOf = _listenersOfConnections(lost, prelude)
    closed = dict(state.closed)
    for fd in lost:
        key = listenerOf.get(fd, "(connections not copied ahead)")
        closed[key] = closed.get(key, 0) + 1
        if politely:
            # Not shut down: the caretaker writes what it holds for the
            # client and closes it.
            os.close(fd)
        else:
            closeCleanly(host.reactor, fd, b"")
    inheritance.state = evolve(
        state,
        closed=closed,
        notes=state.notes
        + (
            "the caretaker did not hand the connections over ({}); {} closed{}".format(
                why,
                counted(len(lost), "connection"),
                " politely by the caretaker" if politely else "",
            ),
        ),
    )


def _listenersOfConnections(
    descriptors: list[int], prelude: ReexecState
) -> dict[int, str]:
    """
    The key of the listener each connection came from, as far as it can be
    told: the pre-copy names it, or else the connection's own address is
    on the same port (TCP) or path (Unix) as exactly one listener's.
    """
    found = {each.descriptor: each.listener for each in prelude.precopied}
    listening: dict[Any, list[str]] = {}
    for key, fd in prelude.listeners.items():
        where = _boundAt(fd)
        if where is not None:
            listening.setdefault(where, []).append(key)
    for fd in descriptors:
        if fd in found:
            continue
        keys = listening.get(_boundAt(fd), [])
        if len(keys) == 1:
            found[fd] = keys[0]
    return found


def _boundAt(descriptor: int) -> Any:
    """
    What ties a connection to the listener that accepted it: the address
    family and port of a TCP socket, the path of a Unix one; L{None} if
    it cannot be told.
    """
    try:
        with socket.socket(fileno=os.dup(descriptor)) as probe:
            family = probe.family
            name = probe.getsockname()
    except OSError:
        return None
    if family in (socket.AF_INET, socket.AF_INET6):
        return (int(family), name[1])
    if family == socket.AF_UNIX and name:
        return (int(family), name)
    return None


def _adoptListeners(host: IMigrationHost, state: ReexecState) -> list[str]:
    """
    Adopt the listening sockets the old image left (paused), and start a
    hosted twistd plugin on them: its ports claim them before connections
    are adopted on them.  Done before the caretaker is asked for the
    connections, so that its clients do not wait for the application to
    start.

    @return: the notes for the report (what could not be adopted or
        started).
    """
    notes: list[str] = []
    for key, fd in state.listeners.items():
        try:
            listener = host.listenerNamed(key)
            listener.port = adoptListener(
                host.reactor, fd, listener.factory, accepting=False
            )
        except Exception as e:
            if isinstance(e, KeyError):
                os.close(fd)
            note = "listener {} could not be adopted ({}: {}); its socket is closed".format(
                key, type(e).__name__, e
            )
            _log.error("Re-exec: {note}", note=note)
            notes.append(note)
    prepare = getattr(host, "prepareApplication", None)
    if prepare is not None:
        try:
            prepare()
        except Exception as e:
            _log.failure("Re-exec: the hosted application did not start")
            notes.append(
                "the hosted application did not start: {}: {}".format(
                    type(e).__name__, e
                )
            )
    return notes


class _HandedBack(Exception):
    """
    Restoring failed before this image served any connection, after a
    caretaker had handed them over: this image let go of its copies of
    every one (closed its descriptors, never shut down), for the caretaker
    to close them politely.

    @ivar why: what failed.
    @ivar count: how many connections.
    """

    def __init__(self, why: str, count: int) -> None:
        Exception.__init__(self, why)
        self.why = why
        self.count = count


def _restore(
    host: IMigrationHost,
    inheritance: ReexecInheritance,
    whenAdopted: Callable[[], None] = lambda: None,
    listenerNotes: Sequence[str] = (),
    handBack: bool = False,
) -> MigrationReport:
    """
    Restore what L{ReexecInheritance.state} describes, and serve.

    @param handBack: whether a caretaker still holds every connection: if
        restoring fails before this image serves one, let go of this
        image's copies and raise L{_HandedBack}, so that the caretaker
        closes them politely; a failure once this image serves never
        stops it serving the connections it could restore, nor leaves one
        half adopted.
    """
    restoreStart = time.monotonic()
    state = inheritance.state
    reactor = host.reactor
    notes = list(state.notes)
    failed: dict[str, int] = dict(state.closed)
    moved: dict[str, int] = {}

    notes.extend(listenerNotes)
    if state.control is not None:
        try:
            port = adoptControl(reactor, state.control, host, accepting=False)
        except Exception as e:
            note = (
                "the control socket could not be adopted ({}: {}); a new one is "
                "made".format(type(e).__name__, e)
            )
            _log.error("Re-exec: {note}", note=note)
            notes.append(note)
        else:
            host.adoptControlPort(port)
    if state.metrics is not None:
        _adoptMetrics(host, state.metrics, state.metricsCarried, notes)

    adopted: list[tuple[AdoptedConnection, InheritedConnection]] = []
    late = LateAdoption(reactor)
    # The connections' descriptors handed to an adoption, a restore or a
    # clean close: the others are still this image's copies to let go of.
    consumed: set[int] = set()

    def notRestored(
        listenerKey: str, addresses: Any, error: _NotRestored, output: bytes
    ) -> None:
        _log.error(
            "Re-exec: a connection from {peer} on {listener} cannot be "
            "restored by the new code ({why}); closing it cleanly",
            peer=_peerOf(addresses[0]),
            listener=listenerKey,
            why=error.why,
        )
        failed[listenerKey] = failed.get(listenerKey, 0) + 1
        if error.descriptor is not None:
            closeCleanly(reactor, error.descriptor, output)

    def adoptedNow(each: InheritedConnection) -> None:
        spare = os.dup(each.descriptor)
        try:
            if each.fresh:
                connection = adoptFresh(host, each.entry, each.descriptor)
            else:
                connection = adoptEntry(host, each.entry, each.descriptor)
        except Exception as e:
            _log.error(
                "Re-exec: a connection from {peer} on {listener} cannot be "
                "restored by the new code ({why}); closing it cleanly",
                peer=_peerOfDescriptor(spare),
                listener=each.listener,
                why="{}: {}".format(type(e).__name__, e),
            )
            failed[each.listener] = failed.get(each.listener, 0) + 1
            closeCleanly(reactor, spare, _output(each.entry))
        else:
            os.close(spare)
            adopted.append((connection, each))
            moved[each.listener] = moved.get(each.listener, 0) + 1

    try:
        _restoreConnections(
            host, state, late, adoptedNow, notRestored, moved, failed, consumed
        )
        _listenToReporters(host, state, notes)
        host.commitInheritance(state.generation + 1)
    except Exception as e:
        if not handBack:
            raise
        _log.failure("Re-exec: restoring failed before serving")
        count = _letGoOfCopies(inheritance, state, adopted, late, consumed)
        raise _HandedBack(_why(e), count) from e
    for connection, each in _waitingFirst(adopted):
        try:
            connection.commit()
            if each.closing:
                connection.hosted.loseConnection()
        except Exception:
            _log.failure(
                "Re-exec: serving a connection on {listener} failed; closing it",
                listener=each.listener,
            )
            moved[each.listener] -= 1
            failed[each.listener] = failed.get(each.listener, 0) + 1
            _closePolitely(connection.transport)
    # The other sockets are adopted in slices from the next reactor turn,
    # the connections active last first.
    try:
        late.commit(whenAdopted)
    except Exception:
        _log.failure("Re-exec: serving the restored connections failed")
        descriptors = late.forgetAll()
        note = "serving the restored connections failed; {} closed " "cleanly".format(
            counted(len(descriptors), "connection")
        )
        _log.critical("Re-exec: {note}", note=note)
        notes.append(note)
        for descriptor in descriptors:
            closeCleanly(reactor, descriptor, b"")
        whenAdopted()
    finished = time.monotonic()

    durations = dict(state.durations)
    if inheritance.askedAt is not None and inheritance.execAt is not None:
        # A caretaker served while this image started: the clients waited
        # from its freeze ("capture", its own figure) to the end of the
        # restore, not for the exec.
        durations["exec"] = inheritance.askedAt - inheritance.execAt
        durations["load"] = inheritance.foundAt - inheritance.execAt
        durations["handover"] = restoreStart - inheritance.askedAt
    elif inheritance.execAt is not None:
        if state.frozenAt:
            # From the freeze until the old image's last act, execv: every
            # connection described and the state written.
            durations["capture"] = inheritance.execAt - state.frozenAt
        # From execv until restoring starts: the interpreter starting, the
        # imports and option parsing (until the state was read, "load"),
        # then twistd's logging, reactor and application set-up.
        durations["exec"] = restoreStart - inheritance.execAt
        durations["load"] = inheritance.foundAt - inheritance.execAt
    durations["restore"] = finished - restoreStart
    if state.frozenAt:
        durations["suspension"] = finished - state.frozenAt
    if "total" not in durations and state.frozenAt:
        durations["total"] = (
            finished
            - state.frozenAt
            + sum(
                seconds
                for name, seconds in state.durations.items()
                if name in ("checks", "preflight", "plan", "close", "caretaker")
            )
        )
    keys = list(host.listeners)
    for key in list(failed) + list(moved):
        if key not in keys:
            keys.append(key)
    report = MigrationReport(
        strategy=state.strategy,
        outcome=MigrationOutcome.success,
        fromGeneration=state.generation,
        toGeneration=host.generation,
        oldPid=state.pid,
        newPid=host.pid,
        listeners=tuple(
            ListenerReport(key, moved=moved.get(key, 0), failed=failed.get(key, 0))
            for key in keys
        ),
        durations=durations,
        notes=tuple(notes),
    )
    host.lastReport = report
    if host.metrics is not None:
        # The old image's attempt never saw this success: count it here.
        host.metrics.recordReport(report)
    _log.info(
        "Re-exec: generation {generation} serves in process {pid}: {moved} "
        "connections carried over, {failed} closed; clients waited {wait} s",
        generation=host.generation,
        pid=host.pid,
        moved=sum(moved.values()),
        failed=sum(failed.values()),
        wait=round(durations.get("suspension", 0.0), 3),
        report=report.toJSON(),
    )
    return report
