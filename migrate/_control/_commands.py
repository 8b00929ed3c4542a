# -*- test-case-name: migrate.test.test_control -*-
"""
The AMP commands of the control channel, shared by the server that answers
them (L{migrate._control._server}) and the client that sends them
(L{migrate._control._client}).
"""

from __future__ import annotations

from twisted.protocols import amp

__all__ = [
    "MigrationInProgress",
    "Progress",
    "Status",
    "Stop",
    "UnknownStrategy",
    "Upgrade",
]


class MigrationInProgress(Exception):
    """
    A migration is already running (or this process no longer serves), so
    another cannot start now.
    """


class UnknownStrategy(Exception):
    """
    The requested strategy is not one this host knows.
    """


class Status(amp.Command):
    """
    Describe the host: the answer is a JSON object (see CONTRACTS, Status
    JSON).
    """

    arguments = []
    response = [(b"status", amp.Unicode())]


class Upgrade(amp.Command):
    """
    Migrate now, with the named strategy or the configured one; the answer,
    sent when the migration has ended, is the report as a JSON object.
    L{Progress} commands flow back to the caller meanwhile.
    """

    arguments = [
        (b"strategy", amp.Unicode(optional=True)),
        # Host settings for this migration only (upgrade --ready-timeout,
        # --drain-timeout), in seconds.
        (b"readyTimeout", amp.Float(optional=True)),
        (b"drainTimeout", amp.Float(optional=True)),
    ]
    response = [(b"report", amp.Unicode())]
    errors = {
        MigrationInProgress: b"MIGRATION_IN_PROGRESS",
        UnknownStrategy: b"UNKNOWN_STRATEGY",
    }


class Stop(amp.Command):
    """
    Stop the whole service politely: no new connections, every generation
    drains for up to C{drainTimeout} seconds (the host's C{--drain-timeout}
    by default, or 30), then what is left is closed cleanly and every
    process exits.  The answer, sent once every generation has ended, is a
    JSON object; L{Progress} commands flow back meanwhile.
    """

    arguments = [(b"drainTimeout", amp.Float(optional=True))]
    response = [(b"result", amp.Unicode())]
    errors = {MigrationInProgress: b"MIGRATION_IN_PROGRESS"}


class Progress(amp.Command):
    """
    Server to client: one human-readable line about a running migration.
    """

    arguments = [(b"message", amp.Unicode())]
    response = []
    requiresAnswer = False
