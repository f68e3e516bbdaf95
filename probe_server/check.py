"""``probe-server check``: find what would spoil a measurement before any worker comes.

Most failed set-ups fail on delegation, certificates or a busy port. Each
check prints one line, ``PASS``, ``FAIL`` or ``SKIP`` (not applicable here),
and any FAIL makes the exit status non-zero. Without ``--public`` nothing
leaves the machine: the config, the zone files against the configured
addresses, the TLS files, GeoIP files and every socket. With ``--public`` the
names are also asked of a recursive resolver (the system's, or
``--resolver``) and the parent zone's servers are asked for the delegation,
as a browser's resolver on the Internet would find them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from .config import Config, SiteConfig, parse_endpoint
from .server import StartupError, load_authority
from .tls import TlsError, load_context, read_certificate
from .zone import NXDOMAIN, TYPE_A, TYPE_AAAA, TYPE_NS, Authority, Name, Zone, record_targets

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SITES = (("ipv4", 4), ("ipv6", 6))
# certbot renews 90-day certificates 30 days before expiry: fewer than 14
# days left means renewal is broken (a sixth of the lifetime for short-lived
# ones, such as Let's Encrypt's 6-day IP-address certificates).
MIN_DAYS_LEFT = 14
# What each [geoip] key must hold: database_type contains one of these
# (GeoLite2-Country, GeoIP2-City, GeoLite2-ASN, ...), as probe-server report
# requires (analysis/geo.py).
GEOIP_TYPES = {
    "country_db": (("Country", "City"), "a Country or City"),
    "asn_db": (("ASN",), "an ASN"),
}
# Addresses every real database covers (public resolvers): looking them up
# walks the search tree and decodes records, which a corrupt file fails.
GEOIP_LOOKUPS = ("1.1.1.1", "8.8.8.8", "2606:4700:4700::1111")
# A label no zone holds: answers for it show what a per-session name gets.
SESSION_LABEL = b"probe-server-check"


@dataclass(frozen=True)
class Result:
    status: str
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.what}: {self.detail}"


@dataclass
class Options:
    public: bool = False
    # Recursive resolvers for --public (address, port); empty: the system's.
    resolvers: list[tuple[str, int]] = field(default_factory=list)
    # The port the zones' servers (the parent's and ours) are asked on.
    authoritative_port: int = 53
    timeout: float = 5.0
    now: datetime | None = None


def _labels(host: str) -> Name:
    return tuple(label.encode().lower() for label in host.rstrip(".").split(".") if label)


def _text(name: Name) -> str:
    return ".".join(label.decode("ascii", "backslashreplace") for label in name) + "."


def _site_host(site: SiteConfig) -> str | None:
    if site.base_url is None:
        return None
    return urlsplit(site.base_url).hostname


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_local(address: str) -> bool:
    """True when this machine has ``address`` (binding to it works)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as e:
            return e.errno != errno.EADDRNOTAVAIL
    return True


def _expected(listen: str) -> str | None:
    """The address a listen endpoint pins down (None for 0.0.0.0 and [::])."""
    address = ipaddress.ip_address(parse_endpoint(listen)[0])
    return None if address.is_unspecified else str(address)


def _address_problems(addresses: Iterable[str], listen: str, key: str) -> list[str]:
    """Why ``addresses`` are not where ``listen`` (config key ``key``) listens."""
    expected = _expected(listen)
    problems = []
    for address in addresses:
        if expected is not None and ipaddress.ip_address(address) != ipaddress.ip_address(expected):
            problems.append(f"{address} is not {key} ({expected})")
        elif expected is None and not is_local(address):
            problems.append(f"{address} is not an address of this machine ({key} = {listen})")
    return problems


def _addresses(authority: Authority, name: Name, qtype: int) -> tuple[int, list[str]]:
    answer = authority.answer(name, qtype)
    found = [str(ipaddress.ip_address(str(rr.rdata))) for rr in answer.answer if rr.rtype == qtype]
    return answer.rcode, found


# -- socket owners, from /proc (who holds port 53?) ---------------------------------


def _proc_address(text: str) -> tuple[str, int]:
    """``0100007F:0035`` (as in /proc/net/udp) to ("127.0.0.1", 53)."""
    hex_address, hex_port = text.split(":")
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(hex_port, 16)


