"""
The application the benchmark hosts: a line server whose connections can
move, with a small per-connection state.

Each request is one line whose first word is a number; the reply is one
line, C{NUMBER PID COUNT}: the request's number, the process that answered
and how many lines this connection has had answered so far.  C{COUNT} is
the connection's state: it travels with the connection, so a client sees
at once whether a migration kept it (it goes on counting) or lost it.

The benchmark copies this file into the host's working directory as the
top-level module L{APP_MODULE} and serves C{APP_MODULE:makeFactory}: an
application outside the C{migrate} package, as users' are (module reload
refuses to reload a part of migrate itself).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from migrate.interfaces import IMigratable

__all__ = ["APP_MODULE", "BenchLine", "makeFactory"]

APP_MODULE = "migrate_bench_app"
"""
The name the benchmark's hosts import this module by.
"""


@implementer(IMigratable)
class BenchLine(LineReceiver):
    """
    Answer each line with its first word, this process's id and the
    connection's running count.

    @ivar count: lines answered on this connection, in every process it
        has been served by.
    """

    delimiter = b"\n"
    migrationVersion = 1
    count = 0
    _pid = b"%d" % os.getpid()

    def connectionMade(self) -> None:
        """
        Send each answer at once (no Nagle delay): a restored connection
        keeps the option, which belongs to the socket.
        """
        transport: Any = self.transport
        transport.setTcpNoDelay(True)

    def lineReceived(self, line: bytes) -> None:
        """
        @param line: a request; its first word is echoed back.
        """
        self.count += 1
        word = line.split(b" ", 1)[0]
        self.sendLine(b"%s %s %d" % (word, self._pid, self.count))

    def getMigrationState(self) -> Any:
        """
        @return: the connection's count.
        """
        return {"count": self.count}

    def restoreMigrationState(self, state: Any) -> None:
        """
        @param state: from L{getMigrationState}.
        """
        self.count = int(state["count"])

    def abandonMigrationState(self) -> None:
        """
        Nothing to undo: a restore registers the connection nowhere, so a
        reload may restore it ahead of its pause, and a capability
        transfer's successor ahead of its freeze.
        """

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        """
        Only version 1 exists.

        @raise ValueError: always (no other version was ever written).
        """
        raise ValueError("unknown state version {!r}".format(fromVersion))


def makeFactory() -> Factory:
    """
    @return: the factory C{migrate-host} serves.
    """
    return Factory.forProtocol(BenchLine)
