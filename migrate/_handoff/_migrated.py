# -*- test-case-name: migrate.test.test_migrated -*-
"""
What the old code's protocol object is told once its connection is served
by the new code.

A moved connection's old protocol object is not told C{connectionLost}:
its user did not leave.  Left alone, what it scheduled would go on running
where it is: a C{LoopingCall} heartbeat, a C{callLater} retry, Twisted's
own idle timeout (C{TimeoutMixin}, which the HTTP channel uses).  With
capability transfer that lasts as long as the old process does (as long
as connections that stayed drain); with module reload, in the very same
process, for ever.  Their writes go nowhere (the transport is detached),
but their other effects (a database write, a log line saying the client
timed out) do not, and they keep the old code alive.

So once the connection is the new code's, L{tellMigrated} cancels a
C{TimeoutMixin} timeout itself and calls the protocol's optional
C{connectionMigrated()} (see L{migrate.interfaces.IMigratable}), or its
mover's.  It runs after the commit: what it raises is logged, and the
migration stays done.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from ._movers._registry import migratableFor

__all__ = ["cancelIdleTimeout", "tellMigrated"]

_log = Logger()


def cancelIdleTimeout(protocol: Any) -> None:
    """
    Cancel the idle timeout of a protocol built on Twisted's
    C{TimeoutMixin} (its C{timeoutConnection} would fire on a connection
    that is no longer its own); anything else is left alone.
    """
    if isinstance(protocol, TimeoutMixin):
        protocol.setTimeout(None)


def tellMigrated(protocol: Any) -> None:
    """
    Tell the old code's protocol object of a connection the new code now
    serves: its idle timeout cancelled (L{cancelIdleTimeout}), then its
    own C{connectionMigrated()}, or its mover's, if it defines one.

    Never raises: a failure is logged with the protocol's class.

    @param protocol: the application's protocol object (not migrate's
        wrapper); L{None} does nothing.
    """
    if protocol is None:
        return
    try:
        cancelIdleTimeout(protocol)
        hook = getattr(migratableFor(protocol), "connectionMigrated", None)
        if hook is not None:
            hook()
    except Exception:
        _log.failure(
            "{protocol}.connectionMigrated failed (its connection is served by "
            "the new code all the same)",
            protocol=type(protocol).__qualname__,
        )
