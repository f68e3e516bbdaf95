"""Metrics in Prometheus' text format, for the admin listener only.

The hot paths keep plain integers (a dict increment per request or DNS query);
prometheus-client turns them into metric families when the admin listener is
scraped. Only the commit latency is a prometheus-client Histogram, observed
once per commit. Each server has its own registry, so tests can run several.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .dnsserver import DnsServer
from .limits import ConnectionTable, malformed_requests
from .store import Writer
from .tls import SiteCertificate

PREFIX = "probe_server"
# Commits take ~1 ms with synchronous=normal, ~5-20 ms fsynced on an SSD;
# seconds mean the disk is in trouble.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Sources(Protocol):
    """Where the collector finds the live state (the running ProbeServer)."""

    @property
    def writer(self) -> Writer | None: ...

    @property
    def dns(self) -> DnsServer | None: ...

    @property
    def certificates(self) -> dict[str, SiteCertificate]: ...

    @property
    def connections(self) -> dict[str, ConnectionTable]: ...


class Metrics:
    """Counters the public side updates, and the registry the admin side serves."""

    def __init__(self) -> None:
        self.started = time.time()
        # (site, kind, status) -> requests answered
        self.requests: dict[tuple[str, str, int], int] = {}
        self.sessions = 0
        # (part, result) -> reloads, part being "tls_ipv4", "zones", a hook's name...
        self.reloads: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry()
        self.commit_seconds = Histogram(
            f"{PREFIX}_db_commit_seconds",
            "Time to write and commit one group of rows.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)

    def request(self, site: str, kind: str, status: int) -> None:
        key = (site, kind, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if kind == "survey" and status == 200:
            self.sessions += 1

    def reloaded(self, part: str, ok: bool) -> None:
        key = (part, "ok" if ok else "failed")
        self.reloads[key] = self.reloads.get(key, 0) + 1

    def attach(self, sources: Sources) -> None:
        """Export the server's own counters (writer, DNS, TLS) from ``sources``."""
        self.registry.register(_ServerCollector(self, sources))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


class _ServerCollector(Collector):
    def __init__(self, metrics: Metrics, sources: Sources) -> None:
        self.metrics = metrics
        self.sources = sources

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        metrics = self.metrics
        yield GaugeMetricFamily(
            f"{PREFIX}_start_time_seconds",
            "When this server started (Unix time).",
            value=metrics.started,
        )
        requests = CounterMetricFamily(
            f"{PREFIX}_http_requests",
            "HTTP requests answered on the public sites, by site, kind and status.",
            labels=["site", "kind", "code"],
        )
        for (site, kind, status), count in sorted(metrics.requests.items()):
            requests.add_metric([site, kind, str(status)], count)
        yield requests
        yield _counter(
            "sessions", "Survey pages served and stored (one session each).", metrics.sessions
        )
        reloads = CounterMetricFamily(
            f"{PREFIX}_reloads",
            "SIGHUP reloads, by part (tls_ipv4, tls_ipv6, zones, hooks) and result.",
            labels=["part", "result"],
        )
        for (part, result), count in sorted(metrics.reloads.items()):
            reloads.add_metric([part, result], count)
        yield reloads
        yield from self._writer()
        yield from self._dns()
        yield from self._connections()
        expiry = GaugeMetricFamily(
            f"{PREFIX}_tls_certificate_expiry_seconds",
            "When the certificate in service expires (Unix time), by site.",
            labels=["site"],
        )
        for site, certificate in sorted(self.sources.certificates.items()):
            expiry.add_metric([site], certificate.info.not_after.timestamp())
        yield expiry

    def _connections(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Each public web socket's connection table (probe_server/limits.py)."""
        tables = self.sources.connections
        families = {
            "admitted": ("Connections admitted.", lambda t: t.stats.admitted),
            "evicted": ("Idle connections closed to make room.", lambda t: t.stats.evicted),
            "refused": ("Connections refused with a 503 (all busy).", lambda t: t.stats.refused),
            "send_timeouts": (
                "Connections aborted: the client stopped reading.",
                lambda t: t.stats.send_timeouts,
            ),
            "handshakes_failed": (
                "TLS connections closed before their handshake finished.",
                lambda t: t.stats.handshakes_failed,
            ),
        }
        for name, (documentation, value) in families.items():
            family = CounterMetricFamily(
                f"{PREFIX}_http_connections_{name}", documentation, labels=["listener"]
            )
            for listener, table in sorted(tables.items()):
                family.add_metric([listener], value(table))
            yield family
        open_now = GaugeMetricFamily(
            f"{PREFIX}_http_connections_open", "Open connections.", labels=["listener"]
        )
        for listener, table in sorted(tables.items()):
            open_now.add_metric([listener], len(table))
        yield open_now
        yield _counter(
            "http_malformed_requests",
            "Requests aiohttp could not parse (answered 400).",
            malformed_requests.count,
        )

    def _writer(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        writer = self.sources.writer
        if writer is None:
            return
        stats = writer.stats
        yield _counter("db_commits", "Group commits done.", stats.commits)
        yield _counter("db_rows", "Rows committed.", stats.rows)
        yield _counter(
            "db_commit_errors", "Commits that failed (rows kept, retried).", stats.errors
        )
        yield _counter(
            "db_rejected_rows", "Rows refused because the queue was full.", stats.rejected
        )
        yield _counter(
            "db_bad_rows",
            "Rows the database refused for what they hold (dropped, never acknowledged).",
            stats.bad_rows,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_db_queue_rows", "Rows waiting for a commit.", value=writer.queued_rows
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_db_healthy",
            "1 while commits succeed, 0 while they fail.",
            value=1 if writer.healthy else 0,
        )

    def _dns(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        dns = self.sources.dns
        if dns is None:
            return
        stats = dns.stats
        queries = CounterMetricFamily(
            f"{PREFIX}_dns_responses",
            "DNS responses sent, by response code.",
            labels=["rcode"],
        )
        for rcode, count in sorted(stats.rcodes.items()):
            queries.add_metric([rcode], count)
        yield queries
        yield _counter("dns_queries", "DNS messages received.", stats.queries)
        rrl = CounterMetricFamily(
            f"{PREFIX}_dns_rrl",
            "UDP responses held back by response-rate limiting: dropped, or sent truncated.",
            labels=["action"],
        )
        rrl.add_metric(["drop"], stats.rate_limited)
        rrl.add_metric(["slip"], stats.slipped)
        yield rrl
        yield _counter(
            "dns_errors", "Queries our code failed on (answered SERVFAIL).", stats.errors
        )
        yield _counter("dns_tcp_refused", "TCP connections refused (limit).", stats.tcp_refused)
        yield _counter("dns_tcp_timeouts", "TCP connections closed idle.", stats.tcp_timeouts)
        yield _counter(
            "dns_tcp_evicted", "Idle TCP connections closed to make room.", stats.tcp_evicted
        )
        yield _counter(
            "dns_log_dropped", "Query rows not logged (write queue busy).", stats.log_dropped
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_dns_tcp_connections", "Open DNS TCP connections.", value=dns.tcp_connections
        )
