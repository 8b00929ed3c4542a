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

import json
import socket
import struct
import time
from typing import Any, Callable

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from ..._codec import StateError, decodeState, encodeState

__all__ = [
    "FreezeFailed",
    "FreezeReceiver",
    "commitBlocking",
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

    def __init__(self, reason: str, ident: int | None = None) -> None:
        Exception.__init__(self, reason)
        self.ident = ident


def _receiveExactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks = []
    while count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        sock.settimeout(remaining)
        chunk = sock.recv(min(count, 65536))
        if not chunk:
            raise FreezeFailed("the hand-off channel closed while committing")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def commitBlocking(sock: socket.socket, delta: Any, timeout: float) -> dict[str, Any]:
    """
    Send the freeze's delta and wait for the successor's answer, blocking
    this process (its reactor included) for at most C{timeout} seconds.

    @param sock: the old process's end of the freeze socketpair.
    @param delta: plain data: what changed since the pre-copy.
    @param timeout: seconds.

    @return: the answer: C{{"pid": int}} when the successor serves.

    @raise FreezeFailed: if it refused (the message is its reason), closed
        the channel (it died), did not answer in time, or answered
        something malformed.
    """
    # Every state in it was checked as it was captured: encode it without
    # walking each one again (the clients are waiting).
    try:
        payload = json.dumps(
            delta, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")
    except (TypeError, ValueError) as e:
        raise FreezeFailed("cannot encode what changed: {}".format(e))
    if len(payload) > MAX_DELTA_BYTES:
        raise FreezeFailed(
            "what changed since the pre-copy is {} bytes, more than the {} a "
            "freeze carries".format(len(payload), MAX_DELTA_BYTES)
        )
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("!I", len(payload)) + payload)
        (size,) = struct.unpack("!I", _receiveExactly(sock, 4, deadline))
        if size > MAX_ANSWER_BYTES:
            raise FreezeFailed("the successor's answer is {} bytes".format(size))
        answer = decodeState(
            _receiveExactly(sock, size, deadline),
            maxBytes=MAX_ANSWER_BYTES,
            maxDepth=4,
        )
    except socket.timeout:
        raise FreezeFailed(
            "successor did not answer within {} s while committing".format(timeout)
        )
    except (ConnectionError, BrokenPipeError):
        raise FreezeFailed("the hand-off channel closed while committing")
    except StateError as e:
        raise FreezeFailed("unreadable answer from the successor: {}".format(e))
    if not isinstance(answer, dict):
        raise FreezeFailed("unreadable answer from the successor")
    refused = answer.get("refused")
    if refused is not None:
        ident = answer.get("id")
        raise FreezeFailed(str(refused), ident if type(ident) is int else None)
    if type(answer.get("pid")) is not int:
        raise FreezeFailed("unreadable answer from the successor")
    return answer


def _refuseConstant(name: str) -> Any:
    raise ValueError("{} is not plain data".format(name))


def _loadDelta(data: bytes) -> Any:
    """
    Read a freeze's delta.

    Not with the codec's strict decoder (L{decodeState}): its checks run
    in Python for every value, and here every client waits.  JSON's own
    parser, refusing C{NaN} and C{Infinity}, gives plain data within the
    interpreter's limits (its integer-digits limit, its recursion limit);
    every state in it is then checked as strictly as ever by
    L{migrate.state.ProtocolState.fromPlain}, the rest by the commit.
    Duplicate keys, which the codec refuses, are harmless here: the last
    one wins and is checked like any other.

    @raise StateError: if C{data} is not such JSON.
    """
    try:
        return json.loads(data, parse_constant=_refuseConstant)
    except (ValueError, RecursionError) as e:
        raise StateError("malformed freeze message: {}".format(e))


class FreezeReceiver(Int32StringReceiver):
    """
    The successor's end of the freeze socketpair: reads the one delta,
    hands it to C{commit}, and answers with what C{commit} returned.

    @ivar commit: called with the decoded delta; returns the answer (plain
        data).  An exception it raises is answered as a refusal.
    """

    MAX_LENGTH = MAX_DELTA_BYTES

    def __init__(self, commit: Callable[[Any], dict[str, Any]]) -> None:
        self.commit = commit
        self.answered = False

    def stringReceived(self, data: bytes) -> None:
        if self.answered:
            _log.warn("Ignoring a second freeze message")
            return
        self.answered = True
        try:
            delta = _loadDelta(data)
            answer = self.commit(delta)
        except Exception as e:
            answer = {"refused": (str(e) or type(e).__name__)[:500]}
            ident = getattr(e, "ident", None)
            if type(ident) is int:
                answer["id"] = ident
        self.sendString(encodeState(answer, maxBytes=MAX_ANSWER_BYTES, maxDepth=4))

    def lengthLimitExceeded(self, length: int) -> None:
        _log.warn("Refusing a freeze message of {length} bytes", length=length)
        if self.transport is not None:
            self.transport.loseConnection()


def listenForFreeze(
    reactor: Any, descriptor: int, commit: Callable[[Any], dict[str, Any]]
) -> FreezeReceiver:
    """
    Serve the successor's end of a freeze socketpair.

    @param reactor: an C{IReactorSocket} provider.
    @param descriptor: the socket's descriptor; the caller closes it (the
        reactor works on a duplicate).
    @param commit: see L{FreezeReceiver}.
    """
    receiver = FreezeReceiver(commit)
    reactor.adoptStreamConnection(
        descriptor, socket.AF_UNIX, Factory.forProtocol(lambda: receiver)
    )
    return receiver
