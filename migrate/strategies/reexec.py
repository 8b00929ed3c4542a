"""
Re-exec: the host replaces its own process image with the code on disk
(C{execv}), keeping its PID, its listening sockets, its control socket and
its established connections, with the state of every protocol that
provides L{IMigratable}.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ..interfaces import IMigrationStrategy
from ._reexec._incoming import restoreReexec
from ._reexec._outgoing import ReexecMigration

__all__ = ["ReexecStrategy"]


@implementer(IMigrationStrategy)
@frozen
class ReexecStrategy:
    """
    Everything is checked first (the command line, the new code loading in
    a preflight process, every connection's state, descriptor limits), then
    the process re-executes itself in place: there is no way back once
    C{execv} has succeeded, and no old process is left to drain anything.

    Connections whose protocol does not provide L{IMigratable} follow the
    host's C{reexec-unmovable} strategy option: C{"close"} (the default:
    closed cleanly before the exec) or C{"adopt"} (a fresh protocol of the
    new code takes them over and is told C{connectionMade}).
    """

    name = "reexec"

    def migrate(self, host: Any, progress: Callable[[str], None]) -> Deferred[Any]:
        options = getattr(host, "strategyOptions", None) or {}
        migration = ReexecMigration(
            host=host,
            progress=progress,
            unmovable=options.get("reexec-unmovable", "close"),
            trialFailure=options.get("trial-failure", "refuse"),
            strategyName=self.name,
        )
        result: Deferred[Any] = migration.run()
        return result

    def inherit(self, host: Any, inheritance: Any) -> Deferred[None]:
        restoreReexec(host, inheritance)
        return succeed(None)
