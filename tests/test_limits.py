"""Connection limits: the table alone, the guard fed through a fake transport,
then slow and greedy clients against a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from typing import Any

import pytest

from probe_server import limits
from probe_server.limits import (
    EVICT_AFTER,
    REFUSAL,
    ConnectionTable,
    GuardedConnection,
    client_key,
    unread_bytes,
)
from probe_server.server import ProbeServer, StartupError, ensure_file_limit, file_limit_needed

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
