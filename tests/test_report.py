"""The report on a population of known composition, every number worked out by hand.

The population is written through the store's own group-commit writer with
the server's INSERT statements, batches and assignments as the MTurk side
stores them, and a GeoIP Country and ASN database built for the test.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest

from probe_server.analysis.battery import HINTS as BATTERY_HINTS
from probe_server.analysis.battery import OUTCOMES as BATTERY_OUTCOMES
from probe_server.cli import main
from probe_server.lab import teredo_address
from probe_server.store import open_sync
from probe_server.testing import write_config
from probe_server.tokens import new_token

from .helpers import (
    T0,
    Population,
    asn_db,
    country_db,
    wilson_by_bisection,
)

TEREDO = teredo_address("65.54.227.120", "198.51.100.129", 40000)

COUNTRIES = {
    "198.51.100.0/25": ("US", "United States"),
    "198.51.100.128/25": ("IN", "India"),
    "203.0.113.0/24": ("GB", "United Kingdom"),
    "192.0.2.0/24": ("DE", "Germany"),
    "2601::/20": ("US", "United States"),
    "2602:300::/24": ("US", "United States"),
    "2a02:c7f::/32": ("GB", "United Kingdom"),
    "65.54.227.0/24": ("US", "United States"),  # the Teredo server
}
NETWORKS = {
    "198.51.100.0/25": (7922, "Comcast Cable Communications, LLC"),
    "198.51.100.128/25": (9829, "National Internet Backbone"),
    "203.0.113.0/24": (5607, "Sky UK Limited"),
    "2601::/20": (7922, "Comcast Cable Communications, LLC"),
    "2602:300::/24": (7018, "AT&T Services, Inc."),
    "2a02:c7f::/32": (5607, "Sky UK Limited"),
    "65.54.227.0/24": (8075, "Microsoft Corporation"),  # must never show up
}


def build_population() -> Population:
    pop = Population()
    pop.batch("us-005", "0.05", "US", T0)
    pop.batch("us-010", "0.10", "US", T0 + 3600)
    pop.batch("in-005", "0.05", "IN", T0)
    pop.hit("HUS005", "us-005")
    pop.hit("HUS010", "us-010")
    pop.hit("HIN005", "in-005")
    # USA: five IPv4 addresses, two with native IPv6, one 6to4.
    pop.session("198.51.100.1", T0 + 10, visit="preview", hit="HUS005", red=2)
    pop.session(
        "198.51.100.1",
        T0 + 60,
        hit="HUS005",
        assignment="A1",
        red=3,
        ipv6="2601:1::1",
        answers=[(T0 + 100, 3), (T0 + 110, 2)],  # right, then a second answer that does not count
    )
    pop.session(
        "198.51.100.2",
        T0 + 3650,
        hit="HUS010",
        assignment="A2",
        red=1,
        blue=1,
        ipv6="2602:300::2",
        answers=[(T0 + 3800, 2)],  # wrong
    )
    pop.session(
        "198.51.100.3",
        T0 + 3700,
        hit="HUS010",
        assignment="A3",
        red=4,
        answers=[(T0 + 3900, 4)],
    )
    pop.assignment("A3", "HUS010", T0 + 3960)  # MTurk's submit time wins
    pop.session(
        "198.51.100.4", T0 + 20, visit="preview", hit="HUS005", red=1, ipv6="2002:c633:6404::1"
    )
    pop.session("198.51.100.5", T0 + 300, hit="HUS005", assignment="A5", red=2)  # then reloaded:
    pop.session(
        "198.51.100.5", T0 + 400, hit="HUS005", assignment="A5", red=3, answers=[(T0 + 500, 3)]
    )
    # India: four IPv4 addresses, one over Teredo.
    pop.session(
        "198.51.100.129",
        T0 + 100,
        hit="HIN005",
        assignment="A6",
        red=2,
        blue=3,
        ipv6=TEREDO,
        answers=[(T0 + 150, 2)],
    )
    pop.session(
        "198.51.100.130", T0 + 200, hit="HIN005", assignment="A7", red=2, answers=[(T0 + 250, 1)]
    )
    pop.session("198.51.100.131", T0 + 30, visit="preview", hit="HIN005", red=1, red_fetched=0)
    pop.session("198.51.100.132", T0 + 350, hit="HIN005", assignment="A8", red=2)
    pop.assignment("A8", "HIN005", T0 + 400)  # submitted on MTurk, answer never reached us
    # Great Britain: a direct visit labelled ?batch=pilot, native IPv6.
    pop.session(
        "203.0.113.7",
        T0 + 1000,
        visit="direct",
        batch="pilot",
        red=1,
        blue=1,
        ipv6="2a02:c7f:1::7",
        answers=[(T0 + 1030, 1)],
    )
    # Germany: a preview from a LAN handing out unique local addresses.
    pop.session("192.0.2.10", T0 + 40, visit="preview", hit="HUS005", red=1, blue=1, ipv6="fd00::5")
    # Unknown to the GeoIP database; no batch, no answer.
    pop.session("100.64.0.1", T0 + 50, visit="direct", red=1)
    # Requests tied to no session: a 404 and a blue ball with a forged token.
    pop.request(T0 + 60, "ipv6", "2601:1::1", "unknown", None, status=404)
    forged = new_token(b"not the server's key")
    pop.request(T0 + 61, "ipv6", "2601:1::99", "blue", forged, signed=False)
    return pop


def wilson(x: int, n: int) -> dict[str, Any]:
    low, high = wilson_by_bisection(x, n)
    return {
        "ipv4_addresses": n,
        "native_ipv6": x,
        "rate": x / n,
        "ci95_low": low,
        "ci95_high": high,
    }


EXPECTED = {
    "sessions": {"total": 14, "previews": 4, "accepted": 8},
    "ipv4_addresses": 12,
    "ipv6_addresses": 6,
    "ipv6_classes": {
        "native": 3,
        "teredo": 1,
        "6to4": 1,
        "nat64": 0,
        "isatap": 0,
        "ula": 1,
        "link-local": 0,
        "loopback": 0,
        "documentation": 0,
        "special": 0,
    },
    "countries": [
        {"country": "US", "ipv4_addresses": 5, "share": 5 / 12},
        {"country": "IN", "ipv4_addresses": 4, "share": 4 / 12},
        {"country": "DE", "ipv4_addresses": 1, "share": 1 / 12},
        {"country": "GB", "ipv4_addresses": 1, "share": 1 / 12},
        {"country": "unknown", "ipv4_addresses": 1, "share": 1 / 12},
    ],
    "adoption": {
        "overall": wilson(3, 12),
        "by_country": [
            {"country": "US", **wilson(2, 5)},
            {"country": "IN", **wilson(0, 4)},
            {"country": "DE", **wilson(0, 1)},
            {"country": "GB", **wilson(1, 1)},
            {"country": "unknown", **wilson(0, 1)},
        ],
    },
    "providers": [
        {"asn": 5607, "org": "Sky UK Limited", "addresses": 1},
        {"asn": 7018, "org": "AT&T Services, Inc.", "addresses": 1},
        {"asn": 7922, "org": "Comcast Cable Communications, LLC", "addresses": 1},
    ],
    "batches": [
        {"batch": "pilot", "reward": None, "country": "GB", "completed": 1, "correct": 1},
        {"batch": "in-005", "reward": "0.05", "country": "IN", "completed": 3, "correct": 1},
        {"batch": "us-005", "reward": "0.05", "country": "US", "completed": 2, "correct": 2},
        {"batch": "us-010", "reward": "0.10", "country": "US", "completed": 2, "correct": 1},
    ],
    # survey + 2 red; survey + 1 red + 2 blue; survey alone; survey + 1 red + 1 blue
    "previews": {"requests": 3 + 4 + 1 + 3, "sessions": 4},
    # The other two experiments' keys (issue 11): empty for a ball survey.
    "speedtests": {
        "vantage_points": [],
        "tests": [],
        "download_cv_median": None,
        "upload_cv_median": None,
    },
    "tool_reports": [],
    # The paper's pages carried no battery (docs/battery.md): every outcome
    # is present, unmeasured.
    "battery": {
        "sessions": 0,
        "ipv4_addresses": 0,
        "unit": "ipv4_addresses",
        "outcomes": {
            key: {"ipv4_addresses": 0, "yes": 0, "rate": None, "ci95_low": None, "ci95_high": None}
            for key in (*BATTERY_OUTCOMES, *BATTERY_HINTS)
        },
        "by_country": [],
        "probes": {},
    },
}

# Figure 2: (country, batch, reward, seconds since publication, cumulative completed).
FIGURE = [
    ("GB", "pilot", "", 30, 1),  # from the first 'pilot' session
    ("IN", "in-005", "0.05", 150, 1),
    ("IN", "in-005", "0.05", 250, 2),
    ("IN", "in-005", "0.05", 400, 3),  # MTurk's submit time
    ("US", "us-005", "0.05", 100, 1),
    ("US", "us-005", "0.05", 500, 2),  # the reloaded assignment counts once
    ("US", "us-010", "0.10", 200, 1),  # published an hour after T0
    ("US", "us-010", "0.10", 360, 2),  # MTurk's submit time, not the answer's
]


def rounded(value: Any) -> Any:
    """Floats to 12 places, everywhere in a JSON tree."""
    if isinstance(value, float):
        return round(value, 12)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


@pytest.fixture
async def population(tmp_path: Path) -> Path:
    path = tmp_path / "probe.db"
    await build_population().write(path)
    return path


@pytest.fixture
def geo_config(tmp_path: Path) -> Path:
    country_db(tmp_path / "country.mmdb", COUNTRIES)
    asn_db(tmp_path / "asn.mmdb", NETWORKS)
    return write_config(
        tmp_path / "report.toml",
        {"geoip": {"country_db": "country.mmdb", "asn_db": "asn.mmdb"}},
    )


def report(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["report", *args]) == 0
    return capsys.readouterr().out


def test_json_matches_the_hand_computed_numbers(population, geo_config, capsys):
    out = report(capsys, "--db", str(population), "--config", str(geo_config), "--format", "json")
    assert rounded(json.loads(out)) == rounded(EXPECTED)


def test_views_give_the_same_numbers(population, geo_config, capsys):
    report(capsys, "--db", str(population), "--config", str(geo_config), "--format", "json")
    conn = sqlite3.connect(population)
    conn.row_factory = sqlite3.Row

    def rows(sql: str) -> list[dict[str, Any]]:
        return [dict(row) for row in conn.execute(sql)]

    assert rows("SELECT * FROM report_sessions") == [
        {"total": 14, "previews": 4, "accepted": 8, "direct": 2}
    ]
    assert rounded(rows("SELECT country, ipv4_addresses, share FROM report_countries")) == (
        rounded(EXPECTED["countries"])
    )
    adoption = rows("SELECT * FROM report_adoption")
    small = [row.pop("small_sample") for row in adoption]
    assert rounded(adoption) == rounded(
        [{"country": "all", **EXPECTED["adoption"]["overall"]}, *EXPECTED["adoption"]["by_country"]]
    )
    assert small == [1, 1, 1, 1, 1, 1]  # every sample here is under 30
    assert rows("SELECT * FROM report_ipv6_classes") == [
        {"class": "native", "addresses": 3},
        {"class": "6to4", "addresses": 1},
        {"class": "teredo", "addresses": 1},
        {"class": "ula", "addresses": 1},
    ]
    assert rows("SELECT * FROM report_providers") == EXPECTED["providers"]
    assert rows("SELECT * FROM report_batches") == EXPECTED["batches"]
    assert rows("SELECT visit, sessions, requests FROM report_previews") == [
        {"visit": "preview", "sessions": 4, "requests": 11},
        {"visit": "accepted", "sessions": 8, "requests": 40},
        {"visit": "direct", "sessions": 2, "requests": 6},
        {"visit": "none", "sessions": 0, "requests": 2},
    ]
    assert rows("SELECT * FROM report_tunnels") == [
        # located by the IPv4 address inside them, never by the relay
        {
            "class": "teredo",
            "country": "IN",
            "asn": 9829,
            "org": "National Internet Backbone",
            "addresses": 1,
        },
        {
            "class": "6to4",
            "country": "US",
            "asn": 7922,
            "org": "Comcast Cable Communications, LLC",
            "addresses": 1,
        },
    ]
    (row,) = rows(f"SELECT * FROM report_ipv6 WHERE ipv6 = '{TEREDO}'")
    assert row["class"] == "teredo"
    assert (row["teredo_server"], row["teredo_port"], row["teredo_flags"]) == (
        "65.54.227.120",
        40000,
        0,
    )
    assert (row["embedded_ipv4"], row["geo_address"]) == ("198.51.100.129", "198.51.100.129")
    completions = rows(
        "SELECT batch, country, round(hours * 3600) AS seconds, correct FROM report_completions"
        " ORDER BY country, batch, completed_at"
    )
    assert [(c["country"], c["batch"], c["seconds"]) for c in completions] == [
        (country, batch, seconds) for country, batch, _, seconds, _ in FIGURE
    ]
    conn.close()


def test_markdown_mirrors_the_papers_tables(population, geo_config, capsys):
    out = report(capsys, "--db", str(population), "--config", str(geo_config), "--top", "2")
    assert "| United States (US) | 5 | 41.7% |" in out
    assert "| India (IN) | 4 | 33.3% |" in out
    assert "| Others (2 countries) | 2 | 16.7% |" in out
    assert "| unknown (no GeoIP answer) | 1 | 8.3% |" in out
    assert "| **Total** | 12 | 100% |" in out
    low, high = wilson_by_bisection(3, 12)
    assert f"| Overall | 12 | 3 | 25.00% * | {low:.2%} – {high:.2%} |" in out
    assert "| United States | 5 | 2 | 40.00% * |" in out
    assert "| India | 4 | 0 | 0.00% * | 0.00% – " in out
    assert "\\* fewer than 30 IPv4 addresses" in out
    assert "| Teredo (2001::/32, tunnelled over UDP/IPv4) | 1 |" in out
    assert "| AS7018 | AT&T Services, Inc. | 1 |" in out
    assert "Microsoft" not in out  # the Teredo relay is never taken for the client's network
    # Table 3 as in the paper: a row per country, total and correct per reward.
    assert "| Country | $0.05 total | $0.05 correct | $0.10 total | $0.10 correct |" in out
    assert "| United States | 2 | 2 | 2 | 1 |" in out
    assert "| India | 3 | 1 | 0 | 0 |" in out
    assert "| pilot | reward unknown | United Kingdom | 1 | 1 |" in out
    assert "| previews | 4 | 11 |" in out
    assert "| not tied to a session | – | 2 |" in out
    assert "| **Total** | 14 | 59 |" in out
    assert "11 of 59 HTTP requests (18.6%) came from workers previewing the HIT." in out


def test_small_sample_mark_follows_min_sample(population, geo_config, capsys):
    out = report(capsys, "--db", str(population), "--config", str(geo_config), "--min-sample", "5")
    assert "| Overall | 12 | 3 | 25.00% |" in out  # 12 >= 5: no mark
    assert "| United States | 5 | 2 | 40.00% |" in out
    assert "| India | 4 | 0 | 0.00% * |" in out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_csv_tables_and_figure_2(population, geo_config, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--db", str(population), "--config", str(geo_config), "--format", "csv"]
    written = report(capsys, *args, "--out", str(out)).split()
    names = sorted(Path(p).name for p in written)
    assert names == sorted(
        [
            "figure2.png",
            "figure2.csv",
            "sessions.csv",
            "table1_countries.csv",
            "table2_adoption.csv",
            "ipv6_classes.csv",
            "providers.csv",
            "tunnels.csv",
            "table3_batches.csv",
            "previews.csv",
            "speedtests.csv",
            "tool_reports.csv",
            "battery_outcomes.csv",
            "battery_probes.csv",
        ]
    )

    def read(name: str) -> list[dict[str, str]]:
        with (out / name).open(newline="") as f:
            return list(csv.DictReader(f))

    table1 = read("table1_countries.csv")
    assert [(r["country"], r["country_name"], int(r["ipv4_addresses"])) for r in table1] == [
        ("US", "United States", 5),
        ("IN", "India", 4),
        ("DE", "Germany", 1),
        ("GB", "United Kingdom", 1),
        ("unknown", "", 1),
    ]
    table2 = read("table2_adoption.csv")
    assert table2[0]["country"] == "all" and table2[0]["small_sample"] == "1"
    assert float(table2[0]["ci95_high"]) == pytest.approx(wilson_by_bisection(3, 12)[1], abs=1e-12)
    assert read("table3_batches.csv")[0] == {
        "batch": "pilot",
        "reward": "",
        "country": "GB",
        "completed": "1",
        "correct": "1",
    }
    assert read("previews.csv")[0] == {"visit": "preview", "sessions": "4", "requests": "11"}
    figure = [
        (
            r["country"],
            r["batch"],
            r["reward"],
            round(float(r["hours"]) * 3600),
            int(r["completed"]),
        )
        for r in read("figure2.csv")
    ]
    assert figure == FIGURE
    width, height = png_size(out / "figure2.png")
    assert width >= 1000 and height >= 800  # three countries: two columns, two rows


def test_markdown_and_json_files_with_the_figure(population, geo_config, tmp_path, capsys):
    out = tmp_path / "out"
    report(capsys, "--db", str(population), "--config", str(geo_config), "--out", str(out))
    text = (out / "report.md").read_text()
    assert "![Figure 2](figure2.png)" in text
    report(
        capsys,
        "--db",
        str(population),
        "--config",
        str(geo_config),
        "--format",
        "json",
        "--out",
        str(out),
    )
    assert rounded(json.loads((out / "report.json").read_text())) == rounded(EXPECTED)


def test_an_empty_database_reports_zeros(tmp_path, capsys):
    db = tmp_path / "probe.db"
    open_sync(db).close()
    out = report(capsys, "--db", str(db), "--format", "json", "--out", str(tmp_path / "out"))
    assert png_size(tmp_path / "out" / "figure2.png")[0] > 0
    assert "report.json" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["adoption"]["overall"] == {
        "ipv4_addresses": 0,
        "native_ipv6": 0,
        "rate": None,
        "ci95_low": None,
        "ci95_high": None,
    }
    assert data["countries"] == data["batches"] == data["providers"] == []
    assert data["previews"] == {"requests": 0, "sessions": 0}
    text = report(capsys, "--db", str(db))
    assert "| **Total** | 0 | – |" in text and "No completed HIT." in text


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--format", "csv"], 2, "--format csv writes one file per table: give --out DIR"),
        (["--refresh-geoip"], 2, "--refresh-geoip needs [geoip] databases"),
        (["--top", "0"], 2, "must be 1 or more"),
    ],
)
def test_usage_errors(tmp_path, capsys, args, status, message):
    db = tmp_path / "probe.db"
    open_sync(db).close()
    with pytest.raises(SystemExit) if "--top" in args else contextlib.nullcontext():
        assert main(["report", "--db", str(db), *args]) == status
    assert message in capsys.readouterr().err


def test_missing_database_is_not_created(tmp_path, capsys):
    assert main(["report", "--db", str(tmp_path / "nope.db")]) == 1
    assert "nope.db: no such database" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()


def test_a_file_that_is_not_our_database_is_one_line(tmp_path, capsys):
    """Not SQLite, or a database of a newer probe-server: a line naming it, exit 1, no change."""
    junk = tmp_path / "notes.db"
    junk.write_text("not a database, just text\n")
    newer = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version = 999")
    newer_bytes = newer.read_bytes()
    assert main(["report", "--db", str(junk)]) == 1
    err = capsys.readouterr().err
    assert "notes.db: file is not a database" in err and "Traceback" not in err
    assert junk.read_text() == "not a database, just text\n"
    assert main(["report", "--db", str(newer)]) == 1
    err = capsys.readouterr().err
    assert "newer.db: database schema version 999 is newer" in err and "Traceback" not in err
    assert newer.read_bytes() == newer_bytes
