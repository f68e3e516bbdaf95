"""The paper's tables, as Markdown, CSV and JSON.

The numbers are those of the ``report_*`` views (schema 0004), read from
the rollups of schema 0014 (:mod:`.rollup`): at a million sessions the
views join millions of rows, the rollups hold one narrow row per IPv4
address, per IPv6 address and IPv4 address paired, and per completed HIT.
``build_report(..., from_views=True)`` reads the views themselves.

Which sessions count: every survey page served (every session), previews
and direct visits included, since the paper extracted its 530 IPv4 and 38
IPv6 addresses from every HTTP request its server handled, previews
included (§4.2, §4.4). An IPv4 address has native IPv6 when the blue balls
of any of its sessions were fetched from a native IPv6 address; Teredo,
6to4 and the other classes are counted in the IPv6 breakdown, never as
native. Table 3 and Figure 2 count completed HITs (see ``report_completions``).

The aggregation happens in SQLite; Python sees one row per country, per IPv6
address, per (batch, country) and per minute of Figure 2.

The other two experiments have their own sections: speed tests (§3.1, §4.1)
per vantage point (a worker at an IPv4 address) with the spread between
tools as the coefficient of variation, and the tool reports (§3.2).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import statistics
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import open_sync
from .addresses import CLASSES, DESCRIPTIONS
from .battery import HINTS, OUTCOMES, RESULTS, BatteryResults, Rate, battery_json, read_battery
from .rollup import refresh
from .stats import MIN_SAMPLE, wilson

UNKNOWN = "unknown"
OVERALL = "all"
TOP_COUNTRIES = 6  # the paper's Table 1 names six countries, then Others


@dataclass(frozen=True, slots=True)
class CountryCount:
    country: str
    name: str | None
    ipv4_addresses: int
    share: float


@dataclass(frozen=True, slots=True)
class Adoption:
    country: str
    ipv4_addresses: int
    native_ipv6: int
    rate: float | None
    ci95_low: float | None
    ci95_high: float | None

    @classmethod
    def of(cls, country: str, ipv4_addresses: int, native_ipv6: int) -> Adoption:
        if ipv4_addresses == 0:
            return cls(country, 0, 0, None, None, None)
        low, high = wilson(native_ipv6, ipv4_addresses)
        return cls(country, ipv4_addresses, native_ipv6, native_ipv6 / ipv4_addresses, low, high)


@dataclass(frozen=True, slots=True)
class Provider:
    asn: int | None
    org: str
    addresses: int


@dataclass(frozen=True, slots=True)
class Tunnel:
    cls: str
    country: str
    asn: int | None
    org: str
    addresses: int


@dataclass(frozen=True, slots=True)
class BatchResult:
    batch: str | None
    reward: str | None
    country: str
    completed: int
    correct: int


@dataclass(frozen=True, slots=True)
class Curve:
    """Figure 2: one batch's completed HITs in one country over time."""

    country: str
    batch: str | None
    reward: str | None
    hours: list[float]
    completed: list[int]  # cumulative, at each of ``hours``


@dataclass(frozen=True, slots=True)
class Speed:
    """One speed test's results at one vantage point (the mean of its sessions' first reports)."""

    test: str
    name: str
    download_mbps: float
    upload_mbps: float
    reports: int
    share_urls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VantagePoint:
    """A worker at an IPv4 address (worker None: direct visits), and what each tool measured."""

    worker_id: str | None
    ipv4: str
    ipv6: tuple[str, ...]
    batches: tuple[str, ...]
    speeds: tuple[Speed, ...]
    download_cv: float | None
    upload_cv: float | None


@dataclass(frozen=True, slots=True)
class ToolSpeeds:
    """One speed test across vantage points."""

    test: str
    name: str
    vantage_points: int
    download_median: float
    upload_median: float
    download_min: float
    download_max: float
    upload_min: float
    upload_max: float


@dataclass
class SpeedTests:
    vantage_points: list[VantagePoint] = field(default_factory=list)
    tools: list[ToolSpeeds] = field(default_factory=list)

    @property
    def download_cv_median(self) -> float | None:
        return _median([v.download_cv for v in self.vantage_points if v.download_cv is not None])

    @property
    def upload_cv_median(self) -> float | None:
        return _median([v.upload_cv for v in self.vantage_points if v.upload_cv is not None])


@dataclass(frozen=True, slots=True)
class ToolReport:
    """A session's first report of the run-a-tool page."""

    worker_id: str | None
    ipv4: str
    ipv6: tuple[str, ...]
    batch: str | None
    tool: str
    report: str
    t: float


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def coefficient_of_variation(values: list[float]) -> float | None:
    """Sample standard deviation over mean: the spread between tools (None below two)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean > 0 else None


@dataclass
class Report:
    sessions: dict[str, int]
    countries: list[CountryCount]
    overall: Adoption
    by_country: list[Adoption]
    ipv6_classes: dict[str, int]
    providers: list[Provider]
    tunnels: list[Tunnel]
    batches: list[BatchResult]
    curves: list[Curve]
    previews: dict[str, tuple[int, int]]  # visit -> (sessions, requests)
    geoip_builds: list[str]
    names: dict[str, str] = field(default_factory=dict)
    # Beyond the paper: the measurement battery's outcomes (analysis/battery.py).
    battery: BatteryResults = field(default_factory=BatteryResults)
    top: int = TOP_COUNTRIES
    min_sample: int = MIN_SAMPLE
    speedtests: SpeedTests = field(default_factory=SpeedTests)
    tool_reports: list[ToolReport] = field(default_factory=list)

    @property
    def ipv4_addresses(self) -> int:
        return self.overall.ipv4_addresses

    @property
    def ipv6_addresses(self) -> int:
        return sum(self.ipv6_classes.values())

    def name(self, country: str) -> str:
        if country == UNKNOWN:
            return "unknown (no GeoIP answer)"
        return self.names.get(country) or country

    def small(self, adoption: Adoption) -> bool:
        return adoption.ipv4_addresses < self.min_sample


def _country_key(row: tuple[str, int]) -> tuple[int, int, str]:
    country, count = row
    return (country == UNKNOWN, -count, country)


# SQLite caps the mapping at its compile-time maximum (2 GiB in common
# builds); pages past it are read the usual way.
MMAP_BYTES = 1 << 31


def open_reader(path: Path) -> sqlite3.Connection:
    """A connection for the report's queries, one per thread.

    The database file is memory-mapped: the queries make millions of index
    probes, and reading pages in place instead of copying each through a
    system call cuts their cost by more than half. Mapped pages are the
    kernel's page cache, shared and reclaimable, not memory of the process.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


