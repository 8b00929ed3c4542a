"""
The freeze of a pre-copied hand-off: one message and one answer over a
socketpair dedicated to it, while the old process's reactor stands still.

After the pre-copy (see L{migrate._handoff._precopy}) the old process needs
to stop every connection it hands over, send what changed, and learn that
the successor serves.  Freezing thousands of connections one by one costs
microseconds each; not running the reactor at all costs nothing.  So the old
process compares, sends the delta and waits for the answer in one blocking
step (L{commitBlocking}, bounded by the hand-off timeout): nothing reads or
writes any of its connections meanwhile.  If the successor serves, the old
process lets go of them before its reactor runs again; if it refuses, dies
or does not answer in time, nothing was touched and the old process simply
goes on.

Each message is a 4-byte big-endian length and that many bytes of JSON:
the answer is read with the codec's strict decoder, the delta with JSON's
own parser and then checked state by state (see L{_loadDelta}).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from typing import Any, Callable, Iterable, Mapping

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from ..._codec import (
    StateError,
    decodeState,
    encodeCheckedState,
    encodeState,
    loadCheckedJSON,
)
from ..._handoff._transport import writeNow

__all__ = [
    "FreezeFailed",
    "FreezeReceiver",
    "commitBlocking",
    "lateAnswer",
    "listenForFreeze",
    "MAX_DELTA_BYTES",
]

#: the largest delta a freeze carries (every connection changed, with
#: output): the same bound as a manifest
MAX_DELTA_BYTES = 512 * 1024 * 1024
#: the largest answer: a process id, or a refusal's reason
MAX_ANSWER_BYTES = 64 * 1024

_log = Logger()


class FreezeFailed(Exception):
    """
    The freeze did not end with the successor serving; the message says
    why.

    @ivar ident: the manifest number of the connection the successor
        refused, if it named one.
    """

    def __init__(
        self, reason: str, ident: int | None = None, timedOut: bool = False
    ) -> None:
        Exception.__init__(self, reason)
        self.ident = ident
        self.timedOut = timedOut


class _OutputDrain:
    """
    Keeps reading the successor's output pipes while the reactor stands
    still: a successor that logs more than a pipe holds (an application
    logging each connection it restores) would otherwise wait for this
    process, which waits for it.

    @ivar pipes: the read ends, by the successor's descriptor number.
    @ivar read: what was read, in order, for the caller to deliver.
    """

    def __init__(self, pipes: Mapping[int, int]) -> None:
        self.pipes = dict(pipes)
        self.read: list[tuple[int, bytes]] = []

    def wait(self, sock: socket.socket, event: int, deadline: float) -> None:
        """
        Wait until C{sock} is ready for C{event}, reading the pipes
        meanwhile.

        @raise socket.timeout: if C{deadline} passes first.
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            poller = select.poll()
            poller.register(sock.fileno(), event)
            byDescriptor = {fd: childFD for childFD, fd in self.pipes.items()}
            for fd in byDescriptor:
                poller.register(fd, select.POLLIN)
            ready = False
            for fd, events in poller.poll(max(1, int(remaining * 1000))):
                if fd == sock.fileno():
                    ready = True
                elif fd in byDescriptor:
                    self._readPipe(byDescriptor[fd], fd)
            if ready:
                return

    def _readPipe(self, childFD: int, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.read.append((childFD, data))
        else:
            # Closed: the reactor sees it too, later.
            del self.pipes[childFD]


def _receiveExactly(
    sock: socket.socket, count: int, deadline: float, drain: _OutputDrain
) -> bytes:
    chunks = []
    while count:
        drain.wait(sock, select.POLLIN, deadline)
        try:
            chunk = sock.recv(min(count, 65536))
        except BlockingIOError:
            continue
        if not chunk:
            raise FreezeFailed("the hand-off channel closed while committing")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _sendAll(
    sock: socket.socket, data: bytes, deadline: float, drain: _OutputDrain
) -> None:
    view = memoryview(data)
    while view:
        drain.wait(sock, select.POLLOUT, deadline)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]


def _encodeDelta(delta: Any) -> bytes:
    # Every state in it was checked as it was captured: encode it without
    # walking each one again (the clients are waiting).
    try:
        payload = encodeCheckedState(delta, maxBytes=MAX_DELTA_BYTES)
    except StateError as e:
        raise FreezeFailed("what changed since the pre-copy: {}".format(e))
    return struct.pack("!I", len(payload)) + payload


