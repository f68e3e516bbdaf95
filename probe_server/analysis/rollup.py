"""Rollups of the request log, kept up to date by each report (schema 0014).

Sessions, requests and answers are append-only: the server inserts them and
never changes them. So what the report needs of them (sessions per IPv4
address, which IPv6 address fetched blue balls for which IPv4 address, the
first answer of each completed HIT, the §4.4 counters) can be added up once
and extended with the rows logged since, instead of joining millions of rows
on every report.

The invariant: the rollups hold exactly what the rows of sessions, requests
and answers up to the ids in ``rollup_state`` give, a pair of rows (a
request or an answer and its session) counting once both are covered. Each
step moves one watermark forward and adds what the newly covered rows give
with the rows already covered of the other tables, so every pair is counted
exactly once, whatever order the rows arrived in. A row deleted or changed
by hand empties ``rollup_state`` (triggers of 0014), and the next refresh
builds everything again from nothing.

Every write is a transaction of bounded size, so a report beside a live
server holds the write lock only briefly each time; each step re-reads the
watermarks inside its transaction, so two reports at once never count
anything twice.

What can change in place is not rolled up, or is kept in step:

- GeoIP answers and IPv6 classes are joined when the report reads them;
- HITs and batches (the batch of a completion, its target country, when its
  hours start) are compared with the copy in ``rollup_hits`` and
  ``rollup_batches`` on every refresh, and the completions whose batch
  changed are worked out again;
- MTurk's submit times are copied into ``rollup_completions`` by triggers on
  ``assignments``.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from collections.abc import Callable, Iterator

SOURCES = ("sessions", "requests", "answers")
TABLES = (
    "rollup_ipv4",
    "rollup_blue",
    "rollup_counts",
    "rollup_labels",
    "rollup_hits",
    "rollup_batches",
    "rollup_completions",
)
# Rows per transaction: a step of either size takes a fraction of a second,
# so a live server's writer never waits long for the lock.
SESSION_CHUNK = 50_000
ROW_CHUNK = 200_000
COPY_CHUNK = 50_000
# As the report's readers (report.open_reader): a build reads millions of
# index entries in place. (A page cache larger than SQLite's 2 MiB default
# was tried: no faster, 190 MiB more memory.)
MMAP_BYTES = 1 << 31

BLUE = "r.token_ok = 1 AND r.site = 'ipv6' AND r.kind = 'blue' AND r.status = 200"

# report_completions' batch_info_start, with the first session of each label
# from ``labels`` (rollup_labels) instead of a walk over every session.
BATCH_CONTEXT = """
WITH batch_start AS (
    SELECT batch, min(first_created) AS first_created
    FROM (
        SELECT label AS batch, created AS first_created FROM {labels}
        UNION ALL
        SELECT h.batch, min(s.created)
        FROM batches b
        JOIN hits h ON h.batch = b.name
        JOIN sessions s ON s.hit_id = h.hit_id
        WHERE b.published IS NULL
        GROUP BY h.batch
    )
    GROUP BY batch
),
batch_info AS (
    SELECT name AS batch, reward, countries, published FROM batches
    UNION ALL
    SELECT batch, NULL, '', NULL FROM batch_start
    WHERE batch NOT IN (SELECT name FROM batches)
)
SELECT i.batch, i.reward, i.countries, COALESCE(i.published, s.first_created) AS start
FROM batch_info i
LEFT JOIN batch_start s ON s.batch = i.batch
"""

# A completion's key: an accepted assignment gathers all its sessions (a
# reload makes a new one), anything else is its own session.
KEY = (
    "CASE WHEN s.visit = 'accepted' AND s.assignment_id IS NOT NULL"
    " THEN 'a:' || s.assignment_id ELSE 't:' || s.token END"
)
ASSIGNMENT = "CASE WHEN s.visit = 'accepted' THEN s.assignment_id END"
SESSION_BATCH = (
    "COALESCE((SELECT h.batch FROM {hits} h WHERE h.hit_id = s.hit_id), NULLIF(s.batch, ''))"
)
# report_completions' hours, and the minute Figure 2 groups by, as the
# trigger rollup_completions_hours works them out again.
HOURS = "(COALESCE(g.submit_time, c.t) - {start}) / 3600.0"
MINUTE = "CAST({hours} * 60 AS INTEGER) - ({hours} < 0)"


def _hours(start: str) -> str:
    hours = HOURS.format(start=start)
    return f"{hours}, {MINUTE.format(hours=hours)}"


# The first answer of each completed HIT from ``{source}`` (answers joined
# with their sessions, as report_completions' `answered`): of the answers
# of one key, the first (smallest id) wins, whichever was rolled up first.
COMPLETIONS = f"""
INSERT INTO rollup_completions (key, answer_id, hit_id, label, ipv4, answered_at, correct,
                                batch, batch_country, start, submit_time, hours, minute)
