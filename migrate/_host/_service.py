"""
The host service: owns an application's listeners, knows its live
connections, runs the control channel, and migrates the service to new code
when asked to.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from attrs import define, evolve
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._handoff._listeners import pauseListener, releaseListener, resumeListener
from .._report import MigrationPhase, MigrationReport
from .._systemd import activatedEndpoint, isActivated
from ..interfaces import IMigrationHost, IMigrationStrategy
from ._draining import ANSWER_GRACE_SECONDS, DrainTracker
from ._heap import heapFrozenDuring
from ._metrics import HostMetrics
from ._pidfile import (
    PreparedPidfile,
    preparePidfile,
    removePidfileNaming,
    writePidfile,
)
from ._platform import checkPlatform
from ._settings import HostSettings
from ._spawning import prepareSpawning
from ._tracking import TrackingFactory, unclaimedFactory

__all__ = ["MigrationHost", "HostedListener", "NotServing"]


class ILifecycleObserver(Protocol):
    """
    Told about the moments of a host's life that supervisors care about
    (systemd's notification protocol, for one).  Every method is optional.
    """

    def serving(self, host: "MigrationHost") -> None:
        """
        The host serves (at start, or after inheriting the service).
        """

    def migrationStarted(self, host: "MigrationHost") -> None:
        """
        A migration begins.
        """

    def reloadJoined(self, host: "MigrationHost") -> None:
        """
        A migration was asked for by C{SIGHUP} (a supervisor's reload)
        while one runs: the reload ends with the running one.
        """

    def migrationEnded(self, host: "MigrationHost", report: MigrationReport) -> None:
        """
        A migration ended (committed or rolled back); C{host} may now
        drain for another process.
        """

    def handedOn(self, host: "MigrationHost", newPid: int) -> None:
        """
        The service now belongs to process C{newPid}; this one drains.
        """


def _serverFromString(reactor: Any, description: str) -> Any:
    # Imported when first listening: a successor or re-executed image, which
    # inherits its listeners, never needs the endpoint parsers (they import
    # TLS support).
    from twisted.internet.endpoints import serverFromString

    return serverFromString(reactor, description)


class CannotListenTwice(Exception):
    """
    The hosted application opened the same listener twice.
    """


class NotServing(Exception):
    """
    This process hands its service on and no longer takes migrations.
    """


@define
class HostedListener:
    """
    One of the application's listeners.

    @ivar key: the endpoint description it was configured with; the same key
        names it in every generation.
    @ivar factory: the tracking wrapper around the application's factory.
    @ivar port: the listening port, once listening or adopted.
    """

    key: str
    factory: TrackingFactory
    port: IListeningPort | None = None

    def address(self) -> str:
        """
        Where the listener listens, for status output.
        """
        if self.port is None:
            return ""
        host = self.port.getHost()
        name = getattr(host, "name", None)
        if name is not None:
            return "unix:" + (name.decode() if isinstance(name, bytes) else str(name))
        return "{}:{}:{}".format(
            getattr(host, "type", "?").lower(), host.host, host.port  # type: ignore[attr-defined]
        )


def _builtInStrategyNamed(name: str) -> IMigrationStrategy:
    from ..strategies import strategyNamed

    return strategyNamed(name)


class _Detect:
    """
    The default of C{inheritance}: find out from the environment.
    """

    def __repr__(self) -> str:
        return "<from the environment>"


FROM_ENVIRONMENT: Any = _Detect()


#: the settings C{python -m migrate upgrade} may override for one migration
OVERRIDABLE = ("readyTimeout", "drainTimeout")


def _overridden(settings: HostSettings, overrides: Mapping[str, float]) -> HostSettings:
    """
    C{settings} with C{overrides} for one migration.

    @raise ValueError: for a setting not in L{OVERRIDABLE}, or a value that
        is not a positive, finite number of seconds.
    """
    for name, value in overrides.items():
        if name not in OVERRIDABLE:
            raise ValueError("{} cannot be overridden".format(name))
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not 0 < value < float("inf")
        ):
            raise ValueError(
                "{} must be a positive number of seconds, not {!r}".format(name, value)
            )
    changes: dict[str, Any] = dict(overrides)
    return evolve(settings, **changes) if changes else settings


@implementer(IMigrationHost)
class MigrationHost(MultiService):
    """
    Hosts an application's protocol factory on one or more listeners and
    moves the service to new code on demand.

    Build one with the application's factory, its endpoint descriptions and
    a strategy, and add it to a service tree; nothing else in the
    application changes.  Or give it a whole application service (another
    twistd plugin's, unmodified) whose listening ports it intercepts: the
    host's children are that application.  A migration starts on C{SIGHUP},
    on the control channel's C{upgrade} command, or when L{requestUpgrade}
    is called.

    @ivar settings: the L{HostSettings}.
    @ivar generation: 1 for a freshly started service, one more for each
        migration to a new process or image.
    @ivar serving: whether this process serves (takes new connections and
        migrations); L{False} while it inherits a service or drains one.
    @ivar lastReport: the last migration's report.
    @ivar metrics: what the metrics endpoint shows and carries to the next
        generation (L{HostSettings.metricsEndpoint}), or L{None}.
    @ivar metricsPort: the metrics endpoint's listening port, or L{None}.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        applicationFactory: IProtocolFactory | None,
        listen: Sequence[str],
        strategy: IMigrationStrategy,
        settings: HostSettings | None = None,
        *,
        strategyNamed: Callable[[str], IMigrationStrategy] = _builtInStrategyNamed,
        forgetPidfile: Callable[[], None] = lambda: None,
        inheritance: Any = FROM_ENVIRONMENT,
        inheritWith: IMigrationStrategy | None = None,
        stopProcess: Callable[[], None] | None = None,
        keeper: Any = None,
        applicationService: IService | None = None,
        **options: Any,
    ) -> None:
        """
        @param reactor: the reactor (listening, process, time, sockets).
        @param applicationFactory: the application's protocol factory.
        @param listen: endpoint descriptions (C{tcp:8000}, C{unix:/path}).
        @param strategy: what a migration does unless told otherwise.
        @param settings: timeouts, paths and strategy options; or give
            L{HostSettings}' fields as keyword arguments instead
            (C{readyTimeout=5}).
        @param strategyNamed: finds another strategy by name, raising
            L{KeyError} for an unknown one (C{upgrade --strategy NAME});
            by default, the strategies that ship with migrate.
        @param forgetPidfile: tells the process runner not to remove the
            pidfile at exit (a successor owns it then).
        @param inheritance: what a previous generation hands on, given to
            the strategy's C{inherit}; by default it is found in the
            environment (a successor or a re-executed image is told there),
            so that an embedding application needs nothing more; L{None} for
            a first generation.
        @param inheritWith: the strategy whose incoming half inherits the
            service (the one the previous generation migrated with; default:
            C{strategy}).
        @param stopProcess: ends this process once it has handed everything
            on (default: stop the reactor).
        @param keeper: this process's part in keeping the process a
            supervisor started (L{migrate._host._keeping.keeperFor}); told
            about this host's lifecycle, asked before a migration that would
            end this process, shown by C{status}.  L{None}: no keeper (an
            embedding application's host).
        @param applicationService: an application service (another twistd
            plugin's) to host as this host's child; its listening ports are
            owned by the host when a L{ListeningInterceptor} is installed on
            the reactor.

        @raise TypeError: for a keyword that is no field of L{HostSettings}.
        """
        MultiService.__init__(self)
        if settings is None:
            settings = HostSettings(**options)
        elif options:
            raise TypeError("give settings or their fields, not both")
        self.settings = settings
        self.reactor = reactor
        self.applicationFactory = applicationFactory
        self.strategy = strategy
        self.strategyNamed = strategyNamed
        self.forgetPidfile = forgetPidfile
        if inheritance is FROM_ENVIRONMENT:
            from ._inheritance import inheritedGeneration

            inheritance, detected = inheritedGeneration(strategyNamed, strategy)
            inheritWith = inheritWith or detected
        self.inheritance = inheritance
        self.inheritWith = inheritWith if inheritWith is not None else strategy
        self.stopProcess = stopProcess if stopProcess is not None else reactor.stop
        self.acceptsAnyListener = applicationService is not None
        if applicationService is not None:
            applicationService.setServiceParent(self)
        self.listeners: dict[str, HostedListener] = {}
        if listen and applicationFactory is None:
            raise ValueError("listeners need an application factory")
        for key in listen:
            assert applicationFactory is not None
            if key in self.listeners:
                raise ValueError("listener {!r} given twice".format(key))
            self.listeners[key] = HostedListener(
                key, TrackingFactory(key, applicationFactory, self._connectionsChanged)
            )
        self.controlPort: IListeningPort | None = None
        self.metrics: HostMetrics | None = None
        if self.settings.metricsEndpoint is not None:
            self.metrics = HostMetrics(self, reactor.seconds)
        self.metricsPort: IListeningPort | None = None
        self.generation = 1
        self._phase = MigrationPhase.idle
        self.serving = inheritance is None
        self.handingOn = False
        self.lastReport: MigrationReport | None = None
        self._drain = DrainTracker(
            reactor, self.allConnections, self._ownDrainEntry, self.stopProcess
        )
        self.observers: list[Any] = []
        self._migration: Deferred[Any] | None = None
        self._abortMigration: Callable[[str], None] | None = None
        self._previousHangup: Any = None
        self._pidfileAhead: PreparedPidfile | None = None
        self.pid = os.getpid()
        #: this process's part in keeping the process a supervisor started
        #: (L{migrate._host._keeping}), if any
        self.keeper = keeper
        if keeper is not None:
            self.addObserver(keeper)

    @property
    def phase(self) -> MigrationPhase:
        """
        The phase of the migration in progress (C{idle} when none).
        """
        return self._phase

    def enterPhase(self, phase: MigrationPhase) -> None:
        """
        The running migration enters C{phase}.
        """
        self._phase = phase

    def abortWith(self, abort: Callable[[str], None] | None) -> None:
        """
        Call C{abort} with a reason if this host stops while the running
        migration can still roll back.
        """
        self._abortMigration = abort

    @property
    def draining(self) -> dict[int, dict[str, Any]]:
        """
        Older generations still draining, by generation: JSON-compatible
        dictionaries.
        """
        return self._drain.draining

    @property
    def reportChannels(self) -> dict[int, Any]:
        """
        The channels older generations report their draining over, by the
        PID at their other end.
        """
        return self._drain.channels

    # Service

    def privilegedStartService(self) -> None:
        # An embedding application's host is checked here, before it
        # listens (twistd's plugin checks earlier, before it daemonises).
        checkPlatform(self.reactor)
        # While few descriptors are open (see _spawning).
        prepareSpawning()
        # twistd daemonises between building the service and starting it:
        # the process that serves is the one that starts it.
        self.pid = os.getpid()
        if self.inheritance is None:
            self._listenAll()
            MultiService.privilegedStartService(self)
        else:
            # A successor starts its application once it holds the
            # inherited listeners (see prepareApplication).
            Service.privilegedStartService(self)

    def startService(self) -> None:
        checkPlatform(self.reactor)
        prepareSpawning()
        self.pid = os.getpid()
        if self.inheritance is None:
            # Listen here too when privilegedStartService was not called
            # (a service started on its own); listeners already open stay.
            self._listenAll()
            MultiService.startService(self)
            self._startControl()
            self._startMetrics()
            self._serve()
        else:
            Service.startService(self)
            self._log.info(
                "Generation successor {pid} starting: inheriting the service",
                pid=self.pid,
            )
            self._preparePidfile()
            d = maybeDeferred(self.inheritWith.inherit, self, self.inheritance)
            d.addErrback(self._inheritFailed)

    def stopService(self) -> Deferred[None] | None:
        self._restoreHangup()
        if self.phase is not MigrationPhase.idle and self._migration is not None:
            # Stopping in the middle of a migration: abort it (the successor
            # is killed and everything resumed here) before closing anything,
            # so that no socket the successor holds is shut down under it.
            self._log.warn("Stopping during a migration: aborting it first")
            if self._abortMigration is not None:
                self._abortMigration("this process is stopping")
            waiting: Deferred[Any] = Deferred()

            def migrationEnded(result: Any) -> Any:
                waiting.callback(None)
                return result

            self._migration.addBoth(migrationEnded)
            # The rolled-back report was just written to the upgrade's
            # caller: give it a moment to leave before the shutdown closes
            # that connection unflushed.
            waiting.addCallback(
                lambda _: deferLater(self.reactor, ANSWER_GRACE_SECONDS, lambda: None)
            )
            return waiting.addCallback(lambda _: self._stopNow())
        return self._stopNow()

    def _stopNow(self) -> Deferred[None] | None:
        stops = []
        if self.settings.pidfile:
            # A successor or re-executed image did not write its pidfile in
            # twistd's eyes, so twistd would leave it behind.
            if removePidfileNaming(self.settings.pidfile, self.pid):
                self.forgetPidfile()
        if self._applicationStarted():
            stops.append(maybeDeferred(MultiService.stopService, self))
        else:
            Service.stopService(self)
        for listener in self.listeners.values():
            if listener.port is not None and not self.handingOn:
                if isActivated(listener.key):
                    # systemd keeps the socket for the next activation: no
                    # shutdown(), no unlink.
                    releaseListener(listener.port)
                else:
                    stops.append(maybeDeferred(listener.port.stopListening))
        if self.controlPort is not None and not self.handingOn:
            stops.append(maybeDeferred(self.controlPort.stopListening))
        if self.metricsPort is not None and not self.handingOn:
            stops.append(maybeDeferred(self.metricsPort.stopListening))
        if not stops:
            return None
        from twisted.internet.defer import gatherResults

        return gatherResults(stops).addCallback(lambda _: None)

    def _applicationStarted(self) -> bool:
        return any(child.running for child in self)

    def prepareApplication(self) -> None:
        """
        Start the hosted application in a successor, once the inherited
        listeners are here: the ports it opens claim them.
        """
        if self._applicationStarted():
            return
        for child in self:
            child.privilegedStartService()
        for child in self:
            child.startService()

    def claimListener(
        self,
        key: str,
        factory: IProtocolFactory,
        create: Callable[[TrackingFactory], IListeningPort],
    ) -> IListeningPort:
        """
        The hosted application listens on C{key}: serve it with an
        inherited listener if there is one, or open it with C{create}.
        """
        listener = self.listeners.get(key)
        if listener is not None and listener.port is not None:
            if not listener.factory.unclaimed:
                raise CannotListenTwice(
                    "the hosted application listens on {} twice".format(key)
                )
            listener.factory.claim(factory)
            self._log.info(
                "Hosted application took over inherited listener {key}", key=key
            )
            return listener.port
        tracking = TrackingFactory(key, factory, self._connectionsChanged)
        port = create(tracking)
        self.listeners[key] = HostedListener(key, tracking, port)
        self._log.info(
            "Listening on {address} for the hosted application ({key})",
            address=self.listeners[key].address(),
            key=key,
        )
        return port

    def _listenAll(self) -> None:
        for listener in self.listeners.values():
            if listener.port is not None:
                continue
            endpoint = activatedEndpoint(
                self.reactor, listener.key
            ) or _serverFromString(self.reactor, listener.key)
            result: list[Any] = []
            endpoint.listen(listener.factory).addBoth(result.append)
            if not result:
                raise RuntimeError(
                    "listener {!r} did not start at once".format(listener.key)
                )
            if isinstance(result[0], Failure):
                result[0].raiseException()
            listener.port = result[0]
            self._log.info(
                "Listening on {address} for {key}",
                address=listener.address(),
                key=listener.key,
            )

    def _startControl(self) -> None:
        if self.settings.controlPath is None or self.controlPort is not None:
            return
        from .._control._server import listenControl

        path = self.settings.controlPath
        self.controlPort = listenControl(self.reactor, path, self)
        self._log.info("Control channel on {path}", path=path)

    def _startMetrics(self) -> None:
        endpoint = self.settings.metricsEndpoint
        if self.metrics is None or endpoint is None or self.metricsPort is not None:
            return
        from ._metrics import listenMetrics

        self.metricsPort = listenMetrics(self.reactor, endpoint, self.metrics)
        self._log.info("Metrics on {endpoint}", endpoint=endpoint)

    def addObserver(self, observer: object) -> None:
        """
        Tell C{observer} about this host's lifecycle from now on.

        @param observer: has any of L{ILifecycleObserver}'s methods (each
            is optional).
        """
        self.observers.append(observer)

    def _tell(self, event: str, *args: Any) -> None:
        for observer in list(self.observers):
            method = getattr(observer, event, None)
            if method is None:
                continue
            try:
                method(self, *args)
            except Exception:
                self._log.failure(
                    "Lifecycle observer {observer!r} failed on {event}",
                    observer=observer,
                    event=event,
                )

    def _serve(self) -> None:
        self.serving = True
        self._tell("serving")
        if self.settings.installSignalHandlers:
            self._installHangup()
        self._log.info(
            "Generation {generation} serving in process {pid} with strategy "
            "{strategy}",
            generation=self.generation,
            pid=self.pid,
            strategy=self.strategy.name,
        )

    def _inheritFailed(self, reason: Failure) -> None:
        self._log.failure("Could not inherit the service; this successor exits", reason)
        self.stopProcess()

    # Signals

    def _installHangup(self) -> None:
        def onHangup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._upgradeFromSignal)

        self._previousHangup = signal.signal(signal.SIGHUP, onHangup)

    def _restoreHangup(self) -> None:
        if self._previousHangup is not None:
            signal.signal(signal.SIGHUP, self._previousHangup)
            self._previousHangup = None

    def _ignoreHangupWhileDraining(self) -> None:
        """
        A draining process must not die of a stray C{SIGHUP} (its default
        action) and drop the connections it still serves.
        """

        def onHangup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(
                self._log.warn,
                "SIGHUP ignored: process {pid} drains; its successor takes "
                "migrations",
                pid=self.pid,
            )

        if self.settings.installSignalHandlers:
            self._previousHangup = signal.signal(signal.SIGHUP, onHangup)

    def _upgradeFromSignal(self) -> None:
        self._log.info(
            "SIGHUP: migrating with strategy {strategy}", strategy=self.strategy.name
        )

        def progress(message: str) -> None:
            self._log.info("Migration: {message}", message=message)

        if self.serving and self.phase is not MigrationPhase.idle:
            # A control request waits for the running migration; a signal
            # (a supervisor's reload) joins it instead.
            self._log.warn(
                "SIGHUP during a migration: no second one is started; a "
                "reload waiting for it ends with the running one ({reason})",
                reason="a migration is already running (phase: {})".format(
                    self.phase.value
                ),
            )
            self._tell("reloadJoined")
            return
        d = self.requestUpgrade(None, progress)

        def refused(f: Failure) -> None:
            self._log.warn("SIGHUP ignored: {reason}", reason=f.getErrorMessage())

        d.addErrback(refused)

    # Inheriting (successor side)

    def listenerNamed(self, key: str) -> HostedListener:
        """
        The listener configured as C{key}.

        @raise KeyError: if this code has no such listener.
        """
        if key not in self.listeners and self.acceptsAnyListener:
            # A hosted application's port: it is claimed when the
            # application opens it again.
            self.listeners[key] = HostedListener(
                key, TrackingFactory(key, unclaimedFactory(), self._connectionsChanged)
            )
        return self.listeners[key]

    def adoptControlPort(self, port: IListeningPort) -> None:
        """
        Use C{port}, handed on by the previous generation, as the control
        channel once this process serves (it stays paused until then).
        """
        self.controlPort = port

    def adoptMetricsPort(self, port: IListeningPort, carried: Any) -> None:
        """
        Use C{port}, handed on by the previous generation, as the metrics
        endpoint once this process serves (it stays paused until then), and
        go on counting from what that generation counted (C{carried}).
        """
        if self.metrics is None:
            # This code serves no metrics: let the endpoint go.
            releaseListener(port)
            return
        self.metricsPort = port
        self.metrics.carry(carried)

    def _preparePidfile(self) -> None:
        """
        Write and flush the pidfile this successor will put in place when
        it commits, so that the commit, while every client waits, only
        names it (see L{migrate._host._pidfile}).  Should it fail, the
        commit writes it, and fails if it still cannot.
        """
        if not self.settings.pidfile:
            return
        try:
            self._pidfileAhead = preparePidfile(self.settings.pidfile, self.pid)
        except OSError as e:
            self._log.warn(
                "Cannot write the pidfile {path} ahead ({error}); the commit "
                "will try again",
                path=self.settings.pidfile,
                error=e,
            )

    def commitInheritance(self, generation: int) -> None:
        """
        Serve: the previous generation has handed everything on.

        @param generation: this process's generation number.
        """
        # First what can fail (a full disk, no room to grow a file): should
        # it, nothing serves yet and the old process keeps everything.
        ahead, self._pidfileAhead = self._pidfileAhead, None
        if self.settings.pidfile:
            if ahead is not None and (ahead.path, ahead.pid) == (
                self.settings.pidfile,
                self.pid,
            ):
                ahead.install()
            else:
                writePidfile(self.settings.pidfile, self.pid)
        if ahead is not None:
            ahead.discard()
        self.generation = generation
        for key, listener in list(self.listeners.items()):
            if listener.port is not None and listener.factory.unclaimed:
                self._log.warn(
                    "Inherited listener {key} is not used by the new code; "
                    "closing it",
                    key=key,
                )
                listener.port.stopListening()
                del self.listeners[key]
        for listener in self.listeners.values():
            if listener.port is not None:
                resumeListener(listener.port)
        if self.controlPort is not None:
            resumeListener(self.controlPort)
        else:
            self._startControl()
        if self.metricsPort is not None:
            resumeListener(self.metricsPort)
        else:
            self._startMetrics()
        self.inheritance = None
        self._serve()

    def abandonInheritance(self, reason: str) -> None:
        """
        Give up inheriting: let go of everything adopted without disturbing
        it (the previous generation resumes it) and end this process.
        """
        # Until now this process's output went through the old process,
        # which may be the reason to give up (it died): say why where the
        # operator reads.
        takeOverOutput = getattr(self.inheritance, "takeOverOutput", None)
        if takeOverOutput is not None:
            try:
                takeOverOutput()
            except OSError:
                pass
        self._log.error(
            "Successor {pid} gives up: {reason}", pid=self.pid, reason=reason
        )
        if self._pidfileAhead is not None:
            self._pidfileAhead.discard()
            self._pidfileAhead = None
        self.handingOn = True
        self._releaseSockets()
        for listener in self.listeners.values():
            listener.port = None
        self.stopProcess()

    def _releaseSockets(self) -> None:
        """
        Let go of every listening socket (the application's, the control
        channel's, the metrics') without shutting any down: another
        process holds them too.
        """
        for listener in self.listeners.values():
            if listener.port is not None:
                releaseListener(listener.port)
        if self.controlPort is not None:
            releaseListener(self.controlPort)
            self.controlPort = None
        if self.metricsPort is not None:
            releaseListener(self.metricsPort)
            self.metricsPort = None

    # Migrating (serving side)

    def statusSnapshot(self) -> dict[str, Any]:
        """
        Describe this host for C{python -m migrate status}.
        """
        listeners = [
            {
                "key": each.key,
                "address": each.address(),
                "connections": len(each.factory.protocols),
            }
            for each in self.listeners.values()
        ]
        return {
            "pid": self.pid,
            "generation": self.generation,
            "strategy": self.strategy.name,
            "phase": self.phase.value,
            "serving": self.serving,
            "listeners": listeners,
            "connections": sum(each["connections"] for each in listeners),
            "draining": self.drainingGenerations(),
            "maxDraining": self.settings.maxDraining,
            "lastReport": None if self.lastReport is None else self.lastReport.toJSON(),
            "keeper": None if self.keeper is None else self.keeper.statusEntry(),
        }

    def _afterRunning(
        self, strategyName: str | None, progress: Callable[[str], None]
    ) -> Deferred[dict[str, Any]]:
        """
        A migration runs: wait until it has ended (at most the ready and
        hand-off timeouts together), then start this one; refuse with a
        hint to try again if it is still running by then.
        """
        from .._control._commands import MigrationInProgress

        running = self._migration
        phase = self.phase.value
        if running is None:
            return fail(
                MigrationInProgress(
                    "a migration is already running (phase: {})".format(phase)
                )
            )
        bound = self.settings.readyTimeout + self.settings.handoffTimeout
        waiting: Deferred[None] = Deferred()

        def tooLong() -> None:
            if not waiting.called:
                waiting.errback(
                    MigrationInProgress(
                        "a migration is already running (phase: {}) and did not "
                        "end within {:g} s; try again (upgrade --wait retries)"
                        "".format(phase, bound)
                    )
                )

        timer = self.reactor.callLater(bound, tooLong)
        self._log.info(
            "An upgrade request waits for the running migration ({phase}), at "
            "most {bound} s",
            phase=phase,
            bound=bound,
        )

        def go() -> None:
            if not waiting.called:
                waiting.callback(None)

        def ended(result: object) -> object:
            # After the running migration's own callbacks (its report).
            self.reactor.callLater(0, go)
            return result

        running.addBoth(ended)
        try:
            progress(
                "a migration is already running (phase: {}); this one starts when "
                "it ends (waiting at most {:g} s)".format(phase, bound)
            )
        except Exception:
            self._log.failure("Could not relay progress")

        def start(_: None) -> Deferred[dict[str, Any]]:
            if timer.active():
                timer.cancel()
            return self.requestUpgrade(strategyName, progress)

        result: Deferred[dict[str, Any]] = waiting.addCallback(start)
        return result

    def requestUpgrade(
        self,
        strategyName: str | None,
        progress: Callable[[str], None],
        overrides: Mapping[str, float] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Migrate now with the named strategy (or the configured one).

        @param overrides: settings for this migration only, by the name of
            their L{HostSettings} field (L{OVERRIDABLE}): the old side's
            timeouts.  A new process runs with the host's own settings.

        @return: a L{Deferred} firing with the report as JSON-compatible
            data, or failing with L{MigrationInProgress} or
            L{UnknownStrategy} when the migration cannot start, or with
            L{ValueError} for an override that is not a positive number of
            seconds.
        """
        from .._control._commands import MigrationInProgress, UnknownStrategy

        if not self.serving:
            return fail(
                MigrationInProgress(
                    "process {} no longer serves; its successor takes "
                    "migrations: try again (upgrade --wait retries)".format(self.pid)
                )
            )
        if self.phase is not MigrationPhase.idle:
            return self._afterRunning(strategyName, progress)
        strategy = self.strategy
        if strategyName is not None and strategyName != strategy.name:
            try:
                strategy = self.strategyNamed(strategyName)
            except KeyError:
                return fail(
                    UnknownStrategy("unknown strategy {!r}".format(strategyName))
                )
        if self.keeper is not None:
            refusal = self.keeper.refuse(strategy)
        else:
            from ._keeping import refuseWithoutKeeper

            refusal = refuseWithoutKeeper(strategy)
        if refusal is not None:
            # Like a migration that cannot start now: the answer says why.
            return fail(MigrationInProgress(refusal))
        ownSettings = self.settings
        try:
            self.settings = _overridden(ownSettings, overrides or {})
        except ValueError as e:
            return fail(e)
        self._phase = MigrationPhase.spawning
        self._log.info(
            "Migration of generation {generation} starting with strategy " "{strategy}",
            generation=self.generation,
            strategy=strategy.name,
        )
        self._tell("migrationStarted")
        # A full collection over the whole heap, which the migration's many
        # new objects would trigger, stalls every client: it walks only
        # what the migration makes, from its first step on.
        d = heapFrozenDuring(strategy.migrate, self, progress)
        self._migration = d

        def restoreSettings(result: Any) -> Any:
            # A generation that handed on keeps the drain deadline it was
            # given; one that serves on takes its own settings back.
            if self.serving:
                self.settings = ownSettings
            return result

        d.addBoth(restoreSettings)

        def finished(report: MigrationReport) -> dict[str, Any]:
            self._phase = MigrationPhase.idle
            self._migration = None
            self.lastReport = report
            self._tell("migrationEnded", report)
            self._log.info(
                "Migration ended: {outcome} ({reason})",
                outcome=report.outcome.value,
                reason=report.reason or "no problem",
                report=report.toJSON(),
            )
            return report.toJSON()

        def crashed(reason: Failure) -> Failure:
            self._phase = MigrationPhase.idle
            self._migration = None
            self._tell("migrationEnded", None)
            self._log.failure("Migration crashed", reason)
            return reason

        d.addCallbacks(finished, crashed)
        return d

    def allConnections(self) -> Iterable[tuple[HostedListener, Any]]:
        """
        Every live connection, with its listener.
        """
        for listener in self.listeners.values():
            for protocol in listener.factory.connections:
                yield listener, protocol

    def pauseAccepting(self) -> None:
        """
        Leave new connections in the kernel's backlog for now.
        """
        for listener in self.listeners.values():
            if listener.port is not None:
                pauseListener(listener.port)

    def resumeAccepting(self) -> None:
        """
        Accept new connections again.
        """
        for listener in self.listeners.values():
            if listener.port is not None:
                resumeListener(listener.port)

    # Draining (old side, after the hand-off committed)

    def connectionCount(self) -> int:
        """
        How many connections this process serves.
        """
        return sum(len(each.factory.protocols) for each in self.listeners.values())

    def drainingGenerations(self) -> list[dict[str, Any]]:
        """
        The older generations still draining, oldest first, this process
        included when it drains.
        """
        return self._drain.generations()

    def _ownDrainEntry(self) -> dict[str, Any] | None:
        if self.serving or self.inheritance is not None:
            return None
        entry: dict[str, Any] = {
            "generation": self.generation,
            "pid": self.pid,
            "connections": self.connectionCount(),
        }
        if self._drain.closing:
            entry["closing"] = True
        return entry

    def handOn(
        self,
        reportDrain: Callable[[list[dict[str, Any]]], None],
        newPid: int | None = None,
    ) -> None:
        """
        The hand-off committed: stop serving, let go of the listeners and
        the control socket (the successor holds them), and drain.

        @param reportDrain: called with L{drainingGenerations} whenever it
            changes, to keep the successor's status current.
        @param newPid: the process that serves now.
        """
        self.serving = False
        self.handingOn = True
        self._restoreHangup()
        self._ignoreHangupWhileDraining()
        self.forgetPidfile()
        self._releaseSockets()
        if newPid is not None:
            self._tell("handedOn", newPid)
        drainTimeout = self.settings.drainTimeout
        self._log.info(
            "Generation {generation} handed on; draining {count} connections "
            "({deadline})",
            generation=self.generation,
            count=self.connectionCount(),
            deadline=(
                "no deadline"
                if drainTimeout is None
                else "deadline {} s".format(drainTimeout)
            ),
        )
        self._drain.start(reportDrain, drainTimeout)

    def requestStop(
        self, drainTimeout: float | None, progress: Callable[[str], None]
    ) -> Deferred[dict[str, Any]]:
        """
        Stop the whole service politely (C{python -m migrate stop}): no new
        connections, every generation drains for up to C{drainTimeout}
        seconds (by default C{--drain-timeout}, or 30), then what is left is
        closed cleanly and this process exits.

        @return: fires with a summary once every generation has ended, or
            fails with L{MigrationInProgress} when this process does not
            serve or a migration runs.
        """
        from .._control._commands import MigrationInProgress
        from ._stopping import DEFAULT_STOP_DRAIN_SECONDS, StopAttempt

        if not self.serving:
            return fail(
                MigrationInProgress(
                    "process {} no longer serves; ask the serving one".format(self.pid)
                )
            )
        if self.phase is not MigrationPhase.idle:
            return fail(
                MigrationInProgress(
                    "a migration is running (phase: {}); stop once it has "
                    "ended".format(self.phase.value)
                )
            )
        if drainTimeout is None:
            drainTimeout = self.settings.drainTimeout or DEFAULT_STOP_DRAIN_SECONDS
        return StopAttempt(self, drainTimeout, progress).run()

    def stopAccepting(self) -> None:
        """
        Close the listeners for good (nobody takes them over): new
        connections are refused from now on.
        """
        for listener in self.listeners.values():
            if listener.port is None:
                continue
            if isActivated(listener.key):
                releaseListener(listener.port)
            else:
                listener.port.stopListening()
            listener.port = None

    def drainToStop(
        self, reporter: Callable[[list[dict[str, Any]]], None], drainTimeout: float
    ) -> None:
        """
        Drain this process as an old generation would, with nobody to hand
        on to, and exit once every generation has ended.
        """
        self.serving = False
        self._restoreHangup()
        self._ignoreHangupWhileDraining()
        self._drain.start(reporter, drainTimeout)

    def _connectionsChanged(self) -> None:
        if self.inheritance is None:
            self._drain.connectionsChanged()

    def updateDraining(self, entries: list[dict[str, Any]], viaPid: int) -> None:
        """
        An older generation (or one it relays for) reports its draining.
        """
        self._drain.update(entries, viaPid)

    def closeGeneration(self, generation: int) -> bool:
        """
        Have draining generation C{generation} close its connections
        cleanly now: this process, or an older one, told over the channel
        its reports come through.

        @return: whether it could be told.
        """
        if generation == self.generation and not self.serving:
            self._drain.closeNow(makeRoom=True)
            return True
        entry = self.draining.get(generation) or {}
        channel = self.reportChannels.get(int(entry.get("via", -1)))
        if channel is None or getattr(channel, "transport", None) is None:
            return False
        from ..strategies._transfer._channel import CloseDraining

        try:
            channel.callRemote(CloseDraining, generation=generation)
        except Exception:
            self._log.failure("Could not ask generation {g} to close", g=generation)
            return False
        return True

    def forgetDraining(self, viaPid: int) -> None:
        """
        The older generation reached through C{viaPid} has ended.
        """
        self._drain.channels.pop(viaPid, None)
        self._drain.update([], viaPid)

    def closeDraining(self) -> None:
        """
        Close the connections still draining here now, cleanly, as the
        drain deadline would (the service is stopping).
        """
        if not self.serving and self.handingOn:
            self._drain.closeNow()