def commitBlocking(
    sock: socket.socket,
    delta: Any,
    timeout: float,
    outputPipes: Mapping[int, int] | None = None,
    onOutput: Callable[[int, bytes], None] = lambda childFD, data: None,
    parts: Iterable[Any] = (),
) -> dict[str, Any]:
    """
    Send the freeze's delta and wait for the successor's answer, blocking
    this process (its reactor included) for at most C{timeout} seconds,
    reading the successor's output pipes meanwhile.

    @param sock: the old process's end of the freeze socketpair.
    @param delta: plain data: what changed since the pre-copy (the last
        part, when there are C{parts}); or a callable returning it, called
        once every part is sent.
    @param parts: the parts of a streamed freeze before the last (see
        L{FreezeReceiver}), each sent as soon as the iteration makes it, so
        that the successor restores the connections of one while this
        process compares those of the next.
    @param timeout: seconds.
    @param outputPipes: the successor's output pipes to keep reading, by
        its descriptor number (see
        L{migrate._handoff._successor.SuccessorProcess.outputPipes}).
    @param onOutput: called, once the wait is over, with everything read
        from them, in order.

    @return: the answer: C{{"pid": int}} when the successor serves.

    @raise FreezeFailed: if it refused (the message is its reason), closed
        the channel (it died), did not answer in time, or answered
        something malformed.
    """
    deadline = time.monotonic() + timeout
    drain = _OutputDrain(outputPipes or {})
    try:
        sock.setblocking(False)
        for part in parts:
            _sendAll(sock, _encodeDelta(part), deadline, drain)
        _sendAll(
            sock, _encodeDelta(delta() if callable(delta) else delta), deadline, drain
        )
        (size,) = struct.unpack("!I", _receiveExactly(sock, 4, deadline, drain))
        if size > MAX_ANSWER_BYTES:
            raise FreezeFailed("the successor's answer is {} bytes".format(size))
        answer = decodeState(
            _receiveExactly(sock, size, deadline, drain),
            maxBytes=MAX_ANSWER_BYTES,
            maxDepth=4,
        )
    except socket.timeout:
        raise FreezeFailed(
            "successor did not answer within {} s while committing".format(timeout),
            timedOut=True,
        )
    except (ConnectionError, BrokenPipeError):
        raise FreezeFailed("the hand-off channel closed while committing")
    except StateError as e:
        raise FreezeFailed("unreadable answer from the successor: {}".format(e))
    finally:
        for childFD, data in drain.read:
            onOutput(childFD, data)
    if not isinstance(answer, dict):
        raise FreezeFailed("unreadable answer from the successor")
    refused = answer.get("refused")
    if refused is not None:
        ident = answer.get("id")
        raise FreezeFailed(str(refused), ident if type(ident) is int else None)
    if type(answer.get("pid")) is not int:
        raise FreezeFailed("unreadable answer from the successor")
    return answer


def _loadDelta(data: bytes) -> Any:
    """
    Read a freeze's delta, with L{loadCheckedJSON}: every state in it is
    then checked as strictly as ever by
    L{migrate.state.ProtocolState.fromPlain}, the rest by the commit.

    @raise StateError: if C{data} is not such JSON.
    """
    return loadCheckedJSON(data, "freeze message")


def lateAnswer(sock: socket.socket) -> dict[str, Any] | None:
    """
    The successor's answer, if it is waiting on C{sock} after all (it came
    just as the wait ended): whether the successor had begun to serve.
    Never blocks.
    """
    try:
        sock.setblocking(False)
        header = sock.recv(4, socket.MSG_PEEK)
        if len(header) < 4:
            return None
        (size,) = struct.unpack("!I", header)
        if size > MAX_ANSWER_BYTES:
            return None
        data = sock.recv(4 + size)
        answer = decodeState(data[4:], maxBytes=MAX_ANSWER_BYTES, maxDepth=4)
    except (OSError, StateError, struct.error):
        return None
    return answer if isinstance(answer, dict) else None


