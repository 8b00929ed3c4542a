"""
The benchmark's load generator: long-lived clients that exchange numbered
lines with a line server at a steady pace, plus a steady rate of new short
connections, all on loopback, with every outcome counted.

A long-lived client (L{LongLivedClient}) sends C{NUMBER\\n} and expects
one reply line per request, in order, whose first word is the same number;
a reply may go on with the answering process's id and a running count (as
L{migrate.bench._app} does), which the client uses to tell which process
served it and whether the connection's state survived.  A plain echo server
works too.  From the numbers the client knows which requests went
unanswered (lost) and which were answered twice (duplicated), and how long
each answer took (latency; the longest one is the longest stall a user
saw).  Latency runs from the request's send to its answer's arrival at
the client's socket, as the kernel stamped it (L{migrate.bench._arrival}),
not to the generator's reading it: one process plays all the clients, and
its own queue of answers to read is not the server's stall.  The latency
to the reading is kept beside it.

A short client (L{ShortClient}) connects, sends one line, waits for one
reply and closes: it ends as answered, refused, reset (closed cleanly or
reset before answering) or timed out.

Everything runs on the injected reactor, in bounded loops: one ticker
(C{LoopingCall}) paces all requests and new connections.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, deque
from typing import Any, Callable, Iterable, Sequence

from attrs import define, field
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from .._handoff._transport import writeNow
from ._arrival import stampArrivals

__all__ = [
    "LoadGenerator",
    "LongLivedClient",
    "ShortClient",
    "Samples",
    "percentile",
    "summarize",
]

MAX_OUTSTANDING = 10000
"""
A long-lived client with this many unanswered requests skips its turn
(bounds memory if the server stops answering altogether).
"""


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """
    The nearest-rank percentile of sorted values.

    @param ordered: values sorted in increasing order, at least one.
    @param fraction: between 0 and 1 (0.99 for p99).
    """
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """
    Count, p50, p99 and maximum of C{values} (L{None} for an empty set).
    """
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 0.50),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
    }


@define
class Samples:
    """
    Latency samples: when each request was sent and how long its answer
    took, in the order answers arrived.
    """

    sent: array = field(factory=lambda: array("d"))
    latency: array = field(factory=lambda: array("d"))

    def add(self, sentAt: float, latency: float) -> None:
        self.sent.append(sentAt)
        self.latency.append(latency)

    def __len__(self) -> int:
        return len(self.sent)

    def within(self, start: float | None, end: float | None) -> list[float]:
        """
        The latencies of requests sent in [C{start}, C{end}) (L{None}: no
        bound).
        """
        return [
            latency
            for sentAt, latency in zip(self.sent, self.latency)
            if (start is None or sentAt >= start) and (end is None or sentAt < end)
        ]

    def longest(self, start: float, end: float) -> tuple[float, float] | None:
        """
        When the slowest request sent in [C{start}, C{end}) was sent, and
        how long its answer took; L{None} if none was sent then.
        """
        found: tuple[float, float] | None = None
        for sentAt, latency in zip(self.sent, self.latency):
            if start <= sentAt < end and (found is None or latency > found[1]):
                found = (sentAt, latency)
        return found

    def bins(self, origin: float, width: float) -> dict[int, list[float]]:
        """
        The latencies grouped by the C{width}-second bin (counted from
        C{origin}) in which their answer arrived.
        """
        grouped: dict[int, list[float]] = {}
        for sentAt, latency in zip(self.sent, self.latency):
            index = int((sentAt + latency - origin) // width)
            grouped.setdefault(index, []).append(latency)
        return grouped


def _classify(reason: Failure) -> str:
    """
    Name what ended a connection attempt or a connection early.
    """
    if reason.check(error.ConnectionRefusedError):
        return "refused"
    if reason.check(error.TimeoutError, error.TCPTimedOutError):
        return "timedOut"
    if reason.check(error.ConnectionDone):
        return "closed"
    if reason.check(error.ConnectionLost, error.ConnectionAborted):
        return "reset"
    return "other"


class LongLivedClient(LineReceiver):
    """
    One long-lived connection of a L{LoadGenerator}.

    Its paths per request (L{request}, L{dataReceived}, L{lineReceived})
    are written for the generator's own cost: at 20,000 requests a second
    the generator shares the machine's CPUs with the server it measures,
    and every microsecond it spends per line is queueing added to the
    latencies it reports.

    @ivar pending: unanswered requests, oldest first: (number, time sent,
        bytes sent).
    @ivar server: the process (second word of the replies) that answered
        last, if replies name one.
    @ivar lost: why the connection ended early, or L{None} while it lives
        (and after the generator closed it on purpose).
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(
        self,
        load: "LoadGenerator",
        whenConnected: Deferred["LongLivedClient | None"] | None = None,
    ) -> None:
        self.load = load
        self.whenConnected = whenConnected
        self.nextNumber = 0
        self.pending: deque[tuple[int, float, int]] = deque()
        self.server: bytes | None = None
        self.lastCount: int | None = None
        self.lost: str | None = None
        self.closing = False
        self.ended: Deferred[None] = Deferred()
        self.arrivedAt: float | None = None
        self._partial = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.load.noDelay:
            transport.setTcpNoDelay(True)
        if self.load.kernelStamps:
            stampArrivals(transport, self._arrived)
        self.load._connected(self)

    def _arrived(self, when: float | None) -> None:
        self.arrivedAt = when

    def request(self, now: float) -> None:
        """
        Send the next numbered request.
        """
        pending = self.pending
        transport = self.transport
        if len(pending) >= MAX_OUTSTANDING or transport is None:
            self.load.skipped += 1
            return
        number = self.nextNumber
        line = b"%d\n" % (number,)
        pending.append((number, now, len(line)))
        self.nextNumber = number + 1
        # Send it straight away when nothing else waits to go out: one
        # send() instead of the reactor's write path (register for writing,
        # write, unregister), which would cost the generator a core of its
        # own at 20,000 requests a second (writeNow).
        writeNow(transport, line)
        self.load.sent += 1

    def dataReceived(self, data: bytes) -> None:
        """
        Split C{data} into lines as L{LineReceiver} does (a line longer
        than C{MAX_LENGTH} calls L{lineLengthExceeded} and ends the
        delivery), with less work per line: replies are short and come one
        or a few at a time.
        """
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        maxLength = self.MAX_LENGTH
        lineReceived = self.lineReceived
        for line in lines:
            if len(line) > maxLength:
                self._partial = b""
                self.lineLengthExceeded(line)
                return
            lineReceived(line)
            transport: Any = self.transport
            if transport is None or transport.disconnecting:
                return
        if len(self._partial) > maxLength:
            line, self._partial = self._partial, b""
            self.lineLengthExceeded(line)

    def lineReceived(self, line: bytes) -> None:
        load = self.load
        now = load.clock.seconds()
        fields = line.split()
        try:
            number = int(fields[0])
        except (IndexError, ValueError):
            load.malformed += 1
            return
        pending = self.pending
        # Requests older than this answer were never answered: lost.
        while pending and pending[0][0] < number:
            load._lostRequest(pending.popleft()[2])
        if pending and pending[0][0] == number:
            sentAt = pending.popleft()[1]
            arrivedAt = self.arrivedAt
            samples = load.samples
            samples.sent.append(sentAt)
            samples.latency.append((now if arrivedAt is None else arrivedAt) - sentAt)
            samples = load.readSamples
            samples.sent.append(sentAt)
            samples.latency.append(now - sentAt)
            load.answered += 1
        else:
            load.duplicatedLines += 1
            load.duplicatedBytes += len(line) + 1
        if len(fields) > 1:
            self.server = fields[1]
            if len(fields) > 2:
                try:
                    count = int(fields[2])
                except ValueError:
                    return
                lastCount = self.lastCount
                if lastCount is not None and count != lastCount + 1:
                    load.stateErrors += 1
                self.lastCount = count

    def lineLengthExceeded(self, line: bytes) -> Any:
        self.load.malformed += 1
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.load._disconnected(self, reason)
        if not self.ended.called:
            self.ended.callback(None)


