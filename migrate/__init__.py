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
from ._rolling import RollingUpgrade
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
