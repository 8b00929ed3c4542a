"""
A host's settings: the plain values (timeouts, paths, the successor's
command line, strategy options) that C{twistd migrate-host}'s options or an
embedding application give a L{migrate.MigrationHost}, in one frozen object
that strategies read through L{migrate.interfaces.IMigrationHost.settings}.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from attrs import field, frozen

__all__ = ["HANDED_ON_NICENESS", "HostSettings"]

#: the nice value a process that handed everything on takes (the lowest
#: priority) when L{HostSettings.yieldWhenHandedOn} says so
HANDED_ON_NICENESS = 19


def _optionalList(value: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _options(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


@frozen
class HostSettings:
    """
    How a host runs and migrates; every field but C{yieldWhenHandedOn} has
    the default C{twistd migrate-host} uses.

    @ivar controlPath: where the control channel listens, or L{None} for no
        control channel.
    @ivar readyTimeout: seconds a successor (or re-exec's preflight) may
        take to say it is ready.
    @ivar handoffTimeout: seconds each hand-off step may take.
    @ivar freezeTimeout: seconds the old process of a capability transfer
        waits, every connection standing still, for its successor to
        restore the connections and commit; past it the hand-off rolls
        back.
    @ivar drainTimeout: seconds an old generation keeps serving its
        remaining connections before closing them; L{None}: no deadline.
    @ivar successorArgv: the command line that starts a successor (default:
        this process's own, re-read from disk).
    @ivar pidfile: a pidfile to keep naming the serving process.
    @ivar installSignalHandlers: whether C{SIGHUP} triggers a migration.
    @ivar applicationSpec: where the application's factory came from
        (C{PKG.MOD:NAME}), for strategies that load new code in place.
    @ivar strategyOptions: settings of particular strategies, by option name
        (C{"reexec-unmovable"}).
    @ivar reloadModules: the modules module reload loads anew (a package
        includes its submodules) instead of C{applicationSpec}'s package.
    @ivar safePointTimeout: seconds a migration that moves connections
        waits for those that cannot move at once (a request in flight, a
        message half received) to reach a point where they can; those that
        do not stay and drain (0: do not wait).
    @ivar metricsEndpoint: a server endpoint description where the host
        serves OpenMetrics at C{/metrics} (C{--metrics}), handed on with the
        listeners; L{None}: no metrics.
    @ivar maxDraining: the most older generations left draining at once;
        a hand-off to a successor that would leave more first has the
        oldest close their connections cleanly.  L{None}: no limit.
    @ivar yieldWhenHandedOn: whether this process, once a capability
        transfer committed with nothing left to drain here, lowers its own
        CPU priority (to L{HANDED_ON_NICENESS}, under C{SCHED_IDLE}; see
        L{migrate._host._priority.lowerOwnPriority}) before it lets go of the
        moved connections and exits, so that this work takes no CPU from
        the successor serving them.  For a process that ends once handed
        on: the priority is never raised again.  C{twistd migrate-host}
        sets it, unless this process is the one that stays as the keeper;
        off by default (an embedding application's process may go on
        doing other work).
    @ivar startInBackground: whether successors (and the trial processes
        of re-exec and module reload) start at the lowest CPU priority, so
        that their start takes no CPU from the clients of this process, and
        are brought forward to this process's priority once started (a
        successor: when it says it is ready) or after a tenth of
        C{readyTimeout} (a trial: of its own timeout).  Only where this
        process may bring them forward: see L{migrate._host._priority}.
    """

    controlPath: str | None = "migrate-host.sock"
    readyTimeout: float = 30.0
    handoffTimeout: float = 60.0
    freezeTimeout: float = 5.0
    drainTimeout: float | None = None
    successorArgv: tuple[str, ...] | None = field(default=None, converter=_optionalList)
    pidfile: str | None = None
    installSignalHandlers: bool = True
    applicationSpec: str | None = None
    strategyOptions: Mapping[str, Any] = field(factory=dict, converter=_options)
    reloadModules: tuple[str, ...] = field(default=(), converter=tuple)
    safePointTimeout: float = 3.0
    metricsEndpoint: str | None = None
    maxDraining: int | None = None
    yieldWhenHandedOn: bool = False
    startInBackground: bool = True
