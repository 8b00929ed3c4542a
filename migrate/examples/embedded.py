"""
An existing Twisted application that embeds a L{migrate.MigrationHost}.

The application builds its service tree as it always did and adds a host
for the protocol factory it wants to be able to upgrade without dropping
anyone; nothing else changes.  A migration (C{python -m migrate upgrade
--control PATH}, or C{SIGHUP}) starts the same command again with the code
now on disk; the new process's host finds in its environment that it
inherits the service and takes it over.

Run it with::

    python -m migrate.examples.embedded [PORT [CONTROL-PATH]]
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import globalLogBeginner, textFileLogObserver

from migrate import CapabilityTransfer, MigrationHost
from migrate.examples.chat import ChatFactory

__all__ = ["buildApplication", "main"]


def buildApplication(reactor: Any, port: str, control: str) -> MultiService:
    """
    The application's service tree: here only the chat, hosted so that it
    can move to new code.

    @param reactor: the reactor.
    @param port: the TCP port to serve the chat on (loopback).
    @param control: the control socket's path.
    """
    application = MultiService()
    host = MigrationHost(
        reactor,
        ChatFactory(),
        ["tcp:{}:interface=127.0.0.1".format(port)],
        CapabilityTransfer(),
        controlPath=control,
    )
    host.setServiceParent(application)
    return application


def main(argv: list[str]) -> None:
    """
    Run the application until it is stopped, or until it has handed its
    service to a new process and finished draining.
    """
    from twisted.internet import reactor

    port = argv[0] if argv else "8000"
    control = argv[1] if len(argv) > 1 else "embedded.sock"
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    application = buildApplication(reactor, port, control)
    reactor.callWhenRunning(application.startService)
    reactor.addSystemEventTrigger("before", "shutdown", application.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
