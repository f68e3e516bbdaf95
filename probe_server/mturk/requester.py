"""The requester workflow over aioboto3: publish, status, sync, review, expire, balance.

What was asked of MTurk and what it answered goes into the probe server's
SQLite database (``batches``, ``hits``, ``assignments`` and the tables of
``0005_mturk.sql``), so the reports join sessions to batches by hitId and a
second run of any command picks up where the first stopped.

Credentials come from botocore's standard chain (environment, shared files,
instance roles); nothing here prints or logs them. Every operation talks to
the sandbox unless the :class:`Target` says live.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aioboto3
import aiosqlite
from babel.support import NullTranslations
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from tqdm import tqdm

from ..i18n import N_, SOURCE_LANGUAGE, Message, languages, load_translations
from ..store import open_database
from . import fees
from .experiment import Batch, Experiment
from .questions import BadXML, external_question, parse_answers
from .target import REGION, RequesterError, Target

log = logging.getLogger(__name__)

WORKER_PREVIEW = {
    True: "https://workersandbox.mturk.com/mturk/preview?groupId=",
    False: "https://worker.mturk.com/mturk/preview?groupId=",
}
WORKER_LOCALE = "00000000000000000071"
PERCENT_APPROVED = "000000000000000000L0"
HITS_APPROVED = "00000000000000000040"
# update_expiration_for_hit with a time in the past expires a HIT at once.
LONG_AGO = datetime(2015, 1, 1, tzinfo=UTC)
LISTED_STATUSES = ["Submitted", "Approved", "Rejected"]
HIT_ID = re.compile(r"\b(?=[A-Z0-9]*[A-Z])[A-Z0-9]{20,64}\b")
MAX_FEEDBACK = 1024
MAX_ANSWER_ERROR = 500


@asynccontextmanager
async def mturk_client(target: Target, *, attempts: int = 5) -> AsyncIterator[Any]:
    """An aioboto3 MTurk client for the target, credentials from the standard chain.

    ``attempts``: tries per call, with botocore's standard backoff between them.
    """
    session = aioboto3.Session(profile_name=target.profile)
    config = BotoConfig(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    async with session.client(
        "mturk", region_name=REGION, endpoint_url=target.url, config=config
    ) as client:
        yield client


def _t(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _error_message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", error))


def _turk_code(error: ClientError) -> str:
    return str(error.response.get("TurkErrorCode", ""))


def request_token(experiment: str, batch: str, index: int) -> str:
    """The UniqueRequestToken of a batch's n-th HIT: the same on every run."""
    digest = hashlib.sha256(f"probe-server\0{experiment}\0{batch}\0{index}".encode()).hexdigest()
    return f"ps-{digest[:48]}"


def qualification_name(experiment: str, batch: str) -> str:
    return f"probe-server {experiment}/{batch}: took part"


# -- plans and results -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    batch: Batch
    # Assignments of every HIT of the batch, published or not.
    hit_sizes: tuple[int, ...]
    # How many of them are already published (recorded in the database).
    published: int = 0

    @property
    def new_sizes(self) -> tuple[int, ...]:
        return self.hit_sizes[self.published :]

    @property
    def split(self) -> bool:
        return len(self.hit_sizes) > 1

    @property
    def cost(self) -> fees.Cost:
        """What the HITs still to be published would cost, every assignment approved."""
        return fees.hits_cost(self.batch.reward_amount, self.new_sizes)


@dataclass(frozen=True, slots=True)
class Plan:
    batches: tuple[PlannedBatch, ...]

    @property
    def cost(self) -> fees.Cost:
        total = fees.NO_COST
        for planned in self.batches:
            total += planned.cost
        return total

    @property
    def new_hits(self) -> int:
        return sum(len(p.new_sizes) for p in self.batches)

    @property
    def has_large_hits(self) -> bool:
        """Some HIT to create has 10 or more assignments (the 40% fee)."""
        return any(size >= fees.LARGE_HIT_ASSIGNMENTS for p in self.batches for size in p.new_sizes)


@dataclass(frozen=True, slots=True)
class PublishedHit:
    batch: str
    hit_id: str
    hit_group_id: str
    max_assignments: int
    created: bool  # False: it existed already (UniqueRequestToken repeat)


@dataclass(frozen=True, slots=True)
class BatchStatus:
    batch: str
    hits: int
    available: int = 0
    pending: int = 0
    submitted: int = 0
    approved: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class SyncReport:
    hits: int
    assignments: int
    new: int
    granted: int


@dataclass(frozen=True, slots=True)
class Decision:
    """What review does with one submitted assignment, and why."""

    assignment_id: str
    worker_id: str
    batch: str
    action: str  # approve, reject, skip (left for a person to decide)
    reason: str
    session_token: str | None = None
    red_expected: int | None = None
    red_reported: int | None = None
    feedback: str | None = None
    error: str | None = None
    # The worker's earlier assignment that makes this one a repeat, if any.
    repeat_of: str | None = None


@dataclass(frozen=True, slots=True)
class Participation:
    """One of a worker's assignments in the experiment, as sync recorded it."""

    assignment_id: str
    hit_id: str
    batch: str
    submit_time: float | None = None
    accept_time: float | None = None

    @property
    def order(self) -> tuple[float, float, str]:
        return (
            math.inf if self.submit_time is None else self.submit_time,
            math.inf if self.accept_time is None else self.accept_time,
            self.assignment_id,
        )


