"""
Benchmark of HTTP keep-alive through upgrades: C{python -m migrate.bench.web}.

An unmodified C{twistd web} application (a C{Resource} answering its code
version) runs under C{migrate-host}; keep-alive clients send GET and POST
requests (alternating, each POST body numbered, never retried) while the
host is upgraded several times back to back.  Printed for each strategy:
failed requests, connections the server closed, POST bodies answered
wrongly, how long the old code went on answering after each C{upgrade}
returned, and how long each old process lived after its last answer.
HAProxy's and nginx's reloads run on the same load beside it when they are
installed (their backends do not change: only failures and closes count).

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections import deque
from typing import Any, Sequence

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater, react
from twisted.python.failure import Failure

from ._process import HostProcess, freePort, pidAlive, waitFor

__all__ = ["main"]

_APP = textwrap.dedent("""
    from twisted.web.resource import Resource

    VERSION = {version!r}


    class Root(Resource):
        isLeaf = True

        def render_GET(self, request):
            return VERSION

        def render_POST(self, request):
            return VERSION + b" " + request.content.read()
    """)


class _Client(Protocol):
    """
    One keep-alive client: a request, its answer, a pause, the next one.
    """

    def __init__(self, load: "_Load", index: int) -> None:
        self.load = load
        self.index = index
        self.buffer = b""
        self.waiting: deque[tuple[float, bytes | None]] = deque()

    def connectionMade(self) -> None:
        self.next()

    def next(self) -> None:
        load = self.load
        if not load.running or self.transport is None:
            return
        load.sequence += 1
        n = load.sequence
        if n % 2:
            body = b"%d-%d" % (self.index, n)
            data = b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s" % (
                len(body),
                body,
            )
        else:
            body = None
            data = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
        self.waiting.append((load.clock.seconds(), body))
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            answer = rest[:length]
            sent, body = self.waiting.popleft()
            self.load.answered(sent, answer, body)
            self.load.clock.callLater(self.load.interval, self.next)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        load = self.load
        if not load.running:
            return
        load.closes += 1
        load.failed += len(self.waiting)
        self.waiting.clear()
        load.connect(self.index)


class _Load:
    """
    Keep-alive clients and what happened to their requests.
    """

    def __init__(self, clock: Any, port: int, clients: int, interval: float) -> None:
        self.clock = clock
        self.port = port
        self.clients = clients
        self.interval = interval
        self.running = True
        self.sequence = 0
        self.failed = 0
        self.closes = 0
        self.wrong = 0
        #: (sent, answered, version) of every answer
        self.answers: list[tuple[float, float, bytes]] = []
        self.protocols: list[_Client] = []

    def connect(self, index: int) -> Deferred[Any]:
        endpoint = TCP4ClientEndpoint(self.clock, "127.0.0.1", self.port, timeout=10)
        d = endpoint.connect(Factory.forProtocol(lambda: _Client(self, index)))

        def failed(failure: Failure) -> None:
            self.failed += 1

        return d.addCallbacks(self.protocols.append, failed)

    def start(self) -> Deferred[Any]:
        return gatherResults([self.connect(i) for i in range(self.clients)])

    def answered(self, sent: float, answer: bytes, body: bytes | None) -> None:
        version, _, echoed = answer.partition(b" ")
        if body is not None and echoed != body:
            self.wrong += 1
        self.answers.append((sent, self.clock.seconds(), version))

    def stop(self) -> None:
        self.running = False
        for each in self.protocols:
            if each.transport is not None:
                each.transport.loseConnection()


def _watchExit(reactor: Any, pid: int, exits: dict[int, float]) -> Deferred[Any]:
    """
    Note in C{exits} when process C{pid} is gone.
    """
    d = waitFor(reactor, lambda: not pidAlive(pid), 30, "old process to exit", 0.01)
    return d.addCallback(lambda _: exits.__setitem__(pid, reactor.seconds()))


def _writeApp(directory: str, version: bytes) -> None:
    path = os.path.join(directory, "benchweb.py")
    with open(path, "w") as f:
        f.write(_APP.format(version=version))
    shutil.rmtree(os.path.join(directory, "__pycache__"), ignore_errors=True)


@inlineCallbacks
def _migrate(reactor: Any, strategy: str, options: Any) -> Any:
    port = freePort()
    host = HostProcess(
        reactor,
        [
            "--strategy",
            strategy,
            "web",
            "--listen",
            "tcp:{}:interface=127.0.0.1:backlog=4096".format(port),
            "--class",
            "benchweb.Root",
        ],
        prefix="migrate-bench-web-",
    )
    workdir = host.workdir.path
    _writeApp(workdir, b"v0")
    load = _Load(reactor, port, options.clients, options.interval)
    try:
        yield host.start()
        yield load.start()
        yield deferLater(reactor, options.gap, lambda: None)
        upgrades = []
        exits: dict[int, float] = {}
        watchers = []
        for n in range(1, options.upgrades + 1):
            version = b"v%d" % (n,)
            _writeApp(workdir, version)
            code, report, _ = yield host.upgrade()
            returned = reactor.seconds()
            upgrades.append((version, returned, code, report))
            pid = report.get("oldPid")
            if pid and pid != report.get("newPid"):
                watchers.append(_watchExit(reactor, pid, exits))
            yield deferLater(reactor, options.gap, lambda: None)
        yield gatherResults(watchers)
    finally:
        load.stop()
        yield host.stop()
        host.cleanup()
    rows = []
    for version, returned, code, report in upgrades:
        # Requests sent after the upgrade returned, answered by older code.
        older = [
            (at, v) for sent, at, v in load.answers if sent >= returned and v < version
        ]
        oldVersion = b"v%d" % (int(version[1:]) - 1,)
        lastOld = max(
            (at for _, at, v in load.answers if v == oldVersion), default=None
        )
        pid = report.get("oldPid")
        rows.append(
            {
                "outcome": report.get("outcome") if code == 0 else "failed",
                "moved": report.get("moved"),
                "oldAnswers": len(older),
                "oldFor": max((at - returned for at, _ in older), default=0.0),
                "exitAfterLast": (
                    exits[pid] - lastOld if pid in exits and lastOld else None
                ),
            }
        )
    return {
        "name": "migrate " + strategy,
        "requests": len(load.answers),
        "failed": load.failed,
        "closes": load.closes,
        "wrong": load.wrong,
        "upgrades": rows,
    }


_HAPROXY = """
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend f
    bind 127.0.0.1:{front}
    default_backend b
