# -*- test-case-name: migrate.test.test_chaos -*-
"""
The fault campaign: one host under load, many migrations, a fault in
each, and the invariants checked after each.

Each round picks a strategy and a fault (L{migrate.chaos._faults.FAULTS})
with the seeded random generator, starts C{upgrade --strategy S}, injects
the fault at a random moment of it, and then checks:

  - B{answers}: a new connection is answered within the ready timeout
    (unless the fault killed the only process that could serve: then the
    campaign starts a new host and says so);
  - B{nothing lost}: no long-lived client lost its connection, a request
    or an answer (nor got one twice, nor saw its state jump), unless the
    fault killed the process that owned it after its commit;
  - B{nothing left}: once things settle, the host's session holds only the
    serving process and the generations C{status} says still drain, none
    stopped, and the serving process holds no more descriptors than when
    the campaign started (beyond its clients);
  - B{report}: the migration's report says what happened (a successful
    outcome, or a reason).

It prints one row per round and exits non-zero if any invariant broke.
The host and its load are the benchmark's (L{migrate.bench._process},
L{migrate.bench._load}).
"""

from __future__ import annotations

import json
import random
import resource
import signal
import sys
import time
from typing import IO, Any, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ClientCreator
from twisted.internet.task import deferLater, react
from twisted.protocols.basic import LineReceiver
from twisted.python import usage

from ..bench._load import LoadGenerator
from ..bench._process import BenchHost, HostFailed, freePort, pidAlive
from ._faults import (
    FAULTS,
    childrenOf,
    descriptorCount,
    faultsFor,
    isStopped,
    roleOf,
    sessionProcesses,
    setLimit,
    signalQuietly,
)

__all__ = ["CampaignOptions", "Round", "main", "runCampaign"]

STRATEGIES = ("capability", "gradual", "reexec", "reload")

#: the faults aimed at a child of the serving process (fd-limit: but for
#: re-exec, whose new image is the serving process itself)
_CHILD_FAULTS = (
    "kill-successor",
    "stop-successor",
    "kill-trial",
    "stop-trial",
    "fd-limit",
)

#: descriptors the serving process may hold beyond the campaign's start
#: (log files reopened, a control connection being served) before it
#: counts as a leak
_DESCRIPTOR_SLACK = 6


class CampaignOptions(usage.Options):
    """
    C{python -m migrate.chaos} options.
    """

    synopsis = "python -m migrate.chaos [--rounds N] [--seed S] [options]"
    longdesc = (
        "Run one host under load and migrate it again and again, each time "
        "with a random strategy and a fault injected at a random moment; "
        "check after each that the service answers, nothing was lost and "
        "nothing was left behind. Prints a table; exits 1 if an invariant "
        "broke. See doc/reliability.rst."
    )
    optParameters = [
        ["rounds", "r", 20, "Migrations to run.", int],
        ["seed", "s", None, "Seed of the random choices (default: from the time)."],
        ["clients", "c", 20, "Long-lived clients under load.", int],
        ["ready-timeout", None, 5.0, "The host's --ready-timeout, in seconds.", float],
        ["strategies", None, ",".join(STRATEGIES), "Strategies to pick from."],
        [
            "faults",
            None,
            ",".join(fault.name for fault in FAULTS),
            "Faults to pick from.",
        ],
        ["json", None, None, "Also write the rounds as JSON to this file."],
    ]

    def postOptions(self) -> None:
        if self["rounds"] < 1 or self["clients"] < 1:
            raise usage.UsageError("--rounds and --clients must be positive")
        if self["seed"] is None:
            self["seed"] = str(int(time.time()))
        self["strategies"] = [s for s in self["strategies"].split(",") if s]
        unknown = set(self["strategies"]) - set(STRATEGIES)
        if unknown or not self["strategies"]:
            raise usage.UsageError(
                "--strategies takes some of {}".format(", ".join(STRATEGIES))
            )
        self["faults"] = [f for f in self["faults"].split(",") if f]
        names = {fault.name for fault in FAULTS}
        if set(self["faults"]) - names or not self["faults"]:
            raise usage.UsageError(
                "--faults takes some of {}".format(", ".join(sorted(names)))
            )


