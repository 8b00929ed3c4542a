"""
Rolling upgrade across the servers of an HAProxy backend: C{python -m
migrate rolling}.

For each server of the backend in turn, L{RollingUpgrade} tells HAProxy to
drain it, waits until its sessions are gone (or the drain timeout passes),
upgrades it (through its migrate host's control socket, or with a restart
command for servers that are not migrate hosts), forces its health down so
that HAProxy has to check the new code, waits until the health check reports
it up, and puts it back in rotation.  At most
C{maxUnavailable} servers are out of rotation at once.  A server that does
not come back stops the roll: it is left in maintenance, the servers not yet
touched stay as they were, and the others keep serving.  Everything that can
be checked is checked before the first server is drained.

This is an orchestrator, not an L{IMigrationStrategy
<migrate.interfaces.IMigrationStrategy>}.  A strategy runs inside one host
process and reports on that process (its generation, its listeners, its
connections); a rolling upgrade runs outside every host, needs to know
about the load balancer and the whole fleet, and decides how many hosts may
be out of rotation at once, which no single host can do.  Each server's own
upgrade still uses whatever strategy its host runs (C{strategy}).
"""

from __future__ import annotations

import io
import os
import signal
from enum import Enum
from functools import partial
from typing import Any, Callable, Protocol, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from .._cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    BadReply,
    CannotConnect,
    Connector,
    HostClosedConnection,
    _count,
    _Failed,
    _Output,
    _recoverReport,
    _reportSummary,
    _Session,
    connectControl,
)
from .._control._server import MigrationInProgress, UnknownStrategy
from ..strategies import strategyNames
from ._haproxy import (
    HAProxyClient,
    HAProxyError,
    HAProxyUnreachable,
    RuntimeAPI,
    ServerStat,
    UnixRuntimeAPI,
)

__all__ = [
    "IServerUpgrader",
    "MigrateHostUpgrader",
    "RestartCommandUpgrader",
    "RollOutcome",
    "RollRefused",
    "RollReport",
    "RollingOptions",
    "RollingUpgrade",
    "ServerPhase",
    "ServerReport",
    "UpgradeFailed",
    "UpgradeResult",
    "formatRollReport",
    "rollingCommand",
    "runShellCommand",
]

_OUTPUT_LINES_KEPT = 20


class ServerPhase(Enum):
    """
    Where one server is in the roll.

    @cvar pending: not touched (yet).
    @cvar draining: drained in HAProxy; waiting for its sessions to end.
    @cvar upgrading: its upgrade runs.
    @cvar checking: upgraded; waiting for HAProxy's health check to report
        it up.
    @cvar done: upgraded and back in rotation.
    @cvar failed: did not come back; left in maintenance (if HAProxy could
        be told so).
    """

    pending = "pending"
    draining = "draining"
    upgrading = "upgrading"
    checking = "checking"
    done = "done"
    failed = "failed"


_TRANSITIONS: dict[ServerPhase, frozenset[ServerPhase]] = {
    ServerPhase.pending: frozenset({ServerPhase.draining, ServerPhase.failed}),
    ServerPhase.draining: frozenset({ServerPhase.upgrading, ServerPhase.failed}),
    ServerPhase.upgrading: frozenset({ServerPhase.checking, ServerPhase.failed}),
    ServerPhase.checking: frozenset({ServerPhase.done, ServerPhase.failed}),
    ServerPhase.done: frozenset(),
    ServerPhase.failed: frozenset(),
}


class RollOutcome(Enum):
    """
    How a rolling upgrade ended.

    @cvar success: every server was upgraded and is back in rotation.
    @cvar stopped: a server did not come back; the roll stopped there.
    @cvar refused: a check failed before anything was drained.
    """

    success = "success"
    stopped = "stopped"
    refused = "refused"


class RollRefused(Exception):
    """
    The roll cannot start; nothing was drained.  The message says why.
    """


