"""Reading an export back: shared by the CSV export's tests on stores written through the
project's own writers (tests/controller/reports/test_export.py) and on the session's
compressed run (tests/system/test_export.py)."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from trinity.cli.reports import export as export_command
from trinity.settings import Settings

FILES = ("events.csv", "outcomes.csv", "llm_calls.csv", "alerts.csv", "metrics.csv")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def export_cli(settings: Settings, *args: str) -> Result:
    return CliRunner().invoke(export_command, list(args),
                              env={"TRINITY_DATA_DIR": str(settings.data_dir)})
