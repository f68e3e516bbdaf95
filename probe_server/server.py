"""Running the server: bind every socket, start, wait for a signal, drain.

Sockets are made here rather than by aiohttp or asyncio so that each family
gets its own socket and IPv6 sockets carry IPV6_V6ONLY: an IPv4 client must
never reach the IPv6 site through a mapped address.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .config import Config, SiteConfig, parse_endpoint
from .dnsserver import DnsServer
from .dnswire import Responder
from .tokens import load_or_create_secret
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


def tls_context(config: Config, site: SiteConfig) -> ssl.SSLContext | None:
    if site.tls_cert is None or site.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.resolve(site.tls_cert), config.resolve(site.tls_key))
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"cannot load TLS certificate {site.tls_cert}: {e}") from None
    return context


def sd_notify(message: str) -> None:
    """Tell systemd (or a test harness) about our state, if it asked."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(target)
            sock.sendall(message.encode())
        except OSError as e:
            log.warning("event=notify_failed error=%r", str(e))


@dataclass
class Listeners:
    """The bound public sockets, by role."""

    http: dict[str, socket.socket]
    # "udp_ipv4", "tcp_ipv4", "udp_ipv6", "tcp_ipv6" (empty when DNS is off).
    dns: dict[str, socket.socket]

    def close(self) -> None:
        for sock in (*self.http.values(), *self.dns.values()):
            sock.close()

    def describe(self) -> str:
        parts = [f"http_{site}={endpoint_text(sock)}" for site, sock in self.http.items()]
        parts += [f"dns_{name}={endpoint_text(sock)}" for name, sock in self.dns.items()]
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
        if config.dns.enabled:
            for name, endpoint in ((IPV4, config.dns.listen_ipv4), (IPV6, config.dns.listen_ipv6)):
                udp, tcp = bind_dns_pair(*parse_endpoint(endpoint))
                listeners.dns[f"udp_{name}"], listeners.dns[f"tcp_{name}"] = udp, tcp
    except BaseException:
        listeners.close()
        raise
    return listeners


def load_authority(config: Config) -> Authority:
    """Read every zone file named in the config, before anything binds."""
    try:
        return Authority.from_files(config.resolve(path) for path in config.dns.zones)
    except ZoneError as e:
        raise StartupError(f"dns.zones: {e}") from None


class ProbeServer:
    """Every listener of one probe-server process, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: Listeners | None = None
        self.base_urls: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.dns: DnsServer | None = None

    async def start(self) -> Listeners:
        """Bind every socket, open the database, start serving.

        Nothing is left running if any step fails.
        """
        config = self.config
        try:
            secret = load_or_create_secret(config.resolve(config.server.secret_file))
        except (OSError, ValueError) as e:
            raise StartupError(f"server.secret_file: {e}") from None
        contexts = {
            IPV4: tls_context(config, config.sites.ipv4),
            IPV6: tls_context(config, config.sites.ipv6),
        }
        authority = load_authority(config) if config.dns.enabled else None
        listeners = bind_all(config)
        base_urls = {
            IPV4: config.sites.ipv4.base_url or site_url(listeners.http[IPV4], contexts[IPV4]),
            IPV6: config.sites.ipv6.base_url or site_url(listeners.http[IPV6], contexts[IPV6]),
        }
        self.base_urls = base_urls
        if authority is not None:
            responder = Responder(
                authority,
                udp_size=config.dns.edns_udp_size,
                cache_size=config.dns.answer_cache,
            )
            self.dns = DnsServer(config.dns, responder, listeners.dns)
        self.app = create_app(config, secret, base_urls, self.dns)
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=config.server.shutdown_timeout,
        )
        try:
            await runner.setup()
        except Exception as e:
            listeners.close()
            raise StartupError(f"database.path: cannot open {config.database.path}: {e}") from None
        self._runner = runner
        self.listeners = listeners
        try:
            for name, sock in listeners.http.items():
                await web.SockSite(runner, sock, ssl_context=contexts[name]).start()
        except BaseException:
            await self.stop()
            raise
        log.info("event=ready %s", listeners.describe())
        return listeners

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush the writer. Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self.listeners is not None:
            self.listeners.close()


async def serve(config: Config, *, on_ready: Callable[[Listeners], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain and return 0."""
    server = ProbeServer(config)
    listeners = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        sd_notify(f"READY=1\nSTATUS=listening {listeners.describe()}\nMAINPID={os.getpid()}")
        if on_ready is not None:
            on_ready(listeners)
        await stop.wait()
        log.info("event=stopping")
        sd_notify("STOPPING=1")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
    log.info("event=stopped")
    return 0
