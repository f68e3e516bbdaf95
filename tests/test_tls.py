"""TLS on both sites, certificate reload on SIGHUP, ACME HTTP-01 and the port-80 redirect."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from probe_server.images import BLUE_BALL
from probe_server.server import ProbeServer, StartupError
from probe_server.testing import ServerProcess, write_config

from .certs import TestCA, fingerprint
from .conftest import EXAMPLE_ZONES, MakeConfig
from .test_web import Page

LOOPBACK = ["127.0.0.1", "::1"]
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


async def open_tls(
    address: str, port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A TLS connection and the SHA-256 of the certificate the server showed."""
    reader, writer = await asyncio.open_connection(address, port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, fingerprint(der)


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One keep-alive HTTP/1.1 GET on an open connection; returns the status."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def tls_sites(ca: TestCA, *, plain: bool = False) -> dict[str, dict[str, str]]:
    cert, key = ca.issue("site", LOOPBACK)
    sites = {}
    for name, listen in (("ipv4", "127.0.0.1:0"), ("ipv6", "[::1]:0")):
        sites[name] = {"listen": listen, "tls_cert": str(cert), "tls_key": str(key)}
        if plain:
            sites[name]["http_listen"] = listen
    return sites


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
async def tls_server(
    make_config: MakeConfig, ca: TestCA, tmp_path: Path
) -> AsyncIterator[ProbeServer]:
    webroot = tmp_path / "acme"
    (webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    sites = {"acme_webroot": str(webroot), **tls_sites(ca, plain=True)}
    server = ProbeServer(make_config(sites=sites))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def address_port(server: ProbeServer, site: str, plain: bool = False) -> tuple[str, int]:
    assert server.listeners is not None
    sockets = server.listeners.plain if plain else server.listeners.http
    host, port = sockets[site].getsockname()[:2]
    return host, port


async def test_both_sites_serve_https(tls_server, ca, db):
    assert tls_server.base_urls["ipv4"].startswith("https://127.0.0.1:")
    assert tls_server.base_urls["ipv6"].startswith("https://[::1]:")
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(tls_server.base_urls["ipv4"] + "/") as response:
            assert response.status == 200
            page = Page(await response.text())
        assert all(url.startswith("https://[::1]:") for url in page.blue)
        async with http.get(page.blue[0]) as response:
            assert response.status == 200
            assert await response.read() == BLUE_BALL
    (row,) = db("SELECT ipv4, ipv6 FROM session_summary")
    assert tuple(row) == ("127.0.0.1", "::1")


async def test_certificate_replaced_in_process_keeps_open_connections(tls_server, ca):
    context = ca.client_context()
    host, port = address_port(tls_server, "ipv4")
    reader, writer, before = await open_tls(host, port, context)
    assert await http_get(reader, writer, "/") == 200

    old = tls_server.certificates["ipv4"]
    ca.issue("site", LOOPBACK)  # new key and certificate, same files
    assert await tls_server.reload() == {"tls_ipv4": True, "tls_ipv6": True, "zones": True}
    assert tls_server.certificates["ipv4"] is old  # same listening context, new certificate

    _, new_writer, after = await open_tls(host, port, context)
    new_writer.close()
    assert after != before
    # The connection opened before the reload goes on, with its handshake's certificate.
    assert await http_get(reader, writer, "/") == 200
    writer.close()


async def test_bad_new_certificate_keeps_the_old_one_and_logs(tls_server, ca, tmp_path, caplog):
    context = ca.client_context()
    host, port = address_port(tls_server, "ipv6")
    _, writer, before = await open_tls(host, port, context)
    writer.close()
    cert_path = tmp_path / "site.pem"
    key_path = tmp_path / "site.key"
    # A key that does not belong to the certificate (a half-finished renewal).
    other_cert, other_key = ca.issue("other", LOOPBACK)
    key_path.write_bytes(other_key.read_bytes())
    with caplog.at_level(logging.ERROR):
        results = await tls_server.reload()
    assert results["tls_ipv4"] is False and results["tls_ipv6"] is False
    assert "KEY_VALUES_MISMATCH" in caplog.text and "old certificate kept" in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    _, writer, after = await open_tls(host, port, context)
    writer.close()
    assert after == before
    # Not PEM at all: the same.
    cert_path.write_text("not a certificate\n")
    assert (await tls_server.reload())["tls_ipv4"] is False
    _, writer, after = await open_tls(host, port, context)
    writer.close()
    assert after == before
    assert other_cert.exists()


async def test_acme_http01_on_both_sites_and_both_schemes(tls_server, ca, tmp_path, db):
    challenge = tmp_path / "acme" / ".well-known" / "acme-challenge" / TOKEN
    challenge.write_text(f"{TOKEN}.thumbprint")
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with aiohttp.ClientSession(connector=connector) as http:
        for site in ("ipv4", "ipv6"):
            for plain in (True, False):
                host, port = address_port(tls_server, site, plain)
                scheme = "http" if plain else "https"
                where = f"[{host}]" if ":" in host else host
                url = f"{scheme}://{where}:{port}/.well-known/acme-challenge/{TOKEN}"
                async with http.get(url, allow_redirects=False) as response:
                    assert response.status == 200, (site, plain)
                    assert await response.text() == f"{TOKEN}.thumbprint"
    rows = db("SELECT site, kind, status FROM requests WHERE kind = 'acme'")
    assert len(rows) == 4 and {r["site"] for r in rows} == {"ipv4", "ipv6"}


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge",
        "/.well-known/acme-challenge/..%2F..%2F..%2Fetc%2Fpasswd",
        "/.well-known/acme-challenge/%2e%2e",
        "/.well-known/acme-challenge/short",
        "/.well-known/acme-challenge/" + "A" * 40 + "%00",
        "/.well-known/acme-challenge/" + "A" * 40 + "/x",
        "/.well-known/acme-challenge/linkedlinkedlinkedlinked",
        "/.well-known/acme-challenge/missingmissingmissingmissing",
    ],
)
async def test_acme_serves_only_token_files(tls_server, tmp_path, path):
    directory = tmp_path / "acme" / ".well-known" / "acme-challenge"
    secret = tmp_path / "outside.txt"
    secret.write_text("not for the public")
    (directory / "linkedlinkedlinkedlinked").symlink_to(secret)
    host, port = address_port(tls_server, "ipv4", plain=True)
    async with aiohttp.ClientSession() as http:
        url = f"http://{host}:{port}{path}"
        async with http.get(url, allow_redirects=False) as response:
            body = await response.read()
    assert b"not for the public" not in body
    assert response.status in (404, 308), response.status
    if response.status == 308:  # not an ACME path at all: sent to HTTPS
        assert response.headers["Location"].startswith("https://")


