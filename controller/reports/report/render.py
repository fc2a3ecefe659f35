"""The report's blocks rendered as Markdown and as one self-contained HTML page.

``render_markdown`` escapes every text (``md_escape``: one line, no table-breaking pipe,
no raw HTML tag) and links the chart PNGs by file name; ``render_html`` escapes with
``html.escape`` and embeds the charts as data URIs. Both render ``document``'s blocks.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence

from trinity.controller.reports import charts
from trinity.controller.reports.report.data import ReportData
from trinity.controller.reports.report.layout import Block, document

_MD_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def md_escape(text: str) -> str:
    """Text safe inside Markdown: one line, no table-breaking pipe, no raw HTML tag."""
    return _MD_TAG.sub(r"\\<", " ".join(text.split()).replace("|", r"\|"))


def _md_block(block: Block) -> list[str]:
    if block.kind == "heading":
        return ["#" * block.level + " " + md_escape(block.text), ""]
    if block.kind == "paragraph":
        return [md_escape(block.text), ""]
    if block.kind in ("bullets", "numbered"):
        marks = [f"{i}." if block.kind == "numbered" else "-"
                 for i in range(1, len(block.items) + 1)]
        return [f"{m} {md_escape(item)}" for m, item in zip(marks, block.items, strict=True)] + [""]
    if block.kind == "table":
        head, *body = block.rows
        lines = ["| " + " | ".join(md_escape(c) for c in head) + " |",
                 "|" + "|".join(" --- " for _ in head) + "|"]
        return lines + ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in body] + [""]
    assert block.kind == "image" and block.path is not None
    from urllib.parse import quote

    return [f"![{md_escape(block.text)}]({quote(block.path.name)})", ""]


def render_markdown(data: ReportData, drawn: Sequence[charts.Chart]) -> str:
    """The report as Markdown; chart images are linked by file name (same folder)."""
    return "\n".join(line for block in document(data, drawn) for line in _md_block(block))


_CSS = ("body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}table{border-collapse:collapse;margin:.5rem 0}"
        "td,th{border:1px solid #bbb;padding:.25rem .5rem;text-align:left}"
        "th{background:#eee}img{max-width:100%}figure{margin:1rem 0}")


def _html_block(block: Block) -> str:
    esc = html.escape
    if block.kind == "heading":
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    if block.kind == "paragraph":
        return f"<p>{esc(block.text)}</p>"
    if block.kind in ("bullets", "numbered"):
        tag = "ol" if block.kind == "numbered" else "ul"
        return f"<{tag}>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + f"</{tag}>"
    if block.kind == "table":
        head, *body = block.rows
        return ("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                          for row in body) + "</tbody></table>")
    assert block.kind == "image" and block.path is not None
    encoded = base64.b64encode(block.path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(block.text)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(block.text)}</figcaption></figure>")


def render_html(data: ReportData, drawn: Sequence[charts.Chart]) -> str:
    """The same report as one self-contained HTML page (charts as data URIs)."""
    body = "\n".join(_html_block(b) for b in document(data, drawn))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(f'Trinity 24-hour test report {data.run.run_id}')}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
