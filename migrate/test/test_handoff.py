"""
Tests for the hand-off between an old process and its successor, one side
at a time, with fakes: L{migrate.strategies._transfer._outgoing.OutgoingHandoff} (driven through
a L{MigrationHost} and the real strategies) against a fake successor process
and a fake successor end of the channel, and
L{migrate.strategies._transfer._incoming.IncomingChannel} against a fake old end.

Both ends talk AMP in memory (L{twisted.test.iosim}) over a transport that
carries descriptors as plain numbers; no process starts and no descriptor
crosses a real socket.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import socket
from types import SimpleNamespace
from typing import Any, Callable

import attrs
from attrs import evolve
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import UNIXAddress
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from .._handoff._fdpass import DescriptorTransferError, sendDescriptors, writeMemfd
from .._handoff._movement import MovingConnection, Unmovable
from .._handoff._precopy import FreezeDelta
from .._handoff._slices import timedChunks
from .._handoff._successor import SuccessorExit, SuccessorProcess
from .._host import _service
from ..interfaces import IMigratable
from ..strategies import CapabilityTransfer, GradualTransfer
from ..strategies._transfer import _incoming, _outgoing
from ..strategies._transfer._channel import (
    HANDOFF_PROTOCOL_VERSION,
    AdoptConnections,
    Commit,
    CommitAdopted,
    DrainStatus,
    HandoffAMP,
    HandoffRefused,
    Hello,
    PrecopyConnections,
    Prepare,
    RecopyConnections,
    Reported,
    TakeControl,
    TakeListener,
)
from ..strategies._transfer._incoming import IncomingChannel
from ._fakes import FakeSuccessor, RecordingPort, ThreadedFakeReactor, connectAMP
from .test_host import Harness, harness

SUCCESSOR_PID = 4242


def synchronousThreadPool(
    reactor: Any, pool: Any, f: Callable[..., Any], *a: Any, **kw: Any
) -> Deferred[Any]:
    """
    Stands in for C{deferToThreadPool}: runs C{f} at once.
    """
    return maybeDeferred(f, *a, **kw)


class FakeSuccessorTests(SynchronousTestCase):
    """
    L{FakeSuccessor} has the public surface of L{SuccessorProcess}.
    """

    def test_surface(self) -> None:
        """
        Every public method of L{SuccessorProcess} exists on the fake with
        the same signature, and so do its properties.
        """
        fields = {each.name for each in attrs.fields(SuccessorProcess)}
        checked = []
        for name, real in vars(SuccessorProcess).items():
            if name.startswith("_"):
                continue
            checked.append(name)
            if name in fields:
                self.assertTrue(hasattr(FakeSuccessor(), name), name)
            elif isinstance(real, property):
                self.assertIsInstance(getattr(FakeSuccessor, name), property, name)
            else:
                fake = getattr(FakeSuccessor, name)
                self.assertEqual(inspect.signature(fake), inspect.signature(real), name)
        self.assertEqual(
            sorted(checked),
            [
                "bringForward",
                "deliverOutput",
                "exited",
                "kill",
                "killNow",
                "logTail",
                "outputPipes",
                "pid",
                "sendBack",
                "terminate",
                "whenEnded",
            ],
        )


class FakeIncoming(amp.AMP):
    """
    A fake successor's end of the hand-off channel: says hello (unless told
    not to), records every command, and answers as configured.

    @ivar calls: (command name, arguments) in order.
    @ivar refuse: command name -> message to refuse it with.
    @ivar hang: command names never answered.
    @ivar adoptAnswer: given the manifest's entries, the answer to
        C{AdoptConnections} (default: every connection adopted).
    """

    def __init__(self, listeners: list[str], sayHello: bool = True) -> None:
        amp.AMP.__init__(self)
        self.listeners = listeners
        self.sayHello = sayHello
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse: dict[str, str] = {}
        self.hang: set[str] = set()
        self.welcomes: list[Any] = []
        self.manifests: list[Any] = []
        self.adoptAnswer: Callable[[list[dict[str, Any]]], dict[str, Any]] = (
            lambda entries: {
                "adopted": len(entries),
                "refusedCount": 0,
                "refused": "[]",
            }
        )

    def connectionMade(self) -> None:
        amp.AMP.connectionMade(self)
        if self.sayHello:
            self.hello()

    def hello(self, **changes: Any) -> None:
        arguments: dict[str, Any] = dict(
            pid=SUCCESSOR_PID,
            protocolVersion=HANDOFF_PROTOCOL_VERSION,
            listeners=self.listeners,
        )
        arguments.update(changes)
        self.callRemote(Hello, **arguments).addBoth(self.welcomes.append)

    def _answer(self, name: str, answer: Any, **arguments: Any) -> Any:
        self.calls.append((name, arguments))
        if name in self.refuse:
            raise HandoffRefused(self.refuse[name])
        if name in self.hang:
            return Deferred()
        return answer

    @TakeListener.responder
    def takeListener(self, key: str, socket: int) -> Any:
        return self._answer("TakeListener", {}, key=key, socket=socket)

    @TakeControl.responder
    def takeControl(self, socket: int) -> Any:
        return self._answer("TakeControl", {}, socket=socket)

    @Prepare.responder
    def prepare(self) -> Any:
        return self._answer("Prepare", {})

    @AdoptConnections.responder
    def adoptConnections(
        self, count: int, manifestSize: int, manifest: int, bulk: int
    ) -> Any:
        entries = json.loads(os.pread(manifest, manifestSize, 0))
        self.manifests.append(entries)
        return self._answer(
            "AdoptConnections",
            self.adoptAnswer(entries),
            count=count,
            manifestSize=manifestSize,
        )

    @Commit.responder
    def commit(self) -> Any:
        return self._answer("Commit", {"pid": SUCCESSOR_PID})

    @Reported.responder
    def reported(self, report: str, metrics: str | None = None) -> Any:
        return self._answer("Reported", {}, report=json.loads(report))

    @DrainStatus.responder
    def drainStatus(self, draining: str) -> Any:
        return self._answer("DrainStatus", {}, draining=json.loads(draining))

    def names(self) -> list[str]:
        return [name for name, arguments in self.calls]


class FakeFrozen:
    """
    Stands in for L{migrate._handoff._transport.FrozenConnection}: records whether
    it was resumed or released.
    """

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor
        self.pendingOutput = b""
        self.events: list[str] = []

    def descriptor(self) -> int:
        return self._descriptor

    def resume(self) -> None:
        self.events.append("resume")

    def release(self) -> None:
        self.events.append("release")


class OutgoingHarness:
    """
    A serving host on a fake reactor whose migrations start a
    L{FakeSuccessor} connected to a L{FakeIncoming}.
    """

    def __init__(
        self,
        testCase: SynchronousTestCase,
        strategy: Any,
        listen: tuple[str, ...] = ("tcp:8000", "tcp:8001"),
        **kwargs: Any,
    ) -> None:
        self.testCase = testCase
        self.h: Harness = harness(
            testCase,
            listen=listen,
            strategy=strategy,
            successorArgv=["new-code", "--flag"],
            readyTimeout=5.0,
            handoffTimeout=7.0,
            **kwargs,
        )
        self.host = self.h.host
        self.reactor = self.h.reactor
        self.host.privilegedStartService()
        self.host.startService()
        self.control = RecordingPort(UNIXAddress("control.sock"), fileno=300)
        self.host.controlPort = self.control
        self.ports = list(self.h.reactor.ports)
        self.successor = FakeSuccessor(
            SUCCESSOR_PID, tail=["starting", "loaded the new code"]
        )
        self.incoming = FakeIncoming(list(listen))
        self.spawned: list[tuple[Any, ...]] = []
        self.progress: list[str] = []
        self.pump: Any = None
        testCase.patch(_outgoing, "spawnSuccessor", self.spawn)

    def spawn(
        self,
        reactor: Any,
        argv: Any,
        *,
        env: Any,
        handoffSocket: Any,
        extraEnv: Any = None,
        **kwargs: Any,
    ) -> FakeSuccessor:
        self.spawned.append((reactor, list(argv), dict(extraEnv or {})))
        return self.successor

    def migrate(self) -> Deferred[Any]:
        """
        Ask the host to migrate, and connect the channel it opened to the
        fake successor's end.
        """
        d = self.host.requestUpgrade(None, self.progress.append)
        [(fd, family, factory)] = self.reactor.adoptedStreamConnections
        self.testCase.assertEqual(family, socket.AF_UNIX)
        self.channel = factory.buildProtocol(None)
        self.pump = connectAMP(self.channel, self.incoming, self.reactor, greet=False)
        self.incomingTransport = self.pump.clientIO
        self.pump.flush()
        return d

    def flush(self) -> None:
        self.pump.flush()

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def connect(self, count: int) -> list[Any]:
        return [self.h.connect()[0] for _ in range(count)]

    def assertRolledBack(self, report: dict[str, Any], reason: str) -> None:
        """
        The migration rolled back for C{reason}, and this process keeps
        everything: serving, listening, its control socket.
        """
        tc = self.testCase
        tc.assertEqual((report["outcome"], report["reason"]), ("rolled-back", reason))
        tc.assertIsNone(report["newPid"])
        tc.assertIsNone(report["toGeneration"])
        tc.assertEqual(report["successorLog"], ["starting", "loaded the new code"])
        tc.assertTrue(self.host.serving)
        tc.assertEqual(self.host.phase.value, "idle")
        tc.assertEqual(self.h.released, [])
        tc.assertIs(self.host.controlPort, self.control)
        tc.assertEqual([port.reading for port in self.ports], [True] * len(self.ports))
        tc.assertIn("rolled back: this process keeps serving", self.progress)
        tc.assertTrue(self.incomingTransport.disconnected)
        tc.assertEqual(self.h.stops, [])


class OutgoingFailureTests(SynchronousTestCase):
    """
    Whatever fails before the successor commits rolls the hand-off back:
    the successor is killed and this process keeps serving.
    """

    def test_readyTimeout(self) -> None:
        """
        A successor that does not say hello within the ready timeout is
        killed, and the report says so.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.sayHello = False
        d = o.migrate()
        o.advance(4.9)
        self.assertNoResult(d)
        self.assertEqual(o.successor.signals, [])
        o.advance(0.1)
        report = self.successResultOf(d)
        o.assertRolledBack(report, "not ready within 5.0 s")
        self.assertEqual(o.successor.signals, ["KILL"])
        self.assertEqual(report["fromGeneration"], 1)
        self.assertEqual(o.host.lastReport.toJSON(), report)  # type: ignore[union-attr]

    def test_spawnFails(self) -> None:
        """
        A successor that cannot start rolls the hand-off back, and both ends
        of the channel's socket pair are closed.
        """
        pairs: list[tuple[socket.socket, socket.socket]] = []

        def socketpair(*args: Any) -> tuple[socket.socket, socket.socket]:
            pair = socket.socketpair(*args)
            pairs.append(pair)
            return pair

        def spawnSuccessor(*args: Any, **kwargs: Any) -> Any:
            raise OSError("cannot start")

        o = OutgoingHarness(self, GradualTransfer())
        self.patch(
            _outgoing,
            "socket",
            SimpleNamespace(
                AF_UNIX=socket.AF_UNIX,
                SOCK_STREAM=socket.SOCK_STREAM,
                socketpair=socketpair,
            ),
        )
        self.patch(_outgoing, "spawnSuccessor", spawnSuccessor)
        report = self.successResultOf(o.host.requestUpgrade(None, o.progress.append))
        self.assertEqual(
            (report["outcome"], report["reason"]),
            ("rolled-back", "OSError: cannot start"),
        )
        self.assertTrue(o.host.serving)
        [(ours, theirs)] = pairs
        self.assertEqual((ours.fileno(), theirs.fileno()), (-1, -1))

    def test_spawned(self) -> None:
        """
        The successor runs the configured command line and is told the
        strategy.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.migrate()
        [(reactor, argv, extraEnv)] = o.spawned
        self.assertIs(reactor, o.reactor)
        self.assertEqual(argv, ["new-code", "--flag"])
        self.assertEqual(extraEnv, {"MIGRATE_HANDOFF_STRATEGY": "gradual"})

    def test_exitsBeforeHello(self) -> None:
        """
        A successor that exits before saying hello rolls the hand-off back
        at once, with how it ended and its last output; nothing is killed.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.sayHello = False
        d = o.migrate()
        o.successor.end(SuccessorExit(exitCode=3, signal=None))
        o.flush()
        report = self.successResultOf(d)
        o.assertRolledBack(
            report,
            "successor 4242 (exited with status 3); last output: loaded the new code",
        )
        self.assertEqual(o.successor.signals, [])

    def test_channelClosesBeforeHello(self) -> None:
        """
        A successor that closes the channel without exiting is given a
        moment to exit, then killed.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.sayHello = False
        d = o.migrate()
        o.incomingTransport.loseConnection()
        o.flush()
        o.advance(1.9)
        self.assertNoResult(d)
        o.advance(0.1)
        o.assertRolledBack(self.successResultOf(d), "the hand-off channel closed")
        self.assertEqual(o.successor.signals, ["KILL"])

    def test_listenerMissing(self) -> None:
        """
        A successor whose code lacks one of the listeners is refused at
        hello, and the hand-off rolls back.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.listeners = ["tcp:8000"]
        d = o.migrate()
        o.assertRolledBack(
            self.successResultOf(d), "the new code has no listener for tcp:8001"
        )
        [refusal] = o.incoming.welcomes
        self.assertIsInstance(refusal, Failure)

    def test_protocolVersion(self) -> None:
        """
        A successor speaking another hand-off protocol is refused.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.sayHello = False
        d = o.migrate()
        o.incoming.hello(protocolVersion=HANDOFF_PROTOCOL_VERSION + 1)
        o.flush()
        o.assertRolledBack(
            self.successResultOf(d),
            "successor speaks hand-off protocol {}, this process {}".format(
                HANDOFF_PROTOCOL_VERSION + 1, HANDOFF_PROTOCOL_VERSION
            ),
        )

    def test_listenerRefused(self) -> None:
        """
        A successor that refuses a listener rolls the hand-off back: the
        successor is killed and the listeners stay here.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.refuse["TakeListener"] = "cannot adopt it"
        d = o.migrate()
        o.assertRolledBack(
            self.successResultOf(d),
            "successor refused handing over listener tcp:8000: cannot adopt it",
        )
        self.assertEqual(o.successor.signals, ["KILL"])
        self.assertEqual(o.incoming.names(), ["TakeListener"])

    def test_commitTimeout(self) -> None:
        """
        A successor that does not answer C{Commit} in time is killed.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.hang.add("Commit")
        d = o.migrate()
        o.advance(6.9)
        self.assertNoResult(d)
        o.advance(0.1)
        o.assertRolledBack(
            self.successResultOf(d),
            "successor did not answer within 7.0 s while committing",
        )
        self.assertEqual(o.successor.signals, ["KILL"])

    def test_successorSurvivesKill(self) -> None:
        """
        A successor still there 10 s after C{SIGKILL} is noted in the
        report; the old process keeps serving anyway.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.incoming.sayHello = False
        o.successor.diesOnKill = False
        d = o.migrate()
        o.advance(5)
        self.assertNoResult(d)
        o.advance(10)
        report = self.successResultOf(d)
        o.assertRolledBack(report, "not ready within 5.0 s")
        self.assertEqual(report["notes"], ["successor 4242 did not end after SIGKILL"])


