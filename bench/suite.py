"""The whole benchmark suite, side by side with its peers, written to docs/benchmarks.md.

Run with ``make bench`` (as root it installs the peers from Debian packages
first). Every server under test is pinned to CPU 0 and every load generator
to CPU 1; every peer listens on loopback only and is stopped afterwards.

- HTTP: blue-ball fetches per second and p50/p99 latency (wrk) at fixed
  concurrencies for probe-server with durable logging, nginx serving the same
  image from disk with its access log on, and the seed paper's set-up
  (Apache with mod_php running img.php, which logs its query string), plus a
  bare aiohttp handler with no logging (the framework's own ceiling). The
  servers take turns, round after round, so they share the machine's noise.
- Server memory: probe-server's resident set size sampled while under load.
- DNS: dnsperf against probe-server and Knot serving the same zone files,
  with only the measurement names, and with a share of per-session names.
- Results: ``probe-server report`` on 1,000,000 synthetic sessions.

The generated part of docs/benchmarks.md lies between two marker comments;
the hand-written notes around it (method details, optimisations with their
before/after figures) are kept as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from probe_server.testing import KnotProcess, ServerProcess, write_config

from . import dns_bench, report_million
from .peers import PACKAGES, Apache, Nginx, Peer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- make bench: begin (generated, do not edit by hand) -->"
END = "<!-- make bench: end -->"

TARGETS = {
    "nginx": 0.5,  # probe HTTP at least 0.5x nginx
    "apache": 2.0,  # and at least 2x Apache + PHP
    "knot": 0.2,  # DNS at least 0.2x Knot
    "report_seconds": 5.0,
    "memory_mib": 150.0,
}

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


def say(text: str) -> None:
    print(text, flush=True)


# -- set-up ------------------------------------------------------------------


def install_peers() -> None:
    """As root with apt-get: install whatever peer package is missing."""
    wanted = [package for packages in PACKAGES.values() for package in packages]
    wanted += ["util-linux"]  # taskset
    missing = [
        package
        for package in wanted
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        ).stdout.find("install ok installed")
        < 0
    ]
    if not missing:
        return
    say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # A fresh machine may have no package lists yet; the installer's init
    # scripts are kept from starting the system services (policy-rc.d).
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
    # Debian starts nginx and Apache on port 80 after installing them where
    # an init system runs; the benchmark wants neither.
    for service in ("nginx", "apache2"):
        if shutil.which("systemctl"):
            subprocess.run(["systemctl", "stop", service], capture_output=True)
        subprocess.run(["service", service, "stop"], capture_output=True)


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = psutil.virtual_memory().total / 2**30

    def version(command: list[str], pattern: str) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        match = re.search(pattern, result.stdout + result.stderr)
        return match.group(1) if match else "unknown"

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio's own loop"
    return {
        "cpu": f"{os.cpu_count()} vCPUs ({cpu}), {memory:.0f} GiB",
        "kernel": platform.release(),
        "python": f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}",
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "apache": version(["apache2", "-v"], r"Apache/(\S+)"),
        "php": version(["php", "-v"], r"PHP (\S+)"),
        "knot": version(["knotd", "--version"], r"(\d+\.\d+\.\d+)"),
        "wrk": version(["wrk", "-v"], r"wrk (\S+)"),
        "dnsperf": version(["dnsperf", "-h"], r"Version (\S+)|dnsperf (\d\S*)"),
        "load": f"{os.getloadavg()[0]:.2f}",
    }


# -- measuring ---------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@contextmanager
def peak_rss(pid: int) -> Iterator[list[float]]:
    """Sample a process's resident set size (MiB) every 50 ms while the block runs."""
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        process = psutil.Process(pid)
        while not done.wait(0.05):
            try:
                peak[0] = max(peak[0], process.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict[str, float]:
    command = [*pin(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    report: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    report["rate"] = (report["requests"] - report["non2xx"]) / report["seconds"]
    return report


@dataclass
class HttpServer:
    """One server under test: its URL and how to read its CPU time and log."""

    name: str
    label: str
    url: str
    pids: Callable[[], list[int]]
    logged: Callable[[], int]
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)


class BarePeer(Peer):
    """A bare aiohttp handler with no logging (``bench/peer_aiohttp.py``)."""

    name = "aiohttp"
    path = "/blue/x/1.png"

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("peer_aiohttp.py")), str(self.port)]

    def logged(self) -> int:
        return 0


