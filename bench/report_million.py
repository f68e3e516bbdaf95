"""Time ``probe-server report`` on 1,000,000 synthetic sessions.

Builds a database with the server's own INSERT statements (sessions, every
request they would make, answers) plus batches, HITs and assignments, and a
GeoIP Country and ASN database of its own (mmdb-writer). Then runs the report
in a child process three times and prints wall time and peak memory (the
child's maximum resident set size):

1. cold: every address is classified and geolocated and the answers stored;
2. warm: the stored answers are reused, as in every later report;
3. warm again, Markdown instead of JSON.

Run with ``.venv/bin/python bench/report_million.py`` (``--sessions`` to
scale down). The composition is loosely the paper's: 61% USA, 28% India, a
long tail of countries; 45% of sessions are previews; 8% of IPv4 addresses
fetch blue balls, of them 60% natively, 20% over Teredo, 20% over 6to4.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from mmdb_writer import MmdbU32, MMDBWriter
from netaddr import IPSet

from probe_server.store import open_sync
from probe_server.testing import write_config
from probe_server.web import INSERT_ANSWER, INSERT_REQUEST, INSERT_SESSION

COUNTRIES = [("US", "United States", 0.61), ("IN", "India", 0.28), ("GB", "United Kingdom", 0.025)]
COUNTRIES += [("JP", "Japan", 0.013), ("CA", "Canada", 0.013), ("IE", "Ireland", 0.006)]
TAIL = ["DE", "FR", "BR", "PH", "PK", "RO", "IT", "ES", "MX", "NL", "PL", "RU", "BD", "VN", "NG"]
COUNTRIES += [(code, code, 0.053 / len(TAIL)) for code in TAIL]
REWARDS = ["0.05", "0.10", "0.20", "0.40"]
AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120"
)
START = 1_700_000_000.0


def build_geoip(directory: Path, blocks: int, rng: random.Random) -> tuple[Path, Path, list]:
    """Country and ASN databases: ``blocks`` IPv4 /16s and one IPv6 /32 per AS."""
    country = MMDBWriter(6, "GeoLite2-Country", ["en"], "bench", ipv4_compatible=True)
    asn = MMDBWriter(6, "GeoLite2-ASN", ["en"], "bench", ipv4_compatible=True)
    weights = [w for _, _, w in COUNTRIES]
    networks = []
    for i in range(blocks):
        code, name, _ = rng.choices(COUNTRIES, weights)[0]
        first = (11 + i // 256) << 24 | (i % 256) << 16
        cidr = f"{IPv4Address(first)}/16"
        number = 64512 + i % 500
        country.insert_network(
            IPSet([cidr]), {"country": {"iso_code": code, "names": {"en": name}}}
        )
        asn.insert_network(
            IPSet([cidr]),
            {
                "autonomous_system_number": MmdbU32(number),
                "autonomous_system_organization": f"AS{number}",
            },
        )
        networks.append((first, code))
    for i in range(500):
        cidr = f"2600:{i:x}::/32"
        country.insert_network(
            IPSet([cidr]), {"country": {"iso_code": "US", "names": {"en": "United States"}}}
        )
        asn.insert_network(
            IPSet([cidr]),
            {
                "autonomous_system_number": MmdbU32(7000 + i),
                "autonomous_system_organization": f"ISP {i}",
            },
        )
    country_path, asn_path = directory / "country.mmdb", directory / "asn.mmdb"
    country.to_db_file(str(country_path))
    asn.to_db_file(str(asn_path))
    return country_path, asn_path, networks


def ipv6_for(worker: int, rng: random.Random, ipv4: int) -> str | None:
    """The IPv6 address a worker fetches blue balls from, if any."""
    if rng.random() >= 0.08:
        return None
    kind = rng.random()
    if kind < 0.6:
        return str(IPv6Address((0x2600 << 112) | (rng.randrange(500) << 96) | worker))
    if kind < 0.8:
        server = int(IPv4Address("65.54.227.120"))
        port = rng.randrange(1024, 65536)
        value = (0x20010000 << 96) | server << 64 | (port ^ 0xFFFF) << 32 | (ipv4 ^ 0xFFFFFFFF)
        return str(IPv6Address(value))
    return str(IPv6Address((0x2002 << 112) | ipv4 << 80 | 1))


def rows(sessions: int, workers: int, networks: list, rng: random.Random) -> Iterator[tuple]:
    """Yield (statement, params) in the order the server would write them."""
    addresses = []
    for worker in range(workers):
        first, _ = networks[rng.randrange(len(networks))]
        ipv4 = first | rng.randrange(1, 65535)
        addresses.append((str(IPv4Address(ipv4)), ipv6_for(worker, rng, ipv4)))
    for i in range(sessions):
        ipv4, ipv6 = addresses[i % workers]
        # Random like the server's tokens, so indexes on them are as scattered.
        token = base64.b32encode(rng.randbytes(20)).decode().lower()
        created = START + i * 0.25
        red, blue = rng.randint(1, 4), rng.randint(1, 4)
        draw = rng.random()
        batch = i % 8
        hit = f"HIT{batch}x{i % 100:03d}"
        if draw < 0.45:
            visit, assignment, worker_id = "preview", "ASSIGNMENT_ID_NOT_AVAILABLE", None
        elif draw < 0.95:
            visit, assignment, worker_id = "accepted", f"A{i:020d}", f"W{i % workers:012d}"
        else:
            visit, assignment, worker_id, hit = "direct", None, None, None
        yield (
            INSERT_SESSION,
            (
                token,
                created,
                ipv4,
                40000,
                AGENT,
                red,
                blue,
                visit,
                assignment,
                hit,
                worker_id,
                None,
                "",
            ),
        )
        path = f"/?assignmentId={assignment}&hitId={hit}&workerId={worker_id}"
        yield (
            INSERT_REQUEST,
            (created, "ipv4", ipv4, 40000, "GET", path, "survey", token, 1, None, 200, 2000, AGENT),
        )
        for ball in range(1, red + 1):
            yield (
                INSERT_REQUEST,
                (
                    created + 0.1,
                    "ipv4",
                    ipv4,
                    40001,
                    "GET",
                    f"/red/{token}/{ball}.png?ip={ipv4}",
                    "red",
                    token,
                    1,
                    ball,
                    200,
                    300,
                    AGENT,
                ),
            )
        if ipv6 is not None:
            for ball in range(1, blue + 1):
                yield (
                    INSERT_REQUEST,
                    (
                        created + 0.2,
                        "ipv6",
                        ipv6,
                        40002,
                        "GET",
                        f"/blue/{token}/{ball}.png?ip={ipv4}",
                        "blue",
                        token,
                        1,
                        ball,
                        200,
                        300,
                        AGENT,
                    ),
                )
        if visit != "preview" and rng.random() < 0.95:
            reported = red if rng.random() < 0.9 else red + 1
            yield (
                INSERT_REQUEST,
                (
                    created + 30,
                    "ipv4",
                    ipv4,
                    40003,
                    "POST",
                    "/submit",
                    "submit",
                    token,
                    1,
                    None,
                    200,
                    500,
                    AGENT,
                ),
            )
            yield INSERT_ANSWER, (token, created + 30, ipv4, reported, blue, reported == red)


def build_database(path: Path, sessions: int, networks: list, rng: random.Random) -> None:
    """The server's schema (its own migrations), filled with its own INSERT statements.

    For speed only, and with the same result: the indexes of the four big
    tables are dropped while the rows go in and created again afterwards
    from their own SQL in sqlite_master (one sort each instead of millions
    of inserts at random places), and the file is written without a
    journal, then switched back to WAL as the server keeps it.
    """
    open_sync(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        " AND tbl_name IN ('sessions', 'requests', 'answers', 'assignments')"
    ).fetchall()
    conn.execute("BEGIN")
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    for batch in range(8):
        conn.execute(
            "INSERT INTO batches (name, reward, countries, published) VALUES (?,?,?,?)",
            (f"b{batch}", REWARDS[batch % 4], "US" if batch < 4 else "IN", START),
        )
        conn.executemany(
            "INSERT INTO hits (hit_id, batch, max_assignments, created) VALUES (?,?,?,?)",
            [(f"HIT{batch}x{h:03d}", f"b{batch}", 100, START) for h in range(100)],
        )
    chunk: dict[str, list[tuple]] = {}
    for count, (sql, params) in enumerate(rows(sessions, sessions // 2, networks, rng)):
        chunk.setdefault(sql, []).append(params)
        if count % 200_000 == 0:
            for statement, values in chunk.items():
                conn.executemany(statement, values)
            chunk.clear()
    for statement, values in chunk.items():
        conn.executemany(statement, values)
    for _, sql in indexes:
        conn.execute(sql)
    # Half the assignments are synced from MTurk, submitted a minute after the answer.
    conn.execute(
        "INSERT INTO assignments (assignment_id, hit_id, worker_id, status, submit_time, synced)"
        " SELECT s.assignment_id, s.hit_id, s.worker_id, 'Submitted', a.t + 60, a.t + 3600"
        " FROM sessions s JOIN answers a ON a.session_token = s.token"
        " WHERE s.visit = 'accepted' AND s.id % 2 = 0"
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()


def run_report(db: Path, config: Path, out: Path, fmt: str) -> dict[str, float]:
    """Wall and CPU seconds and peak memory (MiB) of one ``probe-server report`` child.

    Peak RSS counts the pages of the memory-mapped database the queries
    touched (page cache, shared and reclaimable); peak anonymous memory,
    sampled from /proc every 20 ms, is what the process itself allocated.
    """
    command = [
        sys.executable,
        "-m",
        "probe_server",
        "report",
        "--db",
        str(db),
        "--config",
        str(config),
        "--format",
        fmt,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    anonymous = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            text = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("RssAnon:"):
                anonymous = max(anonymous, int(line.split()[1]))
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"report failed with status {child.returncode}")
    return {
        "seconds": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss / 1024,
        "peak_anon": anonymous / 1024,
    }


RUNS = (("cold", "json"), ("warm", "json"), ("warm, Markdown", "md"))


def measure(workdir: Path, sessions: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the database in ``workdir`` (unless it is there), then time the report.

    Returns the runs (``RUNS``: wall and CPU seconds, peak memory), the build
    time (None for a kept database), the row counts and the IPv4 addresses.
    """
    rng = random.Random(4)
    db = workdir / "probe.db"
    built = None
    if not db.exists():
        started = time.perf_counter()
        *_, networks = build_geoip(workdir, 2000, rng)
        build_database(db, sessions, networks, rng)
        built = time.perf_counter() - started
        say(f"built {sessions:,} sessions in {built:.1f} s")
    config = write_config(
        workdir / "report.toml",
        {"geoip": {"country_db": "country.mmdb", "asn_db": "asn.mmdb"}},
    )
    open_sync(db).close()  # a database kept from an older version gets the latest schema
    with sqlite3.connect(db) as conn:
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("sessions", "requests", "answers", "assignments")
        }
        distinct = conn.execute("SELECT count(DISTINCT ipv4) FROM sessions").fetchone()[0]
        # Start cold: no class, no GeoIP answer stored yet, nothing rolled up.
        conn.execute("DELETE FROM geoip")
        conn.execute("DELETE FROM ipv6_addresses")
        conn.execute("DELETE FROM enriched")
        conn.execute("DELETE FROM rollup_state")
    size = sum(p.stat().st_size for p in workdir.glob("probe.db*")) / 2**20
    say(
        ", ".join(f"{n:,} {t}" for t, n in counts.items())
        + f"; {distinct:,} IPv4 addresses; database {size:,.0f} MiB"
    )
    say(f"load average before the runs: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    runs = {}
    for label, fmt in RUNS:
        run = runs[label] = run_report(db, config, workdir / "out", fmt)
        say(
            f"report --format {fmt}, {label}: {run['seconds']:.2f} s"
            f" (CPU {run['cpu']:.2f} s), peak RSS {run['peak_rss']:,.0f} MiB,"
            f" peak anonymous {run['peak_anon']:,.0f} MiB"
        )
    return {"runs": runs, "built": built, "counts": counts, "ipv4": distinct}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-report-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        measure(workdir, args.sessions, lambda text: print(text, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
