"""
One migration with each strategy, with real processes, on whatever Python,
Twisted and reactor the suite runs on: the quick check that the test matrix
(C{noxfile.py}, C{.ci/run}) runs on every reactor and interpreter.

The hosts run on the reactor named by C{$MIGRATE_TEST_REACTOR} (epoll,
poll, select, asyncio; see L{migrate.bench._process.twistdCommandLine}),
and the tests check that they do.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..bench._process import REACTOR_VARIABLE
from ._hostprocess import LiveAppMixin, fields, writeModule
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2

#: the class twistd names in its log for each reactor it can be given
_REACTOR_CLASSES = {
    "epoll": "EPollReactor",
    "poll": "PollReactor",
    "select": "SelectReactor",
    "asyncio": "AsyncioSelectorReactor",
}


if TYPE_CHECKING:
    _TestCase = TestCase
else:
    _TestCase = object


class _OneMigration(LiveAppMixin, _TestCase):
    """
    A host with one client; one upgrade to version 2 with C{strategy}.
    """

    timeout = 120
    initialApp = MIGRATABLE_V1
    #: whether the connection moves to the new code (or drains on the old)
    moves = True

    @inlineCallbacks
    def test_upgradeKeepsTheClient(self) -> Any:
        """
        The client keeps its connection through the upgrade and is served
        by the code it should be: version 2 where connections move (with
        their state), version 1 where they drain; a new client gets
        version 2; the hosts ran on the reactor asked for.
        """
        status = yield self.startHost()
        oldPid = status["pid"]
        [client] = yield self.connectClients(1)
        reply = yield self.exchange(client, b"before")
        self.assertEqual(reply[0], b"v1")
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        reply = yield self.exchange(client, b"after")
        if self.moves:
            self.assertEqual((reply[0], reply[3]), (b"v2", b"2"))
            self.assertEqual(report["moved"], 1)
        else:
            self.assertEqual(reply[:2], [b"v1", str(oldPid).encode()])
            self.assertEqual(report["draining"], 1)
        self.assertFalse(client.closed.called)
        [newClient] = yield self.connectClients(1)
        self.assertEqual(fields(newClient.lines[0])[:2], [b"hello", b"v2"])
        self.assertReactor()

    def assertReactor(self) -> None:
        """
        The host (and its successor, which re-runs its command line) logged
        the reactor class C{$MIGRATE_TEST_REACTOR} names.
        """
        name = os.environ.get(REACTOR_VARIABLE)
        if not name:
            return
        expected = "reactor class: "
        lines = [line for line in self.host.output().splitlines() if expected in line]
        self.assertTrue(lines, "twistd logged no reactor class")
        for line in lines:
            self.assertIn(_REACTOR_CLASSES.get(name, name), line)


class CapabilityTests(_OneMigration, TestCase):
    strategy = "capability"


class GradualTests(_OneMigration, TestCase):
    strategy = "gradual"
    moves = False


class ReexecTests(_OneMigration, TestCase):
    strategy = "reexec"


class ReloadTests(_OneMigration, TestCase):
    strategy = "reload"
