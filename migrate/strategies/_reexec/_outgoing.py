# -*- test-case-name: migrate.test.test_reexec -*-
"""
The old image's side of a re-exec: check that the process can replace
itself, freeze and describe everything it serves, and C{execv} the same
command line in place, keeping the PID, the listening sockets and the
established connections.

Once C{execv} has succeeded there is no way back, so everything that can be
checked is checked first, while the service goes on (see
L{migrate.strategies._reexec._check}, and a dry run of every connection's state
capture); any
failure there refuses the migration and changes nothing.  That dry run is
also the I{pre-copy}: every movable connection is described ahead, a slice
at a time, while the service goes on (L{_Precopy}).  Only then are the
connections that cannot be carried over closed (C{--reexec-unmovable
close}), the others frozen, those whose state changed since their copy
described again in the state document
(L{migrate.strategies._reexec._state}), exactly the descriptors the new image needs made
inheritable, and C{execv} called.  If C{execv} itself fails, everything is
put back as it was and the migration reports a rollback.

What C{exec} does not keep, and how it is handled:

  - Python's buffers: standard output and error are flushed first (the log
    observers flush each event);
  - C{atexit} handlers: none run; the process does not exit;
  - threads: a migration is refused while the reactor's thread pool works,
    and rolled back at the last moment if a thread handed the reactor work
    since (L{migrate.strategies._reexec._check.workInFlight});
  - signal handlers: they are reset to their defaults, which end the
    process for C{SIGHUP}, C{SIGINT}, C{SIGTERM} and C{SIGUSR1}.  Those
    signals are blocked from the freeze and across C{exec} (the mask and
    the pending signals survive it); the new image unblocks them once the
    reactor and the host have installed their handlers, and a signal that
    arrived meanwhile is delivered then.
"""

from __future__ import annotations

import base64
import errno
import os
import signal
import socket
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

from attrs import define, evolve, field
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.logger import Logger

from ..._handoff._attempt import MigrationAttempt, counted
from ..._handoff._listeners import listenerDescriptor, pauseListener
from ..._handoff._movement import describeMovable, whyNotMigratable
from ..._handoff._movers._endings import closePolitely
from ..._handoff._polls import afterPolls
from ..._handoff._safepoint import atSafePoints
from ..._handoff._slices import timedChunks
from ..._handoff._successor import flushPythonOutput, successorCommandLine
from ..._handoff._threadwork import waitForThreadWork
from ..._handoff._transport import pendingOutput, quiet
from ..._handoff._trial import TrialOutcome, casesFrom, runTrial
from ..._host._heap import collectionsPaused, freezeNewObjects, freezeUntilExit
from ..._report import ListenerReport, MigrationOutcome, MigrationPhase, MigrationReport
from ..._systemd import successorEnvironment
from ...interfaces import IMigratable, IMigrationHost
from ...state import (
    NotAtSafePoint,
    StateError,
    StateFingerprint,
    captureProtocolState,
    isMigratable,
    unchangedSince,
)
from ._caretaker import (
    CARETAKER_PROTOCOL,
    CARETAKER_VARIABLE,
    CaretakerChannel,
    CaretakerError,
    HandOverAborted,
    dieWithParent,
    libcPrctl,
)
from ._check import (
    checkDescriptorLimit,
    checkProgram,
    refusalReason,
    workInFlight,
)
from ._reports import quietChannel
from ._state import (
    EXEC_AT_VARIABLE,
    FORMAT_VERSION,
    PREFLIGHT_MARKER,
    PREFLIGHT_VARIABLE,
    REEXEC_SIGNALS,
    STATE_FD_VARIABLE,
    InheritedConnection,
    Precopy,
    ReexecState,
    writeState,
)
from ._threads import forkRefusal, freshThreadPool

__all__ = [
    "UNMOVABLE_POLICIES",
    "DescriptorMarks",
    "ReexecMigration",
    "inheritableDescriptors",
]

_log = Logger()

UNMOVABLE_POLICIES = ("close", "adopt")
"""
What C{--reexec-unmovable} accepts: I{close} connections whose protocol
does not provide L{migrate.IMigratable} cleanly before the exec, or
I{adopt} them with a fresh protocol of the new code.
"""


@define
class DescriptorMarks:
    """
    The inheritance flags changed for one exec, to undo if it fails.

    @ivar changed: the previous flag of each descriptor changed.
    @ivar strays: the descriptors that were inheritable though nothing
        needed them (made close-on-exec).
    """

    changed: dict[int, bool] = field(factory=dict)
    strays: list[int] = field(factory=list)

    @classmethod
    def apply(
        cls,
        keep: Iterable[int],
        *,
        openDescriptors: Callable[[], Iterable[int]] | None = None,
        getInheritable: Callable[[int], bool] = os.get_inheritable,
        setInheritable: Callable[[int, bool], None] = os.set_inheritable,
    ) -> DescriptorMarks:
        """
        Make exactly C{keep} and the standard streams inheritable, and
        every other open descriptor close-on-exec.

        @param keep: the descriptors the new image inherits.
        @param openDescriptors: lists this process's open descriptors
            (default: C{/proc/self/fd}).

        @return: what changed, to L{undo}.
        """
        wanted = set(keep)
        marks = cls()
        listing = openDescriptors if openDescriptors is not None else _openDescriptors
        try:
            for fd in sorted(set(listing()) | wanted):
                if fd <= 2 and fd not in wanted:
                    continue
                try:
                    current = getInheritable(fd)
                except OSError:
                    continue
                target = fd in wanted
                if current != target:
                    setInheritable(fd, target)
                    marks.changed[fd] = current
                    if current:
                        marks.strays.append(fd)
        except BaseException:
            marks.undo(setInheritable=setInheritable)
            raise
        return marks

    def undo(
        self, *, setInheritable: Callable[[int, bool], None] = os.set_inheritable
    ) -> None:
        """
        Put every flag back.
        """
        for fd, previous in self.changed.items():
            try:
                setInheritable(fd, previous)
            except OSError:
                pass
        self.changed.clear()


def _openDescriptors() -> list[int]:
    """
    This process's open descriptors.
    """
    listing = os.listdir("/proc/self/fd")
    return [int(name) for name in listing]


