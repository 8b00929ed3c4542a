"""
The old side of a hand-off to a successor process: start it, hand it the
listeners (and, for capability transfer, the established connections with
their state), commit, or roll everything back.

Shared by the gradual and capability strategies: they differ only in
whether established connections move.
"""

from __future__ import annotations

import json
import os
import socket
from functools import partial
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..._control._server import encodeReport
from ..._handoff._attempt import MigrationAttempt, counted
from ..._handoff._deadline import DeadlinePassed, firstOf
from ..._handoff._fdpass import (
    DescriptorTransferError,
    sendDescriptors,
    sendDescriptorsNow,
    sendLiveDescriptors,
    writeMemfd,
)
from ..._handoff._listeners import listenerDescriptor
from ..._handoff._migrated import tellMigrated
from ..._handoff._movement import (
    MovingConnection,
    Unmovable,
    describePeer,
    freezeMovable,
)
from ..._handoff._polls import afterPolls
from ..._handoff._precopy import (
    PrecopiedConnection,
    freezeDelta,
    freezeInParts,
    precopyMovable,
    recopyChanged,
)
from ..._handoff._safepoint import SafePointWatch
from ..._handoff._slices import timedChunks
from ..._handoff._successor import (
    SuccessorProcess,
    spawnSuccessor,
    successorCommandLine,
)
from ..._handoff._threadwork import waitForThreadWork, workInFlight
from ..._handoff._transport import flushWriters
from ..._host._heap import collectionsPaused
from ..._host._priority import BackgroundStart, describePriority, lowerOwnPriority
from ..._host._settings import HANDED_ON_NICENESS
from ..._report import ListenerReport, MigrationOutcome, MigrationPhase, MigrationReport
from ..._systemd import successorEnvironment
from ...interfaces import IMigrationHost
from ._channel import (
    HANDOFF_PROTOCOL_VERSION,
    AdoptConnections,
    CloseDraining,
    Commit,
    CommitAdopted,
    DrainStatus,
    HandoffAMP,
    HandoffRefused,
    Hello,
    PrecopyConnections,
    Prepare,
    RecopyConnections,
    Reported,
    TakeControl,
    TakeListener,
    TakeMetrics,
)
from ._freeze import FreezeFailed, commitBlocking, lateAnswer

__all__ = ["OutgoingHandoff", "HandoffFailed"]

#: seconds between two looks at the busy connections after the commit
_LATER_INTERVAL = 0.005
#: connections pre-copied in one reactor step (fewer once the step has run
#: L{migrate._handoff._slices.STEP_SECONDS}): 20 to 38 us each (2 to 4 ms a
#: step), the reactor polling twice between two steps (L{afterPolls}), as
#: re-exec's pre-copy slices do (L{migrate.strategies._reexec._outgoing}):
#: with 500 a step and one turn between, a step took 18 to 20 ms at 10,000
#: idle connections, and a request that arrived during one was answered
#: only after the next (its answer written at the poll after it)
_PRECOPY_BATCH = 100
#: seconds a timed-out freeze waits for its successor to die after SIGKILL
_KILL_WAIT = 5.0
#: pre-copied connections compared per part of a streamed freeze: the
#: successor restores one part (about 5 ms) while this process compares
#: the next
_FREEZE_PART = 1000
#: changed connections carried per part of a streamed freeze: restoring
#: one costs the successor about 20 us, comparing and describing it this
#: process about 10 us
_CHANGED_PER_PART = 200
#: pre-copied connections looked at, and re-copied, per reactor step of a
#: re-copy round (fewer once the step has run its time), the reactor
#: polling twice between two (as for
#: L{_PRECOPY_BATCH}): each slice goes to the successor at once
_RECOPY_SLICE = 100
#: at most this many re-copy rounds between the pre-copy and the freeze
_RECOPY_ROUNDS = 3
#: a re-copy round after the first stops once it would copy more than this
#: fraction of what the round before copied: the changed set must shrink
#: (each round is then quicker, so fewer connections change during it),
#: or the freeze may as well carry it
_RECOPY_SHRINK = 0.75
#: a first round that copied more than this fraction of the pre-copied
#: connections is the only one: the clients change them faster than a
#: round copies them (1,000 clients sending every 50 ms: all of them; every
#: 200 ms, where the rounds converge: 39 to 84%), and more rounds would
#: only delay the freeze.  That round still pays: the successor lets go of
#: what it restored ahead for them outside the freeze, not in it
_RECOPY_FIRST_CHANGED = 0.9

_log = Logger()


class HandoffFailed(Exception):
    """
    The hand-off cannot complete; the reason is the message.
    """


