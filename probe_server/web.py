"""The two public web sites: the survey on IPv4, the probes on both families.

Which socket a request arrived on decides what it may be served, never the
Host header: the survey, the red balls and the answer form live on the IPv4
site, the blue balls on the IPv6 site. A known path asked for on the wrong
site gets 421 Misdirected Request; anything else 404.

Every request on a public site becomes a row in ``requests``. Probe images,
the survey page and the answer are answered only once their rows are
committed (a 200 means "stored").

Nothing administrative is served here: metrics and health live on the admin
listener (``admin.py``), bound to loopback only. A site with TLS may also
have a plain-HTTP socket (port 80): it answers ACME challenges and redirects
everything else to the HTTPS site.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from . import acme, battery, images, survey
from .config import Config
from .dnsserver import DnsServer
from .i18n import N_, Message, Pages
from .keys import (
    base_urls_key,
    battery_bases_key,
    config_key,
    csp_key,
    dns_key,
    https_sites_key,
    metrics_key,
    reader_key,
    reload_hooks_key,
    secret_key,
    templates_key,
    verifier_key,
    worker_sites_key,
    writer_key,
)
from .limits import track_requests
from .metrics import Metrics
from .store import NotStored, Overloaded, Row, Writer, open_database, open_reader
from .tokens import TokenVerifier, looks_like_token, new_token, session_label

log = logging.getLogger(__name__)

IPV4, IPV6 = "ipv4", "ipv6"
MAX_LOGGED_PATH = 2048
MAX_LOGGED_AGENT = 512

INSERT_REQUEST = (
    "INSERT INTO requests (t, site, addr, port, method, path, kind, token, token_ok,"
    " ball, status, bytes, user_agent) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# A session with the defaults of schema 0006 (balls, English); the test and
# benchmark populations write sessions with it.
INSERT_SESSION = (
    "INSERT INTO sessions (token, created, ipv4, port, user_agent, red_count, blue_count,"
    " visit, assignment_id, hit_id, worker_id, turk_submit_to, batch)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# The same, with the kind of page and its language (schema 0006).
INSERT_SESSION_OF_KIND = (
    "INSERT INTO sessions (token, created, ipv4, port, user_agent, red_count, blue_count,"
    " visit, assignment_id, hit_id, worker_id, turk_submit_to, batch, survey, language)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
INSERT_SPEEDTEST = (
    "INSERT INTO speedtest_reports (session_token, t, addr, test, name, download_mbps,"
    " upload_mbps, share_url) VALUES (?,?,?,?,?,?,?,?)"
)
INSERT_TOOL_REPORT = (
    "INSERT INTO tool_reports (session_token, t, addr, tool, report) VALUES (?,?,?,?,?)"
)
INSERT_ANSWER = (
    "INSERT INTO answers (session_token, t, addr, red_reported, blue_reported, red_correct)"
    " VALUES (?,?,?,?,?,?)"
)
# The battery (schema 0007): which probes a page carried, and its beacons.
INSERT_BATTERY_PAGE = (
    "INSERT INTO battery_pages (session_token, probes, labels, beacon, v6ns_host, label)"
    " VALUES (?,?,?,?,?,?)"
)
# A worker's sessions on the other HITs of the experiment that the HIT they
# opened keeps them out of, as MTurk will once `hits sync` grants the "took
# part" qualification: another HIT of the same batch (a batch split into
# HITs of at most 9 assignments excludes its own workers), or a HIT of any
# other batch when the HIT's batch has exclude_other_batches. A HIT the
# database does not know (another experiment, a direct visit) matches nothing.
TOOK_PART_ELSEWHERE = (
    "SELECT s.hit_id FROM hits cur JOIN batches cb ON cb.name = cur.batch"
    " JOIN sessions s ON s.worker_id = ? AND s.visit = 'accepted' AND s.hit_id <> cur.hit_id"
    " JOIN hits h ON h.hit_id = s.hit_id JOIN batches b ON b.name = h.batch"
    " WHERE cur.hit_id = ? AND b.experiment = cb.experiment AND b.sandbox = cb.sandbox"
    " AND (b.name = cb.name OR cb.exclude_other_batches) LIMIT 1"
)
INSERT_BEACON = (
    "INSERT INTO beacons (session_token, t, addr, final, probe, state, at_ms, duration_ms,"
    " dns_ms, connect_ms) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
# The battery's beacon script, served from the IPv4 site so that the CSP
# can allow scripts from 'self' only.
BATTERY_SCRIPT = resources.files("probe_server").joinpath("static/battery.js").read_bytes()
# What the ball page adds to the CSP of every page: its one script is that
# file, and it may send its beacon only to its own site.
SURVEY_CSP = "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Probe:
    """What a handler learnt about its request, for the request log."""

    addr: str
    port: int
    kind: str = "unknown"
    token: str | None = None
    token_ok: bool = False
    ball: int | None = None
    # Set for requests whose success must mean their rows are stored.
    durable: bool = False
    rows: list[Row] = field(default_factory=list)


probe_key = web.RequestKey("probe", Probe)


def on_sites(*sites: str) -> Callable[[Handler], Handler]:
    """Mark the sites (socket families) on which a handler may answer."""

    def mark(handler: Handler) -> Handler:
        handler.sites = frozenset(sites)  # type: ignore[attr-defined]
        return handler

    return mark


def site_of(request: web.Request) -> str:
    sock = request.get_extra_info("socket")
    return IPV6 if sock is not None and sock.family == socket.AF_INET6 else IPV4


def peer(request: web.Request) -> tuple[str, int]:
    """The client's canonical address and port."""
    peername = request.get_extra_info("peername")
    if not peername:
        return "0.0.0.0", 0  # noqa: S104 - the connection went away; still logged
    return survey.canonical_address(peername[0]), int(peername[1])


