"""Configuration: a TOML file validated into frozen models.

Every key is documented in ``deploy/probe-server.example.toml``; a test keeps
that file and these defaults in step. Relative paths in a file are taken
relative to the file's own directory, so a config can be moved with its data.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A configuration problem, worded as one line naming the key."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _endpoint(value: str) -> str:
    """Check ``HOST:PORT`` (IPv6 in brackets) with a literal address."""
    parse_endpoint(value)
    return value


Endpoint = Annotated[str, AfterValidator(_endpoint)]


def parse_endpoint(value: str) -> tuple[str, int]:
    """Split ``'127.0.0.1:8080'`` or ``'[::1]:8080'`` into address and port."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected ADDRESS:PORT, got {value!r}")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPV6]:PORT, got {value!r}")
    else:
        host, _, port = value.rpartition(":")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, e.g. [{host}]:{port}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (listen on literals only)") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port!r}")
    return str(address), int(port)


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("a base URL has no query or fragment")
    return value.rstrip("/")


BaseUrl = Annotated[str, AfterValidator(_base_url)]


class SiteConfig(_Model):
    """One web site: the socket it listens on and the URL pages use for it."""

    listen: Endpoint
    # The URL pages use for this site; without it, taken from the bound socket.
    base_url: BaseUrl | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # A plain-HTTP socket of the same family (port 80): ACME HTTP-01
    # challenges, and a redirect to the HTTPS site for everything else.
    http_listen: Endpoint | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> SiteConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.http_listen is not None and self.tls_cert is None:
            raise ValueError("http_listen redirects to HTTPS: it needs tls_cert and tls_key")
        return self


class IPv4SiteConfig(SiteConfig):
    """The IPv4 site: the survey, the red balls, the answer form."""

    listen: Endpoint = "127.0.0.1:8080"


class IPv6SiteConfig(SiteConfig):
    """The IPv6 site: the blue balls. Its own default, so a table without listen works."""

    listen: Endpoint = "[::1]:8080"


def _site_family(site: SiteConfig, version: int) -> SiteConfig:
    for key, endpoint in (("listen", site.listen), ("http_listen", site.http_listen)):
        if endpoint is None:
            continue
        if ipaddress.ip_address(parse_endpoint(endpoint)[0]).version != version:
            raise ValueError(
                f"{key}: the IPv{version} site needs an IPv{version} address, got {endpoint!r}"
            )
    return site


class SitesConfig(_Model):
    # Directory that `certbot certonly --webroot -w DIR` writes its HTTP-01
    # challenges to; both sites serve /.well-known/acme-challenge/<token> from it.
    acme_webroot: Path | None = None
    ipv4: IPv4SiteConfig = IPv4SiteConfig()
    ipv6: IPv6SiteConfig = IPv6SiteConfig()

    @field_validator("ipv4")
    @classmethod
    def _ipv4_socket(cls, site: IPv4SiteConfig) -> IPv4SiteConfig:
        _site_family(site, 4)
        return site

    @field_validator("ipv6")
    @classmethod
    def _ipv6_socket(cls, site: IPv6SiteConfig) -> IPv6SiteConfig:
        _site_family(site, 6)
        return site


class ServerConfig(_Model):
    # The HMAC key that signs session tokens; created (mode 0600) on first run.
    secret_file: Path = Path("probe.secret")
    # Seconds a probe waits for its row to be committed before it is answered
    # 503 (its row stays queued and is stored when the database recovers).
    commit_timeout: float = Field(default=5.0, gt=0, le=300)
    # Seconds SIGTERM waits for in-flight requests before closing.
    shutdown_timeout: float = Field(default=10.0, ge=0, le=300)
    # Largest request body accepted (the answer form), in bytes.
    max_body: int = Field(default=16384, ge=1024, le=1048576)
    # Answer systemd's watchdog (WatchdogSec=) while the database writer works.
    watchdog: bool = True


