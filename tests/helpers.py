"""Builders for report tests: tiny GeoIP databases and synthetic populations.

A population is written with the server's own INSERT statements through the
store's group-commit :class:`~probe_server.store.Writer`, so it lands in the
database exactly as live traffic would.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdb_writer import MmdbU32, MMDBWriter
from netaddr import IPSet

from probe_server.store import Row, Writer, open_database
from probe_server.survey import PREVIEW_ASSIGNMENT
from probe_server.tokens import new_token
from probe_server.web import INSERT_ANSWER, INSERT_REQUEST, INSERT_SESSION

SECRET = b"report tests: any key will do"


T0 = 1_700_000_000.0

# The MTurk side's tables, as the MTurk issue fills them (schema 0002).
INSERT_BATCH = "INSERT INTO batches (name, reward, countries, published) VALUES (?,?,?,?)"
INSERT_HIT = "INSERT INTO hits (hit_id, batch, max_assignments, created) VALUES (?,?,?,?)"
INSERT_ASSIGNMENT = (
    "INSERT INTO assignments (assignment_id, hit_id, worker_id, status, accept_time,"
    " submit_time, synced) VALUES (?,?,?,?,?,?,?)"
)


def country_db(
    path: Path, networks: dict[str, tuple[str, str]], database_type: str = "GeoLite2-Country"
) -> Path:
    """A Country (or City) database: CIDR -> (ISO code, English name)."""
    writer = MMDBWriter(6, database_type, ["en"], "probe-server tests", ipv4_compatible=True)
    for cidr, (code, name) in networks.items():
        record: dict[str, Any] = {"country": {"iso_code": code, "names": {"en": name}}}
        if "City" in database_type:
            record["city"] = {"names": {"en": f"a city in {name}"}}
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return path


def asn_db(path: Path, networks: dict[str, tuple[int, str]]) -> Path:
    """An ASN database: CIDR -> (AS number, organisation)."""
    writer = MMDBWriter(6, "GeoLite2-ASN", ["en"], "probe-server tests", ipv4_compatible=True)
    for cidr, (number, org) in networks.items():
        writer.insert_network(
            IPSet([cidr]),
            {"autonomous_system_number": MmdbU32(number), "autonomous_system_organization": org},
        )
    writer.to_db_file(str(path))
    return path


@dataclass
class Population:
    """Sessions, requests and answers as the server would log them."""

    rows: list[Row] = field(default_factory=list)

    def request(
        self,
        t: float,
        site: str,
        addr: str,
        kind: str,
        token: str | None,
        status: int = 200,
        signed: bool = True,
    ) -> None:
        ok = token is not None and signed
        self.rows.append(
            (
                INSERT_REQUEST,
                (
                    t,
                    site,
                    addr,
                    40000,
                    "GET",
                    f"/{kind}",
                    kind,
                    token,
                    ok,
                    None,
                    status,
                    100,
                    "test agent",
                ),
            )
        )

    def session(
        self,
        ipv4: str,
        t: float,
        *,
        visit: str = "accepted",
        hit: str | None = None,
        assignment: str | None = None,
        batch: str = "",
        red: int = 2,
        blue: int = 2,
        red_fetched: int | None = None,
        ipv6: str | None = None,
        blue_fetched: int | None = None,
        answers: Iterable[tuple[float, int]] = (),
    ) -> str:
        """One survey page; ``answers`` are (time, red count reported) submissions."""
        token = new_token(SECRET)
        if visit == "preview":
            assignment = PREVIEW_ASSIGNMENT
        worker = f"W{assignment}" if visit == "accepted" else None
        self.rows.append(
            (
                INSERT_SESSION,
                (
                    token,
                    t,
                    ipv4,
                    40000,
                    "test agent",
                    red,
                    blue,
                    visit,
                    assignment,
                    hit,
                    worker,
                    None,
                    batch,
                ),
            )
        )
        self.request(t, "ipv4", ipv4, "survey", token)
        for _ in range(red if red_fetched is None else red_fetched):
            self.request(t + 1, "ipv4", ipv4, "red", token)
        if ipv6 is not None:
            for _ in range(blue if blue_fetched is None else blue_fetched):
                self.request(t + 2, "ipv6", ipv6, "blue", token)
        for answer_t, reported in answers:
            self.request(answer_t, "ipv4", ipv4, "submit", token)
            self.rows.append(
                (INSERT_ANSWER, (token, answer_t, ipv4, reported, blue, reported == red))
            )
        return token

    def batch(self, name: str, reward: str, countries: str, published: float | None) -> None:
        self.rows.append((INSERT_BATCH, (name, reward, countries, published)))

    def hit(self, hit_id: str, batch: str) -> None:
        self.rows.append((INSERT_HIT, (hit_id, batch, 100, T0)))

    def assignment(self, assignment_id: str, hit_id: str, submit_time: float | None) -> None:
        status = "Submitted" if submit_time is not None else "Accepted"
        self.rows.append(
            (
                INSERT_ASSIGNMENT,
                (assignment_id, hit_id, f"W{assignment_id}", status, T0, submit_time, T0 + 86400),
            )
        )

    async def write(self, path: Path) -> None:
        """Store every row through the server's group-commit writer."""
        conn = await open_database(path)
        writer = Writer(conn)
        writer.start()
        try:
            # One row per call, as requests arrive: the writer groups them.
            await asyncio.gather(*(writer.submit([statement]) for statement in self.rows))
        finally:
            await writer.close()
            await conn.close()


def wilson_by_bisection(
    successes: int, n: int, z: float = 1.959963984540054
) -> tuple[float, float]:
    """The Wilson interval found the long way: the p where the score test gives |Z| = z.

    Independent of the closed form in probe_server.analysis.stats.
    """
    observed = successes / n

    def excess(p: float) -> float:
        return (observed - p) ** 2 - z * z * p * (1 - p) / n

    def root(low: float, high: float) -> float:
        # excess() is positive outside the interval and negative inside it.
        sign_low = excess(low) > 0
        for _ in range(200):
            middle = (low + high) / 2
            if (excess(middle) > 0) == sign_low:
                low = middle
            else:
                high = middle
        return (low + high) / 2

    lower = 0.0 if successes == 0 else root(0.0, observed)
    upper = 1.0 if successes == n else root(observed, 1.0)
    assert math.isfinite(lower) and math.isfinite(upper)
    return lower, upper
