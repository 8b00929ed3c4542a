"""
Freezing, letting go of and adopting established stream connections.

The old process I{freezes} a connection (L{freezeConnection}): it stops
reading and writing it without disturbing the peer or Twisted's buffers.
From there it either I{resumes} it as if nothing had happened
(L{FrozenConnection.resume}), or, once another process holds the socket,
I{releases} it (L{FrozenConnection.release}): it closes only its own
descriptor, never C{shutdown()}, so the peer sees nothing.  The new process
I{adopts} the descriptor (L{adoptConnection}) with both directions held
until it resumes it (L{resumeConnection}) or gives it back
(L{abandonConnection}).  A process that replaces its own image (re-exec)
freezes nothing: it only reads the output Twisted holds
(L{pendingOutput}), since the reactor never runs again before the exec.
L{writeNow} writes around the reactor's write path when nothing is queued
(the benchmark's load generator uses it); L{flushWriters} writes what
Twisted buffers now, without waiting for the reactor's next turn (a
transfer's report goes out before the old process lets go of its moved
connections).  L{DetachedTransport} is what a protocol object that no
longer serves its connection is left with (replaced by a reload, or
restored ahead of a freeze and abandoned).

This is the one module that reaches into the private parts of Twisted's
C{twisted.internet.tcp.Connection} (C{dataBuffer}, C{offset},
C{_tempDataBuffer}, C{_tempDataLen}, C{_sendmsgQueue}, C{_aborting}, and
the epoll reactor's C{_reads} as a fast path), so that a Twisted upgrade
breaks one place, covered by its tests.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Collection, Iterable

from attrs import define, field
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    ITransport,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "DetachedTransport",
    "FrozenConnection",
    "freezeConnection",
    "pendingOutput",
    "quiet",
    "unsentOutput",
    "stillMovable",
    "letGo",
    "adoptConnection",
    "resumeConnection",
    "abandonConnection",
    "flushNow",
    "flushWriters",
    "writeNow",
]

_log = Logger()

_FROZEN, _RESUMED, _RELEASED = "frozen", "resumed", "released"

_HOLD = "_migrateAdoptedHold"
"""
Name of the instance attribute holding the L{FrozenConnection} of a
transport adopted by L{adoptConnection} and not resumed yet.
"""

_HOOKED = (
    "doRead",
    "doWrite",
    "startReading",
    "stopReading",
    "startWriting",
    "stopWriting",
    "loseConnection",
    "abortConnection",
)
"""
The methods replaced on a frozen (or released) transport instance.
"""

_MISSING = object()


def _inert(*args: object, **kwargs: object) -> None:
    """
    Stand-in for every hooked method of a released transport.
    """


def _isReading(transport: Any) -> bool:
    """
    Is the reactor watching C{transport} for input?

    The poll-like reactors keep a C{_reads} collection of descriptors (epoll,
    poll) or selectables (select); looking it up is constant time, where the
    public C{getReaders()} builds a list of every reader, which would make
    freezing N connections quadratic.
    """
    reactor = transport.reactor
    reads = getattr(reactor, "_reads", None)
    if isinstance(reads, (set, dict)):
        return transport.fileno() in reads or transport in reads
    return transport in reactor.getReaders()


def _bufferedOutput(transport: Any) -> bytes:
    """
    The bytes Twisted holds for C{transport} and has not written yet, in
    order, without changing the buffers.
    """
    return bytes(transport.dataBuffer[transport.offset :]) + b"".join(
        transport._tempDataBuffer
    )


def _mustFlush(transport: Any) -> bool:
    """
    Does C{transport} need C{doWrite} calls: unwritten bytes, or a close or
    half-close waiting for the buffer to drain?
    """
    return bool(
        len(transport.dataBuffer) > transport.offset
        or transport._tempDataLen
        or transport._tempDataBuffer
        or transport.disconnecting
        or (transport._writeDisconnecting and not transport._writeDisconnected)
    )


@define
class FrozenConnection:
    """
    A connection that neither reads nor writes until it is resumed or
    released.

    While frozen, the transport's C{doRead} and C{doWrite} do nothing (so an
    event the reactor picked before the freeze reads or flushes nothing),
    and what the application does to the transport is recorded, not
    performed: C{write} still buffers (after L{pendingOutput}), pausing and
    resuming reading is remembered, and C{loseConnection} or
    C{abortConnection} is remembered in L{closeRequested}.

    @ivar transport: the frozen C{twisted.internet.tcp.Connection} (TCP or
        Unix stream).
    @ivar pendingOutput: the output Twisted held but had not written when the
        connection froze; the new holder must send it first.
    @ivar wasReading: whether the reactor was reading the connection when it
        froze (it was not if the application had paused it).
    @ivar closeRequested: C{None}, or C{"lose"} or C{"abort"} if the
        application asked to close the connection while it was frozen;
        carried out by L{resume}, dropped by L{release}.
    """

    _log = Logger()

    transport: Any
    pendingOutput: bytes
    wasReading: bool = True
    closeRequested: str | None = None
    _wantReading: bool = field(default=True, init=False, repr=False)
    _state: str = field(default=_FROZEN, init=False)
    _saved: dict[str, Any] = field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._wantReading = self.wasReading

    def descriptor(self) -> int:
        """
        The connection's descriptor, to send to the process taking it over.

        @raise ValueError: if the connection was released.
        """
        if self._state == _RELEASED:
            raise ValueError("connection already released")
        return int(self.transport.fileno())

    def bufferedOutput(self) -> bytes:
        """
        All output not written yet: L{pendingOutput} followed by whatever the
        application wrote while frozen.
        """
        if self._state == _RELEASED:
            return b""
        return _bufferedOutput(self.transport)

    def _hook(self) -> None:
        """
        Replace the transport's I/O methods with recording stand-ins.
        """
        transport = self.transport
        instanceDict = vars(transport)
        for name in _HOOKED:
            self._saved[name] = instanceDict.get(name, _MISSING)

        def startReading() -> None:
            self._wantReading = True

        def stopReading() -> None:
            self._wantReading = False

        def loseConnection(*args: object, **kwargs: object) -> None:
            self.closeRequested = self.closeRequested or "lose"

        def abortConnection() -> None:
            self.closeRequested = "abort"

        hooks: dict[str, Callable[..., None]] = {
            "doRead": _inert,
            "doWrite": _inert,
            "startReading": startReading,
            "stopReading": stopReading,
            "startWriting": _inert,
            "stopWriting": _inert,
            "loseConnection": loseConnection,
            "abortConnection": abortConnection,
        }
        for name, hook in hooks.items():
            setattr(transport, name, hook)

    def _unhook(self) -> None:
        """
        Put back the transport's own I/O methods.
        """
        transport = self.transport
        for name, saved in self._saved.items():
            if saved is _MISSING:
                vars(transport).pop(name, None)
            else:
                setattr(transport, name, saved)
        self._saved.clear()

    def resume(self) -> None:
        """
        Undo the freeze: the connection reads and writes as if nothing had
        happened, output written while frozen going out after
        L{pendingOutput}.  Calling it again does nothing.

        @raise ValueError: if the connection was released.
        """
        if self._state == _RESUMED:
            return
        if self._state == _RELEASED:
            raise ValueError("cannot resume a released connection")
        self._state = _RESUMED
        self._unhook()
        transport = self.transport
        if self._wantReading and not transport.disconnecting:
            transport.startReading()
        if _mustFlush(transport):
            transport.startWriting()
        if self.closeRequested == "abort":
            transport.abortConnection()
        elif self.closeRequested == "lose":
            transport.loseConnection()

    def release(self) -> None:
        """
        Let go of the connection: another process holds it now.

        Only this process's descriptor closes (no C{shutdown()}, no
        C{SO_LINGER}), so the peer notices nothing; the buffers are dropped,
        later writes are silently discarded, and the protocol is not told
        C{connectionLost}.  A producer registered with the transport is left
        alone.  Calling it again does nothing.

        @raise ValueError: if the connection was resumed.
        """
        if self._state == _RELEASED:
            return
        if self._state == _RESUMED:
            raise ValueError("cannot release a resumed connection")
        self._state = _RELEASED
        transport = self.transport
        late = len(_bufferedOutput(transport)) - len(self.pendingOutput)
        if late > 0:
            self._log.warn(
                "Dropping {count} bytes written to {transport} while frozen",
                count=late,
                transport=transport,
            )
        if self.closeRequested is not None:
            self._log.info(
                "{transport} was asked to close ({how}) while frozen; "
                "its new holder keeps it",
                transport=transport,
                how=self.closeRequested,
            )
        self._unhook()
        letGo(transport)


def _checkMovable(transport: Any) -> None:
    """
    @raise ValueError: if the connection cannot be taken from this process
        (see L{freezeConnection}).
    """
    if not isinstance(transport, FileDescriptor) or not hasattr(transport, "socket"):
        raise ValueError(f"{transport!r} is not a socket transport")
    if not transport.connected or transport.disconnected:
        raise ValueError(f"{transport!r} is not connected")
    if getattr(transport, "_aborting", False):
        raise ValueError(f"{transport!r} is being aborted")
    if getattr(transport, "TLS", False):
        raise ValueError(f"{transport!r} carries TLS: its session cannot move")
    if getattr(transport, "_sendmsgQueue", None):
        raise ValueError(f"{transport!r} has descriptors queued for sending")
    if _HOLD in vars(transport) or any(
        vars(transport).get(name) is _inert for name in ("doRead", "doWrite")
    ):
        raise ValueError(f"{transport!r} is already frozen")


def pendingOutput(transport: Any) -> bytes:
    """
    The output Twisted holds for a connection and has not written, for a
    caller that replaces the process image before the reactor runs again
    (re-exec): nothing reads or writes the connection in between, so it
    needs no freezing, and there is nothing to undo if the exec fails.

    @param transport: as for L{freezeConnection}.

    @raise ValueError: if the connection cannot be taken over, as
        L{freezeConnection} would.
    """
    _checkMovable(transport)
    return _bufferedOutput(transport)


def quiet(transport: Any) -> bool:
    """
    Whether a connection could be taken over with no output to carry: it is
    connected, not closing or aborting, and Twisted holds no output (nor
    descriptors) for it.  The cheap check a pre-copy makes at the freeze
    (a connection that is not quiet is described again, with its output).

    @param transport: as for L{freezeConnection}.
    """
    return stillMovable(transport) and not _mustFlush(transport)


def stillMovable(transport: Any) -> bool:
    """
    Can a connection that could move a moment ago still move, as far as its
    transport goes?  The cheap checks only, for a connection already found
    movable once (see L{_checkMovable}): it is still connected, not closing,
    not being aborted, and has no descriptors queued for sending.
    """
    return bool(
        transport.connected
        and not transport.disconnected
        and not transport.disconnecting
        and not getattr(transport, "_aborting", False)
        and not getattr(transport, "_sendmsgQueue", None)
    )


def unsentOutput(transport: Any) -> bytes:
    """
    The output Twisted holds for a connection and has not written: as
    L{pendingOutput}, without its checks, and without building anything
    when there is none (as for almost every connection).
    """
    if transport.offset >= len(transport.dataBuffer) and not (
        transport._tempDataBuffer
    ):
        return b""
    return _bufferedOutput(transport)


def freezeConnection(transport: Any) -> FrozenConnection:
    """
    Stop a connection reading and writing, keeping every byte Twisted holds.

    Safe to call from the connection's own C{dataReceived}.

    @param transport: a connected C{twisted.internet.tcp.Connection} (TCP
        over IPv4 or IPv6, or Unix stream).

    @return: the frozen connection, to resume or release.

    @raise ValueError: if the transport cannot be frozen: not connected,
        closing by abort, already frozen, TLS, or Unix descriptors queued
        for sending.
    """
    _checkMovable(transport)
    wasReading = _isReading(transport)
    transport.stopReading()
    transport.stopWriting()
    frozen = FrozenConnection(
        transport, _bufferedOutput(transport), wasReading=wasReading
    )
    frozen._hook()
    return frozen


def _family(fd: int) -> tuple[socket.AddressFamily, socket.SocketKind]:
    """
    The address family and type of the socket behind C{fd}.

    @raise OSError: if C{fd} is not a socket.
    """
    with socket.socket(fileno=os.dup(fd)) as probe:
        return probe.family, probe.type


def adoptConnection(
    reactor: Any,
    fd: int,
    factory: IProtocolFactory,
    family: socket.AddressFamily | None = None,
    hold: bool = True,
) -> Any:
    """
    Take over a connected stream socket received from another process.

    The factory builds the protocol as for an accepted connection (its
    C{makeConnection} runs inside this call).  The new transport comes back
    I{held}: it reads nothing and writes nothing (what the protocol writes
    is buffered) until L{resumeConnection}; L{abandonConnection} gives it up
    without disturbing the peer.

    @param reactor: an C{IReactorSocket} provider (a posix reactor).
    @param fd: the descriptor; always consumed (closed), even on error, since
        the reactor works on its own duplicate.
    @param factory: builds the protocol.
    @param family: the socket's address family, when the sender said
        (saves probing each of thousands of descriptors).
    @param hold: C{False} when the caller holds back what the protocol
        writes itself (as L{migrate._host._tracking.HostedProtocol} does): the
        transport then only stops reading, which is much cheaper for
        thousands of connections; give it up with L{abandonConnection} all
        the same.

    @return: the transport.

    @raise ValueError: if C{fd} is not a connected stream socket of a
        supported family or the factory refused the connection (returned
        L{None}); the socket is then closed here without C{shutdown()}.
    @raise ValueError: if the protocol aborted the connection while it was
        being adopted (it is let go of, not aborted).
    @raise Exception: whatever the protocol's C{makeConnection} raised; the
        half-built transport is let go of first.
    """
    try:
        if family is None:
            family, kind = _family(fd)
            if kind != socket.SOCK_STREAM:
                raise ValueError(f"descriptor {fd} is not a stream socket")
        recorder = _RecordingFactory(factory)
        try:
            transport = reactor.adoptStreamConnection(fd, family, recorder)
        except BaseException:
            built = getattr(recorder.built, "transport", None)
            if isinstance(built, FileDescriptor) and hasattr(built, "socket"):
                letGo(built)
            raise
    finally:
        os.close(fd)
    if transport is None:
        raise ValueError("the factory refused the connection")
    if not hold:
        transport.stopReading()
        return transport
    try:
        frozen = freezeConnection(transport)
    except BaseException:
        # For example, the protocol aborted the connection: its abort would
        # set SO_LINGER on the socket the old process still serves.
        letGo(transport)
        raise
    setattr(transport, _HOLD, frozen)
    return transport


def letGo(transport: Any) -> None:
    """
    Let go of a connection that is not frozen, once another process holds
    its socket (pre-copy) or its protocol failed during adoption, before the
    reactor runs again: as L{FrozenConnection.release} does, deregister it,
    close only this process's descriptor (no C{shutdown()}: the peer sees
    nothing), drop its buffers (the new holder sends them), and make every
    later I/O call on it do nothing.
    """
    # Deregister before closing: a descriptor closed while registered
    # leaves an epoll registration behind (the socket lives on in the other
    # process), and unregistering it later fails with EBADF.
    transport.stopReading()
    transport.stopWriting()
    try:
        transport.socket.close()
    except OSError:
        pass
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.connected = 0
    transport.disconnecting = 0
    transport.disconnected = 1
    for name in _HOOKED:
        setattr(transport, name, _inert)


def resumeConnection(transport: Any) -> None:
    """
    Start serving an adopted connection: read, and send what the protocol
    wrote meanwhile.

    @param transport: returned by L{adoptConnection}; a transport not held
        by it simply starts reading.
    """
    frozen = vars(transport).pop(_HOLD, None)
    if frozen is not None:
        frozen.resume()
    elif transport.connected and not transport.disconnecting:
        transport.startReading()


def abandonConnection(transport: Any) -> None:
    """
    Give back an adopted connection that was not resumed: close only this
    process's descriptor, silently, as L{FrozenConnection.release} does.

    @param transport: returned by L{adoptConnection}.

    @raise ValueError: if the transport was resumed already.
    """
    frozen = vars(transport).pop(_HOLD, None)
    if frozen is None:
        if not transport.connected or _isReading(transport):
            raise ValueError(f"{transport!r} is not an adopted, held connection")
        letGo(transport)
        return
    frozen.release()


class _RecordingFactory:
    """
    Wraps a factory to remember the protocol it built, so that a transport
    whose protocol failed in C{makeConnection} can still be found.
    """

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory
        self.built: IProtocol | None = None

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        self.built = self._factory.buildProtocol(addr)
        return self.built


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to a connection with one C{send()} on its socket when
    Twisted holds nothing for it (no unwritten output, no close waiting for
    the buffer to drain), instead of the reactor's write path (register for
    writing, write, unregister).  What the kernel does not take, and
    everything while Twisted holds output or the connection is frozen, goes
    through C{transport.write} as usual, so the bytes keep their order.

    A client sending small messages at a high rate saves most of the
    reactor's work per message by it.

    Also through C{transport.write}: a connection that started TLS (the
    bytes must be encrypted) and a Unix connection with descriptors queued
    to go with its next bytes.

    @param transport: a connected stream transport (C{twisted.internet.tcp}
        or C{twisted.internet.unix}); anything else is simply written to.
    @param data: the bytes to send.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or "doWrite" in vars(transport)
        or getattr(transport, "TLS", False)
        or getattr(transport, "_sendmsgQueue", None)
        or _mustFlush(transport)
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        # The connection is going; its end will be noticed by reading.
        return
    if sent < len(data):
        transport.write(data[sent:])


def flushWriters(reactor: Any, exclude: Collection[Any] = ()) -> int:
    """
    Write, now, as much of what the reactor's writers (its descriptors
    registered for writing) buffer as the kernel takes, as its next turn
    would, without waiting for that turn (L{flushNow}, for each but the
    writers in C{exclude}).

    @param exclude: writers (transports) not to touch.

    @return: how many writers were written to.
    """
    getWriters = getattr(reactor, "getWriters", None)
    if getWriters is None:
        return 0
    written = 0
    for writer in list(getWriters()):
        if writer not in exclude and flushNow(writer):
            written += 1
    return written


def flushNow(writer: Any) -> bool:
    """
    Write, now, as much of what Twisted buffers for C{writer} (descriptors
    queued to go with the bytes included) as the kernel takes, as the
    reactor's next turn would.  Left to that turn: a writer asked to close
    or half-close (its last write makes the reactor end it), one with a
    producer (its writes resume it), one that is not a L{FileDescriptor}
    (nothing is known of its write) and a frozen one.  A write that finds
    its connection lost keeps it registered, so that the next turn finds
    the loss again and ends it as usual.

    @return: whether it was written to.
    """
    if (
        not isinstance(writer, FileDescriptor)
        or "doWrite" in vars(writer)
        or writer.disconnecting
        or getattr(writer, "_writeDisconnecting", False)
        or writer.producer is not None
    ):
        return False
    try:
        lost = writer.doWrite()
    except Exception:
        _log.failure("Writing early to {writer} failed", writer=writer)
        return False
    if lost is not None:
        writer.startWriting()
    return True


@implementer(ITransport)
class DetachedTransport:
    """
    What a replaced protocol is left with: its connection is served by
    another protocol object now.  Timers and callbacks the old code
    scheduled may still run; what they write goes nowhere rather than
    into a connection the old object no longer owns.

    @ivar discarded: how many bytes were written to it.
    """

    def __init__(self, peer: Any, host: Any) -> None:
        self._peer = peer
        self._host = host
        self._hostOf: Callable[[], Any] | None = None
        self.discarded = 0
        self.disconnecting = False

    @classmethod
    def lazily(cls, peer: Any, hostOf: Callable[[], Any]) -> DetachedTransport:
        """
        A detached transport whose host address is asked of C{hostOf} when
        (and if) it is first asked for, not now: the old objects of
        thousands of connections are detached while every client waits,
        and almost none of them ever asks (C{getHost} of a TCP connection
        is a system call and a new address object).

        @param peer: the peer's address.
        @param hostOf: returns the host's address (the C{getHost} of the
            connection, which goes on being served by another object).
        """
        detached = cls(peer, None)
        detached._hostOf = hostOf
        return detached

    def write(self, data: bytes) -> None:
        self.discarded += len(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for each in data:
            self.write(each)

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        hostOf = self._hostOf
        if hostOf is not None:
            self._host = hostOf()
            self._hostOf = None
        return self._host

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
