"""
Tests for L{migrate._systemd}: the C{sd_notify} messages and who sends them,
and socket activation across generations; the integration tests play
systemd for real C{twistd migrate-host} processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import textwrap
import time
from typing import Any

from attrs import frozen
from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import _SystemdParser
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from zope.interface import implementer

from .. import tap
from .._handoff._listeners import releaseListener
from .._host._service import MigrationHost
from .._report import MigrationOutcome, MigrationPhase, MigrationReport
from .._systemd import (
    SystemdNotifier,
    activatedEndpoint,
    checkActivatedListener,
    inheritsListeners,
    isActivated,
    mainPidMessage,
    notifierFromEnvironment,
    notifyAddress,
    readyMessage,
    reloadingMessage,
    statusLine,
    statusMessage,
    successorEnvironment,
)
from ..testing import FakeStrategy
from ._fakes import HostReactor
from ._hostprocess import (
    HostProcess,
    connectLineClient,
    fields,
    pidAlive,
    waitFor,
    writeModule,
)
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2


def parse(message: bytes) -> dict[str, str]:
    """
    The assignments of one notification, as systemd reads them.
    """
    text = message.decode("utf-8")
    assert text.endswith("\n"), text
    return dict(line.split("=", 1) for line in text.splitlines())


class MessageTests(SynchronousTestCase):
    """
    The notification messages.
    """

    def test_ready(self) -> None:
        """
        C{READY=1} names the serving process as the main one and says how
        it is.
        """
        self.assertEqual(
            readyMessage(4242, "generation 1"),
            b"READY=1\nMAINPID=4242\nSTATUS=generation 1\n",
        )

    def test_reloading(self) -> None:
        """
        C{RELOADING=1} carries C{MONOTONIC_USEC} in decimal, as
        C{Type=notify-reload} requires.
        """
        self.assertEqual(
            parse(reloadingMessage(123456789012, "migrating")),
            {"RELOADING": "1", "MONOTONIC_USEC": "123456789012", "STATUS": "migrating"},
        )

    def test_mainPid(self) -> None:
        """
        C{MAINPID=} alone, for the process that hands its service on.
        """
        self.assertEqual(mainPidMessage(77), b"MAINPID=77\n")

    def test_statusIsOneLine(self) -> None:
        """
        A status with newlines cannot start another assignment: whitespace
        runs become single spaces.
        """
        self.assertEqual(
            statusMessage("one\nREADY=1\n  two\tthree"),
            b"STATUS=one READY=1 two three\n",
        )

    def test_statusIsBounded(self) -> None:
        """
        A very long status is cut, well under systemd's datagram limit.
        """
        message = statusMessage("x" * 10000)
        self.assertLess(len(message), 1100)
        self.assertTrue(message.endswith(b"...\n"))


class StatusLineTests(SynchronousTestCase):
    """
    L{statusLine} describes a host in one line.
    """

    def test_serving(self) -> None:
        """
        Generation, pid and connections; nothing draining.
        """
        self.assertEqual(
            statusLine(
                {
                    "generation": 1,
                    "pid": 10,
                    "connections": 1,
                    "draining": [],
                    "phase": "idle",
                }
            ),
            "generation 1 in pid 10, 1 connection; draining: none",
        )

    def test_drainingAndMigrating(self) -> None:
        """
        Every draining generation, and the phase of a migration in progress.
        """
        self.assertEqual(
            statusLine(
                {
                    "generation": 3,
                    "pid": 30,
                    "connections": 17,
                    "phase": "handing-off",
                    "draining": [
                        {"generation": 1, "pid": 10, "connections": 1},
                        {"generation": 2, "pid": 20, "connections": 0},
                    ],
                }
            ),
            "generation 3 in pid 30, 17 connections; draining: generation 1 in "
            "pid 10, 1 connection, generation 2 in pid 20, 0 connections; "
            "migrating: handing-off",
        )


class NotifyAddressTests(SynchronousTestCase):
    """
    L{notifyAddress} reads C{$NOTIFY_SOCKET}.
    """

    def test_path(self) -> None:
        """
        An absolute path is used as it is.
        """
        self.assertEqual(notifyAddress("/run/systemd/notify"), b"/run/systemd/notify")

    def test_abstract(self) -> None:
        """
        C{@NAME} names a socket in the abstract namespace: a leading NUL.
        """
        self.assertEqual(
            notifyAddress("@/org/systemd/notify/1"), b"\0/org/systemd/notify/1"
        )

    def test_refused(self) -> None:
        """
        Relative paths, a bare C{@} and other schemes (C{vsock:}) are
        refused.
        """
        for value in ["notify", "", "@", "vsock:2:1234"]:
            self.assertRaises(ValueError, notifyAddress, value)


class FakeSender:
    """
    Records datagrams instead of sending them, or fails as told.

    @ivar sent: C{(data, address)} for every datagram sent.
    @ivar error: raised by C{sendto} while set.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.error: Exception | None = None
        self.closed = False

    def sendto(self, data: bytes, address: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append((data, address))
        return len(data)

    def close(self) -> None:
        self.closed = True


class FakeHost:
    """
    The little of a L{MigrationHost} the notifier reads.
    """

    def __init__(self, pid: int = 100) -> None:
        self.reactor = HostReactor()
        self.pid = pid
        self.serving = True
        self.snapshot = {
            "pid": pid,
            "generation": 1,
            "connections": 0,
            "draining": [],
            "phase": "idle",
        }

    def statusSnapshot(self) -> dict[str, Any]:
        return dict(self.snapshot)


class NotifierTests(SynchronousTestCase):
    """
    L{SystemdNotifier} as a lifecycle observer, with a fake host.
    """

    def setUp(self) -> None:
        self.sender = FakeSender()
        self.clock = [5000000]
        self.notifier = SystemdNotifier(
            b"\0notify",
            monotonicMicroseconds=lambda: self.clock[0],
            socketFactory=lambda: self.sender,
        )
        self.host = FakeHost()

    def messages(self) -> list[dict[str, str]]:
        return [parse(data) for data, address in self.sender.sent]

    def test_servingSaysReady(self) -> None:
        """
        Serving: C{READY=1}, C{MAINPID=} this process, C{STATUS=}, to the
        configured address.
        """
        self.notifier.serving(self.host)
        self.assertEqual(
            self.messages(),
            [
                {
                    "READY": "1",
                    "MAINPID": "100",
                    "STATUS": statusLine(self.host.snapshot),
                }
            ],
        )
        self.assertEqual(self.sender.sent[0][1], b"\0notify")

    def test_migrationStartedSaysReloading(self) -> None:
        """
        A migration starting: C{RELOADING=1} with the monotonic clock.
        """
        self.notifier.serving(self.host)
        self.host.snapshot["phase"] = "spawning"
        self.notifier.migrationStarted(self.host)
        self.assertEqual(
            self.messages()[-1],
            {
                "RELOADING": "1",
                "MONOTONIC_USEC": "5000000",
                "STATUS": statusLine(self.host.snapshot),
            },
        )

    def test_reloadJoinedSaysReloadingNow(self) -> None:
        """
        A reload asked for during a migration: C{RELOADING=1} again with
        the current monotonic clock (systemd ignores one older than its
        signal), then the running migration's C{READY=1} ends both.
        """
        self.notifier.serving(self.host)
        self.notifier.migrationStarted(self.host)
        self.clock[0] = 7000000
        self.notifier.reloadJoined(self.host)
        self.notifier.migrationEnded(self.host, None)
        messages = self.messages()
        self.assertEqual(
            [each.get("MONOTONIC_USEC") for each in messages],
            [None, "5000000", "7000000", None],
        )
        self.assertEqual(messages[-1]["READY"], "1")

    def test_rolledBackSaysReadyAgain(self) -> None:
        """
        A migration that ended with this process still serving: C{READY=1}
        again, or systemd would wait for the reload to end.
        """
        self.notifier.serving(self.host)
        self.notifier.migrationStarted(self.host)
        self.notifier.migrationEnded(self.host, None)
        self.assertEqual(
            [sorted(each) for each in self.messages()],
            [
                ["MAINPID", "READY", "STATUS"],
                ["MONOTONIC_USEC", "RELOADING", "STATUS"],
                ["MAINPID", "READY", "STATUS"],
            ],
        )

    def test_handedOnNamesNewMainThenSilence(self) -> None:
        """
        Handed on: C{MAINPID=} the new process, and nothing more from this
        one, neither C{READY=1} at the end of the migration nor status
        refreshes (the new process speaks for the service).
        """
        self.notifier.serving(self.host)
        self.notifier.migrationStarted(self.host)
        del self.sender.sent[:]
        self.notifier.handedOn(self.host, 4321)
        self.notifier.migrationEnded(self.host, None)
        self.host.snapshot["connections"] = 5
        self.host.reactor.advance(60)
        self.assertEqual(self.messages(), [{"MAINPID": "4321"}])
        self.assertEqual(self.host.reactor.getDelayedCalls(), [])

    def test_statusRefreshedWhenChanged(self) -> None:
        """
        While serving, the status is said once more at the first check (a
        previous generation may have overwritten it), then a changed status
        line is sent at the next check, an unchanged one is not.
        """
        interval = 2.0
        self.assertEqual(self.notifier.statusInterval, interval)
        self.notifier.serving(self.host)
        self.host.reactor.advance(interval)
        self.assertEqual(
            self.messages()[1:], [{"STATUS": statusLine(self.host.snapshot)}]
        )
        self.host.reactor.advance(interval)
        self.assertEqual(len(self.sender.sent), 2)
        self.host.snapshot["connections"] = 3
        self.host.reactor.advance(interval)
        self.assertEqual(
            self.messages()[-1], {"STATUS": statusLine(self.host.snapshot)}
        )
        self.host.reactor.advance(interval * 3)
        self.assertEqual(len(self.sender.sent), 3)

    def test_noRefreshWithoutInterval(self) -> None:
        """
        With no status interval, nothing is scheduled.
        """
        self.notifier.statusInterval = None
        self.notifier.serving(self.host)
        self.assertEqual(self.host.reactor.getDelayedCalls(), [])

    def test_failureLoggedOnceNeverRaised(self) -> None:
        """
        A failing send is logged once, not raised; once sending works again
        a later failure is logged again.
        """
        self.sender.error = ConnectionRefusedError(111, "Connection refused")
        with capturedLogs() as events:
            self.notifier.serving(self.host)
            self.notifier.migrationStarted(self.host)
            self.notifier.migrationEnded(self.host, None)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("Connection refused", warnings[0]["error"])
        self.sender.error = None
        self.assertTrue(self.notifier.send(statusMessage("back")))
        self.sender.error = OSError(11, "Resource temporarily unavailable")
        with capturedLogs() as events:
            self.assertFalse(self.notifier.send(statusMessage("again")))
            self.assertFalse(self.notifier.send(statusMessage("again")))
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 1)

    def test_socketCreationFailureLogged(self) -> None:
        """
        A socket that cannot be made is a failure to send like any other.
        """

        def noSocket() -> Any:
            raise OSError(24, "Too many open files")

        notifier = SystemdNotifier(b"/nowhere", socketFactory=noSocket)
        with capturedLogs() as events:
            notifier.serving(self.host)
        self.assertEqual(
            [e["error"] for e in events if e["log_level"] == LogLevel.warn],
            ["[Errno 24] Too many open files"],
        )

    def test_close(self) -> None:
        """
        C{close} stops the status refresh and closes the socket.
        """
        self.notifier.serving(self.host)
        self.notifier.close()
        self.assertTrue(self.sender.closed)
        self.assertEqual(self.host.reactor.getDelayedCalls(), [])