@define
class Round:
    """
    One round: what was tried, what happened, what broke.
    """

    number: int
    strategy: str
    fault: str
    delay: float
    injected: str = "-"
    outcome: str = "?"
    reason: str = ""
    answeredIn: float | None = None
    lost: int = 0
    excused: int = 0
    drained: int = 0
    leftBehind: list[int] = field(factory=list)
    descriptors: int | None = None
    restarted: bool = False
    violations: list[str] = field(factory=list)
    halted: list[int] = field(factory=list)

    def toJSON(self) -> dict[str, Any]:
        return {
            "round": self.number,
            "strategy": self.strategy,
            "fault": self.fault,
            "delay": round(self.delay, 3),
            "injected": self.injected,
            "outcome": self.outcome,
            "reason": self.reason,
            "answeredIn": self.answeredIn,
            "lost": self.lost,
            "excused": self.excused,
            "drained": self.drained,
            "leftBehind": self.leftBehind,
            "descriptors": self.descriptors,
            "restarted": self.restarted,
            "violations": self.violations,
        }


class _Load(LoadGenerator):
    """
    The benchmark's load, noting how many requests each connection had
    unanswered when it ended.
    """

    def _disconnected(self, client: Any, reason: Any) -> None:
        client.unansweredAtEnd = len(client.pending)
        super()._disconnected(client, reason)


