"""
Benchmark of re-exec: C{python -m migrate.bench.reexec}.

Starts a real C{twistd -n migrate-host --strategy reexec} serving
L{migrate.bench._app}, opens 1,000 and then 10,000 client connections, and
re-executes the host while a few probe clients keep sending requests.  It
prints the suspension the clients see, split as the host measured it into
I{capture} (freeze every connection and write the state), I{exec} (from
C{execv} until the new image starts restoring: the interpreter starting
and importing Twisted, twistd and the application) and I{restore} (adopt
the listener and every connection and resume them), next to the longest
wait a probe client measured itself.  The preflight check (the new code
loading in a separate process) runs before the freeze, while the old image
still serves; it is printed apart.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from ._floor import byteCompile, startFloor
from ._process import LAUNCHER, SOURCE_ROOT

__all__ = ["main", "summarize"]


TARGET_MS = 300.0
"""
The suspension aimed at for 1,000 connections, end to end.
"""

ABOVE_FLOOR_TARGET_MS = 50.0
"""
Issue 16's aim at 10,000 connections: the longest wait of a client at
most this much above the floor (the new image's start).
"""


def _relativeToFloor(milliseconds: float) -> str:
    """
    A difference from the floor in words: C{"12 ms above the floor"} or
    C{"208 ms below the floor"} (with the caretaker serving while the new
    image starts, the clients wait less than that start).
    """
    return "{:.0f} ms {} the floor".format(
        abs(milliseconds), "below" if milliseconds < 0 else "above"
    )


def summarize(count: int, rounds: Sequence[dict[str, Any]], floor: float) -> str:
    """
    One connection count's summary: the suspension's median and range with
    its phases, the clients' longest wait (median), both against the floor,
    and the verdicts: the suspension against L{TARGET_MS} at 1,000
    connections, the clients' wait against the floor plus
    L{ABOVE_FLOOR_TARGET_MS} at 10,000 (issue 16).

    @param rounds: the rounds' results for C{count} (seconds).
    @param floor: the new image's start (seconds; L{startFloor}).
    """
    suspensions = [result["suspension"] * 1000 for result in rounds]
    median = statistics.median(suspensions)

    def phase(name: str) -> float:
        return statistics.median(float(result[name]) * 1000 for result in rounds)

    wait = phase("clientMax")
    summary = (
        "{:,} connections: suspension {:.0f} ms (median of {} rounds, {:.0f} "
        "to {:.0f}; capture {:.0f}, exec {:.0f}, restore {:.0f}), {}; longest "
        "client wait {:.0f} ms (median), {}".format(
            count,
            median,
            len(rounds),
            min(suspensions),
            max(suspensions),
            phase("capture"),
            phase("exec"),
            phase("restore"),
            _relativeToFloor(median - floor * 1000),
            wait,
            _relativeToFloor(wait - floor * 1000),
        )
    )
    if count == 1000:
        summary += "; the suspension {} the {:.0f} ms target".format(
            "meets" if median <= TARGET_MS else "misses", TARGET_MS
        )
    if count == 10000:
        summary += "; the wait {} the target (the floor + {:.0f} ms)".format(
            "meets" if wait <= floor * 1000 + ABOVE_FLOOR_TARGET_MS else "misses",
            ABOVE_FLOOR_TARGET_MS,
        )
    return summary


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [SOURCE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def _raiseDescriptorLimit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Host:
    """
    A C{twistd -n migrate-host --strategy reexec} in its own session.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.workdir = tempfile.mkdtemp(prefix="migrate-bench-reexec-", dir="/tmp")
        self.control = os.path.join(self.workdir, "control.sock")
        self.log = os.path.join(self.workdir, "host.log")
        argv = [
            sys.executable,
            "-c",
            LAUNCHER,
            "-n",
            "--pidfile",
            os.path.join(self.workdir, "twistd.pid"),
            "--logfile",
            self.log,
            "migrate-host",
            "--control",
            self.control,
            "--app",
            "migrate.bench._app:makeFactory",
            "--listen",
            "tcp:{}:interface=127.0.0.1:backlog=4096".format(port),
            "--strategy",
            "reexec",
        ]
        self.process = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def cli(self, *arguments: str, timeout: float = 300) -> tuple[int, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "migrate",
                *arguments,
                "--control",
                self.control,
                "--json",
            ],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=timeout,
        )
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        return done.returncode, json.loads(lines[-1]) if lines else None

    def waitServing(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the host exited:\n" + self.logTail())
            if os.path.exists(self.control):
                code, status = self.cli("status")
                if code == 0:
                    result: dict[str, Any] = status
                    return result
            time.sleep(0.1)
        raise RuntimeError("the host did not answer:\n" + self.logTail())

    def logTail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _connectAll(port: int, count: int) -> list[socket.socket]:
    """
    Open C{count} connections and make sure each is served (one request
    answered), so that each has a protocol in the host.
    """
    clients = []
    selector = selectors.DefaultSelector()
    try:
        for start in range(0, count, 500):
            batch = []
            for _ in range(min(500, count - start)):
                client = socket.create_connection(("127.0.0.1", port), timeout=30)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.sendall(b"0 hello\n")
                client.setblocking(False)
                batch.append(client)
                selector.register(client, selectors.EVENT_READ)
            waiting = set(batch)
            deadline = time.monotonic() + 60
            while waiting and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock.recv(4096):
                        waiting.discard(sock)
                        selector.unregister(sock)
            if waiting:
                raise RuntimeError("{} connections got no answer".format(len(waiting)))
            clients.extend(batch)
    finally:
        selector.close()
    return clients


class _Probe(threading.Thread):
    """
    Sends one request at a time on a few connections, round robin, and
    records how long each answer took.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        threading.Thread.__init__(self, daemon=True)
        self.sockets = sockets
        self.latencies: list[float] = []
        #: when each request was sent (C{time.perf_counter()})
        self.sentAt: list[float] = []
        self.stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        for sock in self.sockets:
            sock.setblocking(True)
            sock.settimeout(30)
        number = 0
        try:
            while not self.stopping.is_set():
                sock = self.sockets[number % len(self.sockets)]
                number += 1
                started = time.perf_counter()
                sock.sendall(b"%d probe\n" % number)
                received = b""
                while not received.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("probe connection closed")
                    received += chunk
                self.latencies.append(time.perf_counter() - started)
                self.sentAt.append(started)
                time.sleep(0.001)
        except Exception as e:
            self.error = "{}: {}".format(type(e).__name__, e)


def _checkAll(clients: list[socket.socket], pid: int) -> int:
    """
    Send one request on every connection; count those answered by C{pid}
    with their count carried over (at least 2).
    """
    good = 0
    for client in clients:
        client.setblocking(True)
        client.settimeout(30)
        client.sendall(b"9 check\n")
        received = b""
        while not received.endswith(b"\n"):
            chunk = client.recv(4096)
            if not chunk:
                break
            received += chunk
        fields = received.split()
        if len(fields) >= 3 and int(fields[1]) == pid and int(fields[2]) >= 2:
            good += 1
    return good


def _measure(count: int, probes: int) -> dict[str, Any]:
    port = _freePort()
    host = _Host(port)
    clients: list[socket.socket] = []
    try:
        status = host.waitServing()
        pid = status["pid"]
        clients = _connectAll(port, count)
        probe = _Probe(clients[:: max(1, count // probes)][:probes])
        probe.start()
        time.sleep(0.5)
        before = len(probe.latencies)
        started = time.perf_counter()
        code, report = host.cli("upgrade")
        elapsed = time.perf_counter() - started
        time.sleep(0.5)
        probe.stopping.set()
        probe.join(30)
        if code != 0 or report is None or report.get("outcome") != "success":
            raise RuntimeError(
                "the re-exec failed: {}\n{}".format(report, host.logTail())
            )
        during = probe.latencies[before:]
        longest = sorted(
            zip(during, probe.sentAt[before:]), key=lambda each: each[0], reverse=True
        )[:3]
        kept = _checkAll(clients, pid)
        durations = report["durations"]
        return {
            "connections": count,
            "preflight": durations.get("preflight", 0.0),
            "trial": durations.get("trial", 0.0),
            "capture": durations.get("capture", 0.0),
            "exec": durations.get("exec", 0.0),
            "restore": durations.get("restore", 0.0),
            "suspension": durations.get("suspension", 0.0),
            "clientMax": max(during) if during else float("nan"),
            "probeError": probe.error,
            "moved": report["moved"],
            "failed": report["failed"],
            "kept": kept,
            "command": elapsed,
            "durations": durations,
            # The longest waits, and when each began, from the upgrade
            # command's start.
            "longest": [(wait, at - started) for wait, at in longest],
        }
    finally:
        for client in clients:
            client.close()
        host.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the benchmark and print its figures.
    """
    parser = argparse.ArgumentParser(prog="python -m migrate.bench.reexec")
    parser.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[1000, 10000],
        help="connection counts to measure (default: 1000 10000)",
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=20,
        help="connections that keep sending (default 20)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="measurements per count (default 5); the verdict is on their median",
    )
    parser.add_argument(
        "--durations",
        action="store_true",
        help="also print every phase the host reported, in ms",
    )
    options = parser.parse_args(argv)
    limit = _raiseDescriptorLimit(max(options.connections) + 200)
    byteCompile()
    print(
        "re-exec: the suspension clients see, in ms (host-measured phases; "
        "Python {} at {}; RLIMIT_NOFILE {}; pyOpenSSL {})".format(
            platform.python_version(),
            os.path.realpath(sys.executable),
            limit,
            (
                "installed: Twisted's TCP support imports it at start"
                if importlib.util.find_spec("OpenSSL") is not None
                else "not installed"
            ),
        )
    )
    floor = startFloor()
    print(
        "Python starting and importing twistd and the reactor takes {:.0f} ms "
        "here now: the floor of the exec phase".format(floor * 1000)
    )
    header = (
        "{:>11} {:>9} {:>7} {:>8} {:>8} {:>8} {:>11} {:>11} {:>6} {:>6} {:>6}".format(
            "connections",
            "preflight",
            "trial",
            "capture",
            "exec",
            "restore",
            "suspension",
            "client max",
            "moved",
            "failed",
            "kept",
        )
    )
    print(header)
    results = []
    for count in options.connections:
        # The host and this process each hold one end of every connection.
        if count + 200 > limit:
            print("{:>11} skipped: RLIMIT_NOFILE {} is too low".format(count, limit))
            continue
        for _ in range(options.rounds):
            result = _measure(count, options.probes)
            results.append(result)
            print(
                "{connections:>11} {preflight:>9.0f} {trial:>7.0f} {capture:>8.1f} "
                "{exec:>8.1f} "
                "{restore:>8.1f} {suspension:>11.1f} {clientMax:>11.1f} {moved:>6} "
                "{failed:>6} {kept:>6}".format(
                    **{
                        key: (value * 1000 if isinstance(value, float) else value)
                        for key, value in result.items()
                        if key not in ("durations", "longest")
                    }
                )
            )
            if options.durations:
                print(
                    "    "
                    + ", ".join(
                        "{} {:.1f}".format(name, seconds * 1000)
                        for name, seconds in result["durations"].items()
                    )
                )
                print(
                    "    longest client waits: "
                    + ", ".join(
                        "{:.1f} from {:.1f}".format(wait * 1000, at * 1000)
                        for wait, at in result["longest"]
                    )
                )
            if result["probeError"]:
                print("    probe: " + result["probeError"])
    for count in options.connections:
        rounds = [result for result in results if result["connections"] == count]
        if rounds:
            print(summarize(count, rounds, floor))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
