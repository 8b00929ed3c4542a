"""
Tests for the keeper (L{migrate._host._keeper}, L{migrate._host._keeping})
and for what a successor of a daemon does not do again
(L{migrate._host._daemon}), without processes: the keeper's decisions,
which part each process plays, and the keeper-to-be with fakes.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from .._host import _keeper
from .._host._daemon import (
    DAEMON_LOG_FILE,
    AppendingLogFile,
    appendToLogFile,
    isForeground,
    keepSuccessorInForeground,
    sharedLogFile,
)
from .._host._keeper import KeeperLogic, descendsFrom
from .._host._keeping import (
    KEEPER_VARIABLE,
    KeeperChoice,
    KeeperHome,
    KeeperLink,
    NoKeeper,
    _OrphanReaper,
    chooseKeeper,
    keeperFor,
)
from .._host._pidfile import removePidfileNaming, writePidfile

TERM = signal.SIGTERM
INT = signal.SIGINT
HUP = signal.SIGHUP


class KeeperLogicTests(SynchronousTestCase):
    """
    L{KeeperLogic} decides whom to signal and how the keeper ends.
    """

    def test_forwardsToServing(self) -> None:
        """
        C{SIGHUP}, C{SIGUSR1} and C{SIGUSR2} go to the serving generation,
        the one announced last.
        """
        logic = KeeperLogic(10)
        self.assertEqual(logic.received(HUP), [(10, HUP)])
        self.assertEqual(logic.announced(11), [])
        self.assertEqual(logic.received(signal.SIGUSR1), [(11, signal.SIGUSR1)])
        self.assertEqual(logic.received(signal.SIGUSR2), [(11, signal.SIGUSR2)])
        self.assertEqual(logic.received(signal.SIGQUIT), [])

    def test_stopDrainingFirst(self) -> None:
        """
        C{SIGTERM} goes to the draining generations first and to the
        serving one once they have ended, so that the serving one ends as
        the keeper's child; the keeper then exits as it did.
        """
        logic = KeeperLogic(12, {10, 11})
        self.assertEqual(logic.received(TERM), [(10, TERM), (11, TERM)])
        self.assertEqual(logic.ended(10, 0), [])
        self.assertFalse(logic.done)
        self.assertEqual(logic.ended(11, 0), [(12, TERM)])
        self.assertEqual(logic.received(TERM), [])
        self.assertEqual(logic.ended(12, -TERM), [])
        self.assertTrue(logic.done)
        self.assertEqual(logic.exitStatus(), -TERM)

    def test_stopWhileMigrating(self) -> None:
        """
        A generation that starts serving after the stop was asked is
        stopped in its turn.
        """
        logic = KeeperLogic(10)
        self.assertEqual(logic.received(TERM), [(10, TERM)])
        self.assertEqual(logic.announced(11), [])
        self.assertEqual(logic.ended(10, 0), [(11, TERM)])
        self.assertEqual(logic.ended(11, 0), [])
        self.assertEqual(logic.exitStatus(), 0)

    def test_terminalAlreadySent(self) -> None:
        """
        Generations that received the same C{SIGINT} (a terminal's Ctrl-C
        reaches its whole foreground group) do not get it twice.
        """
        logic = KeeperLogic(11, {10})
        self.assertEqual(logic.received(INT, {10, 11}), [])
        self.assertEqual(logic.ended(10, -INT), [])
        self.assertEqual(logic.ended(11, -INT), [])
        self.assertEqual(logic.exitStatus(), -INT)

    def test_servingKilled(self) -> None:
        """
        A serving generation that ends on its own (C{SIGKILL}) ends the
        draining ones and the keeper, which exits non-zero as it did.
        """
        logic = KeeperLogic(11, {10})
        self.assertEqual(logic.ended(11, -signal.SIGKILL), [(10, TERM)])
        self.assertEqual(logic.ended(10, 0), [])
        self.assertTrue(logic.done)
        self.assertEqual(logic.exitStatus(), -signal.SIGKILL)

    def test_unknownStatus(self) -> None:
        """
        When the serving generation's status went to its parent, the keeper
        exits as twistd does for the signal that stopped it, or with 1 when
        nobody asked.
        """
        stopped = KeeperLogic(11)
        stopped.received(TERM)
        stopped.ended(11, None)
        self.assertEqual(stopped.exitStatus(), -TERM)
        died = KeeperLogic(11)
        died.ended(11, None)
        self.assertEqual(died.exitStatus(), 1)
        # Reaped later after all (its parent ended first): known now.
        died.ended(11, -signal.SIGKILL)
        self.assertEqual(died.exitStatus(), -signal.SIGKILL)

    def test_orphansChangeNothing(self) -> None:
        """
        Reaping a process that is no generation changes nothing.
        """
        logic = KeeperLogic(11)
        self.assertEqual(logic.ended(99, 0), [])
        self.assertFalse(logic.done)

    def test_startStopping(self) -> None:
        """
        A keeper that starts with a stop already asked (the process drained
        after C{SIGTERM}) goes on with it.
        """
        logic = KeeperLogic(12, {11}, TERM)
        self.assertEqual(logic.start(), [(11, TERM)])
        self.assertEqual(logic.ended(11, 0), [(12, TERM)])


class DescendsFromTests(SynchronousTestCase):
    """
    L{descendsFrom} follows parents.
    """

    def test_descendant(self) -> None:
        parents = {30: 20, 20: 10, 10: 1}
        self.assertTrue(descendsFrom(30, 10, parents.__getitem__))
        self.assertTrue(descendsFrom(10, 10, parents.__getitem__))
        self.assertFalse(descendsFrom(30, 5, parents.__getitem__))

    def test_gone(self) -> None:
        """
        A process that has gone is no descendant.
        """

        def parentOf(pid: int) -> int:
            raise FileNotFoundError(pid)

        self.assertFalse(descendsFrom(30, 10, parentOf))

    def test_real(self) -> None:
        """
        This process descends from its parent, not from a child.
        """
        self.assertTrue(descendsFrom(os.getpid(), os.getppid()))
        self.assertFalse(descendsFrom(os.getppid(), os.getpid()))


class AnnouncementTests(SynchronousTestCase):
    """
    Announcements over the keeper's socket carry the kernel's word for who
    sent them.
    """

    def test_announcement(self) -> None:
        name = "migrate-keeper-test-{}".format(os.urandom(6).hex())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind("\0" + name)
        sock.setblocking(False)
        link = KeeperLink(chooseKeeper("on", foreground=True, environ={}), 1, name)
        link.serving(None)
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.sendto(b"something else", "\0" + name)
        # This process descends from itself.
        link.tell(_keeper.STOP_DRAINING)
        self.assertEqual(
            _keeper.readAnnouncements(sock, os.getpid()),
            [(os.getpid(), b"serving"), (os.getpid(), b"stop-draining")],
        )
        link.serving(None)
        # ...but not from a child it never had.
        self.assertEqual(_keeper.readAnnouncements(sock, 2**22 + 1), [])

    def test_noKeeperListening(self) -> None:
        """
        A keeper that is not there is logged, not raised.
        """
        link = KeeperLink(
            chooseKeeper("on", foreground=True, environ={}),
            1,
            "migrate-keeper-test-absent-{}".format(os.urandom(6).hex()),
        )
        link.serving(None)
        self.assertEqual(link.statusEntry()["pid"], 1)


class ChooseKeeperTests(SynchronousTestCase):
    """
    L{chooseKeeper}: on in the foreground without systemd's notifications.
    """

    def test_auto(self) -> None:
        self.assertTrue(chooseKeeper("auto", foreground=True, environ={}).wanted)
        self.assertFalse(
            chooseKeeper(
                "auto", foreground=True, environ={"NOTIFY_SOCKET": "/run/n"}
            ).wanted
        )
        self.assertFalse(chooseKeeper("auto", foreground=False, environ={}).wanted)

    def test_forced(self) -> None:
        self.assertTrue(
            chooseKeeper("on", foreground=False, environ={"NOTIFY_SOCKET": "x"}).wanted
        )
        self.assertFalse(chooseKeeper("off", foreground=True, environ={}).wanted)


class _Strategy:
    def __init__(self, replacesProcess: bool) -> None:
        self.replacesProcess = replacesProcess


class KeeperForTests(SynchronousTestCase):
    """
    L{keeperFor} finds this process's part.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.bound: list[str] = []
        self.subreaper: list[bool] = []

    def bind(self, name: str) -> Any:
        self.bound.append(name)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a

    def keeperFor(self, choice: KeeperChoice, environ: dict[str, str], pid: int) -> Any:
        return keeperFor(
            self.reactor,
            choice,
            pidfile=None,
            environ=environ,
            pid=pid,
            becomeSubreaper=lambda: self.subreaper.append(True),
            bindSocket=self.bind,
        )

    def test_home(self) -> None:
        """
        The first process, when a keeper is wanted, becomes a subreaper,
        binds the socket, reads it from the reactor and names it to every
        later generation.
        """
        environ: dict[str, str] = {}
        keeper = self.keeperFor(
            chooseKeeper("auto", foreground=True, environ={}), environ, os.getpid()
        )
        self.assertIsInstance(keeper, KeeperHome)
        self.assertEqual(self.subreaper, [True])
        self.assertEqual(
            environ[KEEPER_VARIABLE], "{}:{}".format(os.getpid(), self.bound[0])
        )
        self.assertIn(keeper, self.reactor.getReaders())
        self.assertEqual(keeper.statusEntry()["pid"], os.getpid())
        self.assertIsNone(keeper.refuse(_Strategy(True)))

    def test_pid1(self) -> None:
        """
        PID 1 needs no subreaper flag: orphans come to it anyway.
        """
        environ: dict[str, str] = {}
        keeper = self.keeperFor(
            chooseKeeper("on", foreground=True, environ={}), environ, 1
        )
        self.assertIsInstance(keeper, KeeperHome)
        self.assertEqual(self.subreaper, [])

    def test_link(self) -> None:
        """
        A later generation, a descendant of the keeper named in its
        environment, links to it.
        """
        environ = {KEEPER_VARIABLE: "{}:name".format(os.getppid())}
        keeper = self.keeperFor(
            chooseKeeper("auto", foreground=True, environ={}), environ, os.getpid()
        )
        self.assertIsInstance(keeper, KeeperLink)
        self.assertEqual((keeper.keeperPid, keeper.name), (os.getppid(), "name"))
        self.assertEqual(self.bound, [])

    def test_reexecuted(self) -> None:
        """
        The keeper-to-be's re-executed image binds the same name again.
        """
        environ = {KEEPER_VARIABLE: "{}:name".format(os.getpid())}
        keeper = self.keeperFor(
            chooseKeeper("auto", foreground=True, environ={}), environ, os.getpid()
        )
        self.assertIsInstance(keeper, KeeperHome)
        self.assertEqual(self.bound, ["name"])
        self.assertEqual(self.subreaper, [])

    def test_strangerIgnored(self) -> None:
        """
        A variable naming a process that is not an ancestor (inherited from
        elsewhere) is dropped.
        """
        environ = {KEEPER_VARIABLE: "{}:name".format(2**22 + 1)}
        keeper = self.keeperFor(
            chooseKeeper("off", foreground=True, environ={}), environ, os.getpid()
        )
        self.assertIsInstance(keeper, NoKeeper)
        self.assertNotIn(KEEPER_VARIABLE, environ)

    def test_pid1WithoutKeeperRefuses(self) -> None:
        """
        PID 1 without a keeper refuses the strategies that would end it,
        naming the fix, and takes the others.
        """
        keeper = self.keeperFor(chooseKeeper("off", foreground=True, environ={}), {}, 1)
        reason = keeper.refuse(_Strategy(True))
        self.assertIn("PID 1", reason)
        self.assertIn("--keeper on", reason)
        self.assertIsNone(keeper.refuse(_Strategy(False)))
        self.assertEqual(keeper.statusEntry()["problem"], reason)

    def test_cannotArrange(self) -> None:
        """
        A keeper that cannot be arranged refuses those strategies too.
        """

        def fail() -> None:
            raise PermissionError(1, "Operation not permitted")

        keeper = keeperFor(
            self.reactor,
            chooseKeeper("on", foreground=True, environ={}),
            pidfile=None,
            environ={},
            pid=os.getpid(),
            becomeSubreaper=fail,
            bindSocket=self.bind,
        )
        self.assertIsInstance(keeper, NoKeeper)
        self.assertIn("Operation not permitted", keeper.refuse(_Strategy(True)))


