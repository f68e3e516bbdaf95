"""Fuzzing the real process: DNS over UDP and TCP on both families, and every
HTTP endpoint's path, parameters, headers and body, structured (hypothesis)
and mutated raw bytes. No crash, no 500, memory bounded, valid queries
answered right afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import dns.asyncquery
import dns.message
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from probe_server.config import SpeedTestConfig
from probe_server.dnswire import Responder
from probe_server.testing import ServerProcess
from probe_server.zone import Authority

from ..conftest import EXAMPLE_ZONES
from ..test_dns_fuzz import SEEDS, mutate, packets
from .conftest import Report, rss_mib, scale, server_config

# -- DNS ---------------------------------------------------------------------------------


@settings(
    max_examples=scale(500, 20_000), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(packet=packets(), tcp=st.booleans())
def test_dns_handler_fuzz(packet, tcp):
    outcome = RESPONDER.respond(packet, tcp=tcp)
    if outcome.reply is not None:
        reply = dns.message.from_wire(outcome.reply)
        assert reply.id == int.from_bytes(packet[:2], "big")
        assert tcp or len(outcome.reply) <= 1232


RESPONDER = Responder(Authority.from_files(EXAMPLE_ZONES))


async def dns_answers_right(server: ServerProcess) -> None:
    for key in ("dns_udp_ipv4", "dns_tcp_ipv4", "dns_udp_ipv6", "dns_tcp_ipv6"):
        host, _, port = server.endpoints[key].rpartition(":")
        ask = dns.asyncquery.udp if "udp" in key else dns.asyncquery.tcp
        for qname, qtype, expected in (
            ("survey.example.org", "A", ["192.0.2.10"]),
            ("abc.v6.example.org", "AAAA", ["2001:db8::10"]),
        ):
            reply = await ask(
                dns.message.make_query(qname, qtype), host.strip("[]"), port=int(port), timeout=5
            )
            assert [r.to_text() for r in reply.answer[0]] == expected


async def test_dns_fuzz_on_the_live_process(tmp_path, processes, report: Report):
    server = ServerProcess(server_config(tmp_path, dns={"tcp_idle_timeout": 1.0}), tmp_path)
    processes.append(server)
    await server.start()
    rng = random.Random(20240611)
    per_family = scale(3000, 40_000)
    memory_before = rss_mib(server.pid)
    sent = 0
    loop = asyncio.get_running_loop()
    for family in ("ipv4", "ipv6"):
        host, _, port = server.endpoints[f"dns_udp_{family}"].rpartition(":")
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(host.strip("[]"), int(port))
        )
        for i in range(per_family):
            if rng.random() < 0.3:
                packet = rng.randbytes(rng.randint(0, 700))
            else:
                packet = mutate(rng, rng.choice(SEEDS))
            transport.sendto(packet)
            sent += 1
            if i % 200 == 0:
                await dns_answers_right(server)  # paces the sender; the socket never overflows
        transport.close()
        for _ in range(per_family // 50):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            for _ in range(rng.randint(1, 6)):
                packet = (
                    rng.randbytes(rng.randint(0, 300))
                    if rng.random() < 0.3
                    else mutate(rng, rng.choice(SEEDS))
                )
                framed = rng.random() < 0.8
                writer.write((struct.pack("!H", len(packet)) if framed else b"") + packet)
                sent += 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    await dns_answers_right(server)
    memory_after = rss_mib(server.pid)
    server.kill(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.stderr.decode()
    stats = dict(
        re.findall(
            r"(\w+)=(\d+)", next(line for line in log.splitlines() if "event=dns_stopped" in line)
        )
    )
    assert "Traceback" not in log
    assert stats["errors"] == "0"
    assert memory_after - memory_before < 50
    report(
        "fuzzing: DNS",
        "hypothesis on the packet handler (random bytes and mutated valid queries,"
        " shrinking); then seeded random and mutated packets to the live process over UDP"
        " and TCP (framed and unframed) on both families",
        f"{scale(500, 20_000)} handler examples; {sent} packets to the process",
        f"{stats['queries']} messages handled, 0 handler errors, no crash; valid queries"
        f" answered right throughout and after; RSS {memory_before:.0f} -> {memory_after:.0f}"
        " MiB",
        "nothing",
    )


# -- HTTP --------------------------------------------------------------------------------

SPEED_TESTS = [test.id for test in SpeedTestConfig().tests]
KINDS = ["balls", "speedtest", "tool"]
# The survey's languages, and some it does not have.
LANGUAGES = ["en", "hi", "ja", "tr", "EN", "en-US", "xx", "../en", "ja\x00"]
NAMES = [
    "assignmentId",
    "hitId",
    "workerId",
    "turkSubmitTo",
    "batch",
    "token",
    "red",
    "blue",
    "ip",
    "n",
    "survey",
    "lang",
    "report",
    *(f"{field}-{test}" for field in ("download", "upload", "share") for test in SPEED_TESTS),
    "x",
    "",
    "a[]",
    "__proto__",
]
text = st.text(max_size=60)
UGLY = [
    "",
    "%",
    "%%",
    "%ff",
    "%00",
    "..",
    "\\",
    "ASSIGNMENT_ID_NOT_AVAILABLE",
    "https://www.mturk.com",
    "1",
    "99",
    "100",
    "-1",
    "٣",
    "a" * 300,
]
HEADER_NAMES = [
    "User-Agent",
    "Content-Type",
    "Cookie",
    "Accept",
    "X-Forwarded-For",
    "Transfer-Encoding",
    "Content-Encoding",
    "Expect",
    "Range",
    "X-" + "a" * 40,
]
PATHS = [
    "/",
    "/submit",
    "/red/{t}/1.png",
    "/blue/{t}/2.png",
    "/red/{t}/{s}.png",
    "/blue/{s}/1.png",
    "/{s}",
    "/red/{s}",
    "//{s}",
    "/%2e%2e/{s}",
    "/ds/{t}.png",
    "/v6ns/{t}.png",
    "/literal/{t}.png",
    "/mtu/{t}/large.png",
    "/mtu/{t}/ok.png",
    "/ds/{s}.png",
    "/mtu/{s}/large.png",
    "/battery.js",
    "/beacon",
    "/.well-known/acme-challenge/{s}",
]
EXTRA_HEADERS = [
    b"Content-Length: 99999\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 1\r\nContent-Length: 2\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    b"X: " + b"a" * 9000 + b"\r\n",
    b"Host: \r\n",
]
ugly = st.one_of(
    text,
    st.sampled_from(
        [
            "",
            "%",
            "%%",
            "%ff",
            "%00",
            "..",
            "\\",
            "ASSIGNMENT_ID_NOT_AVAILABLE",
            "https://www.mturk.com",
            "1",
            "99",
            "100",
            "-1",
            "٣",
            "a" * 300,
            # The values the experiment kinds and their answers take.
            *KINDS,
            *LANGUAGES,
            "0.5",
            "1e3",
            "10001",
            "nan",
            "inf",
            "123456789",
            "https://spoofer.caida.org/report.php?sessionid=42",
            "https://www.speedtest.net/result/12345",
            "http://www.speedtest.net/result/1",
            "https://user@www.speedtest.net/result/1",
        ]
    ),
)
params = st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), text), ugly), max_size=6)
headers = st.lists(
    st.tuples(
        st.sampled_from(HEADER_NAMES),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=80),
    ),
    max_size=4,
)
paths = st.sampled_from(PATHS)


def encode_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


# Each example costs round trips to a live process: shrinking a failure could
# take many minutes. PROBE_FUZZ_SHRINK=1 shrinks (to minimise a failure found).
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("PROBE_FUZZ_SHRINK") else []
)
PAGE = b"GET / HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n"


class Live:
    """One live process for the HTTP fuzz tests of this module.

    Hypothesis drives a plain (synchronous) test, so the process lives on an
    event loop of its own in a thread, and the test talks to it with
    blocking sockets.
    """

    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    server: ServerProcess | None = None
    token = ""
    # A session of each kind of page (the ball page's is ``token`` too).
    tokens: dict[str, str] = {}  # noqa: RUF012
    requests = 0
    statuses: dict[int, int] = {}  # noqa: RUF012
    # Answer forms by the kind of their session, and status.
    answers: dict[tuple[str, int], int] = {}  # noqa: RUF012

    @classmethod
    def run(cls, coroutine: Any) -> Any:
        assert cls.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, cls.loop).result(120)


@pytest.fixture(scope="module")
def live_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("http-fuzz")
    Live.loop = asyncio.new_event_loop()
    Live.thread = threading.Thread(target=Live.loop.run_forever, daemon=True)
    Live.thread.start()
    # Short deadlines: a mutated request often announces a body it never sends.
    config = server_config(workdir, http={"header_timeout": 2, "body_timeout": 2})
    server = Live.server = ServerProcess(config, workdir)
    try:
        Live.run(server.start())
        for kind in KINDS:
            request = PAGE.replace(b"GET / ", f"GET /?survey={kind} ".encode())
            _, page = blocking_request(server.endpoints["http_ipv4"], request, whole=True)
            found = re.search(rb'name="token" value="([a-z2-7]{32})"', page)
            assert found, (kind, page[:300])
            Live.tokens[kind] = found.group(1).decode()
        Live.token = Live.tokens["balls"]
        yield server
    finally:
        Live.run(server.close())
        Live.loop.call_soon_threadsafe(Live.loop.stop)
        Live.thread.join(10)
        Live.loop.close()


def blocking_request(
    endpoint: str, raw: bytes, eof: bool = False, whole: bool = False, wait: float = 20
) -> tuple[int, bytes]:
    """Send raw bytes on a new connection; the status (0: no answer) and what came:
    the response head, or with ``whole`` all until the server closes."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=wait) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
            if eof:
                sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(OSError):
            while whole or b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    head = received[:12]
    status = int(head[9:12]) if head.startswith(b"HTTP/1.") and head[9:12].isdigit() else 0
    return status, received


