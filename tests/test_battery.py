"""The measurement battery over real sockets: every probe, every outcome.

Clients here are aiohttp sessions on 127.0.0.x and ::1 that fetch what a
browser on a given network would fetch: an IPv4-only network fetches the
dual-stack probe from the IPv4 site and nothing from the IPv6 one, a broken
one fetches nothing over IPv6 and its beacon says so, and so on. The last
tests resolve the probes' per-session names through our own DNS, over the
family a resolver would use, with 0x20 letter-case randomisation. The
browser end to end is the namespace lab's (tests/test_lab.py).
"""

from __future__ import annotations

import asyncio
import html
import json
import random
import re
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from probe_server import battery
from probe_server.analysis import battery as results
from probe_server.analysis.addresses import sixrd_bits
from probe_server.analysis.report import build_report, render_csv, render_markdown, to_json
from probe_server.analysis.stats import wilson
from probe_server.cli import main
from probe_server.config import ConfigError, load_config
from probe_server.images import BLUE_BALL, PIXEL
from probe_server.keys import secret_key
from probe_server.server import ProbeServer
from probe_server.store import migrations, open_sync
from probe_server.testing import write_config
from probe_server.tokens import LABEL_LENGTH, looks_like_token, new_token, session_label

from .conftest import MakeConfig
from .dns_client import endpoint
from .helpers import asn_db, country_db

IMG = re.compile(r'<img src="([^"]+)" alt=""(?: data-probe="([a-z0-9]+)")?>')
TOKEN = re.compile(r'name="token" value="([a-z2-7]{32})"')
ZONES = Path(__file__).parent / "zones"
ALL_PROBES = ["ds", "literal", "mtu", "v6ns"]
# The ds and v6ns names are never resolved in the scenario tests: a client
# fetches their paths from the site of the family its network would use.
BATTERY = {
    "probes": ALL_PROBES,
    "ds_url": "http://ds.example.org",
    "v6ns_url": "http://ds.v6ns.example.org",
    "beacon": True,
}


@dataclass
class Page:
    token: str
    text: str
    red: list[str]
    blue: list[str]
    probes: dict[str, str]
    csp: str

    @classmethod
    def parse(cls, text: str, csp: str) -> Page:
        match = TOKEN.search(text)
        assert match, text
        red, blue, probes = [], [], {}
        for url, probe in IMG.findall(text):
            url = html.unescape(url)
            if probe:
                probes[probe] = url
            elif "/red/" in url:
                red.append(url)
            else:
                blue.append(url)
        return cls(match.group(1), text, red, blue, probes, csp)


