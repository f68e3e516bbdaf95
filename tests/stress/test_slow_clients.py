"""Slow and greedy clients against the real process: slowloris on both web
sites, thousands of idle DNS-over-TCP connections from many sources, and
TLS handshakes that never finish on HTTPS sites, with the process's
open-file limit low enough that, without connection limits, the attack would
use up every descriptor."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import pytest

from probe_server.testing import ServerProcess, health_check, require_open_files, require_tool

from ..certs import TestCA
from .conftest import Attack, Report, open_files, rss_mib, scale, server_config

NOFILE = 1024
ATTACKERS = [f"127.0.0.{i}" for i in range(10, 30)]
Attacks = list[tuple[str, str, str | None, int]]


@pytest.fixture(autouse=True)
def enough_files_for_the_attacker() -> None:
    # Skipped on a developer's machine without them; a failure in CI.
    require_open_files(8192)


async def dns_over_tcp(endpoint: str) -> bool:
    """A normal client's query over TCP, answered within 5 s."""
    host, _, port = endpoint.rpartition(":")
    query = dns.message.make_query("survey.example.org", "A")
    try:
        reply = await dns.asyncquery.tcp(query, host, port=int(port), timeout=5)
    except (OSError, EOFError, dns.exception.DNSException):
        return False
    return bool(reply.answer)


@dataclass
class Observed:
    """What the normal clients saw during an attack, every half second."""

    attack: dict[str, dict[str, int]] = field(default_factory=dict)
    checks: list[tuple[bool, str]] = field(default_factory=list)
    tcp_checks: list[bool] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)


async def under_attack(
    server: ServerProcess, attacks: Attacks, seconds: float, tls: ssl.SSLContext | None = None
) -> Observed:
    """Run the attacks; health checks, a DNS-over-TCP query, open files and
    memory every half second until they end."""
    attack = Attack(attacks, seconds)
    await attack.start()
    seen = Observed()
    try:
        while attack.process is not None and attack.process.returncode is None:
            seen.checks.append(await health_check(server.endpoints, deadline=5.0, tls=tls))
            seen.tcp_checks.append(await dns_over_tcp(server.endpoints["dns_tcp_ipv4"]))
            seen.files.append(open_files(server.pid))
            seen.memory.append(rss_mib(server.pid))
            with contextlib.suppress(TimeoutError):  # a check every half second
                await asyncio.wait_for(asyncio.shield(attack.process.wait()), 0.5)
        seen.attack = await attack.result()
    finally:
        await attack.close()
    return seen


async def back_to(server: ServerProcess, baseline_files: int) -> None:
    """Until the process holds no more descriptors than before the attack (30 s at most)."""
    async with asyncio.timeout(30):
        while open_files(server.pid) > baseline_files + 5:
            await asyncio.sleep(0.1)


def turned_away(checks: list[tuple[bool, str]]) -> str:
    """What became of the normal client's page loads that were not a 200."""
    refused = sum(ok and "page 503" in detail for ok, detail in checks)
    reset = [detail for ok, detail in checks if not ok]
    parts = []
    if refused:
        parts.append(f"{refused} answered 503 (refused)")
    if reset:
        parts.append(f"{len(reset)} closed unanswered ({reset[0][:60]}...)")
    return (
        f"; not served: {', '.join(parts)}: the table was full and no connection had"
        " been idle 0.1 s to make room"
        if parts
        else ""
    )


def http_connections(log: str) -> list[dict[str, str]]:
    """The counters of each web socket's connection table, from the log at exit."""
    return [
        dict(re.findall(r"(\w+)=(\d+)", line))
        for line in log.splitlines()
        if "event=http_connections" in line
    ]


