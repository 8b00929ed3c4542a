"""
Benchmark of module reload: C{python -m migrate.bench.reload}.

Measures the pause a reload imposes on a host (prepare and commit run in
one step of the reactor: nothing else is served meanwhile; the migratable
protocol defines C{abandonMigrationState}, so its connections are restored
ahead of the pause, after the import, which runs in a step of its own;
for the plain protocol the import is in the pause) with
1,000 and 10,000 live connections, for protocols rebuilt from their state
(L{IMigratable}) and for protocols upgraded in place (C{__class__}
assignment), the longest slice of the pre-copy before it (the states are
copied a few hundred connections per turn of the reactor while the old
code serves), and the resident memory of a process over 100 reloads.

The connections are on in-memory transports: a reload never touches a
socket, so the pause is the same CPU work it is with real ones.  Figures
are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import tempfile
import textwrap
import time
from typing import Any, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from .._host._service import MigrationHost
from ..strategies._reload._modules import ModuleFingerprints
from ..strategies.reload import ModuleReload

__all__ = ["main"]

_APP = textwrap.dedent("""
    from zope.interface import implementer
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver
    from migrate.interfaces import IMigratable

    VERSION = 1


    class Session(LineReceiver):
        delimiter = b"\\n"

        def connectionMade(self):
            self.nick = "guest"
            self.count = 0
            self.history = []

        def lineReceived(self, line):
            self.count += 1
            self.history = (self.history + [line.decode()])[-5:]
            self.sendLine(b"%d %d" % (VERSION, self.count))


    @implementer(IMigratable)
    class MigratableSession(Session):
        migrationVersion = VERSION

        def getMigrationState(self):
            return {"nick": self.nick, "count": self.count, "history": self.history}

        def restoreMigrationState(self, state):
            self.nick = state["nick"]
            self.count = state["count"]
            self.history = list(state["history"])

        def abandonMigrationState(self):
            pass

        def upgradeMigrationState(self, fromVersion, state):
            return state


    def makeFactory():
        return Factory.forProtocol(PROTOCOL)
    """)


class _NoReactor:
    """
    The host's reactor: a reload uses its clock, to time its phases, and
    C{callLater(0, ...)} between the pre-copy's slices, which L{runUntil}
    runs in order.
    """

    seconds = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self._calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> None:
        self._calls.append((f, args))

    def runUntil(self, results: list[Any]) -> None:
        while not results and self._calls:
            f, args = self._calls.pop(0)
            f(*args)

    def stop(self) -> None:
        pass


def _rss() -> int:
    """
    This process's resident memory, in bytes.
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Bench:
    """
    A host serving a generated application from a temporary directory.
    """

    _serial = 0

    def __init__(self, directory: str, protocol: str, connections: int) -> None:
        _Bench._serial += 1
        self.name = "migratebenchapp{}".format(_Bench._serial)
        self.path = os.path.join(directory, self.name + ".py")
        self.protocol = protocol
        self.version = 1
        self._write()
        module = importlib.import_module(self.name)
        self.host = MigrationHost(
            _NoReactor(),
            module.makeFactory(),
            ["tcp:8000"],
            # The reload in this process only: the trial in a child process
            # before it is measured with real hosts by python -m migrate.bench.
            ModuleReload(fingerprints=ModuleFingerprints(), trial=None),
            controlPath=None,
            installSignalHandlers=False,
            applicationSpec=self.name + ":makeFactory",
        )
        listener = self.host.listeners["tcp:8000"]
        for n in range(connections):
            hosted = listener.factory.buildProtocol(
                IPv4Address("TCP", "10.0.{}.{}".format(n // 250, n % 250), 40000 + n)
            )
            assert hosted is not None
            transport = StringTransport()
            hosted.makeConnection(transport)
            hosted.dataReceived(b"hello\n")
            transport.clear()

    def _write(self) -> None:
        source = _APP.replace("VERSION = 1", "VERSION = {}".format(self.version))
        source = source.replace("PROTOCOL", self.protocol)
        with open(self.path, "w") as f:
            f.write(source)

    def reload(self) -> dict[str, Any]:
        """
        Change the code and reload it; return the report.
        """
        self.version += 1
        self._write()
        results: list[Any] = []
        self.host.strategy.migrate(self.host, lambda message: None).addBoth(
            results.append
        )
        self.host.reactor.runUntil(results)
        report: dict[str, Any] = results[0].toJSON()
        if report["outcome"] != "success":
            raise RuntimeError("reload failed: {}".format(report["reason"]))
        return report

    def close(self) -> None:
        for listener in self.host.listeners.values():
            for hosted in listener.factory.connections:
                hosted.release()
        sys.modules.pop(self.name, None)


def _pauses(directory: str, connections: int, protocol: str, rounds: int) -> Any:
    bench = _Bench(directory, protocol, connections)
    try:
        # The first reload in a process reloads every application module;
        # it is measured like the others.
        reports = [bench.reload() for _ in range(rounds)]
    finally:
        bench.close()
    pauses = [report["durations"]["pause"] for report in reports]
    prepare = [report["durations"]["prepare"] for report in reports]
    slices = [report["durations"]["precopy slice"] for report in reports]
    moved = reports[-1]["moved"]
    return (
        statistics.median(pauses),
        max(pauses),
        statistics.median(prepare),
        statistics.median(slices),
        max(slices),
        moved,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the benchmark and print its figures.
    """
    parser = argparse.ArgumentParser(prog="python -m migrate.bench.reload")
    parser.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[1000, 10000],
        help="connection counts to measure the pause for (default: 1000 10000)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="reloads per measurement")
    parser.add_argument(
        "--reloads",
        type=int,
        default=100,
        help="reloads in the memory run (default 100)",
    )
    parser.add_argument(
        "--memory-connections",
        type=int,
        default=1000,
        help="connections during the memory run (default 1000)",
    )
    options = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="migrate-bench-reload-")
    sys.path.insert(0, directory)
    try:
        print(
            "module reload: the pause (prepare and commit in one reactor step, "
            "with the import for plain protocols; migratable ones are restored "
            "ahead of it) and the longest pre-copy slice before it (median and max of "
            "the rounds; a max far above the median is a full collection of "
            "Python's garbage collector falling into a slice)"
        )
        print(
            "{:>12}  {:<24} {:>10} {:>8} {:>11} {:>14} {:>7}".format(
                "connections",
                "protocols",
                "median ms",
                "max ms",
                "prepare ms",
                "slice ms (max)",
                "moved",
            )
        )
        for connections in options.connections:
            for protocol, label in [
                ("MigratableSession", "IMigratable (rebuilt)"),
                ("Session", "plain (class swapped)"),
            ]:
                median, worst, prepare, slice, longest, moved = _pauses(
                    directory, connections, protocol, options.rounds
                )
                print(
                    "{:>12}  {:<24} {:>10.1f} {:>8.1f} {:>11.1f} {:>14} "
                    "{:>7}".format(
                        connections,
                        label,
                        median * 1000,
                        worst * 1000,
                        prepare * 1000,
                        "{:.1f} ({:.0f})".format(slice * 1000, longest * 1000),
                        moved,
                    )
                )
        print()
        print(
            "resident memory over {} reloads, {} IMigratable connections".format(
                options.reloads, options.memory_connections
            )
        )
        gc.collect()
        bench = _Bench(directory, "MigratableSession", options.memory_connections)
        try:
            start = _rss()
            print("{:>8} {:>10}".format("reloads", "RSS MiB"))
            print("{:>8} {:>10.1f}".format(0, start / 2**20))
            step = max(1, options.reloads // 10)
            for n in range(1, options.reloads + 1):
                bench.reload()
                if n % step == 0:
                    print("{:>8} {:>10.1f}".format(n, _rss() / 2**20))
            gc.collect()
            end = _rss()
            print(
                "after a full collection: {:.1f} MiB ({:+.1f} MiB since the first "
                "reload)".format(end / 2**20, (end - start) / 2**20)
            )
        finally:
            bench.close()
    finally:
        sys.path.remove(directory)
        for name in os.listdir(directory):
            os.remove(os.path.join(directory, name))
        os.rmdir(directory)


if __name__ == "__main__":
    main()