def storable(text: str) -> str:
    """Client text as SQLite can take it: undecodable bytes become U+FFFD.

    aiohttp keeps bytes that are not UTF-8 (a User-Agent with a byte 0xFF, as
    scanners send) as lone surrogates, which sqlite3 refuses to encode.
    """
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _no_store(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Cache-Control"] = "no-store"
    return response


def _probe_response(body: bytes) -> web.Response:
    """A probe image: never cached, and its timings readable by the survey page.

    Timing-Allow-Origin lets the page's beacon read DNS and connect times of
    these cross-origin images (Resource Timing); they reveal nothing but our
    own servers' speed.
    """
    response = web.Response(body=body, content_type="image/png")
    response.headers["Timing-Allow-Origin"] = "*"
    _no_store(response)
    return response


def content_security_policy(worker_sites: tuple[str, ...]) -> str:
    """Who may frame our pages and where their forms may post.

    MTurk shows the survey in an iframe on its worker site, so there is no
    X-Frame-Options (it would blank the HIT) and frame-ancestors names
    MTurk's sites instead. form-action limits form posts to this site and
    the worker sites' externalSubmit: even a bug in the turkSubmitTo check
    could not make a browser post answers elsewhere.
    """
    framing = " ".join(("'self'", *survey.MTURK_FRAMING_SITES, *worker_sites))
    forms = " ".join(dict.fromkeys(("'self'", *worker_sites)))
    return f"frame-ancestors {' '.join(dict.fromkeys(framing.split()))}; form-action {forms}"


def _page(
    request: web.Request,
    template: str,
    language: str,
    status: int = 200,
    csp: str = "",
    **context: Any,
) -> web.Response:
    html = request.app[templates_key].render(language, template, **context)
    response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
    return _page_headers(request, response, language, csp)


def _page_headers(
    request: web.Request, response: web.Response, language: str, csp: str = ""
) -> web.Response:
    policy = request.app[csp_key]
    response.headers["Content-Security-Policy"] = f"{policy}; {csp}" if csp else policy
    response.headers["Content-Language"] = language
    _no_store(response)
    return response


def _bad_request(request: web.Request, message: Message, language: str) -> web.Response:
    text = request.app[templates_key].message(language, message)
    return _page(request, "error.html", language, status=400, message=text)


# The hidden probe images of the speedtest and tool pages: one of each colour.
PROBES_PER_COLOUR = 1
# The page of each kind of survey (the ball page keeps its old name).
TEMPLATES = {"balls": "survey.html", "speedtest": "speedtest.html", "tool": "tool.html"}


# -- IPv4 site ---------------------------------------------------------------


@on_sites(IPV4)
async def survey_page(request: web.Request) -> web.StreamResponse:
    """The survey: the ball page, the speedtest page or the tool page (``?survey=``).

    Every kind makes a session and tags its probe images with the session's
    token: the ball page's balls are the probes; the other pages carry one
    hidden red and one hidden blue image, so the worker's IPv4 and IPv6
    addresses are recorded and correlated the same way.
    """
    config = request.app[config_key]
    pages = request.app[templates_key]
    probe = request[probe_key]
    probe.kind = "survey"
    language = survey.page_language(request.query.get("lang"), pages.languages)
    try:
        worker_sites: tuple[str, ...] = request.app[worker_sites_key]
        visit = survey.parse_visit(
            request.query, config.survey.batch, worker_sites, pages.languages
        )
    except survey.BadInput as e:
        return _bad_request(request, e.message, language)
    if await _took_part_elsewhere(request, visit):
        # No session, no probes, no form: the worker is asked to return the HIT.
        probe.kind = "repeat"
        return _page(request, "repeat.html", visit.language)
    csp = SURVEY_CSP if visit.survey == "balls" else ""
    if request.method == "HEAD":
        # Link checkers and monitors: the page's headers, no body, and no
        # session (a session is a page with balls that someone was shown).
        empty = web.Response(content_type="text/html", charset="utf-8")
        return _page_headers(request, empty, visit.language, csp)
    token = new_token(request.app[secret_key])
    if visit.survey == "balls":
        red, blue = survey.draw_counts(config.survey.min_balls, config.survey.max_balls)
    else:
        red = blue = PROBES_PER_COLOUR
    address = probe.addr
    probe.token, probe.token_ok, probe.durable = token, True, True
    probe.rows.append(
        (
            INSERT_SESSION_OF_KIND,
            (
                token,
                time.time(),
                address,
                probe.port,
                storable(request.headers.get("User-Agent", "")[:MAX_LOGGED_AGENT]),
                red,
                blue,
                visit.kind,
                visit.assignment_id,
                visit.hit_id,
                visit.worker_id,
                visit.turk_submit_to,
                visit.batch,
                visit.survey,
                visit.language,
            ),
        )
    )
    # The battery's probes go on the ball page only; the other kinds carry
    # just the passive dual-stack pair (red and blue) in probes.html.
    label = session_label(request.app[secret_key], token) if config.battery.labels else ""
    page = battery.page(config.battery, request.app[battery_bases_key], token, label)
    on_page = page.active and visit.survey == "balls"
    if on_page:
        probe.rows.append(
            (
                INSERT_BATTERY_PAGE,
                (
                    token,
                    json.dumps(page.names),
                    json.dumps(page.labels),
                    page.beacon,
                    page.v6ns_host,
                    page.label,
                ),
            )
        )
    context: dict[str, Any] = {
        "token": token,
        "visit": visit,
        "red_urls": survey.ball_urls(page.red_base, "red", token, red, address),
        "blue_urls": survey.ball_urls(page.blue_base, "blue", token, blue, address),
        "battery": page if on_page else None,
        "beacon_path": battery.BEACON_PATH,
        "script_path": battery.SCRIPT_PATH,
    }
    if visit.survey == "speedtest":
        context["tests"] = [(test, survey.field_names(test)) for test in config.speedtest.tests]
        context["min_mbps"] = survey.speed_text(config.speedtest.min_mbps)
        context["max_mbps"] = survey.speed_text(config.speedtest.max_mbps)
    elif visit.survey == "tool":
        context["tool"] = config.tool
    return _page(request, TEMPLATES[visit.survey], visit.language, csp=csp, **context)


async def _took_part_elsewhere(request: web.Request, visit: survey.Visit) -> bool:
    """The worker of an accepted visit already has a session on a HIT this one excludes.

    Their own HIT opened again (a reload, or a new assignment of it after a
    return) is not another HIT.
    """
    if visit.kind != "accepted" or not visit.worker_id or not visit.hit_id:
        return False
    async with request.app[reader_key].execute(
        TOOK_PART_ELSEWHERE, (visit.worker_id, visit.hit_id)
    ) as cursor:
        return await cursor.fetchone() is not None


async def _ball(request: web.Request, kind: str, body: bytes) -> web.StreamResponse:
    probe = request[probe_key]
    probe.kind = kind
    probe.durable = True
    token = request.match_info["token"]
    ball = request.match_info["ball"]
    if looks_like_token(token):
        probe.token = token
        probe.token_ok = request.app[verifier_key](token)
    if ball.isdigit() and len(ball) <= 2:
        probe.ball = int(ball)
    # A forged or unknown token still gets its image, so the page never
    # looks broken; the row says the token was not ours.
    return _probe_response(body)


@on_sites(IPV4)
async def red_ball(request: web.Request) -> web.StreamResponse:
    return await _ball(request, "red", images.RED_BALL)


@on_sites(IPV6)
async def blue_ball(request: web.Request) -> web.StreamResponse:
    return await _ball(request, "blue", images.BLUE_BALL)


# -- the battery's probes (battery.py) ------------------------------------------------


def _battery_probe(request: web.Request, kind: str) -> Probe:
    probe = request[probe_key]
    probe.kind = kind
    probe.durable = True
    token = request.match_info["token"]
    if looks_like_token(token):
        probe.token = token
        probe.token_ok = request.app[verifier_key](token)
    return probe


async def dual_stack_probe(request: web.Request) -> web.StreamResponse:
    """The dual-stack name: served on both sites; the site is the family chosen."""
    _battery_probe(request, "ds")
    return _probe_response(images.PIXEL)


async def v6ns_probe(request: web.Request) -> web.StreamResponse:
    """The name under the IPv6-only name server: it resolved, so the resolver has IPv6."""
    _battery_probe(request, "v6ns")
    return _probe_response(images.PIXEL)


@on_sites(IPV6)
async def literal_probe(request: web.Request) -> web.StreamResponse:
    _battery_probe(request, "literal")
    return _probe_response(images.PIXEL)


@on_sites(IPV6)
async def large_probe(request: web.Request) -> web.StreamResponse:
    """Full-size packets over IPv6: a redirect padded past what a 1280-byte path carries.

    The browser follows it only once the whole header block has arrived, so
    the fetch of its target (``mtu-ok``) shows that large packets got through.
    """
    _battery_probe(request, "mtu")
    response = web.Response(status=302)
    response.headers["Location"] = battery.LARGE_REDIRECT
    response.headers["X-Padding"] = battery.LARGE_PADDING
    response.headers["Timing-Allow-Origin"] = "*"
    _no_store(response)
    return response


@on_sites(IPV6)
async def large_probe_done(request: web.Request) -> web.StreamResponse:
    _battery_probe(request, "mtu-ok")
    return _probe_response(images.PIXEL)


@on_sites(IPV4)
async def battery_script(request: web.Request) -> web.StreamResponse:
    request[probe_key].kind = "script"
    response = web.Response(body=BATTERY_SCRIPT, content_type="text/javascript")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return _no_store(response)


def _refuse_beacon(status: int, reason: str) -> web.StreamResponse:
    return _no_store(web.Response(status=status, text=f"{status}: {reason}\n"))


@on_sites(IPV4)
async def beacon(request: web.Request) -> web.StreamResponse:
    """The battery's report of what loaded: validated, bounded, stored, 204."""
    probe = request[probe_key]
    probe.kind = "beacon"
    length = request.content_length
    if length is not None and length > battery.MAX_BEACON_BYTES:
        return _refuse_beacon(413, "beacon too large")
    try:
        # As the answer form: not for ever, and a client gone is logged.
        async with asyncio.timeout(request.app[config_key].http.body_timeout):
            body = await request.content.read(battery.MAX_BEACON_BYTES + 1)
    except TimeoutError:
        return _refuse_beacon(408, "beacon too slow")
    except (ConnectionError, HttpProcessingError):
        return _refuse_beacon(400, "beacon cut short")
    try:
        report = battery.parse_beacon(body)
    except battery.BadBeacon as e:
        return _refuse_beacon(400, f"not a beacon: {e}")
    probe.token = report.token
    probe.token_ok = request.app[verifier_key](report.token)
    if not probe.token_ok:
        return _refuse_beacon(400, "not a session of ours")
    probe.durable = True
    now = time.time()
    for name, seen in report.probes.items():
        probe.rows.append(
            (
                INSERT_BEACON,
                (
                    report.token,
                    now,
                    probe.addr,
                    report.final,
                    name,
                    seen.state,
                    seen.at,
                    seen.duration,
                    seen.dns,
                    seen.connect,
                ),
            )
        )
    return _no_store(web.Response(status=204))


@on_sites(IPV4)
async def submit(request: web.Request) -> web.StreamResponse:
    """An answer of any kind of page: validated, stored, then handed on to MTurk."""
    probe = request[probe_key]
    probe.kind = "submit"
    languages = request.app[templates_key].languages
    try:
        # A client may send its body as slowly as it likes: not for ever.
        async with asyncio.timeout(request.app[config_key].http.body_timeout):
            form = await request.post()
    except (ValueError, UnicodeDecodeError, HttpProcessingError, ConnectionError):
        # HttpProcessingError: a malformed multipart part; ConnectionError:
        # the client went away mid-body. Both were 500s with an ERROR
        # traceback, and the request was not logged (found by fuzzing).
        return _bad_request(request, Message(N_("the form could not be read")), "en")
    except RuntimeError:
        # aiohttp's body stream says "Connection closed." this way when the
        # connection was gone before the handler read the rest of the body
        # (the full-size fuzz, once in 20,000). Any other RuntimeError is ours.
        if request.transport is not None and not request.transport.is_closing():
            raise
        return _bad_request(request, Message(N_("the form could not be read")), "en")
    except TimeoutError:
        late = _bad_request(request, Message(N_("the form could not be read")), "en")
        late.set_status(408)
        return late
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    # Until the session is found, errors use the language the form says.
    language = survey.page_language(fields.get("lang"), languages)
    token = fields.get("token", "")
    if looks_like_token(token):
        probe.token = token
        probe.token_ok = request.app[verifier_key](token)
    if not probe.token_ok:
        return _bad_request(
            request,
            Message(N_("this survey session is not valid; please reload the page")),
            language,
        )
    async with request.app[reader_key].execute(
        "SELECT red_count, visit, assignment_id, turk_submit_to, survey, language"
        " FROM sessions WHERE token = ?",
        (token,),
    ) as cursor:
        session = await cursor.fetchone()
    if session is None:
        return _bad_request(
            request,
            Message(N_("this survey session is unknown; please reload the page")),
            language,
        )
    red_count, visit, assignment_id, turk_submit_to, kind, language = session
    if visit == "preview":
        return _bad_request(
            request,
            Message(N_("this is a preview of the HIT: accept the HIT on MTurk, then answer")),
            language,
        )
    config = request.app[config_key]
    now = time.time()
    try:
        if kind == "speedtest":
            for report in survey.parse_speedtests(fields, config.speedtest):
                probe.rows.append(
                    (
                        INSERT_SPEEDTEST,
                        (
                            token,
                            now,
                            probe.addr,
                            report.test,
                            report.name,
                            report.download_mbps,
                            report.upload_mbps,
                            report.share_url,
                        ),
                    )
                )
        elif kind == "tool":
            report_id = survey.parse_tool_report(fields, config.tool)
            probe.rows.append(
                (INSERT_TOOL_REPORT, (token, now, probe.addr, config.tool.name, report_id))
            )
        else:
            answer = survey.parse_answer(fields)
            probe.rows.append(
                (
                    INSERT_ANSWER,
                    (token, now, probe.addr, answer.red, answer.blue, answer.red == red_count),
                )
            )
    except survey.BadInput as e:
        # Nothing of an invalid answer is stored: its rows were never queued.
        return _bad_request(request, e.message, language)
    probe.durable = True
    site = None
    if visit == "accepted" and assignment_id and turk_submit_to:
        # Checked again: the session may predate a change of the allowed sites.
        worker_sites: tuple[str, ...] = request.app[worker_sites_key]
        site = survey.worker_site(turk_submit_to, worker_sites)
    if site is None:
        # The record middleware answers only once the rows are committed.
        return _page(request, "thanks.html", language)
    # A session may be answered more than once (the back button, a retry):
    # every answer is stored, the first counts in the reports, and so the
    # first is what MTurk gets, or review would judge another answer than
    # the one the reports count. So this answer is committed here, before
    # the hand-off, and the session's first answer is read back.
    rows, probe.rows = probe.rows, []
    try:
        await request.app[writer_key].write(rows)
    except Overloaded:
        return _unavailable("overloaded")
    except NotStored:
        return _unavailable("storage is not keeping up")
    return _page(
        request,
        "handoff.html",
        language,
        submit_url=survey.external_submit_url(site),
        assignment_id=assignment_id,
        # Everything but assignmentId becomes an answer in MTurk's
        # QuestionFormAnswers; the token lets review find the session.
        fields=[("token", token), *await _first_answer(request, token, kind)],
    )


async def _first_answer(request: web.Request, token: str, kind: str) -> list[tuple[str, str]]:
    """The session's first stored answer, as the hand-off form's fields."""
    reader = request.app[reader_key]
    fields: list[tuple[str, str]] = []
    if kind == "speedtest":
        # The first submission: its rows share the earliest t (as the views say).
        async with reader.execute(
            "SELECT test, download_mbps, upload_mbps, share_url FROM speedtest_reports"
            " WHERE session_token = ? AND t = (SELECT min(t) FROM speedtest_reports"
            " WHERE session_token = ?) ORDER BY id",
            (token, token),
        ) as cursor:
            for test, download, upload, share_url in await cursor.fetchall():
                fields += [
                    (f"download-{test}", survey.speed_text(download)),
                    (f"upload-{test}", survey.speed_text(upload)),
                ]
                if share_url:
                    fields.append((f"share-{test}", share_url))
    elif kind == "tool":
        async with reader.execute(
            "SELECT report FROM tool_reports WHERE session_token = ? ORDER BY id LIMIT 1",
            (token,),
        ) as cursor:
            fields += [("report", row[0]) for row in await cursor.fetchall()]
    else:
        async with reader.execute(
            "SELECT red_reported, blue_reported FROM answers WHERE session_token = ?"
            " ORDER BY id LIMIT 1",
            (token,),
        ) as cursor:
            for red, blue in await cursor.fetchall():
                fields += [("red", str(red)), ("blue", str(blue))]
    return fields


# -- every path ------------------------------------------------------------------


async def not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


async def expect(request: web.Request) -> None:
    """The Expect header: 100-continue as aiohttp does it, anything else 417.

    aiohttp's own handler echoes an unknown value into its 417, and a byte
    that is not UTF-8 there makes it fail with a 500 (found by fuzzing).
    """
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() == "100-continue":
        try:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except ConnectionError:
            return  # the client is gone: reading its body fails, and is logged
        request.writer.output_size = 0
        return
    raise web.HTTPExpectationFailed(text="417: unknown Expect\n")


# -- both sites ----------------------------------------------------------------


async def acme_challenge(request: web.Request) -> web.StreamResponse:
    """ACME HTTP-01: the key authorization certbot left in the webroot."""
    request[probe_key].kind = "acme"
    webroot = request.app[config_key].sites.acme_webroot
    body = None
    if webroot is not None:
        body = acme.read_http_challenge(
            request.app[config_key].resolve(webroot), request.match_info["token"]
        )
    if body is None:
        raise web.HTTPNotFound()
    return _no_store(web.Response(body=body, content_type="text/plain"))


# -- the request log -----------------------------------------------------------


def _request_row(request: web.Request, site: str, probe: Probe, status: int, size: int) -> Row:
    return (
        INSERT_REQUEST,
        (
            time.time(),
            site,
            probe.addr,
            probe.port,
            storable(request.method[:16]),
            storable(request.raw_path[:MAX_LOGGED_PATH]),
            probe.kind,
            probe.token,
            probe.token_ok,
            probe.ball,
            status,
            size,
            storable(request.headers.get("User-Agent", "")[:MAX_LOGGED_AGENT]),
        ),
    )


def _unavailable(reason: str) -> web.Response:
    # 503 means "not stored": the client may retry; nothing was acknowledged.
    response = web.Response(status=503, text=f"temporarily unavailable: {reason}\n")
    response.headers["Retry-After"] = "5"
    return _no_store(response)  # type: ignore[return-value]


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route by socket family, log the request, hold probes until stored."""
    site = site_of(request)
    probe = request[probe_key] = Probe(*peer(request))
    route_handler = request.match_info.handler
    allowed = getattr(route_handler, "sites", None)
    try:
        if (
            request.scheme == "http"
            and site in request.app[https_sites_key]
            and route_handler is not acme_challenge
        ):
            # The plain-HTTP socket of a TLS site: only ACME is served here.
            probe.kind = "redirect"
            raise web.HTTPPermanentRedirect(request.app[base_urls_key][site] + request.raw_path)
        if allowed is not None and site not in allowed:
            probe.kind = "wrong-site"
            raise web.HTTPMisdirectedRequest(text="421: this path is served on the other site\n")
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    body = getattr(response, "body", None)
    size = len(body) if isinstance(body, bytes | bytearray) else 0
    if request.method == "HEAD":
        size = 0  # aiohttp sends no body in answer to HEAD
    rows = [*probe.rows, _request_row(request, site, probe, response.status, size)]
    # Every response waits for its row, so a response means "logged". Only
    # successful probes turn into 503 when the row cannot be stored: they are
    # the measurement, and a 200 must mean that it was kept.
    metrics = request.app[metrics_key]
    try:
        await request.app[writer_key].write(rows)
    except Overloaded:
        if probe.durable and response.status < 400:
            metrics.request(site, probe.kind, 503)
            return _unavailable("overloaded")
    except NotStored:
        if probe.durable and response.status < 400:
            metrics.request(site, probe.kind, 503)
            return _unavailable("storage is not keeping up")
    metrics.request(site, probe.kind, response.status)
    if isinstance(response, web.HTTPException):
        raise response
    return response


# -- application -------------------------------------------------------------


async def _database(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    path = config.resolve(config.database.path)
    conn = await open_database(path, config.database.synchronous)
    writer = Writer(
        conn,
        queue_limit=config.database.queue_limit,
        batch_max=config.database.batch_max,
        commit_timeout=config.server.commit_timeout,
        observe_commit=app[metrics_key].commit_seconds.observe,
    )
    writer.start()
    reader = await open_reader(path)
    app[writer_key] = writer
    app[reader_key] = reader
    log.info("event=database_open path=%s", path)
    try:
        yield
    finally:
        await writer.close()
        await reader.close()
        await conn.close()
        log.info(
            "event=database_closed commits=%d rows=%d errors=%d",
            writer.stats.commits,
            writer.stats.rows,
            writer.stats.errors,
        )


async def _dns(app: web.Application) -> AsyncIterator[None]:
    """The DNS listeners: started after the writer they log to, stopped before it."""
    config = app[config_key]
    dns = app[dns_key]
    # Query rows may fill at most half the write queue; the rest is the probes'.
    await dns.start(app[writer_key], log_limit=config.database.queue_limit // 2)
    log.info("event=dns_started zones=%d", len(dns.responder.authority.zones))
    try:
        yield
    finally:
        await dns.stop()


def create_app(
    config: Config,
    secret: bytes,
    base_urls: dict[str, str],
    dns: DnsServer | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The public application; the same app serves both sites' sockets.

    ``dns``, when given, is started and stopped with the application, after
    the database writer it logs to.
    """
    app = web.Application(
        # track_requests first: a connection is busy (not evictable) for the
        # whole of its request, the wait for its row included.
        middlewares=[track_requests, record],
        client_max_size=config.server.max_body,
    )
    app[config_key] = config
    app[metrics_key] = metrics or Metrics()
    app[reload_hooks_key] = []
    app[https_sites_key] = frozenset(
        name
        for name, site in ((IPV4, config.sites.ipv4), (IPV6, config.sites.ipv6))
        if site.tls_cert is not None
    )
    app[base_urls_key] = base_urls
    # The literal probe defaults to the IPv6 site's own URL when that is a
    # literal (tests, the demo); the config checked that it then is.
    literal = config.battery.literal_url or base_urls[IPV6]
    app[battery_bases_key] = {**base_urls, "literal": literal}
    worker_sites = (*survey.MTURK_WORKER_SITES, *config.mturk.rehearsal_worker_sites)
    app[worker_sites_key] = worker_sites
    app[csp_key] = content_security_policy(worker_sites)
    if config.mturk.rehearsal_worker_sites:
        log.warning(
            "event=rehearsal_worker_sites sites=%s (answers may be handed to these)",
            ",".join(config.mturk.rehearsal_worker_sites),
        )
    app[secret_key] = secret
    app[verifier_key] = TokenVerifier(secret)
    app[templates_key] = Pages()
    app.cleanup_ctx.append(_database)
    if dns is not None:
        app[dns_key] = dns
        app.cleanup_ctx.append(_dns)
    app.router.add_get("/", survey_page, expect_handler=expect)
    app.router.add_post("/submit", submit, expect_handler=expect)
    app.router.add_get(r"/red/{token}/{ball}.png", red_ball, expect_handler=expect)
    app.router.add_get(r"/blue/{token}/{ball}.png", blue_ball, expect_handler=expect)
    app.router.add_get(r"/ds/{token}.png", dual_stack_probe, expect_handler=expect)
    app.router.add_get(r"/v6ns/{token}.png", v6ns_probe, expect_handler=expect)
    app.router.add_get(r"/literal/{token}.png", literal_probe, expect_handler=expect)
    app.router.add_get(r"/mtu/{token}/large.png", large_probe, expect_handler=expect)
    app.router.add_get(r"/mtu/{token}/ok.png", large_probe_done, expect_handler=expect)
    app.router.add_get(battery.SCRIPT_PATH, battery_script, expect_handler=expect)
    app.router.add_post(battery.BEACON_PATH, beacon, expect_handler=expect)
    app.router.add_get("/.well-known/acme-challenge/{token}", acme_challenge, expect_handler=expect)
    # Last: every other path, any method, is ours to answer 404 (routes added
    # after this one are never reached). aiohttp's own 404 route would use
    # its default Expect handler.
    # [\s\S]: a decoded path may hold a newline, which "." does not match.
    app.router.add_route("*", r"/{path:[\s\S]*}", not_found, expect_handler=expect)
    return app
