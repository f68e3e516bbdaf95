"""A local fake MTurk, for rehearsing an experiment offline and for tests.

Two faces, like the real service:

- the requester API over AWS's JSON 1.1 protocol (``POST /`` with
  ``X-Amz-Target: MTurkRequesterServiceV20170117.<Operation>``), so aioboto3
  reaches it through ``endpoint_url``. Requests are checked against botocore's
  own model of the service (required members, types, lengths), then against
  the rules MTurk adds (reward format, ExternalQuestion, qualification
  requirement shapes, pagination tokens, UniqueRequestToken repeats). Errors
  use AWS's JSON error shape, so botocore raises ordinary ``ClientError``\\ s.
- the worker site: HTML pages to preview and accept a HIT in a browser, the
  ``/mturk/externalSubmit`` endpoint that stores a HIT's answers as
  QuestionFormAnswers XML, and a small JSON interface (``/_fake/...``) for
  simulated workers. Accepting enforces the HIT's qualification requirements
  (Worker_Locale, approval rate, and granted types with Exists/DoesNotExist).

Its clock can be moved forward (``/_fake/clock``), so a rehearsal can spread
completions over hours without waiting. State lives in memory. It binds to
loopback only (or, in the namespace lab, its documentation-range address):
it checks no signatures and has no notion of accounts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import urlencode, urlsplit

import botocore.session
import jinja2
from aiohttp import web
from botocore.model import OperationModel, ServiceModel
from botocore.validate import ParamValidator

from ..config import is_rehearsal_address, is_rehearsal_host
from ..survey import PREVIEW_ASSIGNMENT
from .questions import BadXML, parse_external_question, question_form_answers

log = logging.getLogger(__name__)

TARGET_PREFIX = "MTurkRequesterServiceV20170117."
JSON_11 = "application/x-amz-json-1.1"

# System qualification types (MTurk's documentation).
WORKER_LOCALE = "00000000000000000071"
PERCENT_APPROVED = "000000000000000000L0"
HITS_APPROVED = "00000000000000000040"
SYSTEM_TYPES = {
    WORKER_LOCALE: "Worker_Locale",
    PERCENT_APPROVED: "Worker_PercentAssignmentsApproved",
    HITS_APPROVED: "Worker_NumberHITsApproved",
}
COMPARATORS_WITHOUT_VALUES = {"Exists", "DoesNotExist"}
SET_COMPARATORS = {"In", "NotIn"}
LOCALE_COMPARATORS = {"EqualTo", "NotEqualTo", "In", "NotIn"}
# botocore's CurrencyAmount pattern; MTurk's minimum reward is one cent.
REWARD = re.compile(r"[0-9]+\.?[0-9]{0,2}")
WORKER_ID = re.compile(r"A[A-Z0-9]{1,63}")
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MAX_SECONDS = 365 * 24 * 3600
DEFAULT_PAGE = 10
MAX_PAGE = 100
SANDBOX_BALANCE = "10000.00"
CENT = Decimal("0.01")


def new_id(length: int = 30) -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(length))


def stable_id(*parts: object) -> str:
    """An id derived from content: equal HIT properties give the same HIT type."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return "".join(ID_ALPHABET[b % len(ID_ALPHABET)] for b in digest[:30])


