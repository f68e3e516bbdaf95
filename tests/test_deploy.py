"""The shipped deployment: the systemd unit, the scripts, certbot's hooks, backups."""

from __future__ import annotations

import asyncio
import grp
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from probe_server.testing import ServerProcess, require_tool, write_config

from .certs import TestCA
from .conftest import EXAMPLE_ZONES
from .test_tls import http_get, open_tls

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "probe-server.service"
SCRIPTS = [DEPLOY / "install.sh", DEPLOY / "certbot-deploy-hook", DEPLOY / "certbot-dns-hook"]


def venv_probe_server() -> Path:
    path = Path(sys.executable).parent / "probe-server"
    assert path.exists(), path
    return path


def test_systemd_accepts_the_unit(tmp_path):
    """systemd-analyze verify, on a copy whose ExecStart is this virtualenv's."""
    tool = require_tool("systemd-analyze")
    shipped = UNIT.read_text().splitlines()
    copy = [
        line.replace("/opt/probe-server/venv/bin/probe-server", str(venv_probe_server()))
        for line in shipped
    ]
    changed = [(a, b) for a, b in zip(shipped, copy, strict=True) if a != b]
    assert [a.split("=")[0] for a, _ in changed] == ["ExecStart"]
    unit = tmp_path / "probe-server.service"
    unit.write_text("\n".join(copy) + "\n")
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_rates_the_unit_2_or_lower():
    tool = require_tool("systemd-analyze")
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for probe-server\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_keeps_what_the_deployment_depends_on():
    text = UNIT.read_text()
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if re.match(r"^[A-Z]\w+=", line):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    settings = {key: found[-1] for key, found in values.items()}
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["User"] == "probe-server" and "DynamicUser" not in settings
    assert settings["StateDirectory"] == "probe-server"
    assert "WatchdogSec" in settings
    # In a user namespace CAP_NET_BIND_SERVICE would not bind ports 53/80/443.
    assert "PrivateUsers" not in settings
    # The hardening the issue names, each one: without any one of them the
    # unit still rates 1.9 or lower, so the security score alone misses it.
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
    }.items():
        assert settings.get(key) == value, key
    assert sorted(settings["RestrictAddressFamilies"].split()) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in values["SystemCallFilter"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    tool = require_tool("shellcheck")
    result = subprocess.run(
        [tool, "--shell=sh", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout
    assert os.access(script, os.X_OK)


def test_install_script_ships_files_that_exist():
    text = (DEPLOY / "install.sh").read_text()
    named = set(re.findall(r'"\$src/(deploy/[^"]+)"', text))
    assert len(named) >= 6
    for path in named:
        assert (ROOT / path).is_file(), path
    # It installs the unit whose ExecStart it creates.
    assert "/opt/probe-server" in text and "venv/bin/probe-server" in UNIT.read_text()


async def run(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_certbot_deploy_hook_installs_and_reloads_the_new_certificate(tmp_path):
    """The renewal path end to end: certbot's files, the hook, SIGHUP, new handshakes."""
    ca = TestCA(tmp_path)
    tls = tmp_path / "tls"
    tls.mkdir()
    cert, key = ca.issue("first", ["127.0.0.1"])
    shutil.copy(cert, tls / "fullchain.pem")
    shutil.copy(key, tls / "privkey.pem")
    config = write_config(
        tmp_path / "probe.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": {
                "ipv4": {
                    "listen": "127.0.0.1:0",
                    "tls_cert": "tls/fullchain.pem",
                    "tls_key": "tls/privkey.pem",
                },
                "ipv6": {"listen": "[::1]:0"},
            },
            "database": {"path": "probe.db"},
            "dns": {"enabled": False, "zones": []},
        },
    )
    server = ServerProcess(config, tmp_path, keep_notify=True)
    await server.start()
    try:
        host, _, port = server.endpoints["http_ipv4"].rpartition(":")
        reader, writer, before = await open_tls(host, int(port), ca.client_context())
        # What certbot leaves in /etc/letsencrypt/live/<name>/ after a renewal.
        lineage = tmp_path / "live" / "v6study.example.net"
        lineage.mkdir(parents=True)
        cert, key = ca.issue("renewed", ["127.0.0.1"])
        shutil.copy(cert, lineage / "fullchain.pem")
        shutil.copy(key, lineage / "privkey.pem")
        code, out = await run(
            str(DEPLOY / "certbot-deploy-hook"),
            env={
                "RENEWED_LINEAGE": str(lineage),
                "PROBE_SERVER_TLS_DIR": str(tls),
                "PROBE_SERVER_GROUP": grp.getgrgid(os.getgid()).gr_name,
                "PROBE_SERVER_RELOAD": f"kill -HUP {server.pid}",
            },
        )
        assert code == 0, out
        assert "tls_ipv4=ok" in await server.notification(lambda m: m.startswith("READY=1"))
        assert (tls / "privkey.pem").stat().st_mode & 0o777 == 0o640
        assert not list(tls.glob("*.new"))
        _, fresh, after = await open_tls(host, int(port), ca.client_context())
        fresh.close()
        assert after != before
        assert await http_get(reader, writer, "/") == 200  # the old connection goes on
        writer.close()
        server.kill(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.close()


async def test_certbot_dns_hook_publishes_and_removes_the_challenge(tmp_path):
    """DNS-01 end to end: the hook writes the record, reloads, waits for our answer."""
    require_tool("dig")
    challenges = tmp_path / "acme" / "dns-01.zone"
    challenges.parent.mkdir()
    data = {
        "server": {"secret_file": "probe.secret"},
        "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
        "database": {"path": "probe.db"},
        "dns": {
            "zones": EXAMPLE_ZONES,
            "listen_ipv4": "127.0.0.1:0",
            "listen_ipv6": "[::1]:0",
            "acme_challenges": "acme/dns-01.zone",
        },
    }
    server = ServerProcess(write_config(tmp_path / "probe.toml", data), tmp_path, keep_notify=True)
    await server.start()
    # The hook reads the DNS address from the config: give it the bound port.
    # It asks the IPv6 listener, which also answers for the IPv6-only child.
    host, _, port = server.endpoints["dns_udp_ipv6"].rpartition(":")
    host = host.strip("[]")
    data["dns"]["listen_ipv6"] = f"[::1]:{port}"
    hook_config = write_config(tmp_path / "hook.toml", data)
    env = {
        "PROBE_SERVER_CONFIG": str(hook_config),
        "PROBE_SERVER_PYTHON": sys.executable,
        "PROBE_SERVER_RELOAD": f"kill -HUP {server.pid}",
    }

    async def txt(name: str) -> list[str]:
        reply = await dns.asyncquery.udp(
            dns.message.make_query(name, "TXT"), host, port=int(port), timeout=5
        )
        return sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)

    try:
        for domain, value in (
            ("v6.example.org", "token-one"),
            ("*.v6.example.org", "token-two"),
            ("*.ds.v6ns.example.org", "token-child"),
        ):
            code, out = await run(
                str(DEPLOY / "certbot-dns-hook"),
                "auth",
                env={**env, "CERTBOT_DOMAIN": domain, "CERTBOT_VALIDATION": value},
            )
            assert code == 0, out
        # Both values at once: the certificate for the name and its wildcard.
        assert await txt("_acme-challenge.v6.example.org") == ['"token-one"', '"token-two"']
        assert await txt("_acme-challenge.ds.v6ns.example.org") == ['"token-child"']
        code, out = await run(
            str(DEPLOY / "certbot-dns-hook"),
            "cleanup",
            env={**env, "CERTBOT_DOMAIN": "v6.example.org", "CERTBOT_VALIDATION": "token-one"},
        )
        assert code == 0, out
        # Each SIGHUP ends in a READY=1; the last one follows the cleanup.
        for _ in range(4):
            await server.notification(lambda m: m.startswith("READY=1"))
        assert await txt("_acme-challenge.v6.example.org") == ['"token-two"']
        assert challenges.read_text().count("IN TXT") == 2
        server.kill(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.close()


def test_backup_of_a_running_database(tmp_path):
    """The documented backup lines work while another connection writes (WAL)."""
    tool = require_tool("sqlite3")
    from probe_server.store import open_sync

    live = tmp_path / "probe.db"
    writer = open_sync(live)
    writer.execute("BEGIN IMMEDIATE")
    writer.executemany(
        "INSERT INTO answers (session_token, t, addr, red_reported, blue_reported, red_correct)"
        " VALUES (?,?,?,?,?,?)",
        [(f"s{i}", float(i), "192.0.2.1", 1, 1, 1) for i in range(1000)],
    )
    writer.execute("COMMIT")
    # A transaction still open on the live database while the backup runs.
    writer.execute("BEGIN IMMEDIATE")
    writer.execute(
        "INSERT INTO answers (session_token, t, addr, red_reported, blue_reported, red_correct)"
        " VALUES ('uncommitted', 0, '192.0.2.1', 1, 1, 1)"
    )
    backup = tmp_path / "backup.db"
    vacuumed = tmp_path / "vacuumed.db"
    for command in (f".backup '{backup}'", f"VACUUM INTO '{vacuumed}'"):
        result = subprocess.run(
            [tool, str(live), command], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
    writer.execute("ROLLBACK")
    writer.close()
    for copy in (backup, vacuumed):
        with sqlite3.connect(copy) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM answers").fetchone()[0] == 1000


def deploy_doc_sections() -> dict[str, str]:
    """docs/deploy.md's ## sections, by heading."""
    sections: dict[str, str] = {}
    heading = ""
    for line in (ROOT / "docs" / "deploy.md").read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:]
            sections[heading] = ""
        elif heading:
            sections[heading] += line + "\n"
    return sections


def section(sections: dict[str, str], start: str) -> str:
    (found,) = [text for heading, text in sections.items() if heading.startswith(start)]
    return found


def test_deploy_doc_covers_every_topic_of_the_deployment():
    """Each topic the deployment guide must cover, with the lines a user types."""
    sections = deploy_doc_sections()
    needs = section(sections, "What the VPS needs")
    for words in ("public IPv4 address and a public IPv6 address", "53/udp", "53/tcp", "80/tcp"):
        assert words in needs, words
    assert "443/tcp" in needs
    delegation = section(sections, "Delegation")
    for record in (" IN NS ", " IN A ", " IN AAAA "):
        assert record in delegation, record
    assert "glue" in delegation
    firewall = section(sections, "Firewall")
    assert "udp dport 53" in firewall and "ipv6-icmp" in firewall
    proxy = section(sections, "Why not behind a proxy")
    assert "CDN" in proxy and "address" in proxy
    outside = section(sections, "Checks from outside")
    commands = [line.split()[0] for line in outside.splitlines() if line.strip()]
    assert commands.count("dig") >= 4 and commands.count("curl") >= 2
    certificates = section(sections, "Certificates")
    assert "certbot certonly --webroot" in certificates
    assert "--deploy-hook /opt/probe-server/bin/certbot-deploy-hook" in certificates
    assert "systemctl reload" in section(sections, "Reloading")
    dns = section(sections, "Moving DNS to Knot or NSD")
    assert "knot.conf" in dns and "nsd.conf" in dns and "v6study.example.net.zone" in dns
    backup = section(sections, "Backing up the database while it runs")
    assert ".backup" in backup and "VACUUM INTO" in backup
    install = section(sections, "Install")
    assert "deploy/install.sh" in install and "systemctl" in install