def earlier_participation(
    this: Participation,
    others: Iterable[Participation],
    exclude_other_batches: Mapping[str, bool],
) -> Participation | None:
    """The worker's first assignment before ``this`` on a HIT that ``this`` HIT excludes.

    The rule of the "took part" qualifications, which MTurk enforces only
    once sync has granted them: a HIT keeps out the workers of the other
    HITs of its own batch (a split batch), and of every other batch when its
    batch has ``exclude_other_batches``. "Before" is by submit time.
    """
    excluding = [
        other
        for other in others
        if other.hit_id != this.hit_id
        and (other.batch == this.batch or exclude_other_batches.get(this.batch, False))
        and other.order < this.order
    ]
    return min(excluding, key=lambda other: other.order, default=None)


@dataclass(frozen=True, slots=True)
class SessionFacts:
    token: str
    assignment_id: str | None
    red_count: int
    # The kind of page the session showed, and how many reports of that kind
    # the server stored for it (it stores only valid ones).
    survey: str = "balls"
    reports: int = 0
    # Who sent the session's report before it (another assignment, or a
    # session outside MTurk), if anyone did: a report id copied, not earned.
    reused_by: str | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    available: str
    on_hold: str | None


@dataclass
class _Assignment:
    assignment_id: str
    hit_id: str
    worker_id: str
    batch: str
    answers: dict[str, str] = field(default_factory=dict)


