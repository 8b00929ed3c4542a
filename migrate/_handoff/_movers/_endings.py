# -*- test-case-name: migrate.test.test_movers_endings -*-
"""
Polite endings for connections that did not move and reach the drain
deadline.

A protocol migrate has a mover for is ended the way its protocol allows
without harm: an HTTP/1.1 connection only between requests (or after a
response that says C{Connection: close}), HTTP/2 with GOAWAY, a WebSocket
with a close frame carrying code 1001 ("going away", which tells a client
to reconnect calmly; a bare close shows as 1006).  A connection that
cannot be ended now (a response being written) is asked again until it
can.  Every other connection is closed as before (C{loseConnection}).

The application's protocol may sit under protocol wrappers inside the
hosted protocol: TLS when the application wraps its own factory (a
C{TLSMemoryBIOFactory} given with C{--app}, or a hosted plugin's
C{listenSSL}), or another C{ProtocolWrapper}.  The mover is then looked up
on the innermost protocol, and a connection without one is closed through
the outermost wrapper, so that every layer ends properly (TLS with its
close_notify, which closing the hosted protocol would skip).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper

from migrate.interfaces import IMigratable

from ._registry import movers

__all__ = ["GOING_AWAY", "closePolitely", "closeAllPolitely"]

_log = Logger()

#: the WebSocket close code for a server going away (RFC 6455, 7.4.1)
GOING_AWAY = 1001


def closePolitely(hosted: Any, code: int = GOING_AWAY) -> bool:
    """
    End one connection, politely if its protocol has a mover.

    @param hosted: its hosted protocol (what the host tracks), whose
        C{wrappedProtocol} is the application's.
    @param code: the WebSocket close code.

    @return: whether it was ended (or asked to end) now; C{False} if it
        must be asked again later.
    """
    protocol = getattr(hosted, "wrappedProtocol", None)
    closer = protocol if isinstance(protocol, ProtocolWrapper) else hosted
    while isinstance(protocol, ProtocolWrapper):
        protocol = protocol.wrappedProtocol
    mover = None
    if protocol is not None and not IMigratable.providedBy(protocol):
        mover = movers.moverFor(protocol)
    if mover is None:
        closer.loseConnection()
        return True
    try:
        return bool(mover.closePolitely(code))
    except Exception:
        _log.failure("Could not end {protocol} politely", protocol=protocol)
        closer.loseConnection()
        return True


def _gone(hosted: Any) -> bool:
    """
    Whether a connection is closed or closing.
    """
    transport = getattr(hosted, "transport", None)
    return bool(
        getattr(hosted, "disconnecting", False)
        or transport is None
        or getattr(transport, "disconnected", False)
        or getattr(transport, "disconnecting", False)
    )


def closeAllPolitely(
    clock: IReactorTime,
    connections: Iterable[Any],
    interval: float = 0.05,
    code: int = GOING_AWAY,
) -> Callable[[], int]:
    """
    End every connection politely; ask again, every C{interval} seconds,
    those that cannot end now, until they do or the returned callable is
    called.

    @param clock: the clock.
    @param connections: hosted protocols.

    @return: a callable that stops asking, returning how many were still
        waiting for a polite ending.
    """
    waiting = [each for each in connections if not closePolitely(each, code)]
    stopped = [False]

    def again() -> None:
        if stopped[0]:
            return
        waiting[:] = [
            each
            for each in waiting
            if not _gone(each) and not closePolitely(each, code)
        ]
        if waiting:
            clock.callLater(interval, again)

    if waiting:
        clock.callLater(interval, again)

    def stop() -> int:
        stopped[0] = True
        return len(waiting)

    return stop