@settings(
    max_examples=scale(300, 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=PHASES,
)
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS", "DELETE", "GETT"]),
    path=paths,
    kind=st.sampled_from(KINDS),
    segment=text,
    query=params,
    form=params,
    extra=headers,
    body=st.one_of(st.binary(max_size=400), st.none()),
)
def test_http_fuzz_structured(live_http, method, path, kind, segment, query, form, extra, body):
    target = path.format(t=Live.tokens[kind], s=quote(segment, safe=""))
    if query:
        target += "?" + encode_query(query)
    payload = body if body is not None else encode_query(form).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in extra)
    if body is None and not any(k == "Content-Type" for k, _ in extra):
        head += "Content-Type: application/x-www-form-urlencoded\r\n"
    raw = f"{method} {target} HTTP/1.1\r\nHost: fuzz\r\n{head}".encode("latin-1")
    raw += f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
    for site in ("ipv4", "ipv6"):
        status, _ = blocking_request(live_http.endpoints[f"http_{site}"], raw)
        Live.requests += 1
        Live.statuses[status] = Live.statuses.get(status, 0) + 1
        assert status < 500, (site, method, target, status)
        # Every request here is well-formed HTTP/1.1 (a Content-Length that
        # matches its body): it gets a real answer, never a silent close.
        assert status >= 200, (site, method, target, status, extra)
    assert live_http.process is not None and live_http.process.returncode is None


