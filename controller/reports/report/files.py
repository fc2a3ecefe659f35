"""The report's files: the four chart PNGs, the Markdown report and its HTML twin.

``write_charts`` draws the ``CHART_KEYS`` charts as ``<stem>_<key>.png``;
``write_report`` writes them beside the Markdown report and the HTML page (an unwritable
output is a ``ReportError``); ``default_output`` names the report
``reports/24h_test_YYYYMMDD.md`` in the data directory, dated by the run's start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from trinity.controller.reports import charts
from trinity.controller.reports.report.data import ReportData, ReportError
from trinity.controller.reports.report.render import render_html, render_markdown
from trinity.plan import ACCURACY_TARGET, CONFIDENCE_TARGET, MEMORY_LIMIT_MB
from trinity.settings import Settings

CHART_KEYS = ("cost", "accuracy", "memory", "confidence")


def write_charts(data: ReportData, folder: Path, stem: str) -> list[charts.Chart]:
    """The four charts as ``<stem>_<key>.png`` in ``folder``."""
    def path(key: str) -> Path:
        return folder / f"{stem}_{key}.png"

    return [
        charts.cost_chart(data.cost_lines, data.call_lines, path("cost")),
        charts.accuracy_chart(data.accuracy_lines, path("accuracy"), ACCURACY_TARGET),
        charts.memory_chart(data.memory_lines, path("memory"), MEMORY_LIMIT_MB),
        charts.confidence_chart(data.confidence_lines, path("confidence"), CONFIDENCE_TARGET),
    ]


def default_output(settings: Settings, data: ReportData) -> Path:
    """``reports/24h_test_YYYYMMDD.md`` in the data directory, dated by the run's start."""
    day = datetime.fromtimestamp(data.run.started_ms / 1000, UTC).strftime("%Y%m%d")
    return settings.data_dir / "reports" / f"24h_test_{day}.md"


def write_report(data: ReportData, output: Path) -> list[Path]:
    """The Markdown report at ``output``, its HTML twin beside it (``.html``) and the four
    chart PNGs (``<stem>_<chart>.png``); returns the paths written."""
    if output.is_dir():
        raise ReportError(f"--output {output} is a directory; name the report's .md file")
    html_path = output.with_suffix(".html")
    try:
        drawn = write_charts(data, output.parent, output.stem)
        output.write_text(render_markdown(data, drawn), encoding="utf-8")
        html_path.write_text(render_html(data, drawn), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write the report: {exc}") from None
    return [output, html_path, *(c.path for c in drawn)]
