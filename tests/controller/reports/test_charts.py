"""The report's charts: a reference line (a limit, a target) is drawn inside the axes
whatever the data, and what a chart holds is what it was given."""

from __future__ import annotations

from pathlib import Path

import pytest

from trinity.controller.reports.charts import PNG_SIGNATURE, Line, accuracy_chart, memory_chart


@pytest.mark.parametrize("values", [(190.0, 192.5, 191.0), (480.0, 520.0), (0.0, 0.0)])
def test_the_memory_limit_is_inside_the_axes(tmp_path: Path, values: tuple[float, ...]) -> None:
    """Memory far below the 500 MB limit (the usual case), around it, and all zero: the
    limit's line is within the y range (tight_layout warns, a test error here, when its
    label floats above the plot)."""
    hours = tuple(float(h) for h in range(len(values)))
    chart = memory_chart([Line("witness RSS", hours, values)], tmp_path / "memory.png", 500.0)
    assert chart.y_range is not None
    bottom, top = chart.y_range
    assert bottom <= 500.0 < top
    assert bottom <= min(values) and max(values) <= top
    assert chart.plotted == {"witness RSS": (hours, values)}
    assert chart.path.read_bytes().startswith(PNG_SIGNATURE)


def test_a_target_below_the_data_keeps_the_axes_from_zero(tmp_path: Path) -> None:
    chart = accuracy_chart([Line("accuracy", (1.0, 2.0), (0.97, 0.99))],
                           tmp_path / "accuracy.png", 0.95)
    assert chart.y_range is not None
    assert chart.y_range[0] == 0.0 and chart.y_range[1] >= 0.99


def test_an_empty_chart_says_so(tmp_path: Path) -> None:
    chart = memory_chart([Line("witness RSS", (), ())], tmp_path / "memory.png", 500.0)
    assert chart.y_range is None and chart.plotted == {}
    assert chart.note == "no system_metrics snapshot for this run"