class OutgoingSuccessTests(SynchronousTestCase):
    """
    A hand-off the successor commits hands everything on.
    """

    def test_commit(self) -> None:
        """
        The successor gets each listener and the control socket, commits,
        and this process hands on: the report names the new process and
        generation, the ports are released, and the successor is told how
        the draining goes.
        """
        o = OutgoingHarness(self, GradualTransfer())
        d = o.migrate()
        report = self.successResultOf(d)
        self.assertEqual(
            {key: report[key] for key in ("outcome", "reason", "newPid", "oldPid")},
            {
                "outcome": "success",
                "reason": None,
                "newPid": SUCCESSOR_PID,
                "oldPid": os.getpid(),
            },
        )
        self.assertEqual((report["fromGeneration"], report["toGeneration"]), (1, 2))
        self.assertEqual(report["successorLog"], [])
        self.assertEqual(
            o.incoming.calls[:5],
            [
                ("TakeListener", {"key": "tcp:8000", "socket": 100}),
                ("TakeListener", {"key": "tcp:8001", "socket": 101}),
                ("TakeControl", {"socket": 300}),
                ("Prepare", {}),
                ("Commit", {}),
            ],
        )
        self.assertEqual(o.h.released, o.ports + [o.control])
        self.assertFalse(o.host.serving)
        self.assertEqual(o.successor.signals, [])
        me = {"generation": 1, "pid": os.getpid(), "connections": 0}
        self.assertEqual(
            o.incoming.calls[5:],
            [("Reported", {"report": report}), ("DrainStatus", {"draining": [me]})],
        )
        o.reactor.advance(0.2)
        self.assertEqual(o.h.stops, [True])

    def test_gradualLeavesConnections(self) -> None:
        """
        With gradual transfer the established connections stay here to
        drain, untouched, and are reported as draining.
        """
        o = OutgoingHarness(self, GradualTransfer())
        o.connect(2)
        report = self.successResultOf(o.migrate())
        self.assertEqual((report["moved"], report["draining"]), (0, 2))
        self.assertEqual(
            report["listeners"][0],
            {"key": "tcp:8000", "moved": 0, "drained": 2, "failed": 0},
        )
        self.assertEqual(o.host.connectionCount(), 2)
        self.assertNotIn("AdoptConnections", o.incoming.names())
        o.reactor.advance(1)
        self.assertEqual(o.h.stops, [])

    def test_broughtForwardOnceReady(self) -> None:
        """
        A successor that started in the background is brought forward to
        this process's priority once it says it is ready, before it is
        handed anything: the application's start, and the processes it
        may start, run at the service's priority.
        """
        o = OutgoingHarness(self, GradualTransfer())
        seen: list[list[str]] = []
        describe = _outgoing.listenerDescriptor

        def listenerDescriptor(port: Any) -> int:
            seen.append(list(o.successor.broughtForward))
            return describe(port)

        self.patch(_outgoing, "listenerDescriptor", listenerDescriptor)
        self.successResultOf(o.migrate())
        self.assertEqual(seen[0], ["its start is done"])
        self.assertEqual(o.successor.broughtForward, ["its start is done"])


class CapabilityFixture(SynchronousTestCase):
    """
    A capability transfer from a host serving three connections, whose
    freezing, descriptor sending and thread pool are fakes.
    """

    def setUp(self) -> None:
        self.reactor = ThreadedFakeReactor()
        self.o = OutgoingHarness(self, CapabilityTransfer(), reactor=self.reactor)
        self.frozen: list[FakeFrozen] = []
        self.sent: list[list[int]] = []
        self.patch(_outgoing, "freezeMovable", self.freezeMovable)
        self.sendings: list[Deferred[Any]] = []
        self.patch(_outgoing, "deferToThreadPool", self.threadPool)
        self.patch(_outgoing, "sendDescriptors", self.sendDescriptors)
        self.patch(_outgoing, "sendDescriptorsNow", self.sendDescriptorsNow)
        self.connections = self.o.connect(3)
        self.reading: list[list[bool]] = []
        self.outputAtFreeze: list[list[bytes]] = []

    def freezeMovable(
        self, connections: Any
    ) -> tuple[list[MovingConnection], list[Unmovable]]:
        """
        The first connections move (the last one stays): freezing happens
        while the listeners are paused.
        """
        self.reading.append([port.reading for port in self.o.ports])
        self.outputAtFreeze.append(
            [each.transport.value() for each in self.connections]
        )
        pairs = list(connections)
        moving = []
        for ident, (listener, hosted) in enumerate(pairs[:-1], 1):
            frozen = FakeFrozen(500 + ident)
            self.frozen.append(frozen)
            entry = {"id": ident, "listener": listener.key, "state": {}, "output": ""}
            moving.append(MovingConnection(ident, listener.key, hosted, frozen, entry))  # type: ignore[arg-type]
        listener, hosted = pairs[-1]
        return moving, [
            Unmovable(listener.key, hosted, self.lastReason, later=self.lastBusy)
        ]

    lastReason = "not IMigratable"
    lastBusy = False

    def watchTold(self, when: Callable[[], Any] = lambda: None) -> list[Any]:
        """
        Make every connection's protocol migratable with a
        C{connectionMigrated} that records, when called, its connection's
        index and C{when()}.

        @return: the records, as they come.
        """
        told: list[Any] = []
        for index, hosted in enumerate(self.connections):
            protocol = hosted.wrappedProtocol
            directlyProvides(protocol, IMigratable)
            protocol.connectionMigrated = lambda index=index: told.append(
                (index, when())
            )
        return told

    def threadPool(
        self, reactor: Any, pool: Any, f: Callable[..., Any], *a: Any, **kw: Any
    ) -> Deferred[Any]:
        """
        Stands in for C{deferToThreadPool}: runs C{f} at once, and
        remembers the L{Deferred}.
        """
        d = maybeDeferred(f, *a, **kw)
        self.sendings.append(d)
        return d

    def sendDescriptors(self, sock: Any, fds: list[int], *, timeout: float) -> None:
        self.sent.append(list(fds))

    #: whether the descriptors go without a thread (as a few do on a real
    #: socketpair), or need one (as more than a message's worth do)
    atOnce = False

    def sendDescriptorsNow(self, sock: Any, fds: list[int], *, timeout: float) -> bool:
        """
        Stands in for C{sendDescriptorsNow}: sends with C{sendDescriptors}
        (whatever stands in for it) if L{atOnce}.
        """
        if not self.atOnce:
            return False
        _outgoing.sendDescriptors(sock, fds, timeout=timeout)
        return True


class AtOnceTests(CapabilityFixture):
    """
    Descriptors that go at once (a few connections, a socket with room)
    need no thread.
    """

    atOnce = True

    def test_moved(self) -> None:
        """
        The frozen connections' descriptors go without a thread, and the
        hand-off goes on as with one.
        """
        report = self.successResultOf(self.o.migrate())
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(self.sent, [[501, 502]])
        self.assertEqual(self.sendings, [])

    def test_sendingFails(self) -> None:
        """
        Descriptors that cannot be sent at once roll the hand-off back,
        saying why.
        """

        def sendDescriptors(sock: Any, fds: list[int], *, timeout: float) -> None:
            raise DescriptorTransferError("sendmsg: broken pipe")

        self.patch(_outgoing, "sendDescriptors", sendDescriptors)
        report = self.successResultOf(self.o.migrate())
        self.o.assertRolledBack(report, "sending descriptors: sendmsg: broken pipe")
        self.assertEqual(self.sendings, [])
        self.assertEqual(
            [each.events for each in self.frozen], [["resume"], ["resume"]]
        )