class FakeError(Exception):
    """An error in AWS's JSON shape: ``__type``, ``Message`` and MTurk's TurkErrorCode."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "RequestError",
        turk_code: str | None = None,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.turk_code = turk_code
        self.status = status

    def body(self) -> dict[str, str]:
        body = {"__type": self.code, "Message": str(self)}
        if self.turk_code:
            body["TurkErrorCode"] = self.turk_code
        return body


class WorkerRefused(Exception):
    """The worker may not take this action on the HIT; ``unmet`` says why."""

    def __init__(self, message: str, unmet: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.unmet = list(unmet)


@dataclass
class Worker:
    worker_id: str
    country: str
    subdivision: str | None = None
    approval_rate: int = 100
    approved_hits: int = 1000


@dataclass
class Hit:
    hit_id: str
    hit_type_id: str
    hit_group_id: str
    title: str
    description: str
    keywords: str
    reward: str
    max_assignments: int
    assignment_duration: int
    auto_approval_delay: int
    question: str
    external_url: str
    frame_height: int
    requirements: list[dict[str, Any]]
    annotation: str | None
    created: float
    expiration: float


@dataclass
class Assignment:
    assignment_id: str
    hit_id: str
    worker_id: str
    status: str  # Accepted, Submitted, Approved, Rejected, Abandoned
    accept_time: float
    deadline: float
    submit_time: float | None = None
    auto_approval_time: float | None = None
    approval_time: float | None = None
    rejection_time: float | None = None
    answer: str | None = None
    feedback: str | None = None


@dataclass
class QualificationType:
    type_id: str
    name: str
    description: str
    keywords: str
    status: str
    created: float
    auto_granted: bool = False
    auto_granted_value: int = 1


@dataclass
class Grant:
    value: int
    granted: float


@dataclass
class Page:
    """A NextToken handed out: which listing it continues, and where."""

    operation: str
    key: tuple[Any, ...]
    offset: int


@dataclass
class FakeMTurk:
    """The fake's state and rules, apart from HTTP."""

    clock: Callable[[], float] = time.time
    # The worker site's own origin, sent to the survey as turkSubmitTo.
    worker_site: str = ""
    offset: float = 0.0
    hits: dict[str, Hit] = field(default_factory=dict)
    assignments: dict[str, Assignment] = field(default_factory=dict)
    qualification_types: dict[str, QualificationType] = field(default_factory=dict)
    grants: dict[tuple[str, str], Grant] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)
    request_tokens: dict[str, str] = field(default_factory=dict)
    pages: dict[str, Page] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    # The account's available balance in dollars; None: like the sandbox,
    # $10,000 that never runs out. With a balance, each approval pays the
    # reward and MTurk's fee from it, and fails when it cannot, as on MTurk.
    balance: Decimal | None = None

    def now(self) -> float:
        return self.clock() + self.offset

    def advance(self, seconds: float) -> float:
        """Move the fake's clock forward; returns the new time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds
        return self.now()

    # -- bookkeeping -----------------------------------------------------------

    def _settle(self) -> None:
        """Apply what time does: abandoned assignments, automatic approval."""
        now = self.now()
        for assignment in self.assignments.values():
            if assignment.status == "Accepted" and assignment.deadline <= now:
                assignment.status = "Abandoned"
            elif (
                assignment.status == "Submitted"
                and assignment.auto_approval_time is not None
                and assignment.auto_approval_time <= now
            ):
                assignment.status = "Approved"
                assignment.approval_time = assignment.auto_approval_time

    def _of_hit(self, hit_id: str, *statuses: str) -> list[Assignment]:
        return [a for a in self.assignments.values() if a.hit_id == hit_id and a.status in statuses]

    def counts(self, hit: Hit) -> dict[str, int]:
        pending = len(self._of_hit(hit.hit_id, "Accepted"))
        submitted = len(self._of_hit(hit.hit_id, "Submitted"))
        completed = len(self._of_hit(hit.hit_id, "Approved", "Rejected"))
        available = max(0, hit.max_assignments - pending - submitted - completed)
        if hit.expiration <= self.now():
            available = 0
        return {
            "NumberOfAssignmentsPending": pending,
            "NumberOfAssignmentsAvailable": available,
            "NumberOfAssignmentsCompleted": completed,
        }

    def _hit(self, hit_id: str) -> Hit:
        hit = self.hits.get(hit_id)
        if hit is None:
            raise FakeError(
                f"Hit {hit_id} does not exist. ({int(self.now() * 1000)})",
                turk_code="AWS.MechanicalTurk.HITDoesNotExist",
            )
        return hit

    def _assignment(self, assignment_id: str) -> Assignment:
        assignment = self.assignments.get(assignment_id)
        if assignment is None or assignment.status in ("Accepted", "Abandoned"):
            raise FakeError(
                f"Assignment {assignment_id} does not exist. ({int(self.now() * 1000)})",
                turk_code="AWS.MechanicalTurk.AssignmentDoesNotExist",
            )
        return assignment

    def hit_json(self, hit: Hit) -> dict[str, Any]:
        counts = self.counts(hit)
        if hit.expiration <= self.now() or (
            counts["NumberOfAssignmentsAvailable"] == 0
            and counts["NumberOfAssignmentsPending"] == 0
        ):
            status = "Reviewable"
        elif counts["NumberOfAssignmentsAvailable"] == 0:
            status = "Unassignable"
        else:
            status = "Assignable"
        body: dict[str, Any] = {
            "HITId": hit.hit_id,
            "HITTypeId": hit.hit_type_id,
            "HITGroupId": hit.hit_group_id,
            "CreationTime": hit.created,
            "Title": hit.title,
            "Description": hit.description,
            "Question": hit.question,
            "Keywords": hit.keywords,
            "HITStatus": status,
            "MaxAssignments": hit.max_assignments,
            "Reward": hit.reward,
            "AutoApprovalDelayInSeconds": hit.auto_approval_delay,
            "Expiration": hit.expiration,
            "AssignmentDurationInSeconds": hit.assignment_duration,
            "QualificationRequirements": hit.requirements,
            "HITReviewStatus": "NotReviewed",
            **counts,
        }
        if hit.annotation is not None:
            body["RequesterAnnotation"] = hit.annotation
        return body

    @staticmethod
    def assignment_json(assignment: Assignment) -> dict[str, Any]:
        body: dict[str, Any] = {
            "AssignmentId": assignment.assignment_id,
            "WorkerId": assignment.worker_id,
            "HITId": assignment.hit_id,
            "AssignmentStatus": assignment.status,
            "AcceptTime": assignment.accept_time,
            "Deadline": assignment.deadline,
        }
        for key, value in (
            ("SubmitTime", assignment.submit_time),
            ("AutoApprovalTime", assignment.auto_approval_time),
            ("ApprovalTime", assignment.approval_time),
            ("RejectionTime", assignment.rejection_time),
            ("Answer", assignment.answer),
            ("RequesterFeedback", assignment.feedback),
        ):
            if value is not None:
                body[key] = value
        return body

    def _page(
        self,
        operation: str,
        key: tuple[Any, ...],
        items: list[dict[str, Any]],
        params: dict[str, Any],
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a listing and the NextToken for the rest, if any."""
        offset = 0
        token = params.get("NextToken")
        if token is not None:
            page = self.pages.get(token)
            if page is None or page.operation != operation or page.key != key:
                raise FakeError(
                    "The NextToken is not valid for this request.",
                    turk_code="AWS.MechanicalTurk.InvalidNextToken",
                )
            offset = page.offset
        size = int(params.get("MaxResults", DEFAULT_PAGE))
        if not 1 <= size <= MAX_PAGE:
            # botocore checks minimums only; MTurk refuses pages over 100.
            raise FakeError(
                f"Value '{size}' at 'maxResults' failed to satisfy constraint: Member must"
                f" have value less than or equal to {MAX_PAGE}",
                code="ValidationException",
            )
        chunk = items[offset : offset + size]
        if offset + size >= len(items):
            return chunk, None
        next_token = secrets.token_urlsafe(24)
        self.pages[next_token] = Page(operation, key, offset + size)
        return chunk, next_token

    # -- checks ------------------------------------------------------------------

    def _check_requirements(self, requirements: list[dict[str, Any]]) -> None:
        if len(requirements) > 10:
            raise FakeError("A HIT can have at most 10 QualificationRequirements.")
        for i, requirement in enumerate(requirements):
            where = f"QualificationRequirements[{i}]"
            type_id = requirement["QualificationTypeId"]
            comparator = requirement["Comparator"]
            integers = requirement.get("IntegerValues")
            locales = requirement.get("LocaleValues")
            if type_id not in SYSTEM_TYPES and type_id not in self.qualification_types:
                raise FakeError(
                    f"{where}: QualificationType {type_id} does not exist.",
                    turk_code="AWS.MechanicalTurk.QualificationTypeDoesNotExist",
                )
            if "RequiredToPreview" in requirement and "ActionsGuarded" in requirement:
                raise FakeError(f"{where}: use ActionsGuarded or RequiredToPreview, not both.")
            if integers is not None and locales is not None:
                raise FakeError(f"{where}: give IntegerValues or LocaleValues, not both.")
            values = integers if integers is not None else locales
            if comparator in COMPARATORS_WITHOUT_VALUES:
                if values:
                    raise FakeError(f"{where}: {comparator} takes no values.")
                continue
            if not values:
                raise FakeError(f"{where}: {comparator} needs IntegerValues or LocaleValues.")
            if comparator not in SET_COMPARATORS and len(values) != 1:
                raise FakeError(f"{where}: {comparator} takes exactly one value.")
            if type_id == WORKER_LOCALE:
                if locales is None:
                    raise FakeError(f"{where}: Worker_Locale is compared with LocaleValues.")
                if comparator not in LOCALE_COMPARATORS:
                    raise FakeError(f"{where}: Worker_Locale cannot be compared with {comparator}.")
                for locale in locales:
                    if not re.fullmatch(r"[A-Z]{2}", locale["Country"]):
                        raise FakeError(f"{where}: {locale['Country']!r} is not a country code.")
            elif locales is not None:
                raise FakeError(f"{where}: only Worker_Locale takes LocaleValues.")

    @staticmethod
    def _guards(requirement: dict[str, Any]) -> str:
        if "ActionsGuarded" in requirement:
            return str(requirement["ActionsGuarded"])
        return "PreviewAndAccept" if requirement.get("RequiredToPreview") else "Accept"

    def _value(self, type_id: str, worker: Worker) -> Any:
        if type_id == WORKER_LOCALE:
            return (worker.country, worker.subdivision)
        if type_id == PERCENT_APPROVED:
            return worker.approval_rate
        if type_id == HITS_APPROVED:
            return worker.approved_hits
        grant = self.grants.get((type_id, worker.worker_id))
        return None if grant is None else grant.value

    def meets(self, requirement: dict[str, Any], worker: Worker | None) -> bool:
        comparator = requirement["Comparator"]
        value = None if worker is None else self._value(requirement["QualificationTypeId"], worker)
        if comparator == "Exists":
            return value is not None
        if comparator == "DoesNotExist":
            return value is None
        if value is None:
            return False
        if requirement["QualificationTypeId"] == WORKER_LOCALE:
            country, subdivision = value
            matches = any(
                locale["Country"] == country and locale.get("Subdivision") in (None, subdivision)
                for locale in requirement["LocaleValues"]
            )
            return matches if comparator in ("EqualTo", "In") else not matches
        wanted = requirement["IntegerValues"]
        checks: dict[str, Callable[[int], bool]] = {
            "LessThan": lambda v: v < wanted[0],
            "LessThanOrEqualTo": lambda v: v <= wanted[0],
            "GreaterThan": lambda v: v > wanted[0],
            "GreaterThanOrEqualTo": lambda v: v >= wanted[0],
            "EqualTo": lambda v: v == wanted[0],
            "NotEqualTo": lambda v: v != wanted[0],
            "In": lambda v: v in wanted,
            "NotIn": lambda v: v not in wanted,
        }
        return checks[comparator](int(value))

    def unmet(self, hit: Hit, worker: Worker | None, action: str) -> list[str]:
        """The requirements that keep ``worker`` from ``action`` (Preview or Accept)."""
        guarding = {
            "Preview": ("PreviewAndAccept", "DiscoverPreviewAndAccept"),
            "Accept": ("Accept", "PreviewAndAccept", "DiscoverPreviewAndAccept"),
        }[action]
        failed = []
        for requirement in hit.requirements:
            if self._guards(requirement) in guarding and not self.meets(requirement, worker):
                type_id = requirement["QualificationTypeId"]
                name = SYSTEM_TYPES.get(type_id) or self.qualification_types[type_id].name
                failed.append(f"{type_id} ({name}) {requirement['Comparator']}")
        return failed

    # -- requester operations ------------------------------------------------------

    def CreateHIT(self, p: dict[str, Any]) -> dict[str, Any]:
        reward = p["Reward"]
        if not REWARD.fullmatch(reward) or Decimal(reward) < Decimal("0.01"):
            raise FakeError(
                f"Reward {reward!r} is not a valid amount: dollars as a string, e.g. '0.05',"
                " at least 0.01."
            )
        for name, low, high in (
            ("LifetimeInSeconds", 30, MAX_SECONDS),
            ("AssignmentDurationInSeconds", 30, MAX_SECONDS),
            ("AutoApprovalDelayInSeconds", 0, 30 * 24 * 3600),
        ):
            if name in p and not low <= p[name] <= high:
                raise FakeError(f"{name} must be between {low} and {high}.")
        if len(p["Title"]) > 128:
            raise FakeError("Title can be at most 128 characters.")
        if len(p["Description"]) > 2000:
            raise FakeError("Description can be at most 2000 characters.")
        max_assignments = p.get("MaxAssignments", 1)
        if not 1 <= max_assignments <= 1_000_000:
            raise FakeError("MaxAssignments must be at least 1.")
        if "Question" not in p:
            raise FakeError("This fake supports HITs with a Question (ExternalQuestion) only.")
        try:
            question = parse_external_question(p["Question"])
        except BadXML as e:
            raise FakeError(f"Question is not a valid ExternalQuestion: {e}") from None
        parts = urlsplit(question.url)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_rehearsal_host(parts.hostname)
        ):
            # Real MTurk accepts https only; http to a rehearsal's own hosts
            # (loopback, the lab's) lets rehearsals run without a certificate.
            raise FakeError("ExternalURL must be an https:// URL.")
        requirements = p.get("QualificationRequirements", [])
        self._check_requirements(requirements)
        token = p.get("UniqueRequestToken")
        if token is not None and token in self.request_tokens:
            existing = self.request_tokens[token]
            raise FakeError(
                f'The HIT with ID "{existing}" already exists for UniqueRequestToken'
                f' "{token}". ({int(self.now() * 1000)})',
                turk_code="AWS.MechanicalTurk.HitAlreadyExists",
            )
        now = self.now()
        hit_type_id = stable_id(
            p["Title"],
            p["Description"],
            reward,
            p["AssignmentDurationInSeconds"],
            p.get("AutoApprovalDelayInSeconds", 2592000),
            p.get("Keywords", ""),
            requirements,
        )
        hit = Hit(
            hit_id=new_id(),
            hit_type_id=hit_type_id,
            hit_group_id=stable_id("group", hit_type_id),
            title=p["Title"],
            description=p["Description"],
            keywords=p.get("Keywords", ""),
            reward=reward,
            max_assignments=max_assignments,
            assignment_duration=p["AssignmentDurationInSeconds"],
            auto_approval_delay=p.get("AutoApprovalDelayInSeconds", 2592000),
            question=p["Question"],
            external_url=question.url,
            frame_height=question.frame_height,
            requirements=requirements,
            annotation=p.get("RequesterAnnotation"),
            created=now,
            expiration=now + p["LifetimeInSeconds"],
        )
        self.hits[hit.hit_id] = hit
        if token is not None:
            self.request_tokens[token] = hit.hit_id
        return {"HIT": self.hit_json(hit)}

    def GetHIT(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"HIT": self.hit_json(self._hit(p["HITId"]))}

    def ListHITs(self, p: dict[str, Any]) -> dict[str, Any]:
        items = [self.hit_json(hit) for hit in self.hits.values()]
        page, token = self._page("ListHITs", (), items, p)
        return {"NumResults": len(page), "HITs": page, **({"NextToken": token} if token else {})}

    def UpdateExpirationForHIT(self, p: dict[str, Any]) -> dict[str, Any]:
        hit = self._hit(p["HITId"])
        expire_at = float(p["ExpireAt"])
        now = self.now()
        if expire_at <= now:
            # A time in the past expires the HIT at once.
            hit.expiration = min(hit.expiration, now)
        elif expire_at < hit.expiration:
            raise FakeError("A future ExpireAt cannot be earlier than the HIT's expiration.")
        else:
            hit.expiration = expire_at
        return {}

    def ListAssignmentsForHIT(self, p: dict[str, Any]) -> dict[str, Any]:
        hit = self._hit(p["HITId"])
        statuses = tuple(p.get("AssignmentStatuses") or ("Submitted", "Approved", "Rejected"))
        found = sorted(self._of_hit(hit.hit_id, *statuses), key=lambda a: a.accept_time)
        items = [self.assignment_json(a) for a in found]
        page, token = self._page("ListAssignmentsForHIT", (hit.hit_id, statuses), items, p)
        body: dict[str, Any] = {"NumResults": len(page), "Assignments": page}
        if token:
            body["NextToken"] = token
        return body

    def GetAssignment(self, p: dict[str, Any]) -> dict[str, Any]:
        assignment = self._assignment(p["AssignmentId"])
        return {
            "Assignment": self.assignment_json(assignment),
            "HIT": self.hit_json(self.hits[assignment.hit_id]),
        }

    def ApproveAssignment(self, p: dict[str, Any]) -> dict[str, Any]:
        assignment = self._assignment(p["AssignmentId"])
        allowed = ("Submitted", "Rejected") if p.get("OverrideRejection") else ("Submitted",)
        if assignment.status not in allowed:
            raise FakeError(
                f"This operation can be called with a status of: {', '.join(allowed)}"
                f" ({int(self.now() * 1000)})",
                turk_code="AWS.MechanicalTurk.InvalidAssignmentState",
            )
        if len(p.get("RequesterFeedback", "")) > 1024:
            raise FakeError("RequesterFeedback can be at most 1024 characters.")
        if self.balance is not None:
            cost = self.approval_cost(self.hits[assignment.hit_id])
            if cost > self.balance:
                raise FakeError(
                    "This Requester has insufficient funds in their account to complete this"
                    " transaction. Please visit https://requester.mturk.com/prepayments/new to"
                    f" purchase Prepaid HITs. ({int(self.now() * 1000)})",
                    turk_code="AWS.MechanicalTurk.InsufficientFunds",
                )
            self.balance -= cost
        assignment.status = "Approved"
        assignment.approval_time = self.now()
        assignment.rejection_time = None
        assignment.feedback = p.get("RequesterFeedback")
        return {}

    def RejectAssignment(self, p: dict[str, Any]) -> dict[str, Any]:
        assignment = self._assignment(p["AssignmentId"])
        if assignment.status != "Submitted":
            raise FakeError(
                "This operation can be called with a status of: Submitted"
                f" ({int(self.now() * 1000)})",
                turk_code="AWS.MechanicalTurk.InvalidAssignmentState",
            )
        feedback = p["RequesterFeedback"]
        if not 1 <= len(feedback) <= 1024:
            raise FakeError("RequesterFeedback must be 1 to 1024 characters.")
        assignment.status = "Rejected"
        assignment.rejection_time = self.now()
        assignment.feedback = feedback
        return {}

    @staticmethod
    def approval_cost(hit: Hit) -> Decimal:
        """What approving one assignment of the HIT takes from the balance.

        The reward and MTurk's fee: 20% of it, 40% on a HIT of 10 or more
        assignments, at least a cent, rounded half up to the cent.
        """
        reward = Decimal(hit.reward)
        rate = Decimal("0.40") if hit.max_assignments >= 10 else Decimal("0.20")
        fee = max((reward * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP), CENT)
        return reward + fee

    def GetAccountBalance(self, p: dict[str, Any]) -> dict[str, Any]:
        if self.balance is None:
            # Like the sandbox: the balance never runs out.
            return {"AvailableBalance": SANDBOX_BALANCE, "OnHoldBalance": "0.00"}
        return {"AvailableBalance": f"{self.balance:.2f}", "OnHoldBalance": "0.00"}

    def CreateQualificationType(self, p: dict[str, Any]) -> dict[str, Any]:
        name = p["Name"]
        if any(q.name == name for q in self.qualification_types.values()):
            raise FakeError(
                "You have already created a QualificationType with this name. A"
                " QualificationType's name must be unique among all of the QualificationTypes"
                f" created by the same user. ({int(self.now() * 1000)})",
                turk_code="AWS.MechanicalTurk.QualificationTypeAlreadyExists",
            )
        qualification = QualificationType(
            type_id=new_id(),
            name=name,
            description=p["Description"],
            keywords=p.get("Keywords", ""),
            status=p["QualificationTypeStatus"],
            created=self.now(),
            auto_granted=bool(p.get("AutoGranted", False)),
            auto_granted_value=int(p.get("AutoGrantedValue", 1)),
        )
        self.qualification_types[qualification.type_id] = qualification
        return {"QualificationType": self._qualification_json(qualification)}

    @staticmethod
    def _qualification_json(q: QualificationType) -> dict[str, Any]:
        return {
            "QualificationTypeId": q.type_id,
            "CreationTime": q.created,
            "Name": q.name,
            "Description": q.description,
            "Keywords": q.keywords,
            "QualificationTypeStatus": q.status,
            "IsRequestable": False,
            "AutoGranted": q.auto_granted,
        }

    def ListQualificationTypes(self, p: dict[str, Any]) -> dict[str, Any]:
        query = p.get("Query", "").lower()
        found = [
            self._qualification_json(q)
            for q in self.qualification_types.values()
            if query in f"{q.name} {q.description} {q.keywords}".lower()
        ]
        if p["MustBeRequestable"]:
            found = []  # ours have no test and are not requestable
        page, token = self._page(
            "ListQualificationTypes", (query, p["MustBeRequestable"]), found, p
        )
        body: dict[str, Any] = {"NumResults": len(page), "QualificationTypes": page}
        if token:
            body["NextToken"] = token
        return body

    def AssociateQualificationWithWorker(self, p: dict[str, Any]) -> dict[str, Any]:
        type_id = p["QualificationTypeId"]
        if type_id not in self.qualification_types:
            raise FakeError(
                f"QualificationType {type_id} does not exist.",
                turk_code="AWS.MechanicalTurk.QualificationTypeDoesNotExist",
            )
        worker_id = p["WorkerId"]
        if worker_id not in self.workers:
            raise FakeError(
                f"Worker {worker_id} does not exist.",
                turk_code="AWS.MechanicalTurk.WorkerDoesNotExist",
            )
        self.grants[(type_id, worker_id)] = Grant(int(p.get("IntegerValue", 1)), self.now())
        return {}

    def ListWorkersWithQualificationType(self, p: dict[str, Any]) -> dict[str, Any]:
        type_id = p["QualificationTypeId"]
        if type_id not in self.qualification_types:
            raise FakeError(
                f"QualificationType {type_id} does not exist.",
                turk_code="AWS.MechanicalTurk.QualificationTypeDoesNotExist",
            )
        items = [
            {
                "QualificationTypeId": type_id,
                "WorkerId": worker_id,
                "GrantTime": grant.granted,
                "IntegerValue": grant.value,
                "Status": "Granted",
            }
            for (qid, worker_id), grant in self.grants.items()
            if qid == type_id
        ]
        page, token = self._page("ListWorkersWithQualificationType", (type_id,), items, p)
        body: dict[str, Any] = {"NumResults": len(page), "Qualifications": page}
        if token:
            body["NextToken"] = token
        return body

    OPERATIONS = (
        "CreateHIT",
        "GetHIT",
        "ListHITs",
        "UpdateExpirationForHIT",
        "ListAssignmentsForHIT",
        "GetAssignment",
        "ApproveAssignment",
        "RejectAssignment",
        "GetAccountBalance",
        "CreateQualificationType",
        "ListQualificationTypes",
        "AssociateQualificationWithWorker",
        "ListWorkersWithQualificationType",
    )

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run one requester operation on already shape-checked parameters."""
        self._settle()
        self.calls.append(operation)
        result: dict[str, Any] = getattr(self, operation)(params)
        return result

    # -- the worker site -------------------------------------------------------------

    def worker(self, worker_id: str, country: str, subdivision: str | None = None) -> Worker:
        """The worker with this id, registered on first sight (MTurk knows its workers)."""
        if not WORKER_ID.fullmatch(worker_id):
            raise WorkerRefused(f"{worker_id!r} is not a worker id (A followed by A-Z, 0-9)")
        if not re.fullmatch(r"[A-Z]{2}", country):
            raise WorkerRefused(f"{country!r} is not a country code")
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = Worker(worker_id, country, subdivision)
        return worker

    def task_url(self, hit: Hit, assignment_id: str, worker_id: str | None) -> str:
        """The ExternalURL with the parameters MTurk appends."""
        params = {"assignmentId": assignment_id, "hitId": hit.hit_id}
        if worker_id is not None:
            params["workerId"] = worker_id
        params["turkSubmitTo"] = self.worker_site
        separator = "&" if urlsplit(hit.external_url).query else "?"
        return f"{hit.external_url}{separator}{urlencode(params)}"

    def preview(self, hit_id: str, worker: Worker | None = None) -> str:
        """The URL a (possibly anonymous) worker's preview frame opens."""
        self._settle()
        hit = self.hits.get(hit_id)
        if hit is None or hit.expiration <= self.now():
            raise WorkerRefused("this HIT is no longer available")
        unmet = self.unmet(hit, worker, "Preview")
        if unmet:
            raise WorkerRefused("you do not meet the requirements to preview this HIT", unmet)
        return self.task_url(hit, PREVIEW_ASSIGNMENT, None)

    def accept(self, hit_id: str, worker: Worker) -> tuple[Assignment, str]:
        """Accept a HIT for a worker: an assignment and the URL its frame opens."""
        self._settle()
        hit = self.hits.get(hit_id)
        if hit is None or self.counts(hit)["NumberOfAssignmentsAvailable"] == 0:
            raise WorkerRefused("this HIT is no longer available")
        taken = [
            a
            for a in self.assignments.values()
            if a.hit_id == hit_id and a.worker_id == worker.worker_id and a.status != "Abandoned"
        ]
        if taken:
            raise WorkerRefused("you have already worked on this HIT")
        unmet = self.unmet(hit, worker, "Accept")
        if unmet:
            raise WorkerRefused("you do not meet the qualification requirements", unmet)
        now = self.now()
        assignment = Assignment(
            assignment_id=new_id(),
            hit_id=hit_id,
            worker_id=worker.worker_id,
            status="Accepted",
            accept_time=now,
            deadline=now + hit.assignment_duration,
        )
        self.assignments[assignment.assignment_id] = assignment
        return assignment, self.task_url(hit, assignment.assignment_id, worker.worker_id)

    def external_submit(self, fields: list[tuple[str, str]]) -> Assignment:
        """What the worker site does with a HIT's form: store the answers, mark it submitted."""
        assignment_ids = [value for name, value in fields if name == "assignmentId"]
        if len(assignment_ids) != 1:
            raise WorkerRefused("the form must carry exactly one assignmentId")
        answer = question_form_answers(
            (name, value) for name, value in fields if name != "assignmentId"
        )
        return self.submit_answer(assignment_ids[0], answer)

    def submit_answer(self, assignment_id: str, answer: str) -> Assignment:
        """Submit an accepted assignment with ``answer`` as its Answer, exactly as given.

        externalSubmit builds the QuestionFormAnswers XML from a form; a test
        (or ``/_fake/submit-answer``) can give any text instead: MTurk's own
        formatting, or something no parser should trust.
        """
        self._settle()
        assignment = self.assignments.get(assignment_id)
        if assignment is None:
            raise WorkerRefused("there is no such assignment")
        if assignment.status == "Abandoned":
            raise WorkerRefused("the time allotted for this assignment has run out")
        if assignment.status != "Accepted":
            raise WorkerRefused("this assignment has already been submitted")
        hit = self.hits[assignment.hit_id]
        now = self.now()
        assignment.answer = answer
        assignment.status = "Submitted"
        assignment.submit_time = now
        assignment.auto_approval_time = now + hit.auto_approval_delay
        return assignment


