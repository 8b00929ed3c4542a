"""
Fakes shared by the unit tests of the host, the connection tracking and the
hand-off: a memory reactor with the few extra methods the host uses,
listening ports that record what is done to them, an application protocol
that records what it is told, a successor process the test ends, and an
in-memory AMP connection that carries descriptors.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorProcess,
    IUNIXTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from .._handoff._successor import SuccessorExit

__all__ = [
    "FakeReactor",
    "HostReactor",
    "FakeSuccessor",
    "RecordingFactory",
    "RecordingPort",
    "RecordingProtocol",
    "FakeThreadPool",
    "ThreadedFakeReactor",
    "connectAMP",
]


@implementer(IListeningPort)
class RecordingPort:
    """
    A listening port that records pausing, resuming and stopping, with the
    attributes L{migrate._handoff._listeners} reads (C{connected}, C{disconnecting},
    C{fileno}).

    @ivar reading: whether it accepts connections now.
    @ivar events: C{"startReading"}, C{"stopReading"}, C{"stopListening"}.
    """

    def __init__(self, address: Any, fileno: int = 1000, reading: bool = True) -> None:
        self.address = address
        self._fileno = fileno
        self.reading = reading
        self.connected = 1
        self.disconnecting = False
        self.events: list[str] = []

    def fileno(self) -> int:
        return self._fileno

    def startReading(self) -> None:
        self.events.append("startReading")
        self.reading = True

    def stopReading(self) -> None:
        self.events.append("stopReading")
        self.reading = False

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.events.append("stopListening")
        self.connected = 0
        self.reading = False

    def getHost(self) -> Any:
        return self.address


@implementer(IReactorProcess)
class HostReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that a host accepts (it checks, as it starts,
    that its reactor can start processes): starting one fails, as a test
    that needs a successor fakes it elsewhere.
    """

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a memory reactor starts no process")


class FakeReactor(HostReactor):
    """
    A L{MemoryReactorClock} whose TCP ports are L{RecordingPort}s (still
    recorded in C{tcpServers}), which runs C{callFromThread} calls at the
    next C{advance}, and has a thread pool to name (tests replace
    C{deferToThreadPool} where work would go to a thread).
    """

    def __init__(self) -> None:
        HostReactor.__init__(self)
        self.ports: list[RecordingPort] = []

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        MemoryReactorClock.listenTCP(self, port, factory, backlog, interface)
        recording = RecordingPort(
            IPv4Address("TCP", interface or "0.0.0.0", port),
            fileno=100 + len(self.ports),
        )
        self.ports.append(recording)
        return recording

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)

    def getThreadPool(self) -> Any:
        return None


class FakeThreadPool:
    """
    What migrate looks at in a reactor's thread pool
    (L{twisted.python.threadpool.ThreadPool}): the jobs its workers run.

    @ivar working: one entry per job running.
    """

    def __init__(self) -> None:
        self.working: list[str] = []


class ThreadedFakeReactor(FakeReactor):
    """
    A L{FakeReactor} with a thread pool whose jobs a test starts and
    finishes by hand (L{startJob}), and a queue of calls from threads
    (C{threadCallQueue}) that each C{advance} runs first, before the timed
    calls due, as a real reactor's C{runUntilCurrent} does.
    """

    def __init__(self) -> None:
        FakeReactor.__init__(self)
        self.threadpool = FakeThreadPool()
        self.threadCallQueue: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.threadCallQueue.append((f, args, kwargs))

    def startJob(self, name: str, deliver: Any) -> Callable[[Any], None]:
        """
        Start a job in the pool, as C{deferToThread} would.

        @param deliver: what the job's answer is handed to, in the reactor.

        @return: a callable taking the answer: the job ends, and its answer
            is queued for the reactor (C{callFromThread}), as a worker does.
        """
        self.threadpool.working.append(name)

        def finish(answer: Any) -> None:
            self.callFromThread(deliver, answer)
            self.threadpool.working.remove(name)

        return finish

    def advance(self, amount: float) -> None:
        queued, self.threadCallQueue[:] = list(self.threadCallQueue), []
        for f, args, kwargs in queued:
            f(*args, **kwargs)
        FakeReactor.advance(self, amount)


