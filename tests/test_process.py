"""The real ``probe-server`` process: kill -9, SIGTERM, restart on the same database."""

from __future__ import annotations

import asyncio
import functools
import re
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from probe_server.testing import ServerProcess, require_tool, write_config

from .conftest import EXAMPLE_ZONES


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "probe.toml",
        {
            "server": {"secret_file": "probe.secret", "shutdown_timeout": 5},
            "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
            "database": {"path": "probe.db"},
            "dns": {
                "zones": EXAMPLE_ZONES,
                "listen_ipv4": "127.0.0.1:0",
                "listen_ipv6": "[::1]:0",
            },
        },
    )


async def blue_url(http: aiohttp.ClientSession, server: ServerProcess) -> str:
    async with http.get(server.url("ipv4") + "/") as response:
        page = await response.text()
    match = re.search(r'<img src="(http://\[::1\][^"]+/blue/[^"]+)"', page)
    assert match, page
    return match.group(1).replace("&amp;", "&")


async def burst(url: str, total: int, stop_after: int, on_threshold) -> set[int]:
    """Fetch ``url&n=i`` for every i concurrently; call on_threshold after
    ``stop_after`` 200s. Returns the i that got a 200 (an acknowledged probe)."""
    acknowledged: set[int] = set()
    fired = False

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal fired
        try:
            async with session.get(f"{url}&n={i}") as response:
                await response.read()
                if response.status == 200:
                    acknowledged.add(i)
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            return
        if len(acknowledged) >= stop_after and not fired:
            fired = True
            on_threshold()

    connector = aiohttp.TCPConnector(limit=64, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(total)))
    return acknowledged


def stored_numbers(db_path: Path) -> set[int]:
    with sqlite3.connect(db_path) as conn:
        paths = [row[0] for row in conn.execute("SELECT path FROM requests WHERE kind = 'blue'")]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return {int(m.group(1)) for p in paths if (m := re.search(r"&n=(\d+)", p))}


async def test_kill_9_loses_no_acknowledged_probe(tmp_path, config_path):
    for round_number in range(3):
        server = ServerProcess(config_path, tmp_path)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                url = await blue_url(http, server) + f"&round={round_number}"
            acknowledged = await burst(
                url, 3000, 400, functools.partial(server.kill, signal.SIGKILL)
            )
            assert await server.wait() == -signal.SIGKILL
        finally:
            await server.close()
        assert len(acknowledged) >= 400
        with sqlite3.connect(tmp_path / "probe.db") as conn:
            rows = conn.execute(
                "SELECT path FROM requests WHERE path LIKE ?", (f"%round={round_number}&%",)
            ).fetchall()
        stored = {int(re.search(r"&n=(\d+)", p).group(1)) for (p,) in rows}
        missing = acknowledged - stored
        assert not missing, f"round {round_number}: {len(missing)} acknowledged probes not stored"
        assert stored_numbers(tmp_path / "probe.db")  # integrity_check passes


async def test_sigterm_drains_flushes_and_exits_0(tmp_path, config_path):
    server = ServerProcess(config_path, tmp_path)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = await blue_url(http, server)
        acknowledged = await burst(url, 2000, 300, functools.partial(server.kill, signal.SIGTERM))
        assert await server.wait() == 0
    finally:
        await server.close()
    assert b"event=stopped" in server.stderr
    assert acknowledged <= stored_numbers(tmp_path / "probe.db")
    assert len(acknowledged) >= 300


async def test_restart_on_the_same_database_keeps_sessions(tmp_path, config_path):
    tokens = []
    for _ in range(2):
        server = ServerProcess(config_path, tmp_path)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                url = await blue_url(http, server)
                tokens.append(url.split("/blue/")[1].split("/")[0])
                async with http.get(url) as response:
                    assert response.status == 200
            server.kill(signal.SIGTERM)
            assert await server.wait() == 0
        finally:
            await server.close()
    with sqlite3.connect(tmp_path / "probe.db") as conn:
        rows = conn.execute("SELECT token, ipv6 FROM session_summary ORDER BY id").fetchall()
    # The secret persisted, so the first session's token still verifies.
    assert rows == [(tokens[0], "::1"), (tokens[1], "::1")]


