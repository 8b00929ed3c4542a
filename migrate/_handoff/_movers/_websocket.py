# -*- test-case-name: migrate.test.test_movers_websocket -*-
"""
Moving a C{twisted.web.websocket} connection at a message boundary.

C{WebSocketResource.render_GET} upgrades the HTTP channel by pointing its
C{dataReceived} and C{connectionLost} at a C{_WebSocketWireProtocol}, which
holds the C{wsproto} connection, the partial text and bytes messages, and
the application's C{WebSocketProtocol}.  Between two messages, with no
extension negotiated (Twisted negotiates none), the C{wsproto} connection
holds nothing but its state (open) and the bytes of a frame header not yet
complete: a fresh C{wsproto.Connection} given those bytes is the same
connection.

What travels: the upgrade request's method, URI, version and headers (as
plain data), those bytes, and the application protocol's own state, which
it gives by providing L{migrate.IMigratable} (one that does not opt in
cannot move: it drains, and is closed with code 1001 at the deadline).
On the new side the new code's C{Site} finds the C{WebSocketResource} for
the URI, its factory builds the new protocol from a request carrying the
original method, URI and headers, the wire protocol hands it its transport
through C{negotiationStarted}, and C{restoreMigrationState} is called in
place of C{negotiationFinished}.

This module reaches into these private attributes of Twisted 25.5 to
26.10 and wsproto 1.x, and is the only one to: C{_WebSocketWireProtocol}
(its C{_wsconn}, C{_wsp}, and from Twisted 26.4 C{_textBuffer} and
C{_bytesBuffer}), C{HTTPChannel}'s
C{_protocolUpgradeForWebsockets} and C{_handlingRequest}, and wsproto's
C{Connection._events}, C{_proto}, C{FrameProtocol._frame_decoder},
C{_message_decoder}, C{_outbound_opcode}, C{extensions}, and
C{FrameDecoder.header} and C{buffer}.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from migrate._codec import StateError
from migrate.interfaces import IMigratable

from ._registry import migrationBlocker

__all__ = [
    "application",
    "blocker",
    "capture",
    "close",
    "replay",
    "restore",
    "wireOf",
]


def _impl() -> Any:
    """
    Twisted's private WebSocket module, imported when first needed (it
    needs the C{websocket} extra, wsproto).
    """
    from twisted.web import _websocket_impl

    return _websocket_impl


def wireOf(channel: HTTPChannel) -> Any:
    """
    @return: the C{_WebSocketWireProtocol} a channel was upgraded to, or
        L{None}.
    """
    received = vars(channel).get("dataReceived")
    wire = getattr(received, "__self__", None)
    if wire is None or type(wire).__name__ != "_WebSocketWireProtocol":
        return None
    return wire


def application(wire: Any) -> Any:
    """
    @return: the application's own protocol of a WebSocket connection
        (the one C{WebSocketResource} built).
    """
    return wire._wsp


def _isOpen(wire: Any) -> bool:
    from wsproto.connection import ConnectionState

    return bool(wire._wsconn.state is ConnectionState.OPEN)


def blocker(wire: Any) -> str | None:
    """
    Why a WebSocket connection cannot move now.

    @return: L{None} at a message boundary (or if it can never move);
        otherwise the reason.
    """
    if not _isOpen(wire) or not IMigratable.providedBy(wire._wsp):
        return None
    conn = wire._wsconn
    proto = conn._proto
    if _holdsPart(wire, "_textBuffer") or _holdsPart(wire, "_bytesBuffer"):
        return "a WebSocket message is half received"
    if proto._frame_decoder.header is not None or proto._message_decoder.opcode:
        return "a WebSocket frame is half received"
    if conn._events or proto._frame_decoder.buffer.bytes_used:
        return "WebSocket input is being parsed"
    if proto._outbound_opcode is not None:
        return "a WebSocket message is half sent"
    return migrationBlocker(wire._wsp)


def _holdsPart(wire: Any, name: str) -> bool:
    """
    Whether the wire protocol holds part of a message in its buffer
    C{name}.  Twisted 26.4 and later reassemble a message from wsproto's
    chunks there; Twisted 25.5 has no such buffer (it hands the
    application each chunk as it comes), so it never holds a part.
    """
    buffer = getattr(wire, name, None)
    return buffer is not None and bool(buffer.data)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def capture(channel: HTTPChannel, wire: Any) -> dict[str, Any]:
    """
    Capture a WebSocket connection at a message boundary.

    @return: plain data: C{"request"} (C{"method"}, C{"uri"}, C{"version"},
        C{"headers"}: text, bytes decoded as latin-1), C{"buffer"} (base64
        text: a frame header not yet complete) and C{"app"} (the
        application protocol's L{migrate.state.ProtocolState}, as plain
        data).

    @raise StateError: if it cannot move at all (closing, extensions, the
        application protocol does not provide L{IMigratable}).
    @raise migrate._handoff._movers._registry.NotAtSafePoint: if it cannot
        move now.
    """
    from migrate.state import captureProtocolState

    from ._registry import NotAtSafePoint

    app = wire._wsp
    if not _isOpen(wire):
        raise StateError("the WebSocket connection is closing")
    if not IMigratable.providedBy(app):
        raise StateError(
            f"WebSocket protocol {type(app).__name__} does not provide IMigratable"
        )
    proto = wire._wsconn._proto
    if proto.extensions:
        raise StateError("a WebSocket extension was negotiated")
    reason = blocker(wire)
    if reason is not None:
        raise NotAtSafePoint(reason)
    if not channel.requests:
        raise StateError("the WebSocket upgrade request is gone")
    request = channel.requests[0]
    return {
        "request": {
            "method": _text(request.method),
            "uri": _text(request.uri),
            "version": _text(request.clientproto),
            "headers": [
                [_text(name), _text(value)]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
        },
        "buffer": base64.b64encode(bytes(proto._frame_decoder.buffer.buffer)).decode(
            "ascii"
        ),
        "app": captureProtocolState(app, snapshot=False).toPlain(),
    }


def _bytes(value: object, where: str) -> bytes:
    if type(value) is not str:
        raise StateError(f"WebSocket state: {where} must be text")
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError as e:
        raise StateError(f"WebSocket state: bad {where}") from e


def _rebuildRequest(channel: HTTPChannel, saved: object) -> Any:
    """
    A request like the original upgrade request, for the new code's
    resource look-up and its WebSocket factory's C{buildProtocol}; it is
    not processed.
    """
    from urllib.parse import unquote_to_bytes

    from twisted.web.http import parse_qs

    if type(saved) is not dict:
        raise StateError("WebSocket state: request must be a dict")
    headers = saved.get("headers")
    if type(headers) is not list:
        raise StateError("WebSocket state: headers must be a list")
    request: Any = channel.requestFactory(channel)
    request.method = _bytes(saved.get("method"), "method")
    request.uri = _bytes(saved.get("uri"), "uri")
    request.clientproto = _bytes(saved.get("version"), "version")
    request.requestHeaders = Headers()
    for pair in headers:
        if type(pair) is not list or len(pair) != 2:
            raise StateError("WebSocket state: bad header")
        request.requestHeaders.addRawHeader(
            _bytes(pair[0], "header"), _bytes(pair[1], "header")
        )
    request.gotLength(0)
    path, _, query = request.uri.partition(b"?")
    request.path = path
    request.args = parse_qs(query, 1) if query else {}
    request.prepath = []
    request.postpath = [unquote_to_bytes(part) for part in path[1:].split(b"/")]
    return request


def restore(protocol: Any, channel: HTTPChannel, transport: Any, state: Any) -> None:
    """
    Rebuild a WebSocket connection on a freshly built HTTP channel of the
    new code.

    @param protocol: the new C{_GenericHTTPChannelProtocol}, not connected.
    @param channel: its C{HTTPChannel}.
    @param transport: the connection's transport.
    @param state: what L{capture} returned.

    @raise StateError: if the new code has no WebSocket resource at that
        URI, or its protocol does not provide L{IMigratable}, or refused the
        state.
    """
    from wsproto import ConnectionType
    from wsproto.connection import Connection

    from migrate.state import ProtocolState, restoreProtocolState

    impl = _impl()
    buffered = base64.b64decode(_bytes(state.get("buffer"), "buffer"), validate=True)
    appState = ProtocolState.fromPlain(state.get("app"))
    protocol.makeConnection(transport)
    # As for a request being handled: no idle timeout, input not parsed as
    # HTTP any more.
    channel.setTimeout(None)
    request = _rebuildRequest(channel, state.get("request"))
    site: Any = getattr(channel, "site")
    resource = site.getResourceFor(request)
    if not isinstance(resource, impl.WebSocketResource):
        raise StateError(
            f"the new code serves {type(resource).__name__}, not a "
            f"WebSocketResource, at {request.uri!r}"
        )
    app = resource.factory.buildProtocol(request)
    if app is None or not IMigratable.providedBy(app):
        raise StateError(
            f"the new code's WebSocket protocol {type(app).__name__} does not "
            "provide IMigratable"
        )
    channel._handlingRequest = True
    channel.setRawMode()
    channel.requests.append(request)
    wire = impl._WebSocketWireProtocol(
        Connection(ConnectionType.SERVER, trailing_data=buffered),
        impl.serverBootstrap,
        app,
    )
    # negotiationStarted(wire) ...
    channel._protocolUpgradeForWebsockets(wire)
    # ... then restoreMigrationState in place of negotiationFinished.
    restoreProtocolState(app, appState, copyState=False)


def replay(wire: Any) -> None:
    """
    Deliver whatever complete frames the restored connection holds.
    """
    if _isOpen(wire):
        wire.dataReceived(b"")


def close(wire: Any, code: int) -> bool:
    """
    Close a WebSocket connection with a close frame.

    @return: C{True}.
    """
    if _isOpen(wire):
        wire.loseConnection(code)
    else:
        wire.transport.loseConnection()
    return True
