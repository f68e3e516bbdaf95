"""The group-commit writer and schema migrations, on real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from probe_server.store import (
    SCHEMA_VERSION,
    NotStored,
    Overloaded,
    SchemaError,
    Writer,
    open_database,
    open_sync,
)

INSERT = (
    "INSERT INTO answers (session_token, t, addr, red_reported, blue_reported, red_correct)"
    " VALUES (?,?,?,?,?,?)"
)


def row(i: int):
    return (INSERT, (f"s{i}", float(i), "192.0.2.1", 1, 1, 1))


class PublicOnly:
    """An aiosqlite connection seen through its public API only.

    The writer commits in one trip to aiosqlite's thread when aiosqlite has
    its ``_execute``, statement by statement otherwise: both must behave.
    """

    def __init__(self, conn: Any) -> None:
        self._wrapped = conn

    def __getattr__(self, name: str) -> Any:
        if name == "_execute":
            raise AttributeError(name)
        return getattr(self._wrapped, name)


@pytest.fixture(params=["one trip", "per statement"])
def trips(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    return (lambda conn: conn) if request.param == "one trip" else PublicOnly


async def test_concurrent_writes_share_transactions(tmp_path, trips):
    conn = await open_database(tmp_path / "p.db")
    writer = Writer(trips(conn))
    writer.start()
    await asyncio.gather(*(writer.write([row(i)]) for i in range(500)))
    await writer.close()
    await conn.close()
    assert writer.stats.rows == 500
    assert writer.stats.commits < 50
    with sqlite3.connect(tmp_path / "p.db") as check:
        assert check.execute("SELECT count(*) FROM answers").fetchone()[0] == 500


async def test_failed_commits_hold_rows_and_catch_up(tmp_path, trips):
    conn = await open_database(tmp_path / "p.db")
    writer = Writer(trips(conn), commit_timeout=0.3, retry_min=0.01, retry_max=0.05)
    writer.start()
    # A read-only connection makes every commit fail, as a full disk would.
    await conn.execute("PRAGMA query_only = 1")
    with pytest.raises(NotStored):
        await writer.write([row(1)])
    assert writer.stats.errors >= 1 and not writer.healthy
    assert writer.queued_rows == 1
    pending = writer.submit([row(2)])
    await conn.execute("PRAGMA query_only = 0")
    await pending  # both rows go in once writes work again
    assert writer.healthy and writer.queued_rows == 0
    await writer.close()
    await conn.close()
    with sqlite3.connect(tmp_path / "p.db") as check:
        assert check.execute("SELECT session_token FROM answers ORDER BY id").fetchall() == [
            ("s1",),
            ("s2",),
        ]


async def test_full_queue_rejects_instead_of_growing(tmp_path):
    conn = await open_database(tmp_path / "p.db")
    writer = Writer(conn, queue_limit=10, retry_min=0.01, retry_max=0.02)
    await conn.execute("PRAGMA query_only = 1")
    writer.start()
    futures = [writer.submit([row(i)]) for i in range(10)]
    with pytest.raises(Overloaded):
        writer.submit([row(10)])
    assert writer.stats.rejected == 1
    await conn.execute("PRAGMA query_only = 0")
    await asyncio.gather(*futures)
    writer.submit([row(11)])  # room again
    await writer.close()
    await conn.close()


async def test_close_flushes_queued_rows(tmp_path):
    conn = await open_database(tmp_path / "p.db")
    writer = Writer(conn)
    writer.start()
    futures = [writer.submit([row(i)]) for i in range(100)]
    await writer.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(Overloaded):
        writer.submit([row(0)])
    await conn.close()


def test_migrations_set_user_version(tmp_path):
    conn = open_sync(tmp_path / "p.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    open_sync(tmp_path / "p.db").close()  # a second open migrates nothing


def test_newer_database_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "p.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer than this probe-server"):
        open_sync(tmp_path / "p.db")


async def test_a_row_the_database_refuses_is_dropped_alone(tmp_path, trips):
    # Text sqlite3 cannot encode (a lone surrogate) once stopped the writer
    # for good; now only that request's rows are refused.
    conn = await open_database(tmp_path / "p.db")
    writer = Writer(trips(conn))
    writer.start()
    bad = (INSERT, ("s-bad\udcff", 0.0, "192.0.2.1", 1, 1, 1))
    results = await asyncio.gather(
        writer.write([row(1)]), writer.write([bad]), writer.write([row(2)]),
        return_exceptions=True,
    )  # fmt: skip
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], NotStored)
    assert writer.stats.bad_rows == 1 and writer.queued_rows == 0
    await writer.write([row(3)])  # the writer goes on
    await writer.close()
    await conn.close()
    with sqlite3.connect(tmp_path / "p.db") as check:
        tokens = [t for (t,) in check.execute("SELECT session_token FROM answers ORDER BY id")]
    assert tokens == ["s1", "s2", "s3"]


def test_unverified_requests_after_migrating_an_older_database(tmp_path):
    """The redefined view covers rows stored before it: probes whose token had no shape."""
    from probe_server.store import migrations

    (version,) = [v for v, name, _ in migrations() if name.endswith("_unverified.sql")]
    with sqlite3.connect(tmp_path / "p.db") as conn:
        for number, _, script in migrations()[: version - 1]:
            conn.executescript(f"{script}\nPRAGMA user_version = {number};")
        rows = [
            ("blue", None, 0),  # a token without a token's shape
            ("blue", "f" * 32, 0),  # token-shaped, not signed by us
            ("blue", "g" * 32, 1),  # ours
            ("unknown", None, 0),  # a 404: not a probe
            ("mtu-ok", None, 0),
        ]
        conn.executemany(
            "INSERT INTO requests (t, site, addr, port, method, path, kind, token, token_ok,"
            " status, bytes) VALUES (0, 'ipv6', '::1', 1, 'GET', '/', ?, ?, ?, 200, 1)",
            rows,
        )
        before = conn.execute("SELECT kind, token FROM unverified_requests ORDER BY id").fetchall()
    assert before == [("blue", "f" * 32)]
    conn = open_sync(tmp_path / "p.db")
    try:
        after = conn.execute("SELECT kind, token FROM unverified_requests ORDER BY id").fetchall()
    finally:
        conn.close()
    assert after == [("blue", None), ("blue", "f" * 32), ("mtu-ok", None)]
