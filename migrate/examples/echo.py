"""
An echo server that knows nothing about migrate.

Its protocol does not provide L{migrate.interfaces.IMigratable}, so it shows
what happens to an unmodified application: under gradual transfer its
established connections keep being served by the old code until the
clients leave (or C{--drain-timeout} closes them), while new connections
reach the new code.  Serve it with
C{twistd -n migrate-host --app migrate.examples.echo:EchoFactory}.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol

__all__ = ["Echo", "EchoFactory"]


class Echo(Protocol):
    """
    Send back every byte received.
    """

    def dataReceived(self, data: bytes) -> None:
        """
        @param data: bytes from the client, written back unchanged.
        """
        assert self.transport is not None
        self.transport.write(data)


class EchoFactory(Factory):
    """
    Build L{Echo} protocols.
    """

    protocol = Echo