class CapabilityTests(CapabilityFixture):
    """
    Capability transfer moves the frozen connections all or nothing.
    """

    def test_moved(self) -> None:
        """
        The successor adopts the frozen connections; once it commits they are
        released here and reported as moved; the unmovable one drains.
        """
        report = self.successResultOf(self.o.migrate())
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(self.reading, [[False, False]])
        self.assertEqual(self.sent, [[501, 502]])
        [manifest] = self.o.incoming.manifests
        self.assertEqual([entry["id"] for entry in manifest], [1, 2])
        self.assertEqual(
            self.o.incoming.names()[:6],
            [
                "TakeListener",
                "TakeListener",
                "TakeControl",
                "Prepare",
                "AdoptConnections",
                "Commit",
            ],
        )
        self.assertEqual(
            [each.events for each in self.frozen], [["release"], ["release"]]
        )
        self.assertEqual((report["moved"], report["draining"]), (2, 1))
        self.assertEqual(
            [each.released for each in self.connections], [True, True, False]
        )
        self.assertEqual(self.o.host.connectionCount(), 1)

    def test_oldProtocolsTold(self) -> None:
        """
        Once the successor committed, the old protocol object of each moved
        connection is told C{connectionMigrated()}, after its connection
        was let go of; the one that stays is not.
        """
        told = self.watchTold(
            lambda: [each.events for each in self.frozen[:2]],
        )
        report = self.successResultOf(self.o.migrate())
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(
            told, [(0, [["release"], ["release"]]), (1, [["release"], ["release"]])]
        )

    def test_oldProtocolFailsToBeTold(self) -> None:
        """
        A C{connectionMigrated} that raises is logged; the migration has
        succeeded all the same, and the other connection is told.
        """
        told = self.watchTold()
        first = self.connections[0].wrappedProtocol

        def broken() -> None:
            raise RuntimeError("cannot stop the heartbeat")

        first.connectionMigrated = broken
        report = self.successResultOf(self.o.migrate())
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(told, [(1, None)])
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "cannot stop the heartbeat")

    def test_successorWithoutPrecopy(self) -> None:
        """
        A successor that does not know C{PrecopyConnections} (older code)
        answers that it cannot handle it: every connection is then frozen
        and adopted as before, and the hand-off succeeds.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        precopied = [SimpleNamespace(hosted=object(), liveDescriptor=lambda: r)]
        self.patch(
            _outgoing, "precopyMovable", lambda connections, first: (precopied, "{}")
        )
        report = self.successResultOf(self.o.migrate())
        self.assertEqual(report["outcome"], "success")
        self.assertIn(
            "the successor does not know pre-copy: connections move frozen",
            self.o.progress,
        )
        self.assertEqual(self.sent, [[501, 502]])
        self.assertEqual((report["moved"], report["draining"]), (2, 1))

    def test_busyWithOlderSuccessor(self) -> None:
        """
        A busy connection (not at a safe point) waits for the commit; a
        successor that does not know C{CommitAdopted} leaves it to drain
        here, and the report says why.
        """
        self.lastReason = "NotAtSafePoint: a request is in flight"
        self.lastBusy = True
        report = self.successResultOf(self.o.migrate())
        self.assertEqual(report["outcome"], "success")
        self.assertEqual((report["moved"], report["draining"]), (2, 1))
        self.assertTrue(
            any(
                "cannot take connections after the commit" in note
                for note in report["notes"]
            ),
            report["notes"],
        )
        self.assertFalse(
            any("a request is in flight" in note for note in report["notes"]),
            report["notes"],
        )

    def assertResumed(self) -> None:
        """
        Every frozen connection was resumed (none released), accepting
        resumed, and all connections are still served here.
        """
        self.assertEqual(
            [each.events for each in self.frozen], [["resume"], ["resume"]]
        )
        self.assertEqual([each.released for each in self.connections], [False] * 3)
        self.assertEqual(self.o.host.connectionCount(), 3)
        self.assertEqual(
            [port.events for port in self.o.ports],
            [["stopReading", "startReading"]] * 2,
        )

    def test_commitRefused(self) -> None:
        """
        A failure after the connections were frozen and adopted resumes
        them all here, and accepting resumes.
        """
        self.o.incoming.refuse["Commit"] = "changed my mind"
        report = self.successResultOf(self.o.migrate())
        self.o.assertRolledBack(report, "successor refused committing: changed my mind")
        self.assertEqual(self.o.successor.signals, ["KILL"])
        self.assertEqual(report["moved"], 0)
        self.assertResumed()

    def test_someConnectionsRefused(self) -> None:
        """
        A successor that refuses some of the connections fails the whole
        hand-off: all or nothing.  Every connection resumes here and nothing
        is committed.  The reason names the refused connection (its peer
        and listener), not only its class.
        """
        self.o.incoming.adoptAnswer = lambda entries: {
            "adopted": 1,
            "refusedCount": 1,
            "refused": json.dumps(
                [
                    {
                        "id": 2,
                        "reason": "the new code's Chat does not provide IMigratable",
                    }
                ]
            ),
        }
        report = self.successResultOf(self.o.migrate())
        self.o.assertRolledBack(
            report,
            "the new code refused 1 of 2 connections (first: connection from "
            "192.168.1.1:54321 on tcp:8000: the new code's Chat does not provide "
            "IMigratable); the hand-off is all or nothing",
        )
        self.assertNotIn("Commit", self.o.incoming.names())
        self.assertResumed()

    def test_adoptionRefused(self) -> None:
        """
        A successor that refuses the whole batch rolls back too.
        """
        self.o.incoming.refuse["AdoptConnections"] = "manifest of 9 bytes refused"
        report = self.successResultOf(self.o.migrate())
        self.o.assertRolledBack(
            report,
            "successor refused adopting connections: manifest of 9 bytes refused",
        )
        self.assertResumed()

    def test_sendingFails(self) -> None:
        """
        Descriptors that cannot be sent roll the hand-off back, saying so.
        """

        def sendDescriptors(sock: Any, fds: list[int], *, timeout: float) -> None:
            raise DescriptorTransferError("sendmsg: broken pipe")

        self.patch(_outgoing, "sendDescriptors", sendDescriptors)
        report = self.successResultOf(self.o.migrate())
        self.o.assertRolledBack(report, "sending descriptors: sendmsg: broken pipe")
        self.assertResumed()

    def test_sendingFailsAndRefused(self) -> None:
        """
        When both the sending and the successor fail, the successor's answer
        is the reason, and the sending's failure is not left unhandled.
        """

        def sendDescriptors(sock: Any, fds: list[int], *, timeout: float) -> None:
            raise DescriptorTransferError("sendmsg: broken pipe")

        self.patch(_outgoing, "sendDescriptors", sendDescriptors)
        self.o.incoming.refuse["AdoptConnections"] = "no"
        report = self.successResultOf(self.o.migrate())
        self.o.assertRolledBack(report, "successor refused adopting connections: no")
        self.assertResumed()
        [sending] = self.sendings
        self.successResultOf(sending)


class PrecopyingIncoming(FakeIncoming):
    """
    A L{FakeIncoming} that stages pre-copied connections.
    """

    @PrecopyConnections.responder
    def precopyConnections(
        self, count: int, manifestSize: int, manifest: int, bulk: int, freeze: int
    ) -> Any:
        return self._answer(
            "PrecopyConnections",
            {"staged": count, "refusedCount": 0, "refused": "[]"},
            count=count,
        )


class RecopyingIncoming(PrecopyingIncoming):
    """
    A L{PrecopyingIncoming} that takes re-copies, recording each manifest.

    @ivar recopyAnswer: given a re-copy's entries, its answer (default:
        every one updated).
    """

    def __init__(self, listeners: list[str]) -> None:
        PrecopyingIncoming.__init__(self, listeners)
        self.recopies: list[Any] = []
        self.recopyAnswer: Callable[[list[dict[str, Any]]], dict[str, Any]] = (
            lambda entries: {
                "updated": len(entries),
                "refusedCount": 0,
                "refused": "[]",
            }
        )

    @RecopyConnections.responder
    def recopyConnections(self, count: int, manifestSize: int, manifest: int) -> Any:
        entries = json.loads(os.pread(manifest, manifestSize, 0))
        self.recopies.append(entries)
        return self._answer(
            "RecopyConnections", self.recopyAnswer(entries), count=count
        )


class ThreadWorkTests(CapabilityFixture):
    """
    A connection whose answer a thread of the reactor's pool still
    computes (C{deferToThread}) looks idle; capability transfer lets every
    such answer land here before it freezes any connection, and rolls back
    rather than lose one.
    """

    def startAnswering(self, index: int = 0) -> Callable[[bytes], None]:
        """
        Start a thread pool job whose answer the connection C{index} writes
        to its client.

        @return: what finishes the job with an answer.
        """
        transport = self.connections[index].transport
        return self.reactor.startJob("answer", transport.write)

    def poll(self, seconds: float) -> None:
        for _ in range(int(round(seconds / 0.005))):
            self.o.advance(0.005)

    def test_answerLandsBeforeTheFreeze(self) -> None:
        """
        With a thread pool job running, no connection freezes: the hand-off
        waits, saying so and still accepting, until the job's answer has
        been delivered here, and only then freezes (the answer is in the
        connection's output that moves) and commits.
        """
        finish = self.startAnswering()
        d = self.o.migrate()
        self.poll(0.5)
        self.assertNoResult(d)
        self.assertEqual(self.reading, [])
        # Meanwhile this process still accepts.
        self.assertEqual([port.reading for port in self.o.ports], [True, True])
        self.assertIn(
            "waiting up to 3 s for 1 job of the reactor's thread pool "
            "(deferToThread) running to finish before the freeze",
            self.o.progress,
        )
        finish(b"answer\r\n")
        self.poll(0.005)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(self.outputAtFreeze, [[b"answer\r\n", b"", b""]])
        self.assertEqual((report["moved"], report["draining"]), (2, 1))
        self.assertTrue(
            any(
                step.startswith("the threads' work finished after")
                for step in self.o.progress
            ),
            self.o.progress,
        )

    def test_answerStillComputedRollsBack(self) -> None:
        """
        A job still running after C{--safe-point-timeout} rolls the hand-off
        back before anything froze: the reason says why, every connection
        serves on here, and the job's answer, when it comes, reaches its
        client from here.
        """
        finish = self.startAnswering()
        d = self.o.migrate()
        self.poll(3.1)
        report = self.successResultOf(d)
        self.o.assertRolledBack(
            report,
            "threads still owed answers after 3 s (1 job of the reactor's "
            "thread pool (deferToThread) running), which would reach this "
            "process after their connections moved: try again once they are "
            "done, or raise --safe-point-timeout",
        )
        self.assertEqual((self.reading, self.frozen), ([], []))
        self.assertEqual([each.released for each in self.connections], [False] * 3)
        finish(b"answer\r\n")
        self.poll(0.005)
        self.assertEqual(self.connections[0].transport.value(), b"answer\r\n")

    def test_noWaitWithoutThreadWork(self) -> None:
        """
        A hand-off with nothing in flight neither waits nor says so.
        """
        self.successResultOf(self.o.migrate())
        self.assertFalse(
            any("before the freeze" in step for step in self.o.progress),
            self.o.progress,
        )


class LaterIncoming(FakeIncoming):
    """
    A L{FakeIncoming} that takes connections after the commit.
    """

    @CommitAdopted.responder
    def commitAdopted(self) -> Any:
        return self._answer("CommitAdopted", {"committed": 0})


class FakeWatch:
    """
    Stands in for L{migrate._handoff._safepoint.SafePointWatch}: every
    watched connection is ready at the first look, which records the jobs
    of the reactor's thread pool running then.
    """

    def __init__(self, reactor: ThreadedFakeReactor, connections: Any) -> None:
        self.reactor = reactor
        self.pending = [
            SimpleNamespace(listenerKey=key, hosted=hosted, letGo=lambda: None)
            for key, hosted in connections
        ]
        self.workingAtLooks: list[int] = []

    @property
    def waiting(self) -> bool:
        return bool(self.pending)

    def takeReady(self) -> list[Any]:
        self.workingAtLooks.append(len(self.reactor.threadpool.working))
        ready, self.pending = self.pending, []
        return ready

    def stop(self) -> list[Any]:
        return self.pending


class LaterThreadWorkTests(CapabilityFixture):
    """
    After the commit, a busy connection that reaches its safe point is not
    taken while a thread job is in flight: its answer may be for it.
    """

    lastBusy = True

    def setUp(self) -> None:
        CapabilityFixture.setUp(self)
        self.o.incoming = LaterIncoming(["tcp:8000", "tcp:8001"])
        self.watches: list[FakeWatch] = []

        def watch(connections: Any) -> FakeWatch:
            self.watches.append(FakeWatch(self.reactor, connections))
            return self.watches[-1]

        self.patch(_outgoing, "SafePointWatch", watch)
        self.finish: list[Callable[[bytes], None]] = []

    def freezeMovable(
        self, connections: Any
    ) -> tuple[list[MovingConnection], list[Unmovable]]:
        """
        As the first connections freeze, the busy one (the last) starts a
        thread job.
        """
        if not self.finish:
            transport = self.connections[2].transport
            self.finish.append(self.reactor.startJob("answer", transport.write))
        return CapabilityFixture.freezeMovable(self, connections)

    def test_busyConnectionWaitsForTheAnswer(self) -> None:
        """
        The busy connection is looked at only once the job's answer has
        landed here, and freezes with it.
        """
        d = self.o.migrate()
        for _ in range(10):
            self.o.advance(0.005)
        [watch] = self.watches
        self.assertEqual(watch.workingAtLooks, [])
        self.finish[0](b"answer\r\n")
        self.o.advance(0.005)
        self.o.advance(0.005)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(watch.workingAtLooks, [0])
        self.assertEqual(self.outputAtFreeze[-1], [b"", b"", b"answer\r\n"])

    def test_movedLaterTold(self) -> None:
        """
        A busy connection moved after the commit, at its safe point, has
        its old protocol object told C{connectionMigrated()} then, once
        its connection was let go of.
        """
        told = self.watchTold(lambda: self.connections[2].released)
        d = self.o.migrate()
        self.o.advance(0.005)
        self.assertEqual(told, [(0, False), (1, False)])

        def freezeAll(connections: Any) -> tuple[list[MovingConnection], list[Any]]:
            moving = []
            for listener, hosted in connections:
                frozen = FakeFrozen(503)
                entry = {"id": 3, "listener": listener.key, "state": {}, "output": ""}
                moving.append(MovingConnection(3, listener.key, hosted, frozen, entry))  # type: ignore[arg-type]
            return moving, []

        self.patch(_outgoing, "freezeMovable", freezeAll)
        self.finish[0](b"answer\r\n")
        self.o.advance(0.005)
        self.o.advance(0.005)
        self.assertEqual(self.successResultOf(d)["moved"], 3)
        self.assertEqual(told, [(0, False), (1, False), (2, True)])


class PrecopyStepTests(CapabilityFixture):
    """
    The pre-copy copies its connections in steps that a count and a time
    both bound, the reactor polling between two; the report gives the
    longest step.
    """

    def test_stepsBoundedInTime(self) -> None:
        """
        Copying that takes long (here 3 ms per chunk of 10 connections)
        ends a step after its time (4 ms), before its count (100), and the
        next step starts only after the reactor has polled.
        """
        self.connections += self.o.connect(27)
        events: list[str] = []
        polls = _outgoing.afterPolls

        def slowCopy(connections: Any, firstIdent: int) -> tuple[list[Any], str]:
            events.append("copied {}".format(len(list(connections))))
            self.reactor.advance(0.003)
            return [], ""

        def recordedPolls(reactor: Any, count: int) -> Deferred[Any]:
            events.append("polls")
            return polls(reactor, count)

        self.patch(_outgoing, "precopyMovable", slowCopy)
        self.patch(_outgoing, "afterPolls", recordedPolls)
        d = self.o.migrate()
        for _ in range(20):
            self.o.advance(0)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "success")
        # Two chunks make a step (6 ms is past 4 ms); the third is a step
        # of its own, after the reactor polled.
        self.assertEqual(events[:4], ["copied 10", "copied 10", "polls", "copied 10"])
        self.assertNotIn("copied 10", events[4:])
        self.assertAlmostEqual(report["durations"]["precopy slice"], 0.006)


class PrecopyFixture(CapabilityFixture):
    """
    A capability transfer whose first two connections were pre-copied (and
    freeze in one reactor step of their own); the last one was not, and
    stays.
    """

    def setUp(self) -> None:
        CapabilityFixture.setUp(self)
        self.o.incoming = PrecopyingIncoming(["tcp:8000", "tcp:8001"])
        # The first two are pre-copied (and still served); the last one is
        # not, and stays (see freezeMovable).
        self.released: list[int] = []
        self.precopied = [
            SimpleNamespace(
                ident=ident,
                hosted=hosted,
                listenerKey="tcp:8000",
                liveDescriptor=lambda: 0,
                transport=None,
                release=lambda ident=ident: self.released.append(ident),
            )
            for ident, hosted in enumerate(self.connections[:2], 1)
        ]
        self.patch(
            _outgoing,
            "precopyMovable",
            lambda connections, first: (self.precopied, "{}"),
        )
        self.patch(
            _outgoing,
            "sendLiveDescriptors",
            lambda reactor, sock, sources, timeout: maybeDeferred(lambda: None),
        )
        self.patch(_outgoing, "freezeDelta", self.freezeDelta)
        self.appStateOnlyAtFreeze: list[bool] = []
        # Each re-copy round's pick, by round (none changed once they run
        # out), and the connections each pick was asked about.
        self.recopyRounds: list[list[Any]] = []
        self.recopyAsked: list[list[Any]] = []
        self.patch(_outgoing, "recopyChanged", self.recopyChanged)
        self.patch(
            _outgoing,
            "commitBlocking",
            lambda sock, delta, timeout, **kw: {"pid": SUCCESSOR_PID},
        )
        self.outputAtCommit: list[list[bytes]] = []
        self.finish: list[Callable[[bytes], None]] = []

    def recopyChanged(self, precopied: list[Any]) -> tuple[list[Any], str]:
        """
        Stands in for L{migrate._handoff._precopy.recopyChanged}: the
        connections of this round's pick among C{precopied}, each with a
        new fingerprint naming the round.
        """
        self.recopyAsked.append(list(precopied))
        picked = self.recopyRounds.pop(0) if self.recopyRounds else []
        chosen = [each for each in precopied if each.ident in picked]
        round = len(self.recopyAsked)
        return [(each, "fingerprint {}".format(round)) for each in chosen], ",".join(
            json.dumps({"id": each.ident, "state": {"round": round}}) for each in chosen
        )

    def freezeDelta(
        self, precopied: list[Any], appStateOnly: bool = False
    ) -> FreezeDelta:
        self.appStateOnlyAtFreeze.append(appStateOnly)
        self.outputAtCommit.append(
            [each.transport.value() for each in self.connections]
        )
        return FreezeDelta(moving=list(precopied))

    def startAnswering(self) -> None:
        transport = self.connections[0].transport
        self.finish.append(self.reactor.startJob("answer", transport.write))

    def poll(self, seconds: float) -> None:
        for _ in range(int(round(seconds / 0.005))):
            self.o.advance(0.005)


class RecordingWriter(FileDescriptor):
    """
    A descriptor registered for writing that records, at each write, what
    C{seen} returns.
    """

    def __init__(self, reactor: Any, seen: Callable[[], Any]) -> None:
        FileDescriptor.__init__(self, reactor)
        self.seen = seen
        self.writes: list[Any] = []

    def doWrite(self) -> None:
        self.writes.append(self.seen())


class ReportBeforeLetGoTests(PrecopyFixture):
    """
    Once the successor committed, the report is made, told to the
    successor and answered to whoever asked, and what this process buffers
    for them written out, before it lets go of the moved connections (which
    may take seconds on a busy machine, at a low priority).
    """

    def releasedSoFar(self) -> list[int]:
        return list(self.released)

    def test_reportedBeforeLettingGo(self) -> None:
        """
        The migration's result fires, and every writer but the moved
        connections is written to, before any moved connection is let go
        of; all in the reactor step of the freeze.
        """
        control = RecordingWriter(self.reactor, self.releasedSoFar)
        self.reactor.addWriter(control)
        moved = RecordingWriter(self.reactor, self.releasedSoFar)
        self.reactor.addWriter(moved)
        self.precopied[0].transport = moved
        answered: list[list[int]] = []
        self.o.host.addObserver(
            SimpleNamespace(
                migrationEnded=lambda host, report: answered.append(
                    self.releasedSoFar()
                )
            )
        )
        d = self.o.migrate()
        self.o.advance(0)
        self.assertEqual(self.successResultOf(d)["outcome"], "success")
        self.assertEqual(answered, [[]])
        self.assertEqual((control.writes, moved.writes), ([[]], []))
        self.assertEqual(self.released, [1, 2])
        self.o.flush()
        self.assertIn("Reported", self.o.incoming.names())

    def test_durations(self) -> None:
        """
        The report times the freeze and the commit; the let-go, which comes
        after it, is only logged.
        """
        with capturedLogs() as events:
            d = self.o.migrate()
            self.o.advance(0)
        report = self.successResultOf(d)
        self.assertIn("commit", report["durations"])
        self.assertNotIn("letgo", report["durations"])
        self.assertIn(
            "Let go of 2 moved connections in 0.000 s",
            [formatEvent(event) for event in events],
        )


class ApplicationStateOnlyTests(PrecopyFixture):
    """
    The freeze sends a change of the application state alone only to a
    successor that said it takes one.
    """

    def test_olderSuccessor(self) -> None:
        """
        A successor that does not say so (older code) is sent whole states.
        """
        d = self.o.migrate()
        self.o.advance(0)
        self.assertEqual(self.successResultOf(d)["outcome"], "success")
        self.assertEqual(self.appStateOnlyAtFreeze, [False])

    def test_successorSaysSo(self) -> None:
        """
        A successor that answers the pre-copy with C{appStateOnly} is sent
        the application state alone where only it changed.
        """
        incoming: Any = self.o.incoming
        answer = incoming._answer

        def saying(name: str, answer_: Any, **arguments: Any) -> Any:
            if name == "PrecopyConnections":
                answer_ = dict(answer_, appStateOnly=True)
            return answer(name, answer_, **arguments)

        incoming._answer = saying
        d = self.o.migrate()
        self.o.advance(0)
        self.assertEqual(self.successResultOf(d)["outcome"], "success")
        self.assertEqual(self.appStateOnlyAtFreeze, [True])


class RecopyTests(PrecopyFixture):
    """
    Between the pre-copy and the freeze, a few re-copy rounds send the new
    state of the pre-copied connections that changed since their last
    copy, while this process serves them.
    """

    def setUp(self) -> None:
        PrecopyFixture.setUp(self)
        self.incoming = self.o.incoming = RecopyingIncoming(["tcp:8000", "tcp:8001"])
        for each in self.precopied:
            each.fingerprint = "pre-copied"
        self.fingerprintsAtFreeze: list[list[Any]] = []
        # Every connection of this fixture changes before the first round:
        # the rounds are looked at as if they could converge, but for
        # test_onlyRoundWhenNearlyAllChanged.
        self.patch(_outgoing, "_RECOPY_FIRST_CHANGED", 1.0)

    def test_onlyRoundWhenNearlyAllChanged(self) -> None:
        """
        A first round that copied more than C{_RECOPY_FIRST_CHANGED} of the
        pre-copied connections is the only one: the clients change them
        faster than a round copies them.  What it copied was sent (the
        successor lets go of what it restored ahead for them outside the
        freeze), and the freeze compares with it.
        """
        self.patch(_outgoing, "_RECOPY_FIRST_CHANGED", 0.9)
        self.recopyRounds = [[1, 2], [2]]
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(
            self.incoming.recopies,
            [[{"id": 1, "state": {"round": 1}}, {"id": 2, "state": {"round": 1}}]],
        )
        self.assertEqual(
            self.fingerprintsAtFreeze, [["fingerprint 1", "fingerprint 1"]]
        )
        self.assertIn(
            "re-copy rounds end: 2 of 2 changed since the pre-copy, faster than a "
            "round copies them; the freeze carries what changes next",
            self.o.progress,
        )

    def test_stepsBoundedInTime(self) -> None:
        """
        A re-copy round copies in steps that a time bounds too (here a
        chunk of one connection takes 5 ms, past a step's 4), each step
        sent to the successor at once.
        """
        self.patch(
            _outgoing,
            "timedChunks",
            lambda items, start, limit, clock: timedChunks(
                items, start, limit, clock, chunk=1
            ),
        )
        asked: list[list[int]] = []

        def slowRecopy(precopied: Any) -> tuple[list[Any], str]:
            chunk = list(precopied)
            asked.append([each.ident for each in chunk])
            self.reactor.advance(0.005)
            return [(each, "slow") for each in chunk], ",".join(
                json.dumps({"id": each.ident, "state": {}}) for each in chunk
            )

        self.patch(_outgoing, "recopyChanged", slowRecopy)
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(asked[:2], [[1], [2]])
        self.assertEqual(
            self.incoming.recopies[:2],
            [[{"id": 1, "state": {}}], [{"id": 2, "state": {}}]],
        )

    def test_successorInTheBackgroundWhileStaging(self) -> None:
        """
        A successor brought forward once started goes back to the
        background before the pre-copy is sent, stays there through the
        re-copies (its staging competes with this process, which serves
        every client until the freeze), and is brought forward again
        before the freeze.
        """
        seen: dict[str, list[tuple[str, str]]] = {}

        def priorities() -> list[tuple[str, str]]:
            return list(self.o.successor.priorities)

        def sendLiveDescriptors(
            reactor: Any, sock: Any, sources: Any, timeout: Any
        ) -> Any:
            seen["precopy"] = priorities()
            return maybeDeferred(lambda: None)

        self.patch(_outgoing, "sendLiveDescriptors", sendLiveDescriptors)
        answer = self.incoming.recopyAnswer

        def recopyAnswer(entries: list[dict[str, Any]]) -> dict[str, Any]:
            seen["recopy"] = priorities()
            return answer(entries)

        self.incoming.recopyAnswer = recopyAnswer
        freezeDelta = _outgoing.freezeDelta

        def atTheFreeze(precopied: list[Any], appStateOnly: bool = False) -> Any:
            seen["freeze"] = priorities()
            return freezeDelta(precopied, appStateOnly)

        self.patch(_outgoing, "freezeDelta", atTheFreeze)
        self.recopyRounds = [[1, 2]]
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        staging = [("forward", "its start is done"), ("back", "it stages the pre-copy")]
        self.assertEqual(seen["precopy"], staging)
        self.assertEqual(seen["recopy"], staging)
        self.assertEqual(seen["freeze"], staging + [("forward", "the freeze begins")])
        self.assertEqual(self.o.successor.priorities, seen["freeze"])

    def test_moreRoundsWhenFewerChanged(self) -> None:
        """
        A first round that copied at most C{_RECOPY_FIRST_CHANGED} of them
        is followed by another.
        """
        self.patch(_outgoing, "_RECOPY_FIRST_CHANGED", 0.5)
        self.recopyRounds = [[1], []]
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(self.incoming.recopies, [[{"id": 1, "state": {"round": 1}}]])
        self.assertEqual(len(self.recopyAsked), 2)

    def freezeDelta(
        self, precopied: list[Any], appStateOnly: bool = False
    ) -> FreezeDelta:
        self.fingerprintsAtFreeze.append([each.fingerprint for each in precopied])
        return PrecopyFixture.freezeDelta(self, precopied, appStateOnly)

    def migrate(self) -> dict[str, Any]:
        d = self.o.migrate()
        self.o.advance(0)
        report: dict[str, Any] = self.successResultOf(d)
        return report

    def test_roundsWhileTheyShrink(self) -> None:
        """
        Each round sends the id and new state of the connections that
        changed since their last copy (no descriptor, no output); once the
        successor took them, the freeze compares each with its new copy.
        The rounds end when nothing changed; the report times them.
        """
        self.recopyRounds = [[1, 2], [2]]
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(
            self.incoming.recopies,
            [
                [{"id": 1, "state": {"round": 1}}, {"id": 2, "state": {"round": 1}}],
                [{"id": 2, "state": {"round": 2}}],
            ],
        )
        # A third round found nothing changed: nothing sent.
        self.assertEqual(len(self.recopyAsked), 3)
        self.assertEqual(
            self.fingerprintsAtFreeze, [["fingerprint 1", "fingerprint 2"]]
        )
        names = self.o.incoming.names()
        self.assertEqual(
            names[names.index("PrecopyConnections") :][:3],
            ["PrecopyConnections", "RecopyConnections", "RecopyConnections"],
        )
        self.assertIn(
            "re-copy round 2: 1 connection changed since the last copy (34 bytes of "
            "state)",
            self.o.progress,
        )
        self.assertIn("recopy", report["durations"])

    def notePolls(self, events: list[Any]) -> None:
        """
        Have every wait for reactor polls between two steps noted in
        C{events} (C{"2 polls"}), then waited for as before.
        """
        afterPolls = _outgoing.afterPolls

        def polls(clock: Any, count: int) -> Any:
            events.append("{} polls".format(count))
            return afterPolls(clock, count)

        self.patch(_outgoing, "afterPolls", polls)

    def test_slices(self) -> None:
        """
        A round looks at the connections a slice at a time, this process
        serving (a reactor turn) between two slices, and sends each slice's
        new states as soon as it has them.
        """
        self.patch(_outgoing, "_RECOPY_SLICE", 1)
        events: list[Any] = []
        changed = {1: 1, 2: 1}

        def recopyChanged(precopied: list[Any]) -> tuple[list[Any], str]:
            events.append([each.ident for each in precopied])
            chosen = [each for each in precopied if changed.get(each.ident)]
            for each in chosen:
                changed[each.ident] -= 1
            return [(each, "new") for each in chosen], ",".join(
                json.dumps({"id": each.ident, "state": {}}) for each in chosen
            )

        self.patch(_outgoing, "recopyChanged", recopyChanged)
        self.notePolls(events)
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        first = events.index([1])
        # Two polls: one reads the requests that came meanwhile, the next
        # writes their answers.
        self.assertEqual(events[first : first + 3], [[1], "2 polls", [2]])
        self.assertEqual(
            self.incoming.recopies,
            [[{"id": 1, "state": {}}], [{"id": 2, "state": {}}]],
        )

    def test_precopyBatches(self) -> None:
        """
        The pre-copy describes the connections a batch at a time, the
        reactor polling twice between two batches: one poll reads the
        requests that came meanwhile, the next writes their answers.
        """
        self.patch(_outgoing, "_PRECOPY_BATCH", 1)
        events: list[Any] = []
        byProtocol = {id(each.hosted): each for each in self.precopied}

        def precopyMovable(connections: Any, first: int) -> tuple[list[Any], str]:
            batch = [
                byProtocol[id(protocol)]
                for _, protocol in connections
                if id(protocol) in byProtocol
            ]
            events.append([each.ident for each in batch])
            return batch, ",".join("{}" for _ in batch)

        self.patch(_outgoing, "precopyMovable", precopyMovable)
        self.notePolls(events)
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(events[:5], [[1], "2 polls", [2], "2 polls", []])

    def test_boundedRounds(self) -> None:
        """
        However much keeps changing, at most three rounds are sent; the
        freeze carries the rest.
        """
        self.recopyRounds = [[1, 2], [1], [1], [1]]
        self.patch(_outgoing, "_RECOPY_SHRINK", 1.0)
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(len(self.incoming.recopies), 3)
        self.assertEqual(len(self.recopyAsked), 3)
        self.assertEqual(
            self.fingerprintsAtFreeze, [["fingerprint 3", "fingerprint 1"]]
        )

    def test_stopsWhenNotShrinking(self) -> None:
        """
        A round after the first that would copy nearly as many as the one
        before is not sent (the clients change them as fast as they are
        copied): the freeze carries them, compared with their last copy.
        """
        self.recopyRounds = [[1, 2], [1, 2]]
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(len(self.incoming.recopies), 1)
        self.assertEqual(
            self.fingerprintsAtFreeze, [["fingerprint 1", "fingerprint 1"]]
        )
        self.assertIn(
            "re-copy round 2 stopped: more than 75% of the 2 connections round 1 "
            "copied changed again; the freeze carries them",
            self.o.progress,
        )

    def test_stopsMidRound(self) -> None:
        """
        A round stops as soon as it would copy more than three quarters of
        what the round before copied: the slices it sent already count
        (their connections take their new fingerprints), the rest is left
        for the freeze.
        """
        self.patch(_outgoing, "_RECOPY_SLICE", 1)
        copies = {1: 0, 2: 0}

        def recopyChanged(precopied: list[Any]) -> tuple[list[Any], str]:
            # Every connection changed again each time it is looked at.
            picked = []
            for each in precopied:
                copies[each.ident] += 1
                picked.append((each, "copy {}".format(copies[each.ident])))
            return picked, ",".join(
                json.dumps({"id": each.ident, "state": {"copy": copies[each.ident]}})
                for each in precopied
            )

        self.patch(_outgoing, "recopyChanged", recopyChanged)
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(
            self.incoming.recopies,
            [
                [{"id": 1, "state": {"copy": 1}}],
                [{"id": 2, "state": {"copy": 1}}],
                [{"id": 1, "state": {"copy": 2}}],
            ],
        )
        self.assertEqual(self.fingerprintsAtFreeze, [["copy 2", "copy 1"]])

    def test_successorWithoutRecopy(self) -> None:
        """
        A successor that does not know C{RecopyConnections} (older code)
        answers that it cannot handle it: the rounds are skipped, every
        connection keeps the fingerprint of the state the successor has,
        and the freeze carries every change.
        """
        self.o.incoming = PrecopyingIncoming(["tcp:8000", "tcp:8001"])
        self.recopyRounds = [[1, 2]]
        report = self.migrate()
        self.assertEqual(report["outcome"], "success")
        self.assertIn(
            "the successor does not know re-copy: the freeze carries every change",
            self.o.progress,
        )
        self.assertEqual(self.fingerprintsAtFreeze, [["pre-copied", "pre-copied"]])
        self.assertEqual(report["moved"], 2)

    def test_refusalRollsBack(self) -> None:
        """
        A new state the successor refuses rolls the hand-off back, naming
        the connection: this process, which never stopped serving them,
        keeps every connection; none is frozen or let go of.
        """
        self.recopyRounds = [[1, 2]]
        self.incoming.recopyAnswer = lambda entries: {
            "updated": 0,
            "refusedCount": 1,
            "refused": json.dumps([{"id": 2, "reason": "version 9 is unknown"}]),
        }
        report = self.migrate()
        self.o.assertRolledBack(
            report,
            "the new code refused the new state of 1 of 2 connections (first: "
            "connection from 192.168.1.1:54321 on tcp:8000: version 9 is unknown); "
            "the hand-off is all or nothing",
        )
        self.assertEqual(self.fingerprintsAtFreeze, [])
        self.assertEqual(self.released, [])
        self.assertNotIn("AdoptConnections", self.o.incoming.names())
        self.assertEqual(self.o.host.connectionCount(), 3)

    def test_successorDiesDuringARound(self) -> None:
        """
        A successor that dies while it takes a re-copy costs nothing: the
        hand-off rolls back, every connection still served here.
        """
        self.recopyRounds = [[1, 2]]
        self.o.incoming.hang.add("RecopyConnections")
        d = self.o.migrate()
        self.o.advance(0)
        self.assertNoResult(d)
        self.o.successor.end(SuccessorExit(exitCode=None, signal=9))
        self.o.advance(0)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertEqual(self.fingerprintsAtFreeze, [])
        self.assertEqual(self.released, [])
        self.assertEqual(self.o.host.connectionCount(), 3)


class PrecopyThreadWorkTests(PrecopyFixture):
    """
    The same when connections were pre-copied, and freeze in one reactor
    step of their own: a job that starts in that very step (a timer of the
    application's) makes the freeze wait again.
    """

    def freezeMovable(
        self, connections: Any
    ) -> tuple[list[MovingConnection], list[Unmovable]]:
        """
        As the connections that were not pre-copied freeze, a timer of the
        application's is due in the same turn as the freeze that follows,
        and starts a job for a pre-copied connection.
        """
        self.reactor.callLater(0, self.startAnswering)
        return CapabilityFixture.freezeMovable(self, connections)

    def test_jobStartedInTheFreezeStep(self) -> None:
        """
        A job that starts in the reactor turn of the freeze, before it,
        makes the freeze stand down, having touched nothing, until the
        answer has landed; then the pre-copied connections freeze, with the
        answer in their output, and move.
        """
        d = self.o.migrate()
        self.o.advance(0)
        self.assertNoResult(d)
        self.assertEqual(self.outputAtCommit, [])
        self.assertEqual(len(self.finish), 1)
        self.poll(0.5)
        self.assertNoResult(d)
        self.finish[0](b"answer\r\n")
        self.poll(0.005)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(self.outputAtCommit, [[b"answer\r\n", b"", b""]])
        self.assertEqual(self.released, [1, 2])
        self.assertEqual((report["moved"], report["draining"]), (2, 1))

    def test_jobOutlastsTheBound(self) -> None:
        """
        A job still running at C{--safe-point-timeout} rolls back before
        the freeze: the pre-copied connections were never frozen, and serve
        on here.
        """
        d = self.o.migrate()
        self.poll(3.1)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("threads still owed answers after 3 s", report["reason"])
        self.assertEqual((self.outputAtCommit, self.released), ([], []))
        self.finish[0](b"answer\r\n")
        self.poll(0.005)
        self.assertEqual(self.connections[0].transport.value(), b"answer\r\n")


class FakeOutgoing(amp.AMP):
    """
    A fake old process's end of the hand-off channel.

    @ivar hellos: the C{Hello} arguments received.
    @ivar welcome: answers C{Hello}: a dictionary, a L{Deferred}, or an
        exception to raise.
    """

    def __init__(self) -> None:
        amp.AMP.__init__(self)
        self.hellos: list[dict[str, Any]] = []
        self.welcome: Any = {"generation": 2, "strategy": "capability"}

    @Hello.responder
    def hello(
        self,
        pid: int,
        protocolVersion: int,
        listeners: list[str],
        anyListener: bool = False,
    ) -> Any:
        self.hellos.append(
            {"pid": pid, "protocolVersion": protocolVersion, "listeners": listeners}
        )
        if isinstance(self.welcome, Exception):
            raise self.welcome
        return self.welcome


class FakeInheritance:
    """
    Stands in for L{migrate._handoff._successor.InheritedHandoff}.
    """

    def __init__(self) -> None:
        self.outputTaken = 0

    def takeOverOutput(self) -> None:
        self.outputTaken += 1


def _identity(fd: int) -> tuple[int, int] | None:
    """
    Which file descriptor C{fd} refers to: its device and inode, or L{None}
    if it is closed.
    """
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class ClientEnd:
    """
    The only part of a moved connection's transport the order of serving
    (L{migrate._handoff._waiting.servingOrder}) reads: a real descriptor,
    one end of a Unix socket pair, with a byte to read when its client
    waits.  A Unix socket's bytes have no age, so the connections whose
    clients wait are served first in the order given.
    """

    def __init__(self, case: SynchronousTestCase, waiting: bool) -> None:
        ours, theirs = socket.socketpair()
        case.addCleanup(ours.close)
        case.addCleanup(theirs.close)
        if waiting:
            theirs.sendall(b"x")
        self._socket = ours

    def fileno(self) -> int:
        return self._socket.fileno()


class FakeAdopted:
    """
    Stands in for L{migrate._handoff._movement.AdoptedConnection}, with a
    L{ClientEnd} for a transport: readable if the entry says its client
    waits (C{"waiting": true}).
    """

    def __init__(self, entry: Any, descriptor: int, case: SynchronousTestCase) -> None:
        self.entry = entry
        self.descriptor = descriptor
        self.events: list[str] = []
        self.transport = ClientEnd(case, bool(entry.get("waiting")))

    def hasWork(self) -> bool:
        return False

    def commit(self) -> None:
        self.events.append("commit")

    def abandon(self) -> None:
        self.events.append("abandon")


class FakeAbandoningProtocol:
    """
    A new code's protocol whose class defines C{abandonMigrationState}.
    """

    def abandonMigrationState(self) -> None:
        pass


class FakeStaged:
    """
    Stands in for L{migrate._handoff._movement.StagedConnection}.

    @ivar refuse: if set, L{restore} raises with this reason.
    @ivar refuseAbandon: if set, L{abandonAhead} raises with this reason.
    @ivar protocol: the new code's protocol: a L{FakeAbandoningProtocol}
        if the entry says C{"abandons": true}.
    """

    def __init__(
        self, entry: Any, restored: list[int], case: SynchronousTestCase
    ) -> None:
        self.ident = entry["id"]
        self.events: list[str] = []
        self.updates: list[Any] = []
        self.refuse: str | None = entry.get("refuseAhead")
        self.refuseAbandon: str | None = None
        self.restoredAhead = False
        self.waiting = bool(entry.get("waiting"))
        self.protocol: Any = (
            FakeAbandoningProtocol() if entry.get("abandons") else object()
        )
        self._restored = restored
        self._case = case

    def canRestoreAhead(self) -> bool:
        return isinstance(self.protocol, FakeAbandoningProtocol)

    def update(self, entry: Any) -> bool:
        self.events.append("update")
        self.updates.append(entry)
        return "state" in entry or "appState" in entry

    def updateState(self, plain: Any) -> None:
        if plain == "refused":
            raise ValueError("bad re-copy of connection {}".format(self.ident))
        self.events.append("update state")
        self.updates.append(plain)

    def restore(self) -> FakeAdopted:
        if self.refuse is not None:
            raise ValueError(self.refuse)
        self.events.append("restore")
        self._restored.append(self.ident)
        return self.held()

    def restoreAhead(self) -> None:
        if self.refuse is not None:
            raise ValueError(self.refuse)
        self.events.append("restore ahead")
        self.restoredAhead = True

    def held(self) -> FakeAdopted:
        staged = self

        class Adopted(FakeAdopted):
            def commit(self) -> None:
                staged.events.append("commit")

            def abandon(self) -> None:
                staged.events.append("abandon")

        return Adopted({"id": self.ident, "waiting": self.waiting}, 0, self._case)

    def abandonAhead(self) -> None:
        if not self.restoredAhead:
            return
        self.restoredAhead = False
        self.events.append("abandon ahead")
        if self.refuseAbandon is not None:
            raise ValueError(self.refuseAbandon)

    def rebuild(self) -> None:
        self.events.append("rebuild")

    def abandon(self) -> None:
        try:
            self.abandonAhead()
        except ValueError:
            pass
        self.events.append("abandon")


_CHANGED_AFTER_RESTORE_AHEAD = [
    "restore ahead",
    "update",
    "abandon ahead",
    "rebuild",
    "restore",
]
"""
What a staged connection restored ahead goes through when the freeze
brings a change of its state: the object restored ahead is abandoned, a
fresh one built and restored.
"""


class IncomingChannelTests(SynchronousTestCase):
    """
    L{IncomingChannel}: the successor adopts what it is handed, serves once
    the old process commits, and gives everything back if it goes away
    first.
    """

    def setUp(self) -> None:
        self.h = harness(self, listen=("tcp:8000", "tcp:8001"), inheritance="handed")
        self.host = self.h.host
        self.inheritance = FakeInheritance()
        self.adopted: list[FakeAdopted] = []
        self.adoptedListeners: list[tuple[Any, ...]] = []
        self.patch(_incoming, "adoptListener", self.adoptListener)
        self.patch(_incoming, "adoptEntry", self.adoptEntry)
        self.patch(_incoming, "deferToThreadPool", synchronousThreadPool)
        self.patch(_incoming, "receiveDescriptors", self.receiveDescriptors)
        self.old = FakeOutgoing()
        self.channel = IncomingChannel(self.host, self.inheritance)

    def connect(self) -> None:
        self.pump = connectAMP(self.old, self.channel, self.h.reactor)

    def adoptListener(
        self, reactor: Any, fd: int, factory: Any, *, accepting: bool
    ) -> RecordingPort:
        self.adoptedListeners.append((reactor, fd, factory, accepting))
        return RecordingPort(UNIXAddress("adopted"), fileno=fd, reading=accepting)

    def adoptEntry(self, host: Any, entry: Any, descriptor: int) -> FakeAdopted:
        if entry.get("refuse"):
            raise ValueError(entry["refuse"])
        adopted = FakeAdopted(entry, descriptor, self)
        self.adopted.append(adopted)
        return adopted

    def receiveDescriptors(self, sock: Any, count: int, *, timeout: float) -> list[int]:
        return [700 + n for n in range(count)]

    def call(self, command: Any, **arguments: Any) -> Deferred[Any]:
        """
        Send C{command} from the old side and deliver everything.

        @return: its outcome, caught before the answer arrives (AMP drops a
            connection whose error answer nobody handles at once).
        """
        outcome: Deferred[Any] = Deferred()
        self.old.callRemote(command, **arguments).chainDeferred(outcome)
        self.pump.flush()
        return outcome

    def adoptConnections(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        data = json.dumps(entries).encode()
        manifest = writeMemfd(data, "test-manifest")
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        bulk = theirs.detach()
        files = {fd: _identity(fd) for fd in (manifest, bulk)}
        answer: dict[str, Any] = self.successResultOf(
            self.call(
                AdoptConnections,
                count=len(entries),
                manifestSize=len(data),
                manifest=manifest,
                bulk=bulk,
            )
        )
        # Closed (the number may be open again, on a connection's socket).
        for fd, identity in files.items():
            self.assertNotEqual(_identity(fd), identity)
        return answer

    def handOver(self) -> None:
        """
        The old process hands over both listeners and two connections.
        """
        self.connect()
        for key in self.host.listeners:
            self.successResultOf(self.call(TakeListener, key=key, socket=900))
        answer = self.adoptConnections(
            [
                {"id": 1, "listener": "tcp:8000"},
                {"id": 2, "listener": "tcp:8001"},
            ]
        )
        self.assertEqual(answer, {"adopted": 2, "refusedCount": 0, "refused": "[]"})

    def test_hello(self) -> None:
        """
        The successor says hello at once with its process, protocol version
        and listeners.
        """
        self.connect()
        self.assertEqual(
            self.old.hellos,
            [
                {
                    "pid": os.getpid(),
                    "protocolVersion": HANDOFF_PROTOCOL_VERSION,
                    "listeners": ["tcp:8000", "tcp:8001"],
                }
            ],
        )
        self.assertEqual(self.channel.generation, 2)

    def test_helloRefused(self) -> None:
        """
        A successor the old process refuses closes the channel and gives up.
        """
        self.old.welcome = HandoffRefused("no")
        self.connect()
        self.assertEqual(self.h.stops, [True])

    def test_takeListener(self) -> None:
        """
        A listener handed over is adopted paused, on its listener's factory.
        """
        self.connect()
        self.successResultOf(self.call(TakeListener, key="tcp:8001", socket=900))
        [(reactor, fd, factory, accepting)] = self.adoptedListeners
        listener = self.host.listeners["tcp:8001"]
        self.assertEqual(
            (reactor, fd, factory, accepting),
            (self.h.reactor, 900, listener.factory, False),
        )
        self.assertIs(listener.port.fileno(), 900)  # type: ignore[union-attr]
        self.assertFalse(listener.port.reading)  # type: ignore[union-attr]

    def test_unknownListener(self) -> None:
        """
        A listener the new code does not have is refused, and its descriptor
        closed.
        """
        self.connect()
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        failure = self.failureResultOf(
            self.call(TakeListener, key="tcp:9", socket=r), HandoffRefused
        )
        self.assertEqual(
            failure.getErrorMessage(), "no listener 'tcp:9' in the new code"
        )
        with self.assertRaises(OSError):
            os.fstat(r)

    def test_adoptConnectionsArrivedAlready(self) -> None:
        """
        Descriptors that arrived with (before) the command are received
        without a thread.
        """
        self.connect()

        def noThread(*a: Any, **kw: Any) -> None:
            self.fail("a thread was asked for")

        self.patch(_incoming, "deferToThreadPool", noThread)
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        entries = [{"id": 1, "listener": "tcp:8000"}]
        data = json.dumps(entries).encode()
        manifest = writeMemfd(data, "test-manifest")
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        sendDescriptors(ours, [readEnd], timeout=5)
        answer = self.successResultOf(
            self.call(
                AdoptConnections,
                count=1,
                manifestSize=len(data),
                manifest=manifest,
                bulk=theirs.detach(),
            )
        )
        self.assertEqual(answer["adopted"], 1)
        [adopted] = self.adopted
        self.addCleanup(os.close, adopted.descriptor)
        self.assertEqual(os.fstat(adopted.descriptor).st_ino, os.fstat(readEnd).st_ino)

    def test_adoptConnections(self) -> None:
        """
        Connections are adopted from the manifest, each with its descriptor;
        those the new code refuses are reported with why.
        """
        self.connect()
        answer = self.adoptConnections(
            [
                {"id": 1, "listener": "tcp:8000"},
                {"id": 2, "listener": "tcp:8000", "refuse": "not migratable"},
                {"id": 3, "listener": "tcp:8001"},
            ]
        )
        self.assertEqual((answer["adopted"], answer["refusedCount"]), (2, 1))
        self.assertEqual(
            json.loads(answer["refused"]), [{"id": 2, "reason": "not migratable"}]
        )
        self.assertEqual(
            [(a.entry["id"], a.descriptor) for a in self.adopted], [(1, 700), (3, 702)]
        )
        self.flushLoggedErrors()

    def precopy(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """
        The old process hands over both listeners, then pre-copies
        C{entries}; each is staged as a L{FakeStaged}.

        @return: the answer.
        """
        answer: dict[str, Any] = self.successResultOf(self.startPrecopy(entries))
        return answer

    def startPrecopy(self, entries: list[dict[str, Any]]) -> Deferred[Any]:
        """
        As L{precopy}, without waiting for the answer.

        @return: a L{Deferred} firing with the answer.
        """
        self.connect()
        for key in self.host.listeners:
            self.successResultOf(self.call(TakeListener, key=key, socket=900))
        self.staged: dict[int, FakeStaged] = {}
        self.restored: list[int] = []
        self.freezeListened: list[int] = []

        def stageEntry(host: Any, entry: Any, descriptor: int) -> FakeStaged:
            if entry.get("refuse"):
                raise ValueError(entry["refuse"])
            if entry.get("reset"):
                raise OSError(errno.ENOTCONN, "reset")
            staged = self.staged[entry["id"]] = FakeStaged(entry, self.restored, self)
            return staged

        def listenForFreeze(reactor: Any, fd: int, commit: Any, part: Any) -> Any:
            self.freezeListened.append(fd)
            return commit

        self.patch(_incoming, "stageEntry", stageEntry)
        self.patch(_incoming, "listenForFreeze", listenForFreeze)
        data = json.dumps(entries).encode()
        manifest = writeMemfd(data, "test-manifest")
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        freezeOurs, freezeTheirs = socket.socketpair()
        self.addCleanup(freezeOurs.close)
        freeze = freezeTheirs.detach()
        answer = self.call(
            PrecopyConnections,
            count=len(entries),
            manifestSize=len(data),
            manifest=manifest,
            bulk=theirs.detach(),
            freeze=freeze,
        )
        self.assertEqual(self.freezeListened, [freeze])
        with self.assertRaises(OSError):
            os.fstat(freeze)
        # The pre-copy froze the heap until every connection is served, or
        # the hand-off ends without: not all tests go that far.
        self.addCleanup(self.channel._thawHeap)
        return answer

    def test_precopyThenFreeze(self) -> None:
        """
        Pre-copied connections are staged, not restored; at the freeze the
        successor drops what the old process withdrew, updates what
        changed, restores every staged connection (the changed first),
        serves, and answers with its process id.  Those whose clients
        wait (L{servingOrder}) are served at once, the others after a whole
        reactor turn (the waiting ones read before any of them is resumed).
        """
        answer = self.precopy(
            [
                {"id": 1, "listener": "tcp:8000"},
                {"id": 2, "listener": "tcp:8001", "waiting": True},
                {"id": 3, "listener": "tcp:8000"},
            ]
        )
        self.assertEqual(
            answer,
            {
                "staged": 3,
                "refusedCount": 0,
                "refused": "[]",
                "streamed": True,
                "appStateOnly": True,
            },
        )
        self.assertEqual(self.restored, [])
        self.assertFalse(self.host.serving)
        change = {"id": 2, "output": ""}
        answers: list[Any] = []

        def answerNow(answer: Any) -> None:
            # Said before any connection serves.
            answers.append(answer)
            self.staged[2].events.append("answered")

        answer = self.channel._freezeCommit(
            {"changes": [change], "withdrawn": [3]}, answerNow
        )
        self.assertEqual(answer, {"pid": os.getpid()})
        self.assertEqual(answers, [answer])
        self.assertTrue(self.host.serving)
        self.assertEqual(self.restored, [2, 1])
        self.assertEqual(self.staged[2].updates, [change])
        self.assertEqual(self.staged[3].events, ["abandon"])
        self.assertEqual(
            self.staged[2].events, ["update", "restore", "answered", "commit"]
        )
        self.assertEqual(self.staged[1].events, ["restore"])
        # The waiting ones have a reactor turn (a poll) to themselves first:
        # the reactor's next turn runs the call due now, and only the one
        # after runs what that call schedules (a Clock would run both).
        [nextTurn] = self.h.reactor.getDelayedCalls()
        assert isinstance(nextTurn, DelayedCall)
        call, args = nextTurn.func, nextTurn.args
        nextTurn.cancel()
        call(*args)
        self.assertEqual(self.staged[1].events, ["restore"])
        # The staged copies are freed, and the heap thaws, as the last of
        # them is served.
        self.assertFalse(self.channel._heapThawed.called)
        self.h.reactor.advance(0)
        self.assertEqual(self.staged[1].events, ["restore", "commit"])
        self.assertEqual(self.channel._spent, [])
        self.assertTrue(self.channel._heapThawed.called)

    def test_waitingServedFirst(self) -> None:
        """
        At the freeze, of the connections that changed since the pre-copy,
        those whose clients wait (by L{servingOrder}) are served at once;
        the others, and those untouched since their copy (not asked, waiting
        or not), after a whole reactor turn.
        """
        self.precopy(
            [
                {"id": 1, "listener": "tcp:8000", "abandons": True},
                {"id": 2, "listener": "tcp:8000", "abandons": True, "waiting": True},
                {"id": 3, "listener": "tcp:8000"},
                {"id": 4, "listener": "tcp:8000", "waiting": True},
            ]
        )
        changes = [{"id": 3, "output": ""}, {"id": 4, "output": ""}]
        self.channel._freezeCommit(
            {"changes": changes, "withdrawn": []}, lambda a: None
        )
        self.assertTrue(self.host.serving)
        served = [n for n, each in self.staged.items() if "commit" in each.events]
        self.assertEqual(served, [4])
        [nextTurn] = self.h.reactor.getDelayedCalls()
        assert isinstance(nextTurn, DelayedCall)
        call, args = nextTurn.func, nextTurn.args
        nextTurn.cancel()
        call(*args)
        served = [n for n, each in self.staged.items() if "commit" in each.events]
        self.assertEqual(served, [4])
        self.h.reactor.advance(0)
        self.assertEqual(
            [each.events.count("commit") for each in self.staged.values()],
            [1, 1, 1, 1],
        )

    def test_streamedFreeze(self) -> None:
        """
        The successor says it takes the freeze in parts.  A part restores
        the connections it covers (up to its C{upTo}, those that changed
        first) and serves nothing; the last restores the rest, commits and
        answers: the waiting ones of every part are served at once, the
        others in the slices after.
        """
        answer = self.precopy(
            [
                {"id": n, "listener": "tcp:8000", "waiting": n in (2, 4)}
                for n in range(1, 5)
            ]
        )
        self.assertIs(answer["streamed"], True)
        self.channel._freezePart(
            {
                "changes": [{"id": 2, "output": ""}],
                "withdrawn": [],
                "more": True,
                "upTo": 2,
            }
        )
        self.assertEqual(self.restored, [2, 1])
        self.assertFalse(self.host.serving)
        answer = self.channel._freezeCommit(
            {"changes": [{"id": 4, "output": ""}], "withdrawn": [3]}, lambda a: None
        )
        self.assertEqual(answer, {"pid": os.getpid()})
        self.assertTrue(self.host.serving)
        self.assertEqual(self.restored, [2, 1, 4])
        self.assertEqual(self.staged[3].events, ["abandon"])
        self.assertEqual(self.staged[2].events, ["update", "restore", "commit"])
        self.assertEqual(self.staged[4].events, ["update", "restore", "commit"])
        self.assertEqual(self.staged[1].events, ["restore"])

    def test_streamedFreezeRefused(self) -> None:
        """
        A change for a connection an earlier part restored refuses the
        freeze: every staged connection, restored or not, is abandoned,
        nothing serves, and the heap thaws.
        """
        self.precopy([{"id": n, "listener": "tcp:8000"} for n in (1, 2, 3)])
        self.channel._freezePart(
            {"changes": [], "withdrawn": [], "more": True, "upTo": 1}
        )
        error = self.assertRaises(
            HandoffRefused,
            self.channel._freezeCommit,
            {"changes": [{"id": 1, "output": ""}], "withdrawn": []},
            self.fail,
        )
        self.assertIn("restored already", str(error))
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore", "abandon"], ["abandon"], ["abandon"]],
        )
        self.assertFalse(self.host.serving)
        self.assertTrue(self.channel._heapThawed.called)

    def test_streamedFreezePartRefused(self) -> None:
        """
        A connection the new code refuses in a part refuses the freeze at
        once, naming it: every staged connection is abandoned.
        """
        self.precopy([{"id": n, "listener": "tcp:8000"} for n in (1, 2)])
        self.staged[2].refuse = "version 9 is unknown"
        error = self.assertRaises(
            HandoffRefused,
            self.channel._freezePart,
            {"changes": [], "withdrawn": [], "more": True, "upTo": 2},
        )
        self.assertEqual(getattr(error, "ident"), 2)
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore", "abandon"], ["abandon"]],
        )
        self.assertFalse(self.host.serving)

    def test_freezeRefusedRestore(self) -> None:
        """
        A state the new code refuses at the freeze refuses the commit,
        naming the connection; every staged connection is abandoned and
        nothing serves.
        """
        self.precopy(
            [{"id": 1, "listener": "tcp:8000"}, {"id": 2, "listener": "tcp:8000"}]
        )
        self.staged[2].refuse = "version 9 is unknown"
        error = self.assertRaises(
            HandoffRefused,
            self.channel._freezeCommit,
            {"changes": [], "withdrawn": []},
            self.fail,
        )
        self.assertEqual(
            str(error), "the new code refused connection 2: version 9 is unknown"
        )
        self.assertEqual(getattr(error, "ident"), 2)
        self.assertEqual(self.staged[1].events, ["restore", "abandon"])
        self.assertEqual(self.staged[2].events, ["abandon"])
        self.assertFalse(self.host.serving)
        self.assertTrue(self.channel._heapThawed.called)

    def test_freezeMalformed(self) -> None:
        """
        A malformed delta, or a change for a connection that was never
        staged, is refused and abandons everything.
        """
        self.precopy([{"id": 1, "listener": "tcp:8000"}])
        self.assertRaises(
            HandoffRefused,
            self.channel._freezeCommit,
            {"changes": [{"id": 7}], "withdrawn": []},
            self.fail,
        )
        self.assertEqual(self.staged[1].events, ["abandon"])
        delta: Any
        for delta in (
            [],
            {"changes": {}, "withdrawn": []},
            {"changes": [{"id": "1"}], "withdrawn": []},
            {"changes": [], "withdrawn": None},
            {"changes": [{"id": 1}, {"id": 1}], "withdrawn": []},
        ):
            self.assertRaises(
                HandoffRefused, self.channel._freezeCommit, delta, self.fail
            )
        self.assertFalse(self.host.serving)

    def test_precopyRefusals(self) -> None:
        """
        A connection the new code refuses is counted and described (the old
        process then rolls everything back); one whose client reset it
        meanwhile is not a refusal, and a change for it at the freeze is
        ignored.
        """
        answer = self.precopy(
            [
                {"id": 1, "listener": "tcp:8000", "refuse": "not migratable"},
                {"id": 2, "listener": "tcp:8000", "reset": True},
                {"id": 3, "listener": "tcp:8000"},
            ]
        )
        self.assertEqual((answer["staged"], answer["refusedCount"]), (1, 1))
        self.assertEqual(
            json.loads(answer["refused"]), [{"id": 1, "reason": "not migratable"}]
        )
        answer = self.channel._freezeCommit(
            {"changes": [{"id": 2, "output": ""}], "withdrawn": []}, lambda a: None
        )
        self.assertEqual(answer, {"pid": os.getpid()})
        self.assertEqual(self.restored, [3])
        self.flushLoggedErrors()

    def test_lostBeforeFreeze(self) -> None:
        """
        If the old process goes away after the pre-copy, before the freeze,
        every staged connection is abandoned: the old process keeps them.
        """
        self.precopy(
            [{"id": 1, "listener": "tcp:8000"}, {"id": 2, "listener": "tcp:8001"}]
        )
        self.pump.serverIO.loseConnection()
        self.pump.flush()
        self.assertEqual(
            [each.events for each in self.staged.values()], [["abandon"], ["abandon"]]
        )
        self.assertEqual(self.h.stops, [True])
        self.assertFalse(self.host.serving)
        self.assertTrue(self.channel._heapThawed.called)

    def test_restoredAheadOnce(self) -> None:
        """
        A staged connection whose new protocol can abandon a restore
        (its class defines C{abandonMigrationState}) is restored ahead of
        the freeze, before the pre-copy is answered; at the freeze, if it
        did not change, it is served as it is, not restored again.  The
        others are restored at the freeze, as before.
        """
        answer = self.precopy(
            [
                {"id": 1, "listener": "tcp:8000", "abandons": True},
                {"id": 2, "listener": "tcp:8000"},
                {"id": 3, "listener": "tcp:8001", "abandons": True},
            ]
        )
        self.assertEqual(answer["staged"], 3)
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore ahead"], [], ["restore ahead"]],
        )
        self.assertFalse(self.host.serving)
        answer = self.channel._freezeCommit(
            {"changes": [], "withdrawn": []}, lambda a: None
        )
        self.assertEqual(answer, {"pid": os.getpid()})
        self.assertEqual(self.restored, [2])
        self.h.reactor.advance(0)
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [
                ["restore ahead", "commit"],
                ["restore", "commit"],
                ["restore ahead", "commit"],
            ],
        )
        self.assertTrue(self.channel._heapThawed.called)

    def test_restoredAheadChanged(self) -> None:
        """
        A connection restored ahead whose state changed since the pre-copy
        has its object restored ahead abandoned, a fresh protocol attached
        and restored from the new state, and is served at once with the
        other changed ones; one whose only change is output to send keeps
        its object restored ahead.
        """
        self.precopy(
            [
                {"id": n, "listener": "tcp:8000", "abandons": True, "waiting": n < 3}
                for n in (1, 2, 3)
            ]
        )
        stateChange = {"id": 1, "output": "", "state": {"n": 2}}
        outputChange = {"id": 2, "output": "aGk="}
        answers: list[Any] = []

        def answerNow(answer: Any) -> None:
            answers.append(answer)
            for each in self.staged.values():
                each.events.append("answered")

        self.channel._freezeCommit(
            {"changes": [stateChange, outputChange], "withdrawn": []}, answerNow
        )
        self.assertEqual(answers, [{"pid": os.getpid()}])
        self.assertEqual(self.staged[1].updates, [stateChange])
        self.assertEqual(self.staged[2].updates, [outputChange])
        self.assertEqual(self.restored, [1])
        self.assertEqual(
            self.staged[1].events, _CHANGED_AFTER_RESTORE_AHEAD + ["answered", "commit"]
        )
        self.assertEqual(
            self.staged[2].events, ["restore ahead", "update", "answered", "commit"]
        )
        self.assertEqual(self.staged[3].events, ["restore ahead", "answered"])
        self.h.reactor.advance(0)
        self.assertEqual(self.staged[3].events, ["restore ahead", "answered", "commit"])

    def test_restoredAheadApplicationStateChanged(self) -> None:
        """
        A connection restored ahead of which only the application state
        changed (the change carries C{"appState"} alone) has its object
        restored ahead abandoned and a fresh one restored, as for a whole
        new state.
        """
        self.precopy(
            [
                {"id": n, "listener": "tcp:8000", "abandons": True, "waiting": n == 1}
                for n in (1, 2)
            ]
        )
        change = {"id": 1, "output": "", "appState": {"n": 2}}
        self.channel._freezeCommit(
            {"changes": [change], "withdrawn": []}, lambda answer: None
        )
        self.assertEqual(self.staged[1].updates, [change])
        self.assertEqual(self.restored, [1])
        self.assertEqual(
            self.staged[1].events, _CHANGED_AFTER_RESTORE_AHEAD + ["commit"]
        )
        self.assertEqual(self.staged[2].events, ["restore ahead"])

    def test_restoredAheadWithdrawn(self) -> None:
        """
        A connection restored ahead that the old process withdraws at the
        freeze has its object restored ahead abandoned, and is given back.
        """
        self.precopy(
            [{"id": n, "listener": "tcp:8000", "abandons": True} for n in (1, 2)]
        )
        self.channel._freezeCommit({"changes": [], "withdrawn": [1]}, lambda a: None)
        self.assertEqual(
            self.staged[1].events, ["restore ahead", "abandon ahead", "abandon"]
        )
        self.h.reactor.advance(0)
        self.assertEqual(self.staged[2].events, ["restore ahead", "commit"])
        self.assertTrue(self.host.serving)

    def test_restoreAheadRefused(self) -> None:
        """
        A restore ahead the new code refuses is a refusal of the pre-copy
        (all or nothing): every staged connection is given back, each
        object restored ahead abandoned first, and a freeze that came all
        the same is refused; nothing serves.
        """
        answer = self.precopy(
            [
                {"id": 1, "listener": "tcp:8000", "abandons": True},
                {
                    "id": 2,
                    "listener": "tcp:8000",
                    "abandons": True,
                    "refuseAhead": "version 9 is unknown",
                },
                {"id": 3, "listener": "tcp:8000", "abandons": True},
                {"id": 4, "listener": "tcp:8000"},
            ]
        )
        self.assertEqual(answer["refusedCount"], 1)
        self.assertEqual(
            json.loads(answer["refused"]), [{"id": 2, "reason": "version 9 is unknown"}]
        )
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [
                ["restore ahead", "abandon ahead", "abandon"],
                ["abandon"],
                ["abandon"],
                ["abandon"],
            ],
        )
        self.assertFreezeRefused("the new code refused connection 2")

    def test_abandonAheadFails(self) -> None:
        """
        An C{abandonMigrationState} that raises at the freeze refuses the
        hand-off, saying so: every staged connection is given back and
        nothing serves.
        """
        self.precopy(
            [{"id": n, "listener": "tcp:8000", "abandons": True} for n in (1, 2)]
        )
        self.staged[1].refuseAbandon = "the room is gone"
        with capturedLogs() as events:
            error = self.assertRaises(
                HandoffRefused,
                self.channel._freezeCommit,
                {"changes": [{"id": 1, "output": "", "state": {}}], "withdrawn": []},
                self.fail,
            )
        self.assertEqual(
            str(error),
            "the new code failed to abandon the object restored ahead of the freeze "
            "for connection 1 (changed since the pre-copy): abandonMigrationState "
            "raised the room is gone",
        )
        self.assertIsNone(getattr(error, "ident", None))
        self.assertIn(
            "The new code failed to abandon connection 1, restored ahead of the freeze",
            [formatEvent(event) for event in events],
        )
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [
                ["restore ahead", "update", "abandon ahead", "abandon"],
                ["restore ahead", "abandon ahead", "abandon"],
            ],
        )
        self.assertFalse(self.host.serving)
        self.assertTrue(self.channel._heapThawed.called)
        self.flushLoggedErrors()

    def test_restoreAheadInSlices(self) -> None:
        """
        Restores ahead run a slice per turn of the successor's reactor; the
        pre-copy is answered once they are all done.  If the old process
        goes away meanwhile, every staged connection is given back (each
        object restored ahead abandoned) and no more is restored.
        """
        self.patch(_incoming, "_AHEAD_SLICE", 2)
        turns: list[Deferred[None]] = []

        def deferLater(reactor: Any, delay: float, f: Any) -> Deferred[None]:
            # The next turn of the reactor, when the test says so.
            self.assertEqual((reactor, delay), (self.h.reactor, 0))
            turn: Deferred[None] = Deferred()
            turns.append(turn)
            return turn

        self.patch(_incoming, "deferLater", deferLater)
        entries = [
            {"id": n, "listener": "tcp:8000", "abandons": True} for n in range(1, 6)
        ]
        answer = self.startPrecopy(entries)
        self.assertNoResult(answer)
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore ahead"]] * 2 + [[]] * 3,
        )
        turns.pop().callback(None)
        self.assertNoResult(answer)
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore ahead"]] * 4 + [[]],
        )
        self.pump.serverIO.loseConnection()
        self.pump.flush()
        turns.pop().callback(None)
        self.assertEqual(turns, [])
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore ahead", "abandon ahead", "abandon"]] * 4 + [["abandon"]],
        )
        self.assertFalse(self.host.serving)
        self.assertEqual(self.h.stops, [True])
        self.failureResultOf(answer)

    def assertFreezeRefused(self, reason: str) -> None:
        """
        The freeze that follows a refusal is refused, with C{reason}, and
        nothing serves.
        """
        error = self.assertRaises(
            HandoffRefused,
            self.channel._freezeCommit,
            {"changes": [], "withdrawn": []},
            self.fail,
        )
        self.assertEqual(str(error), reason)
        self.assertFalse(self.host.serving)
        self.flushLoggedErrors()

    def recopy(self, entries: list[dict[str, Any]]) -> Deferred[Any]:
        """
        The old process sends a re-copy of C{entries}.

        @return: a L{Deferred} firing with the answer.
        """
        data = json.dumps(entries).encode()
        manifest = writeMemfd(data, "test-recopy")
        answer = self.call(
            RecopyConnections,
            count=len(entries),
            manifestSize=len(data),
            manifest=manifest,
        )
        with self.assertRaises(OSError):
            os.fstat(manifest)
        return answer

    def test_recopy(self) -> None:
        """
        A re-copy updates the state of each connection it names: one
        restored ahead of the freeze has that object abandoned and a fresh
        protocol attached, not restored ahead again (it is active: it would
        most likely change again); one that was not is only updated.  At
        the freeze, neither changed since: both are restored from the
        re-copied state, and the one not re-copied is served as restored
        ahead.
        """
        self.precopy(
            [
                {"id": 1, "listener": "tcp:8000", "abandons": True},
                {"id": 2, "listener": "tcp:8000"},
                {"id": 3, "listener": "tcp:8000", "abandons": True},
            ]
        )
        answer = self.successResultOf(
            self.recopy([{"id": 1, "state": {"n": 1}}, {"id": 2, "state": {"n": 2}}])
        )
        self.assertEqual(answer, {"updated": 2, "refusedCount": 0, "refused": "[]"})
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [
                ["restore ahead", "update state", "abandon ahead", "rebuild"],
                ["update state"],
                ["restore ahead"],
            ],
        )
        self.assertEqual(
            [each.updates for each in self.staged.values()],
            [[{"n": 1}], [{"n": 2}], []],
        )
        self.assertFalse(self.host.serving)
        self.channel._freezeCommit({"changes": [], "withdrawn": []}, lambda a: None)
        self.assertEqual(self.restored, [1, 2])
        self.h.reactor.advance(0)
        self.assertEqual(
            [each.events[-2:] for each in self.staged.values()],
            [["restore", "commit"], ["restore", "commit"]]
            + [["restore ahead", "commit"]],
        )
        self.assertTrue(self.host.serving)

    def test_recopiedChangedAgain(self) -> None:
        """
        A connection re-copied (its object restored ahead let go of) that
        changed again by the freeze is updated and restored there, with no
        object to abandon while every client waits.
        """
        self.precopy([{"id": 1, "listener": "tcp:8000", "abandons": True}])
        self.successResultOf(self.recopy([{"id": 1, "state": {"n": 1}}]))
        self.channel._freezeCommit(
            {"changes": [{"id": 1, "state": {"n": 2}, "output": ""}], "withdrawn": []},
            lambda a: None,
        )
        self.h.reactor.advance(0)
        [staged] = self.staged.values()
        self.assertEqual(
            staged.events,
            [
                "restore ahead",
                "update state",
                "abandon ahead",
                "rebuild",
                "update",
                "restore",
                "commit",
            ],
        )
        self.assertTrue(self.host.serving)

    def test_recopyRefused(self) -> None:
        """
        A re-copied state the new code refuses (malformed) refuses the
        hand-off, all or nothing: every staged connection is given back,
        each object restored ahead abandoned, and the freeze that follows
        is refused; nothing serves.
        """
        self.precopy(
            [{"id": n, "listener": "tcp:8000", "abandons": True} for n in (1, 2, 3)]
        )
        answer = self.successResultOf(
            self.recopy([{"id": 1, "state": {}}, {"id": 2, "state": "refused"}])
        )
        self.assertEqual((answer["updated"], answer["refusedCount"]), (0, 1))
        self.assertEqual(
            json.loads(answer["refused"]),
            [{"id": 2, "reason": "bad re-copy of connection 2"}],
        )
        self.assertEqual(
            [each.events[-1] for each in self.staged.values()], ["abandon"] * 3
        )
        self.assertNotIn(
            "restore ahead", [each.events[-2] for each in self.staged.values()]
        )
        self.assertFreezeRefused("the new code refused connection 2")

    def test_recopyOfUnknownConnection(self) -> None:
        """
        A re-copy naming a connection that is not staged is refused, all or
        nothing.
        """
        self.precopy([{"id": 1, "listener": "tcp:8000"}])
        answer = self.successResultOf(self.recopy([{"id": 7, "state": {}}]))
        self.assertEqual(
            json.loads(answer["refused"]),
            [{"id": 7, "reason": "a re-copy of connection 7, which is not staged"}],
        )
        self.assertEqual(self.staged[1].events, ["abandon"])

    def test_recopyAfterTheFreezeBegan(self) -> None:
        """
        A re-copy once the freeze has begun (no old process sends one) is
        refused.
        """
        self.precopy(
            [{"id": 1, "listener": "tcp:8000"}, {"id": 2, "listener": "tcp:8000"}]
        )
        self.channel._freezePart(
            {"changes": [], "withdrawn": [], "more": True, "upTo": 1}
        )
        failure = self.failureResultOf(
            self.recopy([{"id": 2, "state": {}}]), HandoffRefused
        )
        self.assertEqual(
            failure.getErrorMessage(),
            "re-copy outside a pre-copy's wait for the freeze",
        )

    def test_freezeBeforeRestoresAheadDone(self) -> None:
        """
        A freeze that begins before the restores ahead are done (no old
        process sends it before the pre-copy's answer) stops them: it
        restores the rest itself, each connection once.
        """
        self.patch(_incoming, "_AHEAD_SLICE", 2)
        turns: list[Deferred[None]] = []

        def deferLater(reactor: Any, delay: float, f: Any) -> Deferred[None]:
            turn: Deferred[None] = Deferred()
            turns.append(turn)
            return turn

        self.patch(_incoming, "deferLater", deferLater)
        self.startPrecopy(
            [{"id": n, "listener": "tcp:8000", "abandons": True} for n in (1, 2, 3)]
        )
        self.channel._freezePart(
            {"changes": [], "withdrawn": [], "more": True, "upTo": 3}
        )
        turns.pop().callback(None)
        self.channel._freezeCommit({"changes": [], "withdrawn": []}, lambda a: None)
        self.h.reactor.advance(0)
        self.assertEqual(
            [each.events for each in self.staged.values()],
            [["restore ahead", "commit"]] * 2 + [["restore", "commit"]],
        )

    def test_plainCommitRefusedWhileStaged(self) -> None:
        """
        Connections staged by a pre-copy are committed by the freeze only:
        a plain C{Commit} is refused.
        """
        self.precopy([{"id": 1, "listener": "tcp:8000"}])
        failure = self.failureResultOf(self.call(Commit), HandoffRefused)
        self.assertEqual(
            failure.getErrorMessage(), "pre-copied connections wait for the freeze"
        )
        self.assertFalse(self.host.serving)

    def test_answerBounded(self) -> None:
        """
        However many connections are refused, the answer describes only the
        first few, with bounded reasons: AMP values are capped at 64 KiB.
        """
        self.connect()
        answer = self.adoptConnections(
            [
                {"id": n, "listener": "tcp:8000", "refuse": "x" * 2000}
                for n in range(1, 61)
            ]
        )
        self.assertEqual((answer["adopted"], answer["refusedCount"]), (0, 60))
        described = json.loads(answer["refused"])
        self.assertEqual([each["id"] for each in described], list(range(1, 21)))
        self.assertEqual({len(each["reason"]) for each in described}, {500})
        self.flushLoggedErrors()

    def test_badManifest(self) -> None:
        """
        A manifest that does not list as many connections as announced is
        refused, and both descriptors closed.
        """
        self.connect()
        data = b"[]"
        manifest = writeMemfd(data, "test-manifest")
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        bulk = theirs.detach()
        d = self.call(
            AdoptConnections, count=2, manifestSize=2, manifest=manifest, bulk=bulk
        )
        failure = self.failureResultOf(d, HandoffRefused)
        self.assertEqual(
            failure.getErrorMessage(), "manifest does not list 2 connections"
        )
        for fd in (manifest, bulk):
            with self.assertRaises(OSError):
                os.fstat(fd)

    def test_lostBeforeCommit(self) -> None:
        """
        If the old process goes away before committing, every adopted
        connection is abandoned (the old process resumes it) and the
        successor gives back its listeners and exits.
        """
        self.handOver()
        ports = [each.port for each in self.host.listeners.values()]
        self.pump.serverIO.loseConnection()
        self.pump.flush()
        self.assertEqual(
            [each.events for each in self.adopted], [["abandon"], ["abandon"]]
        )
        self.assertEqual(self.h.released, ports)
        self.assertEqual(self.h.stops, [True])
        self.assertEqual(self.inheritance.outputTaken, 0)
        self.assertFalse(self.host.serving)

    def test_commit(self) -> None:
        """
        C{Commit} makes the successor serve as the generation it was given:
        it takes over the output, resumes its listeners and the adopted
        connections, and answers with its process id.
        """
        self.handOver()
        answer = self.successResultOf(self.call(Commit))
        self.assertEqual(answer, {"pid": os.getpid()})
        self.assertEqual(self.inheritance.outputTaken, 1)
        self.assertTrue(self.host.serving)
        self.assertEqual(self.host.generation, 2)
        self.assertEqual(
            [each.port.reading for each in self.host.listeners.values()], [True, True]  # type: ignore[union-attr]
        )
        self.assertEqual(
            [each.events for each in self.adopted], [["commit"], ["commit"]]
        )

    def test_commitWaitingFirst(self) -> None:
        """
        Without a pre-copy too, C{Commit} serves at once the adopted
        connections whose clients wait (by L{servingOrder}), and the others
        after a whole reactor turn.
        """
        self.connect()
        for key in self.host.listeners:
            self.successResultOf(self.call(TakeListener, key=key, socket=900))
        self.adoptConnections(
            [
                {"id": 1, "listener": "tcp:8000"},
                {"id": 2, "listener": "tcp:8001", "waiting": True},
            ]
        )
        self.assertEqual(self.channel.commit(), {"pid": os.getpid()})
        self.assertEqual([each.events for each in self.adopted], [[], ["commit"]])
        [nextTurn] = self.h.reactor.getDelayedCalls()
        assert isinstance(nextTurn, DelayedCall)
        call, args = nextTurn.func, nextTurn.args
        nextTurn.cancel()
        call(*args)
        self.assertEqual([each.events for each in self.adopted], [[], ["commit"]])
        self.h.reactor.advance(0)
        self.assertEqual(
            [each.events for each in self.adopted], [["commit"], ["commit"]]
        )

    def test_commitFailsSaysWhy(self) -> None:
        """
        A successor that cannot serve after all (its pidfile cannot be
        written: a full disk) refuses the commit saying why, before any
        listener accepts, so the old process keeps everything.
        """
        self.handOver()
        self.host.settings = evolve(self.host.settings, pidfile="/nonexistent/x.pid")

        def full(path: str, pid: int) -> None:
            raise OSError(errno.EFBIG, "File too large")

        self.patch(_service, "writePidfile", full)
        failure = self.failureResultOf(self.call(Commit), HandoffRefused)
        self.assertEqual(
            failure.getErrorMessage(),
            "cannot serve: OSError: [Errno 27] File too large",
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(self.host.serving)
        self.assertEqual(
            [each.port.reading for each in self.host.listeners.values()],  # type: ignore[union-attr]
            [False, False],
        )
        self.assertEqual([each.events for each in self.adopted], [[], []])

    def test_commitAdoptedLater(self) -> None:
        """
        After the commit, connections adopted in a later batch are served
        at C{CommitAdopted}; an empty C{CommitAdopted} commits nothing.
        """
        self.handOver()
        self.successResultOf(self.call(Commit))
        self.assertEqual(
            self.successResultOf(self.call(CommitAdopted)), {"committed": 0}
        )
        answer = self.adoptConnections([{"id": 3, "listener": "tcp:8000"}])
        self.assertEqual(answer["adopted"], 1)
        self.assertEqual(self.adopted[-1].events, [])
        self.assertEqual(
            self.successResultOf(self.call(CommitAdopted)), {"committed": 1}
        )
        self.assertEqual(self.adopted[-1].events, ["commit"])

    def test_commitAdoptedBeforeCommit(self) -> None:
        """
        C{CommitAdopted} is refused before the commit.
        """
        self.handOver()
        self.failureResultOf(self.call(CommitAdopted)).trap(HandoffRefused)
        self.assertEqual([each.events for each in self.adopted], [[], []])

    def test_laterBatchAllOrNothing(self) -> None:
        """
        A later batch the successor cannot adopt whole is abandoned whole:
        the old process resumes it.
        """
        self.handOver()
        self.successResultOf(self.call(Commit))
        answer = self.adoptConnections(
            [
                {"id": 3, "listener": "tcp:8000"},
                {"id": 4, "listener": "tcp:8000", "refuse": "no"},
            ]
        )
        self.assertEqual((answer["adopted"], answer["refusedCount"]), (0, 1))
        self.assertEqual(self.adopted[-1].events, ["abandon"])
        self.assertEqual(
            self.successResultOf(self.call(CommitAdopted)), {"committed": 0}
        )

    def test_lostWithLaterBatch(self) -> None:
        """
        A later batch adopted but not committed when the channel closes is
        abandoned.
        """
        self.handOver()
        self.successResultOf(self.call(Commit))
        self.adoptConnections([{"id": 3, "listener": "tcp:8000"}])
        self.pump.serverIO.loseConnection()
        self.pump.flush()
        self.assertEqual(self.adopted[-1].events, ["abandon"])
        self.assertEqual(
            [each.events for each in self.adopted[:2]], [["commit"], ["commit"]]
        )

    def test_lostAfterCommit(self) -> None:
        """
        Once committed, the end of the channel only means the previous
        generation has ended: it is no longer listed as draining, and
        nothing is given back.
        """
        self.handOver()
        self.successResultOf(self.call(Commit))
        entry = {"generation": 1, "pid": 77, "connections": 3}
        self.old.callRemote(DrainStatus, draining=json.dumps([entry]))
        self.pump.flush()
        self.assertEqual(self.host.statusSnapshot()["draining"], [entry])
        self.pump.serverIO.loseConnection()
        self.pump.flush()
        self.assertEqual(self.host.statusSnapshot()["draining"], [])
        self.assertEqual(
            [each.events for each in self.adopted], [["commit"], ["commit"]]
        )
        self.assertEqual(self.h.released, [])
        self.assertEqual(self.h.stops, [])
        self.assertTrue(self.host.serving)

    def test_malformedDrainStatus(self) -> None:
        """
        A drain status that is not the expected JSON is ignored with a
        warning; the last good one stays.
        """
        self.handOver()
        self.successResultOf(self.call(Commit))
        entry = {"generation": 1, "pid": 77, "connections": 3}
        self.old.callRemote(DrainStatus, draining=json.dumps([entry]))
        self.pump.flush()
        bad = [
            "not json",
            '{"generation": 1}',
            '[{"generation": "one", "pid": 1, "connections": 0}]',
            "[{}]",
            "[1]",
        ]
        with capturedLogs() as events:
            for each in bad:
                self.old.callRemote(DrainStatus, draining=each)
                self.pump.flush()
        warnings = [
            e
            for e in events
            if e["log_format"].startswith("Ignoring a malformed drain status")
        ]
        self.assertEqual(len(warnings), len(bad))
        self.assertEqual(self.host.statusSnapshot()["draining"], [entry])

    def test_commitBeforeHello(self) -> None:
        """
        C{Commit} before the old process has answered hello is refused; the
        successor does not serve.
        """
        self.old.welcome = Deferred()
        self.connect()
        failure = self.failureResultOf(self.call(Commit), HandoffRefused)
        self.assertEqual(failure.getErrorMessage(), "commit before hello")
        self.assertFalse(self.host.serving)
        self.assertEqual(self.inheritance.outputTaken, 0)


class HandoffAMPTests(TestCase):
    """
    L{HandoffAMP} sends each box at once over a real Unix socketpair,
    unless a descriptor goes with it.
    """

    def channel(self) -> tuple[HandoffAMP, socket.socket]:
        """
        A L{HandoffAMP} on one end of a socketpair served by the reactor,
        and the other end, not read by anyone.
        """
        from twisted.internet import reactor

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(theirs.close)
        channel = HandoffAMP()
        transport = reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel)
        )
        ours.close()
        self.addCleanup(transport.abortConnection)
        theirs.setblocking(False)
        return channel, theirs

    def test_atOnce(self) -> None:
        """
        A command's box is on the socket when C{callRemote} returns, before
        the reactor runs again.
        """
        channel, theirs = self.channel()
        channel.callRemote(Prepare).addErrback(lambda failure: None)
        self.assertIn(b"Prepare", theirs.recv(65536))

    def test_descriptorGoesWithItsBox(self) -> None:
        """
        A box with a descriptor attached goes at once too, the descriptor
        with its bytes, before the reactor runs again.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        channel, theirs = self.channel()
        channel.callRemote(TakeListener, key="tcp:1", socket=readEnd).addErrback(
            lambda failure: None
        )
        data = b""
        received: list[int] = []
        while True:
            try:
                chunk, fds, _, _ = socket.recv_fds(theirs, 65536, 4)
            except BlockingIOError:
                break
            data += chunk
            received.extend(fds)
        for fd in received:
            self.addCleanup(os.close, fd)
        self.assertIn(b"TakeListener", data)
        [fd] = received
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(readEnd).st_ino)
