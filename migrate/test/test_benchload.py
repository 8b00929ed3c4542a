"""
Tests for the benchmark's load generator (L{migrate.bench._load}), its
output, and one end-to-end run of C{python -m migrate.bench --quick}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ..bench._app import BenchLine
from ..bench._load import (
    LoadGenerator,
    LongLivedClient,
    Samples,
    latencyBins,
    percentile,
    summarize,
)
from ..bench._output import formatComparison, formatResults, keyFigures
from ..bench._plot import timelineTitle
from ..bench._process import freePort, readCPU, waitFor
from ..bench._scenarios import _cpuPerRequest
from ..testing import abandonedRestore


def _poll(
    condition: Any, timeout: float = 10.0, what: str = "condition"
) -> Deferred[None]:
    """
    Wait (on the real reactor) until C{condition()} is true; fail after
    C{timeout} seconds.
    """
    return waitFor(_reactor, condition, timeout, what, interval=0.01)


class StatisticsTests(SynchronousTestCase):
    """
    L{percentile}, L{summarize}, L{Samples}, L{latencyBins}.
    """

    def test_percentile(self) -> None:
        """
        Nearest rank: p50 of 1..100 is 50, p99 is 99, p100 is 100.
        """
        values = [float(i) for i in range(1, 101)]
        self.assertEqual(
            (
                percentile(values, 0.5),
                percentile(values, 0.99),
                percentile(values, 1.0),
            ),
            (50.0, 99.0, 100.0),
        )
        self.assertEqual(percentile([7.0], 0.99), 7.0)
        self.assertRaises(ValueError, percentile, [], 0.5)

    def test_summarize(self) -> None:
        """
        Count, p50, p99 and max, whatever the order; L{None} when empty.
        """
        self.assertEqual(
            summarize([3.0, 1.0, 2.0]), {"count": 3, "p50": 2.0, "p99": 3.0, "max": 3.0}
        )
        self.assertEqual(
            summarize([]), {"count": 0, "p50": None, "p99": None, "max": None}
        )

    def test_samplesWithin(self) -> None:
        """
        L{Samples.within} selects by the time a request was sent, the end
        excluded.
        """
        samples = Samples()
        for sent, latency in [(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)]:
            samples.add(sent, latency)
        self.assertEqual(samples.within(1.0, 3.0), [0.1, 0.2])
        self.assertEqual(samples.within(None, None), [0.1, 0.2, 0.3])
        self.assertEqual(samples.within(2.5, None), [0.3])

    def test_samplesLongest(self) -> None:
        """
        L{Samples.longest} is when the slowest request sent in the window
        was sent, and its latency; L{None} for an empty window.
        """
        samples = Samples()
        for sent, latency in [(1.0, 0.5), (2.0, 0.2), (3.0, 0.3), (4.0, 0.9)]:
            samples.add(sent, latency)
        self.assertEqual(samples.longest(1.5, 4.0), (3.0, 0.3))
        self.assertEqual(samples.longest(0.0, 5.0), (4.0, 0.9))
        self.assertIsNone(samples.longest(5.0, 6.0))

    def test_bins(self) -> None:
        """
        L{latencyBins} groups answers by when they arrived.
        """
        samples = Samples()
        samples.add(10.0, 0.05)
        samples.add(10.02, 0.01)
        samples.add(10.0, 0.25)
        rows = latencyBins(samples, 10.0, 0.1)
        self.assertEqual([(r[0], r[1]) for r in rows], [(0.0, 2), (0.2, 1)])
        self.assertEqual(rows[0][4], 0.05)


class CPUTests(SynchronousTestCase):
    """
    L{readCPU} and L{_cpuPerRequest}: what the host and the load generator
    spend per request.
    """

    def test_readCPU(self) -> None:
        """
        A process's processor time from C{/proc} agrees with this process's
        own (C{os.times()}) to a clock tick; a process that is gone has
        none.
        """
        own = readCPU()
        fromProc = readCPU(os.getpid())
        assert own is not None and fromProc is not None
        # Twisted's assertAlmostEqual takes no delta (it ignores one).
        self.assertLessEqual(abs(own - fromProc), 0.05)
        self.assertIsNone(readCPU(2**22 + 1))

    def test_perRequest(self) -> None:
        """
        Each side's time divided by the requests answered meanwhile;
        L{None} when unknown or nothing was answered.
        """
        self.assertEqual(
            _cpuPerRequest((1.0, 2.0, 100), (1.5, 2.25, 200)),
            {"host": 0.005, "generator": 0.0025, "answered": 100},
        )
        self.assertEqual(
            _cpuPerRequest((None, 2.0, 100), (1.5, 2.25, 100)),
            {"host": None, "generator": None, "answered": 0},
        )


def _fakeClients(load: LoadGenerator, count: int) -> list[StringTransport]:
    """
    Attach C{count} long-lived clients over string transports.
    """
    transports = []
    for _ in range(count):
        client = LongLivedClient(load)
        transport = StringTransport()
        transport.setTcpNoDelay = lambda flag: None  # type: ignore[attr-defined]
        client.makeConnection(transport)
        transports.append(transport)
    return transports


class ApplicationTests(SynchronousTestCase):
    """
    Tests for the benchmark's application, L{BenchLine}.
    """

    def test_abandon(self) -> None:
        """
        A connection restored by a module reload ahead of its pause can be
        abandoned there: its restore registers it nowhere, so there is
        nothing to undo.
        """
        old: Any = Factory.forProtocol(BenchLine).buildProtocol(None)
        transport = StringTransport()
        transport.setTcpNoDelay = lambda flag: None  # type: ignore[attr-defined]
        old.makeConnection(transport)
        old.dataReceived(b"1\n2\n")
        abandoned = abandonedRestore(old, Factory.forProtocol(BenchLine))
        self.assertEqual(abandoned.problems, ())
        self.assertEqual(abandoned.protocol.count, 2)


class LongLivedClientTests(SynchronousTestCase):
    """
    How a long-lived client reads its replies: in lines however the bytes
    are cut, each checked against its request.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.load = LoadGenerator(self.clock, 1234)
        (self.transport,) = _fakeClients(self.load, 1)
        self.client = self.load.clients[0]

    def test_reply(self) -> None:
        """
        A reply is a number, then optionally a server and a count: the
        number answers the request, the server and the count are kept.
        """
        self.client.request(0.0)
        self.clock.advance(0.25)
        self.client.dataReceived(b"0 345 6\n")
        self.assertEqual(self.transport.value(), b"0\n")
        self.assertEqual(list(self.load.samples.latency), [0.25])
        self.assertEqual((self.client.server, self.client.lastCount), (b"345", 6))
        self.assertEqual(self.load.answered, 1)

    def test_latencyToArrival(self) -> None:
        """
        Where the read came with the kernel's arrival stamp, a request's
        latency runs to the stamp; the latency to the reading is kept
        beside it.  A read without a stamp is timed when read.
        """
        self.client.request(1.0)
        self.client.request(1.0)
        self.clock.advance(1.5)
        self.client._arrived(1.25)
        self.client.dataReceived(b"0 s 1\n")
        self.client._arrived(None)
        self.client.dataReceived(b"1 s 2\n")
        self.assertEqual(list(self.load.samples.latency), [0.25, 0.5])
        self.assertEqual(list(self.load.readSamples.latency), [0.5, 0.5])
        self.assertEqual(list(self.load.readSamples.sent), [1.0, 1.0])

    def test_numberOnly(self) -> None:
        """
        A reply may be only the number (an echo server), or have a count
        that is not a number: the request is answered, nothing else kept.
        """
        self.client.request(0.0)
        self.client.request(0.0)
        self.client.dataReceived(b"0\n1 x y\n")
        self.assertEqual(self.load.answered, 2)
        self.assertEqual((self.client.server, self.client.lastCount), (b"x", None))
        self.assertEqual((self.load.malformed, self.load.stateErrors), (0, 0))

    def test_malformed(self) -> None:
        """
        A reply that is empty or does not start with a number is counted
        malformed and answers nothing.
        """
        self.client.request(0.0)
        self.client.dataReceived(b"\nhello 1 2\n")
        self.assertEqual((self.load.malformed, self.load.answered), (2, 0))
        self.assertEqual(len(self.client.pending), 1)

    def test_linesCutAnywhere(self) -> None:
        """
        Replies cut anywhere, or several in one read, are read as lines.
        """
        for _ in range(3):
            self.client.request(0.0)
        for chunk in [b"0 s", b" 1\n1 s 2", b"\n", b"2 s 3\n"]:
            self.client.dataReceived(chunk)
        self.assertEqual(self.load.answered, 3)
        self.assertEqual(self.client.lastCount, 3)
        self.assertEqual(self.load.stateErrors, 0)

    def test_countMustGoOn(self) -> None:
        """
        A count that does not follow the previous one is a state error.
        """
        for _ in range(2):
            self.client.request(0.0)
        self.client.dataReceived(b"0 s 1\n1 s 7\n")
        self.assertEqual(self.load.stateErrors, 1)

    def test_tooLong(self) -> None:
        """
        A line longer than C{MAX_LENGTH}, complete or not, is counted
        malformed and ends the connection; the lines before it are read.
        """
        for _ in range(2):
            self.client.request(0.0)
        self.client.dataReceived(b"0 s 1\n" + b"1" * 5000)
        self.assertEqual((self.load.answered, self.load.malformed), (1, 1))
        self.assertTrue(self.transport.disconnecting)
        (other,) = _fakeClients(self.load, 1)
        self.load.clients[1].dataReceived(b"1" * 5000 + b"\n0 s 1\n")
        self.assertEqual((self.load.answered, self.load.malformed), (1, 2))
        self.assertTrue(other.disconnecting)

    def test_stopsReadingOnceClosing(self) -> None:
        """
        Once the connection is closing, the lines still in the same read
        are not read.
        """
        for _ in range(2):
            self.client.request(0.0)
        self.transport.loseConnection()
        self.client.dataReceived(b"0 s 1\n1 s 2\n")
        self.assertEqual(self.load.answered, 1)


