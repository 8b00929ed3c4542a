"""
Tests for L{migrate.strategies._reexec._caretaker}: the channel between a
re-executed image and the caretaker that serves while it starts, and
L{migrate.strategies._reexec._state.afterCaretaker}, which joins the
caretaker's document to the pre-copy the new image read.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import threading
from types import SimpleNamespace
from typing import Any

from attrs import evolve
from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from migrate._codec import StateError
from migrate._handoff._fdpass import readMemfd, writeMemfd
from migrate._handoff._movement import AdoptedConnection
from migrate._handoff._trial import TrialOutcome
from migrate._host._metrics import HostMetrics
from migrate._host._service import MigrationHost
from migrate.state import ProtocolState
from migrate.strategies._reexec import _incoming, _outgoing
from migrate.strategies._reexec._caretaker import (
    ABORT,
    CARETAKER_PROTOCOL,
    CARETAKER_VARIABLE,
    COMMITTED,
    DOCUMENT,
    FREEZE,
    Caretaker,
    CaretakerChannel,
    CaretakerError,
    HandOverAborted,
    _Watcher,
    dieWithParent,
    libcPrctl,
)
from migrate.strategies._reexec._incoming import (
    ReexecInheritance,
    _takeFromCaretaker,
    newImageSpeaks,
    restoreReexec,
)
from migrate.strategies._reexec._outgoing import _ForkedCaretaker
from migrate.strategies._reexec._state import (
    FORMAT_VERSION,
    InheritedConnection,
    PrecopiedConnection,
    ReexecState,
    afterCaretaker,
    writeState,
)
from migrate.strategies.reexec import ReexecStrategy

from .test_reexec import _Harness


def _pair(case: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    case.addCleanup(ours.close)
    case.addCleanup(theirs.close)
    return ours, theirs


class CaretakerFromEnvironmentTests(SynchronousTestCase):
    """
    L{Caretaker.fromEnvironment} finds the caretaker the old image left.
    """

    def test_none(self) -> None:
        """
        Without the variable there is no caretaker.
        """
        self.assertIsNone(Caretaker.fromEnvironment({}))

    def test_found(self) -> None:
        """
        The variable names the channel's descriptor and the caretaker's
        process; it is removed, and the channel made close-on-exec.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        fd = theirs.detach()
        os.set_inheritable(fd, True)
        environ = {CARETAKER_VARIABLE: "{},{}".format(fd, 4321), "OTHER": "1"}
        caretaker = Caretaker.fromEnvironment(environ)
        assert caretaker is not None
        self.addCleanup(caretaker.socket.close)
        self.assertEqual((caretaker.socket.fileno(), caretaker.pid), (fd, 4321))
        self.assertEqual(environ, {"OTHER": "1"})
        self.assertFalse(os.get_inheritable(fd))

    def test_malformed(self) -> None:
        """
        A malformed variable is an error naming it.
        """
        for raw in ("", "7", "x,1", "7,", "2,100", "7,-1"):
            error = self.assertRaises(
                CaretakerError, Caretaker.fromEnvironment, {CARETAKER_VARIABLE: raw}
            )
            self.assertIn(CARETAKER_VARIABLE, str(error))


