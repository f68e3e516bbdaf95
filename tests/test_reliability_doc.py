"""docs/reliability.md holds the summary of one complete ``make stress`` run:
a row for every item the stress suite expects, none failed or skipped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .stress.conftest import EXPECTED, HEADERS
from .stress.publish import BEGIN, END, PublishError, between, publish

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of each row of the Markdown table(s) in ``markdown``, header excluded."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append([cell.strip() for cell in cells])
    return [r for r in rows if r != HEADERS]


def test_the_page_holds_a_full_run_with_a_good_row_for_every_item():
    summary = between(PAGE.read_text())
    assert "RESULTS" not in summary, "the placeholder is still there: run make stress"
    assert summary.strip().startswith("Run: ") and "full size" in summary
    rows = table_rows(summary)
    items = [row[0] for row in rows]
    missing = [item for item in EXPECTED if item not in items]
    assert not missing, f"no row for {missing}: run make stress"
    bad = [
        row[0] for row in rows if any(w in " ".join(row) for w in ("FAILED", "SKIPPED", "NOT RUN"))
    ]
    assert not bad, f"rows failed or skipped: {bad}"


def test_publish_replaces_only_what_lies_between_the_markers():
    page = f"# Title\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n"
    report = "Run: now, full size.\n\n| item | x |\n|---|---|\n| a | 1 |\n"
    published = publish(report, page)
    assert published.startswith("# Title\n\nbefore\n\n") and published.endswith("\n\nafter\n")
    assert "old table" not in published and between(published).strip() == report.strip()
    assert publish(report, published) == published  # again: the same page


@pytest.mark.parametrize(
    ("page", "report"),
    [
        ("no markers at all", "Run: x\n\n| item | x |\n"),
        (f"{END}\n{BEGIN}\n", "Run: x\n\n| item | x |\n"),
        (f"{BEGIN}\n{END}\n{BEGIN}\n", "Run: x\n\n| item | x |\n"),
        (f"{BEGIN}\n{END}\n", "not a report"),
    ],
)
def test_publish_refuses_a_page_without_its_markers_or_a_report_without_its_table(page, report):
    with pytest.raises(PublishError):
        publish(report, page)