backend b
    server s1 127.0.0.1:{back}
"""

_NGINX = """
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx.err;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    upstream b {{ server 127.0.0.1:{back}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{front};
        location / {{
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@inlineCallbacks
def _reloadBaseline(reactor: Any, name: str, options: Any) -> Any:
    """
    The same load through HAProxy or nginx in front of a plain C{twistd
    web}, reloaded as many times.
    """
    binary = shutil.which(name) or shutil.which("/usr/sbin/" + name)
    if binary is None:
        return {"name": name + " reload", "skipped": "not installed"}
    workdir = tempfile.mkdtemp(prefix="migrate-bench-web-", dir="/tmp")
    front, back = freePort(), freePort()
    _writeApp(workdir, b"v0")
    env = dict(os.environ, PYTHONPATH=workdir)
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twisted",
            "web",
            "--listen",
            "tcp:{}:interface=127.0.0.1".format(back),
            "--class",
            "benchweb.Root",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = os.path.join(workdir, name + ".cfg")
    with open(config, "w") as f:
        template = _HAPROXY if name == "haproxy" else _NGINX
        f.write(template.format(front=front, back=back, workdir=workdir))
    if name == "haproxy":
        argv = [binary, "-W", "-f", config]
        reloadSignal = signal.SIGUSR2
    else:
        argv = [binary, "-c", config]
        reloadSignal = signal.SIGHUP
    proxy = subprocess.Popen(
        argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    load = _Load(reactor, front, options.clients, options.interval)
    try:
        yield waitFor(reactor, lambda: _answers(front), 20, name + " to answer")
        yield load.start()
        yield deferLater(reactor, options.gap, lambda: None)
        for _ in range(options.upgrades):
            proxy.send_signal(reloadSignal)
            yield deferLater(reactor, options.gap, lambda: None)
    finally:
        load.stop()
        for process in (proxy, backend):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "name": name + " reload",
        "requests": len(load.answers),
        "failed": load.failed,
        "closes": load.closes,
        "wrong": load.wrong,
        "upgrades": [],
    }


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _print(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print("{name}: skipped ({skipped})".format(**result))
        return
    print(
        "{name}: {requests} answers, {failed} failed requests, {closes} "
        "server closes, {wrong} wrong POST answers".format(**result)
    )
    for n, row in enumerate(result["upgrades"], 1):
        exit = row["exitAfterLast"]
        print(
            "  upgrade {}: {}, {} moved; old code answered {} requests sent "
            "after it returned, for {:.1f} ms; old process exited {} after "
            "its last answer".format(
                n,
                row["outcome"],
                row["moved"],
                row["oldAnswers"],
                row["oldFor"] * 1000,
                "-" if exit is None else "{:.0f} ms".format(exit * 1000),
            )
        )
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m migrate.bench.web", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument(
        "--interval", type=float, default=0.01, help="seconds between requests"
    )
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument(
        "--gap", type=float, default=2.0, help="seconds between two upgrades"
    )
    parser.add_argument(
        "--strategy",
        action="append",
        help="strategy to measure (repeatable; default capability and reexec)",
    )
    parser.add_argument("--no-proxies", action="store_true")
    options = parser.parse_args(argv)
    strategies = options.strategy or ["capability", "reexec"]

    @inlineCallbacks
    def run(reactor: Any) -> Any:
        for strategy in strategies:
            _print((yield _migrate(reactor, strategy, options)))
        if not options.no_proxies:
            for name in ("nginx", "haproxy"):
                _print((yield _reloadBaseline(reactor, name, options)))

    react(run)


if __name__ == "__main__":
    main()
