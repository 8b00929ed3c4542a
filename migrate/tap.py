"""
The C{migrate-host} twistd plugin: options and service construction.

C{makeService} imports the reactor and hands it to L{buildHost}, a pure
builder that tests call with a fake reactor.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage

from ._host._daemon import (
    AppendingLogFile,
    appendToLogFile,
    isForeground,
    keepSuccessorInForeground,
    sharedLogFile,
)
from ._host._keeping import KEEPER_MODES
from ._host._service import MigrationHost
from ._host._settings import HostSettings
from .strategies import strategyNamed, strategyNames

__all__ = ["Options", "makeService", "buildHost", "loadFactory", "DEFAULT_APP"]

DEFAULT_APP = "migrate.examples.chat:makeFactory"
#: loopback only: the demo chat has no authentication
DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
DEFAULT_STRATEGY = "capability"


def loadFactory(spec: str) -> IProtocolFactory:
    """
    Find the application's protocol factory.

    @param spec: C{PKG.MOD:NAME}, where C{NAME} is a protocol factory or a
        callable taking no arguments that returns one.

    @raise usage.UsageError: with a clear message when it cannot be found.
    """
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise usage.UsageError("--app takes PKG.MOD:NAME, not {!r}".format(spec))
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except Exception as e:
        raise usage.UsageError(
            "--app {}: cannot load it: {}: {}{}".format(
                spec, type(e).__name__, e, _modulePathHint(module, e)
            )
        )
    if IProtocolFactory.providedBy(found):
        return found
    if callable(found):
        made = found()
        if IProtocolFactory.providedBy(made):
            return made
        raise usage.UsageError(
            "--app {}: calling it returned {!r}, not a protocol factory".format(
                spec, made
            )
        )
    raise usage.UsageError(
        "--app {}: {!r} is neither a protocol factory nor a callable "
        "returning one".format(spec, found)
    )


def _modulePathHint(module: str, error: Exception) -> str:
    """
    Explain a module that is not found although it is in the current
    directory: Python does not look there when it runs a script such as
    C{twistd}.

    @param module: the module C{--app} names.
    @param error: why importing it failed.

    @return: the hint, starting with a space, or an empty string.
    """
    top = module.split(".")[0]
    if not isinstance(error, ModuleNotFoundError) or error.name != top:
        return ""
    here = os.getcwd()
    if os.path.isfile(top + ".py"):
        found = top + ".py"
    elif os.path.isdir(top):
        found = top + "/"
    else:
        return ""
    if any(os.path.abspath(entry or ".") == here for entry in sys.path):
        return ""
    return (
        " ({} is in the current directory, where Python does not look for "
        'modules: start with PYTHONPATH="$PWD" in the environment, which '
        "every new process of the host inherits)".format(found)
    )


@contextmanager
def _oneLine(what: str) -> Iterator[None]:
    """
    Under twistd or twist: end the process with one line for an error whose
    message says it all, instead of a usage text or a traceback.

    @param what: what failed, such as C{"cannot start"}.

    @raise SystemExit: with C{migrate-host: WHAT: MESSAGE}; exit status 1.
    """
    from twisted.internet.error import CannotListenError

    from ._control._server import ControlSocketError
    from ._host._intercept import CannotHost
    from ._host._service import CannotListenTwice

    try:
        yield
    except (
        usage.UsageError,
        CannotListenError,
        CannotHost,
        CannotListenTwice,
        ControlSocketError,
    ) as e:
        raise SystemExit("migrate-host: {}: {}".format(what, e)) from None


def _seconds(option: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise usage.UsageError("{} takes seconds, not {!r}".format(option, value))
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise usage.UsageError("{} must be a positive number of seconds".format(option))
    return seconds


class Options(usage.Options):
    """
    Options for C{twistd migrate-host}.
    """

    synopsis = "[options] [PLUGIN [plugin options]]"
    longdesc = (
        "Host a Twisted protocol factory on one or more endpoints and move it "
        "to new code without dropping a connection: `python -m migrate "
        "upgrade` or SIGHUP starts a migration with the configured strategy. "
        "Given a twistd PLUGIN (for example `web --path .`), host that plugin "
        "unmodified instead: its listening ports are owned by the host."
    )

    optParameters = [
        [
            "strategy",
            "s",
            DEFAULT_STRATEGY,
            "Migration strategy: one of " + ", ".join(strategyNames()) + ".",
        ],
        [
            "control",
            "c",
            "migrate-host.sock",
            "Path of the control socket (mode 0600).",
        ],
        ["ready-timeout", None, "30", "Seconds a successor may take to become ready."],
        [
            "drain-timeout",
            None,
            None,
            "Seconds an old process keeps serving its remaining connections "
            "before closing them cleanly (default: no deadline).",
        ],
        ["handoff-timeout", None, "60", "Seconds each step of a hand-off may take."],
        [
            "freeze-timeout",
            None,
            "5",
            "Seconds the old process waits, with every connection standing "
            "still, for its successor to restore them and commit (capability "
            "transfer); past it the hand-off rolls back.",
        ],
        [
            "safe-point-timeout",
            None,
            "3",
            "Seconds a migration waits for connections that cannot move at "
            "once (a request in flight) to reach a point where they can; "
            "those that do not stay and drain (0: do not wait).",
        ],
        [
            "reexec-unmovable",
            None,
            "close",
            "Re-exec: what happens to connections whose protocol does not "
            "provide IMigratable: close (cleanly, before the exec) or adopt "
            "(a fresh protocol of the new code takes them over).",
        ],
        [
            "reexec-caretaker",
            None,
            "fork",
            "Re-exec: fork (a child of the old image goes on serving the "
            "connections while the new image starts, and hands them over when "
            "it is ready: clients wait only for that) or none (every client "
            "waits for the whole exec).",
        ],
        [
            "keeper",
            None,
            "auto",
            "auto, on or off: whether the process a supervisor started (a "
            "container's PID 1, tini, a terminal) stays as a small keeper when "
            "a transfer strategy hands the service on; auto: on in the "
            "foreground without systemd's NOTIFY_SOCKET.",
        ],
        [
            "max-draining",
            None,
            None,
            "The most older generations left draining at once: a hand-off to a "
            "successor that would leave more first has the oldest close their "
            "connections cleanly (default: no limit).",
        ],
        [
            "trial-failure",
            None,
            "refuse",
            "Re-exec and reload try the new code on every connection's state in "
            "a child process first: when it fails on one, refuse the whole "
            "migration (refuse) or close that connection cleanly and migrate "
            "the others (close).",
        ],
        [
            "child-start",
            None,
            "background",
            "background or foreground: successors and trial processes start "
            "at the lowest CPU priority (nice 19, SCHED_IDLE), so that their "
            "start takes no CPU from the clients, and are brought forward to this "
            "process's priority once started (a successor: when it is ready; "
            "it goes back while it stages the pre-copy, until the freeze) "
            "or after a tenth of --ready-timeout (background; only where "
            "this process may: "
            "CAP_SYS_NICE or RLIMIT_NICE), or at this process's priority "
            "(foreground).",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        # The opt_ methods' docstrings are the help text: one line each,
        # without their indentation.
        self.docs = {
            name: " ".join(doc.split()) if doc else doc
            for name, doc in self.docs.items()
        }
        self["listen"] = []
        self["reload-modules"] = []
        self["metrics"] = None
        self._appGiven = False

    @property
    def subCommands(self) -> Any:
        """
        Every installed twistd plugin but this one, to host unmodified.
        """
        for plugin in _hostablePlugins():
            yield (
                plugin.tapname,
                None,
                lambda plugin=plugin: plugin.options(),
                plugin.description,
            )

    def parseOptions(self, options: Any = None) -> None:
        """
        Parse the command line.  Under twistd or twist (which set
        C{parent}), an error ends the process with one line saying what is
        wrong, not twistd's usage text first; C{--help} shows the usage.

        @raise usage.UsageError: when parsed on its own (tests, embedding).
        """
        if getattr(self, "parent", None) is None:
            usage.Options.parseOptions(self, options)
            return
        with _oneLine("error"):
            usage.Options.parseOptions(self, options)

    def opt_app(self, spec: str) -> None:
        """
        The application: PKG.MOD:NAME, a protocol factory or a
        zero-argument callable returning one
        (default: migrate.examples.chat:makeFactory).
        """
        self["app"] = spec
        self._appGiven = True

    opt_a = opt_app

    def opt_listen(self, description: str) -> None:
        """
        A Twisted server endpoint to listen on, such as tcp:8000 or
        unix:/run/app.sock (repeatable; default
        tcp:8000:interface=127.0.0.1, this machine only).
        """
        from ._systemd import checkActivatedListener, inheritsListeners

        try:
            # A successor or re-executed image runs the command line the
            # previous generation checked, and inherits its listeners through
            # the hand-off: parsing them again would only cost it time (the
            # endpoint parsers import TLS support) while the service waits.
            # systemd: sockets are looked up only where systemd passed them.
            if not inheritsListeners() and not checkActivatedListener(description):
                from twisted.internet.endpoints import serverFromString

                serverFromString(_NoReactor(), description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(
                "--listen {!r} is not a server endpoint description: {}".format(
                    description, e
                )
            )
        if description in self["listen"]:
            raise usage.UsageError("--listen {!r} given twice".format(description))
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_metrics(self, description: str) -> None:
        """
        A Twisted server endpoint (tcp:9100) where the host serves
        OpenMetrics at /metrics for Prometheus; handed to every new
        generation, counters included (needs the metrics extra:
        prometheus-client).
        """
        import importlib.util

        from ._systemd import checkActivatedListener, inheritsListeners

        if importlib.util.find_spec("prometheus_client") is None:
            raise usage.UsageError(
                "--metrics needs prometheus-client: pip install 'txmigrate[metrics]'"
            )
        try:
            if not inheritsListeners() and not checkActivatedListener(description):
                from twisted.internet.endpoints import serverFromString

                serverFromString(_NoReactor(), description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(
                "--metrics {!r} is not a server endpoint description: {}".format(
                    description, e
                )
            )
        self["metrics"] = description

    def opt_reload_module(self, name: str) -> None:
        """
        With --strategy reload: a module to load anew, instead of the --app
        module's package (repeatable; a package includes its submodules;
        the --app module itself is always reloaded).
        """
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise usage.UsageError(
                "--reload-module takes a module name, not {!r}".format(name)
            )
        if name not in self["reload-modules"]:
            self["reload-modules"].append(name)

    def postOptions(self) -> None:
        self.setdefault("app", DEFAULT_APP)
        if self.subCommand is not None:
            if self._appGiven:
                raise usage.UsageError(
                    "--app and a plugin ({}) exclude each other: the plugin is "
                    "the application".format(self.subCommand)
                )
            self["factory"] = None
        elif not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["strategy"] not in strategyNames():
            raise usage.UsageError(
                "--strategy must be one of {}, not {!r}".format(
                    ", ".join(strategyNames()), self["strategy"]
                )
            )
        self["ready-timeout"] = _seconds("--ready-timeout", self["ready-timeout"])
        self["handoff-timeout"] = _seconds("--handoff-timeout", self["handoff-timeout"])
        self["freeze-timeout"] = _seconds("--freeze-timeout", self["freeze-timeout"])
        if self["safe-point-timeout"] in ("0", 0):
            self["safe-point-timeout"] = 0.0
        else:
            self["safe-point-timeout"] = _seconds(
                "--safe-point-timeout", self["safe-point-timeout"]
            )
        if self["drain-timeout"] is not None:
            self["drain-timeout"] = _seconds("--drain-timeout", self["drain-timeout"])
        if not self["control"]:
            raise usage.UsageError("--control needs a path")
        self["control"] = os.path.abspath(self["control"])
        if self["reexec-unmovable"] not in ("close", "adopt"):
            raise usage.UsageError(
                "--reexec-unmovable must be close or adopt, not {!r}".format(
                    self["reexec-unmovable"]
                )
            )
        if self["reexec-caretaker"] not in ("fork", "none"):
            raise usage.UsageError(
                "--reexec-caretaker must be fork or none, not {!r}".format(
                    self["reexec-caretaker"]
                )
            )
        if self["max-draining"] is not None:
            try:
                self["max-draining"] = int(self["max-draining"])
            except ValueError:
                self["max-draining"] = 0
            if self["max-draining"] < 1:
                raise usage.UsageError("--max-draining needs a positive whole number")
        if self["trial-failure"] not in ("refuse", "close"):
            raise usage.UsageError(
                "--trial-failure must be refuse or close, not {!r}".format(
                    self["trial-failure"]
                )
            )
        if self["child-start"] not in ("background", "foreground"):
            raise usage.UsageError(
                "--child-start must be background or foreground, not {!r}".format(
                    self["child-start"]
                )
            )
        if self.subCommand is None:
            self["factory"] = loadFactory(self["app"])
        if self["keeper"] not in KEEPER_MODES:
            raise usage.UsageError(
                "--keeper must be one of {}, not {!r}".format(
                    ", ".join(KEEPER_MODES), self["keeper"]
                )
            )
        self["foreground"] = isForeground(getattr(self, "parent", None))
        if self["keeper"] == "on" and not self["foreground"]:
            raise usage.UsageError(
                "--keeper on needs twistd -n: a daemon leaves the process that "
                "started it, so there is nothing to keep (the pidfile names "
                "the serving process)"
            )
        keepSuccessorInForeground(getattr(self, "parent", None))
        self["logfile"] = sharedLogFile(getattr(self, "parent", None))
        self._takePidfile()
        from .strategies._reexec._incoming import finishPreflight

        finishPreflight(
            twistdOptions=getattr(self, "parent", None), factory=self["factory"]
        )
        self._refuseLiveControl()

    def _refuseLiveControl(self) -> None:
        """
        Refuse to start, before anything is opened, while another live host
        serves the control path (a successor or a re-executed image serves
        the very socket it inherited, and is not asked).
        """
        from ._control._server import (
            ControlSocketError,
            ControlSocketInUse,
            controlSocketLive,
        )
        from ._handoff._successor import HANDOFF_FD_VARIABLE
        from .strategies._reexec._state import STATE_FD_VARIABLE

        if HANDOFF_FD_VARIABLE in os.environ or STATE_FD_VARIABLE in os.environ:
            return
        try:
            live = controlSocketLive(self["control"])
        except ControlSocketError:
            return  # Binding it will say why.
        if live:
            raise usage.UsageError(str(ControlSocketInUse(self["control"])))

    def _takePidfile(self) -> None:
        """
        Note twistd's pidfile, which migrate keeps naming the serving
        process.  A successor must not let twistd check it (it names the
        old process, still alive) nor write it before it serves.
        """
        parent = getattr(self, "parent", None)
        self["pidfile"] = None
        if parent is None or "pidfile" not in parent:
            return
        if parent["pidfile"]:
            self["pidfile"] = os.path.abspath(parent["pidfile"])
        if "MIGRATE_HANDOFF_FD" in os.environ:
            parent["pidfile"] = ""
        from .strategies._reexec._incoming import adjustTwistdOptions

        # A re-executed image: the pidfile names this very process.
        adjustTwistdOptions(parent)

    def forgetPidfile(self) -> None:
        """
        Tell twistd not to remove the pidfile at exit: a successor owns it.
        """
        parent = getattr(self, "parent", None)
        if parent is not None and "pidfile" in parent:
            parent["pidfile"] = ""


_pluginCache: list[Any] | None = None


def _hostablePlugins() -> list[Any]:
    """
    The installed twistd plugins other than migrate-host, looked up once.
    """
    global _pluginCache
    if _pluginCache is None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        _pluginCache = sorted(
            (
                plugin
                for plugin in getPlugins(IServiceMaker)
                if plugin.tapname != "migrate-host"
            ),
            key=lambda plugin: plugin.tapname,
        )
    return _pluginCache


def _pluginNamed(name: str) -> Any:
    for plugin in _hostablePlugins():
        if plugin.tapname == name:
            return plugin
    raise KeyError(name)


class _NoReactor:
    """
    Stands in for a reactor while endpoint descriptions are only parsed.
    """


def buildHost(
    reactor: Any,
    options: Options,
    *,
    hostType: type[MigrationHost] = MigrationHost,
    keeper: Any = None,
    yieldWhenHandedOn: bool = False,
) -> MigrationHost:
    """
    Build the host service from parsed options.

    @param reactor: the reactor the host uses.
    @param options: parsed L{Options}.
    @param hostType: L{MigrationHost} or a subclass.
    @param keeper: this process's part in keeping the process a supervisor
        started (see L{migrate._host._keeping.keeperFor}); none by default.
    @param yieldWhenHandedOn: see L{HostSettings.yieldWhenHandedOn}: for a
        process that ends once it has handed everything on.
    """
    from ._host._inheritance import UnknownInheritedStrategy, inheritedGeneration

    strategy = strategyNamed(options["strategy"])
    try:
        inheritance, inheritWith = inheritedGeneration(strategyNamed, strategy)
    except UnknownInheritedStrategy as e:
        raise usage.UsageError(str(e))
    applicationService = None
    interceptor = None
    if options.subCommand is not None:
        from ._host._intercept import ListeningInterceptor

        plugin = _pluginNamed(options.subCommand)
        interceptor = ListeningInterceptor(reactor, None, options["listen"])
        interceptor.install()
        applicationService = plugin.makeService(options.subOptions)
    settings = HostSettings(
        controlPath=options["control"],
        readyTimeout=options["ready-timeout"],
        handoffTimeout=options["handoff-timeout"],
        freezeTimeout=options["freeze-timeout"],
        drainTimeout=options["drain-timeout"],
        safePointTimeout=options["safe-point-timeout"],
        pidfile=options["pidfile"],
        applicationSpec=options["app"] if applicationService is None else None,
        strategyOptions={
            "reexec-unmovable": options["reexec-unmovable"],
            "reexec-caretaker": options["reexec-caretaker"],
            "trial-failure": options["trial-failure"],
        },
        reloadModules=options["reload-modules"],
        metricsEndpoint=options["metrics"],
        maxDraining=options["max-draining"],
        yieldWhenHandedOn=yieldWhenHandedOn,
        startInBackground=options["child-start"] == "background",
    )
    host = hostType(
        reactor,
        options["factory"],
        [] if applicationService is not None else options["listen"],
        strategy,
        settings,
        strategyNamed=strategyNamed,
        forgetPidfile=options.forgetPidfile,
        inheritance=inheritance,
        inheritWith=inheritWith,
        applicationService=applicationService,
        stopProcess=getattr(keeper, "stopProcess", None),
        keeper=keeper,
    )
    if interceptor is not None:
        interceptor.host = host
    from ._systemd import notifierFromEnvironment

    notifier = notifierFromEnvironment()
    if notifier is not None:
        host.addObserver(notifier)
    if options.get("logfile"):
        host.addObserver(AppendingLogFile(options["logfile"]))
    return host


class _TwistdHost(MigrationHost):
    """
    The host as twistd and twist run it: a failure to start whose message
    says it all (a port in use, a UDP port the application asks for, a
    control socket that cannot be bound) ends the process with that one
    line instead of a traceback.
    """

    @property
    def _log(self) -> Logger:  # type: ignore[override]
        """
        Log as the host does: only how starting fails differs.
        """
        return Logger(
            namespace="{}.{}".format(MigrationHost.__module__, MigrationHost.__name__),
            source=self,
        )

    def privilegedStartService(self) -> None:
        with _oneLine("cannot start"):
            super().privilegedStartService()

    def startService(self) -> None:
        with _oneLine("cannot start"):
            super().startService()


def makeService(options: Options) -> MigrationHost:
    """
    Build the host service for twistd.
    """
    from twisted.internet import reactor

    from ._host._keeping import KeeperHome, chooseKeeper, keeperFor
    from ._host._platform import PlatformUnsupported, checkPlatform

    try:
        checkPlatform(reactor)
    except PlatformUnsupported as e:
        raise SystemExit("migrate-host: {}".format(e))
    choice = chooseKeeper(
        options["keeper"], foreground=options["foreground"], environ=os.environ
    )
    keeper = keeperFor(reactor, choice, pidfile=options["pidfile"])
    if options.get("logfile"):
        # twistd opens it after this; generations share it.
        reactor.callWhenRunning(appendToLogFile, options["logfile"])
    return buildHost(
        reactor,
        options,
        hostType=_TwistdHost,
        keeper=keeper,
        # This process ends once it has handed everything on, unless it
        # stays as the keeper.
        yieldWhenHandedOn=not isinstance(keeper, KeeperHome),
    )
