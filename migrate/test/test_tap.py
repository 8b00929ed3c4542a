"""
Tests for L{migrate.tap}: option parsing and building the host.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from .. import tap
from .._host._daemon import AppendingLogFile
from .._host._service import MigrationHost
from ..examples.chat import ChatFactory
from ._fakes import HostReactor

#: a factory tests can name with --app
factoryInstance = Factory.forProtocol(Protocol)


def makeSomething():
    return factoryInstance


def makeNothing():
    return 42


class OptionsTests(SynchronousTestCase):
    """
    L{tap.Options} checks everything before anything starts.
    """

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """
        With no options: the chat demo on tcp:8000 on the loopback
        interface only (it has no authentication), the default strategy,
        the control socket in the working directory, 30 s to get ready, no
        drain deadline.
        """
        options = self.parse()
        self.assertEqual(options["listen"], ["tcp:8000:interface=127.0.0.1"])
        self.assertEqual(options["strategy"], tap.DEFAULT_STRATEGY)
        self.assertEqual(options["control"], os.path.abspath("migrate-host.sock"))
        self.assertEqual(options["ready-timeout"], 30.0)
        self.assertIsNone(options["drain-timeout"])
        self.assertIsInstance(options["factory"], ChatFactory)

    def test_appFactoryOrCallable(self) -> None:
        """
        --app names a factory, or a callable returning one.
        """
        here = __name__
        self.assertIs(
            self.parse("--app", here + ":factoryInstance")["factory"], factoryInstance
        )
        self.assertIs(
            self.parse("--app", here + ":makeSomething")["factory"], factoryInstance
        )

    def test_appErrors(self) -> None:
        """
        A malformed, missing or wrong --app is a usage error naming it.
        """
        for spec, expected in [
            ("nocolon", "PKG.MOD:NAME"),
            ("no.such.module:thing", "cannot load"),
            (__name__ + ":missing", "cannot load"),
            (__name__ + ":makeNothing", "not a protocol factory"),
            (__name__ + ":tap", "neither a protocol factory"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                self.parse("--app", spec)
            self.assertIn(expected, str(raised.exception))

    def test_listenRepeatable(self) -> None:
        """
        --listen may be given several times; the same endpoint twice is an
        error.
        """
        options = self.parse("--listen", "tcp:1234", "--listen", "unix:/tmp/x.sock")
        self.assertEqual(options["listen"], ["tcp:1234", "unix:/tmp/x.sock"])
        self.assertRaises(
            usage.UsageError, self.parse, "--listen", "tcp:1", "--listen", "tcp:1"
        )

    def test_badEndpoint(self) -> None:
        """
        An endpoint description that does not parse is a usage error.
        """
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--listen", "nonsense:1234")
        self.assertIn("nonsense:1234", str(raised.exception))
        self.assertRaises(usage.UsageError, self.parse, "--listen", "tcp:notaport")

    def test_badStrategy(self) -> None:
        """
        An unknown strategy is a usage error listing the known ones.
        """
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--strategy", "teleport")
        self.assertIn("gradual", str(raised.exception))

    def test_badTimeouts(self) -> None:
        """
        Timeouts are positive numbers of seconds.
        """
        for option in [
            "--ready-timeout",
            "--drain-timeout",
            "--handoff-timeout",
            "--freeze-timeout",
        ]:
            for value in ["soon", "0", "-1", "nan", "inf"]:
                self.assertRaises(usage.UsageError, self.parse, option, value)
        self.assertEqual(self.parse("--drain-timeout", "2.5")["drain-timeout"], 2.5)
        self.assertEqual(self.parse()["freeze-timeout"], 5.0)
        self.assertEqual(self.parse("--freeze-timeout", "0.5")["freeze-timeout"], 0.5)

    def test_safePointTimeout(self) -> None:
        """
        C{--safe-point-timeout} is a number of seconds, 3 by default; 0
        means do not wait.
        """
        self.assertEqual(self.parse()["safe-point-timeout"], 3.0)
        self.assertEqual(
            self.parse("--safe-point-timeout", "0")["safe-point-timeout"], 0
        )
        self.assertEqual(
            self.parse("--safe-point-timeout", "0.5")["safe-point-timeout"], 0.5
        )
        for value in ["soon", "-1", "nan", "inf"]:
            self.assertRaises(
                usage.UsageError, self.parse, "--safe-point-timeout", value
            )


class PidfileTests(SynchronousTestCase):
    """
    The host keeps twistd's pidfile naming the serving process.
    """

    def parseUnder(self, parent: dict, environ: dict) -> tap.Options:
        options = tap.Options()
        options.parent = parent  # type: ignore[assignment]
        self.patch(os, "environ", environ)
        options.parseOptions([])
        return options

    def test_servingProcessKeepsPidfile(self) -> None:
        """
        A first generation lets twistd write its pidfile and remembers it.
        """
        parent = {"pidfile": "run/twistd.pid"}
        options = self.parseUnder(parent, {})
        self.assertEqual(options["pidfile"], os.path.abspath("run/twistd.pid"))
        self.assertEqual(parent["pidfile"], "run/twistd.pid")
        options.forgetPidfile()
        self.assertEqual(parent["pidfile"], "")

    def test_successorSkipsPidCheck(self) -> None:
        """
        A successor does not let twistd check the pidfile (it names the old
        process, alive) but remembers it to rewrite once it serves.
        """
        parent = {"pidfile": "twistd.pid"}
        options = self.parseUnder(parent, {"MIGRATE_HANDOFF_FD": "3"})
        self.assertEqual(options["pidfile"], os.path.abspath("twistd.pid"))
        self.assertEqual(parent["pidfile"], "")

    def test_noPidfile(self) -> None:
        """
        Without a pidfile (C{twist}, or C{--pidfile ''}) there is none to keep.
        """
        self.assertIsNone(self.parseUnder({}, {})["pidfile"])
        self.assertIsNone(self.parseUnder({"pidfile": ""}, {})["pidfile"])


class BuildHostTests(SynchronousTestCase):
    """
    L{tap.buildHost} turns options into a L{MigrationHost}.
    """

    def test_build(self) -> None:
        """
        The host gets the options' listeners, strategy and timeouts.
        """
        options = tap.Options()
        options.parseOptions(
            ["--listen", "tcp:0", "--strategy", "capability", "--ready-timeout", "5"]
        )
        host = tap.buildHost(HostReactor(), options)
        self.assertIsInstance(host, MigrationHost)
        self.assertEqual(list(host.listeners), ["tcp:0"])
        self.assertEqual(host.strategy.name, "capability")
        self.assertEqual(host.settings.readyTimeout, 5.0)
        self.assertIsNone(host.inheritance)

    def test_sharedLogFileAppendedAtEachMigration(self) -> None:
        """
        With a log file the generations share, the host makes this process
        append to it again as each migration starts (a rotation reopened
        it without C{O_APPEND}); without one it has no such observer.
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0"])
        options["logfile"] = "/var/log/app/twistd.log"
        host = tap.buildHost(HostReactor(), options)
        [appending] = [
            each for each in host.observers if isinstance(each, AppendingLogFile)
        ]
        self.assertEqual(appending.path, "/var/log/app/twistd.log")
        options["logfile"] = None
        host = tap.buildHost(HostReactor(), options)
        self.assertFalse(
            [each for each in host.observers if isinstance(each, AppendingLogFile)]
        )

    def test_yieldWhenHandedOn(self) -> None:
        """
        A host lowers its priority once handed on only when told to, as
        C{twistd migrate-host} does for a process that ends then: an
        embedding application's process may go on with other work.
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0", "--strategy", "capability"])
        self.assertFalse(
            tap.buildHost(HostReactor(), options).settings.yieldWhenHandedOn
        )
        host = tap.buildHost(HostReactor(), options, yieldWhenHandedOn=True)
        self.assertTrue(host.settings.yieldWhenHandedOn)

    def test_childStart(self) -> None:
        """
        Successors and trial processes start in the background unless
        C{--child-start foreground} says otherwise; another value is a
        usage error naming both.
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0"])
        self.assertTrue(
            tap.buildHost(HostReactor(), options).settings.startInBackground
        )
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0", "--child-start", "foreground"])
        self.assertFalse(
            tap.buildHost(HostReactor(), options).settings.startInBackground
        )
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--listen", "tcp:0", "--child-start", "idle"])
        self.assertIn("background or foreground", str(raised.exception))


