# -*- test-case-name: migrate.test.test_rolling -*-
"""
The roll: upgrading the servers of an HAProxy backend in turn
(L{RollingUpgrade}), for C{python -m migrate rolling}.

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

How a server is upgraded is in L{migrate._rolling._upgraders}, what the roll
reports in L{migrate._rolling._report}, its command line in
L{migrate._rolling._command}.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .._control._format import countOf
from ._haproxy import HAProxyClient, HAProxyError, HAProxyUnreachable, ServerStat
from ._report import RollOutcome, RollReport, ServerPhase, ServerReport
from ._upgraders import IServerUpgrader, RollRefused, UpgradeFailed, UpgradeResult

__all__ = ["RollingUpgrade"]


_TRANSITIONS: dict[ServerPhase, frozenset[ServerPhase]] = {
    ServerPhase.pending: frozenset({ServerPhase.draining, ServerPhase.failed}),
    ServerPhase.draining: frozenset({ServerPhase.upgrading, ServerPhase.failed}),
    ServerPhase.upgrading: frozenset({ServerPhase.checking, ServerPhase.failed}),
    ServerPhase.checking: frozenset({ServerPhase.done, ServerPhase.failed}),
    ServerPhase.done: frozenset(),
    ServerPhase.failed: frozenset(),
}


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
                    say("draining ({})".format(countOf(sessions, "session")))
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
            "upgrading anyway".format(self.drainTimeout, countOf(sessions, "session"))
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