def socket_owner(kind: int, address: str, port: int) -> tuple[int, list[str]] | None:
    """(pid, argv) of the process holding ``address:port``, if it can be seen."""
    family6 = ":" in address
    table = ("tcp" if kind == socket.SOCK_STREAM else "udp") + ("6" if family6 else "")
    inodes = set()
    try:
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return None
    wanted = ipaddress.ip_address(address)
    for line in lines:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        held, held_port = _proc_address(local)
        if held_port != port or (kind == socket.SOCK_STREAM and state != "0A"):  # 0A: LISTEN
            continue
        held_address = ipaddress.ip_address(held)
        if held_address == wanted or held_address.is_unspecified or wanted.is_unspecified:
            inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    return int(pid), raw.decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
    return None


def is_probe_server(argv: list[str]) -> bool:
    """``/opt/probe-server/venv/bin/probe-server serve ...`` or ``python -m probe_server serve``."""
    for index, arg in enumerate(argv[:4]):
        if os.path.basename(arg) == "probe-server" and index <= 1:
            return "serve" in argv[index + 1 :]
        if arg == "-m" and argv[index + 1 : index + 2] == ["probe_server"]:
            return "serve" in argv[index + 2 :]
    return False


def _bind_problem(kind: int, address: str, port: int) -> tuple[str, str] | None:
    """None when ``address:port`` can be bound now; else (status, why)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                owner = socket_owner(kind, address, port)
                if owner is None:
                    return FAIL, "in use by another process"
                pid, argv = owner
                if is_probe_server(argv):
                    return PASS, f"held by the running probe-server (pid {pid})"
                return FAIL, f"in use by pid {pid}: {' '.join(argv)[:120]}"
            if e.errno == errno.EACCES:
                return FAIL, (
                    "permission denied (ports below 1024 need root or"
                    " CAP_NET_BIND_SERVICE, which the systemd unit grants)"
                )
            if e.errno == errno.EADDRNOTAVAIL:
                return FAIL, "this machine has no such address"
            return FAIL, e.strerror or str(e)
    return None


class Checker:
    """Runs the checks for one config, handing each result to ``emit`` as it comes."""

    def __init__(self, config: Config, options: Options, emit: Callable[[Result], None]) -> None:
        self.config = config
        self.options = options
        self.emit = emit
        self.failed = False
        self.authority: Authority | None = None

    def result(self, status: str, what: str, detail: str) -> None:
        self.failed |= status == FAIL
        self.emit(Result(status, what, detail))

    def run(self) -> bool:
        """Every check; True when none failed."""
        self.check_secret()
        self.check_zones()
        self.check_names()
        self.check_battery_names()
        self.check_name_servers()
        self.check_tls()
        self.check_acme()
        self.check_geoip()
        self.check_sockets()
        if self.options.public:
            self.check_public()
        return not self.failed

    # -- files ---------------------------------------------------------------

    def check_secret(self) -> None:
        path = self.config.resolve(self.config.server.secret_file)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            self.result(PASS, "secret", f"{path}: absent, created (mode 0600) on first start")
            return
        except OSError as e:
            self.result(FAIL, "secret", f"{path}: {e.strerror}")
            return
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.result(FAIL, "secret", f"{path}: readable by others (chmod 600 it)")
        else:
            self.result(PASS, "secret", f"{path}: private")

    def check_zones(self) -> None:
        dns_config = self.config.dns
        if not dns_config.enabled:
            self.result(SKIP, "zones", "dns.enabled = false: DNS is served elsewhere")
            return
        try:
            self.authority = load_authority(self.config)
        except StartupError as e:
            self.result(FAIL, "zones", str(e))
            return
        names = ", ".join(
            f"{_text(origin)} ({len(zone.nodes)} names)"
            for origin, zone in self.authority.zones.items()
        )
        self.result(PASS, "zones", names)

    def _our_zone(self, what: str, host: str) -> tuple[Name, Zone] | None:
        """``host``'s labels and the zone of ours it is in; None (a SKIP said) if none."""
        if _is_ip(host):
            self.result(SKIP, what, f"{host} is an address literal (no DNS)")
            return None
        if self.authority is None:
            self.result(SKIP, what, f"{host}: no zones loaded")
            return None
        name = _labels(host)
        zone = self.authority.find_zone(name)
        if zone is None:
            self.result(SKIP, what, f"{host} is not in our zones (DNS served elsewhere)")
            return None
        return name, zone

    def check_names(self) -> None:
        """The survey name has only A records, the probe name only AAAA, at the sites."""
        for site_name, version in SITES:
            site: SiteConfig = getattr(self.config.sites, site_name)
            what = f"name {site_name}"
            host = _site_host(site)
            if host is None:
                self.result(SKIP, what, f"sites.{site_name}.base_url is not set")
                continue
            found_zone = self._our_zone(what, host)
            if found_zone is None:
                continue
            name, _ = found_zone
            assert self.authority is not None
            want, other = (TYPE_A, TYPE_AAAA) if version == 4 else (TYPE_AAAA, TYPE_A)
            want_text, other_text = ("A", "AAAA") if version == 4 else ("AAAA", "A")
            problems: list[str] = []
            found: list[str] = []
            for per_session in (False, True):
                qname = (SESSION_LABEL, *name) if per_session else name
                prefix = "per-session names: " if per_session else ""
                rcode, addresses = _addresses(self.authority, qname, want)
                if per_session and rcode == NXDOMAIN:
                    continue  # no wildcard below the name: no per-session names
                if not per_session:
                    found = addresses
                if not addresses:
                    problems.append(f"{prefix}no {want_text} record")
                key = f"sites.{site_name}.listen"
                problems += [prefix + p for p in _address_problems(addresses, site.listen, key)]
                _, others = _addresses(self.authority, qname, other)
                if others:
                    problems.append(
                        f"{prefix}has {other_text} {', '.join(others)}: an IPv{version}-only"
                        f" name must have no {other_text} record"
                    )
            if problems:
                self.result(FAIL, what, f"{host}: " + "; ".join(problems))
            else:
                self.result(
                    PASS,
                    what,
                    f"{host}: {want_text} {', '.join(found)} only (the {site_name} site)",
                )

    def check_battery_names(self) -> None:
        """The battery's dual-stack names (ds_url, v6ns_url) have A records at the
        IPv4 site and AAAA at the IPv6 site; the v6ns name's zone has name
        servers with IPv6 addresses only (its glue at the parent too)."""
        battery = self.config.battery
        wanted = [
            (probe, url)
            for probe, url in (("ds", battery.ds_url), ("v6ns", battery.v6ns_url))
            if probe in battery.probes and url is not None
        ]
        if not wanted:
            self.result(SKIP, "battery names", "no ds or v6ns probe in battery.probes")
            return
        for probe, url in wanted:
            what = f"battery {probe}"
            host = urlsplit(url).hostname or ""
            found_zone = self._our_zone(what, host)
            if found_zone is None:
                continue
            name, zone = found_zone
            assert self.authority is not None
            problems: list[str] = []
            found: list[str] = []
            # With the session label (battery.labels), every per-session name too.
            for per_session in (False, True) if probe in battery.labels else (False,):
                qname = (SESSION_LABEL, *name) if per_session else name
                prefix = "per-session names: " if per_session else ""
                for site_name, qtype, text in (("ipv4", TYPE_A, "A"), ("ipv6", TYPE_AAAA, "AAAA")):
                    _, addresses = _addresses(self.authority, qname, qtype)
                    if not addresses:
                        problems.append(f"{prefix}no {text} record (a dual-stack name has both)")
                    site: SiteConfig = getattr(self.config.sites, site_name)
                    key = f"sites.{site_name}.listen"
                    problems += [prefix + p for p in _address_problems(addresses, site.listen, key)]
                    if not per_session:
                        found += [f"{text} {a}" for a in addresses]
            if probe == "v6ns":
                problems += self._ipv6_only_name_servers(zone)
            if problems:
                self.result(FAIL, what, f"{host}: " + "; ".join(problems))
            else:
                only = "; its zone's name servers IPv6-only" if probe == "v6ns" else ""
                self.result(PASS, what, f"{host}: {', '.join(found)} (both sites){only}")

    def _ipv6_only_name_servers(self, zone: Zone) -> list[str]:
        """Why the name servers of ``zone`` (the v6ns probe's) are reachable over IPv4."""
        assert self.authority is not None
        problems = []
        # The delegation's glue, when the parent zone is ours too (else --public
        # sees what the parent's servers say).
        parent = self.authority.find_zone(zone.origin[1:]) if zone.origin else None
        targets = record_targets(zone.nodes[zone.origin][TYPE_NS])
        for target in targets:
            for where in (z for z in (self.authority.find_zone(target), parent) if z is not None):
                node = where.nodes.get(target, {})
                for rr in node.get(TYPE_A, ()):
                    problems.append(
                        f"name server {_text(target)} has A {rr.rdata} in {_text(where.origin)}:"
                        " the v6ns zone's name servers must have IPv6 addresses only"
                    )
        return sorted(set(problems))

    def check_name_servers(self) -> None:
        """Each zone's name servers are ours (the DNS listen addresses), with glue."""
        if self.authority is None:
            return
        authority = self.authority
        listen = {4: self.config.dns.listen_ipv4, 6: self.config.dns.listen_ipv6}
        for origin, zone in authority.zones.items():
            what = f"zone {_text(origin)}"
            problems: list[str] = []
            shown: list[str] = []
            for target in record_targets(zone.nodes[origin][TYPE_NS]):
                home = authority.find_zone(target)
                if home is None:
                    shown.append(f"{_text(target)} (not ours, not checked)")
                    continue
                addresses = _glue(home, target)
                if not addresses:
                    problems.append(f"name server {_text(target)} has no A or AAAA record")
                for address in addresses:
                    version = ipaddress.ip_address(address).version
                    key = f"dns.listen_ipv{version}"
                    problems += [
                        f"name server {_text(target)}: {p}"
                        for p in _address_problems([address], listen[version], key)
                    ]
                shown.append(f"{_text(target)} {' '.join(addresses)}")
            for cut in sorted(zone.cuts):
                for target in record_targets(zone.nodes[cut][TYPE_NS]):
                    if target[-len(cut) :] == cut and not _glue(zone, target):
                        problems.append(
                            f"delegation {_text(cut)}: no glue for {_text(target)} in this zone"
                        )
            if problems:
                self.result(FAIL, what, "; ".join(problems))
            else:
                cuts = f"; delegates {', '.join(_text(c) for c in sorted(zone.cuts))}"
                self.result(PASS, what, f"NS {', '.join(shown)}{cuts if zone.cuts else ''}")

    def check_tls(self) -> None:
        now = self.options.now or datetime.now(UTC)
        for site_name, _ in SITES:
            site: SiteConfig = getattr(self.config.sites, site_name)
            what = f"tls {site_name}"
            if site.tls_cert is None or site.tls_key is None:
                if site.base_url and site.base_url.startswith("https:"):
                    self.result(FAIL, what, "base_url is https:// but no tls_cert is set")
                else:
                    why = (
                        "MTurk needs the survey on HTTPS"
                        if site_name == "ipv4"
                        else "an HTTPS survey page needs its probes on HTTPS"
                    )
                    self.result(SKIP, what, f"no certificate ({why})")
                continue
            cert, key = self.config.resolve(site.tls_cert), self.config.resolve(site.tls_key)
            try:
                load_context(cert, key)
                info = read_certificate(cert)
            except TlsError as e:
                self.result(FAIL, what, str(e))
                continue
            problems = []
            days = info.days_left(now)
            lifetime = (info.not_after - info.not_before).total_seconds() / 86400
            if info.not_before > now:
                problems.append(f"not valid before {info.not_before:%Y-%m-%d %H:%M}Z")
            if days <= 0:
                problems.append(f"expired on {info.not_after:%Y-%m-%d}")
            elif days < min(MIN_DAYS_LEFT, lifetime / 6):
                problems.append(
                    f"expires in {days:.0f} days (of {lifetime:.0f}): is renewal working?"
                )
            if info.self_signed:
                problems.append(f"self-signed ({info.subject}): browsers will refuse it")
            host = _site_host(site)
            if host is not None and not info.covers(host):
                names = ", ".join(info.dns_names + info.ip_addresses) or "none"
                problems.append(f"does not cover {host} (names: {names})")
            if problems:
                self.result(FAIL, what, f"{cert}: " + "; ".join(problems))
            else:
                covered = f"covers {host}, " if host else ""
                self.result(
                    PASS,
                    what,
                    f"{cert}: key matches, {covered}{days:.0f} days left, issued by {info.issuer}",
                )

    def check_acme(self) -> None:
        webroot = self.config.sites.acme_webroot
        if webroot is None:
            self.result(SKIP, "acme webroot", "sites.acme_webroot is not set")
            return
        path = self.config.resolve(webroot)
        if path.is_dir():
            self.result(PASS, "acme webroot", f"{path}: a directory")
        else:
            self.result(FAIL, "acme webroot", f"{path}: no such directory (certbot -w needs it)")

    def check_geoip(self) -> None:
        """Every file named in a ``[geoip]`` section, when the config has one."""
        section = getattr(self.config, "geoip", None)
        paths = []
        if section is not None:
            for key in type(section).model_fields:
                value = getattr(section, key)
                if isinstance(value, Path):
                    paths.append((f"geoip.{key}", self.config.resolve(value)))
        if not paths:
            self.result(SKIP, "geoip", "no GeoIP database configured")
        for key, path in paths:
            status, detail = check_geoip_file(
                path, key.removeprefix("geoip."), self.options.now or datetime.now(UTC)
            )
            self.result(status, key, detail)

    # -- sockets ---------------------------------------------------------------

    def endpoints(self) -> list[tuple[str, int, str]]:
        """(what, socket type, ADDRESS:PORT) for every socket the server binds."""
        config = self.config
        stream, datagram = socket.SOCK_STREAM, socket.SOCK_DGRAM
        found: list[tuple[str, int, str]] = []
        for site_name, _ in SITES:
            site: SiteConfig = getattr(config.sites, site_name)
            found.append((f"sites.{site_name}.listen", stream, site.listen))
            if site.http_listen is not None:
                found.append((f"sites.{site_name}.http_listen", stream, site.http_listen))
        if config.dns.enabled:
            for key in ("listen_ipv4", "listen_ipv6"):
                endpoint = getattr(config.dns, key)
                found.append((f"dns.{key} udp", datagram, endpoint))
                found.append((f"dns.{key} tcp", stream, endpoint))
        if config.admin.enabled:
            found.append(("admin.listen", stream, config.admin.listen))
        return found

    def check_sockets(self) -> None:
        for key, kind, endpoint in self.endpoints():
            address, port = parse_endpoint(endpoint)
            problem = _bind_problem(kind, address, port)
            what = f"socket {key}"
            if problem is None:
                self.result(PASS, what, f"{endpoint} can be bound")
            else:
                self.result(problem[0], what, f"{endpoint} {problem[1]}")

    # -- the public view ------------------------------------------------------

    def resolver(self) -> dns.resolver.Resolver:
        if self.options.resolvers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port)
                for address, port in self.options.resolvers
            ]
        else:
            resolver = dns.resolver.Resolver()
        resolver.lifetime = self.options.timeout
        resolver.cache = None
        return resolver

    def check_public(self) -> None:
        resolver = self.resolver()
        for site_name, version in SITES:
            site: SiteConfig = getattr(self.config.sites, site_name)
            host = _site_host(site)
            what = f"public {site_name}"
            if host is None or _is_ip(host):
                self.result(SKIP, what, f"sites.{site_name}.base_url names no host")
                continue
            self.result(*self._public_name(resolver, host, site_name, version, site.listen))
        if self.authority is None:
            return
        origins = list(self.authority.zones)
        for origin in origins:
            # A zone inside another of ours is delegated by our own files (checked above).
            if any(o != origin and origin[-len(o) :] == o for o in origins if o):
                continue
            self._delegation(resolver, self.authority.zones[origin])

    def _public_name(
        self, resolver: dns.resolver.Resolver, host: str, site: str, version: int, listen: str
    ) -> tuple[str, str, str]:
        what = f"public {site}"
        want, other = ("A", "AAAA") if version == 4 else ("AAAA", "A")
        expected: set[str] | None = None
        if self.authority is not None and self.authority.find_zone(_labels(host)) is not None:
            expected = set(
                _addresses(self.authority, _labels(host), dns.rdatatype.from_text(want))[1]
            )
        elif _expected(listen) is not None:
            expected = {str(_expected(listen))}
        try:
            answer = resolver.resolve(host, want, raise_on_no_answer=False)
            found = {str(ipaddress.ip_address(r.to_text())) for r in answer.rrset or ()}
            other_answer = resolver.resolve(host, other, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return FAIL, what, f"{host}: NXDOMAIN (is the zone delegated to us?)"
        except dns.exception.DNSException as e:
            return FAIL, what, f"{host}: no answer from the resolver ({e or type(e).__name__})"
        problems = []
        if not found:
            problems.append(f"no {want} record")
        elif expected is not None and found != expected:
            problems.append(
                f"{want} {', '.join(sorted(found))}, expected {', '.join(sorted(expected))}"
            )
        if other_answer.rrset:
            problems.append(
                f"has {other} {', '.join(r.to_text() for r in other_answer.rrset)}:"
                f" an IPv{version}-only name must have none"
            )
        if problems:
            return FAIL, what, f"{host}: " + "; ".join(problems)
        return (
            PASS,
            what,
            f"{host}: {want} {', '.join(sorted(found))}, no {other} (NODATA) via the resolver",
        )

    def _delegation(self, resolver: dns.resolver.Resolver, zone: Zone) -> None:
        origin = _text(zone.origin)
        ours = {_text(t) for t in record_targets(zone.nodes[zone.origin][TYPE_NS])}
        glue = {
            _text(t): set(_glue(zone, t)) for t in record_targets(zone.nodes[zone.origin][TYPE_NS])
        }
        # What resolvers see.
        what = f"public ns {origin}"
        try:
            answer = resolver.resolve(origin, "NS")
            seen = {r.target.to_text().lower() for r in answer}
        except dns.exception.DNSException as e:
            self.result(FAIL, what, f"resolver: {e or type(e).__name__}")
            seen = set()
        else:
            if seen == ours:
                self.result(PASS, what, f"NS {', '.join(sorted(seen))} via the resolver")
            else:
                self.result(
                    FAIL,
                    what,
                    f"resolvers see NS {', '.join(sorted(seen))}; our zone says"
                    f" {', '.join(sorted(ours))}",
                )
        # What the parent zone's servers say (the referral and its glue).
        self._parent_referral(resolver, zone, ours, glue)
        # Our servers answer for the zone, authoritatively.
        self._our_servers(zone, glue)

    def _parent_referral(
        self,
        resolver: dns.resolver.Resolver,
        zone: Zone,
        ours: set[str],
        glue: dict[str, set[str]],
    ) -> None:
        origin = dns.name.from_text(_text(zone.origin))
        what = f"delegation {origin}"
        try:
            parent = dns.resolver.zone_for_name(origin.parent(), resolver=resolver)
            servers = []
            for ns in resolver.resolve(parent, "NS"):
                for rdtype in ("A", "AAAA"):
                    found = resolver.resolve(ns.target, rdtype, raise_on_no_answer=False)
                    servers += [(ns.target.to_text(), r.to_text()) for r in found.rrset or ()]
        except dns.exception.DNSException as e:
            self.result(FAIL, what, f"cannot find the parent zone's servers: {e}")
            return
        if not servers:
            self.result(FAIL, what, f"the parent zone {parent} has no reachable server")
            return
        query = dns.message.make_query(origin, "NS")
        query.flags &= ~dns.flags.RD
        reply: dns.message.Message | None = None
        errors = []
        for server_name, address in servers:
            try:
                reply = dns.query.udp(
                    query, address, port=self.options.authoritative_port,
                    timeout=self.options.timeout, ignore_unexpected=True,
                )  # fmt: skip
                break
            except (dns.exception.DNSException, OSError) as e:
                errors.append(f"{server_name} {address}: {e or type(e).__name__}")
        if reply is None:
            self.result(FAIL, what, f"no parent server answered: {'; '.join(errors)}")
            return
        referred = {
            rdata.target.to_text().lower()
            for rrset in (*reply.authority, *reply.answer)
            if rrset.rdtype == dns.rdatatype.NS and rrset.name == origin
            for rdata in rrset
        }
        given: dict[str, set[str]] = {}
        for rrset in reply.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                given.setdefault(rrset.name.to_text().lower(), set()).update(
                    str(ipaddress.ip_address(r.to_text())) for r in rrset
                )
        problems = []
        if referred != ours:
            problems.append(
                f"{parent} delegates to {', '.join(sorted(referred)) or 'nothing'};"
                f" our zone says {', '.join(sorted(ours))}"
            )
        for name, addresses in sorted(glue.items()):
            if not dns.name.from_text(name).is_subdomain(origin):
                continue  # out of bailiwick: no glue expected
            if given.get(name, set()) != addresses:
                problems.append(
                    f"glue for {name} at {parent} is"
                    f" {', '.join(sorted(given.get(name, set()))) or 'missing'};"
                    f" our zone says {', '.join(sorted(addresses))}"
                )
        if problems:
            self.result(FAIL, what, "; ".join(problems))
        else:
            glue_text = ", ".join(f"{n} {' '.join(sorted(a))}" for n, a in sorted(given.items()))
            self.result(
                PASS,
                what,
                f"{parent} refers to {', '.join(sorted(referred))} (glue: {glue_text or 'none'})",
            )

    def _our_servers(self, zone: Zone, glue: dict[str, set[str]]) -> None:
        origin = dns.name.from_text(_text(zone.origin))
        serial = zone.soa.rdata.times[0]
        query = dns.message.make_query(origin, "SOA")
        query.flags &= ~dns.flags.RD
        for name, addresses in sorted(glue.items()):
            for address in sorted(addresses):
                what = f"server {name} {address}"
                try:
                    reply = dns.query.udp(
                        query, address, port=self.options.authoritative_port,
                        timeout=self.options.timeout, ignore_unexpected=True,
                    )  # fmt: skip
                except (dns.exception.DNSException, OSError) as e:
                    self.result(FAIL, what, f"no answer: {e or type(e).__name__}")
                    continue
                soa = reply.get_rrset(reply.answer, origin, dns.rdataclass.IN, dns.rdatatype.SOA)
                if not reply.flags & dns.flags.AA or soa is None:
                    self.result(FAIL, what, f"does not answer authoritatively for {origin}")
                elif soa[0].serial != serial:
                    self.result(
                        FAIL,
                        what,
                        f"serves serial {soa[0].serial}, our file has {serial}",
                    )
                else:
                    self.result(PASS, what, f"answers for {origin} (serial {serial})")


def _glue(zone: Zone, target: Name) -> list[str]:
    node = zone.nodes.get(target, {})
    return [
        str(ipaddress.ip_address(str(rr.rdata)))
        for kind in (TYPE_A, TYPE_AAAA)
        for rr in node.get(kind, ())
    ]


def check_geoip_file(path: Path, key: str, now: datetime) -> tuple[str, str]:
    """A MaxMind database for ``key`` (country_db, asn_db): it opens, its type
    fits the key, a few lookups work; its build date (metadata build_epoch)."""
    import maxminddb  # check only: the server never reads GeoIP databases

    try:
        size = path.stat().st_size
        reader = maxminddb.open_database(str(path))
    except FileNotFoundError:
        return FAIL, f"{path}: no such file"
    except (maxminddb.InvalidDatabaseError, ValueError):
        return FAIL, f"{path}: not a MaxMind database (it does not open as one)"
    except OSError as e:
        return FAIL, f"{path}: {e.strerror}"
    with reader:
        metadata = reader.metadata()
        database_type = metadata.database_type
        words, wanted = GEOIP_TYPES.get(key, ((), ""))
        if words and not any(word in database_type for word in words):
            return FAIL, f"{path}: is {database_type}, not {wanted} database"
        lookups = [a for a in GEOIP_LOOKUPS if metadata.ip_version == 6 or ":" not in a]
        try:
            for address in lookups:
                record = reader.get(address)
                if record is not None and not isinstance(record, dict):
                    raise maxminddb.InvalidDatabaseError(f"a record of {address} is not a map")
        except Exception as e:  # any error of the reader here: the data is damaged
            reason = str(e).removeprefix(f"Error looking up {address}. ")
            return FAIL, f"{path}: {database_type} is damaged (a lookup of {address}: {reason})"
    built = datetime.fromtimestamp(metadata.build_epoch, UTC)
    age = max(0, (now - built).days)
    return PASS, (
        f"{path}: {database_type}, built {built:%Y-%m-%d} ({age} days ago),"
        f" {size // 1024} KiB, lookups ok"
    )
