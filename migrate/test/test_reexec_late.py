"""
Tests for L{migrate.strategies._reexec._late}: a re-executed image
restores every connection before it serves, and adopts their sockets
afterwards, on the real reactor with real TCP connections.
"""

from __future__ import annotations

import base64
import gc
import os
import socket
import struct
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from migrate import MigrationHost
from migrate.state import StateError, captureProtocolState
from migrate.strategies import ReexecStrategy
from migrate.strategies._reexec._incoming import ReexecInheritance, restoreReexec
from migrate.strategies._reexec._late import StandIn, addressesOf
from migrate.strategies._reexec._state import (
    InheritedConnection,
    PrecopiedConnection,
    ReexecState,
)

from .test_reexec import Counter, Refusing


class Touching(Counter):
    """
    Asks its transport for a socket option while it is restored: its socket
    is adopted at once.
    """

    def restoreMigrationState(self, state: Any) -> None:
        Counter.restoreMigrationState(self, state)
        transport: Any = self.transport
        self.noDelay = transport.getTcpNoDelay()


class TouchingRefusing(Touching):
    """
    Touches its transport (its socket is adopted), then refuses its state.
    """

    def restoreMigrationState(self, state: Any) -> None:
        Touching.restoreMigrationState(self, state)
        raise ValueError("refused after touching")


class Registry:
    """
    Cross-connection state, as a chat room's: every restored protocol
    registers, and sees how many were registered when it was restored.
    """

    def __init__(self) -> None:
        self.members: list[Any] = []


class AddressesOfTests(SynchronousTestCase):
    def test_none(self) -> None:
        self.assertIsNone(addressesOf({"family": 2}))

    def test_ipv4(self) -> None:
        peer, local = addressesOf(  # type: ignore[misc]
            {"family": 2, "peer": ["127.0.0.1", 4000], "local": ["127.0.0.1", 80]}
        )
        self.assertEqual((peer.host, peer.port), ("127.0.0.1", 4000))
        self.assertEqual(local.build().port, 80)

    def test_malformed(self) -> None:
        for entry in [
            {"family": 1, "peer": ["x", 1], "local": ["x", 2]},
            {"family": 2, "peer": ["x"], "local": ["x", 2]},
            {"family": 2, "peer": ["x", "1"], "local": ["x", 2]},
            {"family": 2, "peer": ["x", 1]},
            {"family": 10, "peer": ["::1", 1], "local": ["::1", 2]},
        ]:
            self.assertRaises(StateError, addressesOf, entry)


