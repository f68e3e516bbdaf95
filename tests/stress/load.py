"""Load for the stress tests: a lean HTTP/1.1 client, open- and closed-loop
generators, and what they saw.

The client is a few lines over asyncio streams rather than aiohttp's client:
a request costs the generator a fraction of what it costs the server, so on
a two-core machine the generator can offer several times what the server
sustains.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

N_PARAM = re.compile(r"[?&]n=(\d+)")


class Closed(Exception):
    """The server closed the connection without (a whole) response."""


class _Eager(asyncio.StreamReaderProtocol):
    def __init__(
        self, first: bytes, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(reader, loop=loop)
        self._first = first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._first:
            transport.write(self._first)  # type: ignore[attr-defined]


class RawHttp:
    """One keep-alive connection; requests one after another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True
        self.used = 0  # requests answered on this connection
        # The headers of the last response (names in lower case).
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(
        cls,
        endpoint: str,
        source: str | None = None,
        first: bytes = b"",
        tls: ssl.SSLContext | None = None,
    ) -> RawHttp:
        """A connection (``tls``: HTTPS with that client context); ``first``
        is sent the moment it is made, as a browser sends its request, not a
        loop turn later (a busy generator would then look like a slow client
        to the server)."""
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        local = (source, 0) if source else None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20, loop=loop)
        transport, protocol = await loop.create_connection(
            lambda: _Eager(first, reader, loop),
            host,
            int(port),
            local_addr=local,
            ssl=tls,
            server_hostname=host if tls else None,
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return cls(reader, writer)

    @staticmethod
    def encode(path: str, method: str = "GET", body: bytes = b"", headers: str = "") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: stress\r\n{headers}"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    async def request(
        self, path: str, method: str = "GET", body: bytes = b"", headers: str = ""
    ) -> tuple[int, bytes]:
        """Status and body of one request (raises Closed, OSError)."""
        self.writer.write(self.encode(path, method, body, headers))
        return await self.response(method)

    async def response(self, method: str = "GET") -> tuple[int, bytes]:
        """Status and body of the response to the request sent last."""
        line = await self.reader.readline()
        if not line:
            raise Closed("no status line")
        status = int(line.split()[1])
        length = None
        self.headers = {}
        while True:
            header = await self.reader.readline()
            if not header:
                raise Closed("headers cut short")
            if header in (b"\r\n", b"\n"):
                break
            name, _, value = header.decode("latin-1").partition(":")
            name = name.strip().lower()
            self.headers[name] = value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                self.reusable = False
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif length is None:
            data = await self.reader.read()
            self.reusable = False
        else:
            data = await self.reader.readexactly(length)
        self.used += 1
        return status, data

    def close(self) -> None:
        self.writer.close()


@dataclass
class LoadResult:
    """What a generator saw."""

    sent: int = 0
    # Offered by the schedule but not sent: every connection was in use.
    not_sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # The n of each request answered 200: acknowledged as stored.
    acknowledged: set[int] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # Requests sent again on a new connection because the server had closed
    # the idle keep-alive connection they were sent on (RFC 9112 9.3.1).
    retried: int = 0

    @property
    def ok(self) -> int:
        return self.statuses[200]

    def merge(self, other: LoadResult) -> None:
        self.sent += other.sent
        self.not_sent += other.not_sent
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.acknowledged |= other.acknowledged
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.retried += other.retried

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def describe(self) -> str:
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(self.statuses.items()))
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(self.errors.items()))
        return (
            f"{codes}; closed without an answer: {errors or 0};"
            f" sent again after an idle keep-alive close: {self.retried}"
        )