class ExchangeTests(SynchronousTestCase):
    """
    The exchange: the new image asks for a freeze, the caretaker passes its
    document and waits until the new image has committed.
    """

    def test_freezeRequested(self) -> None:
        """
        The caretaker's end watches the channel from the reactor and fires
        once the new image sends L{FREEZE}; it stops watching then.
        """
        ours, theirs = _pair(self)
        reactor = MemoryReactor()
        channel = CaretakerChannel(ours)
        asked = channel.freezeRequested(reactor)
        (watcher,) = reactor.readers
        watcher.doRead()
        self.assertNoResult(asked)
        theirs.sendall(FREEZE)
        watcher.doRead()
        self.assertIsNone(self.successResultOf(asked))
        self.assertEqual(list(reactor.readers), [])

    def test_newImageGone(self) -> None:
        """
        If the new image closes the channel, or sends anything else, the
        wait fails with L{CaretakerError}.
        """
        for send, why in ((b"", "closed"), (b"?", "sent")):
            ours, theirs = _pair(self)
            reactor = MemoryReactor()
            asked = CaretakerChannel(ours).freezeRequested(reactor)
            if send:
                theirs.sendall(send)
            else:
                theirs.shutdown(socket.SHUT_WR)
            (watcher,) = reactor.readers
            watcher.doRead()
            self.assertIn(why, str(self.failureResultOf(asked, CaretakerError).value))
            self.assertEqual(list(reactor.readers), [])

    def test_handOver(self) -> None:
        """
        The new image receives the document's descriptor with L{DOCUMENT};
        the caretaker's L{CaretakerChannel.handOver} returns L{None} once the
        new image has committed.
        """
        ours, theirs = _pair(self)
        document = writeMemfd(b"{}", "test", inheritable=False)
        self.addCleanup(os.close, document)
        theirs.sendall(COMMITTED)
        self.assertIsNone(CaretakerChannel(ours).handOver(document, timeout=5))
        message, descriptors, flags, address = socket.recv_fds(theirs, 2, 4)
        self.assertEqual(message, DOCUMENT)
        (received,) = descriptors
        self.addCleanup(os.close, received)
        self.assertEqual(readMemfd(received, maxBytes=10), b"{}")

    def test_freeze(self) -> None:
        """
        L{Caretaker.freeze} sends L{FREEZE} and returns the descriptor that
        comes with L{DOCUMENT}.
        """
        ours, theirs = _pair(self)
        document = writeMemfd(b"[1]", "test", inheritable=False)
        self.addCleanup(os.close, document)
        socket.send_fds(ours, [DOCUMENT], [document])
        received = Caretaker(theirs, 1).freeze(timeout=5)
        self.addCleanup(os.close, received)
        self.assertEqual(readMemfd(received, maxBytes=10), b"[1]")
        self.assertEqual(ours.recv(1), FREEZE)

    def test_freezeCaretakerGone(self) -> None:
        """
        A caretaker that exited, or answered something else, or did not
        answer in time, is an L{CaretakerError} naming its process.
        """
        ours, theirs = _pair(self)
        ours.close()
        error = self.assertRaises(CaretakerError, Caretaker(theirs, 77).freeze, 5)
        self.assertIn("77", str(error))

        ours, theirs = _pair(self)
        ours.sendall(b"?")
        error = self.assertRaises(CaretakerError, Caretaker(theirs, 78).freeze, 5)
        self.assertIn("sent", str(error))

        ours, theirs = _pair(self)
        error = self.assertRaises(CaretakerError, Caretaker(theirs, 79).freeze, 0.01)
        self.assertIn("did not hand over", str(error))

    def test_handOverNoCommit(self) -> None:
        """
        If the new image goes away instead of committing, the caretaker is
        told why.
        """
        ours, theirs = _pair(self)
        document = writeMemfd(b"{}", "test", inheritable=False)
        self.addCleanup(os.close, document)
        theirs.shutdown(socket.SHUT_WR)
        why = CaretakerChannel(ours).handOver(document, timeout=5)
        self.assertIn("before it committed", str(why))

    def test_handOverAborted(self) -> None:
        """
        If the new image could not take the document, the caretaker's
        L{CaretakerChannel.handOver} raises L{HandOverAborted}: the
        connections are its own again.
        """
        ours, theirs = _pair(self)
        document = writeMemfd(b"{}", "test", inheritable=False)
        self.addCleanup(os.close, document)
        theirs.sendall(ABORT)
        self.assertRaises(
            HandOverAborted, CaretakerChannel(ours).handOver, document, timeout=5
        )

    def test_abort(self) -> None:
        """
        L{Caretaker.abort} says so and closes the channel, leaving the
        caretaker to close its connections; if it cannot be told, it is
        ended.
        """
        child = subprocess.Popen(["sleep", "60"])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        ours, theirs = _pair(self)
        self.assertTrue(Caretaker(theirs, child.pid).abort())
        self.assertEqual(ours.recv(2), ABORT)
        self.assertEqual(theirs.fileno(), -1)
        self.assertIsNone(child.poll())

        ours, theirs = _pair(self)
        ours.close()
        theirs.shutdown(socket.SHUT_WR)
        self.assertFalse(Caretaker(theirs, child.pid).abort())
        self.assertRaises(ChildProcessError, os.waitpid, child.pid, os.WNOHANG)

    def test_handedOver(self) -> None:
        """
        L{Caretaker.handedOver} tells whether the caretaker sent its
        document (and so waits for an answer), even one that did not
        arrive whole.
        """
        ours, theirs = _pair(self)
        ours.sendall(DOCUMENT)
        caretaker = Caretaker(theirs, 1)
        self.assertRaises(CaretakerError, caretaker.freeze, 5)
        self.assertTrue(caretaker.handedOver)
        ours, theirs = _pair(self)
        ours.close()
        caretaker = Caretaker(theirs, 1)
        self.assertRaises(CaretakerError, caretaker.freeze, 5)
        self.assertFalse(caretaker.handedOver)

    def test_freezeDescriptorDropped(self) -> None:
        """
        A document whose descriptor the kernel dropped (this image at its
        C{RLIMIT_NOFILE}: C{MSG_CTRUNC}) is an error saying so, and the
        caretaker counts as having handed over (it waits for the answer).
        """
        import resource

        ours, theirs = _pair(self)
        document = writeMemfd(b"{}", "test", inheritable=False)
        self.addCleanup(os.close, document)
        socket.send_fds(ours, [DOCUMENT], [document])
        caretaker = Caretaker(theirs, 81)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest = os.dup(0)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            error = self.assertRaises(CaretakerError, caretaker.freeze, 5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertIn("MSG_CTRUNC", str(error))
        self.assertTrue(caretaker.handedOver)

    def test_freezeUnexpected(self) -> None:
        """
        Anything but L{DOCUMENT} with one descriptor is an error saying
        what was expected and what came.
        """
        ours, theirs = _pair(self)
        ours.sendall(DOCUMENT)
        error = self.assertRaises(CaretakerError, Caretaker(theirs, 82).freeze, 5)
        self.assertIn("expected to send b'D' with one descriptor", str(error))
        self.assertIn("sent b'D' with 0", str(error))

    def test_committed(self) -> None:
        """
        L{Caretaker.committed} says so and closes the channel.
        """
        ours, theirs = _pair(self)
        caretaker = Caretaker(theirs, os.getpid())
        caretaker.committed()
        self.assertEqual(ours.recv(2), COMMITTED)
        self.assertEqual(theirs.fileno(), -1)


class ProcessTests(SynchronousTestCase):
    """
    The caretaker's process: ended at once, or collected from the reactor.
    """

    def test_kill(self) -> None:
        """
        L{Caretaker.kill} ends the process and collects it.
        """
        child = subprocess.Popen(["sleep", "60"])
        self.addCleanup(child.poll)
        ours, theirs = _pair(self)
        caretaker = Caretaker(theirs, child.pid)
        caretaker.kill()
        self.assertRaises(ChildProcessError, os.waitpid, child.pid, os.WNOHANG)
        # Collected: its number may be another process's now.
        signalled: list[int] = []
        self.patch(os, "kill", lambda pid, sig: signalled.append(pid))
        caretaker.kill()
        self.assertEqual(signalled, [])

    def test_reap(self) -> None:
        """
        L{Caretaker.reap} collects the process once it has exited, polling
        from the reactor; one still there at the deadline is killed.
        """
        child = subprocess.Popen(["true"])
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        clock = Clock()
        ours, theirs = _pair(self)
        done = Caretaker(theirs, child.pid).reap(clock)
        self.assertNoResult(done)
        clock.advance(0)
        self.successResultOf(done)
        self.assertRaises(ChildProcessError, os.waitpid, child.pid, os.WNOHANG)

        stuck = subprocess.Popen(["sleep", "60"])
        self.addCleanup(stuck.poll)
        ours, theirs = _pair(self)
        done = Caretaker(theirs, stuck.pid).reap(clock, timeout=0)
        clock.advance(0)
        self.successResultOf(done)
        self.assertRaises(ChildProcessError, os.waitpid, stuck.pid, os.WNOHANG)

    def test_dieWithParent(self) -> None:
        """
        L{dieWithParent} asks C{prctl(PR_SET_PDEATHSIG)} for the signal,
        and says whether it could.
        """
        calls: list[tuple[int, int]] = []

        def prctl(option: int, value: int) -> int:
            calls.append((option, value))
            return 0

        self.assertTrue(dieWithParent(signal.SIGKILL, prctl=prctl))
        self.assertEqual(calls, [(1, int(signal.SIGKILL))])
        self.assertFalse(dieWithParent(prctl=lambda option, value: -1))
        self.assertFalse(dieWithParent(prctl=None))

    def test_libcPrctl(self) -> None:
        """
        L{libcPrctl} finds C{prctl} in the C library this process loaded:
        asking for a signal that does not exist fails, as the kernel says.
        """
        prctl = libcPrctl()
        assert prctl is not None
        self.assertNotEqual(prctl(1, 100000), 0)


def _precopied(ident: int, fd: int) -> PrecopiedConnection:
    return PrecopiedConnection(
        ident,
        fd,
        "tcp:1",
        int(socket.AF_INET),
        ProtocolState("app.P", True, 1, {"n": ident}, {}),
        ["127.0.0.1", 1000 + ident],
        ["127.0.0.1", 1],
    )


class AfterCaretakerTests(SynchronousTestCase):
    """
    L{afterCaretaker} joins the caretaker's document and the pre-copy.
    """

    def prelude(self, **kwargs: Any) -> ReexecState:
        return ReexecState(
            pid=10,
            generation=3,
            strategy="reexec",
            listeners={"tcp:1": 5},
            blockedSignals=(int(signal.SIGHUP),),
            precopied=(_precopied(1, 20), _precopied(2, 21), _precopied(3, 22)),
            **kwargs,
        )

    def test_supersededLeftOut(self) -> None:
        """
        The pre-copied connections the caretaker superseded are left out;
        its own connections, counts and notes are kept; the signals are
        those the old image blocked.
        """
        again = InheritedConnection(21, "tcp:1", {"id": 4, "state": {}})
        final = ReexecState(
            pid=10,
            generation=3,
            strategy="reexec",
            listeners={"tcp:1": 5},
            connections=(again,),
            closed={"tcp:1": 1},
            notes=("caretaker",),
            superseded=(2, 3),
        )
        merged = afterCaretaker(self.prelude(), final)
        self.assertEqual([each.ident for each in merged.precopied], [1])
        self.assertEqual(merged.connections, (again,))
        self.assertEqual(
            (merged.closed, merged.notes, merged.superseded, merged.blockedSignals),
            ({"tcp:1": 1}, ("caretaker",), (), (int(signal.SIGHUP),)),
        )
        self.assertEqual(sorted(merged.descriptors()), [5, 20, 21])

    def test_descriptorTwice(self) -> None:
        """
        A descriptor the caretaker describes again though its pre-copy was
        not superseded is refused.
        """
        final = ReexecState(
            pid=10,
            generation=3,
            strategy="reexec",
            connections=(InheritedConnection(21, "tcp:1", {"id": 4, "state": {}}),),
        )
        self.assertRaises(StateError, afterCaretaker, self.prelude(), final)

    def test_notInherited(self) -> None:
        """
        A document that names a descriptor the new image did not inherit
        is refused: that number may be anything in this image.
        """
        final = ReexecState(
            pid=10,
            generation=3,
            strategy="reexec",
            listeners={"tcp:1": 5},
            connections=(InheritedConnection(30, "tcp:1", {"id": 4, "state": {}}),),
        )
        self.assertEqual(
            len(afterCaretaker(self.prelude(), final, [5, 20, 21, 22, 30]).connections),
            1,
        )
        error = self.assertRaises(
            StateError, afterCaretaker, self.prelude(), final, [5, 20, 21, 22]
        )
        self.assertIn("[30]", str(error))

    def test_otherGeneration(self) -> None:
        """
        A document of another process or generation is refused, as is one
        that names a pre-copy of its own.
        """
        for final in (
            ReexecState(pid=11, generation=3, strategy="reexec"),
            ReexecState(pid=10, generation=2, strategy="reexec"),
            ReexecState(pid=10, generation=3, strategy="reexec", precopy=9),
        ):
            self.assertRaises(StateError, afterCaretaker, self.prelude(), final)

    def test_supersededTravelsWithoutPrecopy(self) -> None:
        """
        The caretaker's document names no pre-copy but keeps what it
        superseded across its plain form.
        """
        state = ReexecState(pid=10, generation=3, strategy="reexec", superseded=(2, 5))
        self.assertEqual(ReexecState.fromPlain(state.toPlain()).superseded, (2, 5))


#: a process number that is nobody's child here
_NOT_A_CHILD = (1 << 22) + 12345


class WhatTheNewCodeSpeaksTests(SynchronousTestCase):
    """
    The old image forks a caretaker only for new code that says, in its
    trial, that it speaks the caretaker's protocol, and re-executes only
    into code that reads the state document it writes.
    """

    def setUp(self) -> None:
        # Whatever the test runner's threads: only the new code decides.
        self.patch(threading, "active_count", lambda: 1)
        self.forked: list[bool] = []

    def fork(self) -> int:
        self.forked.append(True)
        return _NOT_A_CHILD

    def migrate(self, about: dict[str, int]) -> tuple[_Harness, Any]:
        harness = _Harness(self)
        harness.connect()
        migration = harness.migration(
            caretaker=True,
            fork=self.fork,
            preflight=lambda *a, **k: succeed(TrialOutcome(None, about=about)),
        )
        return harness, harness.run(migration)

    def test_newImageSpeaks(self) -> None:
        """
        This code says it reads this code's format and speaks this code's
        caretaker's protocol.
        """
        self.assertEqual(
            newImageSpeaks(),
            {"format": FORMAT_VERSION, "caretaker": CARETAKER_PROTOCOL},
        )

    def test_speaksIt(self) -> None:
        """
        New code that speaks the caretaker's protocol gets a caretaker: the
        old image forks, and tells the new image where it is.
        """
        harness, report = self.migrate(newImageSpeaks())
        self.assertEqual(self.forked, [True])
        (executed,) = harness.executed
        self.assertEqual(
            executed["env"][CARETAKER_VARIABLE].split(",")[1], str(_NOT_A_CHILD)
        )
        self.assertEqual(report.outcome.value, "rolled-back")

    def test_preludeCarriesMetrics(self) -> None:
        """
        The prelude carries the metrics' counters, as every document does:
        a new image whose caretaker does not hand over serves from it (and
        its metrics endpoint counts on from them).
        """
        harness = _Harness(self)
        harness.host.metrics = HostMetrics(harness.host, harness.reactor.seconds)
        harness.host.metrics.recordTrialRun("reexec", True)
        prelude = harness.migration(caretaker=True)._prelude(0.0, [])
        self.assertEqual(prelude.connections, ())
        self.assertEqual(prelude.metricsCarried, harness.host.metrics.carried())
        self.assertIsNotNone(prelude.metricsCarried)

    def test_descriptorLimitCountsTheCaretaker(self) -> None:
        """
        The new image's descriptor limit is checked with the caretaker's
        channel and document counted: a limit that suffices without a
        caretaker refuses the re-exec with one.
        """

        def needed(about: dict[str, int], limit: int) -> Any:
            harness = _Harness(self)
            harness.connect()
            return harness.run(
                harness.migration(
                    caretaker=True,
                    fork=self.fork,
                    softLimit=lambda: limit,
                    preflight=lambda *a, **k: succeed(TrialOutcome(None, about=about)),
                )
            )

        refused = needed({}, 10)
        self.assertEqual(refused.outcome.value, "refused")
        alone = int(refused.reason.split("would need ")[1].split()[0])
        withCaretaker = needed(newImageSpeaks(), 10)
        self.assertIn("would need {} ".format(alone + 2), withCaretaker.reason)
        self.assertEqual(needed({}, alone).outcome.value, "rolled-back")
        self.assertEqual(needed(newImageSpeaks(), alone).outcome.value, "refused")
        self.assertEqual(self.forked, [])

    def test_olderCode(self) -> None:
        """
        New code that says nothing about the caretaker (an older migrate,
        which would restore the pre-copy beside the caretaker and leave it
        to close every connection) gets none: the old image re-executes as
        with C{--reexec-caretaker none}, with a log line and a note.
        """
        for about, why in (
            ({}, "an older migrate"),
            ({"format": FORMAT_VERSION}, "an older migrate"),
            ({"format": FORMAT_VERSION, "caretaker": 1}, "older than this image's"),
        ):
            # As if this image's protocol were newer than the new code's.
            self.patch(_outgoing, "CARETAKER_PROTOCOL", 2)
            with capturedLogs() as events:
                harness, report = self.migrate(about)
            self.assertEqual(self.forked, [])
            (executed,) = harness.executed
            self.assertNotIn(CARETAKER_VARIABLE, executed["env"])
            # The connections travel in the document execv passes.
            self.assertEqual(len(executed["state"].connections), 1)
            notes = [n for n in report.notes if "no caretaker served" in n]
            self.assertEqual(len(notes), 1, report.notes)
            self.assertIn(why, notes[0])
            self.assertTrue(
                any(
                    "no caretaker served" in formatEvent(event)
                    and event["log_level"] is LogLevel.warn
                    for event in events
                )
            )

    def test_olderFormat(self) -> None:
        """
        New code that reads only older state documents than this image
        writes refuses the re-exec before anything is touched: it would
        start afresh, every connection lost.
        """
        self.patch(_outgoing, "FORMAT_VERSION", FORMAT_VERSION + 1)
        harness, report = self.migrate(newImageSpeaks())
        self.assertEqual(report.outcome.value, "refused")
        self.assertIn(
            "reads state documents up to format {}".format(FORMAT_VERSION),
            report.reason,
        )
        self.assertEqual((harness.executed, self.forked), ([], []))


class CaretakerFixture(SynchronousTestCase):
    """
    A new image on a fake reactor with one connection inherited, whose
    other copy a caretaker (here a stand-in process) holds, and the
    caretaker's end of their channel.
    """

    def setUp(self) -> None:
        # restoreReexec keeps the collector off until every socket is
        # adopted, which a fake reactor never finishes.
        if gc.isenabled():
            self.addCleanup(gc.enable)
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        self.client = socket.create_connection(listening.getsockname())
        self.addCleanup(self.client.close)
        # The caretaker's copy of the connection, and the new image's.
        self.served, address = listening.accept()
        self.addCleanup(self.served.close)
        self.inherited = os.dup(self.served.fileno())
        self.listenerFd = os.dup(listening.fileno())
        self.addCleanup(os.close, self.listenerFd)
        self.clock = MemoryReactorClock()
        self.host = MigrationHost(
            self.clock,
            Factory.forProtocol(Protocol),
            [],
            ReexecStrategy(),
            controlPath=None,
            installSignalHandlers=False,
        )
        prelude = ReexecState(pid=10, generation=3, strategy="reexec")
        self.inheritance = ReexecInheritance(
            prelude, 0.0, inherited=[self.listenerFd, self.inherited]
        )
        self.child = subprocess.Popen(["sleep", "60"])
        self.addCleanup(self.child.wait)
        self.addCleanup(self.child.kill)
        self.ours, theirs = _pair(self)
        self.caretaker = Caretaker(theirs, self.child.pid)
        # The listener's descriptor is the prelude's: the connection is
        # counted on it, found by its port.
        self.inheritance.state = evolve(prelude, listeners={"tcp:x": self.listenerFd})


class NewImageGivesUpTests(CaretakerFixture):
    """
    When the new image cannot take the caretaker's connections, every one
    is closed, counted as failed on its listener, and the image serves.
    """

    def take(self) -> Any:
        self.assertFalse(
            _takeFromCaretaker(self.host, self.inheritance, self.caretaker)
        )
        return self.inheritance.state

    def test_unreadableDocument(self) -> None:
        """
        A document the new image cannot read: the caretaker, which waits
        for the answer, is told L{ABORT} and closes its connections
        politely itself; the new image lets go of its copies without
        shutting them down (the client sees nothing yet), counts them as
        failed on their listener, says so in a critical log line and a
        note, and collects the caretaker once it has exited.
        """
        document = writeMemfd(b"not a document", "test", inheritable=False)
        socket.send_fds(self.ours, [DOCUMENT], [document])
        os.close(document)
        with capturedLogs() as events:
            state = self.take()
        self.assertEqual(self.ours.recv(2) + self.ours.recv(2), FREEZE + ABORT)
        # Still the caretaker's, untouched.
        self.assertIsNone(self.child.poll())
        self.assertRaises(OSError, os.fstat, self.inherited)
        self.client.setblocking(False)
        self.assertRaises(BlockingIOError, self.client.recv, 1)
        self.assertEqual(state.closed, {"tcp:x": 1})
        self.assertIn("closed politely by the caretaker", state.notes[-1])
        self.assertTrue(
            any(
                event["log_level"] is LogLevel.critical
                and "it closes the 1 it served" in formatEvent(event)
                for event in events
            )
        )
        self.assertEqual(state.listeners, {"tcp:x": self.listenerFd})
        # Collected once it exits.
        self.child.kill()
        os.waitid(os.P_PID, self.child.pid, os.WEXITED | os.WNOWAIT)
        self.clock.advance(0.02)
        self.assertRaises(ChildProcessError, os.waitpid, self.child.pid, os.WNOHANG)

    def test_caretakerGone(self) -> None:
        """
        A caretaker that exits before it hands over is ended (collected),
        and the new image closes the connections cleanly itself, counted
        on their listener.
        """
        self.ours.close()
        state = self.take()
        self.assertRaises(ChildProcessError, os.waitpid, self.child.pid, os.WNOHANG)
        ((fd, family, factory),) = self.clock.adoptedStreamConnections
        self.assertEqual((fd, family), (self.inherited, socket.AF_INET))
        self.assertEqual(state.closed, {"tcp:x": 1})
        self.assertNotIn("politely", state.notes[-1])

    def restoreUnreadable(self) -> Any:
        """
        Restore the new image (no listener) with a caretaker whose
        document it cannot read.

        @return: the report.
        """
        document = writeMemfd(b"not a document", "test", inheritable=False)
        socket.send_fds(self.ours, [DOCUMENT], [document])
        os.close(document)
        self.inheritance.state = evolve(self.inheritance.state, listeners={})
        self.inheritance.inherited = [self.inherited]
        self.inheritance.caretaker = self.caretaker
        return restoreReexec(self.host, self.inheritance)

    def test_notCommitted(self) -> None:
        """
        L{restoreReexec} does not tell a caretaker that did not hand over
        that the new image committed, and serves.
        """
        report = self.restoreUnreadable()
        self.assertEqual(self.ours.recv(2) + self.ours.recv(2), FREEZE + ABORT)
        self.assertEqual(self.ours.recv(2), b"")
        self.assertEqual(report.outcome.value, "success")
        self.assertEqual(
            sum(each.failed for each in report.listeners), 1, report.listeners
        )

    def test_applicationStartedBeforeTheCaretakerIsAsked(self) -> None:
        """
        The new image starts a hosted application (on the listeners it
        adopted) before it asks the caretaker for the connections, so that
        their clients do not wait for it.
        """
        seen: list[bytes | None] = []

        def prepareApplication() -> None:
            self.ours.setblocking(False)
            try:
                seen.append(self.ours.recv(1))
            except BlockingIOError:
                seen.append(None)
            finally:
                self.ours.setblocking(True)

        self.patch(self.host, "prepareApplication", prepareApplication)
        self.restoreUnreadable()
        self.assertEqual(seen, [None])
        self.assertEqual(self.ours.recv(1), FREEZE)


class RestoreFailsAfterHandOverTests(CaretakerFixture):
    """
    Restoring that fails after the caretaker handed the connections over
    ends with every connection closed politely by the caretaker, with a
    critical log line: none is left half adopted, none reset by a killed
    caretaker.
    """

    def handOver(self) -> None:
        """
        The caretaker hands over a document naming the connection.
        """
        self.inheritance.state = evolve(self.inheritance.state, listeners={})
        self.inheritance.inherited = [self.inherited]
        self.inheritance.caretaker = self.caretaker
        document = writeState(
            ReexecState(
                pid=10,
                generation=3,
                strategy="reexec",
                connections=(
                    InheritedConnection(
                        self.inherited,
                        "tcp:x",
                        {"id": 1, "listener": "tcp:x"},
                        fresh=True,
                    ),
                ),
            )
        )
        socket.send_fds(self.ours, [DOCUMENT], [document])
        os.close(document)

    def test_beforeServingHandsBack(self) -> None:
        """
        A failure before this image serves any connection: it lets go of
        its copy without shutting it down (the client sees nothing), tells
        the caretaker L{ABORT} (it closes its connections politely, then
        exits) rather than killing it, says so in a critical log line, and
        fails as before.
        """
        self.handOver()
        reached: list[int] = []

        def failing(host: Any, state: Any, notes: Any) -> None:
            reached.append(len(state.connections))
            raise RuntimeError("a bug")

        # After the connections were adopted, before the image serves.
        self.patch(_incoming, "_listenToReporters", failing)
        with capturedLogs() as events:
            failure = self.assertRaises(
                Exception, restoreReexec, self.host, self.inheritance
            )
        self.assertIn("a bug", str(failure))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(reached, [1])
        self.assertEqual(self.ours.recv(2) + self.ours.recv(2), FREEZE + ABORT)
        self.assertIsNone(self.child.poll())
        self.assertRaises(OSError, os.fstat, self.inherited)
        self.client.setblocking(False)
        self.assertRaises(BlockingIOError, self.client.recv, 1)
        self.assertTrue(
            any(
                event["log_level"] is LogLevel.critical
                and "the caretaker closes the 1 connections politely"
                in formatEvent(event)
                and "RuntimeError: a bug" in formatEvent(event)
                for event in events
            ),
            [formatEvent(event) for event in events],
        )

    def test_servingFailureClosesPolitely(self) -> None:
        """
        A connection whose serving fails once this image serves is closed
        politely here and counted as failed; the caretaker is told the
        image committed (every connection is this image's), and the image
        serves on.
        """
        self.handOver()
        closed: list[bool] = []

        def adoptFresh(host: Any, entry: Any, descriptor: int) -> Any:
            os.close(descriptor)
            return AdoptedConnection(
                SimpleNamespace(),  # type: ignore[arg-type]
                SimpleNamespace(loseConnection=lambda: closed.append(True)),
            )

        def failing(adopted: AdoptedConnection) -> None:
            raise RuntimeError("a bug")

        self.patch(_incoming, "adoptFresh", adoptFresh)
        self.patch(AdoptedConnection, "commit", failing)
        report = restoreReexec(self.host, self.inheritance)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(closed), 1)
        self.assertEqual(
            [(each.key, each.moved, each.failed) for each in report.listeners],
            [("tcp:x", 0, 1)],
        )
        self.assertEqual(self.ours.recv(2) + self.ours.recv(2), FREEZE + COMMITTED)
        self.assertTrue(self.host.serving)


