"""The battery's results: what `probe-server report` adds beside the paper's tables.

The unit is the IPv4 address, as in the paper's tables (``report_battery``,
schema 13): an address counts once for an outcome however many of its
sessions measured it, yes when any of them measured yes (the paper's rule
for native IPv6), overall and per country, with Wilson intervals. A worker
who reloads the page or takes several HITs then weighs no more here than in
Table 2, and the battery's rates sit beside the paper's adoption rate.
``battery_outcomes`` keeps one row per session (per page: test-ipv6.com's
and APNIC's sample) for analyses that want that. Enrichment classifies
the IPv6 addresses that fetched battery probes (a worker whose AAAA lookups
fail fetches only the literal) and pairs each session's IPv4 and IPv6
addresses for the 6rd hint.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

from .addresses import classify, sixrd_bits

# The outcomes in the order reports list them, with what each says.
OUTCOMES = {
    "ipv4_only": "IPv4 only (nothing over IPv6; the dual-stack name over IPv4)",
    "ipv6_capable": "IPv6-capable (a blue ball over IPv6)",
    "ipv6_preferred": "IPv6-preferred (the dual-stack name over IPv6)",
    "broken_dual_stack": "broken dual stack (the dual-stack name failed, IPv4 worked)",
    "ipv6_without_aaaa": "IPv6 without AAAA resolution (literal worked, name failed)",
    "mtu_trouble": "IPv6 path-MTU trouble (large response lost)",
    "resolver_ipv6": "resolver reaches DNS over IPv6",
}
HINTS = {
    "hint_teredo": "Teredo address",
    "hint_6to4": "6to4 address",
    "hint_6rd": "6rd (≥ 16 bits of the IPv4 address in bits 32-63)",
    "hint_asn_differs": "IPv4 and IPv6 in different ASNs",
}
RESULTS = ("ok", "failed", "timeout", "pending", "missing")
# IPv6-site request kinds that show an address of the worker.
_IPV6_KINDS = "('blue', 'ds', 'literal', 'mtu', 'mtu-ok', 'v6ns')"


@dataclass(frozen=True, slots=True)
class Rate:
    """One outcome in one country: yes out of the IPv4 addresses that measured it."""

    ipv4_addresses: int
    yes: int
    rate: float
    ci95_low: float
    ci95_high: float
    small_sample: bool


@dataclass
class BatteryResults:
    sessions: int = 0
    ipv4_addresses: int = 0
    overall: dict[str, Rate] = field(default_factory=dict)
    by_country: dict[str, dict[str, Rate]] = field(default_factory=dict)
    probes: dict[str, dict[str, int]] = field(default_factory=dict)


def enrich_battery(conn: sqlite3.Connection) -> tuple[int, int]:
    """Classify battery IPv6 addresses and pair them with their IPv4 addresses.

    Returns (addresses classified, pairs added). Idempotent: only what is
    missing is computed.
    """
    rows = []
    # CROSS JOIN keeps battery_pages the outer loop: left to itself, SQLite
    # walks every signed request (millions) to probe the few battery pages.
    for (address,) in conn.execute(
        "SELECT DISTINCT r.addr FROM battery_pages b"
        " CROSS JOIN requests r ON r.token = b.session_token"
        f" WHERE r.token_ok = 1 AND r.site = 'ipv6' AND r.kind IN {_IPV6_KINDS}"
        " AND NOT EXISTS (SELECT 1 FROM ipv6_addresses c WHERE c.address = r.addr)"
    ):
        try:
            found = classify(address)
        except ValueError:
            continue
        teredo = found.teredo
        rows.append(
            (
                address,
                found.cls,
                found.embedded_ipv4,
                str(teredo.server) if teredo else None,
                teredo.port if teredo else None,
                teredo.flags if teredo else None,
                found.geo_address,
            )
        )
    pairs = []
    for ipv4, ipv6 in conn.execute(
        "SELECT DISTINCT s.ipv4, r.addr FROM battery_pages b"
        " CROSS JOIN sessions s ON s.token = b.session_token"
        " CROSS JOIN requests r ON r.token = b.session_token"
        f" WHERE r.token_ok = 1 AND r.site = 'ipv6' AND r.kind IN {_IPV6_KINDS}"
        " AND NOT EXISTS (SELECT 1 FROM address_pairs p WHERE p.ipv4 = s.ipv4 AND p.ipv6 = r.addr)"
    ):
        try:
            pairs.append((ipv4, ipv6, sixrd_bits(ipv4, ipv6)))
        except ValueError:
            continue
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("INSERT OR REPLACE INTO ipv6_addresses VALUES (?,?,?,?,?,?,?)", rows)
        conn.executemany("INSERT OR REPLACE INTO address_pairs VALUES (?,?,?)", pairs)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(rows), len(pairs)


def read_battery(conn: sqlite3.Connection) -> BatteryResults:
    """The battery's numbers from the ``report_battery`` and ``battery_probes`` views."""
    results = BatteryResults()
    results.sessions, results.ipv4_addresses = conn.execute(
        "SELECT count(*), count(DISTINCT s.ipv4) FROM battery_pages b"
        " JOIN sessions s ON s.token = b.session_token"
    ).fetchone()
    for country, outcome, n, x, rate, low, high, small in conn.execute(
        "SELECT country, outcome, ipv4_addresses, yes, rate, ci95_low, ci95_high, small_sample"
        " FROM report_battery"
    ):
        value = Rate(n, x, rate, low, high, bool(small))
        if country == "all":
            results.overall[outcome] = value
        else:
            results.by_country.setdefault(country, {})[outcome] = value
    for probe, result, count in conn.execute(
        "SELECT probe, result, count(*) FROM battery_probes GROUP BY probe, result"
    ):
        results.probes.setdefault(probe, dict.fromkeys(RESULTS, 0))[result] = count
    return results