class LateAdoptionTests(TestCase):
    """
    L{restoreReexec} with TCP connections whose entries carry their
    addresses: every protocol is restored before the image serves, on a
    stand-in transport; the sockets are adopted afterwards.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        # restoreReexec keeps the collector off until every socket is
        # adopted, which not every test here waits for: the next test must
        # find it as this one did.
        if gc.isenabled():
            self.addCleanup(gc.enable)
        self.listening = socket.socket()
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen(10)
        self.events: list[dict[str, Any]] = []
        observer: Any = self.events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def connection(self) -> tuple[int, socket.socket, dict[str, Any]]:
        """
        A TCP connection: the server side's descriptor, the client, and the
        addresses for the manifest entry.
        """
        client = socket.create_connection(self.listening.getsockname(), timeout=5)
        self.addCleanup(client.close)
        server, _ = self.listening.accept()
        addresses = {
            "family": int(server.family),
            "peer": list(server.getpeername()),
            "local": list(server.getsockname()),
        }
        return server.detach(), client, addresses

    def entry(
        self, ident: int, protocol: Any, addresses: dict[str, Any], output: bytes
    ) -> dict[str, Any]:
        return {
            "id": ident,
            "listener": "tcp:0",
            "state": captureProtocolState(protocol).toPlain(),
            "output": base64.b64encode(output).decode(),
            **addresses,
        }

    def host(self, state: ReexecState, classes: list[type]) -> Any:
        registry = self.registry = Registry()

        class Building(Factory):
            built = 0

            def buildProtocol(self, addr: Any) -> Any:
                protocol = classes[self.built]()
                self.built += 1
                protocol.factory = self
                protocol.peer = addr
                original = protocol.restoreMigrationState

                def restore(value: Any) -> None:
                    original(value)
                    registry.members.append(protocol)
                    protocol.seen = len(registry.members)

                protocol.restoreMigrationState = restore
                return protocol

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        state = ReexecState(
            pid=os.getpid(),
            generation=1,
            strategy="reexec",
            listeners={"tcp:0": listener.detach()},
            connections=state.connections,
            precopied=state.precopied,
            frozenAt=1.0,
        )
        host = MigrationHost(
            self.reactor,
            Building(),
            ["tcp:0"],
            ReexecStrategy(),
            controlPath=None,
            installSignalHandlers=False,
            inheritance=ReexecInheritance(state, 2.0, 1.5),
        )
        self.addCleanup(self.cleanUp, host)
        return host

    def cleanUp(self, host: Any) -> Any:
        for hosted in host.listeners["tcp:0"].factory.connections:
            hosted.transport.loseConnection()
        return host.listeners["tcp:0"].port.stopListening()

    @inlineCallbacks
    def receive(self, client: socket.socket, expected: bytes) -> Any:
        received = b""
        deadline = self.reactor.seconds() + 10
        client.setblocking(False)
        while len(received) < len(expected):
            self.assertLess(self.reactor.seconds(), deadline, repr(received))
            yield deferLater(self.reactor, 0.01, lambda: None)
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            received += chunk
        self.assertEqual(received, expected)

    @inlineCallbacks
    def test_restoredFirstAdoptedLater(self) -> Any:
        """
        Every protocol is restored (and sees every other, as a chat room
        would) before the image serves; the sockets are not adopted yet:
        the protocols answer C{getPeer} from the manifest, what they write
        waits, and what the old image had not written goes first once the
        socket is adopted, within a few reactor turns.
        """
        fds, clients, addresses = zip(*[self.connection() for _ in range(3)])
        old = Counter()
        old.count = 41
        connections = tuple(
            InheritedConnection(
                fd, "tcp:0", self.entry(ident, old, each, b"old%d\n" % ident)
            )
            for ident, (fd, each) in enumerate(zip(fds, addresses), 1)
        )
        host = self.host(ReexecState(1, 1, "r", connections=connections), [Counter] * 3)
        gc.enable()
        self.addCleanup(gc.enable)
        report = restoreReexec(host, host.inheritance)
        # No collector passes until every socket is adopted.
        self.assertFalse(gc.isenabled())
        self.assertEqual(report.listeners[0].moved, 3)
        hosted = list(host.listeners["tcp:0"].factory.protocols)
        self.assertEqual([each.wrappedProtocol.seen for each in hosted], [1, 2, 3])
        self.assertTrue(all(isinstance(each.transport, StandIn) for each in hosted))
        self.assertEqual(
            [each.getPeer().port for each in hosted],
            [each["peer"][1] for each in addresses],
        )
        self.assertEqual(hosted[0].getHost().port, self.listening.getsockname()[1])
        # Written before the socket is adopted: after the old output.
        hosted[0].wrappedProtocol.sendLine(b"early")
        clients[0].sendall(b"x\n")
        yield self.receive(clients[0], b"old1\nearly\nx 42\n")
        yield self.receive(clients[2], b"old3\n")
        self.assertTrue(all(isinstance(each.transport, Connection) for each in hosted))
        self.assertTrue(gc.isenabled())

    @inlineCallbacks
    def test_precopiedAfterDescribed(self) -> Any:
        """
        A connection from the pre-copy is restored, after those described
        at the freeze, and its socket adopted later, as those are.
        """
        (copiedFd, copiedClient, copiedAddresses), (fd, client, addresses) = [
            self.connection() for _ in range(2)
        ]
        old = Counter()
        old.count = 9
        copied = PrecopiedConnection(
            1,
            copiedFd,
            "tcp:0",
            copiedAddresses["family"],
            captureProtocolState(old),
            copiedAddresses["peer"],
            copiedAddresses["local"],
        )
        state = ReexecState(
            1,
            1,
            "r",
            connections=(
                InheritedConnection(fd, "tcp:0", self.entry(2, old, addresses, b"")),
            ),
            precopied=(copied,),
        )
        host = self.host(state, [Counter, Counter])
        report = restoreReexec(host, host.inheritance)
        self.assertEqual(report.listeners[0].moved, 2)
        self.assertEqual(
            [each.transport.getPeer().port for each in self.registry.members],
            [addresses["peer"][1], copiedAddresses["peer"][1]],
        )
        copiedClient.sendall(b"a\n")
        yield self.receive(copiedClient, b"a 10\n")

    @inlineCallbacks
    def test_touchingTheTransportAdoptsAtOnce(self) -> Any:
        """
        A protocol that asks its transport for something the stand-in does
        not know has its socket adopted at once; it still serves only once
        the image does, its old output first.
        """
        fd, client, addresses = self.connection()
        old = Counter()
        old.count = 1
        state = ReexecState(
            1,
            1,
            "r",
            connections=(
                InheritedConnection(fd, "tcp:0", self.entry(1, old, addresses, b"o\n")),
            ),
        )
        host = self.host(state, [Touching])
        restoreReexec(host, host.inheritance)
        [hosted] = host.listeners["tcp:0"].factory.protocols
        self.assertIsInstance(hosted.transport, Connection)
        self.assertIn(hosted.wrappedProtocol.noDelay, (0, 1, True, False))
        client.sendall(b"y\n")
        yield self.receive(client, b"o\ny 2\n")

    @inlineCallbacks
    def test_deadSocketDroppedAndCounted(self) -> Any:
        """
        A socket whose client reset the connection before it was adopted is
        dropped quietly and counted; its protocol hears C{connectionLost};
        the others serve.
        """
        (deadFd, dead, deadAddresses), (fd, client, addresses) = [
            self.connection() for _ in range(2)
        ]
        old = Counter()
        old.count = 1
        state = ReexecState(
            1,
            1,
            "r",
            connections=(
                InheritedConnection(
                    deadFd, "tcp:0", self.entry(1, old, deadAddresses, b"")
                ),
                InheritedConnection(fd, "tcp:0", self.entry(2, old, addresses, b"")),
            ),
        )
        host = self.host(state, [Counter, Counter])
        lost: list[Any] = []
        report = restoreReexec(host, host.inheritance)
        self.assertEqual(report.listeners[0].moved, 2)
        first = self.registry.members[0]
        first.connectionLost = lost.append
        dead.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        dead.close()
        client.sendall(b"z\n")
        yield self.receive(client, b"z 2\n")
        self.assertEqual(len(lost), 1)
        self.assertEqual(len(host.listeners["tcp:0"].factory.protocols), 1)
        [ended] = [each for each in self.events if "dropped" in each]
        self.assertEqual((ended["adopted"], ended["dropped"]), (1, 1))

    @inlineCallbacks
    def test_restoreFailureNamesTheConnection(self) -> Any:
        """
        A connection the new code refuses is counted as failed, the log
        line names its peer and listener, and it is closed cleanly after
        the old output.
        """
        fd, client, addresses = self.connection()
        old = Counter()
        old.count = 1
        state = ReexecState(
            1,
            1,
            "r",
            connections=(
                InheritedConnection(
                    fd, "tcp:0", self.entry(1, old, addresses, b"bye\n")
                ),
            ),
        )
        host = self.host(state, [Refusing])
        report = restoreReexec(host, host.inheritance)
        self.assertEqual(
            (report.listeners[0].moved, report.listeners[0].failed), (0, 1)
        )
        [event] = [each for each in self.events if each.get("peer")]
        self.assertEqual(
            (event["peer"], event["listener"]),
            ("127.0.0.1:{}".format(addresses["peer"][1]), "tcp:0"),
        )
        self.assertIn("refused", event["why"])
        self.assertEqual(host.listeners["tcp:0"].factory.protocols, {})
        yield self.receive(client, b"bye\n")

    @inlineCallbacks
    def test_refusedAfterAdoptionClosedCleanly(self) -> Any:
        """
        A connection whose socket was adopted during its restore (the
        protocol touched its transport), then refused, is still closed
        cleanly after the old output, and counted as failed.
        """
        fd, client, addresses = self.connection()
        old = Counter()
        old.count = 1
        state = ReexecState(
            1,
            1,
            "r",
            connections=(
                InheritedConnection(
                    fd, "tcp:0", self.entry(1, old, addresses, b"last\n")
                ),
            ),
        )
        host = self.host(state, [TouchingRefusing])
        report = restoreReexec(host, host.inheritance)
        self.assertEqual(report.listeners[0].failed, 1)
        self.assertEqual(host.listeners["tcp:0"].factory.protocols, {})
        yield self.receive(client, b"last\n")
        # Then the end (FIN, read as b""), within the deadline.
        deadline = self.reactor.seconds() + 10
        while True:
            self.assertLess(self.reactor.seconds(), deadline)
            yield deferLater(self.reactor, 0.01, lambda: None)
            try:
                self.assertEqual(client.recv(100), b"")
            except BlockingIOError:
                continue
            break