class FreezeReceiver(Protocol):
    """
    The successor's end of the freeze socketpair: reads the delta (each
    message a 32-bit length, then that many bytes), hands it to C{commit},
    and answers.

    A streamed freeze sends the delta in parts, in the order the old
    process compares its connections: each part but the last says
    C{"more": true} and goes to C{part} (which restores the connections it
    covers while the old process compares the next ones); the last goes to
    C{commit}.  Without a C{part} callable, every message is taken for the
    whole delta.

    Each message is collected in a list of chunks and joined once, not
    appended to one growing string as C{Int32StringReceiver} does: a delta
    carrying megabytes of output a client had not read arrives in hundreds
    of reads, and copying everything received so far at each of them took
    seconds while every client of the old process waited.

    @ivar commit: called with the decoded delta and L{answerNow}; it either
        calls L{answerNow} once it serves, I{before} it reads any
        connection, or returns the answer (plain data) to send.  An
        exception it raises before answering is answered as a refusal.
    @ivar part: called with each decoded part before the last, or L{None};
        an exception it raises is answered as a refusal at once, and what
        follows is ignored.
    """

    MAX_LENGTH = MAX_DELTA_BYTES

    def __init__(
        self,
        commit: Callable[[Any, Callable[[dict[str, Any]], None]], Any],
        part: Callable[[Any], None] | None = None,
    ) -> None:
        self.commit = commit
        self.part = part
        self.answered = False
        self._received = False
        self._chunks: list[bytes] = []
        self._have = 0
        self._length: int | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._received:
            if not self.answered:
                _log.warn("Ignoring a second freeze message")
            return
        self._chunks.append(data)
        self._have += len(data)
        while not self._received:
            if self._length is None:
                if self._have < 4:
                    return
                head = b"".join(self._chunks)
                (self._length,) = struct.unpack("!I", head[:4])
                self._chunks = [head[4:]]
                self._have -= 4
                if self._length > self.MAX_LENGTH:
                    self._received = True
                    self._chunks = []
                    self.lengthLimitExceeded(self._length)
                    return
            if self._have < self._length:
                return
            joined = b"".join(self._chunks)
            message, rest = joined[: self._length], joined[self._length :]
            self._chunks = [rest] if rest else []
            self._have = len(rest)
            self._length = None
            self.stringReceived(message)
        if self._chunks and not self.answered:
            _log.warn("Ignoring what follows the freeze message")
        self._chunks = []

    def stringReceived(self, data: bytes) -> None:
        if self._received:
            _log.warn("Ignoring a second freeze message")
            return
        try:
            delta = _loadDelta(data)
            if (
                self.part is not None
                and isinstance(delta, dict)
                and delta.get("more") is True
            ):
                self.part(delta)
                return
            self._received = True
            answer = self.commit(delta, self.answerNow)
        except Exception as e:
            self._received = True
            if self.answered:
                _log.failure("Serving after the commit failed")
                return
            answer = {"refused": (str(e) or type(e).__name__)[:500]}
            ident = getattr(e, "ident", None)
            if type(ident) is int:
                answer["id"] = ident
        if not self.answered:
            self.answerNow(answer)

    def answerNow(self, answer: dict[str, Any]) -> None:
        """
        Send C{answer} at once, with one C{send()} where the socket takes
        it, not on the reactor's next turn: the successor says it serves
        before it reads any connection, so that an old process whose wait
        ended just then finds the answer.  Only the first answer is sent.
        """
        if self.answered:
            return
        self.answered = True
        data = encodeState(answer, maxBytes=MAX_ANSWER_BYTES, maxDepth=4)
        writeNow(self.transport, struct.pack("!I", len(data)) + data)

    def lengthLimitExceeded(self, length: int) -> None:
        _log.warn("Refusing a freeze message of {length} bytes", length=length)
        if self.transport is not None:
            self.transport.loseConnection()


def listenForFreeze(
    reactor: Any,
    descriptor: int,
    commit: Callable[[Any, Callable[[dict[str, Any]], None]], Any],
    part: Callable[[Any], None] | None = None,
) -> FreezeReceiver:
    """
    Serve the successor's end of a freeze socketpair.

    @param reactor: an C{IReactorSocket} provider.
    @param descriptor: the socket's descriptor; the caller closes it (the
        reactor works on a duplicate).
    @param commit: see L{FreezeReceiver}.
    @param part: see L{FreezeReceiver}.
    """
    receiver = FreezeReceiver(commit, part)
    reactor.adoptStreamConnection(
        descriptor, socket.AF_UNIX, Factory.forProtocol(lambda: receiver)
    )
    return receiver
