"""
The raw floor for moving established connections between processes: what
the kernel and Python alone cost, with none of migrate's work (no state,
no freezing, no AMP, no Twisted).

A I{sender} process accepts N real loopback TCP connections (whose client
ends the caller holds), starts a I{receiver} child connected by a
socketpair, and times sending the N descriptors with plain
C{socket.send_fds} in batches of up to 253 until the receiver, which wraps
each descriptor it receives in a C{socket.socket} object, says it has them
all.

Run by the benchmark as C{python -m migrate.bench._floor sender} (and the
sender runs C{... receiver FD COUNT}); L{measureFloor} drives it.

Re-exec has a second floor, L{startFloor}: a new image must start the
interpreter and import twistd and the reactor before it can restore
anything.  L{byteCompile} first compiles the package measured, as
C{pip install} does, so that no new image pays for compiling it.
"""

from __future__ import annotations

import compileall
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["measureFloor", "BATCH", "byteCompile", "startFloor"]

BATCH = 253
"""
The most descriptors Linux accepts in one C{SCM_RIGHTS} message.
"""

_ACCEPT_TIMEOUT = 60.0


def _environment() -> dict[str, str]:
    from ._process import SOURCE_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [SOURCE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def measureFloor(count: int, repeat: int = 5, timeout: float = 120.0) -> dict[str, Any]:
    """
    Time moving C{count} established connections with nothing but
    C{send_fds}, C{recv_fds} and C{socket.socket(fileno=...)}.

    Blocking: run it in a thread or outside the reactor.  This process holds
    the C{count} client ends meanwhile (so it needs C{count} spare
    descriptors); the sender holds the server ends.

    @param count: how many connections move.
    @param repeat: how many times the same descriptors move; the fastest
        run is the floor.

    @return: C{{"count", "seconds" (fastest), "runs" (every run's
        seconds), "perSecond"}}.
    """
    if count < 1:
        raise ValueError("count must be positive")
    sender = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migrate.bench._floor",
            "sender",
            str(count),
            str(repeat),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_environment(),
    )
    clients: list[socket.socket] = []
    try:
        assert sender.stdout is not None and sender.stdin is not None
        port = int(sender.stdout.readline())
        deadline = time.monotonic() + timeout
        for _ in range(count):
            if time.monotonic() > deadline:
                raise TimeoutError("connecting the floor's clients took too long")
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        line = sender.stdout.readline()
        if not line:
            raise RuntimeError("the floor's sender exited without a result")
        result: dict[str, Any] = json.loads(line)
        sender.stdin.close()
        sender.wait(timeout=30)
        return result
    finally:
        for client in clients:
            client.close()
        if sender.poll() is None:
            sender.kill()
            sender.wait()


def byteCompile() -> None:
    """
    Byte-compile the package measured, as C{pip install} does: a new image
    would otherwise compile every module it imports from source when
    bytecode cannot be written (C{PYTHONDONTWRITEBYTECODE}, a read-only
    tree), which is not what a deployment pays.
    """
    import migrate

    compileall.compile_dir(os.path.dirname(os.path.abspath(migrate.__file__)), quiet=2)


def startFloor(runs: int = 5) -> float:
    """
    How long this interpreter takes to start and import twistd and the
    reactor, here and now (the median of C{runs}): the part of a re-exec's
    suspension no code of migrate's can shorten, and a yardstick for how
    fast the machine runs at the moment.

    Blocking: run it in a thread or outside the reactor.

    @return: seconds.
    """
    times = []
    env = {k: v for k, v in _environment().items() if not k.startswith("MIGRATE_")}
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import twisted.scripts.twistd, twisted.internet.reactor",
            ],
            check=True,
            env=env,
            timeout=60,
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sender(count: int, repeat: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Start the receiver before holding thousands of descriptors.
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migrate.bench._floor",
            "receiver",
            str(theirs.fileno()),
            str(count),
            str(repeat),
        ],
        pass_fds=[theirs.fileno()],
        env=_environment(),
    )
    theirs.close()
    if ours.recv(1) != b"r":
        raise RuntimeError("the floor's receiver did not start")
    print(listener.getsockname()[1], flush=True)
    listener.settimeout(_ACCEPT_TIMEOUT)
    accepted = [listener.accept()[0] for _ in range(count)]
    fds = [each.fileno() for each in accepted]
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            socket.send_fds(ours, [b"x"], fds[start : start + BATCH])
        if ours.recv(1) != b"k":
            raise RuntimeError("the floor's receiver failed")
        runs.append(time.perf_counter() - started)
    ours.close()
    receiver.wait(timeout=30)
    best = min(runs)
    print(
        json.dumps(
            {"count": count, "seconds": best, "runs": runs, "perSecond": count / best}
        ),
        flush=True,
    )
    sys.stdin.read()
    for each in accepted:
        each.close()


def _receiver(fd: int, count: int, repeat: int) -> None:
    channel = socket.socket(fileno=fd)
    channel.sendall(b"r")
    for _ in range(repeat):
        wrapped: list[socket.socket] = []
        while len(wrapped) < count:
            data, fds, flags, _ = socket.recv_fds(channel, 1, BATCH)
            if flags & socket.MSG_CTRUNC:
                raise RuntimeError("descriptors truncated: raise RLIMIT_NOFILE")
            if not data:
                raise RuntimeError("the sender went away")
            wrapped.extend(socket.socket(fileno=each) for each in fds)
        channel.sendall(b"k")
        for each in wrapped:
            each.close()


def main(argv: list[str]) -> None:
    """
    C{sender COUNT REPEAT} or C{receiver FD COUNT REPEAT}.
    """
    if argv[:1] == ["sender"]:
        _sender(int(argv[1]), int(argv[2]))
    elif argv[:1] == ["receiver"]:
        _receiver(int(argv[1]), int(argv[2]), int(argv[3]))
    else:
        raise SystemExit("usage: python -m migrate.bench._floor sender COUNT REPEAT")


if __name__ == "__main__":
    main(sys.argv[1:])
