"""
Tests for L{migrate._handoff._transport}: freezing, resuming, releasing and adopting
real connections (loopback TCP over IPv4 and IPv6, Unix stream sockets) on
the real reactor.

The "other holder" of a released connection is a transport adopted from a
duplicate of its descriptor in this same process, which is what a successor
process holds after a hand-off.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import tempfile
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import protocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.epollreactor import EPOLLIN, EPOLLOUT
from twisted.internet.error import ConnectionDone
from twisted.internet.posixbase import _PollLikeMixin
from twisted.internet.protocol import connectionDone
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from migrate._handoff._transport import (
    FrozenConnection,
    abandonConnection,
    adoptConnection,
    flushWriters,
    freezeConnection,
    pendingOutput,
    resumeConnection,
    writeNow,
)

_DEADLINE = 5.0

if TYPE_CHECKING:
    _MixinBase = TestCase
else:
    _MixinBase = object


def _hasIPv6Loopback() -> bool:
    """
    Can this machine listen on C{::1}?
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def waitFor(
    reactor: Any, predicate: Callable[[], object], what: str, timeout: float = _DEADLINE
) -> Deferred[None]:
    """
    Poll C{predicate} every millisecond until it is true, failing after
    C{timeout} seconds.
    """
    done: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        try:
            ok = predicate()
        except BaseException:
            done.errback()
            return
        if ok:
            done.callback(None)
        elif reactor.seconds() > deadline:
            done.errback(AssertionError(f"timed out waiting for {what}"))
        else:
            reactor.callLater(0.001, check)

    check()
    return done


def turns(reactor: Any, count: int) -> Deferred[None]:
    """
    Fire after the reactor polled its descriptors C{count} more times: long
    enough for anything registered and ready to have been serviced.
    """
    done: Deferred[None] = Deferred()

    def step(left: int) -> None:
        if left:
            reactor.callLater(0, step, left - 1)
        else:
            done.callback(None)

    step(count)
    return done


def epollRegistrations(reactor: Any) -> set[int] | None:
    """
    The descriptor numbers the kernel has registered in the reactor's
    epoll set, or L{None} if the reactor does not use epoll.
    """
    poller = getattr(reactor, "_poller", None)
    if not isinstance(poller, select.epoll):
        return None
    with open(f"/proc/self/fdinfo/{poller.fileno()}") as info:
        return {int(line.split()[1]) for line in info if line.startswith("tfd:")}


def assertNoStrayRegistrations(case: Any, reactor: Any) -> None:
    """
    The kernel's epoll set holds exactly the descriptors the reactor knows:
    no registration was left behind by a descriptor closed while registered
    (which would end in C{EBADF}/C{KeyError} later).
    """
    registered = epollRegistrations(reactor)
    if registered is not None:
        case.assertEqual(registered, set(reactor._reads) | set(reactor._writes))


