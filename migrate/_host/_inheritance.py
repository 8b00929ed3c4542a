"""
Finding out, at start, whether this process inherits a service from a
previous generation (it is a successor, or a re-executed image) and which
strategy's incoming half takes it over.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..interfaces import IMigrationStrategy

__all__ = ["UnknownInheritedStrategy", "inheritedGeneration"]

#: the strategy a previous generation migrated with, for its successor
STRATEGY_VARIABLE = "MIGRATE_HANDOFF_STRATEGY"


class UnknownInheritedStrategy(ValueError):
    """
    The previous generation migrated with a strategy this code does not
    have.
    """


def inheritedGeneration(
    strategyNamed: Callable[[str], IMigrationStrategy],
    default: IMigrationStrategy,
) -> tuple[Any, IMigrationStrategy | None]:
    """
    What a previous generation hands this process, and the strategy whose
    incoming half takes it over; C{(None, None)} for a first generation.

    The variables that say so are removed from the environment, so that
    nothing this process starts inherits them.

    @param strategyNamed: finds a strategy by name.
    @param default: the strategy assumed when the previous generation did
        not name one.

    @raise UnknownInheritedStrategy: if it named one this code lacks.
    """
    # Only a re-executed image pays for importing the re-exec machinery.
    from ..strategies._reexec._state import STATE_FD_VARIABLE

    if STATE_FD_VARIABLE in os.environ:
        from ..strategies._reexec._incoming import inheritedReexec

        reexec = inheritedReexec()
        if reexec is not None:
            return reexec, strategyNamed("reexec")
    from .._handoff._successor import inheritedHandoff

    handoff = inheritedHandoff()
    if handoff is None:
        return None, None
    name = os.environ.pop(STRATEGY_VARIABLE, default.name)
    try:
        return handoff, strategyNamed(name)
    except KeyError:
        raise UnknownInheritedStrategy(
            "the previous generation asked for unknown strategy {!r}".format(name)
        )
