"""``trinity report``: the test plan's validation report of one run, as Markdown and HTML.

The report is made in five steps, one module each, every step using only the ones
before it:

1. extraction (``data``): ``build_report_data`` reads the run's records (the journal,
   pattern store and cost ledger in TRINITY_DATA_DIR, read-only, and the snapshot files
   and alerts.log of the log directory) into a ``ReportData``: the criteria as
   ``criteria.evaluate`` measures them, every event with its detection, the ledger's
   totals, the alerts, and the series the charts plot;
2. recommendations (``recommend``): ``incidents``, ``recommendations`` (rules applied to
   the measured figures) and ``conclusion``, with the formatting helpers they share;
3. layout (``layout``): ``document`` lays the report out as blocks (headings, lists,
   tables, images);
4. rendering (``render``): ``render_markdown`` and ``render_html`` turn those blocks into
   text, so both versions carry the same content;
5. files (``files``): ``write_charts`` draws the four charts from the series and
   ``write_report`` writes them with both renderings; ``default_output`` names the
   report.

Every figure shown is computed from recorded data. Errors: ``ReportError`` (a
``TrinityError``) with a one-line message for a missing or empty log directory, a log
directory of another run, a missing or unreadable store and an unknown run id. A partly
written log directory (torn or missing snapshot files) is reported, with what is missing
listed under "Data gaps".
"""

from __future__ import annotations

from trinity.controller.reports.report.data import (
    EventResult,
    ReportData,
    ReportError,
    build_report_data,
    confidence_series,
    cost_series,
)
from trinity.controller.reports.report.files import (
    CHART_KEYS,
    default_output,
    write_charts,
    write_report,
)
from trinity.controller.reports.report.layout import document
from trinity.controller.reports.report.recommend import conclusion, incidents, recommendations
from trinity.controller.reports.report.render import md_escape, render_html, render_markdown

__all__ = [
    "CHART_KEYS",
    "EventResult",
    "ReportData",
    "ReportError",
    "build_report_data",
    "conclusion",
    "confidence_series",
    "cost_series",
    "default_output",
    "document",
    "incidents",
    "md_escape",
    "recommendations",
    "render_html",
    "render_markdown",
    "write_charts",
    "write_report",
]
