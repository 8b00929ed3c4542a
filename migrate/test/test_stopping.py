"""
Tests for stopping a service politely: L{migrate._host._stopping.StopAttempt}
with a fake host and clock, and C{python -m migrate stop}
(L{migrate._control._stop}) with a fake control client.  The real thing,
with processes, is in L{migrate.test.test_keeper_integration}.
"""

from __future__ import annotations

import io
import signal
from typing import Any, Callable

from attrs import Factory, define
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from .._cli import run
from .._control._client import CannotConnect
from .._control._commands import MigrationInProgress
from .._control._stop import formatStop
from .._host._stopping import StopAttempt


@define
class _Keeper:
    keeperPid: int
    told: list[bytes] = Factory(list)

    def tell(self, message: bytes) -> None:
        self.told.append(message)


@define
class _Host:
    reactor: Clock
    keeper: Any = None
    generation: int = 3
    pid: int = 300
    connections: int = 2
    older: list[dict[str, Any]] = Factory(list)
    acceptingStopped: int = 0
    reporter: Callable[[list[dict[str, Any]]], None] | None = None
    drainTimeout: float | None = None

    def connectionCount(self) -> int:
        return self.connections

    def drainingGenerations(self) -> list[dict[str, Any]]:
        return list(self.older)

    def stopAccepting(self) -> None:
        self.acceptingStopped += 1

    def drainToStop(
        self, reporter: Callable[[list[dict[str, Any]]], None], drainTimeout: float
    ) -> None:
        self.reporter = reporter
        self.drainTimeout = drainTimeout

    def report(self, ownConnections: int) -> None:
        assert self.reporter is not None
        self.reporter(
            self.older
            + [
                {
                    "generation": self.generation,
                    "pid": self.pid,
                    "connections": ownConnections,
                }
            ]
        )


class StopAttemptTests(SynchronousTestCase):
    """
    L{StopAttempt} stops accepting, drains, and stops the older
    generations at the deadline.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.killed: list[tuple[int, int]] = []
        self.progress: list[str] = []

    def attempt(self, host: _Host, drainTimeout: float = 10.0) -> StopAttempt:
        return StopAttempt(
            host,
            drainTimeout,
            self.progress.append,
            kill=lambda pid, signum: self.killed.append((pid, signum)),
        )

    def test_drainedInTime(self) -> None:
        """
        Everything drains before the deadline: nobody is signalled, and the
        answer says so.
        """
        host = _Host(self.clock)
        d = self.attempt(host).run()
        self.assertEqual(host.acceptingStopped, 1)
        self.assertEqual(host.drainTimeout, 10.0)
        host.report(1)
        self.assertNoResult(d)
        self.clock.advance(2)
        host.report(0)
        result = self.successResultOf(d)
        self.assertEqual(
            result,
            {
                "generation": 3,
                "pid": 300,
                "closedAtDeadline": False,
                "stopped": [],
                "seconds": 2.0,
            },
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("stops accepting", self.progress[0])

    def test_deadline(self) -> None:
        """
        At the deadline, older generations get C{SIGTERM}, except the one
        that will stay as the keeper, which is told to close what it drains.
        """
        host = _Host(
            self.clock,
            keeper=_Keeper(100),
            older=[
                {"generation": 1, "pid": 100, "connections": 1},
                {"generation": 2, "pid": 200, "connections": 4},
            ],
        )
        d = self.attempt(host, 5.0).run()
        self.clock.advance(5)
        self.assertEqual(self.killed, [(200, signal.SIGTERM)])
        self.assertEqual(host.keeper.told, [b"stop-draining"])
        self.assertNoResult(d)
        host.older = []
        host.report(0)
        result = self.successResultOf(d)
        self.assertTrue(result["closedAtDeadline"])
        self.assertEqual(result["stopped"], [100, 200])
        self.assertIn("Stopped generation 3 (pid 300)", formatStop(result))
        self.assertIn("200", formatStop(result))


@define
class _Client:
    result: Any
    drains: list[float | None] = Factory(list)
    disconnected: int = 0

    def status(self) -> Deferred[Any]:
        raise AssertionError("not asked")

    def upgrade(self, strategy: str | None) -> Deferred[Any]:
        raise AssertionError("not asked")

    def stop(self, drainTimeout: float | None) -> Deferred[Any]:
        self.drains.append(drainTimeout)
        if isinstance(self.result, BaseException):
            return fail(self.result)
        return succeed(self.result)

    def disconnect(self) -> None:
        self.disconnected += 1


class StopCommandTests(SynchronousTestCase):
    """
    C{python -m migrate stop}.
    """

    def runStop(self, client: Any, *arguments: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()

        def connect(reactor: Any, path: str, onProgress: Any) -> Deferred[Any]:
            if isinstance(client, BaseException):
                return fail(client)
            return succeed(client)

        code = self.successResultOf(
            run(Clock(), ["stop", *arguments], connect=connect, stdout=out, stderr=err)
        )
        return code, out.getvalue(), err.getvalue()

    def test_stopped(self) -> None:
        client = _Client({"generation": 4, "pid": 9, "stopped": [], "seconds": 0.5})
        code, out, err = self.runStop(client, "--drain-timeout", "7")
        self.assertEqual(code, 0)
        self.assertEqual(client.drains, [7.0])
        self.assertIn("Stopped generation 4 (pid 9)", out)
        self.assertEqual(client.disconnected, 1)

    def test_refused(self) -> None:
        code, out, err = self.runStop(
            _Client(MigrationInProgress("a migration is running (phase: spawning)"))
        )
        self.assertEqual(code, 1)
        self.assertIn("a migration is running", err)

    def test_unreachable(self) -> None:
        code, out, err = self.runStop(
            CannotConnect("cannot connect to x: no such file")
        )
        self.assertEqual(code, 3)

    def test_usage(self) -> None:
        code, out, err = self.runStop(_Client({}), "--drain-timeout", "-1")
        self.assertEqual(code, 2)