def inheritableDescriptors(
    openDescriptors: Callable[[], Iterable[int]] = _openDescriptors,
    getInheritable: Callable[[int], bool] = os.get_inheritable,
) -> list[int]:
    """
    The descriptors an C{exec} now would pass on.
    """
    found = []
    for fd in openDescriptors():
        try:
            if getInheritable(fd):
                found.append(fd)
        except OSError:
            pass
    return sorted(found)


PRECOPY_SLICE = 100
"""
How many connections the trial's cases and the pre-copy describe in one
reactor step.  Between two slices the reactor polls twice (L{afterPolls}):
the first poll reads the requests that arrived during the slice, the
second writes their answers.  One turn through C{callLater(0)} was not
enough: from an I/O event (the upgrade command, the end of the preflight
child) the next slice ran before any poll, and an answer read between two
slices is only written at the next poll.  With 500 connections a slice
(30 to 36 ms of CPU for the trial's cases on a loaded two-CPU machine), the
first two slices ran back to back and probes waited 80 to 120 ms at the
start of a re-exec.  A slice of 100 costs 3 to 7 ms.
"""


PRECOPY_SLICE_SECONDS = 0.004
"""
The longest a pre-copy slice runs, in seconds, before the reactor polls
again, however few of its L{PRECOPY_SLICE} connections it copied (one at
least): on a loaded machine, or with large states, 100 connections can
take much longer than the 3 to 7 ms they take idle.  As for module
reload's pre-copy.
"""

HAND_OVER_POLLS = 2
"""
How many times the reactor polls between the pre-copy's end, the wait for
the safe points and the plan (L{afterPolls}).  Run in one reactor step,
they kept every client waiting 41 ms (36.8 ms of CPU) with 10,000 idle
connections: the pre-copy's last slice and its write (7 ms), the safe
points (22 ms: every connection is asked, and held), the plan (7 ms).
"""


class _Rollback(Exception):
    """
    The re-exec cannot go on; the message says why.
    """


def _describe(error: BaseException) -> str:
    if isinstance(error, _Rollback):
        return str(error)
    text = str(error)
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def _execve(path: str, argv: list[str], env: dict[str, str]) -> None:
    os.execve(path, argv, env)


def _softLimit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stillOpen(hosted: Any) -> bool:
    """
    Whether a connection being closed has not gone yet.
    """
    transport = hosted.transport
    return transport is not None and not getattr(transport, "disconnected", True)


@define
class _Kept:
    """
    A connection copied ahead of the freeze (see L{_Precopy}).

    @ivar ident: its number in the manifest.
    @ivar descriptor: its socket's descriptor.
    @ivar fingerprint: what tells, at the freeze, whether it changed since.
    @ivar row: what L{Precopy.add} writes for it, until written.
    """

    ident: int
    descriptor: int
    hosted: Any
    protocol: Any
    transport: Any
    fingerprint: StateFingerprint
    row: tuple[Any, ...] = field(default=(), repr=False)


def _addresses(transport: Any) -> dict[str, Any]:
    """
    The addresses of a TCP connection for its manifest entry (the new image
    answers C{getPeer} and C{getHost} from them until it adopts the socket),
    or nothing for another kind of socket (adopted at once).
    """
    sock = transport.socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return {}
    try:
        return {"peer": list(sock.getpeername()), "local": list(sock.getsockname())}
    except OSError:
        return {}


def _connectionDescriptors(host: IMigrationHost, leaving: set[int]) -> list[int]:
    """
    The descriptor of every connection the host serves, but those in
    C{leaving} (by C{id()}): what a caretaker may hand over, so what the new
    image inherits.
    """
    found = []
    for listener, hosted in host.allConnections():
        transport = hosted.transport
        if id(hosted) in leaving or transport is None or hosted.released:
            continue
        try:
            fd = int(transport.fileno())
        except Exception:
            continue
        if fd > 2:
            found.append(fd)
    return found


@define
class _ForkedCaretaker:
    """
    Forking the caretaker (see L{migrate.strategies._reexec._caretaker}), up
    to the exec.

    @ivar ours: the caretaker's end of the channel (close-on-exec).
    @ivar theirs: the new image's end (inherited).
    @ivar pid: the caretaker's process, once forked.
    """

    ours: socket.socket
    theirs: socket.socket
    pid: int = 0
    _verdict: int = -1

    @classmethod
    def prepare(cls) -> _ForkedCaretaker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours, theirs)

    def fork(
        self, fork: Callable[[], int], release: Callable[[], None] = lambda: None
    ) -> bool:
        """
        Fork the caretaker.

        @return: C{True} in the caretaker, once the parent's C{execv} has
            succeeded (the parent's end of a close-on-exec pipe closed);
            C{False} in the parent.  A caretaker whose parent's exec failed
            or that could not wait exits at once.

        @param release: called in the caretaker at once: lets go of what
            the new image binds again under the same name.
        """
        parent = os.getpid()
        # Looked up here: find_library would run ldconfig in the child.
        prctl = libcPrctl()
        readEnd, writeEnd = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12 on warns of any fork beside other threads: the
                # only ones allowed here are idle workers of the reactor's
                # thread pool, which the caretaker does not use (forkRefusal).
                warnings.filterwarnings(
                    "ignore", ".*multi-threaded.*fork", DeprecationWarning
                )
                pid = fork()
        except BaseException:
            os.close(readEnd)
            os.close(writeEnd)
            raise
        if pid == 0:
            try:
                os.close(writeEnd)
                self.theirs.close()
                release()
                # Once the exec succeeded there is no old image to return
                # to: the caretaker must not outlive the new one.
                dieWithParent(prctl=prctl)
                verdict = os.read(readEnd, 1)
                os.close(readEnd)
            except BaseException:
                os._exit(70)
            if verdict or os.getppid() != parent:
                os._exit(0)
            return True
        os.close(readEnd)
        self.pid = pid
        self._verdict = writeEnd
        return False

    def channel(self) -> CaretakerChannel:
        """
        In the caretaker: its end of the channel.
        """
        return CaretakerChannel(self.ours)

    def abandon(self) -> None:
        """
        In the old image, when the exec failed or did not happen: end the
        caretaker before it serves anything, and close the channel.
        """
        if self.pid:
            try:
                os.write(self._verdict, b"x")
            except OSError:
                pass
            os.close(self._verdict)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0
        self.ours.close()
        self.theirs.close()