class RefuseWithoutKeeperTests(SynchronousTestCase):
    """
    A host given no keeper (embedded) refuses transfer only as PID 1.
    """

    def test_refuse(self) -> None:
        from .._host._keeping import refuseWithoutKeeper

        self.assertIn("PID 1", refuseWithoutKeeper(_Strategy(True), 1) or "")
        self.assertIsNone(refuseWithoutKeeper(_Strategy(False), 1))
        self.assertIsNone(refuseWithoutKeeper(_Strategy(True), 2))


class _Host:
    def __init__(self) -> None:
        self.closed = 0

    def closeDraining(self) -> None:
        self.closed += 1


class KeeperHomeTests(SynchronousTestCase):
    """
    L{KeeperHome} forwards while it drains and becomes the keeper at the
    end.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.sock, self.other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.addCleanup(self.sock.close)
        self.addCleanup(self.other.close)
        self.killed: list[tuple[int, int]] = []
        self.handlers: dict[int, Any] = {}
        self.masks: list[tuple[int, set[int]]] = []
        self.execs: list[list[str]] = []
        self.spawned: dict[int, Any] = {}
        self.reapers: list[int] = []
        self.orphans = _OrphanReaper(0, lambda pid: False, lambda pid: [])
        self.home = KeeperHome(
            self.reactor,
            chooseKeeper("auto", foreground=True, environ={}),
            self.sock,
            pidfile="/run/app.pid",
            # This test's process, the announcements' sender, descends from
            # the keeper-to-be.
            pid=os.getppid(),
            execv=lambda path, argv: self.execs.append(argv),
            kill=lambda pid, signum: self.killed.append((pid, signum)),
            installSignal=self.handlers.__setitem__,
            blockSignals=lambda how, signals: self.masks.append((how, set(signals))),
            executable="/venv/bin/python",
            spawnedProcess=self.spawned.get,
            reapOrphans=self.reapOrphans,
        )
        self.host = _Host()

    def reapOrphans(self, pid: int) -> Any:
        self.reapers.append(pid)
        return self.orphans

    def test_releaseName(self) -> None:
        """
        L{KeeperHome.releaseName} lets go of the socket's name, so that
        another socket can bind it, and keeps its descriptor open (on
        C{/dev/null}) without touching the reactor.
        """
        name = "\0migrate-test-keeper-{}".format(os.getpid())
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(bound.close)
        bound.bind(name)
        self.home.sock = bound
        self.home.listen()
        self.home.releaseName()
        again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(again.close)
        again.bind(name)
        self.assertEqual(os.fstat(bound.fileno()).st_rdev, os.stat(os.devnull).st_rdev)
        self.assertIn(self.home, self.reactor.getReaders())

    def test_interface(self) -> None:
        """
        L{KeeperHome} is a reader the reactor can watch.
        """
        from twisted.internet.interfaces import IReadDescriptor
        from zope.interface.verify import verifyObject

        self.assertTrue(verifyObject(IReadDescriptor, self.home))

    def test_announcementsRead(self) -> None:
        """
        Announcements read from the socket name the serving generation; a
        stop's request to close what drains here reaches the host.
        """
        self.home.host = self.host
        self.other.send(b"serving")
        self.home.doRead()
        self.assertEqual(self.home.serving, os.getpid())
        self.other.send(b"stop-draining")
        self.home.doRead()
        self.assertEqual(self.host.closed, 1)

    def test_plainStop(self) -> None:
        """
        Stopping before any hand-off stops the reactor and nothing more.
        """
        self.reactor.running = True
        self.home.stopProcess()
        self.assertFalse(self.reactor.running)
        self.assertEqual(self.reactor.triggers.get("after", {}).get("shutdown", []), [])

    def test_forwardWhileDraining(self) -> None:
        """
        Once handed on, C{SIGHUP} goes to the successor, and C{SIGTERM}
        closes what drains here.
        """
        self.home.handedOn(self.host, 200)
        self.assertEqual(
            set(self.handlers), {TERM, INT, HUP, signal.SIGUSR1, signal.SIGUSR2}
        )
        self.home.received(HUP)
        self.assertEqual(self.killed, [(200, HUP)])
        self.home.received(TERM)
        self.assertEqual(self.host.closed, 1)
        self.assertEqual(self.home.stopSignal, TERM)
        self.home.received(TERM)
        self.assertEqual(self.host.closed, 1)

    def test_becomeKeeper(self) -> None:
        """
        Once drained, the process stops its reactor and then execs the
        keeper program, signals blocked, with what it knows.
        """
        self.home.handedOn(self.host, 200)
        self.assertEqual(self.reapers, [self.home.pid])
        self.home.received(TERM)
        # The successor was killed, and reaped here as an orphan.
        self.orphans.ended[200] = -signal.SIGKILL
        self.reactor.running = True
        self.home.stopProcess()
        # The host, stopping, gives SIGHUP back its old disposition: the
        # handlers are installed again before the reactor stops.
        self.handlers.clear()
        [(before, args, kwargs)] = self.reactor.triggers["before"]["shutdown"]
        before(*args, **kwargs)
        self.assertIn(HUP, self.handlers)
        [(trigger, args, kwargs)] = self.reactor.triggers["after"]["shutdown"]
        trigger(*args, **kwargs)
        [argv] = self.execs
        self.assertEqual(
            argv,
            [
                "/venv/bin/python",
                "-I",
                "-S",
                _keeper.__file__.replace(".pyc", ".py"),
                "--socket={}".format(self.sock.fileno()),
                "--serving=200",
                "--generations=200",
                "--ended=200:-9",
                "--stop={}".format(int(TERM)),
                "--pidfile=/run/app.pid",
            ],
        )
        self.assertEqual(self.masks[0][0], signal.SIG_BLOCK)
        self.assertIn(TERM, self.masks[0][1])
        self.assertTrue(os.get_inheritable(self.sock.fileno()))


class OrphanReaperTests(SynchronousTestCase):
    """
    L{_OrphanReaper} reaps the ended children Twisted does not know.
    """

    def test_reap(self) -> None:
        child = os.fork()
        if child == 0:
            os._exit(3)
        self.addCleanup(self._collect, child)
        # Wait until it has ended, without reaping it.
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
        reaper = _OrphanReaper(os.getpid(), lambda pid: False, lambda pid: [child])
        reaper.reapProcess()
        self.assertEqual(reaper.ended, {child: 3})

    def test_known(self) -> None:
        """
        A child Twisted knows is left to Twisted.
        """
        reaper = _OrphanReaper(os.getpid(), lambda pid: True, lambda pid: [12345])
        reaper.reapProcess()
        self.assertEqual(reaper.ended, {})

    def _collect(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


class DaemonTests(SynchronousTestCase):
    """
    A successor of a daemon stays in the foreground.
    """

    def test_successorOfDaemon(self) -> None:
        parent = {
            "nodaemon": False,
            "logfile": None,
            "syslog": False,
            "chroot": "/srv",
            "uid": 1000,
            "gid": 1000,
            "rundir": "/srv",
        }
        self.assertFalse(isForeground(parent))
        self.assertTrue(keepSuccessorInForeground(parent, {"MIGRATE_HANDOFF_FD": "3"}))
        self.assertEqual(
            parent,
            {
                "nodaemon": True,
                "logfile": DAEMON_LOG_FILE,
                "syslog": False,
                "chroot": None,
                "uid": None,
                "gid": None,
                "rundir": ".",
            },
        )

    def test_keepsLogfile(self) -> None:
        parent = {"nodaemon": False, "logfile": "/var/log/app.log"}
        keepSuccessorInForeground(parent, {"MIGRATE_HANDOFF_FD": "3"})
        self.assertEqual(parent["logfile"], "/var/log/app.log")

    def test_sharedLogFile(self) -> None:
        """
        The log file generations share is twistd's C{--logfile}, made
        absolute; none for standard output, syslog or no twistd.
        """
        self.assertEqual(
            sharedLogFile({"logfile": "twistd.log"}), os.path.abspath("twistd.log")
        )
        self.assertIsNone(sharedLogFile({"logfile": "-"}))
        self.assertIsNone(sharedLogFile({"logfile": None}))
        self.assertIsNone(sharedLogFile({"logfile": "x.log", "syslog": True}))
        self.assertIsNone(sharedLogFile(None))

    def test_appendToLogFile(self) -> None:
        """
        Two writers of the log file, each opened at its end as twistd opens
        it: once both are made to append, neither writes over the other's
        lines.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "twistd.log")
        with open(path, "wb") as f:
            f.write(b"start\n")
        first = open(path, "r+b", buffering=0)
        second = open(path, "r+b", buffering=0)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        first.seek(0, 2)
        second.seek(0, 2)
        self.assertEqual(appendToLogFile(path), 2)
        first.write(b"old generation\n")
        second.write(b"new generation\n")
        first.write(b"old again\n")
        with open(path, "rb") as f:
            self.assertEqual(
                f.read(), b"start\nold generation\nnew generation\nold again\n"
            )
        self.assertEqual(appendToLogFile(os.path.join(directory, "other.log")), 0)

    def test_appendAgainAfterRotation(self) -> None:
        """
        A rotation reopens the log file without C{O_APPEND}, as twistd's
        log file does; L{AppendingLogFile} sets it again as a migration
        starts, so that the old generation, draining, does not write over
        its successor's lines.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "twistd.log")
        with open(path, "wb") as f:
            f.write(b"before\n")
        os.rename(path, path + ".1")
        rotated = open(path, "w+b", buffering=0)
        self.addCleanup(rotated.close)
        rotated.write(b"after rotation\n")
        self.assertFalse(fcntl.fcntl(rotated.fileno(), fcntl.F_GETFL) & os.O_APPEND)
        AppendingLogFile(path).migrationStarted(None)
        self.assertTrue(fcntl.fcntl(rotated.fileno(), fcntl.F_GETFL) & os.O_APPEND)
        successor = open(path, "ab", buffering=0)
        self.addCleanup(successor.close)
        successor.write(b"new generation\n")
        rotated.write(b"old draining\n")
        with open(path, "rb") as f:
            self.assertEqual(
                f.read(), b"after rotation\nnew generation\nold draining\n"
            )

    def test_notSuccessor(self) -> None:
        parent = {"nodaemon": False}
        self.assertFalse(keepSuccessorInForeground(parent, {}))
        self.assertEqual(parent, {"nodaemon": False})
        self.assertTrue(isForeground(None))
        self.assertTrue(isForeground({"nodaemon": True}))


class PidfileTests(SynchronousTestCase):
    """
    L{removePidfileNaming} removes only a pidfile naming the process.
    """

    def test_remove(self) -> None:
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "twistd.pid")
        writePidfile(path, 42)
        self.assertFalse(removePidfileNaming(path, 43))
        self.assertTrue(os.path.exists(path))
        self.assertTrue(removePidfileNaming(path, 42))
        self.assertFalse(os.path.exists(path))
        self.assertFalse(removePidfileNaming(path, 42))
        os.rmdir(directory)


class StatusLineTests(SynchronousTestCase):
    """
    C{status} shows the keeper.
    """

    def test_keeperLine(self) -> None:
        from .._control._format import formatStatus

        text = formatStatus(
            {"keeper": {"mode": "auto", "pid": 1, "why": "in the foreground"}}
        )
        self.assertIn("Keeper: pid 1 (auto: in the foreground)", text)
        text = formatStatus(
            {
                "keeper": {
                    "mode": "off",
                    "pid": None,
                    "why": "--keeper off",
                    "problem": "PID 1",
                }
            }
        )
        self.assertIn("Keeper: none (off: --keeper off)\n  PID 1", text)


class KeeperOptionTests(SynchronousTestCase):
    """
    C{--keeper} in twistd's options.
    """

    def parse(self, parent: dict[str, Any], *arguments: str) -> Any:
        from .. import tap

        options = tap.Options()
        options.parent = parent  # type: ignore[assignment]
        self.patch(os, "environ", {})
        options.parseOptions(list(arguments))
        return options

    def test_default(self) -> None:
        options = self.parse({"nodaemon": True}, "--control", "/tmp/x.sock")
        self.assertEqual(options["keeper"], "auto")
        self.assertTrue(options["foreground"])

    def test_bad(self) -> None:
        with self.assertRaises(SystemExit) as caught:
            self.parse({"nodaemon": True}, "--keeper", "maybe")
        self.assertIn("auto, on, off", str(caught.exception))

    def test_onNeedsForeground(self) -> None:
        """
        A daemon has nothing to keep: C{--keeper on} says to use C{-n}.
        """
        with self.assertRaises(SystemExit) as caught:
            self.parse({"nodaemon": False}, "--keeper", "on")
        self.assertIn("twistd -n", str(caught.exception))