class _Factory(Factory):
    protocol = Protocol


class HostObserverTests(SynchronousTestCase):
    """
    L{SystemdNotifier} observing a real L{MigrationHost} (with a fake
    strategy and reactor): the host's lifecycle produces the messages in
    the order systemd needs.
    """

    def setUp(self) -> None:
        self.sender = FakeSender()
        self.strategy = FakeStrategy()
        self.host = MigrationHost(
            HostReactor(),
            _Factory(),
            [],
            self.strategy,
            controlPath=None,
            installSignalHandlers=False,
        )
        self.host.addObserver(
            SystemdNotifier(
                b"\0n",
                monotonicMicroseconds=lambda: 42,
                socketFactory=lambda: self.sender,
            )
        )
        self.host.startService()

    def kinds(self) -> list[list[str]]:
        return [
            sorted(key for key in parse(data) if key != "STATUS")
            for data, address in self.sender.sent
        ]

    def report(self, outcome: MigrationOutcome, newPid: int | None) -> MigrationReport:
        return MigrationReport(
            strategy="fake",
            outcome=outcome,
            fromGeneration=1,
            oldPid=self.host.pid,
            toGeneration=2 if newPid else None,
            newPid=newPid,
        )

    def test_committed(self) -> None:
        """
        Serving, a migration that commits: C{READY}, C{RELOADING}, then only
        C{MAINPID=} the new process.
        """
        d = self.host.requestUpgrade(None, lambda line: None)
        migration = self.strategy.migrations[0]
        self.assertEqual(self.host.phase, MigrationPhase.spawning)
        self.host.handOn(lambda entries: None, 4321)
        migration.result.callback(self.report(MigrationOutcome.success, 4321))
        self.successResultOf(d)
        self.assertEqual(
            self.kinds(),
            [["MAINPID", "READY"], ["MONOTONIC_USEC", "RELOADING"], ["MAINPID"]],
        )
        self.assertEqual(parse(self.sender.sent[-1][0]), {"MAINPID": "4321"})
        self.assertIn("migrating: spawning", parse(self.sender.sent[1][0])["STATUS"])

    def test_rolledBack(self) -> None:
        """
        A migration that rolls back: C{READY=1} from this process again.
        """
        d = self.host.requestUpgrade(None, lambda line: None)
        self.strategy.migrations[0].result.callback(
            self.report(MigrationOutcome.rolledBack, None)
        )
        self.successResultOf(d)
        self.assertEqual(
            self.kinds(),
            [
                ["MAINPID", "READY"],
                ["MONOTONIC_USEC", "RELOADING"],
                ["MAINPID", "READY"],
            ],
        )
        self.assertEqual(
            parse(self.sender.sent[-1][0])["STATUS"],
            "generation 1 in pid {}, 0 connections; draining: none".format(
                self.host.pid
            ),
        )

    def test_crashed(self) -> None:
        """
        A strategy that fails outright still ends the reload.
        """
        d = self.host.requestUpgrade(None, lambda line: None)
        self.strategy.migrations[0].result.errback(RuntimeError("boom"))
        self.failureResultOf(d, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.kinds()[-1], ["MAINPID", "READY"])