class NumberReusedTests(SynchronousTestCase):
    """
    The new image closes the inherited descriptors the caretaker's
    document does not name only if each is still what it inherited under
    that number.
    """

    def setUp(self) -> None:
        self.host = MigrationHost(
            MemoryReactorClock(),
            Factory.forProtocol(Protocol),
            [],
            ReexecStrategy(),
            controlPath=None,
            installSignalHandlers=False,
        )
        self.ours, theirs = _pair(self)
        self.caretaker = Caretaker(theirs, 1)

    def test_reusedNumberLeftOpen(self) -> None:
        """
        A descriptor closed and its number reused (here by a pipe) since
        it was listed is left open, with a log line; one still the same
        socket is closed.
        """
        first, second = socket.socketpair()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        gone, stays = os.dup(first.fileno()), os.dup(second.fileno())
        inheritance = ReexecInheritance(
            ReexecState(pid=10, generation=3, strategy="reexec"),
            0.0,
            inherited=[gone, stays],
        )
        # The application closes the first meanwhile, and its number is
        # given to a pipe.
        os.close(gone)
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, writeEnd)
        if readEnd != gone:
            os.dup2(readEnd, gone)
            os.close(readEnd)
        self.addCleanup(os.close, gone)
        document = writeState(ReexecState(pid=10, generation=3, strategy="reexec"))
        socket.send_fds(self.ours, [DOCUMENT], [document])
        os.close(document)
        with capturedLogs() as events:
            self.assertTrue(_takeFromCaretaker(self.host, inheritance, self.caretaker))
        # The pipe is still open: what is written to it arrives.
        os.write(writeEnd, b"x")
        self.assertEqual(os.read(gone, 1), b"x")
        self.assertRaises(OSError, os.fstat, stays)
        self.assertTrue(
            any(
                "descriptor {} is no longer".format(gone) in formatEvent(event)
                for event in events
            )
        )


