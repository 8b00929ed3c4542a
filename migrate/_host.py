"""
The host service: owns an application's listeners, knows its live
connections, runs the control channel, and migrates the service to new code
when asked to.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterable, Sequence

from attrs import define
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._listeners import pauseListener, releaseListener, resumeListener
from ._pidfile import writePidfile
from ._report import MigrationPhase, MigrationReport
from ._tracking import TrackingFactory
from .interfaces import IMigrationStrategy

__all__ = ["MigrationHost", "HostedListener", "NotServing"]


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


def _noStrategyNamed(name: str) -> IMigrationStrategy:
    raise KeyError(name)


class MigrationHost(Service):
    """
    Hosts an application's protocol factory on one or more listeners and
    moves the service to new code on demand.

    Build one with the application's factory, its endpoint descriptions and
    a strategy, and add it to a service tree; nothing else in the
    application changes.  A migration starts on C{SIGHUP}, on the control
    channel's C{upgrade} command, or when L{requestUpgrade} is called.

    @ivar generation: 1 for a freshly started service, one more for each
        migration to a new process or image.
    @ivar phase: the phase of the migration in progress, if any.
    @ivar serving: whether this process serves (takes new connections and
        migrations); L{False} while it inherits a service or drains one.
    @ivar lastReport: the last migration's report.
    @ivar draining: older generations still finishing their connections,
        by generation: JSON-compatible dictionaries.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        applicationFactory: IProtocolFactory,
        listen: Sequence[str],
        strategy: IMigrationStrategy,
        *,
        controlPath: str | None = "migrate-host.sock",
        strategyNamed: Callable[[str], IMigrationStrategy] = _noStrategyNamed,
        readyTimeout: float = 30.0,
        handoffTimeout: float = 60.0,
        drainTimeout: float | None = None,
        successorArgv: Sequence[str] | None = None,
        pidfile: str | None = None,
        forgetPidfile: Callable[[], None] = lambda: None,
        inheritance: Any = None,
        inheritWith: IMigrationStrategy | None = None,
        stopProcess: Callable[[], None] | None = None,
        installSignalHandlers: bool = True,
        applicationSpec: str | None = None,
    ) -> None:
        """
        @param reactor: the reactor (listening, process, time, sockets).
        @param applicationFactory: the application's protocol factory.
        @param listen: endpoint descriptions (C{tcp:8000}, C{unix:/path}).
        @param strategy: what a migration does unless told otherwise.
        @param controlPath: where the control channel listens, or L{None}.
        @param strategyNamed: finds another strategy by name, raising
            L{KeyError} for an unknown one (C{upgrade --strategy NAME}).
        @param readyTimeout: seconds a successor may take to say it is ready.
        @param handoffTimeout: seconds each hand-off step may take.
        @param drainTimeout: seconds an old generation keeps serving its
            remaining connections before closing them; L{None}: no deadline.
        @param successorArgv: the command line that starts a successor
            (default: this process's own, re-read from disk).
        @param pidfile: a pidfile to keep naming the serving process.
        @param forgetPidfile: tells the process runner not to remove the
            pidfile at exit (a successor owns it then).
        @param inheritance: what a previous generation hands on (set when
            this process is a successor), given to the strategy's
            C{inherit}.
        @param inheritWith: the strategy whose incoming half inherits the
            service (the one the previous generation migrated with; default:
            C{strategy}).
        @param stopProcess: ends this process once it has handed everything
            on (default: stop the reactor).
        @param installSignalHandlers: whether C{SIGHUP} triggers a migration.
        @param applicationSpec: where the application's factory came from
            (C{PKG.MOD:NAME}), for strategies that load new code in place.
        """
        self.reactor = reactor
        self.applicationFactory = applicationFactory
        self.strategy = strategy
        self.strategyNamed = strategyNamed
        self.controlPath = controlPath
        self.readyTimeout = readyTimeout
        self.handoffTimeout = handoffTimeout
        self.drainTimeout = drainTimeout
        self.successorArgv = list(successorArgv) if successorArgv is not None else None
        self.pidfile = pidfile
        self.forgetPidfile = forgetPidfile
        self.inheritance = inheritance
        self.inheritWith = inheritWith if inheritWith is not None else strategy
        self.stopProcess = stopProcess if stopProcess is not None else reactor.stop
        self.installSignalHandlers = installSignalHandlers
        self.applicationSpec = applicationSpec
        self.listeners: dict[str, HostedListener] = {}
        for key in listen:
            if key in self.listeners:
                raise ValueError("listener {!r} given twice".format(key))
            self.listeners[key] = HostedListener(
                key, TrackingFactory(key, applicationFactory, self._connectionsChanged)
            )
        self.controlPort: IListeningPort | None = None
        self.generation = 1
        self.phase = MigrationPhase.idle
        self.serving = inheritance is None
        self.handingOn = False
        self.lastReport: MigrationReport | None = None
        self.draining: dict[int, dict[str, Any]] = {}
        self._drainWatchers: list[Callable[[], None]] = []
        self._previousHangup: Any = None
        self.pid = os.getpid()

    # Service

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self.inheritance is None:
            self._listenAll()

    def startService(self) -> None:
        Service.startService(self)
        if self.inheritance is None:
            self._startControl()
            self._serve()
        else:
            self._log.info(
                "Generation successor {pid} starting: inheriting the service",
                pid=self.pid,
            )
            d = maybeDeferred(self.inheritWith.inherit, self, self.inheritance)
            d.addErrback(self._inheritFailed)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        self._restoreHangup()
        stops = []
        for listener in self.listeners.values():
            if listener.port is not None and not self.handingOn:
                stops.append(maybeDeferred(listener.port.stopListening))
        if self.controlPort is not None and not self.handingOn:
            stops.append(maybeDeferred(self.controlPort.stopListening))
        if not stops:
            return None
        from twisted.internet.defer import gatherResults

        return gatherResults(stops).addCallback(lambda _: None)

    def _listenAll(self) -> None:
        for listener in self.listeners.values():
            if listener.port is not None:
                continue
            endpoint = serverFromString(self.reactor, listener.key)
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
        if self.controlPath is None or self.controlPort is not None:
            return
        from ._control import listenControl

        self.controlPort = listenControl(self.reactor, self.controlPath, self)
        self._log.info("Control channel on {path}", path=self.controlPath)

    def _serve(self) -> None:
        self.serving = True
        if self.installSignalHandlers:
            self._installHangup()
        self._log.info(
            "Generation {generation} serving in process {pid} with strategy "
            "{strategy}",
            generation=self.generation,
            pid=self.pid,
            strategy=self.strategy.name,
        )

    def _inheritFailed(self, reason: Failure) -> None:
        self._log.failure(
            "Could not inherit the service; this successor exits", reason
        )
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

    def _upgradeFromSignal(self) -> None:
        self._log.info("SIGHUP: migrating with strategy {strategy}",
                       strategy=self.strategy.name)

        def progress(message: str) -> None:
            self._log.info("Migration: {message}", message=message)

        d = self.requestUpgrade(None, progress)
        d.addErrback(
            lambda f: self._log.warn(
                "SIGHUP ignored: {reason}", reason=f.getErrorMessage()
            )
        )

    # Inheriting (successor side)

    def listenerNamed(self, key: str) -> HostedListener:
        """
        The listener configured as C{key}.

        @raise KeyError: if this code has no such listener.
        """
        return self.listeners[key]

    def adoptControlPort(self, port: IListeningPort) -> None:
        """
        Use C{port}, handed on by the previous generation, as the control
        channel once this process serves (it stays paused until then).
        """
        self.controlPort = port

    def commitInheritance(self, generation: int) -> None:
        """
        Serve: the previous generation has handed everything on.

        @param generation: this process's generation number.
        """
        self.generation = generation
        for listener in self.listeners.values():
            if listener.port is not None:
                resumeListener(listener.port)
        if self.controlPort is not None:
            resumeListener(self.controlPort)
        else:
            self._startControl()
        if self.pidfile:
            writePidfile(self.pidfile, self.pid)
        self.inheritance = None
        self._serve()

    def abandonInheritance(self, reason: str) -> None:
        """
        Give up inheriting: let go of everything adopted without disturbing
        it (the previous generation resumes it) and end this process.
        """
        self._log.error(
            "Successor {pid} gives up: {reason}", pid=self.pid, reason=reason
        )
        self.handingOn = True
        for listener in self.listeners.values():
            if listener.port is not None:
                releaseListener(listener.port)
                listener.port = None
        if self.controlPort is not None:
            releaseListener(self.controlPort)
            self.controlPort = None
        self.stopProcess()

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
            "lastReport": None if self.lastReport is None else self.lastReport.toJSON(),
        }

    def requestUpgrade(
        self, strategyName: str | None, progress: Callable[[str], None]
    ) -> Deferred[dict[str, Any]]:
        """
        Migrate now with the named strategy (or the configured one).

        @return: a L{Deferred} firing with the report as JSON-compatible
            data, or failing with L{MigrationInProgress} or
            L{UnknownStrategy} when the migration cannot start.
        """
        from ._control import MigrationInProgress, UnknownStrategy

        if not self.serving:
            return fail(
                MigrationInProgress(
                    "process {} no longer serves; its successor takes "
                    "migrations".format(self.pid)
                )
            )
        if self.phase is not MigrationPhase.idle:
            return fail(
                MigrationInProgress(
                    "a migration is already running (phase: {})".format(
                        self.phase.value
                    )
                )
            )
        strategy = self.strategy
        if strategyName is not None and strategyName != strategy.name:
            try:
                strategy = self.strategyNamed(strategyName)
            except KeyError:
                return fail(UnknownStrategy("unknown strategy {!r}".format(strategyName)))
        self.phase = MigrationPhase.spawning
        self._log.info(
            "Migration of generation {generation} starting with strategy "
            "{strategy}",
            generation=self.generation,
            strategy=strategy.name,
        )
        d = maybeDeferred(strategy.migrate, self, progress)

        def finished(report: MigrationReport) -> dict[str, Any]:
            self.phase = MigrationPhase.idle
            self.lastReport = report
            self._log.info(
                "Migration ended: {outcome} ({reason})",
                outcome=report.outcome.value,
                reason=report.reason or "no problem",
                report=report.toJSON(),
            )
            return report.toJSON()

        def crashed(reason: Failure) -> Failure:
            self.phase = MigrationPhase.idle
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
        entries = {
            generation: {key: value for key, value in entry.items() if key != "via"}
            for generation, entry in self.draining.items()
        }
        if not self.serving and self.inheritance is None:
            entries[self.generation] = {
                "generation": self.generation,
                "pid": self.pid,
                "connections": self.connectionCount(),
            }
        return [entries[key] for key in sorted(entries)]

    def handOn(self, reportDrain: Callable[[list[dict[str, Any]]], None]) -> None:
        """
        The hand-off committed: stop serving, let go of the listeners and
        the control socket (the successor holds them), and drain.

        @param reportDrain: called with L{drainingGenerations} whenever it
            changes, to keep the successor's status current.
        """
        self.serving = False
        self.handingOn = True
        self._restoreHangup()
        self.forgetPidfile()
        for listener in self.listeners.values():
            if listener.port is not None:
                releaseListener(listener.port)
        if self.controlPort is not None:
            releaseListener(self.controlPort)
            self.controlPort = None
        self._drainReporter = reportDrain
        self._lastDrainReport: list[dict[str, Any]] | None = None
        self._reportDrain()
        self._log.info(
            "Generation {generation} handed on; draining {count} connections "
            "({deadline})",
            generation=self.generation,
            count=self.connectionCount(),
            deadline=(
                "no deadline"
                if self.drainTimeout is None
                else "deadline {} s".format(self.drainTimeout)
            ),
        )
        if self.drainTimeout is not None:
            self._drainDeadline = self.reactor.callLater(
                self.drainTimeout, self._closeStragglers
            )
        self._checkDrained()

    def _connectionsChanged(self) -> None:
        if not self.serving and self.handingOn and self.inheritance is None:
            self.reactor.callLater(0, self._afterDrainChange)

    def _afterDrainChange(self) -> None:
        self._reportDrain()
        self._checkDrained()

    def _reportDrain(self) -> None:
        reporter = getattr(self, "_drainReporter", None)
        if reporter is None:
            return
        current = self.drainingGenerations()
        if current != self._lastDrainReport:
            self._lastDrainReport = current
            try:
                reporter(current)
            except Exception:
                self._log.failure("Could not report draining progress")

    def updateDraining(self, entries: list[dict[str, Any]], viaPid: int) -> None:
        """
        An older generation (or one it relays for) reports its draining.
        """
        for generation in [
            g for g, entry in self.draining.items() if entry.get("via") == viaPid
        ]:
            del self.draining[generation]
        for entry in entries:
            self.draining[int(entry["generation"])] = dict(entry, via=viaPid)
        self._reportDrain()
        self._checkDrained()

    def forgetDraining(self, viaPid: int) -> None:
        """
        The older generation reached through C{viaPid} has ended.
        """
        self.updateDraining([], viaPid)

    def _closeStragglers(self) -> None:
        remaining = self.connectionCount()
        self._log.info(
            "Drain deadline: closing {count} remaining connections cleanly",
            count=remaining,
        )
        for listener, protocol in list(self.allConnections()):
            protocol.loseConnection()

    def _checkDrained(self) -> None:
        if self.serving or not self.handingOn:
            return
        if self.connectionCount() or self.draining:
            return
        deadline = getattr(self, "_drainDeadline", None)
        if deadline is not None and deadline.active():
            deadline.cancel()
        if getattr(self, "_exiting", False):
            return
        self._exiting = True
        self._log.info(
            "Generation {generation} drained; process {pid} exits",
            generation=self.generation,
            pid=self.pid,
        )
        self._reportDrain()
        # Let the answers already written (an upgrade report, a status) reach
        # their readers before the process goes.
        self.reactor.callLater(0.2, self.stopProcess)
