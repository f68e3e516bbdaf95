"""Country and network owner of addresses, from MaxMind-format databases.

Answers are cached in the ``geoip`` table with the database build that gave
them, so a report run later, with newer databases or none, says the same
thing; ``--refresh-geoip`` asks again. Only distinct addresses are looked up,
in numeric order, and an answer is reused for every following address inside
the network the database gave it for.

IPv6 addresses are classified (:mod:`.addresses`) into ``ipv6_addresses``
before anything is looked up: a Teredo or 6to4 address is geolocated by the
IPv4 address it embeds, since the IPv6 address itself would point at the
relay's network, not the client's.
"""

from __future__ import annotations

import itertools
import logging
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import geoip2.database
import geoip2.errors
import maxminddb
from tqdm import tqdm

from ..config import Config, ConfigError
from ..store import migrations, open_sync
from . import rollup
from .addresses import classify
from .battery import enrich_battery

log = logging.getLogger(__name__)

GEOLITE_HINT = (
    "no GeoIP database is configured: countries and networks show as unknown. "
    "Free GeoLite2 databases: create a MaxMind account, then run geoipupdate "
    "(Debian package geoipupdate) with EditionIDs GeoLite2-Country GeoLite2-ASN, "
    "and set [geoip] country_db and asn_db in the config file "
    "(see deploy/probe-server.example.toml)."
)

# Rows written per transaction, so a report run beside a live server holds
# the write lock only briefly each time.
CHUNK = 5000


class Address(NamedTuple):
    """An address as stored, with what sorts it numerically (a tuple sorts fast)."""

    version: int
    value: int
    text: str


