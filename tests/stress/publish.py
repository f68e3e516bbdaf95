"""Put the summary of a ``make stress`` run into docs/reliability.md.

``python -m tests.stress.publish REPORT PAGE`` replaces what lies between the
page's two marker comments with REPORT (the Markdown the stress run wrote,
``stress-report.md``). ``make stress`` calls it only after a run with a good
row for every item, so the page only ever holds the figures of a complete
run.
"""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN = "<!-- stress-report:begin (written by make stress; edit the tests, not this) -->"
END = "<!-- stress-report:end -->"


class PublishError(Exception):
    pass


def between(page: str) -> str:
    """The text between the markers."""
    if page.count(BEGIN) != 1 or page.count(END) != 1:
        raise PublishError(f"the page needs each marker exactly once: {BEGIN!r}, {END!r}")
    start = page.index(BEGIN) + len(BEGIN)
    end = page.index(END)
    if end < start:
        raise PublishError("the end marker comes before the begin marker")
    return page[start:end]


def publish(report: str, page: str) -> str:
    """``page`` with ``report`` between its markers."""
    if not report.startswith("Run: ") or "\n| item " not in report:
        raise PublishError("the report is not a stress summary (Run: line, then the table)")
    between(page)  # checks the markers
    start = page.index(BEGIN) + len(BEGIN)
    return page[:start] + "\n" + report.strip() + "\n" + page[page.index(END) :]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tests.stress.publish REPORT PAGE", file=sys.stderr)
        return 2
    report, page = Path(args[0]), Path(args[1])
    try:
        page.write_text(publish(report.read_text(), page.read_text()))
    except (OSError, PublishError) as e:
        print(f"publish: {e}", file=sys.stderr)
        return 1
    print(f"publish: {page} holds the summary of {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
