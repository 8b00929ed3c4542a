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
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

__all__ = ["measureFloor", "BATCH"]

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
