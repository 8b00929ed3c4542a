"""
The benchmark's timeline picture: for each load scenario, latency (p50,
p99, max per 100 ms) and answers per second over time, with the migration
window shaded, drawn with matplotlib (an optional dependency: the
C{bench} extra).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MissingMatplotlib", "plotTimeline"]


class MissingMatplotlib(Exception):
    """
    matplotlib is not installed.
    """


def plotTimeline(results: dict[str, Any], path: str) -> None:
    """
    Draw the timeline of every load scenario in C{results} into a PNG.

    @raise MissingMatplotlib: with the command that installs it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        raise MissingMatplotlib(
            "drawing the timeline needs matplotlib: pip install 'migrate[bench]' "
            "(or pip install matplotlib)"
        ) from None
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
        report = result["report"]
        row.set_title(
            "{}: {}, longest stall {:.0f} ms".format(
                result["name"], report["outcome"], (result.get("stall") or 0) * 1000
            ),
            fontsize=9,
        )
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