def _country_tables(per_country: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Tables 1 and 2 and the sessions from rows of (country, name, IPv4 addresses,
    native, sessions, previews, accepted)."""
    names = {row[0]: row[1] for row in per_country if row[1]}
    total_ipv4 = sum(row[2] for row in per_country)
    ordered = sorted(per_country, key=lambda row: _country_key((row[0], row[2])))
    total = sum(row[4] for row in per_country)
    previews = sum(row[5] for row in per_country)
    accepted = sum(row[6] for row in per_country)
    return {
        "sessions": {
            "total": total,
            "previews": previews,
            "accepted": accepted,
            "direct": total - previews - accepted,
        },
        "countries": [CountryCount(c, n, k, k / total_ipv4) for c, n, k, *_ in ordered],
        "by_country": [Adoption.of(c, k, x) for c, _, k, x, *_ in ordered],
        "overall": Adoption.of(OVERALL, total_ipv4, sum(row[3] for row in per_country)),
        "names": names,
    }


def _ipv6_tables(rows: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    """The IPv6 breakdown from (class, country, asn, org), one row per address."""
    classes = dict.fromkeys(CLASSES, 0)
    providers: dict[int | None, list[Any]] = {}
    tunnels: dict[tuple[str, str, int | None], list[Any]] = {}
    for cls, country, asn, org in rows:
        classes[cls] = classes.get(cls, 0) + 1
        if cls == "native":
            entry = providers.setdefault(asn, [asn, None, 0])
            entry[1] = max(entry[1] or "", org or "") or None
            entry[2] += 1
        elif cls in ("teredo", "6to4", "nat64"):
            entry = tunnels.setdefault((cls, country, asn), [None, 0])
            entry[0] = max(entry[0] or "", org or "") or None
            entry[1] += 1
    return {
        "ipv6_classes": classes,
        "providers": sorted(
            (Provider(asn, org or UNKNOWN, n) for asn, org, n in providers.values()),
            key=lambda p: (-p.addresses, p.asn is None, p.asn or 0),
        ),
        "tunnels": sorted(
            (
                Tunnel(c, country, asn, org or UNKNOWN, n)
                for (c, country, asn), (org, n) in tunnels.items()
            ),
            key=lambda t: (CLASSES.index(t.cls), -t.addresses, t.country, t.asn or 0),
        ),
    }


def _geoip_builds(conn: sqlite3.Connection) -> list[str]:
    # One pass over the answers (half a million at a million sessions), not two.
    builds = conn.execute("SELECT DISTINCT country_db, asn_db FROM geoip")
    return sorted({build for pair in builds for build in pair if build})


def _addresses_from_views(conn: sqlite3.Connection) -> dict[str, Any]:
    """Tables 1 and 2, sessions, the IPv6 breakdown and the GeoIP builds, from the views."""
    per_country = conn.execute(
        "SELECT country, max(country_name), count(*), sum(native_ipv6),"
        " sum(sessions), sum(previews), sum(accepted)"
        " FROM report_ipv4 GROUP BY country"
    ).fetchall()
    ipv6 = conn.execute("SELECT class, country, asn, org FROM report_ipv6")
    return {
        **_country_tables(per_country),
        **_ipv6_tables(ipv6),
        "geoip_builds": _geoip_builds(conn),
    }


def _countries(conn: sqlite3.Connection) -> dict[str, Any]:
    """Tables 1 and 2 and the sessions, from the rollups (report_ipv4's numbers)."""
    native = dict(
        conn.execute(
            "SELECT COALESCE(g.country, 'unknown'), count(*)"
            " FROM (SELECT DISTINCT b.ipv4 FROM rollup_blue b"
            "       JOIN ipv6_addresses c ON c.address = b.ipv6 AND c.class = 'native') n"
            " LEFT JOIN geoip g ON g.address = n.ipv4"
            " GROUP BY 1"
        )
    )
    per_country = [
        (country, name, count, native.get(country, 0), sessions, previews, accepted)
        for country, name, count, sessions, previews, accepted in conn.execute(
            "SELECT COALESCE(g.country, 'unknown'), max(g.country_name), count(*),"
            " sum(i.sessions), sum(i.previews), sum(i.accepted)"
            " FROM rollup_ipv4 i LEFT JOIN geoip g ON g.address = i.ipv4"
            " GROUP BY 1"
        )
    ]
    return _country_tables(per_country)


def _ipv6_breakdown(conn: sqlite3.Connection) -> dict[str, Any]:
    """The IPv6 breakdown (report_ipv6's addresses) and the GeoIP builds, from the rollups."""
    ipv6 = conn.execute(
        "SELECT COALESCE(c.class, 'unclassified'), COALESCE(g.country, 'unknown'), g.asn, g.org"
        " FROM (SELECT DISTINCT ipv6 FROM rollup_blue) v"
        " LEFT JOIN ipv6_addresses c ON c.address = v.ipv6"
        " LEFT JOIN geoip g ON g.address = c.geo_address"
        " ORDER BY v.ipv6"
    )
    return {**_ipv6_tables(ipv6), "geoip_builds": _geoip_builds(conn)}


def _completion_tables(rows: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    """Table 3 and Figure 2 from completions counted per minute since publication.

    Rows are (country, batch, reward, hours, completed, correct), one per
    country, batch and minute, in order of country, batch and hours: Table 3
    adds the minutes up, Figure 2 accumulates them.
    """
    totals: dict[tuple[str, str | None], list[Any]] = {}
    curves: dict[tuple[str, str | None], Curve] = {}
    for country, batch, reward, hours, count, correct in rows:
        key = (country, batch)
        total = totals.setdefault(key, [reward, 0, 0])
        total[1] += count
        total[2] += correct
        if hours is None:  # no batch, so no publication to count hours from
            continue
        curve = curves.get(key)
        if curve is None:
            curve = curves[key] = Curve(country, batch, reward, [], [])
        curve.hours.append(hours)
        curve.completed.append((curve.completed[-1] if curve.completed else 0) + count)
    batches = [
        BatchResult(batch, reward, country, completed, correct)
        for (country, batch), (reward, completed, correct) in totals.items()
    ]
    batches.sort(key=lambda b: (b.country == UNKNOWN, b.country, _reward(b.reward), b.batch or ""))
    return {
        "batches": batches,
        "curves": sorted(
            curves.values(), key=lambda c: (c.country, _reward(c.reward), c.batch or "")
        ),
    }


# Ball-counting batches only (a red count is right or wrong); the other
# kinds have their own sections.
BALLS_ONLY = "batch IS NULL OR batch NOT IN (SELECT name FROM batches WHERE kind <> 'balls')"
MINUTE = "CAST(hours * 60 AS INTEGER) - (hours < 0)"


def _completions_from_views(conn: sqlite3.Connection) -> dict[str, Any]:
    """Table 3 and Figure 2 from one pass over the completions view."""
    return _completion_tables(
        conn.execute(
            "SELECT country, batch, max(reward), max(hours), count(*), sum(correct)"
            f" FROM report_completions WHERE {BALLS_ONLY}"
            f" GROUP BY country, batch, {MINUTE}"
            " ORDER BY country, batch, 4"
        )
    )


# report_completions' `submitted`: assignments MTurk reports submitted whose
# answer never reached us (no rolled-up completion), with the assignment's
# first session, located and timed as the view does.
SUBMITTED = """
SELECT CASE WHEN length(b.countries) = 2 THEN b.countries
            ELSE COALESCE((SELECT g.country FROM geoip g WHERE g.address = x.ipv4), 'unknown')
       END AS country,
       x.batch,
       (x.submit_time - b.start) / 3600.0 AS hours
FROM (
    SELECT s.ipv4, g.submit_time,
           COALESCE((SELECT h.batch FROM rollup_hits h WHERE h.hit_id = s.hit_id),
                    NULLIF(s.batch, '')) AS batch
    FROM assignments g INDEXED BY assignments_submitted
    JOIN sessions s ON s.id = (
        SELECT min(o.id) FROM sessions o INDEXED BY sessions_assignment
        WHERE o.assignment_id = g.assignment_id AND o.visit = 'accepted')
    WHERE g.submit_time IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM rollup_completions k WHERE k.key = 'a:' || g.assignment_id)
) x
LEFT JOIN rollup_batches b ON b.batch = x.batch
"""


def _completions(conn: sqlite3.Connection) -> dict[str, Any]:
    """Table 3 and Figure 2 from the rollups: report_completions' numbers.

    The completions of a batch with one target country come off the
    rollup's index already grouped; only those located by GeoIP, and the
    few submitted without an answer, are grouped here.
    """
    return _completion_tables(
        conn.execute(
            "SELECT country, batch,"
            " (SELECT r.reward FROM rollup_batches r WHERE r.batch = u.batch),"
            " max(hours), sum(completed), sum(correct)"
            " FROM ("
            "  SELECT batch_country AS country, batch, minute, max(hours) AS hours,"
            "         count(*) AS completed, sum(correct) AS correct"
            "  FROM rollup_completions INDEXED BY rollup_completions_groups"
            "  WHERE batch_country IS NOT NULL"
            "  GROUP BY batch_country, batch, minute"
            "  UNION ALL"
            "  SELECT COALESCE(g.country, 'unknown'), c.batch, c.minute, max(c.hours), count(*),"
            "         sum(c.correct)"
            "  FROM rollup_completions c INDEXED BY rollup_completions_groups"
            "  LEFT JOIN geoip g ON g.address = c.ipv4"
            "  WHERE c.batch_country IS NULL"
            "  GROUP BY 1, 2, 3"
            "  UNION ALL"
            f"  SELECT country, batch, {MINUTE}, max(hours), count(*), 0"
            f"  FROM ({SUBMITTED})"
            "  GROUP BY 1, 2, 3"
            " ) u"
            f" WHERE {BALLS_ONLY}"
            " GROUP BY country, batch, minute"
            " ORDER BY country, batch, 4"
        )
    )


def _visits_from_views(conn: sqlite3.Connection) -> dict[str, Any]:
    """§4.4: sessions and requests by kind of visit."""
    rows = conn.execute("SELECT visit, sessions, requests FROM report_previews")
    return {"previews": {visit: (sessions, requests) for visit, sessions, requests in rows}}


def _visits(conn: sqlite3.Connection) -> dict[str, Any]:
    """§4.4 from the rollup's counters, worked out as report_previews does."""
    counts: dict[str, int] = dict(conn.execute("SELECT name, value FROM rollup_counts"))
    previews = counts.get("sessions preview", 0)
    direct = counts.get("sessions direct", 0)
    total = previews + direct + counts.get("sessions accepted", 0)
    preview_requests = counts.get("requests preview", 0)
    direct_requests = counts.get("requests direct", 0)
    signed = counts.get("requests signed", 0)
    return {
        "previews": {
            "preview": (previews, preview_requests),
            "accepted": (total - previews - direct, signed - preview_requests - direct_requests),
            "direct": (direct, direct_requests),
            "none": (0, counts.get("requests", 0) - signed),
        }
    }


def _addresses_of(value: str | None) -> tuple[str, ...]:
    return tuple(sorted(set(value.split()))) if value else ()


def _kinds(conn: sqlite3.Connection) -> dict[str, Any]:
    """The speedtest and tool pages' reports (few rows: one per test per session)."""
    points: dict[tuple[str | None, str], dict[str, Any]] = {}
    for worker, ipv4, ipv6, batch, test, name, down, up, share in conn.execute(
        "SELECT worker_id, ipv4, ipv6, batch, test, name, download_mbps, upload_mbps, share_url"
        " FROM speedtest_results ORDER BY t, test"
    ):
        point = points.setdefault((worker, ipv4), {"ipv6": set(), "batches": set(), "tests": {}})
        point["ipv6"].update(_addresses_of(ipv6))
        if batch:
            point["batches"].add(batch)
        entry = point["tests"].setdefault(test, {"name": name, "down": [], "up": [], "share": []})
        entry["down"].append(down)
        entry["up"].append(up)
        if share:
            entry["share"].append(share)
    vantage_points = []
    by_test: dict[str, list[Speed]] = {}
    for (worker, ipv4), point in points.items():
        speeds = []
        for test, entry in sorted(point["tests"].items()):
            speed = Speed(
                test,
                entry["name"],
                statistics.fmean(entry["down"]),
                statistics.fmean(entry["up"]),
                len(entry["down"]),
                tuple(entry["share"]),
            )
            speeds.append(speed)
            by_test.setdefault(test, []).append(speed)
        vantage_points.append(
            VantagePoint(
                worker,
                ipv4,
                tuple(sorted(point["ipv6"])),
                tuple(sorted(point["batches"])),
                tuple(speeds),
                coefficient_of_variation([x.download_mbps for x in speeds]),
                coefficient_of_variation([x.upload_mbps for x in speeds]),
            )
        )
    vantage_points.sort(key=lambda v: (v.worker_id is None, v.worker_id or "", v.ipv4))
    tools = [
        ToolSpeeds(
            test,
            speeds[0].name,
            len(speeds),
            statistics.median(x.download_mbps for x in speeds),
            statistics.median(x.upload_mbps for x in speeds),
            min(x.download_mbps for x in speeds),
            max(x.download_mbps for x in speeds),
            min(x.upload_mbps for x in speeds),
            max(x.upload_mbps for x in speeds),
        )
        for test, speeds in sorted(by_test.items())
    ]
    tool_reports = [
        ToolReport(worker, ipv4, _addresses_of(ipv6), batch, tool, report_id, t)
        for worker, ipv4, ipv6, batch, tool, report_id, t in conn.execute(
            "SELECT worker_id, ipv4, ipv6, batch, tool, report, t FROM tool_results ORDER BY t"
        )
    ]
    return {
        "speedtests": SpeedTests(vantage_points, tools),
        "tool_reports": tool_reports,
    }


def _battery(conn: sqlite3.Connection) -> dict[str, Any]:
    """The battery's outcomes and probe results."""
    return {"battery": read_battery(conn)}


def _run(path: Path, part: Callable[[sqlite3.Connection], dict[str, Any]]) -> dict[str, Any]:
    conn = open_reader(path)
    try:
        # One snapshot per part: its queries add up to the same rows even
        # while the server (or another report's refresh) writes.
        conn.execute("BEGIN")
        found = part(conn)
        conn.execute("COMMIT")
        return found
    finally:
        conn.close()


# Longest first: two threads take them in turn.
PARTS = (_countries, _completions, _ipv6_breakdown, _visits, _kinds, _battery)
PARTS_FROM_VIEWS = (_completions_from_views, _addresses_from_views, _visits_from_views)


def build_report(
    path: Path,
    *,
    top: int = TOP_COUNTRIES,
    min_sample: int = MIN_SAMPLE,
    from_views: bool = False,
) -> Report:
    """Read every number of an enriched database.

    The rollups are brought up to date first (nothing to do when the
    enrichment step just did it), then read. ``from_views`` reads the
    ``report_*`` views instead, over the raw tables, as the first versions
    did: the same numbers, slowly; the tests compare the two.

    The groups of queries share nothing, and SQLite runs each without
    holding Python's GIL: on two threads, with a connection each, they take
    about the time of the longest group rather than of all of them.
    """
    if from_views:
        parts: tuple[Callable[[sqlite3.Connection], dict[str, Any]], ...] = (
            *PARTS_FROM_VIEWS,
            _kinds,
            _battery,
        )
    else:
        conn = open_sync(path)
        try:
            refresh(conn)
        finally:
            conn.close()
        parts = PARTS
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="report") as pool:
        futures = [pool.submit(_run, path, part) for part in parts]
        found: dict[str, Any] = {}
        for future in futures:
            found.update(future.result())
    return Report(**found, top=top, min_sample=min_sample)


def _reward(reward: str | None) -> float:
    try:
        return float(reward) if reward is not None else float("inf")
    except ValueError:
        return float("inf")


# -- JSON ----------------------------------------------------------------------


def _adoption_json(adoption: Adoption) -> dict[str, Any]:
    return {
        "ipv4_addresses": adoption.ipv4_addresses,
        "native_ipv6": adoption.native_ipv6,
        "rate": adoption.rate,
        "ci95_low": adoption.ci95_low,
        "ci95_high": adoption.ci95_high,
    }


def to_json(report: Report) -> dict[str, Any]:
    """The stable JSON document (keys as listed in issue 4)."""
    return {
        "sessions": {
            "total": report.sessions["total"],
            "previews": report.sessions["previews"],
            "accepted": report.sessions["accepted"],
        },
        "ipv4_addresses": report.ipv4_addresses,
        "ipv6_addresses": report.ipv6_addresses,
        "ipv6_classes": dict(report.ipv6_classes),
        "countries": [
            {"country": c.country, "ipv4_addresses": c.ipv4_addresses, "share": c.share}
            for c in report.countries
        ],
        "adoption": {
            "overall": _adoption_json(report.overall),
            "by_country": [{"country": a.country, **_adoption_json(a)} for a in report.by_country],
        },
        "providers": [
            {"asn": p.asn, "org": p.org, "addresses": p.addresses} for p in report.providers
        ],
        "batches": [
            {
                "batch": b.batch,
                "reward": b.reward,
                "country": b.country,
                "completed": b.completed,
                "correct": b.correct,
            }
            for b in report.batches
        ],
        "previews": {
            "requests": report.previews.get("preview", (0, 0))[1],
            "sessions": report.previews.get("preview", (0, 0))[0],
        },
        "speedtests": _speedtests_json(report.speedtests),
        "tool_reports": [
            {
                "worker_id": r.worker_id,
                "ipv4": r.ipv4,
                "ipv6": list(r.ipv6),
                "batch": r.batch,
                "tool": r.tool,
                "report": r.report,
            }
            for r in report.tool_reports
        ],
        "battery": battery_json(report.battery),
    }


def _speedtests_json(speedtests: SpeedTests) -> dict[str, Any]:
    return {
        "vantage_points": [
            {
                "worker_id": v.worker_id,
                "ipv4": v.ipv4,
                "ipv6": list(v.ipv6),
                "batches": list(v.batches),
                "download_cv": v.download_cv,
                "upload_cv": v.upload_cv,
                "tests": [
                    {
                        "test": x.test,
                        "name": x.name,
                        "download_mbps": x.download_mbps,
                        "upload_mbps": x.upload_mbps,
                        "reports": x.reports,
                        "share_urls": list(x.share_urls),
                    }
                    for x in v.speeds
                ],
            }
            for v in speedtests.vantage_points
        ],
        "tests": [
            {
                "test": t.test,
                "name": t.name,
                "vantage_points": t.vantage_points,
                "download_median": t.download_median,
                "upload_median": t.upload_median,
                "download_min": t.download_min,
                "download_max": t.download_max,
                "upload_min": t.upload_min,
                "upload_max": t.upload_max,
            }
            for t in speedtests.tools
        ],
        "download_cv_median": speedtests.download_cv_median,
        "upload_cv_median": speedtests.upload_cv_median,
    }


def render_json(report: Report) -> str:
    return json.dumps(to_json(report), indent=2) + "\n"


# -- Markdown ------------------------------------------------------------------


def _percent(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def _cell(value: Any) -> str:
    """One table cell: what came from outside (a worker's report id, a GeoIP
    organisation, a batch name) can neither end the cell or the row nor add
    markup."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, l or r."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|")
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _count(value: int) -> str:
    return f"{value:,}"


def _dollars(reward: str | None) -> str:
    return "reward unknown" if reward is None else f"${reward}"


def _batch_name(batch: str | None) -> str:
    return "(no batch)" if batch is None else batch


def _table1(report: Report) -> list[str]:
    shown = [c for c in report.countries if c.country != UNKNOWN][: report.top]
    rest = [c for c in report.countries if c not in shown]
    rows = [
        (f"{report.name(c.country)} ({c.country})", _count(c.ipv4_addresses), _percent(c.share, 1))
        for c in shown
    ]
    others = [c for c in rest if c.country != UNKNOWN]
    if others:
        count = sum(c.ipv4_addresses for c in others)
        label = f"Others ({len(others)} {'country' if len(others) == 1 else 'countries'})"
        rows.append((label, _count(count), _percent(count / report.ipv4_addresses, 1)))
    rows += [
        (report.name(c.country), _count(c.ipv4_addresses), _percent(c.share, 1))
        for c in rest
        if c.country == UNKNOWN
    ]
    total = report.ipv4_addresses
    rows.append(("**Total**", _count(total), "100%" if total else "–"))
    return [
        "## Table 1: Distribution of workers' geolocated IPv4 addresses",
        "",
        *_table(("Country", "IPv4 addresses", "Share"), rows, "lrr"),
    ]


def _adoption_row(report: Report, label: str, a: Adoption) -> tuple[str, ...]:
    mark = " *" if a.rate is not None and report.small(a) else ""
    interval = (
        "–" if a.ci95_low is None else f"{_percent(a.ci95_low, 2)} – {_percent(a.ci95_high, 2)}"
    )
    return (
        label,
        _count(a.ipv4_addresses),
        _count(a.native_ipv6),
        _percent(a.rate, 2) + mark,
        interval,
    )


def _table2(report: Report) -> list[str]:
    shown = [a for a in report.by_country if a.country != UNKNOWN][: report.top]
    shown += [a for a in report.by_country if a.country == UNKNOWN]
    rows = [_adoption_row(report, "Overall", report.overall)]
    rows += [_adoption_row(report, report.name(a.country), a) for a in shown]
    hidden = len(report.by_country) - len(shown)
    lines = [
        "## Table 2: IPv6 adoption (IPv4 addresses with native IPv6 ÷ IPv4 addresses)",
        "",
        *_table(
            ("", "IPv4 addresses", "native IPv6", "adoption", "95% interval (Wilson)"),
            rows,
            "lrrrr",
        ),
        "",
        f"\\* fewer than {report.min_sample} IPv4 addresses: too small a sample to say anything.",
    ]
    if hidden:
        lines.append(f"{hidden} more countries are in the CSV and JSON output.")
    return lines


def _ipv6(report: Report) -> list[str]:
    rows = [(DESCRIPTIONS.get(cls, cls), _count(n)) for cls, n in report.ipv6_classes.items()]
    rows.append(("**Total**", _count(report.ipv6_addresses)))
    lines = [
        "## IPv6 addresses by class",
        "",
        "Unique IPv6 addresses that fetched blue balls. Only native addresses count"
        " towards adoption.",
        "",
        *_table(("Class", "IPv6 addresses"), rows, "lr"),
        "",
        "### Native IPv6 addresses by provider",
        "",
    ]
    if report.providers:
        lines += _table(
            ("ASN", "Organisation", "Addresses"),
            (
                (f"AS{p.asn}" if p.asn is not None else "unknown", p.org, _count(p.addresses))
                for p in report.providers
            ),
            "llr",
        )
    else:
        lines.append("No native IPv6 address.")
    if report.tunnels:
        lines += [
            "",
            "### Tunnelled and translated IPv6 by the network of their embedded IPv4 address",
            "",
            "A Teredo or 6to4 address would geolocate to its relay; these rows locate the"
            " IPv4 address inside it instead (for Teredo, the client's public address).",
            "",
            *_table(
                ("Class", "Country", "ASN", "Organisation", "Addresses"),
                (
                    (
                        t.cls,
                        report.name(t.country),
                        f"AS{t.asn}" if t.asn is not None else "unknown",
                        t.org,
                        _count(t.addresses),
                    )
                    for t in report.tunnels
                ),
                "lllll",
            ),
        ]
    return lines


def _table3(report: Report) -> list[str]:
    lines = ["## Table 3: Completed and correct (red count right) HITs by reward", ""]
    if not report.batches:
        return [*lines, "No completed HIT."]
    rewards = sorted({b.reward for b in report.batches}, key=_reward)
    countries: list[str] = []
    cells: dict[tuple[str, str | None], list[int]] = {}
    for b in report.batches:
        if b.country not in countries:
            countries.append(b.country)
        cell = cells.setdefault((b.country, b.reward), [0, 0])
        cell[0] += b.completed
        cell[1] += b.correct
    countries.sort(
        key=lambda c: (c == UNKNOWN, -sum(v[0] for k, v in cells.items() if k[0] == c), c)
    )
    header = ["Country"]
    for reward in rewards:
        header += [f"{_dollars(reward)} total", f"{_dollars(reward)} correct"]
    rows = []
    for country in countries:
        row = [report.name(country)]
        for reward in rewards:
            total, correct = cells.get((country, reward), (0, 0))
            row += [_count(total), _count(correct)]
        rows.append(row)
    lines += _table(header, rows, "l" + "rr" * len(rewards))
    lines += [
        "",
        "Per batch:",
        "",
        *_table(
            ("Batch", "Reward", "Country", "Completed", "Correct"),
            (
                (
                    _batch_name(b.batch),
                    _dollars(b.reward),
                    report.name(b.country),
                    _count(b.completed),
                    _count(b.correct),
                )
                for b in report.batches
            ),
            "lllrr",
        ),
    ]
    return lines


def _previews(report: Report) -> list[str]:
    labels = {
        "preview": "previews",
        "accepted": "accepted assignments",
        "direct": "direct visits",
    }
    rows = []
    total_sessions = total_requests = 0
    for visit, label in labels.items():
        sessions, requests = report.previews.get(visit, (0, 0))
        total_sessions += sessions
        total_requests += requests
        rows.append((label, _count(sessions), _count(requests)))
    _, other = report.previews.get("none", (0, 0))
    total_requests += other
    rows.append(("not tied to a session", "–", _count(other)))
    rows.append(("**Total**", _count(total_sessions), _count(total_requests)))
    _, preview_requests = report.previews.get("preview", (0, 0))
    lines = [
        "## Previews (§4.4)",
        "",
        *_table(("", "Sessions", "HTTP requests"), rows, "lrr"),
    ]
    if total_requests:
        lines += [
            "",
            f"{_count(preview_requests)} of {_count(total_requests)} HTTP requests"
            f" ({_percent(preview_requests / total_requests, 1)}) came from workers"
            " previewing the HIT.",
        ]
    return lines


def _mbps(value: float) -> str:
    return f"{value:,.1f}"


def _cv(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _who(worker_id: str | None) -> str:
    return worker_id or "(direct visit)"


def _speedtests(report: Report, figure: str | None) -> list[str]:
    speedtests = report.speedtests
    if not speedtests.vantage_points:
        return []
    lines = [
        "## Speed tests (§3.1, §4.1)",
        "",
        f"{_count(len(speedtests.vantage_points))} vantage points (a worker at an IPv4"
        " address); each tool's speeds are the first report of each session, averaged over a"
        " vantage point's sessions. The spread between tools at one vantage point is the"
        " coefficient of variation (sample standard deviation ÷ mean) of their speeds; the"
        f" median over vantage points is {_cv(speedtests.download_cv_median)} for download"
        f" and {_cv(speedtests.upload_cv_median)} for upload.",
        "",
        *_table(
            (
                "Test",
                "Vantage points",
                "Median download (Mbit/s)",
                "Download range",
                "Median upload (Mbit/s)",
                "Upload range",
            ),
            (
                (
                    t.name,
                    _count(t.vantage_points),
                    _mbps(t.download_median),
                    f"{_mbps(t.download_min)} – {_mbps(t.download_max)}",
                    _mbps(t.upload_median),
                    f"{_mbps(t.upload_min)} – {_mbps(t.upload_max)}",
                )
                for t in speedtests.tools
            ),
            "lrrrrr",
        ),
        "",
        "Per vantage point (download / upload in Mbit/s):",
        "",
    ]
    tests = [t.test for t in speedtests.tools]
    names = {t.test: t.name for t in speedtests.tools}
    rows = []
    for v in speedtests.vantage_points:
        measured = {x.test: x for x in v.speeds}
        rows.append(
            (
                _who(v.worker_id),
                v.ipv4,
                " ".join(v.ipv6) or "none",
                *(
                    f"{_mbps(measured[t].download_mbps)} / {_mbps(measured[t].upload_mbps)}"
                    if t in measured
                    else "–"
                    for t in tests
                ),
                _cv(v.download_cv),
                _cv(v.upload_cv),
            )
        )
    lines += _table(
        ("Worker", "IPv4", "IPv6", *(names[t] for t in tests), "CV download", "CV upload"),
        rows,
        "lll" + "r" * (len(tests) + 2),
    )
    lines += [
        "",
        f"![Speed tests by vantage point]({figure})"
        if figure
        else "Drawn as speedtests.png with --out.",
    ]
    return lines


def _tool_reports(report: Report) -> list[str]:
    if not report.tool_reports:
        return []
    return [
        "## Tool reports (§3.2)",
        "",
        f"{_count(len(report.tool_reports))} sessions reported a report id of the tool.",
        "",
        *_table(
            ("Worker", "IPv4", "IPv6", "Batch", "Tool", "Report"),
            (
                (
                    _who(r.worker_id),
                    r.ipv4,
                    " ".join(r.ipv6) or "none",
                    _batch_name(r.batch),
                    r.tool,
                    r.report,
                )
                for r in report.tool_reports
            ),
            "llllll",
        ),
    ]


def render_markdown(
    report: Report, figure: str | None = None, speed_figure: str | None = None
) -> str:
    sources = "; ".join(report.geoip_builds) if report.geoip_builds else "none (all unknown)"
    lines = [
        "# IPv6 adoption through the ball-counting survey",
        "",
        f"{_count(report.sessions['total'])} sessions ({_count(report.sessions['previews'])}"
        f" previews, {_count(report.sessions['accepted'])} accepted assignments,"
        f" {_count(report.sessions['direct'])} direct visits);"
        f" {_count(report.ipv4_addresses)} unique IPv4 and {_count(report.ipv6_addresses)}"
        " unique IPv6 addresses.",
        "",
        f"GeoIP answers from: {sources}.",
        "",
        "Every session counts, previews and direct visits included, as the paper counted"
        " every HTTP request (§4.4). An IPv4 address has native IPv6 when the blue balls of"
        " any of its sessions were fetched from a native IPv6 address; Teredo, 6to4 and"
        " other classes are counted below but not as native.",
        "",
        *_table1(report),
        "",
        *_table2(report),
        "",
        *_ipv6(report),
        "",
        *_table3(report),
        "",
        "## Figure 2: Completed HITs by hours since the batch was published",
        "",
        f"![Figure 2]({figure})"
        if figure
        else "Written as figure2.png and figure2.csv with --out.",
        "",
        *_previews(report),
        "",
        *_battery_markdown(report),
    ]
    for section in (_speedtests(report, speed_figure), _tool_reports(report)):
        if section:
            lines += ["", *section]
    return "\n".join(lines) + "\n"


def _rate_cells(report: Report, rate: Rate | None) -> tuple[str, str, str, str]:
    if rate is None:
        return ("–", "–", "–", "–")
    mark = " *" if rate.ipv4_addresses < report.min_sample else ""
    return (
        _count(rate.ipv4_addresses),
        _count(rate.yes),
        _percent(rate.rate, 1) + mark,
        f"{_percent(rate.ci95_low, 1)} – {_percent(rate.ci95_high, 1)}",
    )


def _battery_markdown(report: Report) -> list[str]:
    battery = report.battery
    lines = ["## Beyond the paper: the IPv6 measurement battery", ""]
    if not battery.sessions:
        return [*lines, "No page carried the battery (`battery.probes` in the config)."]
    lines += [
        f"{_count(battery.sessions)} sessions from {_count(battery.ipv4_addresses)} IPv4"
        " addresses carried test-ipv6.com's and APNIC Labs' probes beside the balls. As in"
        " the paper's tables, the unit is the IPv4 address: each outcome counts the addresses"
        " where it was measured (its probe on the page, not still loading when the page was"
        " closed), yes when any of the address's sessions measured yes.",
        "",
        *_table(
            ("Outcome", "IPv4 addresses measured", "Yes", "Rate", "95% interval (Wilson)"),
            (
                (text, *_rate_cells(report, battery.overall.get(key)))
                for key, text in (*OUTCOMES.items(), *HINTS.items())
            ),
            "lrrrr",
        ),
        "",
        f"\\* fewer than {report.min_sample} IPv4 addresses.",
        "",
        "### By country (of the session's IPv4 address)",
        "",
    ]
    countries = sorted(
        battery.by_country.items(),
        key=lambda item: (
            item[0] == UNKNOWN,
            -max((r.ipv4_addresses for r in item[1].values()), default=0),
            item[0],
        ),
    )
    shown = countries[: report.top]
    lines += _table(
        ("Outcome", *(report.name(country) for country, _ in shown)),
        (
            (
                text,
                *(
                    "–"
                    if rates.get(key) is None
                    else f"{rates[key].yes}/{rates[key].ipv4_addresses}"
                    f" ({_percent(rates[key].rate, 0)},"
                    f" {_percent(rates[key].ci95_low, 0)}–{_percent(rates[key].ci95_high, 0)})"
                    for _, rates in shown
                ),
            )
            for key, text in OUTCOMES.items()
        ),
        "l" + "r" * len(shown),
    )
    if len(countries) > len(shown):
        lines.append(
            f"{len(countries) - len(shown)} more countries are in the CSV and JSON output."
        )
    lines += [
        "",
        "### Probe results",
        "",
        *_table(
            ("Probe", *RESULTS),
            (
                (probe, *(_count(counts.get(result, 0)) for result in RESULTS))
                for probe, counts in battery.probes.items()
            ),
            "l" + "r" * len(RESULTS),
        ),
    ]
    return lines


# -- CSV -----------------------------------------------------------------------


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _adoption_csv_row(report: Report, a: Adoption) -> tuple[Any, ...]:
    small = int(report.small(a)) if a.rate is not None else ""
    return (a.country, a.ipv4_addresses, a.native_ipv6, a.rate, a.ci95_low, a.ci95_high, small)


def render_csv(report: Report) -> dict[str, str]:
    """One CSV document per table, by file name."""
    return {
        "sessions.csv": _csv(("visit", "sessions"), report.sessions.items()),
        "table1_countries.csv": _csv(
            ("country", "country_name", "ipv4_addresses", "share"),
            ((c.country, c.name or "", c.ipv4_addresses, c.share) for c in report.countries),
        ),
        "table2_adoption.csv": _csv(
            (
                "country",
                "ipv4_addresses",
                "native_ipv6",
                "rate",
                "ci95_low",
                "ci95_high",
                "small_sample",
            ),
            [_adoption_csv_row(report, report.overall)]
            + [_adoption_csv_row(report, a) for a in report.by_country],
        ),
        "ipv6_classes.csv": _csv(("class", "addresses"), report.ipv6_classes.items()),
        "providers.csv": _csv(
            ("asn", "org", "addresses"),
            ((p.asn if p.asn is not None else "", p.org, p.addresses) for p in report.providers),
        ),
        "tunnels.csv": _csv(
            ("class", "country", "asn", "org", "addresses"),
            (
                (t.cls, t.country, t.asn if t.asn is not None else "", t.org, t.addresses)
                for t in report.tunnels
            ),
        ),
        "table3_batches.csv": _csv(
            ("batch", "reward", "country", "completed", "correct"),
            (
                (b.batch or "", b.reward or "", b.country, b.completed, b.correct)
                for b in report.batches
            ),
        ),
        "previews.csv": _csv(
            ("visit", "sessions", "requests"),
            ((visit, s, r) for visit, (s, r) in report.previews.items()),
        ),
        "speedtests.csv": _csv(
            (
                "worker_id",
                "ipv4",
                "ipv6",
                "test",
                "name",
                "download_mbps",
                "upload_mbps",
                "reports",
                "download_cv",
                "upload_cv",
            ),
            (
                (
                    v.worker_id or "",
                    v.ipv4,
                    " ".join(v.ipv6),
                    x.test,
                    x.name,
                    x.download_mbps,
                    x.upload_mbps,
                    x.reports,
                    "" if v.download_cv is None else v.download_cv,
                    "" if v.upload_cv is None else v.upload_cv,
                )
                for v in report.speedtests.vantage_points
                for x in v.speeds
            ),
        ),
        "tool_reports.csv": _csv(
            ("worker_id", "ipv4", "ipv6", "batch", "tool", "report"),
            (
                (r.worker_id or "", r.ipv4, " ".join(r.ipv6), r.batch or "", r.tool, r.report)
                for r in report.tool_reports
            ),
        ),
        "battery_outcomes.csv": _csv(
            (
                "country",
                "outcome",
                "ipv4_addresses",
                "yes",
                "rate",
                "ci95_low",
                "ci95_high",
                "small_sample",
            ),
            (
                (
                    country,
                    outcome,
                    r.ipv4_addresses,
                    r.yes,
                    r.rate,
                    r.ci95_low,
                    r.ci95_high,
                    int(r.small_sample),
                )
                for country, rates in (
                    (OVERALL, report.battery.overall),
                    *sorted(report.battery.by_country.items()),
                )
                for outcome, r in rates.items()
            ),
        ),
        "battery_probes.csv": _csv(
            ("probe", "result", "sessions"),
            (
                (probe, result, count)
                for probe, counts in report.battery.probes.items()
                for result, count in counts.items()
            ),
        ),
    }


def figure_csv(report: Report) -> str:
    return _csv(
        ("country", "batch", "reward", "hours", "completed"),
        (
            (c.country, c.batch or "", c.reward or "", f"{h:.6f}", n)
            for c in report.curves
            for h, n in zip(c.hours, c.completed, strict=True)
        ),
    )


def write_outputs(report: Report, fmt: str, out: Path) -> list[Path]:
    """Write the report in ``fmt`` and Figure 2 (PNG and CSV) into ``out``.

    With speed-test reports in the database, also their figure, speedtests.png.
    """
    # matplotlib loads only when a figure is drawn
    from .figure import write_png, write_speedtests_png

    out.mkdir(parents=True, exist_ok=True)
    written = []
    png = out / "figure2.png"
    write_png(report, png)
    (out / "figure2.csv").write_text(figure_csv(report), encoding="utf-8")
    written += [png, out / "figure2.csv"]
    speed_png = None
    if report.speedtests.vantage_points:
        speed_png = out / "speedtests.png"
        write_speedtests_png(report.speedtests, speed_png)
        written.append(speed_png)
    if fmt == "md":
        path = out / "report.md"
        path.write_text(
            render_markdown(
                report, figure=png.name, speed_figure=speed_png.name if speed_png else None
            ),
            encoding="utf-8",
        )
        written.append(path)
    elif fmt == "json":
        path = out / "report.json"
        path.write_text(render_json(report), encoding="utf-8")
        written.append(path)
    else:
        for name, text in render_csv(report).items():
            (out / name).write_text(text, encoding="utf-8")
            written.append(out / name)
    return written
