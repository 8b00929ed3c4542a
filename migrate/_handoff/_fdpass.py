"""
Moving file descriptors and bulk bytes between processes.

Two blocking helpers move descriptors over a Unix socket with C{SCM_RIGHTS}
in batches (L{sendDescriptors}, L{receiveDescriptors}); two more carry a
large blob of bytes in an anonymous memory file that travels as one
descriptor (L{writeMemfd}, L{readMemfd}).  Those may block, so callers run
them in a thread (C{deferToThread}) on a socket nobody else reads or writes
meanwhile, never on a socket the reactor watches.  A transfer that fits one
message, on a socket ready for it now, needs no thread: L{sendDescriptorsNow}
and L{receiveDescriptorsNow} move it without waiting, or say they cannot.

The kernel accepts at most L{SCM_MAX_FD} descriptors in one message, so a
batch carries at most that many, each with a small header naming the total
and the batch size: the receiver checks both, and notices descriptors the
kernel dropped (C{MSG_CTRUNC}, for example when the receiver is out of
descriptors) instead of waiting forever for them.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import struct
import time
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred

__all__ = [
    "SCM_MAX_FD",
    "sendLiveDescriptors",
    "DescriptorTransferError",
    "sendDescriptors",
    "sendDescriptorsNow",
    "receiveDescriptors",
    "receiveDescriptorsNow",
    "writeMemfd",
    "readMemfd",
]

SCM_MAX_FD = 253
"""
The most descriptors Linux accepts in one C{SCM_RIGHTS} message (254 gives
C{EINVAL}).
"""

_MAGIC = b"MGFD"
_HEADER = struct.Struct("!4sII")
"""
Sent with each batch: magic, total number of descriptors in the transfer,
number of descriptors attached to this message.
"""

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_RECEIVE_FLAGS = socket.MSG_DONTWAIT | _CMSG_CLOEXEC
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_SEALS = (
    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
)


class DescriptorTransferError(Exception):
    """
    Descriptors or bytes could not be moved: the peer went away, the
    deadline passed, the kernel truncated the ancillary data, or what
    arrived is not what was announced.  No descriptor received during the
    failed call is left open.
    """


def _waitFor(sock: socket.socket, event: int, deadline: float, what: str) -> None:
    """
    Block until C{sock} is ready for C{event} or C{deadline} passes.

    @raise DescriptorTransferError: when the deadline passes first.
    """
    poller = select.poll()
    poller.register(sock.fileno(), event)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DescriptorTransferError(f"timed out {what}")
        # Round up so a short remaining time does not become a busy 0 ms poll.
        if poller.poll(remaining * 1000 + 1):
            return


def _closeAll(fds: Iterable[int]) -> None:
    """
    Close every descriptor in C{fds}, ignoring the ones already closed.
    """
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _sendSome(
    sock: socket.socket, data: bytes, ancillary: list, deadline: float
) -> int:
    """
    Send C{data} (and C{ancillary}, all or nothing) in one C{sendmsg},
    waiting for room until C{deadline}.

    @return: how many bytes of C{data} went out.
    """
    while True:
        _waitFor(sock, select.POLLOUT, deadline, "sending descriptors")
        try:
            return sock.sendmsg([data], ancillary, _SEND_FLAGS)
        except BlockingIOError:
            continue
        except OSError as e:
            raise DescriptorTransferError(f"sendmsg failed: {e}") from e


def sendDescriptors(sock: socket.socket, fds: Iterable[int], *, timeout: float) -> None:
    """
    Send descriptors over a Unix socket, at most L{SCM_MAX_FD} per message.

    The caller keeps its own copies open until the peer has confirmed it
    received them (the kernel holds references meanwhile) and closes them
    afterwards.  Nothing is sent for an empty C{fds}.

    @param sock: a connected C{AF_UNIX} socket.
    @param fds: the descriptors, in the order the receiver gets them.
    @param timeout: seconds allowed for the whole transfer.

    @raise DescriptorTransferError: if the deadline passes or the socket
        fails (the peer may then hold part of the descriptors).
    """
    fds = [int(fd) for fd in fds]
    deadline = time.monotonic() + timeout
    total = len(fds)
    for start in range(0, total, SCM_MAX_FD):
        batch = fds[start : start + SCM_MAX_FD]
        header = _HEADER.pack(_MAGIC, total, len(batch))
        ancillary = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch).tobytes())
        ]
        sent = _sendSome(sock, header, ancillary, deadline)
        # A stream socket may take part of the header: the descriptors went
        # with the first byte, the rest of the header follows alone.
        while sent < len(header):
            sent += _sendSome(sock, header[sent:], [], deadline)


def sendLiveDescriptors(
    reactor: Any,
    sock: socket.socket,
    sources: Sequence[Callable[[], int | None]],
    *,
    timeout: float,
) -> Deferred[None]:
    """
    Send the descriptors of connections this process goes on serving, as
    L{sendDescriptors} does (the receiver uses L{receiveDescriptors}), but
    from the reactor thread, one message per reactor turn.

    Each message's descriptors are looked up just before it goes, in the
    thread that closes them: a connection that closed meanwhile cannot
    send a closed descriptor, or worse, the number a new connection was
    just given.  A source that returns L{None} (its connection closed)
    sends C{/dev/null} in its place, which the receiver finds is not a
    socket.

    @param reactor: the reactor (C{IReactorTime}).
    @param sock: a connected C{AF_UNIX} socket, made non-blocking here.
    @param sources: one callable per descriptor, in order.
    @param timeout: seconds allowed for the whole transfer.

    @return: a L{Deferred} firing once every message went out, or failing
        with L{DescriptorTransferError} (the peer may then hold part of
        them).
    """
    done: Deferred[None] = Deferred()
    total = len(sources)
    if not total:
        done.callback(None)
        return done
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    position = 0
    unsent = b""

    def finish(error: BaseException | None) -> None:
        os.close(placeholder)
        if error is None:
            done.callback(None)
        else:
            done.errback(error)

    def step() -> None:
        nonlocal position, unsent
        try:
            if time.monotonic() > deadline:
                raise DescriptorTransferError("timed out sending descriptors")
            if unsent:
                unsent = unsent[sock.send(unsent, _SEND_FLAGS) :]
            elif position < total:
                batch = [
                    placeholder if fd is None else fd
                    for fd in (
                        source() for source in sources[position : position + SCM_MAX_FD]
                    )
                ]
                header = _HEADER.pack(_MAGIC, total, len(batch))
                ancillary = [
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_RIGHTS,
                        array.array("i", batch).tobytes(),
                    )
                ]
                sent = sock.sendmsg([header], ancillary, _SEND_FLAGS)
                position += len(batch)
                unsent = header[sent:]
        except BlockingIOError:
            # The receiver has not caught up: look again a little later
            # rather than spin.
            reactor.callLater(0.001, step)
            return
        except DescriptorTransferError as e:
            finish(e)
            return
        except OSError as e:
            finish(DescriptorTransferError(f"sendmsg failed: {e}"))
            return
        except Exception as e:
            # A source that failed: the transfer fails, it never hangs.
            finish(DescriptorTransferError(f"looking up a descriptor failed: {e!r}"))
            return
        if position >= total and not unsent:
            finish(None)
            return
        reactor.callLater(0, step)

    step()
    return done


def _readyNow(sock: socket.socket, event: int) -> bool:
    """
    Is C{sock} ready for C{event} now, without waiting?
    """
    poller = select.poll()
    poller.register(sock.fileno(), event)
    return bool(poller.poll(0))


def sendDescriptorsNow(
    sock: socket.socket, fds: Sequence[int], *, timeout: float
) -> bool:
    """
    Send descriptors as L{sendDescriptors} does, from the calling thread,
    if they fit one message and the socket has room for it now (a fresh
    socketpair always has: the message is a few bytes).

    A thread would cost more than the transfer: on a busy process, each
    hand-over between the threads waits for the interpreter's switch
    interval (5 ms), and a few connections accepted after a pre-copy
    waited 6 to 30 ms so.

    @param timeout: seconds allowed, should the socket take only part of
        the message's bytes (the descriptors go with the first).

    @return: whether they were sent; if not, nothing was, and the caller
        uses L{sendDescriptors} in a thread.

    @raise DescriptorTransferError: as L{sendDescriptors}.
    """
    if len(fds) > SCM_MAX_FD or not _readyNow(sock, select.POLLOUT):
        return False
    sendDescriptors(sock, fds, timeout=timeout)
    return True


def receiveDescriptorsNow(
    sock: socket.socket, count: int, *, timeout: float
) -> list[int] | None:
    """
    Receive descriptors as L{receiveDescriptors} does, from the calling
    thread, if the peer announced at most one message's worth and its
    message has arrived (L{sendDescriptorsNow} sends before it announces).

    @param timeout: seconds allowed, should only part of the message's
        bytes have arrived.

    @return: the descriptors; or L{None}, having read nothing, if they are
        more than one message carries or have not arrived yet: the caller
        then uses L{receiveDescriptors} in a thread.

    @raise DescriptorTransferError: as L{receiveDescriptors}.
    """
    if count > SCM_MAX_FD:
        return None
    if count > 0 and not _readyNow(sock, select.POLLIN):
        return None
    return receiveDescriptors(sock, count, timeout=timeout)


def _receiveSome(
    sock: socket.socket, size: int, deadline: float, received: list[int]
) -> bytes:
    """
    Receive up to C{size} bytes and whatever descriptors come with them.

    Descriptors are appended to C{received} I{before} anything is checked,
    so that the caller closes them on any failure.

    @raise DescriptorTransferError: on timeout, end of file, socket error or
        truncated ancillary data.
    """
    while True:
        _waitFor(sock, select.POLLIN, deadline, "receiving descriptors")
        try:
            data, ancillary, flags, _ = sock.recvmsg(
                size, _ANCILLARY_SPACE, _RECEIVE_FLAGS
            )
        except BlockingIOError:
            continue
        except OSError as e:
            raise DescriptorTransferError(f"recvmsg failed: {e}") from e
        break
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            received.extend(fds)
            if not _CMSG_CLOEXEC:
                for fd in fds:
                    os.set_inheritable(fd, False)
    if flags & socket.MSG_CTRUNC:
        raise DescriptorTransferError(
            "the kernel truncated the descriptors (MSG_CTRUNC): "
            "the receiver is probably out of descriptors (RLIMIT_NOFILE)"
        )
    if not data:
        raise DescriptorTransferError("the peer closed the socket")
    return data


def receiveDescriptors(sock: socket.socket, count: int, *, timeout: float) -> list[int]:
    """
    Receive exactly C{count} descriptors sent by L{sendDescriptors}.

    The descriptors come close-on-exec and belong to the caller.

    @param sock: a connected C{AF_UNIX} socket.
    @param count: how many descriptors the peer announced.
    @param timeout: seconds allowed for the whole transfer.

    @return: the descriptors, in the order they were sent.

    @raise DescriptorTransferError: on timeout, end of file, truncation
        (C{MSG_CTRUNC}), a malformed header or a count other than C{count};
        every descriptor received so far is closed first.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    if count == 0:
        return []
    deadline = time.monotonic() + timeout
    received: list[int] = []
    try:
        while len(received) < count:
            before = len(received)
            header = b""
            while len(header) < _HEADER.size:
                header += _receiveSome(
                    sock, _HEADER.size - len(header), deadline, received
                )
            magic, total, batch = _HEADER.unpack(header)
            if magic != _MAGIC:
                raise DescriptorTransferError(f"not a descriptor batch: {header!r}")
            if total != count:
                raise DescriptorTransferError(
                    f"expected {count} descriptors, the peer sends {total}"
                )
            arrived = len(received) - before
            if arrived != batch or batch > SCM_MAX_FD or len(received) > count:
                raise DescriptorTransferError(
                    f"batch announced {batch} descriptors, {arrived} arrived"
                )
        return received
    except BaseException:
        _closeAll(received)
        raise


