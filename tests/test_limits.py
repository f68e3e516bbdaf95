"""Connection limits: the table alone, the guard fed through a fake transport,
then slow and greedy clients against a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import ssl
from typing import Any

import aiohttp
import pytest

from probe_server import limits
from probe_server.limits import (
    EVICT_AFTER,
    REFUSAL,
    ConnectionTable,
    GuardedConnection,
    HelloWatch,
    client_key,
    unread_bytes,
)
from probe_server.server import ProbeServer, StartupError, ensure_file_limit, file_limit_needed

from .certs import TestCA, client_hello

# -- the table -------------------------------------------------------------------


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted = False
        self.waiting = False

    def evict(self) -> None:
        self.evicted = True

    def unread(self) -> bool:
        return self.waiting

    def __repr__(self) -> str:
        return self.name


def test_client_key_groups_an_ipv6_64_and_unmaps_ipv4():
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert (
        client_key("2001:db8:1:2:aaaa::1")
        == client_key("2001:db8:1:2::ffff")
        == ("2001:db8:1:2::/64")
    )
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_table_evicts_the_connection_idle_longest():
    clock = Clock()
    table = ConnectionTable("t", max_connections=3, max_per_client=10, clock=clock)
    a, b, c, d = (Conn(n) for n in "abcd")
    for conn, client in ((a, "x"), (b, "y"), (c, "z")):
        assert table.admit(conn, client)
    clock.now += 0.5
    table.idle(a)  # a did something: b is now the one idle longest
    clock.now += 2 * EVICT_AFTER
    assert table.admit(d, "w")
    assert b.evicted and not (a.evicted or c.evicted)
    assert len(table) == 3 and table.stats.evicted == 1
    table.release(b)  # its connection_lost comes later: nothing counted twice
    assert len(table) == 3


def test_connections_just_opened_are_not_evicted_the_newcomer_is_refused():
    # Under overload a new connection's request may wait unread: evicting it
    # would throw that work away.
    clock = Clock()
    table = ConnectionTable("t", max_connections=1, max_per_client=10, clock=clock)
    a, b = Conn("a"), Conn("b")
    table.admit(a, "x")
    clock.now += EVICT_AFTER / 2
    assert not table.admit(b, "y")
    assert not a.evicted and table.stats.refused == 1
    clock.now += 2 * EVICT_AFTER
    assert table.admit(b, "y") and a.evicted


def test_a_connection_with_an_unread_request_is_not_evicted():
    clock = Clock()
    table = ConnectionTable("t", max_connections=2, max_per_client=10, clock=clock)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    table.admit(a, "x")
    table.admit(b, "y")
    clock.now += 2 * EVICT_AFTER
    a.waiting = True  # its request is in the kernel, not read yet
    assert table.admit(c, "z")
    assert b.evicted and not a.evicted


def test_busy_connections_are_never_evicted_and_then_newcomers_are_refused():
    clock = Clock()
    table = ConnectionTable("t", max_connections=2, max_per_client=10, clock=clock)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    table.admit(a, "x")
    table.admit(b, "y")
    table.busy(a)
    table.busy(b)
    clock.now += 10 * EVICT_AFTER
    assert not table.admit(c, "z")
    assert table.stats.refused == 1 and not (a.evicted or b.evicted)
    table.idle(b)
    clock.now += 2 * EVICT_AFTER
    assert table.admit(c, "z") and b.evicted


def test_a_client_over_its_limit_makes_room_among_its_own():
    clock = Clock()
    table = ConnectionTable("t", max_connections=100, max_per_client=2, clock=clock)
    mine = [Conn(f"m{i}") for i in range(3)]
    other = Conn("o")
    table.admit(other, "other")
    table.admit(mine[0], "me")
    table.admit(mine[1], "me")
    clock.now += 2 * EVICT_AFTER
    assert table.admit(mine[2], "me")
    assert mine[0].evicted and not other.evicted
    table.busy(mine[1])
    table.busy(mine[2])
    assert not table.admit(Conn("m3"), "me")  # all of its own are busy
    assert table.admit(Conn("o2"), "other")  # another client is not affected


def test_release_is_idempotent_and_forgets_empty_clients():
    table = ConnectionTable("t", max_connections=10, max_per_client=10)
    a = Conn("a")
    table.admit(a, "x")
    table.release(a)
    table.release(a)
    table.busy(a)
    table.idle(a)
    assert len(table) == 0 and table.clients() == 0


def test_unread_bytes_counts_what_the_kernel_holds():
    left, right = socket.socketpair()
    with left, right:

        class Transport:
            def get_extra_info(self, name: str, default: Any = None) -> Any:
                return right if name == "socket" else default

        assert unread_bytes(Transport()) == 0
        left.sendall(b"GET / HTTP/1.1\r\n")
        assert unread_bytes(Transport()) == 16
        right.recv(100)
        assert unread_bytes(Transport()) == 0
    assert unread_bytes(None) == 0


def test_a_complete_request_head_makes_the_connection_busy_at_once():
    table = ConnectionTable("t", 10, 10)
    guard = GuardedConnection(table, Inner, send_timeout=60)
    guard.connection_made(FakeTransport())
    guard.data_received(b"GET / HTTP/1.1\r\nHost: x\r")
    assert guard in table._all.idle  # still arriving: idle (evictable)
    guard.data_received(b"\n\r\n")  # the blank line, split across reads
    assert guard not in table._all.idle
    guard.connection_lost(None)


# -- the guard, through a fake transport ------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("192.0.2.1", 1234)) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.closed = asyncio.Event()
        self.aborted = False
        self.eof_written = False
        self.buffered = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: Any) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closed.set()

    def abort(self) -> None:
        self.aborted = True
        self.closed.set()


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append(f"data:{data.decode()}")

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


async def test_guard_hands_every_event_to_aiohttps_protocol():
    table = ConnectionTable("t", 10, 10)
    inner = Inner()
    guard = GuardedConnection(table, lambda: inner, send_timeout=60)
    guard.connection_made(FakeTransport())
    guard.data_received(b"GET")
    guard.pause_writing()
    guard.resume_writing()
    guard.connection_lost(None)
    assert inner.events == ["made", "data:GET", "pause", "resume", "lost"]
    assert len(table) == 0


async def test_refused_connection_gets_a_complete_503_and_never_reaches_aiohttp():
    table = ConnectionTable("t", 1, 10)
    busy = GuardedConnection(table, Inner, send_timeout=60)
    busy.connection_made(FakeTransport())
    table.busy(busy)
    inner = Inner()
    refused = GuardedConnection(table, lambda: inner, send_timeout=60)
    transport = FakeTransport()
    refused.connection_made(transport)
    assert bytes(transport.written) == REFUSAL
    assert REFUSAL.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5\r\n" in REFUSAL
    head, body = REFUSAL.split(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    # Half-closed: the client reads the 503, then its EOF closes the rest.
    assert transport.eof_written and not transport.closed.is_set()
    refused.data_received(b"GET / HTTP/1.1\r\n\r\n")
    refused.eof_received()
    assert transport.closed.is_set()
    refused.connection_lost(None)
    assert inner.events == [] and table.lingering == 0 and len(table) == 1


async def test_client_that_stops_reading_is_aborted_after_send_timeout():
    table = ConnectionTable("t", 10, 10)
    guard = GuardedConnection(table, Inner, send_timeout=0.05)
    transport = FakeTransport()
    guard.connection_made(transport)
    guard.pause_writing()
    await asyncio.wait_for(transport.closed.wait(), 10)
    assert transport.aborted and table.stats.send_timeouts == 1
    guard.connection_lost(None)


async def test_client_that_resumes_reading_is_kept():
    table = ConnectionTable("t", 10, 10)
    guard = GuardedConnection(table, Inner, send_timeout=0.05)
    transport = FakeTransport()
    guard.connection_made(transport)
    guard.pause_writing()
    guard.resume_writing()
    # Wait for a timer of the same length that started later: if the guard's
    # had not been cancelled, it would have fired first.
    later = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, later.set)
    await later.wait()
    assert not transport.closed.is_set() and table.stats.send_timeouts == 0
    guard.connection_lost(None)


# -- open files ------------------------------------------------------------------------


def test_start_refuses_limits_the_open_file_limit_cannot_hold(make_config, monkeypatch):
    config = make_config(http={"max_connections": 100_000})
    monkeypatch.setattr(resource, "getrlimit", lambda _: (4096, 4096))
    with pytest.raises(StartupError, match=r"http.max_connections: .* need 201256 open files"):
        ensure_file_limit(config)


def test_start_raises_the_soft_open_file_limit(make_config, monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    assert ensure_file_limit(make_config()) == 65536
    assert calls == [(65536, 65536)]
    assert file_limit_needed(make_config()) == 2 * 4096 + 1000 + 256


# -- real sockets -------------------------------------------------------------------


async def open_http(server: ProbeServer, source: str = "127.0.0.1"):
    host, port = server.listeners.http["ipv4"].getsockname()[:2]
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def request(server: ProbeServer, path: str = "/nothing-here", source: str = "127.0.0.1"):
    """One request on a new connection; the status line's code (0: closed)."""
    reader, writer = await open_http(server, source)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1]) if line else 0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) is not None
    except (TimeoutError, ConnectionError):
        return False


