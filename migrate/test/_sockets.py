"""
Real loopback sockets for the unit tests that ask the kernel about them:
connected TCP pairs closed with the test, and a bounded wait for input.
"""

from __future__ import annotations

import select
import socket

from twisted.trial.unittest import SynchronousTestCase

__all__ = ["LoopbackConnections", "waitReadable"]


class LoopbackConnections:
    """
    TCP connections on loopback, from one listener; every socket is closed
    at the end of the test.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.listener = socket.socket()
        case.addCleanup(self.listener.close)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)

    def connect(self) -> tuple[socket.socket, socket.socket]:
        """
        @return: a new connection's accepted end and its connecting end.
        """
        client = socket.create_connection(self.listener.getsockname())
        self.case.addCleanup(client.close)
        server, _ = self.listener.accept()
        self.case.addCleanup(server.close)
        return server, client


def waitReadable(sock: socket.socket) -> None:
    """
    Wait (at most ten seconds) until C{sock} has something to read.

    @raise AssertionError: if nothing arrived by then.
    """
    readable, _, _ = select.select([sock], [], [], 10.0)
    if not readable:
        raise AssertionError("nothing arrived within 10 s")
