"""Connection limits for the web sites and DNS over TCP.

aiohttp bounds the size of a request but not the number of connections, nor
how long a client may take to send its request head: it waits up to its
keep-alive timeout (an hour by default) however slowly the headers trickle in
(slowloris). Every open connection holds a file descriptor, and once the
process runs out of them accept() fails for everyone, DNS over TCP included.

:class:`ConnectionTable` keeps the open connections of one listener, grouped
by client (an IPv4 address, or an IPv6 /64: one subscriber). When a new
connection would pass a limit, the listener's or its client's, the
connection of that group that has been idle longest is closed to make room,
provided it has been idle for a second at least; otherwise (every one busy
with a request, or just opened) the newcomer is refused.
A slow client holds idle connections only, so it cannot keep anyone out: new
arrivals push the oldest idle connections out, and a client over its own
limit pushes out only its own. This is how RFC 7766 §6.2.3 suggests a DNS
server make room, applied to HTTP as well.

For the web sites, :class:`GuardedSite` puts :class:`GuardedConnection`
between each socket and aiohttp's protocol: it admits or refuses the
connection (a refusal is a complete ``503`` response), aborts a connection
whose client has stopped reading its response for ``send_timeout``, and
:func:`track_requests` marks a connection busy while a request is handled.
The deadline for a request head is aiohttp's own keep-alive timer, which
closes a connection still waiting for a complete request head that long
after it opened or after its previous response, however much of it has
arrived.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import ipaddress
import itertools
import logging
import socket
import ssl
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

# Only a connection idle this long may be evicted: one just accepted may not
# have received its request yet (with TLS 1.2, a round trip after the
# handshake; with plain TCP and TLS 1.3 it comes at once). Nor is one evicted
# whose request has arrived but not been read, as happens when the loop is
# behind under overload: that would throw away work already paid for, where
# refusing the newcomer costs little. Longer would let a flood of new
# connections starve everyone: at most max_connections / EVICT_AFTER
# connections a second can take a turn.
EVICT_AFTER = 0.1
# Idle connections looked at for one eviction before giving up.
EVICT_CANDIDATES = 16
# Connections refused and not yet closed (waiting for the client to read the
# 503 and hang up); beyond this a refusal is an immediate close.
MAX_LINGERING = 256
LINGER_SECONDS = 1.0
REFUSAL_BODY = b"503: too many connections; please try again in a few seconds\n"
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: 5\r\n"
    b"Cache-Control: no-store\r\n"
    b"Connection: close\r\n"
    b"\r\n" + REFUSAL_BODY
)


@functools.lru_cache(maxsize=65536)
def client_key(host: str) -> str:
    """The group a peer address belongs to: its IPv4 address or its IPv6 /64."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class Evictable(Protocol):
    def evict(self) -> None:
        """Close the connection now: the table needs its place."""

    def unread(self) -> bool:
        """Bytes have arrived that the connection has not read yet."""


