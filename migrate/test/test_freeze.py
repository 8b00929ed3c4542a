"""
Tests for the freeze exchange of a pre-copied hand-off
(L{migrate.strategies._transfer._freeze}) and for sending the descriptors
of live connections from the reactor thread
(L{migrate._handoff._fdpass.sendLiveDescriptors}).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from .._handoff._fdpass import (
    DescriptorTransferError,
    receiveDescriptors,
    sendLiveDescriptors,
)
from ..strategies._transfer._freeze import (
    FreezeFailed,
    FreezeReceiver,
    commitBlocking,
    lateAnswer,
)


def _frame(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


class _Peer:
    """
    The successor's end of a freeze socketpair, in a thread: reads the
    messages up to the first that does not say C{"more"} and does what
    C{answer} says with that one.
    """

    def __init__(self, answer: Callable[[socket.socket, Any], None]) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.received: list[Any] = []
        self._answer = answer
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self.theirs
        while True:
            header = b""
            while len(header) < 4:
                header += sock.recv(4 - len(header))
            (size,) = struct.unpack("!I", header)
            data = b""
            while len(data) < size:
                data += sock.recv(size - len(data))
            message = json.loads(data)
            self.received.append(message)
            if not (isinstance(message, dict) and message.get("more")):
                break
        self._answer(sock, message)

    def close(self) -> None:
        self._thread.join(10)
        self.ours.close()
        self.theirs.close()


class CommitBlockingTests(SynchronousTestCase):
    """
    L{commitBlocking} sends the delta and returns the successor's answer,
    or says why there is none.
    """

    def exchange(self, answer: Callable[[socket.socket, Any], None]) -> Any:
        peer = _Peer(answer)
        self.addCleanup(peer.close)
        try:
            return commitBlocking(peer.ours, {"changes": [], "withdrawn": [3]}, 5.0)
        finally:
            self.assertEqual(peer.received, [{"changes": [], "withdrawn": [3]}])

    def test_parts(self) -> None:
        """
        A streamed freeze's parts go first, in order, each made only when
        its turn comes; then the last message, made (given as a callable)
        once every part is sent; then the answer comes back.
        """
        made: list[Any] = []

        def parts() -> Any:
            for upTo in (2, 4):
                made.append(upTo)
                yield {"changes": [], "withdrawn": [], "more": True, "upTo": upTo}

        def last() -> Any:
            made.append("last")
            return {"changes": [], "withdrawn": [5]}

        peer = _Peer(lambda sock, _: sock.sendall(_frame(b'{"pid":8}')))
        self.addCleanup(peer.close)
        answer = commitBlocking(peer.ours, last, 5.0, parts=parts())
        self.assertEqual(answer, {"pid": 8})
        self.assertEqual(made, [2, 4, "last"])
        peer.close()
        self.assertEqual(
            [(each.get("upTo"), each["withdrawn"]) for each in peer.received],
            [(2, []), (4, []), (None, [5])],
        )

    def test_committed(self) -> None:
        """
        The successor's C{pid} comes back.
        """
        answer = self.exchange(lambda sock, _: sock.sendall(_frame(b'{"pid":42}')))
        self.assertEqual(answer, {"pid": 42})

    def test_refused(self) -> None:
        """
        A refusal is raised with its reason and the connection it names.
        """
        error = self.assertRaises(
            FreezeFailed,
            self.exchange,
            lambda sock, _: sock.sendall(
                _frame(b'{"refused":"the new code refused connection 7","id":7}')
            ),
        )
        self.assertEqual(
            (str(error), error.ident), ("the new code refused connection 7", 7)
        )

    def test_closed(self) -> None:
        """
        A successor that dies before answering: the channel closed.
        """

        def close(sock: socket.socket, message: Any) -> None:
            sock.shutdown(socket.SHUT_RDWR)

        error = self.assertRaises(FreezeFailed, self.exchange, close)
        self.assertEqual(str(error), "the hand-off channel closed while committing")

    def test_malformed(self) -> None:
        """
        An answer that is not a process id or a refusal is refused.
        """
        for bad in (b"[1]", b'{"pid":"42"}', b"{not json"):
            error = self.assertRaises(
                FreezeFailed,
                self.exchange,
                lambda sock, _, bad=bad: sock.sendall(_frame(bad)),
            )
            self.assertIn("unreadable answer", str(error))

    def test_timeout(self) -> None:
        """
        No answer within the timeout: it says so (the caller ends the
        successor).
        """
        peer = _Peer(lambda sock, _: None)
        self.addCleanup(peer.close)
        error = self.assertRaises(
            FreezeFailed, commitBlocking, peer.ours, {"changes": []}, 0.2
        )
        self.assertEqual(
            str(error), "successor did not answer within 0.2 s while committing"
        )

    def test_successorOutputRead(self) -> None:
        """
        While it waits, the old process keeps reading the successor's output
        pipes: a successor that writes more than a pipe holds before it
        answers (an application logging each connection it restores) is
        not left waiting for it.  What was read is handed on, in order.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.set_blocking(r, False)
        lines = b"".join(b"restored connection %d\n" % n for n in range(20000))
        self.assertGreater(len(lines), 4 * 65536)

        def answer(sock: socket.socket, message: Any) -> None:
            with os.fdopen(w, "wb") as output:
                output.write(lines)
            sock.sendall(_frame(b'{"pid":42}'))

        peer = _Peer(answer)
        self.addCleanup(peer.close)
        read: list[tuple[int, bytes]] = []
        result = commitBlocking(
            peer.ours,
            {"changes": [], "withdrawn": []},
            10.0,
            outputPipes={1: r},
            onOutput=lambda childFD, data: read.append((childFD, data)),
        )
        self.assertEqual(result, {"pid": 42})
        self.assertEqual({childFD for childFD, _ in read}, {1})
        received = b"".join(data for _, data in read)
        # The rest, if any, is still in the pipe for the reactor.
        while True:
            try:
                more = os.read(r, 65536)
            except BlockingIOError:
                break
            if not more:
                break
            received += more
        self.assertEqual(received, lines)

    def test_unencodable(self) -> None:
        """
        A delta that is not JSON is refused before anything is sent.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.assertRaises(FreezeFailed, commitBlocking, ours, {"x": float("nan")}, 1)
        theirs.setblocking(False)
        self.assertRaises(BlockingIOError, theirs.recv, 1)


class LateAnswerTests(SynchronousTestCase):
    """
    L{lateAnswer} finds an answer that came just as the wait ended.
    """

    def test_answerOrNothing(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.assertIsNone(lateAnswer(ours))
        theirs.sendall(_frame(b'{"pid":9}'))
        self.assertEqual(lateAnswer(ours), {"pid": 9})
        theirs.sendall(_frame(b"[not an answer"))
        self.assertIsNone(lateAnswer(ours))


class FreezeReceiverTests(SynchronousTestCase):
    """
    L{FreezeReceiver} hands the one delta to its commit and answers.
    """

    def receive(self, data: bytes, commit: Callable[[Any, Any], Any]) -> Any:
        receiver = FreezeReceiver(commit)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(_frame(data))
        written = transport.value()
        (size,) = struct.unpack("!I", written[:4])
        self.assertEqual(len(written), 4 + size)
        return json.loads(written[4:])

    def test_answer(self) -> None:
        """
        The commit's answer is sent back.
        """
        seen: list[Any] = []

        def commit(delta: Any, answerNow: Any) -> Any:
            seen.append(delta)
            return {"pid": 5}

        answer = self.receive(b'{"changes":[],"withdrawn":[]}', commit)
        self.assertEqual(
            (seen, answer), ([{"changes": [], "withdrawn": []}], {"pid": 5})
        )

    def test_refusal(self) -> None:
        """
        An exception from the commit is answered as a refusal, with the
        connection it names.
        """

        def refuse(delta: Any, answerNow: Any) -> Any:
            error = ValueError("no such thing")
            error.ident = 9  # type: ignore[attr-defined]
            raise error

        self.assertEqual(
            self.receive(b"{}", refuse), {"refused": "no such thing", "id": 9}
        )

    def test_malformed(self) -> None:
        """
        A delta that is not JSON, or holds C{NaN}, is refused without
        calling the commit.
        """
        for bad in (b"{nope", b'{"x":NaN}'):
            answer = self.receive(bad, lambda delta, answerNow: self.fail("called"))
            self.assertIn("the freeze message is not JSON", answer["refused"])

    def test_answeredBeforeServing(self) -> None:
        """
        A commit that answers as it starts serving is answered once, then; a
        failure after that is logged, never answered as a refusal.
        """

        def commit(delta: Any, answerNow: Any) -> Any:
            answerNow({"pid": 7})
            raise RuntimeError("after the answer")

        self.assertEqual(self.receive(b"{}", commit), {"pid": 7})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_once(self) -> None:
        """
        A second message is ignored: one freeze, one commit.
        """
        calls: list[Any] = []

        def commit(delta: Any, answerNow: Any) -> Any:
            calls.append(delta)
            return {"pid": 1}

        receiver = FreezeReceiver(commit)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(_frame(b"{}") + _frame(b"{}"))
        self.assertEqual(len(calls), 1)

    def test_inPieces(self) -> None:
        """
        A delta that arrives a few bytes at a time, its length prefix split
        too, is read whole and committed once, when its last byte comes.
        """
        calls: list[Any] = []

        def commit(delta: Any, answerNow: Any) -> Any:
            calls.append(delta)
            return {"pid": 3}

        receiver = FreezeReceiver(commit)
        transport = StringTransport()
        receiver.makeConnection(transport)
        changes = [{"id": n, "output": "x" * 50} for n in range(200)]
        data = _frame(json.dumps({"changes": changes, "withdrawn": [1]}).encode())
        for start in range(0, len(data), 3):
            self.assertEqual(calls, [])
            receiver.dataReceived(data[start : start + 3])
        self.assertEqual(calls, [{"changes": changes, "withdrawn": [1]}])
        self.assertEqual(json.loads(transport.value()[4:]), {"pid": 3})

    def test_parts(self) -> None:
        """
        With a C{part} callable, each message saying C{"more": true} goes to
        it, in order, whether the messages come together or a few bytes at
        a time; the first that does not goes to the commit, which answers.
        """
        data = (
            _frame(b'{"changes":[],"withdrawn":[],"more":true,"upTo":2}')
            + _frame(b'{"changes":[],"withdrawn":[],"more":true,"upTo":4}')
            + _frame(b'{"changes":[],"withdrawn":[]}')
        )
        for piece in (len(data), 5):
            events: list[Any] = []

            def commit(delta: Any, answerNow: Any) -> Any:
                events.append(("commit", delta))
                return {"pid": 4}

            receiver = FreezeReceiver(
                commit, lambda delta: events.append(("part", delta["upTo"]))
            )
            transport = StringTransport()
            receiver.makeConnection(transport)
            for start in range(0, len(data), piece):
                self.assertEqual(transport.value(), b"")
                receiver.dataReceived(data[start : start + piece])
            self.assertEqual(
                events,
                [
                    ("part", 2),
                    ("part", 4),
                    ("commit", {"changes": [], "withdrawn": []}),
                ],
            )
            self.assertEqual(json.loads(transport.value()[4:]), {"pid": 4})

    def test_partRefused(self) -> None:
        """
        A part its callable refuses is answered at once, with the reason
        and the connection it names; what follows, the last part included,
        is ignored: nothing commits.
        """

        class Refused(Exception):
            ident = 7

        def part(delta: Any) -> None:
            raise Refused("the new code refused connection 7")

        receiver = FreezeReceiver(lambda delta, answerNow: self.fail("committed"), part)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(
            _frame(b'{"changes":[],"withdrawn":[],"more":true,"upTo":2}')
        )
        answered = transport.value()
        self.assertEqual(
            json.loads(answered[4:]),
            {"refused": "the new code refused connection 7", "id": 7},
        )
        receiver.dataReceived(_frame(b'{"changes":[],"withdrawn":[]}'))
        self.assertEqual(transport.value(), answered)

    def test_tooLong(self) -> None:
        """
        A length over L{FreezeReceiver.MAX_LENGTH} closes the channel
        without committing, and what follows is ignored.
        """
        receiver = FreezeReceiver(lambda delta, answerNow: self.fail("called"))
        receiver.MAX_LENGTH = 10
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(_frame(b"[" + b"1," * 10 + b"1]"))
        receiver.dataReceived(b"more")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class SendLiveDescriptorsTests(TestCase):
    """
    L{sendLiveDescriptors} sends, from the reactor thread, what
    L{receiveDescriptors} receives.
    """

    @inlineCallbacks
    def test_batchesAndStandIns(self) -> Any:
        """
        Descriptors go in batches of at most 253, looked up as they go; a
        source with none (its connection closed) sends a stand-in that is
        not a socket.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        pairs = [socket.socketpair() for _ in range(300)]
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)

        def none() -> int | None:
            return None

        sources: list[Callable[[], int | None]] = [a.fileno for a, _ in pairs]
        sources[270] = none
        received: list[int] = []
        thread = threading.Thread(
            target=lambda: received.extend(
                receiveDescriptors(theirs, len(sources), timeout=10)
            ),
            daemon=True,
        )
        thread.start()
        yield sendLiveDescriptors(reactor, ours, sources, timeout=10)
        thread.join(10)
        for fd in received:
            self.addCleanup(os.close, fd)
        self.assertEqual(len(received), 300)
        # Each arrived in its place: the same socket (inode) as sent.
        sent = [os.fstat(a.fileno()).st_ino for a, _ in pairs]
        got = [os.fstat(fd).st_ino for fd in received]
        self.assertEqual(got[:270] + got[271:], sent[:270] + sent[271:])
        self.assertEqual(got[270], os.stat(os.devnull).st_ino)

    @inlineCallbacks
    def test_failingSource(self) -> Any:
        """
        A source that raises fails the transfer with
        L{DescriptorTransferError}; it never hangs.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)

        def broken() -> int | None:
            raise RuntimeError("no such connection")

        with self.assertRaises(DescriptorTransferError):
            yield sendLiveDescriptors(reactor, ours, [broken], timeout=5)

    @inlineCallbacks
    def test_peerGone(self) -> Any:
        """
        A peer that closed its end fails the transfer with
        L{DescriptorTransferError}.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        theirs.close()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        with self.assertRaises(DescriptorTransferError):
            yield sendLiveDescriptors(reactor, ours, [a.fileno], timeout=5)
