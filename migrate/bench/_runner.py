"""
C{python -m migrate.bench}: options, the order the scenarios run in,
progress on standard error, and the results on standard output (and in
JSON, and as a picture, when asked).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import IO, Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread
from twisted.python import usage

import twisted

from ..strategies import strategyNames
from ._floor import measureFloor
from ._output import formatComparison, formatResults, write
from ._scenarios import LoadSettings, migrateUnderLoad, moveIdle, restartUnderLoad

__all__ = ["BenchOptions", "main", "run"]


def _positive(kind: type) -> Any:
    def convert(value: str) -> Any:
        number = kind(value)
        if number < 0:
            raise ValueError("must not be negative")
        return number

    return convert


class BenchOptions(usage.Options):
    """
    Options of C{python -m migrate.bench}.
    """

    synopsis = "Usage: python -m migrate.bench [options]"
    longdesc = (
        "Start a real twistd migrate-host, put it under load (long-lived "
        "clients exchanging numbered lines, plus a rate of new short "
        "connections), migrate it with each strategy, and compare with a "
        "naive stop-and-start and with the raw cost of passing the same "
        "descriptors.  Progress goes to standard error, results to standard "
        "output.  Loopback only."
    )
    optFlags = [
        ["quick", "q", "Small numbers and short phases (a smoke run under a minute)."],
        ["no-baseline", None, "Skip the naive stop-and-start."],
    ]
    optParameters = [
        [
            "connections",
            "n",
            None,
            "Long-lived connections under load (default 1000; quick 200).",
            _positive(int),
        ],
        [
            "rate",
            "r",
            None,
            "New short connections per second (default 50; quick 20).",
            _positive(float),
        ],
        [
            "interval",
            None,
            0.05,
            "Seconds between two requests of one long-lived client.",
            _positive(float),
        ],
        [
            "idle",
            None,
            None,
            "Idle connections moved by capability transfer (default 10000; quick 1000; 0 skips).",
            _positive(int),
        ],
        [
            "before",
            None,
            None,
            "Seconds measured before the migration (default 5; quick 1.5).",
            _positive(float),
        ],
        [
            "after",
            None,
            None,
            "Seconds measured after it (default 5; quick 1.5).",
            _positive(float),
        ],
        ["json", None, None, "Write every result to this JSON file."],
        [
            "plot",
            None,
            None,
            "Draw the timeline into this PNG file (needs matplotlib).",
        ],
        ["compare", None, None, "Compare with the JSON file of an earlier run."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["strategies"] = []

    def opt_strategy(self, name: str) -> None:
        """
        A strategy to measure (repeatable; default: every strategy available).
        """
        self["strategies"].append(name)

    opt_s = opt_strategy

    def postOptions(self) -> None:
        quick = self["quick"]
        defaults = {
            "connections": 200 if quick else 1000,
            "rate": 20.0 if quick else 50.0,
            "idle": 1000 if quick else 10000,
            "before": 1.5 if quick else 5.0,
            "after": 1.5 if quick else 5.0,
        }
        for key, value in defaults.items():
            if self[key] is None:
                self[key] = value
        if self["interval"] <= 0:
            raise usage.UsageError("--interval must be positive")
        if self["compare"] is not None:
            try:
                with open(self["compare"]) as f:
                    self["compareWith"] = json.load(f)
            except (OSError, ValueError) as e:
                raise usage.UsageError("--compare {}: {}".format(self["compare"], e))


def raiseDescriptorLimit(wanted: int) -> int:
    """
    Raise this process's C{RLIMIT_NOFILE} soft limit towards C{wanted} (up
    to the hard limit); the hosts it starts inherit it.

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _upgradeTimeout(options: BenchOptions) -> float:
    """
    How long one migration may take before the benchmark gives up on it.
    """
    return 45.0 if options["quick"] else 120.0


def _loadAverage() -> list[float] | None:
    """
    The 1, 5 and 15 minute load averages: other work on the machine skews
    every figure, so the results say how busy it was.
    """
    try:
        return [round(each, 2) for each in os.getloadavg()]
    except OSError:
        return None