class PluginOptionsTests(SynchronousTestCase):
    """
    C{twistd migrate-host [host options] PLUGIN [plugin options]}.
    """

    def test_hostsAnotherPlugin(self) -> None:
        """
        A plugin name after the host's options hosts that plugin, with its
        own options parsed by it; no application factory is loaded.
        """
        options = tap.Options()
        options.parseOptions(["--strategy", "gradual", "web", "--path", "."])
        self.assertEqual(options.subCommand, "web")
        self.assertIsNone(options["factory"])
        self.assertEqual(options["listen"], [])
        self.assertEqual(options.subOptions["root"].path, os.path.abspath("."))

    def test_hostListenIsKept(self) -> None:
        """
        The host's C{--listen} with a plugin redirects the plugin's ports.
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:9999", "web", "--path", "."])
        self.assertEqual(options["listen"], ["tcp:9999"])

    def test_appAndPluginExclusive(self) -> None:
        """
        C{--app} and a plugin exclude each other.
        """
        options = tap.Options()
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["--app", __name__ + ":factoryInstance", "web"])
        self.assertIn("exclude each other", str(raised.exception))

    def test_notItself(self) -> None:
        """
        migrate-host does not offer to host itself.
        """
        names = [name for name, _, _, _ in tap.Options().subCommands]
        self.assertIn("web", names)
        self.assertNotIn("migrate-host", names)


class OneLineErrorTests(SynchronousTestCase):
    """
    Under twistd or twist, an option error ends the process with one line,
    without the usage text; parsed on its own, L{tap.Options} raises
    L{usage.UsageError} as usual.
    """

    def parseUnder(self, *argv: str) -> None:
        """
        Parse C{migrate-host ARGV} as a subcommand, as twistd does.
        """

        class Twistd(usage.Options):
            subCommands = [["migrate-host", None, tap.Options, "the host"]]

        Twistd().parseOptions(["migrate-host"] + list(argv))

    def test_oneLine(self) -> None:
        """
        A usage error under a parent is a L{SystemExit} whose message is
        one line naming the problem (status 1 once Python prints it).
        """
        with self.assertRaises(SystemExit) as raised:
            self.parseUnder("--strategy", "fast")
        self.assertEqual(
            raised.exception.code,
            "migrate-host: error: --strategy must be one of capability, gradual, "
            "reexec, reload, not 'fast'",
        )

    def test_hostedPluginErrors(self) -> None:
        """
        A hosted plugin's own option errors are one line too.
        """
        with self.assertRaises(SystemExit) as raised:
            self.parseUnder("web", "--no-such-option")
        self.assertEqual(
            raised.exception.code,
            "migrate-host: error: option --no-such-option not recognized",
        )

    def test_help(self) -> None:
        """
        C{--help} still prints the usage and exits with status 0.
        """
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        with self.assertRaises(SystemExit) as raised:
            self.parseUnder("--help")
        self.assertEqual(raised.exception.code, 0)
        self.assertIn("--strategy", output.getvalue())


class HelpTests(SynchronousTestCase):
    """
    C{twistd migrate-host --help}.
    """

    def test_noRunsOfSpaces(self) -> None:
        """
        The help text has no runs of spaces inside a line's text (the
        docstrings' indentation is gone).
        """
        docs = tap.Options().docs
        self.assertIn("zero-argument callable", docs["app"])
        for name, doc in docs.items():
            self.assertNotIn("  ", doc or "", name)
            self.assertNotIn("\n", doc or "", name)
        self.assertIn("a zero-argument callable", tap.Options().getUsage(width=80))


class ModulePathHintTests(SynchronousTestCase):
    """
    An C{--app} module in the current directory that Python does not find
    gets a hint at C{PYTHONPATH}.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        here = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, here)
        self.patch(sys, "path", [p for p in sys.path if p not in ("", ".")])

    def load(self, spec: str) -> str:
        with self.assertRaises(usage.UsageError) as raised:
            tap.loadFactory(spec)
        return str(raised.exception)

    def test_moduleHere(self) -> None:
        """
        C{NAME.py} in the current directory, not on the module path.
        """
        with open("mychatnothere.py", "w") as f:
            f.write("makeFactory = None\n")
        message = self.load("mychatnothere:makeFactory")
        self.assertIn("No module named 'mychatnothere'", message)
        self.assertIn(
            "(mychatnothere.py is in the current directory, where Python does "
            'not look for modules: start with PYTHONPATH="$PWD"',
            message,
        )

    def test_packageHere(self) -> None:
        """
        A package directory in the current directory.
        """
        os.makedirs("mypkgnothere")
        message = self.load("mypkgnothere.app:makeFactory")
        self.assertIn("(mypkgnothere/ is in the current directory", message)

    def test_noHint(self) -> None:
        """
        No hint when the module is nowhere here, when another module is
        missing, or when the current directory is on the path.
        """
        self.assertNotIn("PYTHONPATH", self.load("elsewhereentirely:makeFactory"))
        with open("importsmissing.py", "w") as f:
            f.write("import notinstalledanywhere\n")
        sys.path.append(self.directory)
        self.assertNotIn("PYTHONPATH", self.load("importsmissing:makeFactory"))
        sys.path.remove(self.directory)
        with open("foundhere.py", "w") as f:
            f.write("x = 1\n")
        sys.path.append("")
        self.assertNotIn("PYTHONPATH", self.load("foundhereabsent:makeFactory"))
