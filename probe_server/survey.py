"""The survey pages, apart from HTTP: visits, sessions, answers.

Three kinds of page (the paper's three experiments): ``balls`` (count the
red and blue balls, §3.3), ``speedtest`` (run web speed tests and report
their speeds and share links, §3.1) and ``tool`` (run a measurement tool
and report its report id, §3.2). Plain functions and dataclasses; the views
in :mod:`probe_server.web` call them and turn their errors into 4xx
responses, in the page's language.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import SpeedTest, SpeedTestConfig, ToolConfig
from .i18n import N_, SOURCE_LANGUAGE, Message

# MTurk shows a HIT's preview with this assignment id; the worker has not
# accepted the HIT and cannot submit it.
PREVIEW_ASSIGNMENT = "ASSIGNMENT_ID_NOT_AVAILABLE"
MTURK_PARAMS = ("assignmentId", "hitId", "workerId", "turkSubmitTo")
# MTurk's worker sites as turkSubmitTo names them: production (the classic
# and the newer host) and the sandbox. The answer page posts to
# {turkSubmitTo}/mturk/externalSubmit, so no other value may ever be used:
# the page would become an open redirect.
MTURK_WORKER_SITES = (
    "https://www.mturk.com",
    "https://worker.mturk.com",
    "https://workersandbox.mturk.com",
)
# Sites that show the survey in their frame: the worker sites, and the
# requester sites where a requester previews their own HIT.
MTURK_FRAMING_SITES = (
    *MTURK_WORKER_SITES,
    "https://requester.mturk.com",
    "https://requestersandbox.mturk.com",
)
EXTERNAL_SUBMIT_PATH = "/mturk/externalSubmit"

_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_BATCH = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_COUNT = 99
SURVEYS = ("balls", "speedtest", "tool")
# A speed as a worker copies it: digits, and a decimal point or comma (the
# decimal separator of Turkish and many other languages); no thousands.
_SPEED = re.compile(r"([0-9]{1,7})(?:[.,]([0-9]{1,3}))?")
MAX_SHARE_URL = 500
MAX_REPORT = 200


class BadInput(ValueError):
    """A request parameter is malformed; the message is safe to show.

    ``str()`` is the English text; ``message`` is what the page shows,
    translated into its language.
    """

    def __init__(self, text: str, **params: Any) -> None:
        super().__init__(text % params if params else text)
        self.message = Message(text, params)


@functools.lru_cache(maxsize=65536)
def canonical_address(host: str) -> str:
    """Normalise a peer address: IPv4-mapped IPv6 becomes IPv4, zone ids go."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True, slots=True)
class Visit:
    """Who opened the survey: an MTurk preview, an accepted assignment, or direct."""

    kind: str
    assignment_id: str | None = None
    hit_id: str | None = None
    worker_id: str | None = None
    turk_submit_to: str | None = None
    batch: str = ""
    survey: str = "balls"
    language: str = SOURCE_LANGUAGE

    @property
    def preview(self) -> bool:
        return self.kind == "preview"


def worker_site(value: str, allowed: Collection[str] = MTURK_WORKER_SITES) -> str | None:
    """The allowed origin that ``value`` names exactly, else None.

    An exact comparison (letter case and one trailing slash aside), never a
    prefix or suffix match: ``https://www.mturk.com.example``,
    ``https://www.mturk.com@example.org`` and ``//example.org`` are refused.
    The caller uses the returned constant, never the raw parameter.
    """
    candidate = (value[:-1] if value.endswith("/") else value).lower()
    for origin in allowed:
        if candidate == origin:
            return origin
    return None


def external_submit_url(site: str) -> str:
    """Where the answers go: MTurk's externalSubmit on the worker's site."""
    return site + EXTERNAL_SUBMIT_PATH


def page_language(value: str | None, languages: Collection[str]) -> str:
    """The language a page asks for, if shipped; else English (for error pages)."""
    return value if value is not None and value in languages else SOURCE_LANGUAGE


