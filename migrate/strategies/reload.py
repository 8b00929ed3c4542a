# -*- test-case-name: migrate.test.test_reload -*-
"""
Module reload: the application's new code is loaded into the running
process, and its live protocols are upgraded in place.

The attempt itself (prepare everything, then commit in one step or roll it
all back) is L{migrate.strategies._reload._attempt.ReloadAttempt}; how
modules are found, staged and fingerprinted is
L{migrate.strategies._reload._modules}.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from .._handoff._trial import casesFrom
from .._report import MigrationReport
from ..interfaces import IMigrationHost, IMigrationStrategy
from ._reload._attempt import FINGERPRINTS, ReloadAttempt
from ._reload._modules import ModuleFingerprints
from ._reload._safety import trialInChild

__all__ = ["ModuleReload", "NoIncomingHalf"]


class NoIncomingHalf(Exception):
    """
    Module reload happens inside one process: there is nothing to inherit.
    """


@implementer(IMigrationStrategy)
@frozen
class ModuleReload:
    """
    Loads the application's new code into the running process and upgrades
    its live protocols in place: no new process, no socket moves.

    Protocols that provide L{IMigratable} are rebuilt by the new code from
    their (upgraded) state; others get their class's new code by
    C{__class__} assignment where that is safe, and stay on the old code
    otherwise.  All or nothing: anything that fails before the commit
    leaves everything on the old code.
    """

    name = "reload"
    _fingerprints: ModuleFingerprints = field(default=FINGERPRINTS)
    _trial: Callable[[Any, Any, str], Deferred[Any]] | None = field(
        default=trialInChild
    )

    def migrate(
        self, host: IMigrationHost, progress: Callable[[str], None]
    ) -> Deferred[MigrationReport]:
        """
        Try the new code in a child process first (unless this strategy was
        made without a trial), then reload it here.
        """
        attempt = ReloadAttempt(
            host,
            progress,
            self._fingerprints,
            self.name,
            importTimeout=host.settings.readyTimeout,
        )
        early = attempt.begin()
        if early is not None:
            return succeed(early)
        if self._trial is None:
            return succeed(attempt.finish())
        attempt.attempt.step("trying the new code in a child process")
        cases = casesFrom(attempt.connections())
        tried: Deferred[Any] = self._trial(
            host,
            cases,
            host.settings.strategyOptions.get("trial-failure", "refuse"),
        )
        result: Deferred[MigrationReport] = tried.addCallback(attempt.tried)
        return result

    def inherit(self, host: IMigrationHost, inheritance: Any) -> Deferred[None]:
        return fail(
            NoIncomingHalf(
                "module reload happens inside the serving process; a new "
                "process cannot inherit a service with it"
            )
        )