def answer_forms(kind: str) -> st.SearchStrategy[dict[str, str]]:
    """An answer form of ``kind``'s page: a plausible answer, some of its
    fields dropped, some fields (its own or others) given any value."""
    speed = st.sampled_from(["95.5", "12", "0.8", "1000", "9999.99"])
    plausible: dict[str, st.SearchStrategy[str]]
    if kind == "balls":
        plausible = {"red": st.sampled_from("1234"), "blue": st.sampled_from("1234")}
    elif kind == "speedtest":
        plausible = {f"{f}-{test}": speed for f in ("download", "upload") for test in SPEED_TESTS}
        plausible["share-ookla"] = st.sampled_from(["", "https://www.speedtest.net/result/12345"])
    else:
        plausible = {
            "report": st.sampled_from(
                ["123456", " 42 ", "https://spoofer.caida.org/report.php?sessionid=42"]
            )
        }
    fields = sorted(plausible)
    noise = st.dictionaries(st.sampled_from([*fields, "lang", "token", "x"]), ugly, max_size=4)
    dropped = st.sets(st.sampled_from(fields), max_size=len(fields))
    return st.tuples(st.fixed_dictionaries(plausible), dropped, noise).map(
        lambda t: {k: v for k, v in t[0].items() if k not in t[1]} | t[2]
    )


