# -*- test-case-name: migrate.test.test_reexec_caretaker -*-
"""
The caretaker: while a re-executed image starts, a child of the old image
goes on serving every established connection with the old code.

Re-exec replaces the process image in place, so without a caretaker every
client waits for the new image to start Python, import Twisted and the
application, and restore every connection: at 10,000 connections more than
half a second.  Just before C{execv} the old image forks.  The parent (the
PID the supervisor watches) re-executes at once; the child, the I{caretaker},
waits until the exec has succeeded, then serves again with the old code,
holding its own copy of every socket.  Once the new image is ready to
restore (its imports done, its options parsed, the pre-copy read), it asks
the caretaker to freeze: the caretaker brings its connections to their safe
points, describes those that changed since the pre-copy in a state document
and passes it over their socketpair; the new image restores, commits and
says so; only then does the caretaker exit, without shutting down a socket
(the new image holds them).  The clients wait for that exchange only, not
for the interpreter's start.

The channel is an inherited C{socketpair}; every message is one byte (the
document travels as a sealed memory file by C{SCM_RIGHTS}):

  - L{FREEZE}, new image to caretaker: freeze and describe now;
  - L{DOCUMENT}, caretaker to new image, with the document's descriptor;
  - L{COMMITTED}, new image to caretaker: every connection is the new
    image's; exit;
  - or L{ABORT}, new image to caretaker, instead: the document could not
    be read; the new image has let go of its copies of the connections,
    and the caretaker closes them politely itself (it still holds their
    protocols and unwritten output), then exits.

The caretaker dies with the new image (C{PR_SET_PDEATHSIG}): once C{execv}
has succeeded there is no old image to go back to, and a caretaker left
behind would serve forever.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import time
from typing import Any, Callable, MutableMapping

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "ABORT",
    "COMMITTED",
    "DOCUMENT",
    "FREEZE",
    "CARETAKER_PROTOCOL",
    "CARETAKER_VARIABLE",
    "Caretaker",
    "CaretakerChannel",
    "CaretakerError",
    "HandOverAborted",
    "dieWithParent",
    "libcPrctl",
]

_log = Logger()

CARETAKER_VARIABLE = "MIGRATE_REEXEC_CARETAKER"
"""
In a re-executed image's environment: C{"DESCRIPTOR,PID"}, its end of the
channel to the caretaker and the caretaker's process.
"""

CARETAKER_PROTOCOL = 1
"""
The version of the exchange below this code speaks, as a new image and as
a caretaker.  The re-exec preflight reports it (see
L{migrate.strategies._reexec._incoming.finishPreflight}), and the old image
forks a caretaker only for new code that speaks at least its own: code
that does not know L{CARETAKER_VARIABLE} (an older migrate) would restore
the pre-copy's stale states beside the caretaker serving the same
connections.  A later version must go on speaking this one as a new image,
as a reader goes on reading older state documents.
"""

FREEZE = b"F"
DOCUMENT = b"D"
COMMITTED = b"C"
ABORT = b"A"

_PR_SET_PDEATHSIG = 1
_CTRUNC = getattr(socket, "MSG_CTRUNC", 0)


class CaretakerError(Exception):
    """
    The caretaker did not hand over; the message says why.
    """


class HandOverAborted(CaretakerError):
    """
    The new image could not take the caretaker's document (L{ABORT}): the
    connections are the caretaker's again, to close politely.
    """


def libcPrctl() -> Callable[[int, int], int] | None:
    """
    C{prctl(2)} from the C library this process already loaded, or
    L{None} where there is none.  Looked up before forking: finding the
    library by name runs C{ldconfig}, a child process of its own.
    """
    try:
        prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def dieWithParent(
    sig: int = signal.SIGKILL,
    *,
    prctl: Callable[[int, int], int] | None = None,
) -> bool:
    """
    Ask the kernel to send C{sig} to this process when its parent dies.

    @param prctl: C{prctl(2)} (see L{libcPrctl}); L{None}: unavailable.

    @return: whether it could be asked (Linux only).
    """
    if prctl is None:
        return False
    try:
        return prctl(_PR_SET_PDEATHSIG, int(sig)) == 0
    except Exception:
        return False


@define
class CaretakerChannel:
    """
    The caretaker's end of its channel to the new image.

    @ivar socket: the connected Unix socket.
    """

    socket: socket.socket
    _watching: Any = field(default=None, init=False)

    def freezeRequested(self, reactor: Any) -> Deferred[None]:
        """
        Wait, while the reactor serves, until the new image asks to freeze.

        @return: a L{Deferred} firing with L{None} on L{FREEZE}, or failing
            with L{CaretakerError} if the new image went away or sent
            something else.
        """
        asked: Deferred[None] = Deferred()
        self.socket.setblocking(False)
        watcher = _Watcher(self.socket, asked, reactor)
        self._watching = watcher
        reactor.addReader(watcher)
        return asked

    def handOver(self, document: int, timeout: float | None) -> str | None:
        """
        Pass the state document, and wait (blocking: nothing is served any
        more) until the new image has committed.

        @param document: the sealed memory file's descriptor (not closed).
        @param timeout: seconds, or L{None} to wait as long as it takes.

        @return: L{None} once the new image committed, else why not.

        @raise HandOverAborted: if the new image could not take the
            document (it has let go of every connection the caretaker
            serves).
        """
        self.socket.setblocking(True)
        self.socket.settimeout(timeout)
        try:
            socket.send_fds(self.socket, [DOCUMENT], [document])
            answer = self.socket.recv(1)
        except OSError as e:
            return "the new image did not answer: {}".format(e)
        if answer == COMMITTED:
            return None
        if answer == ABORT:
            raise HandOverAborted("the new image could not take the document")
        if not answer:
            return "the new image went away before it committed"
        return "the new image answered {!r}".format(answer)


@define(eq=False)
class _Watcher:
    """
    Reads the one request the caretaker waits for, from the reactor.
    """

    socket: socket.socket
    asked: Deferred[None]
    reactor: Any
    finished: bool = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "migrate-caretaker"

    def doRead(self) -> None:
        try:
            data = self.socket.recv(1)
        except BlockingIOError:
            return
        except OSError as e:
            self._done(CaretakerError("the channel failed: {}".format(e)))
            return
        if data == FREEZE:
            self._done(None)
        elif not data:
            self._done(CaretakerError("the new image closed the channel"))
        else:
            self._done(CaretakerError("the new image sent {!r}".format(data)))

    def connectionLost(self, reason: Any) -> None:
        self._done(CaretakerError("the channel was lost"))

    def _done(self, error: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.reactor.removeReader(self)
        if self.asked.called:
            # Given up on already (a deadline): nothing more to read.
            return
        if error is None:
            self.asked.callback(None)
        else:
            self.asked.errback(Failure(error))


@define
class Caretaker:
    """
    The caretaker as the new image sees it.

    @ivar socket: the new image's end of the channel.
    @ivar pid: the caretaker's process.
    @ivar handedOver: whether it sent L{DOCUMENT} (it then waits for
        L{COMMITTED} or L{ABORT}), even if its document did not arrive
        whole.
    """

    socket: socket.socket
    pid: int
    handedOver: bool = field(default=False, init=False)
    _reaped: bool = field(default=False, init=False)

    @classmethod
    def fromEnvironment(
        cls, environ: MutableMapping[str, str] | None = None
    ) -> Caretaker | None:
        """
        The caretaker the old image left, if it left one; the variable is
        removed, and the channel made close-on-exec.

        @raise CaretakerError: if the variable is malformed.
        """
        if environ is None:
            environ = os.environ
        raw = environ.pop(CARETAKER_VARIABLE, None)
        if raw is None:
            return None
        fd, comma, pid = raw.partition(",")
        if not (comma and fd.isdigit() and pid.isdigit() and int(fd) > 2):
            raise CaretakerError("{}={!r} is malformed".format(CARETAKER_VARIABLE, raw))
        os.set_inheritable(int(fd), False)
        return cls(socket.socket(fileno=int(fd)), int(pid))

    def freeze(self, timeout: float) -> int:
        """
        Ask the caretaker to freeze, and wait (blocking: this image serves
        nothing yet) for its state document.

        @return: the document's descriptor.

        @raise CaretakerError: if it did not come within C{timeout} seconds.
        """
        self.socket.settimeout(timeout)
        try:
            self.socket.sendall(FREEZE)
            message, descriptors, flags, address = socket.recv_fds(self.socket, 1, 4)
        except OSError as e:
            raise CaretakerError(
                "the caretaker (process {}) did not hand over: {}".format(
                    self.pid, e or type(e).__name__
                )
            )
        self.handedOver = message == DOCUMENT
        if message == DOCUMENT and len(descriptors) == 1 and not flags & _CTRUNC:
            return descriptors[0]
        for fd in descriptors:
            os.close(fd)
        if not message:
            raise CaretakerError(
                "the caretaker (process {}) exited before it handed over".format(
                    self.pid
                )
            )
        if flags & _CTRUNC:
            raise CaretakerError(
                "the caretaker (process {}) passed its document, but the "
                "descriptor was dropped (MSG_CTRUNC: this image is at its "
                "RLIMIT_NOFILE)".format(self.pid)
            )
        raise CaretakerError(
            "the caretaker (process {}) was expected to send {!r} with one "
            "descriptor, and sent {!r} with {}".format(
                self.pid, DOCUMENT, message, len(descriptors)
            )
        )

    def abort(self) -> bool:
        """
        Tell the caretaker, which handed its document over and waits, that
        this image cannot take the connections: it closes them politely
        itself, then exits (L{reap} it).  This image must let go of its
        copies of them, without shutting them down.

        @return: whether it could be told (if not, it was ended: L{kill}).
        """
        if not self._tell(ABORT, "close its connections"):
            return False
        self.socket.close()
        return True

    def committed(self) -> None:
        """
        Tell the caretaker every connection is this image's: it exits.
        """
        self._tell(COMMITTED, "exit")
        self.socket.close()

    def _tell(self, message: bytes, doing: str) -> bool:
        """
        Send the caretaker C{message}, asking it to do C{doing}; if that
        fails, end it.

        @return: whether it was told.
        """
        try:
            self.socket.sendall(message)
        except OSError as e:
            _log.warn(
                "Re-exec: could not tell the caretaker (process {pid}) to "
                "{doing} ({why}); ending it",
                pid=self.pid,
                doing=doing,
                why=str(e),
            )
            self.kill()
            return False
        return True

    def kill(self) -> None:
        """
        End the caretaker now, and wait until it is gone (it has stopped
        serving: it waits on the channel or is frozen).  Once collected, it
        is never signalled again: its process id may name another process
        by then.
        """
        if not self._reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait(0)
        self.socket.close()

    def reap(self, reactor: Any, timeout: float = 10.0) -> Deferred[None]:
        """
        Collect the caretaker's exit from the reactor (it exits right after
        L{committed}); one still there after C{timeout} seconds is killed.
        """
        done: Deferred[None] = Deferred()
        deadline = time.monotonic() + timeout

        def poll() -> None:
            if self._wait(os.WNOHANG):
                done.callback(None)
            elif time.monotonic() >= deadline:
                _log.warn(
                    "Re-exec: the caretaker (process {pid}) did not exit; "
                    "killing it",
                    pid=self.pid,
                )
                self.kill()
                done.callback(None)
            else:
                reactor.callLater(0.01, poll)

        reactor.callLater(0, poll)
        return done

    def _wait(self, options: int) -> bool:
        if self._reaped:
            return True
        try:
            pid, status = os.waitpid(self.pid, options)
        except ChildProcessError:
            self._reaped = True
            return True
        except OSError as e:
            if e.errno == errno.EINTR:
                return False
            raise
        if pid == 0:
            return False
        self._reaped = True
        return True
