# -*- test-case-name: migrate.test.test_keeper -*-
"""
Keeping the process a supervisor started: whether there is a keeper
(C{--keeper auto|on|off}), and each process's part in it.

    - L{KeeperHome}, in the process the supervisor started: it binds the
      keeper's socket and becomes a child subreaper at start; once it has
      handed its service on (capability or gradual transfer) it forwards
      signals while it drains, and when drained it C{execv}s into the
      keeper program (L{migrate._host._keeper}) instead of exiting;
    - L{KeeperLink}, in every later generation: it tells the keeper when it
      starts serving;
    - L{NoKeeper}: no keeper, and the reason to refuse a migration that
      would end this process when that process is PID 1.

Reaches into Twisted, kept here: L{twisted.internet.process.reapProcessHandlers}
(Twisted's children by pid; it calls C{reapProcess()} on each of them at
every C{SIGCHLD}).  The keeper-to-be reads a successor's exit status there,
and while it drains it registers a reaper of its own there, which collects
the processes orphaned to it that Twisted does not know.

Under systemd with C{NOTIFY_SOCKET} there is no keeper by default: systemd
follows the serving process through C{MAINPID}.  As a daemon (twistd
without C{-n}) neither: nobody watches the first process, and the pidfile
names the serving one.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable, Mapping, MutableMapping

from attrs import Factory, define, frozen
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from . import _keeper
from ._keeper import FORWARDED, STOPPING, descendsFrom, readAnnouncements

__all__ = [
    "KEEPER_MODES",
    "KEEPER_VARIABLE",
    "KeeperChoice",
    "KeeperHome",
    "KeeperLink",
    "NoKeeper",
    "chooseKeeper",
    "keeperFor",
    "refuseWithoutKeeper",
]

KEEPER_VARIABLE = "MIGRATE_KEEPER"
"""
Inherited by every generation: C{PID:NAME}, the keeper's pid and the name
of its socket in the abstract namespace.
"""

KEEPER_MODES = ("auto", "on", "off")

_PR_SET_CHILD_SUBREAPER = 36

_KEEPER_SCRIPT = os.path.abspath(_keeper.__file__)


@frozen
class KeeperChoice:
    """
    Whether this host keeps the process its supervisor started.

    @ivar mode: C{auto}, C{on} or C{off} (C{--keeper}).
    @ivar wanted: whether a keeper is wanted.
    @ivar why: why, in a few words, for C{status} and the log.
    """

    mode: str
    wanted: bool
    why: str


def chooseKeeper(
    mode: str, *, foreground: bool, environ: Mapping[str, str]
) -> KeeperChoice:
    """
    Decide whether there is a keeper.

    @param mode: C{--keeper}: C{on}, C{off} or C{auto}.
    @param foreground: whether twistd runs in the foreground (C{-n}, or
        C{twist}).
    @param environ: the environment (C{NOTIFY_SOCKET}).
    """
    if mode == "on":
        return KeeperChoice(mode, True, "--keeper on")
    if mode == "off":
        return KeeperChoice(mode, False, "--keeper off")
    if environ.get("NOTIFY_SOCKET"):
        return KeeperChoice(
            mode, False, "systemd follows the serving process (NOTIFY_SOCKET)"
        )
    if not foreground:
        return KeeperChoice(
            mode, False, "daemon: the pidfile names the serving process"
        )
    return KeeperChoice(mode, True, "in the foreground, without NOTIFY_SOCKET")


def _inheritedKeeper(
    environ: Mapping[str, str], pid: int, readParent: Any = None
) -> tuple[int, str] | None:
    """
    The keeper named in the environment, if it is this process or one of
    its ancestors (a variable inherited from elsewhere is ignored).
    """
    value = environ.get(KEEPER_VARIABLE, "")
    keeperText, sep, name = value.partition(":")
    if not sep or not keeperText.isdigit() or not name:
        return None
    keeperPid = int(keeperText)
    if not descendsFrom(pid, keeperPid, readParent):
        return None
    return keeperPid, name


def _spawnedProcess(pid: int) -> Any:
    """
    Twisted's handle on child C{pid}, if this process spawned it: once
    Twisted has reaped it, its C{status} is the only record of how it
    ended (L{twisted.internet.process.reapProcessHandlers}).
    """
    from twisted.internet import process

    return process.reapProcessHandlers.get(pid)


def _zombieChildren(pid: int) -> list[int]:
    """
    The children of process C{pid} that have ended and wait to be reaped.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry), "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text[text.rindex(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


