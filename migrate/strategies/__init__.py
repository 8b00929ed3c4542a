"""
The migration strategies that ship with migrate, by name.
"""

from __future__ import annotations

from ..interfaces import IMigrationStrategy
from .capability import CapabilityTransfer
from .gradual import GradualTransfer
from .reexec import ReexecStrategy
from .reload import ModuleReload

__all__ = [
    "CapabilityTransfer",
    "GradualTransfer",
    "ModuleReload",
    "ReexecStrategy",
    "strategyNamed",
    "strategyNames",
]


def _builtIn() -> dict[str, IMigrationStrategy]:
    return {
        GradualTransfer.name: GradualTransfer(),
        CapabilityTransfer.name: CapabilityTransfer(),
        ReexecStrategy.name: ReexecStrategy(),
        ModuleReload.name: ModuleReload(),
    }


def strategyNames() -> list[str]:
    """
    The names of the strategies available, sorted.
    """
    return sorted(_builtIn())


def strategyNamed(name: str) -> IMigrationStrategy:
    """
    The strategy called C{name}.

    @raise KeyError: if there is none.
    """
    return _builtIn()[name]