# -- HTTP --------------------------------------------------------------------------

fake_key = web.AppKey("fake_mturk", FakeMTurk)
model_key = web.AppKey("mturk_model", ServiceModel)
templates_key = web.AppKey("fake_templates", jinja2.Environment)


def _aws_json(body: dict[str, Any], status: int = 200) -> web.Response:
    response = web.Response(
        status=status, body=json.dumps(body).encode(), content_type=JSON_11.split(";")[0]
    )
    response.headers["x-amzn-RequestId"] = str(uuid.uuid4())
    return response


def _validate(model: OperationModel, params: dict[str, Any]) -> None:
    """The members, types and lengths botocore's model of MTurk demands."""
    report = ParamValidator().validate(params, model.input_shape)
    if report.has_errors():
        message = " ".join(report.generate_report().splitlines()).strip()
        raise FakeError(message, code="ValidationException")


async def requester_api(request: web.Request) -> web.Response:
    """The requester API: one POST per operation, AWS JSON 1.1."""
    fake = request.app[fake_key]
    target = request.headers.get("X-Amz-Target", "")
    try:
        if not request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 "):
            raise FakeError(
                "Missing Authentication Token",
                code="MissingAuthenticationTokenException",
                status=403,
            )
        if request.content_type != JSON_11:
            raise FakeError(f"expected Content-Type {JSON_11}", code="SerializationException")
        if not target.startswith(TARGET_PREFIX):
            raise FakeError(f"unknown target {target!r}", code="UnknownOperationException")
        operation = target.removeprefix(TARGET_PREFIX)
        if operation not in FakeMTurk.OPERATIONS:
            raise FakeError(
                f"the fake MTurk does not implement {operation}",
                code="UnknownOperationException",
            )
        try:
            params = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise FakeError("the body is not JSON", code="SerializationException") from None
        if not isinstance(params, dict):
            raise FakeError("the body must be a JSON object", code="SerializationException")
        _validate(request.app[model_key].operation_model(operation), params)
        result = fake.call(operation, params)
    except FakeError as e:
        log.info("event=fake_mturk_error target=%s code=%s", target, e.code)
        return _aws_json(e.body(), status=e.status)
    log.debug("event=fake_mturk_call operation=%s", operation)
    return _aws_json(result)


