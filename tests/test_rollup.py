"""The rollups (schema 0014) give the report exactly what the views give.

Random populations of every kind of visit, reload, answer, batch and address
class are written in pieces through the server's own writer, with a report
after each piece: the rolled-up report must equal the views' report over the
raw tables at every stage, and the rollups kept up to date step by step must
equal rollups built from nothing. Rows deleted by hand, MTurk syncs, HITs
published late and batches changed in place are followed too.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from probe_server.analysis import rollup
from probe_server.analysis.geo import enrich, open_geoip
from probe_server.analysis.report import (
    Report,
    build_report,
    figure_csv,
    render_csv,
    render_markdown,
    to_json,
)
from probe_server.config import Config
from probe_server.lab import teredo_address
from probe_server.store import open_sync

from .helpers import INSERT_ASSIGNMENT, INSERT_HIT, T0, Population, asn_db, country_db

COUNTRIES = {
    "198.51.100.0/25": ("US", "United States"),
    "198.51.100.128/25": ("IN", "India"),
    "203.0.113.0/24": ("GB", "United Kingdom"),
    "2601::/20": ("US", "United States"),
}
NETWORKS = {
    "198.51.100.0/24": (7922, "Comcast"),
    "203.0.113.0/24": (5607, "Sky"),
    "2601::/20": (7922, "Comcast"),
}
# (name, reward, countries, published): one country, two, unpublished, and a
# speed-test batch (other kinds are left out of Table 3).
BATCHES = [
    ("us-005", "0.05", "US", T0),
    ("in-010", "0.10", "IN", T0 + 600),
    ("both", "0.20", "US IN", T0 + 60),
    ("later", "0.05", "US", None),
    ("speed", "0.40", "US", T0),
]
HITS = {f"H{name}{i}": name for name, *_ in BATCHES for i in range(2)}
LATE_HIT = "Hlate"  # sessions carry it before its row in hits exists


def ipv4s(rng: random.Random) -> list[str]:
    found = [f"198.51.100.{rng.randrange(1, 255)}" for _ in range(12)]
    return [*found, "203.0.113.9", "100.64.0.1"]  # the last one unknown to GeoIP


def ipv6_for(rng: random.Random, ipv4: str) -> str:
    draw = rng.random()
    if draw < 0.5:
        return f"2601:{rng.randrange(4):x}::{rng.randrange(1, 9):x}"
    if draw < 0.65:
        return teredo_address("65.54.227.120", ipv4, 40000)
    if draw < 0.8:
        a, b, c, d = (int(x) for x in ipv4.split("."))
        return f"2002:{a:02x}{b:02x}:{c:02x}{d:02x}::1"
    return "fd00::5"


def random_population(seed: int, sessions: int = 60) -> Population:
    rng = random.Random(seed)
    pop = Population()
    for name, reward, countries, published in BATCHES:
        pop.batch(name, reward, countries, published)
    pop.rows.append(("UPDATE batches SET kind = 'speedtest' WHERE name = 'speed'", ()))
    for hit_id, batch in HITS.items():
        pop.hit(hit_id, batch)
    addresses = ipv4s(rng)
    assignments: list[tuple[str, str | None]] = []
    for _ in range(sessions):
        ipv4 = rng.choice(addresses)
        t = T0 + rng.uniform(-120, 7200)
        hit = rng.choice([*HITS, LATE_HIT, None])
        draw = rng.random()
        if draw < 0.3:
            visit, assignment, batch = "preview", None, ""
        elif draw < 0.85:
            visit, batch = "accepted", ""
            # A small pool of assignments: some are reloaded, in several sessions.
            assignment = f"A{rng.randrange(sessions // 3)}"
            assignments.append((assignment, hit))
        else:
            visit, assignment, hit = "direct", None, None
            batch = rng.choice(["", "pilot", "pilot", "in-010"])
        answers = [
            (t + rng.uniform(5, 900), rng.randint(1, 4))
            for _ in range(rng.choice([0, 0, 1, 1, 1, 2]))
        ]
        pop.session(
            ipv4,
            t,
            visit=visit,
            hit=hit,
            assignment=assignment,
            batch=batch,
            red=rng.randint(1, 4),
            blue=rng.randint(1, 3),
            ipv6=ipv6_for(rng, ipv4) if rng.random() < 0.4 else None,
            answers=answers,
        )
        if rng.random() < 0.1:
            pop.request(t + 3, "ipv6", "2601:9::9", "blue", None, status=404)
    for assignment, hit in dict(assignments).items():
        if rng.random() < 0.6:
            submitted = T0 + rng.uniform(0, 9000) if rng.random() < 0.8 else None
            pop.assignment(assignment, hit or "H?", submitted)
    return pop


def geo_config(tmp_path: Path) -> Config:
    country_db(tmp_path / "country.mmdb", COUNTRIES)
    asn_db(tmp_path / "asn.mmdb", NETWORKS)
    return Config.model_validate(
        {
            "geoip": {
                "country_db": str(tmp_path / "country.mmdb"),
                "asn_db": str(tmp_path / "asn.mmdb"),
            }
        }
    )


def outputs(report: Report) -> tuple[Any, ...]:
    """Every number the report prints, in every format."""
    return to_json(report), render_csv(report), figure_csv(report), render_markdown(report)


def enriched(db: Path, config: Config) -> None:
    conn = open_sync(db)
    with open_geoip(config) as geo:
        enrich(conn, geo)
    conn.close()


def rollups(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    try:
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}"), key=repr)
            for table in (*rollup.TABLES, "rollup_state")
        }
    finally:
        conn.close()


def built_from_nothing(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The rollups a refresh builds from nothing on the same rows."""
    conn = open_sync(db)
    try:
        conn.execute("DELETE FROM rollup_state")
        assert rollup.refresh(conn)["built"] == 1
    finally:
        conn.close()
    return rollups(db)