def parse_visit(
    query: Mapping[str, str],
    default_batch: str = "",
    worker_sites: Collection[str] = MTURK_WORKER_SITES,
    languages: Collection[str] = (SOURCE_LANGUAGE,),
) -> Visit:
    """Classify a survey visit from MTurk's query parameters.

    MTurk appends assignmentId, hitId, workerId and turkSubmitTo to the
    ExternalURL; in a preview assignmentId is ASSIGNMENT_ID_NOT_AVAILABLE and
    there is no workerId. Without assignmentId the visit is direct (the demo,
    a test, a link shared outside MTurk). turkSubmitTo must name one of
    ``worker_sites`` and is kept as that site's canonical origin. The
    experiment's own parameters, which ``hits publish`` puts in the
    ExternalURL: ``survey`` (the kind of page, default balls) and ``lang``
    (one of ``languages``, default English).
    """
    values: dict[str, str | None] = {}
    for name in ("assignmentId", "hitId", "workerId"):
        value = query.get(name)
        if value is not None and not _ID.fullmatch(value):
            raise BadInput(N_("%(name)s is malformed"), name=name)
        values[name] = value
    submit_to = query.get("turkSubmitTo")
    if submit_to is not None:
        submit_to = worker_site(submit_to, worker_sites)
        if submit_to is None:
            raise BadInput(N_("turkSubmitTo is not an MTurk worker site"))
    batch = query.get("batch", default_batch)
    if batch and not _BATCH.fullmatch(batch):
        raise BadInput(N_("batch is malformed"))
    survey = query.get("survey", "balls")
    if survey not in SURVEYS:
        raise BadInput(N_("there is no survey of this kind"))
    language = query.get("lang", SOURCE_LANGUAGE)
    if language not in languages:
        raise BadInput(N_("this survey is not available in that language"))
    assignment = values["assignmentId"]
    if assignment is None:
        kind = "direct"
    elif assignment == PREVIEW_ASSIGNMENT:
        kind = "preview"
    else:
        kind = "accepted"
    return Visit(
        kind=kind,
        assignment_id=assignment,
        hit_id=values["hitId"],
        worker_id=values["workerId"] if kind != "preview" else None,
        turk_submit_to=submit_to,
        batch=batch,
        survey=survey,
        language=language,
    )


def draw_counts(low: int, high: int) -> tuple[int, int]:
    """Red and blue counts, each uniform in ``low..high`` (the paper: 1-4)."""
    span = high - low + 1
    return low + secrets.randbelow(span), low + secrets.randbelow(span)


@dataclass(frozen=True, slots=True)
class Answer:
    red: int
    blue: int


# Separate sentences per colour: a translation can then put each word where
# its grammar wants it.
_COUNT_MISSING = {
    "red": N_("Please enter the number of red balls."),
    "blue": N_("Please enter the number of blue balls."),
}
_COUNT_BAD = {
    "red": N_("The number of red balls must be a whole number from 0 to %(max)d."),
    "blue": N_("The number of blue balls must be a whole number from 0 to %(max)d."),
}


def parse_count(form: Mapping[str, str], name: str) -> int:
    raw = form.get(name)
    if raw is None or not raw.strip():
        raise BadInput(_COUNT_MISSING[name])
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 2:
        raise BadInput(_COUNT_BAD[name], max=MAX_COUNT)
    return int(raw)


def parse_answer(form: Mapping[str, str]) -> Answer:
    return Answer(red=parse_count(form, "red"), blue=parse_count(form, "blue"))


def ball_urls(base_url: str, colour: str, token: str, count: int, ipv4: str) -> list[str]:
    """Probe image URLs tagged with session token and ball index.

    The ``ip`` parameter repeats the IPv4 address as the survey saw it, as
    the paper's ``img.php?1.2.3.4`` URLs did, so logs read the same way.
    """
    return [f"{base_url}/{colour}/{token}/{i}.png?ip={ipv4}" for i in range(1, count + 1)]


# -- the speedtest page ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeedReport:
    """What a worker reported for one speed test."""

    test: str
    name: str
    download_mbps: float
    upload_mbps: float
    share_url: str | None


def field_names(test: SpeedTest) -> tuple[str, str, str]:
    """The form fields of a test: download, upload and share link."""
    return f"download-{test.id}", f"upload-{test.id}", f"share-{test.id}"


_SPEED_MISSING = {
    "download": N_("Please enter the download speed that %(test)s showed, in Mbit/s."),
    "upload": N_("Please enter the upload speed that %(test)s showed, in Mbit/s."),
}
_SPEED_BAD = {
    "download": N_(
        "The download speed of %(test)s must be a number from %(min)s to %(max)s Mbit/s,"
        " such as 94.5."
    ),
    "upload": N_(
        "The upload speed of %(test)s must be a number from %(min)s to %(max)s Mbit/s,"
        " such as 11.8."
    ),
}


