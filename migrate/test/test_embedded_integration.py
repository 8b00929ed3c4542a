"""
Integration test for embedding: an application that is not run by twistd
adds a L{migrate.MigrationHost} to its own service tree
(L{migrate.examples.embedded}) and is upgraded like any host.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import (
    SOURCE_ROOT,
    ProcessOutput,
    Watchdog,
    connectLineClient,
    freePort,
    lastJSON,
    pidAlive,
    runCLI,
    waitFor,
)

#: the example run as C{python -m}, in its own session (so that the test can
#: end its whole lineage), except in the successor it starts
_LAUNCHER = textwrap.dedent("""
    import os, runpy, sys
    if "MIGRATE_HANDOFF_FD" not in os.environ:
        os.setsid()
    runpy.run_module("migrate.examples.embedded", run_name="__main__")
    """)


class EmbeddedHostTests(TestCase):
    """
    C{python -m migrate.examples.embedded}: a host in an application's own
    service tree.
    """

    timeout = 60

    @inlineCallbacks
    def test_embeddedApplicationUpgrades(self) -> Any:
        """
        The embedded host answers the control CLI; an upgrade starts the
        same command again, whose host finds it inherits the service: the
        chat users keep their names and hear each other on the new process,
        and the old one exits.
        """
        workdir = tempfile.mkdtemp(prefix="migrate-embedded-", dir="/tmp")
        control = os.path.join(workdir, "control.sock")
        port = freePort()
        env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
        for key in [key for key in env if key.startswith("MIGRATE_")]:
            del env[key]
        protocol = ProcessOutput()
        process = reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-c", _LAUNCHER, str(port), control],
            env=env,
            path=workdir,
        )
        # The session of the first process: its successors stay in it.
        session = process.pid

        def stopAll() -> Any:
            try:
                os.killpg(session, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return protocol.ended

        # Let go once the session is killed (cleanups run last first).
        self.addCleanup(Watchdog.watch(session).release)
        self.addCleanup(stopAll)
        self.addCleanup(shutil.rmtree, workdir, True)

        @inlineCallbacks
        def status() -> Any:
            code, out, err = yield runCLI(
                ["status", "--control", control, "--json"], cwd=workdir
            )
            return lastJSON(out) if code == 0 else None

        first = yield waitFor(status, what="the embedded host to answer")
        alice = yield connectLineClient(port)
        bob = yield connectLineClient(port)
        yield alice.waitForLines(2)
        yield bob.waitForLines(1)
        alice.sendLine(b"/nick alice")
        yield alice.waitForLines(3)
        yield bob.waitForLines(2)

        code, out, err = yield runCLI(
            ["upgrade", "--control", control, "--json"], cwd=workdir
        )
        report = lastJSON(out)
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 2), err
        )
        self.assertNotEqual(report["newPid"], first["pid"])
        second = yield status()
        self.assertEqual((second["pid"], second["generation"]), (report["newPid"], 2))

        before = len(bob.lines)
        alice.sendLine(b"still here")
        lines = yield bob.waitForLines(before + 1)
        self.assertEqual(lines[-1], b"<alice> still here")
        yield waitFor(
            lambda: not pidAlive(first["pid"]), what="the old process to exit"
        )
        self.assertFalse(alice.closed.called or bob.closed.called)
        alice.transport.loseConnection()
        bob.transport.loseConnection()