def assert_same_as_views(db: Path) -> None:
    assert outputs(build_report(db)) == outputs(build_report(db, from_views=True))


async def write(db: Path, rows: list[Any]) -> None:
    await Population(rows=list(rows)).write(db)


@pytest.fixture(params=["default chunks", "tiny chunks"])
def chunks(request, monkeypatch):
    if request.param == "tiny chunks":
        # Many steps and copies of a few rows each, across every boundary.
        monkeypatch.setattr(rollup, "SESSION_CHUNK", 3)
        monkeypatch.setattr(rollup, "ROW_CHUNK", 5)
        monkeypatch.setattr(rollup, "COPY_CHUNK", 4)
    return request.param


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_appended_rows_give_what_the_views_give(tmp_path, chunks, seed):
    pop = random_population(seed)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(pop.rows)), 4))
    db = tmp_path / "probe.db"
    config = geo_config(tmp_path)
    for low, high in zip([0, *cuts], [*cuts, len(pop.rows)], strict=True):
        # A piece may end between a session and its requests or answers.
        await write(db, pop.rows[low:high])
        enriched(db, config)
        assert_same_as_views(db)
        stepped = rollups(db)
        assert stepped == built_from_nothing(db)
    # And the same as a database that got every row at once.
    whole = tmp_path / "whole.db"
    await write(whole, pop.rows)
    enriched(whole, config)
    assert outputs(build_report(whole)) == outputs(build_report(db))


