"""
Tests for L{migrate._host._intercept}: owning a hosted plugin's listening ports.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from .._host._intercept import (
    CannotHost,
    ListeningInterceptor,
    tcpListenerKey,
    unixListenerKey,
)
from .._host._service import CannotListenTwice, MigrationHost
from ..strategies import GradualTransfer
from ._fakes import HostReactor


def _host(reactor: MemoryReactorClock) -> MigrationHost:
    return MigrationHost(
        reactor,
        None,
        [],
        GradualTransfer(),
        controlPath=None,
        installSignalHandlers=False,
        applicationService=MultiService(),
    )


class KeyTests(SynchronousTestCase):
    """
    Listener keys are endpoint descriptions.
    """

    def test_tcp(self) -> None:
        self.assertEqual(tcpListenerKey(80, ""), "tcp:80")
        self.assertEqual(tcpListenerKey(80, "127.0.0.1"), "tcp:80:interface=127.0.0.1")
        self.assertEqual(tcpListenerKey(80, "::1"), "tcp:80:interface=\\:\\:1")

    def test_unix(self) -> None:
        self.assertEqual(unixListenerKey(b"/run/a.sock"), "unix:/run/a.sock")


class ListeningInterceptorTests(SynchronousTestCase):
    """
    The hosted application's listening calls go through the host.
    """

    def setUp(self) -> None:
        self.reactor = HostReactor()
        self.host = _host(self.reactor)
        self.interceptor = ListeningInterceptor(self.reactor, self.host)
        self.interceptor.install()
        self.addCleanup(self.interceptor.uninstall)
        self.factory = Factory.forProtocol(Protocol)

    def test_listenTCPIsTracked(self) -> None:
        """
        A port the application opens listens for real, wrapped so the host
        sees its connections, and becomes one of the host's listeners.
        """
        port = self.reactor.listenTCP(8080, self.factory, interface="127.0.0.1")
        (listened,) = self.reactor.tcpServers
        self.assertEqual(listened[0], 8080)
        self.assertIs(listened[1].wrappedFactory, self.factory)  # type: ignore[attr-defined]
        listener = self.host.listeners["tcp:8080:interface=127.0.0.1"]
        self.assertIs(listener.port, port)
        self.assertIs(listener.factory, listened[1])

    def test_listenUNIXIsTracked(self) -> None:
        """
        Unix ports are tracked the same way.
        """
        self.reactor.listenUNIX("/tmp/app.sock", self.factory)
        self.assertIn("unix:/tmp/app.sock", self.host.listeners)

    def test_udpRefused(self) -> None:
        """
        UDP cannot be handed on: refused with a clear error.
        """
        with self.assertRaises(CannotHost) as raised:
            self.interceptor.listenUDP(53, DatagramProtocol())
        self.assertIn("UDP port 53", str(raised.exception))

    def test_redirect(self) -> None:
        """
        With C{--listen}, the application's first port opens where the
        operator said, whatever it asked for.
        """
        self.interceptor.redirects = ["tcp:9000:interface=127.0.0.1"]
        self.reactor.listenTCP(8080, self.factory)
        (listened,) = self.reactor.tcpServers
        self.assertEqual((listened[0], listened[3]), (9000, "127.0.0.1"))
        self.assertEqual(list(self.host.listeners), ["tcp:9000:interface=127.0.0.1"])
        with self.assertRaises(CannotHost):
            self.reactor.listenTCP(8081, self.factory)

    def test_claimInherited(self) -> None:
        """
        In a successor, an inherited listener waits, unclaimed, for the
        application to open the same port; it then serves the application's
        factory without binding anything.
        """
        inherited = self.host.listenerNamed("tcp:8080")
        self.assertTrue(inherited.factory.unclaimed)
        sentinel = object()
        inherited.port = sentinel  # type: ignore[assignment]
        self.assertIs(self.reactor.listenTCP(8080, self.factory), sentinel)
        self.assertFalse(inherited.factory.unclaimed)
        self.assertIs(inherited.factory.wrappedFactory, self.factory)
        self.assertEqual(self.reactor.tcpServers, [])
        with self.assertRaises(CannotListenTwice):
            self.reactor.listenTCP(8080, self.factory)

    def test_uninstall(self) -> None:
        """
        Uninstalled, the reactor listens as before.
        """
        self.interceptor.uninstall()
        self.reactor.listenTCP(1234, self.factory)
        self.assertEqual(self.host.listeners, {})