class PacingTests(SynchronousTestCase):
    """
    The ticker sends each client's requests every interval and starts new
    connections at the rate, without bursts after a late tick.
    """

    def test_requestsEveryInterval(self) -> None:
        """
        Each client sends about one request per interval.
        """
        clock = MemoryReactorClock()
        load = LoadGenerator(clock, 1234, interval=0.05, tick=0.005)
        transports = _fakeClients(load, 10)
        load.start()
        for _ in range(100):
            clock.advance(0.005)
        sent = [t.value().count(b"\n") for t in transports]
        # 0.5 s at one request per 50 ms: 10 each, give or take the phase.
        self.assertTrue(all(10 <= n <= 11 for n in sent), sent)
        self.assertEqual(load.sent, sum(sent))
        load.stop()

    def test_noBurstAfterLateTick(self) -> None:
        """
        A tick that comes a whole second late sends at most one interval's
        worth of requests.
        """
        clock = MemoryReactorClock()
        load = LoadGenerator(clock, 1234, interval=0.05, tick=0.005)
        transports = _fakeClients(load, 10)
        load.start()
        before = load.sent
        clock.advance(1.0)
        self.assertLessEqual(load.sent - before, 10)
        self.assertTrue(all(t.value() for t in transports))
        load.stop()

    def test_newConnectionRate(self) -> None:
        """
        C{rate} new connections start each second, on loopback.
        """
        clock = MemoryReactorClock()
        load = LoadGenerator(clock, 1234, interval=0.05, tick=0.01, rate=20)
        load.start()
        for _ in range(100):
            clock.advance(0.01)
        self.assertIn(len(clock.tcpClients), range(19, 22))
        self.assertEqual(
            {(c[0], c[1]) for c in clock.tcpClients}, {("127.0.0.1", 1234)}
        )
        load.stop()

    def test_loopbackOnly(self) -> None:
        """
        The generator refuses to drive anything but loopback.
        """
        self.assertRaises(
            ValueError, LoadGenerator, MemoryReactorClock(), 80, host="10.1.2.3"
        )


