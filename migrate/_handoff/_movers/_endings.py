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
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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
    mover = None
    if protocol is not None and not IMigratable.providedBy(protocol):
        mover = movers.moverFor(protocol)
    if mover is None:
        hosted.loseConnection()
        return True
    try:
        return bool(mover.closePolitely(code))
    except Exception:
        _log.failure("Could not end {protocol} politely", protocol=protocol)
        hosted.loseConnection()
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
