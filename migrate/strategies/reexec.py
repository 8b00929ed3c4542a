"""
Re-exec: the host replaces its own process image with the code on disk
(C{execv}), keeping its PID, its listening sockets, its control socket and
its established connections, with the state of every protocol that
provides L{IMigratable}.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import field, frozen
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from ..interfaces import IMigrationHost, IMigrationStrategy
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

    While the new image starts, a child of the old image (the I{caretaker})
    goes on serving the connections with the old code, and hands them over
    once the new image is ready to restore them (the C{reexec-caretaker}
    option: C{"fork"}, the default, or C{"none"}); see
    L{migrate.strategies._reexec._caretaker}.

    @ivar _migration: makes the L{ReexecMigration} that runs one re-exec
        (tests give it stand-ins for C{execv} and the preflight).
    """

    name = "reexec"
    _migration: Callable[..., ReexecMigration] = field(default=ReexecMigration)

    def migrate(
        self, host: IMigrationHost, progress: Callable[[str], None]
    ) -> Deferred[Any]:
        migration = self._migration(
            host=host,
            progress=progress,
            unmovable=host.settings.strategyOptions.get("reexec-unmovable", "close"),
            trialFailure=host.settings.strategyOptions.get("trial-failure", "refuse"),
            caretaker=host.settings.strategyOptions.get("reexec-caretaker", "fork")
            == "fork",
            strategyName=self.name,
        )
        result: Deferred[Any] = migration.run()
        return result

    def inherit(self, host: IMigrationHost, inheritance: Any) -> Deferred[None]:
        return maybeDeferred(restoreReexec, host, inheritance).addCallback(
            lambda report: None
        )