class Misbehaving(LineReceiver):
    """
    A line server whose answers are wrong on purpose, according to its
    factory's C{mode}.
    """

    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.seen = 0

    def lineReceived(self, line: bytes) -> None:
        self.seen += 1
        mode = self.factory.mode
        number = line.split()[0]
        if mode == "drop-second" and self.seen == 2:
            return
        if mode == "twice" and self.seen == 1:
            self.sendLine(number + b" s 1")
        if mode == "close-after-first" and self.seen == 2:
            transport: Any = self.transport
            transport.loseConnection()
            return
        if mode == "silent":
            return
        count = self.seen + (5 if mode == "jump" and self.seen > 1 else 0)
        self.sendLine(number + b" s %d" % (count,))


class LoadAgainstServerTests(TestCase):
    """
    The generator against a real line server on loopback.
    """

    timeout = 30

    def listen(self, factory: Any) -> int:
        port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address: Any = port.getHost()
        return int(address.port)

    def misbehaving(self, mode: str) -> int:
        factory = Factory.forProtocol(Misbehaving)
        factory.mode = mode  # type: ignore[attr-defined]
        return self.listen(factory)

    def generator(self, port: int, **kwargs: Any) -> LoadGenerator:
        load = LoadGenerator(_reactor, port, **kwargs)
        self.addCleanup(load.closeAll, 5.0)
        self.addCleanup(load.stop, 0.1)
        return load

    @inlineCallbacks
    def test_answersCounted(self) -> Any:
        """
        Against the benchmark's own app, every request is answered once,
        in order, by this process, with the state counting on.
        """
        port = self.listen(Factory.forProtocol(BenchLine))
        load = self.generator(port)
        connected = yield load.connect(5)
        self.assertEqual(connected, 5)
        missing = yield load.pingAll(timeout=10)
        missing2 = yield load.pingAll(timeout=10)
        self.assertEqual((missing, missing2), (0, 0))
        self.assertEqual((load.sent, load.answered, len(load.samples)), (10, 10, 10))
        self.assertEqual(load.servers(), {b"%d" % os.getpid(): 5})
        if sys.platform == "linux":
            # Every answer was timed by its arrival, never after its reading.
            self.assertTrue(all(c.arrivedAt is not None for c in load.clients))
            pairs = list(zip(load.samples.latency, load.readSamples.latency))
            self.assertTrue(all(0 < a <= r for a, r in pairs), pairs)
        outcomes = load.outcomes()["requests"]
        self.assertEqual(
            (
                outcomes["lostLines"],
                outcomes["duplicatedLines"],
                outcomes["stateErrors"],
            ),
            (0, 0, 0),
        )

    @inlineCallbacks
    def test_steadyLoad(self) -> Any:
        """
        Under a steady load with new connections, everything is answered
        and nothing is lost.
        """
        port = self.listen(Factory.forProtocol(BenchLine))
        load = self.generator(port, interval=0.02, rate=50)
        yield load.connect(4)
        load.start()
        yield _poll(
            lambda: load.sent >= 40 and load.shortOutcomes["answered"] >= 5,
            what="requests and new connections",
        )
        unanswered = yield load.stop(5.0)
        self.assertEqual(unanswered, 0)
        self.assertEqual(load.answered, load.sent)
        outcomes = load.outcomes()
        self.assertEqual(outcomes["lost"], {})
        self.assertEqual(outcomes["short"]["answered"], outcomes["short"]["started"])
        yield load.closeAll()
        self.assertEqual(load.outcomes()["lost"], {})

    @inlineCallbacks
    def test_lostRequestCounted(self) -> Any:
        """
        A request the server never answers counts as lost once a later one
        is answered.
        """
        load = self.generator(self.misbehaving("drop-second"))
        yield load.connect(1)
        for _ in range(3):
            yield load.pingAll(timeout=0.5)
        requests = load.outcomes()["requests"]
        self.assertEqual((requests["lostLines"], requests["lostBytes"]), (1, 2))
        self.assertEqual(load.answered, 2)

    @inlineCallbacks
    def test_duplicateCounted(self) -> Any:
        """
        An answer that comes twice counts as duplicated bytes.
        """
        load = self.generator(self.misbehaving("twice"))
        yield load.connect(1)
        yield load.pingAll(timeout=5)
        yield load.pingAll(timeout=5)
        requests = load.outcomes()["requests"]
        self.assertEqual(
            (requests["duplicatedLines"], requests["duplicatedBytes"]), (1, 6)
        )

    @inlineCallbacks
    def test_stateErrorCounted(self) -> Any:
        """
        A count that does not go on by one means the state was lost.
        """
        load = self.generator(self.misbehaving("jump"))
        yield load.connect(1)
        for _ in range(3):
            yield load.pingAll(timeout=5)
        self.assertEqual(load.stateErrors, 1)

    @inlineCallbacks
    def test_lostConnectionCounted(self) -> Any:
        """
        A connection the server closes counts as lost, with its unanswered
        request.
        """
        load = self.generator(self.misbehaving("close-after-first"))
        yield load.connect(1)
        yield load.pingAll(timeout=5)
        yield load.pingAll(timeout=1)
        yield _poll(lambda: not load.alive(), what="the connection to close")
        outcomes = load.outcomes()
        self.assertEqual(outcomes["lost"], {"closed": 1})
        self.assertEqual(outcomes["requests"]["lostLines"], 1)
        self.assertEqual(len(load.lostTimes), 1)

    @inlineCallbacks
    def test_refusedCounted(self) -> Any:
        """
        New connections to a port nobody listens on are counted refused.
        """
        load = self.generator(freePort(), rate=50)
        load.start()
        yield _poll(lambda: load.shortOutcomes["refused"] >= 3, what="refusals")
        yield load.stop(1.0)
        short = load.outcomes()["short"]
        self.assertEqual(short["answered"], 0)
        self.assertEqual(short["refused"], short["started"])
        failed = yield load.connect(2)
        self.assertEqual((failed, dict(load.connectFailures)), (0, {"refused": 2}))

    @inlineCallbacks
    def test_timeoutCounted(self) -> Any:
        """
        A new connection that is never answered times out after
        C{shortTimeout}.
        """
        load = self.generator(self.misbehaving("silent"), rate=20, shortTimeout=0.2)
        load.start()
        yield _poll(lambda: load.shortOutcomes["timedOut"] >= 2, what="time-outs")
        yield load.stop(1.0)
        self.assertEqual(load.shortOutcomes["answered"], 0)

    @inlineCallbacks
    def test_resetCounted(self) -> Any:
        """
        A new connection closed before it is answered counts as reset.
        """

        class Hangup(Protocol):
            def connectionMade(self) -> None:
                self.transport.loseConnection()  # type: ignore[union-attr]

        load = self.generator(self.listen(Factory.forProtocol(Hangup)), rate=20)
        load.start()
        yield _poll(lambda: load.outcomes()["short"]["reset"] >= 2, what="resets")
        yield load.stop(1.0)
        self.assertEqual(load.shortOutcomes["answered"], 0)


