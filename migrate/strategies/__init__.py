"""
The migration strategies that ship with migrate, by name.

Each strategy's module loads only when that strategy is asked for: every
successor and every re-executed image imports this package while the
service waits, so what a process does not use it does not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..interfaces import IMigrationStrategy

if TYPE_CHECKING:
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

#: strategy name -> (module, class)
_BUILT_IN = {
    "capability": ("migrate.strategies.capability", "CapabilityTransfer"),
    "gradual": ("migrate.strategies.gradual", "GradualTransfer"),
    "reexec": ("migrate.strategies.reexec", "ReexecStrategy"),
    "reload": ("migrate.strategies.reload", "ModuleReload"),
}

_CLASSES = {className: module for module, className in _BUILT_IN.values()}


def strategyNames() -> list[str]:
    """
    The names of the strategies available, sorted.
    """
    return sorted(_BUILT_IN)


def strategyNamed(name: str) -> IMigrationStrategy:
    """
    The strategy called C{name}.

    @raise KeyError: if there is none.
    """
    module, className = _BUILT_IN[name]
    strategy: IMigrationStrategy = getattr(importlib.import_module(module), className)()
    return strategy


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