class Peer(protocol.Protocol):
    """
    Records what it receives and whether its connection ended; optionally
    echoes, greets, or runs a hook on each chunk.
    """

    def __init__(
        self,
        echo: bool = False,
        greeting: bytes = b"",
        onData: Callable[["Peer", bytes], None] | None = None,
    ) -> None:
        self.echo = echo
        self.greeting = greeting
        self.onData = onData
        self.received = bytearray()
        self.made = False
        self.lost: Failure | None = None
        self.transport: Any = None

    def connectionMade(self) -> None:
        self.made = True
        self.factory.peers.append(self)
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)
        if self.onData is not None:
            self.onData(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class PeerFactory(protocol.ClientFactory):
    """
    Builds L{Peer}s with the given options and remembers them.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.peers: list[Peer] = []

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer(**self.options)
        peer.factory = self
        return peer


class _TransportTestsMixin(_MixinBase):
    """
    Tests run for every kind of stream transport; subclasses say how to
    listen and connect.
    """

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor

    def listen(self, factory: Any) -> Any:
        raise NotImplementedError()

    def connect(self, port: Any, factory: Any) -> None:
        raise NotImplementedError()

    @inlineCallbacks
    def connection(self, **serverOptions: Any) -> Any:
        """
        Connect a client L{Peer} to a server L{Peer}.

        @return: a Deferred firing with C{(server, client)}.
        """
        serverFactory = PeerFactory(**serverOptions)
        port = self.listen(serverFactory)
        self.addCleanup(port.stopListening)
        clientFactory = PeerFactory()
        self.connect(port, clientFactory)
        yield waitFor(
            self.reactor,
            lambda: serverFactory.peers and clientFactory.peers,
            "connection",
        )
        server, client = serverFactory.peers[0], clientFactory.peers[0]
        self.addCleanup(self.closeClient, client)
        return server, client

    def closeClient(self, client: Peer) -> Deferred[None] | None:
        """
        End a client connection at cleanup and wait until it ended.
        """
        if client.lost is None:
            client.transport.abortConnection()
            return waitFor(
                self.reactor, lambda: client.lost is not None, "client close"
            )
        return None

    def adoptDuplicate(self, transport: Any, **options: Any) -> tuple[Any, Peer]:
        """
        Adopt a duplicate of C{transport}'s descriptor, as a successor would.

        @return: the adopted transport and its L{Peer}.
        """
        factory = PeerFactory(**options)
        adopted = adoptConnection(self.reactor, os.dup(transport.fileno()), factory)
        self.addCleanup(self.closeAdopted, adopted)
        return adopted, factory.peers[0]

    def closeAdopted(self, adopted: Any) -> None:
        if adopted.connected and "_migrateAdoptedHold" in vars(adopted):
            abandonConnection(adopted)

    def isRegistered(self, transport: Any) -> bool:
        return (
            transport in self.reactor.getReaders()
            or transport in self.reactor.getWriters()
        )

    @inlineCallbacks
    def exchange(self, client: Peer, data: bytes) -> Any:
        """
        Send C{data} from the client and wait for its echo.
        """
        expected = len(client.received) + len(data)
        client.transport.write(data)
        yield waitFor(self.reactor, lambda: len(client.received) >= expected, "echo")

    @inlineCallbacks
    def test_releaseLeavesOtherHolderServing(self) -> Any:
        """
        After freeze and release, the other holder serves the connection:
        the client sees no end of connection and every byte exactly once,
        in order; the released side reads nothing more, writes nothing more
        and is not told C{connectionLost}, and leaves no registration.
        """
        server, client = yield self.connection(echo=True)
        yield self.exchange(client, b"a1")
        old = server.transport
        oldFd = old.fileno()
        frozen = freezeConnection(old)
        self.assertIsInstance(frozen, FrozenConnection)
        self.assertEqual(frozen.descriptor(), oldFd)
        self.assertEqual(frozen.pendingOutput, b"")
        self.assertFalse(self.isRegistered(old))

        client.transport.write(b"b2")
        yield waitFor(
            self.reactor,
            lambda: select.select([oldFd], [], [], 0)[0],
            "input waiting on the frozen socket",
        )
        # An event the reactor picked before the freeze reads nothing.
        self.assertIsNone(old.doRead())
        self.assertIsNone(old.doWrite())
        yield turns(self.reactor, 3)
        self.assertEqual(bytes(server.received), b"a1")

        adopted, successor = self.adoptDuplicate(old, echo=True)
        frozen.release()
        self.assertFalse(self.isRegistered(old))
        self.assertEqual(old.fileno(), -1)
        assertNoStrayRegistrations(self, self.reactor)

        # The released transport swallows what the old code still writes.
        old.write(b"LOST")
        old.writeSequence([b"LOST"])
        old.loseConnection()
        old.abortConnection()
        old.resumeProducing()
        self.assertFalse(self.isRegistered(old))
        self.assertEqual(frozen.bufferedOutput(), b"")
        self.assertRaises(ValueError, frozen.descriptor)

        resumeConnection(adopted)
        yield waitFor(self.reactor, lambda: len(client.received) >= 4, "echo of b2")
        yield self.exchange(client, b"c3")
        yield turns(self.reactor, 3)
        self.assertEqual(bytes(client.received), b"a1b2c3")
        self.assertEqual(bytes(successor.received), b"b2c3")
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)
        assertNoStrayRegistrations(self, self.reactor)

        adopted.loseConnection()
        yield waitFor(self.reactor, lambda: client.lost is not None, "clean close")
        client.lost.trap(ConnectionDone)
        self.assertIsNone(server.lost)
        assertNoStrayRegistrations(self, self.reactor)

    @inlineCallbacks
    def bigOutput(self) -> Any:
        """
        A connection whose server holds unwritten output: the client reads
        some and then stops reading.

        @return: a Deferred firing with C{(server, client, written)}.
        """
        server, client = yield self.connection()
        server.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )

        def pauseAfterSome(peer: Peer, data: bytes) -> None:
            if len(peer.received) >= 65536:
                peer.transport.pauseProducing()
                peer.onData = None

        client.onData = pauseAfterSome
        first = os.urandom(1 << 20)
        server.transport.write(first)
        yield waitFor(self.reactor, lambda: client.onData is None, "partial read")
        # Written after the first doWrite: lands in the other buffer.
        second = os.urandom(1 << 18)
        server.transport.write(second)
        return server, client, first + second

    def widen(self, *transports: Any) -> None:
        """
        Give the sender's kernel buffer room again, so the rest of a big
        transfer is quick (a tiny send buffer makes loopback TCP wait for
        delayed acknowledgements).
        """
        for transport in transports:
            transport.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21
            )

    @inlineCallbacks
    def test_resumeKeepsPendingOutput(self) -> Any:
        """
        Freeze then resume loses and duplicates nothing: output Twisted held
        at the freeze goes out first, then output written while frozen;
        nothing is flushed while frozen.
        """
        server, client, written = yield self.bigOutput()
        transport = server.transport
        frozen = freezeConnection(transport)
        pending = frozen.pendingOutput
        self.assertGreater(len(pending), 1 << 18)
        self.assertTrue(written.endswith(pending))

        transport.write(b"while frozen")
        self.assertEqual(frozen.bufferedOutput(), pending + b"while frozen")
        self.assertFalse(self.isRegistered(transport))

        # Let the client drain what the kernel holds: the socket becomes
        # writable, yet nothing more may be sent while frozen.
        self.widen(transport)
        client.transport.resumeProducing()
        inFlight = len(written) - len(pending)
        yield waitFor(
            self.reactor,
            lambda: len(client.received) >= inFlight,
            "kernel buffers drained",
        )
        self.assertIsNone(transport.doWrite())
        yield turns(self.reactor, 5)
        self.assertEqual(len(client.received), inFlight)
        self.assertEqual(frozen.bufferedOutput(), pending + b"while frozen")

        frozen.resume()
        frozen.resume()
        total = len(written) + len(b"while frozen")
        yield waitFor(self.reactor, lambda: len(client.received) >= total, "all output")
        transport.write(b"after")
        yield waitFor(
            self.reactor, lambda: len(client.received) >= total + 5, "more output"
        )
        self.assertEqual(bytes(client.received), written + b"while frozen" + b"after")
        yield self.exchangeAfterResume(server, client)
        self.assertRaises(ValueError, frozen.release)

    @inlineCallbacks
    def exchangeAfterResume(self, server: Peer, client: Peer) -> Any:
        """
        A resumed connection reads again.
        """
        before = len(server.received)
        client.transport.write(b"ping")
        yield waitFor(self.reactor, lambda: len(server.received) >= before + 4, "input")

    @inlineCallbacks
    def test_releaseWithPendingOutput(self) -> Any:
        """
        The other holder sends the pending output the old side held, and the
        client gets every byte exactly once.
        """
        server, client, written = yield self.bigOutput()
        old = server.transport
        frozen = freezeConnection(old)
        pending = frozen.pendingOutput
        adopted, successor = self.adoptDuplicate(old)
        adopted.write(pending)
        frozen.release()
        old.write(b"LOST")
        resumeConnection(adopted)
        self.widen(adopted)
        client.transport.resumeProducing()
        adopted.write(b"from successor")
        total = len(written) + len(b"from successor")
        yield waitFor(self.reactor, lambda: len(client.received) >= total, "all output")
        yield turns(self.reactor, 3)
        self.assertEqual(bytes(client.received), written + b"from successor")
        self.assertIsNone(client.lost)
        self.assertIsNone(server.lost)
        assertNoStrayRegistrations(self, self.reactor)

    @inlineCallbacks
    def test_freezeInsideDataReceived(self) -> Any:
        """
        A connection frozen inside C{dataReceived}, during a reactor step
        that also saw it writable, flushes nothing in that step (the
        reactor's read-then-write does not send bytes already captured).
        """
        if not isinstance(self.reactor, _PollLikeMixin):
            raise SkipTest("the read-then-write step belongs to poll-like reactors")
        server, client = yield self.connection()
        transport = server.transport
        captured: list[FrozenConnection] = []
        server.onData = lambda peer, data: captured.append(freezeConnection(transport))
        transport.pauseProducing()
        client.transport.write(b"go")
        fd = transport.fileno()
        yield waitFor(
            self.reactor, lambda: select.select([fd], [], [], 0)[0], "input waiting"
        )
        self.assertTrue(select.select([], [fd], [], 0)[1])
        transport.write(b"x" * 1000)
        self.reactor._doReadOrWrite(transport, fd, EPOLLIN | EPOLLOUT)
        [frozen] = captured
        self.assertEqual(frozen.pendingOutput, b"x" * 1000)
        self.assertEqual(frozen.bufferedOutput(), b"x" * 1000)
        self.assertFalse(frozen.wasReading)
        frozen.resume()
        yield waitFor(self.reactor, lambda: len(client.received) >= 1000, "output")
        yield turns(self.reactor, 3)
        self.assertEqual(bytes(client.received), b"x" * 1000)

    @inlineCallbacks
    def test_resumeKeepsReadingState(self) -> Any:
        """
        A connection the application paused stays paused after resume; one
        it resumed while frozen reads after resume.
        """
        server, client = yield self.connection()
        transport = server.transport
        transport.pauseProducing()
        frozen = freezeConnection(transport)
        self.assertFalse(frozen.wasReading)
        frozen.resume()
        self.assertNotIn(transport, self.reactor.getReaders())

        frozen = freezeConnection(transport)
        transport.resumeProducing()
        self.assertNotIn(transport, self.reactor.getReaders())
        frozen.resume()
        self.assertIn(transport, self.reactor.getReaders())
        yield self.exchangeAfterResume(server, client)

    @inlineCallbacks
    def test_closeWhileFrozen(self) -> Any:
        """
        The application closing a frozen connection is remembered, not done;
        resume does it, after flushing.
        """
        server, client = yield self.connection()
        transport = server.transport
        frozen = freezeConnection(transport)
        transport.write(b"bye")
        transport.loseConnection()
        self.assertEqual(frozen.closeRequested, "lose")
        yield turns(self.reactor, 3)
        self.assertIsNone(client.lost)
        self.assertEqual(bytes(client.received), b"")
        frozen.resume()
        yield waitFor(self.reactor, lambda: client.lost is not None, "close")
        client.lost.trap(ConnectionDone)
        self.assertEqual(bytes(client.received), b"bye")
        yield waitFor(self.reactor, lambda: server.lost is not None, "server close")

    @inlineCallbacks
    def test_freezeRefused(self) -> Any:
        """
        A connection cannot be frozen twice, nor once released; a released
        one cannot be resumed; release is idempotent.
        """
        server, client = yield self.connection(echo=True)
        transport = server.transport
        frozen = freezeConnection(transport)
        self.assertRaises(ValueError, freezeConnection, transport)
        adopted, successor = self.adoptDuplicate(transport, echo=True)
        self.assertRaises(ValueError, freezeConnection, adopted)
        frozen.release()
        frozen.release()
        self.assertRaises(ValueError, frozen.resume)
        self.assertRaises(ValueError, freezeConnection, transport)
        resumeConnection(adopted)
        yield self.exchange(client, b"still here")
        self.assertEqual(bytes(successor.received), b"still here")

    @inlineCallbacks
    def test_pendingOutputLeavesConnectionAlone(self) -> Any:
        """
        L{pendingOutput} returns what Twisted holds and has not written,
        and changes nothing: the connection still reads and writes, every
        byte once.  It refuses what L{freezeConnection} refuses.
        """
        server, client, written = yield self.bigOutput()
        transport = server.transport
        pending = pendingOutput(transport)
        self.assertGreater(len(pending), 1 << 18)
        self.assertTrue(written.endswith(pending))
        self.assertTrue(self.isRegistered(transport))
        self.widen(transport)
        client.transport.resumeProducing()
        yield waitFor(
            self.reactor, lambda: len(client.received) >= len(written), "all output"
        )
        self.assertEqual(bytes(client.received), written)
        self.assertEqual(pendingOutput(transport), b"")
        yield self.exchangeAfterResume(server, client)
        frozen = freezeConnection(transport)
        self.assertRaises(ValueError, pendingOutput, transport)
        frozen.resume()

    @inlineCallbacks
    def test_writeNowSendsAtOnce(self) -> Any:
        """
        L{writeNow} on an idle connection sends at once: nothing is left in
        Twisted's buffers nor registered for writing, and the peer gets the
        bytes.
        """
        server, client = yield self.connection()
        transport = server.transport
        writeNow(transport, b"at once")
        self.assertEqual(pendingOutput(transport), b"")
        self.assertNotIn(transport, self.reactor.getWriters())
        yield waitFor(self.reactor, lambda: len(client.received) >= 7, "the bytes")
        self.assertEqual(bytes(client.received), b"at once")

    @inlineCallbacks
    def test_writeNowAfterPendingOutput(self) -> Any:
        """
        While Twisted holds output for the connection, L{writeNow} queues
        behind it: the peer gets every byte once, in order.
        """
        server, client, written = yield self.bigOutput()
        transport = server.transport
        writeNow(transport, b"tail")
        self.assertTrue(pendingOutput(transport).endswith(b"tail"))
        self.widen(transport)
        client.transport.resumeProducing()
        total = len(written) + 4
        yield waitFor(self.reactor, lambda: len(client.received) >= total, "all output")
        self.assertEqual(bytes(client.received), written + b"tail")

    @inlineCallbacks
    def test_writeNowWhileFrozen(self) -> Any:
        """
        L{writeNow} on a frozen connection sends nothing: the bytes wait
        with the rest of its output until it is resumed.
        """
        server, client = yield self.connection()
        transport = server.transport
        frozen = freezeConnection(transport)
        writeNow(transport, b"later")
        self.assertEqual(frozen.bufferedOutput(), b"later")
        yield turns(self.reactor, 5)
        self.assertEqual(bytes(client.received), b"")
        frozen.resume()
        yield waitFor(self.reactor, lambda: len(client.received) >= 5, "the bytes")
        self.assertEqual(bytes(client.received), b"later")

    @inlineCallbacks
    def test_adoptedIsHeld(self) -> Any:
        """
        An adopted connection neither reads nor writes until resumed: what
        its protocol writes meanwhile goes out at resume, before later
        output.
        """
        server, client = yield self.connection(echo=True)
        frozen = freezeConnection(server.transport)
        adopted, successor = self.adoptDuplicate(
            server.transport, echo=True, greeting=b"hello"
        )
        self.assertTrue(successor.made)
        self.assertFalse(self.isRegistered(adopted))
        client.transport.write(b"early")
        yield turns(self.reactor, 5)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(bytes(successor.received), b"")
        frozen.release()
        resumeConnection(adopted)
        yield waitFor(
            self.reactor, lambda: len(client.received) >= 10, "greeting and echo"
        )
        self.assertEqual(bytes(client.received), b"helloearly")
        assertNoStrayRegistrations(self, self.reactor)

    @inlineCallbacks
    def test_abandonLeavesOldHolderServing(self) -> Any:
        """
        Abandoning an adopted connection disturbs nothing: the old holder
        resumes it and the client notices nothing.
        """
        server, client = yield self.connection(echo=True)
        yield self.exchange(client, b"one")
        frozen = freezeConnection(server.transport)
        adopted, successor = self.adoptDuplicate(server.transport, greeting=b"NEVER")
        abandonConnection(adopted)
        self.assertFalse(self.isRegistered(adopted))
        self.assertRaises(ValueError, abandonConnection, adopted)
        assertNoStrayRegistrations(self, self.reactor)
        frozen.resume()
        yield self.exchange(client, b"two")
        yield turns(self.reactor, 3)
        self.assertEqual(bytes(client.received), b"onetwo")
        self.assertIsNone(client.lost)
        self.assertIsNone(successor.lost)

    @inlineCallbacks
    def test_adoptRefusedByFactory(self) -> Any:
        """
        A factory that refuses the adopted connection raises L{ValueError};
        the old holder keeps the connection intact.
        """
        server, client = yield self.connection(echo=True)
        frozen = freezeConnection(server.transport)

        class Refusing(protocol.Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        fd = os.dup(server.transport.fileno())
        self.assertRaises(ValueError, adoptConnection, self.reactor, fd, Refusing())
        self.assertRaises(OSError, os.fstat, fd)
        frozen.resume()
        yield self.exchange(client, b"alive")
        self.assertIsNone(client.lost)

    @inlineCallbacks
    def test_adoptProtocolFails(self) -> Any:
        """
        A protocol that raises in C{makeConnection} makes adoption raise,
        after the half-built transport let go of its descriptor quietly.
        """
        server, client = yield self.connection(echo=True)
        frozen = freezeConnection(server.transport)

        class Failing(Peer):
            def connectionMade(self) -> None:
                self.factory.peers.append(self)
                raise RuntimeError("cannot restore")

        class FailingFactory(PeerFactory):
            def buildProtocol(self, addr: Any) -> Peer:
                peer = Failing()
                peer.factory = self
                return peer

        factory = FailingFactory()
        fd = os.dup(server.transport.fileno())
        self.assertRaises(RuntimeError, adoptConnection, self.reactor, fd, factory)
        [failed] = factory.peers
        self.assertFalse(self.isRegistered(failed.transport))
        self.assertTrue(failed.transport.disconnected)
        self.assertIsNone(failed.lost)
        assertNoStrayRegistrations(self, self.reactor)
        frozen.resume()
        yield self.exchange(client, b"alive")
        self.assertIsNone(client.lost)

    @inlineCallbacks
    def test_adoptProtocolAborts(self) -> Any:
        """
        A protocol that aborts its connection during adoption makes adoption
        raise; the abort does not reach the socket the old holder serves
        (no reset).
        """
        server, client = yield self.connection(echo=True)
        frozen = freezeConnection(server.transport)

        class Aborting(Peer):
            def connectionMade(self) -> None:
                self.factory.peers.append(self)
                self.transport.abortConnection()

        class AbortingFactory(PeerFactory):
            def buildProtocol(self, addr: Any) -> Peer:
                peer = Aborting()
                peer.factory = self
                return peer

        factory = AbortingFactory()
        fd = os.dup(server.transport.fileno())
        self.assertRaises(ValueError, adoptConnection, self.reactor, fd, factory)
        [aborted] = factory.peers
        yield waitFor(self.reactor, lambda: aborted.lost is not None, "abort done")
        self.assertFalse(self.isRegistered(aborted.transport))
        assertNoStrayRegistrations(self, self.reactor)
        frozen.resume()
        yield self.exchange(client, b"alive")
        yield turns(self.reactor, 3)
        self.assertEqual(bytes(client.received), b"alive")
        self.assertIsNone(client.lost)
        # SO_LINGER {1, 0} left on the socket would make its final close a
        # reset.
        linger = server.transport.getHandle().getsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, 8
        )
        self.assertEqual(struct.unpack("ii", linger), (0, 0))


class TCP4TransportTests(_TransportTestsMixin, TestCase):
    """
    Connections over loopback TCP/IPv4.
    """

    def listen(self, factory: Any) -> Any:
        return self.reactor.listenTCP(0, factory, interface="127.0.0.1")

    def connect(self, port: Any, factory: Any) -> None:
        self.reactor.connectTCP("127.0.0.1", port.getHost().port, factory)


class TCP6TransportTests(_TransportTestsMixin, TestCase):
    """
    Connections over loopback TCP/IPv6.
    """

    if not _hasIPv6Loopback():
        skip = "no IPv6 loopback"

    def listen(self, factory: Any) -> Any:
        return self.reactor.listenTCP(0, factory, interface="::1")

    def connect(self, port: Any, factory: Any) -> None:
        self.reactor.connectTCP("::1", port.getHost().port, factory)


class UNIXTransportTests(_TransportTestsMixin, TestCase):
    """
    Connections over Unix stream sockets.
    """

    def listen(self, factory: Any) -> Any:
        directory = tempfile.mkdtemp(prefix="migrate-")
        self.addCleanup(shutil.rmtree, directory, True)
        return self.reactor.listenUNIX(os.path.join(directory, "s"), factory)

    def connect(self, port: Any, factory: Any) -> None:
        self.reactor.connectUNIX(port.getHost().name, factory)

    @inlineCallbacks
    def test_writeNowAfterDescriptor(self) -> Any:
        """
        A descriptor queued to go with the connection's next bytes keeps
        L{writeNow} from sending around it: the bytes go through Twisted's
        write path, which sends the descriptor with them.
        """
        server, client = yield self.connection()
        transport = server.transport
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        transport.sendFileDescriptor(readEnd)
        writeNow(transport, b"with it")
        self.assertIn(transport, self.reactor.getWriters())
        yield waitFor(self.reactor, lambda: len(client.received) >= 7, "the bytes")
        self.assertEqual(bytes(client.received), b"with it")
        self.assertEqual(transport._sendmsgQueue, [])


class AdoptionArgumentTests(SynchronousTestCase):
    """
    L{adoptConnection} refuses what is not a connected stream socket, and
    always consumes the descriptor.
    """

    def test_notASocket(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        self.assertRaises(OSError, adoptConnection, object(), r, PeerFactory())
        self.assertRaises(OSError, os.fstat, r)

    def test_datagram(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        fd = a.detach()
        self.assertRaises(ValueError, adoptConnection, object(), fd, PeerFactory())
        self.assertRaises(OSError, os.fstat, fd)

    def test_familyPassed(self) -> None:
        """
        The reactor is told the socket's family.
        """
        from twisted.internet.testing import MemoryReactor

        for family in (socket.AF_INET, socket.AF_UNIX):
            reactor = MemoryReactor()
            sock = socket.socket(family, socket.SOCK_STREAM)
            fd = sock.detach()
            self.assertRaises(ValueError, adoptConnection, reactor, fd, PeerFactory())
            [(passed, passedFamily, factory)] = reactor.adoptedStreamConnections
            self.assertEqual(passedFamily, family)
            self.assertRaises(OSError, os.fstat, fd)


class _Writer(FileDescriptor):
    """
    A descriptor registered for writing whose writes are recorded, and
    answer C{lost}.
    """

    def __init__(self, reactor: Any, lost: Any = None) -> None:
        FileDescriptor.__init__(self, reactor)
        self.lost = lost
        self.writes = 0

    def doWrite(self) -> Any:
        self.writes += 1
        self.stopWriting()
        return self.lost


class WriteNowTests(SynchronousTestCase):
    """
    L{writeNow} leaves to the transport's own write what only it does
    right.
    """

    def test_startedTLS(self) -> None:
        """
        A connection that started TLS is written to through the transport,
        which encrypts: never in clear on its socket.
        """
        testCase = self

        class Socket:
            def send(self, data: bytes) -> int:
                testCase.fail("sent in clear")

        class StartedTLS:
            socket = Socket()
            TLS = True

            def __init__(self) -> None:
                self.written: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.written.append(data)

        transport = StartedTLS()
        writeNow(transport, b"secret")
        self.assertEqual(transport.written, [b"secret"])


class FlushWritersTests(SynchronousTestCase):
    """
    L{flushWriters} writes what the reactor's writers buffer now, but
    leaves alone those whose write the reactor must follow up.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()

    def writer(self, lost: Any = None) -> _Writer:
        writer = _Writer(self.reactor, lost)
        writer.startWriting()
        return writer

    def test_written(self) -> None:
        """
        Every plain writer is written to once, but the excluded ones.
        """
        first, second, moved = self.writer(), self.writer(), self.writer()
        self.assertEqual(flushWriters(self.reactor, exclude={moved}), 2)
        self.assertEqual((first.writes, second.writes, moved.writes), (1, 1, 0))
        self.assertEqual(self.reactor.getWriters(), [moved])

    def test_leftToTheReactor(self) -> None:
        """
        A writer asked to close or half-close, one with a producer, and one
        that is not a L{FileDescriptor} (nothing known of its write), are
        left to the reactor's next turn.
        """
        closing, halfClosing, producing = self.writer(), self.writer(), self.writer()
        closing.disconnecting = True
        halfClosing._writeDisconnecting = True
        producing.producer = object()  # type: ignore[assignment]
        testCase = self

        class Other:
            def doWrite(self) -> None:
                testCase.fail("written")

        self.reactor.addWriter(Other())
        self.assertEqual(flushWriters(self.reactor), 0)
        self.assertEqual(
            [closing.writes, halfClosing.writes, producing.writes], [0] * 3
        )

    def test_lostStaysRegistered(self) -> None:
        """
        A write that finds the connection lost leaves it registered, for
        the reactor to find the loss again and end it.
        """
        lost = self.writer(lost=ConnectionDone())
        self.assertEqual(flushWriters(self.reactor), 1)
        self.assertEqual(self.reactor.getWriters(), [lost])

    def test_noWriters(self) -> None:
        """
        A reactor that does not say which descriptors write has none
        written to.
        """
        self.assertEqual(flushWriters(object()), 0)