def _html(request: web.Request, status: int = 200, **context: Any) -> web.Response:
    text = request.app[templates_key].get_template("fake_mturk.html").render(**context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _refused(request: web.Request, error: WorkerRefused) -> web.Response:
    return _html(request, status=403, page="refused", message=str(error), unmet=error.unmet)


async def worker_home(request: web.Request) -> web.Response:
    fake = request.app[fake_key]
    fake._settle()
    hits = [
        (hit, fake.counts(hit)["NumberOfAssignmentsAvailable"])
        for hit in fake.hits.values()
        if hit.expiration > fake.now()
    ]
    return _html(request, page="home", hits=hits)


async def worker_preview(request: web.Request) -> web.Response:
    fake = request.app[fake_key]
    hit_id = request.query.get("hitId", "")
    try:
        url = fake.preview(hit_id)
    except WorkerRefused as e:
        return _refused(request, e)
    return _html(request, page="preview", hit=fake.hits[hit_id], url=url)


async def worker_accept(request: web.Request) -> web.Response:
    fake = request.app[fake_key]
    form = await request.post()
    try:
        worker = fake.worker(str(form.get("workerId", "")), str(form.get("country", "")))
        assignment, url = fake.accept(str(form.get("hitId", "")), worker)
    except WorkerRefused as e:
        return _refused(request, e)
    return _html(
        request, page="work", hit=fake.hits[assignment.hit_id], url=url, assignment=assignment
    )


async def external_submit(request: web.Request) -> web.Response:
    """``/mturk/externalSubmit``: where the HIT's page posts its answers."""
    fake = request.app[fake_key]
    try:
        form = await request.post()
    except (ValueError, UnicodeDecodeError):
        return _refused(request, WorkerRefused("the form could not be read"))
    fields = [(name, value) for name, value in form.items() if isinstance(value, str)]
    try:
        assignment = fake.external_submit(fields)
    except WorkerRefused as e:
        return _refused(request, e)
    log.info("event=fake_mturk_submitted assignment=%s", assignment.assignment_id)
    return _html(request, page="submitted", assignment=assignment)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="expected a JSON object\n") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object\n")
    return body