def speed_text(value: float) -> str:
    """A speed as the pages show it and the hand-off sends it: 94.5, 10, 0.05.

    Never an exponent (``f"{1234567.0:g}"`` is ``1.23457e+06``): the value
    has at most three decimals, as the form accepts them.
    """
    return f"{value:.3f}".rstrip("0").rstrip(".")


def parse_speed(raw: str | None, direction: str, test: SpeedTest, low: float, high: float) -> float:
    """A speed in Mbit/s as the worker typed it ("94.5" or "94,5"), from low to high."""
    raw = (raw or "").strip()
    if not raw:
        raise BadInput(_SPEED_MISSING[direction], test=test.name)
    bad = BadInput(_SPEED_BAD[direction], test=test.name, min=speed_text(low), max=speed_text(high))
    match = _SPEED.fullmatch(raw) if raw.isascii() else None
    if match is None:
        raise bad
    value = float(f"{match.group(1)}.{match.group(2) or '0'}")
    if not low <= value <= high:
        raise bad
    return value


def share_link(raw: str | None, test: SpeedTest) -> str | None:
    """The test's "share results" link, if given: https, on one of its hosts.

    The link is parsed, never fetched. Its host must be exactly one of the
    test's share_hosts, with no user name, password or port: a link to
    any other site (or one that merely contains the host's name) is refused.
    A test that requires it (``share_required``, by default any test with
    share_hosts) refuses a report without one.
    """
    raw = (raw or "").strip()
    if not test.share_hosts:
        return None
    if not raw:
        if test.requires_share:
            raise BadInput(
                N_("Please paste the link to share the result that %(test)s gave you."),
                test=test.name,
            )
        return None
    bad = BadInput(
        N_("The share link of %(test)s must be an https:// link on %(hosts)s."),
        test=test.name,
        hosts=", ".join(test.share_hosts),
    )
    if len(raw) > MAX_SHARE_URL or not raw.isascii() or any(c.isspace() for c in raw):
        raise bad
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise bad from None
    host = (parts.hostname or "").rstrip(".")
    if (
        parts.scheme.lower() != "https"
        or parts.username is not None
        or parts.password is not None
        or port not in (None, 443)
        or host not in test.share_hosts
        or "\\" in raw
    ):
        raise bad
    return raw


def parse_speedtests(form: Mapping[str, str], config: SpeedTestConfig) -> list[SpeedReport]:
    """Every configured test's speeds and share link; the first problem raises."""
    reports = []
    for test in config.tests:
        download, upload, share = field_names(test)
        reports.append(
            SpeedReport(
                test=test.id,
                name=test.name,
                download_mbps=parse_speed(
                    form.get(download), "download", test, config.min_mbps, config.max_mbps
                ),
                upload_mbps=parse_speed(
                    form.get(upload), "upload", test, config.min_mbps, config.max_mbps
                ),
                share_url=share_link(form.get(share), test),
            )
        )
    return reports


# -- the tool page -----------------------------------------------------------------


def parse_tool_report(form: Mapping[str, str], config: ToolConfig) -> str:
    """The tool's report id or URL, matched in full against the configured pattern."""
    raw = (form.get("report") or "").strip()
    if not raw:
        raise BadInput(N_("Please paste the report id that %(tool)s showed."), tool=config.name)
    if len(raw) > MAX_REPORT or not re.fullmatch(config.report_pattern, raw):
        raise BadInput(
            N_("This does not look like a report id of %(tool)s. It looks like this: %(example)s"),
            tool=config.name,
            example=config.report_example,
        )
    if is_example(raw, config.report_example):
        # The example matches the pattern by design (the config checks it).
        raise BadInput(
            N_(
                "This is the example from this page. Please paste the report id that %(tool)s"
                " showed you when you ran it."
            ),
            tool=config.name,
        )
    return raw


def is_example(report: str, example: str) -> bool:
    """The report is the example, or the example's id without its prefix.

    ``1234567`` is the id of ``...report.php?sessionid=1234567``: both match
    the default pattern, and neither is a worker's own report.
    """
    if report == example:
        return True
    cut = len(example) - len(report)
    return cut > 0 and example.endswith(report) and not example[cut - 1].isalnum()
