"""
Handing a listening socket from one process to another.

Only passing the very same listening socket refuses no connection: the
kernel's accept backlog travels with it.  The old process sends the
descriptor (L{listenerDescriptor}), the new one adopts it
(L{adoptListener}), typically not accepting until the hand-off commits
(L{pauseListener}, L{resumeListener}), and the old one then lets go of its
copy (L{releaseListener}) without the C{shutdown()} that would stop the
socket for every holder, and without unlinking the path of a Unix socket the
new process now serves.

Reaches into Twisted's C{tcp.Port} (C{_shouldShutdown}) and
C{unix.Port._fromListeningDescriptor}; nowhere else does.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "listenerDescriptor",
    "releaseListener",
    "adoptListener",
    "pauseListener",
    "resumeListener",
]

_log = Logger()


def listenerDescriptor(port: Any) -> int:
    """
    The descriptor of a listening port, to send to another process.

    @param port: a listening C{twisted.internet.tcp.Port} or
        C{twisted.internet.unix.Port}.
    """
    return int(port.fileno())


def releaseListener(port: Any) -> None:
    """
    Stop accepting and close this process's copy of a listening socket that
    another process holds now.

    The socket is not shut down (that would stop it for every holder) and a
    Unix socket's path is not unlinked (it reaches the other holder now).
    The port's factory is stopped (C{doStop}) and the port no longer listens,
    at once: a later C{stopListening} does nothing.  Releasing a port that
    does not listen does nothing.

    @param port: a C{twisted.internet.tcp.Port} or
        C{twisted.internet.unix.Port}.
    """
    if not port.connected:
        return
    port.disconnecting = True
    # Deregister before the descriptor closes (no epoll registration left).
    port.stopReading()
    port._shouldShutdown = False
    lockFile = getattr(port, "lockFile", None)
    if lockFile is not None:
        lockFile.unlock()
        port.lockFile = None
    # tcp.Port's own connectionLost closes and stops the factory; calling it
    # directly skips unix.Port.connectionLost, which unlinks the path.
    tcp.Port.connectionLost(port, Failure(CONNECTION_DONE))


def _describe(fd: int) -> tuple[socket.AddressFamily, object]:
    """
    Check that C{fd} is a listening stream socket.

    @return: its family and local address.

    @raise ValueError: if it is not a listening stream socket.
    @raise OSError: if it is not a socket at all.
    """
    with socket.socket(fileno=os.dup(fd)) as probe:
        if probe.type != socket.SOCK_STREAM:
            raise ValueError(f"descriptor {fd} is not a stream socket")
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"descriptor {fd} is not listening")
        return probe.family, probe.getsockname()


def adoptListener(
    reactor: Any,
    fd: int,
    factory: IProtocolFactory,
    *,
    accepting: bool,
    backlog: int | None = None,
) -> IListeningPort:
    """
    Serve a listening socket received from another process.

    The descriptor is made non-blocking (a blocking listening socket would
    hang the reactor in C{accept()}).  A Unix socket's file keeps its mode
    (Twisted would make it 0666 when it starts listening).

    @param reactor: an C{IReactorSocket} provider (a posix reactor).
    @param fd: the descriptor; always consumed (closed), even on error,
        since the port works on its own duplicate.
    @param factory: builds protocols for accepted connections.
    @param accepting: C{False} to leave new connections in the backlog until
        L{resumeListener}.
    @param backlog: if given, the backlog to C{listen()} with.  A TCP socket
        otherwise keeps the old process's backlog; a Unix one gets
        Twisted's default (50), since Twisted calls C{listen()} again.

    @return: the listening port.

    @raise ValueError: if C{fd} is not a listening stream socket.
    """
    port: Any
    try:
        family, address = _describe(fd)
        os.set_blocking(fd, False)
        if family == socket.AF_UNIX:
            port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
            if isinstance(address, str) and address:
                port.mode = stat.S_IMODE(os.stat(address).st_mode)
            if backlog is not None:
                port.backlog = backlog
            port.startListening()
            # Like tcp.Port does for an adopted socket: never shut down a
            # socket another process may hold.
            port._shouldShutdown = False
        else:
            port = reactor.adoptStreamPort(fd, family, factory)
            if backlog is not None:
                port.socket.listen(backlog)
    finally:
        os.close(fd)
    if not accepting:
        port.stopReading()
    _log.info(
        "Adopted listening socket {address} ({state})",
        address=address,
        state="accepting" if accepting else "paused",
    )
    listening: IListeningPort = port
    return listening


def pauseListener(port: Any) -> None:
    """
    Stop accepting; new connections wait in the kernel's backlog.

    @param port: a listening port.
    """
    port.stopReading()


def resumeListener(port: Any) -> None:
    """
    Accept again after L{pauseListener} or a paused L{adoptListener}.

    @param port: a listening port; one that no longer listens is left alone.
    """
    if port.connected and not port.disconnecting:
        port.startReading()