class OutgoingChannel(HandoffAMP):
    """
    The old process's end of the hand-off channel.
    """

    def __init__(self, handoff: "OutgoingHandoff") -> None:
        amp.AMP.__init__(self)
        self.handoff = handoff
        self.lost = False
        self._lostWaiters: list[Deferred[None]] = []

    @CloseDraining.responder
    def closeGeneration(self, generation: int) -> dict[str, Any]:
        """
        The newer generation asks this one (or an older one it relays for)
        to close its connections cleanly now.
        """
        self.handoff.host.closeGeneration(generation)
        return {}

    @Hello.responder
    def hello(
        self,
        pid: int,
        protocolVersion: int,
        listeners: list[str],
        anyListener: bool = False,
    ) -> dict[str, Any]:
        return self.handoff.successorSaidHello(
            pid, protocolVersion, listeners, anyListener
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.AMP.connectionLost(self, reason)
        self.lost = True
        waiters, self._lostWaiters = self._lostWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def whenLost(self) -> Deferred[None]:
        """
        A L{Deferred} that fires when the channel closes.
        """
        waiter: Deferred[None] = Deferred()
        if self.lost:
            waiter.callback(None)
        else:
            self._lostWaiters.append(waiter)
        return waiter


@define
class OutgoingHandoff:
    """
    One hand-off from this process to a successor.

    @ivar host: the serving L{MigrationHost}.
    @ivar strategyName: reported, and told to the successor.
    @ivar progress: called with a line at each step.
    @ivar moveConnections: whether established connections move too
        (capability transfer) or stay and drain (gradual transfer).
    """

    host: IMigrationHost
    strategyName: str
    progress: Callable[[str], None]
    moveConnections: bool
    successor: SuccessorProcess | None = None
    channel: OutgoingChannel | None = None
    _hello: Deferred[int] = field(factory=Deferred)
    _moving: list[MovingConnection] = field(factory=list)
    _precopied: list[PrecopiedConnection] = field(factory=list)
    _freezeSocket: socket.socket | None = None
    _streamedFreeze: bool = False
    #: whether the successor takes a change of the application state alone
    #: (see L{freezeDelta})
    _appStateOnly: bool = False
    _later: list[Unmovable] = field(factory=list)
    _staying: dict[str, int] = field(factory=dict)
    _failed: dict[str, int] = field(factory=dict)
    _moved: dict[str, int] = field(factory=dict)
    _pausedAccepting: bool = False
    _abortReason: str | None = None
    _threadDeadline: float | None = None
    _committedMoves: list[Any] = field(factory=list)
    _yieldWhenLetGo: bool = False
    _attempt: MigrationAttempt = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._attempt = MigrationAttempt(
            self.host, self.strategyName, self.progress, label="Hand-off"
        )

    def successorSaidHello(
        self,
        pid: int,
        protocolVersion: int,
        listeners: list[str],
        anyListener: bool = False,
    ) -> dict[str, Any]:
        if protocolVersion != HANDOFF_PROTOCOL_VERSION:
            reason = "successor speaks hand-off protocol {}, this process {}".format(
                protocolVersion, HANDOFF_PROTOCOL_VERSION
            )
            self._hello.errback(HandoffFailed(reason))
            raise HandoffRefused(reason)
        missing = sorted(set(self.host.listeners) - set(listeners))
        if missing and not anyListener:
            reason = "the new code has no listener for {}".format(", ".join(missing))
            self._hello.errback(HandoffFailed(reason))
            raise HandoffRefused(reason)
        if not self._hello.called:
            self._hello.callback(pid)
        return {"generation": self.host.generation + 1, "strategy": self.strategyName}

    @inlineCallbacks
    def run(self) -> Any:
        """
        Hand the service to a successor.

        @return: a L{Deferred} firing with the L{MigrationReport}; it never
            fails: every failure is rolled back and reported.
        """
        attempt = self._attempt
        self.host.abortWith(self.abort)
        try:
            attempt.enter(MigrationPhase.spawning)
            yield self._makeRoom()
            yield self._spawn()
            attempt.phaseDone("spawn")
            attempt.enter(MigrationPhase.handingOff)
            yield self._handListeners()
            attempt.phaseDone("listeners")
            if self.moveConnections:
                yield self._precopy()
                attempt.phaseDone("precopy")
                yield self._recopy()
                attempt.phaseDone("recopy")
                self._bringSuccessorForward("the freeze begins")
                yield self._handConnections()
                attempt.phaseDone("connections")
            attempt.enter(MigrationPhase.committing)
            frozenInOneStep = self._freezeSocket is not None
            newPid = yield self._commit()
            if not frozenInOneStep:
                # A freeze times its own phases: freeze, commit.
                attempt.phaseDone("commit")
        except Exception as e:
            reason = self._abortReason or _describe(e)
            attempt.enter(MigrationPhase.rollingBack)
            yield self._rollBack(reason)
            attempt.phaseDone("rollback")
            self.host.abortWith(None)
            return self._report(MigrationOutcome.rolledBack, reason, None)
        self.host.abortWith(None)
        self._releaseMoved()
        try:
            yield self._moveLater()
        except Exception:
            # Committed: whatever went wrong, the busy connections stay
            # here and drain, and the hand-on below must happen.
            _log.failure("Moving busy connections after the commit failed")
        report = self._report(MigrationOutcome.success, None, newPid)
        self._step(
            "successor {} serves generation {}; {} moved, {} draining here".format(
                newPid,
                self.host.generation + 1,
                counted(sum(self._moved.values()), "connection"),
                sum(self._staying.values()),
            )
        )
        channel = self.channel
        assert channel is not None

        def reportDrain(entries: list[dict[str, Any]]) -> None:
            if channel.transport is not None and not channel.lost:
                channel.callRemote(DrainStatus, draining=json.dumps(entries))

        try:
            # The metrics counted this migration (the attempt's report):
            # the successor counts on from there.
            metrics = self.host.metrics
            channel.callRemote(
                Reported,
                report=encodeReport(report.toJSON()),
                metrics=None if metrics is None else json.dumps(metrics.carried()),
            )
        except Exception:
            _log.failure("Could not tell the successor the report")
        self.host.handOn(reportDrain, newPid)
        return report

    @inlineCallbacks
    def _makeRoom(self) -> Any:
        """
        With C{--max-draining N}: if this hand-off would leave more than N
        older generations draining (this process counting as one), have the
        oldest close their connections cleanly first, and wait (at most
        the hand-off timeout) until they have ended.
        """
        limit = self.host.settings.maxDraining
        if limit is None:
            return
        draining = sorted(self.host.draining)
        excess = len(draining) + 1 - limit
        if excess <= 0:
            return
        oldest = draining[:excess]
        self._step(
            "generation{} {} would be more than --max-draining {} allows: "
            "closing {} connections cleanly first".format(
                "s" if len(oldest) > 1 else "",
                ", ".join(str(each) for each in oldest),
                limit,
                "their" if len(oldest) > 1 else "its",
            )
        )
        for generation in oldest:
            self.host.closeGeneration(generation)
        clock = self.host.reactor
        timeout = self.host.settings.handoffTimeout
        deadline = clock.seconds() + timeout
        while clock.seconds() < deadline:
            if not any(each in self.host.draining for each in oldest):
                break
            yield deferLater(clock, 0.05, lambda: None)
        left = [each for each in oldest if each in self.host.draining]
        self._attempt.notes.append(
            "--max-draining {}: generation{} {} closed {} connections first{}".format(
                limit,
                "s" if len(oldest) > 1 else "",
                ", ".join(str(each) for each in oldest),
                "their" if len(oldest) > 1 else "its",
                (
                    "; {} still there after {:g} s".format(
                        ", ".join(str(each) for each in left), timeout
                    )
                    if left
                    else ""
                ),
            )
        )

    def abort(self, reason: str) -> None:
        """
        Give up before the commit: kill the successor, which makes the
        hand-off roll back.  Too late once the commit is under way.
        """
        if self.host.phase is MigrationPhase.committing:
            return
        self._abortReason = "aborted: " + reason
        _log.warn("Aborting the hand-off: {reason}", reason=reason)
        if self.successor is not None and not self.successor.exited:
            self.successor.kill()
        elif not self._hello.called:
            self._hello.errback(HandoffFailed(self._abortReason))

    # Steps

    @inlineCallbacks
    def _spawn(self) -> Any:
        host = self.host
        argv = host.settings.successorArgv or successorCommandLine()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._step("starting a successor: {}".format(" ".join(argv)))
            self.successor = spawnSuccessor(
                host.reactor,
                argv,
                env=successorEnvironment(os.environ),
                handoffSocket=theirs,
                extraEnv={"MIGRATE_HANDOFF_STRATEGY": self.strategyName},
                background=(
                    BackgroundStart.ifPossible(host.reactor, host.settings.readyTimeout)
                    if host.settings.startInBackground
                    else None
                ),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            channel = self.channel = OutgoingChannel(self)
            factory = Factory.forProtocol(lambda: channel)
            host.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        finally:
            ours.close()
        self._step(
            "successor {} started; waiting up to {} s for it to be ready".format(
                self.successor.pid, host.settings.readyTimeout
            )
        )
        yield self._within(
            self._hello,
            host.settings.readyTimeout,
            "not ready within {} s".format(host.settings.readyTimeout),
        )
        self._bringSuccessorForward("its start is done")
        self._step("successor {} is ready".format(self.successor.pid))

    @inlineCallbacks
    def _handListeners(self) -> Any:
        host = self.host
        for listener in host.listeners.values():
            if listener.port is None:
                continue
            yield self._call(
                TakeListener,
                "handing over listener {}".format(listener.key),
                key=listener.key,
                socket=listenerDescriptor(listener.port),
            )
        if host.controlPort is not None:
            yield self._call(
                TakeControl,
                "handing over the control socket",
                socket=listenerDescriptor(host.controlPort),
            )
        if host.metricsPort is not None and host.metrics is not None:
            yield self._call(
                TakeMetrics,
                "handing over the metrics endpoint",
                socket=listenerDescriptor(host.metricsPort),
                carried=json.dumps(host.metrics.carried()),
            )
        yield self._call(Prepare, "starting the application")
        self._step("successor holds the listeners")

    @inlineCallbacks
    def _handConnections(self) -> Any:
        host = self.host
        # While this process still accepts: usually the only wait, the
        # freeze's own step looking again.
        yield self._threadWorkDone()
        host.pauseAccepting()
        self._pausedAccepting = True
        self._freezeMovable()
        if not self._moving:
            self._step("no connection can move now")
            return
        yield self._sendConnections(self._moving)

    @inlineCallbacks
    def _sendBatch(
        self,
        command: type[amp.Command],
        what: str,
        doing: str,
        manifest: bytes,
        descriptors: list[int] | None,
        sources: list[Callable[[], int | None]] | None = None,
        **arguments: Any,
    ) -> Any:
        """
        Send connections' manifest (encoded JSON, one entry per connection)
        and descriptors with C{command}: the C{descriptors} of frozen
        connections (from a thread), or those of live connections looked up
        by C{sources} as they go (from the reactor thread, see
        L{sendLiveDescriptors}).

        @return: a L{Deferred} firing with the successor's answer.

        @raise HandoffFailed: if the manifest is too large or the
            descriptors could not be sent.
        """
        host = self.host
        count = len(sources) if sources is not None else len(descriptors or ())
        if len(manifest) > _MAX_MANIFEST_BYTES:
            raise HandoffFailed(
                "{} connections' state is {} bytes, more than the {} a hand-off "
                "carries".format(count, len(manifest), _MAX_MANIFEST_BYTES)
            )
        manifestFd = writeMemfd(manifest, "migrate-manifest")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._step(
            "{} {} ({} bytes of state)".format(
                doing, counted(count, "connection"), len(manifest)
            )
        )
        timeout = host.settings.handoffTimeout
        if sources is not None:
            sending = sendLiveDescriptors(host.reactor, ours, sources, timeout=timeout)
        else:
            assert descriptors is not None
            try:
                # A few connections (accepted after the pre-copy) go at
                # once, without waiting for a thread.
                sentNow = sendDescriptorsNow(ours, descriptors, timeout=timeout)
            except DescriptorTransferError as e:
                sending = fail(e)
            else:
                sending = (
                    succeed(None)
                    if sentNow
                    else deferToThreadPool(
                        host.reactor,
                        host.reactor.getThreadPool(),
                        sendDescriptors,
                        ours,
                        descriptors,
                        timeout=timeout,
                    )
                )
        # A failure becomes a value (its message): read once the successor
        # has answered, and never left unhandled if the answer fails first.
        sending.addCallbacks(lambda _: None, lambda f: f.getErrorMessage())
        try:
            answer = yield self._call(
                command,
                what,
                count=count,
                manifestSize=len(manifest),
                manifest=manifestFd,
                bulk=theirs.fileno(),
                **arguments,
            )
            problem = yield sending
            if problem is not None:
                raise HandoffFailed("sending descriptors: " + problem)
        finally:
            # The successor has answered (or is gone): the queued descriptors
            # went out, so our copies can close.
            os.close(manifestFd)
            theirs.close()
            if not sending.called and sources is None:
                # A thread still uses the socket.
                sending.addBoth(lambda _: ours.close())
            else:
                # The reactor-thread sender, if it is still at it (no answer
                # came), fails at its next message.
                ours.close()
        return answer

    @inlineCallbacks
    def _sendConnections(self, moving: list[MovingConnection]) -> Any:
        """
        Send frozen connections to the successor, which adopts them held.

        @raise HandoffFailed: if it did not adopt every one.
        """
        answer = yield self._sendBatch(
            AdoptConnections,
            "adopting connections",
            "moving",
            # Each state was checked as it was captured: encoded without
            # walking every state a second time.
            json.dumps(
                [each.entry for each in moving],
                ensure_ascii=True,
                allow_nan=False,
                separators=(",", ":"),
            ).encode("ascii"),
            [each.frozen.descriptor() for each in moving],
        )
        adopted = answer["adopted"]
        refused = _parseRefusals(answer["refused"])
        if answer["refusedCount"] or adopted != len(moving):
            raise self._allOrNothing(len(moving) - adopted, moving, refused)
        self._step("successor adopted {}".format(counted(adopted, "connection")))

    @inlineCallbacks
    def _precopy(self) -> Any:
        """
        Send every connection that can move now, with a first copy of its
        state, while this process goes on serving it; the successor stages
        them.  A successor that does not know pre-copy (older code) makes
        this a no-op: every connection is then frozen and sent as before.

        @raise HandoffFailed: if the successor refused any (all or nothing).
        """
        clock = self.host.reactor
        connections = list(self.host.allConnections())
        precopied: list[PrecopiedConnection] = []
        entries: list[str] = []
        index = 0
        longest = 0.0
        while index < len(connections):
            if index:
                # This process serves its clients between two steps: reads
                # what arrived, then writes the answers.
                yield afterPolls(clock, 2)
            began = clock.seconds()
            # _PRECOPY_BATCH connections at most, fewer once the step has
            # run its time (large states, a busy machine).
            for piece in timedChunks(connections, index, _PRECOPY_BATCH, clock):
                index += len(piece)
                batch, encoded = precopyMovable(piece, len(precopied) + 1)
                precopied.extend(batch)
                entries.append(encoded)
            longest = max(longest, clock.seconds() - began)
        self._attempt.durations["precopy slice"] = longest
        if not precopied:
            return
        freezeOurs, freezeTheirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Staging the copies is the successor's work nobody waits for: the
        # process serving the clients comes first until the freeze.
        self._sendSuccessorBack("it stages the pre-copy")
        try:
            answer = yield self._sendBatch(
                PrecopyConnections,
                "pre-copying connections",
                "pre-copying",
                # Encoded already, a batch of entries at a time.
                ("[" + ",".join(each for each in entries if each) + "]").encode(
                    "ascii"
                ),
                None,
                [each.liveDescriptor for each in precopied],
                freeze=freezeTheirs.fileno(),
            )
        except amp.UnhandledCommand:
            freezeOurs.close()
            self._step("the successor does not know pre-copy: connections move frozen")
            return
        except BaseException:
            freezeOurs.close()
            raise
        finally:
            freezeTheirs.close()
        self._precopied = precopied
        self._freezeSocket = freezeOurs
        self._streamedFreeze = answer.get("streamed") is True
        self._appStateOnly = answer.get("appStateOnly") is True
        if answer["refusedCount"]:
            raise self._allOrNothing(
                answer["refusedCount"], precopied, _parseRefusals(answer["refused"])
            )
        self._step(
            "successor staged {}; this process still serves them".format(
                counted(answer["staged"], "connection")
            )
        )

    @inlineCallbacks
    def _recopy(self) -> Any:
        """
        After the pre-copy, before the freeze: a few rounds that send again
        the state of every pre-copied connection that changed since its
        last copy, a slice of connections per reactor turn while this
        process goes on serving them, as live migration of virtual machines
        copies the pages dirtied meanwhile.  Under load, every connection
        changes between the pre-copy and the freeze (a client sending a
        line every 50 ms, a pre-copy answered 100 ms before it).  Each
        slice goes to the successor as soon as it is copied.  When a round
        is quicker than the clients' pace, the next finds fewer changed
        and is quicker still, and the freeze carries only what changed
        since the last; when it is not (1,000 clients each sending every
        50 ms on two loaded cores), the rounds stop after the second.

        The rounds stop once nothing changed, after L{_RECOPY_ROUNDS}, or
        when a round would not copy clearly fewer than the one before
        (L{_RECOPY_SHRINK}: the clients change them as fast as they are
        copied); a first round that found nearly all of them changed is the
        only one (L{_RECOPY_FIRST_CHANGED}).  A successor that does not know re-copy (older code)
        makes this a no-op: the freeze carries every change.

        @raise HandoffFailed: if the successor refused a new state (all or
            nothing: this process keeps every connection).
        """
        precopied = self._precopied
        if self._freezeSocket is None or not precopied:
            return
        clock = self.host.reactor
        previous: int | None = None
        for number in range(1, _RECOPY_ROUNDS + 1):
            sent: list[tuple[list[tuple[PrecopiedConnection, Any]], Deferred[Any]]]
            sent = []
            count = size = 0
            stopped = False
            index = 0
            while index < len(precopied):
                if index:
                    # This process serves its clients between two slices.
                    yield afterPolls(clock, 2)
                batch = []
                parts = []
                # _RECOPY_SLICE connections at most, fewer once the step
                # has run its time.
                for piece in timedChunks(precopied, index, _RECOPY_SLICE, clock):
                    index += len(piece)
                    found, encodedPiece = recopyChanged(piece)
                    batch.extend(found)
                    if encodedPiece:
                        parts.append(encodedPiece)
                if not batch:
                    continue
                encoded = ",".join(parts)
                if previous is not None and count + len(batch) > previous * (
                    _RECOPY_SHRINK
                ):
                    stopped = True
                    why = (
                        "more than {:.0%} of the {} connections round {} copied "
                        "changed again".format(_RECOPY_SHRINK, previous, number - 1)
                    )
                    break
                manifest = ("[" + encoded + "]").encode("ascii")
                if len(manifest) > _MAX_MANIFEST_BYTES:
                    # The freeze carries them (or says why it cannot).
                    continue
                count += len(batch)
                size += len(manifest)
                # Sent at once: the successor takes this slice while this
                # process serves, then copies the next.
                sent.append((batch, self._sendRecopy(manifest, len(batch))))
            if sent:
                self._step(
                    "re-copy round {}: {} changed since the last copy ({} bytes "
                    "of state)".format(number, counted(count, "connection"), size)
                )
            outcomes = yield DeferredList(
                [answer for _, answer in sent], consumeErrors=True
            )
            for (batch, _), (ok, outcome) in zip(sent, outcomes):
                if not ok:
                    if outcome.check(amp.UnhandledCommand):
                        self._step(
                            "the successor does not know re-copy: the freeze "
                            "carries every change"
                        )
                        return
                    outcome.raiseException()
                if outcome["refusedCount"]:
                    raise self._allOrNothing(
                        outcome["refusedCount"],
                        [each for each, _ in batch],
                        _parseRefusals(outcome["refused"]),
                        "the new state of ",
                    )
            # The successor holds these states now: the freeze compares
            # with them.
            for batch, _ in sent:
                for each, fingerprint in batch:
                    each.fingerprint = fingerprint
            if stopped:
                self._step(
                    "re-copy round {} stopped: {}; the freeze carries "
                    "them".format(number, why)
                )
                return
            if not sent:
                return
            if previous is None and count > len(precopied) * _RECOPY_FIRST_CHANGED:
                self._step(
                    "re-copy rounds end: {} of {} changed since the pre-copy, "
                    "faster than a round copies them; the freeze carries what "
                    "changes next".format(count, len(precopied))
                )
                return
            previous = count

    def _sendRecopy(self, manifest: bytes, count: int) -> Deferred[Any]:
        """
        Send the new state of C{count} pre-copied connections (their
        entries, encoded) with L{RecopyConnections}.

        @return: a L{Deferred} firing with the successor's answer.
        """
        manifestFd = writeMemfd(manifest, "migrate-recopy")

        def close(result: Any) -> Any:
            os.close(manifestFd)
            return result

        try:
            answer = self._call(
                RecopyConnections,
                "re-copying connections",
                count=count,
                manifestSize=len(manifest),
                manifest=manifestFd,
            )
        except BaseException:
            os.close(manifestFd)
            raise
        return answer.addBoth(close)

    def _stopLateSuccessor(self, sock: socket.socket) -> None:
        """
        The freeze timed out: before this process reads its connections
        again, make sure the successor is dead, since it may have begun to
        serve just as the wait ended (it answers before it reads anything).
        Say so if it had: what it read in that moment is lost.
        """
        successor = self.successor
        if successor is None:
            return
        if not successor.killNow(_KILL_WAIT):
            _log.error(
                "Successor {pid} was not dead {seconds} s after SIGKILL",
                pid=successor.pid,
                seconds=_KILL_WAIT,
            )
        late = lateAnswer(sock)
        if late is not None and "pid" in late:
            _log.error(
                "Successor {pid} had begun to serve just as the freeze timed out; "
                "it is killed, and what it read from clients in that moment is lost",
                pid=successor.pid,
            )
            self._attempt.notes.append(
                "successor {} answered just after the freeze timed out and was "
                "killed: what it read from clients in that moment is "
                "lost".format(successor.pid)
            )

    def _freezeAndCommitNow(self) -> int | None:
        """
        In one reactor step: compare every pre-copied connection with its
        copy, send what changed and the commit, and wait for the answer with
        the reactor standing still.  Every moved connection is then the
        successor's: this process forgets it, and lets go of its socket
        before the reactor runs again (L{_carryOn}).

        @return: the successor's process id; L{None}, having touched
            nothing, if a thread handed the reactor work (or a thread pool
            job started) since the last look: it must land first.

        @raise HandoffFailed: if the successor did not commit; nothing was
            touched here.
        """
        if workInFlight(self.host.reactor) is not None:
            return None
        attempt = self._attempt
        precopied = self._precopied
        final: Any
        if self._streamedFreeze:
            # The successor restores the connections of one part while this
            # process compares the next (each part is compared as it is
            # sent, the last one included).
            delta, parts, lastPart = freezeInParts(
                precopied,
                _FREEZE_PART,
                partial(freezeDelta, appStateOnly=self._appStateOnly),
                _CHANGED_PER_PART,
            )

            def final() -> dict[str, Any]:
                plain = lastPart()
                attempt.phaseDone("freeze")
                return plain

        else:
            delta = freezeDelta(precopied, self._appStateOnly)
            attempt.phaseDone("freeze")
            parts = iter(())
            final = delta.toPlain()

        staying: list[Unmovable] = []

        def sortWithdrawn() -> None:
            for _, why in delta.withdrawn:
                if why is None:
                    continue
                if why.later:
                    self._later.append(why)
                else:
                    staying.append(why)

        sock = self._freezeSocket
        assert sock is not None
        try:
            successor = self.successor
            answer = commitBlocking(
                sock,
                final,
                self.host.settings.freezeTimeout,
                outputPipes=None if successor is None else successor.outputPipes(),
                onOutput=(
                    (lambda childFD, data: None)
                    if successor is None
                    else successor.deliverOutput
                ),
                parts=parts,
            )
        except FreezeFailed as e:
            sortWithdrawn()
            if e.timedOut:
                self._stopLateSuccessor(sock)
            self._precopied = []
            reason = str(e)
            if e.ident is not None:
                reason = (
                    "the new code refused {}; the hand-off is all or nothing".format(
                        self._firstRefused({e.ident: reason}, delta.moving)
                    )
                )
            raise HandoffFailed(reason)
        finally:
            sock.close()
            self._freezeSocket = None
        sortWithdrawn()
        attempt.phaseDone("commit")
        # The successor serves every connection now; if none is left here,
        # what this process still does (letting go of them, exiting) must
        # not take its CPU.
        self._yieldWhenLetGo = not (
            staying or self._later or any(self._staying.values())
        )
        for each in delta.moving:
            each.hosted.release()
            self._moved[each.listenerKey] = self._moved.get(each.listenerKey, 0) + 1
        self._committedMoves.extend(delta.moving)
        self._precopied = []
        self._noteStaying(staying)
        self._step(
            "froze and committed: {} changed since their last copy".format(
                counted(len(delta.changes), "connection")
            )
        )
        return int(answer["pid"])

    def _bringSuccessorForward(self, why: str) -> None:
        """
        If the successor started in the background, give it this process's
        CPU priority: once its interpreter and imports are done, since the
        application's start follows, which may start processes of the
        application's that would keep the low priority; and again when the
        freeze begins, after the pre-copy sent it back (L{_sendSuccessorBack}),
        since the clients wait for it from then on.
        """
        if self.successor is not None:
            self.successor.bringForward(why)

    def _sendSuccessorBack(self, why: str) -> None:
        """
        If the successor started in the background, give it the lowest CPU
        priority again while it stages the pre-copy and the re-copies: its
        threads compete with this process's for the processor, and this
        process serves every client until the freeze.  Processes the
        application started stay at the service's priority.  The bound of
        a background start holds (L{BackgroundStart.sendBack}).
        """
        if self.successor is not None:
            self.successor.sendBack(why)

    def _yieldProcessor(self, moved: int) -> None:
        """
        The successor committed and no connection stays here: if the host's
        settings say this process ends once handed on, lower its CPU
        priority for the rest of its life (never raised again), so that
        letting go of the C{moved} connections and exiting yield the
        processor to the successor, which serves them already.
        """
        if not self.host.settings.yieldWhenHandedOn:
            return
        try:
            lowerOwnPriority(HANDED_ON_NICENESS)
        except OSError as e:
            _log.warn(
                "Could not lower this process's priority after handing on: {error}",
                error=e,
            )
            return
        _log.info(
            "Handed on every connection; process {pid} lets go of {count} "
            "connections and exits at {priority}",
            pid=os.getpid(),
            count=moved,
            priority=describePriority(HANDED_ON_NICENESS, True),
        )

    def _allOrNothing(
        self,
        count: int,
        connections: list[Any],
        refused: dict[int, str],
        what: str = "",
    ) -> HandoffFailed:
        """
        Why the hand-off fails: the new code refused C{count} of
        C{connections} (C{what} of them: C{"the new state of "}, say),
        naming the first it refused, from C{refused}.
        """
        return HandoffFailed(
            "the new code refused {}{} of {} (first: {}); the hand-off is all or "
            "nothing".format(
                what,
                count,
                counted(len(connections), "connection"),
                self._firstRefused(refused, connections),
            )
        )

    def _firstRefused(self, refused: dict[int, str], moving: list[Any]) -> str:
        """
        Name the first connection the successor refused, and why: its peer
        and listener, which an operator can find, not only its class.
        """
        if not refused:
            return "not adopted"
        ident, why = next(iter(refused.items()))
        for each in moving:
            if each.ident == ident:
                return "connection from {} on {}: {}".format(
                    describePeer(each.hosted), each.listenerKey, why
                )
        return "connection {}: {}".format(ident, why)

    def _notPrecopied(self) -> list[tuple[Any, Any]]:
        """
        The connections (listener and hosted connection) that were not
        pre-copied: those that freeze now, or stay.
        """
        precopied = {id(each.hosted) for each in self._precopied}
        return [
            (listener, hosted)
            for listener, hosted in self.host.allConnections()
            if id(hosted) not in precopied
        ]

    def _freezeMovable(self) -> None:
        self._moving, staying = freezeMovable(self._notPrecopied())
        # Busy ones move after the commit, at their next safe point.
        self._later = [each for each in staying if each.later]
        self._noteStaying([each for each in staying if not each.later])

    def _noteStaying(self, staying: list[Unmovable]) -> None:
        """
        Count connections that stay and drain, and say in the report why
        (a state over the codec's limit, a protocol that does not opt in,
        TLS), bounded.
        """
        reasons: dict[str, int] = {}
        for each in staying:
            self._staying[each.listenerKey] = self._staying.get(each.listenerKey, 0) + 1
            reasons[each.reason] = reasons.get(each.reason, 0) + 1
        for reason, count in sorted(reasons.items())[:_MAX_STAY_NOTES]:
            self._attempt.notes.append(
                "{} connection{} cannot move and stay{} on process {}: {}".format(
                    count,
                    "" if count == 1 else "s",
                    "s" if count == 1 else "",
                    self.host.pid,
                    reason if len(reason) <= 500 else reason[:500] + "...",
                )
            )
        if len(reasons) > _MAX_STAY_NOTES:
            self._attempt.notes.append(
                "{} more reasons why connections cannot move are in the "
                "log".format(len(reasons) - _MAX_STAY_NOTES)
            )

    def _stay(self, key: str) -> None:
        self._staying[key] = self._staying.get(key, 0) + 1

    @inlineCallbacks
    def _moveLater(self) -> Any:
        """
        After the commit: move each connection that was busy (a request in
        flight) as soon as it reaches its next safe point, in small batches,
        for at most C{--safe-point-timeout} seconds; those that do not make
        it stay and drain.  A batch that fails stays too; it never undoes
        the commit.
        """
        later, self._later = self._later, []
        if not later:
            return
        host = self.host
        bound = float(host.settings.safePointTimeout)
        attempt = self._attempt
        if bound <= 0:
            for u in later:
                self._stay(u.listenerKey)
            return
        try:
            # An older successor does not know the command: nothing moves
            # later, nothing is left half adopted.
            yield self._call(CommitAdopted, "checking the successor takes more")
        except Exception as e:
            for u in later:
                self._stay(u.listenerKey)
            attempt.notes.append(
                "{} busy connections stay: the successor cannot take connections "
                "after the commit ({})".format(len(later), _describe(e))
            )
            return
        clock = host.reactor
        started = clock.seconds()
        atOnce = sum(self._moved.values())
        self._step(
            "moving {} busy connection{} at their next safe point (up to {} s)".format(
                len(later), "" if len(later) == 1 else "s", bound
            )
        )
        _log.info(
            "Waiting up to {bound} s for {count} connections to reach a safe point",
            bound=bound,
            count=len(later),
        )
        watch = SafePointWatch([(u.listenerKey, u.hosted) for u in later])
        movedLater = 0
        problem: str | None = None
        try:
            while watch.waiting and problem is None:
                if clock.seconds() - started >= bound:
                    break
                yield deferLater(clock, _LATER_INTERVAL, lambda: None)
                if workInFlight(clock) is not None:
                    # A thread's answer may be on its way to one of them:
                    # none freezes before it has landed.
                    continue
                ready = watch.takeReady()
                if not ready:
                    continue
                listeners = host.listeners
                moving, staying = freezeMovable(
                    [(listeners[w.listenerKey], w.hosted) for w in ready]
                )
                try:
                    if moving:
                        yield self._sendConnections(moving)
                        yield self._call(
                            CommitAdopted,
                            "committing {} connections at their safe point".format(
                                len(moving)
                            ),
                        )
                except Exception as e:
                    problem = _describe(e)
                    for m in moving:
                        m.resume()
                        self._stay(m.listenerKey)
                else:
                    for m in moving:
                        m.release()
                        tellMigrated(m.hosted.wrappedProtocol)
                        self._moved[m.listenerKey] = (
                            self._moved.get(m.listenerKey, 0) + 1
                        )
                    movedLater += len(moving)
                for u in staying:
                    self._stay(u.listenerKey)
                for w in ready:
                    w.letGo()
        finally:
            # Busy ones still watched read again as they were.
            remaining = watch.stop()
        for w in remaining:
            self._stay(w.listenerKey)
        waited = clock.seconds() - started
        attempt.notes.append(
            "{} connection{} moved at once, {} later (each at its next safe "
            "point, within {:.3f} s of the commit)".format(
                atOnce, "" if atOnce == 1 else "s", movedLater, waited
            )
        )
        if remaining:
            attempt.notes.append(
                "{} connection{} did not reach a safe point within {} s (a "
                "request in flight, a message half received) and stay{} on "
                "process {}".format(
                    len(remaining),
                    "" if len(remaining) == 1 else "s",
                    bound,
                    "s" if len(remaining) == 1 else "",
                    host.pid,
                )
            )
        if problem is not None:
            attempt.notes.append(
                "moving busy connections later stopped: {}; they stay".format(problem)
            )

    @inlineCallbacks
    def _commit(self) -> Any:
        """
        Have the successor commit: with a freeze in one step of its own
        after pre-copy, or with L{Commit}.  Either way, the migration
        carries on from the step in which the commit was answered, and this
        process lets go of the moved connections at the end of that step
        (L{_carryOn}).

        @return: a L{Deferred} firing with the successor's process id.
        """
        while self._freezeSocket is not None:
            yield self._threadWorkDone()
            # Two polls first: one reads the requests that arrived while
            # the connections not pre-copied were frozen (or the threads
            # were waited for), the next writes the answers, which would
            # otherwise wait, queued, through the whole freeze.
            yield afterPolls(self.host.reactor, 2)
            committed: Deferred[int | None] = Deferred()
            # From a reactor step of its own, outside any read path; a
            # thread that handed the reactor work since makes it wait again.
            self.host.reactor.callLater(0, self._freezeStep, committed)
            pid = yield committed
            if pid is not None:
                return pid
        committed = Deferred()
        self._call(Commit, "committing").addCallbacks(
            lambda answer: self._carryOn(committed, answer["pid"]),
            committed.errback,
        )
        pid = yield committed
        return pid

    def _freezeStep(self, committed: Deferred[int | None]) -> None:
        with collectionsPaused():
            try:
                pid = self._freezeAndCommitNow()
            except BaseException:
                committed.errback()
                return
            self._carryOn(committed, pid)

    def _carryOn(self, committed: Deferred[int | None], pid: int | None) -> None:
        """
        The successor committed (or, for L{None}, the freeze stood down):
        carry on with the migration, which, unless busy connections are
        still to move, makes its report in this same reactor step, tells
        the successor, and answers whoever asked; then have those answers
        leave now, and only then let go of the moved connections, before
        the reactor runs again.  The successor serves them already: letting
        go of thousands, at a low priority on a busy machine, took seconds
        that the upgrade command waited for.
        """
        committed.callback(pid)
        if pid is None:
            return
        try:
            self._letGoCommitted()
        except Exception:
            _log.failure("Letting go of the moved connections failed")

    def _letGoCommitted(self) -> None:
        """
        Write out what this process buffers for anything but the moved
        connections (the report for the control client and for the
        successor), then let go of the moved connections, and tell their
        old protocol objects (L{tellMigrated}: their timers stop).
        """
        moved, self._committedMoves = self._committedMoves, []
        if not moved:
            return
        reactor = self.host.reactor
        started = reactor.seconds()
        flushWriters(reactor, exclude={_transportOf(each) for each in moved})
        if self._yieldWhenLetGo:
            self._yieldProcessor(len(moved))
        for each in moved:
            each.release()
        for each in moved:
            tellMigrated(each.hosted.wrappedProtocol)
        _log.info(
            "Let go of {count} moved connections in {seconds:.3f} s",
            count=len(moved),
            seconds=reactor.seconds() - started,
        )

    @inlineCallbacks
    def _threadWorkDone(self) -> Any:
        """
        Before connections freeze: let the reactor deliver every answer
        its threads owe it (C{deferToThread} jobs running, calls they
        queued with C{callFromThread}), waiting at most
        C{--safe-point-timeout} seconds from the first wait of this
        hand-off.  Such an answer belongs to no connection this process
        can see, and would otherwise land here after its connection moved:
        lost.  When it returns, nothing is in flight in this reactor step.

        @raise HandoffFailed: if work is still in flight at the bound: the
            hand-off rolls back, every connection still served here.
        """
        reactor = self.host.reactor
        work = workInFlight(reactor)
        if work is None:
            return
        bound = float(self.host.settings.safePointTimeout)
        started = reactor.seconds()
        if self._threadDeadline is None:
            self._threadDeadline = started + bound
        self._step(
            "waiting up to {:g} s for {} to finish before the freeze".format(
                max(0.0, self._threadDeadline - started), work.describe()
            )
        )
        _log.info("Waiting for threads before the freeze: {work}", work=work.describe())
        left = yield waitForThreadWork(reactor, self._threadDeadline)
        if left is not None:
            raise HandoffFailed(
                "threads still owed answers after {:g} s ({}), which would "
                "reach this process after their connections moved: try again "
                "once they are done, or raise --safe-point-timeout".format(
                    bound, left.describe()
                )
            )
        self._step(
            "the threads' work finished after {:.3f} s".format(
                reactor.seconds() - started
            )
        )

    def _releaseMoved(self) -> None:
        """
        The successor committed: the frozen connections it adopted are its
        own; this process forgets them now, and lets go of their sockets at
        the end of this reactor step (L{_carryOn}).
        """
        for each in self._moving:
            each.hosted.release()
            self._moved[each.listenerKey] = self._moved.get(each.listenerKey, 0) + 1
        self._committedMoves.extend(self._moving)
        self._moving = []
        if self._pausedAccepting:
            self._pausedAccepting = False
        for listener, hosted in self.host.allConnections():
            if not self.moveConnections:
                self._staying[listener.key] = self._staying.get(listener.key, 0) + 1

    @inlineCallbacks
    def _rollBack(self, reason: str) -> Any:
        _log.error("Hand-off failed, rolling back: {reason}", reason=reason)
        self._step("rolling back: " + reason)
        successor = self.successor
        if successor is not None and not successor.exited:
            successor.kill()
            try:
                yield firstOf(
                    [successor.whenEnded()],
                    self.host.reactor,
                    10.0,
                    "successor did not end",
                )
            except DeadlinePassed:
                self._attempt.notes.append(
                    "successor {} did not end after SIGKILL".format(successor.pid)
                )
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        if self._freezeSocket is not None:
            self._freezeSocket.close()
            self._freezeSocket = None
        # Pre-copied connections were never frozen: nothing to resume.
        self._precopied = []
        for each in self._moving:
            each.resume()
            self._staying[each.listenerKey] = self._staying.get(each.listenerKey, 0) + 1
        self._moving = []
        for busy in self._later:
            self._stay(busy.listenerKey)
        self._later = []
        if self._pausedAccepting:
            self.host.resumeAccepting()
            self._pausedAccepting = False
        self._step("rolled back: this process keeps serving")

    # Helpers

    def _within(
        self, waited: Deferred[Any], timeout: float, timeoutReason: str
    ) -> Deferred[Any]:
        """
        Wait for C{waited}, unless the successor ends, the channel closes or
        C{timeout} passes first: whichever happens first decides.
        """
        contenders: list[Deferred[Any]] = [waited]
        if self.successor is not None:
            contenders.append(self.successor.whenEnded().addCallback(self._ended))
        if self.channel is not None:
            contenders.append(self.channel.whenLost().addCallback(self._channelLost))
        return firstOf(contenders, self.host.reactor, timeout, timeoutReason)

    def _ended(self, status: Any) -> None:
        tail = self.successor.logTail() if self.successor is not None else []
        last = tail[-1] if tail else "no output"
        describe = getattr(status, "describe", None)
        how = describe() if describe is not None else str(status)
        raise HandoffFailed(
            "successor {} ({}); last output: {}".format(
                self.successor.pid if self.successor is not None else "?", how, last
            )
        )

    def _channelLost(self, _: Any) -> Deferred[None]:
        """
        The channel closed: usually because the successor is dying.  Give
        its exit a moment to arrive, since it says more than the channel.
        """
        successor = self.successor
        if successor is None or successor.exited:
            raise HandoffFailed("the hand-off channel closed")

        def closedOnly(failure: Failure) -> None:
            failure.trap(DeadlinePassed)
            raise HandoffFailed("the hand-off channel closed")

        return firstOf(
            [successor.whenEnded().addCallback(self._ended)],
            self.host.reactor,
            2.0,
            "",
        ).addErrback(closedOnly)

    def _call(
        self, command: type[amp.Command], what: str, **arguments: Any
    ) -> Deferred[Any]:
        assert self.channel is not None
        d = self.channel.callRemote(command, **arguments)

        def refused(failure: Failure) -> Failure:
            if failure.check(HandoffRefused):
                raise HandoffFailed(
                    "successor refused {}: {}".format(what, failure.getErrorMessage())
                )
            if failure.check(CancelledError):
                return failure
            if failure.check(ConnectionDone, amp.ProtocolSwitched):
                raise HandoffFailed("the hand-off channel closed while " + what)
            if failure.check(amp.RemoteAmpError, amp.UnknownRemoteError):
                raise HandoffFailed(
                    "successor failed {}: {}".format(what, failure.getErrorMessage())
                )
            return failure

        d.addErrback(refused)
        return self._within(
            d,
            self.host.settings.handoffTimeout,
            "successor did not answer within {} s while {}".format(
                self.host.settings.handoffTimeout, what
            ),
        )

    def _step(self, message: str) -> None:
        self._attempt.step(message)

    def _report(
        self, outcome: MigrationOutcome, reason: str | None, newPid: int | None
    ) -> MigrationReport:
        host = self.host
        listeners = [
            ListenerReport(
                key,
                moved=self._moved.get(key, 0),
                drained=(
                    self._staying.get(key, 0)
                    if outcome is MigrationOutcome.success
                    else 0
                ),
                failed=self._failed.get(key, 0),
            )
            for key in host.listeners
        ]
        if outcome is not MigrationOutcome.success and self.successor is not None:
            self._attempt.successorLog[:] = self.successor.logTail()
        return self._attempt.report(
            outcome,
            reason,
            listeners=listeners,
            toGeneration=host.generation + 1 if newPid is not None else None,
            newPid=newPid,
        )


_MAX_MANIFEST_BYTES = 512 * 1024 * 1024
_MAX_MANIFEST_DEPTH = 48
#: the most distinct reasons for connections staying behind a report lists
_MAX_STAY_NOTES = 10


def _transportOf(connection: Any) -> Any:
    """
    The transport of a committed connection: pre-copied (live) or frozen.
    """
    transport = getattr(connection, "transport", None)
    if transport is None:
        transport = getattr(getattr(connection, "frozen", None), "transport", None)
    return transport


def _describe(error: BaseException) -> str:
    if isinstance(error, (HandoffFailed, DeadlinePassed)):
        return str(error)
    text = str(error)
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def _parseRefusals(text: str) -> dict[int, str]:
    try:
        items = json.loads(text)
        return {int(each["id"]): str(each["reason"]) for each in items}
    except (ValueError, TypeError, KeyError):
        return {}
