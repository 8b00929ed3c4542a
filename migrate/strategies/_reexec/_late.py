# -*- test-case-name: migrate.test.test_reexec_late -*-
"""
Adopting the sockets of restored connections after the new image serves.

Before a re-executed image serves anything, every connection's protocol is
restored (its C{restoreMigrationState} runs: an application that keeps
state across connections, such as a chat room's list of users, sees every
user before any message is handled).  Adopting each socket into the
reactor (a socket object, C{getpeername}, the reactor's registration)
costs several times more, and is not needed for that: each restored
protocol starts on a L{StandIn} transport, which holds what the
application writes and answers C{getPeer} and C{getHost} from the
addresses the old image wrote down.  L{LateAdoption} then adopts the
sockets in slices between reactor turns, the connections that were active
last first (the old image described them at the freeze, ahead of the
others); meanwhile a client's bytes wait in the kernel.  Anything else the
application asks of a stand-in (pausing the connection, registering a
producer, a socket option) adopts that socket at once.

A socket whose peer went away meanwhile cannot be adopted: it is dropped,
counted, and its protocol is told C{connectionLost}, as if the connection
had ended in the old image.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from functools import lru_cache
from typing import Any, Callable

from attrs import define, field
from twisted.internet import address
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IProtocolFactory,
    IPushProducer,
    ISystemHandle,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementedBy, implementer
from zope.interface.declarations import Provides

from ..._handoff._transport import (
    abandonConnection,
    adoptConnection,
    resumeConnection,
)
from ..._host._tracking import HostedProtocol
from ...state import StateError, replayBufferedInput

__all__ = ["LateAdoption", "StandIn", "addressesFrom", "addressesOf"]

_log = Logger()

_INET = {
    int(socket.AF_INET): address.IPv4Address,
    int(socket.AF_INET6): address.IPv6Address,
}


def addressesOf(entry: dict[str, Any]) -> tuple[Any, Any] | None:
    """
    The peer's and the local address of a TCP connection from its manifest
    entry (as Twisted's TCP transport builds them from C{getpeername} and
    C{getsockname}), or L{None} if the entry carries none (its socket is
    then adopted at once).

    @raise StateError: if they are malformed.
    """
    peer: Any = entry.get("peer")
    local: Any = entry.get("local")
    if peer is None and local is None:
        return None
    return addressesFrom(entry.get("family"), peer, local)


def addressesFrom(family: Any, peer: Any, local: Any) -> tuple[Any, Any]:
    """
    The peer's and the local address of a TCP connection of address family
    C{family} from what C{getpeername} and C{getsockname} gave.

    @raise StateError: if they are malformed.
    """
    kind = _INET.get(family)
    if kind is None:
        raise StateError("addresses given for a socket that is not TCP")
    size = 2 if kind is address.IPv4Address else 4
    for value in (peer, local):
        if type(value) is not list or len(value) != size or type(value[0]) is not str:
            raise StateError("malformed address")
        for each in value[1:]:
            if type(each) is not int:
                raise StateError("malformed address")
    return kind("TCP", *peer), _LocalAddress(kind, local)


class _LocalAddress:
    """
    A local address to build once asked for (most never are).
    """

    __slots__ = ("kind", "values")

    def __init__(self, kind: Any, values: list[Any]) -> None:
        self.kind = kind
        self.values = values

    def build(self) -> Any:
        return self.kind("TCP", *self.values)


@lru_cache(maxsize=None)
def _provides(standIn: type) -> Any:
    """
    What a L{HostedProtocol} on a stand-in of type C{standIn} provides
    (computed once; C{directlyProvides} would for each connection).
    """
    return Provides(HostedProtocol, implementedBy(standIn))


class _Gone:
    """
    What a stand-in forwards to once its socket turned out dead: a closed
    transport on which everything does nothing.
    """

    connected = 0
    disconnecting = True
    disconnected = 1

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


_gone = _Gone()

_STIRRING = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
"""
What makes a socket not adopted yet go first: input, or its peer closing.
"""


@implementer(
    ITCPTransport, IConsumer, IPushProducer, ISystemHandle, IHalfCloseableDescriptor
)
class StandIn:
    """
    The transport of a restored connection whose socket is not adopted yet.

    Its L{HostedProtocol} holds what the application writes and the close
    it asks for; C{getPeer} and C{getHost} answer from the manifest;
    anything else adopts the socket now (L{adoptNow}) and is the real
    transport's answer.

    @ivar descriptor: the socket's descriptor, until adopted.
    @ivar transport: the real transport once adopted.
    """

    __slots__ = (
        "_adoption",
        "hosted",
        "descriptor",
        "family",
        "peer",
        "local",
        "output",
        "closing",
        "transport",
        "dead",
    )

    def __init__(
        self,
        adoption: LateAdoption,
        hosted: HostedProtocol,
        descriptor: int,
        family: socket.AddressFamily,
        peer: Any,
        local: Any,
        output: bytes,
        closing: bool,
    ) -> None:
        self._adoption = adoption
        self.hosted = hosted
        self.descriptor = descriptor
        self.family = family
        self.peer = peer
        self.local = local
        self.output = output
        self.closing = closing
        self.transport: Any = None
        self.dead = False

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        if isinstance(self.local, _LocalAddress):
            self.local = self.local.build()
        return self.local

    def adoptNow(self) -> Any:
        """
        Adopt the socket now, if it is not yet.

        @return: the real transport (or a closed stand-in for it, if the
            socket turned out dead).
        """
        return self._adoption.adopt(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.adoptNow(), name)

    def __repr__(self) -> str:
        return "<StandIn for descriptor {} ({})>".format(self.descriptor, self.peer)


@define
class LateAdoption:
    """
    The sockets of restored connections waiting to be adopted, in order.

    L{commit} (once the image serves) starts adopting them, L{sliceSize} at
    a time between reactor turns; until then a socket adopted early (the
    application touched its transport) is held, neither read nor written.

    @ivar adopted: how many were adopted.
    @ivar dropped: how many turned out dead.
    """

    reactor: Any
    sliceSize: int = 256
    adopted: int = 0
    dropped: int = 0
    _waiting: deque[StandIn] = field(factory=deque)
    _committed: bool = False
    _startedAt: float = 0.0
    _early: list[StandIn] = field(factory=list)
    _poller: Any = None
    _whenDone: Callable[[], None] = lambda: None
    _byDescriptor: dict[int, StandIn] = field(factory=dict)

    def __len__(self) -> int:
        return len(self._waiting)

    def standIn(
        self,
        hosted: HostedProtocol,
        descriptor: int,
        family: socket.AddressFamily,
        peer: Any,
        local: Any,
        output: bytes,
        closing: bool,
    ) -> StandIn:
        """
        Put C{hosted} on a stand-in transport for the socket C{descriptor}
        (which this object now owns), last in line.
        """
        standIn = StandIn(
            self, hosted, descriptor, family, peer, local, output, closing
        )
        hosted.awaitTransport(standIn, _provides(StandIn))
        self._waiting.append(standIn)
        return standIn

    def forget(self, standIn: StandIn) -> int | None:
        """
        Give up a connection whose restore failed: its hosted protocol is
        released, and its descriptor, unless already adopted, handed back.

        @return: the descriptor (the caller closes it; a duplicate if the
            socket was adopted already, its transport abandoned here), or
            L{None} if there is none.
        """
        try:
            self._waiting.remove(standIn)
        except ValueError:
            pass
        if standIn in self._early:
            self._early.remove(standIn)
        standIn.hosted.release()
        standIn.hosted.stopAwaiting()
        transport = standIn.transport
        if transport is _gone:
            return None
        if transport is not None:
            standIn.transport = _gone
            try:
                descriptor: int | None = os.dup(transport.fileno())
            except OSError:
                descriptor = None
            try:
                abandonConnection(transport)
            except ValueError:
                pass
            return descriptor
        descriptor, standIn.descriptor = standIn.descriptor, -1
        standIn.transport = _gone
        return descriptor if descriptor >= 0 else None

    def forgetAll(self) -> list[int]:
        """
        Give up every connection still waiting (or adopted early and held):
        see L{forget}.

        @return: their descriptors, for the caller to close.
        """
        descriptors = []
        for standIn in list(self._waiting) + list(self._early):
            descriptor = self.forget(standIn)
            if descriptor is not None:
                descriptors.append(descriptor)
        return descriptors

    def adopt(self, standIn: StandIn) -> Any:
        """
        Adopt one socket now (held until L{commit}), unless it was already.

        @return: its transport, or a closed stand-in if it is dead.
        """
        if standIn.transport is not None:
            return standIn.transport
        descriptor, standIn.descriptor = standIn.descriptor, -1
        if self._byDescriptor.pop(descriptor, None) is not None:
            self._poller.unregister(descriptor)
        hosted = standIn.hosted
        try:
            transport = adoptConnection(
                self.reactor, descriptor, _Reattach(hosted), standIn.family, hold=False
            )
        except Exception as e:
            # Usually the peer went away since the old image described it
            # (reset: no peer address any more): dropped quietly, counted;
            # its protocol hears of it as of any ended connection.  Anything
            # else is a fault, said as one, and ends the connection alike.
            standIn.transport = _gone
            standIn.dead = True
            self.dropped += 1
            if isinstance(e, (OSError, ValueError)):
                _log.debug(
                    "Re-exec: a carried-over connection from {peer} ended "
                    "before its socket was adopted: {why}",
                    peer=standIn.peer,
                    why=str(e),
                )
            else:
                _log.failure(
                    "Re-exec: adopting the socket of the connection from {peer} "
                    "failed; it ends",
                    peer=standIn.peer,
                )
            hosted.factory.unregisterProtocol(hosted)
            hosted.stopAwaiting()
            self.reactor.callLater(
                0,
                hosted.connectionLost,
                Failure(ConnectionLost("ended before it was adopted")),
            )
            return _gone
        standIn.transport = transport
        self.adopted += 1
        if self._committed:
            self._serve(standIn)
        else:
            self._early.append(standIn)
        return transport

    def _serve(self, standIn: StandIn) -> None:
        """
        Serve an adopted connection: what the old image had not written
        first, then what the application wrote since, then read, and
        deliver the complete messages already buffered.
        """
        hosted = standIn.hosted
        hosted.unhold(standIn.output)
        standIn.output = b""
        if standIn.closing:
            hosted.loseConnection()
        resumeConnection(standIn.transport)
        protocol = hosted.wrappedProtocol
        if protocol is not None:
            try:
                replayBufferedInput(protocol)
            except Exception:
                _log.failure("Replaying buffered input failed")

    def commit(self, whenDone: Callable[[], None] = lambda: None) -> None:
        """
        The image serves: serve the sockets adopted already, and adopt the
        others in slices, each slice first those a client has sent to (or
        closed) since.

        @param whenDone: called once every socket is adopted.
        """
        self._whenDone = whenDone
        self._committed = True
        self._startedAt = time.monotonic()
        early, self._early = self._early, []
        for standIn in early:
            if not standIn.dead:
                self._serve(standIn)
        if not self._waiting:
            whenDone()
            return
        poller = select.poll()
        byDescriptor = {}
        for standIn in self._waiting:
            if standIn.transport is None and standIn.descriptor >= 0:
                poller.register(standIn.descriptor, _STIRRING)
                byDescriptor[standIn.descriptor] = standIn
        self._poller = poller
        self._byDescriptor = byDescriptor
        self.reactor.callLater(0, self._slice)

    def _adoptGuarded(self, standIn: StandIn) -> None:
        """
        Adopt one socket; a fault is logged, never left to stop the slices
        (the connections after it would never be served).
        """
        try:
            self.adopt(standIn)
        except Exception:
            _log.failure(
                "Re-exec: serving the connection from {peer} failed",
                peer=standIn.peer,
            )

    def _slice(self) -> None:
        waiting = self._waiting
        byDescriptor = self._byDescriptor
        # One poll of every socket not adopted yet (about a microsecond for
        # a thousand): a client that sent something waits one slice at most.
        for descriptor, events in self._poller.poll(0):
            standIn = byDescriptor.get(descriptor)
            if standIn is not None:
                self._adoptGuarded(standIn)
        for _ in range(min(self.sliceSize, len(waiting))):
            self._adoptGuarded(waiting.popleft())
        if waiting:
            self.reactor.callLater(0, self._slice)
            return
        self._poller = None
        self._byDescriptor = {}
        self._whenDone()
        _log.info(
            "Re-exec: adopted the sockets of {adopted} connections in {ms} ms "
            "after serving; {dropped} had ended meanwhile",
            adopted=self.adopted,
            dropped=self.dropped,
            ms=round((time.monotonic() - self._startedAt) * 1000, 1),
        )


@implementer(IProtocolFactory)
class _Reattach:
    """
    The factory that hands an adopted socket to the hosted protocol already
    restored for it.
    """

    def __init__(self, hosted: HostedProtocol) -> None:
        self.hosted = hosted

    def buildProtocol(self, addr: Any) -> HostedProtocol:
        return self.hosted

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass
