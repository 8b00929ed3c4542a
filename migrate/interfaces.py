"""
The interfaces of migrate: what an application implements to carry its
state across a migration (L{IMigratable}), what a migration technique
implements to plug into the host (L{IMigrationStrategy}), and what such a
strategy may ask of the host it migrates (L{IMigrationHost}).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from zope.interface import Attribute, Interface

__all__ = [
    "IMigratable",
    "IMigrationHost",
    "IMigrationStrategy",
]


class IMigratable(Interface):
    """
    A protocol whose live connections can move to new code.

    A protocol that provides this interface opts in to having its state,
    and the bytes Twisted still buffers for it, travel with its connection
    when the host migrates to a new process (capability transfer), a new
    image of the same process (re-exec) or new code in the same process
    (module reload).  On the receiving side the protocol is rebuilt by the
    new code's factory and then I{restored} instead of being told
    C{connectionMade}: from its point of view the connection never ended.

    The state is plain data (C{dict} with C{str} keys, C{list}, C{str},
    C{int}, C{float}, C{bool}, C{None}): it crosses a process boundary and
    is therefore never pickled.  The input buffers of Twisted's own base
    protocols (C{LineReceiver}, C{LineOnlyReceiver}, the C{IntNStringReceiver}
    family, C{NetstringReceiver}) and the transport's unwritten output are
    carried by migrate itself; an application saves only its own attributes.

    Optionally, a protocol may also define C{migrationBlocker()}, returning
    L{None} when its connection can move now, or a few words saying why
    not (a reply still owed): the migration then waits for it, within
    C{--safe-point-timeout}, and leaves it with the old code if it is not
    ready by then.  twisted.web's HTTP/1.1 channel and C{twisted.web.websocket}
    connections need no opt-in for HTTP: migrate provides their state
    itself (a WebSocket's own protocol opts in for its state).

    Optionally, a protocol may also define C{abandonMigrationState()}:
    module reload then restores its connections into the new code's
    protocol objects I{ahead of} its pause, while the old code still
    serves, and its pause only checks that each connection's state did not
    change since; capability transfer's successor likewise restores them
    during the pre-copy, and its freeze restores again only those whose
    state changed since (the new code's class decides there).  Where one
    did change (or the connection closed, or stays with the old process),
    the object restored ahead will never serve: it is told
    C{abandonMigrationState()} instead of C{connectionLost}, what it wrote
    to its transport is dropped, and a fresh object is restored in its
    place.  C{abandonMigrationState} undoes, silently, what
    C{restoreMigrationState} did outside the object (a chat user leaves
    the room it joined, telling no one) and cancels the timers it started;
    what C{restoreMigrationState} wrote to I{other} connections cannot be
    taken back, so a protocol that defines it must not do that.  If it
    raises, the reload rolls back, and the hand-off fails (the old process
    keeps every connection).  Without it, every restore happens in the
    pause or the freeze, as before.  L{migrate.testing.abandonedRestore}
    tests it: it restores and abandons one protocol as module reload and
    capability transfer do, and says what the abandoned object left behind.

    Optionally, a protocol may also define C{connectionMigrated()}: it is
    called on the I{old} code's protocol object, instead of
    C{connectionLost}, once its connection is served by the new code
    (capability transfer: in the old process, right after it let go of the
    connection at the commit, or when a busy one moved later; module
    reload: when the connection switches to the new object).  The object
    never serves again and its transport is detached (what is written to
    it goes nowhere), but what it scheduled would go on running where it
    is (with module reload, in the same process, for ever): it stops its
    timers (a C{LoopingCall} heartbeat, a C{callLater} retry), producers
    and subscriptions.  It must not announce a departure (its user did not
    leave), and with module reload the new object already holds the
    connection's place in the very same structures: remove this object by
    identity, never by a key the two share.  A C{TimeoutMixin} timeout is
    cancelled by migrate itself, before the call.  What it raises is
    logged; the migration is done all the same.  Re-exec does not call it:
    the old image, and everything it scheduled, end with the C{exec}.
    Being old code's, it only helps from the upgrade after the one that
    brings it in.
    """

    migrationVersion = Attribute("""
        An L{int}: the version of the state this code's
        L{getMigrationState} returns and L{restoreMigrationState} accepts.
        Bump it whenever the shape of the state changes, and teach
        L{upgradeMigrationState} how to read the older shape.
        """)

    def getMigrationState() -> Any:
        """
        Describe this connection's application state as plain data.

        Called on the old side while the connection is frozen (no bytes are
        read or written until the migration commits or rolls back).

        @return: JSON-compatible plain data.
        """

    def restoreMigrationState(state: Any) -> None:
        """
        Rebuild this protocol from C{state}, in place of C{connectionMade}.

        Called on the new side once C{self.transport} and C{self.factory}
        are set, with state already upgraded to this code's
        L{migrationVersion}.

        @param state: what L{getMigrationState} returned on the old side,
            possibly upgraded by L{upgradeMigrationState}.

        @raise Exception: to refuse the connection; it then stays with the
            old code (which resumes serving it) and the refusal is reported.
        """

    def upgradeMigrationState(fromVersion: int, state: Any) -> Any:
        """
        Convert state written by older code into this code's shape.

        Called on the new side, before L{restoreMigrationState}, whenever
        the old side's L{migrationVersion} differs from this code's (the
        counterpart of Erlang's C{code_change}).  It may be called on an
        instance whose attributes are not set up yet: use only C{state}.

        @param fromVersion: the old code's L{migrationVersion}.
        @param state: the old code's state.

        @return: the state in this code's shape.

        @raise Exception: to refuse the connection, as for
            L{restoreMigrationState}.
        """


class IMigrationHost(Interface):
    """
    What a strategy may ask of the host it migrates: the seam between
    L{migrate.MigrationHost} and every L{IMigrationStrategy}.

    The host owns its lifecycle: a strategy reports the phase it enters
    (L{enterPhase}) and the end of the hand-off (L{handOn},
    L{commitInheritance}, L{abandonInheritance}); it never sets the host's
    attributes.
    """

    reactor = Attribute("The reactor: listening, processes, time, sockets.")
    settings = Attribute(
        "The host's L{migrate.HostSettings}: timeouts, the successor's "
        "command line, the application's spec, strategy options."
    )
    pid = Attribute("This process's PID (an L{int}).")
    generation = Attribute(
        "An L{int}: 1 for a freshly started service, one more for each "
        "migration to a new process or image."
    )
    phase = Attribute(
        "The L{migrate.MigrationPhase} of the migration in progress "
        "(C{idle} when none); read-only: see L{enterPhase}."
    )
    serving = Attribute(
        "Whether this process serves (takes new connections and migrations)."
    )
    listeners = Attribute(
        "The listeners by endpoint description (C{tcp:8000}): a mapping to "
        "objects with C{key}, C{factory} (tracking the connections) and "
        "C{port} (the listening port, or L{None} before it listens)."
    )
    controlPort = Attribute("The control channel's listening port, or L{None}.")
    draining = Attribute(
        "Older generations still draining, by generation number: "
        "JSON-compatible dictionaries."
    )
    reportChannels = Attribute(
        "The channels older generations report their draining over, by the "
        "PID at their other end: C{dict} of protocols on Unix sockets (a "
        "re-exec carries them across exec)."
    )
    lastReport = Attribute("The last migration's report, or L{None}.")
    metrics = Attribute(
        "What the metrics endpoint shows and carries across generations "
        "(C{migrate._host._metrics.HostMetrics}), or L{None} without one."
    )
    metricsPort = Attribute("The metrics endpoint's listening port, or L{None}.")
    acceptsAnyListener = Attribute(
        "Whether the host takes over any listener a previous generation "
        "hands on (a hosted twistd plugin opens its ports itself)."
    )
    applicationFactory = Attribute("The application's protocol factory, if any.")

    def enterPhase(phase: Any) -> None:
        """
        The running migration enters C{phase} (a L{migrate.MigrationPhase}).
        """

    def abortWith(abort: Callable[[str], None] | None) -> None:
        """
        Call C{abort} with a reason if the host has to stop while the
        running migration can still be rolled back; L{None} once it cannot.
        """

    def allConnections() -> Iterable[tuple[Any, Any]]:
        """
        Every live connection, as (listener, hosted protocol) pairs.
        """

    def listenerNamed(key: str) -> Any:
        """
        The listener configured as C{key}.

        @raise KeyError: if this code has no such listener.
        """

    def pauseAccepting() -> None:
        """
        Leave new connections in the kernel's backlog for now.
        """

    def resumeAccepting() -> None:
        """
        Accept new connections again.
        """

    def statusSnapshot() -> dict[str, Any]:
        """
        Describe this host as JSON-compatible data (C{python -m migrate
        status}).
        """

    def handOn(
        reportDrain: Callable[[list[dict[str, Any]]], None], newPid: int | None
    ) -> None:
        """
        The hand-off committed: stop serving, let go of the listeners and
        the control socket, and drain what stays here.

        @param reportDrain: called with the draining generations whenever
            they change, to keep the new serving process's status current.
        @param newPid: the process that serves now.
        """

    def updateDraining(entries: list[dict[str, Any]], viaPid: int) -> None:
        """
        An older generation (or one it relays for) reports its draining.
        """

    def closeGeneration(generation: int) -> bool:
        """
        Have draining generation C{generation} close its connections
        cleanly now (this process, or an older one through the channel its
        reports come over).

        @return: whether it could be told.
        """

    def forgetDraining(viaPid: int) -> None:
        """
        The older generation reached through C{viaPid} has ended.
        """

    def prepareApplication() -> None:
        """
        Start a hosted application in a process that inherits, once the
        inherited listeners are here.
        """

    def claimListener(key: str, factory: Any, create: Callable[[Any], Any]) -> Any:
        """
        The hosted application listens on C{key}: serve it with an
        inherited listener if there is one, or open it with C{create}.
        """

    def adoptControlPort(port: Any) -> None:
        """
        Use C{port}, handed on by the previous generation, as the control
        channel once this process serves.
        """

    def adoptMetricsPort(port: Any, carried: Any) -> None:
        """
        Use C{port}, handed on by the previous generation, as the metrics
        endpoint once this process serves, counting on from C{carried}
        (what that generation's C{metrics.carried()} returned).
        """

    def commitInheritance(generation: int) -> None:
        """
        Serve: the previous generation has handed everything on.
        """

    def abandonInheritance(reason: str) -> None:
        """
        Give up inheriting: let go of everything adopted without disturbing
        it, and end this process.
        """

    def requestUpgrade(
        strategyName: str | None,
        progress: Callable[[str], None],
        overrides: Mapping[str, float] | None = None,
    ) -> Any:
        """
        Migrate now with the named strategy (or the configured one): what
        the control channel's C{upgrade} command asks for.

        @param overrides: settings for this migration only, by the name of
            their L{HostSettings <migrate.HostSettings>} field
            (C{readyTimeout}, C{drainTimeout}).

        @return: a L{Deferred} firing with the report as JSON-compatible
            data.
        """

    def addObserver(observer: Any) -> None:
        """
        Tell C{observer} about this host's lifecycle from now on.
        """


class IMigrationStrategy(Interface):
    """
    One technique for moving a live service to new code.

    A strategy has an I{outgoing} half, run by the serving host when a
    migration is triggered (L{migrate}), and an I{incoming} half, run by the
    host that receives the service (L{inherit}): a successor process for
    capability and gradual transfer, the new image for re-exec.  Strategies
    compose the shared parts (successor process, hand-off channel, listener
    inheritance, connection freeze and adoption, state layer) rather than
    re-implementing them.
    """

    name = Attribute("The L{str} operators use for this strategy (C{--strategy NAME}).")

    def migrate(host: IMigrationHost, progress: Callable[[str], None]) -> Any:
        """
        Run the outgoing half of a migration.

        @param host: the host that serves now.
        @param progress: called with a one-line human-readable message at
            each step, relayed to whoever asked for the migration.

        @return: a L{Deferred} that fires with a L{migrate.MigrationReport}
            once the new code serves (or the migration rolled back).  It
            does not wait for old connections to drain.
        """

    def inherit(host: IMigrationHost, inheritance: Any) -> Any:
        """
        Run the incoming half: take over what the previous generation
        hands on, before this host serves anything.

        @param host: the host that is starting.
        @param inheritance: strategy-specific: the hand-off channel to the
            old process, or the state the old image left behind.

        @return: a L{Deferred} that fires once the host serves.
        """
