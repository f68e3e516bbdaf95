"""The measurement battery: test-ipv6.com's and APNIC Labs' probes on the ball page.

The paper asks one question of a worker's browser: does the IPv6-only blue
ball load? The battery asks the others that test-ipv6.com (falling-sky) and
APNIC Labs ask, each with an image nobody sees (one transparent pixel, off
the counted box), so the worker's task does not change:

- ``ds``: a dual-stack name. The site it arrives on is the family the
  browser chose (IPv6-preferred?); if it never arrives while the red balls
  did, dual stack is broken for that worker.
- ``literal``: the IPv6 site by its address literal. It loads where IPv6
  works but the IPv6-only name does not resolve (a resolver that drops AAAA).
- ``mtu``: a response of full-size packets over IPv6 (path-MTU black holes).
  It is a redirect whose header block alone is padded past
  :data:`LARGE_RESPONSE_BYTES`: the browser can follow it only once it has
  every byte, so the small image it leads to (``mtu-ok``) arrives only when
  large packets got through. The server sees the outcome without JavaScript.
- ``v6ns``: a dual-stack name in a zone whose only name server is IPv6-only.
  It resolves only when the worker's resolver reaches DNS over IPv6.

With session labels (``battery.labels``), probe host names begin with the
session's label (``<label>.v6.example.org``): our DNS log then shows which
resolvers asked for each session's names, and over which family. The label
is a keyed hash of the token (:func:`tokens.session_label`), never the token
itself: host names are seen by every resolver on the way and sent in clear
in TLS's SNI, and the token is what ``/submit`` and ``/beacon`` accept. The
label says nothing about the worker and is accepted nowhere.

Everything here is plain functions and data; :mod:`probe_server.web` serves
it. The replies are fixed bytes, so a leaner server can send the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .config import BatteryConfig
from .tokens import looks_like_token

# Every probe a beacon may report: the paper's two (red balls over IPv4,
# blue balls over IPv6) and the battery's four.
PROBES = ("ipv4", "ipv6", "ds", "literal", "mtu", "v6ns")
# The request kinds (``requests.kind``) that the battery adds.
KINDS = ("ds", "literal", "mtu", "mtu-ok", "v6ns", "beacon", "script")

# test-ipv6.com pads its large-packet test to about 1600 bytes: more than a
# 1280-byte path (IPv6's minimum MTU) carries in one packet, so it needs the
# full-size packets a black hole drops.
LARGE_RESPONSE_BYTES = 1600
LARGE_PADDING = "x" * LARGE_RESPONSE_BYTES
# Relative to /mtu/{token}/large.png: /mtu/{token}/ok.png.
LARGE_REDIRECT = "ok.png"

# The beacon: a small JSON document; anything larger is refused unread.
MAX_BEACON_BYTES = 4096
BEACON_PATH = "/beacon"
SCRIPT_PATH = "/battery.js"


@dataclass(frozen=True, slots=True)
class PageProbe:
    """One hidden probe image of a page."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class Page:
    """What the battery puts on one ball page."""

    red_base: str
    blue_base: str
    probes: tuple[PageProbe, ...]
    labels: tuple[str, ...]
    beacon: bool
    beacon_timeout_ms: int
    # The v6ns probe's host name below the session label, lower case and
    # without the trailing dot ("ds.v6ns.example.org"), for the DNS join.
    v6ns_host: str | None
    # The session label its labelled host names carry (None: no labels).
    label: str | None = None

    @property
    def active(self) -> bool:
        """False for the paper's page: no probe, no label, no beacon."""
        return bool(self.probes or self.labels or self.beacon)

    @property
    def names(self) -> tuple[str, ...]:
        """Every probe on the page, the paper's two first."""
        return ("ipv4", "ipv6", *(probe.name for probe in self.probes))


def labelled(base_url: str, label: str) -> str:
    """``base_url`` with ``label`` as the first label of its host name."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(netloc=f"{label}.{parts.netloc}"))


def host_of(base_url: str) -> str:
    return (urlsplit(base_url).hostname or "").lower().rstrip(".")


def page(config: BatteryConfig, base_urls: dict[str, str], token: str, label: str) -> Page:
    """The battery's part of one page: ball bases (labelled or not) and probes.

    ``base_urls`` has the sites' URLs ("ipv4", "ipv6") and the literal's
    ("literal"), as the server resolved them at start. ``token`` goes into
    the probes' paths, ``label`` (the session's DNS label) into the host
    names that ``battery.labels`` lists.
    """
    labels = config.labels

    def base(name: str, url: str) -> str:
        return labelled(url, label) if name in labels else url

    red_base = base("ipv4", base_urls["ipv4"])
    blue_base = base("ipv6", base_urls["ipv6"])
    probes: list[PageProbe] = []
    v6ns_host = None
    for name in config.probes:
        if name == "ds":
            assert config.ds_url is not None  # the config checked
            probes.append(PageProbe(name, f"{base('ds', config.ds_url)}/ds/{token}.png"))
        elif name == "literal":
            literal = config.literal_url or base_urls["literal"]
            probes.append(PageProbe(name, f"{literal}/literal/{token}.png"))
        elif name == "mtu":
            probes.append(PageProbe(name, f"{blue_base}/mtu/{token}/large.png"))
        else:
            assert config.v6ns_url is not None
            v6ns_host = host_of(config.v6ns_url)
            probes.append(PageProbe(name, f"{base('v6ns', config.v6ns_url)}/v6ns/{token}.png"))
    return Page(
        red_base=red_base,
        blue_base=blue_base,
        probes=tuple(probes),
        labels=tuple(labels),
        beacon=config.beacon,
        beacon_timeout_ms=math.ceil(config.beacon_timeout * 1000),
        v6ns_host=v6ns_host,
        label=label if labels else None,
    )


# -- the beacon ------------------------------------------------------------------


class BadBeacon(ValueError):
    """A beacon that is not ours or not well formed."""


def _token(value: str) -> str:
    if not looks_like_token(value):
        raise ValueError("not a session token")
    return value


# Milliseconds since the page's navigation started; an hour at most.
Millis = Annotated[float, Field(ge=0, le=3_600_000, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ProbeReport(_Strict):
    """What the page saw of one probe.

    ``state``: ``loaded``; ``failed`` (an error event); ``timeout`` (still
    loading after ``battery.beacon_timeout``); ``pending`` (still loading when
    the page was closed, before that timeout). ``at`` is when it settled
    (Resource Timing's responseEnd for a loaded probe where the browser gives
    it, else when the page saw it), or when the report was made; the rest
    come from Resource Timing when the browser gives them.
    """

    state: Literal["loaded", "failed", "timeout", "pending"]
    at: Millis | None = None
    duration: Millis | None = None
    dns: Millis | None = None
    connect: Millis | None = None


class Beacon(_Strict):
    token: Annotated[str, AfterValidator(_token)]
    # True when every probe had settled or timed out; False when the page was
    # closed first.
    final: bool
    probes: dict[Literal["ipv4", "ipv6", "ds", "literal", "mtu", "v6ns"], ProbeReport] = Field(
        max_length=len(PROBES)
    )


def parse_beacon(body: bytes) -> Beacon:
    """Validate a beacon's JSON body (pydantic: types, bounds, no extra keys)."""
    if len(body) > MAX_BEACON_BYTES:
        raise BadBeacon(f"larger than {MAX_BEACON_BYTES} bytes")
    try:
        return Beacon.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadBeacon(f"{where}: {first['msg']}") from None