SELECT c.key, c.answer_id, c.hit_id, c.label, c.ipv4, c.t, c.correct, c.batch,
       CASE WHEN length(b.countries) = 2 THEN b.countries END, b.start, g.submit_time,
       {_hours("b.start")}
FROM (
    SELECT {KEY} AS key, a.id AS answer_id, {ASSIGNMENT} AS assignment_id, s.hit_id,
           s.batch AS label, s.ipv4, a.t, a.red_correct AS correct,
           {SESSION_BATCH.format(hits="rollup_hits")} AS batch
    FROM {{source}}
    WHERE s.visit <> 'preview' AND {{condition}}
) c
LEFT JOIN rollup_batches b ON b.batch = c.batch
LEFT JOIN assignments g ON g.assignment_id = c.assignment_id
WHERE true  -- an upsert's SELECT needs a WHERE, or SQLite reads ON as the join's
ON CONFLICT (key) DO UPDATE SET
    answer_id = excluded.answer_id,
    hit_id = excluded.hit_id,
    label = excluded.label,
    ipv4 = excluded.ipv4,
    answered_at = excluded.answered_at,
    correct = excluded.correct,
    batch = excluded.batch,
    batch_country = excluded.batch_country,
    start = excluded.start,
    submit_time = excluded.submit_time,
    hours = excluded.hours,
    minute = excluded.minute