def _refusal_json(error: WorkerRefused) -> web.Response:
    return web.json_response({"error": str(error), "unmet": error.unmet}, status=403)


async def sim_preview(request: web.Request) -> web.Response:
    """Simulated worker: the URL of a HIT's preview frame."""
    fake = request.app[fake_key]
    body = await _json_body(request)
    try:
        worker = None
        if body.get("workerId"):
            worker = fake.worker(str(body["workerId"]), str(body.get("country", "US")))
        return web.json_response({"url": fake.preview(str(body.get("hitId", "")), worker)})
    except WorkerRefused as e:
        return _refusal_json(e)


async def sim_accept(request: web.Request) -> web.Response:
    """Simulated worker: accept a HIT; the assignment and the URL of its frame."""
    fake = request.app[fake_key]
    body = await _json_body(request)
    try:
        worker = fake.worker(str(body.get("workerId", "")), str(body.get("country", "")))
        assignment, url = fake.accept(str(body.get("hitId", "")), worker)
    except WorkerRefused as e:
        return _refusal_json(e)
    return web.json_response({"assignmentId": assignment.assignment_id, "url": url})


async def sim_submit_answer(request: web.Request) -> web.Response:
    """Simulated worker: submit an accepted assignment with this Answer text, verbatim."""
    fake = request.app[fake_key]
    body = await _json_body(request)
    answer = body.get("answer")
    if not isinstance(answer, str):
        raise web.HTTPBadRequest(text="answer: the QuestionFormAnswers text\n")
    try:
        assignment = fake.submit_answer(str(body.get("assignmentId", "")), answer)
    except WorkerRefused as e:
        return _refusal_json(e)
    return web.json_response({"assignmentId": assignment.assignment_id})


