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
provided it has been idle for EVICT_AFTER (0.1 s) at least, or, for the
listener's limit, it belongs to a client holding more than its fair share
(the limit divided among the clients) and more than the newcomer's;
otherwise (every one busy with a request, or just opened by a client within
its share) the newcomer is refused.
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

On an HTTPS site the socket accepts plain TCP: :class:`TlsIntake` admits the
connection into the table the moment it is accepted, then runs TLS over it,
with ``handshake_timeout`` (``http.header_timeout``) for the handshake, and
hands the decrypted connection to its :class:`GuardedConnection`. A
connection in its handshake is idle (evictable) until its ClientHello has
arrived in full, then busy until the handshake is done. (With
``create_server(ssl=...)`` a connection reached the table only after its
handshake, for which asyncio allows 60 s: connections that never sent a
ClientHello used up every file descriptor.)
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
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
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

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
    # TLS connections gone before their handshake was done: failed, timed
    # out (handshake_timeout), evicted or closed by the client.
    handshakes_failed: int = 0
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
        # For the listener's limit, a connection too young to evict may go
        # all the same when its client holds more than its fair share and
        # more than the newcomer's client: a few addresses reconnecting faster
        # than EVICT_AFTER must not keep everyone else out.
        fair = group is self._all
        if fair:
            mine = self._clients.get(client)
            # The newcomer's client counts among those sharing the table.
            sharing = len(self._clients) + (mine is None)
            floor = max((mine.count if mine else 0) + 1, self.max_connections // sharing)
        hog = None
        for candidate, since in itertools.islice(group.idle.items(), EVICT_CANDIDATES):
            if now - since < EVICT_AFTER:
                if not fair or hog is not None:
                    break  # the rest are younger still
                owner = self._clients[self._client_of[candidate]]
                if owner.count > floor and not candidate.unread():
                    hog = candidate
                continue
            if not candidate.unread():
                victim = candidate
                break
        victim = victim or hog
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
        # TLS: the socket's own transport (self.transport is the decrypted one).
        self.raw: asyncio.Transport | None = None
        # Admitted and, with TLS, through the handshake.
        self.entered = False
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._tail = b""

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Take a place in the table for the connection on ``transport``."""
        # uvloop's transports don't subclass asyncio's: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        return self.table.admit(self, client_key(peer[0]) if peer else "?")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw is not None:
            # TLS: the handshake is done (TlsIntake admitted the connection).
            # That was activity: the connection goes to the back of the idle
            # order, and the request-head deadline starts now.
            self.transport = cast(asyncio.Transport, transport)
            self.table.idle(self)
        elif not self.admit(transport):
            self._refuse()
            return
        self.entered = True
        self.admitted(transport.get_extra_info("peername"))

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
        return unread_bytes(self.raw or self.transport) > 0

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        if self.transport is not None:
            self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.release(self)
        self.raw = None
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
        # TLS: the socket itself, at once. Closing the TLS layer would wait
        # up to 30 s for the client's close_notify, out of the table.
        transport = self.raw or self.transport
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


# Beyond this, a first flight is not a ClientHello to wait for (real ones,
# post-quantum key shares included, are 2 KiB or so; one record holds 16).
MAX_CLIENT_HELLO = 16384


class HelloWatch:
    """Follows a TLS client's first bytes until its ClientHello is complete.

    RFC 8446 §5.1: handshake records (content type 22, a 5-byte header with
    a 2-byte length); the ClientHello (handshake type 1, a 3-byte length)
    may span several. Bytes are looked at once each: a ClientHello trickled
    a byte at a time costs no more to follow than one sent whole.
    """

    __slots__ = ("_head", "_header", "_left", "_record", "_seen")

    def __init__(self) -> None:
        self._header = b""  # a record header still arriving
        self._record = 0  # bytes of the current record still to come
        self._head = b""  # the handshake message's type and length, while arriving
        self._left = -1  # bytes of the ClientHello still to come (-1: not known yet)
        self._seen = 0

    def feed(self, data: bytes | memoryview) -> bool | None:
        """True once the ClientHello is complete; None if this is not one
        (or too long to follow); False while it is arriving."""
        self._seen += len(data)
        if self._seen > MAX_CLIENT_HELLO + 5:
            return None
        data = bytes(data)
        i = 0
        while i < len(data):
            if self._record == 0:
                take = 5 - len(self._header)
                self._header += data[i : i + take]
                i += take
                if len(self._header) < 5:
                    return False
                if self._header[0] != 22:
                    return None
                self._record = int.from_bytes(self._header[3:5], "big")
                self._header = b""
                continue
            chunk = data[i : i + self._record]
            i += len(chunk)
            self._record -= len(chunk)
            if self._left < 0:
                need = 4 - len(self._head)
                self._head += chunk[:need]
                chunk = chunk[need:]
                if len(self._head) < 4:
                    continue
                if self._head[0] != 1:
                    return None
                self._left = int.from_bytes(self._head[1:4], "big")
            self._left -= len(chunk)
            if self._left <= 0:
                return True
        return False


@dataclass
class Handshakes:
    """The TLS side of an HTTPS site: its context, the handshake deadline,
    and the connections still in their handshake (closed when the site stops)."""

    context: ssl.SSLContext
    timeout: float
    pending: set[TlsIntake] = field(default_factory=set)

    def close(self) -> None:
        for intake in list(self.pending):
            intake.abort()


class _TlsLayer(asyncio.sslproto.SSLProtocol):
    # asyncio reads up to 256 KiB at a time, into a buffer each connection
    # allocates at once: with thousands of connections, half an attack's
    # memory. One TLS record (2^14 bytes and its overhead) is enough for
    # requests of a few KiB.
    max_size = 17 * 1024


class TlsIntake(asyncio.BufferedProtocol):
    """The socket's protocol on an HTTPS site: admission at accept, then TLS.

    The connection takes its place in the table (through its
    :class:`GuardedConnection`) before a byte is read, and TLS runs over it
    in asyncio's ``SSLProtocol``, which hands the decrypted connection to the
    guard once the handshake is done. ``loop.start_tls`` would need reading
    paused from accept until it runs, and uvloop starts reading after
    ``connection_made`` whatever it asked: the ClientHello could reach the
    wrong protocol. Here every byte goes to the TLS layer from the first,
    and the intake sees when the ClientHello is complete.
    """

    def __init__(self, guard: GuardedConnection, handshakes: Handshakes) -> None:
        self.guard = guard
        self.handshakes = handshakes
        self.layer: asyncio.sslproto.SSLProtocol | None = None
        self.transport: asyncio.Transport | None = None
        # Until the ClientHello is complete (or is not one).
        self._hello: HelloWatch | None = HelloWatch()
        self._buffer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if not guard.admit(transport):
            # A plain-text 503 means nothing to a TLS client, and a handshake
            # costs more than the refusal would save.
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = guard.raw = cast(asyncio.Transport, transport)
        self.handshakes.pending.add(self)
        # No waiter (SSLProtocol takes None): nothing awaits the handshake.
        # typeshed wants an int timeout where asyncio takes any number.
        self.layer = _TlsLayer(
            asyncio.get_running_loop(),
            guard,
            self.handshakes.context,
            None,  # type: ignore[arg-type]
            server_side=True,
            ssl_handshake_timeout=self.handshakes.timeout,  # type: ignore[arg-type]
        )
        self.layer.connection_made(transport)

    def get_buffer(self, sizehint: int) -> Any:
        assert self.layer is not None
        self._buffer = self.layer.get_buffer(sizehint)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self.layer is not None
        if self._hello is not None:
            complete = self._hello.feed(memoryview(self._buffer)[:nbytes])
            if complete is not False:
                self._hello = None
                if complete and not self.guard.entered:
                    self._hello_received()
        self.layer.buffer_updated(nbytes)
        if self.guard.entered:
            self.handshakes.pending.discard(self)

    def _hello_received(self) -> None:
        # The client's next step comes a round trip later (on a mobile link,
        # more than EVICT_AFTER): evicting it now would cut off exactly the
        # clients we are here for. Stalling after a whole ClientHello costs
        # an attacker a real one, and us a key exchange; handshake_timeout
        # bounds it, as body_timeout bounds a body that never comes.
        self.guard.table.busy(self.guard)

    def eof_received(self) -> bool | None:
        if self.layer is None:
            return None
        # True while it flushes (typeshed says it returns nothing).
        keep_open: bool | None = self.layer.eof_received()  # type: ignore[func-returns-value]
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.handshakes.pending.discard(self)
        guard = self.guard
        if self.layer is not None:
            if not guard.entered:
                # Gone in the handshake: the TLS layer will not tell the guard.
                guard.table.stats.handshakes_failed += 1
                guard.table.release(guard)
                guard.raw = guard.transport = None
            self.layer.connection_lost(exc)
            self.layer = None
        self.transport = None

    def pause_writing(self) -> None:
        if self.layer is not None:
            self.layer.pause_writing()

    def resume_writing(self) -> None:
        if self.layer is not None:
            self.layer.resume_writing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class GuardedSite(web.BaseSite):
    """A listening socket whose connections pass through a :class:`ConnectionTable`.

    With ``ssl_context``, the socket accepts plain TCP and each connection is
    admitted before its TLS handshake, which has ``handshake_timeout``.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        table: ConnectionTable,
        *,
        send_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 60.0,
        backlog: int = 1024,
        connection: ConnectionFactory | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self.table = table
        self.send_timeout = send_timeout
        # What each accepted connection becomes (the ball fast path's, say).
        self.connection: ConnectionFactory = connection or GuardedConnection
        self.handshakes = (
            Handshakes(ssl_context, handshake_timeout) if ssl_context is not None else None
        )
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

        handshakes = self.handshakes

        def protocol() -> asyncio.BaseProtocol:
            guard = self.connection(self.table, server, self.send_timeout)
            return guard if handshakes is None else TlsIntake(guard, handshakes)

        # No ssl= here: TlsIntake puts the connection in the table first.
        self._server = await loop.create_server(protocol, sock=self._sock, backlog=self._backlog)

    async def stop(self) -> None:
        await super().stop()
        if self.handshakes is not None:
            self.handshakes.close()


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
