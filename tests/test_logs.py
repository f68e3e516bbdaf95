"""Log lines: formats, level from the config or the command line, and no secrets."""

from __future__ import annotations

import base64
import json
import logging
import re
import signal
import sys

import aiohttp

from probe_server import cli
from probe_server.logs import JournalFormatter, JsonFormatter
from probe_server.testing import ServerProcess, write_config

from .certs import TestCA
from .conftest import EXAMPLE_ZONES


def record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("probe_server.web", level, __file__, 1, message, (), info)


def test_journal_lines_carry_the_syslog_priority_and_stay_one_line():
    formatter = JournalFormatter()
    assert formatter.format(record(logging.INFO, "event=ready a=1")) == (
        "<6>probe_server.web event=ready a=1"
    )
    assert formatter.format(record(logging.DEBUG, "x")).startswith("<7>")
    assert formatter.format(record(logging.WARNING, "x")).startswith("<4>")
    line = formatter.format(record(logging.ERROR, "event=failed", exc=True))
    assert line.startswith("<3>probe_server.web event=failed Traceback")
    assert "\n" not in line and "boom\\nsecond line" in line


def test_json_lines_are_one_object_each():
    line = JsonFormatter().format(record(logging.WARNING, "event=x", exc=True))
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "warning" and data["logger"] == "probe_server.web"
    assert data["message"] == "event=x" and "boom" in data["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])


def test_level_comes_from_the_config_unless_given_on_the_command_line(tmp_path, monkeypatch):
    seen = []

    async def fake_serve(config, on_ready=None):
        root = logging.getLogger()
        formats = [type(h.formatter).__name__ for h in root.handlers]
        seen.append((logging.getLevelName(root.level), "JournalFormatter" in formats))
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    path = tmp_path / "c.toml"
    # No DNS: the default zone files are not beside this config.
    path.write_text('[logging]\nlevel = "DEBUG"\nformat = "journal"\n[dns]\nenabled = false\n')
    try:
        assert cli.main(["serve", "--config", str(path)]) == 0
        assert cli.main(["--log-level", "ERROR", "serve", "--config", str(path)]) == 0
    finally:
        cli.setup_logging("INFO")
    assert seen == [("DEBUG", True), ("ERROR", True)]


async def test_a_whole_run_at_debug_logs_no_secret_and_no_key(tmp_path):
    """Start with TLS, serve, reload a bad key, stop: nothing secret on stderr."""
    ca = TestCA(tmp_path)
    cert, key = ca.issue("site", ["127.0.0.1", "::1"])
    sites = {
        name: {"listen": listen, "tls_cert": str(cert), "tls_key": str(key)}
        for name, listen in (("ipv4", "127.0.0.1:0"), ("ipv6", "[::1]:0"))
    }
    config = write_config(
        tmp_path / "probe.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": sites,
            "database": {"path": "probe.db"},
            "dns": {"zones": EXAMPLE_ZONES, "listen_ipv4": "127.0.0.1:0", "listen_ipv6": "[::1]:0"},
            "admin": {"enabled": True, "listen": "127.0.0.1:0"},
            "logging": {"level": "DEBUG", "format": "journal"},
        },
    )
    server = ServerProcess(config, tmp_path, keep_notify=True)
    await server.start()
    try:
        connector = aiohttp.TCPConnector(ssl=ca.client_context())
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(server.url("ipv4", "https") + "/") as response:
                assert response.status == 200
                page = await response.text()
            token = re.search(r'name="token" value="([a-z2-7]{32})"', page)
            assert token
            async with http.post(
                server.url("ipv4", "https") + "/submit",
                data={"token": token.group(1), "red": "1", "blue": "1"},
            ) as response:
                await response.read()
            async with http.get(f"http://{server.endpoints['admin']}/metrics") as response:
                assert response.status == 200
        # A reload that fails on the key: its error is logged, the key is not.
        key_text = key.read_text()
        key.write_text(key_text.replace("\n", "\n\n", 2)[:-40] + "\n-----END PRIVATE KEY-----\n")
        server.kill(signal.SIGHUP)
        assert "tls_ipv4=failed" in await server.notification(lambda m: m.startswith("READY=1"))
        server.kill(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.close()
    stderr = server.stderr.decode()
    lines = stderr.splitlines()
    assert any(line.startswith("<7>") for line in lines)  # DEBUG lines are there
    assert any("event=reload_failed part=tls_ipv4" in line for line in lines)
    assert all(re.match(r"<[0-7]>probe_server", line) for line in lines), stderr[:2000]
    secret = (tmp_path / "probe.secret").read_text().strip()
    assert secret and secret not in stderr
    assert base64.b64encode(bytes.fromhex(secret)).decode()[:16] not in stderr
    for pem_line in key_text.splitlines():
        if not pem_line.startswith("-----"):
            assert pem_line not in stderr
    assert "PRIVATE KEY" not in stderr
