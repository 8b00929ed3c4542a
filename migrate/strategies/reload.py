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

from .._report import MigrationReport
from ..interfaces import IMigrationHost, IMigrationStrategy
from ._reload._attempt import (
    FINGERPRINTS,
    PRECOPY_SLICE,
    PRECOPY_SLICE_SECONDS,
    SWITCH_SLICE,
    ReloadAttempt,
)
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

    The states are copied first, a slice of connections per turn of the
    reactor while the old code serves (the pre-copy, which the trial
    uses; a slice ends after a number of connections or a few
    milliseconds, whichever comes first); the pause (import, prepare, commit) reuses each copy whose
    connection did not change since; after it, each rebuilt connection
    switches to its new protocol object in slices, or before its next
    event if that comes first.
    """

    name = "reload"
    _fingerprints: ModuleFingerprints = field(default=FINGERPRINTS)
    _trial: Callable[[Any, Any, str], Deferred[Any]] | None = field(
        default=trialInChild
    )
    _sliceSizes: tuple[int, int] = field(default=(PRECOPY_SLICE, SWITCH_SLICE))
    _sliceSeconds: float = field(default=PRECOPY_SLICE_SECONDS)

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
            switchSlice=self._sliceSizes[1],
            sliceSeconds=self._sliceSeconds,
        )
        early = attempt.begin()
        if early is not None:
            return succeed(early)
        copied = attempt.copyStates(self._sliceSizes[0])
        trial = self._trial
        if trial is None:
            finished: Deferred[MigrationReport] = copied.addCallback(
                lambda cases: attempt.finish()
            )
            return finished

        def tryNewCode(cases: Any) -> Deferred[Any]:
            attempt.attempt.step("trying the new code in a child process")
            return trial(
                host,
                cases,
                host.settings.strategyOptions.get("trial-failure", "refuse"),
            )

        tried: Deferred[Any] = copied.addCallback(tryNewCode)
        result: Deferred[MigrationReport] = tried.addCallback(attempt.tried)
        return result

    def inherit(self, host: IMigrationHost, inheritance: Any) -> Deferred[None]:
        return fail(
            NoIncomingHalf(
                "module reload happens inside the serving process; a new "
                "process cannot inherit a service with it"
            )
        )