class _Probe(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.answered: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.sendLine(b"0")

    def lineReceived(self, line: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(line)
        transport: Any = self.transport
        transport.loseConnection()


async def _probe(reactor: Any, port: int, timeout: float) -> float | None:
    """
    Connect afresh and send one request.

    @return: seconds until the answer, or L{None} if none came within
        C{timeout}.
    """
    started = reactor.seconds()
    deadline = started + timeout
    while reactor.seconds() < deadline:
        try:
            protocol = await ClientCreator(reactor, _Probe).connectTCP(
                "127.0.0.1", port, timeout=max(0.1, deadline - reactor.seconds())
            )
        except Exception:
            await deferLater(reactor, 0.1, lambda: None)
            continue
        timer = reactor.callLater(
            max(0.1, deadline - reactor.seconds()),
            lambda: protocol.answered.called
            or protocol.answered.errback(TimeoutError()),
        )
        try:
            await protocol.answered
        except Exception:
            transport: Any = protocol.transport
            if transport is not None:
                transport.abortConnection()
            continue
        finally:
            if timer.active():
                timer.cancel()
        return float(reactor.seconds() - started)
    return None


class Campaign:
    """
    The host, its load, and the rounds.
    """

    def __init__(self, reactor: Any, options: CampaignOptions, out: IO[str]) -> None:
        self.reactor = reactor
        self.options = options
        self.out = out
        self.rng = random.Random(options["seed"])
        self.readyTimeout = options["ready-timeout"]
        self.port = freePort()
        self.host: BenchHost | None = None
        self.load: _Load | None = None
        self.baseline: int | None = None
        self.rounds: list[Round] = []
        self._seenLost: set[int] = set()
        self._counters = (0, 0, 0)

    def say(self, text: str) -> None:
        sys.stderr.write("chaos: {}\n".format(text))
        sys.stderr.flush()

    async def startHost(self) -> None:
        if self.host is None:
            # Whatever ends the campaign (^C included) ends the hosts.
            self.reactor.addSystemEventTrigger(
                "before", "shutdown", lambda: self.host and self.host.cleanup()
            )
        self.host = BenchHost(
            self.reactor,
            self.port,
            "capability",
            extra=[
                "--ready-timeout",
                str(self.readyTimeout),
                "--handoff-timeout",
                str(self.readyTimeout),
                "--drain-timeout",
                str(self.readyTimeout),
            ],
        )
        await self.host.start(timeout=60)
        self.load = _Load(self.reactor, self.port, interval=0.05, rate=5.0)
        self._seenLost = set()
        await self.load.connect(self.options["clients"])
        self.load.start()
        self._counters = self._requestCounters()

    def _requestCounters(self) -> tuple[int, int, int]:
        load = self.load
        assert load is not None
        return (
            load.lostLines,
            load.duplicatedLines + load.malformed,
            load.stateErrors,
        )

    async def stop(self) -> None:
        if self.load is not None:
            await self.load.stop(2.0)
            await self.load.closeAll(2.0)
        if self.host is not None:
            await self.host.stop(5.0)
            self.host.cleanup()

    def _touchApplication(self, number: int) -> None:
        """
        Change the application's source, so that module reload has
        something to reload.
        """
        assert self.host is not None
        from ..bench._app import APP_MODULE

        path = self.host.workdir.child(APP_MODULE + ".py").path
        with open(path, "a") as f:
            f.write("# chaos round {}\n".format(number))

    async def _findChild(
        self, parent: int, role: str, until: Deferred[Any]
    ) -> int | None:
        """
        Wait for a child of C{parent} in C{role}, while C{until} has not
        fired.
        """
        while not until.called:
            for child in childrenOf(parent):
                if roleOf(child) == role:
                    return child
            await deferLater(self.reactor, 0.005, lambda: None)
        return None

    async def _inject(
        self, record: Round, oldPid: int, upgrading: Deferred[Any], undo: list[Any]
    ) -> set[int]:
        """
        Inject C{record.fault} after C{record.delay} seconds (or, for a
        child, as soon as it runs after that).

        @return: the processes killed.
        """
        fault = record.fault
        killed: set[int] = set()
        if fault in _CHILD_FAULTS and not (
            fault == "fd-limit" and record.strategy == "reexec"
        ):
            return await self._injectInChild(record, oldPid, upgrading)
        await deferLater(self.reactor, record.delay, lambda: None)
        if fault in ("kill-old", "stop-old", "client-reset") and upgrading.called:
            record.injected = "too late (migration over)"
            return killed
        if fault == "kill-old":
            signalQuietly(oldPid)
            killed.add(oldPid)
            record.injected = "killed {}".format(oldPid)
        elif fault == "stop-old":
            pause = self.rng.uniform(0.2, 1.5)
            signalQuietly(oldPid, signal.SIGSTOP)
            undo.append(lambda: signalQuietly(oldPid, signal.SIGCONT))
            record.injected = "stopped {} for {:.1f} s".format(oldPid, pause)
            await deferLater(self.reactor, pause, lambda: None)
            signalQuietly(oldPid, signal.SIGCONT)
        elif fault == "client-reset":
            assert self.load is not None
            alive = self.load.alive()
            chosen = self.rng.sample(alive, max(1, len(alive) // 3)) if alive else []
            for client in chosen:
                # Its requests in flight are its own to lose.
                client.pending.clear()
                client.closing = True
                transport: Any = client.transport
                if transport is not None:
                    transport.abortConnection()
            record.injected = "reset {} clients".format(len(chosen))
        return killed

    async def _injectInChild(
        self, record: Round, oldPid: int, upgrading: Deferred[Any]
    ) -> set[int]:
        """
        Inject a fault into the successor or the trial child, C{record.delay}
        seconds after it started (if it still runs then).
        """
        fault = record.fault
        role = "trial" if "trial" in fault else "successor"
        child = await self._findChild(oldPid, role, upgrading)
        if child is None:
            record.injected = "no {} seen".format(role)
            return set()
        await deferLater(self.reactor, record.delay, lambda: None)
        if not pidAlive(child):
            record.injected = "{} {} gone before".format(role, child)
            return set()
        if fault.startswith("kill"):
            signalQuietly(child)
            record.injected = "killed {} {}".format(role, child)
            return {child}
        if fault.startswith("stop"):
            signalQuietly(child, signal.SIGSTOP)
            record.halted.append(child)
            record.injected = "stopped {} {}".format(role, child)
            return set()
        held = descriptorCount(child) or 8
        setLimit(child, resource.RLIMIT_NOFILE, held + 2)
        record.injected = "{} {} limited to {} fds".format(role, child, held + 2)
        return set()

    def _prepare(self, record: Round, oldPid: int, undo: list[Any]) -> None:
        """
        Faults set before the migration starts.
        """
        if record.fault == "fd-limit" and record.strategy == "reexec":
            held = descriptorCount(oldPid) or 64
            previous = setLimit(oldPid, resource.RLIMIT_NOFILE, held + 4)
            if previous is not None:
                undo.append(
                    lambda: setLimit(oldPid, resource.RLIMIT_NOFILE, previous[0])
                )
            record.injected = "limited to {} fds".format(held + 4)
        elif record.fault == "disk-full":
            previous = setLimit(oldPid, resource.RLIMIT_FSIZE, 0)
            if previous is not None:
                undo.append(lambda: setLimit(oldPid, resource.RLIMIT_FSIZE, None))
            record.injected = "no file may grow"

    async def runRound(self, number: int) -> Round:
        options = self.options
        rng = self.rng
        strategy = rng.choice(options["strategies"])
        choices = faultsFor(strategy, options["faults"]) or faultsFor(
            strategy, ["none"]
        )
        fault = rng.choice(choices).name
        inChild = fault in _CHILD_FAULTS and not (
            fault == "fd-limit" and strategy == "reexec"
        )
        record = Round(
            number, strategy, fault, rng.uniform(0.0, 0.8 if inChild else 0.5)
        )
        host = self.host
        load = self.load
        assert host is not None and load is not None
        missing = self.options["clients"] - len(load.alive())
        if missing > 0:
            await load.connect(missing)
        self._counters = self._requestCounters()
        oldPid = host.servingPid
        assert oldPid is not None
        if strategy == "reload":
            self._touchApplication(number)
        undo: list[Any] = []
        self._prepare(record, oldPid, undo)
        upgrading: Deferred[Any] = host.upgrade(
            "--strategy", strategy, "--timeout", str(self.readyTimeout * 6 + 20)
        )
        injecting = ensureDeferred(self._inject(record, oldPid, upgrading, undo))
        report: dict[str, Any] | None = None
        try:
            code, report, stderr = await upgrading
        except HostFailed as e:
            record.outcome = "no report"
            record.reason = str(e).splitlines()[0][:200]
        else:
            record.outcome = str(report.get("outcome", "?"))
            record.reason = str(report.get("reason") or "")
        killed: set[int] = await injecting
        for action in undo:
            action()
        # A new serving process inherits the limits a fault set.
        await self._settle(record, report, killed)
        return record

    async def _servingStatus(self) -> dict[str, Any] | None:
        assert self.host is not None
        deadline = self.reactor.seconds() + self.readyTimeout
        while self.reactor.seconds() < deadline:
            asking = self.host.status()
            # A stopped host accepts the connection and never answers.
            asking.addTimeout(max(0.5, deadline - self.reactor.seconds()), self.reactor)
            try:
                status: dict[str, Any] = await asking
            except Exception:
                await deferLater(self.reactor, 0.1, lambda: None)
                continue
            return status
        return None

    async def _settle(
        self, record: Round, report: dict[str, Any] | None, killed: set[int]
    ) -> None:
        host = self.host
        load = self.load
        assert host is not None and load is not None
        status = await self._servingStatus()
        if status is None:
            newPid = (report or {}).get("newPid")
            expected = (
                bool(killed)
                and (
                    record.fault == "kill-old"
                    or (record.outcome == "success" and newPid in killed)
                )
            ) or (
                # A successor stopped after its commit is the serving process,
                # stopped for good: nothing can answer, as if it were killed.
                record.outcome == "success"
                and newPid in record.halted
            )
            if not expected:
                record.violations.append("no status within the ready timeout")
            # Only a killed (or stopped) serving process excuses its
            # connections.
            self._countLost(
                record, killed | set(record.halted), report, everything=expected
            )
            await self._orphans(record)
            record.restarted = True
            self.say(
                "round {}: nothing serves; starting a new host".format(record.number)
            )
            await self._restart()
            return
        else:
            host.servingPid = int(status["pid"])
            # A successor a fault limited may serve now: the next rounds
            # start from the host's own limits again.
            setLimit(host.servingPid, resource.RLIMIT_FSIZE, None)
            setLimit(
                host.servingPid,
                resource.RLIMIT_NOFILE,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
        answered = await _probe(self.reactor, self.port, self.readyTimeout)
        record.answeredIn = None if answered is None else round(answered, 3)
        if answered is None:
            record.violations.append("no answer within the ready timeout")
        if report is None and not killed:
            record.violations.append("no report: " + record.reason)
        elif report is not None and record.outcome != "success" and not record.reason:
            record.violations.append(
                "a {} report without a reason".format(record.outcome)
            )
        if record.fault == "none" and record.outcome != "success":
            record.violations.append("no fault, yet " + record.outcome)
        await load.settle(self.readyTimeout)
        self._countLost(record, killed, report)
        await self._leftovers(record, status)

    def _countLost(
        self,
        record: Round,
        killed: set[int],
        report: dict[str, Any] | None,
        everything: bool = False,
    ) -> None:
        load = self.load
        assert load is not None
        killedNames = {b"%d" % pid for pid in killed}
        newPid = (report or {}).get("newPid")
        outcome = (report or {}).get("outcome")
        # A successor killed after its commit owned every connection.
        successorOwned = bool(
            killed
            and record.fault == "kill-successor"
            and (report is None or (outcome == "success" and newPid in killed))
        )
        serving = b"%d" % (self.host.servingPid or 0) if self.host else b""
        drainedLines = 0
        for client in load.clients:
            if client.lost is None or id(client) in self._seenLost:
                continue
            self._seenLost.add(id(client))
            if everything or successorOwned or client.server in killedNames:
                record.excused += 1
            elif client.lost == "closed" and client.server not in (None, serving):
                # Closed cleanly by an older generation at its drain
                # deadline, as promised (what it had not answered yet goes
                # with it: a line protocol has no polite ending).
                record.drained += 1
                drainedLines += getattr(client, "unansweredAtEnd", 0)
            else:
                record.lost += 1
        before = self._counters
        self._counters = self._requestCounters()
        lostLines, duplicated, stateErrors = self._counters
        unanswered = lostLines - before[0] - drainedLines
        if record.lost:
            record.violations.append("{} connections lost".format(record.lost))
        if not killed:
            if unanswered > 0:
                record.violations.append("{} requests unanswered".format(unanswered))
            if stateErrors > before[2]:
                record.violations.append(
                    "{} state jumps".format(stateErrors - before[2])
                )
        if duplicated > before[1]:
            record.violations.append(
                "{} duplicated or malformed answers".format(duplicated - before[1])
            )

    async def _leftovers(self, record: Round, status: dict[str, Any] | None) -> None:
        """
        Wait (bounded) until only the serving process and the generations
        still draining are alive; record the rest and end them.
        """
        host = self.host
        assert host is not None and host.sessionIds
        session = host.sessionIds[-1]
        deadline = self.reactor.seconds() + self.readyTimeout + 3
        extra: list[int] = []
        while True:
            status = await self._servingStatus() or status or {}
            expected = {int(status.get("pid", host.servingPid or 0))}
            expected.update(int(each["pid"]) for each in status.get("draining", []))
            alive = sessionProcesses(session)
            extra = [pid for pid in alive if pid not in expected]
            stopped = [pid for pid in alive if isStopped(pid)]
            if (not extra and not stopped) or self.reactor.seconds() > deadline:
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        if extra or stopped:
            record.leftBehind = sorted(set(extra) | set(stopped))
            record.violations.append(
                "left behind: {}".format(
                    ", ".join(
                        "{}{}".format(pid, " (stopped)" if pid in stopped else "")
                        for pid in record.leftBehind
                    )
                )
            )
            for pid in record.leftBehind:
                if pid not in expected:
                    signalQuietly(pid)
                else:
                    signalQuietly(pid, signal.SIGCONT)
        serving = int(status.get("pid", host.servingPid or 0))
        if len(sessionProcesses(session)) == 1 and pidAlive(serving):
            held = descriptorCount(serving)
            assert self.load is not None
            if held is not None:
                overhead = held - len(self.load.alive())
                record.descriptors = overhead
                if self.baseline is None:
                    self.baseline = overhead
                elif overhead > self.baseline + _DESCRIPTOR_SLACK:
                    record.violations.append(
                        "{} descriptors beyond its clients (at the start: {})".format(
                            overhead, self.baseline
                        )
                    )

    async def _orphans(self, record: Round) -> None:
        """
        Nothing serves: wait (bounded) until no process of the host's
        session is left (a successor or trial child must end by itself
        once the process it belonged to is gone); record the rest.
        """
        host = self.host
        assert host is not None and host.sessionIds
        session = host.sessionIds[-1]
        # What the fault stopped for good is the campaign's to end.
        for pid in record.halted:
            signalQuietly(pid)
        deadline = self.reactor.seconds() + self.readyTimeout + 3
        while sessionProcesses(session) and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1, lambda: None)
        left = sessionProcesses(session)
        if left:
            record.leftBehind = left
            record.violations.append(
                "left behind once nothing served: {}".format(
                    ", ".join(
                        "{}{}".format(pid, " (stopped)" if isStopped(pid) else "")
                        for pid in left
                    )
                )
            )

    async def _restart(self) -> None:
        assert self.host is not None and self.load is not None
        await self.load.stop(0)
        await self.load.closeAll(1.0)
        self.host.cleanup()
        await self.startHost()

    async def run(self) -> list[Round]:
        self.say(
            "seed {}; host on 127.0.0.1:{}".format(self.options["seed"], self.port)
        )
        await self.startHost()
        # The descriptors before the first round: the baseline.
        await self._leftovers(Round(0, "-", "-", 0.0), None)
        try:
            for number in range(1, self.options["rounds"] + 1):
                record = await self.runRound(number)
                self.rounds.append(record)
                self.say(_row(record))
        finally:
            await self.stop()
        return self.rounds


_COLUMNS = (
    ("round", 5),
    ("strategy", 10),
    ("fault", 14),
    ("at s", 5),
    ("injected", 30),
    ("outcome", 10),
    ("answer s", 8),
    ("lost", 4),
    ("excused", 7),
    ("drained", 7),
    ("verdict", 0),
)


def _row(record: Round) -> str:
    values = (
        str(record.number),
        record.strategy,
        record.fault,
        "{:.2f}".format(record.delay),
        record.injected[:30],
        record.outcome + ("*" if record.restarted else ""),
        "-" if record.answeredIn is None else "{:.3f}".format(record.answeredIn),
        str(record.lost),
        str(record.excused),
        str(record.drained),
        "ok" if not record.violations else "VIOLATED: " + "; ".join(record.violations),
    )
    return "  ".join(
        value.ljust(width) if width else value
        for value, (name, width) in zip(values, _COLUMNS)
    ).rstrip()


def formatTable(rounds: Sequence[Round], seed: str) -> str:
    """
    The campaign's table, with a closing summary line.
    """
    header = "  ".join(
        name.ljust(width) if width else name for name, width in _COLUMNS
    ).rstrip()
    lines = [header, "-" * len(header)]
    lines.extend(_row(each) for each in rounds)
    broken = [each for each in rounds if each.violations]
    tried: dict[str, int] = {}
    for each in rounds:
        tried[each.fault] = tried.get(each.fault, 0) + 1
    lines.append("")
    lines.append(
        "seed {}: {} rounds, faults tried: {}; {} rounds held every invariant, "
        "{} broke one".format(
            seed,
            len(rounds),
            ", ".join("{} x{}".format(name, n) for name, n in sorted(tried.items())),
            len(rounds) - len(broken),
            len(broken),
        )
    )
    lines.append("(* nothing served after the round: a new host was started)")
    return "\n".join(lines) + "\n"


async def runCampaign(reactor: Any, options: CampaignOptions, out: IO[str]) -> int:
    """
    Run the campaign the options describe; print its table.

    @return: the exit status: 0 if every invariant held, 1 otherwise.
    """
    campaign = Campaign(reactor, options, out)
    rounds = await campaign.run()
    out.write(formatTable(rounds, options["seed"]))
    out.flush()
    if options["json"]:
        with open(options["json"], "w") as f:
            json.dump(
                {"seed": options["seed"], "rounds": [r.toJSON() for r in rounds]},
                f,
                indent=1,
            )
    return 1 if any(each.violations for each in rounds) else 0


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{python -m migrate.chaos} entry point.
    """
    options = CampaignOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.stderr.write("{}\n{}\n".format(options, e))
        raise SystemExit(2)
    from ..bench._runner import raiseDescriptorLimit

    raiseDescriptorLimit(options["clients"] * 4 + 1024)

    async def _main(reactor: Any) -> None:
        code = await runCampaign(reactor, options, sys.stdout)
        if code:
            raise SystemExit(code)

    react(lambda reactor: ensureDeferred(_main(reactor)))
