"""
Integration test for the polite ending of HTTP/2: a real host serving a
twisted.web C{Site} over TLS with ALPN offering C{h2}, a real HTTP/2
client (the C{h2} library, Twisted's own HTTP/2 dependency), a real
capability upgrade, and the drain deadline.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ._hostprocess import HostProcess, freePort, pidAlive, waitFor, writeModule

try:
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.errors import ErrorCodes
    from h2.events import (
        ConnectionTerminated,
        DataReceived,
        ResponseReceived,
        StreamEnded,
    )

    _noH2 = None
except ImportError:
    _noH2 = "h2 is not installed (the test and dev extras install it)"

_H2APP = """
import os

from twisted.internet import ssl
from twisted.internet.task import LoopingCall
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

VERSION = {version!r}
PEM = {pem!r}


class Answer(Resource):
    isLeaf = True

    def render_GET(self, request):
        answer = b" ".join(
            [VERSION, b"%d" % (os.getpid(),), request.clientproto, request.path]
        )
        if request.path != b"/slow":
            return answer

        # Answered once the test creates the file "release".
        def check():
            if os.path.exists("release"):
                poll.stop()
                request.write(answer)
                request.finish()

        poll = LoopingCall(check)
        poll.start(0.01)
        return NOT_DONE_YET


def makeFactory():
    # Twisted's ssl: endpoint description cannot offer ALPN: the application
    # wraps its Site in TLS itself and migrate-host listens on plain TCP.
    with open(PEM, "rb") as f:
        certificate = ssl.PrivateCertificate.loadPEM(f.read())
    options = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    return TLSMemoryBIOFactory(options, False, Site(Answer()))