class OutputTests(SynchronousTestCase):
    """
    Printing and comparing results.
    """

    def results(self, stall: float) -> dict[str, Any]:
        phase = {
            "latency": {"count": 1, "p50": 0.001, "p99": 0.002, "max": 0.003},
            "shortLatency": {"count": 0, "p50": None, "p99": None, "max": None},
            "short": {},
            "seconds": 1.0,
        }
        return {
            "machine": {"cpus": 2},
            "options": {"quick": True},
            "scenarios": [
                {
                    "name": "capability",
                    "kind": "migration",
                    "seconds": 0.5,
                    "report": {
                        "outcome": "success",
                        "moved": 10,
                        "draining": 0,
                        "failed": 0,
                        "durations": {
                            "spawn": 0.3,
                            "connections": 0.05,
                            "commit": 0.01,
                        },
                    },
                    "clients": {
                        "kept": 10,
                        "onNew": 10,
                        "onOld": 0,
                        "unansweredAtEnd": 0,
                    },
                    "load": {
                        "lost": {},
                        "requests": {
                            "lostBytes": 0,
                            "lostLines": 0,
                            "duplicatedBytes": 0,
                            "duplicatedLines": 0,
                            "stateErrors": 0,
                        },
                        "short": {
                            "started": 5,
                            "answered": 5,
                            "refused": 0,
                            "reset": 0,
                            "timedOut": 0,
                        },
                    },
                    "stall": stall,
                    "stallAt": 1.25,
                    "phases": {"before": phase, "during": phase, "after": phase},
                    "rss": {"old": 30e6, "new": 31e6},
                    "cpu": {"host": 31e-6, "generator": 24.56e-6, "answered": 9},
                }
            ],
            "floors": [{"count": 10, "seconds": 0.001, "perSecond": 10000.0}],
        }

    def test_format(self) -> None:
        """
        The report names the strategy, the stall, when its request was sent
        and the ratio to the floor.
        """
        text = formatResults(self.results(0.25))
        self.assertIn("strategy capability: success", text)
        self.assertIn(
            "longest client stall: 250 ms, sent 1250 ms after the upgrade command "
            "began",
            text,
        )
        before = self.results(0.25)
        before["scenarios"][0]["stallAt"] = -0.5
        self.assertIn(
            "longest client stall: 250 ms, sent 500 ms before the upgrade command "
            "began",
            formatResults(before),
        )
        self.assertIn("60.0x", text)
        self.assertNotIn("as the load generator read", text)
        self.assertNotIn("whole run", text)
        self.assertIn(
            "CPU per request answered before: host 31.0 us, load generator 24.6 us",
            text,
        )

    def test_formatReadAndWholeRun(self) -> None:
        """
        Beside the stall to the answer's arrival, the report gives the
        stall and the latencies as the load generator read the answers,
        and the whole run's longest wait when it is longer than the
        migration's.
        """
        results = self.results(0.025)
        scenario = results["scenarios"][0]
        scenario["readStall"] = 0.0412
        scenario["phases"]["during"] = dict(
            scenario["phases"]["during"],
            readLatency={"count": 1, "p50": 0.004, "p99": 0.005, "max": 0.006},
        )
        scenario["wholeRunStall"] = 0.0562
        scenario["wholeRunStallAt"] = -6.0
        text = formatResults(results)
        self.assertIn(
            "longest client stall: 25.0 ms, sent 1250 ms after the upgrade command "
            "began (to its answer's arrival; 41.2 ms as the load generator read it)",
            text,
        )
        self.assertIn(
            "latency p50/p99/max during, as the load generator read the answers: "
            "4.0 ms / 5.0 ms / 6.0 ms  (1 answers)",
            text,
        )
        self.assertIn(
            "the whole run's longest wait: 56.2 ms, sent 6000 ms before the upgrade "
            "command began (not the migration's)",
            text,
        )
        scenario["wholeRunStall"] = 0.025
        self.assertNotIn("whole run", formatResults(results))

    def test_formatIdle(self) -> None:
        """
        The idle scenario gives how long its connections were frozen and
        its ratio to the floor of the same count, beside issue 16's aims.
        """
        results = self.results(0.025)
        underLoad = results["scenarios"][0]
        results["scenarios"].append(
            {
                "name": "idle-capability",
                "kind": "idle",
                "strategy": "capability",
                "count": 10,
                "seconds": 0.5,
                "report": dict(
                    underLoad["report"],
                    durations={"connections": 0.001, "freeze": 0.003, "commit": 0.001},
                ),
                "answeredAfter": 10,
                "connected": 10,
                "onNew": 10,
                "load": underLoad["load"],
                "rss": {"empty": 30e6, "old": 40e6, "new": 44e6},
            }
        )
        self.assertIn(
            "connections frozen 5.0 ms (aim <= 100 ms); floor 1.0 ms (10000 "
            "connections/s) -> 5.0x (aim <= 4x)",
            formatResults(results),
        )

    def test_timelineTitle(self) -> None:
        """
        A timeline's title gives the longest stall; when nothing was
        answered during the migration (a naive restart), it says how many
        connections were lost instead of showing a stall of 0 ms.
        """
        results = self.results(0.0125)
        scenario = results["scenarios"][0]
        self.assertEqual(
            timelineTitle(scenario), "capability: success, longest stall 12 ms"
        )
        scenario["load"]["lost"] = {"reset": 2}
        self.assertEqual(
            timelineTitle(scenario),
            "capability: success, longest stall 12 ms, 2 long-lived connections lost",
        )
        scenario["stall"] = None
        scenario["load"]["lost"] = {"closed": 9, "reset": 1}
        self.assertEqual(
            timelineTitle(scenario),
            "capability: success, 10 long-lived connections lost",
        )
        scenario["load"]["lost"] = {}
        self.assertEqual(
            timelineTitle(scenario),
            "capability: success, no answer during the migration",
        )

    def test_compare(self) -> None:
        """
        The comparison shows each key figure before and after.
        """
        self.assertEqual(keyFigures(self.results(0.2))["capability"]["stall s"], 0.2)
        text = formatComparison(self.results(0.2), self.results(0.1))
        self.assertIn("capability stall s: 0.2 -> 0.1 (-50%)", text)


