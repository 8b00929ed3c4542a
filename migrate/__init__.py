"""
migrate: move live Twisted services to new code without dropping a
connection.

Host an application's protocol factory in a L{MigrationHost} with an
L{IMigrationStrategy}; protocols that provide L{IMigratable} keep their
connections and state across migrations.
"""

from ._host import MigrationHost
from ._report import ListenerReport, MigrationOutcome, MigrationReport
from .interfaces import IMigratable, IMigrationStrategy
from .strategies import CapabilityTransfer, GradualTransfer

__all__ = [
    "CapabilityTransfer",
    "GradualTransfer",
    "IMigratable",
    "IMigrationStrategy",
    "ListenerReport",
    "MigrationHost",
    "MigrationOutcome",
    "MigrationReport",
]