"""


class HTTP2Client(Protocol):
    """
    An HTTP/2 client recording, in order, the responses, the GOAWAY frames
    and the end of the connection; it never closes the connection itself,
    so that the test sees the server close it.

    @ivar events: C{("answer", stream id)} (a response complete),
        C{("goaway", last stream id, error code)} and C{("lost", reason)}
        in the order they happened.
    """

    def __init__(self) -> None:
        self.conn = H2Connection(H2Configuration(client_side=True))
        self.events: list[tuple[Any, ...]] = []
        self.lost: Deferred[None] = Deferred()
        self._bodies: dict[int, bytes] = {}
        self._waiting: dict[int, Deferred[bytes]] = {}

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self._flush()

    def get(self, path: bytes) -> Deferred[bytes]:
        """
        Send a GET on a new stream; fire with the response's body.
        """
        streamID = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            streamID,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "test"),
                (":path", path.decode("ascii")),
            ],
            end_stream=True,
        )
        self._bodies[streamID] = b""
        answer: Deferred[bytes] = Deferred()
        self._waiting[streamID] = answer
        self._flush()
        return answer

    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, ResponseReceived):
                pass
            elif isinstance(event, DataReceived):
                self._bodies[event.stream_id] += event.data
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            elif isinstance(event, StreamEnded):
                self.events.append(("answer", event.stream_id))
                self._waiting.pop(event.stream_id).callback(
                    self._bodies.pop(event.stream_id)
                )
            elif isinstance(event, ConnectionTerminated):
                self.events.append(("goaway", event.last_stream_id, event.error_code))
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.events.append(("lost", reason))
        for answer in self._waiting.values():
            answer.errback(AssertionError("connection lost before the answer"))
        self._waiting.clear()
        self.lost.callback(None)


class HTTP2DrainTests(TestCase):
    """
    An HTTP/2 connection cannot move (its HPACK and stream state stay): it
    stays on the old process, and is ended politely at the drain deadline.
    """

    def setUp(self) -> None:
        if _noH2 is not None:
            raise SkipTest(_noH2)
        try:
            from twisted.internet.ssl import CertificateOptions
        except ImportError:
            raise SkipTest("pyOpenSSL is not installed (the dev extra installs it)")
        self.clientOptions = CertificateOptions(acceptableProtocols=[b"h2"])
        import twisted.test

        self.pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")

    def setVersion(self, version: bytes) -> None:
        writeModule(
            self.host.workdir, "h2app", _H2APP.format(version=version, pem=self.pem)
        )

    @inlineCallbacks
    def connect(self) -> Any:
        from twisted.internet.endpoints import SSL4ClientEndpoint

        endpoint = SSL4ClientEndpoint(
            reactor, "127.0.0.1", self.port, self.clientOptions, timeout=10
        )
        client = yield endpoint.connect(Factory.forProtocol(HTTP2Client))
        self.addCleanup(self.disconnect, client)
        return client

    def disconnect(self, client: HTTP2Client) -> Deferred[None]:
        """
        Abort a client's connection if it is still open; fire once it is
        closed.
        """
        if not client.lost.called:
            transport: Any = client.transport
            transport.abortConnection()
        return client.lost

    @inlineCallbacks
    def startHost(self) -> Any:
        """
        Start a host serving C{h2app} (version v0) over TLS, with a drain
        deadline of one second; fire with its process id.
        """
        self.port = freePort()
        self.host = HostProcess(
            self,
            [
                "--strategy",
                "capability",
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(self.port),
                "--app",
                "h2app:makeFactory",
                "--drain-timeout",
                "1",
            ],
        )
        self.setVersion(b"v0")
        status = yield self.host.start()
        return status["pid"]

    @inlineCallbacks
    def upgrade(self) -> Any:
        """
        Upgrade to version v1, whose process serves new connections, the
        HTTP/2 connection staying; fire with the new process id.
        """
        self.setVersion(b"v1")
        code, report, err = yield self.host.upgrade()
        self.assertEqual(
            (code, report["moved"], report["draining"]),
            (0, 0, 1),
            err + self.host.output(),
        )
        return report["newPid"]

    @inlineCallbacks
    def assertEndedPolitely(self, client: HTTP2Client, answered: int) -> Any:
        """
        Wait for the client's connection to end; it must have been told
        GOAWAY, NO_ERROR, with the last stream it was answered, after its
        last answer and before a clean end (TLS close and FIN; a reset or
        a TCP close under TLS is a L{ConnectionLost}).
        """
        yield client.lost
        reason = client.events[-1][1]
        self.assertEqual(
            client.events[-3:],
            [("answer", answered), ("goaway", answered, ErrorCodes.NO_ERROR)]
            + [("lost", reason)],
            self.host.output(),
        )
        self.assertIsInstance(reason.value, ConnectionDone, self.host.output())

    @inlineCallbacks
    def test_goAwayAtTheDrainDeadline(self) -> Any:
        """
        An HTTP/2 connection over TLS stays on the old process, which
        answers it until the drain deadline, then sends GOAWAY (NO_ERROR,
        naming the last stream it answered) and closes the connection
        cleanly.  A new connection is served by the new process.
        """
        oldPid = yield self.startHost()
        client = yield self.connect()
        self.assertEqual((yield client.get(b"/a")), b"v0 %d HTTP/2 /a" % (oldPid,))
        self.assertEqual(client.transport.negotiatedProtocol, b"h2")
        self.assertEqual((yield client.get(b"/b")), b"v0 %d HTTP/2 /b" % (oldPid,))
        newPid = yield self.upgrade()
        yield self.assertEndedPolitely(client, 3)
        fresh = yield self.connect()
        self.assertEqual((yield fresh.get(b"/c")), b"v1 %d HTTP/2 /c" % (newPid,))
        yield waitFor(lambda: not pidAlive(oldPid), what="the old process to exit")

    @inlineCallbacks
    def test_streamInFlightFinishesFirst(self) -> Any:
        """
        A stream still in flight at the drain deadline is answered first:
        the GOAWAY and the close come after its answer.
        """
        oldPid = yield self.startHost()
        client = yield self.connect()
        self.assertEqual((yield client.get(b"/a")), b"v0 %d HTTP/2 /a" % (oldPid,))
        slow = client.get(b"/slow")
        yield self.upgrade()
        yield waitFor(
            lambda: "Drain deadline" in self.host.output(), what="the drain deadline"
        )
        self.host.workdir.child("release").touch()
        self.assertEqual((yield slow), b"v0 %d HTTP/2 /slow" % (oldPid,))
        yield self.assertEndedPolitely(client, 3)
        self.assertEqual(client.events[0], ("answer", 1))
