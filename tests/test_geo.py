"""GeoIP lookups: databases, stored answers that make reports reproducible, progress."""

from __future__ import annotations

import io
import json
import os
import pty
import sqlite3
from pathlib import Path

import pytest

from probe_server.analysis.geo import enrich, ensure_schema, geolocate, open_geoip
from probe_server.cli import main
from probe_server.config import Config, ConfigError
from probe_server.lab import teredo_address
from probe_server.store import migrations, open_sync
from probe_server.testing import write_config

from .helpers import (
    T0,
    Population,
    asn_db,
    country_db,
)

US = {"198.51.100.0/24": ("US", "United States"), "2601::/20": ("US", "United States")}


async def small_population(path: Path, addresses: list[str], ipv6: str | None = None) -> None:
    pop = Population()
    for i, address in enumerate(addresses):
        pop.session(address, T0 + i, ipv6=ipv6 if i == 0 else None)
    await pop.write(path)


def config_for(tmp_path: Path, **geoip: str) -> Path:
    return write_config(tmp_path / "report.toml", {"geoip": geoip} if geoip else {})


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["report", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def stored(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT address, country, asn, org, country_db, asn_db FROM geoip")
        result = {row[0]: row[1:] for row in rows}
    conn.close()
    return result


async def test_answers_are_stored_and_reused_until_refreshed(tmp_path, capsys):
    db = tmp_path / "probe.db"
    await small_population(db, ["198.51.100.7", "198.51.100.8"])
    country_db(tmp_path / "country.mmdb", US)
    config = config_for(tmp_path, country_db="country.mmdb")
    first = run_json(capsys, "--db", str(db), "--config", str(config))
    assert first["countries"] == [{"country": "US", "ipv4_addresses": 2, "share": 1.0}]
    (build,) = {row[3] for row in stored(db).values()}
    assert build.startswith("GeoLite2-Country ")

    # A newer database moves the block to Canada: the report still says what
    # it said, because the answers were stored with the build that gave them.
    country_db(tmp_path / "country.mmdb", {"198.51.100.0/24": ("CA", "Canada")})
    assert run_json(capsys, "--db", str(db), "--config", str(config)) == first
    refreshed = run_json(capsys, "--db", str(db), "--config", str(config), "--refresh-geoip")
    assert refreshed["countries"] == [{"country": "CA", "ipv4_addresses": 2, "share": 1.0}]


async def test_a_database_configured_later_fills_in_what_was_missing(tmp_path, capsys):
    db = tmp_path / "probe.db"
    await small_population(db, ["198.51.100.7"], ipv6="2601:5::1")
    country_db(tmp_path / "country.mmdb", US)
    asn_db(tmp_path / "asn.mmdb", {"2601::/20": (7922, "Comcast")})

    # No database: nothing stored, everything unknown.
    report = run_json(capsys, "--db", str(db))
    assert report["countries"][0]["country"] == "unknown"
    assert report["providers"] == [{"asn": None, "org": "unknown", "addresses": 1}]
    assert stored(db) == {}

    run_json(
        capsys, "--db", str(db), "--config", str(config_for(tmp_path, country_db="country.mmdb"))
    )
    assert stored(db)["2601:5::1"][:2] == ("US", None)

    # A newer country database that disagrees: only the missing part (the
    # network) is filled in, the stored country stays.
    country_db(tmp_path / "country.mmdb", {"2601::/20": ("CA", "Canada")})
    both = config_for(tmp_path, country_db="country.mmdb", asn_db="asn.mmdb")
    report = run_json(capsys, "--db", str(db), "--config", str(both))
    assert report["providers"] == [{"asn": 7922, "org": "Comcast", "addresses": 1}]
    country, asn, org, country_build, asn_build = stored(db)["2601:5::1"]
    assert (country, asn, org) == ("US", 7922, "Comcast")
    assert country_build.startswith("GeoLite2-Country") and asn_build.startswith("GeoLite2-ASN")


async def test_sessions_after_a_report_are_looked_up_by_the_next(tmp_path, capsys):
    db = tmp_path / "probe.db"
    await small_population(db, ["198.51.100.7"])
    country_db(tmp_path / "country.mmdb", US)
    config = config_for(tmp_path, country_db="country.mmdb")
    assert run_json(capsys, "--db", str(db), "--config", str(config))["ipv4_addresses"] == 1
    await small_population(db, ["198.51.100.9", "198.51.100.7"])
    report = run_json(capsys, "--db", str(db), "--config", str(config))
    assert report["countries"] == [{"country": "US", "ipv4_addresses": 2, "share": 1.0}]


async def test_city_database_and_networks_that_do_not_follow_octets(tmp_path):
    # /20 and /28 blocks side by side: an answer may be reused only inside
    # the network the database gave it for.
    networks = {
        "10.0.0.0/20": ("US", "United States"),
        "10.0.16.0/20": ("IN", "India"),
        "10.0.32.0/28": ("JP", "Japan"),
    }
    path = country_db(tmp_path / "city.mmdb", networks, database_type="GeoLite2-City")
    addresses = [
        "10.0.15.255",
        "10.0.16.0",
        "10.0.100.1",
        "10.0.16.9",
        "10.0.32.15",
        "10.0.32.16",
        "10.0.1.1",
        "10.0.160.1",
    ]
    db = tmp_path / "probe.db"
    await small_population(db, addresses)
    config = Config.model_validate({"geoip": {"country_db": str(path)}})
    conn = open_sync(db)
    with open_geoip(config) as geo:
        assert enrich(conn, geo) == (0, len(addresses))
        assert enrich(conn, geo) == (0, 0)  # nothing new
    conn.close()
    countries = {address: row[0] for address, row in stored(db).items()}
    assert countries == {
        "10.0.15.255": "US",
        "10.0.16.0": "IN",
        "10.0.100.1": None,
        "10.0.16.9": "IN",
        "10.0.32.15": "JP",
        "10.0.32.16": None,
        "10.0.1.1": "US",
        "10.0.160.1": None,
    }


async def test_tunnels_are_located_by_their_embedded_ipv4(tmp_path):
    address = teredo_address("65.54.227.120", "198.51.100.50", 3544)
    db = tmp_path / "probe.db"
    await small_population(db, ["198.51.100.50"], ipv6=address)
    path = country_db(tmp_path / "country.mmdb", {**US, "65.54.227.0/24": ("IE", "Ireland")})
    conn = open_sync(db)
    with open_geoip(Config.model_validate({"geoip": {"country_db": str(path)}})) as geo:
        enrich(conn, geo)
    (row,) = conn.execute("SELECT class, geo_address FROM ipv6_addresses").fetchall()
    assert row == ("teredo", "198.51.100.50")
    assert "65.54.227.120" not in stored(db)  # the relay is never looked up
    conn.close()


@pytest.mark.parametrize(
    ("key", "make", "message"),
    [
        (
            "country_db",
            lambda p: asn_db(p, {}),
            "geoip.country_db: .* is GeoLite2-ASN, not a Country",
        ),
        ("asn_db", lambda p: country_db(p, US), "geoip.asn_db: .* is GeoLite2-Country, not an ASN"),
        (
            "country_db",
            lambda p: p.write_bytes(b"not a database") and p,
            "geoip.country_db: .*not a",
        ),
        ("asn_db", lambda p: p, "geoip.asn_db: .*: no such file"),
    ],
)
def test_bad_databases_are_one_line_naming_the_key(tmp_path, capsys, key, make, message):
    make(tmp_path / "x.mmdb")
    config = config_for(tmp_path, **{key: "x.mmdb"})
    with pytest.raises(ConfigError, match=message):
        open_geoip(Config.model_validate({"geoip": {key: str(tmp_path / "x.mmdb")}}))
    open_sync(tmp_path / "probe.db").close()
    assert main(["report", "--db", str(tmp_path / "probe.db"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"geoip.{key}" in err[0]


async def test_progress_bar_only_on_a_terminal(tmp_path):
    db = tmp_path / "probe.db"
    await small_population(db, [f"198.51.100.{i}" for i in range(1, 40)])
    path = country_db(tmp_path / "country.mmdb", US)
    config = Config.model_validate({"geoip": {"country_db": str(path)}})
    conn = open_sync(db)
    with open_geoip(config) as geo:
        quiet = io.StringIO()
        assert geolocate(conn, geo, stream=quiet) == 39
        assert quiet.getvalue() == ""
        conn.execute("DELETE FROM geoip")
        conn.execute("DELETE FROM enriched")
        leader, follower = pty.openpty()
        try:
            with os.fdopen(follower, "w", closefd=False) as terminal:
                assert terminal.isatty()
                assert geolocate(conn, geo, stream=terminal) == 39
            shown = os.read(leader, 65536).decode()
        finally:
            os.close(leader)
            os.close(follower)
    conn.close()
    assert "geolocating:" in shown and "/39" in shown


async def test_emptied_tables_are_filled_again(tmp_path, capsys):
    db = tmp_path / "probe.db"
    await small_population(db, ["198.51.100.7"], ipv6="2601:5::1")
    country_db(tmp_path / "country.mmdb", US)
    config = config_for(tmp_path, country_db="country.mmdb")
    first = run_json(capsys, "--db", str(db), "--config", str(config))
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM geoip")
        conn.execute("DELETE FROM ipv6_addresses")
    conn.close()
    assert run_json(capsys, "--db", str(db), "--config", str(config)) == first


async def test_a_database_made_with_the_placeholder_gets_the_results_schema(tmp_path, capsys):
    # Other branches shipped an empty 0004 until this one replaced it: their
    # databases are at the latest version without the results tables.
    db = tmp_path / "probe.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for version, name, script in migrations():
        if name != "0004_results.sql":
            conn.executescript(f"BEGIN;\n{script}\nCOMMIT;")
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    await small_population(db, ["198.51.100.7"], ipv6="2601:5::1")
    country_db(tmp_path / "country.mmdb", US)
    report = run_json(
        capsys, "--db", str(db), "--config", str(config_for(tmp_path, country_db="country.mmdb"))
    )
    assert report["countries"] == [{"country": "US", "ipv4_addresses": 1, "share": 1.0}]
    assert report["adoption"]["overall"]["native_ipv6"] == 1
    conn = open_sync(db)
    assert ensure_schema(conn) is False  # applied once
    conn.close()
