"""The ball-counting survey, apart from HTTP: visits, sessions, answers.

Plain functions and dataclasses; the views in :mod:`probe_server.web` call
them and turn their errors into 4xx responses.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

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


class BadInput(ValueError):
    """A request parameter is malformed; the message is safe to show."""


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


def parse_visit(
    query: Mapping[str, str],
    default_batch: str = "",
    worker_sites: Collection[str] = MTURK_WORKER_SITES,
) -> Visit:
    """Classify a survey visit from MTurk's query parameters.

    MTurk appends assignmentId, hitId, workerId and turkSubmitTo to the
    ExternalURL; in a preview assignmentId is ASSIGNMENT_ID_NOT_AVAILABLE and
    there is no workerId. Without assignmentId the visit is direct (the demo,
    a test, a link shared outside MTurk). turkSubmitTo must name one of
    ``worker_sites`` and is kept as that site's canonical origin.
    """
    values: dict[str, str | None] = {}
    for name in ("assignmentId", "hitId", "workerId"):
        value = query.get(name)
        if value is not None and not _ID.fullmatch(value):
            raise BadInput(f"{name} is malformed")
        values[name] = value
    submit_to = query.get("turkSubmitTo")
    if submit_to is not None:
        submit_to = worker_site(submit_to, worker_sites)
        if submit_to is None:
            raise BadInput("turkSubmitTo is not an MTurk worker site")
    batch = query.get("batch", default_batch)
    if batch and not _BATCH.fullmatch(batch):
        raise BadInput("batch is malformed")
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
    )


def draw_counts(low: int, high: int) -> tuple[int, int]:
    """Red and blue counts, each uniform in ``low..high`` (the paper: 1-4)."""
    span = high - low + 1
    return low + secrets.randbelow(span), low + secrets.randbelow(span)


@dataclass(frozen=True, slots=True)
class Answer:
    red: int
    blue: int


def parse_count(form: Mapping[str, str], name: str) -> int:
    raw = form.get(name)
    if raw is None or not raw.strip():
        raise BadInput(f"please enter the number of {name} balls")
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 2:
        raise BadInput(f"the number of {name} balls must be a whole number from 0 to {MAX_COUNT}")
    return int(raw)


def parse_answer(form: Mapping[str, str]) -> Answer:
    return Answer(red=parse_count(form, "red"), blue=parse_count(form, "blue"))


def ball_urls(base_url: str, colour: str, token: str, count: int, ipv4: str) -> list[str]:
    """Probe image URLs tagged with session token and ball index.

    The ``ip`` parameter repeats the IPv4 address as the survey saw it, as
    the paper's ``img.php?1.2.3.4`` URLs did, so logs read the same way.
    """
    return [f"{base_url}/{colour}/{token}/{i}.png?ip={ipv4}" for i in range(1, count + 1)]