@settings(
    max_examples=scale(300, 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=PHASES,
)
@given(
    kind=st.sampled_from(KINDS),
    answered_as=st.sampled_from(KINDS),
    data=st.data(),
    encoding=st.sampled_from(["urlencoded", "multipart"]),
)
def test_answer_forms_fuzz(live_http, kind, answered_as, data, encoding):
    """The answer form of every kind of page, with a real token of a session of
    that kind (or of another kind): stored (200) or refused (400), never a 5xx
    or no answer."""
    form = {"token": Live.tokens[kind], **data.draw(answer_forms(answered_as))}
    if encoding == "urlencoded":
        body = encode_query(list(form.items())).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        boundary = "fuzzboundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{quote(name)}"\r\n\r\n'
            f"{value}\r\n"
            for name, value in form.items()
        ]
        body = ("".join(parts) + f"--{boundary}--\r\n").encode("utf-8", "surrogatepass")
        content_type = f"multipart/form-data; boundary={boundary}"
    request = (
        f"POST /submit HTTP/1.1\r\nHost: fuzz\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    status, _ = blocking_request(live_http.endpoints["http_ipv4"], request)
    Live.requests += 1
    Live.statuses[status] = Live.statuses.get(status, 0) + 1
    Live.answers[kind, status] = Live.answers.get((kind, status), 0) + 1
    assert status in (200, 400), (status, kind, answered_as, form)


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["loaded", "failed", "timeout", "pending", "ipv6", "token", ""]),
    text,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(["token", "final", "probes"]), text), inner, max_size=4
        ),
    ),
    max_leaves=12,
)
probe_report = st.fixed_dictionaries(
    {"state": st.sampled_from(["loaded", "failed", "timeout", "pending", "gone", ""])},
    optional={
        name: st.one_of(st.floats(allow_nan=True, allow_infinity=True), json_leaf)
        for name in ("at", "duration", "dns", "connect", "extra")
    },
)


@settings(
    max_examples=scale(300, 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=PHASES,
)
@given(
    shape=st.sampled_from(["near", "json", "bytes"]),
    token=st.one_of(st.just("{token}"), text),
    final=json_leaf,
    probes=st.dictionaries(
        st.one_of(st.sampled_from(["ipv4", "ipv6", "ds", "literal", "mtu", "v6ns"]), text),
        st.one_of(probe_report, json_value),
        max_size=8,
    ),
    junk=json_value,
    raw=st.binary(max_size=600),
    content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]),
)
def test_beacon_fuzz(live_http, shape, token, final, probes, junk, raw, content_type):
    """The battery's beacon: near-valid reports, any JSON, any bytes. Either
    stored (204) or refused with a 4xx; never a 5xx."""
    if shape == "near":
        document = {"token": token.replace("{token}", Live.token), "final": final, "probes": probes}
        body = json.dumps(document, allow_nan=True).encode()
    elif shape == "json":
        body = json.dumps(junk, allow_nan=True).encode()
    else:
        body = raw
    head = f"Content-Type: {content_type}\r\n" if content_type else ""
    request = (
        f"POST /beacon HTTP/1.1\r\nHost: fuzz\r\n{head}Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    status, _ = blocking_request(live_http.endpoints["http_ipv4"], request)
    Live.requests += 1
    Live.statuses[status] = Live.statuses.get(status, 0) + 1
    assert status in (204, 400, 413), (status, body[:300])


HTTP_SEEDS = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?assignmentId=A1&hitId=H1&workerId=W1&turkSubmitTo=https%3A%2F%2Fwww.mturk.com"
    b" HTTP/1.1\r\nHost: x\r\nUser-Agent: fuzz\r\n\r\n",
    b"GET /red/{token}/1.png?ip=127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 51\r\n\r\ntoken={token}&red=1&blue=1",
    b"POST /submit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n\r\n5\r\nred=1\r\n0\r\n\r\n",
    b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
    b"Content-Length: 60\r\n\r\n--zz\r\nContent-Disposition: form-data; name=red\r\n\r\n"
    b"1\r\n--zz--\r\n",
    b"POST /beacon HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 104\r\n\r\n"
    b'{"token":"{token}","final":true,"probes":{"ipv6":{"state":"loaded","at":12.5}}}',
    b"GET /mtu/{token}/large.png HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?survey=speedtest&lang=ja HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?assignmentId=A1&hitId=H1&workerId=W1&turkSubmitTo=https%3A%2F%2Fwww.mturk.com"
    b"&survey=tool&lang=tr HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 105\r\n\r\ntoken={speedtest}&download-ookla=95.5&upload-ookla=12"
    b"&download-ndt=80&upload-ndt=9.5",
    b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 60\r\n\r\ntoken={tool}&report=123456&lang=hi",
]


