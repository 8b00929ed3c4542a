# -*- test-case-name: migrate.test.test_successor -*-
"""
Starting a successor: the new process that takes over from this one.

Both halves live here.  The old process builds the command line that starts
this same program again (so the code now on disk is loaded,
L{successorCommandLine}) and spawns it with the hand-off socket and its own
standard output and error inherited (L{spawnSuccessor}); it forwards the
successor's output to its log and keeps the last lines for failure reports
(L{SuccessorProcess}).  The successor finds what it inherited in its
environment (L{inheritedHandoff}) and, once it serves, writes straight to the
real standard output and error (L{InheritedHandoff.takeOverOutput}).

The descriptor layout in the successor::

    0       the old process's standard input
    1, 2    pipes the old process reads (and logs) until the successor
            takes over its output
    3       the successor's end of the hand-off socketpair
            (C{MIGRATE_HANDOFF_FD=3})
    4, 5    the old process's standard output and error
            (C{MIGRATE_OUTPUT_FDS=4,5})

What is said over the hand-off socket is not this module's business.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import time
from collections import deque
from typing import (
    Any,
    AnyStr,
    Callable,
    Mapping,
    MutableMapping,
    Protocol,
    Sequence,
    TypeVar,
)

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessProtocol,
    IProcessTransport,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._host._priority import BackgroundStart, describePriority
from .._host._spawning import spawnProcess

__all__ = [
    "flushPythonOutput",
    "HANDOFF_FD_VARIABLE",
    "OUTPUT_FDS_VARIABLE",
    "HandoffEnvironmentError",
    "InheritedHandoff",
    "SuccessorExit",
    "SuccessorProcess",
    "inheritedHandoff",
    "spawnSuccessor",
    "successorCommandLine",
]

HANDOFF_FD_VARIABLE = "MIGRATE_HANDOFF_FD"
"""
The environment variable naming the successor's hand-off descriptor.
"""

OUTPUT_FDS_VARIABLE = "MIGRATE_OUTPUT_FDS"
"""
The environment variable naming the successor's descriptors for the old
process's standard output and error, comma-separated.
"""

_HANDOFF_FD = 3
_OUTPUT_FDS = (4, 5)

_MAX_LINE_BYTES = 8192
"""
The longest line of successor output kept whole; the rest of a longer line
is counted, not kept.
"""

_OUTPUT_GRACE_SECONDS = 2.0
"""
How long after the successor exits its output pipes may stay open (held by
a process it started) before L{SuccessorProcess.whenEnded} fires anyway.
"""

_DECIMAL = re.compile(r"[0-9]{1,9}")

_T = TypeVar("_T")


def flushPythonOutput() -> None:
    """
    Write out what Python still buffers for standard output and error,
    before their descriptors change or the process image is replaced
    (C{exec} flushes nothing).  A stream that cannot be written is passed
    over.
    """
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        flush = getattr(stream, "flush", None)
        if flush is not None:
            try:
                flush()
            except (OSError, ValueError):
                pass


def successorCommandLine(
    executable: str | None = None, origArgv: Sequence[str] | None = None
) -> list[str]:
    """
    The command line that starts this same program again.

    The current interpreter runs again with the arguments it was originally
    given, interpreter options included: C{python /venv/bin/twistd -n app},
    C{python -m twisted app}, C{python -X dev /venv/bin/twist app} all
    restart the same way, and re-read the code from disk.

    Relative paths in the original command line are relative to the
    directory the program started in; a program that changed directory
    since (C{twistd --rundir}, C{--chroot}) passes that directory as
    C{cwd} to L{spawnSuccessor}.

    @param executable: The interpreter; L{sys.executable} by default.
    @param origArgv: The interpreter's original command line, its own name
        first; L{sys.orig_argv} by default.

    @return: The command line, the executable first.

    @raise ValueError: If the interpreter or its command line is unknown
        (an embedded interpreter, for example).
    """
    if executable is None:
        executable = sys.executable
    if origArgv is None:
        origArgv = sys.orig_argv
    if not executable:
        raise ValueError(
            "Cannot start a successor: the path of the Python interpreter "
            "is unknown (sys.executable is empty)."
        )
    if len(origArgv) < 2:
        raise ValueError(
            "Cannot start a successor: the original command line "
            f"{list(origArgv)!r} does not say what to run."
        )
    return [executable, *origArgv[1:]]


@frozen
class SuccessorExit:
    """
    How a successor process ended.

    @ivar exitCode: Its exit status, or L{None} if a signal killed it.
    @ivar signal: The number of the signal that killed it, or L{None}.
    """

    exitCode: int | None
    signal: int | None

    @classmethod
    def fromReason(cls, reason: Failure) -> SuccessorExit:
        """
        Read how a process ended from the reason Twisted gives.

        @param reason: A L{ProcessDone} or L{ProcessTerminated} failure.
        """
        value = reason.value
        if isinstance(value, ProcessTerminated):
            return cls(exitCode=value.exitCode, signal=value.signal)
        return cls(exitCode=0, signal=None)

    @property
    def signalName(self) -> str | None:
        """
        The name of the signal that killed the process (C{"SIGKILL"}), or
        L{None}.
        """
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def describe(self) -> str:
        """
        Say how the process ended, for logs and reports.
        """
        if self.signal is not None:
            return f"killed by {self.signalName} ({self.signal})"
        return f"exited with status {self.exitCode}"

    __str__ = describe


class _LineBuffer:
    """
    Split one output stream into lines, keeping memory bounded.

    A line longer than C{maxLineBytes} keeps its beginning and a note of how
    much was left out.
    """

    def __init__(self, maxLineBytes: int) -> None:
        self._maxLineBytes = maxLineBytes
        self._pending = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> list[str]:
        """
        Take more output.

        @return: The lines it completed.
        """
        *complete, partial = data.split(b"\n")
        lines = []
        for piece in complete:
            self._keep(piece)
            lines.append(self._take())
        self._keep(partial)
        return lines

    def pending(self) -> str | None:
        """
        The incomplete last line so far, if any.
        """
        if self._pending or self._dropped:
            return self._text()
        return None

    def flush(self) -> str | None:
        """
        Complete the incomplete last line, if any.
        """
        if self._pending or self._dropped:
            return self._take()
        return None

    def _keep(self, piece: bytes) -> None:
        room = max(self._maxLineBytes - len(self._pending), 0)
        self._pending += piece[:room]
        self._dropped += max(len(piece) - room, 0)

    def _text(self) -> str:
        text = bytes(self._pending).decode("utf-8", "backslashreplace")
        if text.endswith("\r"):
            text = text[:-1]
        if self._dropped:
            text += f"... [{self._dropped} more bytes]"
        return text

    def _take(self) -> str:
        text = self._text()
        self._pending.clear()
        self._dropped = 0
        return text


def _waiter(waiters: list[Deferred[_T]]) -> Deferred[_T]:
    """
    A new L{Deferred} in C{waiters}, which leaves them when cancelled.
    """
    waiter: Deferred[_T] = Deferred(lambda d: waiters.remove(d))
    waiters.append(waiter)
    return waiter


class _Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall: ...


class _SuccessorProtocol(ProcessProtocol):
    """
    Watch a successor: log its output line by line, keep the last lines,
    and tell who asks when it ended.

    @ivar pid: The successor's process id.
    @ivar exit: How it ended, once it has.
    """

    _log = Logger()

    _STREAMS = {1: "stdout", 2: "stderr"}

    def __init__(self, clock: _Clock, tailLines: int) -> None:
        self._clock = clock
        self._tail: deque[str] = deque(maxlen=tailLines)
        self._buffers = {fd: _LineBuffer(_MAX_LINE_BYTES) for fd in self._STREAMS}
        self._endedWaiters: list[Deferred[SuccessorExit]] = []
        self._closedWaiters: list[Deferred[None]] = []
        self._reported = False
        self._outputClosed = False
        self._grace: IDelayedCall | None = None
        self.pid: int | None = None
        self.exit: SuccessorExit | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD)
        if buffer is not None:
            for line in buffer.feed(data):
                self._line(childFD, line)

    def childConnectionLost(self, childFD: int) -> None:
        self._flush(childFD)

    def processExited(self, reason: Failure) -> None:
        self.exit = SuccessorExit.fromReason(reason)
        self._log.info("successor {pid} {how}", pid=self.pid, how=self.exit.describe())
        # The output is normally complete moments later, when the pipes
        # close; a process the successor started may hold them open.
        self._grace = self._clock.callLater(_OUTPUT_GRACE_SECONDS, self._report)

    def processEnded(self, reason: Failure) -> None:
        for childFD in self._buffers:
            self._flush(childFD)
        if self.exit is None:
            self.exit = SuccessorExit.fromReason(reason)
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._outputClosed = True
        self._report()
        waiters, self._closedWaiters = self._closedWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def whenEnded(self) -> Deferred[SuccessorExit]:
        if self._reported:
            assert self.exit is not None
            return succeed(self.exit)
        return _waiter(self._endedWaiters)

    def whenOutputClosed(self) -> Deferred[None]:
        if self._outputClosed:
            return succeed(None)
        return _waiter(self._closedWaiters)

    def logTail(self) -> list[str]:
        tail = list(self._tail)
        for buffer in self._buffers.values():
            partial = buffer.pending()
            if partial is not None:
                tail.append(partial)
        keep = self._tail.maxlen
        return tail[-keep:] if keep else []

    def _report(self) -> None:
        if self._reported:
            return
        self._reported = True
        exit = self.exit
        assert exit is not None
        waiters, self._endedWaiters = self._endedWaiters, []
        for waiter in waiters:
            waiter.callback(exit)

    def _flush(self, childFD: int) -> None:
        buffer = self._buffers.get(childFD)
        if buffer is not None:
            line = buffer.flush()
            if line is not None:
                self._line(childFD, line)

    def _line(self, childFD: int, line: str) -> None:
        self._tail.append(line)
        self._log.info(
            "successor {pid}: {line}",
            pid=self.pid,
            line=line,
            stream=self._STREAMS[childFD],
        )


@define
class SuccessorProcess:
    """
    A successor process the old process started.

    @ivar pid: Its process id.
    """

    pid: int
    _transport: IProcessTransport = field(repr=False)
    _protocol: _SuccessorProtocol = field(repr=False)
    _background: BackgroundStart | None = field(default=None, repr=False)

    def bringForward(self, why: str) -> None:
        """
        Give the process, if it started in the background, this process's
        CPU priority (see L{migrate._host._priority}); C{why} goes to the
        log.  Doing it again does nothing.
        """
        if self._background is not None:
            self._background.bringForward(why)

    def sendBack(self, why: str) -> None:
        """
        Give the process, if it started in the background and was brought
        forward, the lowest CPU priority again until L{bringForward} (see
        L{migrate._host._priority}); C{why} goes to the log.
        """
        if self._background is not None:
            self._background.sendBack(why)

    @property
    def exited(self) -> bool:
        """
        Whether the process has ended (its last output may still be on its
        way: wait for L{whenEnded} for a complete L{logTail}).
        """
        return self._protocol.exit is not None

    def whenEnded(self) -> Deferred[SuccessorExit]:
        """
        Wait for the process to end.

        @return: A new L{Deferred} for each call; it fires with a
            L{SuccessorExit} once the process has ended and its output has
            been read (or, if a process it started holds its output open, a
            short while after it ended).  It never fails, unless cancelled
            (which only forgets that waiter).
        """
        return self._protocol.whenEnded()

    def logTail(self) -> list[str]:
        """
        The last lines the process wrote to its standard output and error
        (before it took over the old process's), oldest first, including an
        incomplete last line.
        """
        return self._protocol.logTail()

    def kill(self) -> None:
        """
        Kill the process (C{SIGKILL}) if it still runs.
        """
        self._signal("KILL")

    def terminate(self) -> None:
        """
        Ask the process to end (C{SIGTERM}) if it still runs.
        """
        self._signal("TERM")

    def killNow(self, timeout: float) -> bool:
        """
        Kill the process (C{SIGKILL}) and wait for it to be dead, blocking
        this process (its reactor included) for at most C{timeout} seconds:
        for a caller that must not read a socket the successor might still
        be reading.  The process is not reaped (C{WNOWAIT}): the reactor
        hears of its end as usual.

        @return: whether it is dead.
        """
        self._signal("KILL")
        deadline = time.monotonic() + timeout
        while True:
            try:
                ended = os.waitid(
                    os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
                )
            except ChildProcessError:
                return True
            if ended is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def _signal(self, name: str) -> None:
        if self.exited:
            return
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def outputPipes(self) -> dict[int, int]:
        """
        The descriptors this process reads the successor's standard output
        and error from, by the successor's descriptor number, for a caller
        that stops the reactor for a while and must keep reading them (a
        successor writing to a full pipe would wait for it): see
        L{deliverOutput}.
        """
        pipes = getattr(self._transport, "pipes", {})
        found = {}
        for childFD in (1, 2):
            reader = pipes.get(childFD)
            if reader is not None:
                try:
                    found[childFD] = int(reader.fileno())
                except (AttributeError, OSError, ValueError):
                    continue
        return found

    def deliverOutput(self, childFD: int, data: bytes) -> None:
        """
        Output read from one of L{outputPipes} by such a caller: handled as
        if the reactor had read it.
        """
        self._protocol.childDataReceived(childFD, data)

    def _whenOutputClosed(self) -> Deferred[None]:
        """
        Wait until the process has ended and its output pipes are closed.
        """
        return self._protocol.whenOutputClosed()


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class _ProcessReactor(_Clock, Protocol):
    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport: ...


_log = Logger()


def spawnSuccessor(
    reactor: _ProcessReactor,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    handoffSocket: _HasFileno,
    extraEnv: Mapping[str, str] | None = None,
    cwd: str | None = None,
    tailLines: int = 50,
    outputDescriptors: tuple[int, int] = (1, 2),
    background: BackgroundStart | None = None,
) -> SuccessorProcess:
    """
    Start a successor process.

    It inherits this process's standard input, the hand-off socket as
    descriptor 3 and this process's standard output and error as
    descriptors 4 and 5, and nothing else; its own standard output and
    error are pipes whose lines this process logs and keeps the last of.
    The caller closes its copy of C{handoffSocket} once this returns.

    A descriptor of ours that is not open (a daemon without standard
    input, say) is replaced by C{/dev/null}.

    @param reactor: The reactor to spawn with and time by.
    @param argv: The command line, the executable first (see
        L{successorCommandLine}).
    @param env: The successor's environment.
    @param handoffSocket: The successor's end of the hand-off socketpair.
    @param extraEnv: More environment variables, added to C{env}.
    @param cwd: The directory to start in; this process's by default.
    @param tailLines: How many of the last lines of output to keep.
    @param outputDescriptors: The descriptors the successor inherits as 4
        and 5, our standard output and error by default.
    @param background: Start it at a low CPU priority, until
        L{SuccessorProcess.bringForward} (or C{background}'s own deadline).

    @return: The started process.

    @raise ValueError: For an empty command line, a negative C{tailLines},
        a closed C{handoffSocket} or an C{extraEnv} that sets one of the
        hand-off variables.
    @raise OSError: If the process cannot be started.
    """
    if not argv:
        raise ValueError("Cannot start a successor: empty command line.")
    if tailLines < 0:
        raise ValueError(f"tailLines must not be negative, not {tailLines!r}")
    handoff = handoffSocket.fileno()
    if handoff < 0:
        raise ValueError("Cannot start a successor: the hand-off socket is closed.")
    ours = {
        HANDOFF_FD_VARIABLE: str(_HANDOFF_FD),
        OUTPUT_FDS_VARIABLE: ",".join(map(str, _OUTPUT_FDS)),
    }
    environment = dict(env)
    if extraEnv:
        clash = sorted(set(extraEnv) & set(ours))
        if clash:
            raise ValueError(f"extraEnv must not set {', '.join(clash)}")
        environment.update(extraEnv)
    environment.update(ours)

    opened: list[int] = []

    def usable(fd: int) -> int:
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(fd)
        return fd

    stdout, stderr = outputDescriptors
    childFDs: dict[int, int | str] = {
        0: usable(0),
        1: "r",
        2: "r",
        _HANDOFF_FD: handoff,
        _OUTPUT_FDS[0]: usable(stdout),
        _OUTPUT_FDS[1]: usable(stderr),
    }
    protocol = _SuccessorProtocol(reactor, tailLines)
    try:
        transport = spawnProcess(
            reactor,
            protocol,
            argv[0],
            list(argv),
            env=environment,
            path=cwd,
            childFDs=childFDs,
            background=background,
        )
    finally:
        for fd in opened:
            os.close(fd)
    assert transport.pid is not None
    if background is not None and background.pid is not None:
        _log.info(
            "Started successor {pid} at {priority}: {argv}",
            pid=transport.pid,
            priority=describePriority(background.niceness, True),
            argv=list(argv),
        )
        started = background
        protocol.whenEnded().addCallback(lambda _: started.ended())
    else:
        background = None
        _log.info("Started successor {pid}: {argv}", pid=transport.pid, argv=list(argv))
    return SuccessorProcess(transport.pid, transport, protocol, background)


class HandoffEnvironmentError(ValueError):
    """
    The hand-off variables in the environment are malformed or name
    descriptors this process does not have.
    """


@define
class InheritedHandoff:
    """
    What a successor inherited from the process it succeeds.

    @ivar handoffDescriptor: The hand-off socket's descriptor.
    @ivar outputDescriptors: The old process's standard output and error,
        or L{None} if they were not passed.
    """

    handoffDescriptor: int
    outputDescriptors: tuple[int, int] | None
    _outputTaken: bool = field(default=False, init=False, repr=False)

    def takeOverOutput(self) -> None:
        """
        From now on write standard output and error where the old process
        writes them, instead of to the pipes the old process logs.

        Python's buffered output is flushed first; the inherited descriptors
        are moved onto 1 and 2 and closed.  Doing it again does nothing.
        """
        if self._outputTaken or self.outputDescriptors is None:
            return
        flushPythonOutput()
        stdout, stderr = self.outputDescriptors
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.close(stdout)
        os.close(stderr)
        self._outputTaken = True


def _descriptor(variable: str, text: str) -> int:
    if _DECIMAL.fullmatch(text) is None:
        raise HandoffEnvironmentError(f"{variable}={text!r} is not a descriptor number")
    fd = int(text)
    if fd < 3:
        raise HandoffEnvironmentError(
            f"{variable}={text!r} names standard input, output or error"
        )
    return fd


def _checkOpen(variable: str, fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        raise HandoffEnvironmentError(
            f"{variable} names descriptor {fd}, which is not open ({e.strerror})"
        ) from None


def inheritedHandoff(
    environ: MutableMapping[str, str] | None = None,
) -> InheritedHandoff | None:
    """
    Find what this process inherited from the process it succeeds.

    The hand-off variables are removed from the environment whatever they
    say, so that nothing this process starts inherits them; call this once,
    early.  The inherited descriptors are made close-on-exec.

    @param environ: The environment, L{os.environ} by default.

    @return: What was inherited, or L{None} if this process was not started
        as a successor.

    @raise HandoffEnvironmentError: If the variables are malformed or name
        descriptors that are not open (or, for the hand-off, not a socket).
    """
    if environ is None:
        environ = os.environ
    rawHandoff = environ.pop(HANDOFF_FD_VARIABLE, None)
    rawOutput = environ.pop(OUTPUT_FDS_VARIABLE, None)
    if rawHandoff is None and rawOutput is None:
        return None
    if rawHandoff is None:
        raise HandoffEnvironmentError(
            f"{OUTPUT_FDS_VARIABLE} is set but {HANDOFF_FD_VARIABLE} is not"
        )
    handoff = _descriptor(HANDOFF_FD_VARIABLE, rawHandoff)
    output: tuple[int, int] | None = None
    if rawOutput is not None:
        parts = rawOutput.split(",")
        if len(parts) != 2:
            raise HandoffEnvironmentError(
                f"{OUTPUT_FDS_VARIABLE}={rawOutput!r} is not two descriptor "
                "numbers separated by a comma"
            )
        stdout, stderr = (_descriptor(OUTPUT_FDS_VARIABLE, part) for part in parts)
        output = (stdout, stderr)
        if len({handoff, stdout, stderr}) != 3:
            raise HandoffEnvironmentError(
                f"{HANDOFF_FD_VARIABLE}={rawHandoff!r} and "
                f"{OUTPUT_FDS_VARIABLE}={rawOutput!r} name the same descriptor "
                "twice"
            )
    if not stat.S_ISSOCK(_checkOpen(HANDOFF_FD_VARIABLE, handoff).st_mode):
        raise HandoffEnvironmentError(
            f"{HANDOFF_FD_VARIABLE} names descriptor {handoff}, which is not "
            "a socket"
        )
    for fd in output or ():
        _checkOpen(OUTPUT_FDS_VARIABLE, fd)
    for fd in (handoff, *(output or ())):
        os.set_inheritable(fd, False)
    return InheritedHandoff(handoff, output)
