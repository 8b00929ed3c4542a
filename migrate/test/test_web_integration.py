"""
Integration tests for twisted.web applications: HTTP/1.1 keep-alive and
WebSocket connections move to the new code through real upgrades, with
real processes and real sockets.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ._hostprocess import HostProcess, freePort, waitFor, writeModule
from .test_movers_websocket import NO_WEBSOCKET

if NO_WEBSOCKET is None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection,
        CloseConnection,
        Request,
        TextMessage,
    )

_WEBAPP = """
from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

try:
    from twisted.web.websocket import WebSocketResource
except ImportError:
    # A Twisted without WebSockets: the HTTP resources only.
    WebSocketResource = None

from migrate import IMigratable

VERSION = {version!r}


class Answer(Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/slow":
            # Answered once the test creates the file "release".
            import os

            def check():
                if os.path.exists("release"):
                    poll.stop()
                    request.setHeader(b"content-length", b"%d" % (len(VERSION) + 5,))
                    request.write(VERSION + b" slow")
                    request.finish()

            poll = LoopingCall(check)
            poll.start(0.01)
            return NOT_DONE_YET
        return VERSION + b" " + request.path

    def render_POST(self, request):
        return VERSION + b" " + request.content.read()


class Plain:
    # A WebSocket protocol that does not opt in.
    def __init__(self, request):
        self.count = 0

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        self.transport.sendTextMessage(VERSION.decode() + " welcome")

    def pongReceived(self, payload):
        pass

    def textMessageReceived(self, message):
        self.count += 1
        self.transport.sendTextMessage(
            "%s %d %s" % (VERSION.decode(), self.count, message)
        )

    def bytesMessageReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


@implementer(IMigratable)
class Chat(Plain):
    migrationVersion = 1

    def getMigrationState(self):
        return {{"count": self.count}}

    def restoreMigrationState(self, state):
        self.count = state["count"]

    def upgradeMigrationState(self, fromVersion, state):
        return state


class ChatFactory:
    def __init__(self, cls):
        self.cls = cls

    def buildProtocol(self, request):
        return self.cls(request)


class Root(Resource):
    def __init__(self):
        super().__init__()
        answer = Answer()
        for name in (b"a", b"b", b"c", b"slow", b"post", b"x"):
            self.putChild(name, answer)
        if WebSocketResource is not None:
            self.putChild(b"chat", WebSocketResource(ChatFactory(Chat)))
            self.putChild(b"plain", WebSocketResource(ChatFactory(Plain)))


def makeSite():
    return Site(Root())
"""


class HTTPClient(Protocol):
    """
    An HTTP/1.1 keep-alive client: requests are written as given (so they
    may be pipelined), answers matched in order (Content-Length only).
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: deque[Deferred[tuple[int, bytes]]] = deque()
        self.lost = False

    def send(self, data: bytes, answers: int = 1) -> list[Deferred[tuple[int, bytes]]]:
        waiters: list[Deferred[tuple[int, bytes]]] = [
            Deferred() for _ in range(answers)
        ]
        if self.lost:
            # Nothing would ever answer (or fail) them: fail now, not at
            # the test's timeout.
            for waiter in waiters:
                waiter.errback(AssertionError("sent after the server closed"))
            return waiters
        self.waiting.extend(waiters)
        assert self.transport is not None
        self.transport.write(data)
        return waiters

    def get(self, path: bytes) -> Deferred[tuple[int, bytes]]:
        return self.send(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % (path,))[0]

    def post(self, body: bytes) -> Deferred[tuple[int, bytes]]:
        return self.send(
            b"POST /post HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )[0]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = dict(
                line.lower().split(b": ", 1) for line in lines[1:] if b": " in line
            )
            length = int(headers.get(b"content-length", b"0"))
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            code = int(lines[0].split(b" ")[1])
            self.waiting.popleft().callback((code, rest[:length]))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        while self.waiting:
            self.waiting.popleft().errback(AssertionError("server closed"))


class WebSocketClient(Protocol):
    """
    A wsproto client recording text messages and close codes.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.texts: list[str] = []
        self.closeCodes: list[int] = []
        self.accepted: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.ws.send(Request(host="test", target=self.target)))

    def send(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(self.ws.send(TextMessage(text)))

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted.callback(None)
            elif isinstance(event, TextMessage):
                self.texts.append(event.data)
            elif isinstance(event, CloseConnection):
                self.closeCodes.append(event.code)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class WebTestsMixin(TestCase):
    """
    A host serving the module C{webapp} (written by the test) over HTTP on
    one loopback port.
    """

    strategy = "capability"
    timeout = 120

    @inlineCallbacks
    def startWeb(self, version: bytes, *extra: str, plugin: bool = True) -> Any:
        self.port = freePort()
        listen = "tcp:{}:interface=127.0.0.1".format(self.port)
        if plugin:
            arguments = ["--strategy", self.strategy] + list(extra)
            arguments += ["web", "--listen", listen, "--class", "webapp.Root"]
        else:
            arguments = ["--strategy", self.strategy, "--listen", listen]
            arguments += ["--app", "webapp:makeSite"] + list(extra)
        self.host = HostProcess(self, arguments)
        self.setVersion(version)
        status = yield self.host.start()
        return status

    def setVersion(self, version: bytes) -> None:
        writeModule(self.host.workdir, "webapp", _WEBAPP.format(version=version))

    @inlineCallbacks
    def connect(self, protocol: Protocol) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=10)
        connected = yield endpoint.connect(Factory.forProtocol(lambda: protocol))
        self.addCleanup(lambda: connected.transport.loseConnection())
        return connected

    @inlineCallbacks
    def upgrade(self, version: bytes) -> Any:
        self.setVersion(version)
        code, report, err = yield self.host.upgrade()
        self.assertEqual(
            (code, report["outcome"]), (0, "success"), err + self.host.output()
        )
        return report

    @inlineCallbacks
    def slowRequestThenMove(self) -> Any:
        """
        A request in flight at the upgrade is answered by the old code
        (released once the old process waits for it); its connection then
        moves, and the new code answers the next request.
        """
        client = yield self.connect(HTTPClient())
        slow = client.get(b"/slow")
        upgrading = self.upgrade(b"v1")
        yield waitFor(
            lambda: "reach a safe point" in self.host.output(),
            what="the old process to wait for the slow request",
        )
        self.host.workdir.child("release").touch()
        self.assertEqual((yield slow), (200, b"v0 slow"))
        report = yield upgrading
        self.assertEqual(report["moved"], 1, report)
        self.assertTrue(
            any(
                "1 later" in note or "1 connection reached a safe point" in note
                for note in report["notes"]
            ),
            report,
        )
        self.assertEqual((yield client.get(b"/a")), (200, b"v1 /a"))
        self.assertFalse(client.lost)


class KeepAliveTests(WebTestsMixin):
    """
    HTTP/1.1 keep-alive connections through capability transfers of an
    unmodified C{twistd web}.
    """

    @inlineCallbacks
    def test_keepAliveThroughUpgrades(self) -> Any:
        """
        Clients sending GET and POST back to back on keep-alive connections
        through three upgrades: no request fails, no connection is closed,
        every POST body is answered exactly once, and every request sent
        after an upgrade returned is answered by the new code.
        """
        yield self.startWeb(b"v0")
        clients = []
        for _ in range(4):
            clients.append((yield self.connect(HTTPClient())))
        failures: list[Any] = []
        answers: list[list[tuple[int, bytes, bytes]]] = [[] for _ in clients]
        current = [b"v0"]
        running = [True]

        @inlineCallbacks
        def load(index: int, client: HTTPClient) -> Any:
            n = 0
            while running[0]:
                n += 1
                expected = current[0]
                try:
                    if n % 2:
                        code, body = yield client.post(b"%d-%d" % (index, n))
                        if body.split(b" ", 1)[1] != b"%d-%d" % (index, n):
                            failures.append(("body", index, n, body))
                    else:
                        code, body = yield client.get(b"/x")
                except Exception as e:
                    failures.append(repr(e))
                    return
                answers[index].append((code, body, expected))

        loaders = [load(i, c) for i, c in enumerate(clients)]
        for version in (b"v1", b"v2", b"v3"):
            before = sum(map(len, answers))
            yield waitFor(lambda: sum(map(len, answers)) > before + 20)
            report = yield self.upgrade(version)
            current[0] = version
            self.assertEqual(report["moved"], 4, report)
        before = sum(map(len, answers))
        yield waitFor(lambda: sum(map(len, answers)) > before + 20)
        running[0] = False
        for each in loaders:
            yield each
        self.assertEqual(failures, [])
        self.assertEqual([c.lost for c in clients], [False] * 4)
        for answered in answers:
            for code, body, expected in answered:
                self.assertEqual(code, 200)
                # Sent after the upgrade to `expected` returned: that
                # version or a later one answers.
                self.assertGreaterEqual(body.split(b" ")[0], expected)

    @inlineCallbacks
    def test_pipelined(self) -> Any:
        """
        Pipelined requests are each answered once; the bytes of a request
        not complete at the upgrade move and the new code answers it.
        """
        yield self.startWeb(b"v0")
        client = yield self.connect(HTTPClient())
        first, second, third = client.send(
            b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /c HTT",
            answers=3,
        )
        self.assertEqual((yield first), (200, b"v0 /a"))
        self.assertEqual((yield second), (200, b"v0 /b"))
        yield self.upgrade(b"v1")
        assert client.transport is not None
        client.transport.write(b"P/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual((yield third), (200, b"v1 /c"))
        self.assertFalse(client.lost)

    @inlineCallbacks
    def test_slowRequestFinishesThenMoves(self) -> Any:
        """
        A request in flight at the upgrade is answered by the old code; its
        connection then moves, and its next request is answered by the new
        code.
        """
        yield self.startWeb(b"v0", "--safe-point-timeout", "30")
        yield self.slowRequestThenMove()

    @inlineCallbacks
    def test_busyPastTheBoundStays(self) -> Any:
        """
        Idle connections move at once; a request still in flight when the
        safe-point bound passes keeps its connection on the old code, which
        answers it and drains; it does not hold the others back.
        """
        yield self.startWeb(b"v0", "--safe-point-timeout", "0.5")
        idle = yield self.connect(HTTPClient())
        self.assertEqual((yield idle.get(b"/a")), (200, b"v0 /a"))
        busy = yield self.connect(HTTPClient())
        slow = busy.get(b"/slow")
        report = yield self.upgrade(b"v1")
        self.assertEqual((report["moved"], report["draining"]), (1, 1), report)
        self.assertTrue(
            any("did not reach a safe point" in note for note in report["notes"]),
            report,
        )
        self.assertEqual((yield idle.get(b"/a")), (200, b"v1 /a"))
        self.host.workdir.child("release").touch()
        self.assertEqual((yield slow), (200, b"v0 slow"))
        self.assertEqual((yield busy.get(b"/a")), (200, b"v0 /a"))

    @inlineCallbacks
    def test_tlsDrainsThenClosesBetweenRequests(self) -> Any:
        """
        An HTTP connection over TLS cannot move: the old process keeps
        answering it, and closes it at the drain deadline between requests,
        so no request fails.

        The request the old process answers after the hand-off is begun
        before the upgrade and finished after it returns: the drain deadline
        (1 s from the hand-off, often before the upgrade command's answer
        reaches a loaded test) then finds either an idle connection with a
        request half received, which it must not close (it closes after
        the answer, if the request ends within the abort grace), or one the
        request already left idle, which it closes.  Either way the request
        is answered and the connection closed; a request only sent after
        the upgrade returned could find the connection already closed, as
        HTTP/1.1 allows (and the test used to wait for its answer forever).
        """
        try:
            from twisted.internet.ssl import CertificateOptions
        except ImportError:
            raise SkipTest("pyOpenSSL is not installed (the dev extra installs it)")
        import twisted.test
        from twisted.internet.endpoints import SSL4ClientEndpoint

        pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
        tlsPort = freePort()
        yield self.startWeb(
            b"v0",
            "--drain-timeout",
            "1",
            "--listen",
            "ssl:{}:interface=127.0.0.1:privateKey={}".format(tlsPort, pem),
            plugin=False,
        )
        endpoint = SSL4ClientEndpoint(
            reactor, "127.0.0.1", tlsPort, CertificateOptions()
        )
        secure = yield endpoint.connect(Factory.forProtocol(HTTPClient))
        self.addCleanup(lambda: secure.transport.loseConnection())
        plain = yield self.connect(HTTPClient())
        self.assertEqual((yield secure.get(b"/a")), (200, b"v0 /a"))
        self.assertEqual((yield plain.get(b"/a")), (200, b"v0 /a"))
        secure.transport.write(b"GET /b HTTP/1.1\r\n")
        report = yield self.upgrade(b"v1")
        self.assertEqual((report["moved"], report["draining"]), (1, 1), report)
        self.assertEqual((yield secure.send(b"Host: test\r\n\r\n")[0]), (200, b"v0 /b"))
        self.assertEqual((yield plain.get(b"/b")), (200, b"v1 /b"))
        yield waitFor(lambda: secure.lost, what="the drain deadline")
        self.assertEqual(secure.waiting, deque())


class ReexecTests(WebTestsMixin):
    """
    twisted.web applications (a C{Site} given with C{--app}, or C{twistd
    web}) upgraded by re-exec.
    """

    strategy = "reexec"

    @inlineCallbacks
    def test_keepAliveThroughReexec(self) -> Any:
        """
        Keep-alive connections of a C{Site} passed with C{--app} move
        through two re-execs; POST bodies are answered once each.
        """
        yield self.startWeb(b"v0", plugin=False)
        client = yield self.connect(HTTPClient())
        self.assertEqual((yield client.post(b"one")), (200, b"v0 one"))
        yield self.upgrade(b"v1")
        self.assertEqual((yield client.post(b"two")), (200, b"v1 two"))
        yield self.upgrade(b"v2")
        self.assertEqual((yield client.get(b"/a")), (200, b"v2 /a"))
        self.assertFalse(client.lost)

    @inlineCallbacks
    def test_adoptLosesNoRequest(self) -> Any:
        """
        With C{--reexec-unmovable adopt}, keep-alive clients sending GET and
        POST back to back through two re-execs lose no request (every
        request in flight at the exec used to be lost): HTTP connections
        move through their mover, never adopted fresh.
        """
        yield self.startWeb(
            b"v0", "--reexec-unmovable", "adopt", "--safe-point-timeout", "5"
        )
        clients = []
        for _ in range(3):
            clients.append((yield self.connect(HTTPClient())))
        failures: list[Any] = []
        answered = [0]
        running = [True]

        @inlineCallbacks
        def load(index: int, client: HTTPClient) -> Any:
            n = 0
            while running[0]:
                n += 1
                try:
                    code, body = yield client.post(b"%d-%d" % (index, n))
                except Exception as e:
                    failures.append(repr(e))
                    return
                if code != 200 or body.split(b" ", 1)[1] != b"%d-%d" % (index, n):
                    failures.append((code, body))
                answered[0] += 1

        loaders = [load(i, c) for i, c in enumerate(clients)]
        for version in (b"v1", b"v2"):
            before = answered[0]
            yield waitFor(lambda: answered[0] > before + 20)
            report = yield self.upgrade(version)
            self.assertEqual(report["moved"], 3, report)
        before = answered[0]
        yield waitFor(lambda: answered[0] > before + 20)
        running[0] = False
        for each in loaders:
            yield each
        self.assertEqual(failures, [])
        self.assertEqual([c.lost for c in clients], [False] * 3)

    @inlineCallbacks
    def test_slowRequestFinishesThenMoves(self) -> Any:
        """
        Re-exec waits for a request in flight to be answered by the old
        image, then the connection moves to the new one.
        """
        yield self.startWeb(b"v0", "--safe-point-timeout", "30", plugin=False)
        yield self.slowRequestThenMove()


class WebSocketTests(WebTestsMixin):
    """
    twisted.web.websocket connections through upgrades.
    """

    skip = NO_WEBSOCKET

    @inlineCallbacks
    def test_chatWithState(self) -> Any:
        """
        An opted-in WebSocket connection moves with its state: the new code
        answers, counting on from where the old code was.
        """
        yield self.startWeb(b"v0")
        client = WebSocketClient("/chat")
        yield self.connect(client)
        yield client.accepted
        client.send("a")
        yield waitFor(lambda: len(client.texts) == 2)
        yield self.upgrade(b"v1")
        client.send("b")
        yield waitFor(lambda: len(client.texts) == 3)
        yield self.upgrade(b"v2")
        client.send("c")
        yield waitFor(lambda: len(client.texts) == 4)
        self.assertEqual(client.texts, ["v0 welcome", "v0 1 a", "v1 2 b", "v2 3 c"])
        self.assertFalse(client.lost.called)

    @inlineCallbacks
    def test_notOptedInClosedGoingAway(self) -> Any:
        """
        A WebSocket protocol that does not opt in stays with the old
        process, which closes it at the drain deadline with a close frame,
        code 1001 (going away), not a bare close (1006).
        """
        yield self.startWeb(b"v0", "--drain-timeout", "1")
        client = WebSocketClient("/plain")
        yield self.connect(client)
        yield client.accepted
        report = yield self.upgrade(b"v1")
        self.assertEqual((report["moved"], report["draining"]), (0, 1), report)
        client.send("still here")
        yield waitFor(lambda: client.texts[-1:] == ["v0 1 still here"])
        yield client.lost
        self.assertEqual(client.closeCodes, [1001])


class ReloadTests(WebTestsMixin):
    """
    A C{Site} given with C{--app}, upgraded by module reload.
    """

    strategy = "reload"

    @inlineCallbacks
    def test_keepAliveServedByNewSite(self) -> Any:
        """
        After a module reload, a keep-alive connection's next request is
        answered by the new code's C{Site}, on the same connection.
        """
        yield self.startWeb(b"v0", plugin=False)
        client = yield self.connect(HTTPClient())
        self.assertEqual((yield client.post(b"one")), (200, b"v0 one"))
        report = yield self.upgrade(b"v1")
        self.assertTrue(
            any("from the new code's Site" in note for note in report["notes"]),
            report,
        )
        self.assertEqual((yield client.post(b"two")), (200, b"v1 two"))
        self.assertFalse(client.lost)
