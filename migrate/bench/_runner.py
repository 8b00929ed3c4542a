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
from ._floor import byteCompile, measureFloor, startFloor
from ._output import formatComparison, formatResults, write
from ._scenarios import LoadSettings, migrateUnderLoad, moveIdle, restartUnderLoad
from ._stall import (
    STALL_STRATEGIES,
    StallSettings,
    addRatios,
    measureStall,
    parseCounts,
)

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
        [
            "stall-only",
            None,
            "Run only the stall scenario (no load, baseline or idle scenario).",
        ],
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
        [
            "stall",
            None,
            None,
            "Idle connection counts for the stall scenario, comma-separated "
            "(default 1000,10000; quick 1000; 0 skips).",
        ],
        [
            "probes",
            None,
            50,
            "Probe connections of the stall scenario.",
            _positive(int),
        ],
        [
            "probe-interval",
            None,
            0.005,
            "Seconds between two lines of one probe.",
            _positive(float),
        ],
        ["json", None, None, "Write every result to this JSON file."],
        [
            "plot",
            None,
            None,
            "Draw the timeline into this PNG file, and the stall scenario's "
            "longest stalls into NAME-stall.png (with --stall-only: into this "
            "file; needs matplotlib).",
        ],
        ["compare", None, None, "Compare with the JSON file of an earlier run."],
        [
            "trace",
            None,
            None,
            "Have every process record its long reactor turns, its waits for a "
            "processor and its garbage collections into this directory, and show "
            "those around each migration's longest wait.",
        ],
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
        if self["stall"] is None:
            self["stallCounts"] = (1000,) if quick else (1000, 10000)
        else:
            try:
                self["stallCounts"] = parseCounts(self["stall"])
            except ValueError as e:
                raise usage.UsageError("--stall {}: {}".format(self["stall"], e))
        if self["probes"] < 1 or self["probe-interval"] <= 0:
            raise usage.UsageError("--probes and --probe-interval must be positive")
        if self["stall-only"] and not self["stallCounts"]:
            raise usage.UsageError("--stall-only with --stall 0 measures nothing")
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
    if options["trace"]:
        _startTracing(options["trace"], progress)
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
    stallOnly = bool(options["stall-only"])
    idle = 0 if stallOnly else options["idle"]
    stallCounts = options["stallCounts"]
    nofile = raiseDescriptorLimit(
        max([options["connections"], idle] + list(stallCounts)) * 2 + 1024
    )
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
            "stallOnly": stallOnly,
            "stall": list(stallCounts),
            "probes": options["probes"],
            "probeInterval": options["probe-interval"],
            "trace": options["trace"],
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

    for name in [] if stallOnly else strategies:
        await attempt(name, migrateUnderLoad(reactor, name, settings, progress))
    if not options["no-baseline"] and not stallOnly:
        await attempt("naive-restart", restartUnderLoad(reactor, settings, progress))
    if idle and "capability" in available:
        await attempt(
            "idle-capability",
            moveIdle(reactor, "capability", idle, progress, _upgradeTimeout(options)),
        )
    if stallCounts:
        results["stall"] = await _stallScenario(
            reactor, options, strategies, stallCounts, nofile, progress
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
        _draw(results, options["plot"], stallOnly, progress)
    progress("done")
    return results


def _startTracing(directory: str, progress: _Progress) -> None:
    """
    Trace this process from now on, and every host the run starts (they
    read the directory from the environment, see L{migrate.bench._trace}).
    """
    from ._trace import TRACE_VARIABLE, traceThisProcess

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    os.environ[TRACE_VARIABLE] = directory
    traceThisProcess(directory)
    progress("tracing every process into {}".format(directory))


def _draw(
    results: dict[str, Any], path: str, stallOnly: bool, progress: _Progress
) -> None:
    """
    Draw the timeline into C{path}, and the stall scenario's picture beside
    it (or into C{path} when only the stall was measured), as far as there
    is something to draw and matplotlib to draw it.
    """
    from ._plot import MissingMatplotlib, plotStall, plotTimeline, stallPlotPath

    pictures: list[tuple[str, Any, dict[str, Any], str]] = []
    if not stallOnly:
        pictures.append(("timeline", plotTimeline, results, path))
    if results.get("stall"):
        where = path if stallOnly else stallPlotPath(path)
        pictures.append(("stall", plotStall, results["stall"], where))
    for name, draw, data, where in pictures:
        try:
            draw(data, where)
        except MissingMatplotlib as e:
            progress(str(e))
            return
        except ValueError as e:
            progress("no {} picture: {}".format(name, e))
        else:
            progress("{} drawn in {}".format(name, where))


async def _stallScenario(
    reactor: Any,
    options: BenchOptions,
    strategies: list[str],
    counts: tuple[int, ...],
    nofile: int,
    progress: _Progress,
) -> dict[str, Any]:
    """
    The stall scenario (L{migrate.bench._stall}) for every strategy that
    pauses connections, and its floors.

    @return: C{{"counts", "probes", "probeInterval", "strategies",
        "rows", "floors", "startFloor"}}, as written with C{--json}.
    """
    probes = options["probes"]
    # Each host, and this process, holds every connection once; a
    # successor (capability) holds them in a process of its own.
    headroom = nofile - probes - 512
    capped = tuple(sorted({min(count, headroom) for count in counts}))
    if capped != counts:
        progress(
            "stall: RLIMIT_NOFILE is {}: measuring {} connections, not {}".format(
                nofile, ",".join(map(str, capped)), ",".join(map(str, counts))
            )
        )
    measured = [name for name in strategies if name in STALL_STRATEGIES]
    for name in strategies:
        if name not in STALL_STRATEGIES:
            progress("stall: {} pauses no connection: not measured".format(name))
    stall: dict[str, Any] = {
        "counts": list(capped),
        "probes": probes,
        "probeInterval": options["probe-interval"],
        "strategies": measured,
        "measuredFrom": strategies,
        "rows": [],
        "floors": [],
        "startFloor": None,
    }
    settings = StallSettings(
        counts=capped,
        probes=probes,
        probeInterval=options["probe-interval"],
        before=0.5,
        after=0.5,
        upgradeTimeout=_upgradeTimeout(options),
    )
    if not measured:
        return stall
    progress.scenario = "stall"
    # What a deployment has: every new image (re-exec's above all) loads
    # bytecode instead of compiling the package again.
    await deferToThread(byteCompile)
    if "reexec" in measured:
        progress("measuring the re-exec floor (interpreter + twistd + reactor)")
        try:
            stall["startFloor"] = await deferToThread(startFloor)
        except Exception as e:
            progress("FAILED: the re-exec floor: {}: {}".format(type(e).__name__, e))
    for name in measured:
        progress.scenario = "stall-" + name
        stall["rows"].extend(await measureStall(reactor, name, settings, progress))
    progress.scenario = "stall"
    for count in capped:
        moving = count + probes
        progress("floor: passing {} descriptors with send_fds".format(moving))
        try:
            floor: dict[str, Any] = await deferToThread(measureFloor, moving)
        except Exception as e:
            progress(
                "FAILED: the floor for {}: {}: {}".format(moving, type(e).__name__, e)
            )
            continue
        stall["floors"].append(floor)
    addRatios(stall)
    progress.scenario = ""
    return stall


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
        failed = [r["name"] for r in results["scenarios"] if r.get("error")] + [
            r["strategy"]
            for r in results.get("stall", {}).get("rows", [])
            if r.get("error") or r["report"].get("outcome") != "success"
        ]
        if failed:
            raise SystemExit(1)

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))