class QuickRunTests(TestCase):
    """
    C{python -m migrate.bench --quick} end to end: real hosts, every
    scenario, well under a minute on a quiet two-core machine.
    """

    timeout = 180

    @inlineCallbacks
    def test_quickRun(self) -> Any:
        """
        The quick run succeeds and writes its results; its figures are
        printed, never judged here.  It is traced (C{--trace}): every
        process records its reactor's turns, and each migration under load
        shows what they recorded around its longest wait.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        from ..bench._process import SOURCE_ROOT

        directory = tempfile.mkdtemp(prefix="migrate-benchtest-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, True))
        path = os.path.join(directory, "results.json")
        traced = os.path.join(directory, "trace")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([SOURCE_ROOT, env.get("PYTHONPATH", "")])
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "migrate.bench", "--quick", "--json", path, "--trace", traced],
            env=env,
            path=directory,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-3000:])
        with open(path) as f:
            results = json.load(f)
        names = [each["name"] for each in results["scenarios"]]
        self.assertIn("capability", names)
        self.assertIn("naive-restart", names)
        self.assertIn("idle-capability", names)
        self.assertIn(b"strategy capability: success", out)
        # What the host and the load generator spent per request before the
        # migration, read from /proc and os.times().
        (capability,) = [
            each for each in results["scenarios"] if each["name"] == "capability"
        ]
        self.assertGreater(capability["cpu"]["answered"], 0)
        self.assertGreater(capability["cpu"]["host"], 0)
        self.assertGreater(capability["cpu"]["generator"], 0)
        self.assertTrue(results["floors"])
        # Traced: the benchmark, and each host it started, the successor
        # included, wrote a file; each migration under load shows what
        # they recorded (a list, empty when nothing long happened).
        self.assertEqual(results["options"]["trace"], traced)
        files = os.listdir(traced)
        self.assertIn("{}.trace".format(capability["report"]["newPid"]), files)
        for each in files:
            with open(os.path.join(traced, each)) as f:
                self.assertTrue(f.readline().startswith("# "), each)
        self.assertIsInstance(capability["trace"], list)
        self.assertIn(b"  meanwhile, as traced", out)
        # The stall scenario, at 1,000 connections only.
        self.assertEqual(results["stall"]["counts"], [1000])
        self.assertIn(b"== stall: 1,000 idle connections", out)
        self.assertEqual(
            {row["strategy"] for row in results["stall"]["rows"]},
            {"capability", "reexec", "reload"},
        )
        for row in results["stall"]["rows"]:
            self.assertIsInstance(row["trace"], list)
        self.assertIn(b"  capability meanwhile, as traced", out)


class BacklogRunTests(TestCase):
    """
    C{python -m migrate.bench.backlog} end to end, small: every mode's
    trial serves every queued request.
    """

    timeout = 120

    def python(self, arguments: list[str]) -> Deferred[tuple[bytes, bytes, int]]:
        """
        Run this interpreter with C{arguments}, the C{migrate} source first
        on its path.

        @return: a L{Deferred} firing with its output, error output and
            exit status.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        from ..bench._process import SOURCE_ROOT

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([SOURCE_ROOT, env.get("PYTHONPATH", "")])
        ran: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            sys.executable, arguments, env=env
        )
        return ran

    @inlineCallbacks
    def test_smallRun(self) -> Any:
        """
        A round of each mode answers every request and prints its figures.
        """
        out, err, code = yield self.python(
            [
                "-m",
                "migrate.bench.backlog",
                "--connections",
                "40",
                "--waiting",
                "8",
                "--rounds",
                "1",
            ]
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-3000:])
        text = out.decode()
        for mode in ("all", "split", "order"):
            self.assertIn("round 1 {:5}: longest ".format(mode), text)
            self.assertIn("{:5}: longest wait median ".format(mode), text)
        self.assertNotIn("unanswered", text)

    @inlineCallbacks
    def clientFails(self, clientSide: str) -> Any:
        """
        Run one trial whose client process runs C{clientSide} (the source
        of a function taking the client side's arguments) instead of
        sending and timing its requests.

        @return: the trial's result.
        """
        out, err, code = yield self.python(
            [
                "-c",
                # A trial that hangs ends with the alarm, not with the test.
                "import json, os, signal\n"
                "signal.alarm(60)\n"
                "from migrate.bench import backlog\n"
                + clientSide
                + "backlog._clientSide = clientSide\n"
                "print(json.dumps(backlog.trial(6, 2, 0.001, 'order')))\n",
            ]
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-3000:])
        return json.loads(out.decode().strip().splitlines()[-1])

    @inlineCallbacks
    def test_clientFailsBeforeTheGo(self) -> Any:
        """
        A trial whose client process ended before the go (its end of the
        go pipe closed first, so the go cannot be written) ends at once
        and says so, without serving.
        """
        yield self.assertEndsBeforeSending("os.close(go)")

    @inlineCallbacks
    def test_clientFailsBeforeSending(self) -> Any:
        """
        A trial whose client process ends after the go, before it sends its
        requests, ends at once and says so, without serving.
        """
        yield self.assertEndsBeforeSending("os.read(go, 1)")

    @inlineCallbacks
    def assertEndsBeforeSending(self, first: str) -> Any:
        """
        A trial whose client process does C{first} (a line of Python) and
        fails ends, saying the client process ended before sending.
        """
        result = yield self.clientFails(
            "def clientSide(clients, waiting, spread, go, report):\n"
            "    " + first + "\n"
            "    raise RuntimeError('the client side failed')\n"
        )
        self.assertEqual(result, {"error": "the client process ended before sending"})

    @inlineCallbacks
    def test_clientFailsBeforeReporting(self) -> Any:
        """
        A trial whose client process sends but ends without its report
        ends once the connections are served, and says so.
        """
        result = yield self.clientFails(
            "def clientSide(clients, waiting, spread, go, report):\n"
            "    os.read(go, 1)\n"
            "    os.write(report, b's')\n"
        )
        self.assertEqual(result, {"error": "the client process ended without a report"})


