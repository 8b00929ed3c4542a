# -*- test-case-name: migrate.test.test_reexec -*-
"""
The drain reports of older generations, across C{exec}.

A process that took over with a transfer strategy keeps a channel to the
generation before it, which reports its draining there (L{DrainStatus}) for
as long as it drains.  A re-exec carries those channels like any other
descriptor: the old image checks that no report is half received or half
answered (L{quietChannel}), names each channel's descriptor in the state
document with the generations it last reported, and the new image listens
on it again (L{ReportChannel}), so that C{status} goes on showing the older
generations and a later migration knows about them.

L{quietChannel} reads private attributes of Twisted's AMP parser
(C{BinaryBoxProtocol._currentBox}, C{Int16StringReceiver.recvd}); they are
read here only.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..._handoff._transport import pendingOutput
from ...interfaces import IMigrationHost
from .._transfer._channel import DrainStatus, Reported, parseDrainStatus

__all__ = ["ReportChannel", "quietChannel"]

_log = Logger()


def quietChannel(channel: Any) -> str | None:
    """
    Check that a report channel can cross C{exec}: nothing half read by its
    parser and nothing unwritten, which C{exec} would lose.

    @return: why it cannot, or L{None}.
    """
    transport: Any = getattr(channel, "transport", None)
    if (
        transport is None
        or getattr(transport, "fileno", None) is None
        or getattr(transport, "disconnected", True)
    ):
        return "its channel is not an open socket"
    parser: Any = channel
    if getattr(parser, "_currentBox", None) is not None or getattr(
        parser, "recvd", None
    ):
        return "a report from it is half received"
    try:
        if pendingOutput(transport):
            return "an answer to it is not written yet"
    except ValueError as e:
        return str(e)
    return None


class ReportChannel(amp.AMP):
    """
    The re-executed image's end of an older generation's report channel.

    @ivar host: the host the reports update.
    @ivar viaPid: the process at the other end.
    """

    def __init__(self, host: IMigrationHost, viaPid: int) -> None:
        amp.AMP.__init__(self)
        self.host = host
        self.viaPid = viaPid

    @DrainStatus.responder
    def drainStatus(self, draining: str) -> dict[str, Any]:
        try:
            entries = parseDrainStatus(draining)
        except ValueError as e:
            _log.warn("Ignoring a malformed drain status: {why}", why=str(e))
            return {}
        self.host.updateDraining(entries, viaPid=self.viaPid)
        return {}

    @Reported.responder
    def reported(self, report: str) -> dict[str, Any]:
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.AMP.connectionLost(self, reason)
        _log.info("The older generation in process {pid} has ended", pid=self.viaPid)
        self.host.forgetDraining(self.viaPid)
