"""The report's four charts, drawn with matplotlib's Agg backend into PNG files.

Each chart function takes the series to plot (a ``Line`` is a label and its x and y
values, x in simulated hours) and the PNG path, and returns a ``Chart``: the path and
the series read back from the figure's own ``Line2D`` objects just before saving, so a
test can hold what was drawn against the run's records. Figures are built without
pyplot (no global figure state) on an explicit Agg canvas: no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDTH_IN, HEIGHT_IN, DPI = 9.0, 4.0, 100


@dataclass(frozen=True)
class Line:
    """One plotted series; ``points`` draws markers only (one value per record),
    ``steps`` a step line (a running total that changes at each x)."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    points: bool = False
    steps: bool = False

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"series {self.label!r}: {len(self.x)} x values, {len(self.y)} y")


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    path: Path
    # label -> (x, y) as read back from the figure; empty when there was nothing to draw
    plotted: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    note: str = ""
    y_range: tuple[float, float] | None = None  # the left axis' limits, as saved


def _plot(ax: Axes, lines: Sequence[Line]) -> None:
    for line in lines:
        if not line.x:
            continue
        if line.points:
            ax.plot(line.x, line.y, linestyle="none", marker="o", markersize=3,
                    alpha=0.6, label=line.label)
        else:
            ax.plot(line.x, line.y, marker=".", label=line.label,
                    drawstyle="steps-post" if line.steps else "default")


def new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    """A chart's figure (its size and resolution) and its one gridded, labelled axes."""
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def draw_reference(ax: Axes, reference: tuple[float, str]) -> None:
    """A target or limit as a dashed red line with its label, inside the axes."""
    # Drawn inside the axes even when every value is far below it (memory at 190 MB
    # against a 500 MB limit): its label would otherwise float above the plot, and
    # tight_layout cannot make room for it (a warning, not a chart).
    bottom, top = ax.get_ylim()
    if reference[0] >= top:
        ax.set_ylim(bottom, reference[0] * 1.1 if reference[0] > 0 else 1.0)
    ax.axhline(reference[0], color="red", linestyle="--", linewidth=1, label=f"_{reference[1]}")
    ax.annotate(reference[1], (0.01, reference[0]), xycoords=("axes fraction", "data"),
                color="red", fontsize=8, va="bottom")


def _read_back(*axes: Axes) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """What the figure holds: every labelled Line2D (reference lines start with '_')."""
    found = {}
    for ax in axes:
        for artist in ax.get_lines():
            label = str(artist.get_label())
            if label.startswith("_"):
                continue
            found[label] = (tuple(np.asarray(artist.get_xdata(), dtype=float).tolist()),
                            tuple(np.asarray(artist.get_ydata(), dtype=float).tolist()))
    return found


def draw(key: str, title: str, ylabel: str, lines: Sequence[Line], path: Path, *,
         reference: tuple[float, str] | None = None, secondary: Sequence[Line] = (),
         secondary_label: str = "", empty_note: str = "no data recorded") -> Chart:
    """One chart: ``lines`` on the left axis, ``secondary`` on a right axis, an optional
    horizontal ``reference`` (value, label) such as a limit or a target."""
    fig, ax = new_axes(title, "simulated hours since the run's start", ylabel)
    has_data = any(line.x for line in (*lines, *secondary))
    if not has_data:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    _plot(ax, lines)
    if has_data and all(v >= 0 for line in lines for v in line.y):
        ax.set_ylim(bottom=0)
    axes = [ax]
    if has_data and reference is not None:
        draw_reference(ax, reference)
    if has_data and secondary:
        right = ax.twinx()
        right.set_ylabel(secondary_label)
        right.set_prop_cycle(color=["0.45", "0.7"])
        _plot(right, secondary)
        axes.append(right)
    if has_data:
        handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="best")
    plotted = _read_back(*axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    bottom, top = ax.get_ylim()
    return Chart(key, title, path, plotted, "" if has_data else empty_note,
                 (float(bottom), float(top)) if has_data else None)


def cost_chart(cost_lines: Sequence[Line], call_lines: Sequence[Line], path: Path) -> Chart:
    """Cumulative cost (USD) by agent and in total, cumulative model calls on the right."""
    return draw("cost", "Cost over time", "cumulative cost (USD)", cost_lines, path,
                secondary=call_lines, secondary_label="model calls (cumulative)",
                empty_note="no model call recorded for this run")


def accuracy_chart(lines: Sequence[Line], path: Path, target: float) -> Chart:
    return draw("accuracy", "Detection accuracy over time", "accuracy (share of events)",
                lines, path, reference=(target, f"target > {target:.0%}"),
                empty_note="no pattern_stats snapshot with a classified event")


def memory_chart(lines: Sequence[Line], path: Path, limit_mb: float) -> Chart:
    return draw("memory", "Memory over time", "MB", lines, path,
                reference=(limit_mb, f"limit {limit_mb:.0f} MB per process"),
                empty_note="no system_metrics snapshot for this run")


def confidence_chart(lines: Sequence[Line], path: Path, target: float) -> Chart:
    return draw("confidence", "Pattern confidence trend", "confidence", lines, path,
                reference=(target, f"target > {target:g} average"),
                empty_note="no detection with a pattern for this run")