class HttpConfig(_Model):
    """Limits on the web sites' connections (see probe_server/limits.py)."""

    # Seconds a connection may take to deliver a complete request head,
    # counted from its opening or from its previous response, however much
    # of it has arrived; an idle keep-alive connection is closed after as long.
    # On an HTTPS site the TLS handshake has as long again, before that.
    header_timeout: float = Field(default=15.0, gt=0, le=3600)
    # Seconds to receive the body of the answer form.
    body_timeout: float = Field(default=15.0, gt=0, le=3600)
    # Seconds a response may wait for a client that has stopped reading it.
    send_timeout: float = Field(default=30.0, gt=0, le=3600)
    # Open connections per site; at the limit, the one idle longest is closed
    # to make room, and a new one is refused (503) only if all are busy.
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    # The same, per client: an IPv4 address or an IPv6 /64.
    max_connections_per_client: int = Field(default=256, ge=1, le=1_000_000)
    # Answer ball fetches (a plain GET of a red or blue ball) without
    # aiohttp's request machinery: the same row, the same response, about
    # twice the rate (probe_server/fastpath.py). Off: aiohttp answers them.
    fast_balls: bool = True


class DatabaseConfig(_Model):
    path: Path = Path("probe.db")
    # "full": each group commit is fsynced (survives power loss);
    # "normal": survives a killed process but not a power cut (faster).
    synchronous: Literal["full", "normal"] = "full"
    # Rows waiting for a commit; beyond this, probes are answered 503.
    queue_limit: int = Field(default=50000, ge=100, le=10_000_000)
    # Most rows in one transaction.
    batch_max: int = Field(default=2000, ge=1, le=100000)


class SurveyConfig(_Model):
    # The paper draws 1-4 red and 1-4 blue balls per page, uniformly.
    min_balls: int = Field(default=1, ge=1, le=20)
    max_balls: int = Field(default=4, ge=1, le=20)
    # Label stored with each session when the URL carries no ?batch=.
    batch: str = Field(default="", max_length=64)

    @model_validator(mode="after")
    def _range(self) -> SurveyConfig:
        if self.min_balls > self.max_balls:
            raise ValueError("min_balls must not exceed max_balls")
        return self


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"expected an https:// URL, got {value!r}")
    return value


HttpsUrl = Annotated[str, AfterValidator(_https_url)]
_HOST = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_TEST_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def _host(value: str) -> str:
    if not _HOST.fullmatch(value):
        raise ValueError(
            f"expected a lower-case host name such as www.speedtest.net, got {value!r}"
        )
    return value


Host = Annotated[str, AfterValidator(_host)]


