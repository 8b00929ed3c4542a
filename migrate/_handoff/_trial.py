# -*- test-case-name: migrate.test.test_trial -*-
"""
Trying the new code before the point of no return: the in-place
strategies (re-exec, module reload) first run the new code in a child
process, on copies of the live connections' states.

Once C{execv} has succeeded, or once module reload has imported the new
code into the serving process, a new code that hangs, crashes, exits or
refuses a state takes every connection with it.  So, while the old code
still serves and nothing is frozen, a child process:

  1. imports the new code and builds the application's factory, within
     the ready timeout (for re-exec, the very command line the new image
     will run, stopped once its options are parsed: the preflight);

  2. for each live connection whose protocol provides
     L{migrate.IMigratable}, builds a protocol with the new factory, gives
     it a stand-in transport (never the live socket: the child sees the
     application's code and the states, nothing else) and restores it
     from a copy of the connection's current state
     (C{upgradeMigrationState}, then C{restoreMigrationState}, as
     L{migrate.state.restoreProtocolState} does in the new image), within
     the ready timeout again.

States travel to the child as plain data (L{migrate._codec}), one
connection a line, on a pipe; the child answers on another pipe, one line
per step, and names the connection it is about to try before trying it,
so that a hang, a crash or an exit is pinned on that connection.

What a failed trial means is the caller's policy (L{TRIAL_POLICIES}): by
default the whole migration is refused and nothing in the serving process
changes; with C{close}, the connections the new code refused are closed
cleanly first and the others migrate (a connection that crashes or hangs
the child is set aside and the rest are tried again in a new child, at
most L{MAX_RESTARTS} times).

The parent half (L{casesFrom}, L{runTrial}) runs in the serving process;
the child half (L{runChild}) in the preflight process or in
L{migrate._handoff._trialchild}.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Callable, Iterable, Mapping, Sequence

from attrs import evolve, field, frozen
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._codec import MAX_DEPTH, MAX_STATE_BYTES, StateError, decodeState, encodeState
from .._host._priority import BackgroundStart
from .._host._spawning import spawnProcess

__all__ = [
    "MAX_RESTARTS",
    "TRIAL_POLICIES",
    "TRIAL_VARIABLE",
    "TrialCase",
    "TrialOutcome",
    "casesFrom",
    "runChild",
    "runTrial",
]

_log = Logger()

TRIAL_VARIABLE = "MIGRATE_TRIAL_FDS"
"""
Set in the environment of a trial child: C{"IN,OUT"}, the descriptor it
reads the states from and the one it writes its answers to.
"""

TRIAL_POLICIES = ("refuse", "close")
"""
What C{--trial-failure} accepts: I{refuse} the whole migration when the
new code fails on any connection (the default), or I{close} the
connections it fails on, cleanly, and migrate the others.
"""

MAX_RESTARTS = 4
"""
With the C{close} policy, how many connections that crash or hang the
trial child are set aside (each costing a new child) before the migration
is refused after all.
"""

_CHILD_IN = 3
_CHILD_OUT = 4

#: the largest line either side accepts: one connection's state, its
#: buffers in base64, and a little framing
_MAX_LINE = 4 * MAX_STATE_BYTES + 4096

#: a case nests its state two levels deeper than the state itself
_MAX_CASE_DEPTH = MAX_DEPTH + 2

#: how many things a child may say about itself (L{TrialOutcome.about})
_MAX_ABOUT = 16


@frozen
class TrialCase:
    """
    One live connection to try the new code on.

    @ivar ident: its number in this trial (from 1).
    @ivar listener: the key of the listener it was accepted on.
    @ivar peer: its peer address as plain data: C{["tcp4", host, port]},
        C{["tcp6", host, port]} or C{["unix", name]}.
    @ivar className: the qualified name of its protocol's class.
    @ivar state: its state's plain form (L{migrate.state.ProtocolState.toPlain}).
    @ivar connection: what the caller tracks it by (its
        L{migrate._host._tracking.HostedProtocol}); stays in this process.
    """

    ident: int
    listener: str
    peer: list[Any]
    className: str
    state: dict[str, Any]
    connection: Any = field(default=None, eq=False, repr=False)
    #: the encoded line, if encoded ahead (see L{casesFrom})
    line: bytes | None = field(default=None, eq=False, repr=False)

    def describe(self) -> str:
        """
        Name the connection for a person: its peer, listener and class.
        """
        if self.peer and self.peer[0] == "unix":
            where = "unix:{}".format(self.peer[1] or "?")
        elif len(self.peer) == 3:
            where = "{}:{}".format(self.peer[1], self.peer[2])
        else:
            where = "an unknown peer"
        return "the connection from {} on {} ({})".format(
            where, self.listener, self.className
        )

    def toLine(self) -> bytes:
        """
        Encode for the child: one line of plain data.
        """
        if self.line is not None:
            return self.line
        return (
            encodeState(
                {"id": self.ident, "peer": self.peer, "state": self.state},
                maxBytes=_MAX_LINE,
                maxDepth=_MAX_CASE_DEPTH,
            )
            + b"\n"
        )


@frozen
class TrialOutcome:
    """
    What trying the new code found.

    @ivar reason: why the migration must be refused, or L{None} if it may
        go on.
    @ivar tripped: the connection the trial tripped on, if one.
    @ivar closing: with the C{close} policy, the connections the new code
        failed on, each with why: close them cleanly before migrating.
    @ivar tried: how many connections the new code restored.
    @ivar children: how many trial processes ran.
    @ivar duration: seconds the trial took, from capturing the states to
        the last answer.
    @ivar restoring: of those, the seconds the new code took to restore
        the states once loaded (the rest is starting the child and loading
        the new code, which the re-exec preflight did before too).
    @ivar output: the last lines the child wrote (standard output and
        error).
    @ivar loaded: whether the new code loaded (imported, factory built).
    @ivar skipped: why connections were not tried although the code
        loaded, if they were not (a hosted plugin builds its factories
        only when it starts).
    @ivar about: what the new code said about itself as it loaded (see
        L{runChild}'s C{about}): names and whole numbers, such as the
        versions of the formats it reads; empty for code that says
        nothing (an older migrate).
    """

    reason: str | None
    tripped: TrialCase | None = None
    closing: tuple[tuple[TrialCase, str], ...] = ()
    tried: int = 0
    children: int = 0
    duration: float = 0.0
    restoring: float = 0.0
    output: tuple[str, ...] = ()
    loaded: bool = False
    skipped: str | None = None
    about: dict[str, int] = field(factory=dict)

    @property
    def passed(self) -> bool:
        """
        Whether the migration may go on.
        """
        return self.reason is None

    def notes(self) -> list[str]:
        """
        Lines for the migration report.
        """
        notes = []
        if self.passed:
            notes.append(
                "the new code was tried first in a child process: it loaded in "
                "{:.1f} ms and restored {} connection{} in {:.1f} ms".format(
                    (self.duration - self.restoring) * 1000,
                    self.tried,
                    "" if self.tried == 1 else "s",
                    self.restoring * 1000,
                )
            )
        if self.skipped:
            notes.append("connections not tried: " + self.skipped)
        for case, why in self.closing:
            notes.append(
                "closed before migrating, as --trial-failure close asks: {}: "
                "{}".format(case.describe(), why)
            )
        return notes


def _peerOf(connection: Any) -> list[Any]:
    try:
        peer = connection.getPeer()
    except Exception:
        return []
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return ["tcp6" if ":" in host else "tcp4", host, port]
    name = getattr(peer, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if name is None or isinstance(name, str):
        return ["unix", name]
    return []


def _qualified(cls: type) -> str:
    return "{}.{}".format(cls.__module__, cls.__qualname__)


def casesFrom(
    connections: Iterable[tuple[str, Any]], firstIdent: int = 1, encode: bool = False
) -> list[TrialCase]:
    """
    Copy the state of every live connection whose protocol provides
    L{migrate.IMigratable}, for a trial.

    A state that cannot be captured is left out: the strategy's own checks
    say so, with its own policy.

    @param connections: (listener key, L{HostedProtocol}) pairs.
    @param firstIdent: the number of the first case (for a caller that
        copies thousands of connections a slice at a time, between reactor
        turns).
    @param encode: whether to encode each case's line now (the same
        caller: the trial would otherwise encode them all at once).  The
        state is then encoded before the application runs again, and is
        not copied first (a third of the cost of a case).

    @return: one case per connection to try.
    """
    from ..state import captureProtocolState, isMigratable

    cases: list[TrialCase] = []
    for key, hosted in connections:
        protocol = getattr(hosted, "wrappedProtocol", None)
        if protocol is None or getattr(hosted, "released", False):
            continue
        if not isMigratable(protocol):
            continue
        try:
            state = captureProtocolState(protocol, snapshot=not encode)
        except Exception:
            continue
        case = TrialCase(
            firstIdent + len(cases),
            key,
            _peerOf(hosted),
            _qualified(type(protocol)),
            state.toPlain(),
            hosted,
        )
        if encode:
            try:
                case = evolve(case, line=case.toLine())
            except StateError:
                pass  # said when the trial starts
        cases.append(case)
    return cases


class _TrialProtocol(ProcessProtocol):
    """
    The parent's side of one trial child: feeds it the cases, follows its
    answers.
    """

    def __init__(self, cases: Sequence[TrialCase], readyMarker: str | None) -> None:
        self.cases = {case.ident: case for case in cases}
        self.lines = []
        for case in cases:
            try:
                self.lines.append(case.toLine())
            except StateError as e:
                # Beyond what one line may carry: not tried (the move itself
                # refuses such a state).
                _log.warn(
                    "Trial: not trying {connection}: {why}",
                    connection=case.describe(),
                    why=str(e),
                )
        self.readyMarker = readyMarker
        self.tail: deque[str] = deque(maxlen=20)
        self.ready = False
        self.loaded = False
        self.factory = True
        self.about: dict[str, int] = {}
        self.failed: str | None = None
        self.trying: int | None = None
        self.refused: list[tuple[int, str]] = []
        self.passed = 0
        self.done = False
        self.ended: Deferred[int | None] = Deferred()
        self.onLoaded: Callable[[], None] = lambda: None
        self.onDone: Callable[[], None] = lambda: None
        self.loadedAt: float | None = None
        self.restoring = 0.0
        self._partial: dict[int, bytes] = {1: b"", 2: b"", _CHILD_OUT: b""}
        self._oversized = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()
        # One write of every case: writing them one by one cost the
        # serving process 22 to 64 ms at 10,000 cases, in one reactor step.
        transport.writeToChild(_CHILD_IN, b"".join(self.lines))
        transport.closeChildFD(_CHILD_IN)
        self.lines = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if childFD == _CHILD_OUT:
            if len(rest) > _MAX_LINE:
                self._oversized = True
                rest = b""
        else:
            rest = rest[-8192:]
        self._partial[childFD] = rest
        for line in lines:
            if childFD == _CHILD_OUT:
                self._answer(line)
            else:
                self._output(line)

    def _output(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if self.readyMarker is not None and text == self.readyMarker:
            self.ready = True
        elif text:
            self.tail.append(text[:500])

    def _answer(self, raw: bytes) -> None:
        try:
            answer = decodeState(raw, maxBytes=_MAX_LINE, maxDepth=4)
        except StateError as e:
            self.failed = "the trial process answered nonsense: {}".format(e)
            return
        if not isinstance(answer, dict):
            self.failed = "the trial process answered nonsense"
            return
        if "loaded" in answer:
            self.loaded = True
            self.factory = bool(answer.get("factory", True))
            self.about = _about(answer.get("about"))
            self.onLoaded()
        elif "trying" in answer:
            self.trying = answer["trying"]
        elif "passed" in answer:
            self.passed += 1
            self.trying = None
        elif "refused" in answer:
            self.refused.append((answer["refused"], str(answer.get("reason", "?"))))
            self.trying = None
        elif "failed" in answer:
            self.failed = str(answer["failed"])
        elif "done" in answer:
            self.done = True
            self.onDone()

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self._partial[fd]:
                self._output(self._partial[fd])
        if self._partial[_CHILD_OUT] and not self._oversized:
            self._answer(self._partial[_CHILD_OUT])
        code: int | None = 0
        if reason.check(ProcessTerminated):
            code = getattr(reason.value, "exitCode", None)
            if code is None:
                code = -(getattr(reason.value, "signal", None) or 1)
        self.ended.callback(code)


@inlineCallbacks
def _runOnce(
    reactor: Any,
    argv: Sequence[str],
    env: Mapping[str, str],
    cases: Sequence[TrialCase],
    timeout: float,
    readyMarker: str | None,
    path: str | None,
    background: bool = False,
) -> Any:
    """
    Run one trial child on C{cases}, in the background if C{background}
    and this process may bring it forward after a tenth of C{timeout}
    (L{migrate._host._priority}).

    @return: a L{Deferred} firing with (the protocol, exit status, why it
        went wrong or L{None}, the case it went wrong on or L{None}).
    """
    protocol = _TrialProtocol(cases, readyMarker)
    environment = dict(env)
    environment[TRIAL_VARIABLE] = "{},{}".format(_CHILD_IN, _CHILD_OUT)
    starting = BackgroundStart.ifPossible(reactor, timeout) if background else None
    try:
        process = spawnProcess(
            reactor,
            protocol,
            argv[0],
            list(argv),
            env=environment,
            path=path,
            childFDs={0: "w", 1: "r", 2: "r", _CHILD_IN: "w", _CHILD_OUT: "r"},
            background=starting,
        )
    except OSError as e:
        return protocol, None, "cannot start the trial process: {}".format(e), None
    timedOut: list[str] = []

    def kill(stage: str) -> None:
        timedOut.append(stage)
        try:
            process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    timer = reactor.callLater(timeout, kill, "load")

    def loaded() -> None:
        nonlocal timer
        protocol.loadedAt = reactor.seconds()
        if timer.active():
            timer.cancel()
            timer = reactor.callLater(timeout, kill, "restore")

    protocol.onLoaded = loaded

    def done() -> None:
        if protocol.loadedAt is not None:
            protocol.restoring = reactor.seconds() - protocol.loadedAt

    protocol.onDone = done
    try:
        code = yield protocol.ended
    finally:
        if starting is not None:
            starting.ended()
    if protocol.loadedAt is not None and not protocol.done:
        protocol.restoring = reactor.seconds() - protocol.loadedAt
    if timer.active():
        timer.cancel()
    tripped = protocol.cases.get(protocol.trying) if protocol.trying else None
    last = protocol.tail[-1] if protocol.tail else "no output"
    if timedOut and timedOut[0] == "load":
        return (
            protocol,
            code,
            "the new code did not load within {} s".format(timeout),
            None,
        )
    if timedOut:
        if tripped is not None:
            why = "the new code did not restore {} within {} s".format(
                tripped.describe(), timeout
            )
        else:
            why = "the trial did not finish within {} s of loading".format(timeout)
        return protocol, code, why, tripped
    if protocol.failed is not None:
        return protocol, code, protocol.failed, None
    if tripped is not None:
        return (
            protocol,
            code,
            "the trial process {} while the new code restored {}: {}".format(
                _ending(code), tripped.describe(), last
            ),
            tripped,
        )
    if not protocol.loaded or code != 0 or (readyMarker and not protocol.ready):
        return (
            protocol,
            code,
            "the new code does not start ({}): {}".format(_ending(code), last),
            None,
        )
    if protocol.factory and not protocol.done:
        return (
            protocol,
            code,
            "the trial process {} before trying every connection: {}".format(
                _ending(code), last
            ),
            None,
        )
    return protocol, code, None, None


def _about(said: object) -> dict[str, int]:
    """
    What a child said about itself, kept only as far as it is names and
    whole numbers (and at most L{_MAX_ABOUT} of them).
    """
    if not isinstance(said, dict):
        return {}
    return {
        name: value
        for name, value in list(said.items())[:_MAX_ABOUT]
        if isinstance(name, str) and type(value) is int
    }


def _ending(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        return "was killed by signal {}".format(-code)
    return "exited with status {}".format(code)


@inlineCallbacks
def runTrial(
    reactor: Any,
    argv: Sequence[str],
    cases: Sequence[TrialCase],
    *,
    env: Mapping[str, str],
    timeout: float,
    policy: str = "refuse",
    readyMarker: str | None = None,
    path: str | None = None,
    timer: Callable[[], float] = time.monotonic,
    background: bool = False,
) -> Any:
    """
    Try the new code in a child process: C{argv} must load it and then call
    L{runChild} (the re-exec preflight does, as does
    L{migrate._handoff._trialchild}).

    @param cases: the connections to try (L{casesFrom}).
    @param env: the child's environment.
    @param timeout: seconds the child may take to load the new code, and
        again to restore every state.
    @param policy: one of L{TRIAL_POLICIES}.
    @param readyMarker: a line the child must print on its standard output
        to pass, if any.
    @param background: start each child at the lowest CPU priority, where
        this process may bring it forward again (after a tenth of
        C{timeout}): it serves nobody, and the clients of this process
        should not wait for a CPU while it starts.

    @return: a L{Deferred} firing with a L{TrialOutcome}; never fails.
    """
    if policy not in TRIAL_POLICIES:
        return TrialOutcome("unknown --trial-failure policy {!r}".format(policy))
    started = timer()
    remaining = list(cases)
    closing: list[tuple[TrialCase, str]] = []
    tried = 0
    children = 0
    restoring = 0.0
    while True:
        children += 1
        protocol, code, why, tripped = yield _runOnce(
            reactor, argv, env, remaining, timeout, readyMarker, path, background
        )
        tried += protocol.passed
        restoring += protocol.restoring
        output = tuple(protocol.tail)
        refused = [
            (protocol.cases[ident], reason)
            for ident, reason in protocol.refused
            if ident in protocol.cases
        ]

        def outcome(reason: str | None, **more: Any) -> TrialOutcome:
            return TrialOutcome(
                reason,
                closing=tuple(closing),
                tried=tried,
                children=children,
                duration=timer() - started,
                restoring=restoring,
                output=output,
                loaded=protocol.loaded,
                about=dict(protocol.about),
                **more,
            )

        if refused and policy == "refuse":
            case, reason = refused[0]
            return outcome(
                "the new code refused {}: {}".format(case.describe(), reason),
                tripped=case,
            )
        closing.extend(refused)
        if why is None:
            skipped = None
            if not protocol.factory and remaining:
                skipped = (
                    "the hosted application builds its factories only when it "
                    "starts; the new code loaded"
                )
            return outcome(None, skipped=skipped)
        if tripped is None or policy == "refuse" or children > MAX_RESTARTS:
            return outcome(why, tripped=tripped)
        closing.append((tripped, why))
        remaining = [case for case in remaining if case.ident > tripped.ident]
        _log.warn(
            "Trial: {why}; trying the connections after it in a new process",
            why=why,
        )


class _Answers:
    """
    The child's answers, one line each, written at once (so that the
    parent knows which connection a crash happened on).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, answer: dict[str, Any]) -> None:
        data = encodeState(answer, maxBytes=_MAX_LINE, maxDepth=4) + b"\n"
        while data:
            written = os.write(self.fd, data)
            data = data[written:]