class UpgradeFailed(Exception):
    """
    One server's upgrade failed.

    @ivar reason: why, in one line.
    @ivar report: the migrate host's report (Report JSON), if there is one.
    @ivar output: the last lines a restart command wrote, if any.
    """

    def __init__(
        self,
        reason: str,
        report: dict[str, Any] | None = None,
        output: Sequence[str] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report
        self.output = tuple(output)


@frozen
class UpgradeResult:
    """
    One server's successful upgrade.

    @ivar summary: one line for the operator.
    @ivar report: the migrate host's report (Report JSON), if there is one.
    @ivar output: the last lines a restart command wrote, if any.
    """

    summary: str
    report: dict[str, Any] | None = None
    output: tuple[str, ...] = ()


class IServerUpgrader(Protocol):
    """
    How one server of the backend is upgraded.

    @ivar method: C{"migrate-host"} or C{"restart-command"}.
    @ivar target: the control socket or the command.
    """

    method: str
    target: str

    def check(self) -> Deferred[str]:
        """
        Make sure the upgrade can be attempted, before anything is drained;
        fire with a short description, or fail with L{RollRefused}.
        """

    def upgrade(self, progress: Callable[[str], None]) -> Deferred[UpgradeResult]:
        """
        Upgrade the server; fail with L{UpgradeFailed}.
        """


@define
class _RelayedOutput(_Output):
    """
    The CLI's output object, with progress relayed to a callable and
    nothing else printed (a host's report goes into the roll's report).
    """

    relay: Callable[[str], None] = field(kw_only=True)

    def progress(self, message: str) -> None:
        self.relay(message)


@define
class MigrateHostUpgrader:
    """
    Upgrade a server that is a migrate host, through its control socket,
    exactly as C{python -m migrate upgrade} does.

    @ivar target: the host's control socket.
    @ivar strategy: the strategy to use, or L{None} for the host's own.
    @ivar timeout: seconds the upgrade may take.
    """

    method: str = field(default="migrate-host", init=False)

    _reactor: Any
    target: str
    strategy: str | None = None
    timeout: float = 120.0
    _connect: Connector = connectControl

    def _session(self, progress: Callable[[str], None]) -> _Session:
        out = _RelayedOutput(io.StringIO(), io.StringIO(), relay=progress)
        return _Session(self._reactor, self._connect, out, self.target)

    def check(self) -> Deferred[str]:
        """
        The strategy must be one migrate knows; the host must answer its
        status and be idle.
        """
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> str:
        if self.strategy is not None and self.strategy not in strategyNames():
            raise RollRefused(
                "unknown strategy {!r} (known: {})".format(
                    self.strategy, ", ".join(strategyNames())
                )
            )
        session = self._session(lambda message: None)
        deadline = self._reactor.seconds() + min(self.timeout, 30.0)
        try:
            client, status = await session.statusOnce(None, deadline)
        except _Failed as e:
            raise RollRefused(e.message) from None
        except (CannotConnect, HostClosedConnection, BadReply) as e:
            raise RollRefused(str(e)) from None
        client.disconnect()
        phase = status.get("phase")
        if phase != "idle":
            raise RollRefused(
                "the migrate host at {} is busy (phase {})".format(self.target, phase)
            )
        return "migrate host pid {}, generation {}, strategy {}".format(
            status.get("pid"),
            status.get("generation"),
            self.strategy or status.get("strategy"),
        )

    def upgrade(self, progress: Callable[[str], None]) -> Deferred[UpgradeResult]:
        """
        Run an upgrade and wait for the host's report.
        """
        return Deferred.fromCoroutine(self._upgrade(progress))

    async def _upgrade(self, progress: Callable[[str], None]) -> UpgradeResult:
        session = self._session(progress)
        deadline = self._reactor.seconds() + self.timeout
        try:
            client, before = await session.statusOnce(None, deadline)
            try:
                try:
                    report: dict[str, Any] = await session.within(
                        client.upgrade(self.strategy),
                        deadline,
                        "waiting for the migration report",
                    )
                except HostClosedConnection:
                    client.disconnect()
                    report = await _recoverReport(session, before, deadline)
            finally:
                client.disconnect()
        except _Failed as e:
            raise UpgradeFailed(e.message) from None
        except (
            CannotConnect,
            HostClosedConnection,
            BadReply,
            MigrationInProgress,
            UnknownStrategy,
        ) as e:
            raise UpgradeFailed(str(e)) from None
        except (amp.RemoteAmpError, amp.UnknownRemoteError) as e:
            raise UpgradeFailed("the host failed: {}".format(e)) from None
        outcome = report.get("outcome")
        if outcome != "success":
            raise UpgradeFailed(
                "migration {}: {}".format(
                    outcome, report.get("reason") or "no reason given"
                ),
                report=report,
            )
        return UpgradeResult(_reportSummary(report), report=report)


class _CommandProcess(ProcessProtocol):
    """
    Collect a command's output and exit status.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self.output) < 1 << 20:
            self.output += data

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.ended.callback(0)
            return
        value = reason.value
        code = getattr(value, "exitCode", None)
        if code is None:
            code = -(getattr(value, "signal", None) or 1)
        self.ended.callback(code)


def runShellCommand(
    reactor: Any, command: str, timeout: float
) -> Deferred[tuple[int, str]]:
    """
    Run C{command} with C{/bin/sh -c}; fire with its exit status (negative:
    killed by that signal) and what it wrote on standard output and error.
    After C{timeout} seconds it is killed and the result fails with
    L{UpgradeFailed}.
    """
    protocol = _CommandProcess()
    process = reactor.spawnProcess(
        protocol,
        "/bin/sh",
        ["/bin/sh", "-c", command],
        env=dict(os.environ),
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    expired = []

    def kill() -> None:
        expired.append(True)
        try:
            process.signalProcess(signal.SIGKILL)
        except ProcessExitedAlready:
            pass

    timer = reactor.callLater(timeout, kill)

    def ended(code: int) -> tuple[int, str]:
        if timer.active():
            timer.cancel()
        text = protocol.output.decode("utf-8", "replace")
        if expired:
            raise UpgradeFailed(
                "the restart command did not finish within {:g} s (killed)".format(
                    timeout
                ),
                output=text.splitlines()[-_OUTPUT_LINES_KEPT:],
            )
        return code, text

    return protocol.ended.addCallback(ended)


@define
class RestartCommandUpgrader:
    """
    Upgrade a server that is not a migrate host by running a command (for
    example C{systemctl restart app@2}); exit status 0 means it worked.

    @ivar target: the shell command.
    @ivar timeout: seconds it may take.
    """

    method: str = field(default="restart-command", init=False)

    target: str
    timeout: float
    _run: Callable[[str, float], Deferred[tuple[int, str]]]

    def check(self) -> Deferred[str]:
        """
        Nothing to ask beforehand: describe the command.
        """
        return succeed("restart command {!r}".format(self.target))

    def upgrade(self, progress: Callable[[str], None]) -> Deferred[UpgradeResult]:
        """
        Run the command.
        """
        return Deferred.fromCoroutine(self._upgrade(progress))

    async def _upgrade(self, progress: Callable[[str], None]) -> UpgradeResult:
        progress("running {!r}".format(self.target))
        code, output = await self._run(self.target, self.timeout)
        lines = output.splitlines()[-_OUTPUT_LINES_KEPT:]
        if code != 0:
            if code < 0:
                why = "was killed by signal {}".format(-code)
            else:
                why = "exited with status {}".format(code)
            raise UpgradeFailed("the restart command " + why, output=lines)
        return UpgradeResult(
            "restart command exited with status 0", output=tuple(lines)
        )


# Reports


@frozen
class ServerReport:
    """
    What happened to one server.

    @ivar name: the server's name in the backend.
    @ivar method: C{"migrate-host"} or C{"restart-command"}.
    @ivar target: its control socket or restart command.
    @ivar phase: where it ended (L{ServerPhase.done}, L{ServerPhase.failed}
        or L{ServerPhase.pending} for untouched).
    @ivar reason: why it failed.
    @ivar sessionsAtDrain: its sessions when it was drained.
    @ivar sessionsLeft: its sessions when the upgrade started (more than 0
        when the drain timeout passed).
    @ivar summary: one line about its upgrade.
    @ivar durations: seconds per phase.
    @ivar report: the migrate host's report, if any.
    @ivar output: the restart command's last lines, if any.
    """

    name: str
    method: str
    target: str
    phase: ServerPhase = ServerPhase.pending
    reason: str | None = None
    sessionsAtDrain: int | None = None
    sessionsLeft: int | None = None
    summary: str | None = None
    durations: dict[str, float] = field(factory=dict)
    report: dict[str, Any] | None = None
    output: tuple[str, ...] = ()

    def toJSON(self) -> dict[str, Any]:
        """
        JSON-compatible data.
        """
        return {
            "name": self.name,
            "method": self.method,
            "target": self.target,
            "state": (
                "untouched" if self.phase is ServerPhase.pending else self.phase.value
            ),
            "reason": self.reason,
            "sessionsAtDrain": self.sessionsAtDrain,
            "sessionsLeft": self.sessionsLeft,
            "summary": self.summary,
            "durations": {name: round(s, 6) for name, s in self.durations.items()},
            "report": self.report,
            "output": list(self.output),
        }


@frozen
class RollReport:
    """
    The outcome of a rolling upgrade.

    @ivar backend: the HAProxy backend.
    @ivar outcome: how it ended.
    @ivar reason: why it did not succeed.
    @ivar servers: one report per server, in the backend's order.
    @ivar maxUnavailable: how many servers could be out of rotation at once.
    @ivar durations: seconds spent validating, rolling, in total.
    """

    backend: str
    outcome: RollOutcome
    reason: str | None = None
    servers: tuple[ServerReport, ...] = ()
    maxUnavailable: int = 1
    durations: dict[str, float] = field(factory=dict)

    @property
    def succeeded(self) -> bool:
        """
        Whether every server was upgraded and is back in rotation.
        """
        return self.outcome is RollOutcome.success

    def toJSON(self) -> dict[str, Any]:
        """
        JSON-compatible data (the form C{--json} prints).
        """
        return {
            "backend": self.backend,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "maxUnavailable": self.maxUnavailable,
            "upgraded": sum(1 for s in self.servers if s.phase is ServerPhase.done),
            "servers": [each.toJSON() for each in self.servers],
            "durations": {name: round(s, 6) for name, s in self.durations.items()},
        }


def formatRollReport(report: RollReport) -> str:
    """
    A readable multi-line description of a L{RollReport}.
    """
    done = sum(1 for s in report.servers if s.phase is ServerPhase.done)
    head = "Rolling upgrade of backend {}: {}, {} of {} servers upgraded".format(
        report.backend, report.outcome.value, done, len(report.servers)
    )
    total = report.durations.get("total")
    if total is not None:
        head += " in {:.1f} s".format(total)
    lines = [head]
    if report.reason:
        lines.append("Reason: {}".format(report.reason))
    width = max([len(s.name) for s in report.servers] + [1])
    for server in report.servers:
        name = server.name.ljust(width)
        if server.phase is ServerPhase.done:
            timing = ", ".join(
                "{} {:.1f} s".format(phase, seconds)
                for phase, seconds in server.durations.items()
            )
            lines.append(
                "  {}  upgraded   {}{}".format(
                    name, server.summary or "", "; " + timing if timing else ""
                )
            )
            if server.sessionsLeft:
                lines.append(
                    "  {}             {} still open when the drain timeout "
                    "passed".format(" " * width, _count(server.sessionsLeft, "session"))
                )
        elif server.phase is ServerPhase.failed:
            lines.append("  {}  FAILED     {}".format(name, server.reason))
            for each in server.output[-5:]:
                lines.append("  {}             | {}".format(" " * width, each))
            log = (server.report or {}).get("successorLog")
            if isinstance(log, list):
                for each in log[-5:]:
                    lines.append("  {}             | {}".format(" " * width, each))
        elif server.phase is ServerPhase.pending:
            lines.append("  {}  untouched".format(name))
        else:
            lines.append("  {}  {}".format(name, server.phase.value))
    return "\n".join(lines)


# The orchestrator


@define
class _ServerRun:
    """
    One server's progress through the roll (the mutable counterpart of
    L{ServerReport}).
    """

    name: str
    upgrader: IServerUpgrader
    phase: ServerPhase = ServerPhase.pending
    entered: float = 0.0
    reason: str | None = None
    sessionsAtDrain: int | None = None
    sessionsLeft: int | None = None
    result: UpgradeResult | None = None
    failedReport: dict[str, Any] | None = None
    failedOutput: tuple[str, ...] = ()
    durations: dict[str, float] = field(factory=dict)

    def enter(self, phase: ServerPhase, now: float) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise RuntimeError(
                "server {}: no transition from {} to {}".format(
                    self.name, self.phase.value, phase.value
                )
            )
        if self.phase is not ServerPhase.pending:
            self.durations[self.phase.value] = now - self.entered
        self.phase = phase
        self.entered = now

    def freeze(self) -> ServerReport:
        return ServerReport(
            name=self.name,
            method=self.upgrader.method,
            target=self.upgrader.target,
            phase=self.phase,
            reason=self.reason,
            sessionsAtDrain=self.sessionsAtDrain,
            sessionsLeft=self.sessionsLeft,
            summary=self.result.summary if self.result else None,
            durations=dict(self.durations),
            report=self.result.report if self.result else self.failedReport,
            output=self.result.output if self.result else self.failedOutput,
        )


@define
class RollingUpgrade:
    """
    Upgrade every server of an HAProxy backend, a few at a time, without
    taking the backend out of service.

    @ivar backend: the backend's name.
    @ivar upgraders: how each server is upgraded, by server name; every
        server of the backend needs one.
    @ivar drainTimeout: seconds to wait for a drained server's sessions to
        end before upgrading it anyway.
    @ivar readyTimeout: seconds an upgraded server has to be reported up
        by HAProxy's health check.
    @ivar maxUnavailable: how many servers may be out of rotation at once.
    @ivar pollInterval: seconds between two looks at HAProxy's statistics.
    @ivar phase: C{"idle"}, C{"validating"}, C{"rolling"}, C{"stopping"}
        (a server failed; the ones in progress finish) or C{"finished"}.
    """

    _log = Logger()

    _haproxy: HAProxyClient
    backend: str
    upgraders: dict[str, IServerUpgrader]
    _clock: IReactorTime
    drainTimeout: float = 30.0
    readyTimeout: float = 30.0
    maxUnavailable: int = 1
    pollInterval: float = 0.2
    _progress: Callable[[str], None] = lambda message: None
    phase: str = field(default="idle", init=False)
    _started: float = field(default=0.0, init=False)
    _validated: float = field(default=0.0, init=False)

    def _say(self, message: str) -> None:
        self._progress(message)

    # Validation

    def validate(self) -> Deferred[list[str]]:
        """
        Check everything before anything is drained: HAProxy answers at
        admin level, the backend exists, every server has an upgrader (and
        no upgrader names an unknown server), a health check, and is up and
        ready, C{maxUnavailable} leaves at least one server serving, and
        every upgrader's own check passes.

        @return: a L{Deferred} firing with the servers' names in the order
            they will be upgraded, or failing with L{RollRefused} or
            L{HAProxyUnreachable}.
        """
        return Deferred.fromCoroutine(self._validate())

    async def _validate(self) -> list[str]:
        self.phase = "validating"
        self._started = self._clock.seconds()
        backend = self.backend
        if self.maxUnavailable < 1:
            raise RollRefused("--max-unavailable must be at least 1")
        try:
            stats = await self._haproxy.serverStats(backend)
            states = await self._haproxy.serversState(backend)
        except HAProxyError as e:
            raise RollRefused(
                "HAProxy has no backend named {!r} (it answered: {})".format(
                    backend, e.answer
                )
            ) from None
        except ValueError as e:
            raise RollRefused(str(e)) from None
        names = [each.name for each in states]
        if not names:
            raise RollRefused("backend {} has no servers".format(backend))
        unknown = sorted(set(self.upgraders) - set(names))
        if unknown:
            raise RollRefused(
                "backend {} has no server named {} (its servers: {})".format(
                    backend, ", ".join(unknown), ", ".join(names)
                )
            )
        missing = [name for name in names if name not in self.upgraders]
        if missing:
            raise RollRefused(
                "no way to upgrade {}: give --control SERVER=PATH (a migrate "
                "host) or --restart-command SERVER=COMMAND for every server of "
                "backend {}".format(
                    ", ".join("{}/{}".format(backend, n) for n in missing), backend
                )
            )
        statByName = {each.name: each for each in stats}
        problems = []
        for state in states:
            where = "{}/{}".format(backend, state.name)
            stat = statByName.get(state.name)
            if not state.ready:
                problems.append(
                    "{} is in {} (set it ready first, or fix it)".format(
                        where, state.describeAdmin()
                    )
                )
            elif stat is None:
                problems.append("{} has no statistics row".format(where))
            elif not stat.checked:
                problems.append(
                    "{} has no health check (add 'check' to its server line): "
                    "the roll could not know when it is back".format(where)
                )
            elif not (stat.up and state.running):
                problems.append("{} is {}".format(where, stat.describe()))
        if problems:
            raise RollRefused(
                "; ".join(problems) + "; the roll starts only when every server "
                "is up, checked and ready"
            )
        if self.maxUnavailable >= len(names):
            raise RollRefused(
                "--max-unavailable {} would take all {} servers of backend {} "
                "out of rotation at once".format(
                    self.maxUnavailable, len(names), backend
                )
            )
        try:
            # A no-op for a ready server, which proves admin level.
            await self._haproxy.setServerState(backend, names[0], "ready")
        except HAProxyError as e:
            raise RollRefused(
                "HAProxy refused an admin command ({}): the stats socket needs "
                "'level admin'".format(e.answer)
            ) from None
        for name in names:
            upgrader = self.upgraders[name]
            try:
                description = await upgrader.check()
            except RollRefused as e:
                raise RollRefused("{}/{}: {}".format(backend, name, e)) from None
            self._say("{}/{}: {}".format(backend, name, description))
        self._say(
            "backend {}: {} servers ({}), all up and ready; at most {} out of "
            "rotation at once".format(
                backend, len(names), ", ".join(names), self.maxUnavailable
            )
        )
        self._validated = self._clock.seconds()
        return names

    # The roll

    def roll(self, plan: Sequence[str]) -> Deferred[RollReport]:
        """
        Upgrade the servers of C{plan} (as L{validate} returned it).

        @return: a L{Deferred} firing with the L{RollReport}; it never
            fails.
        """
        return Deferred.fromCoroutine(self._roll(list(plan)))

    async def _roll(self, plan: list[str]) -> RollReport:
        self.phase = "rolling"
        if not self._validated:
            self._started = self._validated = self._clock.seconds()
        runs = [_ServerRun(name, self.upgraders[name]) for name in plan]
        queue = list(runs)
        failed: list[_ServerRun] = []

        async def worker() -> None:
            while queue and not failed:
                run = queue.pop(0)
                ok = await self._upgradeOne(run)
                if not ok:
                    failed.append(run)
                    if self.phase == "rolling":
                        self.phase = "stopping"
                        if queue:
                            self._say(
                                "stopping the roll: {} left untouched".format(
                                    ", ".join(r.name for r in queue)
                                )
                            )

        workers = [
            Deferred.fromCoroutine(worker())
            for _ in range(min(self.maxUnavailable, len(runs)))
        ]
        await DeferredList(workers, consumeErrors=True)
        self.phase = "finished"
        now = self._clock.seconds()
        durations = {
            "validating": self._validated - self._started,
            "rolling": now - self._validated,
            "total": now - self._started,
        }
        if failed:
            first = failed[0]
            outcome = RollOutcome.stopped
            reason: str | None = "{}/{}: {}".format(
                self.backend, first.name, first.reason
            )
        else:
            outcome, reason = RollOutcome.success, None
        report = RollReport(
            backend=self.backend,
            outcome=outcome,
            reason=reason,
            servers=tuple(each.freeze() for each in runs),
            maxUnavailable=self.maxUnavailable,
            durations=durations,
        )
        self._log.info(
            "Rolling upgrade of {backend}: {outcome}",
            backend=self.backend,
            outcome=outcome.value,
        )
        return report

    def run(self) -> Deferred[RollReport]:
        """
        L{validate}, then L{roll}: fire with the report, never fail (a
        failed check gives a L{RollOutcome.refused} report).
        """
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> RollReport:
        try:
            plan = await self.validate()
        except (RollRefused, HAProxyUnreachable) as e:
            self.phase = "finished"
            return RollReport(
                backend=self.backend,
                outcome=RollOutcome.refused,
                reason=str(e),
                maxUnavailable=self.maxUnavailable,
                durations={"total": self._clock.seconds() - self._started},
            )
        report: RollReport = await self.roll(plan)
        return report

    # One server

    def _enter(self, run: _ServerRun, phase: ServerPhase) -> None:
        run.enter(phase, self._clock.seconds())
        self._log.info(
            "{backend}/{server}: {phase}",
            backend=self.backend,
            server=run.name,
            phase=phase.value,
        )

    async def _upgradeOne(self, run: _ServerRun) -> bool:
        """
        Drain, upgrade, check and restore one server; L{False} if it did
        not come back (then it is in maintenance, if HAProxy allowed).
        """
        where = "{}/{}".format(self.backend, run.name)

        def say(message: str) -> None:
            # Continuation lines (a host's command line, say) stay indented.
            self._say("{}: {}".format(where, message.replace("\n", "\n    ")))

        try:
            await self._haproxy.setServerState(self.backend, run.name, "drain")
        except (HAProxyError, HAProxyUnreachable) as e:
            # Nothing changed; but the roll cannot go on without HAProxy.
            run.reason = "could not drain it: {}".format(e)
            self._enter(run, ServerPhase.failed)
            say(run.reason)
            return False
        self._enter(run, ServerPhase.draining)
        try:
            await self._drain(run, say)
            self._enter(run, ServerPhase.upgrading)
            say("upgrading ({} {})".format(run.upgrader.method, run.upgrader.target))
            try:
                run.result = await run.upgrader.upgrade(say)
            except UpgradeFailed as e:
                run.failedReport, run.failedOutput = e.report, e.output
                raise _ServerFailed("upgrade failed: {}".format(e.reason)) from None
            say("upgraded: {}".format(run.result.summary))
            # Until HAProxy has checked the new code itself, "UP" may be an
            # old verdict (about a process restarted away, or about the old
            # code): forcing the health down makes it prove the server up
            # again with "rise" successful checks in a row.  A drained server
            # takes no new traffic meanwhile, and HAProxy keeps established
            # sessions of a server marked down (unless configured with
            # "on-marked-down shutdown-sessions").
            await self._haproxy.setServerHealth(self.backend, run.name, "down")
            self._enter(run, ServerPhase.checking)
            say("waiting for HAProxy's health check to report it up")
            stat = await self._waitUp(run)
            await self._haproxy.setServerState(self.backend, run.name, "ready")
        except _ServerFailed as e:
            return await self._fail(run, str(e), say)
        except (HAProxyError, HAProxyUnreachable) as e:
            return await self._fail(run, str(e), say)
        except Exception as e:
            self._log.failure("Upgrading {where} failed", where=where)
            return await self._fail(run, "internal error: {!r}".format(e), say)
        self._enter(run, ServerPhase.done)
        say(
            "up ({}); back in rotation".format(
                stat.checkDescription or stat.checkStatus or stat.status
            )
        )
        return True

    async def _fail(
        self, run: _ServerRun, reason: str, say: Callable[[str], None]
    ) -> bool:
        try:
            await self._haproxy.setServerState(self.backend, run.name, "maint")
        except (HAProxyError, HAProxyUnreachable) as e:
            reason += "; and it could not be put in maintenance: {}".format(e)
        else:
            reason += "; left in maintenance"
        run.reason = reason
        self._enter(run, ServerPhase.failed)
        say(reason)
        return False

    async def _stat(self, name: str) -> ServerStat:
        for each in await self._haproxy.serverStats(self.backend):
            if each.name == name:
                return each
        raise _ServerFailed("it is no longer in HAProxy's statistics")

    async def _pause(self) -> None:
        await deferLater(self._clock, self.pollInterval, lambda: None)

    async def _drain(self, run: _ServerRun, say: Callable[[str], None]) -> None:
        started = self._clock.seconds()
        deadline = started + self.drainTimeout
        lastError: Exception | None = None
        sessions: int | None = None
        while True:
            try:
                stat = await self._stat(run.name)
            except (HAProxyError, HAProxyUnreachable) as e:
                lastError = e
            else:
                lastError = None
                sessions = stat.sessions
                if run.sessionsAtDrain is None:
                    run.sessionsAtDrain = sessions
                    say("draining ({})".format(_count(sessions, "session")))
                if sessions == 0:
                    say("drained in {:.1f} s".format(self._clock.seconds() - started))
                    run.sessionsLeft = 0
                    return
            if self._clock.seconds() + self.pollInterval > deadline:
                break
            await self._pause()
        if lastError is not None:
            raise _ServerFailed("could not watch it drain: {}".format(lastError))
        run.sessionsLeft = sessions
        say(
            "drain timeout ({:g} s) passed with {} still open; "
            "upgrading anyway".format(self.drainTimeout, _count(sessions, "session"))
        )

    async def _waitUp(self, run: _ServerRun) -> ServerStat:
        deadline = self._clock.seconds() + self.readyTimeout
        last = "not seen"
        while True:
            try:
                stat = await self._stat(run.name)
            except (HAProxyError, HAProxyUnreachable) as e:
                last = "unknown ({})".format(e)
            else:
                last = stat.describe()
                if stat.up:
                    return stat
            if self._clock.seconds() + self.pollInterval > deadline:
                raise _ServerFailed(
                    "not reported up by HAProxy within {:g} s (last status: "
                    "{})".format(self.readyTimeout, last)
                )
            await self._pause()


class _ServerFailed(Exception):
    """
    One server did not come back; the message says why.
    """


# The command line


def _seconds(name: str, allowZero: bool) -> Callable[[str], float]:
    def coerce(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        low = 0 <= seconds if allowZero else 0 < seconds
        if not (low and seconds < float("inf")):
            raise ValueError(
                "{} needs a {} number of seconds, not {!r}".format(
                    name, "non-negative" if allowZero else "positive", value
                )
            )
        return seconds

    coerce.coerceDoc = "Seconds."  # type: ignore[attr-defined]
    return coerce


def _atLeastOne(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(
            "--max-unavailable needs a whole number of at least 1, not "
            "{!r}".format(value)
        )
    return number


_atLeastOne.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


class RollingOptions(usage.Options):
    """
    C{python -m migrate rolling}.
    """

    synopsis = (
        "--haproxy SOCKET --backend NAME [--control SERVER=PATH ...] "
        "[--restart-command SERVER=COMMAND ...] [options]"
    )
    longdesc = (
        "Upgrade every server of an HAProxy backend in turn: drain it, wait "
        "for its sessions to end, upgrade it (through its migrate host's "
        "control socket, or with a restart command), wait until HAProxy's "
        "health check reports it up, put it back in rotation.  A server that "
        "does not come back stops the roll and is left in maintenance."
    )
    optFlags: list[list[Any]] = [
        ["json", None, "Print one JSON object on the last line of standard output."],
    ]
    optParameters: list[list[Any]] = [
        ["haproxy", None, None, "HAProxy's stats socket ('level admin')."],
        ["backend", None, None, "The backend whose servers are upgraded."],
        [
            "strategy",
            "s",
            None,
            "The strategy migrate hosts use (default: each host's own).",
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "Upgrade a drained server after this many seconds even if "
            "sessions remain.",
            _seconds("--drain-timeout", True),
        ],
        [
            "ready-timeout",
            None,
            30.0,
            "Seconds an upgraded server has to be reported up by HAProxy.",
            _seconds("--ready-timeout", False),
        ],
        [
            "upgrade-timeout",
            None,
            120.0,
            "Seconds one server's upgrade may take.",
            _seconds("--upgrade-timeout", False),
        ],
        [
            "max-unavailable",
            None,
            1,
            "Servers out of rotation at once.",
            _atLeastOne,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["control"] = {}
        self["restart-command"] = {}

    def _mapping(self, option: str, value: str) -> None:
        server, sep, target = value.partition("=")
        server, target = server.strip(), target.strip()
        if not sep or not server or not target:
            raise usage.UsageError(
                "--{} needs SERVER=VALUE, not {!r}".format(option, value)
            )
        if server in self["control"] or server in self["restart-command"]:
            raise usage.UsageError(
                "server {} is given more than one --control or "
                "--restart-command".format(server)
            )
        self[option][server] = target

    def opt_control(self, value: str) -> None:
        """
        SERVER=PATH: the control socket of the migrate host SERVER (repeat).
        """
        self._mapping("control", value)

    def opt_restart_command(self, value: str) -> None:
        """
        SERVER=COMMAND: restarts SERVER, not a migrate host, on new code.
        """
        self._mapping("restart-command", value)

    def parseArgs(self) -> None:
        """
        No positional arguments.
        """

    def postOptions(self) -> None:
        for name in ("haproxy", "backend"):
            if not self[name]:
                raise usage.UsageError("--{} is required".format(name))
        if not self["control"] and not self["restart-command"]:
            raise usage.UsageError(
                "give --control SERVER=PATH or --restart-command SERVER=COMMAND "
                "for each server of the backend"
            )
        if self["strategy"] is not None and not self["strategy"].strip():
            raise usage.UsageError("--strategy needs a name")


async def rollingCommand(
    reactor: Any,
    options: RollingOptions,
    out: _Output,
    connect: Connector = connectControl,
    *,
    runtimeAPI: Callable[[Any, str], RuntimeAPI] = UnixRuntimeAPI,
    runCommand: Callable[
        [Any, str, float], Deferred[tuple[int, str]]
    ] = runShellCommand,
) -> int:
    """
    Run C{python -m migrate rolling}: validate, roll, print the report.

    @raise _Failed: with the exit status and the message to print.
    """
    upgraders: dict[str, IServerUpgrader] = {}
    for server, path in options["control"].items():
        upgraders[server] = MigrateHostUpgrader(
            reactor,
            path,
            strategy=options["strategy"],
            timeout=options["upgrade-timeout"],
            connect=connect,
        )
    for server, command in options["restart-command"].items():
        upgraders[server] = RestartCommandUpgrader(
            command, options["upgrade-timeout"], partial(runCommand, reactor)
        )
    rolling = RollingUpgrade(
        HAProxyClient(runtimeAPI(reactor, options["haproxy"])),
        options["backend"],
        upgraders,
        reactor,
        drainTimeout=options["drain-timeout"],
        readyTimeout=options["ready-timeout"],
        maxUnavailable=options["max-unavailable"],
        progress=out.progress,
    )
    try:
        plan = await rolling.validate()
    except HAProxyUnreachable as e:
        raise _Failed(EXIT_UNREACHABLE, str(e)) from None
    except RollRefused as e:
        raise _Failed(EXIT_FAILED, "nothing was drained: {}".format(e)) from None
    report = await rolling.roll(plan)
    out.result(report.toJSON(), formatRollReport(report))
    if not report.succeeded:
        raise _Failed(EXIT_FAILED, "rolling upgrade stopped: {}".format(report.reason))
    return EXIT_OK