WHERE excluded.answer_id < rollup_completions.answer_id
"""


def _state(conn: sqlite3.Connection) -> dict[str, int] | None:
    found = {
        source: int(n) for source, n in conn.execute("SELECT source, through FROM rollup_state")
    }
    return found if set(found) == set(SOURCES) else None


def _add(conn: sqlite3.Connection, counts: list[tuple[str, int]]) -> None:
    conn.executemany(
        "INSERT INTO rollup_counts (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        [(name, n) for name, n in counts if n],
    )


def _requests(conn: sqlite3.Connection, low: int, high: int, sessions: int) -> None:
    """Requests ``low < id <= high``, with the sessions already covered."""
    total, signed = conn.execute(
        "SELECT count(*), COALESCE(sum(token_ok = 1), 0) FROM requests WHERE id > ? AND id <= ?",
        (low, high),
    ).fetchone()
    _add(conn, [("requests", total), ("requests signed", signed)])
    span = (low, high, sessions)
    _add(
        conn,
        [
            (f"requests {visit}", n)
            for visit, n in conn.execute(
                "SELECT s.visit, count(*) FROM requests r CROSS JOIN sessions s"
                " ON s.token = r.token"
                " WHERE r.id > ? AND r.id <= ? AND r.token_ok = 1 AND s.id <= ?"
                " AND s.visit IN ('preview', 'direct')"
                " GROUP BY s.visit",
                span,
            )
        ],
    )
    conn.execute(
        "INSERT OR IGNORE INTO rollup_blue (ipv6, ipv4)"
        " SELECT r.addr, s.ipv4 FROM requests r CROSS JOIN sessions s ON s.token = r.token"
        f" WHERE r.id > ? AND r.id <= ? AND {BLUE} AND s.id <= ?",
        span,
    )


def _answers(conn: sqlite3.Connection, low: int, high: int, sessions: int) -> None:
    """Answers ``low < id <= high``, with the sessions already covered."""
    conn.execute(
        COMPLETIONS.format(
            source="answers a CROSS JOIN sessions s ON s.token = a.session_token",
            condition="a.id > ? AND a.id <= ? AND s.id <= ?",
        ),
        (low, high, sessions),
    )


def _sessions(conn: sqlite3.Connection, low: int, high: int, requests: int, answers: int) -> None:
    """Sessions ``low < id <= high``, with the requests and answers already covered."""
    span = (low, high)
    _add(
        conn,
        [
            (f"sessions {visit}", n)
            for visit, n in conn.execute(
                "SELECT visit, count(*) FROM sessions WHERE id > ? AND id <= ? GROUP BY visit",
                span,
            )
        ],
    )
    conn.execute(
        "INSERT INTO rollup_ipv4 (ipv4, sessions, previews, accepted)"
        " SELECT ipv4, count(*), sum(visit = 'preview'), sum(visit = 'accepted')"
        " FROM sessions WHERE id > ? AND id <= ? GROUP BY ipv4"
        " ON CONFLICT (ipv4) DO UPDATE SET sessions = sessions + excluded.sessions,"
        " previews = previews + excluded.previews, accepted = accepted + excluded.accepted",
        span,
    )
    conn.execute(
        "INSERT INTO rollup_labels (label, created)"
        " SELECT batch, min(created) FROM sessions WHERE id > ? AND id <= ? AND batch <> ''"
        " GROUP BY batch"
        " ON CONFLICT (label) DO UPDATE SET created = min(created, excluded.created)",
        span,
    )
    _add(
        conn,
        [
            (f"requests {visit}", n)
            for visit, n in conn.execute(
                "SELECT s.visit, count(*) FROM sessions s CROSS JOIN requests r"
                " ON r.token = s.token"
                " WHERE s.id > ? AND s.id <= ? AND s.visit IN ('preview', 'direct')"
                " AND r.token_ok = 1 AND r.id <= ?"
                " GROUP BY s.visit",
                (*span, requests),
            )
        ],
    )
    conn.execute(
        "INSERT OR IGNORE INTO rollup_blue (ipv6, ipv4)"
        " SELECT r.addr, s.ipv4 FROM sessions s"
        " CROSS JOIN requests r INDEXED BY requests_blue ON r.token = s.token"
        f" WHERE s.id > ? AND s.id <= ? AND {BLUE} AND r.id <= ?",
        (*span, requests),
    )
    conn.execute(
        COMPLETIONS.format(
            source="sessions s CROSS JOIN answers a ON a.session_token = s.token",
            condition="s.id > ? AND s.id <= ? AND a.id <= ?",
        ),
        (*span, answers),
    )


def _context(conn: sqlite3.Connection) -> int:
    """Bring rollup_hits and rollup_batches up to date; rework the completions they touch.

    Returns how many completions were worked out again.
    """
    hits: set[tuple[str, str]] = set(conn.execute("SELECT hit_id, batch FROM hits"))
    batches: set[tuple[str, str | None, str | None, float | None]] = set(
        conn.execute(BATCH_CONTEXT.format(labels="rollup_labels"))
    )
    old_hits = set(conn.execute("SELECT hit_id, batch FROM rollup_hits"))
    old_batches = set(conn.execute("SELECT batch, reward, countries, start FROM rollup_batches"))
    changed_hits = {row[0] for row in hits ^ old_hits}
    changed_batches = {row[0] for row in batches ^ old_batches}
    if not changed_hits and not changed_batches:
        return 0
    conn.execute("DELETE FROM rollup_hits")
    conn.executemany("INSERT INTO rollup_hits (hit_id, batch) VALUES (?, ?)", sorted(hits))
    conn.execute("DELETE FROM rollup_batches")
    by_name = sorted(batches, key=lambda row: row[0])
    conn.executemany(
        "INSERT INTO rollup_batches (batch, reward, countries, start) VALUES (?, ?, ?, ?)", by_name
    )
    # The completions of a HIT that moved, and of a batch whose target or
    # start changed (by the batch they had, before it is worked out again).
    affected = [
        (key,)
        for key, hit_id, batch in conn.execute("SELECT key, hit_id, batch FROM rollup_completions")
        if hit_id in changed_hits or batch in changed_batches
    ]
    conn.executemany(
        "UPDATE rollup_completions"
        " SET batch = COALESCE((SELECT h.batch FROM rollup_hits h"
        "                       WHERE h.hit_id = rollup_completions.hit_id), NULLIF(label, ''))"
        " WHERE key = ?",
        affected,
    )
    conn.executemany(
        "UPDATE rollup_completions"
        " SET (batch_country, start) = (SELECT CASE WHEN length(b.countries) = 2"
        "                                      THEN b.countries END, b.start"
        "                               FROM rollup_batches b"
        "                               WHERE b.batch = rollup_completions.batch)"
        " WHERE key = ?",
        affected,
    )
    return len(affected)


# Building from nothing walks the big indexes in their own order (tokens,
# addresses): many times faster than the incremental steps' probes at
# random places. It reads one snapshot into temporary tables, in the order
# of the rollups' keys, so the server keeps writing meanwhile; then copies
# them in chunks. MTurk's submit times are read as each chunk is copied: the
# triggers that keep them had no rows to update before.
BUILD = (
    "CREATE TEMP TABLE build_ipv4 AS"
    " SELECT ipv4, count(*) AS sessions, sum(visit = 'preview') AS previews,"
    " sum(visit = 'accepted') AS accepted"
    " FROM sessions INDEXED BY sessions_ipv4 GROUP BY ipv4 ORDER BY ipv4",
    "CREATE TEMP TABLE build_blue AS"
    " SELECT DISTINCT r.addr AS ipv6, s.ipv4 FROM requests r INDEXED BY requests_blue"
    f" CROSS JOIN sessions s ON s.token = r.token WHERE {BLUE} ORDER BY 1, 2",
    # Counters that are 0 have no row, as when they are added up in steps.
    "CREATE TEMP TABLE build_counts AS SELECT * FROM ("
    " SELECT 'sessions preview' AS name, COALESCE(sum(previews), 0) AS value FROM build_ipv4"
    " UNION ALL SELECT 'sessions accepted', COALESCE(sum(accepted), 0) FROM build_ipv4"
    " UNION ALL SELECT 'sessions direct', COALESCE(sum(sessions - previews - accepted), 0)"
    " FROM build_ipv4"
    " UNION ALL SELECT 'requests', count(*) FROM requests"
    " UNION ALL SELECT 'requests signed', count(*) FROM requests WHERE token_ok = 1"
    " UNION ALL SELECT 'requests ' || s.visit,"
    " sum((SELECT count(*) FROM requests r WHERE r.token = s.token AND r.token_ok = 1))"
    " FROM sessions s INDEXED BY sessions_facts WHERE s.visit IN ('preview', 'direct')"
    " GROUP BY s.visit"
    ") WHERE value <> 0",
    "CREATE TEMP TABLE build_labels AS"
    " SELECT batch AS label, min(created) AS created FROM sessions INDEXED BY sessions_label"
    " WHERE batch <> '' GROUP BY batch ORDER BY batch",
    "CREATE TEMP TABLE build_hits AS SELECT hit_id, batch FROM hits ORDER BY hit_id",
    "CREATE TEMP TABLE build_batches AS SELECT * FROM ("
    + BATCH_CONTEXT.format(labels="build_labels")
    + ") ORDER BY batch",
    "CREATE INDEX temp.build_hits_id ON build_hits (hit_id)",
    "CREATE INDEX temp.build_batches_name ON build_batches (batch)",
    # SQLite takes the bare columns from the row holding min(a.id): the
    # first answer of each completion.
    "CREATE TEMP TABLE build_completions AS"
    " SELECT c.*, CASE WHEN length(b.countries) = 2 THEN b.countries END AS batch_country,"
    " b.start"
    " FROM ("
    f"  SELECT {KEY} AS key, min(a.id) AS answer_id, {ASSIGNMENT} AS assignment_id,"
    "          s.hit_id, s.batch AS label, s.ipv4, a.t, a.red_correct AS correct,"
    f"         {SESSION_BATCH.format(hits='build_hits')} AS batch"
    "   FROM sessions s INDEXED BY sessions_facts"
    "   CROSS JOIN answers a ON a.session_token = s.token"
    "   WHERE s.visit <> 'preview'"
    "   GROUP BY 1"
    " ) c"
    " LEFT JOIN build_batches b ON b.batch = c.batch",
    # (No ORDER BY: the grouping already leaves the rows in key order, which
    # only makes the copy faster; sorting them again would cost 0.4 s.)
)
# (temporary table, the statement that copies its rows c.rowid > ? AND <= ?)
COPY = (
    (
        "build_ipv4",
        "INSERT INTO rollup_ipv4 (ipv4, sessions, previews, accepted)"
        " SELECT ipv4, sessions, previews, accepted FROM build_ipv4 c",
    ),
    ("build_blue", "INSERT INTO rollup_blue (ipv6, ipv4) SELECT ipv6, ipv4 FROM build_blue c"),
    (
        "build_counts",
        "INSERT INTO rollup_counts (name, value) SELECT name, value FROM build_counts c",
    ),
    (
        "build_labels",
        "INSERT INTO rollup_labels (label, created) SELECT label, created FROM build_labels c",
    ),
    (
        "build_hits",
        "INSERT INTO rollup_hits (hit_id, batch) SELECT hit_id, batch FROM build_hits c",
    ),
    (
        "build_batches",
        "INSERT INTO rollup_batches (batch, reward, countries, start)"
        " SELECT batch, reward, countries, start FROM build_batches c",
    ),
    (
        "build_completions",
        "INSERT INTO rollup_completions (key, answer_id, hit_id, label, ipv4, answered_at,"
        " correct, batch, batch_country, start, submit_time, hours, minute)"
        " SELECT c.key, c.answer_id, c.hit_id, c.label, c.ipv4, c.t, c.correct, c.batch,"
        f" c.batch_country, c.start, g.submit_time, {_hours('c.start')}"
        " FROM build_completions c"
        " LEFT JOIN assignments g ON g.assignment_id = c.assignment_id",
    ),
)
# rollup_state holds only this source, with a number of its own, while one
# refresh builds: a row deleted by hand meanwhile empties the table (the
# triggers of 0014), and another refresh starting a build replaces the
# number; either way the build stops copying and is not finished.
BUILDING = "building"


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _still_building(conn: sqlite3.Connection, build: int, work: Callable[[], object]) -> bool:
    """Run ``work`` in a transaction of its own if the build is still ours."""
    with _transaction(conn):
        if conn.execute("SELECT source, through FROM rollup_state").fetchall() != [
            (BUILDING, build)
        ]:
            return False
        work()
    return True


def _write(conn: sqlite3.Connection, build: int, work: str, *params: int) -> bool:
    """Run the statement ``work`` in a transaction of its own if the build is still ours."""
    return _still_building(conn, build, lambda: conn.execute(work, params))


def _build(conn: sqlite3.Connection) -> bool:
    """Roll everything up from nothing; False if stopped (see BUILDING)."""
    build = secrets.randbits(62)
    with _transaction(conn):
        conn.execute("DELETE FROM rollup_state")
        conn.execute("INSERT INTO rollup_state (source, through) VALUES (?, ?)", (BUILDING, build))
        for table in TABLES:
            conn.execute(f"DELETE FROM {table}")
    try:
        with _transaction(conn, "BEGIN"):  # one snapshot; only the temporary tables are written
            targets = [
                conn.execute(f"SELECT COALESCE(max(id), 0) FROM {source}").fetchone()[0]
                for source in SOURCES
            ]
            for statement in BUILD:
                conn.execute(statement)
        for table, copy in COPY:
            (last,) = conn.execute(f"SELECT COALESCE(max(rowid), 0) FROM temp.{table}").fetchone()
            work = f"{copy} WHERE c.rowid > ? AND c.rowid <= ? ORDER BY c.rowid"
            for low in range(0, last, COPY_CHUNK):
                if not _write(conn, build, work, low, low + COPY_CHUNK):
                    return False

        def finish() -> None:
            conn.execute("DELETE FROM rollup_state")
            conn.executemany(
                "INSERT INTO rollup_state (source, through) VALUES (?, ?)",
                zip(SOURCES, targets, strict=True),
            )

        return _still_building(conn, build, finish)
    finally:
        for table, _ in COPY:
            conn.execute(f"DROP TABLE IF EXISTS temp.{table}")


def _step(conn: sqlite3.Connection, targets: dict[str, int]) -> bool | None:
    """One transaction's worth of rows: False when there is nothing left to
    do, None when the rollups were emptied (a row deleted by hand)."""
    with _transaction(conn):
        state = _state(conn)
        if state is None:
            return None
        if state["requests"] < targets["requests"]:
            source = "requests"
            high = min(state["requests"] + ROW_CHUNK, targets["requests"])
            _requests(conn, state["requests"], high, state["sessions"])
        elif state["answers"] < targets["answers"]:
            source = "answers"
            high = min(state["answers"] + ROW_CHUNK, targets["answers"])
            _answers(conn, state["answers"], high, state["sessions"])
        elif state["sessions"] < targets["sessions"]:
            source = "sessions"
            high = min(state["sessions"] + SESSION_CHUNK, targets["sessions"])
            _sessions(conn, state["sessions"], high, state["requests"], state["answers"])
        else:
            return False
        conn.execute("UPDATE rollup_state SET through = ? WHERE source = ?", (high, source))
    return True


def _context_step(conn: sqlite3.Connection) -> int | None:
    with _transaction(conn):
        return None if _state(conn) is None else _context(conn)


# Give up after this many builds stopped by rows deleted by hand meanwhile.
ATTEMPTS = 3


def refresh(conn: sqlite3.Connection) -> dict[str, int]:
    """Roll up every row logged since the last refresh; returns what was done.

    ``conn`` is in autocommit mode (as :func:`probe_server.store.open_sync`
    gives it). Without rollups (a new database, a row deleted by hand) they
    are built from nothing first. HITs and batches are compared before the
    steps, so the completions rolled up next get their batch right away, and
    again after them, since the first sessions of labels and HITs (where
    hours may start) may have moved.
    """
    conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    # Rollups are worked out again from the log if a power cut takes their
    # last transactions (in WAL mode NORMAL loses those, never consistency,
    # and they go with their watermarks): no fsync for each of their commits.
    (synchronous,) = conn.execute("PRAGMA synchronous").fetchone()
    conn.execute("PRAGMA synchronous = NORMAL")
    try:
        return _refresh(conn)
    finally:
        conn.execute(f"PRAGMA synchronous = {int(synchronous)}")


def _refresh(conn: sqlite3.Connection) -> dict[str, int]:
    done = {"built": 0, "steps": 0, "reworked": 0}
    for _ in range(ATTEMPTS):
        if _state(conn) is None:
            if not _build(conn):
                continue
            done["built"] += 1
        targets = {
            source: conn.execute(f"SELECT COALESCE(max(id), 0) FROM {source}").fetchone()[0]
            for source in SOURCES
        }
        before = _context_step(conn)
        while (more := _step(conn, targets)) is True:
            done["steps"] += 1
        after = _context_step(conn)
        if before is None or more is None or after is None:
            continue
        done["reworked"] += before + after
        return done
    raise sqlite3.OperationalError("rows were deleted by hand while the rollups were built")
