"""
The common shape of the strategies that hand the service to a successor
process over the hand-off channel (gradual and capability transfer).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from twisted.internet.defer import Deferred, succeed

from ...interfaces import IMigrationHost
from ._incoming import startIncoming
from ._outgoing import OutgoingHandoff

__all__ = ["SuccessorHandoff"]


class SuccessorHandoff:
    """
    Hands the service to a new process started with the code on disk.

    @cvar name: the strategy's name.
    @cvar movesConnections: whether established connections move along
        (capability transfer) or stay on the old process until they end
        (gradual transfer).
    @cvar replacesProcess: the old process ends once drained (a keeper
        stays in its place where a supervisor watches it).
    """

    name: ClassVar[str]
    movesConnections: ClassVar[bool]
    replacesProcess: ClassVar[bool] = True

    def migrate(
        self, host: IMigrationHost, progress: Callable[[str], None]
    ) -> Deferred[Any]:
        handoff = OutgoingHandoff(
            host=host,
            strategyName=self.name,
            progress=progress,
            moveConnections=self.movesConnections,
        )
        return handoff.run()

    def inherit(self, host: IMigrationHost, inheritance: Any) -> Deferred[None]:
        startIncoming(host, inheritance)
        return succeed(None)