@pytest.fixture
async def battery_server(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    server = ProbeServer(make_config(battery=BATTERY))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


@dataclass
class Client:
    """A worker's browser on a network that can do some things and not others.

    ``ipv6``: IPv6 works; ``ds_over``: the family its browser uses for the
    dual-stack name (None: that fetch hangs, broken dual stack); ``aaaa``:
    its resolver answers AAAA queries; ``large``: large IPv6 packets arrive;
    ``resolver_ipv6``: its resolver reaches DNS over IPv6; ``beacon``: what
    its page reports, or None without JavaScript.
    """

    source: str = "127.0.0.1"
    ipv6: bool = True
    ds_over: str | None = "ipv6"
    aaaa: bool = True
    large: bool = True
    resolver_ipv6: bool = True
    beacon: dict[str, str] | None = None
    final: bool = True
    fetched: dict[str, int] = field(default_factory=dict)

    async def visit(self, server: ProbeServer, query: str = "") -> Page:
        connector = aiohttp.TCPConnector(local_addr=(self.source, 0))
        bases = server.base_urls
        async with (
            aiohttp.ClientSession(connector=connector) as over_ipv4,
            aiohttp.ClientSession() as over_ipv6,
        ):
            async with over_ipv4.get(f"{bases['ipv4']}/{query}") as response:
                assert response.status == 200, await response.text()
                page = Page.parse(
                    await response.text(), response.headers["Content-Security-Policy"]
                )

            async def get(site: str, url: str, **kwargs: Any) -> int:
                http = over_ipv4 if site == "ipv4" else over_ipv6
                async with http.get(bases[site] + path_of(url), **kwargs) as response:
                    await response.read()
                    return response.status

            for url in page.red:
                self.fetched["ipv4"] = await get("ipv4", url)
            if self.ipv6 and self.aaaa:
                for url in page.blue:
                    self.fetched["ipv6"] = await get("ipv6", url)
            probes = page.probes
            if "ds" in probes and self.ds_over is not None:
                site = self.ds_over if self.aaaa or self.ds_over == "ipv4" else "ipv4"
                self.fetched["ds"] = await get(site if self.ipv6 else "ipv4", probes["ds"])
            if "literal" in probes and self.ipv6:
                self.fetched["literal"] = await get("ipv6", probes["literal"])
            if "mtu" in probes and self.ipv6 and self.aaaa:
                # The large response's head is lost on a black-holed path: the
                # request arrives, the redirect is never followed.
                self.fetched["mtu"] = await get("ipv6", probes["mtu"], allow_redirects=self.large)
            if "v6ns" in probes and self.resolver_ipv6 and self.ds_over is not None:
                site = "ipv6" if self.ipv6 and self.ds_over == "ipv6" else "ipv4"
                self.fetched["v6ns"] = await get(site, probes["v6ns"])
            if self.beacon is not None:
                body = {
                    "token": page.token,
                    "final": self.final,
                    "probes": {
                        name: {"state": state, "at": 12.5} for name, state in self.beacon.items()
                    },
                }
                async with over_ipv4.post(
                    f"{bases['ipv4']}{battery.BEACON_PATH}",
                    data=json.dumps(body),
                    headers={"Content-Type": "text/plain;charset=UTF-8"},
                ) as response:
                    assert response.status == 204, await response.text()
        return page


def outcome(db, token: str) -> sqlite3.Row:
    (row,) = db("SELECT * FROM battery_outcomes WHERE session_token = ?", token)
    return row


OUTCOME_KEYS = (
    "ipv4_only",
    "ipv6_capable",
    "ipv6_preferred",
    "broken_dual_stack",
    "ipv6_without_aaaa",
    "mtu_trouble",
    "resolver_ipv6",
)


def outcomes(row: sqlite3.Row) -> dict[str, int | None]:
    return {key: row[key] for key in OUTCOME_KEYS}


LOADED = "loaded"
SCENARIOS = {
    # Everything works and the browser prefers IPv6 for the dual-stack name.
    "ipv6-preferred": (
        Client(beacon=dict.fromkeys(battery.PROBES, LOADED)),
        dict(
            ipv4_only=0,
            ipv6_capable=1,
            ipv6_preferred=1,
            broken_dual_stack=0,
            ipv6_without_aaaa=0,
            mtu_trouble=0,
            resolver_ipv6=1,
        ),
    ),
    # IPv6 works, but the browser takes IPv4 for a name that has both.
    "ipv6-capable": (
        Client(ds_over="ipv4"),
        dict(
            ipv4_only=0,
            ipv6_capable=1,
            ipv6_preferred=0,
            broken_dual_stack=0,
            ipv6_without_aaaa=0,
            mtu_trouble=0,
            resolver_ipv6=1,
        ),
    ),
    # No IPv6 at all, no JavaScript: the server's log alone decides.
    "ipv4-only": (
        Client(ipv6=False, ds_over="ipv4", resolver_ipv6=True),
        dict(
            ipv4_only=1,
            ipv6_capable=0,
            ipv6_preferred=0,
            broken_dual_stack=0,
            ipv6_without_aaaa=0,
            mtu_trouble=None,
            resolver_ipv6=1,
        ),
    ),
    # Dual stack with broken IPv6: the dual-stack fetch hangs.
    "broken": (
        Client(
            ipv6=False,
            ds_over=None,
            beacon={"ipv4": LOADED}
            | dict.fromkeys(("ipv6", "ds", "literal", "mtu", "v6ns"), "timeout"),
        ),
        dict(
            ipv4_only=0,
            ipv6_capable=0,
            ipv6_preferred=None,
            broken_dual_stack=1,
            ipv6_without_aaaa=0,
            mtu_trouble=None,
            resolver_ipv6=None,
        ),
    ),
    # The resolver drops AAAA: the literal loads, the IPv6-only name does not.
    "ipv6-without-aaaa": (
        Client(aaaa=False, ds_over="ipv4", beacon={"ipv6": "failed", "mtu": "failed"}),
        dict(
            ipv4_only=0,
            ipv6_capable=0,
            ipv6_preferred=0,
            broken_dual_stack=0,
            ipv6_without_aaaa=1,
            mtu_trouble=None,
            resolver_ipv6=1,
        ),
    ),
    # A path that drops full-size IPv6 packets.
    "mtu-trouble": (
        Client(large=False, beacon={"mtu": "timeout"}),
        dict(
            ipv4_only=0,
            ipv6_capable=1,
            ipv6_preferred=1,
            broken_dual_stack=0,
            ipv6_without_aaaa=0,
            mtu_trouble=1,
            resolver_ipv6=1,
        ),
    ),
    # A resolver without IPv6: the v6ns name never resolves.
    "resolver-without-ipv6": (
        Client(resolver_ipv6=False, beacon={"v6ns": "failed"}),
        dict(
            ipv4_only=0,
            ipv6_capable=1,
            ipv6_preferred=1,
            broken_dual_stack=0,
            ipv6_without_aaaa=0,
            mtu_trouble=0,
            resolver_ipv6=0,
        ),
    ),
    # The worker submitted before the IPv6 probes finished: not measured.
    "closed-early": (
        Client(
            ipv6=False,
            ds_over=None,
            final=False,
            beacon={"ipv4": LOADED}
            | dict.fromkeys(("ipv6", "ds", "literal", "mtu", "v6ns"), "pending"),
        ),
        dict(
            ipv4_only=None,
            ipv6_capable=None,
            ipv6_preferred=None,
            broken_dual_stack=None,
            ipv6_without_aaaa=None,
            mtu_trouble=None,
            resolver_ipv6=None,
        ),
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_each_outcome_from_real_fetches(battery_server, db, scenario):
    client, expected = SCENARIOS[scenario]
    page = await client.visit(battery_server)
    row = outcome(db, page.token)
    assert outcomes(row) == expected, dict(row)
    assert row["ipv4"] == "127.0.0.1"
    assert row["ipv6"] == (
        "::1" if any(k in client.fetched for k in ("ipv6", "literal")) else row["ipv6"]
    )


async def test_every_probe_is_served_and_logged(battery_server, db):
    page = await Client(beacon=dict.fromkeys(battery.PROBES, LOADED)).visit(battery_server)
    assert set(page.probes) == set(ALL_PROBES)
    # The probes carry the token; literal and large go to the IPv6 site.
    assert page.probes["literal"] == f"{battery_server.base_urls['ipv6']}/literal/{page.token}.png"
    assert page.probes["mtu"] == f"{battery_server.base_urls['ipv6']}/mtu/{page.token}/large.png"
    assert page.probes["ds"] == f"http://ds.example.org/ds/{page.token}.png"
    assert page.probes["v6ns"] == f"http://ds.v6ns.example.org/v6ns/{page.token}.png"
    rows = db(
        "SELECT kind, site, status, token_ok FROM requests WHERE token = ? AND kind NOT IN"
        " ('survey', 'red', 'blue') ORDER BY id",
        page.token,
    )
    assert [tuple(r) for r in rows] == [
        ("ds", "ipv6", 200, 1),
        ("literal", "ipv6", 200, 1),
        ("mtu", "ipv6", 302, 1),
        ("mtu-ok", "ipv6", 200, 1),
        ("v6ns", "ipv6", 200, 1),
        ("beacon", "ipv4", 204, 1),
    ]
    (pages,) = db("SELECT * FROM battery_pages")
    assert json.loads(pages["probes"]) == ["ipv4", "ipv6", *ALL_PROBES]
    assert pages["beacon"] == 1 and pages["v6ns_host"] == "ds.v6ns.example.org"
    results_ = {r["probe"]: r["result"] for r in db("SELECT * FROM battery_probes")}
    assert results_ == dict.fromkeys(["ipv4", "ipv6", *ALL_PROBES], "ok")
    # The page says what its one script may do; the probes live off the counted box.
    assert "script-src 'self'" in page.csp and "connect-src 'self'" in page.csp
    assert page.text.index('id="battery"') > page.text.index('class="balls"')
    assert f'<script src="{battery.SCRIPT_PATH}" defer></script>' in page.text


async def test_probe_responses(battery_server, http):
    page = await Client().visit(battery_server)
    async with http.get(page.probes["literal"]) as response:
        assert response.status == 200 and await response.read() == PIXEL
        assert response.headers["Timing-Allow-Origin"] == "*"
        assert response.headers["Cache-Control"] == "no-store"
    # Literal and large answer only on the IPv6 site.
    wrong = battery_server.base_urls["ipv4"] + path_of(page.probes["literal"])
    async with http.get(wrong) as response:
        assert response.status == 421
    # The dual-stack and v6ns names are served on both.
    for site in ("ipv4", "ipv6"):
        for probe in ("ds", "v6ns"):
            async with http.get(battery_server.base_urls[site] + path_of(page.probes[probe])) as r:
                assert r.status == 200 and await r.read() == PIXEL
    # The script comes from the IPv4 site as JavaScript.
    async with http.get(battery_server.base_urls["ipv4"] + battery.SCRIPT_PATH) as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
        assert b"sendBeacon" in await response.read()


async def raw_get(host: str, port: int, path: str) -> bytes:
    """The exact bytes of one HTTP/1.1 response (the server closes after it)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_large_response_needs_full_size_packets_and_a_blue_ball_does_not(battery_server):
    page = await Client().visit(battery_server)
    assert battery_server.listeners is not None
    host, port = battery_server.listeners.http["ipv6"].getsockname()[:2]
    large = await raw_get(host, port, path_of(page.probes["mtu"]))
    head, _, _ = large.partition(b"\r\n\r\n")
    # The redirect is in a head of more than 1600 bytes: more than one packet
    # on a 1280-byte path, so the browser sees it only if large packets arrive.
    assert large.startswith(b"HTTP/1.1 302")
    assert len(head) > battery.LARGE_RESPONSE_BYTES
    assert b"\r\nLocation: ok.png" in head
    # A whole blue-ball response fits in one packet of a 1280-byte path:
    # 1280 - 40 (IPv6 header) - 20 (TCP) - 12 (timestamps) = 1208 bytes.
    blue = await raw_get(host, port, path_of(page.blue[0]))
    assert blue.startswith(b"HTTP/1.1 200") and blue.endswith(BLUE_BALL)
    assert len(blue) <= 1208, len(blue)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b'{"token": "abc", "final": true, "probes": {}}', 400),
        (json.dumps({"token": "a" * 32, "final": True, "probes": {}}).encode(), 400),
        (b"x" * (battery.MAX_BEACON_BYTES + 1), 413),
    ],
)
async def test_beacon_refuses_what_is_not_ours(battery_server, http, db, body, status):
    url = battery_server.base_urls["ipv4"] + battery.BEACON_PATH
    async with http.post(url, data=body) as response:
        assert response.status == status
    assert not db("SELECT 1 FROM beacons")
    assert [r["kind"] for r in db("SELECT kind FROM requests")] == ["beacon"]


@pytest.mark.parametrize(
    "probes",
    [
        {"ipv6": {"state": "lost"}},
        {"ipv6": {"state": "loaded", "at": -1}},
        {"ipv6": {"state": "loaded", "at": 1e12}},
        {"ipv6": {"state": "loaded", "extra": 1}},
        {"nonsense": {"state": "loaded"}},
        {"ipv6": {"state": "loaded", "at": "12"}},
    ],
)
def test_beacon_body_is_validated(probes):
    body = json.dumps({"token": "a" * 32, "final": True, "probes": probes}).encode()
    with pytest.raises(battery.BadBeacon):
        battery.parse_beacon(body)


def test_beacon_body_as_the_script_sends_it():
    body = json.dumps(
        {
            "token": "a" * 32,
            "final": False,
            "probes": {
                "ipv6": {"state": "loaded", "at": 35, "duration": 12.4, "dns": 0, "connect": 1.5},
                "mtu": {"state": "pending", "at": 4000.5},
            },
        }
    ).encode()
    beacon = battery.parse_beacon(body)
    assert beacon.probes["ipv6"].duration == 12.4 and beacon.probes["mtu"].state == "pending"


async def post_beacon(
    server: ProbeServer, token: str, probes: dict[str, str], final: bool, source: str
) -> None:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        body = {
            "token": token,
            "final": final,
            "probes": {name: {"state": state} for name, state in probes.items()},
        }
        url = server.base_urls["ipv4"] + battery.BEACON_PATH
        async with http.post(url, data=json.dumps(body)) as response:
            assert response.status == 204, await response.text()


async def test_only_the_first_beacon_from_the_pages_address_counts(battery_server, db):
    # The page's own browser (127.0.0.1) closes it while the dual-stack probe
    # is still loading. Whoever else learnt the token (a resolver on the
    # way, before labels; anyone who saw the page) sends reports that would
    # make it a timeout, a broken dual stack: one from elsewhere before the
    # browser's, one from the page's address after it. Neither counts.
    client = Client(ipv6=False, ds_over=None)
    page = await client.visit(battery_server)
    await post_beacon(battery_server, page.token, {"ds": "timeout"}, True, "127.0.0.2")
    await post_beacon(battery_server, page.token, {"ds": "pending"}, False, "127.0.0.1")
    await post_beacon(battery_server, page.token, {"ds": "timeout"}, True, "127.0.0.1")
    assert outcome(db, page.token)["broken_dual_stack"] is None
    (ds,) = db(
        "SELECT result, beacon_state FROM battery_probes WHERE session_token = ? AND probe = 'ds'",
        page.token,
    )
    assert tuple(ds) == ("pending", "pending")
    # Every report is kept, for whoever wants to study them.
    rows = db("SELECT addr, final, state FROM beacons ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("127.0.0.2", 1, "timeout"),
        ("127.0.0.1", 0, "pending"),
        ("127.0.0.1", 1, "timeout"),
    ]


async def test_a_beacon_from_elsewhere_alone_leaves_the_probe_unexplained(battery_server, db):
    client = Client(ipv6=False, ds_over=None)
    page = await client.visit(battery_server)
    await post_beacon(battery_server, page.token, {"ds": "timeout"}, True, "127.0.0.2")
    row = outcome(db, page.token)
    assert row["ds_result"] == "missing" and row["broken_dual_stack"] == 1


async def test_the_papers_page_is_one_setting(server, http, db):
    """No probes, no labels, no beacon: the page and the database as before."""
    async with http.get(server.base_urls["ipv4"] + "/") as response:
        text = await response.text()
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert 'id="battery"' not in text and "<script" not in text
    assert len(IMG.findall(text)) >= 2
    assert not db("SELECT 1 FROM battery_pages")
    assert not db("SELECT 1 FROM battery_outcomes")


# The outcomes each probe alone decides; ipv4_only and ipv6_capable need none.
DECIDED_BY = {
    "ds": {"ipv6_preferred", "broken_dual_stack"},
    "literal": {"ipv6_without_aaaa"},
    "mtu": {"mtu_trouble"},
    "v6ns": {"resolver_ipv6"},
}


@pytest.mark.parametrize("probe", ALL_PROBES)
async def test_each_probe_is_switched_on_alone(make_config, db, probe):
    """One probe on: only its image on the page, only its outcomes measured."""
    urls = {key: value for key, value in BATTERY.items() if key == f"{probe}_url"}
    server = ProbeServer(make_config(battery={"probes": [probe], **urls}))
    await server.start()
    try:
        page = await Client().visit(server)
        # No beacon configured: no script on the page.
        assert "<script" not in page.text
    finally:
        await server.stop()
    assert set(page.probes) == {probe}
    (stored,) = db("SELECT probes FROM battery_pages WHERE session_token = ?", page.token)
    assert json.loads(stored["probes"]) == ["ipv4", "ipv6", probe]
    rows = db("SELECT probe, result FROM battery_probes WHERE session_token = ?", page.token)
    assert {r["probe"]: r["result"] for r in rows} == dict.fromkeys(["ipv4", "ipv6", probe], "ok")
    measured = {
        key for key, value in outcomes(outcome(db, page.token)).items() if value is not None
    }
    assert measured == {"ipv4_only", "ipv6_capable", *DECIDED_BY[probe]}


@pytest.mark.parametrize(
    ("battery_config", "error"),
    [
        ({"probes": ["ds"]}, "ds_url: needed by the ds probe"),
        ({"probes": ["v6ns"]}, "v6ns_url: needed by the v6ns probe"),
        ({"probes": ["ds", "ds"], "ds_url": "http://ds.example.org"}, "each probe once"),
        ({"probes": ["bogus"]}, "battery.probes.0"),
        ({"literal_url": "http://v6.example.org"}, "needs an IPv6 address literal"),
        ({"literal_url": "http://192.0.2.1"}, "needs an IPv6 address literal"),
        ({"labels": ["ds"], "ds_url": "http://[2001:db8::1]"}, "only names get labels"),
        ({"labels": ["ipv4"]}, "ipv4 needs sites.ipv4.base_url with a host name"),
        ({"beacon_timeout": 0}, "beacon_timeout"),
    ],
)
def test_config_errors_name_the_key(tmp_path, battery_config, error):
    path = write_config(tmp_path / "c.toml", {"battery": battery_config})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert error in str(caught.value)


def test_literal_needs_a_url_when_the_ipv6_site_has_a_name(tmp_path):
    data = {
        "sites": {"ipv6": {"listen": "[::1]:8080", "base_url": "http://v6.example.org"}},
        "battery": {"probes": ["literal"]},
    }
    with pytest.raises(ConfigError, match="literal_url: needed by the literal probe"):
        load_config(write_config(tmp_path / "c.toml", data))
    data["battery"]["literal_url"] = "http://[2001:db8::10]"
    assert load_config(write_config(tmp_path / "c.toml", data)).battery.probes == ("literal",)


def test_session_labels_only_on_named_urls():
    from probe_server.config import BatteryConfig

    config = BatteryConfig(
        probes=("ds", "mtu", "v6ns", "literal"),
        ds_url="https://ds.example.org",
        v6ns_url="https://ds.v6ns.example.org:8443",
        literal_url="https://[2001:db8::10]",
        labels=("ipv6", "ds", "v6ns"),
    )
    bases = {"ipv4": "https://survey.example.org", "ipv6": "https://v6.example.org"}
    token, label = "t" * 32, "l" * 24
    page = battery.page(config, {**bases, "literal": ""}, token, label)
    urls = {probe.name: probe.url for probe in page.probes}
    # The label goes into host names, the token into paths only.
    assert page.red_base == "https://survey.example.org"
    assert page.blue_base == f"https://{label}.v6.example.org"
    assert urls == {
        "ds": f"https://{label}.ds.example.org/ds/{token}.png",
        "mtu": f"https://{label}.v6.example.org/mtu/{token}/large.png",
        "v6ns": f"https://{label}.ds.v6ns.example.org:8443/v6ns/{token}.png",
        "literal": f"https://[2001:db8::10]/literal/{token}.png",
    }
    assert page.v6ns_host == "ds.v6ns.example.org"
    assert page.label == label


@pytest.mark.parametrize(
    ("ipv4", "ipv6", "bits"),
    [
        ("192.0.2.90", "2d00:90:c000:25a::2", 32),  # the whole IPv4 address after a /32
        ("203.0.113.7", "2001:db8:7107:100::1", 16),  # its last 16 bits after a /48
        ("198.51.100.77", "2001:db8:ff33:644d::1", 24),  # its last 24 bits after a /40
        ("192.0.2.90", "2d00:1::20", 0),  # native, nothing in common
    ],
)
def test_sixrd_hint(ipv4, ipv6, bits):
    assert sixrd_bits(ipv4, ipv6) == bits


# -- the report -----------------------------------------------------------------------


REPORT_SOURCES = {
    "ipv6-preferred": "127.0.0.11",
    "ipv4-only": "127.0.0.12",
    "broken": "127.0.0.13",
    "mtu-trouble": "127.0.0.14",
}


async def test_report_has_the_battery_beside_the_papers_tables(battery_server, tmp_path, capsys):
    for scenario, source in REPORT_SOURCES.items():
        client, _ = SCENARIOS[scenario]
        await Client(**{**client.__dict__, "source": source, "fetched": {}}).visit(battery_server)
    countries = {
        "127.0.0.11/32": ("US", "United States"),
        "127.0.0.12/32": ("US", "United States"),
        "127.0.0.13/32": ("IN", "India"),
        "127.0.0.14/32": ("IN", "India"),
    }
    country_db(tmp_path / "country.mmdb", countries)
    asn_db(tmp_path / "asn.mmdb", {})
    config = write_config(
        tmp_path / "report.toml", {"geoip": {"country_db": "country.mmdb", "asn_db": "asn.mmdb"}}
    )
    db_path = tmp_path / "probe.db"
    assert main(["report", "--db", str(db_path), "--config", str(config), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The paper's keys are all still there, unchanged.
    assert {"sessions", "adoption", "countries", "providers", "batches", "previews"} <= set(report)
    section = report["battery"]
    assert (section["sessions"], section["ipv4_addresses"]) == (4, 4)
    assert section["unit"] == "ipv4_addresses"
    assert set(section["outcomes"]) == {*results.OUTCOMES, *results.HINTS}
    capable = section["outcomes"]["ipv6_capable"]
    assert (capable["ipv4_addresses"], capable["yes"]) == (4, 2)
    low, high = wilson(2, 4)
    assert capable["ci95_low"] == pytest.approx(low) and capable["ci95_high"] == pytest.approx(high)
    assert section["outcomes"]["broken_dual_stack"]["yes"] == 1
    assert section["outcomes"]["mtu_trouble"] == {
        "ipv4_addresses": 2,
        "yes": 1,
        "rate": 0.5,
        "ci95_low": pytest.approx(wilson(1, 2)[0]),
        "ci95_high": pytest.approx(wilson(1, 2)[1]),
    }
    by_country = {c["country"]: c["outcomes"] for c in section["by_country"]}
    assert set(by_country) == {"US", "IN"}
    assert by_country["US"]["ipv4_only"]["yes"] == 1 and by_country["IN"]["ipv4_only"]["yes"] == 0
    assert by_country["IN"]["broken_dual_stack"]["yes"] == 1
    assert by_country["IN"]["mtu_trouble"]["yes"] == 1
    # Each country's rates carry their own Wilson interval.
    for country in by_country.values():
        for counted in country.values():
            low, high = wilson(counted["yes"], counted["ipv4_addresses"])
            assert (counted["ci95_low"], counted["ci95_high"]) == (
                pytest.approx(low),
                pytest.approx(high),
            )
    # ::1 is loopback: no tunnel hint, but measured.
    assert section["outcomes"]["hint_teredo"]["yes"] == 0
    assert section["probes"]["mtu"] == {
        "ok": 1,
        "failed": 0,
        "timeout": 2,
        "pending": 0,
        "missing": 1,
    }

    built = build_report(db_path)
    assert to_json(built)["battery"] == section
    markdown = render_markdown(built)
    assert "## Beyond the paper: the IPv6 measurement battery" in markdown
    assert "broken dual stack" in markdown
    csv = render_csv(built)
    assert csv["battery_outcomes.csv"].startswith("country,outcome,ipv4_addresses,yes,rate")
    assert "all,broken_dual_stack,4,1,0.25," in csv["battery_outcomes.csv"]
    assert "mtu,timeout,2\n" in csv["battery_probes.csv"]


async def test_the_battery_counts_ipv4_addresses_as_the_papers_tables_do(battery_server, db):
    # One worker (127.0.0.21) reloads the page: first on a network whose
    # IPv6 works, then with IPv6 gone. Another (127.0.0.22) loads it once,
    # IPv4 only.
    preferred, _ = SCENARIOS["ipv6-preferred"]
    only, _ = SCENARIOS["ipv4-only"]
    for client, source in ((preferred, "127.0.0.21"), (only, "127.0.0.21"), (only, "127.0.0.22")):
        await Client(**{**client.__dict__, "source": source, "fetched": {}}).visit(battery_server)
    conn = sqlite3.connect(battery_server.config.resolve(battery_server.config.database.path))
    try:
        found = results.read_battery(conn)
    finally:
        conn.close()
    assert (found.sessions, found.ipv4_addresses) == (3, 2)
    # Each address once per outcome, yes when any of its sessions said yes:
    # IPv6-capable at one address of two (not two sessions of three), and
    # an IPv4-only browser seen at both.
    capable, ipv4_only = found.overall["ipv6_capable"], found.overall["ipv4_only"]
    assert (capable.ipv4_addresses, capable.yes) == (2, 1)
    assert (ipv4_only.ipv4_addresses, ipv4_only.yes) == (2, 2)
    # battery_outcomes keeps every session.
    assert len(db("SELECT 1 FROM battery_outcomes")) == 3


# -- per-session names through our own DNS ----------------------------------------------


def same_port_on_both() -> int:
    """A TCP port free on 127.0.0.1 and on ::1: the dual-stack name reaches either."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as six:
            six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            six.bind(("::1", 0))
            port: int = six.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as four:
                try:
                    four.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both families")


def randomise_case(name: str) -> str:
    """0x20: resolvers randomise the letter case of the names they ask for."""
    return "".join(c.upper() if random.getrandbits(1) else c for c in name)


class OurDns(AbstractResolver):
    """A stub resolver asking our DNS directly over one family.

    It follows no referral: asked over IPv4 for a name under the IPv6-only
    name server, it gets a referral and fails, as a resolver without IPv6
    would. AAAA records come first (a browser that prefers IPv6).
    """

    def __init__(self, server: ProbeServer, family: str) -> None:
        self.server = server
        self.family = family

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found: list[ResolveResult] = []
        where, dns_port = endpoint(self.server, "udp", self.family)
        for qtype, address_family in (("AAAA", socket.AF_INET6), ("A", socket.AF_INET)):
            query = dns.message.make_query(randomise_case(host), qtype)
            reply = await dns.asyncquery.udp(query, where, port=dns_port, timeout=5)
            for rrset in reply.answer:
                if rrset.rdtype != dns.rdatatype.from_text(qtype):
                    continue
                for rdata in rrset:
                    found.append(
                        ResolveResult(
                            hostname=host,
                            host=rdata.address,
                            port=port,
                            family=address_family,
                            proto=0,
                            flags=socket.AI_NUMERICHOST,
                        )
                    )
        if not found:
            raise OSError(f"{host}: no address")
        return found

    async def close(self) -> None:
        pass


@pytest.fixture
async def named_server(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    port = same_port_on_both()
    config = make_config(
        sites={
            "ipv4": {"listen": f"127.0.0.1:{port}", "base_url": f"http://survey.loop.test:{port}"},
            "ipv6": {"listen": f"[::1]:{port}", "base_url": f"http://v6.loop.test:{port}"},
        },
        dns={"zones": [str(ZONES / "loop.test.zone"), str(ZONES / "v6ns.loop.test.zone")]},
        battery={
            "probes": ALL_PROBES,
            "ds_url": f"http://ds.loop.test:{port}",
            "v6ns_url": f"http://ds.v6ns.loop.test:{port}",
            "literal_url": f"http://[::1]:{port}",
            "labels": ["ipv4", "ipv6", "ds", "v6ns"],
        },
    )
    server = ProbeServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def browse(server: ProbeServer, resolver_family: str) -> tuple[Page, dict[str, int | None]]:
    """Load the page by name and fetch every image, resolving through our DNS."""
    connector = aiohttp.TCPConnector(resolver=OurDns(server, resolver_family), use_dns_cache=False)
    statuses: dict[str, int | None] = {}
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(server.base_urls["ipv4"] + "/") as response:
            page = Page.parse(await response.text(), response.headers["Content-Security-Policy"])
        named = {"ipv4": page.red[0], "ipv6": page.blue[0], **page.probes}
        for name, url in named.items():
            try:
                async with http.get(url) as response:
                    await response.read()
                    statuses[name] = response.status
            except aiohttp.ClientConnectorError:
                statuses[name] = None
    assert server.dns is not None
    await server.dns.drain()
    return page, statuses


async def test_per_session_names_join_the_resolvers_family(named_server, db):
    page, statuses = await browse(named_server, "ipv6")
    token = page.token
    label = session_label(named_server.app[secret_key], token)
    assert page.red[0].startswith(f"http://{label}.survey.loop.test:")
    assert page.probes["ds"].startswith(f"http://{label}.ds.loop.test:")
    # The token, which /submit and /beacon accept, is in no host name: not
    # in a DNS query, not in TLS's SNI.
    assert not any(token in (urlsplit(url).hostname or "") for url in page.probes.values())
    assert not db("SELECT 1 FROM dns_queries WHERE lower(qname) LIKE ?", f"%{token}%")
    (stored,) = db("SELECT label FROM battery_pages WHERE session_token = ?", token)
    assert stored["label"] == label
    assert statuses == dict.fromkeys(["ipv4", "ipv6", *ALL_PROBES], 200)
    # The dual-stack name came over IPv6: AAAA first, as a browser preferring IPv6.
    row = outcome(db, token)
    assert (row["ds_site"], row["ipv6_preferred"], row["resolver_ipv6"]) == ("ipv6", 1, 1)
    assert row["v6ns_asked_over_ipv6"] == 1
    # Every labelled name reached our DNS, whatever the letter case it was sent in.
    asked = {(r["name"], r["family"], r["qtype"]) for r in db("SELECT * FROM session_dns")}
    for name in ("survey.loop.test.", "v6.loop.test.", "ds.loop.test.", "ds.v6ns.loop.test."):
        assert (name, "ipv6", "AAAA") in asked, asked
    assert db("SELECT count(*) FROM dns_queries WHERE qname <> lower(qname)")[0][0] > 0
    # Both joins search the label index for each session; they never scan
    # the query log (or the whole index, as schema 7's did).
    for view in ("session_dns", "battery_outcomes"):
        plan = [
            r[3]
            for r in db(f"EXPLAIN QUERY PLAN SELECT * FROM {view} WHERE session_token = ?", token)
        ]
        assert any(step.startswith("SEARCH d USING INDEX dns_queries_label") for step in plan), plan
        assert not any(step.startswith("SCAN d") for step in plan), plan


async def test_a_resolver_without_ipv6_misses_the_v6ns_name(named_server, db):
    page, statuses = await browse(named_server, "ipv4")
    # Everything resolves over IPv4 except the name under the IPv6-only server.
    assert statuses == {
        **dict.fromkeys(["ipv4", "ipv6", "ds", "literal", "mtu"], 200),
        "v6ns": None,
    }
    row = outcome(db, page.token)
    assert row["resolver_ipv6"] == 0 and row["v6ns_asked_over_ipv6"] == 0
    # Its query did reach us, over IPv4, and got the referral (no answer).
    referral = db(
        "SELECT family, rcode FROM session_dns WHERE session_token = ? AND name = ?",
        page.token,
        "ds.v6ns.loop.test.",
    )
    assert {tuple(r) for r in referral} == {("ipv4", "NOERROR")}


def test_a_label_is_a_keyed_hash_of_the_token_never_a_token():
    secret, other = b"s" * 32, b"o" * 32
    token = new_token(secret)
    label = session_label(secret, token)
    assert label == session_label(secret, token)  # derived, so stable
    assert label != session_label(other, token)  # keyed: no secret, no label
    assert len(label) == LABEL_LENGTH and re.fullmatch(r"[a-z2-7]+", label)
    assert not looks_like_token(label)
    assert label not in token and token[:LABEL_LENGTH] != label


async def test_a_label_is_accepted_nowhere(named_server, db):
    page, _ = await browse(named_server, "ipv4")
    label = session_label(named_server.app[secret_key], page.token)
    base = named_server.base_urls["ipv4"]
    connector = aiohttp.TCPConnector(resolver=OurDns(named_server, "ipv4"), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        form = {"token": label, "red": "1", "blue": "0"}
        async with http.post(f"{base}/submit", data=form) as response:
            assert response.status == 400
        body = json.dumps({"token": label, "final": True, "probes": {"ds": {"state": "timeout"}}})
        async with http.post(f"{base}{battery.BEACON_PATH}", data=body) as response:
            assert response.status == 400
        async with http.get(f"{base}/red/{label}/1.png") as response:
            assert response.status == 200  # served, as any forged token is, but not ours
    assert not db("SELECT 1 FROM answers") and not db("SELECT 1 FROM beacons")
    assert not db("SELECT 1 FROM requests WHERE token = ? AND token_ok = 1", label)


def test_pages_labelled_with_their_token_before_schema_9_still_join(tmp_path):
    # A database of schema 8, whose labelled names began with the token.
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version, _, script in migrations():
        if version <= 8:
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
    token = "a" * 32
    conn.execute(
        "INSERT INTO sessions (token, created, ipv4, port, user_agent, red_count, blue_count,"
        " visit) VALUES (?, 0, '192.0.2.10', 1, '', 1, 1, 'direct')",
        (token,),
    )
    conn.execute(
        'INSERT INTO battery_pages VALUES (?, \'["ipv4","ipv6","v6ns"]\', \'["v6ns"]\', 0,'
        " 'ds.v6ns.example.org')",
        (token,),
    )
    conn.execute(
        "INSERT INTO dns_queries (t, family, addr, port, transport, qname, qtype, rcode, size,"
        " truncated, rrl) VALUES (0, 'ipv6', '2001:db8::53', 1, 'udp', ?, 'A', 'NOERROR', 60,"
        " 0, 'pass')",
        (f"{token.upper()}.ds.V6ns.example.org.",),
    )
    conn.close()
    conn = open_sync(path)
    conn.row_factory = sqlite3.Row
    (page,) = conn.execute("SELECT label FROM battery_pages").fetchall()
    assert page["label"] == token
    (asked,) = conn.execute("SELECT name, family FROM session_dns").fetchall()
    assert tuple(asked) == ("ds.v6ns.example.org.", "ipv6")
    (row,) = conn.execute("SELECT v6ns_asked_over_ipv6, resolver_ipv6 FROM battery_outcomes")
    assert tuple(row) == (1, 1)
    conn.close()


@pytest.mark.parametrize(
    ("ipv6", "ipv6_asn", "hints"),
    [
        # The lab's mtu client: its prefix embeds the router's public IPv4
        # address in bits 32-63 (6rd), in a tunnel provider's network.
        ("2d00:90:c000:25a::2", 64501, (1, 1)),
        # 6rd-style prefix, but the same network as the IPv4 address.
        ("2d00:90:c000:25a::2", 64500, (1, 0)),
        # Native, another network, nothing of the IPv4 address in it.
        ("2d00:1::20", 64501, (0, 1)),
        ("2d00:1::20", 64500, (0, 0)),
    ],
)
def test_the_6rd_and_different_asn_hints(tmp_path, ipv6, ipv6_asn, hints):
    conn = open_sync(tmp_path / "p.db")
    conn.row_factory = sqlite3.Row
    token, ipv4 = "b" * 32, "192.0.2.90"
    conn.execute(
        "INSERT INTO sessions (token, created, ipv4, port, user_agent, red_count, blue_count,"
        " visit) VALUES (?, 0, ?, 1, '', 1, 1, 'direct')",
        (token, ipv4),
    )
    conn.execute(
        "INSERT INTO battery_pages (session_token, probes, labels, beacon) VALUES"
        " (?, '[\"ipv4\",\"ipv6\"]', '[]', 0)",
        (token,),
    )
    for site, addr, kind in (("ipv4", ipv4, "red"), ("ipv6", ipv6, "blue")):
        conn.execute(
            "INSERT INTO requests (t, site, addr, port, method, path, kind, token, token_ok,"
            " ball, status, bytes) VALUES (0, ?, ?, 1, 'GET', '/', ?, ?, 1, 1, 200, 1)",
            (site, addr, kind, token),
        )
    # What `probe-server report` does: classify and pair the addresses, look
    # them up (here: the answers a GeoIP database would give).
    assert results.enrich_battery(conn) == (1, 1)
    for address, asn in ((ipv4, 64500), (ipv6, ipv6_asn)):
        conn.execute(
            "INSERT INTO geoip (address, country, asn, country_db, asn_db, looked_up)"
            " VALUES (?, 'GB', ?, 'test', 'test', 0)",
            (address, asn),
        )
    (row,) = conn.execute("SELECT * FROM battery_outcomes").fetchall()
    assert (row["hint_6rd"], row["hint_asn_differs"]) == hints
    assert (row["hint_teredo"], row["hint_6to4"]) == (0, 0)
    conn.close()
