"""Slow and greedy clients against the real process: slowloris on both web
sites and thousands of idle DNS-over-TCP connections from many sources, with
the process's open-file limit low enough that, without connection limits,
the attack would use up every descriptor."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal

import dns.asyncquery
import dns.exception
import dns.message
import pytest

from probe_server.testing import ServerProcess, health_check, require_open_files, require_tool

from .conftest import Attack, Report, open_files, rss_mib, scale, server_config

NOFILE = 1024
ATTACKERS = [f"127.0.0.{i}" for i in range(10, 30)]


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

    attacks: list[tuple[str, str, str | None, int]] = []
    for i, source in enumerate(ATTACKERS):
        share = http_attackers // len(ATTACKERS)
        attacks.append(("slowloris", server.endpoints["http_ipv4"], source, share * 3 // 4))
        if i % 2 == 0:  # IPv6: all from ::1, one client
            attacks.append(("slowloris", server.endpoints["http_ipv6"], None, share // 2))
        attacks.append(("idle_dns", server.endpoints["dns_tcp_ipv4"], source, dns_attackers // 20))
    attack = Attack(attacks, seconds)
    await attack.start()
    checks: list[tuple[bool, str]] = []
    tcp_checks: list[bool] = []
    files: list[int] = []
    memory: list[float] = []
    try:
        while attack.process is not None and attack.process.returncode is None:
            checks.append(await health_check(server.endpoints, deadline=5.0))
            tcp_checks.append(await dns_over_tcp(server.endpoints["dns_tcp_ipv4"]))
            files.append(open_files(server.pid))
            memory.append(rss_mib(server.pid))
            with contextlib.suppress(TimeoutError):  # a check every half second
                await asyncio.wait_for(asyncio.shield(attack.process.wait()), 0.5)
        seen = await attack.result()
    finally:
        await attack.close()
    http_seen, dns_seen = seen["slowloris"], seen["idle_dns"]

    # The attackers are gone: every connection they held is closed in time.
    async with asyncio.timeout(30):
        while open_files(server.pid) > baseline_files + 5:
            await asyncio.sleep(0.1)
    after, detail = await health_check(server.endpoints)
    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    assert "Too many open files" not in log and "EMFILE" not in log
    assert "Traceback" not in log
    http_stats = [
        dict(re.findall(r"(\w+)=(\d+)", line))
        for line in log.splitlines()
        if "event=http_connections" in line
    ]
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
        f" {sum(int(s['refused']) for s in http_stats)}; no EMFILE",
        "nothing (no request of a normal client refused)" if not failures else str(failures),
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
