"""
Tests for L{migrate._control._server}: the control channel's AMP protocol
(commands in L{migrate._control._commands}), its bounds
(L{migrate._control._limits}) and peer-credential check, the bounded JSON answers, and the control
socket itself.

The protocol is driven in memory (L{twisted.test.iosim}, L{StringTransport})
against a fake host; the socket tests use real Unix sockets in a temporary
directory, and the listening tests the real reactor.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import tempfile
from typing import Any, Callable, Mapping

from attrs import Factory, define
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from migrate._control import _server
from migrate._control._commands import (
    MigrationInProgress,
    Progress,
    Status,
    UnknownStrategy,
    Upgrade,
)
from migrate._control._server import (
    MAX_BOX_BYTES,
    MAX_BOX_KEYS,
    MAX_REPLY_BYTES,
    ControlFactory,
    ControlProtocol,
    ControlSocketError,
    ControlSocketInUse,
    IControlledHost,
    _peerCredentials,
    adoptControl,
    bindControlSocket,
    encodeReport,
    encodeStatus,
    listenControl,
)

SNAPSHOT = {
    "pid": 1234,
    "generation": 3,
    "strategy": "capability",
    "phase": "idle",
    "listeners": [{"key": "tcp:8000", "address": "0.0.0.0:8000", "connections": 2}],
    "connections": 2,
    "draining": [],
    "lastReport": None,
}


def makeReport(**changes: Any) -> dict[str, Any]:
    report = {
        "strategy": "capability",
        "outcome": "success",
        "reason": None,
        "fromGeneration": 3,
        "toGeneration": 4,
        "oldPid": 1234,
        "newPid": 1300,
        "listeners": [{"key": "tcp:8000", "moved": 2, "drained": 0, "failed": 0}],
        "moved": 2,
        "draining": 0,
        "failed": 0,
        "durations": {"spawning": 0.2},
        "successorLog": [],
        "notes": [],
    }
    report.update(changes)
    return report


@define
class FakeHost:
    """
    An L{IControlledHost} that records calls; upgrades wait for the test.
    """

    snapshot: dict[str, Any] = Factory(lambda: dict(SNAPSHOT))
    calls: list[tuple[str, Any]] = Factory(list)
    upgrades: list[tuple[Callable[[str], None], Deferred[Any]]] = Factory(list)
    failWith: Exception | None = None
    overrides: list[dict[str, float]] = Factory(list)

    def statusSnapshot(self) -> dict[str, Any]:
        self.calls.append(("statusSnapshot", None))
        return self.snapshot

    def requestUpgrade(
        self,
        strategyName: str | None,
        progress: Callable[[str], None],
        overrides: Mapping[str, float] | None = None,
    ) -> Deferred[dict[str, Any]]:
        self.calls.append(("requestUpgrade", strategyName))
        if overrides is not None:
            self.overrides.append(dict(overrides))
        if self.failWith is not None:
            return fail(self.failWith)
        d: Deferred[dict[str, Any]] = Deferred()
        self.upgrades.append((progress, d))
        return d


@define
class FakeHandle:
    """
    A socket whose C{SO_PEERCRED} says C{(pid, uid, gid)}.
    """

    pid: int = 4321
    uid: int = os.getuid()
    gid: int = os.getgid()

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return struct.pack("3i", self.pid, self.uid, self.gid)[:size]


class CredentialedTransport(iosim.FakeTransport):
    """
    An iosim transport with a peer-credential handle.
    """

    def __init__(self, protocol: Any, isServer: bool, handle: Any) -> None:
        super().__init__(protocol, isServer)
        self.handle = handle

    def getHandle(self) -> Any:
        return self.handle


class CredentialedStringTransport(StringTransport):
    """
    A L{StringTransport} with a peer-credential handle.
    """

    def __init__(self, handle: Any = None) -> None:
        super().__init__()
        self.handle = FakeHandle() if handle is None else handle

    def getHandle(self) -> Any:
        return self.handle


class RecordingClient(amp.AMP):
    """
    The client end: records L{Progress} messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.progress: list[str] = []

    @Progress.responder
    def onProgress(self, message: str) -> dict[str, Any]:
        self.progress.append(message)
        return {}