def _readCases(fd: int) -> Iterable[bytes]:
    """
    The lines the parent wrote, until it closed the pipe.
    """
    with os.fdopen(fd, "rb", closefd=True) as stream:
        while True:
            line = stream.readline(_MAX_LINE + 1)
            if not line:
                return
            if len(line) > _MAX_LINE:
                raise StateError(
                    "a trial case is longer than {} bytes".format(_MAX_LINE)
                )
            yield line


def _address(peer: object) -> Any:
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    if isinstance(peer, list) and len(peer) == 3 and peer[0] in ("tcp4", "tcp6"):
        if isinstance(peer[1], str) and isinstance(peer[2], int):
            kind = IPv4Address if peer[0] == "tcp4" else IPv6Address
            return kind("TCP", peer[1], peer[2])
    if isinstance(peer, list) and len(peer) == 2 and peer[0] == "unix":
        name = peer[1]
        return UNIXAddress(name.encode("utf-8") if isinstance(name, str) else None)
    return IPv4Address("TCP", "0.0.0.0", 0)


def _describeError(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    return "{}: {}".format(name, text) if text else name


def tryConnection(factory: Any, case: object) -> None:
    """
    Restore one connection's state into a protocol the new factory builds,
    on a stand-in transport.

    @param case: a decoded trial case.

    @raise Exception: why the new code refused it.
    """
    from twisted.internet.testing import StringTransport

    from ..state import ProtocolState, restoreProtocolState

    if not isinstance(case, dict):
        raise StateError("a trial case is not an object")
    state = ProtocolState.fromPlain(case.get("state"), owned=True)
    address = _address(case.get("peer"))
    protocol = factory.buildProtocol(address)
    if protocol is None:
        raise StateError("the new factory refused it (buildProtocol returned None)")
    transport = StringTransport(peerAddress=address)
    protocol.transport = transport
    protocol.connected = 1
    restoreProtocolState(protocol, state, copyState=False)


def runChild(
    factory: Any,
    environ: Mapping[str, str] | None = None,
    about: Mapping[str, int] | None = None,
) -> bool:
    """
    The child's half: if this process is a trial child (L{TRIAL_VARIABLE}),
    try the new code on every state the parent sends, answering as it
    goes.

    @param factory: the new code's protocol factory, or L{None} if this
        process cannot build one before it starts (a hosted plugin).
    @param about: what the new code says about itself to the parent, with
        its first answer (the re-exec preflight: which state document
        format and caretaker protocol it speaks; see L{TrialOutcome.about}).

    @return: whether this process is a trial child (it then has nothing
        else to do but exit).
    """
    if environ is None:
        environ = os.environ
    spec = environ.get(TRIAL_VARIABLE)
    if not spec:
        return False
    inFd, outFd = (int(each) for each in spec.split(","))
    answers = _Answers(outFd)
    loaded: dict[str, Any] = {"loaded": True, "factory": factory is not None}
    if about:
        loaded["about"] = dict(about)
    answers.send(loaded)
    if factory is None:
        os.close(inFd)
        answers.send({"done": 0})
        return True
    try:
        factory.doStart()
    except Exception as e:
        answers.send({"failed": "the new factory does not start: " + _describeError(e)})
        return True
    tried = 0
    for line in _readCases(inFd):
        try:
            case = decodeState(line, maxBytes=_MAX_LINE, maxDepth=_MAX_CASE_DEPTH)
            ident = case["id"]
        except Exception as e:
            answers.send({"failed": "bad trial case: " + _describeError(e)})
            return True
        answers.send({"trying": ident})
        try:
            tryConnection(factory, case)
        except StateError as e:
            answers.send({"refused": ident, "reason": str(e)})
        except Exception as e:
            answers.send({"refused": ident, "reason": _describeError(e)})
        else:
            answers.send({"passed": ident})
        tried += 1
    try:
        factory.doStop()
    except Exception:
        pass
    answers.send({"done": tried})
    return True
