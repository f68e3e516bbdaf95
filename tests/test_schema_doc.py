"""docs/schema.md keeps up with the schema: every table, view and column is named.

The database is built from every migration, and each table and view must
have its own heading or bullet in the document (its name in backticks), in
which each of its columns is named in backticks, or named elsewhere as
`table.column`. A view whose columns are exactly those of a table may say
"the columns of `table`" instead of listing them.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_server.store import migrate

DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
NAME = re.compile(r"`([^`\n]+)`")
SAME_COLUMNS = re.compile(r"the columns\s+of\s+`([a-z_0-9]+)`")


def schema() -> dict[str, list[str]]:
    """Every table and view of a database built from all migrations, with its columns."""
    conn = sqlite3.connect(":memory:")
    try:
        migrate(conn)
        names = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {
            name: [row[1] for row in conn.execute(f'PRAGMA table_info("{name}")')] for name in names
        }
    finally:
        conn.close()


def blocks(text: str) -> Iterator[tuple[set[str], str]]:
    """(names in the heading or bullet's first line, its whole text) for each block.

    A block starts at a heading or at a top-level bullet that opens with a
    bold name (``- **`name`**``) and runs to the next one.
    """
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    head, lines = "", []
    for line in text.splitlines():
        if line.startswith("#") or line.startswith("- **`"):
            if head:
                yield set(NAME.findall(head)), "\n".join(lines)
            head, lines = line, [line]
        else:
            lines.append(line)
    if head:
        yield set(NAME.findall(head)), "\n".join(lines)


@pytest.fixture(scope="module")
def tables() -> dict[str, list[str]]:
    return schema()


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_table_and_view_has_a_section(tables, doc):
    headed = set().union(*(names for names, _ in blocks(doc)))
    missing = sorted(set(tables) - headed)
    assert not missing, f"docs/schema.md has no heading or bullet for {missing}"


def test_every_column_is_named_in_its_section(tables, doc):
    dotted = set(NAME.findall(doc))
    missing = []
    for table, columns in tables.items():
        named: set[str] = set()
        for heads, body in blocks(doc):
            if table in heads:
                named |= set(NAME.findall(body))
                for same in SAME_COLUMNS.findall(body):
                    assert tables.get(same) == columns, (
                        f"{table}: docs say it has the columns of {same}, but it has {columns}"
                    )
                    named |= set(columns)
        missing += [
            f"{table}.{column}"
            for column in columns
            if column not in named and f"{table}.{column}" not in dotted
        ]
    assert not missing, f"docs/schema.md does not name {missing}"


def test_sections_end_where_the_next_begins():
    """The test itself: a column named under another table's heading does not count."""
    text = "### `t`: a table\n\n`a`, `b` and `other.c`\n\n- **`v`**: `x`\n\n## `w`\n`y`\n"
    found = {min(heads): set(NAME.findall(body)) for heads, body in blocks(text)}
    assert found == {"t": {"t", "a", "b", "other.c"}, "v": {"v", "x"}, "w": {"w", "y"}}
