# -*- test-case-name: migrate.test.test_rolling -*-
"""
How one server of the backend is upgraded during a rolling upgrade
(L{IServerUpgrader}): through its migrate host's control socket, exactly as
C{python -m migrate upgrade} does (L{MigrateHostUpgrader}), or with a
restart command for a server that is not a migrate host
(L{RestartCommandUpgrader}).
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any, Callable, Protocol, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from .._control._client import (
    BadReply,
    CannotConnect,
    CommandFailed,
    Connector,
    HostClosedConnection,
    Output,
    Session,
    connectControl,
)
from .._control._commands import MigrationInProgress, UnknownStrategy
from .._control._format import reportSummary
from ..strategies import strategyNames

__all__ = [
    "IServerUpgrader",
    "MigrateHostUpgrader",
    "RestartCommandUpgrader",
    "RollRefused",
    "UpgradeFailed",
    "UpgradeResult",
    "runShellCommand",
]

_OUTPUT_LINES_KEPT = 20


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
class _RelayedOutput(Output):
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

    def _session(self, progress: Callable[[str], None]) -> Session:
        out = _RelayedOutput(io.StringIO(), io.StringIO(), relay=progress)
        return Session(self._reactor, self._connect, out, self.target)

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
        except CommandFailed as e:
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
            report = await session.upgrade(self.strategy, deadline)
        except CommandFailed as e:
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
        return UpgradeResult(reportSummary(report), report=report)


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
