"""
Benchmark of the backlog a freeze leaves: C{python -m migrate.bench.backlog}.

While a capability transfer's freeze lasts, clients go on sending; at the
commit the successor starts reading every moved connection, and the
requests queued meanwhile are answered in its first reactor turn.  This
measures that moment alone, in the order the successor serves:

  - C{all}: every connection served at once, in the order given (the
    successor's way before L{migrate._handoff._waiting}: every connection
    that changed since its copy, as all have under load);
  - C{order}: L{servingOrder}: those with bytes to read first, the
    longest-waiting first, the others in slices of 500 after a reactor
    turn, as the successor does now;
  - C{split}: the same without the kernel's ages (waiting first, in the
    order given).

Each trial runs in a process of its own: it accepts C{--connections} TCP
connections on loopback, wraps each as a successor holds one (a
L{migrate._host._tracking.HostedProtocol} around the benchmark's line
application, adopted by the reactor, not reading); a second process then
sends one request on C{--waiting} of them, in random order, spread over
C{--spread} milliseconds, and the first serves them all
(L{migrate._handoff._movement.AdoptedConnection.commit}).  The second
process times each answer by its arrival stamp (C{SO_TIMESTAMPNS}) and
reports the longest and the median wait, counted from each request's
send: the spread itself is part of it (the first request sent waits at
least that long).  Modes alternate, round after round.  Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from ._arrival import CONTROL_SPACE, arrivalStamp, enableStamps

__all__ = ["main"]

MODES = ("all", "split", "order")

_SLICE = 500


def _clientSide(
    clients: list[socket.socket], waiting: int, spread: float, go: int, report: int
) -> None:
    """
    In the forked client process: on C{go}, send one request on
    C{waiting} random connections spread over C{spread} seconds, then
    write to C{report} the longest and median wait (to each answer's
    arrival stamp) and how many went unanswered within 10 s.
    """
    chosen = random.sample(range(len(clients)), waiting)
    for each in clients:
        enableStamps(each)
    os.read(go, 1)
    sentAt: dict[int, float] = {}
    start = time.time()
    for rank, index in enumerate(chosen):
        due = start + spread * rank / waiting
        while time.time() < due:
            pass
        sentAt[clients[index].fileno()] = time.time()
        clients[index].send(b"1\n")
    os.write(report, b"s")
    poller = select.epoll()
    byDescriptor = {clients[index].fileno(): clients[index] for index in chosen}
    for descriptor in byDescriptor:
        poller.register(descriptor, select.EPOLLIN)
    waits: list[float] = []
    deadline = time.time() + 10
    while len(waits) < waiting and time.time() < deadline:
        for descriptor, _ in poller.poll(1):
            _, ancillary, _, _ = byDescriptor[descriptor].recvmsg(4096, CONTROL_SPACE)
            stamp = arrivalStamp(ancillary)
            arrived = time.time() if stamp is None else stamp
            waits.append(arrived - sentAt[descriptor])
            poller.unregister(descriptor)
    waits.sort()
    os.write(
        report,
        json.dumps(
            {
                "longest": waits[-1] if waits else None,
                "median": waits[len(waits) // 2] if waits else None,
                "unanswered": waiting - len(waits),
            }
        ).encode(),
    )


def trial(connections: int, waiting: int, spread: float, mode: str) -> dict[str, Any]:
    """
    One trial, in this process (which it leaves with the global reactor
    run and stopped): see the module's docstring.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    from .._handoff._movement import AdoptedConnection
    from .._handoff._waiting import servingOrder
    from .._host._tracking import TrackingFactory
    from ._app import BenchLine

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    clients, servers = [], []
    for _ in range(connections):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        for each in (client, server):
            each.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(client)
        servers.append(server)
    listener.close()
    reportRead, reportWrite = os.pipe()
    goRead, goWrite = os.pipe()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(reportRead)
            os.close(goWrite)
            for each in servers:
                each.close()
            _clientSide(clients, waiting, spread, goRead, reportWrite)
            status = 0
        finally:
            os._exit(status)
    # Only the child writes reports and reads the go: if it fails, this
    # side reads the end of the pipe instead of waiting for ever.
    os.close(reportWrite)
    os.close(goRead)
    for each in clients:
        each.close()
    factory = TrackingFactory("tcp:bench", Factory.forProtocol(BenchLine))
    held = []
    for server in servers:
        transport = reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            server.fileno(), socket.AF_INET, factory
        )
        server.close()
        transport.stopReading()
        held.append(AdoptedConnection(transport.protocol, transport))
    result: dict[str, Any] = {}

    def serve() -> None:
        later: list[AdoptedConnection]
        if mode == "all":
            now, later = held, []
        elif mode == "split":
            now, later = servingOrder(held, age=lambda transport: None)
        else:
            now, later = servingOrder(held)
        for each in now:
            each.commit()

        def serveSlice() -> None:
            for each in later[:_SLICE]:
                each.commit()
            del later[:_SLICE]
            if later:
                reactor.callLater(0, serveSlice)

        if later:
            reactor.callLater(0, reactor.callLater, 0, serveSlice)
        waitForReport()

    def waitForReport() -> None:
        readable, _, _ = select.select([reportRead], [], [], 0)
        if readable:
            report = os.read(reportRead, 4096)
            if report:
                result.update(json.loads(report))
            else:
                result["error"] = "the client process ended without a report"
            reactor.stop()
        else:
            reactor.callLater(0.001, waitForReport)

    def begin() -> None:
        try:
            os.write(goWrite, b"g")
            sent = os.read(reportRead, 1) == b"s"
        except BrokenPipeError:
            # It ended before reading the go.
            sent = False
        if not sent:
            result["error"] = "the client process ended before sending"
            reactor.stop()
            return
        reactor.callLater(0, serve)

    reactor.callWhenRunning(begin)
    reactor.run()
    os.waitpid(child, 0)
    return result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else "{:.1f} ms".format(seconds * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migrate.bench.backlog",
        description="The longest wait of the requests queued during a freeze, "
        "by the order in which the successor serves its connections.",
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument(
        "--waiting", type=int, default=250, help="requests queued (default 250)"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=10.0,
        help="milliseconds over which they are sent (default 10)",
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help="of all, split, order")
    parser.add_argument("--trial", choices=MODES, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if not 0 < options.waiting <= options.connections:
        parser.error("--waiting must be between 1 and --connections")
    if options.trial:
        print(
            json.dumps(
                trial(
                    options.connections,
                    options.waiting,
                    options.spread / 1000,
                    options.trial,
                )
            )
        )
        return 0
    modes = [mode.strip() for mode in options.modes.split(",") if mode.strip()]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        parser.error("--modes: of {}".format(", ".join(MODES)))
    print(
        "backlog: {} held connections, a request on {} of them over {:g} ms; "
        "the longest and median wait to each answer's arrival, {} rounds".format(
            options.connections, options.waiting, options.spread, options.rounds
        )
    )
    longest: dict[str, list[float]] = {mode: [] for mode in modes}
    for number in range(1, options.rounds + 1):
        for mode in modes:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "migrate.bench.backlog",
                    "--trial",
                    mode,
                    "--connections",
                    str(options.connections),
                    "--waiting",
                    str(options.waiting),
                    "--spread",
                    str(options.spread),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                print("{}: failed: {}".format(mode, done.stderr.strip()[-2000:]))
                return 1
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            if "error" in figures:
                print("{}: failed: {}".format(mode, figures["error"]))
                return 1
            print(
                "round {} {:5}: longest {}, median {}{}".format(
                    number,
                    mode,
                    _ms(figures["longest"]),
                    _ms(figures["median"]),
                    (
                        "; {} unanswered".format(figures["unanswered"])
                        if figures["unanswered"]
                        else ""
                    ),
                )
            )
            if figures["longest"] is not None:
                longest[mode].append(figures["longest"])
    for mode in modes:
        if longest[mode]:
            print(
                "{:5}: longest wait median {} ({} to {})".format(
                    mode,
                    _ms(statistics.median(longest[mode])),
                    _ms(min(longest[mode])),
                    _ms(max(longest[mode])),
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