async def test_acme_without_webroot_is_404(make_config, http):
    server = ProbeServer(make_config())
    await server.start()
    try:
        url = f"{server.base_urls['ipv4']}/.well-known/acme-challenge/{TOKEN}"
        async with http.get(url) as response:
            assert response.status == 404
    finally:
        await server.stop()


async def test_plain_http_redirects_to_https_and_is_logged(tls_server, db):
    for site in ("ipv4", "ipv6"):
        host, port = address_port(tls_server, site, plain=True)
        where = f"[{host}]" if ":" in host else host
        async with aiohttp.ClientSession() as http:
            url = f"http://{where}:{port}/blue/x/1.png?ip=1"
            async with http.get(url, allow_redirects=False) as response:
                assert response.status == 308
                expected = tls_server.base_urls[site] + "/blue/x/1.png?ip=1"
                assert response.headers["Location"] == expected
    rows = db("SELECT site, kind, status FROM requests ORDER BY id")
    assert [tuple(r) for r in rows] == [("ipv4", "redirect", 308), ("ipv6", "redirect", 308)]


async def test_missing_certificate_stops_startup(make_config, tmp_path):
    sites = {"ipv4": {"listen": "127.0.0.1:0", "tls_cert": "nope.pem", "tls_key": "nope.key"}}
    server = ProbeServer(make_config(sites=sites))
    with pytest.raises(StartupError, match=r"^sites\.ipv4\.tls_cert: .*nope\.pem: no such file"):
        await server.start()
    assert server.listeners is None


async def test_sighup_serves_a_new_certificate_without_a_restart(tmp_path, ca):
    """The real process: SIGHUP, then new handshakes get the new certificate."""
    config = write_config(
        tmp_path / "probe.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": tls_sites(ca),
            "database": {"path": "probe.db"},
            "dns": {"zones": EXAMPLE_ZONES, "listen_ipv4": "127.0.0.1:0", "listen_ipv6": "[::1]:0"},
        },
    )
    server = ServerProcess(config, tmp_path, keep_notify=True)
    await server.start()
    try:
        context = ca.client_context()
        endpoints = {site: server.endpoints[f"http_{site}"] for site in ("ipv4", "ipv6")}
        addresses = {
            site: (text.rpartition(":")[0].strip("[]"), int(text.rpartition(":")[2]))
            for site, text in endpoints.items()
        }
        kept = {site: await open_tls(*addresses[site], context) for site in addresses}
        for reader, writer, _ in kept.values():
            assert await http_get(reader, writer, "/") in (200, 421)

        ca.issue("site", LOOPBACK)
        server.kill(signal.SIGHUP)
        message = await server.notification(lambda m: m.startswith("READY=1"))
        assert "tls_ipv4=ok tls_ipv6=ok zones=ok" in message

        for site, (reader, writer, before) in kept.items():
            _, fresh, after = await open_tls(*addresses[site], context)
            fresh.close()
            assert after != before, site
            # Same process, same sockets: the old connection still answers.
            assert await http_get(reader, writer, "/") in (200, 421)
            writer.close()

        # A broken file on the next reload: the process goes on with the last good one.
        (tmp_path / "site.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
        server.kill(signal.SIGHUP)
        message = await server.notification(lambda m: m.startswith("READY=1"))
        assert "tls_ipv4=failed" in message
        _, fresh, still = await open_tls(*addresses["ipv4"], context)
        fresh.close()
        assert still == after
        server.kill(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.close()
    assert b"event=reloaded" in server.stderr
    assert b"garbage" not in server.stderr
