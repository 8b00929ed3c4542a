"""
Capability transfer: the successor takes the listening sockets and every
established connection whose protocol opts in to L{IMigratable}, with its
state and the bytes Twisted still buffers for it.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import implementer

from ..interfaces import IMigrationStrategy
from ._transfer._strategy import SuccessorHandoff

__all__ = ["CapabilityTransfer"]


@implementer(IMigrationStrategy)
@frozen
class CapabilityTransfer(SuccessorHandoff):
    """
    Every movable connection continues on the new code, two-phase and all
    or nothing: the old process lets go of a connection only once the
    successor has committed to the whole hand-off.  Connections that cannot
    move (not L{IMigratable}, TLS, refused by the new code) stay on the old
    process and drain, as in gradual transfer.
    """

    name = "capability"
    movesConnections = True