class SpeedTest(_Model):
    """One web speed test the speedtest page lists."""

    # Short name in the form and the database: a-z, 0-9 and '-'.
    id: str
    # What the worker sees, e.g. "Speedtest by Ookla".
    name: str = Field(min_length=1, max_length=64)
    # Where the worker runs it (a link on the page; the server never fetches it).
    url: HttpsUrl
    # Hosts a "share results" link may be on; empty: the test has no share link.
    share_hosts: tuple[Host, ...] = ()
    # Whether the worker must give the share link (the proof that they ran
    # the test); default: yes when the test has share_hosts.
    share_required: bool | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _TEST_ID.fullmatch(value):
            raise ValueError(
                f"use 1-32 of a-z, 0-9 and '-' (starting with a letter or digit), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _share(self) -> SpeedTest:
        if self.share_required and not self.share_hosts:
            raise ValueError("share_required: needs share_hosts, the hosts its links are on")
        return self

    @property
    def requires_share(self) -> bool:
        """The page asks for a share link and refuses a report without one."""
        return bool(self.share_hosts) if self.share_required is None else self.share_required


# The paper's tools (§3.1): an Ookla-based site, M-Lab's NDT, and others; the
# researcher lists their own. DSLReports' test, which the paper used, is gone.
DEFAULT_SPEED_TESTS = (
    SpeedTest(
        id="ookla",
        name="Speedtest by Ookla",
        url="https://www.speedtest.net/",
        share_hosts=("www.speedtest.net",),
    ),
    SpeedTest(id="ndt", name="M-Lab Speed Test (NDT)", url="https://speed.measurementlab.net/"),
    SpeedTest(id="cloudflare", name="Cloudflare Speed Test", url="https://speed.cloudflare.com/"),
)


class SpeedTestConfig(_Model):
    """The speedtest page (experiment kind "speedtest")."""

    tests: tuple[SpeedTest, ...] = Field(default=DEFAULT_SPEED_TESTS, min_length=1, max_length=10)
    # Reported speeds must be at least min_mbps and at most max_mbps (Mbit/s).
    # The floor keeps out slips such as 0.001 (a typo, or a speed in Gbit/s);
    # the slowest line worth measuring, a dial-up modem, still manages 0.05.
    min_mbps: float = Field(default=0.05, gt=0, le=1000)
    max_mbps: float = Field(default=10000.0, gt=0, le=1_000_000)

    @model_validator(mode="after")
    def _unique(self) -> SpeedTestConfig:
        ids = [test.id for test in self.tests]
        for test_id in ids:
            if ids.count(test_id) > 1:
                raise ValueError(f"tests: the id {test_id!r} is used twice")
        if self.min_mbps >= self.max_mbps:
            raise ValueError("min_mbps: must be below max_mbps")
        return self


def _pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None
    return value


class ToolConfig(_Model):
    """The run-a-tool page (experiment kind "tool", the paper's §3.2)."""

    # The tool's name as workers see it.
    name: str = Field(default="Spoofer", min_length=1, max_length=64)
    # Where workers download it (a link on the page).
    download_url: HttpsUrl = "https://www.caida.org/projects/spoofer/"
    # What the tool's report id or URL must match in full (Python regex).
    report_pattern: Annotated[str, AfterValidator(_pattern)] = (
        r"(https://spoofer\.caida\.org/report\.php\?sessionid=)?[0-9]{1,12}"
    )
    # An example report id shown beside the field.
    report_example: str = Field(
        default="https://spoofer.caida.org/report.php?sessionid=1234567", max_length=200
    )

    @model_validator(mode="after")
    def _example(self) -> ToolConfig:
        if not re.fullmatch(self.report_pattern, self.report_example):
            raise ValueError("report_example: does not match report_pattern")
        return self


def _family(endpoint: str, version: int) -> str:
    if ipaddress.ip_address(parse_endpoint(endpoint)[0]).version != version:
        raise ValueError(f"needs an IPv{version} address, got {endpoint!r}")
    return endpoint


class RateLimitConfig(_Model):
    """Response-rate limiting (RRL) per source prefix, for UDP."""

    enabled: bool = True
    # Responses per second each source prefix earns, and the most it can save up.
    responses_per_second: float = Field(default=50.0, gt=0, le=1_000_000)
    burst: int = Field(default=100, ge=1, le=1_000_000)
    # Past the limit, every slip-th response is sent truncated (TC=1) instead
    # of dropped; 0 drops them all, 1 truncates them all.
    slip: int = Field(default=2, ge=0, le=100)
    ipv4_prefix: int = Field(default=24, ge=8, le=32)
    ipv6_prefix: int = Field(default=56, ge=16, le=128)
    # Prefixes tracked at once (memory bound).
    max_prefixes: int = Field(default=100_000, ge=100, le=10_000_000)


class DnsConfig(_Model):
    """The authoritative DNS server in the same process."""

    enabled: bool = True
    # Master files, each with its $ORIGIN; a child zone may be listed with its parent.
    zones: tuple[Path, ...] = (Path("dns/example.org.zone"), Path("dns/v6ns.example.org.zone"))
    # UDP and TCP on the same ADDRESS:PORT, one socket pair per family.
    listen_ipv4: Endpoint = "127.0.0.1:5353"
    listen_ipv6: Endpoint = "[::1]:5353"
    # The EDNS UDP payload size we announce and the largest UDP reply we send.
    edns_udp_size: int = Field(default=1232, ge=512, le=4096)
    tcp_idle_timeout: float = Field(default=10.0, gt=0, le=300)
    tcp_max_connections: int = Field(default=1000, ge=1, le=100_000)
    # The same, per client (an IPv4 address or an IPv6 /64).
    tcp_max_connections_per_client: int = Field(default=64, ge=1, le=100_000)
    # Packed replies kept per (name, type, EDNS); wildcard names share one.
    answer_cache: int = Field(default=10000, ge=16, le=10_000_000)
    # Master-file lines of _acme-challenge TXT records (ACME DNS-01), written
    # by a certbot hook and read with the zones at start and on SIGHUP.
    acme_challenges: Path | None = None
    rrl: RateLimitConfig = RateLimitConfig()

    @field_validator("listen_ipv4")
    @classmethod
    def _ipv4_socket(cls, value: str) -> str:
        return _family(value, 4)

    @field_validator("listen_ipv6")
    @classmethod
    def _ipv6_socket(cls, value: str) -> str:
        return _family(value, 6)

    @model_validator(mode="after")
    def _some_zone(self) -> DnsConfig:
        if self.enabled and not self.zones:
            raise ValueError("zones: name at least one zone file (or set enabled = false)")
        return self


def _admin_path(value: str) -> str:
    if not value.startswith("/") or any(c in value for c in "?#{} "):
        raise ValueError(f"expected a path such as /metrics, got {value!r}")
    return value


AdminPath = Annotated[str, AfterValidator(_admin_path)]


class AdminConfig(_Model):
    """The administrative listener: metrics and health, on loopback only."""

    enabled: bool = False
    listen: Endpoint = "127.0.0.1:9180"
    metrics_path: AdminPath = "/metrics"
    health_path: AdminPath = "/healthz"

    @field_validator("listen")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if not ipaddress.ip_address(parse_endpoint(value)[0]).is_loopback:
            raise ValueError(
                f"must be a loopback address (127.0.0.1 or [::1]), got {value!r}:"
                " nothing administrative is served on public addresses"
            )
        return value

    @model_validator(mode="after")
    def _distinct(self) -> AdminConfig:
        if self.metrics_path == self.health_path:
            raise ValueError("metrics_path and health_path must differ")
        return self


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "text": time, level, logger, message (a terminal); "journal": a syslog
    # priority prefix instead of the time (journald keeps time and level);
    # "json": one JSON object per line.
    format: Literal["text", "journal", "json"] = "text"


# The documentation ranges (RFC 5737, RFC 3849): never assigned, never
# routed, so no real network has them. The namespace lab (lab.py) numbers
# its hosts from 192.0.2.0/24 for that reason.
DOCUMENTATION_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def is_rehearsal_address(host: str | None) -> bool:
    """Loopback (``localhost`` too), or a documentation address: a rehearsal's own.

    What the rehearsal tools may bind to or hand answers to: this machine, or
    the namespace lab's own network, which nothing outside it can reach. A
    worker's browser on a real network can reach neither.
    """
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or any(address in net for net in DOCUMENTATION_NETWORKS)


def is_rehearsal_host(host: str | None) -> bool:
    """A rehearsal address, or a name under ``.test``.

    ``.test`` is reserved for testing and never delegated (RFC 6761 §6.2):
    only a lab's own DNS answers for it (the lab's zone is ``probe.test``).
    """
    if host is not None and host.lower().rstrip(".").endswith(".test"):
        return True
    return is_rehearsal_address(host)


def _rehearsal_site(value: str) -> str:
    """A rehearsal origin such as ``http://127.0.0.1:8765``, canonical form."""
    parts = urlsplit(value)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or host is None:
        raise ValueError(f"expected an origin such as http://127.0.0.1:8765, got {value!r}")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected an origin (scheme, host, port) only, got {value!r}")
    # Only the rehearsal's own machine, or the lab's network, by address:
    # this list can never turn the answer page into a redirect to a site a
    # real worker's browser could reach.
    if not is_rehearsal_address(host):
        raise ValueError(
            f"only loopback or documentation-range (lab) worker sites may be added, got {value!r}"
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


RehearsalSite = Annotated[str, AfterValidator(_rehearsal_site)]


class MTurkConfig(_Model):
    # Worker sites accepted as turkSubmitTo besides MTurk's own (production
    # and sandbox): origins of `probe-server fake-mturk` on loopback or, in
    # the namespace lab, on a documentation-range address, for rehearsals
    # only. Empty in production.
    rehearsal_worker_sites: tuple[RehearsalSite, ...] = ()


class GeoIPConfig(_Model):
    """MaxMind-format databases for ``probe-server report``; the server never reads them."""

    # Country or City database (GeoLite2-Country, GeoLite2-City, GeoIP2-*).
    country_db: Path | None = None
    # ASN database (GeoLite2-ASN): network number and owner of each address.
    asn_db: Path | None = None


# The battery's probes beyond the paper's red and blue balls (battery.py).
BatteryProbe = Literal["ds", "literal", "mtu", "v6ns"]
# The base URLs whose host names can carry the session label.
LabelledUrl = Literal["ipv4", "ipv6", "ds", "v6ns"]


def _host_is_literal(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BatteryConfig(_Model):
    """test-ipv6.com's and APNIC's probes on the ball page, beside the paper's."""

    # Probes added to the ball page: "ds" (a dual-stack name: which family
    # does the browser choose?), "literal" (an IPv6 address literal: IPv6
    # without AAAA resolution?), "mtu" (a response of full-size packets over
    # IPv6: path-MTU black holes?), "v6ns" (a name whose name server is
    # IPv6-only: does the resolver reach DNS over IPv6?). Empty: the paper's
    # page, whose one probe is the blue balls.
    probes: tuple[BatteryProbe, ...] = ()
    # Base URL of the dual-stack name (A and AAAA), e.g. "http://ds.example.org".
    ds_url: BaseUrl | None = None
    # Base URL with the IPv6 site's address as a literal, e.g.
    # "http://[2001:db8::10]"; unset: the IPv6 site's socket (tests, demo).
    literal_url: BaseUrl | None = None
    # Base URL of a dual-stack name inside the zone delegated to an IPv6-only
    # name server, e.g. "http://ds.v6ns.example.org".
    v6ns_url: BaseUrl | None = None
    # Base URLs whose host name gets the session token as its first label
    # (<token>.v6.example.org): "ipv4" (red balls), "ipv6" (blue balls and
    # the large response), "ds", "v6ns". Our DNS log then joins each session
    # with the resolvers that asked for its names. Names only, never literals.
    labels: tuple[LabelledUrl, ...] = ()
    # A script reports, for every probe, loaded, failed or still pending and
    # its timings (Resource Timing) to the IPv4 site; the page works without it.
    beacon: bool = False
    # Seconds after which the beacon gives up on probes still loading and
    # reports them as timed out (test-ipv6.com's timeout).
    beacon_timeout: float = Field(default=10.0, gt=0, le=120)

    @model_validator(mode="after")
    def _urls(self) -> BatteryConfig:
        if len(set(self.probes)) != len(self.probes):
            raise ValueError("probes: each probe once")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: each base URL once")
        for probe, url in (("ds", self.ds_url), ("v6ns", self.v6ns_url)):
            if probe in self.probes and url is None:
                raise ValueError(f"{probe}_url: needed by the {probe} probe")
            if probe in self.labels and url is not None and _host_is_literal(url):
                raise ValueError(
                    f"labels: {probe}_url is an address literal; only names get labels"
                )
        if self.literal_url is not None:
            host = urlsplit(self.literal_url).hostname or ""
            if not _host_is_literal(self.literal_url) or ipaddress.ip_address(host).version != 6:
                raise ValueError(f"literal_url: needs an IPv6 address literal, got {host!r}")
        return self


class Config(_Model):
    server: ServerConfig = ServerConfig()
    sites: SitesConfig = SitesConfig()
    http: HttpConfig = HttpConfig()
    database: DatabaseConfig = DatabaseConfig()
    survey: SurveyConfig = SurveyConfig()
    speedtest: SpeedTestConfig = SpeedTestConfig()
    tool: ToolConfig = ToolConfig()
    dns: DnsConfig = DnsConfig()
    admin: AdminConfig = AdminConfig()
    logging: LoggingConfig = LoggingConfig()
    mturk: MTurkConfig = MTurkConfig()
    geoip: GeoIPConfig = GeoIPConfig()
    battery: BatteryConfig = BatteryConfig()
    # Where the file was read from (None for the built-in demo config).
    source: Path | None = None

    @model_validator(mode="after")
    def _battery_sites(self) -> Config:
        battery = self.battery
        for name, site in (("ipv4", self.sites.ipv4), ("ipv6", self.sites.ipv6)):
            named = site.base_url is not None and not _host_is_literal(site.base_url)
            if name in battery.labels and not named:
                raise ValueError(
                    f"battery.labels: {name} needs sites.{name}.base_url with a host name"
                )
        ipv6_url = self.sites.ipv6.base_url
        if (
            "literal" in battery.probes
            and battery.literal_url is None
            and ipv6_url is not None
            and not _host_is_literal(ipv6_url)
        ):
            raise ValueError(
                "battery.literal_url: needed by the literal probe (sites.ipv6.base_url is a name)"
            )
        if self.sites.ipv4.tls_cert is not None:
            # A page on HTTPS may not load images over HTTP (mixed content).
            for key in ("ds_url", "literal_url", "v6ns_url"):
                url = getattr(battery, key)
                if url is not None and url.startswith("http:"):
                    raise ValueError(f"battery.{key}: the survey is on HTTPS, so must this be")
        return self

    def resolve(self, path: Path) -> Path:
        """A path from the config, relative to the config file's directory."""
        path = path.expanduser()
        if path.is_absolute() or self.source is None:
            return path
        return self.source.parent / path


def demo_config() -> Config:
    """The built-in config: loopback only, database in the working directory."""
    return Config()


def describe_error(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    message = message.removeprefix("Value error, ")
    # Errors raised inside a model validator carry the field in the message.
    return f"{prefix}{location or '(top level)'}: {message}"


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot read: permission denied"
    return None


def _creatable_problem(path: Path, *, write: bool) -> str | None:
    """Why ``path`` cannot be created (or, if it exists, read or written), or None."""
    directory = path.parent
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    exists = path.exists()
    if exists:
        problem = _file_problem(path)
        if problem is not None:
            return problem
        if write and not os.access(path, os.W_OK):
            return "cannot write: permission denied"
    # The secret is created there; SQLite also creates the -wal and -shm files.
    if (write or not exists) and not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    return None


def check_paths(config: Config) -> None:
    """The files ``serve`` reads and the directories it writes to, before it starts.

    A missing zone file or certificate, or a secret or database that cannot
    be created, is a bad config: ConfigError naming the key (exit status 2),
    before anything is created or bound. What the files hold is read at
    start and on SIGHUP, where a bad file is a start-up error.
    """
    prefix = f"{config.source}: " if config.source is not None else ""
    checks: list[tuple[str, Path, str | None]] = []
    secret = config.resolve(config.server.secret_file)
    checks.append(("server.secret_file", secret, _creatable_problem(secret, write=False)))
    database = config.resolve(config.database.path)
    checks.append(("database.path", database, _creatable_problem(database, write=True)))
    for name, site in (("ipv4", config.sites.ipv4), ("ipv6", config.sites.ipv6)):
        for key in ("tls_cert", "tls_key"):
            value = getattr(site, key)
            if value is not None:
                path = config.resolve(value)
                checks.append((f"sites.{name}.{key}", path, _file_problem(path)))
    if config.dns.enabled:
        for value in config.dns.zones:
            path = config.resolve(value)
            checks.append(("dns.zones", path, _file_problem(path)))
    for key, path, problem in checks:
        if problem is not None:
            raise ConfigError(f"{prefix}{key}: {path}: {problem}")


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a config file; ``None`` gives the demo config."""
    if path is None:
        return demo_config()
    path = Path(path)
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key")
    try:
        return Config.model_validate({**data, "source": path.resolve()})
    except ValidationError as e:
        raise ConfigError(describe_error(e, f"{path}: ")) from None
