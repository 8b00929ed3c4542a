"""
Tests for pre-copy (L{migrate._handoff._precopy}), the fingerprints it
keeps (L{migrate.state.StateFingerprint}), and the staged connections the
side taking over restores at the freeze (L{migrate._handoff._movement}).

Real Unix socketpairs stand in for client connections, as in
L{migrate.test.test_movement}.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from .._codec import MAX_DEPTH
from .._handoff._movement import StagedConnection, stageEntry
from .._handoff._precopy import (
    freezeDelta,
    freezeInParts,
    precopyMovable,
    recopyChanged,
)
from ..state import (
    NotAtSafePoint,
    StateError,
    StateFingerprint,
    captureProtocolState,
)
from .test_codec import _nested
from .test_movement import Counter, FakeHost, Plain, ServedSocketpairs


class Busy(Counter):
    """
    A counter that is in the middle of something while C{busy} is set.
    """

    busy: str | None = None

    def migrationBlocker(self) -> str | None:
        return self.busy


class FingerprintTests(SynchronousTestCase):
    """
    L{StateFingerprint.matches} says whether a fresh capture would differ.
    """

    def fingerprinted(self) -> tuple[Counter, StateFingerprint]:
        protocol = Counter()
        protocol.count = 1
        return protocol, StateFingerprint.of(
            captureProtocolState(protocol, snapshot=False)
        )

    def test_unchanged(self) -> None:
        """
        Nothing changed: it matches, however many times it is asked.
        """
        protocol, fingerprint = self.fingerprinted()
        self.assertTrue(fingerprint.matches(protocol))
        self.assertTrue(fingerprint.matches(protocol))

    def test_applicationState(self) -> None:
        """
        A change of the application's state is seen, even one that Python
        equality would miss (C{1 == True}): what the new code would receive
        differs.
        """
        protocol, fingerprint = self.fingerprinted()
        protocol.count = 2
        self.assertFalse(fingerprint.matches(protocol))
        protocol.count = True
        self.assertFalse(fingerprint.matches(protocol))
        protocol.count = 1
        self.assertTrue(fingerprint.matches(protocol))

    def test_bufferedInput(self) -> None:
        """
        Bytes a base protocol holds (half a line) count as a change.
        """
        protocol, fingerprint = self.fingerprinted()
        protocol.dataReceived(b"hal")
        self.assertFalse(fingerprint.matches(protocol))

    def test_failingCapture(self) -> None:
        """
        A C{getMigrationState} that raises counts as changed (the full
        capture then says why), rather than raising here.
        """
        protocol, fingerprint = self.fingerprinted()
        protocol.count = -1
        self.assertFalse(fingerprint.matches(protocol))

    def test_notAtSafePoint(self) -> None:
        """
        A protocol busy now raises L{NotAtSafePoint}: it may move later.
        """
        protocol = Busy()
        fingerprint = StateFingerprint.of(
            captureProtocolState(protocol, snapshot=False)
        )
        protocol.busy = "a request is in flight"
        self.assertRaises(NotAtSafePoint, fingerprint.matches, protocol)


class PrecopyTests(ServedSocketpairs):
    """
    L{precopyMovable} and L{freezeDelta} over real sockets, and the side
    taking over, from its staged copy to serving.
    """

    def precopy(self) -> tuple[list[Any], list[dict[str, Any]]]:
        precopied, encoded = precopyMovable(self.host.allConnections())
        return precopied, json.loads("[" + encoded + "]")

    def stage(
        self, precopied: list[Any], entries: list[dict[str, Any]]
    ) -> list[StagedConnection]:
        """
        Stage each pre-copied connection in a process standing for the one
        taking over (its L{Counter} listener on C{tcp:1}), from a duplicate
        of its descriptor.
        """
        taker: Any = FakeHost(reactor)
        taker.listen("tcp:1", Counter)
        return [
            stageEntry(taker, entry, os.dup(each.liveDescriptor()))
            for each, entry in zip(precopied, entries)
        ]

    @inlineCallbacks
    def test_precopyLeavesConnectionsServing(self) -> Any:
        """
        Pre-copy describes each movable connection (numbered from the given
        first number) without freezing it: it goes on answering.  Those that
        cannot move are left out.
        """
        self.serve("tcp:plain", Plain)
        hosted, client = self.serve("tcp:1", Counter)
        yield self.readLines(client, 1)
        hosted.wrappedProtocol.count = 3
        precopied, encoded = precopyMovable(self.host.allConnections(), 41)
        (entry,) = json.loads("[" + encoded + "]")
        (each,) = precopied
        self.assertEqual((entry["id"], each.ident), (41, 41))
        self.assertEqual(entry["listener"], "tcp:1")
        self.assertEqual(entry["state"]["appState"], {"count": 3})
        self.assertEqual(entry["output"], "")
        self.assertEqual(each.liveDescriptor(), hosted.transport.fileno())
        client.sendall(b"on\n")
        lines = yield self.readLines(client, 1)
        self.assertEqual(lines, [b"4 on"])

    @inlineCallbacks
    def test_freezeSendsOnlyWhatChanged(self) -> Any:
        """
        At the freeze, an untouched connection moves with nothing more; one
        that answered a line since the copy has its new state sent again;
        one with output Twisted has not written sends that output; those
        that changed come first.
        """
        quiet, quietClient = self.serve("tcp:1", Counter)
        active, activeClient = self.serve("tcp:1", Counter)
        writing, writingClient = self.serve("tcp:1", Counter)
        for client in (quietClient, activeClient, writingClient):
            yield self.readLines(client, 1)
        precopied, _ = self.precopy()
        activeClient.sendall(b"x\n")
        yield self.readLines(activeClient, 1)
        writing.transport.stopWriting()
        writing.transport.write(b"unsent\n")
        delta = freezeDelta(precopied)
        self.assertEqual(delta.withdrawn, [])
        idents = {each.hosted: each.ident for each in precopied}
        self.assertEqual(
            [each.hosted for each in delta.moving], [active, writing, quiet]
        )
        changes = {change["id"]: change for change in delta.changes}
        self.assertEqual(sorted(changes), sorted([idents[active], idents[writing]]))
        self.assertEqual(changes[idents[active]]["state"]["appState"], {"count": 1})
        self.assertNotIn("state", changes[idents[writing]])
        self.assertEqual(
            base64.b64decode(changes[idents[writing]]["output"]), b"unsent\n"
        )
        self.assertEqual(
            delta.toPlain(),
            {"changes": delta.changes, "withdrawn": []},
        )
        writing.transport.startWriting()

    @inlineCallbacks
    def test_freezeInParts(self) -> Any:
        """
        A freeze in parts compares the connections a part at a time, as the
        parts are asked for: each part but the last says C{"more"} and the
        manifest number of the last connection it covers, and carries the
        changes of its own connections; the whole delta gathers them.
        """
        served = [self.serve("tcp:1", Counter) for _ in range(5)]
        for _, client in served:
            yield self.readLines(client, 1)
        precopied, _ = self.precopy()
        active, activeClient = served[2]
        activeClient.sendall(b"x\n")
        yield self.readLines(activeClient, 1)
        delta, parts, last = freezeInParts(precopied, 2)
        self.assertEqual(delta.moving, [])
        first = next(parts)
        self.assertEqual(len(delta.moving), 2)
        second = next(parts)
        self.assertRaises(StopIteration, next, parts)
        final = last()
        idents = [each.ident for each in precopied]
        self.assertEqual(
            (first["more"], first["upTo"], first["changes"]), (True, idents[1], [])
        )
        self.assertEqual((second["more"], second["upTo"]), (True, idents[3]))
        self.assertEqual([change["id"] for change in second["changes"]], [idents[2]])
        self.assertEqual(final, {"changes": [], "withdrawn": []})
        self.assertEqual(len(delta.moving), 5)
        self.assertEqual([change["id"] for change in delta.changes], [idents[2]])

    @inlineCallbacks
    def test_freezeInPartsByChanges(self) -> Any:
        """
        With C{changedPerPart}, a part also ends once that many of its
        connections changed (compared C{step} at a time), so that the other
        process restores changed connections while this one compares the
        next; the changed ones come first in each part, and the last
        message covers the rest.
        """
        served = [self.serve("tcp:1", Counter) for _ in range(6)]
        for _, client in served:
            yield self.readLines(client, 1)
        precopied, _ = self.precopy()
        for index in (1, 2, 4):
            client = served[index][1]
            client.sendall(b"x\n")
            yield self.readLines(client, 1)
        delta, parts, last = freezeInParts(precopied, 10, changedPerPart=2, step=1)
        self.assertRaises(RuntimeError, last)
        messages = list(parts)
        final = last()
        idents = [each.ident for each in precopied]
        self.assertEqual(
            [(each["upTo"], [c["id"] for c in each["changes"]]) for each in messages],
            [(idents[2], [idents[1], idents[2]])],
        )
        self.assertEqual([c["id"] for c in final["changes"]], [idents[4]])
        self.assertNotIn("more", final)
        hosted = [each for each, _ in served]
        self.assertEqual(
            [each.hosted for each in delta.moving],
            [hosted[1], hosted[2], hosted[0], hosted[4], hosted[3], hosted[5]],
        )

    @inlineCallbacks
    def test_withdrawn(self) -> Any:
        """
        A connection that closed since the copy is withdrawn without a
        reason (nothing to report); one closing, with one; one busy, to
        move later at its safe point.
        """
        closed, closedClient = self.serve("tcp:1", Counter)
        closing, closingClient = self.serve("tcp:1", Counter)
        busy, busyClient = self.serve("tcp:busy", Busy)
        for client in (closedClient, closingClient, busyClient):
            yield self.readLines(client, 1)
        precopied, _ = self.precopy()
        closedClient.close()
        yield self.waitFor(lambda: closed.transport.disconnected)
        closing.transport.stopWriting()
        closing.transport.write(b"last words\n")
        closing.transport.loseConnection()
        busy.wrappedProtocol.busy = "a request is in flight"
        delta = freezeDelta(precopied)
        self.assertEqual(delta.moving, [])
        why: dict[Any, Any] = {each.hosted: reason for each, reason in delta.withdrawn}
        self.assertIsNone(why[closed])
        self.assertEqual((why[closing].reason, why[closing].later), ("closing", False))
        self.assertTrue(why[busy].later)
        self.assertIn("a request is in flight", why[busy].reason)
        self.assertEqual(
            sorted(delta.toPlain()["withdrawn"]),
            sorted(each.ident for each in precopied),
        )
        closing.transport.startWriting()
        busy.wrappedProtocol.busy = None

    @inlineCallbacks
    def test_recopyChanged(self) -> Any:
        """
        A re-copy round describes again (its id and new state: no
        descriptor, no output) each connection whose state changed since
        its copy, with the fingerprint of the new copy, and touches
        nothing: once the caller takes the new fingerprint, the freeze
        compares with it.  Untouched, closed, closing and busy connections
        are left for the freeze.
        """
        quiet, quietClient = self.serve("tcp:1", Counter)
        active, activeClient = self.serve("tcp:1", Counter)
        closed, closedClient = self.serve("tcp:1", Counter)
        busy, busyClient = self.serve("tcp:busy", Busy)
        for client in (quietClient, activeClient, closedClient, busyClient):
            yield self.readLines(client, 1)
        precopied, _ = self.precopy()
        byHosted = {each.hosted: each for each in precopied}
        before = [each.fingerprint for each in precopied]
        for client in (activeClient, closedClient, busyClient):
            client.sendall(b"x\n")
            yield self.readLines(client, 1)
        closedClient.close()
        yield self.waitFor(lambda: closed.transport.disconnected)
        busy.wrappedProtocol.busy = "a request is in flight"
        activeClient.sendall(b"hal")
        yield self.waitFor(lambda: active.wrappedProtocol._buffer == b"hal")
        recopied, encoded = recopyChanged(precopied)
        busy.wrappedProtocol.busy = None
        ((each, fingerprint),) = recopied
        self.assertIs(each, byHosted[active])
        (entry,) = json.loads("[" + encoded + "]")
        self.assertEqual(sorted(entry), ["id", "state"])
        self.assertEqual(entry["id"], each.ident)
        self.assertEqual(entry["state"]["appState"], {"count": 1})
        self.assertEqual(
            entry["state"]["buffers"]["LineReceiver"]["buffer"],
            base64.b64encode(b"hal").decode("ascii"),
        )
        self.assertEqual([each.fingerprint for each in precopied], before)
        each.fingerprint = fingerprint
        # Nothing changed since the re-copy: the freeze sends nothing more
        # for it; a change since is seen.
        self.assertEqual(
            [change["id"] for change in freezeDelta(precopied).changes],
            [byHosted[busy].ident],
        )
        activeClient.sendall(b"f\n")
        yield self.readLines(activeClient, 1)
        self.assertEqual(
            sorted(change["id"] for change in freezeDelta(precopied).changes),
            sorted([byHosted[busy].ident, each.ident]),
        )
        self.assertEqual(recopyChanged([]), ([], ""))

    @inlineCallbacks
    def waitFor(self, condition: Any) -> Any:
        deadline = reactor.seconds() + 10
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError("condition not met within 10 s")
            yield self.afterTurn()

    def afterTurn(self) -> Any:
        from twisted.internet.task import deferLater

        return deferLater(reactor, 0.005, lambda: None)

    @inlineCallbacks
    def test_nothingLostBetweenCopyAndFreeze(self) -> Any:
        """
        The whole way, in one process standing for two: a connection is
        pre-copied and staged on the taking side; its client then sends a
        line and a half that the old side answers; at the freeze, the
        taking side receives the new state and the half line, restores,
        and serves: the count goes on from the latest state, and the half
        line completes with the next bytes.
        """
        hosted, client = self.serve("tcp:1", Counter)
        yield self.readLines(client, 1)
        precopied, entries = self.precopy()
        (staged,) = self.stage(precopied, entries)
        self.assertEqual(staged.state.appState, {"count": 0})
        client.sendall(b"one\ntw")
        lines = yield self.readLines(client, 1)
        self.assertEqual(lines, [b"1 one"])
        delta = freezeDelta(precopied)
        (change,) = delta.changes
        staged.update(change)
        adopted = staged.restore()
        for moving in delta.moving:
            moving.release()
        adopted.commit()
        client.sendall(b"o\n")
        # "restored" is what the taking side's Counter says when restored.
        lines = yield self.readLines(client, 2)
        self.assertEqual(lines, [b"restored", b"2 two"])
        adopted.transport.loseConnection()

    @inlineCallbacks
    def test_applicationStateOnly(self) -> Any:
        """
        Where the other process takes a change of the application state
        alone, a connection of which only that changed since its copy
        carries C{"appState"}, not a whole C{"state"}; one whose buffers
        changed too carries the whole state; the taking side restores each
        from the state it holds with what changed, and the count goes on.
        """
        answered, answeredClient = self.serve("tcp:1", Counter)
        halfway, halfwayClient = self.serve("tcp:1", Counter)
        for client in (answeredClient, halfwayClient):
            yield self.readLines(client, 1)
        precopied, entries = self.precopy()
        staged = {
            each.hosted: stagedOne
            for each, stagedOne in zip(precopied, self.stage(precopied, entries))
        }
        answeredClient.sendall(b"one\n")
        halfwayClient.sendall(b"one\ntw")
        for client in (answeredClient, halfwayClient):
            yield self.readLines(client, 1)
        self.assertEqual(
            [sorted(change) for change in freezeDelta(precopied).changes],
            [["id", "output", "state"], ["id", "output", "state"]],
        )
        delta = freezeDelta(precopied, appStateOnly=True)
        changes = {change["id"]: change for change in delta.changes}
        idents = {each.hosted: each.ident for each in precopied}
        self.assertEqual(
            changes[idents[answered]],
            {"id": idents[answered], "output": "", "appState": {"count": 1}},
        )
        self.assertEqual(
            changes[idents[halfway]]["state"]["buffers"],
            {"LineReceiver": {"buffer": "dHc=", "lineMode": True}},
        )
        adopted = []
        for hosted in (answered, halfway):
            self.assertTrue(staged[hosted].update(changes[idents[hosted]]))
            adopted.append(staged[hosted].restore())
        for moving in delta.moving:
            moving.release()
        for each in adopted:
            each.commit()
        answeredClient.sendall(b"two\n")
        halfwayClient.sendall(b"o\n")
        self.assertEqual(
            (yield self.readLines(answeredClient, 2)), [b"restored", b"2 two"]
        )
        self.assertEqual(
            (yield self.readLines(halfwayClient, 2)), [b"restored", b"2 two"]
        )
        for each in adopted:
            each.transport.loseConnection()

    def test_stagedApplicationState(self) -> None:
        """
        A change carrying C{"appState"} gives the staged state that
        application state, checked as strictly as a whole state; one that
        carries both a state and an application state, or an application
        state that is not plain data, is refused with L{StateError} and
        changes nothing; a change of output alone changes no state.
        """
        hosted, client = self.serve("tcp:1", Counter)
        (staged,) = self.stage(*self.precopy())
        before = staged.state
        for bad in [
            {"id": 1, "output": "", "appState": {"count": 2}, "state": 3},
            {"id": 1, "output": "", "appState": {"count": {1, 2}}},
            {"id": 1, "output": "", "appState": _nested(MAX_DEPTH)},
            {"id": 1, "output": "!!", "appState": {"count": 2}},
        ]:
            error = self.assertRaises(StateError, staged.update, bad)
            self.assertIn("bad change for connection 1", str(error))
            self.assertIs(staged.state, before)
        self.assertFalse(staged.update({"id": 1, "output": "aGk="}))
        self.assertIs(staged.state, before)
        self.assertTrue(
            staged.update({"id": 1, "output": "", "appState": {"count": 2}})
        )
        self.assertEqual(staged.state, before.withApplicationState({"count": 2}))
        staged.abandon()

    def test_stagedBadChange(self) -> None:
        """
        A malformed change is refused with L{StateError} and changes
        nothing.
        """
        hosted, client = self.serve("tcp:1", Counter)
        (staged,) = self.stage(*self.precopy())
        before = staged.state
        self.assertRaises(StateError, staged.update, {"id": 1, "output": "!!"})
        self.assertRaises(StateError, staged.update, {"id": 1, "state": 3})
        self.assertIs(staged.state, before)
        staged.abandon()

    @inlineCallbacks
    def test_closedDescriptorNotSent(self) -> Any:
        """
        Once its connection has closed, a pre-copied connection has no
        descriptor to send (its number may already belong to another
        connection).
        """
        hosted, client = self.serve("tcp:1", Counter)
        precopied, _ = self.precopy()
        client.close()
        yield self.waitFor(lambda: hosted.transport.disconnected)
        self.assertIsNone(precopied[0].liveDescriptor())
