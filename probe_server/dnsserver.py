"""The DNS listeners: UDP and TCP on both families, asyncio transports only.

The protocols here handle the wire around a message (UDP datagrams, TCP's
two-byte length framing with several queries per connection and an idle
timeout, RFC 7766), rate limiting and the query log; what to answer is
:class:`dnswire.Responder`'s business. Nothing a client sends can stop the
server: a packet that makes our code fail is answered SERVFAIL (or dropped
when it has no header) and counted.

Every query becomes a row in ``dns_queries`` through the group-commit writer,
but a reply is never held for its commit: DNS is answered at once and its rows
are handed to the writer in one batch per event-loop turn. When the write
queue is more than half full the rows are dropped and counted
(``DnsStats.log_dropped``), so a DNS flood can never make the HTTP probes,
whose replies do wait for their rows, answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, cast

from .config import DnsConfig, RateLimitConfig
from .dnswire import Outcome, Responder
from .limits import ConnectionTable, client_key, unread_bytes
from .store import Overloaded, Row, Writer
from .survey import canonical_address

log = logging.getLogger(__name__)

UDP, TCP = "udp", "tcp"
# Datagrams read and answered per readiness callback before the loop gets
# its turn back (other sockets, the writer's commits, timers).
UDP_BATCH = 64
# Larger than any datagram: a longer one would be cut to this and fail to parse.
RECV_SIZE = 65535
PASS, DROP, SLIP = "pass", "drop", "slip"

INSERT_DNS_QUERY = (
    "INSERT INTO dns_queries (t, family, addr, port, transport, qname, qtype, rcode,"
    " size, truncated, rrl, edns_version, udp_size, ancount, nscount)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


@dataclass
class DnsStats:
    """Counters for logs and tests."""

    queries: int = 0
    replies: int = 0
    rate_limited: int = 0
    slipped: int = 0
    errors: int = 0
    tcp_refused: int = 0
    # Idle connections closed to make room for new ones (a full table).
    tcp_evicted: int = 0
    tcp_timeouts: int = 0
    log_dropped: int = 0
    # UDP replies the kernel would not take at once (a full send buffer).
    send_dropped: int = 0
    # Responses sent, by RCODE text ("NOERROR", "NXDOMAIN", ...).
    rcodes: dict[str, int] = field(default_factory=dict)


class RateLimiter:
    """Response-rate limiting per source prefix: a token bucket per prefix.

    Each prefix (a /24 or /56 by default) earns ``responses_per_second``
    tokens a second up to ``burst``; a response spends one. Past the limit a
    response is dropped, except every ``slip``-th, which is sent truncated
    (TC=1, no data) so a real resolver behind a spoofed flood can still get
    its answer over TCP, as BIND's and Knot's RRL do.
    """

    def __init__(self, config: RateLimitConfig) -> None:
        self.rate = config.responses_per_second
        self.burst = float(config.burst)
        self.slip = config.slip
        self.max_prefixes = config.max_prefixes
        self._shift: dict[int, int] = {
            socket.AF_INET: 32 - config.ipv4_prefix,
            socket.AF_INET6: 128 - config.ipv6_prefix,
        }
        # address text -> its prefix (parsing an address costs more than the rest)
        self._prefixes: dict[str, tuple[int, int]] = {}
        # prefix -> [tokens, last refill, responses limited so far]
        self._buckets: dict[tuple[int, int], list[float]] = {}

    def check(self, family: int, address: str, now: float) -> str:
        key = self._prefixes.get(address)
        if key is None:
            packed = socket.inet_pton(family, address.partition("%")[0])
            key = (family, int.from_bytes(packed, "big") >> self._shift[family])
            if len(self._prefixes) >= self.max_prefixes:
                self._prefixes.clear()
            self._prefixes[address] = key
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_prefixes:
                self._forget_idle(now)
            bucket = self._buckets[key] = [self.burst, now, 0.0]
        else:
            elapsed = now - bucket[1]  # wall clock: a step back only delays refills
            if elapsed > 0:
                bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
                bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return PASS
        bucket[2] += 1
        if self.slip and bucket[2] % self.slip == 0:
            return SLIP
        return DROP

    def _forget_idle(self, now: float) -> None:
        """Keep the table bounded: buckets that have refilled carry no state."""
        full = self.burst / self.rate
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items() if now - bucket[1] < full
        }
        if len(self._buckets) >= self.max_prefixes:
            self._buckets.clear()


class DnsServer:
    """The DNS side of one probe-server process."""

    def __init__(
        self, config: DnsConfig, responder: Responder, sockets: dict[str, socket.socket]
    ) -> None:
        self.config = config
        self.responder = responder
        # What IPv4 sockets answer, when it differs: without the zones whose
        # name servers are IPv6-only (see Authority.ipv6_only_zones).
        self.responder_v4: Responder | None = None
        self.sockets = sockets
        self.stats = DnsStats()
        self.rate_limiter = RateLimiter(config.rrl) if config.rrl.enabled else None
        self._writer: Writer | None = None
        self._log_limit = 0
        self._rows: list[Row] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: list[_UdpReader] = []
        self._tcp_servers: list[asyncio.Server] = []
        self._connections: set[_TcpProtocol] = set()
        # Limits on TCP connections, both families together: at the limit,
        # the connection idle longest makes room (RFC 7766 §6.2.3).
        self.tcp_table = ConnectionTable(
            "dns_tcp", config.tcp_max_connections, config.tcp_max_connections_per_client
        )
        self._addresses: dict[str, str] = {}

    async def start(self, writer: Writer, log_limit: int) -> None:
        """Start answering on the bound sockets; rows go to ``writer``."""
        self._writer = writer
        self._log_limit = log_limit
        loop = self._loop = asyncio.get_running_loop()
        try:
            for name, sock in self.sockets.items():
                if sock.type == socket.SOCK_DGRAM:
                    self._udp.append(_UdpReader(self, sock, loop))
                else:
                    server = await loop.create_server(lambda: _TcpProtocol(self), sock=sock)
                    self._tcp_servers.append(server)
                log.debug("event=dns_listening socket=%s", name)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, close connections, hand the last rows over. Idempotent."""
        for server in self._tcp_servers:
            server.close()
        for connection in list(self._connections):
            connection.close()
        for server in self._tcp_servers:
            await server.wait_closed()
        self._tcp_servers.clear()
        for reader in self._udp:
            reader.close()
        self._udp.clear()
        self._flush()
        if self._writer is not None:
            stats = self.stats
            log.info(
                "event=dns_stopped queries=%d rate_limited=%d slipped=%d errors=%d"
                " tcp_refused=%d tcp_evicted=%d tcp_timeouts=%d log_dropped=%d"
                " send_dropped=%d",
                stats.queries,
                stats.rate_limited,
                stats.slipped,
                stats.errors,
                stats.tcp_refused,
                stats.tcp_evicted,
                stats.tcp_timeouts,
                stats.log_dropped,
                stats.send_dropped,
            )
            self._writer = None

    @property
    def tcp_connections(self) -> int:
        return len(self._connections)

    async def drain(self) -> None:
        """Hand queued rows to the writer and wait for their commit (tests, shutdown)."""
        self._flush()
        if self._writer is not None:
            await self._writer.write([])

    # -- one message ---------------------------------------------------------

    def handle(self, data: bytes, peer: Any, family: int, transport: str) -> bytes | None:
        """The reply to one message from ``peer``, logged; None: send nothing."""
        self.stats.queries += 1
        now = time.time()
        host, port = peer[0], peer[1]
        action = PASS
        if self.rate_limiter is not None and transport == UDP:
            # TCP needs a completed handshake, so its source can't be spoofed.
            action = self.rate_limiter.check(family, host, now)
        responder = self.responder
        if family == socket.AF_INET and self.responder_v4 is not None:
            responder = self.responder_v4
        try:
            outcome = responder.respond(data, tcp=transport == TCP, slip=action == SLIP)
        except Exception:
            self.stats.errors += 1
            if self.stats.errors <= 10 or self.stats.errors % 1000 == 0:
                log.exception("event=dns_error errors=%d", self.stats.errors)
            outcome = self.responder.servfail(data)
        reply = outcome.reply
        if action == DROP:
            self.stats.rate_limited += 1
            reply = None
        elif action == SLIP:
            self.stats.slipped += 1
        if reply is not None:
            self.stats.replies += 1
            rcodes = self.stats.rcodes
            rcode = outcome.rcode or "?"
            rcodes[rcode] = rcodes.get(rcode, 0) + 1
        self._log(now, family, host, port, transport, outcome, reply, action)
        return reply

    def _log(
        self,
        now: float,
        family: int,
        host: str,
        port: int,
        transport: str,
        outcome: Outcome,
        reply: bytes | None,
        action: str,
    ) -> None:
        address = self._addresses.get(host)
        if address is None:
            if len(self._addresses) >= 65536:
                self._addresses.clear()
            address = self._addresses[host] = canonical_address(host)
        sent = reply is not None
        row = (
            now,
            "ipv6" if family == socket.AF_INET6 else "ipv4",
            address,
            port,
            transport,
            outcome.qname,
            outcome.qtype,
            outcome.rcode if sent else None,
            len(reply) if reply is not None else 0,
            outcome.truncated or action == SLIP,
            action,
            outcome.edns_version,
            outcome.udp_size,
            outcome.ancount if sent else None,
            outcome.nscount if sent else None,
        )
        self._rows.append((INSERT_DNS_QUERY, row))
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        rows, self._rows = self._rows, []
        if not rows:
            return
        writer = self._writer
        if writer is None or writer.queued_rows + len(rows) > self._log_limit:
            self.stats.log_dropped += len(rows)
            return
        try:
            writer.submit(rows)
        except Overloaded:
            self.stats.log_dropped += len(rows)


