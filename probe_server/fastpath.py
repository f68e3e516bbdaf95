"""The ball fetches without aiohttp's request machinery.

Nearly every request a measurement receives is a ball: a plain ``GET`` of a
small image, one after another on a keep-alive connection. aiohttp spends
most of its time per request on what such a request does not need (a
request object, routing, middlewares, a response object, header
serialisation); profiled, that was about half of the server's CPU time per
ball, the database included. :class:`FastConnection` answers those requests
itself and hands everything else to aiohttp unchanged:

- it reads the request head (up to the blank line) and answers it only when
  it is ``GET /red/<token>/<n>.png`` on the IPv4 site or ``GET
  /blue/<token>/<n>.png`` on the IPv6 site, HTTP/1.1, printable ASCII only,
  no body, no ``Expect`` or ``Upgrade``: exactly what a browser sends for an
  ``<img>``. Its row is the one the ``record`` middleware would write, its
  response the one the ball handler would send, sent only once the row is
  committed (503 when it cannot be, as there).
- at the first request that is anything else (another path, a wrong site, a
  body, a byte it does not expect, a head it cannot find within
  :data:`MAX_HEAD` bytes), it creates aiohttp's protocol for the connection
  and gives it every byte from that request on; the connection is aiohttp's
  from then on. So every rule of the web application (421 on the wrong
  site, 404, 400 for what cannot be parsed, redirects to HTTPS) still holds,
  decided by the same code as before.

A fast connection keeps the limits of :class:`~probe_server.limits.GuardedConnection`:
it is busy from a complete request head until its response is handed to the
kernel, idle otherwise, and closed when no complete request head has arrived
``header_timeout`` after it opened or after its last response (aiohttp's
keep-alive timer, which a connection it never saw does not have). One
request at a time: a pipelined second request waits in the buffer until the
first is answered, so responses leave in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from . import images, survey
from .keys import metrics_key, verifier_key, writer_key
from .limits import ConnectionTable, GuardedConnection
from .store import NotStored, Overloaded
from .tokens import looks_like_token
from .web import INSERT_REQUEST, IPV4, IPV6, MAX_LOGGED_AGENT, MAX_LOGGED_PATH

if TYPE_CHECKING:
    from .metrics import Metrics
    from .store import Writer
    from .tokens import TokenVerifier

log = logging.getLogger(__name__)

# A browser's request for an image is well under 2 KB, cookies aside; a head
# not complete within this many bytes goes to aiohttp, which applies its own
# limits (and answers 400 or 431 where they are passed).
MAX_HEAD = 8190
# What a connection may have sent ahead (pipelined) while its request waits
# for its row; beyond this, reading stops until that request is answered.
MAX_BUFFER = 65536

# The request line of a ball fetch: the path of the ball routes with a token
# and ball index of the characters a token or index can hold, and any query
# of printable characters (the paper-compatible ``?ip=`` among them).
_BALL_TARGET = re.compile(rb"/(red|blue)/([A-Za-z0-9_-]{1,64})/([0-9]{1,2})\.png(?:\?[!-\"$-~]*)?")
# Bytes a fast request head may not hold: controls other than tab, CR and
# LF, and anything outside ASCII (aiohttp decides what those mean).
_UNEXPECTED = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]")
# Headers that make a request one for aiohttp: a body, 100-continue, a
# protocol switch. (Content-Length: 0 is harmless but rare: aiohttp's.)
_DELEGATED = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# Which ball each site serves: the socket decides, never the Host header.
_SITE_BALLS = {
    IPV4: {b"red": ("red", images.RED_BALL)},
    IPV6: {b"blue": ("blue", images.BLUE_BALL)},
}


class _Date:
    """The Date header's value, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = email.utils.formatdate(now, usegmt=True).encode("ascii")
        return self.value


_date = _Date()


def _response(
    status: bytes, content_type: bytes, body: bytes, extra: bytes = b""
) -> tuple[bytes, bytes]:
    """A response head (without Date and Server) and body, as aiohttp sends them."""
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: " + content_type + b"\r\n" + extra + b"Cache-Control: no-store\r\n"
        b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
    ), body


def _unavailable(reason: str) -> tuple[bytes, bytes]:
    # The same 503 as the record middleware's: nothing was acknowledged.
    return _response(
        b"503 Service Unavailable",
        b"text/plain; charset=utf-8",
        f"temporarily unavailable: {reason}\n".encode(),
        b"Retry-After: 5\r\n",
    )


_OVERLOADED = _unavailable("overloaded")
_NOT_STORED = _unavailable("storage is not keeping up")
_SERVER = b"Server: " + SERVER_SOFTWARE.encode("ascii") + b"\r\n"


class FastBalls:
    """What one site's fast connections share: its balls, the app's writer and counters."""

    def __init__(self, app: web.Application, site: str, header_timeout: float) -> None:
        self.app = app
        self.site = site
        self.header_timeout = header_timeout
        self.balls = {
            kind: (name, *_response(b"200 OK", b"image/png", body, b"Timing-Allow-Origin: *\r\n"))
            for kind, (name, body) in _SITE_BALLS[site].items()
        }
        self.connections: set[FastConnection] = set()
        self.closing = False
        # Set when, shutting down, the last fast connection has gone.
        self.drained = asyncio.Event()
        # Known once the application has started (the writer is its resource).
        self._writer: Writer | None = None
        self._verifier: TokenVerifier | None = None
        self._metrics: Metrics | None = None
        self.answered = 0
        self.handed_over = 0

    def bind(self) -> None:
        self._writer = self.app[writer_key]
        self._verifier = self.app[verifier_key]
        self._metrics = self.app[metrics_key]

    def protocol(
        self,
        table: ConnectionTable,
        factory: Callable[[], asyncio.Protocol],
        send_timeout: float,
    ) -> FastConnection:
        return FastConnection(table, factory, send_timeout, self)

    def close_idle(self) -> None:
        """Shutting down: close the idle fast connections; the busy ones close when answered."""
        self.closing = True
        for connection in list(self.connections):
            if connection.waiting is None:
                connection.close()

    async def drain(self, seconds: float) -> None:
        """Until every fast connection has answered what it was asked, or ``seconds``."""
        self.close_idle()
        if self.connections:
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.drained.wait()
        for connection in list(self.connections):
            connection.close()

    def forget(self, connection: FastConnection) -> None:
        self.connections.discard(connection)
        if self.closing and not self.connections:
            self.drained.set()


class FastConnection(GuardedConnection):
    """A connection whose ball fetches are answered here, the rest by aiohttp."""

    def __init__(
        self,
        table: ConnectionTable,
        factory: Callable[[], asyncio.Protocol],
        send_timeout: float,
        balls: FastBalls,
    ) -> None:
        super().__init__(table, factory, send_timeout)
        self.balls = balls
        self.buffer = b""
        self.addr = "0.0.0.0"  # noqa: S104 - until the peer is known
        self.port = 0
        # The commit the current request waits for, if any.
        self.waiting: asyncio.Future[None] | None = None
        self._close_after = False
        self._paused = False
        self._eof = False
        self._reading_paused = False
        self._last = 0.0  # when the connection opened or last answered
        self._header_timer: asyncio.TimerHandle | None = None
        self._pending: tuple[str, bytes, bytes] = ("", b"", b"")

    # -- events --------------------------------------------------------------

    def admitted(self, peer: Any) -> None:
        # Ours until a request that is not a ball; aiohttp's protocol is
        # made only then (_hand_over).
        if peer:
            self.addr, self.port = survey.canonical_address(peer[0]), int(peer[1])
        balls = self.balls
        if balls._writer is None:
            balls.bind()
        if balls.closing:
            self._hand_over()
            return
        balls.connections.add(self)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._header_timer = loop.call_at(self._last + balls.header_timeout, self._header_due)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            super().data_received(data)
            return
        if self._lingering or self.transport is None:
            return
        self.buffer += data
        if len(self.buffer) > MAX_BUFFER and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        if self.waiting is None and not self._paused:
            self._next()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        self._eof = True
        if self.waiting is not None:
            return True  # answer the request in hand first, then close
        if self.buffer and self.transport is not None:
            # A request cut short by the client's EOF: aiohttp says what it is.
            return self._hand_over()
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        super().resume_writing()
        if self.inner is None and self.waiting is None and self.transport is not None:
            self._next()

    # -- requests ------------------------------------------------------------

    def _next(self) -> None:
        """Answer the next complete request in the buffer, or hand the connection over."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > MAX_HEAD or self.balls.closing or (self._eof and buffer):
                self._hand_over()
            return
        head = buffer[:end]
        request = self._parse(head)
        if request is None:
            self._hand_over()
            return
        self.buffer = buffer[end + 4 :]
        self.table.busy(self)
        self._answer(*request)

    def _parse(self, head: bytes) -> tuple[re.Match[bytes], str, bool] | None:
        """(target, user agent, close) of a ball fetch; None: aiohttp's."""
        if _UNEXPECTED.search(head) is not None:
            return None
        line, _, fields = head.partition(b"\r\n")
        if not line.startswith(b"GET ") or not line.endswith(b" HTTP/1.1"):
            return None
        target = line[4:-9]
        match = _BALL_TARGET.fullmatch(target)
        if match is None or match.group(1) not in self.balls.balls:
            return None
        agent = b""
        close = False
        if fields:
            for field in fields.split(b"\r\n"):
                if b"\n" in field or b"\r" in field:
                    return None  # a bare CR or LF: aiohttp's parser decides
                name, colon, value = field.partition(b":")
                if not colon or _HEADER_NAME.fullmatch(name) is None:
                    return None
                name = name.lower()
                if name in _DELEGATED:
                    return None
                if name == b"user-agent":
                    if not agent:
                        agent = value.strip(b" \t")
                elif name == b"connection":
                    tokens = {t.strip(b" \t").lower() for t in value.split(b",")}
                    if b"upgrade" in tokens:
                        return None
                    close = close or b"close" in tokens
        return match, agent[:MAX_LOGGED_AGENT].decode("ascii"), close

    def _answer(self, match: re.Match[bytes], agent: str, close: bool) -> None:
        balls = self.balls
        name, head, body = balls.balls[match.group(1)]
        assert balls._writer is not None and balls._verifier is not None
        token_text = match.group(2).decode("ascii")
        token = token_text if looks_like_token(token_text) else None
        token_ok = balls._verifier(token) if token is not None else False
        path = match.group(0).decode("ascii")
        row = (
            INSERT_REQUEST,
            (
                time.time(),
                balls.site,
                self.addr,
                self.port,
                "GET",
                path[:MAX_LOGGED_PATH],
                name,
                token,
                token_ok,
                int(match.group(3)),
                200,
                len(body),
                agent,
            ),
        )
        self._close_after = close
        self._pending = (name, head, body)
        try:
            self.waiting = balls._writer.submit([row])
        except Overloaded:
            self._send(name, *_OVERLOADED)
            return
        self.waiting.add_done_callback(self._stored)

    def _stored(self, future: asyncio.Future[None]) -> None:
        self.waiting = None
        name, head, body = self._pending
        error = future.exception()
        if error is None:
            self._send(name, head, body)
            return
        if not isinstance(error, NotStored):
            log.error("event=fast_ball_failed error=%r", repr(error))
        self._send(name, *_NOT_STORED)

    def _send(self, name: str, head: bytes, body: bytes) -> None:
        balls = self.balls
        status = int(head[9:12])
        metrics = balls._metrics
        if metrics is not None:
            metrics.request(balls.site, name, status)
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client went away; its row is stored all the same
        balls.answered += 1
        close = self._close_after or self._eof or balls.closing
        transport.write(
            head
            + b"Date: "
            + _date()
            + b"\r\n"
            + _SERVER
            + (b"Connection: close\r\n\r\n" if close else b"\r\n")
            + body
        )
        if close:
            self.close()
            return
        self.table.idle(self)
        self._last = asyncio.get_running_loop().time()
        self._resume_reading()
        if self.buffer and not self._paused:
            self._next()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- connection ----------------------------------------------------------

    def _header_due(self) -> None:
        """No complete request head ``header_timeout`` after the last answer: close."""
        self._header_timer = None
        if self.inner is not None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        due = self._last + self.balls.header_timeout
        if self.waiting is None and loop.time() >= due:
            self.close()
            return
        self._header_timer = loop.call_at(
            max(due, loop.time() + 0.1) if self.waiting is None else loop.time() + 1.0,
            self._header_due,
        )

    def _hand_over(self) -> bool | None:
        """From this request on, the connection is aiohttp's (the result: its eof_received)."""
        transport = self.transport
        self._forget()
        if transport is None or self.inner is not None:
            return None
        self.balls.handed_over += 1
        self._resume_reading()  # aiohttp keeps its own flow control
        self.inner = self.factory()
        self.inner.connection_made(transport)
        if self._paused:
            self.inner.pause_writing()
        buffer, self.buffer = self.buffer, b""
        if buffer:
            # What came already, as it would have come: busy marking and all.
            GuardedConnection.data_received(self, buffer)
        return self.inner.eof_received() if self._eof else None

    def _forget(self) -> None:
        self.balls.forget(self)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def close(self) -> None:
        self._forget()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