def mutate_http(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 5)):
        position = rng.randrange(len(data) + 1)
        action = rng.randrange(7)
        if action == 0 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif action == 1:
            del data[position : position + rng.randint(1, 20)]
        elif action == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        elif action == 3:
            data[position:position] = rng.choice(
                [b"\r\n", b"\n", b"\r", b"\0", b":", b" ", b"%", b"\r\n\r\n", b"\xff\xfe"]
            )
        elif action == 4:
            data[position:position] = rng.choice(EXTRA_HEADERS)
        elif action == 5:
            data = data.replace(
                b"HTTP/1.1", rng.choice([b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1x", b""])
            )
        else:
            data = data * rng.randint(1, 3)  # pipelined copies
    return bytes(data)


def test_http_fuzz_raw_and_server_survives(live_http, report: Report):
    server = live_http
    token = Live.token.encode()
    seeds = [
        seed.replace(b"{token}", token)
        .replace(b"{speedtest}", Live.tokens["speedtest"].encode())
        .replace(b"{tool}", Live.tokens["tool"].encode())
        for seed in HTTP_SEEDS
    ]
    rng = random.Random(31337)
    memory_before = rss_mib(server.pid)
    count = scale(1500, 20_000)
    cases = [
        ("ipv4" if i % 3 else "ipv6", mutate_http(rng, rng.choice(seeds)), rng.random() < 0.5)
        for i in range(count)
    ]

    def send(case: tuple[str, bytes, bool]) -> int:
        site, raw, eof = case
        # No answer within 3 s: the server is waiting for the rest of the
        # request (it gives up after header_timeout/body_timeout).
        return blocking_request(server.endpoints[f"http_{site}"], raw, eof=eof, wait=3)[0]

    statuses: dict[int, int] = {}
    with ThreadPoolExecutor(16) as pool:  # 16 clients at once
        for (_, raw, _), status in zip(cases, pool.map(send, cases), strict=True):
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (status, raw[:300])
    # Valid requests are answered right afterwards.
    status, page = blocking_request(server.endpoints["http_ipv4"], PAGE, whole=True)
    assert status == 200
    blue = re.search(rb'<img src="http://\[::1\]:\d+(/blue/[^"]+)"', page).group(1)
    status, _ = blocking_request(
        server.endpoints["http_ipv6"],
        b"GET "
        + blue.replace(b"&amp;", b"&")
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    memory_after = rss_mib(server.pid)
    server.kill(signal.SIGTERM)
    assert Live.run(server.wait()) == 0
    log = server.stderr.decode()
    where = max(log.find("Traceback"), log.find("Error handling request"))
    assert where < 0, log[max(0, where - 300) : where + 3000]
    assert "Unhandled exception" not in log
    with sqlite3.connect(server.workdir / "probe.db") as conn:
        assert conn.execute("SELECT count(*) FROM requests WHERE status >= 500").fetchone()[0] == 0
        logged = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    assert memory_after - memory_before < 50
    structured = dict(sorted(Live.statuses.items()))
    answers = ", ".join(f"{k} {code}: {n}" for (k, code), n in sorted(Live.answers.items()))
    report(
        "fuzzing: HTTP",
        "hypothesis: method, path segment, query parameters (MTurk's, ours with survey ="
        " balls, speedtest or tool and lang, random), headers and body (form, raw bytes) on every"
        " route, both sites, with a token of each kind of session (the battery's probes and"
        " beacon included; beacon bodies near-valid, any JSON, any bytes); the answer form of"
        " each kind (speeds, share links, report ids, lang; urlencoded and multipart) with a"
        " real token of that kind or another; then seeded mutations of valid requests (bytes,"
        " CR/LF, duplicate or negative Content-Length, chunked, multipart, 9 KB headers,"
        " pipelining, early EOF)",
        f"{Live.requests} structured + {count} raw requests",
        f"statuses structured {structured} (every well-formed request a real answer), answer"
        f" forms by session kind {{{answers}}}, raw {dict(sorted(statuses.items()))}"
        f" (0 = closed without an answer); no 5xx, no traceback; {logged} rows logged;"
        f" RSS {memory_before:.0f} -> {memory_after:.0f} MiB; valid page and probe answered"
        " right afterwards",
        "nothing",
    )