async def sim_clock(request: web.Request) -> web.Response:
    """Move the fake's clock forward by ``advance`` seconds."""
    fake = request.app[fake_key]
    body = await _json_body(request)
    advance = body.get("advance", 0)
    if not isinstance(advance, int | float) or advance < 0:
        raise web.HTTPBadRequest(text="advance: a number of seconds, not negative\n")
    return web.json_response({"now": fake.advance(float(advance))})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _no_cache(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers["Cache-Control"] = "no-store"
    return response


@functools.cache
def mturk_model() -> ServiceModel:
    """botocore's model of the MTurk requester API (loaded once: it is large)."""
    return botocore.session.get_session().get_service_model("mturk")


def create_fake_app(fake: FakeMTurk) -> web.Application:
    """The fake's one application: requester API and worker site."""
    app = web.Application(middlewares=[_no_cache])
    app[fake_key] = fake
    app[model_key] = mturk_model()
    app[templates_key] = jinja2.Environment(
        loader=jinja2.PackageLoader("probe_server", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_post("/", requester_api)
    app.router.add_get("/", worker_home)
    app.router.add_get("/mturk/preview", worker_preview)
    app.router.add_post("/mturk/accept", worker_accept)
    app.router.add_post("/mturk/externalSubmit", external_submit)
    app.router.add_post("/_fake/preview", sim_preview)
    app.router.add_post("/_fake/accept", sim_accept)
    app.router.add_post("/_fake/submit-answer", sim_submit_answer)
    app.router.add_post("/_fake/clock", sim_clock)
    return app


class FakeServer:
    """The fake on a loopback socket; ``url`` is its endpoint_url and worker site."""

    def __init__(self, fake: FakeMTurk | None = None) -> None:
        self.fake = fake or FakeMTurk()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, address: str = "127.0.0.1", port: int = 0) -> str:
        from ..server import StartupError, bind_socket, site_url

        if not is_rehearsal_address(address):
            # It checks no signatures: only this machine, or the namespace
            # lab's own network, may reach it.
            raise StartupError(
                f"the fake MTurk listens on loopback (or a lab's documentation-range"
                f" address) only, not {address}"
            )
        sock = bind_socket(address, port)
        self.url = site_url(sock, None)
        self.fake.worker_site = self.url
        runner = web.AppRunner(create_fake_app(self.fake), access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await self.stop()
            sock.close()
            raise
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


async def run_fake(
    address: str, port: int, on_ready: Callable[[str], None], balance: Decimal | None = None
) -> int:
    """``probe-server fake-mturk``: serve until SIGTERM or SIGINT."""
    import asyncio
    import signal

    server = FakeServer(FakeMTurk(balance=balance))
    url = await server.start(address, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        on_ready(url)
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
    return 0