def _openDescriptors() -> set[int]:
    found = set()
    # Without the directory's own, closed once listed.
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        found.add(int(name))
    return found


class ForkedCaretakerTests(SynchronousTestCase):
    """
    L{_ForkedCaretaker} forks the caretaker, which serves only once the
    parent's C{execv} has succeeded.
    """

    def test_forkFails(self) -> None:
        """
        A fork that fails raises, and leaves no descriptor of the pipe
        behind.
        """
        caretaker = _ForkedCaretaker.prepare()
        self.addCleanup(caretaker.abandon)
        before = _openDescriptors()

        def fork() -> int:
            raise OSError(11, "Resource temporarily unavailable")

        self.assertRaises(OSError, caretaker.fork, fork)
        self.assertEqual(_openDescriptors(), before)
        self.assertEqual(caretaker.pid, 0)

    def test_parent(self) -> None:
        """
        In the parent, L{_ForkedCaretaker.fork} returns C{False} and keeps
        the child's process and the pipe's writing end (close-on-exec: the
        exec closing it is what tells the child); L{_ForkedCaretaker.abandon}
        tells the child to exit, collects it, and closes everything.
        """
        caretaker = _ForkedCaretaker.prepare()
        before = _openDescriptors()
        self.assertFalse(caretaker.fork(lambda: _NOT_A_CHILD))
        self.assertEqual(caretaker.pid, _NOT_A_CHILD)
        (verdict,) = _openDescriptors() - before
        self.assertFalse(os.get_inheritable(verdict))
        self.assertFalse(os.get_inheritable(caretaker.ours.fileno()))
        channel = {caretaker.ours.fileno(), caretaker.theirs.fileno()}
        caretaker.abandon()
        self.assertEqual(caretaker.pid, 0)
        self.assertEqual(_openDescriptors(), before - channel)


