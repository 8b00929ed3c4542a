# -*- test-case-name: migrate.test.test_movers_http -*-
"""
The mover for twisted.web's HTTP channel: an idle HTTP/1.1 keep-alive
connection moves to the new code's L{Site}, with the bytes of a request the
client already started sending; a connection upgraded to a WebSocket moves
through L{migrate._handoff._movers._websocket}; HTTP/2 never moves.

C{twisted.web}'s C{Site} builds a C{_GenericHTTPChannelProtocol}, a proxy
that picks an C{HTTPChannel} (HTTP/1.1) or an C{H2Connection} after ALPN.
An C{HTTPChannel} between two requests holds no request and no parser state
beyond the unparsed bytes of its C{LineReceiver}: that, its C{persistent}
flag and what is left of its idle timeout are all that travels.  On the new
side the new code's C{Site} builds a fresh channel, which is connected as a
new connection would be, then given those back.

This module reaches into these private attributes of Twisted 26.10, and is
the only one to: C{_GenericHTTPChannelProtocol._channel} and
C{_negotiatedProtocol}; C{HTTPChannel.requests}, C{_handlingRequest},
C{_dataBuffer}, C{_waitingForTransport}, C{_HTTPChannel__first_line},
C{_HTTPChannel__header}, C{_command}, C{_path}, C{_version},
C{requestDone} (wrapped while a safe point is
awaited), the C{LineReceiver}'s C{_buffer},
C{_busyReceiving} and C{line_mode}, and C{TimeoutMixin}'s
C{_TimeoutMixin__timeoutCall}; of an HTTP/2 channel (C{H2Connection}),
its C{conn} (the C{h2} connection, whose state says whether a GOAWAY was
sent or received) and C{streams} (the streams in flight).
"""

from __future__ import annotations

import base64
from typing import Any, Callable

from twisted.protocols import basic
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from migrate._codec import StateError

from .._migrated import cancelIdleTimeout, tellMigrated
from . import _websocket
from ._registry import IMover, NotAtSafePoint

__all__ = ["GenericChannelMover", "halfReceivedHead", "httpBlocker"]

_HTTP11 = "http/1.1"
_WEBSOCKET = "websocket"


def _idleRemaining(channel: HTTPChannel) -> float | None:
    """
    @return: the seconds left before the channel's idle timeout fires, or
        L{None} if it has none.
    """
    call = getattr(channel, "_TimeoutMixin__timeoutCall", None)
    if call is None or not call.active():
        return None
    return max(0.0, float(call.getTime() - call.seconds()))


def halfReceivedHead(channel: HTTPChannel) -> bytes | None:
    """
    The bytes of a request whose request line and some headers arrived but
    not the end of its headers, as the client sent them (headers in
    Twisted's canonical case, a folded header on one line), so that the new
    code parses the request afresh.

    @return: those bytes, or L{None} if the channel is not in that state.
    """
    if (
        len(channel.requests) != 1
        or channel._handlingRequest
        or not channel.line_mode
        or channel._HTTPChannel__first_line != 0  # type: ignore[attr-defined]
        or channel._dataBuffer
        or getattr(channel, "_busyReceiving", False)
    ):
        return None
    lines = [b" ".join([channel._command, channel._path, channel._version])]
    for name, values in channel.requests[0].requestHeaders.getAllRawHeaders():
        lines.extend(name + b": " + value for value in values)
    pending = channel._HTTPChannel__header  # type: ignore[attr-defined]
    if pending:
        lines.append(pending)
    return b"\r\n".join(lines) + b"\r\n"


def httpBlocker(channel: HTTPChannel) -> str | None:
    """
    Why an HTTP/1.1 channel cannot move now.

    @return: L{None} if it is between two requests (the next one possibly
        begun: see L{halfReceivedHead}); otherwise the reason.
    """
    if getattr(channel, "_busyReceiving", False):
        return "it is parsing input"
    if channel._waitingForTransport:
        return "its response is still being written"
    if channel._dataBuffer:
        return "pipelined requests wait"
    if channel.requests or channel._handlingRequest:
        if halfReceivedHead(channel) is not None:
            return None
        return "a request is in flight"
    if not channel.line_mode or channel._HTTPChannel__header:  # type: ignore[attr-defined]
        return "a request is half received"
    return None


