"""
Knowing every live connection: the factory wrapper the host puts around an
application's factory, and the thin protocol wrapper that lets the host
find, freeze, move, restore or replace the application's protocol.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .._handoff._transport import writeNow

__all__ = ["HostedProtocol", "TrackingFactory"]


class HostedProtocol(ProtocolWrapper):
    """
    Sits between a transport and the application's protocol.

    The application's protocol sees this object as its transport, so that
    the protocol object itself can be replaced (module reload) or rebuilt
    from state (capability transfer) without the real transport knowing.

    A hosted protocol is I{pending} when built for an adopted connection:
    C{makeConnection} then records the transport and tells the application
    nothing, because the application's protocol will be restored from
    state rather than told C{connectionMade}.

    It may also start on a I{stand-in} transport (L{awaitTransport}) while
    its socket waits to be adopted: what the application writes is held
    meanwhile, and the real transport's C{makeConnection} swaps it in.

    @ivar writesAtOnce: whether what the application writes goes out at
        once (L{writeAtOnceUntilRead}).
    """

    factory: "TrackingFactory"
    _log = Logger()

    def __init__(
        self,
        factory: "TrackingFactory",
        wrappedProtocol: IProtocol | None,
        pending: bool = False,
    ) -> None:
        ProtocolWrapper.__init__(self, factory, wrappedProtocol)  # type: ignore[arg-type]
        self.pending = pending
        self.released = False
        self.held = False
        self._held: list[bytes] = []
        self._heldClose: str | None = None
        self._finish: Callable[[], None] | None = None
        self.awaitingTransport = False
        self.writesAtOnce = False
        #: whether C{pending}, C{released}, C{writesAtOnce} or C{_finish}
        #: is set, so that L{dataReceived} tests one attribute for all
        self._unusual = pending

    def awaitTransport(self, standIn: ITransport, provides: Any) -> None:
        """
        Connect this pending protocol to C{standIn}, a transport that stands
        in for the real one until its socket is adopted, and L{hold} what
        the application writes.  The real transport's C{makeConnection}
        then replaces the stand-in without telling the application
        anything; the caller L{unhold}s.  Anything that needs every
        connection's real transport (L{TrackingFactory.connections}) asks
        the stand-in to adopt its socket at once: C{standIn.adoptNow()}.

        @param provides: C{Provides(HostedProtocol, providedBy(standIn))},
            computed once for many connections (as C{directlyProvides}
            would for each).
        """
        self.__provides__ = provides
        self.connected = 1
        self.transport = standIn
        self.awaitingTransport = True
        self.hold()
        self.factory.registerProtocol(self)
        self.factory.awaiting.add(self)

    def stopAwaiting(self) -> None:
        """
        The stand-in transport gave up: this connection waits no more for
        its real transport (its socket turned out dead).
        """
        self.awaitingTransport = False
        self.factory.awaiting.discard(self)

    def makeConnection(self, transport: ITransport) -> None:
        if self.awaitingTransport:
            from zope.interface import directlyProvides, providedBy

            self.stopAwaiting()
            directlyProvides(self, providedBy(transport))
            self.transport = transport
            return
        if not self.pending:
            ProtocolWrapper.makeConnection(self, transport)
            return
        from zope.interface import directlyProvides, providedBy

        directlyProvides(self, providedBy(transport))
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)

    def hold(self) -> None:
        """
        Keep what the application writes (and any close it asks for) until
        L{unhold}: an adopted connection must not speak before the hand-off
        commits.
        """
        self._held = []
        self._heldClose = None
        self.held = True

    def _realTransport(self) -> Any:
        transport = self.transport
        assert transport is not None, "not connected"
        return transport

    def unhold(self, pendingOutput: bytes = b"") -> None:
        """
        Send C{pendingOutput} (what the previous holder had not written),
        then what the application wrote while held, then carry out a close
        it asked for.
        """
        self.held = False
        held, self._held = self._held, []
        data = pendingOutput + b"".join(held)
        if data:
            if self.writesAtOnce:
                writeNow(self._realTransport(), data)
            else:
                self._realTransport().write(data)
        if self._heldClose == "abort":
            self._realTransport().abortConnection()
        elif self._heldClose == "lose":
            self._realTransport().loseConnection()

    def holdsOutput(self) -> bool:
        """
        Whether it is held with output to send once unheld: the
        application wrote, or asked for a close.
        """
        return self.held and (bool(self._held) or self._heldClose is not None)

    def write(self, data: bytes) -> None:
        # Every answer the application sends passes here: two attribute
        # tests, then straight to the real transport.
        if self.held:
            self._held.append(data)
        elif self.writesAtOnce:
            writeNow(self.transport, data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def writeSequence(self, data: Any) -> None:
        if self.held:
            self._held.extend(data)
        elif self.writesAtOnce:
            writeNow(self.transport, b"".join(data))
        else:
            self.transport.writeSequence(data)  # type: ignore[union-attr]

    def writeAtOnceUntilRead(self) -> None:
        """
        Until the application has taken the next bytes received, send what
        it writes at once, with one C{send()} where the socket takes it
        (L{writeNow}), not on the reactor's next turn.

        For a connection that has just moved in: its client's requests
        queued while it was frozen, and the process taking over reads
        hundreds of such connections in its first turn.  Through the
        reactor, each answer would wait for that whole turn and then for
        the writes of all the others in the next; at once, each leaves as
        it is made.  After that first read, the connection is written to
        as any other.
        """
        self.writesAtOnce = True
        self._noteUnusual()

    def loseConnection(self) -> None:
        if self.held:
            self._heldClose = self._heldClose or "lose"
            return
        ProtocolWrapper.loseConnection(self)

    def abortConnection(self) -> None:
        if self.held:
            self._heldClose = "abort"
            return
        self._realTransport().abortConnection()

    def logPrefix(self) -> str:
        if self.wrappedProtocol is None:
            # Pending: asked once per adopted connection, thousands at once.
            return "HostedProtocol"
        return ProtocolWrapper.logPrefix(self)  # type: ignore[no-any-return]

    def attach(self, protocol: IProtocol) -> None:
        """
        Make C{protocol} the application protocol of this pending connection,
        without telling it C{connectionMade}: the caller restores it.
        """
        self.wrappedProtocol = protocol
        protocol.connected = 1  # type: ignore[attr-defined]
        protocol.transport = self  # type: ignore[attr-defined]
        self.pending = False
        self._noteUnusual()

    def replaceProtocol(self, protocol: IProtocol) -> IProtocol:
        """
        Put C{protocol} in place of the current application protocol (which
        is returned) without telling either of them anything.
        """
        old = self.wrappedProtocol
        self.attach(protocol)
        return old

    def finishBeforeNextEvent(self, finish: Callable[[], None]) -> None:
        """
        Call C{finish} once, before the next event (bytes received, or the
        connection lost) reaches the application's protocol, or earlier
        through L{finishNow}: work on this connection that was left for
        later (module reload switches the protocol object so) is done
        before anything more happens to it.

        @param finish: takes no arguments; what it raises is logged, and
            the event is delivered all the same.
        """
        self._finish = finish
        self._noteUnusual()

    def finishNow(self) -> bool:
        """
        Call what L{finishBeforeNextEvent} left for later, now, if it was
        not called yet.

        @return: whether it was called now.
        """
        finish, self._finish = self._finish, None
        self._noteUnusual()
        if finish is None:
            return False
        try:
            finish()
        except Exception:
            self._log.failure("Finishing the work left for later failed")
        return True

    def _noteUnusual(self) -> None:
        self._unusual = (
            self.pending
            or self.released
            or self.writesAtOnce
            or self._finish is not None
        )

    def dataReceived(self, data: bytes) -> None:
        # Every request passes here: the usual case (serving, nothing left
        # for later) costs one attribute test.
        if self._unusual:
            if self.pending or self.released:
                return
            if self._finish is not None:
                self.finishNow()
            if self.writesAtOnce:
                try:
                    self.wrappedProtocol.dataReceived(data)
                finally:
                    self.writesAtOnce = False
                    self._noteUnusual()
                return
        self.wrappedProtocol.dataReceived(data)

    def release(self) -> None:
        """
        Forget this connection without telling the application: another
        process (or another protocol object) now serves it.
        """
        self.released = True
        self._unusual = True
        self.factory.unregisterProtocol(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.released:
            return
        if self._finish is not None:
            self.finishNow()
        if self.pending or self.wrappedProtocol is None:
            self.factory.unregisterProtocol(self)
            return
        ProtocolWrapper.connectionLost(self, reason)


class TrackingFactory(WrappingFactory):
    """
    Wraps an application's factory so that the host knows each live
    connection of one listener.

    @ivar key: the listener's endpoint description.
    @ivar protocols: the live connections (L{HostedProtocol}) of the listener.
    @ivar onChange: called with no arguments whenever a connection comes or
        goes (the host counts connections to know when draining is done).
    """

    protocol = HostedProtocol
    _log = Logger()

    def __init__(
        self,
        key: str,
        wrappedFactory: IProtocolFactory,
        onChange: Callable[[], None] = lambda: None,
    ) -> None:
        WrappingFactory.__init__(self, wrappedFactory)  # type: ignore[arg-type]
        self.key = key
        self.onChange = onChange
        #: the connections on a stand-in transport (see
        #: L{HostedProtocol.awaitTransport})
        self.awaiting: set[HostedProtocol] = set()

    @property
    def connections(self) -> list[HostedProtocol]:
        """
        The live connections, oldest first, each with its real transport
        (a connection still on a stand-in transport has its socket adopted
        now: see L{HostedProtocol.awaitTransport}).
        """
        for protocol in list(self.awaiting):
            standIn: Any = protocol.transport
            standIn.adoptNow()
        return list(self.protocols)

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.onChange()

    def unregisterProtocol(self, p: Any) -> None:
        if p in self.protocols:
            super().unregisterProtocol(p)
            self.onChange()

    @property
    def unclaimed(self) -> bool:
        """
        Whether this listener was inherited but no application factory has
        claimed it yet (a hosted plugin's port, before the plugin listens).
        """
        return isinstance(self.wrappedFactory, _Unclaimed)

    def claim(self, factory: IProtocolFactory) -> None:
        """
        Serve this inherited listener with C{factory}.
        """
        self.wrappedFactory = factory
        factory.doStart()

    def buildPendingProtocol(self, addr: IAddress) -> HostedProtocol:
        """
        Build the wrapper for an adopted connection whose application
        protocol will be restored from state rather than started.
        """
        return HostedProtocol(self, None, pending=True)

    def buildProtocol(self, addr: IAddress) -> HostedProtocol | None:  # type: ignore[override]
        """
        Wrap the application's protocol, or refuse the connection as the
        application's factory did (by returning L{None}).
        """
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return self.protocol(self, protocol)

    def buildApplicationProtocol(self, addr: IAddress) -> IProtocol | None:
        """
        Ask the application's factory for a protocol, as for a new
        connection.
        """
        protocol: IProtocol | None = self.wrappedFactory.buildProtocol(addr)
        return protocol


@implementer(IProtocolFactory)
class _Unclaimed:
    """
    Stands in for the application's factory on an inherited listener until
    the hosted application opens that port again; refuses connections (none
    are accepted before the application claims the port: the listener is
    paused until the hand-off commits).
    """

    def buildProtocol(self, addr: IAddress) -> None:
        return None

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def unclaimedFactory() -> IProtocolFactory:
    """
    A placeholder factory for an inherited listener nobody claimed yet.
    """
    return _Unclaimed()


@implementer(IProtocolFactory)
class PendingAdoptionFactory:
    """
    The factory handed to C{adoptStreamConnection} for a connection whose
    protocol is restored from state: it builds a pending L{HostedProtocol}
    of the right listener.
    """

    def __init__(self, tracking: TrackingFactory) -> None:
        self.tracking = tracking
        self.built: HostedProtocol | None = None

    def buildProtocol(self, addr: IAddress) -> HostedProtocol:
        self.built = self.tracking.buildPendingProtocol(addr)
        return self.built

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass
