"""The ball fast path (probe_server/fastpath.py) against a real server on loopback.

Every test talks raw HTTP/1.1 over a real socket so that it controls what is
on the wire: keep-alive, pipelining, heads split across writes. The rule they
check is that the fast path changes nothing a client or the database can
see, except speed: the same rows and responses as aiohttp's path (the
server with ``http.fast_balls = false``), and everything that is not a plain
ball fetch still answered by the web application.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from probe_server import images
from probe_server.fastpath import MAX_BUFFER
from probe_server.keys import writer_key
from probe_server.server import ProbeServer
from probe_server.tokens import new_token
from probe_server.web import INSERT_REQUEST

IPV4, IPV6 = "ipv4", "ipv6"


class Raw:
    """One keep-alive HTTP/1.1 connection, read response by response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: ProbeServer, site: str) -> Raw:
        host, port = re.fullmatch(r"http://\[?([^\]]+?)\]?:(\d+)", server.base_urls[site]).groups()
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed(self) -> bool:
        """True when the server has closed the connection (EOF within 10 s)."""
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def ball_request(kind: str, token: str, ball: int = 1, extra: str = "") -> bytes:
    return (
        f"GET /{kind}/{token}/{ball}.png?ip=127.0.0.1 HTTP/1.1\r\n"
        "Host: probe.test\r\nUser-Agent: fastpath-test/1.0\r\nAccept: image/*\r\n"
        f"{extra}\r\n"
    ).encode()


@pytest.fixture
async def pair(make_config: Callable[..., Any], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Two servers, one with the fast path and one without, each with its own database."""
    servers = {}
    for name, fast in (("fast", True), ("slow", False)):
        directory = tmp_path / name
        directory.mkdir()
        config = make_config(
            server={"secret_file": str(directory / "probe.secret")},
            database={"path": str(directory / "probe.db")},
            http={"fast_balls": fast},
        )
        servers[name] = ProbeServer(config)
        await servers[name].start()
    try:
        yield servers
    finally:
        for server in servers.values():
            await server.stop()


def rows(server: ProbeServer, sql: str = "SELECT * FROM requests ORDER BY id") -> list[dict]:
    path = server.config.resolve(server.config.database.path)
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql)]


async def survey_token(server: ProbeServer) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.base_urls[IPV4] + "/") as response,
    ):
        page = await response.text()
    match = re.search(r"/blue/([a-z2-7]{32})/1\.png", page)
    assert match, page
    return match.group(1)


async def test_same_response_and_row_as_the_web_application(pair):
    """Byte for byte the same ball, the same headers but Date, the same row but time and port."""
    seen = {}
    for name, server in pair.items():
        token = await survey_token(server)
        before = time.time()
        blue = await Raw.open(server, IPV6)
        red = await Raw.open(server, IPV4)
        ports = [c.writer.get_extra_info("sockname")[1] for c in (blue, red)]
        try:
            await blue.send(ball_request("blue", token, 2))
            status_b, headers_b, body_b = await blue.response()
            await red.send(ball_request("red", token, 1))
            status_r, headers_r, body_r = await red.response()
        finally:
            await blue.close()
            await red.close()
        headers_b.pop("date"), headers_r.pop("date")
        after = time.time()
        stored = rows(server, "SELECT * FROM requests WHERE kind IN ('red', 'blue') ORDER BY id")
        for row, port in zip(stored, ports, strict=True):
            row.pop("id")
            assert before <= row.pop("t") <= after
            assert row.pop("port") == port  # the client's own port, for pairing with NAT logs
            assert row.pop("token") == token
            row["path"] = row["path"].replace(token, "TOKEN")
        seen[name] = (status_b, headers_b, body_b, status_r, headers_r, body_r, stored)
    fast, slow = seen["fast"], seen["slow"]
    assert fast[0] == fast[3] == 200
    assert fast[2] == images.BLUE_BALL and fast[5] == images.RED_BALL
    assert fast == slow
    # Every column a probe's row has (issue 2), as the client sent it.
    common = {"method": "GET", "token_ok": 1, "status": 200, "user_agent": "fastpath-test/1.0"}
    assert fast[6] == [
        {**common, "site": "ipv6", "addr": "::1", "path": "/blue/TOKEN/2.png?ip=127.0.0.1",
         "kind": "blue", "ball": 2, "bytes": len(images.BLUE_BALL)},
        {**common, "site": "ipv4", "addr": "127.0.0.1", "path": "/red/TOKEN/1.png?ip=127.0.0.1",
         "kind": "red", "ball": 1, "bytes": len(images.RED_BALL)},
    ]  # fmt: skip
    # ... and it was the fast path that answered, the other the web application.
    assert pair["fast"].fast[IPV6].answered == 1 and pair["fast"].fast[IPV4].answered == 1
    assert pair["slow"].fast == {}


async def test_keep_alive_balls_then_the_survey_then_balls_again(server, db):
    """Anything but a ball hands the connection to aiohttp, which then answers balls too."""
    token = await survey_token(server)
    connection = await Raw.open(server, IPV4)
    try:
        for ball in (1, 2, 3):
            await connection.send(ball_request("red", token, ball))
            status, _, body = await connection.response()
            assert (status, body) == (200, images.RED_BALL)
        assert server.fast[IPV4].answered == 3
        handed_over = server.fast[IPV4].handed_over
        await connection.send(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: fastpath-test\r\n\r\n")
        status, _, body = await connection.response()
        assert status == 200 and b"<form" in body
        assert server.fast[IPV4].handed_over == handed_over + 1
        await connection.send(ball_request("red", token, 4))
        status, _, body = await connection.response()
        assert (status, body) == (200, images.RED_BALL)
        assert server.fast[IPV4].answered == 3  # the fourth was aiohttp's
    finally:
        await connection.close()
    kinds = [r["kind"] for r in db("SELECT kind FROM requests WHERE port != 0 ORDER BY id")]
    assert kinds[-5:] == ["red", "red", "red", "survey", "red"]


async def test_pipelined_requests_are_answered_in_order(server, db):
    token = await survey_token(server)
    forged = new_token(b"not the server's secret, at least 16 bytes")
    connection = await Raw.open(server, IPV6)
    try:
        await connection.send(
            ball_request("blue", token, 1)
            + ball_request("blue", forged, 2)
            + ball_request("blue", token, 3)
            + b"GET /wp-login.php HTTP/1.1\r\nHost: x\r\n\r\n"
            + ball_request("blue", token, 4)
        )
        answers = [await connection.response() for _ in range(5)]
    finally:
        await connection.close()
    assert [status for status, _, _ in answers] == [200, 200, 200, 404, 200]
    stored = db("SELECT ball, token_ok, status FROM requests WHERE site = 'ipv6' ORDER BY id")
    assert [tuple(r) for r in stored] == [
        (1, 1, 200),
        (2, 0, 200),
        (3, 1, 200),
        (None, 0, 404),
        (4, 1, 200),
    ]


async def test_a_head_split_across_writes_is_one_request(server, db):
    token = await survey_token(server)
    request = ball_request("blue", token, 1)
    connection = await Raw.open(server, IPV6)
    try:
        for i in range(0, len(request), 7):
            await connection.send(request[i : i + 7])
        status, _, body = await connection.response()
    finally:
        await connection.close()
    assert (status, body) == (200, images.BLUE_BALL)
    assert server.fast[IPV6].answered == 1 and server.fast[IPV6].handed_over == 0
    assert len(db("SELECT id FROM requests WHERE kind = 'blue'")) == 1


@pytest.mark.parametrize(
    ("site", "request_bytes"),
    [
        # The wrong site for the ball: the web application's 421.
        (IPV4, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\n\r\n"),
        (IPV6, b"GET /red/{token}/1.png HTTP/1.1\r\nHost: x\r\n\r\n"),
        # Not a plain GET of a ball: its rules, not ours.
        (IPV6, b"HEAD /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.0\r\nHost: x\r\n\r\n"),
        (IPV6, b"POST /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nExpect: nonsense\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nUser-Agent: caf\xc3\xa9\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nUser-Agent: \xff\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\n Folded: x\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n"),
        (IPV6, b"GET /blue/%61{rest}/1.png HTTP/1.1\r\nHost: x\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/x.png HTTP/1.1\r\nHost: x\r\n\r\n"),
        (IPV6, b"GET /blue/{token}/1.png#frag HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            IPV6,
            b"GET /blue/{token}/1.png HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        ),
        (IPV6, b"GET http://x/blue/{token}/1.png HTTP/1.1\r\nHost: x\r\n\r\n"),
    ],
)
async def test_anything_else_is_the_web_applications(pair, site, request_bytes):
    """Each: handed to aiohttp, answered as the server without the fast path answers it."""
    answers = []
    for server in pair.values():
        token = await survey_token(server)
        raw = request_bytes.replace(b"{token}", token.encode())
        raw = raw.replace(b"%61{rest}", b"%" + f"{ord(token[0]):02x}".encode() + token[1:].encode())
        connection = await Raw.open(server, site)
        try:
            await connection.send(raw)
            head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
            rest = b"" if raw.startswith(b"HEAD") else await connection.reader.read(65536)
        finally:
            await connection.close()
        status = int(head.split()[1])
        headers = sorted(
            line
            for line in head.decode("latin-1").split("\r\n")[1:]
            if line and not line.startswith("Date:")
        )
        answers.append((status, headers, rest))
    fast, slow = answers
    assert fast == slow
    assert pair["fast"].fast[site].answered == 0
    # ... it was aiohttp's: the survey page's connection and this one.
    assert pair["fast"].fast[site].handed_over == (2 if site == IPV4 else 1)


async def test_a_user_agent_is_stored_as_sent(server, db):
    token = await survey_token(server)
    connection = await Raw.open(server, IPV6)
    agent = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) " + "x" * 600
    try:
        await connection.send(
            f"GET /blue/{token}/1.png HTTP/1.1\r\nuser-agent:   {agent}  \r\n"
            f"User-Agent: second\r\n\r\n".encode()
        )
        assert (await connection.response())[0] == 200
    finally:
        await connection.close()
    (row,) = db("SELECT user_agent, path FROM requests WHERE kind = 'blue'")
    assert row["user_agent"] == agent[:512]  # the first, stripped, cut as aiohttp's path cuts it
    assert row["path"] == f"/blue/{token}/1.png"


async def test_connection_close_is_honoured(server):
    token = await survey_token(server)
    connection = await Raw.open(server, IPV6)
    try:
        await connection.send(ball_request("blue", token, 1, "Connection: close\r\n"))
        status, headers, _ = await connection.response()
        assert status == 200 and headers["connection"] == "close"
        assert await connection.closed()
    finally:
        await connection.close()


async def test_half_closed_client_still_gets_its_ball(server, db):
    token = await survey_token(server)
    connection = await Raw.open(server, IPV6)
    try:
        await connection.send(ball_request("blue", token, 1))
        connection.writer.write_eof()
        status, _, body = await connection.response()
        assert (status, body) == (200, images.BLUE_BALL)
        assert await connection.closed()
    finally:
        await connection.close()
    assert len(db("SELECT id FROM requests WHERE kind = 'blue'")) == 1


async def test_an_idle_fast_connection_is_closed_after_the_header_timeout(make_config):
    server = ProbeServer(make_config(http={"header_timeout": 0.5}))
    await server.start()
    try:
        token = await survey_token(server)
        connection = await Raw.open(server, IPV6)
        try:
            await connection.send(ball_request("blue", token, 1))
            assert (await connection.response())[0] == 200
            started = asyncio.get_running_loop().time()
            await connection.send(b"GET /blue/")  # a head that never completes
            assert await connection.closed()
            assert asyncio.get_running_loop().time() - started >= 0.4
        finally:
            await connection.close()
        assert len(server.fast[IPV6].connections) == 0
    finally:
        await server.stop()


@contextlib.contextmanager
def database_locked(server: ProbeServer) -> Iterator[None]:
    """Hold the database's write lock from outside: the writer's commits wait (a stalled disk)."""
    conn = sqlite3.connect(server.config.resolve(server.config.database.path), isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def until(condition: Callable[[], bool]) -> None:
    """Bounded polling of a condition the server exposes no event for."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


async def test_overloaded_writer_means_503_and_no_row(make_config):
    """A full write queue: the ball is refused, not acknowledged, exactly as aiohttp's path does."""
    server = ProbeServer(make_config(database={"queue_limit": 100}))
    await server.start()
    try:
        token = await survey_token(server)
        writer = server.app[writer_key]
        connection = await Raw.open(server, IPV6)
        try:
            with database_locked(server):
                params = (0, "ipv4", "x", 0, "GET", "/", "x", None, 0, None, 200, 0, "")
                row = (INSERT_REQUEST, params)
                held = writer.submit([row] * 100)  # the queue is full until the lock goes
                await connection.send(ball_request("blue", token, 1))
                status, headers, body = await connection.response()
            await held
        finally:
            await connection.close()
        assert status == 503 and headers["retry-after"] == "5"
        assert body == b"temporarily unavailable: overloaded\n"
    finally:
        await server.stop()
    assert rows(server, "SELECT * FROM requests WHERE kind = 'blue'") == []


async def test_sigterm_answers_fast_requests_in_flight(server, db):
    """Stopping: a fast connection's request in hand is answered and stored, then it closes."""
    token = await survey_token(server)
    idle = await Raw.open(server, IPV6)
    busy = await Raw.open(server, IPV6)
    fast = server.fast[IPV6]
    try:
        await idle.send(ball_request("blue", token, 1))
        assert (await idle.response())[0] == 200
        with database_locked(server):
            await busy.send(ball_request("blue", token, 2))
            await until(lambda: any(c.waiting is not None for c in fast.connections))
            stopping = asyncio.ensure_future(server.stop())
            assert await idle.closed()  # idle: closed at once
        status, headers, body = await busy.response()  # busy: answered once stored
        assert (status, body) == (200, images.BLUE_BALL)
        assert headers["connection"] == "close"  # ... and closed at once, not kept alive
        assert await busy.closed()
        await stopping
    finally:
        await idle.close()
        await busy.close()
    balls = db("SELECT ball FROM requests WHERE kind = 'blue' ORDER BY id")
    assert [r["ball"] for r in balls] == [1, 2]


async def test_what_a_client_sends_ahead_is_bounded(server):
    """A request waiting for its row, megabytes sent behind it: reading stops, memory stays."""
    token = await survey_token(server)
    fast = server.fast[IPV6]
    connection = await Raw.open(server, IPV6)
    try:
        with database_locked(server):
            await connection.send(ball_request("blue", token, 1))
            await until(lambda: any(c.waiting is not None for c in fast.connections))
            (held,) = fast.connections
            # Far more than the kernel's buffers hold: the client must block.
            connection.writer.write(b"GET /" + b"x" * 16_000_000)
            await until(lambda: held._reading_paused)
            assert len(held.buffer) <= MAX_BUFFER + 2**20  # the limit and one read at most
            # Most of it is still on the client's side: the server stopped reading.
            assert connection.writer.transport.get_write_buffer_size() > 8_000_000
        status, _, body = await connection.response()  # the ball, once stored
        assert (status, body) == (200, images.BLUE_BALL)
    finally:
        connection.writer.transport.abort()