@implementer(IMover)
class GenericChannelMover:
    """
    The L{IMover} of a C{twisted.web.http._GenericHTTPChannelProtocol}.

    Its state is one of two kinds: C{{"kind": "http/1.1", "buffer":
    base64 text, "persistent": bool, "firstLine": int, "idle": float or
    None}} for a channel between requests, or C{{"kind": "websocket",
    ...}} (see L{migrate._handoff._movers._websocket}).
    """

    migrationVersion = 1

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    @property
    def _channel(self) -> Any:
        return self._protocol._channel

    def _wire(self) -> Any:
        channel = self._channel
        return _websocket.wireOf(channel) if isinstance(channel, HTTPChannel) else None

    def migrationBlocker(self) -> str | None:
        channel = self._channel
        if not isinstance(channel, HTTPChannel):
            return None  # HTTP/2: never moves, getMigrationState says why
        wire = _websocket.wireOf(channel)
        if wire is not None:
            return _websocket.blocker(wire)
        if not channel.persistent:
            return None  # closing: never moves
        return httpBlocker(channel)

    def watchSafePoint(self, reached: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{reached} as soon as the channel has answered its last
        request, from inside C{requestDone} (before it can read the next
        one), so that the caller can hold it there.

        @return: a callable that stops watching.
        """
        channel = self._channel
        if not isinstance(channel, HTTPChannel) or _websocket.wireOf(channel):
            return lambda: None
        original = channel.requestDone

        def requestDone(request: Any) -> None:
            original(request)
            if not channel.requests:
                reached()

        channel.requestDone = requestDone  # type: ignore[method-assign]

        def cancel() -> None:
            if vars(channel).get("requestDone") is requestDone:
                del channel.requestDone

        return cancel

    def getMigrationState(self) -> Any:
        channel = self._channel
        if not isinstance(channel, HTTPChannel):
            raise StateError(
                f"an HTTP/2 connection ({type(channel).__name__}) cannot move"
            )
        wire = _websocket.wireOf(channel)
        if wire is not None:
            return {"kind": _WEBSOCKET, **_websocket.capture(channel, wire)}
        if not channel.persistent:
            raise StateError("the HTTP connection closes after its last response")
        if getattr(channel.transport, "disconnecting", False):
            raise StateError("the HTTP connection is closing")
        reason = httpBlocker(channel)
        if reason is not None:
            raise NotAtSafePoint(reason)
        head = halfReceivedHead(channel)
        if head is None:
            buffered = channel._buffer
            firstLine = int(channel._HTTPChannel__first_line)  # type: ignore[attr-defined]
        else:
            # The old request object is dropped (it was never processed):
            # the new code parses the whole request.
            buffered = head + channel._buffer
            firstLine = 1
        return {
            "kind": _HTTP11,
            "buffer": base64.b64encode(buffered).decode("ascii"),
            "persistent": True,
            "firstLine": firstLine,
            "idle": _idleRemaining(channel),
        }

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        raise StateError(
            f"no HTTP channel state version {fromVersion} is known "
            f"(this code reads version {self.migrationVersion})"
        )

    def restoreMigrationState(self, state: Any) -> None:
        if type(state) is not dict or state.get("kind") not in (_HTTP11, _WEBSOCKET):
            raise StateError("not an HTTP channel's state")
        protocol = self._protocol
        channel = self._channel
        transport = getattr(protocol, "transport", None)
        if transport is None or not isinstance(channel, HTTPChannel):
            raise StateError("the new code's protocol is not an HTTP/1.1 channel")
        if state["kind"] == _WEBSOCKET:
            _websocket.restore(protocol, channel, transport, state)
            return
        buffered = _decode(state.get("buffer"))
        firstLine = state.get("firstLine")
        idle = state.get("idle")
        if firstLine not in (1, 2) or state.get("persistent") is not True:
            raise StateError("HTTP channel state: bad firstLine or persistent")
        if idle is not None and type(idle) not in (int, float):
            raise StateError("HTTP channel state: bad idle")
        # Connected as a new connection would be (timeout, producer), then
        # given back what the old channel held.
        protocol.makeConnection(transport)
        channel.persistent = True
        channel._HTTPChannel__first_line = firstLine  # type: ignore[attr-defined]
        channel._buffer = buffered
        timeOut = channel.timeOut
        if idle is not None and timeOut:
            channel.setTimeout(min(float(idle), timeOut))
            channel.timeOut = timeOut

    def replayBufferedInput(self) -> None:
        channel = self._channel
        if not isinstance(channel, HTTPChannel):
            return
        wire = _websocket.wireOf(channel)
        if wire is not None:
            _websocket.replay(wire)
        elif channel._buffer and channel.line_mode:
            # The bytes already reset the idle timeout when they arrived.
            basic.LineReceiver.dataReceived(channel, b"")

    def connectionMigrated(self) -> None:
        """
        The new code serves the connection now: the old channel's idle
        timeout is cancelled (it would time the client out from here, and
        log that it did), and a WebSocket's application protocol is told
        as any protocol is (L{tellMigrated}).
        """
        channel = self._channel
        cancelIdleTimeout(channel)
        wire = self._wire()
        if wire is not None:
            tellMigrated(_websocket.application(wire))

    def useFactory(self, factory: Any) -> bool:
        """
        In the same process (module reload): serve the channel's next
        requests from C{factory}, the new code's C{Site}, as a channel it
        built would be.  A request in flight finishes with the site it
        started with; a WebSocket keeps its protocol.

        @return: whether the channel was given C{factory}: it must be a
            C{Site} (something with a C{resource} and a
            C{requestFactory}) and the channel an HTTP/1.1 channel between
            or during requests.
        """
        channel = self._channel
        if (
            not isinstance(channel, HTTPChannel)
            or _websocket.wireOf(channel) is not None
            or not hasattr(factory, "resource")
            or not hasattr(factory, "requestFactory")
        ):
            return False
        protocol = self._protocol
        protocol.factory = factory
        protocol.site = factory
        protocol.requestFactory = factory.requestFactory
        return True

    def closePolitely(self, code: int) -> bool:
        channel = self._channel
        if not isinstance(channel, HTTPChannel):
            return _goAway(channel)
        wire = _websocket.wireOf(channel)
        if wire is not None:
            return _websocket.close(wire, code)
        if not channel.requests and httpBlocker(channel) is None:
            channel.loseConnection()
            return True
        requests = channel.requests
        if halfReceivedHead(channel) is not None:
            # Its persistence is decided when its headers end: ask again.
            return False
        if (
            len(requests) == 1
            and not channel._dataBuffer
            and not requests[0].startedWriting
            and channel.persistent
        ):
            # Its response will say so, and the channel closes after it.
            requests[0].responseHeaders.setRawHeaders(b"Connection", [b"close"])
            channel.persistent = False
            return True
        return False


def _goAway(channel: Any) -> bool:
    """
    End an HTTP/2 connection once no stream is in flight: GOAWAY (NO_ERROR,
    naming the last stream the channel received, so that a client knows
    any later one was not processed and may retry it), then a clean close.

    Not before: C{h2} counts any frame received after its GOAWAY (a
    window update for a response still being sent, a request's body) as a
    protocol error, and Twisted would then end the streams in flight with
    a second GOAWAY, PROTOCOL_ERROR.  Nor as an early announcement (RFC
    9113, 6.8: a first GOAWAY naming stream 2**31-1): a client built on
    C{h2} (httpx is) fails the same way on the response frames that follow
    it.  A client that always keeps a stream open is therefore never
    between streams, and is aborted after the grace that follows the drain
    deadline, as any connection still open then.

    The channel is the transport's producer, which a TLS transport waits
    for before its close_notify: it is unregistered first, as
    C{HTTPChannel.loseConnection} does for HTTP/1.1.

    @return: whether the connection was ended; C{False} while streams are
        in flight (ask again).
    """
    conn = getattr(channel, "conn", None)
    transport = getattr(channel, "transport", None)
    if conn is None or transport is None or channel.streams:
        return False
    from h2.connection import ConnectionState

    if conn.state_machine.state is not ConnectionState.CLOSED:
        conn.close_connection()
        transport.write(conn.data_to_send())
    transport.unregisterProducer()
    transport.loseConnection()
    return True


def _decode(value: object) -> bytes:
    if type(value) is not str:
        raise StateError("HTTP channel state: buffer must be base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except ValueError as e:
        raise StateError(f"HTTP channel state: bad buffer: {e}") from e
