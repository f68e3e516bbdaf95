"""DNS queries per second on one core: probe-server beside Knot DNS, same zone files.

Run with ``make bench-dns``. Both servers are pinned to CPU 0 (``taskset``)
and serve ``dns/example.org.zone`` and ``dns/v6ns.example.org.zone``; dnsperf,
pinned to CPU 1, replays one query file against each in turn, alternating for
several rounds, so both see the same machine noise. The query file mixes the
measurement names (A-only, AAAA-only, NODATA, NXDOMAIN, dual-stack, CNAME)
with a share of per-session wildcard names, each a fresh 32-character token.

probe-server runs as in production: every query logged to SQLite through
the group-commit writer, rate limiting on (with a limit far above the
benchmark's rate, so its bookkeeping is paid but nothing is dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from probe_server.testing import KnotProcess, ServerProcess, write_config

ROOT = Path(__file__).resolve().parent.parent
ZONES = [ROOT / "dns" / "example.org.zone", ROOT / "dns" / "v6ns.example.org.zone"]
STATIC = [
    "survey.example.org A",  # IPv4-only name
    "v6.example.org AAAA",  # IPv6-only name
    "v6.example.org A",  # NODATA
    "survey.example.org AAAA",  # NODATA
    "ds.example.org A",
    "ds.example.org AAAA",
    "www.example.org A",  # CNAME
    "nope.example.org A",  # NXDOMAIN
    "example.org SOA",
    "ds.v6ns.example.org AAAA",  # the child zone
]


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


def query_file(path: Path, count: int, wildcard_share: float) -> None:
    """``count`` queries; ``wildcard_share`` of them per-session names."""
    lines = []
    every = round(1 / wildcard_share) if wildcard_share else 0
    for i in range(count):
        if every and i % every == 0:
            token = secrets.token_bytes(20).hex()[:32]
            kind = ("v6.example.org AAAA", "survey.example.org A", "ds.example.org AAAA")[i % 3]
            lines.append(f"{token}.{kind}")
        else:
            lines.append(STATIC[i % len(STATIC)])
    path.write_text("\n".join(lines) + "\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, queries: Path, seconds: int, outstanding: int) -> dict[str, float]:
    command = [
        *pin(1),
        "dnsperf",
        "-s", "127.0.0.1",
        "-p", str(port),
        "-d", str(queries),
        "-l", str(seconds),
        "-c", "1",
        "-T", "1",
        "-q", str(outstanding),
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def number(label: str) -> float:
        match = re.search(rf"{label}:\s+([\d.]+)", output)
        assert match, output
        return float(match.group(1))

    return {
        "qps": number("Queries per second"),
        "completed": number("Queries completed"),
        "lost": number("Queries lost"),
        "latency_ms": number("Average Latency \\(s\\)") * 1000,
    }


async def run(args: argparse.Namespace) -> int:
    for tool in ("dnsperf", "knotd"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (apt-get install dnsperf knot)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="probe-dns-bench-") as tmp:
        workdir = Path(tmp)
        queries = workdir / "queries.txt"
        query_file(queries, args.queries, args.wildcard_share)
        config = write_config(
            workdir / "bench.toml",
            {
                "server": {"secret_file": "probe.secret"},
                "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
                "database": {"path": "probe.db"},
                "dns": {
                    "zones": [str(z) for z in ZONES],
                    "listen_ipv4": "127.0.0.1:0",
                    "listen_ipv6": "[::1]:0",
                    "rrl": {"responses_per_second": 1_000_000.0, "burst": 1_000_000},
                },
            },
        )
        server = ServerProcess(config, workdir, prefix=pin(0))
        (workdir / "knot").mkdir()
        knot = KnotProcess(ZONES, workdir / "knot", prefix=pin(0))
        await server.start()
        await knot.start()
        ours_port = int(server.endpoints["dns_udp_ipv4"].rpartition(":")[2])
        results: dict[str, list[dict[str, float]]] = {"probe-server": [], "knot": []}
        completed_ours = 0.0
        try:
            for round_number in range(args.rounds):
                for name, port, pid in (
                    ("probe-server", ours_port, server.pid),
                    ("knot", knot.port, knot.pid),
                ):
                    before = cpu_seconds(pid)
                    report = dnsperf(port, queries, args.seconds, args.outstanding)
                    report["cpu"] = (cpu_seconds(pid) - before) / args.seconds
                    # Queries per second of the server's own CPU time: its
                    # one-core capacity even when dnsperf is the bottleneck.
                    report["per_core"] = report["qps"] / report["cpu"]
                    results[name].append(report)
                    if name == "probe-server":
                        completed_ours += report["completed"]
                    print(
                        f"round {round_number + 1} {name:>12}: {report['qps']:>9,.0f} q/s"
                        f" at {report['cpu']:.0%} of a core"
                        f" ({report['per_core']:,.0f} q/s per core),"
                        f" avg latency {report['latency_ms']:.3f} ms,"
                        f" lost {report['lost']:.0f}",
                        flush=True,
                    )
        finally:
            server.kill(signal.SIGTERM)
            await server.wait()
            await server.close()
            await knot.close()
        stopped = re.search(rb"event=dns_stopped .*", server.stderr)
        with sqlite3.connect(workdir / "probe.db") as conn:
            rows = conn.execute("SELECT count(*) FROM dns_queries").fetchone()[0]

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    ours, theirs = median("probe-server", "qps"), median("knot", "qps")
    ours_core, theirs_core = median("probe-server", "per_core"), median("knot", "per_core")
    print(
        f"\nmedian of {args.rounds} rounds, {args.seconds} s each, one core each,"
        f" {args.wildcard_share:.0%} per-session wildcard names:\n"
        f"  measured:      probe-server {ours:,.0f} q/s   knot {theirs:,.0f} q/s"
        f"   ratio {ours / theirs:.2f}\n"
        f"  per CPU-second: probe-server {ours_core:,.0f} q/s   knot {theirs_core:,.0f} q/s"
        f"   ratio {ours_core / theirs_core:.2f}\n"
        f"  query rows stored: {rows:,} for {completed_ours:,.0f} answered"
        f" ({stopped.group(0).decode() if stopped else 'no stop line'})"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--wildcard-share", type=float, default=0.3)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
