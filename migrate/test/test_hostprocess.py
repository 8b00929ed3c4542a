"""
Tests for the integration tests' own helpers (L{migrate.test._hostprocess}).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import (
    SOURCE_ROOT,
    CLITimedOut,
    ProcessOutput,
    pidAlive,
    runCLI,
    waitFor,
)


class RunCLITests(TestCase):
    """
    L{runCLI} is bounded.
    """

    timeout = 60

    @inlineCallbacks
    def test_timeoutKills(self) -> Any:
        """
        A CLI that does not end within the timeout (here: waiting for a
        control socket that never answers) is killed, and the wait fails
        with L{CLITimedOut} instead of hanging the test.
        """
        directory = tempfile.mkdtemp(prefix="migrate-cli-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "silent.sock")
        silent = socket.socket(socket.AF_UNIX)
        self.addCleanup(silent.close)
        silent.bind(path)
        silent.listen(5)
        with self.assertRaises(CLITimedOut) as caught:
            yield runCLI(
                ["status", "--control", path, "--timeout", "600"],
                cwd=directory,
                timeout=2.0,
            )
        self.assertIn("did not end within 2.0 s", str(caught.exception))
        self.assertFalse(pidAlive(caught.exception.pid))


#: a process standing in for trial: it starts a host through the harness,
#: upgrades it, prints the first and the new process ids, and waits to be
#: killed (its cleanups, which would end the host, never run)
_PARENT = """
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from migrate.test._hostprocess import HostProcess, freePort


class Case:
    def addCleanup(self, *args, **kwargs):
        pass


async def main():
    host = HostProcess(
        Case(),
        [
            "--app", "migrate.bench._app:makeFactory",
            "--listen", "tcp:{}:interface=127.0.0.1".format(freePort()),
            "--strategy", "capability",
        ],
    )
    status = await host.start()
    # A successor: its parent is the first host, not this process.
    code, report, err = await host.upgrade()
    print("HOSTS", status["pid"], report.get("newPid"), host.workdir.path, flush=True)


reactor.callWhenRunning(lambda: ensureDeferred(main()))
reactor.run()
"""


class WatchdogTests(TestCase):
    """
    The hosts the harness starts end with the test process, however it
    ends.
    """

    timeout = 120

    @inlineCallbacks
    def test_hostEndsWithItsTestProcess(self) -> Any:
        """
        When the process that started a host through L{HostProcess} is
        killed (C{SIGKILL}: no cleanup runs), the host ends too, and so
        does its successor, whose parent is the host.
        """
        parent = ProcessOutput()
        env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
        process = reactor.spawnProcess(
            parent, sys.executable, [sys.executable, "-c", _PARENT], env=env
        )
        parentPid = process.pid
        hostPids: list[int] = []

        def killAll() -> None:
            # Only if the test failed: none should be left behind.
            for kill, pid in [(os.kill, parentPid)] + [
                (kill, pid) for pid in hostPids for kill in (os.killpg, os.kill)
            ]:
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass

        def hosts() -> list[bytes] | None:
            for line in bytes(parent.output).split(b"\n")[:-1]:
                if line.startswith(b"HOSTS "):
                    return line.split()[1:]
            return None

        self.addCleanup(lambda: parent.ended)
        self.addCleanup(killAll)
        yield waitFor(
            lambda: parent.ended.called or hosts(),
            timeout=60,
            what="the parent to start and upgrade its host",
        )
        self.assertFalse(parent.ended.called, parent.output.decode())
        first, successor, workdir = hosts() or []
        self.addCleanup(shutil.rmtree, workdir.decode(), True)
        hostPids.extend([int(first), int(successor)])
        self.assertTrue(pidAlive(hostPids[1]), parent.output.decode())
        os.kill(parentPid, signal.SIGKILL)
        yield waitFor(
            lambda: not any(pidAlive(pid) for pid in hostPids),
            timeout=30,
            what="the host and its successor to end",
        )
