"""The admin listener: metrics content, health, loopback only, nothing on public sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from probe_server.config import ConfigError, load_config
from probe_server.server import ProbeServer, Watchdog, endpoint_text
from probe_server.store import NotStored

from .conftest import MakeConfig
from .dns_client import RawUdp, query, wire_query
from .test_web import load_survey

ADMIN_PATHS = ["/metrics", "/healthz", "/stats", "/admin/metrics"]


@pytest.fixture
async def admin_server(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    config = make_config(
        # A probe whose row can't be committed is answered 503 after this long.
        server={"commit_timeout": 0.3},
        admin={
            "enabled": True,
            "listen": "127.0.0.1:0",
            "metrics_path": "/admin/metrics",
            "health_path": "/healthz",
        },
        dns={
            "rrl": {"enabled": True, "responses_per_second": 0.001, "burst": 2, "slip": 2},
        },
    )
    server = ProbeServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def admin_url(server: ProbeServer, path: str) -> str:
    assert server.listeners is not None and server.listeners.admin is not None
    return f"http://{endpoint_text(server.listeners.admin)}{path}"


async def scrape(http: aiohttp.ClientSession, server: ProbeServer) -> dict[tuple, float]:
    """Every sample as {(name, sorted label items): value}."""
    async with http.get(admin_url(server, "/admin/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_requests_sessions_dns_commits_and_rrl(admin_server, http):
    server = admin_server
    page = await load_survey(http, server)
    for url in page.red + page.blue:
        async with http.get(url) as response:
            assert response.status == 200
    async with http.get(server.base_urls["ipv6"] + "/") as response:
        assert response.status == 421
    async with http.get(server.base_urls["ipv4"] + "/nothing-here") as response:
        assert response.status == 404
    await query(server, "survey.example.org", "A")  # UDP: 1 of the burst of 2
    await query(server, "nope.example.org", "A", transport="tcp")  # TCP: never limited
    udp = await RawUdp.open(server)
    assert await udp.exchange(wire_query("v6.example.org", "AAAA", ident=1))  # 2 of 2
    # Over the limit: the 1st limited reply is dropped, the 2nd slips out
    # truncated; receiving it means both were handled.
    udp.send(wire_query("v6.example.org", "AAAA", ident=2))
    udp.send(wire_query("v6.example.org", "AAAA", ident=3))
    assert (await udp.receive())[:2] == b"\x00\x03"
    udp.close()
    samples = await scrape(http, server)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("probe_server_http_requests_total", site="ipv4", kind="survey", code="200") == 1
    assert value("probe_server_http_requests_total", site="ipv4", kind="red", code="200") == len(
        page.red
    )
    assert value("probe_server_http_requests_total", site="ipv6", kind="blue", code="200") == len(
        page.blue
    )
    assert (
        value("probe_server_http_requests_total", site="ipv6", kind="wrong-site", code="421") == 1
    )
    assert value("probe_server_http_requests_total", site="ipv4", kind="unknown", code="404") == 1
    assert value("probe_server_sessions_total") == 1
    assert value("probe_server_dns_responses_total", rcode="NXDOMAIN") == 1
    assert value("probe_server_dns_responses_total", rcode="NOERROR") == 3
    assert value("probe_server_dns_rrl_total", action="drop") == 1
    assert value("probe_server_dns_rrl_total", action="slip") == 1
    assert value("probe_server_dns_queries_total") == 5
    # Every HTTP request above waited for its commit.
    assert value("probe_server_db_commit_seconds_count") >= 1
    assert value("probe_server_db_commit_seconds_bucket", le="+Inf") == value(
        "probe_server_db_commit_seconds_count"
    )
    assert value("probe_server_db_commits_total") == value("probe_server_db_commit_seconds_count")
    assert value("probe_server_db_rows_total") >= 2 + len(page.red) + len(page.blue)
    assert value("probe_server_db_queue_rows") >= 0
    assert value("probe_server_db_healthy") == 1
    assert value("probe_server_db_commit_errors_total") == 0
    assert value("probe_server_dns_errors_total") == 0
    assert ("probe_server_tls_certificate_expiry_seconds", ()) not in samples  # no TLS here
    assert value("process_open_fds") > 0


async def test_metrics_count_reloads_and_certificate_expiry(make_config, tmp_path, http):
    from .certs import TestCA

    cert, key = TestCA(tmp_path).issue("site", ["127.0.0.1"], days=30)
    config = make_config(
        admin={"enabled": True, "listen": "[::1]:0"},
        sites={"ipv4": {"listen": "127.0.0.1:0", "tls_cert": str(cert), "tls_key": str(key)}},
    )
    server = ProbeServer(config)
    await server.start()
    try:
        await server.reload()
        key.write_text("broken\n")
        await server.reload()
        async with http.get(admin_url(server, "/metrics")) as response:
            text = await response.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
    finally:
        await server.stop()
    reloads = "probe_server_reloads_total"
    assert samples[(reloads, (("part", "tls_ipv4"), ("result", "ok")))] == 1
    assert samples[(reloads, (("part", "tls_ipv4"), ("result", "failed")))] == 1
    assert samples[(reloads, (("part", "zones"), ("result", "ok")))] == 2
    expiry = samples[("probe_server_tls_certificate_expiry_seconds", (("site", "ipv4"),))]
    assert expiry == server.certificates["ipv4"].info.not_after.timestamp()


async def test_health_follows_the_database_writer(admin_server, http):
    async with http.get(admin_url(admin_server, "/healthz")) as response:
        assert (response.status, await response.text()) == (200, "ok\n")
    writer = admin_server.writer
    assert writer is not None
    # A read-only connection makes commits fail, as a full disk would.
    await writer._conn.execute("PRAGMA query_only = 1")
    async with http.get(admin_server.base_urls["ipv4"] + "/") as response:
        assert response.status == 503
    async with http.get(admin_url(admin_server, "/healthz")) as response:
        assert response.status == 503
        assert "commits are failing" in await response.text()
    # The metrics say so too: failed commits counted, the page's rows held
    # in the queue, its request answered 503.
    failing = await scrape(http, admin_server)
    assert failing[("probe_server_db_healthy", ())] == 0
    assert failing[("probe_server_db_commit_errors_total", ())] >= 1
    assert failing[("probe_server_db_queue_rows", ())] >= 1
    survey = (("code", "503"), ("kind", "survey"), ("site", "ipv4"))
    assert failing[("probe_server_http_requests_total", survey)] == 1
    await writer._conn.execute("PRAGMA query_only = 0")
    while not writer.healthy:  # the writer retries with back-off; the held rows go in
        with contextlib.suppress(NotStored):
            await writer.write([])
    async with http.get(admin_url(admin_server, "/healthz")) as response:
        assert response.status == 200
    recovered = await scrape(http, admin_server)
    assert recovered[("probe_server_db_healthy", ())] == 1
    assert recovered[("probe_server_db_queue_rows", ())] == 0
    errors = recovered[("probe_server_db_commit_errors_total", ())]
    assert errors >= failing[("probe_server_db_commit_errors_total", ())]


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_paths_are_404_on_both_public_sites(admin_server, http, path):
    for site in ("ipv4", "ipv6"):
        async with http.get(admin_server.base_urls[site] + path) as response:
            assert response.status == 404, (site, path)
            body = await response.text()
        assert "probe_server_" not in body and body.strip() != "ok"
    # ...while the admin listener has them.
    if path in ("/admin/metrics", "/healthz"):
        async with http.get(admin_url(admin_server, path)) as response:
            assert response.status == 200


async def test_admin_is_off_by_default(server):
    assert server.listeners.admin is None
    assert "admin=" not in server.listeners.describe()


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9180", "192.0.2.1:9180", "[::]:9180", "[2001:db8::1]:9180"]
)
def test_admin_listener_refuses_public_addresses(tmp_path, listen):
    path = tmp_path / "c.toml"
    path.write_text(f'[admin]\nenabled = true\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=r"admin\.listen: must be a loopback address"):
        load_config(path)


async def test_watchdog_pings_only_while_healthy(tmp_path, monkeypatch):
    import socket

    path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(path))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    state = {"ok": True}
    watchdog = Watchdog(0.01, lambda: (state["ok"], "test"))
    task = asyncio.create_task(watchdog.run())
    try:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            assert await asyncio.wait_for(loop.sock_recv(notify, 100), 5) == b"WATCHDOG=1"
        state["ok"] = False
        tick = watchdog.tick
        await tick.wait()  # the tick that saw the change
        sent = watchdog.sent
        for _ in range(3):
            tick = watchdog.tick
            await tick.wait()
        assert watchdog.sent == sent
    finally:
        task.cancel()
        notify.close()
