# -*- test-case-name: migrate.test.test_reload -*-
"""
Module reload: the application's new code is loaded into the running
process, and its live protocols are upgraded in place.

No process starts, no socket moves, the PID stays: the new modules are
imported beside the old ones, the listeners' factories are rebuilt by the
new code, and each established connection's protocol object is either
rebuilt by the new code from its state (L{IMigratable} protocols) or given
its class's new code in place (C{__class__} assignment, where that is
safe).  What cannot be upgraded stays on the old code, and the report says
so.

It is all or nothing.  Everything is prepared first, with nothing live
touched: the new modules are imported under their own names, the new
factory is built, every migratable protocol's state is taken from the old
object, upgraded and restored into a new one (whose writes are held).  A
module that does not import, a factory that cannot be built, or a state the
new code refuses rolls it all back: C{sys.modules} exactly as it was, every
protocol on the old code, and a report naming what failed.  Only then does
it commit, in one step of the reactor (the I{pause}): new modules stay,
classes are swapped, factories swapped.

Around the pause: before it, while the old code serves, every migratable
connection's state is copied, a slice of connections per turn of the
reactor (L{ReloadAttempt.copyStates}: the I{pre-copy}, which the trial
uses too); the pause restores from each copy whose connection did not
change since (L{migrate.state.unchangedSince}) rather than capturing the
state again.  After it, each rebuilt connection is I{switched} to its new
protocol object (transport re-pointed, held writes written, buffered
input replayed), a slice per turn of the reactor, or before its next event
if that comes first (L{HostedProtocol.finishBeforeNextEvent
<migrate._host._tracking.HostedProtocol.finishBeforeNextEvent>}); the
report is made once every connection is switched.

Right before the pause, while the old code serves, the reload lets the
answers the reactor's threads owe (C{deferToThread}, C{callFromThread})
land, as capability transfer does before its freeze
(L{migrate._handoff._threadwork}): their callbacks are bound to the old
protocol objects, which the pause replaces
(L{ReloadAttempt._pauseOnceThreadsDone}).

An application that registers each connection in shared state in
C{restoreMigrationState} (a chat room) must know every connection before
the new code serves any, so every restore happens before the commit.  By
default it happens in the pause.  A protocol that can I{abandon} a restore
(it defines C{abandonMigrationState}, see L{IMigratable}) is restored
I{ahead} of the pause instead (L{ReloadAttempt.restoreAhead}): the new
code is imported and its factory built in a step of their own, the new
modules then wait outside C{sys.modules} (L{ModuleStaging.park}: the old
code, which serves meanwhile, finds what it always found), and each
connection is restored into its new object a slice per turn of the
reactor, its writes held, no event reaching it.  The pause then only
checks each connection against the state its new object was restored
from (L{migrate.state.unchangedSince}); for one that changed since, the
object restored ahead is abandoned (its held writes dropped,
C{abandonMigrationState} undoing its registrations) and a fresh one is
restored from the state taken in the pause; an object restored ahead for
a connection closed since is abandoned too.  A refusal, ahead or in the
pause, or an abandon that fails, rolls everything back as before: the
new factory and every object restored ahead are dropped with the new
modules.

Why replace migratable protocol objects rather than swap their class (as
L{twisted.python.rebuild} does)?  A new object built by the new factory
and restored from upgraded state runs the new code entirely: its
attributes are in the new shape (C{upgradeMigrationState}), it belongs to
the new factory (which rebuilds its own bookkeeping, such as chat rooms,
through C{restoreMigrationState}), and none of C{rebuild}'s blind spots
apply (slotted classes, attributes in an old shape, C{Factory.forProtocol}
holding the old class).  The real transport never notices: the object
between it and the application (L{migrate._host._tracking.HostedProtocol}) is
simply pointed at the new protocol.  For protocols that do not opt in there
is no state to carry, so the best that can be done is C{__class__}
assignment, which is refused where Python would refuse it or where it
cannot be complete.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..._handoff._attempt import MigrationAttempt, counted
from ..._handoff._migrated import tellMigrated
from ..._handoff._movement import describePeer
from ..._handoff._movers._registry import movers
from ..._handoff._slices import timedChunks
from ..._handoff._threadwork import ThreadWork, waitForThreadWork, workInFlight
from ..._handoff._trial import _MAX_LINE as MAX_CASE_LINE
from ..._handoff._trial import TrialCase, TrialOutcome
from ..._handoff._trial import _peerOf as peerOf
from ..._host._heap import collectionsPaused, freezeNewObjects
from ..._report import ListenerReport, MigrationOutcome, MigrationPhase, MigrationReport
from ...interfaces import IMigratable, IMigrationHost
from ...state import (
    ProtocolState,
    StateError,
    StateFingerprint,
)
from ...state import _encodeForComparison as encodePlain
from ...state import (
    captureProtocolState,
    isMigratable,
    replayBufferedInput,
    restoreProtocolState,
    unchangedSince,
)
from ._modules import (
    DetachedTransport,
    HeldTransport,
    ModuleFingerprints,
    ModuleStaging,
    ReloadFailed,
    classSwapProblem,
    counterpart,
    describeError,
    findApplicationModules,
    hostModuleReason,
    modulesToReload,
)
from ._safety import boundedImport

__all__ = ["FINGERPRINTS", "PRECOPY_SLICE_SECONDS", "ReloadAttempt"]

#: what this process knows about the source of the modules it reloaded
FINGERPRINTS = ModuleFingerprints()

# Module-level, not on the attempt: a logger on an object makes the object
# the source of each event, and a buffered event would keep every old
# protocol of that attempt alive.
_log = Logger()

#: the most wrappers followed from a connection's protocol to the
#: application's (a TLS wrapper, a policy wrapper, ...)
_MAX_WRAPPERS = 8

#: the most names listed in one note
_MAX_LISTED = 12

#: how many connections' states the pre-copy takes in one turn of the
#: reactor (a few milliseconds of work: the connections are served between
#: two slices)
PRECOPY_SLICE = 250

#: the longest a pre-copy slice runs, in seconds, before the reactor
#: serves the connections again (a client waits for about two slices)
PRECOPY_SLICE_SECONDS = 0.004

#: how many connections are switched to their new protocol object in one
#: turn of the reactor after the commit
SWITCH_SLICE = 500


class _Refused(Exception):
    """
    Preparing the reload failed; the message says where and why.
    """


def _plainCopy(value: Any) -> Any:
    """
    Copy plain data already checked (L{captureProtocolState} with
    C{snapshot=False}), as a JSON round trip would, without one: new
    containers, lists for tuples; the scalars are immutable and shared.
    """
    kind = type(value)
    if kind is dict:
        return {key: _plainCopy(item) for key, item in value.items()}
    if kind is list or kind is tuple:
        return [_plainCopy(item) for item in value]
    return value


def _refusedConnection(hosted: Any, key: str, why: str) -> _Refused:
    return _Refused(
        "connection from {} on {}: {}".format(describePeer(hosted), key, why)
    )


def _listed(names: list[str]) -> str:
    if len(names) <= _MAX_LISTED:
        return ", ".join(names)
    return "{} and {} more".format(
        ", ".join(names[:_MAX_LISTED]), len(names) - _MAX_LISTED
    )


def _qualified(cls: type) -> str:
    return "{}.{}".format(cls.__module__, cls.__qualname__)


def _versionProblem(old: type, new: type) -> str | None:
    """
    Why an L{IMigratable} protocol reached through a wrapper (which
    migrate cannot rebuild from its state) cannot be upgraded in place, if
    it cannot: its state's shape changed.
    """
    if not IMigratable.implementedBy(old):
        return None
    before = getattr(old, "migrationVersion", None)
    after = getattr(new, "migrationVersion", None)
    if before == after:
        return None
    return (
        "{} is behind a wrapper, so it is upgraded in place, and its "
        "migrationVersion changed ({} to {}): its state cannot be converted "
        "in place".format(_qualified(old), before, after)
    )


@define
class _Gate:
    """
    Whether a reload committed, or was rolled back, for the connections
    restored ahead of its pause.
    """

    committed: bool = False
    dropped: bool = False


def _canAbandon(cls: type) -> bool:
    """
    Whether the protocols of C{cls} can abandon a restore (they define
    C{abandonMigrationState}, see L{IMigratable}): only they are restored
    ahead of the pause.
    """
    return callable(getattr(cls, "abandonMigrationState", None))


@define
class _Rebuilt:
    """
    A migratable connection whose protocol the new code rebuilds.

    Made before the pause, while the old code serves, with the copy of
    the state the pre-copy took (L{ReloadAttempt.copyStates}), so that the
    pause, if that copy is still what the protocol would give, only builds
    and restores the new protocol object; or made in the pause, from a
    state taken there.

    @ivar key: the connection's listener.
    @ivar hosted: the connection.
    @ivar peer: its peer address.
    @ivar local: its local address.
    @ivar old: the application protocol the state was taken from.
    @ivar held: the new protocol's transport until the switch.
    @ivar state: the state the new protocol is restored from (a snapshot
        no one else holds).
    @ivar fingerprint: what tells, in the pause, whether the pre-copy's
        state still describes C{old}; L{None} for a state taken in the
        pause.
    @ivar new: the new protocol object, once built (in the pause, or
        ahead of it).
    @ivar restored: whether C{new} was restored from C{state} ahead of
        the pause (L{ReloadAttempt.restoreAhead}), and not abandoned since.
    @ivar chosen: whether the pause kept the object restored ahead.
    @ivar gate: whether the reload committed, shared by its records.
    """

    key: str
    hosted: Any
    peer: Any
    local: Any
    old: Any
    held: HeldTransport
    state: ProtocolState
    fingerprint: StateFingerprint | None = None
    new: Any = None
    restored: bool = False
    chosen: bool = False
    gate: _Gate | None = None

    def switchOnceCommitted(self) -> None:
        """
        What a connection restored ahead of the pause does before each of
        its events (registered ahead, so that the commit need not register
        thousands): until the reload is decided, nothing but wait for the
        next event; once it committed, L{switch} if the pause kept the
        object restored ahead; otherwise nothing more.
        """
        gate = self.gate
        if gate is None or not self.restored:
            return
        if gate.committed:
            self.switch()
        elif not gate.dropped:
            self.hosted.finishBeforeNextEvent(self.switchOnceCommitted)

    def switch(self) -> None:
        """
        Serve the connection with its new protocol object from now on:
        what the new protocol wrote since its restore is written, and the
        input its state held is replayed; then the old object is told
        (L{tellMigrated}: its timers stop).  A bound method rather than a
        C{partial}: the commit registers one per connection while every
        client waits.
        """
        old = self.old
        old.transport = DetachedTransport(self.peer, self.local)
        old.connected = 0
        self.hosted.replaceProtocol(self.new)
        try:
            self.held.release()
        except Exception:
            _log.failure(
                "Writing what the new protocol of {peer} wrote while restored "
                "failed",
                peer=self.peer,
            )
        try:
            replayBufferedInput(self.new)
        except Exception:
            _log.failure("Replaying buffered input failed")
        tellMigrated(old)


@define
class _Listener:
    """
    Counts for one listener.
    """

    moved: int = 0
    drained: int = 0
    failed: int = 0


@define
class ReloadAttempt:
    """
    One reload of one host's application.
    """

    host: IMigrationHost
    progress: Callable[[str], None]
    fingerprints: ModuleFingerprints
    strategyName: str

    attempt: MigrationAttempt = field(init=False)
    counts: dict[str, _Listener] = field(factory=dict)
    staging: ModuleStaging | None = None
    rebuilt: list[_Rebuilt] = field(factory=list)
    swaps: list[tuple[Any, type, type]] = field(factory=list)
    newFactory: Any = None
    started: int = 0
    importTimeout: float = 0.0
    _swapProblems: dict[type, str | None] = field(factory=dict)
    _plan: tuple[Any, ...] | None = None
    _closing: dict[int, tuple[Any, str]] = field(factory=dict)
    #: the pre-copy's records, by the id of their connection
    _kept: dict[int, _Rebuilt] = field(factory=dict)
    reused: int = 0
    switchSlice: int = SWITCH_SLICE
    sliceSeconds: float = PRECOPY_SLICE_SECONDS
    precopySlices: int = 0
    _oldFactories: list[tuple[Any, Any]] = field(factory=list)
    #: the connections the pause did not rebuild, with their listener
    _notRebuilt: list[tuple[Any, Any]] = field(factory=list)
    #: the records whose new protocol object was restored ahead of the pause
    _ahead: list[_Rebuilt] = field(factory=list)
    #: how many objects restored ahead were abandoned
    abandoned: int = 0
    _gate: _Gate = field(factory=_Gate)
    #: the records whose switch the commit registers (not restored ahead)
    _toRegister: list[_Rebuilt] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.attempt = MigrationAttempt(
            self.host, self.strategyName, self.progress, label="Reload"
        )

    # Reporting

    def step(self, message: str) -> None:
        self.attempt.step(message)

    def report(
        self, outcome: MigrationOutcome, reason: str | None, changedCode: bool
    ) -> MigrationReport:
        host = self.host
        success = outcome is MigrationOutcome.success
        listeners = [
            ListenerReport(
                key,
                moved=self.counts[key].moved if success and key in self.counts else 0,
                drained=(
                    self.counts[key].drained if success and key in self.counts else 0
                ),
                failed=self.counts[key].failed if key in self.counts else 0,
            )
            for key in host.listeners
        ]
        return self.attempt.report(
            outcome,
            reason,
            listeners=listeners,
            fromGeneration=host.generation - (1 if success and changedCode else 0),
            toGeneration=host.generation if success and changedCode else None,
            # The process serving now: this very one, on the new code.
            newPid=host.pid if success else None,
        )

    # The reload

    def run(self) -> Deferred[MigrationReport]:
        """
        Reload the application, without a trial.

        @return: a L{Deferred} firing with the report; it never fails.
        """
        early = self.begin()
        if early is not None:
            return succeed(early)
        return self.copyStates().addCallback(lambda cases: self.finish())

    def begin(self) -> MigrationReport | None:
        """
        Find what to reload, touching nothing.

        @return: the report if there is nothing more to do (refused, or
            nothing changed), or L{None}: L{finish} (after a trial of the
            new code on L{connections}) does the reload.
        """
        try:
            return self._begin()
        except Exception as e:
            return self._internalError(e)

    def _internalError(self, error: Exception) -> MigrationReport:
        """
        A step failed unexpectedly: log it (from its C{except} block) and
        roll everything back.

        @return: the report of the rollback.
        """
        _log.failure("Reload failed unexpectedly")
        return self.rollBack("internal error: {}".format(describeError(error)))

    def connections(self) -> list[tuple[str, Any]]:
        """
        The live connections, with their listener's key, for a trial.
        """
        return [
            (listener.key, hosted)
            for listener in self.host.listeners.values()
            for hosted in listener.factory.connections
            if not hosted.pending
        ]

    def copyStates(
        self, sliceSize: int = PRECOPY_SLICE, sliceSeconds: float | None = None
    ) -> Deferred[list[TrialCase]]:
        """
        The pre-copy: take a copy of every migratable connection's state
        while the old code serves, a slice of connections per turn of the
        reactor (the first slice at once), for the trial and for the
        pause, which reuses each copy whose connection did not change
        since (L{unchangedSince}) instead of capturing it again.

        A slice ends after C{sliceSize} connections or once it has taken
        C{sliceSeconds} (by the reactor's clock), whichever comes first,
        and takes at least one connection: a client waits for at most about
        two slices (its line is read between two slices and answered
        between the next two), however costly the states are to copy.

        A state that cannot be captured now is left out: the pause captures
        it, with its own errors.

        @param sliceSeconds: the longest slice, in seconds; L{None} for
            L{sliceSeconds}.

        @return: a L{Deferred} firing with the trial's cases (every
            connection whose protocol L{isMigratable}), at once when one
            slice takes them all; it never fails.
        """
        self.attempt.startPhase()
        todo = self.connections()
        cases: list[TrialCase] = []
        done: Deferred[list[TrialCase]] = Deferred()
        reactor = self.host.reactor
        budget = self.sliceSeconds if sliceSeconds is None else sliceSeconds
        longest = 0.0
        slices = 0

        def copySlice(start: int) -> None:
            nonlocal longest, slices
            began = reactor.seconds()
            index = start
            # sliceSize connections at most, none more once the slice has
            # run its budget (one at least).
            for piece in timedChunks(todo, start, sliceSize, reactor, budget, chunk=1):
                index += len(piece)
                for key, hosted in piece:
                    try:
                        self._copyState(key, hosted, cases)
                    except Exception:
                        _log.failure(
                            "Reload: could not copy the state of {connection}",
                            connection=describePeer(hosted),
                        )
            slices += 1
            # A full collection in a later slice would otherwise walk every
            # copy made so far (20 to 30 ms at 10,000 connections).
            freezeNewObjects()
            longest = max(longest, reactor.seconds() - began)
            if index < len(todo):
                reactor.callLater(0, copySlice, index)
                return
            self.attempt.phaseDone("precopy")
            self.attempt.durations["precopy slice"] = longest
            self.precopySlices = slices
            done.callback(cases)

        copySlice(0)
        return done

    def _copyState(self, key: str, hosted: Any, cases: list[TrialCase]) -> None:
        protocol = hosted.wrappedProtocol
        if protocol is None or hosted.released or not hosted.connected:
            return
        if not isMigratable(protocol):
            return
        try:
            # Checked without a copy, and fingerprinted before the
            # application runs again; then copied without a JSON round trip
            # (as the pause does), and encoded for the trial without
            # walking it again.
            taken = captureProtocolState(protocol, snapshot=False)
            fingerprint = StateFingerprint.of(taken, protocol)
        except Exception:
            return
        state = ProtocolState(
            taken.className,
            taken.migratable,
            taken.version,
            _plainCopy(taken.appState),
            taken.buffers,
        )
        peer = hosted.getPeer()
        if IMigratable.providedBy(protocol):
            # All the pause needs but the new protocol object, made while
            # the old code serves.
            self._kept[id(hosted)] = _Rebuilt(
                key,
                hosted,
                peer,
                hosted.getHost(),
                protocol,
                HeldTransport(hosted),
                state,
                fingerprint,
            )
        ident = len(cases) + 1
        peerPlain = peerOf(hosted)
        plain = state.toPlain()
        line: bytes | None
        try:
            # Encoded now, a slice at a time: the trial would otherwise
            # encode every case at once while the clients wait.  The state
            # was checked as it was captured, so the encoder built once for
            # fingerprints writes the very bytes the codec would.
            line = (
                encodePlain({"id": ident, "peer": peerPlain, "state": plain}).encode(
                    "ascii"
                )
                + b"\n"
            )
        except (TypeError, ValueError, RecursionError):
            line = None  # The trial encodes it again, and says why.
        if line is not None and len(line) > MAX_CASE_LINE + 1:
            line = None  # Said when the trial starts.
        cases.append(
            TrialCase(
                ident,
                key,
                peerPlain,
                _qualified(type(protocol)),
                plain,
                hosted,
                line,
            )
        )

    def tried(self, outcome: TrialOutcome) -> Deferred[MigrationReport]:
        """
        Go on after the new code was tried in a child process: refuse if it
        failed; close the connections it failed on (with C{--trial-failure
        close}); then L{finish}.
        """
        # As for re-exec: the child process's whole run, and of it the
        # restores on the new code.
        self.attempt.durations["preflight"] = outcome.duration
        self.attempt.durations["trial"] = outcome.restoring
        self.attempt.trialRunEnded(outcome.passed)
        if not outcome.passed:
            self.attempt.successorLog.extend(outcome.output)
            return succeed(self.refuse(outcome.reason or "the trial failed"))
        self.attempt.notes.extend(outcome.notes())
        for case, why in outcome.closing:
            hosted = case.connection
            self._closing[id(hosted)] = (hosted, why)
            _log.info(
                "Reload: closing {connection}: the new code failed on it in the "
                "trial ({why})",
                connection=case.describe(),
                why=why,
            )
            hosted.loseConnection()
        return self.finish()

    def finish(self) -> Deferred[MigrationReport]:
        """
        Import the new code, prepare every connection and commit, or roll
        it all back, in one step of the reactor (the pause); then switch
        each rebuilt connection to its new protocol object, a slice of
        them per turn of the reactor, each one before its next event at the
        latest.

        @return: a L{Deferred} firing with the report once every connection
            is switched (at once when nothing is left to switch); it never
            fails.
        """
        abandons: dict[type, bool] = {}
        ahead = []
        for record in self._kept.values():
            cls = type(record.old)
            can = abandons.get(cls)
            if can is None:
                can = abandons[cls] = _canAbandon(cls)
            if can:
                ahead.append(record)
        if not ahead:
            return self._pauseOnceThreadsDone()
        with collectionsPaused():
            try:
                early = self._stageAhead()
            except Exception as e:
                early = self._internalError(e)
        if early is not None:
            return succeed(early)
        restored = self.restoreAhead(ahead)
        return restored.addCallback(
            lambda early: self._pauseOnceThreadsDone() if early is None else early
        )

    def _threadWorkOwed(self) -> ThreadWork | None:
        """
        What the reactor's threads still owe it, if anything, when it
        matters: while a connection the pause would rebuild is live.  Such
        an answer (a C{deferToThread} job's, a call queued with
        C{callFromThread}) would reach the I{old} protocol object after
        the pause: the new object, restored from the state taken before,
        would never know of it, and what the old one writes once replaced
        goes nowhere.  A protocol upgraded in place keeps its object and
        its transport: its answers reach the client as before.
        """
        work = workInFlight(self.host.reactor)
        if work is None:
            return None
        migratable = IMigratable.providedBy
        for listener in self.host.listeners.values():
            for hosted in listener.factory.connections:
                if hosted.pending or hosted.released:
                    continue
                if migratable(hosted.wrappedProtocol):
                    return work
        return None

    def _pauseOnceThreadsDone(self) -> Deferred[MigrationReport]:
        """
        Before the pause, while the old code serves: let the reactor
        deliver every answer its threads owe the old protocol objects
        (L{_threadWorkOwed}), waiting at most C{--safe-point-timeout}
        seconds, as capability transfer does before it freezes; then
        L{_pause}, in the reactor step of the last look, which looks
        again as it begins.  Work still in flight at the bound rolls the reload back:
        the answers then reach their clients from the old code.
        """
        work = self._threadWorkOwed()
        if work is None:
            return self._pause()
        reactor = self.host.reactor
        bound = float(self.host.settings.safePointTimeout)
        started = reactor.seconds()
        self.step(
            "waiting up to {:g} s for {} to finish before the pause".format(
                bound, work.describe()
            )
        )
        _log.info(
            "Reload: waiting for threads before the pause: {work}",
            work=work.describe(),
        )
        waited: Deferred[Any] = waitForThreadWork(reactor, started + bound)

        def lookedAgain(left: ThreadWork | None) -> Any:
            if left is not None:
                return self.rollBack(
                    self._threadsOwed("after {:g} s".format(bound), left)
                )
            self.step(
                "the threads' work finished after {:.3f} s".format(
                    reactor.seconds() - started
                )
            )
            return self._pause()

        def failed(failure: Failure) -> MigrationReport:
            # The wait itself failed (the pause did not begin): roll back.
            _log.failure("Reload failed unexpectedly", failure=failure)
            return self.rollBack("internal error: {}".format(failure.getErrorMessage()))

        return waited.addCallbacks(lookedAgain, failed)

    @staticmethod
    def _threadsOwed(when: str, work: ThreadWork) -> str:
        """
        Why a reload rolls back for thread work in flight C{when}.
        """
        return (
            "threads still owed answers {} ({}), which would reach the old "
            "protocol objects after the new code took their connections: try "
            "again once they are done, or raise --safe-point-timeout".format(
                when, work.describe()
            )
        )

    def _pause(self) -> Deferred[MigrationReport]:
        # A full collection in the pause, which creates thousands of
        # objects, would lengthen it by tens of milliseconds: the collector
        # waits for the next turn.
        with collectionsPaused():
            try:
                early = self._finish()
            except Exception as e:
                early = self._internalError(e)
        if early is not None:
            return succeed(early)
        return self._switchAll()

    def _stageAhead(self) -> MigrationReport | None:
        """
        Import the new code and build its factory in a turn of the reactor
        of their own, ahead of the pause; then park the new modules
        (L{ModuleStaging.park}) while the old code serves.

        @return: the report if that failed (rolled back), or L{None}.
        """
        early = self._stage()
        if early is None:
            assert self.staging is not None
            self.staging.park()
        return early

    def _stage(self) -> MigrationReport | None:
        """
        Import the new code and build its factory.

        @return: the report if that failed (rolled back), or L{None}.
        """
        assert self._plan is not None
        app, names, entry, attribute, spec = self._plan
        self.attempt.enter(MigrationPhase.handingOff)
        self.step("importing the new code of {}".format(_listed(names)))
        self.attempt.startPhase()
        self.staging = ModuleStaging(app, names)
        try:
            # It passed the trial; should it block in this process alone,
            # the bound interrupts it (see _safety).
            with boundedImport(self.importTimeout):
                self.staging.stage()
        except ReloadFailed as e:
            self.staging = None
            return self.rollBack(e.reason)
        self.attempt.phaseDone("import")
        try:
            self.newFactory = self._buildFactory(entry, attribute, spec)
        except _Refused as e:
            return self.rollBack(str(e))
        return None

    def restoreAhead(self, records: list[_Rebuilt]) -> Deferred[MigrationReport | None]:
        """
        Restore, ahead of the pause, each of C{records} whose application
        can abandon an object so restored (its protocol defines
        C{abandonMigrationState}) into a protocol object of the new code,
        a slice of connections per turn of the reactor (bounded as the
        pre-copy's), while the old code serves: the pause then only checks
        that each connection did not change since (L{unchangedSince}).  In
        each slice the new modules are in C{sys.modules}; between slices
        the old ones are.  Nothing the new objects write reaches a client
        before the commit, and no event reaches them.

        @return: a L{Deferred} firing with L{None} once every record is
            restored, or with the report if the new code refused one (the
            reload is then rolled back).
        """
        done: Deferred[MigrationReport | None] = Deferred()
        reactor = self.host.reactor
        budget = self.sliceSeconds
        self.attempt.startPhase()
        longest = 0.0

        def aheadSlice(start: int) -> None:
            nonlocal longest
            began = reactor.seconds()
            deadline = began + budget
            end = min(start + PRECOPY_SLICE, len(records))
            index = start
            staging = self.staging
            assert staging is not None
            staging.unpark()
            try:
                while index < end:
                    record = records[index]
                    index += 1
                    self._restoreOneAhead(record)
                    if reactor.seconds() >= deadline:
                        break
            except _Refused as e:
                done.callback(self.rollBack(str(e)))
                return
            except Exception as e:
                done.callback(self._internalError(e))
                return
            finally:
                if self.staging is not None:
                    self.staging.park()
            freezeNewObjects()
            longest = max(longest, reactor.seconds() - began)
            if index < len(records):
                reactor.callLater(0, aheadSlice, index)
                return
            self.attempt.phaseDone("restore ahead")
            self.attempt.durations["restore ahead slice"] = longest
            # The pause in a turn of its own: the clients are served between
            # the last slice and it.
            reactor.callLater(0, done.callback, None)

        reactor.callLater(0, aheadSlice, 0)
        return done

    def _restoreOneAhead(self, record: _Rebuilt) -> None:
        """
        Restore one connection's new protocol object ahead of the pause,
        from its state as it is now (taken again if it changed since the
        pre-copy).

        @raise _Refused: if the new code refuses it.
        """
        hosted = record.hosted
        old = record.old
        if (
            hosted.wrappedProtocol is not old
            or hosted.pending
            or hosted.released
            or not hosted.connected
            or (self._closing and self._isClosing(hosted))
        ):
            return
        if record.fingerprint is None or not unchangedSince(old, record.fingerprint):
            try:
                taken = captureProtocolState(old, snapshot=False)
                fingerprint = StateFingerprint.of(taken)
            except Exception:
                # The pause captures it, with that capture's own errors.
                record.fingerprint = None
                return
            record.state = ProtocolState(
                taken.className,
                taken.migratable,
                taken.version,
                _plainCopy(taken.appState),
                taken.buffers,
            )
            record.fingerprint = fingerprint
        new = self._buildNew(record)
        record.new = new
        if not _canAbandon(type(new)):
            # The new code could not take it back: restored in the pause.
            return
        new.transport = record.held
        new.connected = 1
        try:
            restoreProtocolState(new, record.state, copyState=False, validate=False)
        except StateError as e:
            raise _refusedConnection(hosted, record.key, str(e))
        record.restored = True
        record.gate = self._gate
        self._ahead.append(record)
        hosted.finishBeforeNextEvent(record.switchOnceCommitted)

    def _buildNew(self, record: _Rebuilt) -> Any:
        try:
            new = self.newFactory.buildProtocol(record.peer)
        except Exception as e:
            raise _refusedConnection(
                record.hosted,
                record.key,
                "the new factory's buildProtocol failed: {}".format(describeError(e)),
            )
        if new is None:
            raise _refusedConnection(
                record.hosted,
                record.key,
                "the new factory refused it (buildProtocol returned None)",
            )
        return new

    def _abandon(self, record: _Rebuilt) -> None:
        """
        Let go of an object restored ahead of the pause whose connection
        changed or closed since: what it wrote is dropped, and the new
        code undoes what its restore did (C{abandonMigrationState}).

        @raise _Refused: if the new code fails to.
        """
        record.held.discard()
        record.restored = False
        self.abandoned += 1
        try:
            record.new.abandonMigrationState()
        except Exception as e:
            raise _refusedConnection(
                record.hosted,
                record.key,
                "the new code failed to abandon the object restored ahead of "
                "the pause (the connection changed or closed since): {}".format(
                    describeError(e)
                ),
            )

    def _begin(self) -> MigrationReport | None:
        host = self.host
        spec = host.settings.applicationSpec
        if not spec:
            return self.refuse(
                "the host was not told where the application's code is (no "
                "applicationSpec, as --app gives): module reload cannot rebuild "
                "its factory",
            )
        entry, _, attribute = spec.partition(":")
        why = hostModuleReason(entry)
        if why is not None:
            return self.refuse(
                "the application's module {} cannot be reloaded: {}".format(entry, why),
            )
        explicit = list(host.settings.reloadModules)
        app = findApplicationModules(entry, explicit)
        for name, why in app.refused:
            self.attempt.notes.append("not reloaded: {}: {}".format(name, why))
        self._noteNeighbours(app)
        self.attempt.notes.append(
            "never reloaded: Twisted, migrate itself (migrate.examples excepted), "
            "the libraries they use and the standard library, which the host "
            "runs on; nor any module outside the application (--app's package, "
            "or --reload-module)"
        )
        if entry not in app.loaded:
            return self.refuse(
                "the application's module {} is not loaded from a source file in "
                "this process".format(entry),
            )
        names, changed, unknown = modulesToReload(app, self.fingerprints)
        if changed:
            self.attempt.notes.append("changed on disk: " + _listed(changed))
        if unknown:
            self.attempt.notes.append(
                "no record of the source of {} (first reload in this process): "
                "reloaded".format(_listed(unknown))
            )
        if not names:
            self.attempt.notes.append(
                "no application module changed on disk: nothing reloaded"
            )
            self.step("no application module changed; nothing to reload")
            return self.report(MigrationOutcome.success, None, changedCode=False)
        self.attempt.enter(MigrationPhase.spawning)
        self._plan = (app, names, entry, attribute, spec)
        return None

    def _finish(self) -> MigrationReport | None:
        assert self._plan is not None
        app, names, entry, attribute, spec = self._plan
        # Looked at as the pause begins, before any code runs in it (the
        # new code may start thread work of its own there, whose answers
        # its objects receive); L{_pauseOnceThreadsDone} waited for it in
        # this very step.  Should the old code's be in flight all the same,
        # no old object may be replaced: decided once the connections the
        # pause rebuilds are known, without looking at each one again.
        owed = workInFlight(self.host.reactor)
        ahead = self.staging is not None
        if ahead:
            # Imported, and its factory built, ahead of the pause.
            self.attempt.startPhase()
        else:
            early = self._stage()
            if early is not None:
                return early
        assert self.staging is not None
        self.staging.unpark()
        staged = self.staging.staged
        try:
            self._prepareConnections(staged)
            if owed is not None and self.rebuilt:
                raise _Refused(self._threadsOwed("as the pause began", owed))
            self._startFactory()
        except _Refused as e:
            return self.rollBack(str(e))
        self.attempt.phaseDone("prepare")

        self.attempt.enter(MigrationPhase.committing)
        problem = self._swapClasses()
        if problem is not None:
            return self.rollBack(problem)
        self._commit(staged)
        self._noteOutcome(names, staged)
        if len(self.rebuilt) <= self.switchSlice:
            # Few enough to switch in the pause itself.
            for each in self.rebuilt:
                each.hosted.finishNow()
            self._stopOldFactories()
        self.attempt.phaseDone("commit")
        durations = self.attempt.durations
        # The one step of the reactor in which nothing else is served.
        durations["pause"] = durations["prepare"] + durations["commit"]
        if not ahead:
            durations["pause"] += durations["import"]
        return None

    def _switchAll(self) -> Deferred[MigrationReport]:
        """
        Switch every rebuilt connection not switched yet (by its own next
        event, or in the pause), L{switchSlice} per turn of the reactor,
        starting in the next turn; then report.
        """
        rebuilt = self.rebuilt
        done: Deferred[MigrationReport] = Deferred()
        if len(rebuilt) <= self.switchSlice:
            done.callback(self._succeeded())
            return done
        reactor = self.host.reactor
        started = reactor.seconds()
        longest = 0.0

        def switchSlice(start: int) -> None:
            nonlocal longest
            began = reactor.seconds()
            for each in rebuilt[start : start + self.switchSlice]:
                each.hosted.finishNow()
            longest = max(longest, reactor.seconds() - began)
            if start + self.switchSlice < len(rebuilt):
                reactor.callLater(0, guarded, start + self.switchSlice)
                return
            self._stopOldFactories()
            self.attempt.durations["switch"] = reactor.seconds() - started
            self.attempt.durations["switch slice"] = longest
            done.callback(self._succeeded())

        def guarded(start: int) -> None:
            # Whatever goes wrong here, the migration must end (the host
            # waits for it before the next one).
            try:
                switchSlice(start)
            except Exception:
                _log.failure("Reload: switching connections failed")
                if not done.called:
                    done.errback()

        reactor.callLater(0, guarded, 0)
        return done

    def _succeeded(self) -> MigrationReport:
        host = self.host
        self._noteUpgrades()
        # Let go of the old protocol objects now (the last references to
        # most of them), rather than when the collector finds this attempt;
        # and of the pre-copy's states, which the pause left alone rather
        # than free thousands of objects while every client waited.
        self.rebuilt = []
        self._kept = {}
        self._ahead = []
        self.attempt.durations["total"] = self.attempt.elapsed()
        moved = sum(each.moved for each in self.counts.values())
        drained = sum(each.drained for each in self.counts.values())
        self.step(
            "generation {} serves the new code: {} upgraded, {} left on the old "
            "code ({:.1f} ms)".format(
                host.generation,
                counted(moved, "connection"),
                drained,
                self.attempt.durations["total"] * 1000,
            )
        )
        return self.report(MigrationOutcome.success, None, changedCode=True)

    def refuse(self, reason: str) -> MigrationReport:
        self.step("refused: " + reason)
        return self.report(MigrationOutcome.refused, reason, changedCode=False)

    def rollBack(self, reason: str) -> MigrationReport:
        """
        Undo whatever was prepared: every protocol stays on the old code and
        C{sys.modules} is as it was.
        """
        self.attempt.enter(MigrationPhase.rollingBack)
        self._kept = {}
        self._gate.dropped = True
        for each in self.rebuilt + self._ahead:
            each.held.discard()
        for each in self._ahead:
            # Drop the switch it registered ahead (which now does nothing),
            # and with it the new objects.
            each.hosted.finishNow()
        self.rebuilt = []
        self._ahead = []
        self._toRegister = []
        self._oldFactories = []
        self.swaps = []
        while self.started:
            self.started -= 1
            try:
                self.newFactory.doStop()
            except Exception:
                _log.failure("The new factory failed to stop")
        self.newFactory = None
        if self.staging is not None:
            self.staging.restore()
            self.staging = None
        self.attempt.notes.append("rolled back: every connection stays on the old code")
        self.step("rolled back: " + reason)
        return self.report(MigrationOutcome.rolledBack, reason, changedCode=False)

    def _noteNeighbours(self, app: Any) -> None:
        """
        Name the loaded modules that live beside the application's code but
        are not part of it: an operator who changed one of them would
        expect it to be reloaded.
        """
        roots = set()
        for name in app.loaded:
            module = sys.modules.get(name)
            origin = getattr(getattr(module, "__spec__", None), "origin", None)
            if not origin:
                continue
            root = origin
            for _ in range(
                name.count(".") + (2 if origin.endswith("__init__.py") else 1)
            ):
                root = root.rpartition("/")[0]
            if root and "-packages" not in root.rpartition("/")[2]:
                roots.add(root + "/")
        if not roots:
            return
        outside = []
        for name, module in list(sys.modules.items()):
            origin = getattr(getattr(module, "__spec__", None), "origin", None)
            if (
                not origin
                or app.contains(name)
                or name in app.loaded
                or hostModuleReason(name) is not None
                or not any(origin.startswith(root) for root in roots)
            ):
                continue
            outside.append(name)
        if outside:
            self.attempt.notes.append(
                "not reloaded, outside the application: {} (name them with "
                "--reload-module to reload them)".format(_listed(sorted(outside)))
            )

    def _buildFactory(self, entry: str, attribute: str, spec: str) -> Any:
        found: Any = sys.modules.get(entry)
        try:
            for part in attribute.split("."):
                found = getattr(found, part)
            if not IProtocolFactory.providedBy(found) and callable(found):
                found = found()
        except Exception as e:
            raise _Refused(
                "the new code cannot build the application's factory ({}): "
                "{}".format(spec, describeError(e))
            )
        if not IProtocolFactory.providedBy(found):
            raise _Refused(
                "the new code's {} is not a protocol factory: {!r}".format(spec, found)
            )
        return found

    def _prepareConnections(self, staged: dict[str, Any]) -> None:
        """
        Decide, and prepare, what happens to each connection.

        @raise _Refused: if a migratable connection cannot be rebuilt.
        """
        staying: Counter[str] = Counter()
        unchanged: Counter[str] = Counter()
        swapped: Counter[str] = Counter()
        # Looked up once: the loop runs for every connection while every
        # client waits.
        rebuild = self._rebuild
        migratable = IMigratable.providedBy
        closing = self._closing
        ahead = self._kept if self._ahead else {}
        rebuilt = self.rebuilt
        for listener in self.host.listeners.values():
            key = listener.key
            counts = self.counts.setdefault(key, _Listener())
            kept = 0
            for hosted in listener.factory.connections:
                protocol = hosted.wrappedProtocol
                if protocol is None or hosted.pending or hosted.released:
                    continue
                if closing and self._isClosing(hosted):
                    counts.failed += 1
                    continue
                if ahead:
                    # Most connections were restored ahead and did not change:
                    # kept with as little as can be done for each.
                    record = ahead.get(id(hosted))
                    if (
                        record is not None
                        and record.restored
                        and record.hosted is hosted
                        and record.old is protocol
                        and record.fingerprint is not None
                        and unchangedSince(protocol, record.fingerprint)
                    ):
                        record.chosen = True
                        rebuilt.append(record)
                        kept += 1
                        continue
                # The application's own opt-in only: a protocol migrate has a
                # mover for (twisted.web's channel) is not rebuilt in the same
                # process; it keeps its objects, as before movers existed.
                if migratable(protocol):
                    rebuild(key, hosted, protocol)
                    counts.moved += 1
                    continue
                self._notRebuilt.append((listener, hosted))
                swaps, why = self._planInPlace(protocol, staged)
                if swaps is None:
                    staying[why or "?"] += 1
                    counts.drained += 1
                elif swaps:
                    self.swaps.extend(swaps)
                    swapped[_qualified(type(protocol))] += 1
                    counts.moved += 1
                else:
                    unchanged[_qualified(type(protocol))] += 1
                    counts.moved += 1
            counts.moved += kept
            self.reused += kept
        for record in self._ahead:
            if record.restored and not record.chosen:
                # Its connection closed (or is closing) since.
                self._abandon(record)
        for why, count in sorted(staying.items()):
            self.attempt.notes.append(
                "{} connection{} stay{} on the old code: {}".format(
                    count, "" if count == 1 else "s", "s" if count == 1 else "", why
                )
            )
        for name, count in sorted(swapped.items()):
            self.attempt.notes.append(
                "{} connection{} of {} upgraded in place (class swap; no state "
                "conversion, and the protocol keeps its old factory object)".format(
                    count, "" if count == 1 else "s", name
                )
            )
        for name, count in sorted(unchanged.items()):
            self.attempt.notes.append(
                "{} connection{} of {}, which no reloaded module defines, go on "
                "as before".format(count, "" if count == 1 else "s", name)
            )

    def _isClosing(self, hosted: Any) -> bool:
        closing, _ = self._closing.get(id(hosted), (None, ""))
        return closing is hosted

    def _rebuild(self, key: str, hosted: Any, old: Any) -> None:
        """
        Take a migratable protocol's state and restore it into a protocol
        the new factory builds, whose writes are held until the commit.

        It runs for every connection while every client waits: the
        pre-copy's record (its state, addresses and held transport) is
        reused when the connection did not change since (L{unchangedSince}),
        and nothing is made that only a failure needs.

        @raise _Refused: naming the connection, if that fails.
        """
        record = self._kept.get(id(hosted))
        if (
            record is not None
            and record.hosted is hosted
            and record.old is old
            and record.fingerprint is not None
            and unchangedSince(old, record.fingerprint)
        ):
            # The pre-copy's state (left in place: freed after the pause,
            # with the old protocols) still describes the protocol, which
            # the trial then restored.
            self.reused += 1
            if record.restored:
                # And the new object was restored from it ahead of the pause.
                record.chosen = True
                self.rebuilt.append(record)
                return
        else:
            if record is not None and record.restored:
                self._abandon(record)
            try:
                # Checked without a copy, then copied without encoding: no
                # JSON round trip in the same process.
                taken = captureProtocolState(old, snapshot=False)
            except StateError as e:
                raise _refusedConnection(hosted, key, str(e))
            record = _Rebuilt(
                key,
                hosted,
                hosted.getPeer(),
                hosted.getHost(),
                old,
                HeldTransport(hosted),
                ProtocolState(
                    taken.className,
                    taken.migratable,
                    taken.version,
                    _plainCopy(taken.appState),
                    taken.buffers,
                ),
            )
        new = record.new
        if new is None:
            new = record.new = self._buildNew(record)
        self.rebuilt.append(record)
        self._toRegister.append(record)
        new.transport = record.held
        new.connected = 1
        try:
            # The state is a snapshot this attempt alone holds (the
            # pre-copy's, or just captured): no copy of it is needed to keep
            # the old protocol as it was.
            restoreProtocolState(new, record.state, copyState=False, validate=False)
        except StateError as e:
            raise _refusedConnection(hosted, key, str(e))

    def _planInPlace(
        self, protocol: Any, staged: dict[str, Any]
    ) -> tuple[list[tuple[Any, type, type]] | None, str | None]:
        """
        Plan giving a protocol that does not provide L{IMigratable} the new
        code by C{__class__} assignment: the protocol and the protocols it
        wraps, all or none.

        @return: C{(swaps, None)}, an empty list when nothing changes; or
            C{(None, why)} when the protocol must stay on the old code.
        """
        chain: list[Any] = []
        each = protocol
        while each is not None and len(chain) < _MAX_WRAPPERS:
            if any(each is seen for seen in chain):
                break
            chain.append(each)
            try:
                each = vars(each).get("wrappedProtocol")
            except TypeError:
                each = None
        swaps: list[tuple[Any, type, type]] = []
        for each in chain:
            cls = type(each)
            if cls.__module__ not in staged:
                base = next(
                    (b for b in cls.__mro__[1:] if b.__module__ in staged), None
                )
                if base is not None:
                    return None, (
                        "{} is defined outside the reloaded modules but inherits "
                        "from the reloaded {}".format(_qualified(cls), _qualified(base))
                    )
                continue
            new = counterpart(cls, staged)
            if new is cls:
                continue
            if cls not in self._swapProblems:
                self._swapProblems[cls] = classSwapProblem(cls, new) or _versionProblem(
                    cls, new
                )
            why = self._swapProblems[cls]
            if why is not None:
                return None, why
            swaps.append((each, cls, new))
        return swaps, None

    def _startFactory(self) -> None:
        for listener in self.host.listeners.values():
            if listener.port is None:
                continue
            try:
                self.newFactory.doStart()
            except Exception as e:
                raise _Refused(
                    "the new factory failed to start: {}".format(describeError(e))
                )
            self.started += 1

    def _swapClasses(self) -> str | None:
        """
        Give the planned objects their new classes; if Python refuses one,
        give every one back its old class.

        @return: why it failed, or L{None}.
        """
        done: list[tuple[Any, type]] = []
        for each, old, new in self.swaps:
            try:
                each.__class__ = new
            except Exception as e:
                for obj, cls in reversed(done):
                    obj.__class__ = cls
                return "cannot give {} its new class: {}".format(
                    _qualified(old), describeError(e)
                )
            done.append((each, old))
        return None

    def _commit(self, staged: dict[str, Any]) -> None:
        """
        The point of no return: new modules and factories; each rebuilt
        connection switches to its new protocol object (L{_switch}) before
        its next event, at the latest.  Nothing here runs application code.
        """
        host = self.host
        assert self.staging is not None
        self.staging.commit(self.fingerprints)
        self.staging = None
        # The connections restored ahead, and kept, registered their switch
        # then; it now sees the gate open.
        self._gate.committed = True
        for each in self._toRegister:
            each.hosted.finishBeforeNextEvent(each.switch)
        self._toRegister = []
        oldFactories = []
        for listener in host.listeners.values():
            oldFactories.append((listener, listener.factory.wrappedFactory))
            listener.factory.wrappedFactory = self.newFactory
        self._repointWebChannels(oldFactories)
        host.applicationFactory = self.newFactory
        host.generation += 1
        self._oldFactories = oldFactories

    def _stopOldFactories(self) -> None:
        """
        Once no connection is served by the old protocol objects, stop the
        old factories; their failures are logged.
        """
        oldFactories, self._oldFactories = self._oldFactories, []
        for listener, old in oldFactories:
            if listener.port is not None and old is not self.newFactory:
                try:
                    old.doStop()
                except Exception:
                    _log.failure("The old factory failed to stop")

    def _repointWebChannels(self, oldFactories: list[tuple[Any, Any]]) -> None:
        """
        twisted.web's channels of the old C{Site} serve their next request
        from the new code's C{Site} (the object tree of resources it
        builds), through migrate's mover: nothing else of them changes.
        """
        repointed = 0
        oldOf = {id(listener): old for listener, old in oldFactories}
        # Only the connections not rebuilt: looking at every connection
        # again would cost thousands of waiting clients a few milliseconds.
        for listener, hosted in self._notRebuilt:
            old = oldOf.get(id(listener))
            protocol = hosted.wrappedProtocol
            if (
                old is None
                or protocol is None
                or IMigratable.providedBy(protocol)
                or getattr(protocol, "factory", None) is not old
            ):
                continue
            mover = movers.moverFor(protocol)
            useFactory = getattr(mover, "useFactory", None)
            try:
                if useFactory is not None and useFactory(self.newFactory):
                    repointed += 1
            except Exception:
                _log.failure("Could not give a web channel the new Site")
        if repointed:
            self.attempt.notes.append(
                "{} twisted.web connection{} serve{} {} next request from the "
                "new code's Site".format(
                    repointed,
                    "" if repointed == 1 else "s",
                    "s" if repointed == 1 else "",
                    "its" if repointed == 1 else "their",
                )
            )

    def _noteOutcome(self, names: list[str], staged: dict[str, Any]) -> None:
        self.attempt.notes.insert(0, "reloaded: " + _listed(list(staged)))
        added = [name for name in staged if name not in names]
        if added:
            self.attempt.notes.append(
                "new application modules imported: " + _listed(added)
            )
        if self.rebuilt:
            self.attempt.notes.append(
                "{} of {} taken before the pause, while the old code served, "
                "and unchanged since; the others were taken in the "
                "pause".format(
                    counted(self.reused, "state"),
                    counted(len(self.rebuilt), "migratable connection"),
                )
            )
        if self._ahead:
            self.attempt.notes.append(
                "{} restored by the new code ahead of the pause, while the old "
                "code served; {} of them abandoned (abandonMigrationState): "
                "their connection changed or closed before the pause".format(
                    counted(len(self._ahead), "connection"), self.abandoned
                )
            )

    def _noteUpgrades(self) -> None:
        """
        Say which state versions the rebuilt connections were upgraded
        from and to: after the pause, as it looks at every connection.
        """
        upgrades: Counter[tuple[Any, Any]] = Counter()
        for each in self.rebuilt:
            upgrades[
                (each.state.version, getattr(each.new, "migrationVersion", None))
            ] += 1
        for (fromVersion, toVersion), count in sorted(upgrades.items(), key=repr):
            self.attempt.notes.append(
                "{} migratable connection{} rebuilt by the new code from state "
                "version {}{}".format(
                    count,
                    "" if count == 1 else "s",
                    fromVersion,
                    (
                        ""
                        if fromVersion == toVersion
                        else " upgraded to {}".format(toVersion)
                    ),
                )
            )
