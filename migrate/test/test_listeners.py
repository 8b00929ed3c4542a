"""
Tests for L{migrate._handoff._listeners}: handing a listening socket over, on the
real reactor with real loopback TCP (IPv4, IPv6) and Unix sockets.

The "other holder" is a port adopted from a duplicate of the descriptor in
this same process, which is what a successor process holds.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from migrate._handoff._listeners import (
    adoptListener,
    listenerDescriptor,
    pauseListener,
    releaseListener,
    resumeListener,
)
from migrate.test.test_transport import (
    PeerFactory,
    _hasIPv6Loopback,
    assertNoStrayRegistrations,
    turns,
    waitFor,
)

if TYPE_CHECKING:
    _MixinBase = TestCase
else:
    _MixinBase = object


class _ListenerTestsMixin(_MixinBase):
    """
    Tests run for every kind of listening socket; subclasses say how to
    listen and connect.
    """

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor

    def listen(self, factory: Any) -> Any:
        raise NotImplementedError()

    def rawListener(self) -> socket.socket:
        """
        A listening socket made outside Twisted, left blocking.
        """
        raise NotImplementedError()

    def connect(self, port: Any, factory: Any) -> None:
        raise NotImplementedError()

    def adopt(self, fd: int, factory: Any, **kwargs: Any) -> Any:
        port = adoptListener(self.reactor, fd, factory, **kwargs)
        self.addCleanup(port.stopListening)
        return port

    def client(self, port: Any) -> Any:
        """
        Start connecting a client to C{port}.

        @return: the client's factory (its C{peers} fill once connected).
        """
        factory = PeerFactory()
        self.connect(port, factory)
        self.addCleanup(self.closeClients, factory)
        return factory

    def closeClients(self, factory: Any) -> Any:
        for peer in factory.peers:
            if peer.lost is None:
                peer.transport.abortConnection()
        return waitFor(
            self.reactor,
            lambda: all(peer.lost is not None for peer in factory.peers),
            "clients closed",
        )

    def isReading(self, port: Any) -> bool:
        return port in self.reactor.getReaders()

    def test_descriptor(self) -> None:
        """
        L{listenerDescriptor} is the port's descriptor.
        """
        port = self.listen(PeerFactory())
        self.addCleanup(port.stopListening)
        self.assertEqual(listenerDescriptor(port), port.fileno())

    @inlineCallbacks
    def test_releaseLeavesOtherHolderAccepting(self) -> Any:
        """
        After the old port pauses and is released, the adopted port accepts
        every connection, including one that waited in the backlog; the old
        port's factory stopped, no registration is left, and a Unix
        socket's path still exists.
        """
        oldFactory = PeerFactory()
        old = self.listen(oldFactory)
        newFactory = PeerFactory()
        new = self.adopt(os.dup(listenerDescriptor(old)), newFactory, accepting=False)
        self.assertFalse(self.isReading(new))
        pauseListener(old)
        self.assertFalse(self.isReading(old))

        waiting = self.client(old)
        yield turns(self.reactor, 5)
        self.assertEqual((oldFactory.peers, newFactory.peers), ([], []))

        releaseListener(old)
        self.assertFalse(old.connected)
        self.assertFalse(self.isReading(old))
        self.assertEqual(oldFactory.numPorts, 0)
        assertNoStrayRegistrations(self, self.reactor)
        self.assertPathKept(new)
        releaseListener(old)
        yield old.stopListening()
        self.assertPathKept(new)

        resumeListener(new)
        later = self.client(new)
        yield waitFor(
            self.reactor,
            lambda: len(newFactory.peers) == 2 and waiting.peers and later.peers,
            "both connections accepted by the adopted port",
        )
        self.assertEqual(oldFactory.peers, [])
        self.assertIsNone(waiting.peers[0].lost)
        assertNoStrayRegistrations(self, self.reactor)

    def assertPathKept(self, port: Any) -> None:
        """
        A Unix port's socket file still exists.
        """

    @inlineCallbacks
    def test_releaseAccepting(self) -> Any:
        """
        Releasing a port that is still accepting deregisters it before its
        descriptor closes, and the other holder keeps accepting.
        """
        old = self.listen(PeerFactory())
        newFactory = PeerFactory()
        new = self.adopt(os.dup(listenerDescriptor(old)), newFactory, accepting=True)
        self.assertTrue(self.isReading(old))
        releaseListener(old)
        self.assertFalse(self.isReading(old))
        assertNoStrayRegistrations(self, self.reactor)
        self.assertPathKept(new)
        connecting = self.client(new)
        yield waitFor(
            self.reactor, lambda: newFactory.peers and connecting.peers, "accepted"
        )

    @inlineCallbacks
    def test_adoptBlocking(self) -> Any:
        """
        A blocking listening descriptor becomes non-blocking when adopted
        (a blocking one would hang the reactor in C{accept()}); the passed
        descriptor is closed.
        """
        raw = self.rawListener()
        self.assertTrue(os.get_blocking(raw.fileno()))
        fd = raw.detach()
        factory = PeerFactory()
        port = self.adopt(fd, factory, accepting=True)
        self.assertRaises(OSError, os.fstat, fd)
        self.assertFalse(os.get_blocking(port.fileno()))
        self.assertTrue(self.isReading(port))
        connecting = self.client(port)
        yield waitFor(
            self.reactor, lambda: factory.peers and connecting.peers, "accepted"
        )
        # Accept once more with nothing waiting: returns instead of blocking.
        port.doRead()
        self.assertEqual(len(factory.peers), 1)

    @inlineCallbacks
    def test_pauseResume(self) -> Any:
        """
        A paused port leaves connections in the backlog until resumed.
        """
        factory = PeerFactory()
        port = self.listen(factory)
        self.addCleanup(port.stopListening)
        pauseListener(port)
        connecting = self.client(port)
        yield turns(self.reactor, 5)
        self.assertEqual(factory.peers, [])
        resumeListener(port)
        yield waitFor(
            self.reactor, lambda: factory.peers and connecting.peers, "accepted"
        )


class TCP4ListenerTests(_ListenerTestsMixin, TestCase):
    """
    Listening on loopback TCP/IPv4.
    """

    def listen(self, factory: Any) -> Any:
        return self.reactor.listenTCP(0, factory, interface="127.0.0.1")

    def rawListener(self) -> socket.socket:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.bind(("127.0.0.1", 0))
        raw.listen(5)
        return raw

    def connect(self, port: Any, factory: Any) -> None:
        self.reactor.connectTCP("127.0.0.1", port.getHost().port, factory)


class TCP6ListenerTests(_ListenerTestsMixin, TestCase):
    """
    Listening on loopback TCP/IPv6.
    """

    if not _hasIPv6Loopback():
        skip = "no IPv6 loopback"

    def listen(self, factory: Any) -> Any:
        return self.reactor.listenTCP(0, factory, interface="::1")

    def rawListener(self) -> socket.socket:
        raw = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        raw.bind(("::1", 0))
        raw.listen(5)
        return raw

    def connect(self, port: Any, factory: Any) -> None:
        self.reactor.connectTCP("::1", port.getHost().port, factory)


class UNIXListenerTests(_ListenerTestsMixin, TestCase):
    """
    Listening on Unix stream sockets.
    """

    def path(self) -> str:
        directory = tempfile.mkdtemp(prefix="migrate-")
        self.addCleanup(shutil.rmtree, directory, True)
        return os.path.join(directory, "s")

    def listen(self, factory: Any) -> Any:
        return self.reactor.listenUNIX(self.path(), factory)

    def rawListener(self, mode: int = 0o600) -> socket.socket:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = self.path()
        raw.bind(path)
        os.chmod(path, mode)
        raw.listen(5)
        return raw

    def connect(self, port: Any, factory: Any) -> None:
        self.reactor.connectUNIX(port.getHost().name, factory)

    def assertPathKept(self, port: Any) -> None:
        self.assertTrue(stat.S_ISSOCK(os.stat(port.getHost().name).st_mode))

    def test_adoptKeepsMode(self) -> None:
        """
        The socket file keeps its mode; Twisted alone would make it 0666.
        """
        raw = self.rawListener(0o600)
        path = raw.getsockname()
        self.adopt(raw.detach(), PeerFactory(), accepting=False)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        raw = self.rawListener(0o600)
        raw.setblocking(False)
        path = raw.getsockname()
        port = self.reactor.adoptStreamPort(raw.fileno(), socket.AF_UNIX, PeerFactory())
        raw.close()
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o666)

    def test_backlog(self) -> None:
        """
        Twisted calls C{listen()} again on an adopted Unix socket; the
        backlog given is the one applied.
        """

        def queued(backlog: int | None) -> int:
            raw = self.rawListener()
            port = self.adopt(
                raw.detach(), PeerFactory(), accepting=False, backlog=backlog
            )
            count = 0
            while count < 100:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.addCleanup(client.close)
                client.setblocking(False)
                try:
                    client.connect(port.getHost().name)
                except BlockingIOError:
                    break
                count += 1
            return count

        self.assertLessEqual(queued(1), 2)
        self.assertGreater(queued(None), 2)


class AdoptionArgumentTests(SynchronousTestCase):
    """
    L{adoptListener} refuses what is not a listening stream socket, and
    always consumes the descriptor.
    """

    def test_notListening(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        fd = sock.detach()
        error = self.assertRaises(
            ValueError, adoptListener, object(), fd, PeerFactory(), accepting=True
        )
        self.assertIn("not listening", str(error))
        self.assertRaises(OSError, os.fstat, fd)

    def test_notStream(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fd = sock.detach()
        self.assertRaises(
            ValueError, adoptListener, object(), fd, PeerFactory(), accepting=True
        )
        self.assertRaises(OSError, os.fstat, fd)

    def test_notASocket(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        error = self.assertRaises(
            OSError, adoptListener, object(), r, PeerFactory(), accepting=True
        )
        self.assertEqual(error.errno, errno.ENOTSOCK)
        self.assertRaises(OSError, os.fstat, r)
