"""The experiment file: a TOML description of the HITs and their batches.

Every key is documented in ``deploy/experiment.example.toml``. A bad file is
reported as one line naming the key, before anything is sent to MTurk.
Relative paths are taken relative to the file's own directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import describe_error, is_rehearsal_host
from ..i18n import SOURCE_LANGUAGE, languages

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# MTurk's CurrencyAmount is a decimal string; rewards are whole cents.
REWARD = re.compile(r"(0|[1-9][0-9]{0,3})\.[0-9]{2}")
COUNTRY = re.compile(r"[A-Z]{2}")
# CreateHIT accepts at most 10 QualificationRequirements.
MAX_REQUIREMENTS = 10

ActionsGuarded = Literal["Accept", "PreviewAndAccept", "DiscoverPreviewAndAccept"]
# The paper's three experiments: count the balls (§3.3), report web speed
# tests (§3.1), run a measurement tool (§3.2).
Kind = Literal["balls", "speedtest", "tool"]
# The ExternalURL's own parameters, which the survey page reads.
SURVEY_PARAM, LANGUAGE_PARAM = "survey", "lang"


class ExperimentError(Exception):
    """The experiment file is unusable; the message is one line naming the key."""


def _name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError("use 1-64 letters, digits, '_', '.' or '-'")
    return value


def _reward(value: str) -> str:
    if not isinstance(value, str) or not REWARD.fullmatch(value):
        raise ValueError('write the reward in dollars as a string with cents, e.g. "0.05"')
    if Decimal(value) < Decimal("0.01"):
        raise ValueError("the reward must be at least 0.01 (MTurk's minimum)")
    return value


def _country(value: str) -> str:
    if not COUNTRY.fullmatch(value):
        raise ValueError(f"{value!r} is not an ISO 3166 alpha-2 country code such as 'US'")
    return value


def _external_url(value: str) -> str:
    parts = urlsplit(value)
    if not parts.netloc or parts.fragment:
        raise ValueError(f"expected an absolute URL without a fragment, got {value!r}")
    # MTurk requires HTTPS. Plain http is let through for a rehearsal's own
    # hosts only (loopback, the namespace lab's addresses and .test names),
    # so a rehearsal against `probe-server fake-mturk` needs no certificate;
    # the real MTurk refuses such a URL when the HIT is created.
    if parts.scheme != "https" and not (
        parts.scheme == "http" and is_rehearsal_host(parts.hostname)
    ):
        raise ValueError("MTurk needs an https:// URL (http:// only for a local rehearsal)")
    return value


def _language(value: str) -> str:
    shipped = languages()
    if value not in shipped:
        raise ValueError(f"{value!r} has no catalogue; shipped languages: {', '.join(shipped)}")
    return value


Name = Annotated[str, AfterValidator(_name)]
Language = Annotated[str, AfterValidator(_language)]
Reward = Annotated[str, AfterValidator(_reward)]
Country = Annotated[str, AfterValidator(_country)]
ExternalUrl = Annotated[str, AfterValidator(_external_url)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Batch(_Model):
    """HITs with one reward, one set of countries and one worker pool."""

    name: Name
    reward: Reward
    # Assignments across the batch: one HIT of this many, or several HITs of
    # at most 9 when published with --split.
    assignments: int = Field(ge=1, le=100_000)
    # Worker_Locale: workers in one of these countries (none: anywhere).
    countries: tuple[Country, ...] = ()
    # PercentAssignmentsApproved at least this (none: no requirement).
    min_approval_rate: int | None = Field(default=None, ge=0, le=100)
    # NumberHITsApproved at least this (none: no requirement).
    min_approved_hits: int | None = Field(default=None, ge=0)
    # Keep out workers who took part in any other batch of this experiment.
    exclude_other_batches: bool = False
    # The survey page's language (a catalogue in probe_server/locale).
    language: Language = SOURCE_LANGUAGE
    # What workers see in MTurk's list for this batch, in its language
    # (default: the experiment's title and description).
    title: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, min_length=1, max_length=2000)

    @property
    def reward_amount(self) -> Decimal:
        return Decimal(self.reward)


class Experiment(_Model):
    name: Name
    # Which survey page the HITs show: "balls", "speedtest" or "tool".
    kind: Kind = "balls"
    title: str = Field(min_length=1, max_length=128)
    description: str = Field(min_length=1, max_length=2000)
    keywords: tuple[str, ...] = ()
    external_url: ExternalUrl
    # Height of MTurk's frame around the page in pixels; 0 fits the window.
    frame_height: int = Field(default=0, ge=0, le=10_000)
    # How long a worker has to finish once they accept.
    assignment_duration: timedelta = Field(default=timedelta(minutes=10))
    # How long the HITs stay assignable.
    lifetime: timedelta = Field(default=timedelta(days=1))
    # When MTurk approves a submitted assignment that was not reviewed.
    auto_approval_delay: timedelta = Field(default=timedelta(days=3))
    # What workers who do not meet a requirement cannot do.
    actions_guarded: ActionsGuarded = "Accept"
    # The probe server's database (sessions, and the batches/HITs recorded here).
    database: Path = Path("probe.db")
    batches: tuple[Batch, ...] = Field(min_length=1)
    source: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        for field, low, high in (
            ("assignment_duration", timedelta(seconds=30), timedelta(days=365)),
            ("lifetime", timedelta(seconds=30), timedelta(days=365)),
            ("auto_approval_delay", timedelta(0), timedelta(days=30)),
        ):
            value: timedelta = getattr(self, field)
            if not low <= value <= high:
                raise ValueError(f"{field}: must be between {low} and {high}")
        if len(",".join(self.keywords)) > 1000:
            raise ValueError("keywords: at most 1000 characters in all")
        names = [batch.name for batch in self.batches]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"batches: the name {name!r} is used twice")
        for batch in self.batches:
            count = len(self.requirement_sources(batch, split=True))
            if count > MAX_REQUIREMENTS:
                raise ValueError(
                    f"batches: {batch.name!r} would need {count} qualification requirements;"
                    f" MTurk allows {MAX_REQUIREMENTS} (too many batches to exclude)"
                )
        return self

    def requirement_sources(self, batch: Batch, *, split: bool) -> list[str]:
        """What each qualification requirement of the batch's HITs is for."""
        sources = []
        if batch.countries:
            sources.append("countries")
        if batch.min_approval_rate is not None:
            sources.append("min_approval_rate")
        if batch.min_approved_hits is not None:
            sources.append("min_approved_hits")
        # A split batch keeps its own workers to one HIT of it.
        if split:
            sources.append(f"exclude:{batch.name}")
        if batch.exclude_other_batches:
            sources.extend(f"exclude:{b.name}" for b in self.batches if b.name != batch.name)
        return sources

    def survey_url(self, batch: Batch) -> str:
        """The batch's ExternalURL: external_url with its kind and language.

        Only what differs from the defaults (balls, English) is added, so a
        ball-counting experiment in English keeps its URL as written.
        """
        extra: list[tuple[str, str]] = []
        if self.kind != "balls":
            extra.append((SURVEY_PARAM, self.kind))
        if batch.language != SOURCE_LANGUAGE:
            extra.append((LANGUAGE_PARAM, batch.language))
        if not extra:
            return self.external_url
        parts = urlsplit(self.external_url)
        query = [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k not in (SURVEY_PARAM, LANGUAGE_PARAM)
        ]
        return urlunsplit(parts._replace(query=urlencode([*query, *extra])))

    def title_of(self, batch: Batch) -> str:
        return batch.title or self.title

    def description_of(self, batch: Batch) -> str:
        return batch.description or self.description

    def batch(self, name: str) -> Batch:
        for batch in self.batches:
            if batch.name == name:
                return batch
        raise KeyError(name)

    def resolve(self, path: Path) -> Path:
        path = path.expanduser()
        if path.is_absolute() or self.source is None:
            return path
        return self.source.parent / path


def load_experiment(path: str | os.PathLike[str]) -> Experiment:
    """Read and validate an experiment file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such file") from None
    except OSError as e:
        raise ExperimentError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: not valid TOML: {e}") from None
    if "source" in data:
        raise ExperimentError(f"{path}: source: unknown key")
    try:
        return Experiment.model_validate({**data, "source": path.resolve()})
    except ValidationError as e:
        raise ExperimentError(describe_error(e, f"{path}: ")) from None