class RecordingProtocol(Protocol):
    """
    An application protocol that records what it is told.

    @ivar events: C{("connectionMade",)}, C{("dataReceived", data)},
        C{("connectionLost", reason)}.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connectionMade(self) -> None:
        self.events.append(("connectionMade",))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("dataReceived", data))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.events.append(("connectionLost", reason))


class RecordingFactory(Factory):
    """
    Builds L{RecordingProtocol}s, remembering each, or refuses (returns
    L{None}) while C{refuse} is set.
    """

    protocol = RecordingProtocol

    def __init__(self) -> None:
        self.built: list[RecordingProtocol] = []
        self.refuse = False

    def buildProtocol(self, addr: Any) -> Any:
        if self.refuse:
            return None
        protocol = RecordingProtocol()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class FakeSuccessor:
    """
    Stands in for L{migrate._handoff._successor.SuccessorProcess}: the test ends it
    (L{end}); C{kill} records the signal and, unless C{diesOnKill} is
    false, ends it as killed by C{SIGKILL}.  Its public surface is checked
    against the real class in C{migrate.test.test_handoff}.
    """

    def __init__(self, pid: int = 4242, tail: list[str] | None = None) -> None:
        self.pid = pid
        self.tail = list(tail or [])
        self.signals: list[str] = []
        self.diesOnKill = True
        self.status: SuccessorExit | None = None
        self._waiters: list[Deferred[SuccessorExit]] = []
        #: why it was brought forward, each time
        self.broughtForward: list[str] = []
        #: why it was sent back, each time
        self.sentBack: list[str] = []
        #: what was done to its priority, in order: C{("forward", why)}
        #: and C{("back", why)}
        self.priorities: list[tuple[str, str]] = []

    @property
    def exited(self) -> bool:
        return self.status is not None

    def whenEnded(self) -> Deferred[SuccessorExit]:
        if self.status is not None:
            d: Deferred[SuccessorExit] = Deferred()
            d.callback(self.status)
            return d
        waiter: Deferred[SuccessorExit] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter

    def logTail(self) -> list[str]:
        return list(self.tail)

    def kill(self) -> None:
        self._signal("KILL")

    def terminate(self) -> None:
        self._signal("TERM")

    def killNow(self, timeout: float) -> bool:
        self._signal("KILL")
        return self.exited

    def outputPipes(self) -> dict[int, int]:
        return {}

    def bringForward(self, why: str) -> None:
        self.broughtForward.append(why)
        self.priorities.append(("forward", why))

    def sendBack(self, why: str) -> None:
        self.sentBack.append(why)
        self.priorities.append(("back", why))

    def deliverOutput(self, childFD: int, data: bytes) -> None:
        self.tail.extend(data.decode("utf-8", "replace").splitlines())

    def _signal(self, name: str) -> None:
        if self.exited:
            return
        self.signals.append(name)
        if name == "KILL" and self.diesOnKill:
            self.end(SuccessorExit(exitCode=None, signal=9))

    def end(self, status: SuccessorExit) -> None:
        """
        The process ends with C{status}.
        """
        self.status = status
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(status)


@implementer(IUNIXTransport)
class _DescriptorTransport(iosim.FakeTransport):
    """
    An L{iosim.FakeTransport} that also carries descriptors: each one sent
    reaches the peer protocol at once (so before the bytes of the AMP box
    that names it, as on a real Unix socket), as the same number.

    @ivar sent: every descriptor sent, in order.
    """

    peer: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        iosim.FakeTransport.__init__(self, *args, **kwargs)
        self.sent: list[int] = []

    def sendFileDescriptor(self, descriptor: int) -> None:
        self.sent.append(descriptor)
        self.peer.fileDescriptorReceived(descriptor)


def connectAMP(
    server: Any, client: Any, clock: Any, greet: bool = True
) -> iosim.IOPump:
    """
    Connect two AMP protocols in memory over transports that carry
    descriptors; pumping also runs C{clock}'s due calls.

    @return: the pump.
    """
    serverTransport = _DescriptorTransport(server, isServer=True)
    clientTransport = _DescriptorTransport(client, isServer=False)
    serverTransport.peer = client
    clientTransport.peer = server
    pump: iosim.IOPump = iosim.connect(
        server, serverTransport, client, clientTransport, greet=greet, clock=clock
    )
    return pump