class _UdpReader:
    """One UDP socket, read straight from the event loop's readiness callback.

    Each time the socket is readable, up to :data:`UDP_BATCH` datagrams are
    read and answered in a row with the socket's own ``recvfrom`` and
    ``sendto``: no transport, no protocol callback per datagram. A reply the
    kernel cannot take at once (its send buffer full) is dropped, never
    queued, as a DNS server under load should.
    """

    def __init__(self, server: DnsServer, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        sock.setblocking(False)
        self.server = server
        self.sock = sock
        self.family = sock.family
        self.loop = loop
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        recvfrom, sendto = self.sock.recvfrom, self.sock.sendto
        handle, family, stats = self.server.handle, self.family, self.server.stats
        for _ in range(UDP_BATCH):
            try:
                data, addr = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error queued for an earlier reply (ICMP): nothing to do
            reply = handle(data, addr, family, UDP)
            if reply is not None:
                try:
                    sendto(reply, addr)
                except OSError:
                    stats.send_dropped += 1  # full send buffer, or the peer is gone

    def close(self) -> None:
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            self._fd = -1
            self.sock.close()


class _TcpProtocol(asyncio.Protocol):
    """DNS over TCP (RFC 7766): length-prefixed messages, pipelined, in order."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.peer: Any = None
        self.family = socket.AF_INET
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        server = self.server
        peer = transport.get_extra_info("peername")
        evicted = server.tcp_table.stats.evicted
        if not server.tcp_table.admit(self, client_key(peer[0]) if peer else "?"):
            server.stats.tcp_refused += 1
            transport.abort()
            return
        server.stats.tcp_evicted += server.tcp_table.stats.evicted - evicted
        self.transport = transport
        self.peer = peer
        self.family = transport.get_extra_info("socket").family
        server._connections.add(self)
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self.timer = loop.call_at(self.last_active + server.config.tcp_idle_timeout, self._idle)

    def _idle(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self.last_active + self.server.config.tcp_idle_timeout
        if loop.time() >= deadline:
            self.server.stats.tcp_timeouts += 1
            self.close()
        else:
            self.timer = loop.call_at(deadline, self._idle)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        buffer = self.buffer
        buffer += data
        answered = False
        while len(buffer) >= 2:
            length = buffer[0] << 8 | buffer[1]
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            answered = True
            reply = self.server.handle(message, self.peer, self.family, TCP)
            if reply is not None and self.transport is not None:
                self.transport.write(len(reply).to_bytes(2, "big") + reply)
        # Only a complete message counts as activity: a client trickling a
        # message a byte at a time is closed tcp_idle_timeout after its last
        # complete one, as if it were silent.
        if answered and self.transport is not None:
            self.last_active = asyncio.get_running_loop().time()
            self.server.tcp_table.idle(self)

    def unread(self) -> bool:
        return unread_bytes(self.transport) > 0

    def evict(self) -> None:
        """Close to make room for a new connection (the table is full)."""
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

    # A client that does not read its replies stops being read from.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.tcp_table.release(self)
        self.server._connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