@define
class _OrphanReaper:
    """
    Registered with Twisted's children (under this process's own pid, which
    is no child's): at every C{SIGCHLD}, reap the ended children Twisted
    does not know, the orphans that come to a subreaper or PID 1.

    @ivar ended: how each reaped one ended, by pid
        (L{os.waitstatus_to_exitcode}).
    """

    pid: int
    known: Callable[[int], bool]
    zombies: Callable[[int], list[int]] = _zombieChildren
    ended: dict[int, int] = Factory(dict)

    def reapProcess(self) -> None:
        for pid in self.zombies(self.pid):
            if self.known(pid):
                continue
            try:
                found, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if found:
                self.ended[found] = os.waitstatus_to_exitcode(status)


def _reapOrphans(pid: int) -> _OrphanReaper:
    from twisted.internet import process

    def known(child: int) -> bool:
        return child in process.reapProcessHandlers

    reaper = _OrphanReaper(pid, known)
    process.reapProcessHandlers[pid] = reaper  # type: ignore[assignment]
    return reaper


def _becomeSubreaper() -> None:
    # Imported here: only the first process needs it, and every successor
    # and re-executed image imports this module while its clients wait.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _bindKeeperSocket(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind("\0" + name)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NoKeeper:
    """
    No keeper: this process ends when it has handed its service on.

    @ivar refusal: why a migration that ends this process must not run, or
        L{None}.
    """

    def __init__(self, choice: KeeperChoice, refusal: str | None = None) -> None:
        self.choice = choice
        self.refusal = refusal

    def statusEntry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "mode": self.choice.mode,
            "pid": None,
            "why": self.choice.why,
        }
        if self.refusal is not None:
            entry["problem"] = self.refusal
        return entry

    def refuse(self, strategy: Any) -> str | None:
        """
        Why C{strategy} must not migrate this host, if it must not.
        """
        if getattr(strategy, "replacesProcess", False):
            return self.refusal
        return None