@pytest.fixture
async def limited(make_config, monkeypatch):
    monkeypatch.setattr(limits, "EVICT_AFTER", 0.0)  # no waiting for connections to age
    server = ProbeServer(
        make_config(
            http={
                "header_timeout": 0.5,
                "body_timeout": 0.5,
                "max_connections": 4,
                "max_connections_per_client": 3,
            }
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_request_head_trickled_byte_by_byte_is_cut_off(limited):
    reader, writer = await open_http(limited)
    head = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"s" * 40 + b"\r\n\r\n"
    closed = False
    # One byte every 0.1 s would take ~7 s; header_timeout is 0.5 s.
    for byte in head[:-1]:
        try:
            writer.write(bytes([byte]))
            closed = await asyncio.wait_for(reader.read(1), 0.1) == b""
        except TimeoutError:
            continue
        except ConnectionError:
            closed = True
        break
    assert closed, "a trickling request head kept its connection"
    writer.close()


async def test_idle_connections_make_room_for_new_clients(limited):
    # Four idle connections (two sources) fill the site...
    idle = [await open_http(limited, f"127.0.0.{2 + i % 2}") for i in range(4)]
    for _, writer in idle:
        writer.write(b"GET / HTTP/1.1\r\n")  # a request head that never ends
    # ...yet a new client is served: the connection idle longest makes room.
    assert await request(limited, source="127.0.0.4") == 404
    assert await closed_by_server(idle[0][0])
    assert limited.connections["ipv4"].stats.evicted >= 1
    for _, writer in idle:
        writer.close()


async def test_all_busy_means_refused_with_503_then_served_again(limited):
    # Bodies that never come keep their requests (and connections) busy.
    slow = [await open_http(limited, f"127.0.0.{2 + i}") for i in range(4)]
    for _, writer in slow:
        writer.write(
            b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\ntoken="
        )
    table = limited.connections["ipv4"]
    async with asyncio.timeout(10):
        while len(table._all.idle) > 0 or len(table) < 4:
            await asyncio.sleep(0.01)  # until the four requests are being handled
    refused = await request(limited, source="127.0.0.9")
    # The slow bodies run out of time: 408, and room again.
    for reader, _ in slow:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line.startswith(b"HTTP/1.1 408"), line
    assert refused == 503
    assert await request(limited, source="127.0.0.9") == 404
    for _, writer in slow:
        writer.close()


async def test_normal_keep_alive_client_is_not_disturbed(limited, http):
    # A few requests on one keep-alive connection, well within header_timeout.
    for _ in range(5):
        async with http.get(f"{limited.base_urls['ipv4']}/") as response:
            assert response.status == 200
    assert limited.connections["ipv4"].stats.evicted == 0


# -- HTTPS: connections before their TLS handshake --------------------------------------


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
async def tls_limited(make_config, monkeypatch, ca, request):
    """An HTTPS site of four connections, three per client; ``header_timeout``
    (the handshake's deadline too) is the test's parameter."""
    monkeypatch.setattr(limits, "EVICT_AFTER", 0.0)
    cert, key = ca.issue("site", ["127.0.0.1", "::1"])
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    server = ProbeServer(
        make_config(
            http={
                "header_timeout": request.param,
                "max_connections": 4,
                "max_connections_per_client": 3,
            },
            sites={"ipv4": {"listen": "127.0.0.1:0", **tls}, "ipv6": {"listen": "[::1]:0", **tls}},
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def https_request(server: ProbeServer, ca: TestCA, source: str) -> int:
    """One HTTPS request on a new connection; its status."""
    host, port = server.listeners.http["ipv4"].getsockname()[:2]
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ca.client_context(), local_addr=(source, 0)), 10
    )
    try:
        writer.write(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def until(condition, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("tls_limited", [0.5], indirect=True)
async def test_tls_connection_is_counted_before_its_handshake_and_cut_off(tls_limited, ca):
    # The hole: the table saw an HTTPS connection only once its handshake was
    # done, and asyncio gave the handshake 60 s.
    table = tls_limited.connections["ipv4"]
    silent = await open_http(tls_limited)  # no ClientHello, ever
    partial = await open_http(tls_limited, "127.0.0.2")
    try:
        partial[1].write(client_hello()[:100])  # a ClientHello that never ends
        await until(lambda: len(table) == 2)
        assert table.clients() == 2
        # header_timeout bounds the handshake too.
        for reader, _ in (silent, partial):
            assert await closed_by_server(reader, 10)
    finally:
        for _, writer in (silent, partial):
            writer.close()
    await until(lambda: len(table) == 0)
    assert table.stats.handshakes_failed == 2
    assert await https_request(tls_limited, ca, "127.0.0.3") == 404


@pytest.mark.parametrize("tls_limited", [30], indirect=True)
async def test_connections_still_in_their_handshake_make_room_for_https_clients(tls_limited, ca):
    table = tls_limited.connections["ipv4"]
    hello = client_hello()
    waiting = []
    try:
        for i in range(4):  # the site is full of handshakes that never finish
            reader, writer = await open_http(tls_limited, f"127.0.0.{2 + i % 2}")
            waiting.append((reader, writer))
            if i % 2:
                writer.write(hello[:200])
        await until(lambda: len(table) == 4)
        # A normal client is served: the one idle longest makes room (long
        # before the 30 s handshake deadline).
        assert await https_request(tls_limited, ca, "127.0.0.9") == 404
        assert await closed_by_server(waiting[0][0], 5)
        assert table.stats.evicted >= 1 and table.stats.peak == 4
    finally:
        for _, writer in waiting:
            writer.close()
    await until(lambda: len(table) == 0)


def test_hello_watch_follows_the_records_whole_split_or_trickled():
    def watch(*parts: bytes) -> list[bool | None]:
        watcher = HelloWatch()
        return [watcher.feed(part) for part in parts]

    hello = client_hello()
    assert watch(hello) == [True]
    assert watch(hello[:4], hello[4:100], hello[100:]) == [False, False, True]
    assert set(watch(*(hello[i : i + 1] for i in range(len(hello) - 1)))) == {False}
    # The same ClientHello split over two handshake records.
    body = hello[5:]
    split = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:50], body[50:])
    )
    assert watch(split[:60], split[60:]) == [False, True]
    assert watch(b"GET / HTTP/1.1\r\n") == [None]
    assert watch(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") == [None]  # a ServerHello
    # Longer than a ClientHello can be: not followed.
    endless = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"
    assert watch(endless, b"\0" * 16380, b"\0" * 100) == [False, False, None]


@pytest.mark.parametrize("tls_limited", [2], indirect=True)
async def test_a_whole_client_hello_is_busy_until_its_handshake_deadline(tls_limited, ca):
    # A real client's answer to the ServerHello comes a round trip later:
    # it is not evicted meanwhile, and its handshake has header_timeout.
    table = tls_limited.connections["ipv4"]
    hello = client_hello()
    stalled = []
    try:
        for i in range(4):
            reader, writer = await open_http(tls_limited, f"127.0.0.{2 + i % 2}")
            stalled.append((reader, writer))
            writer.write(hello)  # and never a word more
        await until(lambda: len(table) == 4 and not table._all.idle)
        # Every place is busy: a newcomer is turned away, nobody evicted.
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await https_request(tls_limited, ca, "127.0.0.9")
        assert table.stats.refused == 1 and table.stats.evicted == 0
        for reader, _ in stalled:  # the deadline
            assert await closed_by_server(reader, 10)
    finally:
        for _, writer in stalled:
            writer.close()
    await until(lambda: len(table) == 0)
    assert await https_request(tls_limited, ca, "127.0.0.9") == 404


@pytest.mark.parametrize("tls_limited", [30], indirect=True)
async def test_https_keep_alive_connection_is_served_and_then_released(tls_limited, ca):
    context = ca.client_context()
    connector = aiohttp.TCPConnector(ssl=context)
    url = tls_limited.base_urls["ipv4"]
    assert url.startswith("https://")
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(5):  # one connection, several requests
            async with session.get(f"{url}/") as response:
                assert response.status == 200
        table = tls_limited.connections["ipv4"]
        assert table.stats.admitted == 1 and len(table) == 1
    await until(lambda: len(table) == 0)
    assert table.stats.handshakes_failed == 0


@pytest.mark.parametrize("tls_limited", [30], indirect=True)
async def test_ball_fetches_over_https_take_the_fast_path(tls_limited, ca):
    # The fast path's connection is admitted before the handshake like any other.
    url = tls_limited.base_urls["ipv4"]
    connector = aiohttp.TCPConnector(ssl=ca.client_context(), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{url}/") as response:
            page = await response.text()
        ball = re.search(r'<img src="(https://127\.0\.0\.1:\d+/red/[^"]+)"', page)
        assert ball, page[:500]
    # A new connection: the fast path sees its first request.
    connector = aiohttp.TCPConnector(ssl=ca.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            async with session.get(ball.group(1).replace("&amp;", "&")) as response:
                assert response.status == 200
                assert (await response.read())[:8] == b"\x89PNG\r\n\x1a\n"
    assert tls_limited.fast["ipv4"].answered == 3
    table = tls_limited.connections["ipv4"]
    await until(lambda: len(table) == 0)
    assert table.stats.admitted == 2 and table.stats.handshakes_failed == 0


def test_a_client_over_its_fair_share_gives_way_even_when_its_connections_are_young():
    # A few addresses reconnecting faster than EVICT_AFTER filled the table:
    # a newcomer from elsewhere still gets in, at the cost of the biggest
    # client; a client within its share is never pushed out that way.
    clock = Clock()
    table = ConnectionTable("t", max_connections=4, max_per_client=10, clock=clock)
    hog = [Conn(f"h{i}") for i in range(3)]
    small = Conn("s")
    for conn in hog:
        assert table.admit(conn, "hog")
    assert table.admit(small, "small")
    clock.now += EVICT_AFTER / 2  # everyone young
    newcomer = Conn("n")
    assert table.admit(newcomer, "new")
    assert hog[0].evicted and not small.evicted
    # The hog holds two of four places, to be shared with a fourth client.
    late = Conn("l")
    assert table.admit(late, "late") and hog[1].evicted
    # Four clients of one each, a fifth coming: nobody holds more than the
    # newcomer would, the young stay.
    again = Conn("a")
    assert not table.admit(again, "again")
    assert table.stats.refused == 1 and not (hog[2].evicted or small.evicted)
    # Old enough, the one idle longest goes as ever, unless its request is unread.
    hog[2].waiting = True
    clock.now += 2 * EVICT_AFTER
    assert table.admit(again, "again") and small.evicted and not hog[2].evicted


def test_fair_share_counts_the_newcomer_among_the_clients():
    # Twenty clients at ten each fill a table of 200 exactly: their share is
    # 200 / 21 once a twenty-first arrives, so each is over it.
    clock = Clock()
    table = ConnectionTable("t", max_connections=200, max_per_client=50, clock=clock)
    crowd = [Conn(f"c{i}") for i in range(200)]
    for i, conn in enumerate(crowd):
        assert table.admit(conn, f"client{i % 20}")
    clock.now += EVICT_AFTER / 2
    assert table.admit(Conn("n"), "newcomer")
    assert crowd[0].evicted