@define
class _Precopy:
    """
    Every movable connection described while the old image still serves,
    written ahead into a memory file: at the freeze only the connections
    whose state changed since (or that have output to carry, or are new)
    are described again.

    @ivar descriptor: the memory file's.
    @ivar kept: by C{id()} of the hosted protocol, what was copied.
    """

    descriptor: int
    kept: dict[int, _Kept]

    def sort(
        self, candidates: list[tuple[Any, Any]]
    ) -> tuple[list[tuple[Any, Any]], list[int], list[int]]:
        """
        Compare every connection with its copy.

        @return: the connections to describe again (changed or new), the
            numbers of the copied ones superseded (changed or gone), and the
            descriptors of the copied ones that still hold.
        """
        again = []
        holding = set()
        kept = self.kept
        for listener, hosted in candidates:
            copied = kept.get(id(hosted))
            # The same connection, no output held, not closing, the same
            # state: this runs for every connection while the clients wait.
            if (
                copied is not None
                and hosted is copied.hosted
                and not hosted.released
                and hosted.wrappedProtocol is copied.protocol
                and hosted.transport is copied.transport
                and quiet(copied.transport)
                and unchangedSince(copied.protocol, copied.fingerprint)
            ):
                holding.add(id(hosted))
            else:
                again.append((listener, hosted))
        superseded = []
        descriptors = []
        for key, copied in kept.items():
            if key in holding:
                descriptors.append(copied.descriptor)
            else:
                superseded.append(copied.ident)
        return again, superseded, descriptors

    def close(self) -> None:
        os.close(self.descriptor)


@define
class _Plan:
    """
    What happens to each connection, decided before anything is touched.
    """

    moving: int = 0
    fresh: int = 0
    closing: list[tuple[str, Any, str]] = field(factory=list)


