# -*- test-case-name: migrate.test.test_keeper -*-
"""
The keeper: what the process a supervisor started becomes once it has
handed its service on and drained.

A container runtime (PID 1), tini, dumb-init, supervisord, runit, s6 and a
terminal all watch the process they started, and take its exit for the end
of the service.  When a transfer strategy would end that process, it stays
instead, as this small program (C{execv} of the very interpreter with C{-I
-S}, importing only the standard library's C modules and a few pure ones):

    - it holds no listener and no connection;
    - C{SIGHUP}, C{SIGUSR1} and C{SIGUSR2} go to the generation that serves
      (C{SIGHUP} is an upgrade);
    - C{SIGTERM} and C{SIGINT} stop every generation: the draining ones
      first, then the serving one (so that the serving one ends as the
      keeper's child and its exit status is known), each closing its
      connections cleanly;
    - it reaps every process that ends under it (it is PID 1 or a child
      subreaper, C{PR_SET_CHILD_SUBREAPER}, so orphans come to it);
    - once every generation has ended it exits as the serving generation
      did (re-raising C{SIGTERM} or C{SIGINT} as twistd does, C{128 +
      signal} as PID 1 or for another signal).  A serving generation that
      ends on its own (killed, crashed) ends the others and the keeper:
      the supervisor sees the service end, with a non-zero status.

How it learns which generation serves: every generation inherits
C{MIGRATE_KEEPER} (see L{migrate._host._keeping}), the address of a Unix
datagram socket in the abstract namespace that the keeper holds; a
generation that starts serving sends it C{b"serving"}.  The kernel attaches
the sender's credentials (C{SO_PASSCRED}): the keeper believes only its own
user (or root) and its own descendants.

This file runs as a script with no access to the rest of migrate (C{-S}:
no site-packages); L{KeeperLogic} holds every decision, without I/O, for
the tests.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import sys

__all__ = [
    "ANNOUNCEMENT",
    "FORWARDED",
    "MESSAGES",
    "STOP_DRAINING",
    "KeeperLogic",
    "descendsFrom",
    "exitAs",
    "main",
    "readAnnouncements",
    "terminalSentToGroup",
]

ANNOUNCEMENT = b"serving"
"""
What a generation says to the keeper when it starts serving.
"""

STOP_DRAINING = b"stop-draining"
"""
What the serving generation says at a stop's drain deadline: the process
that is to become the keeper closes the connections it still drains (the
keeper itself holds none).
"""

MESSAGES = (ANNOUNCEMENT, STOP_DRAINING)

FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
"""
Signals passed on to the serving generation as they are.
"""

STOPPING = (signal.SIGTERM, signal.SIGINT)
"""
Signals that stop every generation.
"""

_MAX_MESSAGE = 64
_CREDENTIALS = struct.Struct("3i")
_MAX_ANCESTRY = 256


class KeeperLogic:
    """
    Every decision the keeper takes, as a state machine without I/O: it is
    told what happened and answers with the signals to send, as C{(pid,
    signal)} pairs.

    Exit statuses are those of L{os.waitstatus_to_exitcode}: a status
    C{>= 0} for an exit, C{-N} for death by signal C{N}, and L{None} when
    it is unknown (a generation that ended as the child of another
    generation, which collected its status).

    @ivar serving: the generation that serves.
    @ivar generations: every generation that has not ended, the serving one
        included.
    @ivar stopSignal: the signal that stops the service, once it stops.
    @ivar servingStatus: the serving generation's exit status, once known.
    """

    def __init__(
        self,
        serving: int,
        generations: set[int] | frozenset[int] = frozenset(),
        stopSignal: int | None = None,
    ) -> None:
        self.serving = serving
        self.generations = set(generations) | {serving}
        self.stopSignal = stopSignal
        self.servingEnded = False
        self.servingStatus: int | None = None
        self.stopAsked = stopSignal is not None
        self._signalled: set[int] = set()

    def start(
        self, delivered: set[int] | frozenset[int] = frozenset()
    ) -> list[tuple[int, int]]:
        """
        The keeper starts: if the service was asked to stop before, go on
        stopping it.

        @param delivered: generations that already received the stop
            signal (a terminal sends C{SIGINT} to its whole foreground
            process group).
        """
        self._signalled |= set(delivered)
        return self._stopStep()

    @property
    def done(self) -> bool:
        """
        Whether every generation has ended.
        """
        return not self.generations

    def announced(self, pid: int) -> list[tuple[int, int]]:
        """
        Generation C{pid} serves now.
        """
        self.generations.add(pid)
        self.serving = pid
        self.servingEnded = False
        self.servingStatus = None
        return self._stopStep()

    def received(
        self, signum: int, delivered: set[int] | frozenset[int] = frozenset()
    ) -> list[tuple[int, int]]:
        """
        The keeper received C{signum}.

        @param delivered: generations that received it too, from the same
            sender (a terminal's C{SIGINT}): not sent again.
        """
        if signum in STOPPING:
            if self.stopSignal is None:
                self.stopSignal = signum
            self.stopAsked = True
            self._signalled |= set(delivered)
            return self._stopStep()
        if signum in FORWARDED and self.serving in self.generations:
            if self.serving in delivered:
                return []
            return [(self.serving, signum)]
        return []

    def ended(self, pid: int, status: int | None) -> list[tuple[int, int]]:
        """
        Process C{pid} ended with C{status} (L{None}: unknown).  Processes
        that are not generations (orphans the keeper reaps) change nothing.
        """
        if pid not in self.generations:
            if pid == self.serving and self.servingEnded and self.servingStatus is None:
                # Seen ending as another generation's child, and reaped
                # here after all: its status is known now.
                self.servingStatus = status
            return []
        self.generations.discard(pid)
        if pid == self.serving:
            self.servingEnded = True
            self.servingStatus = status
            if self.stopSignal is None:
                # The service ended on its own: the generations still
                # draining follow it, and the supervisor learns of it.
                self.stopSignal = signal.SIGTERM
        return self._stopStep()

    def _stopStep(self) -> list[tuple[int, int]]:
        if self.stopSignal is None:
            return []
        sends = []
        draining = sorted(self.generations - {self.serving})
        for pid in draining:
            if pid not in self._signalled:
                self._signalled.add(pid)
                sends.append((pid, self.stopSignal))
        if (
            not draining
            and self.serving in self.generations
            and self.serving not in self._signalled
        ):
            self._signalled.add(self.serving)
            sends.append((self.serving, self.stopSignal))
        return sends

    def exitStatus(self) -> int:
        """
        How the keeper ends, in L{os.waitstatus_to_exitcode}'s terms: as the
        serving generation did; if that is unknown, as twistd does for the
        signal that stopped the service, or 1 when it ended on its own.
        """
        if self.servingStatus is not None:
            return self.servingStatus
        if self.stopAsked and self.stopSignal is not None:
            return -self.stopSignal
        return 1


def descendsFrom(pid: int, ancestor: int, readParent: object = None) -> bool:
    """
    Whether process C{pid} is C{ancestor} or one of its descendants,
    following parents in C{/proc}.

    @param readParent: reads a process's parent (for tests); L{None} for
        C{/proc/PID/stat}.
    """
    parentOf = readParent if readParent is not None else _parentOf
    for _ in range(_MAX_ANCESTRY):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = parentOf(pid)  # type: ignore[operator]
        except (OSError, ValueError):
            return False
    return False


def _parentOf(pid: int) -> int:
    with open("/proc/{}/stat".format(pid), "rb") as stat:
        text = stat.read()
    # The command name is in parentheses and may hold anything.
    return int(text[text.rindex(b")") + 2 :].split()[1])


def readAnnouncements(sock: socket.socket, keeperPid: int) -> list[tuple[int, bytes]]:
    """
    Read every message waiting on the keeper's socket (non-blocking);
    return those from rightful senders (L{MESSAGES}), oldest first, with
    the sender's pid.
    """
    pids: list[tuple[int, bytes]] = []
    uid = os.getuid()
    while True:
        try:
            data, ancillary, flags, address = sock.recvmsg(
                _MAX_MESSAGE, socket.CMSG_SPACE(_CREDENTIALS.size)
            )
        except (BlockingIOError, InterruptedError):
            return pids
        credentials = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                credentials = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])
        if credentials is None or data not in MESSAGES:
            continue
        pid, senderUid, gid = credentials
        if senderUid not in (uid, 0) or not descendsFrom(pid, keeperPid):
            _say("ignored a message from process {}".format(pid))
            continue
        pids.append((pid, data))


def terminalSentToGroup() -> bool:
    """
    Whether this process's group is the foreground group of its terminal:
    then a C{SIGINT} it received (Ctrl-C) went to the whole group.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def sameGroup(pids: set[int]) -> set[int]:
    """
    The processes among C{pids} in this process's group.
    """
    mine = os.getpgrp()
    found = set()
    for pid in pids:
        try:
            if os.getpgid(pid) == mine:
                found.add(pid)
        except OSError:
            pass
    return found


def exitAs(status: int, pid: int | None = None) -> None:
    """
    End this process as a generation with C{status} ended: the same exit
    code, or death by C{SIGTERM} or C{SIGINT} again (as twistd stops), or
    C{128 + N} for another signal and always as PID 1 (which the kernel
    does not let die of its own signal).
    """
    if pid is None:
        pid = os.getpid()
    if status >= 0:
        os._exit(min(status, 255))
    signum = -status
    if pid != 1 and signum in STOPPING:
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(pid, signum)
    os._exit(128 + signum)


def _say(message: str) -> None:
    try:
        os.write(2, "migrate keeper {}: {}\n".format(os.getpid(), message).encode())
    except OSError:
        pass


def _describe(status: int | None) -> str:
    if status is None:
        return "ended (status collected by its parent)"
    if status < 0:
        try:
            return "killed by " + signal.Signals(-status).name
        except ValueError:
            return "killed by signal {}".format(-status)
    return "exited with status {}".format(status)


class _Program:
    """
    The keeper's I/O around L{KeeperLogic}: signals through a wake-up pipe,
    announcements on the socket, ends of generations through pidfds (for
    those that are not its children) and C{waitpid}.
    """

    def __init__(self, logic: KeeperLogic, sock: socket.socket, pidfile: str | None):
        self.logic = logic
        self.sock = sock
        self.pidfile = pidfile
        self.pid = os.getpid()
        self.poller = select.poll()
        self.pidfds: dict[int, int] = {}
        self.byFd: dict[int, int] = {}

    def run(self, ended: list[tuple[int, ...]]) -> int:
        """
        Keep the service until every generation has ended.

        @param ended: generations that ended before, with their status
            (reaped by the process this one was).
        """
        wakeRead, wakeWrite = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeWrite, warn_on_full_buffer=False)
        handled = (*STOPPING, *FORWARDED, signal.SIGCHLD)
        for signum in handled:
            signal.signal(signum, _noop)
        self.sock.setblocking(False)
        self.poller.register(wakeRead, select.POLLIN)
        self.poller.register(self.sock.fileno(), select.POLLIN)
        for pid, status in ended:
            self._send(self.logic.ended(pid, status))
        for pid in sorted(self.logic.generations):
            self._watch(pid)
        _say(
            "keeps the service: generation in process {} serves".format(
                self.logic.serving
            )
        )
        delivered: set[int] = set()
        if self.logic.stopSignal == signal.SIGINT and terminalSentToGroup():
            delivered = sameGroup(self.logic.generations)
        self._send(self.logic.start(delivered))
        # Signals held back across the exec arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        self._reap()
        self._announcements()
        while not self.logic.done:
            for fd, events in self.poller.poll():
                if fd == wakeRead:
                    self._signals(wakeRead)
                elif fd == self.sock.fileno():
                    self._announcements()
                elif fd in self.byFd:
                    self._pidfdReady(fd)
        # A generation that ended as another's child was handed to the keeper,
        # unreaped, when that one ended: leave no zombie behind.
        self._reap()
        status = self.logic.exitStatus()
        self._removePidfile()
        _say(
            "every generation ended; exits as the serving one: {}".format(
                _describe(status)
            )
        )
        return status

    def _signals(self, wakeRead: int) -> None:
        try:
            numbers = os.read(wakeRead, 512)
        except BlockingIOError:
            return
        for signum in numbers:
            if signum == signal.SIGCHLD:
                self._reap()
                continue
            delivered: set[int] = set()
            if signum == signal.SIGINT and terminalSentToGroup():
                delivered = sameGroup(self.logic.generations)
            _say("{} received".format(signal.Signals(signum).name))
            self._send(self.logic.received(signum, delivered))

    def _announcements(self) -> None:
        for pid, message in readAnnouncements(self.sock, self.pid):
            if message != ANNOUNCEMENT:
                continue
            if pid != self.logic.serving:
                _say("generation in process {} serves".format(pid))
            self._watch(pid)
            self._send(self.logic.announced(pid))

    def _watch(self, pid: int) -> None:
        if pid in self.pidfds:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._ended(pid, self._reapOne(pid))
            return
        except OSError:
            # No pidfd here (an old kernel): its end is seen when reaped.
            return
        self.pidfds[pid] = fd
        self.byFd[fd] = pid
        self.poller.register(fd, select.POLLIN)

    def _pidfdReady(self, fd: int) -> None:
        pid = self.byFd[fd]
        self._ended(pid, self._reapOne(pid))

    def _reapOne(self, pid: int) -> int | None:
        try:
            found, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if found == 0:
            # Ended, but not yet a zombie to us: its parent collects it.
            return None
        return os.waitstatus_to_exitcode(status)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._ended(pid, os.waitstatus_to_exitcode(status))

    def _ended(self, pid: int, status: int | None) -> None:
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            del self.byFd[fd]
            self.poller.unregister(fd)
            os.close(fd)
        if pid in self.logic.generations:
            _say("generation in process {} {}".format(pid, _describe(status)))
        self._send(self.logic.ended(pid, status))

    def _send(self, sends: list[tuple[int, int]]) -> None:
        for pid, signum in sends:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            except OSError as e:
                _say("cannot signal process {}: {}".format(pid, e.strerror))

    def _removePidfile(self) -> None:
        """
        A pidfile naming a generation that ended would keep the next start
        from starting (twistd refuses while it names a live process, and a
        container's next PID is often the same number).
        """
        if not self.pidfile:
            return
        try:
            with open(self.pidfile, "rb") as f:
                named = int(f.read().strip() or b"0")
        except (OSError, ValueError):
            return
        if named == self.pid or _alive(named) is False:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass


def _alive(pid: int) -> bool | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def _noop(signum: int, frame: object) -> None:
    """
    Python-level handler: the signal's number reaches the wake-up pipe.
    """


def _arguments(argv: list[str]) -> dict[str, str]:
    options = {}
    for each in argv:
        name, sep, value = each.partition("=")
        if not sep or not name.startswith("--"):
            raise SystemExit("migrate keeper: bad argument {!r}".format(each))
        options[name[2:]] = value
    return options


def main(argv: list[str]) -> None:
    """
    Run the keeper: C{--socket=FD --serving=PID [--generations=PID,...]
    [--ended=PID:STATUS,...] [--stop=SIGNUM] [--pidfile=PATH]}.
    """
    options = _arguments(argv)
    try:
        sock = socket.socket(fileno=int(options["socket"]))
        serving = int(options["serving"])
        generations = {
            int(each) for each in options.get("generations", "").split(",") if each
        }
        stop = int(options.get("stop") or 0) or None
        ended = [
            tuple(int(part) for part in each.split(":"))
            for each in options.get("ended", "").split(",")
            if each
        ]
    except (KeyError, ValueError, OSError) as e:
        _say("cannot start: {}".format(e))
        os._exit(70)
    os.set_inheritable(sock.fileno(), False)
    logic = KeeperLogic(serving, generations, stop)
    program = _Program(logic, sock, options.get("pidfile") or None)
    status = program.run(ended)
    sys.stdout.flush()
    exitAs(status)


if __name__ == "__main__":
    main(sys.argv[1:])