def unread_bytes(transport: asyncio.BaseTransport | None) -> int:
    """Bytes waiting in the kernel's receive buffer of ``transport``'s socket."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


@dataclass
class LimitStats:
    """Counters for logs, tests and metrics."""

    admitted: int = 0
    # Idle connections closed to make room for a new one.
    evicted: int = 0
    # New connections turned away: every connection of the group was busy.
    refused: int = 0
    # Connections aborted because the client stopped reading a response.
    send_timeouts: int = 0
    # Most connections open at once.
    peak: int = 0


class _Group:
    __slots__ = ("count", "idle")

    def __init__(self) -> None:
        self.count = 0
        # Connection -> idle since; insertion order: the first is the idle longest.
        self.idle: dict[Evictable, float] = {}


class ConnectionTable:
    """The open connections of one listener, by client, with their limits."""

    def __init__(
        self,
        name: str,
        max_connections: int,
        max_per_client: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.clock = clock
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.stats = LimitStats()
        self.lingering = 0
        self._all = _Group()
        self._clients: dict[str, _Group] = {}
        self._client_of: dict[Evictable, str] = {}

    def __len__(self) -> int:
        return self._all.count

    def clients(self) -> int:
        return len(self._clients)

    def admit(self, connection: Evictable, client: str) -> bool:
        """Make room for ``connection`` (idle ones may be evicted), or refuse it."""
        group = self._clients.get(client)
        # Over its own limit, a client makes room among its own connections.
        if (
            group is not None
            and group.count >= self.max_per_client
            and not self._evict_oldest(group, client)
        ):
            return False
        if self._all.count >= self.max_connections and not self._evict_oldest(self._all, client):
            return False
        group = self._clients.get(client)
        if group is None:
            group = self._clients[client] = _Group()
        self._client_of[connection] = client
        now = self.clock()
        for g in (self._all, group):
            g.count += 1
            g.idle[connection] = now
        self.stats.admitted += 1
        self.stats.peak = max(self.stats.peak, self._all.count)
        return True

    def _evict_oldest(self, group: _Group, client: str) -> bool:
        victim = None
        now = self.clock()
        for candidate, since in itertools.islice(group.idle.items(), EVICT_CANDIDATES):
            if now - since < EVICT_AFTER:
                break  # the rest are younger still
            if not candidate.unread():
                victim = candidate
                break
        if victim is None:
            self.stats.refused += 1
            if self.stats.refused <= 10 or self.stats.refused % 1000 == 0:
                log.warning(
                    "event=connection_refused listener=%s client=%s open=%d refused=%d",
                    self.name,
                    client,
                    self._all.count,
                    self.stats.refused,
                )
            return False
        self.release(victim)
        self.stats.evicted += 1
        if self.stats.evicted <= 10 or self.stats.evicted % 1000 == 0:
            log.warning(
                "event=connection_evicted listener=%s open=%d evicted=%d",
                self.name,
                self._all.count,
                self.stats.evicted,
            )
        victim.evict()
        return True

    def idle(self, connection: Evictable) -> None:
        """``connection`` has nothing in progress from now on (it goes to the back)."""
        client = self._client_of.get(connection)
        if client is None:
            return
        now = self.clock()
        for g in (self._all, self._clients[client]):
            g.idle.pop(connection, None)
            g.idle[connection] = now

    def busy(self, connection: Evictable) -> None:
        """``connection`` is handling a request: it is not to be evicted."""
        client = self._client_of.get(connection)
        if client is None:
            return
        self._all.idle.pop(connection, None)
        self._clients[client].idle.pop(connection, None)

    def release(self, connection: Evictable) -> None:
        """``connection`` is gone (or going). Idempotent."""
        client = self._client_of.pop(connection, None)
        if client is None:
            return
        group = self._clients[client]
        for g in (self._all, group):
            g.count -= 1
            g.idle.pop(connection, None)
        if group.count == 0:
            del self._clients[client]


# -- the web sites -------------------------------------------------------------


class GuardedConnection(asyncio.Protocol):
    """Admission, send deadline and busy marking around aiohttp's protocol.

    Every event is handed on to aiohttp's ``RequestHandler`` unchanged; a
    refused connection never reaches aiohttp at all.
    """

    def __init__(
        self,
        table: ConnectionTable,
        factory: Callable[[], asyncio.Protocol],
        send_timeout: float,
    ) -> None:
        self.table = table
        self.factory = factory
        self.send_timeout = send_timeout
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        client = client_key(peer[0]) if peer else "?"
        if not self.table.admit(self, client):
            self._refuse()
            return
        self.admitted(peer)

    def admitted(self, peer: Any) -> None:
        """The connection has its place in the table: from now on it is aiohttp's."""
        assert self.transport is not None
        self.inner = self.factory()
        self.inner.connection_made(self.transport)

    def _refuse(self) -> None:
        """A complete 503, then close once the client has read it (or soon)."""
        transport = self.transport
        assert transport is not None
        transport.write(REFUSAL)
        if not transport.can_write_eof() or self.table.lingering >= MAX_LINGERING:
            transport.close()
            return
        # Closing at once, with the client's request unread, would make the
        # kernel answer with a reset that can destroy the 503 before the
        # client reads it: half-close, discard what comes, close on its EOF.
        transport.write_eof()
        self.table.lingering += 1
        self._lingering = True
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        # A complete request head has arrived: busy from now, not from when
        # its handler starts a loop turn or two later (track_requests).
        if b"\r\n\r\n" in self._tail + data[:3] or b"\r\n\r\n" in data:
            self.table.busy(self)
        self._tail = data[-3:]
        self.inner.data_received(data)

    def unread(self) -> bool:
        return unread_bytes(self.transport) > 0

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        if self.transport is not None:
            self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lingering:
            self._lingering = False
            self.table.lingering -= 1
        self.transport = None
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        # The client is not reading what we send: it has send_timeout to resume.
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.send_timeout, self._stalled)
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._timer is not None and not self._lingering:
            self._timer.cancel()
            self._timer = None
        if self.inner is not None:
            self.inner.resume_writing()

    def _stalled(self) -> None:
        self._timer = None
        self.table.stats.send_timeouts += 1
        if self.transport is not None:
            self.transport.abort()

    def evict(self) -> None:
        transport = self.transport
        if transport is None:
            return
        # close() would first wait to send what is buffered.
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


ConnectionFactory = Callable[
    [ConnectionTable, Callable[[], asyncio.Protocol], float], GuardedConnection
]


class GuardedSite(web.BaseSite):
    """A listening socket whose connections pass through a :class:`ConnectionTable`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        table: ConnectionTable,
        *,
        send_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
        connection: ConnectionFactory | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self.table = table
        self.send_timeout = send_timeout
        # What each accepted connection becomes (the ball fast path's, say).
        self.connection: ConnectionFactory = connection or GuardedConnection
        host, port = sock.getsockname()[:2]
        scheme = "https" if ssl_context else "http"
        self._name = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def protocol() -> GuardedConnection:
            return self.connection(self.table, server, self.send_timeout)

        self._server = await loop.create_server(
            protocol, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )


Handler = Callable[[web.Request], Any]


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mark the connection busy while its request is handled (not evictable)."""
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    if not isinstance(connection, GuardedConnection):
        response: web.StreamResponse = await handler(request)
        return response
    table = connection.table
    table.busy(connection)
    try:
        response = await handler(request)
        return response
    finally:
        table.idle(connection)


# -- requests aiohttp cannot parse --------------------------------------------------


class _MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback.

    That is the client's fault, not ours, and every scanner on the Internet
    sends such requests: they become one WARNING line without a traceback,
    the first ten and then every thousandth (the client still gets its 400).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        # Only the parser's own errors: raised in a handler, it was a 500.
        frame = error.__traceback__
        if frame is None or frame.tb_frame.f_code.co_name != "data_received":
            return True
        self.count += 1
        if self.count > 10 and self.count % 1000:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "event=malformed_request count=%d error=%r"
        record.args = (self.count, " ".join(f"{error.code} {error.message}".split())[:200])
        record.exc_info = record.exc_text = None
        return True


malformed_requests = _MalformedRequests()
logging.getLogger("aiohttp.server").addFilter(malformed_requests)