def connected(
    host: FakeHost, handle: Any = None
) -> tuple[ControlProtocol, RecordingClient, iosim.IOPump]:
    server = ControlProtocol(host)
    client = RecordingClient()
    pump = iosim.connect(
        server,
        CredentialedTransport(server, True, FakeHandle() if handle is None else handle),
        client,
        iosim.FakeTransport(client, False),
        greet=False,
    )
    return server, client, pump


def settle(d: Deferred[Any], pump: iosim.IOPump) -> Any:
    """
    Pump, and return what C{d} fired with (a L{Failure} if it failed).

    AMP hands an answer that no callback is waiting for yet to its own
    unhandled-error path, so the result is collected before pumping.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    pump.flush()
    [result] = results
    return result


def serverOnStrings(
    host: FakeHost, handle: Any = None
) -> tuple[ControlProtocol, CredentialedStringTransport]:
    server = ControlProtocol(host)
    transport = CredentialedStringTransport(handle)
    server.makeConnection(transport)
    return server, transport


def box(**values: bytes) -> bytes:
    data: bytes = amp.AmpBox(
        {key.encode("ascii"): value for key, value in values.items()}
    ).serialize()
    return data


def statusBox(tag: bytes = b"1", **extra: bytes) -> amp.AmpBox:
    result = amp.AmpBox({b"_command": b"Status", b"_ask": tag})
    for key, value in extra.items():
        result[key.encode("ascii")] = value
    return result


class ProtocolTests(SynchronousTestCase):
    """
    L{ControlProtocol} answers L{Status} and L{Upgrade} for its host.
    """

    def test_factoryBuildsBoundProtocols(self) -> None:
        host = FakeHost()
        protocol = ControlFactory(host).buildProtocol(None)
        self.assertIsInstance(protocol, ControlProtocol)
        self.assertIs(protocol._host, host)

    def test_fakeHostIsAControlledHost(self) -> None:
        host: IControlledHost = FakeHost()
        self.assertEqual(host.statusSnapshot()["pid"], 1234)

    def test_status(self) -> None:
        host = FakeHost()
        server, client, pump = connected(host)
        answer = settle(client.callRemote(Status), pump)
        self.assertEqual(json.loads(answer["status"]), SNAPSHOT)
        self.assertEqual(host.calls, [("statusSnapshot", None)])

    def test_upgradeWithProgressAndReport(self) -> None:
        host = FakeHost()
        server, client, pump = connected(host)
        d = client.callRemote(Upgrade)
        pump.flush()
        self.assertEqual(host.calls, [("requestUpgrade", None)])
        progress, result = host.upgrades[0]
        progress("spawning successor")
        progress("handing off 2 connections")
        pump.flush()
        self.assertEqual(
            client.progress, ["spawning successor", "handing off 2 connections"]
        )
        self.assertNoResult(d)
        result.callback(makeReport())
        answer = settle(d, pump)
        self.assertEqual(json.loads(answer["report"]), makeReport())

    def test_upgradeNamedStrategy(self) -> None:
        host = FakeHost()
        server, client, pump = connected(host)
        client.callRemote(Upgrade, strategy="reload")
        pump.flush()
        self.assertEqual(host.calls, [("requestUpgrade", "reload")])

    def test_upgradeOverrides(self) -> None:
        """
        Settings given with the upgrade reach the host, for this migration;
        none given, none passed.
        """
        host = FakeHost()
        server, client, pump = connected(host)
        client.callRemote(Upgrade, readyTimeout=5.0, drainTimeout=2.5)
        client.callRemote(Upgrade, readyTimeout=7.0)
        client.callRemote(Upgrade)
        pump.flush()
        self.assertEqual(
            host.overrides,
            [{"readyTimeout": 5.0, "drainTimeout": 2.5}, {"readyTimeout": 7.0}],
        )
        self.assertEqual(len(host.calls), 3)

    def test_upgradeEmptyStrategyMeansDefault(self) -> None:
        host = FakeHost()
        server, client, pump = connected(host)
        client.callRemote(Upgrade, strategy="")
        pump.flush()
        self.assertEqual(host.calls, [("requestUpgrade", None)])

    def test_upgradeReportObject(self) -> None:
        """
        A report object with C{toJSON} is encoded through it.
        """

        @define
        class Report:
            def toJSON(self) -> dict[str, Any]:
                return makeReport(outcome="refused")

        host = FakeHost()
        server, client, pump = connected(host)
        d = client.callRemote(Upgrade)
        pump.flush()
        host.upgrades[0][1].callback(Report())
        answer = settle(d, pump)
        self.assertEqual(json.loads(answer["report"])["outcome"], "refused")

    def test_migrationInProgress(self) -> None:
        host = FakeHost(failWith=MigrationInProgress("already running (spawning)"))
        server, client, pump = connected(host)
        failure = settle(client.callRemote(Upgrade), pump)
        failure.trap(MigrationInProgress)
        self.assertEqual(str(failure.value), "already running (spawning)")

    def test_unknownStrategy(self) -> None:
        host = FakeHost(failWith=UnknownStrategy("unknown strategy 'nope'"))
        server, client, pump = connected(host)
        failure = settle(client.callRemote(Upgrade, strategy="nope"), pump)
        failure.trap(UnknownStrategy)
        self.assertEqual(str(failure.value), "unknown strategy 'nope'")

    def test_progressAfterClientLeft(self) -> None:
        """
        Progress and the report for a client that has gone away are dropped
        quietly.
        """
        host = FakeHost()
        server, client, pump = connected(host)
        client.callRemote(Upgrade).addErrback(lambda f: None)
        pump.flush()
        assert client.transport is not None
        client.transport.loseConnection()
        pump.flush()
        progress, result = host.upgrades[0]
        progress("still going")
        result.callback(makeReport())
        self.assertEqual(client.progress, [])

    def test_unknownCommandAnsweredWithError(self) -> None:
        """
        An unknown command gets AMP's "unhandled" error; the host is not
        called and the connection stays.
        """
        host = FakeHost()
        server, client, pump = connected(host)

        class Bogus(amp.Command):
            commandName = b"Bogus"

        settle(client.callRemote(Bogus), pump).trap(amp.UnhandledCommand)
        self.assertEqual(host.calls, [])
        self.assertIn("status", settle(client.callRemote(Status), pump))

    def test_builtInStartTLSNotOffered(self) -> None:
        server = ControlProtocol(FakeHost())
        self.assertIsNone(server.locateResponder(b"StartTLS"))
        self.assertIsNotNone(server.locateResponder(b"Status"))


class DisconnectTests(SynchronousTestCase):
    """
    Whatever is not a well-formed, bounded command ends the connection;
    nothing reaches the host and nothing raises.
    """

    def assertDropped(
        self, data: bytes, *, host: FakeHost | None = None
    ) -> CredentialedStringTransport:
        host = FakeHost() if host is None else host
        server, transport = serverOnStrings(host)
        with capturedLogs() as events:
            server.dataReceived(data)
        self.assertTrue(transport.disconnected, "connection not aborted")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(host.calls, [])
        self.assertTrue(
            any("Dropped the control connection" in e["log_format"] for e in events)
        )
        return transport

    def assertAnswered(self, data: bytes) -> bytes:
        host = FakeHost()
        server, transport = serverOnStrings(host)
        server.dataReceived(data)
        self.assertFalse(transport.disconnected)
        self.assertEqual(host.calls, [("statusSnapshot", None)])
        answer: bytes = transport.value()
        return answer

    def test_boxAtLimitAnswered(self) -> None:
        wire = statusBox(pad=b"")
        wire[b"pad"] = b"x" * (MAX_BOX_BYTES - len(wire.serialize()))
        data = wire.serialize()
        self.assertEqual(len(data), MAX_BOX_BYTES)
        self.assertNotEqual(self.assertAnswered(data), b"")

    def test_boxOverLimitDropped(self) -> None:
        wire = statusBox(pad=b"")
        wire[b"pad"] = b"x" * (MAX_BOX_BYTES - len(wire.serialize()) + 1)
        self.assertDropped(wire.serialize())

    def test_keyPushingOverLimitDropped(self) -> None:
        """
        Keys count towards the limit too.
        """
        wire = statusBox(pad=b"")
        wire[b"pad"] = b"x" * (MAX_BOX_BYTES - len(wire.serialize()))
        data = wire.serialize()[:-2] + b"\x00\x08zzzzzzzz"
        self.assertDropped(data)

    def test_manyValuesOverLimitDropped(self) -> None:
        """
        The limit is on the whole box, not on each value.
        """
        wire = statusBox(a=b"x" * 30000, b=b"y" * 30000, c=b"z" * 30000)
        self.assertDropped(wire.serialize())

    def test_valueRefusedBeforeBuffering(self) -> None:
        """
        A value that cannot fit is refused from its length prefix alone.
        """
        self.assertDropped(b"\x00\x03pad\xff\xff")

    def test_keysAtLimitAnswered(self) -> None:
        wire = statusBox()
        for index in range(MAX_BOX_KEYS - len(wire)):
            wire[b"k%d" % (index,)] = b"v"
        self.assertEqual(len(wire), MAX_BOX_KEYS)
        self.assertAnswered(wire.serialize())

    def test_tooManyKeysDropped(self) -> None:
        wire = statusBox()
        for index in range(MAX_BOX_KEYS + 1 - len(wire)):
            wire[b"k%d" % (index,)] = b"v"
        self.assertDropped(wire.serialize())

    def test_dropIgnoresRestOfChunk(self) -> None:
        """
        A valid command after the offending box, in the same read, is not
        answered.
        """
        wire = statusBox(a=b"x" * 40000, b=b"y" * 30000)
        self.assertDropped(wire.serialize() + statusBox().serialize())

    def test_keyTooLongDropped(self) -> None:
        self.assertDropped(b"\x01\x00" + b"k" * 256)

    def test_answerBoxDropped(self) -> None:
        self.assertDropped(box(_answer=b"1", status=b"{}"))

    def test_errorBoxDropped(self) -> None:
        self.assertDropped(box(_error=b"1", _error_code=b"X", _error_description=b"no"))

    def test_emptyBoxDropped(self) -> None:
        self.assertDropped(b"\x00\x00")

    def test_commandWithoutAskDropped(self) -> None:
        self.assertDropped(box(_command=b"Status"))

    def test_malformedArgumentDropped(self) -> None:
        """
        Arguments that do not parse never reach the host (nor log an
        unhandled error).
        """
        self.assertDropped(box(_command=b"Upgrade", _ask=b"1", strategy=b"\xff\xfe"))

    def test_descriptorClosedAndDropped(self) -> None:
        host = FakeHost()
        server, transport = serverOnStrings(host)
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, writeEnd)
        server.fileDescriptorReceived(readEnd)
        self.assertRaises(OSError, os.fstat, readEnd)
        self.assertTrue(transport.disconnected)

    def test_nothingAfterDrop(self) -> None:
        host = FakeHost()
        server, transport = serverOnStrings(host)
        server.dataReceived(b"\x00\x00")
        server.dataReceived(statusBox().serialize())
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(host.calls, [])

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_garbageBytes(self, chunks: list[bytes]) -> None:
        """
        Random bytes, in random chunks, never raise and never reach the
        host.
        """
        host = FakeHost()
        server, transport = serverOnStrings(host)
        for chunk in chunks:
            server.dataReceived(chunk)
        self.assertEqual(host.calls, [])

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        st.lists(
            st.dictionaries(
                st.sampled_from(
                    [
                        b"_command",
                        b"_ask",
                        b"_answer",
                        b"_error",
                        b"_error_code",
                        b"_error_description",
                        b"strategy",
                        b"status",
                        b"x",
                    ]
                ),
                st.one_of(
                    st.sampled_from([b"Status", b"Upgrade", b"StartTLS", b"1", b""]),
                    st.binary(max_size=40),
                ),
                max_size=6,
            ),
            max_size=5,
        )
    )
    def test_garbageBoxes(self, boxes: list[dict[bytes, bytes]]) -> None:
        """
        Well-framed boxes with random content never raise, and the host sees
        at most the commands that were valid.
        """
        host = FakeHost(failWith=MigrationInProgress("busy"))
        server, transport = serverOnStrings(host)
        for each in boxes:
            server.dataReceived(amp.AmpBox(each).serialize())
        for call, argument in host.calls:
            self.assertIn(call, ("statusSnapshot", "requestUpgrade"))


class ConnectionLogTests(SynchronousTestCase):
    """
    Control connections coming and going are logged at debug level only: a
    monitoring loop asking for the status every second must not flood the
    host's log.
    """

    def test_debugOnly(self) -> None:
        with capturedLogs() as events:
            server, transport = serverOnStrings(FakeHost())
            server.dataReceived(statusBox().serialize())
            server.connectionLost(Failure(ConnectionDone()))
        self.assertIn(b"status", transport.value())
        levels = [(e["log_level"], e["log_format"]) for e in events]
        self.assertEqual(
            levels,
            [
                (LogLevel.debug, "Control connection opened"),
                (LogLevel.debug, "Control connection closed: {reason}"),
            ],
        )
        self.assertIsNone(server.transport)


class PeerCredentialTests(SynchronousTestCase):
    """
    Only this process's user and root may use the control channel.
    """

    #: the uid the host's check sees as its own in these tests: neither
    #: root nor the uid the tests run as (root, in CI), so that a check that
    #: let any uid equal to the real one pass, or that refused root, fails
    hostUid = 4000

    def setUp(self) -> None:
        self.patch(_server.os, "getuid", lambda: self.hostUid)

    def accepts(self, uid: int) -> bool:
        server, transport = serverOnStrings(FakeHost(), FakeHandle(uid=uid))
        return not transport.disconnected

    def test_otherUserRejected(self) -> None:
        host = FakeHost()
        otherUid = self.hostUid + 1
        with capturedLogs() as events:
            server, transport = serverOnStrings(host, FakeHandle(pid=777, uid=otherUid))
        self.assertTrue(transport.disconnected)
        server.dataReceived(statusBox().serialize())
        self.assertEqual(transport.value(), b"")
        self.assertEqual(host.calls, [])
        [warning] = [e for e in events if "Rejected" in e["log_format"]]
        self.assertEqual((warning["pid"], warning["uid"]), (777, otherUid))
        self.assertEqual(warning["allowed"], self.hostUid)

    def test_sameUserAccepted(self) -> None:
        server, transport = serverOnStrings(FakeHost(), FakeHandle(uid=self.hostUid))
        self.assertFalse(transport.disconnected)
        self.assertEqual(server.peer, (4321, self.hostUid, os.getgid()))

    def test_rootAccepted(self) -> None:
        self.assertTrue(self.accepts(0))

    def test_onlyThoseTwo(self) -> None:
        """
        The uid the tests really run as, and its neighbours, are refused
        when the host runs as another user.
        """
        for uid in {os.geteuid(), os.getuid() if os.getuid() else 1, 1, 65534}:
            if uid not in (self.hostUid, 0):
                self.assertFalse(self.accepts(uid), uid)

    def test_rootHostAcceptsOnlyRoot(self) -> None:
        """
        A host running as root accepts root only.
        """
        self.hostUid = 0
        self.assertTrue(self.accepts(0))
        self.assertFalse(self.accepts(4000))

    def test_unreadableCredentialsRejected(self) -> None:
        host = FakeHost()
        server = ControlProtocol(host)
        transport = StringTransport()
        server.makeConnection(transport)
        self.assertTrue(transport.disconnected)


class PeerCredentialReadTests(SynchronousTestCase):
    """
    The credentials come from the kernel.
    """

    def test_realSocketCredentials(self) -> None:
        left, right = socket.socketpair(socket.AF_UNIX)
        self.addCleanup(left.close)
        self.addCleanup(right.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return left

        self.assertEqual(
            _peerCredentials(Transport()), (os.getpid(), os.getuid(), os.getgid())
        )


class EncodeTests(SynchronousTestCase):
    """
    The JSON answers stay below L{MAX_REPLY_BYTES}.
    """

    def test_smallReportUnchanged(self) -> None:
        report = makeReport(notes=["fine"])
        self.assertEqual(json.loads(encodeReport(report)), report)

    def test_longSuccessorLogKeepsLatestLines(self) -> None:
        lines = ["line %05d %s" % (index, "x" * 80) for index in range(2000)]
        text = encodeReport(makeReport(successorLog=lines, notes=["kept"]))
        self.assertLess(len(text.encode("utf-8")), MAX_REPLY_BYTES)
        bounded = json.loads(text)
        self.assertEqual(bounded["successorLog"][-1], lines[-1])
        self.assertLess(len(bounded["successorLog"]), len(lines))
        self.assertEqual(bounded["notes"][0], "kept")
        self.assertIn("truncated", bounded["notes"][-1])
        self.assertEqual(bounded["outcome"], "success")

    def test_manyNotes(self) -> None:
        notes = ["note %d %s" % (index, "n" * 500) for index in range(500)]
        bounded = json.loads(encodeReport(makeReport(notes=notes, successorLog=["a"])))
        self.assertEqual(bounded["successorLog"], [])
        self.assertEqual(bounded["notes"][0], notes[0])
        self.assertIn("truncated", bounded["notes"][-1])

    def test_hugeOtherFieldsGiveSummary(self) -> None:
        report = makeReport(
            outcome="rolled-back",
            reason="r" * 100000,
            listeners=[{"key": "k" * 100, "moved": 1}] * 2000,
        )
        text = encodeReport(report)
        self.assertLess(len(text.encode("utf-8")), MAX_REPLY_BYTES)
        bounded = json.loads(text)
        self.assertEqual(bounded["outcome"], "rolled-back")
        self.assertEqual(bounded["fromGeneration"], 3)
        self.assertTrue(bounded["reason"].startswith("rrr"))
        self.assertIn("truncated", bounded["notes"][-1])

    def test_nonASCIICountedInBytes(self) -> None:
        lines = ["\u00e9" * 1000] * 200
        text = encodeReport(makeReport(successorLog=lines))
        self.assertLess(len(text.encode("utf-8")), MAX_REPLY_BYTES)

    def test_smallStatusUnchanged(self) -> None:
        self.assertEqual(json.loads(encodeStatus(SNAPSHOT)), SNAPSHOT)

    def test_hugeStatus(self) -> None:
        status = dict(SNAPSHOT)
        status["lastReport"] = makeReport(successorLog=["x" * 1000] * 100)
        status["listeners"] = [
            {"key": "tcp:%d" % (port,), "address": "a" * 50, "connections": 1}
            for port in range(2000)
        ]
        text = encodeStatus(status)
        self.assertLess(len(text.encode("utf-8")), MAX_REPLY_BYTES)
        bounded = json.loads(text)
        self.assertTrue(bounded["truncated"])
        self.assertEqual(bounded["generation"], 3)
        self.assertEqual(bounded["lastReport"]["outcome"], "success")
        self.assertGreater(len(bounded["listeners"]), 0)


def shortTemporaryDirectory(case: SynchronousTestCase) -> str:
    """
    A new directory, removed after the test, with a path short enough for
    Unix socket addresses (trial's own temporary paths are too long).
    """
    directory = tempfile.mkdtemp(prefix="migrate-control-")
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


class BindControlSocketTests(SynchronousTestCase):
    """
    L{bindControlSocket} with real Unix sockets in a temporary directory.
    """

    def setUp(self) -> None:
        self.directory = shortTemporaryDirectory(self)
        self.path = os.path.join(self.directory, "control.sock")

    def bind(self, **kwargs: Any) -> socket.socket:
        sock = bindControlSocket(self.path, **kwargs)
        self.addCleanup(sock.close)
        return sock

    def test_mode0600WhateverTheUmask(self) -> None:
        previous = os.umask(0)
        try:
            self.bind()
            self.assertEqual(os.umask(0), 0, "umask not restored")
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))

    def test_modeFromTheFirstInstant(self) -> None:
        """
        The socket file is never more open than C{mode}, even between
        C{bind()} and the C{chmod()} that follows.
        """
        modes: list[int] = []

        class RecordingSocket(socket.socket):
            def bind(self, address: Any) -> None:
                super().bind(address)
                modes.append(stat.S_IMODE(os.stat(address).st_mode))

        self.patch(socket, "socket", RecordingSocket)
        previous = os.umask(0)
        try:
            self.bind()
        finally:
            os.umask(previous)
        self.assertEqual(modes, [0o600])

    def test_listeningAndNonBlocking(self) -> None:
        sock = self.bind()
        self.assertFalse(sock.getblocking())
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        self.assertEqual(sock.getsockname(), self.path)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(self.path)

    def test_relativePathBoundAbsolute(self) -> None:
        previous = os.getcwd()
        os.chdir(self.directory)
        try:
            sock = bindControlSocket("control.sock")
        finally:
            os.chdir(previous)
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockname(), os.path.realpath(self.path))

    def test_staleSocketReplaced(self) -> None:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        os.chmod(self.path, 0o755)
        self.bind()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(self.path)

    def test_liveSocketInUse(self) -> None:
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(5)
        before = os.stat(self.path)
        error = self.assertRaises(ControlSocketInUse, bindControlSocket, self.path)
        self.assertEqual(error.path, self.path)
        self.assertIn("in use", str(error))
        after = os.stat(self.path)
        self.assertEqual((after.st_ino, after.st_mode), (before.st_ino, before.st_mode))
        # Still the live socket: it accepts.
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(self.path)

    def test_regularFileUntouched(self) -> None:
        with open(self.path, "w") as f:
            f.write("precious")
        error = self.assertRaises(ControlSocketError, bindControlSocket, self.path)
        self.assertNotIsInstance(error, ControlSocketInUse)
        self.assertIn("not a socket", str(error))
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    def test_symlinkUntouched(self) -> None:
        target = os.path.join(self.directory, "elsewhere.sock")
        os.symlink(target, self.path)
        self.assertRaises(ControlSocketError, bindControlSocket, self.path)
        self.assertTrue(os.path.islink(self.path))

    def test_missingDirectory(self) -> None:
        path = os.path.join(self.directory, "missing", "control.sock")
        error = self.assertRaises(ControlSocketError, bindControlSocket, path)
        self.assertIn("does not exist", str(error))

    def test_otherMode(self) -> None:
        self.bind(mode=0o660)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)


class ListenControlTests(TestCase):
    """
    L{listenControl} and L{adoptControl} on the real reactor.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.path = os.path.join(shortTemporaryDirectory(self), "c.sock")

    @inlineCallbacks
    def statusOver(self, path: str) -> Any:
        client = yield connectProtocol(
            UNIXClientEndpoint(self.reactor, path), amp.AMP()
        )
        try:
            answer = yield client.callRemote(Status).addTimeout(10, self.reactor)
        finally:
            client.transport.loseConnection()
        return json.loads(answer["status"])

    @inlineCallbacks
    def test_listenKeeps0600AndAnswers(self):
        port = listenControl(self.reactor, self.path, FakeHost())
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        status = yield self.statusOver(self.path)
        self.assertEqual(status, SNAPSHOT)

    @inlineCallbacks
    def test_adoptInherited(self):
        sock = bindControlSocket(self.path)
        fd = os.dup(sock.fileno())
        sock.close()
        port = adoptControl(self.reactor, fd, FakeHost())
        self.addCleanup(port.stopListening)
        self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        status = yield self.statusOver(self.path)
        self.assertEqual(status["generation"], 3)

    def test_secondHostRefused(self) -> None:
        port = listenControl(self.reactor, self.path, FakeHost())
        self.addCleanup(port.stopListening)
        self.assertRaises(
            ControlSocketInUse, listenControl, self.reactor, self.path, FakeHost()
        )
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