class BacklogFailureTests(SynchronousTestCase):
    """
    C{python -m migrate.bench.backlog} stops at a trial that failed, and
    says why.
    """

    def runWith(self, completed: Any) -> tuple[int, str]:
        """
        Run the benchmark with every trial's process answering C{completed}.

        @return: its exit status and what it printed.
        """
        import io
        import subprocess
        from contextlib import redirect_stdout

        from ..bench import backlog

        ran: list[list[str]] = []

        def run(argv: list[str], **options: Any) -> Any:
            ran.append(argv)
            return completed

        self.patch(backlog.subprocess, "run", run)
        printed = io.StringIO()
        with redirect_stdout(printed):
            status = backlog.main(["--rounds", "2"])
        self.assertEqual(len(ran), 1)
        self.assertIsInstance(completed, subprocess.CompletedProcess)
        return status, printed.getvalue()

    def test_trialProcessFailed(self) -> None:
        """
        A trial's process that exits with an error ends the run with status
        1 and the end of its error output.
        """
        import subprocess

        status, printed = self.runWith(
            subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback: boom\n")
        )
        self.assertEqual(status, 1)
        self.assertIn("all: failed: Traceback: boom", printed)

    def test_trialReportsError(self) -> None:
        """
        A trial that reports an error ends the run with status 1 and the
        error.
        """
        import subprocess

        status, printed = self.runWith(
            subprocess.CompletedProcess(
                [],
                0,
                stdout=json.dumps({"error": "the client process ended before sending"}),
                stderr="",
            )
        )
        self.assertEqual(status, 1)
        self.assertIn("all: failed: the client process ended before sending", printed)
