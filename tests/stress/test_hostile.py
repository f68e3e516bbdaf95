"""Hostile input: forged and replayed tokens, open redirects through
turkSubmitTo, script injection in every reflected field, path traversal,
administrative paths on the public sites, DNS amplification."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dns.message
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe_server.keys import secret_key
from probe_server.server import ProbeServer
from probe_server.survey import MTURK_WORKER_SITES, worker_site
from probe_server.tokens import new_token

from ..certs import TestCA
from ..dns_client import RawUdp, wire_query
from ..test_handoff import ACCEPTED, OPEN_REDIRECTS, handoff_of
from ..test_web import load_survey
from .conftest import Report, scale
from .load import RawHttp, UdpFlood

# -- tokens ------------------------------------------------------------------------


async def fetch_from(url: str, source: str | None = None) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as http, http.get(url) as response:
        await response.read()
        return response.status


async def test_forged_and_replayed_tokens_are_flagged(server, http, db, tmp_path, report: Report):
    page = await load_survey(http, server)
    for url in page.red + page.blue:  # the page's own fetches: nothing to flag
        assert await fetch_from(url) == 200
    assert db("SELECT count(*) FROM replayed_probes")[0][0] == 0

    forged = new_token(b"someone else's key, not the server's")
    assert await fetch_from(page.blue[0].replace(page.token, forged)) == 200
    # Replays of the genuine token: the same ball again, a ball never shown,
    # a red ball from another IPv4 address than the page's.
    assert await fetch_from(page.blue[0]) == 200
    assert await fetch_from(re.sub(r"/\d+\.png", "/9.png", page.blue[0])) == 200
    assert await fetch_from(page.red[0], source="127.0.0.2") == 200
    # A page served two days ago whose ball comes now.
    old = await load_survey(http, server)
    with sqlite3.connect(tmp_path / "probe.db") as conn:
        conn.execute("UPDATE sessions SET created = created - 172800 WHERE token = ?", (old.token,))
        # A blue ball from a second IPv6 address (loopback has one: a row as
        # the server would write it).
        conn.execute(
            "INSERT INTO requests (t, site, addr, port, method, path, kind, token, token_ok,"
            " ball, status, bytes) SELECT t + 1, site, '2001:db8::77', port, method, path,"
            " kind, token, 1, 2, status, bytes FROM requests"
            " WHERE token = ? AND kind = 'blue' AND ball = 1",
            (page.token,),
        )
    assert await fetch_from(old.blue[0]) == 200

    assert db("SELECT token FROM unverified_requests")[0][0] == forged
    flagged = {
        (r["token"], r["kind"], r["ball"], r["reasons"])
        for r in db("SELECT token, kind, ball, reasons FROM replayed_probes")
    }
    # Two rows were copied (ball 1 was fetched twice). With a ball 2 on the
    # page, both repeat its fetch; without one, the first is only not served.
    if len(page.blue) >= 2:
        copied = {(page.token, "blue", 2, "repeat other-ipv6")}
    else:
        copied = {
            (page.token, "blue", 2, "not-served other-ipv6"),
            (page.token, "blue", 2, "not-served repeat other-ipv6"),
        }
    assert flagged == {
        (page.token, "blue", 1, "repeat"),
        (page.token, "blue", 9, "not-served"),
        (page.token, "red", 1, "repeat other-ipv4"),
        *copied,
        (old.token, "blue", 1, "late"),
    }
    report(
        "hostile: forged and replayed tokens",
        "a token signed with another key; the page's own token replayed: a ball"
        " again, a ball never shown, a red ball from another IPv4 address, a blue ball"
        " from a second IPv6 address, a ball two days after its page",
        "1 forged, 5 replays",
        "forged: token_ok = 0, in unverified_requests, never correlated; every replay"
        " in replayed_probes with its reason; the page's own fetches unflagged",
        "nothing (replays are kept and flagged, not dropped)",
    )


# -- turkSubmitTo --------------------------------------------------------------------


@settings(max_examples=scale(300, 5000), deadline=None)
@given(value=st.one_of(st.text(max_size=80), st.sampled_from(OPEN_REDIRECTS)))
def test_turk_submit_to_is_one_of_mturks_sites_or_nothing(value):
    site = worker_site(value)
    assert site is None or site in MTURK_WORKER_SITES
    if site is not None:
        assert value.rstrip("/").lower() == site


async def test_open_redirects_never_reach_the_answer_page(server, http, report: Report):
    refused = 0
    for value in OPEN_REDIRECTS:
        query = "?assignmentId=A1&hitId=H1&workerId=W1"
        async with http.get(
            f"{server.base_urls['ipv4']}/{query}", params={"turkSubmitTo": value}
        ) as response:
            refused += response.status == 400
    # Each accepted site hands the answer to exactly its externalSubmit.
    for site in MTURK_WORKER_SITES:
        page = await load_survey(http, server, ACCEPTED + site)
        form = {"token": page.token, "red": str(len(page.red)), "blue": "1"}
        async with http.post(f"{server.base_urls['ipv4']}/submit", data=form) as response:
            action, _ = handoff_of(await response.text())
        assert action == f"{site}/mturk/externalSubmit"
    assert refused == len(OPEN_REDIRECTS)
    report(
        "hostile: turkSubmitTo open redirect",
        "turkSubmitTo values naming other sites (look-alike hosts, userinfo, ports,"
        " paths, schemes, encodings); a property test of the allowlist",
        f"{len(OPEN_REDIRECTS)} crafted values live; {scale(300, 5000)} generated",
        "every one refused with 400 before a session exists; the answer page posts only"
        " to MTurk's externalSubmit of an allowed site",
        "nothing",
    )


# -- injection ---------------------------------------------------------------------

MARK = "xinj"
PAYLOADS = [
    f'"><{MARK}>',
    f"'><{MARK} a=1>",
    f"</script><{MARK}>",
    f'" {MARK}="1',
    f"' {MARK}='1",
    f"javascript:{MARK}",
    f"<svg/onload={MARK}>",
    f"\u003c{MARK}\u003e",
]


def injected(text: str) -> bool:
    """A payload came back as markup rather than as text."""
    lowered = text.lower()
    return (
        f"<{MARK}" in lowered
        or f'{MARK}="' in lowered
        or f"{MARK}='" in lowered
        or f"<svg/onload={MARK}" in lowered
        or f'href="javascript:{MARK}' in lowered
    )


async def test_no_reflected_field_injects_markup(server, http, report: Report):
    base = server.base_urls["ipv4"]
    requests = 0
    survey_fields = ["assignmentId", "hitId", "workerId", "turkSubmitTo", "batch", "extra"]
    form_fields = ["token", "red", "blue", "assignmentId", "turkSubmitTo", "extra"]
    headers = ["User-Agent", "Referer", "Cookie", "X-Forwarded-For", "Accept-Language"]
    for payload in PAYLOADS:
        for name in survey_fields:
            params = {"assignmentId": "A1", "hitId": "H1", "turkSubmitTo": MTURK_WORKER_SITES[0]}
            params[name] = payload
            async with http.get(f"{base}/", params=params) as response:
                assert not injected(await response.text()), (name, payload)
                requests += 1
        page = await load_survey(http, server, ACCEPTED + MTURK_WORKER_SITES[0])
        for name in form_fields:
            form = {"token": page.token, "red": "1", "blue": "1", name: payload}
            async with http.post(f"{base}/submit", data=form) as response:
                assert not injected(await response.text()), (name, payload)
                requests += 1
        for name in headers:
            async with http.get(f"{base}/", headers={name: payload}) as response:
                assert not injected(await response.text()), (name, payload)
                requests += 1
        for site in ("ipv4", "ipv6"):  # the path itself, on the error pages
            connection = await RawHttp.open(server.base_urls[site].removeprefix("http://"))
            try:
                _, body = await connection.request("/" + payload.replace(" ", "%20"))
            finally:
                connection.close()
            assert not injected(body.decode("utf-8", "replace")), payload
            requests += 1
    report(
        "hostile: script injection",
        f"{len(PAYLOADS)} payloads (tag, attribute and javascript: breakouts) in every"
        " survey parameter, every answer-form field, reflected-looking headers and the path",
        f"{requests} requests",
        "no payload ever came back as markup (bad parameters are 400 pages with fixed"
        " text; Jinja2 escapes the rest)",
        "nothing",
    )


# -- files and admin paths ------------------------------------------------------------

TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%2e%2e%2f%2e%2e%2fprobe.secret",
    "..%252f..%252fetc%252fpasswd",
    "....//....//etc/passwd",
    "..\\..\\probe.secret",
    "..%5c..%5cprobe.db",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "probe.secret",
    "probe.db",
    "probe.toml",
    "templates/survey.html",
    "probe_server/web.py",
    "etc/passwd%00.png",
]
ROUTES = [
    "/{p}",
    "//{p}",
    "/red/{p}/1.png",
    "/blue/{p}/1.png",
    "/red/{p}",
    "/blue/x/{p}.png",
    "/submit/{p}",
    "/static/{p}",
    "/.well-known/acme-challenge/{p}",
]
ADMIN_PATHS = [
    "/metrics",
    "/healthz",
    "/health",
    "/admin",
    "/admin/",
    "/status",
    "/server-status",
    "/debug",
    "/debug/pprof",
    "/.env",
    "/config",
    "/probe.secret",
    "/probe.db",
    "/probe.db-wal",
]


def leaks(body: bytes, secret: bytes) -> bool:
    return (
        b"root:x:0:0" in body
        or b"SQLite format 3" in body
        or secret.hex().encode() in body
        or b"{% extends" in body
        or b"import " in body
        or b"secret_file" in body
    )


ACME_TOKEN = "A" * 43
ACME_PLANTED = "B" * 43  # a symlink to /etc/passwd planted in the webroot


@dataclass
class Public:
    """One public web socket: where it listens, how to reach it, what it is."""

    name: str
    site: str
    endpoint: str
    tls: ssl.SSLContext | None
    # The plain-HTTP socket of an HTTPS site: everything but ACME redirects.
    redirects: bool


@dataclass
class Exposed:
    server: ProbeServer
    public: list[Public]


@contextlib.asynccontextmanager
async def exposed(make_config: Any, tmp_path: Path, scheme: str) -> AsyncIterator[Exposed]:
    """A server with its admin listener on, an ACME webroot holding one
    challenge and a planted symlink; the sites on plain HTTP (``http``), or on
    HTTPS with their plain-HTTP (port 80: ACME, redirects) sockets."""
    challenges = tmp_path / "webroot" / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True, exist_ok=True)
    (challenges / ACME_TOKEN).write_text(f"{ACME_TOKEN}.thumbprint")
    if not (challenges / ACME_PLANTED).is_symlink():
        (challenges / ACME_PLANTED).symlink_to("/etc/passwd")
    sites: dict[str, Any] = {"acme_webroot": str(tmp_path / "webroot")}
    context = None
    if scheme == "https":
        ca = TestCA(tmp_path)
        cert, key = ca.issue("site", ["127.0.0.1", "::1"])
        context = ca.client_context()
        for site, listen in (("ipv4", "127.0.0.1:0"), ("ipv6", "[::1]:0")):
            sites[site] = {
                "listen": listen,
                "tls_cert": str(cert),
                "tls_key": str(key),
                "http_listen": listen,
            }
    server = ProbeServer(make_config(sites=sites, admin={"enabled": True, "listen": "127.0.0.1:0"}))
    await server.start()
    try:
        assert server.listeners is not None
        public = [
            Public(site, site, endpoint_of(sock), context, redirects=False)
            for site, sock in server.listeners.http.items()
        ] + [
            Public(f"plain_{site}", site, endpoint_of(sock), None, redirects=True)
            for site, sock in server.listeners.plain.items()
        ]
        assert len(public) == (4 if scheme == "https" else 2)
        yield Exposed(server, public)
    finally:
        await server.stop()


def endpoint_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Connection:
    """A keep-alive connection to one public socket, reopened when the server closes it."""

    def __init__(self, public: Public) -> None:
        self.public = public
        self.raw: RawHttp | None = None

    async def request(self, path: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
        if self.raw is None or not self.raw.reusable:
            self.close()
            self.raw = await RawHttp.open(self.public.endpoint, tls=self.public.tls)
        status, body = await self.raw.request(path, method=method)
        return status, body, self.raw.headers

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self.raw = None


async def test_no_file_is_served_by_traversal_and_no_admin_path_is_public(
    make_config, tmp_path, report: Report
):
    statuses: dict[int, int] = {}
    admin_statuses: dict[int, int] = {}
    sockets = 0
    # Plain-HTTP sites; then HTTPS sites with their port-80 sockets.
    for scheme in ("http", "https"):
        async with exposed(make_config, tmp_path, scheme) as server:
            await try_every_public_socket(server, statuses, admin_statuses)
            sockets += len(server.public)
    traversal_requests = sockets * len(ROUTES) * len(TRAVERSALS)
    report(
        "hostile: path traversal",
        f"{len(TRAVERSALS)} traversal forms (dot segments, %2e/%2f, double encoding,"
        f" overlong UTF-8, backslashes, NUL) in {len(ROUTES)} route shapes (the ACME"
        " webroot's among them, with a real webroot and a symlink to /etc/passwd planted"
        f" in it), raw request lines on every public socket ({sockets}: plain-HTTP sites;"
        " HTTPS sites and their port-80 sockets)",
        f"{traversal_requests} requests",
        f"statuses {dict(sorted(statuses.items()))}; every 200 was a ball image; no file"
        " content, secret, database or template ever in a body; the only file served is"
        " the ACME challenge by its exact token; the planted symlink is not followed;"
        " port 80 of an HTTPS site redirects (308) to the same path on HTTPS",
        "nothing",
    )
    report(
        "hostile: admin paths on public sites",
        "the admin listener enabled (its /metrics and /healthz answer 200 there); then"
        f" {len(ADMIN_PATHS)} administrative paths (metrics, health, status, debug, .env,"
        " the secret and database file names) with GET, HEAD and POST on every public"
        f" socket ({sockets}: plain-HTTP sites; HTTPS sites and their port-80 sockets)",
        f"{sockets * 3 * len(ADMIN_PATHS)} requests",
        f"statuses {dict(sorted(admin_statuses.items()))}: 404 (405 for a method a route"
        " lacks) on the sites, 308 to the public HTTPS site on port 80; no metric, no"
        " health, nothing administrative on any public socket",
        "nothing",
    )


async def try_every_public_socket(
    acme_server: Exposed, statuses: dict[int, int], admin_statuses: dict[int, int]
) -> None:
    server = acme_server.server
    assert server.app is not None and server.listeners is not None
    secret = server.app[secret_key]
    # The admin listener is on: what it serves, the public sockets must not.
    admin = f"http://{endpoint_of(server.listeners.admin)}"
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/healthz"):
            async with http.get(admin + path) as response:
                assert response.status == 200, path
    https = {site: server.base_urls[site] for site in ("ipv4", "ipv6")}

    def redirected_to_the_public_site(public: Public, status: int, headers: dict[str, str]) -> bool:
        return status == 308 and headers.get("location", "").startswith(https[public.site] + "/")

    for public in acme_server.public:
        connection = Connection(public)
        try:
            # The one file that is served, on every socket, by its exact token.
            status, body, _ = await connection.request(f"/.well-known/acme-challenge/{ACME_TOKEN}")
            assert (status, body) == (200, f"{ACME_TOKEN}.thumbprint".encode()), public.name
            status, body, _ = await connection.request(
                f"/.well-known/acme-challenge/{ACME_PLANTED}"
            )
            assert status == 404 and b"root:" not in body, public.name
            for route in ROUTES:
                for payload in TRAVERSALS:
                    path = route.format(p=payload)
                    status, body, headers = await connection.request(path)
                    statuses[status] = statuses.get(status, 0) + 1
                    assert not leaks(body, secret), (public.name, path)
                    if public.redirects and status not in (400, 404):
                        # Port 80 of an HTTPS site: off to the same path on HTTPS.
                        assert redirected_to_the_public_site(public, status, headers), (
                            public.name,
                            path,
                            status,
                        )
                        continue
                    # Only the ball routes answer 200, with the ball itself.
                    assert status in (200, 400, 404, 421), (public.name, path, status)
                    if status == 200:
                        assert body[:8] == b"\x89PNG\r\n\x1a\n"
            for path in ADMIN_PATHS:
                for method in ("GET", "HEAD", "POST"):
                    status, body, headers = await connection.request(path, method=method)
                    admin_statuses[status] = admin_statuses.get(status, 0) + 1
                    assert not leaks(body, secret) and b"probe_server_" not in body
                    if public.redirects:
                        assert redirected_to_the_public_site(public, status, headers), (
                            public.name,
                            path,
                            method,
                            status,
                        )
                    else:
                        assert status in (404, 405), (public.name, path, method, status)
        finally:
            connection.close()


# -- DNS amplification ------------------------------------------------------------------


async def test_rate_limiting_caps_dns_amplification(make_config, db, report: Report):
    rate, burst = 50.0, 100
    config = make_config(
        dns={"rrl": {"enabled": True, "responses_per_second": rate, "burst": burst, "slip": 2}}
    )
    server = ProbeServer(config)
    await server.start()
    seconds = scale(3.0, 10.0)
    send_rate = scale(2000, 4000)
    # The largest answer the zone gives: A and AAAA with EDNS and DNSSEC OK.
    queries = [
        wire_query("ds.example.org", "ANY", use_edns=0, payload=4096, want_dnssec=True),
        wire_query("ds.example.org", "AAAA", use_edns=0, payload=4096, want_dnssec=True),
    ]
    try:
        assert server.listeners is not None
        host, port = server.listeners.dns["udp_ipv4"].getsockname()[:2]
        flood = await UdpFlood.open(f"{host}:{port}")
        sent, sent_bytes = await flood.send(lambda i: queries[i % 2], send_rate, seconds)
        assert server.dns is not None
        # Every query read, unless the kernel dropped some (a full socket buffer).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while server.dns.stats.queries < sent:
                    await asyncio.sleep(0.01)
        received = server.dns.stats.queries
        # Another prefix (here the other family) is answered as ever.
        probe = await RawUdp.open(server, "ipv6")
        assert dns.message.from_wire(await probe.exchange(wire_query("survey.example.org")))
        probe.close()
        flood.close()
        stats = server.dns.stats
        full_replies = stats.replies - stats.slipped
    finally:
        await server.stop()
    # Bytes sent back, from the query log (every reply's size is a row).
    ((reply_bytes, logged),) = db(
        "SELECT sum(size), count(*) FROM dns_queries WHERE family = 'ipv4'"
    )
    assert logged == received
    factor = reply_bytes / sent_bytes
    allowed = burst + rate * (seconds + 2)
    assert full_replies <= allowed, (full_replies, allowed)
    assert factor < 1.0
    report(
        "hostile: DNS amplification",
        f"UDP queries for the largest answer (ANY/AAAA, EDNS 4096, DO) from one source at"
        f" {send_rate}/s; RRL {rate:.0f}/s per /24, burst {burst}, slip 2",
        f"{seconds:.0f} s, {sent} queries ({sent_bytes} bytes), {received} read",
        f"{full_replies} full replies (limit allows {allowed:.0f}), {stats.slipped} truncated"
        f" slips, {stats.rate_limited} dropped; {reply_bytes} bytes back:"
        f" amplification {factor:.2f}x (below 1: the server sends less than it receives)",
        "nothing (every query logged, limited ones with rrl = drop/slip)",
    )


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
