"""Running the server: bind every socket, start, wait for a signal, drain.

Sockets are made here rather than by aiohttp or asyncio so that each family
gets its own socket and IPv6 sockets carry IPV6_V6ONLY: an IPv4 client must
never reach the IPv6 site through a mapped address.

Under systemd (Type=notify) the server says READY=1 once every socket is
bound and the database is open, answers the watchdog while its writer
commits, and on SIGHUP reloads the TLS certificates, the zones (with the ACME
DNS-01 records) and whatever registered a reload hook, keeping every socket
open and the old state of anything that fails to load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .acme import read_dns_challenges
from .admin import create_admin_app
from .config import Config, parse_endpoint
from .dnsserver import DnsServer
from .dnswire import Responder
from .fastpath import FastBalls
from .keys import reload_hooks_key, writer_key
from .limits import ConnectionTable, GuardedSite
from .metrics import Metrics
from .store import Writer
from .tls import SiteCertificate, TlsError
from .tokens import SecretError, load_or_create_secret
from .web import IPV4, IPV6, create_app
from .zone import Authority, ZoneError

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start; the message says why in one line."""


def bind_socket(address: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A bound (and for TCP, listening) non-blocking socket of the address's family."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # Not for UDP: on Linux it would let a second server share the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
        raise StartupError(f"cannot listen on {where}: {e.strerror or e}") from None
    return sock


def endpoint_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def site_url(sock: socket.socket, context: ssl.SSLContext | None) -> str:
    """A site's URL taken from its bound socket (demo, tests, port 0)."""
    return f"{'https' if context else 'http'}://{endpoint_text(sock)}"


def load_certificates(config: Config) -> dict[str, SiteCertificate]:
    """The certificate of each site that has one."""
    certificates = {}
    for name, site in ((IPV4, config.sites.ipv4), (IPV6, config.sites.ipv6)):
        if site.tls_cert is None or site.tls_key is None:
            continue
        try:
            certificates[name] = SiteCertificate(
                name, config.resolve(site.tls_cert), config.resolve(site.tls_key)
            )
        except TlsError as e:
            raise StartupError(f"sites.{name}.tls_cert: {e}") from None
    return certificates


def sd_notify(message: str) -> None:
    """Tell systemd (or a test harness) about our state, if it asked."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    # Creating the socket can fail too (no file descriptor left): a failed
    # notification is logged, never raised into start-up or shutdown.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("event=notify_failed error=%r", str(e))


@dataclass
class Listeners:
    """The bound sockets, by role."""

    http: dict[str, socket.socket]
    # "udp_ipv4", "tcp_ipv4", "udp_ipv6", "tcp_ipv6" (empty when DNS is off).
    dns: dict[str, socket.socket]
    # Plain-HTTP sockets of TLS sites (port 80: ACME, redirects), by site.
    plain: dict[str, socket.socket] = field(default_factory=dict)
    # The admin listener (loopback only), when enabled.
    admin: socket.socket | None = None

    def close(self) -> None:
        for sock in (*self.http.values(), *self.dns.values(), *self.plain.values()):
            sock.close()
        if self.admin is not None:
            self.admin.close()

    def describe(self) -> str:
        parts = [f"http_{site}={endpoint_text(sock)}" for site, sock in self.http.items()]
        parts += [f"plain_{site}={endpoint_text(sock)}" for site, sock in self.plain.items()]
        parts += [f"dns_{name}={endpoint_text(sock)}" for name, sock in self.dns.items()]
        if self.admin is not None:
            parts.append(f"admin={endpoint_text(self.admin)}")
        return " ".join(parts)


def bind_dns_pair(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same port (port 0: a free one for both)."""
    for _ in range(20):
        tcp = bind_socket(address, port)
        try:
            udp = bind_socket(address, tcp.getsockname()[1], socket.SOCK_DGRAM)
        except StartupError:
            tcp.close()
            if port:
                raise
            continue  # the free TCP port is taken for UDP: try another
        return udp, tcp
    raise StartupError(f"cannot find a port free for both UDP and TCP on {address}")


def bind_all(config: Config) -> Listeners:
    listeners = Listeners(http={}, dns={})
    try:
        for name, site in ((IPV4, config.sites.ipv4), (IPV6, config.sites.ipv6)):
            listeners.http[name] = bind_socket(*parse_endpoint(site.listen))
            if site.http_listen is not None:
                listeners.plain[name] = bind_socket(*parse_endpoint(site.http_listen))
        if config.dns.enabled:
            for name, endpoint in ((IPV4, config.dns.listen_ipv4), (IPV6, config.dns.listen_ipv6)):
                udp, tcp = bind_dns_pair(*parse_endpoint(endpoint))
                listeners.dns[f"udp_{name}"], listeners.dns[f"tcp_{name}"] = udp, tcp
        if config.admin.enabled:
            listeners.admin = bind_socket(*parse_endpoint(config.admin.listen))
    except BaseException:
        listeners.close()
        raise
    return listeners


# File descriptors kept apart from the connection limits: listening sockets,
# the database and its WAL and shm files, the reader, refusals in progress,
# logs, notifications.
FD_RESERVE = 256


def web_sockets(config: Config) -> int:
    """Public web sockets: each site's, and the plain-HTTP socket of a TLS site."""
    return 2 + sum(site.http_listen is not None for site in (config.sites.ipv4, config.sites.ipv6))


def file_limit_needed(config: Config) -> int:
    """Open files the connection limits can use up, and the reserve."""
    needed = web_sockets(config) * config.http.max_connections + FD_RESERVE
    if config.dns.enabled:
        needed += config.dns.tcp_max_connections
    return needed


def ensure_file_limit(config: Config) -> int:
    """Raise the open-file limit to its hard limit; fail if that is too low.

    Without this a flood of connections would use up the descriptors before
    any connection limit is reached, and then accept() fails for everyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warning("event=file_limit_not_raised soft=%d hard=%d error=%r", soft, hard, str(e))
    needed = file_limit_needed(config)
    if soft != resource.RLIM_INFINITY and soft < needed:
        dns = config.dns.tcp_max_connections if config.dns.enabled else 0
        raise StartupError(
            f"http.max_connections: {web_sockets(config)} x {config.http.max_connections}"
            f" connections + dns.tcp_max_connections {dns} + {FD_RESERVE} need {needed}"
            f" open files, but the limit is {soft}"
            " (raise LimitNOFILE= or ulimit -n, or lower these limits)"
        )
    return int(soft)


def load_authority(config: Config) -> Authority:
    """Read every zone file named in the config, and the ACME DNS-01 records."""
    challenges = []
    if config.dns.acme_challenges is not None:
        try:
            challenges = read_dns_challenges(config.resolve(config.dns.acme_challenges))
        except ZoneError as e:
            raise StartupError(f"dns.acme_challenges: {e}") from None
    try:
        return Authority.from_files((config.resolve(path) for path in config.dns.zones), challenges)
    except ZoneError as e:
        raise StartupError(f"dns.zones: {e}") from None


def make_responders(authority: Authority, config: Config) -> tuple[Responder, Responder | None]:
    """The responder for IPv6 sockets (every zone) and, when it differs, for IPv4.

    IPv4 sockets do not answer from a child zone whose name servers are
    IPv6-only: they give the parent's referral, so the zone is reached
    only over IPv6, as if it had a server of its own.
    """
    size, cache = config.dns.edns_udp_size, config.dns.answer_cache
    responder = Responder(authority, udp_size=size, cache_size=cache)
    ipv6_only = authority.ipv6_only_zones()
    if not ipv6_only:
        return responder, None
    for origin in sorted(ipv6_only):
        log.info("event=zone_ipv6_only zone=%s", ".".join(o.decode() for o in origin) + ".")
    return responder, Responder(authority.without(ipv6_only), udp_size=size, cache_size=cache)


def sd_monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 messages when systemd asks for them (half its timeout)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


class Watchdog:
    """Sends WATCHDOG=1 at each interval while ``healthy()`` says so.

    The message comes from a timer on the event loop, so a blocked loop stops
    it too; a writer whose commits fail stops it on purpose: systemd then
    restarts the service (Restart=on-failure) as it would after a crash.
    """

    def __init__(self, interval: float, healthy: Callable[[], tuple[bool, str]]) -> None:
        self.interval = interval
        self.healthy = healthy
        self.ticks = 0
        self.sent = 0
        # Set after every tick (a new event each time), for tests.
        self.tick = asyncio.Event()

    async def run(self) -> None:
        was_ok = True
        while True:
            await asyncio.sleep(self.interval)
            ok, reason = self.healthy()
            if ok:
                sd_notify("WATCHDOG=1")
                self.sent += 1
            elif was_ok:
                log.error("event=watchdog_withheld reason=%r", reason)
            was_ok = ok
            self.ticks += 1
            tick, self.tick = self.tick, asyncio.Event()
            tick.set()


class ProbeServer:
    """Every listener of one probe-server process, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: Listeners | None = None
        self.base_urls: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.dns: DnsServer | None = None
        # Each web site's connections (tests; metrics).
        self.connections: dict[str, ConnectionTable] = {}
        self.fast: dict[str, FastBalls] = {}
        self.certificates: dict[str, SiteCertificate] = {}
        self.metrics = Metrics()
        self.metrics.attach(self)
        self._reload_lock = asyncio.Lock()

    @property
    def writer(self) -> Writer | None:
        if self.app is None or writer_key not in self.app:
            return None
        return self.app[writer_key]

    def health(self) -> tuple[bool, str]:
        """(True, "ok") while the database writer runs and commits succeed."""
        writer = self.writer
        if self._runner is None or writer is None or not writer.running:
            return False, "the database writer is not running"
        if not writer.healthy:
            return False, f"commits are failing: {writer.stats.last_error}"
        return True, "ok"

    async def start(self) -> Listeners:
        """Bind every socket, open the database, start serving.

        Nothing is left running if any step fails.
        """
        config = self.config
        try:
            secret = load_or_create_secret(config.resolve(config.server.secret_file))
        except SecretError as e:
            raise StartupError(f"server.secret_file: {e}") from None
        certificates = load_certificates(config)
        contexts: dict[str, ssl.SSLContext | None] = {
            name: certificates[name].listening if name in certificates else None
            for name in (IPV4, IPV6)
        }
        authority = load_authority(config) if config.dns.enabled else None
        ensure_file_limit(config)
        listeners = bind_all(config)
        self.certificates = certificates
        base_urls = {
            IPV4: config.sites.ipv4.base_url or site_url(listeners.http[IPV4], contexts[IPV4]),
            IPV6: config.sites.ipv6.base_url or site_url(listeners.http[IPV6], contexts[IPV6]),
        }
        self.base_urls = base_urls
        if authority is not None:
            responder, responder_v4 = make_responders(authority, config)
            self.dns = DnsServer(config.dns, responder, listeners.dns)
            self.dns.responder_v4 = responder_v4
        self.app = create_app(config, secret, base_urls, self.dns, self.metrics)
        # The ball fast path of each site, except on the plain-HTTP sockets
        # of TLS sites, which only redirect and serve ACME.
        if config.http.fast_balls:
            self.fast = {
                name: FastBalls(self.app, name, config.http.header_timeout) for name in (IPV4, IPV6)
            }
            shutdown_timeout = config.server.shutdown_timeout

            async def drain_fast_connections(app: web.Application) -> None:
                # After the sites stop accepting, before aiohttp's own
                # connections are drained and the writer flushed.
                for fast in self.fast.values():
                    await fast.drain(shutdown_timeout)

            self.app.on_shutdown.append(drain_fast_connections)
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=config.server.shutdown_timeout,
            # aiohttp closes a connection still waiting for a complete request
            # head this long after it opened or after its previous response,
            # however much has trickled in: the slowloris deadline.
            keepalive_timeout=config.http.header_timeout,
        )
        try:
            await runner.setup()
        except Exception as e:
            listeners.close()
            raise StartupError(f"database.path: cannot open {config.database.path}: {e}") from None
        self._runner = runner
        self.listeners = listeners
        try:
            limits = config.http
            for name, sock in listeners.http.items():
                table = self.connections[name] = ConnectionTable(
                    f"http_{name}", limits.max_connections, limits.max_connections_per_client
                )
                fast = self.fast.get(name)
                site = GuardedSite(
                    runner,
                    sock,
                    table,
                    send_timeout=limits.send_timeout,
                    ssl_context=contexts[name],
                    connection=fast.protocol if fast is not None else None,
                    # A handshake is part of getting a request head in.
                    handshake_timeout=limits.header_timeout,
                )
                await site.start()
            # The plain-HTTP sockets of TLS sites (ACME, redirects) are public too.
            for name, sock in listeners.plain.items():
                table = self.connections[f"plain_{name}"] = ConnectionTable(
                    f"plain_{name}", limits.max_connections, limits.max_connections_per_client
                )
                await GuardedSite(runner, sock, table, send_timeout=limits.send_timeout).start()
            if listeners.admin is not None:
                admin = create_admin_app(config.admin, self.metrics, self.health)
                self._admin_runner = web.AppRunner(admin, access_log=None, handle_signals=False)
                await self._admin_runner.setup()
                await web.SockSite(self._admin_runner, listeners.admin).start()
        except BaseException:
            await self.stop()
            raise
        for certificate in certificates.values():
            log.info("event=tls_loaded %s", certificate.describe())
        log.info("event=ready %s", listeners.describe())
        return listeners

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush the writer. Idempotent."""
        if self._admin_runner is not None:
            admin, self._admin_runner = self._admin_runner, None
            await admin.cleanup()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            for name, table in self.connections.items():
                stats = table.stats
                log.info(
                    "event=http_connections listener=%s admitted=%d peak=%d evicted=%d refused=%d"
                    " send_timeouts=%d handshakes_failed=%d",
                    name,
                    stats.admitted,
                    stats.peak,
                    stats.evicted,
                    stats.refused,
                    stats.send_timeouts,
                    stats.handshakes_failed,
                )
        if self.listeners is not None:
            self.listeners.close()

    async def reload(self) -> dict[str, bool]:
        """Reload certificates, zones and hooks (SIGHUP); sockets stay open.

        Each part either loads completely or keeps serving what it had: a bad
        file is logged, counted in the metrics and otherwise ignored. Returns
        each part's result.
        """
        async with self._reload_lock:
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={sd_monotonic_usec()}")
            results: dict[str, bool] = {}
            for name, certificate in self.certificates.items():
                part = f"tls_{name}"
                try:
                    certificate.reload()
                except TlsError as e:
                    log.error(
                        "event=reload_failed part=%s error=%r (old certificate kept)", part, str(e)
                    )
                    results[part] = False
                else:
                    log.info("event=tls_loaded %s", certificate.describe())
                    results[part] = True
            if self.dns is not None:
                results["zones"] = await self._reload_zones()
            hooks = self.app[reload_hooks_key] if self.app is not None else []
            for name, hook in hooks:
                try:
                    await hook()
                except Exception as e:
                    log.error("event=reload_failed part=%s error=%r", name, str(e))
                    results[name] = False
                else:
                    results[name] = True
            for part, ok in results.items():
                self.metrics.reloaded(part, ok)
            summary = " ".join(f"{part}={'ok' if ok else 'failed'}" for part, ok in results.items())
            log.info("event=reloaded %s", summary)
            listening = self.listeners.describe() if self.listeners is not None else ""
            sd_notify(f"READY=1\nSTATUS=listening {listening} reload: {summary}")
            return results

    async def _reload_zones(self) -> bool:
        assert self.dns is not None
        config = self.config
        try:
            # Parsing a large zone takes a while: not on the event loop.
            authority = await asyncio.to_thread(load_authority, config)
        except StartupError as e:
            log.error("event=reload_failed part=zones error=%r (old zones kept)", str(e))
            return False
        # New responders: their answer caches start empty.
        self.dns.responder, self.dns.responder_v4 = make_responders(authority, config)
        log.info("event=zones_loaded zones=%d", len(authority.zones))
        return True


async def serve(config: Config, *, on_ready: Callable[[Listeners], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain and return 0; SIGHUP reloads."""
    server = ProbeServer(config)
    listeners = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[object]] = set()

    def spawn(coroutine: Coroutine[Any, Any, object]) -> None:
        task = loop.create_task(coroutine)
        background.add(task)
        task.add_done_callback(background.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(server.reload()))
    try:
        sd_notify(f"READY=1\nSTATUS=listening {listeners.describe()}\nMAINPID={os.getpid()}")
        interval = watchdog_interval() if config.server.watchdog else None
        if interval is not None:
            spawn(Watchdog(interval, server.health).run())
            log.info("event=watchdog interval=%.3g", interval)
        if on_ready is not None:
            on_ready(listeners)
        await stop.wait()
        log.info("event=stopping")
        sd_notify("STOPPING=1")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for task in list(background):
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await server.stop()
    log.info("event=stopped")
    return 0
