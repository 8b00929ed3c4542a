"""
Integration tests for the trial of the new code (L{migrate._handoff._trial})
with real hosts: re-exec and module reload try the new code in a child
process first, and new code that hangs, crashes, exits or refuses a state
changes nothing in the serving process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ._hostprocess import LiveAppMixin, connectLineClient, runCLI
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2

#: version 2, whose restore ends the process for the connection whose
#: count is 1
EXITS_ON_ONE = MIGRATABLE_V2.replace(
    'self.count = state["total"]',
    'self.count = state["total"]\n        if self.count == 1: os._exit(3)',
)

#: version 2, whose restore refuses the connection whose count is 1
REFUSES_ONE = MIGRATABLE_V2.replace(
    'self.count = state["total"]',
    'self.count = state["total"]\n'
    '        if self.count == 1: raise RuntimeError("state refused")',
)

#: version 2, which blocks at import
HANGS_AT_IMPORT = "import time\ntime.sleep(3600)\n" + MIGRATABLE_V2


if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


class _TrialMixin(LiveAppMixin, _Base):
    """
    A host on L{MIGRATABLE_V1} with three clients, the second of which has
    count 1 (the others 0).
    """

    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def prepare(self, *extra: str) -> Any:
        status = yield self.startHost("--ready-timeout", "3", *extra)
        self.pid = status["pid"]
        clients = yield self.connectClients(3)
        yield self.exchange(clients[1], b"one")
        self.clients = clients
        self.counts = [0, 1, 0]
        return clients

    def change(self, source: str) -> None:
        from ._hostprocess import writeModule

        writeModule(self.host.workdir, "liveapp", source)

    @inlineCallbacks
    def assertUnharmed(self) -> Any:
        """
        Every client is still served by the old code in the same process,
        its count intact, and a new client gets the old code too.
        """
        pid = str(self.pid).encode()
        for index, client in enumerate(self.clients):
            reply = yield self.exchange(client, b"still")
            self.assertEqual(reply[:2], [b"v1", pid])
            self.assertEqual(reply[3], b"%d" % (self.counts[index] + 1,))
            self.assertFalse(client.closed.called)
        fresh = yield connectLineClient(self.port)
        hello = yield fresh.waitForLines(1)
        self.assertEqual(hello[0].split(b" ")[1], b"v1")
        fresh.transport.loseConnection()
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (self.pid, 1))

    @inlineCallbacks
    def test_restoreExitsRefused(self):
        """
        New code whose restore ends the process for one connection is
        refused, naming that connection; nothing in the serving process
        changed.
        """
        yield self.prepare()
        self.change(EXITS_ON_ONE)
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("exited with status 3", report["reason"])
        self.assertIn("liveapp.Counter", report["reason"])
        self.assertIn("trial", report["durations"])
        yield self.assertUnharmed()

    @inlineCallbacks
    def test_restoreRaisesRefused(self):
        """
        New code whose restore raises for one connection is refused by
        default, with the reason and the connection.
        """
        yield self.prepare()
        self.change(REFUSES_ONE)
        code, report, err = yield self.host.upgrade()
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("state refused", report["reason"])
        self.assertIn("the connection from 127.0.0.1:", report["reason"])
        yield self.assertUnharmed()

    @inlineCallbacks
    def test_trialFailureClose(self):
        """
        With C{--trial-failure close}, the connection the new code refuses
        is closed cleanly first and the others migrate.
        """
        yield self.prepare("--trial-failure", "close")
        self.change(EXITS_ON_ONE)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        yield self.clients[1].closed
        for index in (0, 2):
            reply = yield self.exchange(self.clients[index], b"after")
            self.assertEqual((reply[0], reply[3]), (b"v2", b"1"))
        self.assertTrue(
            any("--trial-failure close" in note for note in report["notes"]),
            report["notes"],
        )


class ReexecTrialTests(_TrialMixin, TestCase):
    """
    Re-exec tries the new code in its preflight process.
    """

    timeout = 120
    strategy = "reexec"


class ReloadTrialTests(_TrialMixin, TestCase):
    """
    Module reload tries the new code in a child process before it imports
    anything into the serving process.
    """

    timeout = 120
    strategy = "reload"

    @inlineCallbacks
    def test_importHangsRefused(self):
        """
        New code that blocks at import is refused once the ready timeout
        has passed, and the serving process answered meanwhile (its status
        included): the import ran in the child.
        """
        yield self.prepare()
        self.change(HANGS_AT_IMPORT)
        upgrading = self.host.upgrade()
        code, out, err = yield runCLI(
            ["status", "--control", self.host.control, "--json"],
            cwd=self.host.workdir.path,
        )
        self.assertEqual(code, 0, err)
        reply = yield self.exchange(self.clients[0], b"meanwhile")
        self.assertEqual(reply[0], b"v1")
        self.counts[0] += 1
        code, report, err = yield upgrading
        self.assertEqual(report["outcome"], "refused")
        self.assertEqual(report["reason"], "the new code did not load within 3.0 s")
        yield self.assertUnharmed()