def parse_address(text: str) -> Address:
    """Faster than ``ipaddress`` for the hundreds of thousands a report may meet."""
    if ":" in text:
        return Address(6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text)), text)
    return Address(4, int.from_bytes(socket.inet_pton(socket.AF_INET, text)), text)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one database said about one address (all None: not found)."""

    country: str | None = None
    country_name: str | None = None
    asn: int | None = None
    org: str | None = None


def build_label(reader: geoip2.database.Reader) -> str:
    """``'GeoLite2-Country 2024-05-03T14:07:22Z'``: which database build answered."""
    metadata = reader.metadata()
    built = datetime.fromtimestamp(metadata.build_epoch, UTC)
    return f"{metadata.database_type} {built:%Y-%m-%dT%H:%M:%SZ}"


class _Database:
    """One opened database and how to ask it."""

    def __init__(self, key: str, path: Path, kind: str) -> None:
        self.key = key
        try:
            self.reader = geoip2.database.Reader(str(path))
        except FileNotFoundError:
            raise ConfigError(f"{key}: {path}: no such file") from None
        except (OSError, maxminddb.InvalidDatabaseError, ValueError) as e:
            raise ConfigError(f"{key}: {path}: not a MaxMind database ({e})") from None
        database_type = self.reader.metadata().database_type
        self.ask: Callable[[str], tuple[Answer, Any]]
        if kind == "country" and "City" in database_type:
            self.ask = self._city
        elif kind == "country" and "Country" in database_type:
            self.ask = self._country
        elif kind == "asn" and "ASN" in database_type:
            self.ask = self._asn
        else:
            self.reader.close()
            wanted = "a Country or City" if kind == "country" else "an ASN"
            raise ConfigError(f"{key}: {path}: is {database_type}, not {wanted} database")
        self.label = build_label(self.reader)

    def _country(self, address: str) -> tuple[Answer, Any]:
        model = self.reader.country(address)
        names = model.country
        return Answer(country=names.iso_code, country_name=names.name), model.traits.network

    def _city(self, address: str) -> tuple[Answer, Any]:
        model = self.reader.city(address)
        names = model.country
        return Answer(country=names.iso_code, country_name=names.name), model.traits.network

    def _asn(self, address: str) -> tuple[Answer, Any]:
        model = self.reader.asn(address)
        answer = Answer(
            asn=model.autonomous_system_number, org=model.autonomous_system_organization
        )
        return answer, model.network

    def lookups(self, addresses: Iterable[Address]) -> Iterator[Answer]:
        """Answers in turn, asking again only when an address leaves the last network."""
        low = high = -1
        version = 0
        last = Answer()
        for address in addresses:
            value = address.value
            if address.version != version or not low <= value <= high:
                try:
                    last, network = self.ask(address.text)
                except geoip2.errors.AddressNotFoundError as e:
                    last, network = Answer(), e.network
                except ValueError:  # e.g. an IPv6 address in an IPv4-only database
                    last, network = Answer(), None
                if network is None or network.version != address.version:
                    low = high = -1
                else:
                    low, high = int(network.network_address), int(network.broadcast_address)
                version = address.version
            yield last

    def close(self) -> None:
        self.reader.close()


class GeoIP:
    """The configured databases; either or both may be absent."""

    def __init__(self, country: _Database | None, asn: _Database | None) -> None:
        self.country = country
        self.asn = asn

    @property
    def configured(self) -> bool:
        return self.country is not None or self.asn is not None

    def close(self) -> None:
        for database in (self.country, self.asn):
            if database is not None:
                database.close()

    def __enter__(self) -> GeoIP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_geoip(config: Config) -> GeoIP:
    """Open the databases named in ``[geoip]``; a bad path is a ConfigError."""
    country = asn = None
    if config.geoip.country_db is not None:
        country = _Database("geoip.country_db", config.resolve(config.geoip.country_db), "country")
    try:
        if config.geoip.asn_db is not None:
            asn = _Database("geoip.asn_db", config.resolve(config.geoip.asn_db), "asn")
    except BaseException:
        if country is not None:
            country.close()
        raise
    return GeoIP(country, asn)


def _chunks(rows: Iterable[tuple[Any, ...]], size: int = CHUNK) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write(conn: sqlite3.Connection, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
    for chunk in _chunks(rows):
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, chunk)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# What each watermark vouches for: emptied by hand, the table is filled again.
_WATERMARKED = {"sessions": "geoip", "requests": "ipv6_addresses"}


def _watermark(conn: sqlite3.Connection, source: str) -> int:
    row = conn.execute("SELECT through FROM enriched WHERE source = ?", (source,)).fetchone()
    if row is None:
        return 0
    if conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {_WATERMARKED[source]})").fetchone()[0]:
        return 0
    return int(row[0])


def _set_watermark(conn: sqlite3.Connection, source: str, through: int) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO enriched (source, through) VALUES (?, ?)", (source, through)
    )


def classify_new_ipv6(conn: sqlite3.Connection) -> int:
    """Classify IPv6 addresses that fetched blue balls and are not classified yet."""
    through = conn.execute("SELECT COALESCE(max(id), 0) FROM requests").fetchone()[0]
    since = _watermark(conn, "requests")
    blue = "r.token_ok = 1 AND r.site = 'ipv6' AND r.kind = 'blue' AND r.status = 200"
    unclassified = "NOT EXISTS (SELECT 1 FROM ipv6_addresses c WHERE c.address = r.addr)"
    if since == 0:  # the first time: the blue-ball index beats reading every request
        query = f"SELECT DISTINCT r.addr FROM requests r INDEXED BY requests_blue WHERE {blue}"
        params: tuple[int, ...] = ()
    else:  # later: only the requests logged since
        query = f"SELECT DISTINCT r.addr FROM requests r WHERE r.id > ? AND {blue}"
        params = (since,)
    rows = []
    for (address,) in conn.execute(f"{query} AND {unclassified}", params):
        try:
            found = classify(address)
        except ValueError:
            continue  # not an IPv6 address: nothing the IPv6 site can have logged
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
    _write(conn, "INSERT OR REPLACE INTO ipv6_addresses VALUES (?,?,?,?,?,?,?)", rows)
    _set_watermark(conn, "requests", through)
    return len(rows)


def _incomplete(conn: sqlite3.Connection, geo: GeoIP) -> dict[str, tuple[Any, ...]]:
    """Stored answers lacking the part of a database that is configured now."""
    found = {}
    for row in conn.execute(
        "SELECT address, country, country_name, asn, org, country_db, asn_db FROM geoip"
        " INDEXED BY geoip_incomplete WHERE country_db IS NULL OR asn_db IS NULL"
    ):
        if (geo.country is not None and row[5] is None) or (geo.asn is not None and row[6] is None):
            found[row[0]] = row
    return found


def _to_look_up(
    conn: sqlite3.Connection, geo: GeoIP, incomplete: dict[str, tuple[Any, ...]]
) -> list[Address]:
    """Addresses with no stored answer, or none from a database configured now."""
    since = _watermark(conn, "sessions")
    unknown = "NOT EXISTS (SELECT 1 FROM geoip g WHERE g.address = s.ipv4)"
    if since == 0:  # the first time: the index hands over each address once
        query = f"SELECT s.ipv4 FROM sessions s INDEXED BY sessions_ipv4 WHERE {unknown}"
        query += " GROUP BY s.ipv4"
    else:  # later: only the sessions logged since, not a walk over the whole index
        query = f"SELECT DISTINCT s.ipv4 FROM sessions s WHERE s.id > ? AND {unknown}"
    wanted: set[str] = {address for (address,) in conn.execute(query, (since,) if since else ())}
    wanted.update(
        address
        for (address,) in conn.execute(
            "SELECT DISTINCT c.geo_address FROM ipv6_addresses c"
            " WHERE c.geo_address IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM geoip g WHERE g.address = c.geo_address)"
        )
    )
    wanted.update(incomplete)
    # Text order: the order of the table's key, so rows are appended rather
    # than inserted all over it; octet-aligned networks stay contiguous.
    parsed = []
    for text in sorted(wanted):
        try:
            parsed.append(parse_address(text))
        except OSError:
            continue  # not an address (hand-edited data): nothing to look up
    return parsed


def geolocate(conn: sqlite3.Connection, geo: GeoIP, *, stream: IO[str] | None = None) -> int:
    """Look up and store every address that needs it; returns how many."""
    if not geo.configured:
        return 0
    through = conn.execute("SELECT COALESCE(max(id), 0) FROM sessions").fetchone()[0]
    stored = _incomplete(conn, geo)
    addresses = _to_look_up(conn, geo, stored)
    nothing = itertools.repeat(Answer())
    countries = geo.country.lookups(addresses) if geo.country else nothing
    networks = geo.asn.lookups(addresses) if geo.asn else nothing
    now = time.time()
    country_db = geo.country.label if geo.country else None
    asn_db = geo.asn.label if geo.asn else None

    def rows() -> Iterator[tuple[Any, ...]]:
        progress = tqdm(
            zip(addresses, countries, networks, strict=False),
            total=len(addresses),
            desc="geolocating",
            unit=" addresses",
            file=stream if stream is not None else sys.stderr,
            disable=None,  # on when the stream is a terminal, silent otherwise
            leave=False,
        )
        for address, place, network in progress:
            text = address.text
            old = stored.get(text)
            row = [
                text,
                place.country,
                place.country_name,
                network.asn,
                network.org,
                country_db,
                asn_db,
                now,
            ]
            # Only the missing part is filled in: a stored answer stays as it
            # was, whatever the newer database says (--refresh-geoip asks again).
            if old is not None and (country_db is None or old[5] is not None):
                row[1], row[2], row[5] = old[1], old[2], old[5]
            if old is not None and (asn_db is None or old[6] is not None):
                row[3], row[4], row[6] = old[3], old[4], old[6]
            yield tuple(row)

    _write(conn, "INSERT OR REPLACE INTO geoip VALUES (?,?,?,?,?,?,?,?)", rows())
    _set_watermark(conn, "sessions", through)
    return len(addresses)


def forget(conn: sqlite3.Connection) -> None:
    """Drop every stored class and answer, so the next report works them out again."""
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM geoip")
    conn.execute("DELETE FROM ipv6_addresses")
    conn.execute("DELETE FROM address_pairs")
    conn.execute("DELETE FROM enriched")
    conn.execute("COMMIT")


RESULTS_SCRIPT = "0004_results.sql"


def ensure_schema(conn: sqlite3.Connection) -> bool:
    """Give the results tables and views to a database that skipped them.

    Schema version 4 was an empty placeholder on other branches until this
    script replaced it, so a database made then is at version 4 or later
    without them, and migrating would never apply it. Returns True if it
    was applied now.
    """
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'geoip'").fetchone():
        return False
    (script,) = [text for _, name, text in migrations() if name == RESULTS_SCRIPT]
    log.warning("event=results_schema_applied script=%s", RESULTS_SCRIPT)
    conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
    return True


def enrich(
    conn: sqlite3.Connection,
    geo: GeoIP,
    *,
    refresh: bool = False,
    stream: IO[str] | None = None,
) -> tuple[int, int]:
    """Classify new IPv6 addresses and geolocate what needs it.

    Returns (IPv6 addresses classified, addresses looked up).
    """
    ensure_schema(conn)
    if refresh:
        forget(conn)
    # The report reads the rollups; what is new since the last report is
    # added to them here. They need no class and no GeoIP answer, so they
    # are brought up to date on a connection of their own while this one
    # classifies and geolocates: SQLite works without holding the GIL, and
    # building them from nothing takes seconds at a million sessions.
    path = _file_of(conn)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollups") as pool:
        rolled = pool.submit(_refresh_rollups, path) if path else None
        classified = classify_new_ipv6(conn)
        # The battery's IPv6 addresses (a literal-only worker fetched no blue
        # ball) are classified before geolocating, so they are looked up too.
        classified += enrich_battery(conn)[0]
        looked_up = geolocate(conn, geo, stream=stream)
        if rolled is not None:
            rolled.result()
        else:  # an in-memory database has no second connection
            rollup.refresh(conn)
    return classified, looked_up


def _file_of(conn: sqlite3.Connection) -> Path | None:
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return Path(file)
    return None


def _refresh_rollups(path: Path) -> None:
    conn = open_sync(path)
    try:
        rollup.refresh(conn)
    finally:
        conn.close()