def _red(answers: dict[str, str]) -> int | None:
    raw = answers.get("red", "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 3 else None


# What review says of each kind's reports, in its reasons (for the researcher,
# in English).
REPORTS = {"speedtest": "speed test results", "tool": "tool report"}

# What review says to the worker (RequesterFeedback), in the batch's language:
# whole sentences, so that each translation can order its words freely.
THANKS = {
    "balls": N_("Thank you for counting the balls!"),
    "speedtest": N_("Thank you for running the speed tests!"),
    "tool": N_("Thank you for running the tool!"),
}
NOT_RECEIVED = {
    "speedtest": N_(
        "Thank you for taking part. Your speed test results did not reach our server"
        " through the survey page, so we cannot approve this HIT. If you think this is a"
        " mistake, please write to us through MTurk."
    ),
    "tool": N_(
        "Thank you for taking part. Your tool report did not reach our server through the"
        " survey page, so we cannot approve this HIT. If you think this is a mistake, please"
        " write to us through MTurk."
    ),
}
NO_RED_COUNT = N_(
    "Thank you for taking part. We could not read a number of red balls in your answer,"
    " so we cannot approve this HIT."
)
WRONG_RED_COUNT = N_(
    "Thank you for taking part. The number of red balls on the page was %(shown)d and your"
    " answer said %(reported)d, so we cannot approve this HIT. If you think this is a"
    " mistake, please write to us through MTurk."
)
THANKS_ALL = N_("Thank you for taking part!")
REUSED_REPORT = N_(
    "Thank you for taking part. The report id in your answer had already been sent to us by"
    " another worker, so it cannot be the report of your own run of the tool, and we cannot"
    " approve this HIT. If you think this is a mistake, please write to us through MTurk."
)
REPEAT = N_(
    "Thank you for taking part. Each worker may take part in this study only once, and you"
    " had already submitted another of its HITs before this one, so we cannot approve this"
    " HIT. Your first HIT is reviewed as usual."
)


@functools.cache
def _translations(language: str) -> NullTranslations:
    # A language without a catalogue (removed since the batch was published)
    # gets English rather than no review at all.
    return load_translations(language) if language in languages() else NullTranslations()


def worker_feedback(language: str, text: str, **params: Any) -> str:
    """RequesterFeedback in the worker's (the batch's) language."""
    return Message(text, params).render(_translations(language))


def _decide_reports(base: Decision, session: SessionFacts, language: str) -> Decision:
    """The speedtest and tool rule: approve when the server stored the session's report.

    The survey server stores a speedtest submission only when every test's
    speeds (and share link, when given) are valid, and a tool report only
    when it matches the configured pattern; so a stored report means every
    field was valid when the worker sent it.
    """
    what = REPORTS[session.survey]
    base = replace(base, session_token=session.token)
    if session.reports > 0 and session.reused_by and session.survey == "tool":
        # A tool's report id is the proof of a run: the same id from two
        # workers is one run, and the first to send it made it.
        return replace(
            base,
            action="reject",
            reason=f"the report id was sent first by {session.reused_by}",
            feedback=worker_feedback(language, REUSED_REPORT),
        )
    if session.reports > 0 and session.reused_by:
        # A share link is one run's result page: the same link from two
        # workers is likely a copy, but their speeds may still be their own
        # (a link pasted from someone else's run by mistake); a person decides.
        return replace(base, reason=f"a share link was sent first by {session.reused_by}")
    if session.reports > 0:
        return replace(
            base,
            action="approve",
            reason=f"{what} stored, every field valid",
            feedback=worker_feedback(language, THANKS[session.survey]),
        )
    return replace(
        base,
        action="reject",
        reason=f"no valid {what} reached the survey server",
        feedback=worker_feedback(language, NOT_RECEIVED[session.survey]),
    )


def decide(
    assignment_id: str,
    worker_id: str,
    batch: str,
    answers: dict[str, str],
    sessions: Sequence[SessionFacts],
    kind: str | None = None,
    language: str = SOURCE_LANGUAGE,
) -> Decision:
    """Apply the review rule of the session's kind of page.

    balls: approve when the red count reported to MTurk is what the page
    showed. speedtest and tool: approve when the server stored a valid
    report for the session (see :func:`_decide_reports`).

    ``sessions`` are the survey sessions that might be this assignment's: the
    one whose token came back in the answers, else those opened with its
    assignmentId. ``kind`` is the batch's kind: a session of another kind
    (a worker who changed the URL) is left for a person, as is anything
    that cannot be matched. The feedback is in ``language``, the batch's.
    """
    base = Decision(assignment_id, worker_id, batch, "skip", "")
    token = answers.get("token", "").strip()
    if token:
        matching = [s for s in sessions if s.token == token]
        if not matching:
            return replace(base, reason="the answer names a survey session we never served")
        if matching[0].assignment_id != assignment_id:
            return replace(
                base,
                session_token=token,
                reason="the answer names a survey session opened for another assignment",
            )
        session = matching[0]
    else:
        own = [s for s in sessions if s.assignment_id == assignment_id]
        if len(own) != 1:
            return replace(
                base,
                reason=f"no session token in the answer and {len(own)} sessions for it",
            )
        session = own[0]
    if kind is not None and session.survey != kind:
        return replace(
            base,
            session_token=session.token,
            reason=f"the batch shows the {kind} page but the session showed {session.survey}",
        )
    if session.survey in REPORTS:
        return _decide_reports(base, session, language)
    reported = _red(answers)
    base = replace(base, session_token=session.token, red_expected=session.red_count)
    if reported is None:
        return replace(
            base,
            action="reject",
            reason="no readable red count in the answer",
            feedback=worker_feedback(language, NO_RED_COUNT),
        )
    base = replace(base, red_reported=reported)
    if reported == session.red_count:
        return replace(
            base,
            action="approve",
            reason=f"red count {reported} is right",
            feedback=worker_feedback(language, THANKS["balls"]),
        )
    return replace(
        base,
        action="reject",
        reason=f"red count {reported}, the page showed {session.red_count}",
        feedback=worker_feedback(
            language, WRONG_RED_COUNT, shown=session.red_count, reported=reported
        ),
    )


# The sessions an assignment may have answered, with what review needs of
# them. reused_by: the session's first stored report (a tool's report id,
# or a share link of its first speed-test submission) was stored earlier by
# another session not of the same assignment (a reload of the page makes a
# new session of the same assignment; that is not reuse).
_OTHER_SESSION = (
    " JOIN sessions os ON os.token = o.session_token"
    " WHERE o.session_token <> s.token AND (os.assignment_id IS NULL"
    " OR s.assignment_id IS NULL OR os.assignment_id <> s.assignment_id)"
)
_WHO = (
    "coalesce('assignment ' || os.assignment_id || ' of worker ' || os.worker_id,"
    " 'session ' || os.token)"
)
SESSION_FACTS = (
    "SELECT s.token, s.assignment_id, s.red_count, s.survey,"
    " (SELECT count(*) FROM speedtest_reports r WHERE r.session_token = s.token)"
    " + (SELECT count(*) FROM tool_reports r WHERE r.session_token = s.token) AS reports,"
    f" coalesce((SELECT {_WHO}"
    " FROM tool_reports f JOIN tool_reports o ON o.report = f.report AND o.id < f.id"
    f"{_OTHER_SESSION}"
    " AND f.id = (SELECT min(x.id) FROM tool_reports x WHERE x.session_token = s.token)"
    " ORDER BY o.id LIMIT 1),"
    f" (SELECT {_WHO}"
    " FROM speedtest_reports f JOIN speedtest_reports o ON o.share_url = f.share_url"
    f" AND o.id < f.id{_OTHER_SESSION}"
    " AND f.session_token = s.token"
    " AND f.t = (SELECT min(x.t) FROM speedtest_reports x WHERE x.session_token = s.token)"
    " ORDER BY o.id LIMIT 1)) AS reused_by"
    " FROM sessions s WHERE s.token = ? OR s.assignment_id = ?"
)


# -- the workflow ------------------------------------------------------------------


class Requester:
    """One experiment's MTurk operations, on one client and one database."""

    def __init__(
        self,
        client: Any,
        db: aiosqlite.Connection,
        experiment: Experiment,
        target: Target,
        *,
        progress: bool = False,
        page_size: int = 100,
    ) -> None:
        self.client = client
        self.db = db
        self.experiment = experiment
        self.target = target
        self.progress = progress
        self.page_size = page_size

    def _bar(self, total: int, desc: str, unit: str) -> tqdm[Any]:
        # disable=None: shown on a terminal only, never in logs or pipes.
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            leave=False,
            disable=None if self.progress else True,
        )

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        # Short write transactions: the probe server writes to the same file.
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        await self.db.execute("COMMIT")

    async def _rows(self, sql: str, *params: Any) -> list[aiosqlite.Row]:
        async with self.db.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def _batch_row(self, name: str) -> aiosqlite.Row | None:
        rows = await self._rows("SELECT * FROM batches WHERE name = ?", name)
        return rows[0] if rows else None

    def _where(self) -> str:
        return "in the sandbox" if self.target.sandbox else "on the live site"

    def _check_recorded(self, batch: Batch, row: aiosqlite.Row) -> None:
        if row["experiment"] != self.experiment.name:
            raise RequesterError(
                f"batch {batch.name!r} belongs to experiment {row['experiment']!r} in this"
                " database; batch names must be unique"
            )
        if bool(row["sandbox"]) != self.target.sandbox:
            was = "in the sandbox" if row["sandbox"] else "on the live site"
            raise RequesterError(
                f"batch {batch.name!r} was published {was} in this database; use another"
                " database for the other site (database = ... in the experiment file, or --db)"
            )
        recorded = (row["reward"], row["countries"], row["assignments"])
        wanted = (batch.reward, " ".join(batch.countries), batch.assignments)
        if recorded != wanted:
            raise RequesterError(
                f"batch {batch.name!r} was published with reward {row['reward']},"
                f" countries {row['countries'] or 'any'!r} and {row['assignments']} assignments;"
                " give a changed batch a new name"
            )
        if (row["kind"], row["language"]) != (self.experiment.kind, batch.language):
            raise RequesterError(
                f"batch {batch.name!r} was published as kind {row['kind']!r} in language"
                f" {row['language']!r}; give a changed batch a new name"
            )

    def _batches(self, names: Sequence[str]) -> list[Batch]:
        try:
            return [self.experiment.batch(name) for name in names] or list(self.experiment.batches)
        except KeyError as e:
            raise RequesterError(f"no batch named {e.args[0]!r} in the experiment file") from None

    # -- publish -----------------------------------------------------------------------

    async def plan(self, *, split: bool = False, batches: Sequence[str] = ()) -> Plan:
        """What publish would create: HITs per batch, and what they would cost.

        A batch already (partly) published keeps the layout it was published
        with, whatever ``split`` says now.
        """
        planned = []
        for batch in self._batches(batches):
            row = await self._batch_row(batch.name)
            hit_size = batch.assignments
            if split:
                hit_size = min(batch.assignments, fees.SMALL_HIT_MAX)
            published = 0
            if row is not None:
                self._check_recorded(batch, row)
                hit_size = row["hit_size"] or hit_size
                published = len(
                    await self._rows("SELECT hit_id FROM hits WHERE batch = ?", batch.name)
                )
            sizes = tuple(fees.split_sizes(batch.assignments, hit_size))
            planned.append(PlannedBatch(batch, sizes, min(published, len(sizes))))
        return Plan(tuple(planned))

    async def _qualification(self, batch: Batch) -> str:
        """The batch's "took part" qualification type, created once."""
        rows = await self._rows("SELECT * FROM batch_qualifications WHERE batch = ?", batch.name)
        if rows:
            row = rows[0]
            if row["experiment"] != self.experiment.name or bool(row["sandbox"]) != (
                self.target.sandbox
            ):
                raise RequesterError(
                    f"batch {batch.name!r} has a qualification type of another experiment or"
                    " site in this database; use another database"
                )
            return str(row["qualification_type_id"])
        name = qualification_name(self.experiment.name, batch.name)
        try:
            response = await self.client.create_qualification_type(
                Name=name,
                Description=(
                    f"Took part in batch {batch.name} of the {self.experiment.name} survey."
                    " Used to keep each worker to the batches they may join."
                ),
                Keywords="probe-server",
                QualificationTypeStatus="Active",
            )
            type_id = response["QualificationType"]["QualificationTypeId"]
            created = _t(response["QualificationType"].get("CreationTime")) or time.time()
        except ClientError as e:
            if "already created a QualificationType with this name" not in _error_message(e):
                raise
            type_id, created = await self._find_qualification(name), time.time()
        await self.db.execute(
            "INSERT INTO batch_qualifications (batch, experiment, sandbox,"
            " qualification_type_id, name, created) VALUES (?,?,?,?,?,?)",
            (batch.name, self.experiment.name, self.target.sandbox, type_id, name, created),
        )
        return str(type_id)

    async def _find_qualification(self, name: str) -> str:
        # MTurk indexes qualification types for search with a delay: a type
        # created moments ago may not be found yet.
        paginator = self.client.get_paginator("list_qualification_types")
        async for page in paginator.paginate(
            Query=name, MustBeRequestable=False, MustBeOwnedByCaller=True
        ):
            for qualification in page.get("QualificationTypes", []):
                if qualification["Name"] == name:
                    return str(qualification["QualificationTypeId"])
        raise RequesterError(
            f"a qualification type named {name!r} exists but MTurk's search does not list it"
            " yet; try again in a few minutes"
        )

    def _requirements(
        self, planned: PlannedBatch, qualifications: dict[str, str]
    ) -> list[dict[str, Any]]:
        batch = planned.batch
        guard = {"ActionsGuarded": self.experiment.actions_guarded}
        requirements: list[dict[str, Any]] = []
        if batch.countries:
            # Worker_Locale compares with EqualTo for one country, In for several.
            requirements.append(
                {
                    "QualificationTypeId": WORKER_LOCALE,
                    "Comparator": "EqualTo" if len(batch.countries) == 1 else "In",
                    "LocaleValues": [{"Country": c} for c in batch.countries],
                    **guard,
                }
            )
        if batch.min_approval_rate is not None:
            requirements.append(
                {
                    "QualificationTypeId": PERCENT_APPROVED,
                    "Comparator": "GreaterThanOrEqualTo",
                    "IntegerValues": [batch.min_approval_rate],
                    **guard,
                }
            )
        if batch.min_approved_hits is not None:
            requirements.append(
                {
                    "QualificationTypeId": HITS_APPROVED,
                    "Comparator": "GreaterThanOrEqualTo",
                    "IntegerValues": [batch.min_approved_hits],
                    **guard,
                }
            )
        excluded = []
        if planned.split:
            excluded.append(batch.name)
        if batch.exclude_other_batches:
            excluded.extend(b.name for b in self.experiment.batches if b.name != batch.name)
        for name in excluded:
            requirements.append(
                {
                    "QualificationTypeId": qualifications[name],
                    "Comparator": "DoesNotExist",
                    **guard,
                }
            )
        return requirements

    async def publish(self, plan: Plan) -> list[PublishedHit]:
        """Create the plan's HITs; a repeat creates nothing new.

        Each HIT has a UniqueRequestToken derived from experiment, batch and
        index: if a run dies after MTurk created a HIT but before it was
        recorded, the next run gets MTurk's "already exists" and records the
        existing HIT instead of paying for a second one.
        """
        qualifications = {
            batch.name: await self._qualification(batch) for batch in self.experiment.batches
        }
        published: list[PublishedHit] = []
        with self._bar(plan.new_hits, "publishing", "HIT") as bar:
            for planned in plan.batches:
                batch = planned.batch
                await self.db.execute(
                    "INSERT INTO batches (name, experiment, reward, countries, assignments,"
                    " sandbox, exclude_other_batches, min_approval_rate, hit_size, kind,"
                    " language) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (name) DO NOTHING",
                    (
                        batch.name,
                        self.experiment.name,
                        batch.reward,
                        " ".join(batch.countries),
                        batch.assignments,
                        self.target.sandbox,
                        batch.exclude_other_batches,
                        batch.min_approval_rate,
                        max(planned.hit_sizes),
                        self.experiment.kind,
                        batch.language,
                    ),
                )
                requirements = self._requirements(planned, qualifications)
                for index in range(planned.published, len(planned.hit_sizes)):
                    hit = await self._create_hit(planned, index, requirements)
                    published.append(hit)
                    bar.update(1)
                await self.db.execute(
                    "UPDATE batches SET published = (SELECT min(created) FROM hits"
                    " WHERE batch = ?) WHERE name = ?",
                    (batch.name, batch.name),
                )
        return published

    async def _create_hit(
        self, planned: PlannedBatch, index: int, requirements: list[dict[str, Any]]
    ) -> PublishedHit:
        experiment, batch = self.experiment, planned.batch
        token = request_token(experiment.name, batch.name, index)
        size = planned.hit_sizes[index]
        created = True
        try:
            response = await self.client.create_hit(
                Title=experiment.title_of(batch),
                Description=experiment.description_of(batch),
                Keywords=", ".join(experiment.keywords),
                Reward=batch.reward,
                MaxAssignments=size,
                AssignmentDurationInSeconds=int(experiment.assignment_duration.total_seconds()),
                LifetimeInSeconds=int(experiment.lifetime.total_seconds()),
                AutoApprovalDelayInSeconds=int(experiment.auto_approval_delay.total_seconds()),
                Question=external_question(experiment.survey_url(batch), experiment.frame_height),
                RequesterAnnotation=f"{experiment.name}/{batch.name}"[:255],
                QualificationRequirements=requirements,
                UniqueRequestToken=token,
            )
            hit = response["HIT"]
        except ClientError as e:
            if _turk_code(e) != "AWS.MechanicalTurk.HitAlreadyExists":
                raise
            found = HIT_ID.search(_error_message(e))
            if found is None:
                raise RequesterError(
                    f"MTurk says the HIT for {batch.name} #{index} exists but names no HIT id"
                ) from None
            hit = (await self.client.get_hit(HITId=found.group(0)))["HIT"]
            created = False
            try:
                self._check_existing(hit, planned, index)
            except RequesterError:
                # A batch with no HIT recorded was not published as the file
                # now says: keep no record of it, or the next run would take
                # the changed values for the published ones.
                await self.db.execute(
                    "DELETE FROM batches WHERE name = ?"
                    " AND NOT EXISTS (SELECT 1 FROM hits WHERE batch = ?)",
                    (batch.name, batch.name),
                )
                raise
        await self.db.execute(
            "INSERT INTO hits (hit_id, batch, hit_type_id, max_assignments, created, expires,"
            " sandbox, hit_index, request_token, reward, hit_group_id,"
            " qualification_requirements) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                hit["HITId"],
                batch.name,
                hit.get("HITTypeId"),
                hit.get("MaxAssignments", size),
                _t(hit.get("CreationTime")) or time.time(),
                _t(hit.get("Expiration")),
                self.target.sandbox,
                index,
                token,
                batch.reward,
                hit.get("HITGroupId"),
                json.dumps(requirements),
            ),
        )
        log.info(
            "event=hit_published batch=%s index=%d hit=%s created=%s",
            batch.name,
            index,
            hit["HITId"],
            created,
        )
        return PublishedHit(
            batch.name, hit["HITId"], hit.get("HITGroupId", ""), hit["MaxAssignments"], created
        )

    def _check_existing(self, hit: dict[str, Any], planned: PlannedBatch, index: int) -> None:
        """The HIT a UniqueRequestToken found is the one this batch would create.

        The token comes from experiment, batch and HIT number only, so a
        batch changed in the file after a run that died (its record lost)
        finds the HIT of the old batch; recording that as the new one would
        pay the old reward for the wrong number of assignments.
        """
        batch = planned.batch
        size = planned.hit_sizes[index]
        reward, assignments = hit.get("Reward"), hit.get("MaxAssignments")
        try:
            same_reward = Decimal(str(reward)) == batch.reward_amount
        except ArithmeticError:
            same_reward = False
        if not same_reward or assignments != size:
            raise RequesterError(
                f"MTurk already has HIT {hit['HITId']} for {batch.name} #{index} (its"
                f" UniqueRequestToken), published with reward {reward} and {assignments}"
                f" assignments, but the experiment file now asks for {batch.reward} and {size};"
                " expire that HIT if it is not wanted, and give the changed batch a new name"
            )

    def preview_url(self, hit_group_id: str) -> str | None:
        """Where a worker sees the HITs (None for a fake endpoint)."""
        if self.target.custom:
            return None
        return WORKER_PREVIEW[self.target.sandbox] + hit_group_id

    # -- the HITs of this experiment -------------------------------------------------------

    async def _hits(self, batches: Sequence[str] = ()) -> list[aiosqlite.Row]:
        names = [batch.name for batch in self._batches(batches)]
        placeholders = ",".join("?" * len(names))
        return await self._rows(
            "SELECT h.hit_id, h.batch FROM hits h JOIN batches b ON b.name = h.batch"
            f" WHERE b.experiment = ? AND h.sandbox = ? AND h.batch IN ({placeholders})"
            " ORDER BY h.batch, h.hit_index",
            self.experiment.name,
            self.target.sandbox,
            *names,
        )

    async def _assignments_of(self, hit_id: str) -> AsyncIterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_assignments_for_hit")
        async for page in paginator.paginate(
            HITId=hit_id,
            AssignmentStatuses=LISTED_STATUSES,
            PaginationConfig={"PageSize": self.page_size},
        ):
            for assignment in page.get("Assignments", []):
                yield assignment

    async def status(self, batches: Sequence[str] = ()) -> list[BatchStatus]:
        """Per batch, from MTurk now: available, pending, submitted, approved, rejected."""
        hits = await self._hits(batches)
        totals: dict[str, dict[str, int]] = {b.name: {"hits": 0} for b in self._batches(batches)}
        with self._bar(len(hits), "status", "HIT") as bar:
            for row in hits:
                counts = totals[row["batch"]]
                hit = (await self.client.get_hit(HITId=row["hit_id"]))["HIT"]
                counts["hits"] += 1
                counts["available"] = counts.get("available", 0) + hit.get(
                    "NumberOfAssignmentsAvailable", 0
                )
                counts["pending"] = counts.get("pending", 0) + hit.get(
                    "NumberOfAssignmentsPending", 0
                )
                async for assignment in self._assignments_of(row["hit_id"]):
                    key = str(assignment["AssignmentStatus"]).lower()
                    counts[key] = counts.get(key, 0) + 1
                bar.update(1)
        return [BatchStatus(batch=name, **counts) for name, counts in totals.items()]

    # -- sync --------------------------------------------------------------------------

    async def sync(self) -> SyncReport:
        """Fetch every assignment of the experiment's HITs; grant exclusion to their workers."""
        hits = await self._hits()
        seen = new = 0
        workers: set[tuple[str, str]] = set()
        now = time.time()
        with self._bar(len(hits), "syncing", "HIT") as bar:
            for row in hits:
                rows = []
                async for a in self._assignments_of(row["hit_id"]):
                    error = None
                    try:
                        answers = parse_answers(a.get("Answer") or "<QuestionFormAnswers/>")
                    except BadXML as e:
                        error = str(e)[:MAX_ANSWER_ERROR]
                        log.warning(
                            "event=unreadable_answer assignment=%s error=%r",
                            a["AssignmentId"],
                            error,
                        )
                        answers = {}
                    review_time = a.get("ApprovalTime") or a.get("RejectionTime")
                    rows.append(
                        (
                            a["AssignmentId"],
                            a["HITId"],
                            a["WorkerId"],
                            a["AssignmentStatus"],
                            _t(a.get("AcceptTime")),
                            _t(a.get("SubmitTime")),
                            _t(review_time),
                            json.dumps(answers, sort_keys=True),
                            error,
                            now,
                        )
                    )
                    workers.add((row["batch"], a["WorkerId"]))
                known = {
                    r[0]
                    for r in await self._rows(
                        "SELECT assignment_id FROM assignments WHERE hit_id = ?", row["hit_id"]
                    )
                }
                new += sum(1 for r in rows if r[0] not in known)
                seen += len(rows)
                async with self._transaction():
                    await self.db.executemany(
                        "INSERT INTO assignments (assignment_id, hit_id, worker_id, status,"
                        " accept_time, submit_time, review_time, answers, answer_error, synced)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (assignment_id) DO UPDATE SET"
                        " status = excluded.status, accept_time = excluded.accept_time,"
                        " submit_time = excluded.submit_time, review_time = excluded.review_time,"
                        " answers = excluded.answers, answer_error = excluded.answer_error,"
                        " synced = excluded.synced",
                        rows,
                    )
                bar.update(1)
        granted = await self._grant(workers)
        log.info(
            "event=synced hits=%d assignments=%d new=%d granted=%d", len(hits), seen, new, granted
        )
        return SyncReport(hits=len(hits), assignments=seen, new=new, granted=granted)

    async def _grant(self, workers: set[tuple[str, str]]) -> int:
        """Give each worker their batch's "took part" qualification, once."""
        granted = 0
        for batch, worker_id in sorted(workers):
            rows = await self._rows(
                "SELECT q.qualification_type_id, g.worker_id FROM batch_qualifications q"
                " LEFT JOIN qualification_grants g ON g.qualification_type_id ="
                " q.qualification_type_id AND g.worker_id = ? WHERE q.batch = ?",
                worker_id,
                batch,
            )
            if not rows or rows[0]["worker_id"] is not None:
                continue
            type_id = rows[0]["qualification_type_id"]
            await self.client.associate_qualification_with_worker(
                QualificationTypeId=type_id,
                WorkerId=worker_id,
                IntegerValue=1,
                SendNotification=False,
            )
            await self.db.execute(
                "INSERT INTO qualification_grants (qualification_type_id, worker_id, batch,"
                " granted) VALUES (?,?,?,?)",
                (type_id, worker_id, batch, time.time()),
            )
            granted += 1
        return granted

    # -- review ------------------------------------------------------------------------

    async def _participations(self) -> dict[str, list[Participation]]:
        """Every synced assignment of the experiment, by worker."""
        names = [b.name for b in self.experiment.batches]
        placeholders = ",".join("?" * len(names))
        by_worker: dict[str, list[Participation]] = {}
        for row in await self._rows(
            "SELECT a.assignment_id, a.hit_id, a.worker_id, a.submit_time, a.accept_time,"
            " h.batch FROM assignments a JOIN hits h ON h.hit_id = a.hit_id"
            f" WHERE h.sandbox = ? AND h.batch IN ({placeholders})",
            self.target.sandbox,
            *names,
        ):
            by_worker.setdefault(row["worker_id"], []).append(
                Participation(
                    row["assignment_id"],
                    row["hit_id"],
                    row["batch"],
                    row["submit_time"],
                    row["accept_time"],
                )
            )
        return by_worker

    def _repeat(self, row: aiosqlite.Row, first: Participation) -> Decision:
        """Reject a repeat worker's later assignment: the first one is the one paid."""
        if first.batch == row["batch"]:
            rule = f"another HIT ({first.hit_id}) of split batch {first.batch}"
        else:
            rule = f"batch {first.batch}, which batch {row['batch']} excludes"
        return Decision(
            row["assignment_id"],
            row["worker_id"],
            row["batch"],
            "reject",
            f"repeat worker: took part first through assignment {first.assignment_id} in {rule};"
            " only the first is paid",
            feedback=worker_feedback(row["language"], REPEAT),
            repeat_of=first.assignment_id,
        )

    async def _judge(self, row: aiosqlite.Row) -> Decision:
        """The kind's rule for an assignment that is not a repeat."""
        if row["answer_error"] is not None:
            # Our parser's failure, not the worker's: a person looks at it.
            return Decision(
                row["assignment_id"],
                row["worker_id"],
                row["batch"],
                "skip",
                f"MTurk's answer could not be read ({row['answer_error']}); see the"
                " assignment in the requester site",
            )
        answers = json.loads(row["answers"] or "{}")
        sessions = [
            SessionFacts(
                s["token"],
                s["assignment_id"],
                s["red_count"],
                s["survey"],
                s["reports"],
                s["reused_by"],
            )
            for s in await self._rows(
                SESSION_FACTS, answers.get("token", "").strip(), row["assignment_id"]
            )
        ]
        return decide(
            row["assignment_id"],
            row["worker_id"],
            row["batch"],
            answers,
            sessions,
            kind=row["kind"],
            language=row["language"],
        )

    async def decisions(self, *, approve_all: bool = False) -> list[Decision]:
        """What review would do with every submitted, not yet reviewed assignment.

        A worker who took part through an assignment that this one's HIT
        excludes (:func:`earlier_participation`: possible before sync granted
        the exclusion) has their later assignments rejected, with feedback
        that says why, even with ``approve_all``; the first is reviewed as
        any other.
        """
        names = [b.name for b in self.experiment.batches]
        placeholders = ",".join("?" * len(names))
        rows = await self._rows(
            "SELECT a.assignment_id, a.hit_id, a.worker_id, a.submit_time, a.accept_time,"
            " a.answers, a.answer_error, h.batch, b.kind, b.language FROM assignments a"
            " JOIN hits h ON h.hit_id = a.hit_id JOIN batches b ON b.name = h.batch"
            f" WHERE a.status = 'Submitted' AND h.sandbox = ? AND h.batch IN ({placeholders})"
            " ORDER BY a.submit_time, a.assignment_id",
            self.target.sandbox,
            *names,
        )
        participations = await self._participations()
        exclude_other_batches = {
            r["name"]: bool(r["exclude_other_batches"])
            for r in await self._rows(
                f"SELECT name, exclude_other_batches FROM batches WHERE name IN ({placeholders})",
                *names,
            )
        }
        decisions = []
        for row in rows:
            this = Participation(
                row["assignment_id"],
                row["hit_id"],
                row["batch"],
                row["submit_time"],
                row["accept_time"],
            )
            first = earlier_participation(
                this, participations.get(row["worker_id"], []), exclude_other_batches
            )
            if first is not None:
                decisions.append(self._repeat(row, first))
                continue
            decision = await self._judge(row)
            if approve_all and decision.action != "approve":
                decision = replace(
                    decision,
                    action="approve",
                    reason=f"--approve-all (else: {decision.action}: {decision.reason})",
                    feedback=worker_feedback(row["language"], THANKS_ALL),
                )
            decisions.append(decision)
        return decisions

    async def review(self, *, approve_all: bool = False, dry_run: bool = False) -> list[Decision]:
        """Approve right answers, reject wrong ones; ``dry_run`` only decides."""
        decisions = await self.decisions(approve_all=approve_all)
        if dry_run:
            return decisions
        done = []
        acting = [d for d in decisions if d.action in ("approve", "reject")]
        with self._bar(len(acting), "reviewing", "assignment") as bar:
            for decision in decisions:
                if decision.action == "skip":
                    done.append(decision)
                    continue
                done.append(await self._apply(decision))
                bar.update(1)
        return done

    async def _apply(self, decision: Decision) -> Decision:
        feedback = (decision.feedback or "")[:MAX_FEEDBACK]
        cursor = await self.db.execute(
            "INSERT INTO reviews (assignment_id, decision, reason, session_token,"
            " red_expected, red_reported, feedback, decided) VALUES (?,?,?,?,?,?,?,?)",
            (
                decision.assignment_id,
                decision.action,
                decision.reason,
                decision.session_token,
                decision.red_expected,
                decision.red_reported,
                feedback,
                time.time(),
            ),
        )
        review_id = cursor.lastrowid
        await cursor.close()
        try:
            if decision.action == "approve":
                await self.client.approve_assignment(
                    AssignmentId=decision.assignment_id, RequesterFeedback=feedback
                )
                status = "Approved"
            else:
                await self.client.reject_assignment(
                    AssignmentId=decision.assignment_id, RequesterFeedback=feedback
                )
                status = "Rejected"
        except ClientError as e:
            message = _error_message(e)
            await self.db.execute("UPDATE reviews SET error = ? WHERE id = ?", (message, review_id))
            log.warning(
                "event=review_failed assignment=%s error=%r", decision.assignment_id, message
            )
            await self._refresh(decision.assignment_id)
            return replace(decision, error=message)
        now = time.time()
        await self.db.execute("UPDATE reviews SET done = ? WHERE id = ?", (now, review_id))
        await self.db.execute(
            "UPDATE assignments SET status = ?, review_time = ? WHERE assignment_id = ?",
            (status, now, decision.assignment_id),
        )
        return decision

    async def _refresh(self, assignment_id: str) -> None:
        """Record what MTurk says now (e.g. auto-approved before we got to it)."""
        try:
            a = (await self.client.get_assignment(AssignmentId=assignment_id))["Assignment"]
        except ClientError:
            return
        review_time = a.get("ApprovalTime") or a.get("RejectionTime")
        await self.db.execute(
            "UPDATE assignments SET status = ?, review_time = ?, synced = ?"
            " WHERE assignment_id = ?",
            (a["AssignmentStatus"], _t(review_time), time.time(), assignment_id),
        )

    # -- expire and balance ------------------------------------------------------------------

    async def expire(self, batches: Sequence[str] = ()) -> dict[str, int]:
        """Expire the batches' HITs now; HITs expired per batch."""
        hits = await self._hits(batches)
        expired: dict[str, int] = {}
        with self._bar(len(hits), "expiring", "HIT") as bar:
            for row in hits:
                await self.client.update_expiration_for_hit(HITId=row["hit_id"], ExpireAt=LONG_AGO)
                hit = (await self.client.get_hit(HITId=row["hit_id"]))["HIT"]
                expires = _t(hit.get("Expiration")) or time.time()
                await self.db.execute(
                    "UPDATE hits SET expires = ? WHERE hit_id = ?", (expires, row["hit_id"])
                )
                await self.db.execute(
                    "UPDATE batches SET expired = max(coalesce(expired, 0), ?) WHERE name = ?",
                    (expires, row["batch"]),
                )
                expired[row["batch"]] = expired.get(row["batch"], 0) + 1
                bar.update(1)
        return expired

    async def balance(self) -> Balance:
        return await account_balance(self.client)


async def account_balance(client: Any) -> Balance:
    response = await client.get_account_balance()
    return Balance(response["AvailableBalance"], response.get("OnHoldBalance"))


@asynccontextmanager
async def open_requester(
    experiment: Experiment,
    target: Target,
    *,
    database: Path | None = None,
    progress: bool = False,
    page_size: int = 100,
) -> AsyncIterator[Requester]:
    """The database and an MTurk client, opened together and closed together."""
    path = database or experiment.resolve(experiment.database)
    try:
        db = await open_database(path)
    except Exception as e:
        raise RequesterError(f"cannot open the database {path}: {e}") from None
    db.row_factory = aiosqlite.Row
    try:
        async with mturk_client(target) as client:
            yield Requester(client, db, experiment, target, progress=progress, page_size=page_size)
    finally:
        await db.close()


__all__ = [
    "Balance",
    "BatchStatus",
    "BotoCoreError",
    "ClientError",
    "Decision",
    "Participation",
    "Plan",
    "PlannedBatch",
    "PublishedHit",
    "Requester",
    "RequesterError",
    "SyncReport",
    "Target",
    "account_balance",
    "decide",
    "earlier_participation",
    "mturk_client",
    "open_requester",
    "worker_feedback",
]