class KeeperLink:
    """
    A generation under a keeper: it tells the keeper when it serves.
    """

    _log = Logger()

    def __init__(self, choice: KeeperChoice, keeperPid: int, name: str) -> None:
        self.choice = choice
        self.keeperPid = keeperPid
        self.name = name

    def serving(self, host: Any) -> None:
        self.tell(_keeper.ANNOUNCEMENT)

    def tell(self, message: bytes) -> None:
        """
        Say C{message} to the keeper (L{_keeper.MESSAGES}).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.sendto(message, "\0" + self.name)
        except OSError as e:
            self._log.warn(
                "Could not tell keeper {keeper} {message!r}: {error}",
                keeper=self.keeperPid,
                message=message,
                error=e.strerror,
            )
        finally:
            sock.close()

    def statusEntry(self) -> dict[str, Any]:
        return {"mode": self.choice.mode, "pid": self.keeperPid, "why": self.choice.why}

    def refuse(self, strategy: Any) -> str | None:
        return None


@implementer(IReadDescriptor)
class KeeperHome:
    """
    The process the supervisor started, which stays as the keeper once it
    has handed its service on.

    @ivar keeping: whether it has handed its service on (it drains, and
        becomes the keeper when drained).
    @ivar serving: the generation that serves, once it is not this one.
    @ivar stopSignal: the signal that stops the service, if it was asked.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        choice: KeeperChoice,
        sock: socket.socket,
        *,
        pidfile: str | None,
        pid: int,
        execv: Callable[[str, list[str]], None] = os.execv,
        kill: Callable[[int, int], None] = os.kill,
        installSignal: Callable[[int, Any], Any] = signal.signal,
        blockSignals: Callable[[int, Any], Any] = signal.pthread_sigmask,
        executable: str = sys.executable,
        spawnedProcess: Callable[[int], Any] = _spawnedProcess,
        reapOrphans: Callable[[int], Any] = _reapOrphans,
    ) -> None:
        self.reactor = reactor
        self.choice = choice
        self.sock = sock
        self.pidfile = pidfile
        self.pid = pid
        self._execv = execv
        self._kill = kill
        self._installSignal = installSignal
        self._blockSignals = blockSignals
        self._executable = executable
        self._spawnedProcess = spawnedProcess
        self._reapOrphans = reapOrphans
        self._orphans: Any = None
        self._children: dict[int, Any] = {}
        self.keeping = False
        self.serving: int | None = None
        self.generations: set[int] = set()
        self.stopSignal: int | None = None
        self.delivered: set[int] = set()
        self.host: Any = None

    # IReadDescriptor, for the announcements

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.readAnnouncements()

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor lets go of the socket (it stops): nothing to do, the
        socket stays for the keeper.
        """

    def logPrefix(self) -> str:
        return "keeper"

    def releaseName(self) -> None:
        """
        In a child forked from this process that goes on without the
        keeper's part (re-exec's caretaker): let go of the socket's name, so
        that this process, re-executed, can bind it again.  The descriptor
        stays open on C{/dev/null}, so the reactor (whose C{epoll} the
        child may still share with this process) is not touched.
        """
        nothing = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(nothing, self.sock.fileno(), inheritable=False)
        finally:
            os.close(nothing)

    def listen(self) -> None:
        """
        Read announcements as they come.
        """
        self.reactor.addReader(self)

    def readAnnouncements(self) -> None:
        for pid, message in readAnnouncements(self.sock, self.pid):
            if pid == self.pid:
                continue
            if message == _keeper.STOP_DRAINING:
                # The service stops (python -m migrate stop): close what
                # drains here; the serving generation stops by itself.
                closeNow = getattr(self.host, "closeDraining", None)
                if closeNow is not None:
                    closeNow()
                continue
            self.generations.add(pid)
            self.serving = pid

    # Lifecycle observer

    def handedOn(self, host: Any, newPid: int) -> None:
        """
        This process handed its service on to C{newPid}: forward signals
        from now on, and become the keeper once drained.
        """
        self.host = host
        self.keeping = True
        self.readAnnouncements()
        if newPid not in self.generations:
            self.generations.add(newPid)
            self.serving = newPid
        # If the successor ends before the keeper takes over, Twisted reaps
        # it here: keep its handle to tell the keeper how it ended.
        child = self._spawnedProcess(newPid)
        if child is not None:
            self._children[newPid] = child
        # Orphans come to this process from now on (a generation that ends
        # before its successor does): reap them as they end.
        self._orphans = self._reapOrphans(self.pid)
        self._forward()
        self._log.info(
            "Process {pid} stays as the keeper once drained ({why}): signals go "
            "to the serving generation",
            pid=self.pid,
            why=self.choice.why,
        )

    def _forward(self) -> None:
        for signum in (*STOPPING, *FORWARDED):
            self._installSignal(signum, self._onSignal)

    def _onSignal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.received, signum)

    def received(self, signum: int) -> None:
        """
        A signal arrived while this process drains.
        """
        self.readAnnouncements()
        if signum in STOPPING:
            if self.stopSignal is not None:
                return
            self.stopSignal = signum
            if signum == signal.SIGINT and _keeper.terminalSentToGroup():
                self.delivered = _keeper.sameGroup(self.generations)
            self._log.info(
                "{signal}: closing the connections still draining here; then "
                "every generation stops",
                signal=signal.Signals(signum).name,
            )
            closeNow = getattr(self.host, "closeDraining", None)
            if closeNow is not None:
                closeNow()
            return
        if self.serving is not None:
            self._log.info(
                "{signal} passed on to the serving generation (process {pid})",
                signal=signal.Signals(signum).name,
                pid=self.serving,
            )
            try:
                self._kill(self.serving, signum)
            except OSError as e:
                self._log.warn(
                    "Could not pass {signal} on to process {pid}: {error}",
                    signal=signal.Signals(signum).name,
                    pid=self.serving,
                    error=e.strerror,
                )

    def stopProcess(self) -> None:
        """
        End this process's own part: stop the reactor, and once it has
        stopped, become the keeper if the service was handed on.
        """
        if self.keeping:
            # Stopping the host gives SIGHUP its old disposition back (the
            # default: death); keep passing signals on until the exec.
            self.reactor.addSystemEventTrigger("before", "shutdown", self._forward)
            self.reactor.addSystemEventTrigger("after", "shutdown", self.becomeKeeper)
        self.reactor.stop()

    def keeperCommandLine(self) -> list[str]:
        """
        The command line of the keeper program, as things stand.
        """
        assert self.serving is not None
        arguments = [
            "--socket={}".format(self.sock.fileno()),
            "--serving={}".format(self.serving),
            "--generations={}".format(",".join(map(str, sorted(self.generations)))),
        ]
        statuses = {
            pid: os.waitstatus_to_exitcode(child.status)
            for pid, child in self._children.items()
            if child.pid is None and child.status is not None
        }
        if self._orphans is not None:
            statuses.update(
                (pid, status)
                for pid, status in self._orphans.ended.items()
                if pid in self.generations
            )
        ended = [
            "{}:{}".format(pid, status) for pid, status in sorted(statuses.items())
        ]
        if ended:
            arguments.append("--ended={}".format(",".join(ended)))
        if self.stopSignal is not None:
            arguments.append("--stop={}".format(self.stopSignal))
        if self.pidfile:
            arguments.append("--pidfile={}".format(self.pidfile))
        return [self._executable, "-I", "-S", _KEEPER_SCRIPT] + arguments

    def becomeKeeper(self) -> None:
        """
        Replace this process's image with the keeper program.  Signals that
        arrive meanwhile wait, blocked, for the keeper.
        """
        self.readAnnouncements()
        self._blockSignals(signal.SIG_BLOCK, {*STOPPING, *FORWARDED, signal.SIGCHLD})
        argv = self.keeperCommandLine()
        self._log.info(
            "Process {pid} drained; it becomes the keeper (serving: process "
            "{serving})",
            pid=self.pid,
            serving=self.serving,
        )
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os.set_inheritable(self.sock.fileno(), True)
        try:
            self._execv(argv[0], argv)
        except OSError as e:
            os.set_inheritable(self.sock.fileno(), False)
            self._blockSignals(
                signal.SIG_UNBLOCK, {*STOPPING, *FORWARDED, signal.SIGCHLD}
            )
            self._log.critical(
                "Could not become the keeper ({error}): this process exits "
                "and its supervisor may take the service for ended",
                error=e.strerror,
            )

    def statusEntry(self) -> dict[str, Any]:
        return {"mode": self.choice.mode, "pid": self.pid, "why": self.choice.why}

    def refuse(self, strategy: Any) -> str | None:
        return None


Keeper = NoKeeper | KeeperLink | KeeperHome


def refuseWithoutKeeper(strategy: Any, pid: int | None = None) -> str | None:
    """
    For a host that was given no keeper (an embedding application's): why
    C{strategy} must not end this process, if it is PID 1.
    """
    if pid is None:
        pid = os.getpid()
    if pid != 1 or not getattr(strategy, "replacesProcess", False):
        return None
    return (
        "this process is PID 1 and would exit once it hands its service on, "
        "ending the container; run it under twistd -n migrate-host (which "
        "keeps it), or migrate with the reexec or reload strategy"
    )


def keeperFor(
    reactor: Any,
    choice: KeeperChoice,
    *,
    pidfile: str | None,
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    becomeSubreaper: Callable[[], None] = _becomeSubreaper,
    bindSocket: Callable[[str], socket.socket] = _bindKeeperSocket,
) -> Keeper:
    """
    This process's part: the keeper-to-be (the process the supervisor
    started, or its re-executed image), a generation under a keeper, or
    no keeper.

    @param environ: the environment (L{KEEPER_VARIABLE}); the keeper-to-be
        sets it there for every later generation.
    """
    if environ is None:
        environ = os.environ
    if pid is None:
        pid = os.getpid()
    inherited = _inheritedKeeper(environ, pid)
    if inherited is not None:
        keeperPid, name = inherited
        if keeperPid != pid:
            return KeeperLink(choice, keeperPid, name)
        # A re-executed image of the keeper-to-be: bind its socket again.
        return _home(reactor, choice, name, pidfile, pid, bindSocket)
    environ.pop(KEEPER_VARIABLE, None)
    if not choice.wanted:
        refusal = None
        if pid == 1:
            why = (
                choice.why if choice.mode != "auto" else "--keeper auto: " + choice.why
            )
            refusal = (
                "this process is PID 1 and would exit once it hands its "
                "service on, ending the container ({}); start the host with "
                "--keeper on, or migrate with the reexec or reload "
                "strategy".format(why)
            )
        return NoKeeper(choice, refusal)
    try:
        if pid != 1:
            becomeSubreaper()
        name = "migrate-keeper-{}-{}".format(pid, os.urandom(8).hex())
        home = _home(reactor, choice, name, pidfile, pid, bindSocket)
    except OSError as e:
        return NoKeeper(
            choice,
            "no keeper could be arranged ({}), and this process would end "
            "once it hands its service on, which its supervisor takes for "
            "the end of the service; migrate with the reexec or reload "
            "strategy, or start the host with --keeper off if nothing "
            "watches this process".format(e.strerror or e),
        )
    environ[KEEPER_VARIABLE] = "{}:{}".format(pid, name)
    return home


def _home(
    reactor: Any,
    choice: KeeperChoice,
    name: str,
    pidfile: str | None,
    pid: int,
    bindSocket: Callable[[str], socket.socket],
) -> KeeperHome:
    home = KeeperHome(reactor, choice, bindSocket(name), pidfile=pidfile, pid=pid)
    home.listen()
    return home
