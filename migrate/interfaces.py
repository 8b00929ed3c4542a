"""
The interfaces of migrate: what an application implements to carry its
state across a migration (L{IMigratable}), and what a migration technique
implements to plug into the host (L{IMigrationStrategy}).
"""

from __future__ import annotations

from typing import Any, Callable

from zope.interface import Attribute, Interface

__all__ = [
    "IMigratable",
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

    def migrate(host: Any, progress: Callable[[str], None]) -> Any:
        """
        Run the outgoing half of a migration.

        @param host: the L{migrate.MigrationHost} that serves now.
        @param progress: called with a one-line human-readable message at
            each step, relayed to whoever asked for the migration.

        @return: a L{Deferred} that fires with a L{migrate.MigrationReport}
            once the new code serves (or the migration rolled back).  It
            does not wait for old connections to drain.
        """

    def inherit(host: Any, inheritance: Any) -> Any:
        """
        Run the incoming half: take over what the previous generation
        hands on, before this host serves anything.

        @param host: the L{migrate.MigrationHost} that is starting.
        @param inheritance: strategy-specific: the hand-off channel to the
            old process, or the state the old image left behind.

        @return: a L{Deferred} that fires once the host serves.
        """