def writeMemfd(data: bytes, name: str, *, inheritable: bool = False) -> int:
    """
    Put C{data} in a new anonymous memory file, sealed against change.

    @param data: the bytes.
    @param name: a label for debugging (C{/proc/PID/fd} shows it).
    @param inheritable: C{True} for a file that must survive C{exec}.

    @return: the descriptor, positioned at offset 0; the caller closes it.
    """
    flags = os.MFD_ALLOW_SEALING
    if not inheritable:
        flags |= os.MFD_CLOEXEC
    fd = os.memfd_create(name, flags)
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], written)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.set_inheritable(fd, inheritable)
    except BaseException:
        os.close(fd)
        raise
    return fd


def readMemfd(fd: int, *, maxBytes: int) -> bytes:
    """
    Read a whole file from offset 0, refusing one larger than C{maxBytes}.

    The file position is left alone (it is shared with every other holder)
    and the descriptor stays open.

    @param fd: a descriptor from L{writeMemfd}, typically received from
        another process.
    @param maxBytes: the largest acceptable size.

    @return: the file's contents.

    @raise DescriptorTransferError: if the file holds more than
        C{maxBytes} bytes or cannot be read.
    """
    try:
        size = os.fstat(fd).st_size
        if size > maxBytes:
            raise DescriptorTransferError(
                f"memory file holds {size} bytes, more than {maxBytes}"
            )
        chunks = []
        offset = 0
        while True:
            # Read one byte past the announced size to notice a file that
            # grew after fstat (possible for an unsealed file).
            want = min(maxBytes + 1 - offset, max(size - offset, 0) + 1)
            chunk = os.pread(fd, want, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            if offset > maxBytes:
                raise DescriptorTransferError(
                    f"memory file holds more than {maxBytes} bytes"
                )
    except OSError as e:
        raise DescriptorTransferError(f"cannot read memory file: {e}") from e
    return b"".join(chunks)