def _rate_json(rate: Rate | None) -> dict[str, Any]:
    if rate is None:
        return {"ipv4_addresses": 0, "yes": 0, "rate": None, "ci95_low": None, "ci95_high": None}
    return {
        "ipv4_addresses": rate.ipv4_addresses,
        "yes": rate.yes,
        "rate": rate.rate,
        "ci95_low": rate.ci95_low,
        "ci95_high": rate.ci95_high,
    }


def battery_json(results: BatteryResults) -> dict[str, Any]:
    """The ``battery`` key of the JSON report: every outcome and hint always present.

    ``sessions`` counts the pages that carried the battery, ``ipv4_addresses``
    their distinct IPv4 addresses: the unit of every rate (``unit``).
    """
    keys = (*OUTCOMES, *HINTS)
    return {
        "sessions": results.sessions,
        "ipv4_addresses": results.ipv4_addresses,
        "unit": "ipv4_addresses",
        "outcomes": {key: _rate_json(results.overall.get(key)) for key in keys},
        "by_country": [
            {"country": country, "outcomes": {key: _rate_json(rates.get(key)) for key in keys}}
            for country, rates in _countries(results)
        ],
        "probes": {
            probe: dict(results.probes.get(probe, dict.fromkeys(RESULTS, 0)))
            for probe in ("ipv4", "ipv6", "ds", "literal", "mtu", "v6ns")
            if probe in results.probes
        },
    }


def _countries(results: BatteryResults) -> list[tuple[str, dict[str, Rate]]]:
    """Countries by IPv4 addresses (IPv6-capable measured everywhere), unknown last."""

    def size(item: tuple[str, dict[str, Rate]]) -> tuple[bool, int, str]:
        country, rates = item
        most = max((rate.ipv4_addresses for rate in rates.values()), default=0)
        return (country == "unknown", -most, country)

    return sorted(results.by_country.items(), key=size)
