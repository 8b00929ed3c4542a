"""
migrate: move live Twisted services to new code without dropping a
connection.

Host an application's protocol factory (or a whole twistd plugin) in a
L{MigrationHost} with an L{IMigrationStrategy}; protocols that provide
L{IMigratable} keep their connections and state across migrations.
L{RollingUpgrade} upgrades a fleet of hosts behind HAProxy.
"""

from typing import TYPE_CHECKING

from ._host._service import MigrationHost
from ._host._settings import HostSettings
from ._report import ListenerReport, MigrationOutcome, MigrationPhase, MigrationReport
from ._version import __version__
from .interfaces import IMigratable, IMigrationHost, IMigrationStrategy

if TYPE_CHECKING:
    from ._rolling._orchestrator import RollingUpgrade
    from .strategies import (
        CapabilityTransfer,
        GradualTransfer,
        ModuleReload,
        ReexecStrategy,
    )

__all__ = [
    "CapabilityTransfer",
    "GradualTransfer",
    "HostSettings",
    "IMigratable",
    "IMigrationHost",
    "IMigrationStrategy",
    "ListenerReport",
    "MigrationHost",
    "MigrationOutcome",
    "MigrationPhase",
    "MigrationReport",
    "ModuleReload",
    "ReexecStrategy",
    "RollingUpgrade",
    "__version__",
]


_LAZY = {
    "CapabilityTransfer": "migrate.strategies",
    "GradualTransfer": "migrate.strategies",
    "ModuleReload": "migrate.strategies",
    "ReexecStrategy": "migrate.strategies",
    "RollingUpgrade": "migrate._rolling._orchestrator",
}


def __getattr__(name: str) -> object:
    # Strategies and the rolling upgrade orchestrator load only when asked
    # for: every host process, successor and re-executed image imports this
    # package while the service waits.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
