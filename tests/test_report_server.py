"""The report on traffic through the real server: many IPv4 sources on loopback.

The whole of 127.0.0.0/8 is loopback, so clients bound to 127.0.0.9,
127.0.0.17, ... reach the IPv4 site from addresses a test GeoIP database
places in different countries. IPv6 on loopback is only ::1, which must be
counted as loopback, never as native IPv6.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import aiohttp

from probe_server.cli import main
from probe_server.server import ProbeServer
from probe_server.testing import write_config

from .helpers import (
    T0,
    asn_db,
    country_db,
)
from .test_web import Page, fetch

COUNTRIES = {
    "127.0.0.8/29": ("US", "United States"),
    "127.0.0.16/29": ("IN", "India"),
    "127.0.0.24/30": ("GB", "United Kingdom"),
}
NETWORKS = {"127.0.0.8/29": (7922, "Comcast"), "127.0.0.16/29": (9829, "BSNL")}


async def visit(server, source: str, query: str, blue: bool, answer: int | None) -> int:
    """One worker at ``source``: the page, its balls, maybe an answer; returns requests made."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as ipv4:
        async with ipv4.get(f"{server.base_urls['ipv4']}/{query}") as response:
            assert response.status == 200
            page = Page(await response.text())
        for url in page.red:
            assert (await fetch(ipv4, url))[0] == 200
        requests = 1 + len(page.red)
        if blue:
            async with aiohttp.ClientSession() as ipv6:  # from ::1
                for url in page.blue:
                    assert (await fetch(ipv6, url))[0] == 200
            requests += len(page.blue)
        if answer is not None:
            red = len(page.red) + answer  # answer=0: right, else off by that much
            form = {"token": page.token, "red": str(red), "blue": str(len(page.blue))}
            async with ipv4.post(f"{server.base_urls['ipv4']}/submit", data=form) as response:
                assert response.status == 200
            requests += 1
    return requests


async def test_report_on_live_traffic_from_many_ipv4_sources(server, tmp_path, capsys):
    country_db(tmp_path / "country.mmdb", COUNTRIES)
    asn_db(tmp_path / "asn.mmdb", NETWORKS)
    config = write_config(
        tmp_path / "report.toml",
        {"geoip": {"country_db": "country.mmdb", "asn_db": "asn.mmdb"}},
    )
    preview = "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=HUS"
    preview_requests = await visit(server, "127.0.0.10", preview, blue=True, answer=None)
    await visit(server, "127.0.0.9", "?assignmentId=A1&hitId=HUS&workerId=W1", True, 0)
    await visit(server, "127.0.0.17", "?assignmentId=A2&hitId=HIN&workerId=W2", False, 1)
    await visit(server, "127.0.0.25", "?batch=pilot", blue=True, answer=0)

    # The MTurk side records its batches and HITs beside the running server.
    db = tmp_path / "probe.db"
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO batches (name, reward, countries, published) VALUES (?,?,?,?)",
            [("us-020", "0.20", "US", T0), ("in-020", "0.20", "IN", T0)],
        )
        conn.executemany(
            "INSERT INTO hits (hit_id, batch, max_assignments, created) VALUES (?,?,?,?)",
            [("HUS", "us-020", 10, T0), ("HIN", "in-020", 10, T0)],
        )
    conn.close()

    assert main(["report", "--db", str(db), "--config", str(config), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)

    def nobody(n: int) -> dict[str, object]:
        return {"ipv4_addresses": n, "native_ipv6": 0, "rate": 0.0}

    assert report["sessions"] == {"total": 4, "previews": 1, "accepted": 2}
    assert report["ipv4_addresses"] == 4
    assert report["ipv6_addresses"] == 1
    assert report["ipv6_classes"]["loopback"] == 1
    assert sum(report["ipv6_classes"].values()) == 1  # ::1 is not native
    assert report["countries"] == [
        {"country": "US", "ipv4_addresses": 2, "share": 0.5},
        {"country": "GB", "ipv4_addresses": 1, "share": 0.25},
        {"country": "IN", "ipv4_addresses": 1, "share": 0.25},
    ]
    overall = report["adoption"]["overall"]
    assert {k: overall[k] for k in ("ipv4_addresses", "native_ipv6", "rate")} == nobody(4)
    assert overall["ci95_low"] == 0.0 and 0.48 < overall["ci95_high"] < 0.49
    assert [row["country"] for row in report["adoption"]["by_country"]] == ["US", "GB", "IN"]
    assert report["providers"] == []
    assert report["batches"] == [
        {"batch": "pilot", "reward": None, "country": "GB", "completed": 1, "correct": 1},
        {"batch": "in-020", "reward": "0.20", "country": "IN", "completed": 1, "correct": 0},
        {"batch": "us-020", "reward": "0.20", "country": "US", "completed": 1, "correct": 1},
    ]
    assert report["previews"] == {"requests": preview_requests, "sessions": 1}


async def test_report_without_geoip_says_how_to_get_geolite2(server, http, tmp_path, capsys):
    async with http.get(f"{server.base_urls['ipv4']}/") as response:
        assert response.status == 200
    db = tmp_path / "probe.db"
    assert main(["report", "--db", str(db), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "geoipupdate" in captured.err and "GeoLite2-Country" in captured.err
    report = json.loads(captured.out)
    assert report["countries"] == [{"country": "unknown", "ipv4_addresses": 1, "share": 1.0}]
    assert Path(db).exists()


async def test_a_session_without_a_hit_takes_the_configured_batch_label(
    make_config, tmp_path, capsys
):
    """Before the MTurk side records batches, [survey] batch labels the sessions."""
    server = ProbeServer(make_config(survey={"batch": "pilot-2"}))
    await server.start()
    try:
        await visit(server, "127.0.0.9", "", blue=False, answer=0)
        await visit(server, "127.0.0.10", "", blue=False, answer=1)
        await visit(server, "127.0.0.11", "?batch=other", blue=False, answer=0)
    finally:
        await server.stop()
    db = tmp_path / "probe.db"
    with sqlite3.connect(db) as conn:
        labels = conn.execute("SELECT ipv4, batch FROM sessions ORDER BY ipv4").fetchall()
    conn.close()
    assert labels == [("127.0.0.10", "pilot-2"), ("127.0.0.11", "other"), ("127.0.0.9", "pilot-2")]
    assert main(["report", "--db", str(db), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == [
        {"batch": "other", "reward": None, "country": "unknown", "completed": 1, "correct": 1},
        {"batch": "pilot-2", "reward": None, "country": "unknown", "completed": 2, "correct": 1},
    ]
