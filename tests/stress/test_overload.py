"""Overload: several times the rate the server sustains, for a bounded time.

The server sheds load (bounded connections and queues: 503 or refusal rather
than unbounded memory), stays responsive to health checks, recovers when the
load stops, and every request it acknowledged is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
from collections.abc import Iterator

import pytest

from probe_server.testing import ServerProcess, health_check, require_tool

from .conftest import Report, rss_mib, scale, server_config
from .load import RawHttp, closed_loop, numbers_in, open_loop

# Most the process may grow under the flood, in MiB: every queue and table is
# bounded (1,000 connections, 2,000 rows queued), so the flood's size must
# not show in memory; growth past this is something unbounded.
HTTP_FLOOD_GROWTH = 100
DNS_FLOOD_GROWTH = 50


@pytest.fixture
def own_cpu() -> Iterator[str]:
    """The server on CPU 0, this process (the load) on CPU 1, when there are two."""
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        yield ""
        return
    cpus = sorted(before)
    os.sched_setaffinity(0, {cpus[1]})
    try:
        yield str(cpus[0])
    finally:
        os.sched_setaffinity(0, before)


async def blue_path(server: ServerProcess) -> str:
    connection = await RawHttp.open(server.endpoints["http_ipv4"])
    try:
        _, body = await connection.request("/")
    finally:
        connection.close()
    match = re.search(rb'<img src="http://\[::1\]:\d+(/blue/[^"]+)"', body)
    assert match
    return match.group(1).decode().replace("&amp;", "&")


async def watch(
    server: ServerProcess, done: asyncio.Event, page: bool = True, seen: list[str] | None = None
) -> tuple[list[bool], list[float]]:
    """Health checks and memory every half second until ``done`` (what a
    failed check saw goes to ``seen``)."""
    checks: list[bool] = []
    memory: list[float] = []
    while not done.is_set():
        ok, detail = await health_check(server.endpoints, deadline=5.0, page=page)
        checks.append(ok)
        if not ok and seen is not None:
            seen.append(detail)
        memory.append(rss_mib(server.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)
    return checks, memory


async def test_http_overload_sheds_load_and_loses_nothing(
    tmp_path, processes, own_cpu, report: Report
):
    require_tool("taskset")
    connections_cap = 1000
    config = server_config(
        tmp_path,
        http={"max_connections": connections_cap, "max_connections_per_client": connections_cap},
        database={"queue_limit": 2000},
    )
    server = ServerProcess(config, tmp_path, prefix=["taskset", "-c", own_cpu] if own_cpu else [])
    processes.append(server)
    await server.start()
    path = await blue_path(server)
    endpoint = server.endpoints["http_ipv6"]

    def probe(n: int) -> str:
        return f"{path}&n={n}"

    # The rate the server sustains: closed loop, enough clients to keep it busy.
    sustained = await closed_loop(endpoint, probe, connections=32, seconds=scale(2.0, 5.0))
    rate = sustained.ok / sustained.seconds
    factor = scale(4, 5)
    seconds = scale(5.0, 30.0)
    idle_memory = rss_mib(server.pid)

    done = asyncio.Event()
    # The public site is what is flooded: responsive means the admin
    # listener's /healthz and DNS answer in time (the page may be a 503).
    failed_checks: list[str] = []
    watcher = asyncio.create_task(watch(server, done, page=False, seen=failed_checks))
    try:
        flood = await open_loop(
            endpoint,
            probe,
            rate=factor * rate,
            seconds=seconds,
            max_in_flight=scale(3000, 6000),
            first=1_000_000,
        )
    finally:
        done.set()
        checks, memory = await watcher

    # Recovery: a normal client gets its 200 again.
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(60):
        while True:
            connection = await RawHttp.open(endpoint)
            try:
                status, _ = await connection.request(probe(9_000_000))
            finally:
                connection.close()
            if status == 200:
                break
            await asyncio.sleep(0.2)
    recovered = loop.time() - started
    after = await closed_loop(endpoint, probe, connections=8, seconds=1.0, first=5_000_000)

    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    assert "Traceback" not in log
    with sqlite3.connect(tmp_path / "probe.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = numbers_in([p for (p,) in conn.execute("SELECT path FROM requests")])
    acknowledged = sustained.acknowledged | flood.acknowledged | after.acknowledged
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged, not stored"
    assert after.ok > 0
    assert sum(checks) >= 0.8 * len(checks), failed_checks
    http = [dict(re.findall(r"(\w+)=(\d+)", line)) for line in log.splitlines()
            if "event=http_connections" in line]  # fmt: skip
    peak = max(int(s["peak"]) for s in http)
    assert peak <= connections_cap
    # It shed load: the flood got 503s (connection table or queue) or refusals.
    refused = sum(int(s["refused"]) for s in http)
    assert flood.statuses[503] + refused > 0, flood.describe()
    # ...rather than holding it in memory.
    assert max(memory) - idle_memory < HTTP_FLOOD_GROWTH, (idle_memory, max(memory))
    offered = (flood.sent + flood.not_sent) / flood.seconds
    report(
        "overload: HTTP probes",
        f"open-loop blue-ball fetches at {factor}x the sustained rate (server on one CPU,"
        f" load on the other); http.max_connections {connections_cap}, queue_limit 2000",
        f"{seconds:.0f} s at {offered:.0f}/s offered ({rate:.0f}/s sustained);"
        f" {flood.sent} sent, {flood.not_sent} not sent (load generator at its"
        " in-flight cap)",
        f"{flood.describe()}; {flood.ok / flood.seconds:.0f}/s answered 200, p50"
        f" {flood.percentile(50) * 1000:.0f} ms, p99 {flood.percentile(99) * 1000:.0f} ms;"
        f" peak connections {peak}, evicted {sum(int(s['evicted']) for s in http)},"
        f" refused {refused};"
        f" RSS {idle_memory:.0f} -> max {max(memory):.0f} MiB (bound +{HTTP_FLOOD_GROWTH});"
        f" /healthz and DNS answered in time {sum(checks)}/{len(checks)};"
        f" 200 again {recovered:.1f} s after",
        f"nothing: {len(acknowledged)} acknowledged, all stored",
    )


async def test_dns_flood_does_not_cost_a_probe(tmp_path, processes, own_cpu, report: Report):
    dnsperf = require_tool("dnsperf")
    require_tool("taskset")
    config = server_config(tmp_path, database={"queue_limit": 4000})
    server = ServerProcess(config, tmp_path, prefix=["taskset", "-c", own_cpu] if own_cpu else [])
    processes.append(server)
    await server.start()
    path = await blue_path(server)
    idle_memory = rss_mib(server.pid)
    queries = tmp_path / "queries.txt"
    queries.write_text(
        "".join(f"q{i}.v6.example.org AAAA\nsurvey.example.org A\n" for i in range(5000))
    )
    host, _, port = server.endpoints["dns_udp_ipv4"].rpartition(":")
    seconds = scale(5, 30)
    rate = scale(40_000, 60_000)
    flood = await asyncio.create_subprocess_exec(
        *(["taskset", "-c", str(sorted(os.sched_getaffinity(0))[0])] if own_cpu else []),
        dnsperf,
        "-s", host, "-p", port, "-d", str(queries), "-l", str(seconds),
        "-Q", str(rate), "-c", "4", "-q", "2000", "-t", "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    done = asyncio.Event()
    watcher = asyncio.create_task(watch(server, done))
    try:
        probes = await closed_loop(
            server.endpoints["http_ipv6"],
            lambda n: f"{path}&n={n}",
            connections=16,
            seconds=seconds,
        )
        out, _ = await flood.communicate()
    finally:
        done.set()
        checks, memory = await watcher
    text = out.decode()
    completed = re.search(r"Queries completed:\s+(\d+)", text)
    lost = re.search(r"Queries lost:\s+(\d+)", text)
    assert completed and lost, text
    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    dns_stats = dict(re.findall(r"(\w+)=(\d+)", next(
        line for line in log.splitlines() if "event=dns_stopped" in line)))  # fmt: skip
    with sqlite3.connect(tmp_path / "probe.db") as conn:
        stored = numbers_in([p for (p,) in conn.execute("SELECT path FROM requests")])
        logged = conn.execute("SELECT count(*) FROM dns_queries").fetchone()[0]
    assert probes.acknowledged <= stored
    assert probes.statuses[503] == 0 and probes.ok > 0
    assert sum(checks) >= 0.8 * len(checks)
    assert max(memory) - idle_memory < DNS_FLOOD_GROWTH, (idle_memory, max(memory))
    report(
        "overload: DNS flood",
        f"dnsperf at {rate}/s over UDP (several times what one core answers) while 16"
        " clients fetch blue balls",
        f"{seconds} s; {int(completed.group(1)) + int(lost.group(1))} queries sent",
        f"{completed.group(1)} answered, {lost.group(1)} lost (dropped in the kernel's"
        f" socket buffer); {dns_stats['queries']} read; {logged} logged,"
        f" {dns_stats['log_dropped']} log rows shed (query rows may use half the queue);"
        f" probes {probes.describe()}, none 503; health checks {sum(checks)}/{len(checks)};"
        f" RSS {idle_memory:.0f} -> max {max(memory):.0f} MiB (bound +{DNS_FLOOD_GROWTH})",
        "no probe: every 200 stored; DNS rows over the bound are counted, not stored",
    )