class _Progress:
    """
    Timestamped progress lines on standard error.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.scenario = ""

    def __call__(self, message: str) -> None:
        self.stream.write(
            "[bench {:5.1f}s] {}{}\n".format(
                time.monotonic() - self.started,
                "{}: ".format(self.scenario) if self.scenario else "",
                message,
            )
        )
        self.stream.flush()


async def run(
    reactor: Any, options: BenchOptions, stdout: IO[str], stderr: IO[str]
) -> dict[str, Any]:
    """
    Run every scenario the options ask for.

    @return: the results (as written with C{--json}).
    """
    progress = _Progress(stderr)
    available = strategyNames()
    wanted = options["strategies"] or available
    strategies = []
    skipped = []
    for name in wanted:
        if name in available:
            if name not in strategies:
                strategies.append(name)
        else:
            message = "strategy {!r} is not available here (available: {})".format(
                name, ", ".join(available)
            )
            skipped.append(message)
            progress("skipping " + message)
    idle = options["idle"]
    nofile = raiseDescriptorLimit(max(options["connections"], idle) * 2 + 1024)
    headroom = nofile - 512
    if idle > headroom:
        progress(
            "RLIMIT_NOFILE is {}: moving {} idle connections, not {}".format(
                nofile, headroom, idle
            )
        )
        idle = headroom
    connections = min(options["connections"], headroom)
    settings = LoadSettings(
        connections=connections,
        interval=options["interval"],
        rate=options["rate"],
        warmup=0.3 if options["quick"] else 1.0,
        before=options["before"],
        after=options["after"],
        upgradeTimeout=_upgradeTimeout(options),
    )
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "twisted": twisted.__version__,
            "platform": platform.platform(),
            "nofile": nofile,
            "loadAverageAtStart": _loadAverage(),
        },
        "options": {
            "quick": bool(options["quick"]),
            "strategies": strategies,
            "connections": connections,
            "interval": options["interval"],
            "rate": options["rate"],
            "idle": idle,
            "before": options["before"],
            "after": options["after"],
        },
        "skipped": skipped,
        "scenarios": [],
        "floors": [],
    }

    async def attempt(name: str, scenario: Any) -> None:
        progress.scenario = name
        try:
            result = await scenario
        except Exception as e:
            progress("FAILED: {}: {}".format(type(e).__name__, e))
            result = {
                "name": name,
                "kind": "failed",
                "error": "{}: {}".format(type(e).__name__, e),
            }
        results["scenarios"].append(result)
        progress.scenario = ""

    for name in strategies:
        await attempt(name, migrateUnderLoad(reactor, name, settings, progress))
    if not options["no-baseline"]:
        await attempt("naive-restart", restartUnderLoad(reactor, settings, progress))
    if idle and "capability" in available:
        await attempt(
            "idle-capability",
            moveIdle(reactor, "capability", idle, progress, _upgradeTimeout(options)),
        )
    # The floor for exactly as many connections as each hand-off moved.
    counts = sorted(
        {
            int(r["report"].get("moved") or 0)
            for r in results["scenarios"]
            if "report" in r
        }
        - {0}
    )
    for count in counts:
        progress("floor: passing {} descriptors with send_fds".format(count))
        try:
            floor: dict[str, Any] = await deferToThread(measureFloor, count)
        except Exception as e:
            progress("floor for {} failed: {}".format(count, e))
            continue
        results["floors"].append(floor)
    results["machine"]["loadAverageAtEnd"] = _loadAverage()
    write(stdout, formatResults(results))
    if options.get("compareWith") is not None:
        write(stdout, formatComparison(options["compareWith"], results))
    if options["json"]:
        with open(options["json"], "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        progress("results written to {}".format(options["json"]))
    if options["plot"]:
        from ._plot import MissingMatplotlib, plotTimeline

        try:
            plotTimeline(results, options["plot"])
        except MissingMatplotlib as e:
            progress(str(e))
        except ValueError as e:
            progress("no picture: {}".format(e))
        else:
            progress("timeline drawn in {}".format(options["plot"]))
    progress("done")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{python -m migrate.bench} entry point.
    """
    options = BenchOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.stderr.write("{}\n{}\n".format(options, e))
        raise SystemExit(2)

    async def _main(reactor: Any) -> None:
        results = await run(reactor, options, sys.stdout, sys.stderr)
        failed = [r["name"] for r in results["scenarios"] if r.get("error")]
        if failed:
            raise SystemExit(1)

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))
