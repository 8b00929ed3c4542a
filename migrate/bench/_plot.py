"""
The benchmark's timeline picture: for each load scenario, latency (p50,
p99, max per 100 ms) and answers per second over time, with the migration
window shaded, drawn with matplotlib (an optional dependency: the
C{bench} extra); and the stall scenario's picture: the longest stall per
strategy against the number of connections, beside the floors.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "MissingMatplotlib",
    "plotStall",
    "plotTimeline",
    "stallPlotPath",
    "timelineTitle",
]


class MissingMatplotlib(Exception):
    """
    matplotlib is not installed.
    """


def _pyplot() -> Any:
    """
    matplotlib's C{pyplot}, drawing into files only.

    @raise MissingMatplotlib: with the command that installs it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingMatplotlib(
            "drawing the pictures needs matplotlib: pip install 'txmigrate[bench]' "
            "(or pip install matplotlib)"
        ) from None
    return plt


def plotTimeline(results: dict[str, Any], path: str) -> None:
    """
    Draw the timeline of every load scenario in C{results} into a PNG.

    @raise MissingMatplotlib: with the command that installs it.
    """
    plt = _pyplot()
    from matplotlib import ticker

    scenarios = [
        r
        for r in results.get("scenarios", [])
        if not r.get("error") and "timeline" in r
    ]
    if not scenarios:
        raise ValueError("no load scenario to draw")
    figure, axes = plt.subplots(
        len(scenarios), 1, figsize=(8, 2.3 * len(scenarios)), sharex=True, squeeze=False
    )
    for row, result in zip(axes[:, 0], scenarios):
        timeline = result["timeline"]
        width = timeline["bin"]
        rows = timeline["rows"]
        times = [r[0] + width / 2 for r in rows]
        row.plot(times, [r[2] * 1000 for r in rows], lw=0.8, label="p50")
        row.plot(times, [r[3] * 1000 for r in rows], lw=0.8, label="p99")
        row.plot(times, [r[4] * 1000 for r in rows], lw=0.6, ls=":", label="max")
        row.set_yscale("log")
        row.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        row.yaxis.set_minor_formatter(ticker.NullFormatter())
        row.set_ylabel("latency (ms)")
        start, end = result["window"]
        row.axvspan(start, end, color="orange", alpha=0.15, lw=0, label="migration")
        if result.get("handoffWindow"):
            low, high = result["handoffWindow"]
            row.axvspan(
                low,
                max(high, low + width / 4),
                color="red",
                alpha=0.3,
                lw=0,
                label="connections frozen",
            )
        failures = timeline.get("shortFailures") or []
        if failures:
            row.scatter(
                [i * width for i, _ in failures],
                [max(1.0, max(r[4] for r in rows) * 1000) for _ in failures],
                marker="x",
                color="red",
                s=12,
                label="failed new connection",
            )
        # Answers per second, with the empty bins (a stall) at zero.
        counts = {round(r[0] / width): r[1] for r in rows}
        first, last = min(counts), max(counts)
        throughput = row.twinx()
        throughput.plot(
            [i * width + width / 2 for i in range(first, last + 1)],
            [counts.get(i, 0) / width for i in range(first, last + 1)],
            color="grey",
            lw=0.6,
            alpha=0.7,
            label="answers/s (right)",
        )
        throughput.set_ylabel("answers/s")
        throughput.set_ylim(bottom=0)
        row.set_title(timelineTitle(result), fontsize=9)
        handles, labels = row.get_legend_handles_labels()
        more, moreLabels = throughput.get_legend_handles_labels()
        row.legend(
            handles + more,
            labels + moreLabels,
            loc="upper left",
            fontsize=6,
            ncol=4,
            framealpha=0.6,
        )
        row.set_ylim(top=row.get_ylim()[1] * 4)
    axes[-1, 0].set_xlabel("seconds since the load started")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    _shrink(path)


def timelineTitle(result: dict[str, Any]) -> str:
    """
    The title of one load scenario's timeline: its name, its outcome and
    its longest stall, or, when no request sent from the command on was
    answered (a naive restart loses every long-lived connection), how
    many connections were lost rather than a stall of 0 ms.
    """
    head = "{}: {}".format(result["name"], result["report"]["outcome"])
    lost = sum(result["load"]["lost"].values())
    if result.get("stall") is None:
        if lost:
            return "{}, {} long-lived connections lost".format(head, lost)
        return "{}, no answer during the migration".format(head)
    title = "{}, longest stall {:.0f} ms".format(head, result["stall"] * 1000)
    if lost:
        title += ", {} long-lived connections lost".format(lost)
    return title


def stallPlotPath(path: str) -> str:
    """
    Where the stall picture goes when the timeline goes to C{path}:
    C{NAME-stall.png} beside C{NAME.png}.
    """
    stem, extension = os.path.splitext(path)
    return "{}-stall{}".format(stem, extension or ".png")


def plotStall(stall: dict[str, Any], path: str) -> None:
    """
    Draw the stall scenario's longest stall per strategy against the
    number of idle connections, with the descriptor floor and, when
    re-exec was measured, the new image's start, into a PNG.

    @param stall: the scenario's results (C{results["stall"]}).
    @raise MissingMatplotlib: with the command that installs it.
    @raise ValueError: if no stall was measured.
    """
    rows = [
        row
        for row in stall.get("rows", [])
        if not row.get("error") and row.get("stall") is not None
    ]
    if not rows:
        raise ValueError("no stall measured")
    plt = _pyplot()
    from matplotlib import ticker

    figure, axes = plt.subplots(figsize=(8.5, 4))
    for strategy in stall["strategies"]:
        points = sorted(
            (row["count"], row["stall"] * 1000)
            for row in rows
            if row["strategy"] == strategy
        )
        if points:
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label=strategy,
            )
            for count, value in points:
                axes.annotate(
                    "{:.0f}".format(value),
                    (count, value),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    floors = sorted(
        (int(floor["count"]) - stall["probes"], floor["seconds"] * 1000)
        for floor in stall.get("floors", [])
    )
    if floors:
        axes.plot(
            [f[0] for f in floors],
            [f[1] for f in floors],
            color="black",
            ls="--",
            marker="x",
            label="floor: send_fds + socket objects",
        )
    if stall.get("startFloor") is not None and "reexec" in stall["strategies"]:
        axes.axhline(
            stall["startFloor"] * 1000,
            color="grey",
            ls=":",
            label="re-exec floor: interpreter + twistd + reactor",
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: "{:g}".format(v)))
        axis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xticks(sorted({row["count"] for row in rows}))
    axes.set_xlabel("idle connections (plus {} probes)".format(stall["probes"]))
    axes.set_ylabel("longest stall a probe saw (ms)")
    axes.set_title(
        "One upgrade: the longest wait of probes sending a line every {:g} ms".format(
            stall["probeInterval"] * 1000
        ),
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    _shrink(path)


def _shrink(path: str) -> None:
    """
    Re-save the PNG with a small palette (a few lines and colours need no
    more): a fraction of the size, small enough to keep in the repository.
    """
    try:
        from PIL import Image  # matplotlib depends on Pillow
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)