async def test_port_in_use_is_one_clear_line(tmp_path, config_path):
    first = ServerProcess(config_path, tmp_path)
    await first.start()
    try:
        busy = first.endpoints["http_ipv4"]
        text = config_path.read_text().replace('"127.0.0.1:0"', f'"{busy}"')
        second_config = tmp_path / "second.toml"
        second_config.write_text(text.replace('path = "probe.db"', 'path = "second.db"'))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "probe_server",
            "serve",
            "--config",
            str(second_config),
            cwd=tmp_path,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        assert f"cannot listen on {busy}" in err.decode()
        assert not (tmp_path / "second.db").exists()
    finally:
        first.kill(signal.SIGTERM)
        await first.wait()
        await first.close()


async def test_dns_in_the_process_on_every_socket_and_logged_at_sigterm(tmp_path, config_path):
    import dns.asyncquery
    import dns.message

    server = ServerProcess(config_path, tmp_path)
    await server.start()
    try:
        for key in ("dns_udp_ipv4", "dns_tcp_ipv4", "dns_udp_ipv6", "dns_tcp_ipv6"):
            host, _, port = server.endpoints[key].rpartition(":")
            message = dns.message.make_query(f"{key}.v6.example.org", "AAAA")
            ask = dns.asyncquery.udp if key.startswith("dns_udp") else dns.asyncquery.tcp
            reply = await ask(message, host.strip("[]"), port=int(port), timeout=5)
            assert [rdata.to_text() for rdata in reply.answer[0]] == ["2001:db8::10"]
        # UDP and TCP share a port per family.
        assert server.endpoints["dns_udp_ipv4"] == server.endpoints["dns_tcp_ipv4"]
        assert server.endpoints["dns_udp_ipv6"] == server.endpoints["dns_tcp_ipv6"]
        server.kill(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.close()
    with sqlite3.connect(tmp_path / "probe.db") as conn:
        rows = conn.execute(
            "SELECT qname, family, transport, rcode FROM dns_queries ORDER BY id"
        ).fetchall()
    assert rows == [
        ("dns_udp_ipv4.v6.example.org.", "ipv4", "udp", "NOERROR"),
        ("dns_tcp_ipv4.v6.example.org.", "ipv4", "tcp", "NOERROR"),
        ("dns_udp_ipv6.v6.example.org.", "ipv6", "udp", "NOERROR"),
        ("dns_tcp_ipv6.v6.example.org.", "ipv6", "tcp", "NOERROR"),
    ]


async def test_banner_url_and_sqlite3_line_work_after_a_visit(tmp_path):
    """What `make run` prints, from the real process: open the URL, run the sqlite3 line."""
    sqlite3_cli = require_tool("sqlite3")
    config = write_config(
        tmp_path / "probe.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
            # A space in the name: the printed command must quote it.
            "database": {"path": "my probe.db"},
            "dns": {"zones": EXAMPLE_ZONES, "listen_ipv4": "127.0.0.1:0", "listen_ipv6": "[::1]:0"},
        },
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "probe_server",
        "--log-level",
        "WARNING",
        "serve",
        "--config",
        str(config),
        "--banner",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = []
        async with asyncio.timeout(30):
            while not lines or not lines[-1].lstrip().startswith("sqlite3 "):
                line = await proc.stdout.readline()
                assert line, f"exited before the banner: {lines}"
                lines.append(line.decode().rstrip("\n"))
        (survey,) = [line.split(":  ", 1)[1] for line in lines if "Open the survey" in line]
        command = lines[-1].strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", survey), survey
        async with aiohttp.ClientSession() as http:
            async with http.get(survey) as response:
                assert response.status == 200
                page = await response.text()
            token = re.search(r'name="token" value="([a-z2-7]{32})"', page).group(1)
            blue = re.findall(r'<img src="(http://\[::1\][^"]+/blue/[^"]+)"', page)
            for url in blue:
                async with http.get(url.replace("&amp;", "&")) as response:
                    assert response.status == 200
        # The line as printed, through the shell a reader pastes it into.
        assert command.startswith("sqlite3 ")
        shown = await asyncio.create_subprocess_shell(
            command.replace("sqlite3", sqlite3_cli, 1),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(shown.communicate(), 30)
        assert shown.returncode == 0, err.decode()
        header, row = out.decode().splitlines()[0], out.decode().splitlines()[2]
        assert header.split()[:5] == ["id", "token", "created", "ipv4", "ipv6"]
        assert row.split()[1:2] == [token]
        assert row.split()[3:5] == ["127.0.0.1", "::1"]
        # red_fetched, blue_fetched: no red ball was fetched, every blue one.
        assert row.split()[5:7] == ["0", str(len(blue))]
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