class EnvironmentTests(SynchronousTestCase):
    """
    Which environment says what.
    """

    def test_notifierFromEnvironment(self) -> None:
        """
        C{NOTIFY_SOCKET} set: a notifier for it; unset or empty: none.
        """
        notifier = notifierFromEnvironment({"NOTIFY_SOCKET": "@sd"})
        assert notifier is not None
        self.assertEqual(notifier.address, b"\0sd")
        self.assertIsNone(notifierFromEnvironment({}))
        self.assertIsNone(notifierFromEnvironment({"NOTIFY_SOCKET": ""}))

    def test_unusableNotifySocketLogged(self) -> None:
        """
        An address that cannot be used is logged; there is no notifier.
        """
        with capturedLogs() as events:
            self.assertIsNone(notifierFromEnvironment({"NOTIFY_SOCKET": "vsock:2:9"}))
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 1)

    def test_successorEnvironment(self) -> None:
        """
        The activation variables are not inherited; C{NOTIFY_SOCKET} and the
        rest are.  The given environment is left alone.
        """
        environ = {
            "LISTEN_FDS": "1",
            "LISTEN_PID": "10",
            "LISTEN_FDNAMES": "web",
            "NOTIFY_SOCKET": "/run/systemd/notify",
            "PATH": "/bin",
        }
        self.assertEqual(
            successorEnvironment(environ),
            {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"},
        )
        self.assertEqual(len(environ), 5)

    def test_inheritsListeners(self) -> None:
        """
        Successors, re-executed images and their pre-flight checks inherit
        their listeners; a process systemd started does not.
        """
        self.assertFalse(inheritsListeners({"LISTEN_FDS": "1"}))
        for name in [
            "MIGRATE_HANDOFF_FD",
            "MIGRATE_REEXEC_STATE_FD",
            "MIGRATE_REEXEC_PREFLIGHT",
        ]:
            self.assertTrue(inheritsListeners({name: "3"}), name)

    def test_buildHostRegistersNotifier(self) -> None:
        """
        L{tap.buildHost} tells a L{SystemdNotifier} about the host when
        C{NOTIFY_SOCKET} is set, and nothing otherwise.
        """
        for environ, expected in [({"NOTIFY_SOCKET": "@sd"}, 1), ({}, 0)]:
            self.patch(os, "environ", environ)
            options = tap.Options()
            options.parseOptions(
                ["--control", "/nonexistent/c.sock", "--listen", "tcp:0"]
            )
            host = tap.buildHost(HostReactor(), options)
            notifiers = [o for o in host.observers if isinstance(o, SystemdNotifier)]
            self.assertEqual(len(notifiers), expected, environ)


class ActivatedSocketTests(SynchronousTestCase):
    """
    C{systemd:} listeners, with Twisted's view of C{LISTEN_FDS} replaced by
    real (unconnected) sockets this test makes.
    """

    def passed(self, *sockets: socket.socket, names: tuple[str, ...] = ()) -> None:
        descriptors = [each.fileno() for each in sockets]
        self.patch(
            _SystemdParser,
            "_sddaemon",
            ListenFDs(
                descriptors, names or tuple("fd%d" % i for i in range(len(sockets)))
            ),
        )

    def listening(self, family: int = socket.AF_INET) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        if family == socket.AF_INET:
            sock.bind(("127.0.0.1", 0))
            sock.listen(5)
        return sock

    def test_notActivated(self) -> None:
        """
        Other descriptions are left to the caller.
        """
        self.assertFalse(checkActivatedListener("tcp:8000", inheriting=False))
        self.assertFalse(isActivated("tcp:8000"))
        self.assertTrue(isActivated("systemd:domain=INET:index=0"))

    def test_passed(self) -> None:
        """
        A listening socket systemd passed, by index or by name, checks.
        """
        self.passed(self.listening(), names=("web",))
        self.assertTrue(
            checkActivatedListener("systemd:domain=INET:index=0", inheriting=False)
        )
        self.assertTrue(
            checkActivatedListener("systemd:domain=INET:name=web", inheriting=False)
        )

    def test_notPassed(self) -> None:
        """
        A socket systemd did not pass is a clear error where it should have.
        """
        self.passed(self.listening())
        for description in [
            "systemd:domain=INET:index=1",
            "systemd:domain=INET:name=x",
        ]:
            error = self.assertRaises(
                ValueError, checkActivatedListener, description, inheriting=False
            )
            self.assertIn("systemd passed no socket", str(error))

    def test_inheritingLooksNothingUp(self) -> None:
        """
        In a successor nothing is looked up: the old LISTEN_PID names
        another process, and descriptor 3 is the hand-off socket.
        """
        self.passed()
        self.assertTrue(
            checkActivatedListener("systemd:domain=INET:index=0", inheriting=True)
        )

    def test_wrongSocket(self) -> None:
        """
        A socket of another family, or one that does not listen (a socket
        unit with C{Accept=yes}), is refused.
        """
        self.passed(self.listening(), self.listening(socket.AF_UNIX))
        error = self.assertRaises(
            ValueError,
            checkActivatedListener,
            "systemd:domain=UNIX:index=0",
            inheriting=False,
        )
        self.assertIn("AF_INET", str(error))
        error = self.assertRaises(
            ValueError,
            checkActivatedListener,
            "systemd:domain=UNIX:index=1",
            inheriting=False,
        )
        self.assertIn("not a listening stream socket", str(error))

    def test_optionsInSuccessor(self) -> None:
        """
        A successor's C{--listen systemd:...} parses although systemd passed
        it nothing (Twisted's own parser would fail with L{IndexError}).
        """
        self.passed()
        self.patch(os, "environ", {"MIGRATE_HANDOFF_FD": "3"})
        options = tap.Options()
        options.parseOptions(
            [
                "--control",
                "/nonexistent/c.sock",
                "--listen",
                "systemd:domain=INET:index=0",
            ]
        )
        self.assertEqual(options["listen"], ["systemd:domain=INET:index=0"])

    def test_optionsWithoutSocket(self) -> None:
        """
        In the first process, a missing socket is a usage error naming it.
        """
        from twisted.python.usage import UsageError

        self.passed()
        self.patch(os, "environ", {})
        error = self.assertRaises(
            UsageError,
            tap.Options().parseOptions,
            [
                "--control",
                "/nonexistent/c.sock",
                "--listen",
                "systemd:domain=INET:index=0",
            ],
        )
        self.assertIn("systemd passed no socket", str(error))


class ActivatedUnixSocketTests(TestCase):
    """
    A Unix socket systemd passed keeps its mode while served, and survives
    the host stopping (systemd keeps it for the next activation).  Uses the
    real reactor and a real Unix socket.
    """

    def test_hostLeavesSocketToSystemd(self) -> None:
        """
        A host serving a C{systemd:domain=UNIX} listener leaves the socket's
        mode alone, and stopping it neither shuts the socket down nor
        removes its path.
        """
        directory = tempfile.mkdtemp(prefix="migrate-sd-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "app.sock")
        systemdCopy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(systemdCopy.close)
        systemdCopy.bind(path)
        os.chmod(path, 0o600)
        systemdCopy.listen(5)
        passed = os.dup(systemdCopy.fileno())
        self.addCleanup(lambda: _closeQuietly(passed))
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([passed], ("app",)))

        host = MigrationHost(
            _globalReactor,
            _Factory(),
            ["systemd:domain=UNIX:name=app"],
            FakeStrategy(),
            controlPath=None,
            installSignalHandlers=False,
        )
        host.privilegedStartService()
        host.startService()
        port: Any = host.listeners["systemd:domain=UNIX:name=app"].port
        self.assertIsNotNone(port)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        d = host.stopService()
        self.assertIsNone(d)
        self.assertFalse(port.connected)
        # The path is still there and systemd's copy still takes connections.
        self.assertTrue(os.path.exists(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            accepted, _ = systemdCopy.accept()
            accepted.close()

    def test_activatedEndpointOnce(self) -> None:
        """
        An activated endpoint adopts its socket once; C{None} for other
        descriptions.
        """
        self.assertIsNone(activatedEndpoint(_globalReactor, "tcp:0"))
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        self.patch(
            _SystemdParser, "_sddaemon", ListenFDs([os.dup(sock.fileno())], ("a",))
        )
        endpoint = activatedEndpoint(_globalReactor, "systemd:domain=INET:index=0")
        port = self.successResultOf(endpoint.listen(_Factory()))
        self.addCleanup(releaseListener, port)
        self.assertEqual(port.getHost().port, sock.getsockname()[1])
        self.failureResultOf(endpoint.listen(_Factory()), RuntimeError)


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# Playing systemd


@frozen
class Notification:
    """
    One datagram received on the notification socket.

    @ivar pid: the sender's process id (from its credentials).
    @ivar fields: the assignments.
    """

    pid: int
    fields: dict[str, str]


@implementer(IReadDescriptor)
class NotifySocket:
    """
    A notification socket like systemd's: a Unix datagram socket receiving
    each sender's credentials (C{SO_PASSCRED}), read by the reactor.

    @ivar received: every L{Notification}, in order.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(path)
        self.socket.setblocking(False)
        self.received: list[Notification] = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        while True:
            try:
                data, ancillary, flags, address = self.socket.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i"))
                )
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            self.received.append(Notification(pid, parse(data)))

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "NotifySocket"

    def close(self) -> None:
        _globalReactor.removeReader(self)
        self.socket.close()

    def fromPid(self, pid: int) -> list[dict[str, str]]:
        return [each.fields for each in self.received if each.pid == pid]

    def find(self, pid: int, **expected: str) -> int | None:
        """
        The index of the first notification from C{pid} with every
        C{expected} field, or L{None}.
        """
        for index, each in enumerate(self.received):
            if each.pid == pid and all(
                each.fields.get(key) == value for key, value in expected.items()
            ):
                return index
        return None


#: what systemd does between fork and exec: LISTEN_PID names the process
#: that will run the service, then the service's command line runs in it
SYSTEMD_EXEC = textwrap.dedent("""
    import os, sys
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.argv[1], sys.argv[1:])
    """)


def _monotonicMicroseconds() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class PlayingSystemdTests(TestCase):
    """
    Real C{twistd -n migrate-host} processes started the way systemd starts
    a socket-activated C{Type=notify-reload} service, migrated through
    C{SIGHUP} and the command line, with the test reading every
    notification and connecting through the socket it made.
    """

    timeout = 180

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="migrate-sd-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.notify = NotifySocket(os.path.join(self.directory, "notify"))
        _globalReactor.addReader(self.notify)
        self.addCleanup(self.notify.close)
        # Blocking, as systemd passes sockets unless NonBlocking=yes.
        self.listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.listening.close)
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen(128)
        self.port = self.listening.getsockname()[1]

    def startHost(self, *extra: str, application: list[str] | None = None) -> Any:
        """
        Start the host on the socket the test made, serving the live
        application, or the C{application} arguments (a hosted plugin's).
        """
        if application is None:
            application = ["--app", "liveapp:makeFactory"]
        self.host = HostProcess(
            self,
            [
                "--listen",
                "systemd:domain=INET:index=0",
                "--strategy",
                "capability",
            ]
            + list(extra)
            + application,
            extraEnv={
                "NOTIFY_SOCKET": self.notify.path,
                "LISTEN_FDS": "1",
                "LISTEN_FDNAMES": "web",
            },
            childFDs={3: self.listening.fileno()},
            wrapper=[sys.executable, "-c", SYSTEMD_EXEC],
        )
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V1)
        return self.host.start()

    def pidfile(self) -> int:
        with open(self.host.pidfile) as f:
            return int(f.read())

    def waitForNotification(self, pid: int, what: str, **expected: str) -> Any:
        return waitFor(
            lambda: self.notify.find(pid, **expected) is not None,
            what="{} from {} (received: {!r})".format(what, pid, self.notify.received),
        )

    def assertSuccessorEnvironment(self, pid: int) -> None:
        with open("/proc/{}/environ".format(pid), "rb") as f:
            names = {
                entry.split(b"=", 1)[0].decode()
                for entry in f.read().split(b"\0")
                if entry
            }
        self.assertIn("NOTIFY_SOCKET", names)
        self.assertEqual(names & {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}, set())

    def assertHandedOn(self, oldPid: int, newPid: int, generation: int) -> None:
        """
        The old process said C{RELOADING=1}, then C{MAINPID=} the new one,
        and nothing after that (no C{READY=1} either); the new process said
        C{READY=1} naming itself the main process and its C{generation}.
        """
        received = self.notify.received
        reloading = self.notify.find(oldPid, RELOADING="1")
        assert reloading is not None
        ready = self.notify.find(newPid, READY="1", MAINPID=str(newPid))
        handedOn = self.notify.find(oldPid, MAINPID=str(newPid))
        assert ready is not None and handedOn is not None
        self.assertLess(reloading, ready)
        self.assertNotIn("READY", received[handedOn].fields)
        self.assertEqual(
            [each for each in received[handedOn + 1 :] if each.pid == oldPid], []
        )
        self.assertEqual(
            [
                each
                for each in received[reloading:]
                if each.pid == oldPid and "READY" in each.fields
            ],
            [],
        )
        self.assertRegex(
            received[ready].fields["STATUS"],
            r"^generation {} in pid {}, ".format(generation, newPid),
        )

    @inlineCallbacks
    def test_upgradesTellSystemd(self):
        """
        Ready from the first process; each migration (by C{SIGHUP}, as
        C{Type=notify-reload} sends, then by the command line with another
        strategy) says C{RELOADING=1} with a fresh C{MONOTONIC_USEC} from
        the serving process, C{MAINPID=} the new process from the old one,
        and C{READY=1} from the new one; the status follows the draining
        generation; the pidfile names the serving process; the socket the
        test made keeps accepting throughout, with nothing refused.
        """
        status = yield self.startHost()
        firstPid = status["pid"]
        self.assertEqual(firstPid, self.host.sessionId)
        yield self.waitForNotification(firstPid, "READY=1", READY="1")
        first = self.notify.fromPid(firstPid)[0]
        self.assertEqual(first["MAINPID"], str(firstPid))
        self.assertEqual(
            first["STATUS"],
            "generation 1 in pid {}, 0 connections; draining: none".format(firstPid),
        )
        self.assertEqual(self.pidfile(), firstPid)

        failures: list[str] = []
        attempts = [0]
        running = [True]

        @inlineCallbacks
        def churn():
            while running[0]:
                attempts[0] += 1
                try:
                    client = yield connectLineClient(self.port)
                    yield client.waitForLines(1, timeout=20)
                    client.sendLine(b"x")
                    yield client.waitForLines(2, timeout=20)
                    client.transport.loseConnection()
                except Exception as e:
                    failures.append(repr(e))

        churners = [churn() for _ in range(3)]

        @inlineCallbacks
        def stopChurning():
            running[0] = False
            for each in churners:
                yield each

        self.addCleanup(stopChurning)
        longLived = yield connectLineClient(self.port)
        yield longLived.waitForLines(1)

        # Like systemctl reload with Type=notify-reload.
        before = _monotonicMicroseconds()
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2)
        os.kill(firstPid, signal.SIGHUP)
        status = yield waitFor(self._generation(2), what="generation 2 to serve")
        secondPid = status["pid"]
        self.assertNotEqual(secondPid, firstPid)
        yield self.waitForNotification(firstPid, "MAINPID=", MAINPID=str(secondPid))
        self.assertHandedOn(firstPid, secondPid, 2)
        reloadingAt = self.notify.find(firstPid, RELOADING="1")
        assert reloadingAt is not None
        reloading = self.notify.received[reloadingAt]
        self.assertGreaterEqual(int(reloading.fields["MONOTONIC_USEC"]), before)
        self.assertLessEqual(
            int(reloading.fields["MONOTONIC_USEC"]), _monotonicMicroseconds()
        )
        self.assertEqual(self.pidfile(), secondPid)
        self.assertSuccessorEnvironment(secondPid)
        reply = yield self._exchange(longLived, b"moved")
        self.assertEqual(reply[:2], [b"v2", str(secondPid).encode()])

        # The command line, gradual: the long-lived client stays behind.
        code, report, err = yield self.host.upgrade("--strategy", "gradual")
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        thirdPid = report["newPid"]
        yield self.waitForNotification(secondPid, "MAINPID=", MAINPID=str(thirdPid))
        self.assertHandedOn(secondPid, thirdPid, 3)
        self.assertEqual(self.pidfile(), thirdPid)
        self.assertSuccessorEnvironment(thirdPid)
        yield waitFor(
            lambda: any(
                "draining: generation 2 in pid {}, 1 connection".format(secondPid)
                in each.get("STATUS", "")
                for each in self.notify.fromPid(thirdPid)
            ),
            what="a status from {} naming the draining generation 2".format(thirdPid),
        )

        longLived.transport.loseConnection()
        yield waitFor(lambda: not pidAlive(secondPid), what="generation 2 to exit")
        yield waitFor(
            lambda: (self.notify.fromPid(thirdPid)[-1].get("STATUS") or "").endswith(
                "draining: none"
            ),
            what="a status from {} with nothing draining".format(thirdPid),
        )
        yield stopChurning()
        self.assertEqual(failures, [])
        self.assertGreater(attempts[0], 10)
        for pid in (firstPid, secondPid):
            self.assertFalse(pidAlive(pid))
        self.assertEqual(self.pidfile(), thirdPid)

    @inlineCallbacks
    def test_rollbackSaysReadyFromTheSameProcess(self):
        """
        A migration that rolls back ends the reload with C{READY=1} from the
        process that still serves; the main pid and the pidfile stay.
        """
        status = yield self.startHost()
        pid = status["pid"]
        yield self.waitForNotification(pid, "READY=1", READY="1")
        writeModule(self.host.workdir, "liveapp", MIGRATABLE_V2 + "\ndef broken(:\n")
        code, report, err = yield self.host.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        yield waitFor(
            lambda: len([each for each in self.notify.fromPid(pid) if "READY" in each])
            == 2,
            what="READY=1 again from {}".format(pid),
        )
        mine = self.notify.fromPid(pid)
        # Status refreshes may come between: only the other fields count.
        kinds = [sorted(k for k in each if k != "STATUS") for each in mine]
        self.assertEqual(
            [each for each in kinds if each],
            [
                ["MAINPID", "READY"],
                ["MONOTONIC_USEC", "RELOADING"],
                ["MAINPID", "READY"],
            ],
        )
        self.assertEqual([each for each in self.notify.received if each.pid != pid], [])
        self.assertEqual(self.pidfile(), pid)
        client = yield connectLineClient(self.port)
        hello = yield client.waitForLines(1)
        self.assertEqual(fields(hello[0])[1:3], [b"v1", str(pid).encode()])
        client.transport.loseConnection()

    @inlineCallbacks
    def test_hostedPluginOnTheActivatedSocket(self):
        """
        An unmodified plugin (C{twistd web}) hosted on the socket systemd
        passed: it serves there, a C{SIGHUP} hands that very socket to a
        successor, which says C{READY=1} and serves it too; the successor
        does not inherit systemd's C{LISTEN_*} variables.
        """
        status = yield self.startHost(application=["web", "--path", "."])
        self.host.workdir.child("index.html").setContent(b"activated\n")
        firstPid = status["pid"]
        self.assertEqual(
            [each["key"] for each in status["listeners"]],
            ["systemd:domain=INET:index=0"],
        )
        yield self.waitForNotification(firstPid, "READY=1", READY="1")
        agent = Agent(_globalReactor, pool=HTTPConnectionPool(_globalReactor, False))
        url = "http://127.0.0.1:{}/index.html".format(self.port).encode("ascii")
        response = yield agent.request(b"GET", url)
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"activated\n"))

        os.kill(firstPid, signal.SIGHUP)
        status = yield waitFor(self._generation(2), what="generation 2 to serve")
        secondPid = status["pid"]
        yield self.waitForNotification(secondPid, "READY=1", READY="1")
        self.assertHandedOn(firstPid, secondPid, 2)
        self.assertSuccessorEnvironment(secondPid)
        self.assertEqual(
            [each["key"] for each in status["listeners"]],
            ["systemd:domain=INET:index=0"],
        )
        yield waitFor(lambda: not pidAlive(firstPid), what="generation 1 to exit")
        response = yield agent.request(b"GET", url)
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"activated\n"))

    @inlineCallbacks
    def test_reloadDuringMigrationEndsWithIt(self):
        """
        A second C{SIGHUP} while the first migration runs (a second
        C{systemctl reload}) starts no migration: the serving process says
        C{RELOADING=1} again with a C{MONOTONIC_USEC} from after that
        signal, and the successor's C{READY=1} ends both reloads.
        """
        status = yield self.startHost()
        firstPid = status["pid"]
        yield self.waitForNotification(firstPid, "READY=1", READY="1")
        os.kill(firstPid, signal.SIGHUP)
        yield self.waitForNotification(firstPid, "RELOADING=1", RELOADING="1")
        second = _monotonicMicroseconds()
        os.kill(firstPid, signal.SIGHUP)
        yield waitFor(
            lambda: len(
                [each for each in self.notify.fromPid(firstPid) if "RELOADING" in each]
            )
            == 2,
            what="a second RELOADING=1 from {}".format(firstPid),
        )
        status = yield waitFor(self._generation(2), what="generation 2 to serve")
        secondPid = status["pid"]
        yield self.waitForNotification(secondPid, "READY=1", READY="1")
        reloading = [
            each for each in self.notify.fromPid(firstPid) if "RELOADING" in each
        ]
        self.assertGreaterEqual(int(reloading[1]["MONOTONIC_USEC"]), second)
        self.assertHandedOn(firstPid, secondPid, 2)
        # No second migration: generation 2 goes on serving.
        status = yield self.host.status()
        self.assertEqual(
            (status["generation"], status["pid"], status["phase"]),
            (2, secondPid, "idle"),
        )

    def _generation(self, generation: int) -> Any:
        @inlineCallbacks
        def check():
            status = yield self.host.status()
            return status if status["generation"] == generation else None

        return check

    @inlineCallbacks
    def _exchange(self, client: Any, text: bytes) -> Any:
        before = len(client.lines)
        client.sendLine(text)
        lines = yield client.waitForLines(before + 1)
        return fields(lines[before])
