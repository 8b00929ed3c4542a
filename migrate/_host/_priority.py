# -*- test-case-name: migrate.test.test_priority -*-
"""
Starting the host's child processes in the background.

A successor's start (the interpreter, the imports, the application's
construction) takes a third to a half of a second of one CPU.  On a machine
whose CPUs the service and its clients already keep busy, that start
competes with the process still serving: every client of it waits for a
CPU while the successor imports, although nothing the clients need
depends on the start being quick.  Measured on the two-CPU machine with
1,000 clients each sending every 50 ms, the longest wait of a capability
transfer fell from 93 to 103 ms (during the successor's start) to 47 to
57 ms (the freeze's own), and the median wait during the migration from
17 to under 5 ms, when the successor started at nice 19.

The lowest priority is two settings.  Nice 19 alone gives a child a
small share of a CPU it competes for, but the CPU it runs on still counts
as busy when the kernel places a waking process: the serving process,
woken by its clients' requests, is then put beside other work (on this
machine, the load generator) while the child keeps the other CPU, and
waits there for its turn.  Traced under load, the process serving every
client waited for a processor up to 24 ms at a time while a successor
started at nice 19.  A CPU that runs only C{SCHED_IDLE} threads counts as
idle for that placement, and a waking thread of the normal policy takes
it at once.  So a child in the background runs under C{SCHED_IDLE} at
nice 19 (which C{ps} shows), and is brought forward to the normal policy
(C{SCHED_OTHER}) at this process's nice value.

A child started in the background (L{BackgroundStart}) runs at the lowest
priority (L{BACKGROUND_NICENESS}) until it is brought forward to this
process's priority: a successor once its start is done (it says it is
ready: its interpreter and imports, the costly part, are behind it; the
application's start follows at this process's priority, and so do the
processes the application starts then), and any child once it has run in
the background for a bounded time, so that a machine busy with other work
does not stretch a start toward its deadline.

A successor is sent back to the background (L{BackgroundStart.sendBack})
while it stages the pre-copy, the other work of its that the clients need
not wait for, and brought forward again when the freeze begins (or after
the same bound).  Its threads go back; the processes the application
started stay where they are.

Bringing a process forward again needs a privilege this process may not
have (C{CAP_SYS_NICE}, or an C{RLIMIT_NICE} that allows this process's
nice value: C{LimitNICE=} under systemd, C{--ulimit nice=} or
C{--cap-add SYS_NICE} under Docker); leaving C{SCHED_IDLE} needs the same
since Linux 2.6.39.  L{BackgroundStart.ifPossible} checks first and gives
L{None} without it: the child then starts at this process's priority, as
before.  On Linux the nice value and the policy belong to each thread, so
every thread of the child is brought forward.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from typing import Any, Callable

from attrs import define, field
from twisted.logger import Logger

__all__ = [
    "BACKGROUND_NICENESS",
    "BackgroundStart",
    "describePriority",
    "lowerOwnPriority",
    "mayBringForward",
]

_log = Logger()

#: the nice value a child starts at in the background (the lowest priority)
BACKGROUND_NICENESS = 19

#: the scheduling policy of a child in the background, with
#: L{BACKGROUND_NICENESS}, and of a normal one (Linux only; L{None}
#: elsewhere)
_IDLE_POLICY: int | None = getattr(os, "SCHED_IDLE", None)
_NORMAL_POLICY: int | None = getattr(os, "SCHED_OTHER", None)

#: the share of a child's deadline (the time it has to start) it may spend
#: in the background before it is brought forward
_BACKGROUND_SHARE = 0.1

#: the bit of C{CAP_SYS_NICE} in C{/proc/PID/status}'s capability sets
_CAP_SYS_NICE = 23

#: how many times the threads of a child are listed while some are found
#: still in the background (threads started meanwhile)
_LISTINGS = 3


def mayBringForward(
    niceness: int,
    status: str | None = None,
    rlimitNice: int | None = None,
) -> bool:
    """
    Whether this process may lower a child's nice value from
    L{BACKGROUND_NICENESS} back to C{niceness}.

    @param niceness: the nice value to come back to (this process's).
    @param status: the text of C{/proc/self/status} (read when L{None}).
    @param rlimitNice: the soft C{RLIMIT_NICE} the child inherits (read
        when L{None}).
    """
    if rlimitNice is None:
        rlimitNice = resource.getrlimit(resource.RLIMIT_NICE)[0]
    # RLIMIT_NICE n allows nice values down to 20 - n.
    if rlimitNice == resource.RLIM_INFINITY or 20 - rlimitNice <= niceness:
        return True
    if status is None:
        try:
            with open("/proc/self/status") as f:
                status = f.read()
        except OSError:
            return False
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == "CapEff":
            try:
                return bool(int(value.strip(), 16) >> _CAP_SYS_NICE & 1)
            except ValueError:
                return False
    return False


def _setPolicy(thread: int, idle: bool) -> None:
    """
    Give C{thread} (0: the calling one) the scheduling policy of the
    background (C{SCHED_IDLE}) or the normal one; nothing where the
    system has no such policies.

    @raise OSError: if the system refuses.
    """
    if _IDLE_POLICY is None or _NORMAL_POLICY is None:
        return
    os.sched_setscheduler(
        thread, _IDLE_POLICY if idle else _NORMAL_POLICY, os.sched_param(0)
    )


def describePriority(niceness: int, background: bool) -> str:
    """
    A priority as the log names it: its nice value, and its policy where
    the system has these policies (C{"nice 19 (SCHED_IDLE)"}, C{"nice 0
    (SCHED_OTHER)"}), since C{ps} and C{top} show the one and C{chrt -p}
    the other.

    @param background: whether it is the background's policy
        (C{SCHED_IDLE}) or the normal one.
    """
    if _IDLE_POLICY is None or _NORMAL_POLICY is None:
        return "nice {}".format(niceness)
    return "nice {} ({})".format(
        niceness, "SCHED_IDLE" if background else "SCHED_OTHER"
    )


def _threadsOf(pid: int) -> list[int]:
    """
    The thread IDs of process C{pid}.
    """
    return [int(name) for name in os.listdir("/proc/{}/task".format(pid))]


@define
class BackgroundStart:
    """
    A child process started at the lowest priority, to be brought forward
    to this process's.

    @ivar reactor: schedules the bringing forward after C{atMost}.
    @ivar foreground: the nice value to bring the child forward to.
    @ivar atMost: seconds the child may run in the background at most.
    @ivar niceness: the nice value the child starts at.
    @ivar pid: the child, once started in the background.
    @ivar broughtForward: whether it runs at this process's priority (brought
        forward, and not sent back since).
    """

    reactor: Any
    foreground: int
    atMost: float
    niceness: int = BACKGROUND_NICENESS
    pid: int | None = None
    broughtForward: bool = False
    _timer: Any = field(default=None, repr=False)
    _setPriority: Callable[[int, int, int], None] = field(
        default=os.setpriority, repr=False
    )
    _threadsOf: Callable[[int], list[int]] = field(default=_threadsOf, repr=False)
    _setPolicy: Callable[[int, bool], None] = field(default=_setPolicy, repr=False)

    @classmethod
    def ifPossible(cls, reactor: Any, deadline: float) -> BackgroundStart | None:
        """
        A background start for one child that has C{deadline} seconds to
        start: it is brought forward after a tenth of them at the latest.

        @return: L{None} when this process could not bring the child
            forward again (or runs at the lowest priority itself, or under
            another policy than the normal one, which bringing forward
            would not give back, or not on Linux).
        """
        if not sys.platform.startswith("linux"):
            return None
        if _NORMAL_POLICY is not None and os.sched_getscheduler(0) != _NORMAL_POLICY:
            return None
        foreground = os.getpriority(os.PRIO_PROCESS, 0)
        if foreground >= BACKGROUND_NICENESS or not mayBringForward(foreground):
            return None
        return cls(reactor, foreground, deadline * _BACKGROUND_SHARE)

    def started(self, pid: int) -> None:
        """
        The child C{pid} started: bring it forward after L{atMost} seconds
        at the latest.

        Its first thread takes the background's priority and policy at
        once, for the trampoline's own interpreter start (about 15 ms of a
        processor).  The trampoline sets them too before it executes the
        command, so that the command runs at them however late this call
        comes; so a failure here (the child ended already, say) changes
        nothing.
        """
        try:
            self._setThread(pid, background=True)
        except OSError:
            pass
        self.pid = pid
        self._timer = self.reactor.callLater(
            self.atMost,
            self.bringForward,
            "still starting after {:g} s".format(self.atMost),
        )

    def _priorities(self) -> dict[str, Any]:
        """
        What the log says of the child and its two priorities: named, with
        their policies (L{describePriority}), and as numbers (C{low},
        C{nice}).
        """
        return {
            "pid": self.pid,
            "background": describePriority(self.niceness, True),
            "foreground": describePriority(self.foreground, False),
            "low": self.niceness,
            "nice": self.foreground,
        }

    def bringForward(self, why: str) -> None:
        """
        Give every thread of the child this process's priority, unless it
        has it already; say so in the log with C{why}.  A child that has
        ended meanwhile needs nothing; a refusal is logged (the child runs
        on at the low priority).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.pid is None or self.broughtForward:
            return
        self.broughtForward = True
        try:
            self._setThreads(self.pid, background=False)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return
            _log.error(
                "Could not bring process {pid} forward from {background} to "
                "{foreground} ({why}): {error}; it runs on at {background}",
                **self._priorities(),
                why=why,
                error=os.strerror(e.errno) if e.errno else str(e),
            )
            return
        _log.info(
            "Brought process {pid} forward from {background} to {foreground}: {why}",
            **self._priorities(),
            why=why,
        )

    def sendBack(self, why: str) -> None:
        """
        Give every thread of the child, brought forward already, the lowest
        priority again, for work of its that nobody waits for; say so in
        the log with C{why}.  L{bringForward} brings it forward again, and
        so does a timer after L{atMost} seconds at the latest.  Nothing
        happens for a child still in the background or ended; a refusal is
        logged (the child runs on at this process's priority).
        """
        if self.pid is None or not self.broughtForward:
            return
        try:
            self._setThreads(self.pid, background=True)
        except OSError as e:
            if e.errno != errno.ESRCH:
                _log.error(
                    "Could not send process {pid} back from {foreground} to "
                    "{background} ({why}): {error}; it runs on at {foreground}",
                    **self._priorities(),
                    why=why,
                    error=os.strerror(e.errno) if e.errno else str(e),
                )
            # Some threads may have gone back: bring them all forward.
            self.broughtForward = False
            self.bringForward("sending it back failed")
            return
        self.broughtForward = False
        self._timer = self.reactor.callLater(
            self.atMost,
            self.bringForward,
            "in the background again for {:g} s".format(self.atMost),
        )
        _log.info(
            "Sent process {pid} back from {foreground} to {background}: {why}",
            **self._priorities(),
            why=why,
        )

    def ended(self) -> None:
        """
        The child ended: nothing left to bring forward.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.pid = None

    def _setThreads(self, pid: int, background: bool) -> None:
        # The main thread first: the threads it starts from then on are
        # born at its priority.
        self._setThread(pid, background)
        threadsOf = self._threadsOf
        done = {pid}
        for _ in range(_LISTINGS):
            try:
                threads = [each for each in threadsOf(pid) if each not in done]
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
                raise
            if not threads:
                return
            for thread in threads:
                try:
                    self._setThread(thread, background)
                except OSError as e:
                    # A thread that ended meanwhile.
                    if e.errno != errno.ESRCH:
                        raise
                done.add(thread)

    def _setThread(self, thread: int, background: bool) -> None:
        """
        Give one thread the background's nice value and policy, or this
        process's nice value and the normal policy.
        """
        if background:
            self._setPriority(os.PRIO_PROCESS, thread, self.niceness)
            self._setPolicy(thread, True)
        else:
            self._setPolicy(thread, False)
            self._setPriority(os.PRIO_PROCESS, thread, self.foreground)


def lowerOwnPriority(niceness: int) -> None:
    """
    Raise the calling thread's nice value to C{niceness}, if it is lower,
    and give it the background's policy (C{SCHED_IDLE}): the processor it
    runs on then counts as idle for the processes that must run (see the
    module's docstring).  On Linux both belong to the thread: the reactor's
    thread, which lets go of the connections, is the one that calls.
    Neither needs a privilege; coming back would.

    @raise OSError: if the system refuses.
    """
    if os.getpriority(os.PRIO_PROCESS, 0) < niceness:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    _setPolicy(0, True)