async def test_the_cli_report_is_the_views_report(tmp_path, capsys):
    from probe_server.analysis.report import render_json
    from probe_server.cli import main
    from probe_server.testing import write_config

    db = tmp_path / "probe.db"
    pop = random_population(5)
    await write(db, pop.rows[: len(pop.rows) // 2])
    country_db(tmp_path / "country.mmdb", COUNTRIES)
    config = write_config(tmp_path / "report.toml", {"geoip": {"country_db": "country.mmdb"}})
    assert main(["report", "--db", str(db), "--config", str(config), "--format", "json"]) == 0
    await write(db, pop.rows[len(pop.rows) // 2 :])
    capsys.readouterr()
    assert main(["report", "--db", str(db), "--config", str(config), "--format", "json"]) == 0
    assert capsys.readouterr().out == render_json(build_report(db, from_views=True))


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM answers WHERE id IN (SELECT min(id) FROM answers GROUP BY session_token)",
        "DELETE FROM requests WHERE kind = 'blue' AND id % 2 = 0",
        "DELETE FROM requests WHERE id % 3 = 0",
        "DELETE FROM sessions WHERE id % 4 = 1",
        "UPDATE sessions SET created = created - 86400 WHERE batch = 'pilot'",
        "UPDATE sessions SET visit = 'direct' WHERE visit = 'preview' AND id % 2 = 0",
    ],
)
async def test_rows_deleted_or_changed_by_hand(tmp_path, statement):
    db = tmp_path / "probe.db"
    config = geo_config(tmp_path)
    await write(db, random_population(6).rows)
    enriched(db, config)
    with sqlite3.connect(db) as conn:
        assert conn.execute(statement).rowcount > 0
        assert conn.execute("SELECT count(*) FROM rollup_state").fetchone() == (0,)
    conn.close()
    enriched(db, config)
    assert_same_as_views(db)


async def test_mturk_syncs_and_batches_changed_in_place(tmp_path, chunks):
    db = tmp_path / "probe.db"
    config = geo_config(tmp_path)
    await write(db, random_population(7, sessions=80).rows)
    enriched(db, config)
    assert_same_as_views(db)
    changes = [
        # a sync: new submit times, a new assignment, one gone
        "UPDATE assignments SET submit_time = submit_time + 1800 WHERE rowid % 2 = 0",
        "UPDATE assignments SET submit_time = NULL WHERE rowid % 3 = 0",
        "DELETE FROM assignments WHERE rowid % 5 = 0",
        "INSERT OR REPLACE INTO assignments (assignment_id, hit_id, worker_id, status,"
        " submit_time, synced) SELECT assignment_id, COALESCE(hit_id, 'H?'), worker_id,"
        f" 'Submitted', {T0 + 4000}, {T0} FROM sessions WHERE visit = 'accepted'",
        # a HIT whose row arrives after its sessions
        f"INSERT INTO hits (hit_id, batch, max_assignments, created) VALUES ('{LATE_HIT}',"
        f" 'later', 9, {T0})",
        # a batch published, another retargeted, a label becoming a batch
        f"UPDATE batches SET published = {T0 + 30} WHERE name = 'later'",
        "UPDATE batches SET countries = 'GB' WHERE name = 'both'",
        f"INSERT INTO batches (name, reward, countries, published) VALUES ('pilot', '0.01', 'GB',"
        f" {T0 - 60})",
        "UPDATE batches SET kind = 'tool' WHERE name = 'us-005'",
        "DELETE FROM hits WHERE hit_id = 'Hin-0100'",
    ]
    for statement in changes:
        with sqlite3.connect(db) as conn:
            conn.execute(statement)
        conn.close()
        assert_same_as_views(db)
        assert rollups(db) == built_from_nothing(db)


async def test_more_rows_after_changes_in_place(tmp_path):
    db = tmp_path / "probe.db"
    config = geo_config(tmp_path)
    # MTurk's side comes from the sync below, before the answers.
    rows = [row for row in random_population(8, sessions=80).rows if row[0] != INSERT_ASSIGNMENT]
    half = len(rows) // 2
    await write(db, rows[:half])
    enriched(db, config)
    # A sync before the answers it refers to arrive, and a HIT before its sessions.
    await write(
        db,
        [
            (INSERT_ASSIGNMENT, (f"A{i}", "Hus-0050", f"WA{i}", "Submitted", T0, T0 + 5000, T0))
            for i in range(40)
            if i % 3
        ]
        + [(INSERT_HIT, (LATE_HIT, "both", 9, T0))],
    )
    enriched(db, config)
    assert_same_as_views(db)
    await write(db, rows[half:])
    enriched(db, config)
    assert_same_as_views(db)
    assert rollups(db) == built_from_nothing(db)


async def test_a_build_stopped_by_a_delete_is_not_kept(tmp_path, monkeypatch):
    db = tmp_path / "probe.db"
    await write(db, random_population(9).rows)
    monkeypatch.setattr(rollup, "COPY_CHUNK", 4)
    write_chunk = rollup._write
    calls = []

    def delete_meanwhile(conn: sqlite3.Connection, build: int, work: str, *params: int) -> bool:
        calls.append(work)
        if len(calls) == 3:  # in the middle of the copy, from another connection
            with sqlite3.connect(db) as other:
                other.execute("DELETE FROM sessions WHERE id = 2")
            other.close()
        return write_chunk(conn, build, work, *params)

    monkeypatch.setattr(rollup, "_write", delete_meanwhile)
    conn = open_sync(db)
    try:
        assert rollup.refresh(conn)["built"] == 1  # the second build, after the delete
    finally:
        conn.close()
    assert_same_as_views(db)


async def test_two_builds_at_once_keep_one(tmp_path, monkeypatch):
    db = tmp_path / "probe.db"
    await write(db, random_population(10).rows)
    monkeypatch.setattr(rollup, "COPY_CHUNK", 4)
    write_chunk = rollup._write
    calls = []

    def another_build_meanwhile(
        conn: sqlite3.Connection, build: int, work: str, *params: int
    ) -> bool:
        calls.append(work)
        if len(calls) == 2:
            monkeypatch.setattr(rollup, "_write", write_chunk)
            other = open_sync(db)
            try:
                assert rollup.refresh(other)["built"] == 1
            finally:
                other.close()
        return write_chunk(conn, build, work, *params)

    monkeypatch.setattr(rollup, "_write", another_build_meanwhile)
    conn = open_sync(db)
    try:
        # The first build finds its number replaced and stops; the other's stays.
        assert rollup.refresh(conn) == {"built": 0, "steps": 0, "reworked": 0}
    finally:
        conn.close()
    assert_same_as_views(db)
    assert rollups(db) == built_from_nothing(db)