async def test_slowloris_and_idle_dns_connections(tmp_path, processes, report: Report):
    require_tool("prlimit")
    http_cap, dns_cap = 200, 200
    config = server_config(
        tmp_path,
        http={
            "header_timeout": 5,
            "max_connections": http_cap,
            "max_connections_per_client": 50,
        },
        dns={"tcp_max_connections": dns_cap, "tcp_max_connections_per_client": 50},
    )
    server = ServerProcess(config, tmp_path, prefix=["prlimit", f"--nofile={NOFILE}"])
    processes.append(server)
    await server.start()
    baseline_files = open_files(server.pid)
    http_attackers = scale(1500, 4000)
    dns_attackers = scale(1000, 3000)
    seconds = scale(12, 60)

    attacks: Attacks = []
    for i, source in enumerate(ATTACKERS):
        share = http_attackers // len(ATTACKERS)
        attacks.append(("slowloris", server.endpoints["http_ipv4"], source, share * 3 // 4))
        if i % 2 == 0:  # IPv6: all from ::1, one client
            attacks.append(("slowloris", server.endpoints["http_ipv6"], None, share // 2))
        attacks.append(("idle_dns", server.endpoints["dns_tcp_ipv4"], source, dns_attackers // 20))
    seen = await under_attack(server, attacks, seconds)
    http_seen, dns_seen = seen.attack["slowloris"], seen.attack["idle_dns"]
    checks, tcp_checks, files, memory = seen.checks, seen.tcp_checks, seen.files, seen.memory

    # The attackers are gone: every connection they held is closed in time.
    await back_to(server, baseline_files)
    after, detail = await health_check(server.endpoints)
    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    assert "Too many open files" not in log and "EMFILE" not in log
    assert "Traceback" not in log
    http_stats = http_connections(log)
    dns_line = next(line for line in log.splitlines() if "event=dns_stopped" in line)
    dns_stats = dict(re.findall(r"(\w+)=(\d+)", dns_line))

    # Served, not just answered: a 503 would be a refusal.
    healthy = sum(ok and "page 200" in detail for ok, detail in checks)
    failures = [d for ok, d in checks if not ok]
    assert after, detail
    # Every descriptor the attack could take is within the limits: never EMFILE.
    assert max(files) < NOFILE
    assert healthy >= 0.9 * len(checks), failures
    assert sum(tcp_checks) >= 0.9 * len(tcp_checks)
    peaks = [int(s["peak"]) for s in http_stats]
    assert max(peaks) <= http_cap
    report(
        "slow clients: slowloris HTTP",
        f"{http_attackers} connections (3/4 IPv4 from 20 addresses, 1/4 IPv6) each sending"
        " a request head one line a second, reconnecting a second after being closed; server"
        f" open-file limit {NOFILE}, http.max_connections {http_cap}/site, 50 per client,"
        " header_timeout 5 s",
        f"{seconds} s, {http_seen.get('opened', 0)} connections opened",
        f"a normal client's DNS query + survey page (200) {healthy}/{len(checks)} in time;"
        f" open files max {max(files)} (limit {NOFILE}); RSS max {max(memory):.0f} MiB;"
        f" peak connections/site {max(peaks)}; evicted"
        f" {sum(int(s['evicted']) for s in http_stats)}, refused"
        f" {sum(int(s['refused']) for s in http_stats)}; no EMFILE{turned_away(checks)}",
        "nothing (a refused page load stored nothing and may be retried)",
    )
    report(
        "slow clients: idle DNS TCP",
        f"{dns_attackers} TCP connections to DNS from 20 addresses, no query, reconnecting"
        f" a second after being closed; dns.tcp_max_connections {dns_cap}, 50 per client",
        f"{seconds} s, {dns_seen.get('opened', 0)} connections opened",
        f"a normal client's TCP query answered {sum(tcp_checks)}/{len(tcp_checks)};"
        f" evicted {dns_stats.get('tcp_evicted')}, refused {dns_stats.get('tcp_refused')},"
        f" idle timeouts {dns_stats.get('tcp_timeouts')}; descriptors back to the"
        " baseline after the attack",
        "nothing",
    )


def tls_sites(workdir: Path) -> tuple[TestCA, dict[str, dict[str, str]]]:
    """A throwaway CA, and both sites on HTTPS with a certificate it signed."""
    ca = TestCA(workdir)
    cert, key = ca.issue("site", ["127.0.0.1", "::1"])
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    return ca, {"ipv4": {"listen": "127.0.0.1:0", **tls}, "ipv6": {"listen": "[::1]:0", **tls}}


async def test_tls_handshakes_that_never_finish(tmp_path, processes, report: Report):
    """Connections to the HTTPS sites that never send a ClientHello, or only
    half of one: counted and evictable from the moment they are accepted, cut
    off after header_timeout; a normal HTTPS client is served throughout."""
    require_tool("prlimit")
    http_cap = 200
    ca, sites = tls_sites(tmp_path)
    config = server_config(
        tmp_path,
        sites=sites,
        http={"header_timeout": 5, "max_connections": http_cap, "max_connections_per_client": 50},
        dns={"tcp_max_connections": 200, "tcp_max_connections_per_client": 50},
    )
    server = ServerProcess(config, tmp_path, prefix=["prlimit", f"--nofile={NOFILE}"])
    processes.append(server)
    await server.start()
    baseline_files = open_files(server.pid)
    total = scale(1500, 4000)
    seconds = scale(12, 60)
    attacks: Attacks = []
    for i, source in enumerate(ATTACKERS):
        share = total // len(ATTACKERS) // 2  # of each kind, from each address
        for kind in ("idle_tls", "partial_hello"):
            attacks.append((kind, server.endpoints["http_ipv4"], source, share * 3 // 4))
            if i % 2 == 0:  # IPv6: all from ::1, one client
                attacks.append((kind, server.endpoints["http_ipv6"], None, share // 2))
    seen = await under_attack(server, attacks, seconds, tls=ca.client_context())

    await back_to(server, baseline_files)
    after, detail = await health_check(server.endpoints, tls=ca.client_context())
    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    assert "Too many open files" not in log and "EMFILE" not in log
    assert "Traceback" not in log
    stats = http_connections(log)
    assert after, detail
    healthy = sum(ok and "page 200" in d for ok, d in seen.checks)
    failures = [d for ok, d in seen.checks if not ok]
    assert max(seen.files) < NOFILE
    assert healthy >= 0.9 * len(seen.checks), failures
    assert sum(seen.tcp_checks) >= 0.9 * len(seen.tcp_checks)
    peaks = [int(s["peak"]) for s in stats]
    assert max(peaks) <= http_cap
    failed = sum(int(s["handshakes_failed"]) for s in stats)
    evicted = sum(int(s["evicted"]) for s in stats)
    # The attack's connections were cut off: by eviction or by the deadline.
    assert failed > 0
    opened = sum(seen.attack[kind].get("opened", 0) for kind in ("idle_tls", "partial_hello"))
    report(
        "slow clients: TLS handshakes",
        f"{total} TCP connections to the HTTPS sites (3/4 IPv4 from 20 addresses, 1/4"
        " IPv6), half sending no ClientHello, half only the first half of one, reconnecting"
        f" a second after being closed; server open-file limit {NOFILE},"
        f" http.max_connections {http_cap}/site, 50 per client, header_timeout 5 s (the"
        " handshake's deadline too)",
        f"{seconds} s, {opened} connections opened",
        f"a normal client's DNS query + HTTPS survey page (200) {healthy}/{len(seen.checks)}"
        f" in time; DNS over TCP {sum(seen.tcp_checks)}/{len(seen.tcp_checks)}; open files"
        f" max {max(seen.files)} (limit {NOFILE}); RSS max {max(seen.memory):.0f} MiB; peak"
        f" connections/site {max(peaks)}; handshakes cut off {failed} (evicted {evicted});"
        f" no EMFILE{turned_away(seen.checks)}",
        "nothing (a refused page load stored nothing and may be retried)",
    )
