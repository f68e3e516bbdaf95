"""Blue-ball fetches per second with durable logging on (wrk against the real process).

Run with ``make bench``. The server is pinned to CPU 0 and wrk to CPU 1 when
``taskset`` exists. Prints one line per concurrency and checks afterwards
that every request wrk counted as answered is a row in the database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from probe_server.testing import ServerProcess, write_config

WRK_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "errors": %d, "non2xx": %d, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f}\\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_port(port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                _, writer = await asyncio.open_connection("::1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict[str, float]:
    command = [*pin(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    report: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return report


async def run(args: argparse.Namespace) -> int:
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        workdir = Path(tmp)
        script = workdir / "report.lua"
        script.write_text(WRK_REPORT)
        config = write_config(
            workdir / "bench.toml",
            {
                "server": {"secret_file": "probe.secret"},
                "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
                "database": {"path": "probe.db", "synchronous": args.synchronous},
                "dns": {"enabled": False},
            },
        )
        server = ServerProcess(config, workdir, prefix=pin(0))
        await server.start()
        try:
            async with aiohttp.ClientSession() as http, http.get(server.url("ipv4")) as response:
                page = await response.text()
            match = re.search(r'src="(http://\[::1\][^"]+/blue/[^"]+)"', page)
            assert match, page
            url = match.group(1).replace("&amp;", "&")
            results = []
            for connections in args.connections:
                report = wrk(url, connections, args.seconds, script)
                rate = report["requests"] / report["seconds"]
                results.append((connections, rate, report))
                print(
                    f"probe-server blue ball, synchronous={args.synchronous}, c={connections}:"
                    f" {rate:,.0f} req/s, p50 {report['p50_ms']:.2f} ms,"
                    f" p99 {report['p99_ms']:.2f} ms, errors {report['errors']:.0f},"
                    f" non-2xx {report['non2xx']:.0f}",
                    flush=True,
                )
        finally:
            server.kill(signal.SIGTERM)
            await server.wait()
            await server.close()
        if args.peer:
            port = free_port()
            peer = subprocess.Popen(  # noqa: ASYNC220 - a long-lived peer, not awaited
                [
                    *pin(0),
                    sys.executable,
                    str(Path(__file__).with_name("peer_aiohttp.py")),
                    str(port),
                ]
            )
            try:
                await wait_for_port(port)
                for connections, rate, _ in results:
                    report = wrk(
                        f"http://[::1]:{port}/blue/x/1.png", connections, args.seconds, script
                    )
                    peer_rate = report["requests"] / report["seconds"]
                    print(
                        f"bare aiohttp handler (no logging), c={connections}:"
                        f" {peer_rate:,.0f} req/s,"
                        f" p50 {report['p50_ms']:.2f} ms, p99 {report['p99_ms']:.2f} ms;"
                        f" probe-server/bare = {rate / peer_rate:.2f}",
                        flush=True,
                    )
            finally:
                peer.terminate()
                peer.wait()
        with sqlite3.connect(workdir / "probe.db") as conn:
            stored = conn.execute("SELECT count(*) FROM requests WHERE kind = 'blue'").fetchone()[0]
        answered = sum(int(r["requests"] - r["non2xx"]) for _, _, r in results)
        print(f"rows stored for blue balls: {stored:,} (wrk counted {answered:,} answered)")
        return 0 if stored >= answered else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a bare aiohttp handler in the same run",
    )
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
