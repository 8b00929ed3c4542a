"""
Tests for L{migrate._host._service.MigrationHost} with a memory reactor and a fake
strategy, and the L{IMigrationStrategy} contract, run against
L{migrate.testing.FakeStrategy} and the strategies that ship with migrate.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from functools import partial
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from .._control._commands import MigrationInProgress, UnknownStrategy
from .._host import _service as _host
from .._host._platform import PlatformUnsupported
from .._host._service import MigrationHost
from .._host._settings import HostSettings
from .._host._tracking import HostedProtocol
from .._report import ListenerReport, MigrationOutcome, MigrationPhase, MigrationReport
from ..interfaces import IMigrationHost, IMigrationStrategy
from ..strategies import CapabilityTransfer, GradualTransfer, ReexecStrategy
from ..strategies._reexec._outgoing import ReexecMigration
from ..strategies._transfer import _outgoing
from ..testing import FakeStrategy
from ._fakes import FakeReactor, RecordingFactory, RecordingPort


@define
class Harness:
    """
    A L{MigrationHost} on a L{FakeReactor} with a L{FakeStrategy}, whose
    listening ports are released into C{released} rather than for real.
    """

    reactor: FakeReactor
    application: RecordingFactory
    strategy: FakeStrategy
    host: MigrationHost
    stops: list[bool] = field(factory=list)
    released: list[Any] = field(factory=list)
    forgotten: list[bool] = field(factory=list)

    def connect(self, key: str | None = None) -> tuple[HostedProtocol, StringTransport]:
        """
        Make a connection to a listener (the first unless C{key}).
        """
        listener = self.host.listeners[key or next(iter(self.host.listeners))]
        hosted = listener.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert hosted is not None
        transport = StringTransport()
        hosted.makeConnection(transport)
        return hosted, transport


def harness(
    testCase: SynchronousTestCase,
    listen: tuple[str, ...] = ("tcp:8000",),
    **kwargs: Any,
) -> Harness:
    reactor = kwargs.pop("reactor", None) or FakeReactor()
    strategy = kwargs.pop("strategy", None) or FakeStrategy()
    application = RecordingFactory()
    kwargs.setdefault("controlPath", None)
    kwargs.setdefault("installSignalHandlers", False)
    stops: list[bool] = []
    forgotten: list[bool] = []
    host = MigrationHost(
        reactor,
        application,
        listen,
        strategy,
        stopProcess=lambda: stops.append(True),
        forgetPidfile=lambda: forgotten.append(True),
        **kwargs,
    )
    h = Harness(reactor, application, strategy, host, stops, forgotten=forgotten)
    testCase.patch(_host, "releaseListener", h.released.append)
    return h


def started(testCase: SynchronousTestCase, **kwargs: Any) -> Harness:
    """
    A harness whose host has started serving.
    """
    h = harness(testCase, **kwargs)
    h.host.privilegedStartService()
    h.host.startService()
    return h


def reportFor(
    host: MigrationHost, outcome: MigrationOutcome, **kwargs: Any
) -> MigrationReport:
    return MigrationReport(
        strategy=host.strategy.name,
        outcome=outcome,
        fromGeneration=host.generation,
        oldPid=host.pid,
        listeners=tuple(ListenerReport(key) for key in host.listeners),
        **kwargs,
    )


def lost() -> Failure:
    return Failure(ConnectionDone())


def ignore(message: str) -> None:
    """
    A progress callable that ignores progress.
    """


class MigrationStrategyContractMixin:
    """
    What every L{IMigrationStrategy} promises.  Mix into a
    L{SynchronousTestCase} and define L{makeStrategy}; L{endMigration} makes
    a started migration end if the strategy needs help to.
    """

    def makeStrategy(self) -> Any:
        raise NotImplementedError()

    def endMigration(self, strategy: Any, host: MigrationHost) -> None:
        pass

    def test_interface(self) -> None:
        """
        The strategy provides L{IMigrationStrategy}.
        """
        self.assertTrue(verifyObject(IMigrationStrategy, self.makeStrategy()))  # type: ignore[attr-defined]

    def test_name(self) -> None:
        """
        The strategy's name is a non-empty L{str} without spaces (operators
        type it after C{--strategy}).
        """
        name = self.makeStrategy().name
        self.assertIsInstance(name, str)  # type: ignore[attr-defined]
        self.assertTrue(name)  # type: ignore[attr-defined]
        self.assertEqual(name.split(), [name])  # type: ignore[attr-defined]

    def test_migrateReturnsDeferredReport(self) -> None:
        """
        C{migrate} returns a L{Deferred} that fires with a
        L{MigrationReport} naming the strategy.
        """
        strategy = self.makeStrategy()
        h = harness(self, strategy=strategy)  # type: ignore[arg-type]
        h.host.privilegedStartService()
        d = strategy.migrate(h.host, ignore)
        self.assertIsInstance(d, Deferred)  # type: ignore[attr-defined]
        self.endMigration(strategy, h.host)
        report = self.successResultOf(d)  # type: ignore[attr-defined]
        self.assertIsInstance(report, MigrationReport)  # type: ignore[attr-defined]
        self.assertEqual(report.strategy, strategy.name)  # type: ignore[attr-defined]

    def makeInheritance(self) -> Any:
        return "inheritance"

    def test_inheritReturnsDeferred(self) -> None:
        """
        C{inherit} returns a L{Deferred}.
        """
        strategy = self.makeStrategy()
        h = harness(self, strategy=strategy, inheritance=True)  # type: ignore[arg-type]
        d = strategy.inherit(h.host, self.makeInheritance())
        self.assertIsInstance(d, Deferred)  # type: ignore[attr-defined]


@define
class _Inheritance:
    handoffDescriptor: int


class FakeStrategyContractTests(MigrationStrategyContractMixin, SynchronousTestCase):
    """
    L{FakeStrategy} keeps the L{IMigrationStrategy} contract.
    """

    def makeStrategy(self) -> FakeStrategy:
        return FakeStrategy()

    def endMigration(self, strategy: FakeStrategy, host: MigrationHost) -> None:
        strategy.migrations[-1].result.callback(
            reportFor(host, MigrationOutcome.success)
        )


class _SpawnFails:
    """
    For the real strategies: no process may start in a unit test, so the
    successor cannot start and the migration rolls back.
    """

    def setUp(self) -> None:
        def spawnSuccessor(*args: Any, **kwargs: Any) -> Any:
            raise OSError("no process starts in a unit test")

        self.patch(_outgoing, "spawnSuccessor", spawnSuccessor)  # type: ignore[attr-defined]

    def makeInheritance(self) -> Any:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)  # type: ignore[attr-defined]
        return _Inheritance(theirs.detach())

    def test_inheritConnects(self) -> None:
        """
        The incoming half connects the hand-off channel over the inherited
        descriptor, and closes that descriptor (the reactor has its own).
        """
        strategy = self.makeStrategy()  # type: ignore[attr-defined]
        h = harness(self, strategy=strategy, inheritance=True)  # type: ignore[arg-type]
        inheritance = self.makeInheritance()
        strategy.inherit(h.host, inheritance)
        [(fd, family, factory)] = h.reactor.adoptedStreamConnections
        self.assertEqual(  # type: ignore[attr-defined]
            (fd, family), (inheritance.handoffDescriptor, socket.AF_UNIX)
        )
        with self.assertRaises(OSError):  # type: ignore[attr-defined]
            os.fstat(fd)

    def test_rollsBackWhenSpawnFails(self) -> None:
        """
        A successor that cannot start rolls the migration back, with the
        reason.
        """
        strategy = self.makeStrategy()  # type: ignore[attr-defined]
        h = harness(self, strategy=strategy)  # type: ignore[arg-type]
        h.host.privilegedStartService()
        report = self.successResultOf(strategy.migrate(h.host, ignore))  # type: ignore[attr-defined]
        self.assertEqual(report.outcome, MigrationOutcome.rolledBack)  # type: ignore[attr-defined]
        self.assertEqual(report.reason, "OSError: no process starts in a unit test")  # type: ignore[attr-defined]


class GradualTransferContractTests(
    _SpawnFails, MigrationStrategyContractMixin, SynchronousTestCase
):
    """
    L{GradualTransfer} keeps the L{IMigrationStrategy} contract.
    """

    def makeStrategy(self) -> GradualTransfer:
        return GradualTransfer()


class CapabilityTransferContractTests(
    _SpawnFails, MigrationStrategyContractMixin, SynchronousTestCase
):
    """
    L{CapabilityTransfer} keeps the L{IMigrationStrategy} contract.
    """

    def makeStrategy(self) -> CapabilityTransfer:
        return CapabilityTransfer()


class ReexecStrategyContractTests(MigrationStrategyContractMixin, SynchronousTestCase):
    """
    L{ReexecStrategy} keeps the L{IMigrationStrategy} contract.  Nothing
    starts or executes in a unit test: the preflight says the new code does
    not load, so the migration is refused, and an inheritance without state
    fails the incoming half.
    """

    def makeStrategy(self) -> ReexecStrategy:
        def execv(path: str, argv: list[str], env: dict[str, str]) -> None:
            raise AssertionError("a unit test must never exec")

        return ReexecStrategy(
            partial(
                ReexecMigration,
                preflight=lambda *a, **k: succeed(("the new code fails", [])),
                checkArgv=lambda argv: None,
                execv=execv,
            )
        )

    def test_inheritReturnsDeferred(self) -> None:
        """
        C{inherit} returns a L{Deferred}, failing when what it is given is
        no re-exec state.
        """
        strategy = self.makeStrategy()
        h = harness(self, strategy=strategy, inheritance=True)
        d = strategy.inherit(h.host, self.makeInheritance())
        self.assertIsInstance(d, Deferred)
        self.failureResultOf(d)

    def test_refusedBeforeExec(self) -> None:
        """
        A host whose listeners cannot be carried through C{execv} (here: a
        memory reactor's) refuses the re-exec, with the reason, before any
        preflight or exec.
        """
        h = harness(self, strategy=self.makeStrategy())
        h.host.privilegedStartService()
        report = self.successResultOf(self.makeStrategy().migrate(h.host, ignore))
        self.assertEqual(
            (report.outcome, report.reason),
            (
                MigrationOutcome.refused,
                "listener tcp:8000 is not a listening TCP or Unix socket",
            ),
        )


class MigrationHostInterfaceTests(SynchronousTestCase):
    """
    L{MigrationHost} is the host every strategy is given.
    """

    def test_interface(self) -> None:
        """
        L{MigrationHost} provides L{IMigrationHost}.
        """
        h = harness(self)
        self.assertTrue(verifyObject(IMigrationHost, h.host))

    def test_phaseIsTheHosts(self) -> None:
        """
        A strategy tells the host its phase through C{enterPhase}; the
        host's C{phase} cannot be assigned from outside.
        """
        h = harness(self)
        h.host.enterPhase(MigrationPhase.committing)
        self.assertIs(h.host.phase, MigrationPhase.committing)
        with self.assertRaises(AttributeError):
            h.host.phase = MigrationPhase.idle  # type: ignore[misc]

    def test_settingsByKeyword(self) -> None:
        """
        The host's settings are a L{HostSettings}, given whole or as its
        fields by keyword; an unknown keyword is a L{TypeError}.
        """
        h = harness(self, readyTimeout=7.0)
        self.assertEqual(h.host.settings.readyTimeout, 7.0)
        self.assertEqual(
            MigrationHost(
                FakeReactor(),
                None,
                (),
                FakeStrategy(),
                HostSettings(controlPath=None, handoffTimeout=3.0),
                inheritance=None,
            ).settings.handoffTimeout,
            3.0,
        )
        with self.assertRaises(TypeError):
            harness(self, readyTimeOut=7.0)


class PlatformCheckTests(SynchronousTestCase):
    """
    An embedding application's host checks its reactor as it starts, as
    C{twistd migrate-host} does before it builds one.
    """

    def test_unsuitableReactorRefused(self) -> None:
        """
        On a reactor that cannot start processes, the host refuses to
        start, saying what is missing, before it listens.
        """
        reactor = MemoryReactorClock()
        h = harness(self, reactor=reactor)
        for start in (h.host.privilegedStartService, h.host.startService):
            with self.assertRaises(PlatformUnsupported) as raised:
                start()
            self.assertIn("IReactorProcess", str(raised.exception))
            self.assertIn("starting a successor", str(raised.exception))
        self.assertEqual(reactor.tcpServers, [])
        self.assertFalse(h.host.running)

    def test_suitableReactorStarts(self) -> None:
        """
        A reactor with what migrate needs passes the check: the host
        listens.
        """
        h = started(self)
        self.assertTrue(h.host.running)
        self.assertEqual(len(h.reactor.tcpServers), 1)


class FakeStrategyTests(SynchronousTestCase):
    """
    L{FakeStrategy} records what it is asked.
    """

    def test_recordsMigrations(self) -> None:
        """
        Each C{migrate} call is recorded with its host, progress callable and
        the L{Deferred} returned.
        """
        strategy = FakeStrategy("mine")
        progress: list[str] = []
        host: Any = "host"
        first = strategy.migrate(host, progress.append)
        second = strategy.migrate(host, progress.append)
        self.assertEqual(strategy.name, "mine")
        self.assertEqual(
            [(m.host, m.progress, m.result) for m in strategy.migrations],
            [("host", progress.append, first), ("host", progress.append, second)],
        )
        self.assertIsNot(first, second)
        self.assertNoResult(first)

    def test_recordsInheritances(self) -> None:
        """
        Each C{inherit} call is recorded with its host and inheritance.
        """
        strategy = FakeStrategy()
        host: Any = "host"
        d = strategy.inherit(host, "inheritance")
        [call] = strategy.inheritances
        self.assertEqual(
            (call.host, call.inheritance, call.result), ("host", "inheritance", d)
        )
        self.assertNoResult(d)


class ListeningTests(SynchronousTestCase):
    """
    The host listens on its endpoints and stops listening when stopped.
    """

    def test_listensOnEveryEndpoint(self) -> None:
        """
        Each endpoint description becomes a listening port serving the
        listener's tracking factory around the application's factory.
        """
        h = harness(self, listen=("tcp:8000", "tcp:port=8001:interface=127.0.0.1"))
        h.host.privilegedStartService()
        first = h.host.listeners["tcp:8000"]
        second = h.host.listeners["tcp:port=8001:interface=127.0.0.1"]
        self.assertEqual(
            h.reactor.tcpServers,
            [(8000, first.factory, 50, ""), (8001, second.factory, 50, "127.0.0.1")],
        )
        self.assertEqual([first.port, second.port], h.reactor.ports)
        self.assertIs(first.factory.wrappedFactory, h.application)
        self.assertEqual(first.address(), "tcp:0.0.0.0:8000")
        self.assertEqual(second.address(), "tcp:127.0.0.1:8001")

    def test_startServiceListens(self) -> None:
        """
        A host started with C{startService} alone (as a parent service that
        already ran its privileged start does) listens too, once.
        """
        alone = harness(self)
        alone.host.startService()
        self.assertEqual(len(alone.reactor.tcpServers), 1)
        self.assertIsNotNone(alone.host.listeners["tcp:8000"].port)
        both = started(self)
        self.assertEqual(len(both.reactor.tcpServers), 1)

    def test_listenerGivenTwice(self) -> None:
        """
        The same endpoint description given twice is refused.
        """
        with self.assertRaises(ValueError):
            harness(self, listen=("tcp:8000", "tcp:8000"))

    def test_inheritingDoesNotListen(self) -> None:
        """
        A successor does not listen: it inherits its listeners, through the
        inheriting strategy.
        """
        inheriting = FakeStrategy("inheriting")
        h = harness(self, inheritance="handed", inheritWith=inheriting)
        h.host.privilegedStartService()
        h.host.startService()
        self.assertEqual(h.reactor.tcpServers, [])
        self.assertFalse(h.host.serving)
        [call] = inheriting.inheritances
        self.assertEqual((call.host, call.inheritance), (h.host, "handed"))
        self.assertEqual(h.strategy.inheritances, [])

    def test_inheritFails(self) -> None:
        """
        A successor that cannot inherit logs why and ends its process.
        """
        h = harness(self, inheritance="handed")
        h.host.privilegedStartService()
        h.host.startService()
        self.assertEqual(h.stops, [])
        h.strategy.inheritances[0].result.errback(RuntimeError("cannot"))
        self.assertEqual(h.stops, [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopService(self) -> None:
        """
        Stopping the host stops its listening ports and control port.
        """
        h = started(self)
        control = RecordingPort("control")
        h.host.controlPort = control
        port = h.host.listeners["tcp:8000"].port
        stopping = h.host.stopService()
        assert stopping is not None
        self.successResultOf(stopping)
        self.assertEqual(port.events, ["stopListening"])  # type: ignore[union-attr]
        self.assertEqual(control.events, ["stopListening"])


class StatusTests(SynchronousTestCase):
    """
    L{MigrationHost.statusSnapshot} describes the host.
    """

    def test_shape(self) -> None:
        """
        The snapshot has the process, generation, strategy, phase, each
        listener with its connection count, the draining generations and
        the last report.
        """
        h = started(self, listen=("tcp:8000", "tcp:8001"))
        h.connect("tcp:8001")
        h.connect("tcp:8001")
        self.assertEqual(
            h.host.statusSnapshot(),
            {
                "pid": os.getpid(),
                "generation": 1,
                "strategy": "fake",
                "phase": "idle",
                "serving": True,
                "listeners": [
                    {
                        "key": "tcp:8000",
                        "address": "tcp:0.0.0.0:8000",
                        "connections": 0,
                    },
                    {
                        "key": "tcp:8001",
                        "address": "tcp:0.0.0.0:8001",
                        "connections": 2,
                    },
                ],
                "connections": 2,
                "draining": [],
                "maxDraining": None,
                "lastReport": None,
                "keeper": None,
            },
        )

    def test_connectionsGo(self) -> None:
        """
        A connection that ends is no longer counted.
        """
        h = started(self)
        hosted, _ = h.connect()
        h.connect()
        hosted.connectionLost(lost())
        self.assertEqual(h.host.statusSnapshot()["listeners"][0]["connections"], 1)
        self.assertEqual(h.host.statusSnapshot()["connections"], 1)

    def test_notListeningYet(self) -> None:
        """
        A listener without a port has an empty address.
        """
        h = harness(self)
        self.assertEqual(h.host.statusSnapshot()["listeners"][0]["address"], "")

    def test_phaseWhileMigrating(self) -> None:
        """
        The phase shows while a migration runs.
        """
        h = started(self)
        h.host.requestUpgrade(None, ignore)
        self.assertEqual(h.host.statusSnapshot()["phase"], "spawning")


class RequestUpgradeTests(SynchronousTestCase):
    """
    L{MigrationHost.requestUpgrade} runs one migration at a time.
    """

    def test_runsStrategy(self) -> None:
        """
        The configured strategy migrates the host, with the progress
        callable given.
        """
        h = started(self)
        progress: list[str] = []
        h.host.requestUpgrade(None, progress.append)
        [call] = h.strategy.migrations
        self.assertIs(call.host, h.host)
        self.assertEqual(call.progress, progress.append)
        self.assertEqual(h.host.phase, MigrationPhase.spawning)

    def test_secondMigrationWaits(self) -> None:
        """
        A migration requested while another runs waits for it to end (and
        says so), then starts.
        """
        h = started(self)
        h.host.requestUpgrade(None, ignore)
        progress: list[str] = []
        second = h.host.requestUpgrade(None, progress.append)
        self.assertNoResult(second)
        self.assertEqual(len(h.strategy.migrations), 1)
        self.assertIn("starts when it ends", progress[0])
        h.strategy.migrations[0].result.callback(
            reportFor(h.host, MigrationOutcome.rolledBack, reason="no")
        )
        h.reactor.advance(0)
        self.assertEqual(len(h.strategy.migrations), 2)
        self.assertEqual(h.host.phase, MigrationPhase.spawning)
        self.assertNoResult(second)

    def test_secondMigrationWaitsBounded(self) -> None:
        """
        Should the running migration not end within the ready and hand-off
        timeouts together, the waiting one is refused with
        L{MigrationInProgress}, with a hint to try again; the strategy is not
        asked again.
        """
        h = started(self, readyTimeout=2.0, handoffTimeout=3.0)
        h.host.requestUpgrade(None, ignore)
        second = h.host.requestUpgrade(None, ignore)
        h.reactor.advance(4.9)
        self.assertNoResult(second)
        h.reactor.advance(0.2)
        failure = self.failureResultOf(second, MigrationInProgress)
        self.assertEqual(
            failure.getErrorMessage(),
            "a migration is already running (phase: spawning) and did not end "
            "within 5 s; try again (upgrade --wait retries)",
        )
        self.assertEqual(len(h.strategy.migrations), 1)

    def test_unknownStrategy(self) -> None:
        """
        A strategy the host cannot find by name is refused with
        L{UnknownStrategy} naming it, and nothing starts.
        """

        def strategyNamed(name: str) -> Any:
            raise KeyError(name)

        h = started(self, strategyNamed=strategyNamed)
        failure = self.failureResultOf(
            h.host.requestUpgrade("nonesuch", ignore), UnknownStrategy
        )
        self.assertEqual(failure.getErrorMessage(), "unknown strategy 'nonesuch'")
        self.assertEqual(h.host.phase, MigrationPhase.idle)
        self.assertEqual(h.strategy.migrations, [])

    def test_namedStrategy(self) -> None:
        """
        A strategy named in the request is used instead of the configured
        one; the configured one's own name needs no look-up.
        """
        other = FakeStrategy("other")
        h = started(self, strategyNamed={"other": other}.__getitem__)
        h.host.requestUpgrade("other", ignore)
        self.assertEqual(len(other.migrations), 1)
        self.assertEqual(h.strategy.migrations, [])
        other.migrations[0].result.callback(reportFor(h.host, MigrationOutcome.success))
        h.host.requestUpgrade("fake", ignore)
        self.assertEqual(len(h.strategy.migrations), 1)

    def test_notServing(self) -> None:
        """
        A host that does not serve (it inherits, or has handed on) refuses
        to migrate.
        """
        h = harness(self, inheritance="handed")
        failure = self.failureResultOf(
            h.host.requestUpgrade(None, ignore), MigrationInProgress
        )
        self.assertIn("no longer serves", failure.getErrorMessage())
        self.assertEqual(h.strategy.migrations, [])

    def test_reportStored(self) -> None:
        """
        The report becomes C{lastReport}, the answer is its JSON form, and
        the phase is idle again.
        """
        h = started(self)
        d = h.host.requestUpgrade(None, ignore)
        self.assertNoResult(d)
        report = reportFor(h.host, MigrationOutcome.rolledBack, reason="because")
        h.strategy.migrations[0].result.callback(report)
        self.assertEqual(self.successResultOf(d), report.toJSON())
        self.assertIs(h.host.lastReport, report)
        self.assertEqual(h.host.statusSnapshot()["lastReport"], report.toJSON())
        self.assertEqual(h.host.phase, MigrationPhase.idle)

    def test_anotherAfterTheFirst(self) -> None:
        """
        Once a migration has ended, another may start.
        """
        h = started(self)
        h.host.requestUpgrade(None, ignore)
        h.strategy.migrations[0].result.callback(
            reportFor(h.host, MigrationOutcome.success)
        )
        h.host.requestUpgrade(None, ignore)
        self.assertEqual(len(h.strategy.migrations), 2)

    def test_strategyCrashed(self) -> None:
        """
        A strategy whose L{Deferred} fails (it should never) leaves the host
        idle and ready for another migration; the failure is logged and
        passed on, and C{lastReport} is unchanged.
        """
        h = started(self)
        d = h.host.requestUpgrade(None, ignore)
        h.strategy.migrations[0].result.errback(ZeroDivisionError("oops"))
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual(h.host.phase, MigrationPhase.idle)
        self.assertIsNone(h.host.lastReport)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        h.host.requestUpgrade(None, ignore)
        self.assertEqual(len(h.strategy.migrations), 2)

    def test_strategyRaises(self) -> None:
        """
        A strategy whose C{migrate} raises leaves the host idle too.
        """

        class Raising(FakeStrategy):
            def migrate(self, host: Any, progress: Any) -> Any:
                raise ValueError("at once")

        h = started(self, strategy=Raising())
        self.failureResultOf(h.host.requestUpgrade(None, ignore), ValueError)
        self.assertEqual(h.host.phase, MigrationPhase.idle)
        self.flushLoggedErrors(ValueError)


class OverrideTests(SynchronousTestCase):
    """
    C{python -m migrate upgrade --ready-timeout/--drain-timeout}: settings
    for one migration.
    """

    def test_forThisMigration(self) -> None:
        """
        The strategy sees the overridden settings while it migrates; a host
        that serves on afterwards has its own settings back.
        """
        h = started(self)
        own = h.host.settings
        h.host.requestUpgrade(None, ignore, {"readyTimeout": 2.5, "drainTimeout": 7.0})
        self.assertEqual(
            (h.host.settings.readyTimeout, h.host.settings.drainTimeout), (2.5, 7.0)
        )
        self.assertEqual(h.host.settings.controlPath, own.controlPath)
        h.strategy.migrations[0].result.callback(
            reportFor(h.host, MigrationOutcome.rolledBack, reason="no")
        )
        self.assertIs(h.host.settings, own)

    def test_handedOnKeepsDrainDeadline(self) -> None:
        """
        A generation that handed on keeps the overridden settings: its drain
        deadline is the one this upgrade asked for.
        """
        h = started(self)
        h.host.requestUpgrade(None, ignore, {"drainTimeout": 3.0})
        h.host.serving = False
        h.strategy.migrations[0].result.callback(
            reportFor(h.host, MigrationOutcome.success)
        )
        self.assertEqual(h.host.settings.drainTimeout, 3.0)

    def test_refused(self) -> None:
        """
        An override that is not a positive number of seconds, or of a
        setting that cannot be overridden, is refused with L{ValueError}
        and nothing starts.
        """
        h = started(self)
        cases: list[dict[str, Any]] = [
            {"readyTimeout": 0},
            {"drainTimeout": float("inf")},
            {"readyTimeout": True},
            {"controlPath": 1.0},
        ]
        for overrides in cases:
            self.failureResultOf(
                h.host.requestUpgrade(None, ignore, overrides), ValueError
            )
        self.assertEqual(h.strategy.migrations, [])
        self.assertEqual(h.host.phase, MigrationPhase.idle)


class SignalTests(SynchronousTestCase):
    """
    C{SIGHUP} migrates a serving host.
    """

    def setUp(self) -> None:
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.original = original

    def test_installedAndRestored(self) -> None:
        """
        Serving installs a C{SIGHUP} handler; stopping restores the one
        before.
        """
        h = started(self, installSignalHandlers=True)
        installed = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(installed, self.original)
        self.assertTrue(callable(installed))
        h.host.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.original)

    def test_notInstalled(self) -> None:
        """
        With C{installSignalHandlers=False}, C{SIGHUP} is left alone.
        """
        started(self, installSignalHandlers=False)
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.original)

    def test_hangupMigrates(self) -> None:
        """
        The handler starts a migration with the configured strategy from the
        reactor thread, not from inside the signal handler.
        """
        h = started(self, installSignalHandlers=True)
        handler = signal.getsignal(signal.SIGHUP)
        handler(signal.SIGHUP, None)  # type: ignore[operator, misc]
        self.assertEqual(h.strategy.migrations, [])
        h.reactor.advance(0)
        self.assertEqual(len(h.strategy.migrations), 1)

    def test_hangupWhileMigrating(self) -> None:
        """
        A C{SIGHUP} during a migration starts none, with a warning; the
        lifecycle observers hear that a reload joined the running one.
        """
        h = started(self, installSignalHandlers=True)
        joined: list[object] = []

        class Observer:
            def reloadJoined(self, host: object) -> None:
                joined.append(host)

        observer: Any = Observer()
        h.host.addObserver(observer)
        h.host.requestUpgrade(None, ignore)
        with capturedLogs() as events:
            signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # type: ignore[operator, misc]
            h.reactor.advance(0)
        self.assertEqual(len(h.strategy.migrations), 1)
        self.assertEqual(joined, [h.host])
        self.assertIn(
            "SIGHUP during a migration", "".join(e["log_format"] for e in events)
        )

    def test_handOnRestores(self) -> None:
        """
        A host that hands on no longer migrates on C{SIGHUP}, nor dies of
        it: it logs that its successor takes migrations.
        """
        h = started(self, installSignalHandlers=True)
        h.host.handOn(lambda entries: None)
        handler = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(handler, self.original)
        self.assertNotIn(handler, (signal.SIG_DFL, None))
        with capturedLogs() as events:
            handler(signal.SIGHUP, None)  # type: ignore[operator, misc]
            h.reactor.advance(0)
        self.assertEqual(h.host.phase, MigrationPhase.idle)
        self.assertIn("SIGHUP ignored", "".join(e["log_format"] for e in events))
        h.host.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.original)


class HandOnTests(SynchronousTestCase):
    """
    L{MigrationHost.handOn}: the old side lets go of its listeners and
    control socket, drains its connections and exits.
    """

    def test_releases(self) -> None:
        """
        Listeners and the control port are released (not stopped: another
        process holds them), the pidfile is forgotten and the host no longer
        serves or migrates.
        """
        h = started(self, listen=("tcp:8000", "tcp:8001"))
        control = RecordingPort("control")
        h.host.controlPort = control
        ports = [each.port for each in h.host.listeners.values()]
        h.host.handOn(lambda entries: None)
        self.assertEqual(h.released, ports + [control])
        self.assertIsNone(h.host.controlPort)
        self.assertEqual(h.forgotten, [True])
        self.assertFalse(h.host.serving)
        self.failureResultOf(h.host.requestUpgrade(None, ignore), MigrationInProgress)
        self.assertIsNone(h.host.stopService())
        self.assertEqual([port.events for port in ports], [[], []])  # type: ignore[union-attr]

    def test_exitsWhenDrained(self) -> None:
        """
        Once its last connection ends, the process stops (a moment later,
        for answers already written to reach their readers).
        """
        h = started(self)
        first, _ = h.connect()
        second, _ = h.connect()
        h.host.handOn(lambda entries: None)
        first.connectionLost(lost())
        h.reactor.advance(10)
        self.assertEqual(h.stops, [])
        second.connectionLost(lost())
        h.reactor.advance(0)
        self.assertEqual(h.stops, [])
        h.reactor.advance(0.2)
        self.assertEqual(h.stops, [True])
        h.reactor.advance(10)
        self.assertEqual(h.stops, [True])

    def test_exitsAtOnceWithoutConnections(self) -> None:
        """
        Without connections the process stops right after handing on.
        """
        h = started(self)
        h.host.handOn(lambda entries: None)
        h.reactor.advance(0.2)
        self.assertEqual(h.stops, [True])

    def test_drainDeadline(self) -> None:
        """
        At the drain deadline the remaining connections are closed cleanly
        (C{loseConnection}); the process stops once they have ended.
        """
        h = started(self, drainTimeout=30.0)
        first, firstTransport = h.connect()
        second, secondTransport = h.connect()
        h.host.handOn(lambda entries: None)
        h.reactor.advance(29)
        self.assertFalse(firstTransport.disconnecting)
        h.reactor.advance(1)
        self.assertTrue(firstTransport.disconnecting)
        self.assertTrue(secondTransport.disconnecting)
        self.assertEqual(h.stops, [])
        first.connectionLost(lost())
        second.connectionLost(lost())
        h.reactor.advance(0)
        h.reactor.advance(0.2)
        self.assertEqual(h.stops, [True])

    def test_deadlineCancelledWhenDrained(self) -> None:
        """
        A process that drains before its deadline leaves no call behind.
        """
        h = started(self, drainTimeout=30.0)
        hosted, transport = h.connect()
        h.host.handOn(lambda entries: None)
        hosted.connectionLost(lost())
        h.reactor.advance(0)
        h.reactor.advance(0.2)
        self.assertEqual(h.stops, [True])

    def test_reportsDrainOnChange(self) -> None:
        """
        The draining generations are reported at once and then whenever
        they change, and only then.
        """
        h = started(self)
        first, _ = h.connect()
        h.connect()
        reports: list[Any] = []
        h.host.handOn(reports.append)
        me = {"generation": 1, "pid": os.getpid()}
        self.assertEqual(reports, [[dict(me, connections=2)]])
        first.connectionLost(lost())
        h.reactor.advance(0)
        self.assertEqual(reports[1:], [[dict(me, connections=1)]])
        h.host.updateDraining([], viaPid=99)
        h.reactor.advance(0)
        self.assertEqual(len(reports), 2)
        self.assertEqual(h.host.statusSnapshot()["draining"], [dict(me, connections=1)])

    def test_reporterFails(self) -> None:
        """
        A drain reporter that raises is logged; draining goes on.
        """
        h = started(self)

        def broken(entries: Any) -> None:
            raise RuntimeError("channel gone")

        h.host.handOn(broken)
        h.reactor.advance(0.2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(h.stops, [True])

    def test_relaysOlderGenerations(self) -> None:
        """
        A draining process relays what older generations report through
        it, and stays (to relay) until they have ended too.
        """
        h = started(self)
        h.host.generation = 2
        reports: list[Any] = []
        older = {"generation": 1, "pid": 10, "connections": 4}
        h.host.updateDraining([older], viaPid=10)
        h.host.handOn(reports.append)
        me = {"generation": 2, "pid": os.getpid(), "connections": 0}
        self.assertEqual(reports, [[older, me]])
        h.reactor.advance(1)
        self.assertEqual(h.stops, [])
        h.host.updateDraining([dict(older, connections=3)], viaPid=10)
        self.assertEqual(reports[-1], [dict(older, connections=3), me])
        h.host.forgetDraining(10)
        self.assertEqual(reports[-1], [me])
        h.reactor.advance(0.2)
        self.assertEqual(h.stops, [True])


class DrainingRelayTests(SynchronousTestCase):
    """
    A serving host shows the older generations still draining.
    """

    def test_updateAndForget(self) -> None:
        """
        L{MigrationHost.updateDraining} replaces what was reported through
        the same process; L{MigrationHost.forgetDraining} removes it.
        """
        h = started(self)
        h.host.updateDraining(
            [
                {"generation": 2, "pid": 20, "connections": 5},
                {"generation": 1, "pid": 10, "connections": 1},
            ],
            viaPid=20,
        )
        self.assertEqual(
            h.host.statusSnapshot()["draining"],
            [
                {"generation": 1, "pid": 10, "connections": 1},
                {"generation": 2, "pid": 20, "connections": 5},
            ],
        )
        h.host.updateDraining(
            [{"generation": 2, "pid": 20, "connections": 4}], viaPid=20
        )
        self.assertEqual(
            h.host.statusSnapshot()["draining"],
            [{"generation": 2, "pid": 20, "connections": 4}],
        )
        h.host.forgetDraining(20)
        self.assertEqual(h.host.statusSnapshot()["draining"], [])
        self.assertEqual(h.stops, [])

    def test_inheritingIsNotDraining(self) -> None:
        """
        A successor that has not committed yet is not listed as draining.
        """
        h = harness(self, inheritance="handed")
        self.assertEqual(h.host.statusSnapshot()["draining"], [])


class InheritanceTests(SynchronousTestCase):
    """
    The successor's side: L{MigrationHost.commitInheritance} and
    L{MigrationHost.abandonInheritance}.
    """

    def inheriting(self, **kwargs: Any) -> Harness:
        h = harness(
            self, listen=("tcp:8000", "tcp:8001"), inheritance="handed", **kwargs
        )
        h.host.privilegedStartService()
        h.host.startService()
        for number, listener in enumerate(h.host.listeners.values()):
            listener.port = RecordingPort(
                IPv4Address("TCP", "0.0.0.0", 8000 + number),
                fileno=200 + number,
                reading=False,
            )
        h.host.adoptControlPort(RecordingPort("control", fileno=300, reading=False))
        return h

    def test_commit(self) -> None:
        """
        Committing resumes the adopted listeners and control port, writes the
        pidfile and serves as the given generation.
        """
        pidfile = self.mktemp()
        h = self.inheriting(pidfile=pidfile)
        ports = [each.port for each in h.host.listeners.values()] + [h.host.controlPort]
        h.host.commitInheritance(5)
        self.assertEqual([port.reading for port in ports], [True, True, True])  # type: ignore[union-attr]
        with open(pidfile, "rb") as f:
            self.assertEqual(f.read(), b"%d\n" % (os.getpid(),))
        self.assertTrue(h.host.serving)
        self.assertIsNone(h.host.inheritance)
        self.assertEqual(h.host.generation, 5)
        self.assertEqual(h.host.statusSnapshot()["generation"], 5)
        h.host.requestUpgrade(None, ignore)
        self.assertEqual(len(h.strategy.migrations), 1)

    def test_pidfileWrittenAhead(self) -> None:
        """
        A successor writes its pidfile's content as it starts, and the
        commit only puts it in place: it does not write it then.
        """
        pidfile = os.path.abspath(self.mktemp())
        h = self.inheriting(pidfile=pidfile)
        self.assertFalse(os.path.exists(pidfile))

        def notNow(path: str, pid: int) -> None:
            self.fail("the pidfile was written at the commit")

        self.patch(_host, "writePidfile", notNow)
        h.host.commitInheritance(2)
        with open(pidfile, "rb") as f:
            self.assertEqual(f.read(), b"%d\n" % (os.getpid(),))

    def test_pidfileAheadFails(self) -> None:
        """
        A pidfile that cannot be written ahead is logged; the commit writes
        it.
        """
        pidfile = os.path.abspath(self.mktemp())

        def full(path: str, pid: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(_host, "preparePidfile", full)
        h = self.inheriting(pidfile=pidfile)
        h.host.commitInheritance(2)
        with open(pidfile, "rb") as f:
            self.assertEqual(f.read(), b"%d\n" % (os.getpid(),))

    def test_abandonLeavesPidfile(self) -> None:
        """
        A successor that gives up leaves the pidfile as it was.
        """
        pidfile = os.path.abspath(self.mktemp())
        with open(pidfile, "wb") as f:
            f.write(b"1\n")
        h = self.inheriting(pidfile=pidfile)
        h.host.abandonInheritance("the old process went away")
        with open(pidfile, "rb") as f:
            self.assertEqual(f.read(), b"1\n")
        self.assertEqual(
            os.listdir(os.path.dirname(pidfile)),
            [os.path.basename(pidfile)],
        )

    def test_commitWithoutPidfile(self) -> None:
        """
        Without a pidfile, committing writes none.
        """
        h = self.inheriting()
        before = set(os.listdir("."))
        h.host.commitInheritance(2)
        self.assertEqual(set(os.listdir(".")), before)
        self.assertTrue(h.host.serving)

    def test_abandon(self) -> None:
        """
        Abandoning releases every adopted port (the previous generation
        keeps them) and ends the process.
        """
        h = self.inheriting()
        ports = [each.port for each in h.host.listeners.values()] + [h.host.controlPort]
        h.host.abandonInheritance("the old process went away")
        self.assertEqual(h.released, ports)
        self.assertEqual(
            [each.port for each in h.host.listeners.values()], [None, None]
        )
        self.assertIsNone(h.host.controlPort)
        self.assertEqual(h.stops, [True])
        self.assertFalse(h.host.serving)
        self.assertIsNone(h.host.stopService())
        self.assertEqual([port.events for port in ports], [[], [], []])  # type: ignore[union-attr]


class CloseDrainingTests(SynchronousTestCase):
    """
    L{MigrationHost.closeGeneration} makes room for a newer generation
    (C{--max-draining}).
    """

    def test_ownConnectionsClosed(self) -> None:
        """
        A draining process told to close its own generation closes its
        connections cleanly now, before its deadline, says so in its drain
        report, and stops once they have ended.
        """
        h = started(self, drainTimeout=300.0)
        hosted, transport = h.connect()
        reports: list[Any] = []
        h.host.handOn(reports.append)
        self.assertTrue(h.host.closeGeneration(h.host.generation))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reports[-1][-1]["closing"], True)
        hosted.connectionLost(lost())
        h.reactor.advance(0)
        h.reactor.advance(0.2)
        self.assertEqual(h.stops, [True])

    def test_olderToldThroughItsChannel(self) -> None:
        """
        An older generation is told over the channel its reports come
        through; one with no channel cannot be told.
        """
        h = started(self)
        sent: list[tuple[Any, dict[str, Any]]] = []

        class Channel:
            transport = object()

            def callRemote(self, command: Any, **arguments: Any) -> None:
                sent.append((command, arguments))

        h.host.reportChannels[20] = Channel()
        h.host.updateDraining(
            [
                {"generation": 1, "pid": 10, "connections": 1},
                {"generation": 2, "pid": 20, "connections": 1},
            ],
            viaPid=20,
        )
        self.assertTrue(h.host.closeGeneration(1))
        [(command, arguments)] = sent
        self.assertEqual(
            (command.__name__, arguments), ("CloseDraining", {"generation": 1})
        )
        self.assertFalse(h.host.closeGeneration(7))

    def test_statusShowsTheLimit(self) -> None:
        """
        C{status} shows the limit.
        """
        h = started(self, maxDraining=3)
        self.assertEqual(h.host.statusSnapshot()["maxDraining"], 3)
