"""A full disk under the database: the real process on a size-limited tmpfs,
filled while probes and DNS queries keep coming, then given space again."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from probe_server.testing import ServerProcess, health_check, require_tool

from .conftest import Report, rss_mib, scale, server_config
from .load import LoadResult, RawHttp, closed_loop, numbers_in


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs, unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        if os.environ.get("PROBE_SERVER_CI"):
            pytest.fail("the full-disk test needs root (mount) in CI")
        pytest.skip("mounting a tmpfs needs root")
    require_tool("mount")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> int:
    """Write a file until the file system is full; its size."""
    written = 0
    chunk = b"\0" * 65536
    with open(directory / "filler", "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 2]
                continue
            written += len(chunk)


async def blue_url(server: ServerProcess) -> str:
    connection = await RawHttp.open(server.endpoints["http_ipv4"])
    try:
        status, body = await connection.request("/")
    finally:
        connection.close()
    assert status == 200
    match = re.search(rb'<img src="http://\[::1\]:\d+(/blue/[^"]+)"', body)
    assert match
    return match.group(1).decode().replace("&amp;", "&")


async def admin_get(server: ServerProcess, path: str) -> tuple[int, str]:
    url = f"http://{server.endpoints['admin']}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^probe_server_{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


# Clients fetching balls during the outage: each waits commit_timeout for its
# 503, so this many rows a second join the queue.
CLIENTS = scale(64, 128)
# Low enough that the outage fills the queue: the bound is reached, not assumed.
QUEUE_LIMIT = 200
# Most the process may grow while commits fail, in MiB: the queue is bounded.
OUTAGE_GROWTH = 50


async def sample(server: ServerProcess, stop: asyncio.Event) -> tuple[list[float], list[float]]:
    """The writer's queue depth (from /metrics) and the RSS, every 0.2 s until ``stop``."""
    depths: list[float] = []
    memory: list[float] = []
    while not stop.is_set():
        depths.append(metric((await admin_get(server, "/metrics"))[1], "db_queue_rows"))
        memory.append(rss_mib(server.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    return depths, memory


async def test_full_disk_keeps_serving_never_acknowledges_and_catches_up(
    tmpfs, processes, report: Report
):
    config = server_config(
        tmpfs,
        server={"commit_timeout": 1.0},
        database={"queue_limit": QUEUE_LIMIT},
    )
    server = ServerProcess(config, tmpfs)
    processes.append(server)
    await server.start()
    path = await blue_url(server)
    endpoint = server.endpoints["http_ipv6"]

    def probe(n: int) -> str:
        return f"{path}&n={n}"

    before = await closed_loop(endpoint, probe, connections=8, seconds=1.0)
    assert before.ok > 0 and not before.errors
    idle_memory = rss_mib(server.pid)

    filler = fill(tmpfs)
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample(server, stop_sampling))
    try:
        # Probes until commits fail (SQLite may first reuse room in its WAL),
        # then on for the outage: 503, never 200 for a row not stored.
        outage_seconds = scale(6.0, 30.0)
        during = LoadResult()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        failing_since = None
        while failing_since is None or loop.time() < failing_since + outage_seconds:
            assert loop.time() < deadline, "commits never failed on the full disk"
            part = await closed_loop(
                endpoint, probe, connections=CLIENTS, seconds=2.0, first=100_000 + during.sent
            )
            during.merge(part)
            if failing_since is None and part.statuses[503]:
                failing_since = loop.time()
        checks = [await health_check(server.endpoints) for _ in range(3)]
        # The admin listener says so, and counts it.
        health_during = await admin_get(server, "/healthz")
        metrics_during = (await admin_get(server, "/metrics"))[1]
        errors_counted = metric(metrics_during, "db_commit_errors_total")
        rejected = metric(metrics_during, "db_rejected_rows_total")
    finally:
        stop_sampling.set()
        depths, memory = await sampler

    os.unlink(tmpfs / "filler")  # space returns
    recovered_after = 0.0
    started = loop.time()
    async with asyncio.timeout(60):
        while True:
            connection = await RawHttp.open(endpoint)
            try:
                status, _ = await connection.request(probe(900_000))
            finally:
                connection.close()
            if status == 200:
                recovered_after = loop.time() - started
                break
            await asyncio.sleep(0.2)  # the writer retries with backoff
    after = await closed_loop(endpoint, probe, connections=8, seconds=1.0, first=200_000)
    assert after.ok > 0
    health_after = await admin_get(server, "/healthz")
    assert health_during[0] == 503 and "commits are failing" in health_during[1]
    assert health_after[0] == 200
    assert errors_counted > 0

    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    assert "Traceback" not in log
    with sqlite3.connect(tmpfs / "probe.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = numbers_in([p for (p,) in conn.execute("SELECT path FROM requests")])
    acknowledged = before.acknowledged | during.acknowledged | after.acknowledged
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged, not stored"
    refused = set(range(100_000, 100_000 + during.sent)) - during.acknowledged
    stored_late = len(refused & stored)
    assert "event=commit_failed" in log and "event=commit_recovered" in log
    errors = int(re.search(r"event=database_closed .* errors=(\d+)", log).group(1))
    assert errors > 0
    assert during.statuses[503] > 0
    assert all(ok for ok, _ in checks), checks
    # Buffered within the bound: the queue filled up to it, never past it,
    # and what came beyond was refused (503), not held in memory.
    assert max(depths) <= QUEUE_LIMIT, max(depths)
    assert rejected > 0
    assert max(memory) - idle_memory < OUTAGE_GROWTH, (idle_memory, max(memory))
    # Caught up: rows queued during the outage (answered 503 after
    # commit_timeout) were stored once space returned.
    assert stored_late > 0

    # And the process starts again on the same database.
    again = ServerProcess(config, tmpfs)
    processes.append(again)
    await again.start()
    assert (await health_check(again.endpoints))[0]
    again.kill(signal.SIGTERM)
    assert await again.wait() == 0

    report(
        "full disk",
        f"database on a 32 MiB tmpfs filled to the last byte while {CLIENTS} clients fetch"
        f" blue balls; then the filler deleted; commit_timeout 1 s, queue_limit {QUEUE_LIMIT}",
        f"{outage_seconds:.0f} s of failing commits, {filler >> 20} MiB filler,"
        f" {during.sent} probes while full",
        f"during: {during.describe()}; health checks answered {sum(ok for ok, _ in checks)}/3;"
        f" queue depth max {max(depths):.0f} (limit {QUEUE_LIMIT}), {rejected:.0f} rows"
        f" refused at the bound; RSS {idle_memory:.0f} -> max {max(memory):.0f} MiB;"
        f" {errors} failed commits logged and counted (admin"
        f" /healthz 503 'commits are failing', {errors_counted:.0f} in /metrics"
        " at the time); 200 again"
        f" {recovered_after:.1f} s after space returned; {stored_late} of the 503'd"
        " probes' rows stored once it did (held in the queue); integrity_check ok;"
        " restart on the same database ok",
        "nothing: every 200 is a row; no 200 for a row not stored",
    )


async def test_first_start_on_a_full_disk_leaves_nothing_that_blocks_the_next(
    tmpfs, processes, report: Report
):
    config = server_config(tmpfs)
    fill(tmpfs)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "probe_server",
        "serve",
        "--config",
        str(config),
        cwd=tmpfs,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err
    lines = [line for line in err.decode().splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "Traceback" not in err.decode(), err
    os.unlink(tmpfs / "filler")
    server = ServerProcess(config, tmpfs)
    processes.append(server)
    await server.start()  # no half-written secret or database left in the way
    assert (await health_check(server.endpoints))[0]
    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    with contextlib.suppress(FileNotFoundError):
        assert len((tmpfs / "probe.secret").read_text().strip()) == 64
    report(
        "full disk at first start",
        "first start (no secret, no database yet) on a full tmpfs, then space freed",
        "1 start",
        f"exit status 1 with one line: {lines[0].split('cannot start: ')[-1][:90]!r};"
        " the next start works",
        "nothing",
    )
