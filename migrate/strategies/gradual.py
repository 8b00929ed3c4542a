"""
Gradual transfer: the successor takes the listening sockets; the old
process finishes serving the connections it has, then exits.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import implementer

from ..interfaces import IMigrationStrategy
from ._transfer._strategy import SuccessorHandoff

__all__ = ["GradualTransfer"]


@implementer(IMigrationStrategy)
@frozen
class GradualTransfer(SuccessorHandoff):
    """
    New connections reach the new code at once; existing ones stay on the
    old code until they end (or until the host's drain deadline).

    Works for every application, migratable or not, and for TLS.
    """

    name = "gradual"
    movesConnections = False