class ServeAsCaretakerTests(SynchronousTestCase):
    """
    L{ReexecMigration._serveAsCaretaker}, in the caretaker: serve until the
    new image asks, hand over, and end the process whatever happens.
    """

    def setUp(self) -> None:
        self.harness = _Harness(self)
        self.hosted = self.harness.connect()
        self.hosted.dataReceived(b"a\n")
        self.exits: list[int] = []
        self.freezes: list[int] = []
        self.migration = self.harness.migration(
            caretaker=True,
            exitProcess=self.exits.append,
            freezeHeap=lambda: self.freezes.append(1),
        )
        self.ours, self.theirs = _pair(self)
        self.theirs.settimeout(5)

    def serve(self, *sent: bytes) -> Any:
        """
        Serve as the caretaker, the new image having sent C{sent}.
        """
        reactor = self.harness.reactor
        with capturedLogs() as events:
            self.migration._serveAsCaretaker(CaretakerChannel(self.ours))
            for each in sent:
                self.theirs.sendall(each)
            for watcher in [r for r in reactor.readers if isinstance(r, _Watcher)]:
                watcher.doRead()
            # The safe points, the polls, and the polite closes' deadline.
            for i in range(100):
                if self.exits:
                    break
                reactor.advance(1)
        return events

    def document(self) -> ReexecState:
        message, descriptors, flags, address = socket.recv_fds(self.theirs, 1, 2)
        self.assertEqual(message, DOCUMENT)
        (fd,) = descriptors
        return ReexecState.fromPlain(json.loads(readMemfd(fd, maxBytes=1 << 20)))

    def test_committed(self) -> None:
        """
        Asked to freeze, the caretaker describes its connections in its
        document, and exits with status 0 once the new image committed,
        without closing a connection.
        """
        self.serve(FREEZE, COMMITTED)
        self.assertEqual(self.exits, [0])
        (connection,) = self.document().connections
        self.assertEqual(connection.entry["state"]["appState"], {"count": 1})
        self.assertFalse(self.hosted.transport.disconnecting)

    def test_aborted(self) -> None:
        """
        If the new image could not take the document, the caretaker closes
        every connection politely itself, says so critically, and exits
        with status 1.
        """
        events = self.serve(FREEZE, ABORT)
        self.document()
        self.assertEqual(self.exits, [1])
        self.assertTrue(self.hosted.transport.disconnecting)
        self.assertTrue(
            any(
                event["log_level"] is LogLevel.critical
                and "closes the connections politely" in formatEvent(event)
                for event in events
            )
        )

    def test_heapFrozenOnceAsked(self) -> None:
        """
        Once the new image asked for the connections, the caretaker
        leaves every object it holds out of collections until it exits
        (a full collection before its freeze would walk them all), before
        it waits for the safe points.
        """
        order: list[str] = []
        asking = _outgoing.atSafePoints

        def atSafePoints(*args: Any, **kwargs: Any) -> Any:
            order.append("safepoints after %d freeze" % len(self.freezes))
            return asking(*args, **kwargs)

        self.patch(_outgoing, "atSafePoints", atSafePoints)
        self.serve(FREEZE, COMMITTED)
        self.assertEqual(self.exits, [0])
        self.assertEqual(len(self.freezes), 1)
        self.assertEqual(order, ["safepoints after 1 freeze"])

    def test_notAsked(self) -> None:
        """
        A new image that does not ask within the ready timeout finds the
        connections closed politely; the caretaker exits with status 1.
        """
        self.serve()
        self.assertEqual(self.exits, [1])
        self.assertEqual(self.freezes, [])
        self.assertTrue(self.hosted.transport.disconnecting)
        # Nothing was handed over.
        self.theirs.setblocking(False)
        self.assertRaises(BlockingIOError, self.theirs.recv, 1)

    def test_failure(self) -> None:
        """
        Whatever fails in the caretaker ends it (status 1), with the
        failure logged: it never goes on as a host.
        """

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("broken")

        self.patch(_outgoing, "writeState", broken)
        events = self.serve(FREEZE, COMMITTED)
        self.assertEqual(self.exits, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(
            any("the caretaker failed" in formatEvent(event) for event in events)
        )