class ShortClient(LineReceiver):
    """
    One short connection: send one line, wait for one reply, close.
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, factory: "_ShortFactory") -> None:
        self.attempt = factory

    def connectionMade(self) -> None:
        self.sendLine(b"0")

    def lineReceived(self, line: bytes) -> None:
        self.attempt.finish("answered")
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.attempt.finish(_classify(reason))


class _ShortFactory(ClientFactory):
    """
    One short connection attempt, from connecting to its outcome.
    """

    noisy = False

    def __init__(self, load: "LoadGenerator", started: float) -> None:
        self.load = load
        self.started = started
        self.outcome: str | None = None
        self.protocolInstance: ShortClient | None = None
        self.deadline: Any = None
        self.connector: Any = None

    def buildProtocol(self, addr: IAddress | None) -> ShortClient:
        self.protocolInstance = ShortClient(self)
        return self.protocolInstance

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.finish(_classify(reason))

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass

    def finish(self, outcome: str) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.load._shortEnded(self, outcome)

    def timedOut(self) -> None:
        self.deadline = None
        if self.outcome is not None:
            return
        self.finish("timedOut")
        transport = getattr(self.protocolInstance, "transport", None)
        if transport is not None:
            transport.abortConnection()
        elif self.connector is not None:
            self.connector.stopConnecting()


class LoadGenerator:
    """
    Drive a line server at C{host}:C{port}: long-lived clients each send a
    request every C{interval} seconds, and C{rate} new short connections
    start each second.

    @ivar samples: latencies of the long-lived clients' requests, to their
        answers' arrival (to their reading where the kernel gave no stamp).
    @ivar readSamples: the same latencies to the generator's reading the
        answers.
    @ivar kernelStamps: whether new long-lived clients ask the kernel for
        arrival stamps.
    @ivar shortSamples: how long each answered short connection took,
        from connecting to its answer.
    @ivar clients: the long-lived clients connected so far.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        *,
        host: str = "127.0.0.1",
        interval: float = 0.05,
        rate: float = 0.0,
        tick: float = 0.005,
        connectTimeout: float = 10.0,
        shortTimeout: float = 5.0,
        maxConnecting: int = 100,
        onProgress: Callable[[str], None] = lambda message: None,
    ) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(
                "the load generator only drives loopback, not {!r}".format(host)
            )
        if not interval > 0 or not tick > 0 or rate < 0:
            raise ValueError("interval and tick must be positive, rate not negative")
        self.reactor = reactor
        self.clock = reactor
        self.host = host
        self.port = port
        self.interval = interval
        self.rate = rate
        self.tick = tick
        self.connectTimeout = connectTimeout
        self.shortTimeout = shortTimeout
        self.maxConnecting = maxConnecting
        self.onProgress = onProgress
        self.noDelay = True
        self.kernelStamps = True
        self.clients: list[LongLivedClient] = []
        self.samples = Samples()
        self.readSamples = Samples()
        self.shortSamples = Samples()
        self.shortOutcomes: Counter[str] = Counter()
        self.shortOutcomeTimes: list[tuple[float, str]] = []
        self.connectFailures: Counter[str] = Counter()
        self.lostConnections: Counter[str] = Counter()
        self.lostTimes: list[float] = []
        self.sent = 0
        self.answered = 0
        self.skipped = 0
        self.malformed = 0
        self.lostLines = 0
        self.lostBytes = 0
        self.duplicatedLines = 0
        self.duplicatedBytes = 0
        self.stateErrors = 0
        self.shortStarted = 0
        self._shortInFlight: set[_ShortFactory] = set()
        self._buckets: int = max(1, round(interval / tick))
        self._ticker: LoopingCall | None = None
        self._started: float | None = None
        self._bucketsDone = 0
        self._connectWaiters: list[Deferred[LongLivedClient | None]] = []
        self._waitingShort: list[Deferred[None]] = []

    # Long-lived connections

    def connect(self, count: int) -> Deferred[int]:
        """
        Open C{count} more long-lived connections, at most C{maxConnecting}
        at a time.

        @return: a L{Deferred} firing with how many connected; the others
            are counted in L{connectFailures}.
        """
        done: Deferred[int] = Deferred()
        state = {"started": 0, "finished": 0, "connected": 0}

        def startMore() -> None:
            while (
                state["started"] < count
                and state["started"] - state["finished"] < self.maxConnecting
            ):
                state["started"] += 1
                self._connectOne().addCallback(finished)

        def finished(client: LongLivedClient | None) -> None:
            state["finished"] += 1
            if client is not None:
                state["connected"] += 1
            if state["finished"] % 1000 == 0:
                self.onProgress(
                    "{} of {} connections open".format(state["finished"], count)
                )
            if state["finished"] == count:
                done.callback(state["connected"])
            else:
                startMore()

        if count <= 0:
            return succeed(0)
        startMore()
        return done

    def _connectOne(self) -> Deferred[LongLivedClient | None]:
        result: Deferred[LongLivedClient | None] = Deferred()
        load = self

        class Factory(ClientFactory):
            noisy = False

            def buildProtocol(self, addr: IAddress | None) -> LongLivedClient:
                return LongLivedClient(load, result)

            def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
                load.connectFailures[_classify(reason)] += 1
                if not result.called:
                    result.callback(None)

            def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
                if not result.called:
                    load.connectFailures[_classify(reason)] += 1
                    result.callback(None)

        self.reactor.connectTCP(
            self.host, self.port, Factory(), timeout=self.connectTimeout
        )
        return result

    def _connected(self, client: LongLivedClient) -> None:
        self.clients.append(client)
        waiter = client.whenConnected
        if waiter is not None and not waiter.called:
            waiter.callback(client)

    def _disconnected(self, client: LongLivedClient, reason: Failure) -> None:
        for _, _, size in client.pending:
            self._lostRequest(size)
        client.pending.clear()
        if client.closing:
            return
        client.lost = _classify(reason)
        self.lostConnections[client.lost] += 1
        self.lostTimes.append(self.clock.seconds())

    def _lostRequest(self, size: int) -> None:
        self.lostLines += 1
        self.lostBytes += size

    def alive(self) -> list[LongLivedClient]:
        """
        The long-lived clients still connected (and not being closed).
        """
        return [c for c in self.clients if c.lost is None and not c.closing]

    def pingAll(self, timeout: float = 30.0) -> Deferred[int]:
        """
        Send one request on every live long-lived connection.

        @return: a L{Deferred} firing with how many answers are still
            missing when all came or C{timeout} passed.
        """
        now = self.clock.seconds()
        for client in self.alive():
            client.request(now)
        return self.settle(timeout)

    def settle(self, timeout: float) -> Deferred[int]:
        """
        Wait until every live connection's requests are answered, polling
        every 10 ms, for at most C{timeout} seconds.

        @return: a L{Deferred} firing with the number still unanswered.
        """
        done: Deferred[int] = Deferred()
        deadline = self.clock.seconds() + timeout

        def outstanding() -> int:
            return sum(len(c.pending) for c in self.alive())

        def check() -> None:
            left = outstanding()
            if left == 0 or self.clock.seconds() >= deadline:
                done.callback(left)
            else:
                self.reactor.callLater(0.01, check)

        check()
        return done

    def servers(self) -> Counter[bytes | None]:
        """
        How many live long-lived clients each process answered last.
        """
        return Counter(c.server for c in self.alive())

    # Pacing

    def start(self) -> None:
        """
        Start sending requests and opening short connections.
        """
        if self._ticker is not None:
            return
        self._started = self.clock.seconds()
        self._bucketsDone = 0
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.tick, now=True)

    def stop(self, settleTimeout: float = 5.0) -> Deferred[int]:
        """
        Stop sending; wait (at most C{settleTimeout}) for the answers still
        due and for the short connections in flight.

        @return: a L{Deferred} firing with the long-lived requests still
            unanswered.
        """
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        waiting = self.settle(settleTimeout)

        def shortToo(left: int) -> Deferred[int]:
            return self._shortSettled().addCallback(lambda _: left)

        return waiting.addCallback(shortToo)

    def _shortSettled(self) -> Deferred[None]:
        # Every short attempt has its own deadline, so this ends.
        if not self._shortInFlight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waitingShort.append(d)
        return d

    def _tick(self) -> None:
        assert self._started is not None
        now = self.clock.seconds()
        elapsed = now - self._started
        due = int(elapsed / self.tick) + 1
        # Catch up at most one whole interval: a late tick must not turn
        # into a burst much larger than the steady load.
        if due - self._bucketsDone > self._buckets:
            self._bucketsDone = due - self._buckets
        clients = self.clients
        # Each request is timed from its own send: a hundred sends take
        # the generator about a millisecond, more if it is preempted.
        seconds = self.clock.seconds
        while self._bucketsDone < due:
            bucket = self._bucketsDone % self._buckets
            self._bucketsDone += 1
            for client in clients[bucket :: self._buckets]:
                if client.lost is None and not client.closing:
                    client.request(seconds())
        if self.rate:
            wanted = int(elapsed * self.rate)
            starting = min(wanted - self.shortStarted, max(1, int(self.rate)))
            if wanted - self.shortStarted > starting:
                # Skip what could not start on time rather than burst.
                self.shortStarted = wanted - starting
            for _ in range(max(0, starting)):
                self._startShort(now)

    # Short connections

    def _startShort(self, now: float) -> None:
        self.shortStarted += 1
        attempt = _ShortFactory(self, now)
        self._shortInFlight.add(attempt)
        attempt.deadline = self.reactor.callLater(self.shortTimeout, attempt.timedOut)
        attempt.connector = self.reactor.connectTCP(
            self.host, self.port, attempt, timeout=self.shortTimeout
        )

    def _shortEnded(self, attempt: _ShortFactory, outcome: str) -> None:
        now = self.clock.seconds()
        self.shortOutcomes[outcome] += 1
        self.shortOutcomeTimes.append((attempt.started, outcome))
        if outcome == "answered":
            self.shortSamples.add(attempt.started, now - attempt.started)
        self._shortInFlight.discard(attempt)
        if not self._shortInFlight and self._waitingShort:
            waiters, self._waitingShort = self._waitingShort, []
            for waiter in waiters:
                waiter.callback(None)

    # Ending

    def closeAll(self, timeout: float = 10.0) -> Deferred[None]:
        """
        Close every long-lived connection cleanly; fire once all are
        closed, or after C{timeout} seconds (the rest are aborted).
        """
        clients = [c for c in self.clients if not c.ended.called]
        for client in clients:
            client.closing = True
            if client.transport is not None:
                client.transport.loseConnection()
        if not clients:
            return succeed(None)
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            open_ = [c for c in clients if not c.ended.called]
            if not open_:
                done.callback(None)
            elif self.clock.seconds() >= deadline:
                for client in open_:
                    transport: Any = client.transport
                    if transport is not None:
                        transport.abortConnection()
                done.callback(None)
            else:
                self.reactor.callLater(0.02, check)

        check()
        return done

    def outcomes(self) -> dict[str, Any]:
        """
        Every count, as JSON-compatible data.
        """
        return {
            "connections": len(self.clients),
            "connectFailures": dict(self.connectFailures),
            "alive": len(self.alive()),
            "lost": dict(self.lostConnections),
            "requests": {
                "sent": self.sent,
                "answered": self.answered,
                "skipped": self.skipped,
                "malformed": self.malformed,
                "lostLines": self.lostLines,
                "lostBytes": self.lostBytes,
                "duplicatedLines": self.duplicatedLines,
                "duplicatedBytes": self.duplicatedBytes,
                "stateErrors": self.stateErrors,
            },
            "short": {
                "started": self.shortStarted,
                "answered": self.shortOutcomes.get("answered", 0),
                "refused": self.shortOutcomes.get("refused", 0),
                "reset": self.shortOutcomes.get("reset", 0)
                + self.shortOutcomes.get("closed", 0),
                "timedOut": self.shortOutcomes.get("timedOut", 0),
                "other": self.shortOutcomes.get("other", 0),
            },
        }

    def shortOutcomesWithin(
        self, start: float | None, end: float | None
    ) -> Counter[str]:
        """
        The outcomes of short connections started in [C{start}, C{end}).
        """
        return Counter(
            outcome
            for started, outcome in self.shortOutcomeTimes
            if (start is None or started >= start) and (end is None or started < end)
        )


def latencyBins(
    samples: Samples, origin: float, width: float
) -> list[tuple[float, int, float, float, float]]:
    """
    Per bin of C{width} seconds from C{origin}: (bin start offset, answers,
    p50, p99, max latency), for plotting.
    """
    rows = []
    for index, values in sorted(samples.bins(origin, width).items()):
        values.sort()
        rows.append(
            (
                index * width,
                len(values),
                percentile(values, 0.5),
                percentile(values, 0.99),
                values[-1],
            )
        )
    return rows
