"""
The C{migrate-host} twistd plugin: options and service construction.

C{makeService} imports the reactor and hands it to L{buildHost}, a pure
builder that tests call with a fake reactor.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.python import usage

from ._host import MigrationHost
from .strategies import strategyNamed, strategyNames

__all__ = ["Options", "makeService", "buildHost", "loadFactory", "DEFAULT_APP"]

DEFAULT_APP = "migrate.examples.chat:makeFactory"
DEFAULT_LISTEN = "tcp:8000"
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
        raise usage.UsageError(
            "--app takes PKG.MOD:NAME, not {!r}".format(spec)
        )
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except Exception as e:
        raise usage.UsageError(
            "--app {}: cannot load it: {}: {}".format(spec, type(e).__name__, e)
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

    synopsis = "[options]"
    longdesc = (
        "Host a Twisted protocol factory on one or more endpoints and move it "
        "to new code without dropping a connection: `python -m migrate "
        "upgrade` or SIGHUP starts a migration with the configured strategy."
    )

    optParameters = [
        ["app", "a", DEFAULT_APP,
         "The application: PKG.MOD:NAME, a protocol factory or a "
         "zero-argument callable returning one."],
        ["strategy", "s", DEFAULT_STRATEGY,
         "Migration strategy: one of " + ", ".join(strategyNames()) + "."],
        ["control", "c", "migrate-host.sock",
         "Path of the control socket (mode 0600)."],
        ["ready-timeout", None, "30",
         "Seconds a successor may take to become ready."],
        ["drain-timeout", None, None,
         "Seconds an old process keeps serving its remaining connections "
         "before closing them cleanly (default: no deadline)."],
        ["handoff-timeout", None, "60",
         "Seconds each step of a hand-off may take."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        A Twisted server endpoint to listen on, such as tcp:8000 or
        unix:/run/app.sock (repeatable; default tcp:8000).
        """
        try:
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

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["strategy"] not in strategyNames():
            raise usage.UsageError(
                "--strategy must be one of {}, not {!r}".format(
                    ", ".join(strategyNames()), self["strategy"]
                )
            )
        self["ready-timeout"] = _seconds("--ready-timeout", self["ready-timeout"])
        self["handoff-timeout"] = _seconds("--handoff-timeout", self["handoff-timeout"])
        if self["drain-timeout"] is not None:
            self["drain-timeout"] = _seconds("--drain-timeout", self["drain-timeout"])
        if not self["control"]:
            raise usage.UsageError("--control needs a path")
        self["control"] = os.path.abspath(self["control"])
        self["factory"] = loadFactory(self["app"])
        self._takePidfile()

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

    def forgetPidfile(self) -> None:
        """
        Tell twistd not to remove the pidfile at exit: a successor owns it.
        """
        parent = getattr(self, "parent", None)
        if parent is not None and "pidfile" in parent:
            parent["pidfile"] = ""


class _NoReactor:
    """
    Stands in for a reactor while endpoint descriptions are only parsed.
    """


def buildHost(reactor: Any, options: Options) -> MigrationHost:
    """
    Build the host service from parsed options.

    @param reactor: the reactor the host uses.
    @param options: parsed L{Options}.
    """
    from ._successor import inheritedHandoff

    inheritance = inheritedHandoff()
    strategy = strategyNamed(options["strategy"])
    inheritWith = None
    if inheritance is not None:
        inheritedName = os.environ.pop("MIGRATE_HANDOFF_STRATEGY", strategy.name)
        try:
            inheritWith = strategyNamed(inheritedName)
        except KeyError:
            raise usage.UsageError(
                "the previous generation asked for unknown strategy {!r}".format(
                    inheritedName
                )
            )
    return MigrationHost(
        reactor,
        options["factory"],
        options["listen"],
        strategy,
        controlPath=options["control"],
        strategyNamed=strategyNamed,
        readyTimeout=options["ready-timeout"],
        handoffTimeout=options["handoff-timeout"],
        drainTimeout=options["drain-timeout"],
        pidfile=options["pidfile"],
        forgetPidfile=options.forgetPidfile,
        inheritance=inheritance,
        inheritWith=inheritWith,
        applicationSpec=options["app"],
    )


def makeService(options: Options) -> MigrationHost:
    """
    Build the host service for twistd.
    """
    from twisted.internet import reactor

    return buildHost(reactor, options)
