"""``trinity trends``' files: per kind of run four PNG charts and one HTML page.

For each kind with runs (smoke tests, full runs): ``trends_<kind>_cost.png`` (cost per
24 h against the plan's goal), ``_accuracy`` (detection accuracy against its long-run
target), ``_learning`` (the detected patterns' average confidence run after run, beside
the line the plan's weekly gain would draw from the first run) and ``_memory`` (peak
memory of all processes together against its target, the largest process beside it).
The x axis is the runs in the order they started, each labelled with its number and
result. ``trends.html`` holds the summaries, the tables, the charts (as data URIs) and
the notes, as the report's HTML page does. Charts are drawn as the report's are
(``charts``: matplotlib's Agg canvas, no pyplot, the series read back from the figure).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from trinity.controller.reports.charts import (
    Chart,
    Line,
    _plot,
    _read_back,
    draw_reference,
    new_axes,
)
from trinity.controller.reports.trends import (
    ACCURACY_OVER_TIME,
    COST_PER_24H,
    LEARNING_RATE,
    MEMORY_OVER_TIME,
    TABLE_HEADER,
    WEEK_S,
    RunFigures,
    Trends,
    TrendsError,
    summary_lines,
    table_rows,
)

CHART_KEYS = ("cost", "accuracy", "learning", "memory")
HTML_NAME = "trends.html"


def _series(found: Sequence[RunFigures], label: str,
            values: Sequence[float | None]) -> Line:
    kept = [(i + 1.0, v) for i, v in enumerate(values) if v is not None]
    return Line(label, tuple(x for x, _ in kept), tuple(y for _, y in kept))


def draw_runs(key: str, title: str, ylabel: str, found: Sequence[RunFigures],
              lines: Sequence[Line], path: Path, *,
              reference: tuple[float, str] | None = None) -> Chart:
    """One chart over the runs (x: run number, labelled with its result)."""
    fig, ax = new_axes(title, "runs in the order they started", ylabel)
    has_data = any(line.x for line in lines)
    if not has_data:
        ax.text(0.5, 0.5, "no run recorded this figure", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_yticks([])
    _plot(ax, lines)
    ax.set_xticks([i + 1 for i in range(len(found))],
                  [f"#{i + 1}\n{r.result}" for i, r in enumerate(found)], fontsize=8)
    ax.set_xlim(0.5, len(found) + 0.5)
    if has_data and all(v >= 0 for line in lines for v in line.y):
        ax.set_ylim(bottom=0)
    if has_data and reference is not None:
        draw_reference(ax, reference)
    if has_data:
        ax.legend(fontsize=8, loc="best")
    plotted = _read_back(ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    bottom, top = ax.get_ylim()
    return Chart(key, title, path, plotted, "" if has_data else "no data",
                 (float(bottom), float(top)) if has_data else None)


def _learning_target(found: Sequence[RunFigures]) -> Line:
    """The confidence the plan's weekly gain would reach, from the first run that has one."""
    first = next((r for r in found if r.confidence is not None), None)
    if first is None or first.confidence is None:
        return Line(f"target {LEARNING_RATE.text}", (), ())
    start = first.confidence
    limit = LEARNING_RATE.limit or 0.0
    values = [start + limit * (r.started_ms - first.started_ms) / 1000 / WEEK_S
              if r.started_ms >= first.started_ms else None for r in found]
    return _series(found, f"target {LEARNING_RATE.text} from run 1", values)


def kind_charts(found: Sequence[RunFigures], folder: Path, stem: str) -> list[Chart]:
    """The four charts of one kind's runs, as ``<stem>_<key>.png``."""
    def path(key: str) -> Path:
        return folder / f"{stem}_{key}.png"

    def limit(target: float | None) -> float:
        return target or 0.0

    return [
        draw_runs("cost", "Cost per 24 h", "USD per 24 simulated hours", found,
                  [_series(found, "cost per 24 h (shorter runs scaled)",
                           [r.cost_per_24h_usd for r in found])], path("cost"),
                  reference=(limit(COST_PER_24H.limit), f"target {COST_PER_24H.text}")),
        draw_runs("accuracy", "Detection accuracy", "share of classified events", found,
                  [_series(found, "detection accuracy", [r.accuracy for r in found])],
                  path("accuracy"),
                  reference=(limit(ACCURACY_OVER_TIME.limit),
                             f"target {ACCURACY_OVER_TIME.text}")),
        draw_runs("learning", "Learning: average pattern confidence per run", "confidence",
                  found, [_series(found, "average confidence",
                                  [r.confidence for r in found]),
                          _learning_target(found)], path("learning")),
        draw_runs("memory", "Peak memory", "MB", found,
                  [_series(found, "all processes together (PSS)",
                           [r.peak_memory_mb for r in found]),
                   _series(found, "largest process (RSS)", [r.peak_process_mb for r in found])],
                  path("memory"),
                  reference=(limit(MEMORY_OVER_TIME.limit), f"target {MEMORY_OVER_TIME.text}")),
    ]


def _table_html(rows: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    head, *body = rows
    return ("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                      for row in body) + "</tbody></table>")


def _figure_html(chart: Chart) -> str:
    encoded = base64.b64encode(chart.path.read_bytes()).decode("ascii")
    title = html.escape(chart.title)
    return (f'<figure><img alt="{title}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{title}</figcaption></figure>")


_CSS = ("body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}"
        "td,th{border:1px solid #bbb;padding:.25rem .5rem;text-align:left}"
        "th{background:#eee}img{max-width:100%}figure{margin:1rem 0}")


def render_html(trends: Trends, drawn: Mapping[str, list[Chart]]) -> str:
    parts = ["<h1>Trinity: metrics tracked over time</h1>",
             f"<p>{html.escape(f'Runs whose logs are in {trends.input_dir}.')}</p>"]
    for summary in trends.summaries:
        lines = summary_lines(summary)
        parts.append(f"<h2>{html.escape(lines[0].split(':')[0])}</h2>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(line.strip())}</li>"
                                      for line in lines) + "</ul>")
        mine = trends.of_kind(summary.kind)
        if mine:
            parts.append(_table_html([TABLE_HEADER, *table_rows(mine)]))
        parts += [_figure_html(c) for c in drawn.get(summary.kind, [])]
    if trends.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(
            f"<li>{html.escape(n)}</li>" for n in trends.notes) + "</ul>")
    body = "\n".join(parts)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Trinity trends</title><style>{_CSS}</style></head><body>\n{body}\n"
            "</body></html>\n")


def write_trends(trends: Trends, folder: Path) -> list[Path]:
    """The charts of every kind with runs and ``trends.html`` in ``folder`` (created);
    returns the paths written. An unwritable folder is a ``TrendsError``."""
    if folder.exists() and not folder.is_dir():
        raise TrendsError(f"--output {folder} is a file; name a folder for the charts")
    try:
        drawn: dict[str, list[Chart]] = {
            s.kind: kind_charts(trends.of_kind(s.kind), folder, f"trends_{s.kind}")
            for s in trends.summaries if s.runs}
        page = folder / HTML_NAME
        page.write_text(render_html(trends, drawn), encoding="utf-8")
    except OSError as exc:
        raise TrendsError(f"cannot write the trends: {exc}") from None
    return [page, *(c.path for charts in drawn.values() for c in charts)]
