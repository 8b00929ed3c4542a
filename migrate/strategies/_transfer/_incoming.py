"""
The successor's side of a hand-off: say hello, adopt what the old process
hands over (paused), and serve once it commits; give everything back
untouched if the old process goes away before that.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..._codec import StateError, loadCheckedJSON
from ..._handoff._fdpass import (
    DescriptorTransferError,
    readMemfd,
    receiveDescriptors,
    receiveDescriptorsNow,
)
from ..._handoff._listeners import adoptListener
from ..._handoff._movement import (
    AdoptedConnection,
    StagedConnection,
    adoptEntry,
    stageEntry,
)
from ..._handoff._waiting import servingOrder
from ..._host._heap import collectionsPaused, freezeNewObjects, heapFrozenUntil
from ...interfaces import IMigrationHost
from ._channel import (
    HANDOFF_PROTOCOL_VERSION,
    AdoptConnections,
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
    parseDrainStatus,
)
from ._freeze import FreezeReceiver, listenForFreeze

__all__ = ["IncomingChannel", "startIncoming"]

_MAX_MANIFEST_BYTES = 512 * 1024 * 1024
#: how many refusals an answer describes, and how long each reason may be
_REFUSALS_TOLD = 20
_REASON_CHARS = 500
#: connections restored at a freeze that start reading in one reactor turn
_RESUME_SLICE = 500
#: connections restored ahead of the freeze in one reactor turn (a few
#: milliseconds)
_AHEAD_SLICE = 500


class _Refusals:
    """
    The connections of one batch the new code refused: all counted, the
    first few described (bounded), each logged.
    """

    _log = Logger()

    def __init__(self) -> None:
        self.count = 0
        self._described: list[dict[str, Any]] = []

    def add(self, ident: Any, error: BaseException) -> None:
        reason = str(error) or type(error).__name__
        self._log.warn("Refusing connection {ident}: {why}", ident=ident, why=reason)
        self.count += 1
        if len(self._described) < _REFUSALS_TOLD:
            self._described.append({"id": ident, "reason": reason[:_REASON_CHARS]})

    def answer(self) -> dict[str, Any]:
        """
        The refusals, as a batch's answer says them.
        """
        return {"refusedCount": self.count, "refused": json.dumps(self._described)}


class IncomingChannel(HandoffAMP):
    """
    The successor's end of the hand-off channel.

    @ivar host: the L{migrate.MigrationHost} inheriting the service.
    @ivar inheritance: the inherited hand-off (its C{takeOverOutput} moves
        this process's output to where the old process wrote).
    """

    _log = Logger()

    def __init__(self, host: IMigrationHost, inheritance: Any) -> None:
        amp.AMP.__init__(self)
        self.host = host
        self.inheritance = inheritance
        self.committed = False
        self.generation: int | None = None
        self.oldPid = os.getppid()
        self._adopted: list[AdoptedConnection] = []
        self._staged: dict[Any, StagedConnection] = {}
        #: staged connections their clients reset during the pre-copy
        self._reset: set[Any] = set()
        #: restored at the freeze, served in slices after the commit
        self._resuming: list[AdoptedConnection] = []
        #: the staged copies restored at the freeze, freed in slices after
        #: the commit
        self._spent: list[StagedConnection] = []
        self._freeze: FreezeReceiver | None = None
        #: fires once every connection restored at the freeze is served,
        #: or the hand-off ends without serving them: the heap, frozen out
        #: of collections since the pre-copy (see L{_freezeCommit}), then
        #: thaws
        self._heapThawed: Deferred[None] = Deferred()
        #: the staged connections in the order the old process compares
        #: them (set at the freeze's first part), and how far the parts
        #: restored
        self._order: list[StagedConnection] | None = None
        self._cursor = 0
        #: restored at the freeze so far (by C{id}): those that changed,
        #: the others
        self._restoredIds: set[int] = set()
        self._restoredFirst: list[AdoptedConnection] = []
        self._restoredRest: list[AdoptedConnection] = []
        #: why a restore ahead of the freeze was refused (the freeze is
        #: then refused too)
        self._refusedAhead: str | None = None
        #: restored ahead of the freeze, and of those the objects abandoned
        #: at the freeze (their connection changed or was withdrawn)
        self._aheadCount = 0
        self._aheadAbandoned = 0

    def connectionMade(self) -> None:
        amp.AMP.connectionMade(self)
        d = self.callRemote(
            Hello,
            pid=os.getpid(),
            protocolVersion=HANDOFF_PROTOCOL_VERSION,
            listeners=list(self.host.listeners),
            anyListener=self.host.acceptsAnyListener,
        )
        d.addCallbacks(self._welcomed, self._refused)

    def _welcomed(self, answer: dict[str, Any]) -> None:
        self.generation = answer["generation"]
        self._log.info(
            "Successor {pid} will serve generation {generation} ({strategy})",
            pid=os.getpid(),
            generation=self.generation,
            strategy=answer["strategy"],
        )

    def _refused(self, reason: Failure) -> None:
        self._log.error(
            "The old process refused this successor: {why}",
            why=reason.getErrorMessage(),
        )
        if self.transport is not None:
            self.transport.loseConnection()

    @TakeListener.responder
    def takeListener(self, key: str, socket: int) -> dict[str, Any]:
        if self.committed:
            os.close(socket)
            raise HandoffRefused("already serving")
        try:
            listener = self.host.listenerNamed(key)
        except KeyError:
            os.close(socket)
            raise HandoffRefused("no listener {!r} in the new code".format(key))
        if listener.port is not None:
            os.close(socket)
            raise HandoffRefused("listener {!r} handed over twice".format(key))
        listener.port = adoptListener(
            self.host.reactor, socket, listener.factory, accepting=False
        )
        self._log.info("Adopted listener {key}", key=key)
        return {}

    @TakeControl.responder
    def takeControl(self, socket: int) -> dict[str, Any]:
        from ..._control._server import adoptControl

        port = adoptControl(self.host.reactor, socket, self.host, accepting=False)
        self.host.adoptControlPort(port)
        return {}

    @TakeMetrics.responder
    def takeMetrics(self, socket: int, carried: str) -> dict[str, Any]:
        from ..._host._metrics import adoptMetrics

        metrics = self.host.metrics
        if metrics is None:
            # This code serves no metrics: the endpoint closes with the old
            # process.
            os.close(socket)
            return {}
        port = adoptMetrics(self.host.reactor, socket, metrics)
        self.host.adoptMetricsPort(port, _loadJSON(carried))
        return {}

    @Prepare.responder
    def prepare(self) -> dict[str, Any]:
        try:
            self.host.prepareApplication()
        except Exception as e:
            self._log.failure("The application did not start")
            raise HandoffRefused(
                "the application did not start: {}: {}".format(type(e).__name__, e)
            )
        return {}

    @inlineCallbacks
    def _receiveBatch(
        self, count: int, manifestSize: int, manifest: int, bulk: int
    ) -> Any:
        """
        Read a batch's manifest and receive its descriptors.

        @return: a L{Deferred} firing with the entries and the descriptors,
            in the same order.

        @raise HandoffRefused: if the manifest is unreadable or does not
            match, or the descriptors did not all arrive.
        """
        bulkSocket = socket.socket(fileno=bulk)
        try:
            entries = _readManifest(count, manifestSize, manifest)
            timeout = self.host.settings.handoffTimeout
            try:
                # A few connections' descriptors, sent before the command,
                # are here already: no thread to wait for.
                descriptors = receiveDescriptorsNow(bulkSocket, count, timeout=timeout)
                if descriptors is None:
                    descriptors = yield deferToThreadPool(
                        self.host.reactor,
                        self.host.reactor.getThreadPool(),
                        receiveDescriptors,
                        bulkSocket,
                        count,
                        timeout=timeout,
                    )
            except DescriptorTransferError as e:
                # Say why (out of descriptors: MSG_CTRUNC) instead of AMP's
                # "Unknown Error".
                self._log.error("Receiving descriptors failed: {why}", why=str(e))
                raise HandoffRefused("receiving descriptors: {}".format(e))
        finally:
            os.close(manifest)
            bulkSocket.close()
        return entries, descriptors

    @AdoptConnections.responder
    @inlineCallbacks
    def adoptConnections(
        self, count: int, manifestSize: int, manifest: int, bulk: int
    ) -> Any:
        entries, descriptors = yield self._receiveBatch(
            count, manifestSize, manifest, bulk
        )
        adopted = 0
        refusals = _Refusals()
        for entry, descriptor in zip(entries, descriptors):
            ident = entry.get("id") if isinstance(entry, dict) else None
            try:
                self._adoptOne(entry, descriptor)
            except Exception as e:
                refusals.add(ident, e)
            else:
                adopted += 1
        if self.committed and refusals.count:
            # A later batch is all or nothing: the old process resumes it.
            for each in self._adopted:
                each.abandon()
            self._adopted = []
            adopted = 0
        self._log.info(
            "Adopted {count} connections paused ({refused} refused)",
            count=adopted,
            refused=refusals.count,
        )
        return dict(refusals.answer(), adopted=adopted)

    @PrecopyConnections.responder
    @inlineCallbacks
    def precopyConnections(
        self, count: int, manifestSize: int, manifest: int, bulk: int, freeze: int
    ) -> Any:
        """
        Stage connections the old process still serves; restore them when
        the freeze message arrives on C{freeze}.
        """
        try:
            if self.committed or self._freeze is not None:
                os.close(manifest)
                os.close(bulk)
                raise HandoffRefused("pre-copy after the commit or twice")
            self._freeze = listenForFreeze(
                self.host.reactor, freeze, self._freezeCommit, self._freezePart
            )
            heapFrozenUntil(self._heapThawed)
        finally:
            os.close(freeze)
        entries, descriptors = yield self._receiveBatch(
            count, manifestSize, manifest, bulk
        )
        refusals = _Refusals()
        for entry, descriptor in zip(entries, descriptors):
            ident = entry.get("id") if isinstance(entry, dict) else None
            try:
                if ident in self._staged:
                    os.close(descriptor)
                    raise HandoffRefused("connection {} staged twice".format(ident))
                self._staged[ident] = stageEntry(self.host, entry, descriptor)
            except OSError as e:
                if e.errno not in (errno.ENOTCONN, errno.ENOTSOCK):
                    refusals.add(ident, e)
                else:
                    # Reset by its client meanwhile (or closed before its
                    # descriptor went: a stand-in came): nothing to serve,
                    # nothing to give back.
                    self._reset.add(ident)
            except Exception as e:
                refusals.add(ident, e)
        self._log.info(
            "Pre-copied {count} connections ({refused} refused)",
            count=len(self._staged),
            refused=refusals.count,
        )
        if not refusals.count:
            yield self._restoreAhead(refusals)
        return dict(
            refusals.answer(),
            staged=len(self._staged),
            streamed=True,
            appStateOnly=True,
        )

    @inlineCallbacks
    def _restoreAhead(
        self, refusals: _Refusals, candidates: list[StagedConnection] | None = None
    ) -> Any:
        """
        Restore, ahead of the freeze, every staged connection whose new
        protocol can abandon a restore (its class defines
        C{abandonMigrationState}, see L{migrate.IMigratable}), a slice of
        them per turn of this process's reactor, before the pre-copy is
        answered: the old process serves them meanwhile, and the freeze
        then restores only those that changed since (L{_restorePart}).
        What they write is held; nothing is read or served before the
        commit, and the application knows every connection before it
        serves any, as before.  The others are restored at the freeze.

        A refusal abandons every connection staged (each object restored
        ahead told C{abandonMigrationState()}) and is added to
        C{refusals}: the old process keeps everything.

        @param candidates: the staged connections to look at (a re-copy's,
            restored ahead again); every one staged if L{None}.

        @return: a L{Deferred} firing once done.
        """
        canAbandon: dict[type, bool] = {}
        ahead: list[StagedConnection] = []
        for each in self._staged.values() if candidates is None else candidates:
            cls = type(each.protocol)
            can = canAbandon.get(cls)
            if can is None:
                can = canAbandon[cls] = each.canRestoreAhead()
            if can:
                ahead.append(each)
        if not ahead:
            return
        started = time.monotonic()
        reactor = self.host.reactor
        staged = self._staged
        restored = 0
        for start in range(0, len(ahead), _AHEAD_SLICE):
            if start:
                # The successor's reactor runs between two slices.
                yield deferLater(reactor, 0, lambda: None)
            if self._order is not None or self.committed:
                # The freeze began before the answer (no old process sends
                # it so): it restores the rest itself.
                break
            with collectionsPaused():
                for each in ahead[start : start + _AHEAD_SLICE]:
                    if staged.get(each.ident) is not each:
                        # Given back meanwhile: the channel closed.
                        continue
                    try:
                        each.restoreAhead()
                    except Exception as e:
                        refusals.add(each.ident, e)
                        self._refusedAhead = (
                            "the new code refused connection {}".format(each.ident)
                        )
                        self._abandonStaged()
                        return
                    self._aheadCount += 1
                    restored += 1
                freezeNewObjects()
        self._log.info(
            "Restored {count} connections ahead of the freeze in {ms:.1f} ms",
            count=restored,
            ms=(time.monotonic() - started) * 1000,
        )

    @RecopyConnections.responder
    def recopyConnections(
        self, count: int, manifestSize: int, manifest: int
    ) -> dict[str, Any]:
        """
        Take a fresh copy of the state of staged connections that changed
        since their last copy, while the old process still serves them: for
        each one restored ahead of the freeze, abandon that object and
        attach a fresh one, restored at the freeze.  A connection that
        changed since its copy is active: restored ahead again, it would
        most likely change again, and its object be abandoned and rebuilt
        at the freeze, while every client waits (about 7 microseconds a
        connection on top of its restore); restored at the freeze, it
        costs its restore alone.

        A refusal (a malformed or refused state, an unknown connection, an
        C{abandonMigrationState} that raises) abandons every staged
        connection: the old process keeps everything.
        """
        try:
            if self.committed or self._freeze is None or self._order is not None:
                raise HandoffRefused("re-copy outside a pre-copy's wait for the freeze")
            if self._refusedAhead is not None:
                raise HandoffRefused(self._refusedAhead)
            entries = _readManifest(count, manifestSize, manifest)
        finally:
            os.close(manifest)
        started = time.monotonic()
        refusals = _Refusals()
        letGo = 0
        staged = self._staged
        with collectionsPaused():
            for entry in entries:
                ident = entry.get("id") if isinstance(entry, dict) else None
                each = staged.get(ident)
                try:
                    if each is None:
                        if ident in self._reset:
                            continue
                        raise HandoffRefused(
                            "a re-copy of connection {}, which is not staged".format(
                                ident
                            )
                        )
                    each.updateState(entry.get("state"))
                    if each.restoredAhead:
                        self._abandonAhead(each, "changed")
                        each.rebuild()
                        letGo += 1
                except Exception as e:
                    refusals.add(ident, e)
                    self._refusedAhead = "the new code refused connection {}".format(
                        ident
                    )
                    self._abandonStaged()
                    return dict(refusals.answer(), updated=0)
            freezeNewObjects()
        updated = len(entries)
        self._log.info(
            "Re-copied the state of {count} connections ({letGo} objects restored "
            "ahead let go of: restored at the freeze) in {ms:.1f} ms",
            count=updated,
            letGo=letGo,
            ms=(time.monotonic() - started) * 1000,
        )
        return dict(refusals.answer(), updated=updated)

    def _freezeCommit(
        self, delta: Any, answerNow: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        # Thousands of objects are made while every client waits: no
        # collection of the whole heap in the middle, nor of what was made
        # (10 to 20 ms) at the first allocation once collections run again,
        # before any client is served: they are left out of collections
        # until every connection is served.
        with collectionsPaused():
            try:
                answer = self._restoreAndCommit(delta, answerNow)
            except BaseException:
                self._thawHeap()
                raise
            freezeNewObjects()
            return answer

    def _freezePart(self, delta: Any) -> None:
        """
        A part of a streamed freeze: restore the connections it covers
        (see L{_restorePart}) while the old process compares the next.
        Nothing serves yet.

        @raise HandoffRefused: as L{_restoreAndCommit}; every staged
            connection is then abandoned.
        """
        with collectionsPaused():
            try:
                self._restorePart(delta, final=False)
            except BaseException:
                self._abandonStaged()
                self._thawHeap()
                raise
            freezeNewObjects()

    def _restorePart(self, delta: Any, final: bool) -> None:
        """
        Take what changed in the connections a freeze message covers: drop
        what the old process withdrew, update what changed and restore it
        first, then restore every other staged connection up to the
        message's C{upTo} (the manifest number of the last connection it
        compared), or every one left for the last message.

        @raise HandoffRefused: naming the connection the new code refused,
            or for a malformed message.
        """
        if self.committed:
            raise HandoffRefused("already serving")
        if self._refusedAhead is not None:
            raise HandoffRefused(self._refusedAhead)
        changes, withdrawn = _parseDelta(delta)
        upTo = None if final else delta.get("upTo")
        if not final and type(upTo) is not int:
            raise HandoffRefused("malformed freeze message")
        staged = self._staged
        restoredIds = self._restoredIds
        if self._order is None:
            self._order = list(staged.values())
        for ident in withdrawn:
            each = staged.pop(ident, None)
            if each is not None:
                if id(each) in restoredIds:
                    raise HandoffRefused(
                        "connection {} withdrawn after it was restored".format(ident)
                    )
                try:
                    self._abandonAhead(each, "withdrawn")
                finally:
                    each.abandon()
        changed: list[StagedConnection] = []
        for change in changes:
            each = staged.get(change["id"])
            if each is None and change["id"] in self._reset:
                continue
            if each is None:
                raise HandoffRefused(
                    "a change for connection {}, which is not staged".format(
                        change["id"]
                    )
                )
            if id(each) in restoredIds:
                raise HandoffRefused(
                    "a change for connection {}, restored already".format(change["id"])
                )
            if each.update(change) and each.restoredAhead:
                # Restored ahead from the state pre-copied: again, into a
                # fresh object, from the state now.
                self._abandonAhead(each, "changed")
                try:
                    each.rebuild()
                except Exception as e:
                    raise self._refusal(each, e)
            changed.append(each)
        for each in changed:
            self._restoreOne(each, self._restoredFirst)
        order = self._order
        index = self._cursor
        while index < len(order):
            each = order[index]
            if upTo is not None and not (
                type(each.ident) is int and each.ident <= upTo
            ):
                break
            index += 1
            if staged.get(each.ident) is each and id(each) not in restoredIds:
                self._restoreOne(each, self._restoredRest)
        self._cursor = index

    def _restoreOne(
        self, each: StagedConnection, into: list[AdoptedConnection]
    ) -> None:
        if each.restoredAhead:
            # Unchanged since its restore ahead of the freeze.
            into.append(each.held())
        else:
            try:
                into.append(each.restore())
            except Exception as e:
                raise self._refusal(each, e)
        self._restoredIds.add(id(each))

    @staticmethod
    def _refusal(each: StagedConnection, error: Exception) -> HandoffRefused:
        """
        The refusal naming the connection the new code refused, and why.
        """
        refusal = HandoffRefused(
            "the new code refused connection {}: {}".format(
                each.ident, str(error) or type(error).__name__
            )[:_REASON_CHARS]
        )
        refusal.ident = each.ident  # type: ignore[attr-defined]
        return refusal

    def _abandonAhead(self, each: StagedConnection, why: str) -> None:
        """
        Let go of the object restored ahead of the freeze for C{each}, if
        there is one: its connection C{why} ("changed", "withdrawn") since.

        @raise HandoffRefused: if the new code failed to
            (C{abandonMigrationState} raised); the hand-off is refused.
        """
        if not each.restoredAhead:
            return
        self._aheadAbandoned += 1
        try:
            each.abandonAhead()
        except Exception as e:
            self._log.failure(
                "The new code failed to abandon connection {ident}, restored "
                "ahead of the freeze",
                ident=each.ident,
            )
            raise HandoffRefused(
                "the new code failed to abandon the object restored ahead of the "
                "freeze for connection {} ({} since the pre-copy): "
                "abandonMigrationState raised {}".format(
                    each.ident, why, str(e) or type(e).__name__
                )[:_REASON_CHARS]
            )

    def _abandonStaged(self) -> None:
        """
        Give back every staged connection, restored or not: the old process
        keeps them.
        """
        for each in self._staged.values():
            each.abandon()
        self._staged.clear()
        self._order = []
        self._restoredIds.clear()
        self._restoredFirst = []
        self._restoredRest = []

    def _restoreAndCommit(
        self, delta: Any, answerNow: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """
        The old process froze: take what changed since the pre-copy (the
        last part of it, in a streamed freeze), drop what it withdrew,
        restore every staged connection not restored yet (those that
        changed first), and serve, saying so (C{answerNow}) before any
        connection is read.

        @raise HandoffRefused: naming the connection the new code refused,
            or why this process cannot serve; the old process then ends this
            one and keeps everything.
        """
        started = time.monotonic()
        try:
            self._restorePart(delta, final=True)
        except Exception:
            self._abandonStaged()
            raise
        first, self._restoredFirst = self._restoredFirst, []
        rest, self._restoredRest = self._restoredRest, []
        self._staged.clear()
        self._restoredIds.clear()
        # Served at once in the commit: the connections adopted frozen since
        # the pre-copy (the newest) and those that changed since it (the
        # most active) whose clients are waiting (see _commitNow).  The
        # ones untouched since their copy start reading in slices from the
        # next reactor turn, after the others: a busy client does not wait
        # for thousands of idle ones.  They are not asked whether a client
        # waits: at 10,000 idle connections that would cost the freeze
        # 5 ms, for the few that received meanwhile.
        # Every connection is restored already, so whatever the busy ones
        # make the application write to the idle ones is kept, in order.
        self._adopted = self._adopted + first
        self._resuming = rest
        # Freeing the staged copies (each with its state) took 20 ms for
        # 10,000 connections, after the answer but before the reactor
        # served anyone: they go a slice at a time with the served ones.
        self._spent, self._order = self._order or [], []
        answer = self._commitNow(beforeServing=answerNow)
        kept = self._aheadCount - self._aheadAbandoned
        self._log.info(
            "Restored {count} connections at the freeze ({changed} changed since "
            "the pre-copy) and took {kept} restored ahead of it ({abandoned} "
            "objects restored ahead abandoned); committed in {ms:.1f} ms",
            count=len(first) + len(rest) - kept,
            changed=len(first),
            kept=kept,
            abandoned=self._aheadAbandoned,
            ms=(time.monotonic() - started) * 1000,
        )
        self._resumeAfterATurn()
        return answer

    def _resumeAfterATurn(self) -> None:
        """
        Start the slices that serve the connections left for later once
        the reactor has had one whole turn: the connections served at once
        read (and answer, on the turn after) before any slice delays them.
        A call made now would run before the reactor polls; one it makes
        runs after.
        """
        reactor = self.host.reactor
        reactor.callLater(0, reactor.callLater, 0, self._resumeSlice)

    def _resumeSlice(self) -> None:
        """
        Serve the next few hundred connections restored at the freeze, and
        free as many of the staged copies they were restored from; come
        back after a reactor turn for the rest.

        A later migration cannot start meanwhile without noticing: every
        strategy starts a successor or a trial run (hundreds of
        milliseconds) before it looks at any connection, and all of them
        are served within a few reactor turns.
        """
        batch = self._resuming[:_RESUME_SLICE]
        del self._resuming[:_RESUME_SLICE]
        del self._spent[:_RESUME_SLICE]
        for each in batch:
            try:
                each.commit()
            except Exception:
                self._log.failure("Serving a moved connection failed")
        if self._resuming or self._spent:
            self.host.reactor.callLater(0, self._resumeSlice)
        else:
            self._thawHeap()

    def _thawHeap(self) -> None:
        if not self._heapThawed.called:
            self._heapThawed.callback(None)

    def _adoptOne(self, entry: Any, descriptor: int) -> None:
        try:
            self._adopted.append(adoptEntry(self.host, entry, descriptor))
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
            # The client reset the connection while it was frozen: there is
            # nothing left to serve or to give back (the descriptor is
            # closed), so it must not veto the whole hand-off.  It counts
            # as moved; the old process lets go of its copy at the commit.
            self._log.info(
                "Connection {ident} was reset by its client during the "
                "hand-off; nothing to adopt",
                ident=entry.get("id") if isinstance(entry, dict) else None,
            )

    @Commit.responder
    def commit(self) -> dict[str, Any]:
        if self._staged:
            raise HandoffRefused("pre-copied connections wait for the freeze")
        answer = self._commitNow()
        if self._resuming:
            self._resumeAfterATurn()
        return answer

    def _commitNow(
        self, beforeServing: Callable[[dict[str, Any]], None] = lambda answer: None
    ) -> dict[str, Any]:
        """
        Serve: take over the pidfile, the listeners, the output; then tell
        C{beforeServing} the answer, before any adopted connection reads.

        @raise HandoffRefused: if this process cannot serve; nothing serves
            then.
        """
        if self.generation is None:
            raise HandoffRefused("commit before hello")
        try:
            self.host.commitInheritance(self.generation)
        except Exception as e:
            # Say why: the old process keeps everything (and ends this one).
            self._log.failure("Could not commit")
            raise HandoffRefused(
                "cannot serve: {}: {}".format(type(e).__name__, e)[:_REASON_CHARS]
            )
        self.committed = True
        # The old generation reports its draining over this channel, which
        # a re-exec of this process carries across exec.
        self.host.reportChannels[self._peerPid()] = self
        self.inheritance.takeOverOutput()
        answer = {"pid": os.getpid()}
        beforeServing(answer)
        adopted, self._adopted = self._adopted, []
        count = len(adopted) + len(self._resuming)
        # Asked now, as late as can be: those whose clients wait start
        # reading at once, the longest-waiting first; the others in the
        # slices from the next reactor turn, first (see
        # migrate._handoff._waiting).
        waiting, quiet = servingOrder(adopted)
        for each in waiting:
            each.commit()
        self._resuming[:0] = quiet
        self._log.info(
            "Generation {generation} serves in process {pid}; {count} connections "
            "moved in ({now} served at once)",
            generation=self.generation,
            pid=os.getpid(),
            count=count,
            now=len(waiting),
        )
        return answer

    @CommitAdopted.responder
    def commitAdopted(self) -> dict[str, Any]:
        if not self.committed:
            raise HandoffRefused("not serving yet")
        adopted, self._adopted = self._adopted, []
        for each in adopted:
            each.commit()
        if adopted:
            self._log.info(
                "{count} more connections moved in at their safe point",
                count=len(adopted),
            )
        return {"committed": len(adopted)}

    @Reported.responder
    def reported(self, report: str, metrics: str | None = None) -> dict[str, Any]:
        from ..._report import MigrationReport

        try:
            self.host.lastReport = MigrationReport.fromJSON(json.loads(report))
        except ValueError as e:
            self._log.warn("Ignoring a malformed report: {why}", why=str(e))
        if metrics is not None and self.host.metrics is not None:
            self.host.metrics.carry(_loadJSON(metrics))
        return {}

    @DrainStatus.responder
    def drainStatus(self, draining: str) -> dict[str, Any]:
        try:
            clean = parseDrainStatus(draining)
        except ValueError as e:
            self._log.warn("Ignoring a malformed drain status: {why}", why=str(e))
            return {}
        self.host.updateDraining(clean, viaPid=self._peerPid())
        return {}

    def _peerPid(self) -> int:
        return self.oldPid

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.AMP.connectionLost(self, reason)
        if self.committed:
            # A batch adopted after the commit and never committed stays
            # with the old process (which is gone, or resumed it).
            for each in self._adopted:
                each.abandon()
            self._adopted = []
            self._log.info("The previous generation has ended")
            self.host.forgetDraining(self._peerPid())
            return
        for each in self._adopted:
            each.abandon()
        self._adopted = []
        for staged in self._staged.values():
            staged.abandon()
        self._staged.clear()
        for restored in self._resuming:
            restored.abandon()
        self._resuming = []
        self._thawHeap()
        self.host.abandonInheritance(
            "the old process closed the hand-off channel before committing"
        )


def _readManifest(count: int, manifestSize: int, manifest: int) -> list[Any]:
    """
    Read a batch's manifest (a memfd, left open) of C{count} entries.

    @raise HandoffRefused: if it is unreadable or does not list C{count}.
    """
    if not 0 <= manifestSize <= _MAX_MANIFEST_BYTES:
        raise HandoffRefused("manifest of {} bytes refused".format(manifestSize))
    try:
        data = readMemfd(manifest, maxBytes=manifestSize)
        # Every entry's state is checked as it is staged or updated
        # (ProtocolState.fromPlain), the rest of the entry as it is used:
        # JSON's own parser, not decodeState's checks in Python of every
        # value (about 60 microseconds an entry).
        entries = loadCheckedJSON(data, "manifest")
    except (StateError, OSError, ValueError, DescriptorTransferError) as e:
        raise HandoffRefused("unreadable manifest: {}".format(e))
    if not isinstance(entries, list) or len(entries) != count:
        raise HandoffRefused("manifest does not list {} connections".format(count))
    return entries


def _parseDelta(delta: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """
    Check a freeze's delta: C{{"changes": [{"id", ...}], "withdrawn": [id]}}.

    @raise HandoffRefused: if it is malformed.
    """
    if not isinstance(delta, dict):
        raise HandoffRefused("malformed freeze message")
    changes = delta.get("changes")
    withdrawn = delta.get("withdrawn")
    if not isinstance(changes, list) or not isinstance(withdrawn, list):
        raise HandoffRefused("malformed freeze message")
    seen = set()
    for change in changes:
        if not isinstance(change, dict) or type(change.get("id")) is not int:
            raise HandoffRefused("malformed change in the freeze message")
        if change["id"] in seen:
            raise HandoffRefused(
                "connection {} changed twice in the freeze message".format(change["id"])
            )
        seen.add(change["id"])
    return changes, withdrawn


def _loadJSON(text: str) -> Any:
    """
    Carried metrics: malformed JSON is None, which L{HostMetrics.carry}
    ignores with a warning.
    """
    try:
        return json.loads(text)
    except ValueError:
        return None


def startIncoming(host: IMigrationHost, inheritance: Any) -> IncomingChannel:
    """
    Connect to the old process over the inherited socket and start
    inheriting its service.

    @param host: the L{migrate.MigrationHost} that inherits.
    @param inheritance: the inherited hand-off (see
        L{migrate._handoff._successor.inheritedHandoff}).
    """
    channel = IncomingChannel(host, inheritance)
    descriptor = inheritance.handoffDescriptor
    host.reactor.adoptStreamConnection(
        descriptor, socket.AF_UNIX, Factory.forProtocol(lambda: channel)
    )
    os.close(descriptor)
    return channel
