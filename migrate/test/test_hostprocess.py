"""
Tests for the integration tests' own helpers (L{migrate.test._hostprocess}).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import CLITimedOut, pidAlive, runCLI


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
