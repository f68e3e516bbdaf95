"""The DNS benchmark's queries and its load generator (for ``bench/suite.py``).

``make bench ONLY=dns`` runs it: probe-server and Knot, both pinned to CPU 0,
serve ``dns/example.org.zone`` and ``dns/v6ns.example.org.zone``; dnsperf,
pinned to CPU 1, replays one query file against each in turn, alternating for
several rounds, so both see the same machine noise. The query file mixes the
measurement names (A-only, AAAA-only, NODATA, NXDOMAIN, dual-stack, CNAME)
with a share of per-session wildcard names, each a fresh 32-character token.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

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