@define
class ReexecMigration:
    """
    One re-exec of the serving host.

    @ivar host: the serving L{migrate.MigrationHost}.
    @ivar progress: called with a line at each step.
    @ivar unmovable: C{"close"} or C{"adopt"} (see L{UNMOVABLE_POLICIES}).
    @ivar execv: replaces the process image (C{os.execve}); returns only
        by raising.
    @ivar trialFailure: what a connection the new code fails on in the
        trial means: C{"refuse"} the migration, or C{"close"} it (see
        L{migrate._handoff._trial.TRIAL_POLICIES}).
    @ivar preflight: L{runTrial} or a stand-in: runs the preflight process,
        which loads the new code and tries it on every connection's state.
    @ivar checkArgv: L{checkProgram} or a stand-in.
    @ivar softLimit: returns the soft C{RLIMIT_NOFILE}.
    @ivar closeTimeout: seconds connections being closed may take to
        write their last output (default: the host's hand-off timeout).
    @ivar caretaker: whether a caretaker serves the connections while the new
        image starts (see L{migrate.strategies._reexec._caretaker}), when no
        thread runs.
    @ivar fork: C{os.fork} or a stand-in.
    @ivar exitProcess: C{os._exit} or a stand-in: how the caretaker ends.
    @ivar freezeHeap: L{freezeUntilExit} or a stand-in: what the caretaker
        calls once the new image asked for the connections.
    """

    host: IMigrationHost
    progress: Callable[[str], None]
    unmovable: str = "close"
    strategyName: str = "reexec"
    execv: Callable[[str, list[str], dict[str, str]], None] = _execve
    trialFailure: str = "refuse"
    preflight: Callable[..., Any] = runTrial
    checkArgv: Callable[[Sequence[str]], str | None] = checkProgram
    softLimit: Callable[[], int] = _softLimit
    closeTimeout: float | None = None
    caretaker: bool = False
    fork: Callable[[], int] = os.fork
    exitProcess: Callable[[int], None] = os._exit
    freezeHeap: Callable[[], None] = freezeUntilExit
    _closed: dict[str, int] = field(factory=dict)
    #: by C{id()}, the connections still closing at the exec, which the
    #: new image does not inherit: a caretaker leaves them out
    _notInherited: set[int] = field(factory=set)
    _trialClosing: dict[int, tuple[Any, str]] = field(factory=dict)
    _precopy: _Precopy | None = field(default=None, init=False)
    #: the caretaker's protocol the new code speaks, as its trial said
    _newCaretaker: int = field(default=0, init=False)
    _attempt: MigrationAttempt = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._attempt = MigrationAttempt(
            self.host, self.strategyName, self.progress, label="Re-exec"
        )

    def _step(self, message: str) -> None:
        self._attempt.step(message)

    @inlineCallbacks
    def run(self) -> Any:
        """
        Re-execute the host in place.

        @return: a L{Deferred} that fires with a refused or rolled-back
            L{MigrationReport}; after a successful C{execv} it never fires
            (the new image reports instead).
        """
        host = self.host
        if self.unmovable not in UNMOVABLE_POLICIES:
            return self._report(
                MigrationOutcome.refused,
                "unknown --reexec-unmovable policy {!r}".format(self.unmovable),
            )
        phaseDone = self._attempt.phaseDone
        try:
            argv = list(host.settings.successorArgv or successorCommandLine())
        except ValueError as e:
            return self._report(MigrationOutcome.refused, str(e))
        reason = refusalReason(host, argv, checkArgv=self.checkArgv)
        phaseDone("checks")
        if reason is not None:
            return self._refuse(reason)

        self._attempt.enter(MigrationPhase.spawning)
        self._step("trying the new code in a child process: {}".format(" ".join(argv)))
        # A slice of connections at a time, with two polls between slices
        # (see L{PRECOPY_SLICE}): copying and encoding every state at once
        # would keep every client waiting.
        connections = [
            (listener.key, hosted) for listener, hosted in host.allConnections()
        ]
        cases: list[Any] = []
        for start in range(0, len(connections), PRECOPY_SLICE):
            if start:
                yield afterPolls(host.reactor, 2)
            cases.extend(
                casesFrom(
                    connections[start : start + PRECOPY_SLICE],
                    len(cases) + 1,
                    encode=True,
                )
            )
            # Kept until the trial ends: out of the collections meanwhile
            # (see _copyAhead).
            freezeNewObjects()
        environment = successorEnvironment(os.environ)
        environment[PREFLIGHT_VARIABLE] = "1"
        for name in (STATE_FD_VARIABLE, EXEC_AT_VARIABLE):
            environment.pop(name, None)
        outcome: TrialOutcome = yield self.preflight(
            host.reactor,
            argv,
            cases,
            env=environment,
            timeout=host.settings.readyTimeout,
            policy=self.trialFailure,
            readyMarker=PREFLIGHT_MARKER,
            background=host.settings.startInBackground,
        )
        phaseDone("preflight")
        self._attempt.durations["trial"] = outcome.restoring
        self._attempt.trialRunEnded(outcome.passed)
        if not outcome.passed:
            self._attempt.successorLog[:] = list(outcome.output)
            return self._refuse(outcome.reason or "the trial failed")
        self._attempt.notes.extend(outcome.notes())
        # What the new image can take from this one: an older migrate
        # says nothing (it reads format 1, and knows no caretaker).
        reads = outcome.about.get("format", 1)
        if reads < FORMAT_VERSION:
            return self._refuse(
                "the new code reads state documents up to format {}; this "
                "image writes format {}".format(reads, FORMAT_VERSION)
            )
        self._newCaretaker = outcome.about.get("caretaker", 0)
        self._trialClosing = {
            id(case.connection): (case.connection, why) for case, why in outcome.closing
        }
        if not host.serving:
            return self._refuse("the host stopped serving during the checks")
        try:
            self._precopy = yield self._copyAhead()
        except _Rollback as e:
            phaseDone("precopy")
            return self._refuse(str(e))
        phaseDone("precopy")
        try:
            result = yield self._handOver(argv)
        finally:
            if self._precopy is not None:
                self._precopy.close()
                self._precopy = None
        return result

    @inlineCallbacks
    def _handOver(self, argv: list[str]) -> Any:
        """
        From the safe points to the exec (or its rollback).
        """
        host = self.host
        phaseDone = self._attempt.phaseDone
        self._attempt.enter(MigrationPhase.handingOff)
        # The pre-copy's end, the safe points and the plan each in a step
        # of their own (see L{HAND_OVER_POLLS}).  A connection accepted
        # meanwhile is not in the pre-copy: the plan and the freeze see it.
        yield afterPolls(host.reactor, HAND_OVER_POLLS)
        host.pauseAccepting()
        # Every connection that moves stays at its safe point from the plan
        # to the exec.
        safePoints = yield atSafePoints(
            host,
            self._attempt,
            holdAll=True,
            missedFate="they are closed politely before the exec",
        )
        phaseDone("safepoints")
        if not safePoints.missed:
            # Every connection with a safe point is held at it: the polls
            # change nothing the plan decides on that the two polls between
            # the plan and the freeze could not change as well.  One that
            # missed its safe point is not held: it could reach it now,
            # be planned to move, and leave it again before the freeze; so
            # then the plan follows the wait's end at once (that step is
            # short: the wait's long step was its first).
            yield afterPolls(host.reactor, HAND_OVER_POLLS)
        try:
            plan = self._plan()
            inherited = (
                3
                + 1
                + (1 if self._precopy is not None else 0)
                + len(host.listeners)
                + (1 if host.controlPort is not None else 0)
                + (1 if host.metricsPort is not None else 0)
                + plan.moving
                + plan.fresh
                + len(host.reportChannels)
                # With a caretaker: the channel to it, and the document it
                # passes at the hand-over.
                + (2 if self._caretakerRefusal() is None else 0)
            )
            limit = checkDescriptorLimit(inherited, self.softLimit())
            if limit is not None:
                raise _Rollback(limit)
        except _Rollback as e:
            safePoints.letGo()
            host.resumeAccepting()
            phaseDone("plan")
            return self._refuse(str(e))
        phaseDone("plan")

        remaining = yield self._closeUnmovable(plan.closing)
        phaseDone("close")
        self._step(
            "re-executing in place: {} to restore, {} to adopt, {} closed".format(
                counted(plan.moving, "connection"),
                plan.fresh,
                sum(self._closed.values()),
            )
        )
        # Two polls before the freeze: one reads the requests that arrived
        # while the plan ran (the clients would otherwise wait for the plan
        # and the whole exec), the next writes the answers, and the
        # progress for the requester.  The freeze then runs outside any
        # protocol's dataReceived.
        yield afterPolls(host.reactor, 2)
        reason = self._freezeAndExec(argv, remaining)
        if isinstance(reason, CaretakerChannel):
            # The caretaker: the new image has started in this process's
            # parent.  Serve until it asks for the connections; this never
            # returns.
            safePoints.letGo()
            yield self._serveAsCaretaker(reason)
            raise AssertionError("the caretaker returned")
        phaseDone("rollback")
        safePoints.letGo()
        host.resumeAccepting()
        self._step("rolled back: this image keeps serving")
        return self._report(MigrationOutcome.rolledBack, reason)

    @inlineCallbacks
    def _copyAhead(self) -> Any:
        """
        Describe every movable connection now, while this image still
        serves (a slice of L{PRECOPY_SLICE} connections at a time),
        and write the descriptions ahead (see L{_Precopy}).  Capturing each
        state is also the dry run: an application state that cannot be
        captured refuses the re-exec here.  A connection not at a safe point
        now, with output Twisted holds, or closing, is left to the plan and
        the freeze.

        @return: a L{Deferred} firing with the L{_Precopy}, or with L{None}
            if there is nothing to copy or it could not be written (the
            freeze then describes every connection).

        @raise _Rollback: (asynchronously) if a migratable protocol's state
            cannot be captured.
        """
        connections = list(self.host.allConnections())
        reactor = self.host.reactor
        precopy = Precopy()
        kept: dict[int, _Kept] = {}
        index = 0
        while index < len(connections):
            if index:
                yield afterPolls(reactor, 2)
            # PRECOPY_SLICE connections at most, and no more once the slice
            # has run PRECOPY_SLICE_SECONDS (one connection at least).
            rows = []
            for piece in timedChunks(
                connections,
                index,
                PRECOPY_SLICE,
                reactor,
                PRECOPY_SLICE_SECONDS,
                chunk=1,
            ):
                index += len(piece)
                for listener, hosted in piece:
                    copied = self._copyOne(len(kept) + 1, listener.key, hosted)
                    if copied is not None:
                        kept[id(hosted)] = copied
                        rows.append(copied.row)
            try:
                precopy.add(rows)
            except StateError as e:
                _log.warn(
                    "Re-exec: the connections could not be copied ahead "
                    "({why}); all are described at the freeze",
                    why=str(e),
                )
                return None
            # Out of the collections until the migration ends: a full
            # collection in a later step would otherwise walk every copy
            # made so far (15 ms at 10,000 connections).
            freezeNewObjects()
        if not kept:
            return None
        # The write (a few milliseconds for 10,000 connections) in a step
        # of its own, not after the last slice's.
        yield afterPolls(self.host.reactor, 2)
        try:
            descriptor = precopy.write()
        except Exception as e:
            _log.warn(
                "Re-exec: the connections could not be copied ahead ({why}); "
                "all are described at the freeze",
                why=_describe(e),
            )
            return None
        for each in kept.values():
            each.row = ()
        return _Precopy(descriptor, kept)

    def _copyOne(self, ident: int, key: str, hosted: Any) -> _Kept | None:
        """
        Copy one connection ahead, if it can be.

        @raise _Rollback: if its protocol provides L{IMigratable} and its
            state cannot be captured.
        """
        protocol = hosted.wrappedProtocol
        transport = hosted.transport
        if (
            protocol is None
            or hosted.released
            or id(hosted) in self._trialClosing
            or not isinstance(transport, Connection)
            or getattr(transport, "TLS", False)
            or not quiet(transport)
            or not isMigratable(protocol)
        ):
            return None
        try:
            # Encoded (Precopy.add) and fingerprinted in this same slice,
            # before the application runs again: no snapshot copy needed.
            state = captureProtocolState(protocol, snapshot=False)
        except NotAtSafePoint:
            return None
        except Exception as e:
            if IMigratable.providedBy(protocol):
                raise _Rollback(
                    "the state of a connection on {} cannot be carried "
                    "over: {}".format(key, _describe(e))
                )
            return None
        descriptor = int(transport.fileno())
        addresses = _addresses(transport)
        row = (
            ident,
            descriptor,
            key,
            int(transport.socket.family),
            state,
            addresses.get("peer"),
            addresses.get("local"),
        )
        return _Kept(
            ident,
            descriptor,
            hosted,
            protocol,
            transport,
            StateFingerprint.of(state, protocol),
            row,
        )

    def _refuse(self, reason: str) -> MigrationReport:
        _log.warn("Re-exec refused: {reason}", reason=reason)
        self._step("refused: " + reason)
        return self._report(MigrationOutcome.refused, reason)

    def _plan(self, lenient: bool = False) -> _Plan:
        """
        Decide the fate of every connection, and check that the state of
        each one that moves can be captured (a dry run: nothing is frozen).

        @param lenient: close a connection whose migratable protocol's
            state cannot be captured, instead of raising (the caretaker
            cannot roll back).

        @raise _Rollback: if a migratable protocol's state cannot be
            captured.
        """
        plan = _Plan()
        precopied = self._precopy.kept if self._precopy is not None else {}
        for listener, hosted in self.host.allConnections():
            protocol = hosted.wrappedProtocol
            transport = hosted.transport
            if protocol is None or hosted.released or id(hosted) in self._notInherited:
                continue
            tripped, why = self._trialClosing.get(id(hosted), (None, ""))
            if tripped is hosted:
                plan.closing.append(
                    (
                        listener.key,
                        hosted,
                        "the new code failed on it in the trial: " + why,
                    )
                )
                continue
            copied = precopied.get(id(hosted))
            if copied is not None and copied.hosted is hosted:
                # Captured ahead: at the freeze it is compared, and
                # captured again if it changed.
                plan.moving += 1
                continue
            plain = isinstance(transport, Connection) and not getattr(
                transport, "TLS", False
            )
            migratable = isMigratable(protocol)
            if plain and (migratable or self.unmovable == "adopt"):
                try:
                    captureProtocolState(protocol)
                except Exception as e:
                    # The application's own state refuses: the whole
                    # re-exec does.  A connection that did not reach a safe
                    # point in time, or one migrate's mover cannot carry
                    # (HTTP/2, a WebSocket that does not opt in), is closed
                    # politely instead; adopting it with a fresh protocol
                    # would answer its next request as if it were the one
                    # in flight.
                    if (
                        IMigratable.providedBy(protocol)
                        and not isinstance(e, NotAtSafePoint)
                        and not lenient
                    ):
                        raise _Rollback(
                            "the state of a connection on {} cannot be carried "
                            "over: {}".format(listener.key, _describe(e))
                        )
                    plan.closing.append(
                        (
                            listener.key,
                            hosted,
                            (
                                "its state cannot be captured: "
                                if migratable
                                else "its buffers cannot be captured: "
                            )
                            + _describe(e),
                        )
                    )
                    continue
                if migratable:
                    plan.moving += 1
                else:
                    plan.fresh += 1
            elif not plain:
                plan.closing.append((listener.key, hosted, "not a plain stream socket"))
            else:
                plan.closing.append((listener.key, hosted, whyNotMigratable(protocol)))
        return plan

    @inlineCallbacks
    def _closeUnmovable(self, closing: list[tuple[str, Any, str]]) -> Any:
        """
        Close cleanly the connections that cannot be carried over, and wait
        (up to L{closeTimeout}) until they are gone.

        @return: a L{Deferred} firing with those still open at the deadline
            (C{exec} closes them).
        """
        if not closing:
            return []
        for key, hosted, why in closing:
            _log.info(
                "Re-exec: closing a connection on {listener}: {why}",
                listener=key,
                why=why,
            )
            self._closed[key] = self._closed.get(key, 0) + 1
            # Between requests for HTTP/1.1, GOAWAY for HTTP/2, 1001 for a
            # WebSocket; otherwise (a response being written) once its
            # output is written, as for any other protocol.
            if not closePolitely(hosted):
                hosted.transport.loseConnection()
        timeout = self.closeTimeout
        if timeout is None:
            timeout = self.host.settings.handoffTimeout
        clock = self.host.reactor
        deadline = clock.seconds() + timeout
        while True:
            remaining = [each for each in closing if _stillOpen(each[1])]
            if not remaining or clock.seconds() >= deadline:
                break
            yield deferLater(self.host.reactor, 0.005, lambda: None)
        if remaining:
            note = "{} did not finish writing within {} s; exec closed " "{}".format(
                counted(len(remaining), "connection"),
                timeout,
                "it" if len(remaining) == 1 else "them",
            )
            _log.warn("Re-exec: {note}", note=note)
            self._attempt.notes.append(note)
        return [hosted for key, hosted, why in remaining]

    def _freezeAndExec(
        self, argv: list[str], stillClosing: list[Any]
    ) -> str | CaretakerChannel:
        """
        Describe the connections, pass exactly the descriptors needed, and
        exec.  Runs without giving the reactor a turn: from here on nothing
        reads, writes or serves a connection in this image, which is what
        freezes them (see L{describeMovable}).

        @return: why the exec did not happen (everything is as before), or,
            in the caretaker, its channel to the new image.
        """
        frozenAt = time.monotonic()
        # The cyclic collector's passes over a heap this size would add to
        # the clients' wait; nothing here makes garbage worth collecting.
        with collectionsPaused():
            return self._freezeAndExecUncollected(argv, stillClosing, frozenAt)

    def _freezeAndExecUncollected(
        self, argv: list[str], stillClosing: list[Any], frozenAt: float
    ) -> str | CaretakerChannel:
        host = self.host
        # From here on a signal waits, blocked, for the new image (which
        # unblocks it once its handlers are installed) or for a rollback:
        # its handler would only queue work for a reactor turn that never
        # comes in this image.
        current = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        blocked = [each for each in REEXEC_SIGNALS if each not in current]
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        stateFd: int | None = None
        marks: DescriptorMarks | None = None
        executing = False
        caretaker: _ForkedCaretaker | None = None
        try:
            refusal = self._caretakerRefusal()
            forking = refusal is None
            if refusal is not None and self.caretaker:
                note = "no caretaker served during the exec: {}".format(refusal)
                _log.warn("Re-exec: {note}", note=note)
                self._attempt.notes.append(note)
            precopied: list[int]
            if forking:
                # The caretaker describes the connections when the new image
                # asks; this document only names what the new image can
                # prepare meanwhile (the listeners, the pre-copy).
                state, precopied = self._prelude(frozenAt, blocked), []
            else:
                state, precopied = self._describeFrozen(
                    stillClosing, frozenAt, blocked, inCaretaker=False
                )
            stateFd = writeState(state, validate=False)
            keep = state.descriptors() + precopied + [stateFd]
            if forking:
                caretaker = _ForkedCaretaker.prepare()
                self._notInherited = {id(each) for each in stillClosing}
                keep.append(caretaker.theirs.fileno())
                keep.extend(_connectionDescriptors(host, self._notInherited))
            marks = DescriptorMarks.apply(keep)
            if marks.strays:
                _log.warn(
                    "Re-exec: descriptors {fds} were inheritable though nothing "
                    "needs them; made close-on-exec",
                    fds=marks.strays,
                )
            self._attempt.enter(MigrationPhase.committing)
            # Same pid after the exec: systemd's LISTEN_PID would still match,
            # but the listeners travel in the state, not through LISTEN_FDS.
            environment = successorEnvironment(os.environ)
            environment[STATE_FD_VARIABLE] = str(stateFd)
            if caretaker is None:
                _log.info(
                    "Re-exec: execv {argv} with {count} connections ({again} "
                    "described at the freeze), state in descriptor {fd}",
                    argv=argv,
                    count=len(state.connections) + len(precopied),
                    again=len(state.connections),
                    fd=stateFd,
                )
            else:
                _log.info(
                    "Re-exec: execv {argv}; a caretaker serves the connections "
                    "meanwhile and hands them over when the new image asks",
                    argv=argv,
                )
            flushPythonOutput()
            # A signal caught by another thread still had its handler run
            # here, and a thread may have handed the reactor a result.
            lost = workInFlight(host.reactor)
            if lost is not None:
                raise _Rollback(lost)
            if caretaker is not None:
                if caretaker.fork(self.fork, self._releaseForNewImage):
                    # The caretaker: the exec succeeded, serve again.
                    os.close(stateFd)
                    return caretaker.channel()
                environment[CARETAKER_VARIABLE] = "{},{}".format(
                    caretaker.theirs.fileno(), caretaker.pid
                )
            environment[EXEC_AT_VARIABLE] = repr(time.monotonic())
            executing = True
            self.execv(argv[0], argv, environment)
            raise OSError(errno.EINVAL, "execv returned")
        except Exception as e:
            if caretaker is not None:
                caretaker.abandon()
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            self._attempt.enter(MigrationPhase.rollingBack)
            reason = _describe(e)
            if executing:
                reason = "execv failed: " + reason
            _log.error("Re-exec failed, rolling back: {reason}", reason=reason)
            if marks is not None:
                marks.undo()
            if stateFd is not None:
                os.close(stateFd)
            # Nothing was frozen: the connections carry on as they were.
            return reason

    def _releaseForNewImage(self) -> None:
        """
        In the caretaker, before the new image starts: let go of what the
        new image binds again under the same name (the keeper's socket, see
        L{migrate._host._keeping.KeeperHome.releaseName}).
        """
        release = getattr(getattr(self.host, "keeper", None), "releaseName", None)
        if release is not None:
            release()

    def _caretakerRefusal(self) -> str | None:
        """
        Why no caretaker can serve while the new image starts, if none can:
        it is not asked for, the new code does not speak its protocol (an
        older migrate: it would restore the pre-copy's stale states beside
        the caretaker, and leave it to close every connection), or a thread
        other than an idle worker of the reactor's thread pool runs (see
        L{forkRefusal}).
        """
        if not self.caretaker:
            return "not asked for"
        if self._newCaretaker < CARETAKER_PROTOCOL:
            if not self._newCaretaker:
                return (
                    "the new code does not speak the caretaker's protocol (an "
                    "older migrate)"
                )
            return (
                "the new code speaks the caretaker's protocol {}, older than "
                "this image's {}".format(self._newCaretaker, CARETAKER_PROTOCOL)
            )
        return forkRefusal(self.host.reactor)

    def _prelude(self, frozenAt: float, blocked: Sequence[int]) -> ReexecState:
        """
        The document the new image reads as it starts when a caretaker
        serves meanwhile: everything but the connections, and the
        pre-copy, which it reads before asking the caretaker to freeze.
        """
        precopy = self._precopy
        return ReexecState(
            **self._documentFields(frozenAt, blocked, lenient=False),
            closed=dict(self._closed),
            precopy=None if precopy is None else precopy.descriptor,
        )

    def _documentFields(
        self, frozenAt: float, blocked: Sequence[int], *, lenient: bool
    ) -> dict[str, Any]:
        """
        What every state document of this image says besides the
        connections: the process, the listeners, the control socket and
        metrics endpoint (and its counters), the report so far, the
        draining generations.  The prelude says it too: a new image whose
        caretaker does not hand over serves from the prelude alone.
        """
        host = self.host
        return dict(
            pid=host.pid,
            generation=host.generation,
            strategy=self.strategyName,
            listeners=self._listenerDescriptors(),
            control=(
                listenerDescriptor(host.controlPort)
                if host.controlPort is not None
                else None
            ),
            metrics=(
                listenerDescriptor(host.metricsPort)
                if host.metricsPort is not None
                else None
            ),
            durations=dict(self._attempt.durations),
            notes=tuple(self._attempt.notes),
            frozenAt=frozenAt,
            blockedSignals=tuple(blocked),
            reporters=self._reporters(lenient=lenient),
            draining=tuple(dict(each) for each in host.draining.values()),
            metricsCarried=(
                host.metrics.carried() if host.metrics is not None else None
            ),
        )

    def _listenerDescriptors(self) -> dict[str, int]:
        return {
            key: listenerDescriptor(listener.port)
            for key, listener in self.host.listeners.items()
            if listener.port is not None
        }

    def _describeFrozen(
        self,
        stillClosing: list[Any],
        frozenAt: float,
        blocked: Sequence[int],
        *,
        inCaretaker: bool,
    ) -> tuple[ReexecState, list[int]]:
        """
        Describe every connection for the new image: those copied ahead
        compared with their copy, the others and the changed ones
        described now.

        @param inCaretaker: whether the caretaker describes them: it cannot
            roll back, so a connection that cannot be described is left to
            close rather than rolling back, and the new image has read the
            pre-copy already.

        @return: the state document and the descriptors of the pre-copied
            connections that hold.
        """
        host = self.host
        leaving = {id(each) for each in stillClosing} | self._notInherited
        candidates = [
            (listener, hosted)
            for listener, hosted in host.allConnections()
            if id(hosted) not in leaving
        ]
        precopy = self._precopy
        superseded: list[int] = []
        precopied: list[int] = []
        firstIdent = 1
        if precopy is not None:
            candidates, superseded, precopied = precopy.sort(candidates)
            firstIdent = len(precopy.kept) + 1
        moving, staying = describeMovable(candidates, firstIdent)
        closed = dict(self._closed)
        connections = [
            InheritedConnection(
                each.descriptor(),
                each.listenerKey,
                dict(each.entry, **_addresses(each.transport)),
                closing=bool(each.transport.disconnecting),
            )
            for each in moving
        ]
        connections.extend(
            self._describeFresh(
                staying, firstIdent - 1 + len(moving), closed, lenient=inCaretaker
            )
        )
        state = ReexecState(
            **self._documentFields(frozenAt, blocked, lenient=inCaretaker),
            connections=tuple(connections),
            closed=closed,
            precopy=None if precopy is None or inCaretaker else precopy.descriptor,
            superseded=tuple(superseded),
        )
        return state, precopied

    @inlineCallbacks
    def _serveAsCaretaker(self, channel: CaretakerChannel) -> Any:
        """
        In the caretaker: serve until the new image asks for the
        connections, bring them to their safe points, describe them, hand
        them over and exit once the new image has committed (or, if it
        could not take them, once they are closed politely).  Never
        returns (L{exitProcess}): the new image reports the migration.
        Whatever fails here ends this process (with a critical log line):
        it must never go on as a host beside the new image.
        """
        code = 1
        try:
            code = yield self._caretake(channel)
        except BaseException:
            _log.failure("Re-exec: the caretaker failed; it exits")
        flushPythonOutput()
        self.exitProcess(code)

    @inlineCallbacks
    def _caretake(self, channel: CaretakerChannel) -> Any:
        """
        The caretaker's work (see L{_serveAsCaretaker}).

        @return: a L{Deferred} firing with this process's exit status.
        """
        host = self.host
        attempt = self._attempt
        reactor = host.reactor
        # The new image accepts on them once it serves: a control or
        # metrics client accepted here would be cut off when this process
        # exits.  (Its epoll is this process's own since the exec.)
        for port in (host.controlPort, host.metricsPort):
            if port is not None:
                pauseListener(port)
        freshThreadPool(reactor)
        _log.info(
            "Re-exec: the new image starts in process {pid}; caretaker "
            "process {caretaker} serves its connections meanwhile",
            pid=os.getppid(),
            caretaker=os.getpid(),
        )
        attempt.step(
            "the new image starts; caretaker process {} serves meanwhile".format(
                os.getpid()
            )
        )
        servedFrom = time.monotonic()
        asked = channel.freezeRequested(reactor)
        limit = host.settings.readyTimeout

        def giveUp() -> None:
            if not asked.called:
                asked.errback(
                    CaretakerError("it did not ask for them within {} s".format(limit))
                )

        timer = reactor.callLater(limit, giveUp)
        try:
            yield asked
        except CaretakerError as e:
            # An image that cannot take them (it failed): end them
            # politely, so that their clients come back to the new image.
            _log.critical(
                "Re-exec: the new image will not take the connections ({why}); "
                "the caretaker closes them politely and exits",
                why=str(e),
            )
            yield self._closeEverything("the new image did not take it")
            return 1
        finally:
            if timer.active():
                timer.cancel()
        attempt.durations["caretaker"] = time.monotonic() - servedFrom
        # From here to the exit the new image waits for this process, and
        # its clients from the freeze on: a full collection (47 ms at
        # 10,000 connections, just before the freeze) would walk every
        # object this process holds.  It exits within a few bounded steps,
        # so none of them needs collecting.
        self.freezeHeap()
        attempt.startPhase()
        # Held at their safe points until the exchange ends: this process
        # then exits, and never serves them again.
        safePoints = yield atSafePoints(
            host,
            attempt,
            holdAll=True,
            missedFate="they are closed before the hand-over",
        )
        plan = self._plan(lenient=True)
        remaining = yield self._closeUnmovable(plan.closing)
        yield afterPolls(reactor, 2)
        yield self._threadWorkDone(host.settings.safePointTimeout)
        # Safe points, closing what cannot move, two polls: the
        # caretaker's own, not the old image's phases of the same names.
        attempt.phaseDone("settle")
        frozenAt = time.monotonic()
        with collectionsPaused():
            state, precopied = self._describeFrozen(
                remaining, frozenAt, [], inCaretaker=True
            )
            durations = dict(state.durations)
            durations["capture"] = time.monotonic() - frozenAt
            document = writeState(evolve(state, durations=durations), validate=False)
            _log.info(
                "Re-exec: the caretaker hands over {count} connections ({again} "
                "described again)",
                count=len(state.connections) + len(precopied),
                again=len(state.connections),
            )
            flushPythonOutput()
            try:
                # No deadline: the new image holds every socket already,
                # and this process dies with it (PR_SET_PDEATHSIG).
                why = channel.handOver(document, None)
            except HandOverAborted as e:
                why = str(e)
                aborted = True
            else:
                aborted = False
            finally:
                os.close(document)
        if aborted:
            # Nothing was let go of here: the connections are as they were
            # at their safe points, with their output.  The new image has
            # closed its copies; end them politely, as if it never asked.
            _log.critical(
                "Re-exec: {why}; the caretaker closes the connections politely "
                "and exits",
                why=why,
            )
            safePoints.letGo()
            yield self._closeEverything("the new image could not take it")
            return 1
        if why is not None:
            _log.warn(
                "Re-exec: the caretaker handed over, but {why}; it exits (the "
                "new image holds every socket)",
                why=why,
            )
        return 0

    def _closeEverything(self, why: str) -> Any:
        """
        In the caretaker, when the new image does not take the
        connections: close politely every one it serves, so that their
        clients come back to the new image.

        @return: a L{Deferred} firing once they are gone (or the close
            timeout passed).
        """
        return self._closeUnmovable(
            [
                (listener.key, hosted, why)
                for listener, hosted in self.host.allConnections()
                if id(hosted) not in self._notInherited
            ]
        )

    @inlineCallbacks
    def _threadWorkDone(self, timeout: float) -> Any:
        """
        In the caretaker, its connections held: go on running the reactor
        until no thread pool job runs and no call from another thread
        waits for it, within C{timeout} seconds.  This process exits after
        the hand-over: a thread's result it had not delivered by then
        would be lost (the old image refuses to exec for the same reason;
        the caretaker cannot roll back, so it waits).
        """
        reactor = self.host.reactor
        lost = workInFlight(reactor)
        if lost is None:
            return
        _log.info(
            "Re-exec: the caretaker waits up to {timeout} s for work in flight: {why}",
            timeout=timeout,
            why=lost,
        )
        left = yield waitForThreadWork(reactor, reactor.seconds() + timeout)
        if left is not None:
            note = (
                "the caretaker handed over with work still in flight after "
                "{} s, whose results are lost: {}".format(timeout, left.describe())
            )
            _log.critical("Re-exec: {note}", note=note)
            self._attempt.notes.append(note)

    def _reporters(self, lenient: bool = False) -> tuple[tuple[int, int], ...]:
        """
        The channels older generations report their draining over, for
        the new image.

        @param lenient: leave out, with a log line, a channel that cannot
            cross now (the caretaker cannot roll back; the new image then
            no longer shows that generation's draining).

        @raise _Rollback: if one cannot cross C{exec} now.
        """
        found = []
        for viaPid, channel in sorted(self.host.reportChannels.items()):
            why = quietChannel(channel)
            if why is not None and lenient:
                _log.warn(
                    "Re-exec: process {pid} reports its draining over a channel "
                    "that cannot be handed over now ({why}); the new image will "
                    "not show it",
                    pid=viaPid,
                    why=why,
                )
                continue
            if why is not None:
                raise _Rollback(
                    "process {} reports its draining over a channel that "
                    "cannot cross exec now: {}".format(viaPid, why)
                )
            found.append((int(channel.transport.fileno()), viaPid))
        return tuple(found)

    def _describeFresh(
        self,
        staying: list[Any],
        numbered: int,
        closed: dict[str, int],
        *,
        lenient: bool = False,
    ) -> list[InheritedConnection]:
        """
        Describe the connections handed to a fresh protocol of the new code
        (C{--reexec-unmovable adopt}) with their buffers; count in
        C{closed} those left for C{exec} to close.

        @param numbered: how many connections the manifest numbers already.
        @param lenient: leave a migratable protocol whose state cannot be
            captured to close, instead of raising (the caretaker cannot roll
            back).

        @raise _Rollback: if a migratable protocol's state could not be
            captured after all (it changed since the dry run).
        """
        described: list[InheritedConnection] = []
        for each in staying:
            protocol = each.hosted.wrappedProtocol
            if IMigratable.providedBy(protocol) and not lenient:
                raise _Rollback(
                    "the state of a connection on {} cannot be carried over: "
                    "{}".format(each.listenerKey, each.reason)
                )
            transport = each.hosted.transport
            plain = isinstance(transport, Connection) and not getattr(
                transport, "TLS", False
            )
            why = each.reason
            # A protocol migrate has a mover for is never adopted fresh (see
            # _plan): exec closes it.
            if self.unmovable == "adopt" and plain and not isMigratable(protocol):
                try:
                    state = captureProtocolState(protocol)
                    output = pendingOutput(transport)
                except Exception as e:
                    why = _describe(e)
                else:
                    entry = {
                        "id": numbered + len(described) + 1,
                        "listener": each.listenerKey,
                        "state": state.toPlain(),
                        "output": base64.b64encode(output).decode("ascii"),
                    }
                    described.append(
                        InheritedConnection(
                            int(transport.fileno()),
                            each.listenerKey,
                            entry,
                            fresh=True,
                            closing=bool(transport.disconnecting),
                        )
                    )
                    continue
            _log.warn(
                "Re-exec: a connection on {listener} cannot be carried over "
                "({why}); exec closes it",
                listener=each.listenerKey,
                why=why,
            )
            closed[each.listenerKey] = closed.get(each.listenerKey, 0) + 1
        return described

    def _report(self, outcome: MigrationOutcome, reason: str | None) -> MigrationReport:
        return self._attempt.report(
            outcome,
            reason,
            listeners=[
                ListenerReport(key, failed=self._closed.get(key, 0))
                for key in self.host.listeners
            ],
        )