async def probe_url(server: ServerProcess) -> str:
    async with aiohttp.ClientSession() as http, http.get(server.url("ipv4")) as response:
        page = await response.text()
    match = re.search(r'src="(http://\[::1\][^"]+/blue/[^"]+)"', page)
    assert match, page
    return match.group(1).replace("&amp;", "&")


# probe-server as measured, then the same server with one setting changed:
# no fsync per commit (context), and without the ball fast path (what it
# gains, measured in every run).
PROBE_VARIANTS = [
    ("probe", "probe-server, every fetch a committed row (fsync)", {}),
    (
        "probe-normal",
        "probe-server, synchronous = normal (no fsync per commit)",
        {"database": {"synchronous": "normal"}},
    ),
    (
        "probe-aiohttp",
        "probe-server without the ball fast path (fast_balls = false)",
        {"http": {"fast_balls": False}},
    ),
]


async def bench_http(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    script = workdir / "report.lua"
    script.write_text(WRK_REPORT)
    probes: dict[str, ServerProcess] = {}
    servers: list[HttpServer] = []

    def stored(database: Path) -> Callable[[], int]:
        def count() -> int:
            with sqlite3.connect(database) as conn:
                row = conn.execute("SELECT count(*) FROM requests WHERE kind = 'blue'").fetchone()
                return int(row[0])

        return count

    peers: list[Peer] = [
        Nginx(workdir / "nginx", pin(0)),
        Apache(workdir / "apache", pin(0)),
        BarePeer(workdir / "aiohttp", pin(0)),
    ]
    labels = {
        "nginx": "nginx, image from disk, access log on",
        "apache": "Apache + mod_php img.php (the paper's set-up)",
        "aiohttp": "bare aiohttp handler, no logging",
    }
    memory = 0.0
    try:
        for name, label, settings in PROBE_VARIANTS:
            directory = workdir / name
            directory.mkdir()
            data: dict[str, dict[str, object]] = {
                "server": {"secret_file": "probe.secret"},
                "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
                "database": {"path": "probe.db", "synchronous": "full"},
                "dns": {"enabled": False},
            }
            for section, values in settings.items():
                data.setdefault(section, {}).update(values)
            probe = probes[name] = ServerProcess(
                write_config(directory / "bench.toml", data), directory, prefix=pin(0)
            )
            await probe.start()
            servers.append(
                HttpServer(
                    name,
                    label,
                    await probe_url(probe),
                    lambda probe=probe: [probe.pid],  # type: ignore[misc]
                    stored(directory / "probe.db"),
                )
            )
        for peer in peers:
            peer.start()
            servers.append(
                HttpServer(peer.name, labels[peer.name], peer.url, peer.pids, peer.logged)
            )
        for server in servers:  # warm up: first connections, caches, workers forked
            wrk(server.url, 16, 1, script)
        main = probes["probe"].pid
        for round_number in range(args.rounds):
            for connections in args.connections:
                for server in servers:
                    pids = server.pids()
                    before = cpu_seconds(pids)
                    with peak_rss(main) as peak:
                        report = wrk(server.url, connections, args.seconds, script)
                    report["cpu_us"] = (
                        (cpu_seconds(server.pids()) - before) / max(report["requests"], 1) * 1e6
                    )
                    if server.name == "probe":
                        memory = max(memory, peak[0])
                    server.runs.setdefault(connections, []).append(report)
                    say(
                        f"round {round_number + 1} c={connections:<4} {server.name:>13}:"
                        f" {report['rate']:>8,.0f} req/s, p50 {report['p50_ms']:.2f} ms,"
                        f" p99 {report['p99_ms']:.2f} ms, {report['cpu_us']:.0f} µs CPU/req,"
                        f" errors {report['errors']:.0f}, non-2xx {report['non2xx']:.0f}"
                    )
    finally:
        for peer in peers:
            peer.stop()
        for probe in probes.values():
            probe.kill(signal.SIGTERM)
            await probe.wait()
            await probe.close()
    durability = {}
    for server in servers:
        if server.name.startswith("probe"):
            answered = sum(
                int(r["requests"] - r["non2xx"]) for runs in server.runs.values() for r in runs
            )
            durability[server.name] = (server.logged(), answered)
    logs = {s.name: s.logged() for s in servers if not s.name.startswith("probe")}
    return {"servers": servers, "memory_mib": memory, "durability": durability, "logs": logs}


async def bench_dns(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    config = write_config(
        workdir / "dns.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
            "database": {"path": "dns.db"},
            "dns": {
                "zones": [str(z) for z in dns_bench.ZONES],
                "listen_ipv4": "127.0.0.1:0",
                "listen_ipv6": "[::1]:0",
                "rrl": {"responses_per_second": 1_000_000.0, "burst": 1_000_000},
            },
        },
    )
    server = ServerProcess(config, workdir, prefix=pin(0))
    (workdir / "knot").mkdir()
    knot = KnotProcess(dns_bench.ZONES, workdir / "knot", prefix=pin(0))
    await server.start()
    await knot.start()
    ours_port = int(server.endpoints["dns_udp_ipv4"].rpartition(":")[2])
    answered = 0.0
    try:
        with peak_rss(server.pid) as peak:
            for mix, share in (("measurement names", 0.0), ("30% per-session names", 0.3)):
                queries = workdir / f"queries-{share}.txt"
                dns_bench.query_file(queries, 100_000, share)
                runs: dict[str, list[dict[str, float]]] = {"probe": [], "knot": []}
                for round_number in range(args.rounds):
                    for name, port, pid in (
                        ("probe", ours_port, server.pid),
                        ("knot", knot.port, knot.pid),
                    ):
                        before = cpu_seconds([pid])
                        report = dns_bench.dnsperf(port, queries, args.seconds, 100)
                        report["cpu"] = (cpu_seconds([pid]) - before) / args.seconds
                        report["per_core"] = report["qps"] / max(report["cpu"], 1e-9)
                        runs[name].append(report)
                        if name == "probe":
                            answered += report["completed"]
                        say(
                            f"round {round_number + 1} {mix:<22} {name:>6}:"
                            f" {report['qps']:>9,.0f} q/s at {report['cpu']:.0%} of a core"
                            f" ({report['per_core']:,.0f} per CPU-second),"
                            f" {report['latency_ms']:.2f} ms, lost {report['lost']:.0f}"
                        )
                results[mix] = runs
    finally:
        server.kill(signal.SIGTERM)
        await server.wait()
        await server.close()
        await knot.close()
    with sqlite3.connect(workdir / "dns.db") as conn:
        rows = conn.execute("SELECT count(*) FROM dns_queries").fetchone()[0]
    # Query rows are shed, and counted, when the log's queue is over its share.
    stopped = re.search(rb"event=dns_stopped .*?log_dropped=(\d+)", server.stderr)
    shed = int(stopped.group(1)) if stopped else -1
    return {
        "mixes": results,
        "rows": rows,
        "answered": answered,
        "shed": shed,
        "memory_mib": peak[0],
    }


def bench_report(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    return report_million.measure(workdir, args.sessions, say)


# -- writing -----------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(args: argparse.Namespace, info: dict[str, str], results: dict[str, dict]) -> str:
    lines = [
        BEGIN,
        "",
        f"## Latest full run ({time.strftime('%Y-%m-%d')}, `make bench`)",
        "",
        f"Machine: {info['cpu']}, Linux {info['kernel']}; {info['python']}; load average"
        f" {info['load']} at the start. Peers: nginx {info['nginx']}, Apache {info['apache']}"
        f" with PHP {info['php']}, Knot {info['knot']}; load from wrk {info['wrk']} and"
        f" dnsperf {info['dnsperf']}. Servers pinned to CPU 0, load generators to CPU 1"
        " (`taskset`). Each figure is the median of the rounds; the servers took turns within"
        " each round, so they saw the same noise.",
        "",
    ]
    summary: list[tuple[str, str, str, str]] = []
    http = results.get("http")
    if http:
        servers: list[HttpServer] = http["servers"]
        by_name = {s.name: s for s in servers}
        lines += [
            "### HTTP: blue-ball fetches",
            "",
            f"wrk, 1 thread, {args.seconds} s per run, {args.rounds} rounds, one keep-alive"
            " URL per server on `[::1]`. µs CPU per request is the server's own CPU time"
            " (all its processes and threads) divided by the requests answered: less"
            " sensitive to CPU steal than requests per second.",
            "",
            "| server | concurrency | req/s | p50 ms | p99 ms | µs CPU/req | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for server in servers:
            for connections in args.connections:
                runs = server.runs.get(connections, [])
                lines.append(
                    f"| {server.label} | {connections} | {median([r['rate'] for r in runs]):,.0f}"
                    f" | {median([r['p50_ms'] for r in runs]):.2f}"
                    f" | {median([r['p99_ms'] for r in runs]):.2f}"
                    f" | {median([r['cpu_us'] for r in runs]):.0f}"
                    f" | {sum(r['errors'] + r['non2xx'] for r in runs):.0f} |"
                )
        lines += [
            "",
            "| ratio (req/s) | " + " | ".join(f"c={c}" for c in args.connections) + " | target |",
            "| --- | " + " | ".join("---:" for _ in args.connections) + " | --- |",
        ]
        probe = by_name["probe"]
        comparisons = [
            ("nginx", TARGETS["nginx"], "probe-server / nginx"),
            ("apache", TARGETS["apache"], "probe-server / Apache + PHP"),
            ("aiohttp", None, "probe-server / bare aiohttp (no logging)"),
            ("probe-aiohttp", None, "probe-server / itself without the fast path"),
        ]
        for peer, target, title in comparisons:
            ratios = []
            for connections in args.connections:
                ours = median([r["rate"] for r in probe.runs.get(connections, [])])
                theirs = median([r["rate"] for r in by_name[peer].runs.get(connections, [])])
                ratios.append(ours / theirs if theirs else 0.0)
            goal = f"≥ {target}×" if target else "(context)"
            lines.append(f"| {title} | " + " | ".join(f"{r:.2f}" for r in ratios) + f" | {goal} |")
            if target:
                met = [c for c, r in zip(args.connections, ratios, strict=True) if r >= target]
                missed = [c for c in args.connections if c not in met]
                normal = by_name["probe-normal"]
                normal_ratios = [
                    median([r["rate"] for r in normal.runs.get(c, [])])
                    / max(median([r["rate"] for r in by_name[peer].runs.get(c, [])]), 1)
                    for c in args.connections
                ]
                if not missed:
                    verdict_text = "met"
                elif met:
                    verdict_text = f"**met at {', '.join(f'c={c}' for c in met)} only**"
                else:
                    verdict_text = "**not met**"
                summary.append(
                    (
                        f"HTTP ≥ {target}× {'Apache + PHP' if peer == 'apache' else peer}",
                        " / ".join(
                            f"{r:.2f}× at c={c}"
                            for c, r in zip(args.connections, ratios, strict=True)
                        ),
                        verdict_text,
                        "with synchronous = normal: "
                        + " / ".join(f"{r:.2f}×" for r in normal_ratios),
                    )
                )
        checks = "; ".join(
            f"{name}: {rows:,} blue-ball rows for {answered:,} 200s"
            for name, (rows, answered) in http["durability"].items()
        )
        lines += [
            "",
            f"Durability check (rows in the server's database for the fetches wrk counted as"
            f" answered, warm-up included in the rows): {checks}. nginx's access log holds"
            f" {http['logs'].get('nginx', 0):,} lines, img.php's log"
            f" {http['logs'].get('apache', 0):,}.",
            "",
        ]
        summary.append(
            (
                f"server memory < {TARGETS['memory_mib']:.0f} MiB under load",
                f"{http['memory_mib']:.0f} MiB peak RSS (HTTP load)",
                verdict(http["memory_mib"] < TARGETS["memory_mib"]),
                "",
            )
        )
    dns = results.get("dns")
    if dns:
        lines += [
            "### DNS",
            "",
            f"dnsperf, 1 client, 100 queries outstanding, UDP on 127.0.0.1, {args.seconds} s"
            f" per run, {args.rounds} rounds; the same zone files (`dns/example.org.zone`,"
            " `dns/v6ns.example.org.zone`) in both servers; probe-server logs every query to"
            " SQLite as in production, rate limiting on with a limit above the benchmark's"
            " rate. Knot runs one UDP worker. When dnsperf on its core cannot saturate Knot,"
            " Knot's measured rate is dnsperf's ceiling; queries per CPU-second (answered ÷"
            " the server's CPU time) is then the fairer one-core comparison.",
            "",
            "| query mix | server | q/s | CPU | q per CPU-second | avg latency ms | lost |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        ratio_lines = []
        for mix, runs in dns["mixes"].items():
            for name, label in (("probe", "probe-server"), ("knot", "Knot")):
                rs = runs[name]
                lines.append(
                    f"| {mix} | {label} | {median([r['qps'] for r in rs]):,.0f}"
                    f" | {median([r['cpu'] for r in rs]):.0%}"
                    f" | {median([r['per_core'] for r in rs]):,.0f}"
                    f" | {median([r['latency_ms'] for r in rs]):.2f}"
                    f" | {sum(r['lost'] for r in rs):.0f} |"
                )
            measured = median([r["qps"] for r in runs["probe"]]) / max(
                median([r["qps"] for r in runs["knot"]]), 1
            )
            per_core = median([r["per_core"] for r in runs["probe"]]) / max(
                median([r["per_core"] for r in runs["knot"]]), 1
            )
            ratio_lines.append(f"| {mix} | {measured:.2f} | {per_core:.2f} | ≥ 0.2× |")
            summary.append(
                (
                    f"DNS ≥ 0.2× Knot ({mix})",
                    f"{measured:.2f}× measured, {per_core:.2f}× per CPU-second",
                    verdict(per_core >= TARGETS["knot"]),
                    "judged per CPU-second",
                )
            )
        lines += [
            "",
            "| ratio probe-server / Knot | q/s | per CPU-second | target |",
            "| --- | ---: | ---: | --- |",
            *ratio_lines,
            "",
            f"{dns['rows']:,} query rows stored for {dns['answered']:,.0f} queries answered"
            f" ({dns['shed']:,} rows shed, and counted, when the log's queue was over its"
            " share: the DNS reply never waits for its row);"
            f" probe-server's peak RSS under DNS load {dns['memory_mib']:.0f} MiB.",
            "",
        ]
    report = results.get("report")
    if report:
        counts = report["counts"]
        lines += [
            "### `probe-server report` on a million sessions",
            "",
            f"{counts['sessions']:,} sessions from {report['ipv4']:,} IPv4 addresses,"
            f" {counts['requests']:,} requests, {counts['answers']:,} answers"
            f" (`bench/report_million.py`; built in {report['built']:.0f} s). The report runs"
            " as a child process; cold: every address classified and geolocated and the"
            " answers stored; warm: every later report.",
            "",
            "| run | wall s | CPU s | peak RSS MiB | peak anonymous MiB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, run in report["runs"].items():
            lines.append(
                f"| {label} | {run['seconds']:.2f} | {run['cpu']:.2f} | {run['peak_rss']:,.0f}"
                f" | {run['peak_anon']:,.0f} |"
            )
        warm = report["runs"]["warm"]["seconds"]
        summary.append(
            (
                f"report on 1M sessions < {TARGETS['report_seconds']:.0f} s",
                f"{warm:.1f} s warm, {report['runs']['cold']['seconds']:.1f} s cold",
                verdict(warm < TARGETS["report_seconds"]),
                "warm: every report after the first",
            )
        )
        lines.append("")
    if summary:
        lines += [
            "### Targets",
            "",
            "| target | this run | | note |",
            "| --- | --- | --- | --- |",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary),
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_doc(text: str, path: Path) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        head, _, rest = old.partition(BEGIN)
        _, _, tail = rest.partition(END)
        new = head + text + tail
    else:
        title, _, rest = old.partition("\n")
        new = f"{title}\n\n{text}\n{rest}"
    path.write_text(new)


async def run(args: argparse.Namespace) -> int:
    if os.geteuid() == 0 and shutil.which("apt-get") and not args.no_install:
        install_peers()
    needed = {"http": ["wrk", "nginx", "apache2"], "dns": ["dnsperf", "knotd"], "report": []}
    parts = args.only or ["http", "dns", "report"]
    for part in parts:
        for tool in needed[part]:
            if not shutil.which(tool):
                say(f"{tool} is not installed: run make bench as root, or apt-get install it")
                return 1
    info = machine()
    results: dict[str, dict] = {}
    for part in parts:
        say(f"\n== {part}")
        with tempfile.TemporaryDirectory(prefix=f"probe-bench-{part}-") as tmp:
            workdir = Path(tmp)
            # nginx's and Apache's workers run as an unprivileged user when
            # started as root: they must reach the image and their logs.
            os.chmod(tmp, 0o755)
            if part == "http":
                results[part] = await bench_http(args, workdir)
            elif part == "dns":
                results[part] = await bench_dns(args, workdir)
            else:
                results[part] = bench_report(args, workdir)
    text = markdown(args, info, results)
    print("\n" + text)
    if args.write:
        write_doc(text, args.write)
        say(f"\nwritten to {args.write}")
    http = results.get("http")
    if http and any(rows < answered for rows, answered in http["durability"].values()):
        say("LOST: fewer rows stored than 200s answered")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["http", "dns", "report"])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--write", type=Path, default=DOC, help="the Markdown file to update")
    parser.add_argument("--no-write", dest="write", action="store_const", const=None)
    parser.add_argument("--no-install", action="store_true", help="do not apt-get the peers")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
