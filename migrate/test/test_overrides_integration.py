"""
Integration tests for C{python -m migrate upgrade --ready-timeout} and
C{--drain-timeout}: host settings replaced for one migration, with real
processes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import LiveAppMixin, writeModule
from .test_gradual_integration import APP_V1, APP_V2

#: new code that takes far longer to load than the overridden ready timeout
#: (and less than the host's own 30 s, which the test never waits for)
SLOW_V2 = "import time\ntime.sleep(25)\n" + APP_V2


class OverrideTests(LiveAppMixin, TestCase):
    """
    Per-upgrade overrides reach the migration they were given for.
    """

    timeout = 120
    strategy = "gradual"
    initialApp = APP_V1

    @inlineCallbacks
    def test_readyTimeout(self) -> Any:
        """
        C{--ready-timeout 1}: a new process not ready within a second rolls
        the migration back after that second, not after the host's own 30;
        the old code serves on.
        """
        yield self.startHost()
        [client] = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", SLOW_V2)
        started = reactor.seconds()
        code, report, err = yield self.host.upgrade("--ready-timeout", "1")
        self.assertEqual((code, report["outcome"]), (1, "rolled-back"), err)
        self.assertIn("not ready within 1.0 s", report["reason"])
        self.assertLess(reactor.seconds() - started, 20)
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply[0], b"v1")

    @inlineCallbacks
    def test_drainTimeout(self) -> Any:
        """
        C{--drain-timeout 1} with gradual transfer: the old process, which
        has no drain deadline of its own, closes the connection left with it
        after a second.
        """
        yield self.startHost()
        [client] = yield self.connectClients(1)
        writeModule(self.host.workdir, "liveapp", APP_V2)
        code, report, err = yield self.host.upgrade("--drain-timeout", "1")
        self.assertEqual(
            (code, report["outcome"], report["draining"]), (0, "success", 1)
        )
        yield client.closed.addTimeout(30, reactor)
