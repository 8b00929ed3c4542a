"""
migrate: move live Twisted services to new code without dropping a
connection.

Host an application's protocol factory (or a whole twistd plugin) in a
L{MigrationHost} with an L{IMigrationStrategy}; protocols that provide
L{IMigratable} keep their connections and state across migrations.
L{RollingUpgrade} upgrades a fleet of hosts behind HAProxy.
"""

from ._host import MigrationHost
from ._report import ListenerReport, MigrationOutcome, MigrationReport
from .interfaces import IMigratable, IMigrationStrategy
from .strategies import (
    CapabilityTransfer,
    GradualTransfer,
    ModuleReload,
    ReexecStrategy,
)

__all__ = [
    "CapabilityTransfer",
    "GradualTransfer",
    "IMigratable",
    "IMigrationStrategy",
    "ListenerReport",
    "MigrationHost",
    "MigrationOutcome",
    "MigrationReport",
    "ModuleReload",
    "ReexecStrategy",
    "RollingUpgrade",
]


def __getattr__(name: str) -> object:
    # The rolling upgrade orchestrator (and the command-line client it
    # builds on) loads only when asked for: every host process, and every
    # re-executed image, imports this package at start.
    if name == "RollingUpgrade":
        from ._rolling import RollingUpgrade

        return RollingUpgrade
    raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