async def _one(
    pool: list[RawHttp],
    endpoint: str,
    path: str,
    n: int,
    result: LoadResult,
    on_done: Callable[[], None],
    source: str | None,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    connection = pool.pop() if pool else None
    try:
        try:
            if connection is None:
                connection = await RawHttp.open(endpoint, source, RawHttp.encode(path))
                status, _ = await connection.response()
            else:
                status, _ = await connection.request(path)
        except (Closed, ConnectionError, asyncio.IncompleteReadError):
            if connection is None or not connection.used:
                raise
            # As a browser does: the server closed an idle keep-alive
            # connection as the request went out; send it again, once.
            connection.close()
            result.retried += 1
            connection = await RawHttp.open(endpoint, source, RawHttp.encode(path))
            status, _ = await connection.response()
    except (OSError, Closed, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        result.errors[type(e).__name__] += 1
        if connection is not None:
            connection.close()
        on_done()
        return
    result.statuses[status] += 1
    if status == 200:
        result.acknowledged.add(n)
        result.latencies.append(loop.time() - started)
    if connection.reusable:
        pool.append(connection)
    else:
        connection.close()
    on_done()


async def open_loop(
    endpoint: str,
    make_path: Callable[[int], str],
    rate: float,
    seconds: float,
    max_in_flight: int,
    first: int = 0,
    source: str | None = None,
) -> LoadResult:
    """Requests at ``rate`` per second for ``seconds``, whatever the answers.

    Request i (from ``first``) asks for ``make_path(i)``. At most
    ``max_in_flight`` are outstanding; beyond that an offered request is
    counted as not sent.
    """
    result = LoadResult()
    pool: list[RawHttp] = []
    in_flight = 0
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    def done() -> None:
        nonlocal in_flight
        in_flight -= 1

    start = loop.time()
    offered = 0
    while (now := loop.time()) < start + seconds:
        due = int((now - start) * rate) - offered
        for _ in range(due):
            offered += 1
            if in_flight >= max_in_flight:
                result.not_sent += 1
                continue
            n = first + result.sent
            result.sent += 1
            in_flight += 1
            task = asyncio.create_task(_one(pool, endpoint, make_path(n), n, result, done, source))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.005)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    for connection in pool:
        connection.close()
    result.seconds = loop.time() - start
    return result


async def closed_loop(
    endpoint: str,
    make_path: Callable[[int], str],
    connections: int,
    seconds: float,
    first: int = 0,
) -> LoadResult:
    """``connections`` clients, each sending its next request when answered."""
    result = LoadResult()
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    counter = first

    async def client() -> None:
        nonlocal counter
        connection: RawHttp | None = None
        while loop.time() < stop:
            n = counter
            counter += 1
            result.sent += 1
            started = loop.time()
            try:
                if connection is None:
                    connection = await RawHttp.open(endpoint)
                status, _ = await connection.request(make_path(n))
            except (OSError, Closed, asyncio.IncompleteReadError, ValueError) as e:
                result.errors[type(e).__name__] += 1
                if connection is not None:
                    connection.close()
                connection = None
                continue
            result.statuses[status] += 1
            if status == 200:
                result.acknowledged.add(n)
                result.latencies.append(loop.time() - started)
            if not connection.reusable:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    start = loop.time()
    await asyncio.gather(*(client() for _ in range(connections)))
    result.seconds = loop.time() - start
    return result


class UdpFlood(asyncio.DatagramProtocol):
    """Send datagrams at a rate; count the replies and their bytes."""

    def __init__(self) -> None:
        self.replies = 0
        self.reply_bytes = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.replies += 1
        self.reply_bytes += len(data)

    def error_received(self, exc: Exception) -> None:
        pass

    @classmethod
    async def open(cls, endpoint: str) -> UdpFlood:
        host, _, port = endpoint.rpartition(":")
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            cls, remote_addr=(host.strip("[]"), int(port))
        )
        return protocol

    async def send(
        self, make: Callable[[int], bytes], rate: float, seconds: float
    ) -> tuple[int, int]:
        """Datagrams sent and their bytes."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = sent_bytes = 0
        while (now := loop.time()) < start + seconds:
            for _ in range(int((now - start) * rate) - sent):
                packet = make(sent)
                with contextlib.suppress(OSError):
                    self.transport.sendto(packet)
                sent += 1
                sent_bytes += len(packet)
            await asyncio.sleep(0.002)
        return sent, sent_bytes

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def numbers_in(paths: list[str]) -> set[int]:
    return {int(m.group(1)) for p in paths if (m := N_PARAM.search(p))}
