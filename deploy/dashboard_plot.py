"""Plot `deploy.render_dashboard`'s panel results with matplotlib: one axes per panel in a grid, the panel's
Grafana unit on the y axis (tick labels scaled the way Grafana does: ms/µs, KiB/MiB, %, k/M), a legend
from `legendFormat` (the largest series first when there are many), time since the traffic began on x."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

UNIT_LABELS = {"s": "seconds", "ms": "milliseconds", "reqps": "requests / s", "bytes": "bytes",
               "percentunit": "percent", "percent": "percent", "short": "number", "none": ""}
MAX_LEGEND = 8
COLUMNS = 4


SECONDS = [(1e-6, "µs"), (1e-3, "ms"), (1.0, "s"), (60.0, "min"), (3600.0, "h")]
BINARY = [(1.0, "B"), (2.0**10, "KiB"), (2.0**20, "MiB"), (2.0**30, "GiB"), (2.0**40, "TiB")]
DECIMAL = [(1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G")]


def axis_scale(unit: str, peak: float) -> tuple[float, str]:
    """(divisor, suffix) for the tick labels of a Grafana unit, picked from the panel's peak as Grafana does:
    0.25 s of latency reads "250 ms", 120 MiB of memory "120 MiB", 0.4 (percentunit) "40%"."""
    if unit == "percentunit":
        return 0.01, "%"
    if unit == "percent":
        return 1.0, "%"
    steps = {"s": SECONDS, "ms": [(f * 1e3, s) for f, s in SECONDS], "bytes": BINARY}.get(unit, DECIMAL)
    if unit not in ("s", "ms", "bytes") and not abs(peak) >= 1e3:
        return 1.0, ""  # plain numbers (short, reqps, none) below a thousand need no suffix
    divisor, suffix = steps[0]
    for candidate in steps:
        if math.isfinite(peak) and abs(peak) >= candidate[0]:
            divisor, suffix = candidate
    return divisor, suffix if suffix in ("", "%", "m", "k", "M", "G") else f" {suffix}"


def _peak(series: Mapping[str, Any]) -> float:
    finite = [v for v in series["values"] if math.isfinite(v)]
    return max(finite) if finite else -math.inf


def plot_panel(axes: Any, panel: Mapping[str, Any], window: tuple[float, float]) -> None:
    """One panel: every series of every target as a line; the legend names the largest few."""
    from matplotlib.ticker import FuncFormatter

    everything = [series for target in panel["targets"] for series in target["series"]]
    divisor, suffix = axis_scale(panel["unit"], max((_peak(s) for s in everything), default=0.0))
    lines = []
    for series in everything:
        times = [t - window[0] for t in series["times"]]
        (line,) = axes.plot(times, [v / divisor for v in series["values"]], linewidth=1)
        lines.append((_peak(series), line, series["legend"]))
    axes.set_title(panel["title"], fontsize=9, loc="left")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}{suffix}"))
    axes.set_ylabel(UNIT_LABELS.get(panel["unit"], panel["unit"]), fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    axes.set_ylim(bottom=0)
    axes.set_xlim(0, window[1] - window[0])
    if not lines:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="grey")
        return
    lines.sort(key=lambda item: item[0], reverse=True)
    shown = lines[:MAX_LEGEND]
    labels = [label for _, _, label in shown]
    if len(lines) > MAX_LEGEND:
        labels[-1] += f"  (+{len(lines) - MAX_LEGEND} more)"
    axes.legend([line for _, line, _ in shown], labels, fontsize=5.5, loc="upper left", framealpha=0.6,
                handlelength=1.2, borderaxespad=0.3)


def plot_panels(panels: list[Mapping[str, Any]], out: Path, title: str, window: tuple[float, float],
                statuses: Mapping[str, int]) -> None:
    """Every panel in a grid of COLUMNS columns over `window` (unix seconds: the traffic's start, the last
    point), written as a PNG to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(panels) / COLUMNS))
    figure, grid = plt.subplots(rows, COLUMNS, figsize=(5.2 * COLUMNS, 3.1 * rows), squeeze=False)
    for axes, panel in zip(grid.flat, panels, strict=False):
        plot_panel(axes, panel, window)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    for axes in grid[-1]:
        axes.set_xlabel("seconds since the traffic began", fontsize=8)
    answers = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
    figure.suptitle(f"{title}\nanswers by status: {answers}", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    plt.close(figure)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buffer) as image:  # a 256-colour palette: a third of the bytes, the same picture
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
