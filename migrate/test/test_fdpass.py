"""
Tests for L{migrate._handoff._fdpass}: batched descriptor passing and memory files,
over real Unix socketpairs.
"""

from __future__ import annotations

import array
import errno
import os
import resource
import socket
import time
from typing import Any, Callable, cast

from twisted.trial.unittest import SynchronousTestCase

from migrate._handoff._fdpass import (
    SCM_MAX_FD,
    DescriptorTransferError,
    readMemfd,
    receiveDescriptors,
    receiveDescriptorsNow,
    sendDescriptors,
    sendDescriptorsNow,
    writeMemfd,
)

_TIMEOUT = 5.0


def _openDescriptors() -> set[int]:
    """
    The descriptors this process has open.
    """
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _identity(fd: int) -> tuple[int, int]:
    """
    What a descriptor refers to, comparable across duplicates.
    """
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _CountingSocket:
    """
    A real socket that records the number of descriptors attached to each
    C{sendmsg} call.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.batches: list[int] = []

    def fileno(self) -> int:
        return self._sock.fileno()

    def sendmsg(self, buffers, ancillary=(), flags=0):
        count = 0
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count += len(data) // array.array("i").itemsize
        self.batches.append(count)
        return self._sock.sendmsg(buffers, ancillary, flags)


class _SocketpairTestCase(SynchronousTestCase):
    """
    A connected Unix socketpair, and descriptors to send over it.
    """

    def setUp(self) -> None:
        self.sender, self.receiver = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM
        )
        self.addCleanup(self.sender.close)
        self.addCleanup(self.receiver.close)

    def pipes(self, count: int) -> list[int]:
        """
        Open C{count} descriptors (pipe ends) closed at cleanup.
        """
        fds: list[int] = []
        while len(fds) < count:
            fds.extend(os.pipe())
        for extra in fds[count:]:
            os.close(extra)
        fds = fds[:count]
        self.addCleanup(self.closeAll, fds)
        return fds

    def closeAll(self, fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def assertWrongTotalRefused(
        self, receive: Callable[..., Any], sent: int, expected: int
    ) -> None:
        """
        C{receive}, expecting C{expected} descriptors when C{sent} were
        sent, refuses them, saying why, and leaves none open.
        """
        sendDescriptors(self.sender, self.pipes(sent), timeout=_TIMEOUT)
        before = _openDescriptors()
        error = self.assertRaises(
            DescriptorTransferError,
            receive,
            self.receiver,
            expected,
            timeout=_TIMEOUT,
        )
        self.assertIn(
            "expected {} descriptors, the peer sends {}".format(expected, sent),
            str(error),
        )
        self.assertNoneLeaked(before)

    def assertNoneLeaked(self, before: set[int]) -> None:
        """
        No descriptor stayed open beyond C{before}.
        """
        self.assertEqual(_openDescriptors() - before, set())


class DescriptorPassingTests(_SocketpairTestCase):
    """
    L{sendDescriptors} and L{receiveDescriptors}.
    """

    def test_roundTrip(self) -> None:
        """
        Descriptors arrive in order, refer to the same files, and are
        close-on-exec.
        """
        fds = self.pipes(3)
        sendDescriptors(self.sender, fds, timeout=_TIMEOUT)
        received = receiveDescriptors(self.receiver, 3, timeout=_TIMEOUT)
        self.addCleanup(self.closeAll, received)
        self.assertEqual(
            [_identity(fd) for fd in received], [_identity(fd) for fd in fds]
        )
        self.assertEqual(set(received) & set(fds), set())
        self.assertEqual([os.get_inheritable(fd) for fd in received], [False] * 3)

    def test_batches(self) -> None:
        """
        600 descriptors travel in three messages of at most L{SCM_MAX_FD}.
        """
        self.assertEqual(SCM_MAX_FD, 253)
        fds = self.pipes(600)
        counting = _CountingSocket(self.sender)
        sendDescriptors(cast(Any, counting), fds, timeout=_TIMEOUT)
        received = receiveDescriptors(self.receiver, 600, timeout=_TIMEOUT)
        self.addCleanup(self.closeAll, received)
        self.assertEqual(counting.batches, [253, 253, 94])
        self.assertEqual(
            [_identity(fd) for fd in received], [_identity(fd) for fd in fds]
        )

    def test_batchesOverSeqpacket(self) -> None:
        """
        Batching works on a message-oriented socket too.
        """
        sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(sender.close)
        self.addCleanup(receiver.close)
        fds = self.pipes(300)
        sendDescriptors(sender, fds, timeout=_TIMEOUT)
        received = receiveDescriptors(receiver, 300, timeout=_TIMEOUT)
        self.addCleanup(self.closeAll, received)
        self.assertEqual(
            [_identity(fd) for fd in received], [_identity(fd) for fd in fds]
        )

    def test_nothing(self) -> None:
        """
        No descriptor: nothing is sent and nothing is read.
        """
        sendDescriptors(self.sender, [], timeout=_TIMEOUT)
        self.assertEqual(receiveDescriptors(self.receiver, 0, timeout=_TIMEOUT), [])
        self.receiver.setblocking(False)
        self.assertRaises(BlockingIOError, self.receiver.recv, 1)

    def test_truncated(self) -> None:
        """
        When the receiver has no room for the descriptors the kernel drops
        them and sets C{MSG_CTRUNC}: the receiver raises and closes the
        ones that did arrive.
        """
        fds = self.pipes(10)
        sendDescriptors(self.sender, fds, timeout=_TIMEOUT)
        before = _openDescriptors()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The lowest limit that leaves exactly three free descriptor numbers.
        limit = 0
        free = 0
        while free < 3:
            if limit not in before:
                free += 1
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            error = self.assertRaises(
                DescriptorTransferError,
                receiveDescriptors,
                self.receiver,
                10,
                timeout=_TIMEOUT,
            )
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertIn("MSG_CTRUNC", str(error))
        self.assertNoneLeaked(before)

    def sendBatch(self, fds: list[int], total: int, announced: int) -> None:
        """
        Send one hand-made batch: a header announcing C{total} and
        C{announced} descriptors, with C{fds} attached.
        """
        header = b"MGFD" + total.to_bytes(4, "big") + announced.to_bytes(4, "big")
        self.sender.sendmsg(
            [header],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
        )

    def test_endOfFile(self) -> None:
        """
        The peer closing before anything arrived is an error.
        """
        self.sender.close()
        error = self.assertRaises(
            DescriptorTransferError,
            receiveDescriptors,
            self.receiver,
            1,
            timeout=_TIMEOUT,
        )
        self.assertIn("closed", str(error))

    def test_endOfFileMidway(self) -> None:
        """
        The peer closing between batches is an error, and the descriptors of
        the batches that did arrive are closed.
        """
        fds = self.pipes(SCM_MAX_FD)
        self.sendBatch(fds, 300, SCM_MAX_FD)
        self.sender.close()
        before = _openDescriptors()
        error = self.assertRaises(
            DescriptorTransferError,
            receiveDescriptors,
            self.receiver,
            300,
            timeout=_TIMEOUT,
        )
        self.assertIn("closed", str(error))
        self.assertNoneLeaked(before)

    def test_timeout(self) -> None:
        """
        Nothing arriving before the deadline is an error, raised promptly.
        """
        started = time.monotonic()
        error = self.assertRaises(
            DescriptorTransferError, receiveDescriptors, self.receiver, 1, timeout=0.05
        )
        self.assertIn("timed out", str(error))
        self.assertLess(time.monotonic() - started, 2.0)

    def test_wrongTotal(self) -> None:
        """
        A transfer announcing another total than expected is refused and
        closed.
        """
        self.assertWrongTotalRefused(receiveDescriptors, 3, 2)

    def test_missingDescriptors(self) -> None:
        """
        A batch whose descriptors did not all come is refused and what came
        is closed.
        """
        self.sendBatch(self.pipes(2), 3, 3)
        before = _openDescriptors()
        error = self.assertRaises(
            DescriptorTransferError,
            receiveDescriptors,
            self.receiver,
            3,
            timeout=_TIMEOUT,
        )
        self.assertIn("announced 3", str(error))
        self.assertNoneLeaked(before)

    def test_garbage(self) -> None:
        """
        Bytes that are not a batch header are refused.
        """
        self.sender.sendall(b"HTTP/1.1 200")
        error = self.assertRaises(
            DescriptorTransferError,
            receiveDescriptors,
            self.receiver,
            1,
            timeout=_TIMEOUT,
        )
        self.assertIn("not a descriptor batch", str(error))

    def test_sendTimeout(self) -> None:
        """
        A peer that does not read makes the sender give up at its deadline.
        """
        self.sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.sender.setblocking(False)
        try:
            while True:
                self.sender.send(b"x" * 4096)
        except BlockingIOError:
            pass
        fds = self.pipes(1)
        error = self.assertRaises(
            DescriptorTransferError, sendDescriptors, self.sender, fds, timeout=0.05
        )
        self.assertIn("timed out", str(error))

    def test_sendToClosedPeer(self) -> None:
        """
        A peer that is gone makes the sender fail, not hang or die of
        C{SIGPIPE}.
        """
        self.receiver.close()
        fds = self.pipes(1)
        error = self.assertRaises(
            DescriptorTransferError, sendDescriptors, self.sender, fds, timeout=_TIMEOUT
        )
        self.assertIsInstance(error.__cause__, OSError)
        self.assertEqual(error.__cause__.errno, errno.EPIPE)


class AtOnceTests(_SocketpairTestCase):
    """
    L{sendDescriptorsNow} and L{receiveDescriptorsNow} move one message's
    worth of descriptors without waiting, or say they cannot, having moved
    nothing.
    """

    def test_nowRoundTrip(self) -> None:
        """
        Up to L{SCM_MAX_FD} descriptors go at once, and arrive at once, in
        order.
        """
        fds = self.pipes(SCM_MAX_FD)
        self.assertTrue(sendDescriptorsNow(self.sender, fds, timeout=_TIMEOUT))
        received = receiveDescriptorsNow(self.receiver, SCM_MAX_FD, timeout=_TIMEOUT)
        assert received is not None
        self.addCleanup(self.closeAll, received)
        self.assertEqual(
            [_identity(fd) for fd in received], [_identity(fd) for fd in fds]
        )

    def test_moreThanOneMessage(self) -> None:
        """
        More than one message's worth is left to the blocking helpers:
        nothing is sent, nothing read.
        """
        fds = self.pipes(SCM_MAX_FD + 1)
        self.assertFalse(sendDescriptorsNow(self.sender, fds, timeout=_TIMEOUT))
        self.receiver.setblocking(False)
        self.assertRaises(BlockingIOError, self.receiver.recv, 1)
        sendDescriptors(self.sender, fds[:1], timeout=_TIMEOUT)
        self.assertIsNone(
            receiveDescriptorsNow(self.receiver, SCM_MAX_FD + 1, timeout=_TIMEOUT)
        )
        self.assertEqual(len(self.receiver.recv(100)), 12)

    def test_noRoom(self) -> None:
        """
        A socket with no room now sends nothing, and says so.
        """
        self.sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.sender.setblocking(False)
        filled = 0
        try:
            while True:
                filled += self.sender.send(b"x" * 4096)
        except BlockingIOError:
            pass
        fds = self.pipes(1)
        self.assertFalse(sendDescriptorsNow(self.sender, fds, timeout=_TIMEOUT))
        self.receiver.setblocking(False)
        drained = 0
        while drained < filled:
            drained += len(self.receiver.recv(65536))
        self.assertEqual(drained, filled)

    def test_notArrived(self) -> None:
        """
        Descriptors not arrived yet are not waited for: L{None}, nothing
        read; once they arrive, they are received.
        """
        self.assertIsNone(receiveDescriptorsNow(self.receiver, 2, timeout=_TIMEOUT))
        fds = self.pipes(2)
        sendDescriptors(self.sender, fds, timeout=_TIMEOUT)
        received = receiveDescriptorsNow(self.receiver, 2, timeout=_TIMEOUT)
        assert received is not None
        self.addCleanup(self.closeAll, received)
        self.assertEqual(
            [_identity(fd) for fd in received], [_identity(fd) for fd in fds]
        )

    def test_nothingNow(self) -> None:
        """
        No descriptor announced: none received, nothing read.
        """
        self.assertEqual(receiveDescriptorsNow(self.receiver, 0, timeout=_TIMEOUT), [])

    def test_nowWrongTotal(self) -> None:
        """
        What arrived is checked as L{receiveDescriptors} checks it.
        """
        self.assertWrongTotalRefused(receiveDescriptorsNow, 2, 3)


class MemfdTests(SynchronousTestCase):
    """
    L{writeMemfd} and L{readMemfd}.
    """

    def memfd(self, data: bytes, **kwargs: bool) -> int:
        fd = writeMemfd(data, "migrate-test", **kwargs)
        self.addCleanup(os.close, fd)
        return fd

    def test_roundTrip(self) -> None:
        """
        What is written reads back whole, from offset 0, through another
        descriptor as another process would get it.
        """
        data = bytes(range(256)) * 5000
        fd = self.memfd(data)
        self.assertEqual(os.lseek(fd, 0, os.SEEK_CUR), 0)
        other = os.dup(fd)
        self.addCleanup(os.close, other)
        self.assertEqual(readMemfd(other, maxBytes=len(data)), data)
        self.assertEqual(readMemfd(fd, maxBytes=len(data)), data)

    def test_empty(self) -> None:
        """
        An empty memory file reads back empty.
        """
        self.assertEqual(readMemfd(self.memfd(b""), maxBytes=0), b"")

    def test_closeOnExec(self) -> None:
        """
        The file is close-on-exec unless asked otherwise.
        """
        self.assertFalse(os.get_inheritable(self.memfd(b"x")))
        self.assertTrue(os.get_inheritable(self.memfd(b"x", inheritable=True)))

    def test_sealed(self) -> None:
        """
        The file cannot change after it was written.
        """
        fd = self.memfd(b"state")
        self.assertRaises(PermissionError, os.pwrite, fd, b"X", 0)
        self.assertRaises(PermissionError, os.ftruncate, fd, 0)
        self.assertEqual(readMemfd(fd, maxBytes=5), b"state")

    def test_tooLarge(self) -> None:
        """
        A file larger than C{maxBytes} is refused.
        """
        fd = self.memfd(b"x" * 101)
        error = self.assertRaises(DescriptorTransferError, readMemfd, fd, maxBytes=100)
        self.assertIn("101 bytes", str(error))

    def test_grows(self) -> None:
        """
        An unsealed file that grows past C{maxBytes} after C{fstat} is
        refused too (the size check is not trusted alone).
        """
        fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        self.addCleanup(os.close, fd)
        os.write(fd, b"x" * 10)

        class Small:
            st_size = 1

        self.patch(os, "fstat", lambda fd: Small())
        self.assertRaises(DescriptorTransferError, readMemfd, fd, maxBytes=5)

    def test_notReadable(self) -> None:
        """
        A descriptor that cannot be read is a transfer error.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertRaises(DescriptorTransferError, readMemfd, w, maxBytes=10)
