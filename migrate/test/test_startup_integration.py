"""
Integration tests: C{twistd migrate-host} that cannot start says why in one
line (no usage text, no traceback) and exits with status 1; a successor
whose new code does not load shows the error in the report, not twistd's
usage.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from ..bench._process import SOURCE_ROOT, ProcessOutput, twistdCommandLine
from ._hostprocess import LiveAppMixin, freePort, writeModule

#: how long a host that cannot start may take to say so
_BOUND = 60.0


class StartupErrorTests(TestCase):
    """
    Real C{twistd -n migrate-host} processes that cannot start.
    """

    timeout = 120

    def setUp(self) -> None:
        self.workdir = FilePath(self.mktemp())
        self.workdir.makedirs()

    @inlineCallbacks
    def twistd(self, *arguments: str) -> Any:
        """
        Run C{twistd -n migrate-host ARGUMENTS} in the working directory,
        whose modules are not on the module path; fire with its exit status
        and the lines it wrote.
        """
        argv = twistdCommandLine(
            self.workdir.child("twistd.pid").path,
            [],
            ["--control", self.workdir.child("c.sock").path] + list(arguments),
        )
        # The twistd script itself, as users run it: unlike "python -c",
        # it does not put the current directory on the module path.
        script = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(script):
            raise SkipTest("no twistd script beside {}".format(sys.executable))
        argv[1:3] = [script]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_")}
        env["PYTHONPATH"] = SOURCE_ROOT
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        collect = ProcessOutput()
        process = reactor.spawnProcess(
            collect, sys.executable, argv, env=env, path=self.workdir.path
        )
        bound = reactor.callLater(_BOUND, process.signalProcess, "KILL")
        code = yield collect.ended
        if bound.active():
            bound.cancel()
        lines = collect.output.decode("utf-8", "replace").splitlines()
        return code, lines

    def assertOneLine(self, lines: list[str], expected: str) -> str:
        """
        Exactly one of C{lines} says what went wrong, starting with
        C{expected} (after a log prefix, if any); none is part of a
        traceback or a usage text.
        """
        said = [line for line in lines if "migrate-host: " in line]
        self.assertEqual(len(said), 1, lines)
        self.assertEqual(
            said[0].partition("migrate-host: ")[2][: len(expected)], expected
        )
        for line in lines:
            self.assertNotIn("Traceback", line)
            self.assertNotIn("Usage:", line)
        return said[0]

    @inlineCallbacks
    def test_appInCurrentDirectory(self) -> Any:
        """
        An C{--app} module that is in the current directory but not on the
        module path: one line, which hints at C{PYTHONPATH}.
        """
        writeModule(self.workdir, "mychat", "makeFactory = None\n")
        code, lines = yield self.twistd("--app", "mychat:makeFactory")
        self.assertEqual(code, 1)
        self.assertEqual(len(lines), 1, lines)
        line = self.assertOneLine(
            lines,
            "error: --app mychat:makeFactory: cannot load it: "
            "ModuleNotFoundError: No module named 'mychat' (mychat.py is in "
            "the current directory",
        )
        self.assertIn('PYTHONPATH="$PWD"', line)

    @inlineCallbacks
    def test_badOption(self) -> Any:
        """
        A wrong option value: one line naming it, no usage text.
        """
        code, lines = yield self.twistd("--strategy", "fast")
        self.assertEqual(
            (code, lines),
            (
                1,
                [
                    "migrate-host: error: --strategy must be one of capability, "
                    "gradual, reexec, reload, not 'fast'"
                ],
            ),
        )

    @inlineCallbacks
    def test_helpOnRequest(self) -> Any:
        """
        C{--help} shows the usage and exits with status 0.
        """
        code, lines = yield self.twistd("--help")
        self.assertEqual(code, 0)
        self.assertIn("--strategy", "\n".join(lines))

    @inlineCallbacks
    def test_portInUse(self) -> Any:
        """
        A port another process holds: one line, no traceback.
        """
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, lines = yield self.twistd(
            "--listen", "tcp:{}:interface=127.0.0.1".format(port)
        )
        self.assertEqual(code, 1)
        self.assertOneLine(
            lines,
            "cannot start: Couldn't listen on 127.0.0.1:{}: [Errno 98] "
            "Address already in use.".format(port),
        )

    @inlineCallbacks
    def test_udpPlugin(self) -> Any:
        """
        A hosted plugin that listens on UDP: one line saying that UDP
        cannot be handed on.
        """
        code, lines = yield self.twistd(
            "dns", "--port", str(freePort()), "--interface", "127.0.0.1"
        )
        self.assertEqual(code, 1)
        self.assertOneLine(
            lines, "cannot start: the hosted application listens on UDP port"
        )


class BrokenNewCodeTests(LiveAppMixin, TestCase):
    """
    New code that does not load: the report and the host's log show the
    error, not twistd's usage text.
    """

    timeout = 120
    strategy = "capability"
    #: how the migration ends: capability rolls back, re-exec refuses
    #: (its preflight fails before anything changed)
    outcome = "rolled-back"
    initialApp = (
        "from twisted.internet.protocol import Factory, Protocol\n"
        "def makeFactory():\n    return Factory.forProtocol(Protocol)\n"
    )

    @inlineCallbacks
    def test_syntaxError(self) -> Any:
        yield self.startHost()
        writeModule(self.host.workdir, "liveapp", self.initialApp + "x = (\n")
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (1, self.outcome))
        self.assertEqual(len(report["successorLog"]), 1, report["successorLog"])
        self.assertIn(
            "migrate-host: error: --app liveapp:makeFactory: cannot load it: "
            "SyntaxError: ",
            report["successorLog"][0],
        )
        self.assertIn("SyntaxError", report["reason"])
        self.assertNotIn("Usage:", self.host.output())
        self.assertNotIn("Traceback", self.host.output())


class BrokenNewCodeReexecTests(BrokenNewCodeTests):
    """
    The same with re-exec, whose preflight loads the new code in a child
    process first.
    """

    strategy = "reexec"
    outcome = "refused"
