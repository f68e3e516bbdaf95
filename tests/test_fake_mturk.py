"""The fake MTurk: AWS JSON 1.1 wire protocol, MTurk's validation, the worker site."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError

from probe_server.mturk.fake import (
    PERCENT_APPROVED,
    WORKER_LOCALE,
    FakeMTurk,
    FakeServer,
    WorkerRefused,
)
from probe_server.mturk.questions import external_question, parse_answers
from probe_server.mturk.requester import Target, mturk_client

QUESTION = external_question("https://survey.example.org/?x=1&y=2", 0)


@pytest.fixture
async def mturk(fake_mturk: FakeServer) -> AsyncIterator[Any]:
    async with mturk_client(Target(endpoint_url=fake_mturk.url)) as client:
        yield client


def hit_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "Title": "Count the balls",
        "Description": "Count them.",
        "Reward": "0.05",
        "AssignmentDurationInSeconds": 600,
        "LifetimeInSeconds": 86400,
        "MaxAssignments": 3,
        "Question": QUESTION,
    }
    params.update(overrides)
    return params


async def new_hit(mturk: Any, **overrides: Any) -> str:
    return str((await mturk.create_hit(**hit_params(**overrides)))["HIT"]["HITId"])


def error_of(info: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    error = info.value.response["Error"]
    return error["Code"], error["Message"]


# -- the wire ----------------------------------------------------------------------


async def raw(url: str, target: str, body: bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    base = {
        "X-Amz-Target": f"MTurkRequesterServiceV20170117.{target}",
        "Content-Type": "application/x-amz-json-1.1",
        "Authorization": "AWS4-HMAC-SHA256 Credential=x/20260101/us-east-1/mturk-requester",
    }
    base.update(headers)
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=base) as r:
        assert r.content_type == "application/x-amz-json-1.1"
        return r.status, await r.json(content_type=None)


async def test_wire_protocol_errors_use_aws_json_shape(fake_mturk):
    url = fake_mturk.url
    status, body = await raw(url, "GetAccountBalance", b"{}", Authorization="")
    assert (status, body["__type"]) == (403, "MissingAuthenticationTokenException")
    status, body = await raw(url, "GetAccountBalance", b"{}", **{"Content-Type": "text/plain"})
    assert body["__type"] == "SerializationException"
    status, body = await raw(url, "GetAccountBalance", b"not json")
    assert body["__type"] == "SerializationException"
    status, body = await raw(url, "DeleteHIT", b'{"HITId": "X"}')
    assert body["__type"] == "UnknownOperationException"
    status, body = await raw(url, "GetAccountBalance", b"{}", **{"X-Amz-Target": "Other.Op"})
    assert body["__type"] == "UnknownOperationException"
    # Checked against botocore's model of the service, like MTurk's front end.
    status, body = await raw(url, "CreateHIT", b'{"Title": "t", "Description": "d"}')
    assert (status, body["__type"]) == (400, "ValidationException")
    assert "Reward" in body["Message"] and "LifetimeInSeconds" in body["Message"]
    status, body = await raw(url, "GetHIT", b'{"HITId": 5}')
    assert body["__type"] == "ValidationException"
    status, body = await raw(url, "GetAccountBalance", b"{}")
    assert status == 200 and body["AvailableBalance"] == "10000.00"


async def test_botocore_raises_modelled_errors(mturk):
    with pytest.raises(mturk.exceptions.RequestError) as info:
        await mturk.get_hit(HITId="NOSUCHHIT")
    assert info.value.response["TurkErrorCode"] == "AWS.MechanicalTurk.HITDoesNotExist"
    with pytest.raises(ClientError) as other:
        await mturk.delete_hit(HITId="NOSUCHHIT")
    assert error_of(other)[0] == "UnknownOperationException"


@pytest.mark.parametrize("reward", ["0.051", "0.00", "abc", "-1", "1,00", "$1.00", ""])
async def test_reward_format(mturk, reward):
    with pytest.raises(ClientError) as info:
        await new_hit(mturk, Reward=reward)
    code, message = error_of(info)
    assert code in ("RequestError", "ValidationException"), message
    if code == "RequestError":
        assert "Reward" in message


@pytest.mark.parametrize("reward", ["0.05", "1", "1.5", "12.34"])
async def test_valid_rewards(mturk, reward):
    await new_hit(mturk, Reward=reward)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("not xml", "not well-formed"),
        ("<ExternalQuestion><ExternalURL>https://x/</ExternalURL></ExternalQuestion>", "namespace"),
        (external_question("http://survey.example.org/", 0), "https://"),
        (QUESTION.replace("<FrameHeight>0</FrameHeight>", "<FrameHeight>x</FrameHeight>"), "Frame"),
        (
            '<!DOCTYPE x [<!ENTITY a "aaaa">]><ExternalQuestion/>',
            "entity declaration",
        ),
    ],
)
async def test_question_must_be_external_question(mturk, question, expected):
    with pytest.raises(ClientError) as info:
        await new_hit(mturk, Question=question)
    assert expected in error_of(info)[1]


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        ({"QualificationTypeId": "NOSUCHTYPE", "Comparator": "Exists"}, "does not exist"),
        (
            {"QualificationTypeId": WORKER_LOCALE, "Comparator": "EqualTo", "IntegerValues": [1]},
            "LocaleValues",
        ),
        (
            {
                "QualificationTypeId": WORKER_LOCALE,
                "Comparator": "EqualTo",
                "LocaleValues": [{"Country": "US"}, {"Country": "IN"}],
            },
            "exactly one value",
        ),
        (
            {
                "QualificationTypeId": WORKER_LOCALE,
                "Comparator": "GreaterThan",
                "LocaleValues": [{"Country": "US"}],
            },
            "cannot be compared",
        ),
        (
            {"QualificationTypeId": WORKER_LOCALE, "Comparator": "In", "LocaleValues": []},
            "needs IntegerValues or LocaleValues",
        ),
        (
            {
                "QualificationTypeId": PERCENT_APPROVED,
                "Comparator": "DoesNotExist",
                "IntegerValues": [1],
            },
            "takes no values",
        ),
        (
            {
                "QualificationTypeId": PERCENT_APPROVED,
                "Comparator": "GreaterThan",
                "IntegerValues": [90],
                "RequiredToPreview": True,
                "ActionsGuarded": "Accept",
            },
            "not both",
        ),
        (
            {
                "QualificationTypeId": PERCENT_APPROVED,
                "Comparator": "GreaterThan",
                "LocaleValues": [{"Country": "US"}],
            },
            "only Worker_Locale",
        ),
    ],
)
async def test_qualification_requirement_shapes(mturk, requirement, expected):
    with pytest.raises(ClientError) as info:
        await new_hit(mturk, QualificationRequirements=[requirement])
    assert expected in error_of(info)[1]


async def test_at_most_ten_requirements(mturk):
    requirement = {
        "QualificationTypeId": PERCENT_APPROVED,
        "Comparator": "GreaterThan",
        "IntegerValues": [1],
    }
    await new_hit(mturk, QualificationRequirements=[requirement] * 10)
    with pytest.raises(ClientError, match="at most 10"):
        await new_hit(mturk, QualificationRequirements=[requirement] * 11)


async def test_unique_request_token_repeat_names_the_hit(mturk, fake_mturk):
    hit_id = await new_hit(mturk, UniqueRequestToken="tok-1")
    with pytest.raises(mturk.exceptions.RequestError) as info:
        await new_hit(mturk, UniqueRequestToken="tok-1")
    assert info.value.response["TurkErrorCode"] == "AWS.MechanicalTurk.HitAlreadyExists"
    assert hit_id in error_of(info)[1]
    assert len(fake_mturk.fake.hits) == 1
    assert await new_hit(mturk, UniqueRequestToken="tok-2") != hit_id


def work(fake: FakeMTurk, hit_id: str, worker_id: str, country: str = "US", **answers: str):
    worker = fake.worker(worker_id, country)
    assignment, _ = fake.accept(hit_id, worker)
    return fake.external_submit([("assignmentId", assignment.assignment_id), *answers.items()])


async def test_list_assignments_pages_with_next_token(mturk, fake_mturk):
    fake = fake_mturk.fake
    hit_id = await new_hit(mturk, MaxAssignments=25)
    other = await new_hit(mturk, MaxAssignments=1)
    for i in range(25):
        work(fake, hit_id, f"AWORKER{i:02d}", red=str(i))
    seen: list[str] = []
    pages = 0
    token = None
    while True:
        kwargs = {"NextToken": token} if token else {}
        page = await mturk.list_assignments_for_hit(HITId=hit_id, MaxResults=10, **kwargs)
        pages += 1
        seen += [a["WorkerId"] for a in page["Assignments"]]
        assert page["NumResults"] == len(page["Assignments"])
        token = page.get("NextToken")
        if token is None:
            break
        # A token belongs to its listing: another HIT's listing refuses it.
        with pytest.raises(mturk.exceptions.RequestError, match="NextToken"):
            await mturk.list_assignments_for_hit(HITId=other, NextToken=token)
    assert pages == 3
    assert seen == [f"AWORKER{i:02d}" for i in range(25)]
    with pytest.raises(mturk.exceptions.RequestError, match="NextToken"):
        await mturk.list_assignments_for_hit(HITId=hit_id, NextToken="made-up")
    with pytest.raises(ClientError):
        await mturk.list_assignments_for_hit(HITId=hit_id, MaxResults=101)


async def test_accept_enforces_locale_and_exclusion(mturk, fake_mturk):
    fake = fake_mturk.fake
    qualification = await mturk.create_qualification_type(
        Name="took part", Description="d", QualificationTypeStatus="Active"
    )
    type_id = qualification["QualificationType"]["QualificationTypeId"]
    hit_id = await new_hit(
        mturk,
        MaxAssignments=5,
        QualificationRequirements=[
            {
                "QualificationTypeId": WORKER_LOCALE,
                "Comparator": "In",
                "LocaleValues": [{"Country": "US"}, {"Country": "IN"}],
            },
            {"QualificationTypeId": type_id, "Comparator": "DoesNotExist"},
        ],
    )
    fake.accept(hit_id, fake.worker("AINDIA", "IN"))
    with pytest.raises(WorkerRefused) as refused:
        fake.accept(hit_id, fake.worker("AJAPAN", "JP"))
    assert refused.value.unmet == [f"{WORKER_LOCALE} (Worker_Locale) In"]
    fake.worker("AEXCLUDED", "US")
    await mturk.associate_qualification_with_worker(
        QualificationTypeId=type_id, WorkerId="AEXCLUDED", IntegerValue=1, SendNotification=False
    )
    with pytest.raises(WorkerRefused) as refused:
        fake.accept(hit_id, fake.workers["AEXCLUDED"])
    assert refused.value.unmet == [f"{type_id} (took part) DoesNotExist"]
    # Previews are not guarded by "Accept" requirements (the default).
    assert "ASSIGNMENT_ID_NOT_AVAILABLE" in fake.preview(hit_id, fake.workers["AEXCLUDED"])
    granted = await mturk.list_workers_with_qualification_type(QualificationTypeId=type_id)
    assert [q["WorkerId"] for q in granted["Qualifications"]] == ["AEXCLUDED"]


async def test_preview_guard_and_approval_rate(mturk, fake_mturk):
    fake = fake_mturk.fake
    hit_id = await new_hit(
        mturk,
        QualificationRequirements=[
            {
                "QualificationTypeId": PERCENT_APPROVED,
                "Comparator": "GreaterThanOrEqualTo",
                "IntegerValues": [98],
                "ActionsGuarded": "PreviewAndAccept",
            }
        ],
    )
    with pytest.raises(WorkerRefused):
        fake.preview(hit_id)  # anonymous: no qualifications at all
    low = fake.worker("ALOWRATE", "US")
    low.approval_rate = 90
    with pytest.raises(WorkerRefused):
        fake.preview(hit_id, low)
    with pytest.raises(WorkerRefused):
        fake.accept(hit_id, low)
    fake.accept(hit_id, fake.worker("AGOOD", "US"))


async def test_accept_limits(mturk, fake_mturk):
    fake = fake_mturk.fake
    hit_id = await new_hit(mturk, MaxAssignments=2)
    fake.accept(hit_id, fake.worker("AONE", "US"))
    with pytest.raises(WorkerRefused, match="already worked"):
        fake.accept(hit_id, fake.workers["AONE"])
    fake.accept(hit_id, fake.worker("ATWO", "US"))
    with pytest.raises(WorkerRefused, match="no longer available"):
        fake.accept(hit_id, fake.worker("ATHREE", "US"))
    hit = (await mturk.get_hit(HITId=hit_id))["HIT"]
    assert (hit["NumberOfAssignmentsPending"], hit["HITStatus"]) == (2, "Unassignable")
    # After the assignment duration an unsubmitted assignment is abandoned.
    fake.advance(601)
    hit = (await mturk.get_hit(HITId=hit_id))["HIT"]
    assert (hit["NumberOfAssignmentsAvailable"], hit["NumberOfAssignmentsPending"]) == (2, 0)
    fake.accept(hit_id, fake.workers["ATHREE"])
    with pytest.raises(WorkerRefused):
        fake.worker("not-a-worker-id", "US")


async def test_external_submit_stores_question_form_answers(fake_mturk, mturk):
    hit_id = await new_hit(mturk)
    status, body = await post_json(
        fake_mturk.url + "/_fake/accept", {"hitId": hit_id, "workerId": "AW1", "country": "US"}
    )
    assert status == 200
    assert body["url"].startswith("https://survey.example.org/?x=1&y=2&assignmentId=")
    assert f"turkSubmitTo={fake_mturk.url.replace(':', '%3A').replace('/', '%2F')}" in body["url"]
    form = {"assignmentId": body["assignmentId"], "red": "3", "note": "<b>&ü"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake_mturk.url}/mturk/externalSubmit", data=form) as response:
            assert response.status == 200
            assert "HIT submitted" in await response.text()
        async with http.post(f"{fake_mturk.url}/mturk/externalSubmit", data=form) as response:
            assert response.status == 403  # once only
        async with http.post(
            f"{fake_mturk.url}/mturk/externalSubmit", data={"red": "1"}
        ) as response:
            assert response.status == 403
    (assignment,) = (await mturk.list_assignments_for_hit(HITId=hit_id))["Assignments"]
    assert assignment["AssignmentStatus"] == "Submitted"
    assert "QuestionFormAnswers.xsd" in assignment["Answer"]
    assert (
        "<QuestionIdentifier>red</QuestionIdentifier><FreeText>3</FreeText>"
        in (assignment["Answer"])
    )
    assert parse_answers(assignment["Answer"]) == {"red": "3", "note": "<b>&ü"}


async def test_review_states_and_auto_approval(mturk, fake_mturk):
    fake = fake_mturk.fake
    hit_id = await new_hit(mturk, MaxAssignments=3, AutoApprovalDelayInSeconds=3600)
    first = work(fake, hit_id, "AFIRST", red="1").assignment_id
    second = work(fake, hit_id, "ASECOND", red="2").assignment_id
    third = work(fake, hit_id, "ATHIRD", red="3").assignment_id
    await mturk.approve_assignment(AssignmentId=first)
    with pytest.raises(mturk.exceptions.RequestError, match="status of: Submitted"):
        await mturk.reject_assignment(AssignmentId=first, RequesterFeedback="no")
    await mturk.reject_assignment(AssignmentId=second, RequesterFeedback="Sorry.")
    with pytest.raises(mturk.exceptions.RequestError):
        await mturk.approve_assignment(AssignmentId=second)
    await mturk.approve_assignment(AssignmentId=second, OverrideRejection=True)
    fake.advance(3601)
    a = (await mturk.get_assignment(AssignmentId=third))["Assignment"]
    assert a["AssignmentStatus"] == "Approved"
    hit = (await mturk.get_hit(HITId=hit_id))["HIT"]
    assert hit["NumberOfAssignmentsCompleted"] == 3


async def test_expire_now_and_extend(mturk, fake_mturk):
    fake = fake_mturk.fake
    hit_id = await new_hit(mturk)
    created = (await mturk.get_hit(HITId=hit_id))["HIT"]["Expiration"]
    with pytest.raises(mturk.exceptions.RequestError, match="cannot be earlier"):
        await mturk.update_expiration_for_hit(HITId=hit_id, ExpireAt=created.timestamp() - 60)
    await mturk.update_expiration_for_hit(HITId=hit_id, ExpireAt=0)
    hit = (await mturk.get_hit(HITId=hit_id))["HIT"]
    assert hit["Expiration"].timestamp() == pytest.approx(fake.now())
    assert (hit["HITStatus"], hit["NumberOfAssignmentsAvailable"]) == ("Reviewable", 0)
    with pytest.raises(WorkerRefused):
        fake.accept(hit_id, fake.worker("ALATE", "US"))


async def test_qualification_type_names_are_unique(mturk):
    await mturk.create_qualification_type(
        Name="q", Description="d", QualificationTypeStatus="Active"
    )
    with pytest.raises(mturk.exceptions.RequestError, match="already created"):
        await mturk.create_qualification_type(
            Name="q", Description="d", QualificationTypeStatus="Active"
        )
    found = await mturk.list_qualification_types(
        Query="q", MustBeRequestable=False, MustBeOwnedByCaller=True
    )
    assert [q["Name"] for q in found["QualificationTypes"]] == ["q"]


async def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        if response.content_type != "application/json":
            return response.status, await response.text()
        return response.status, await response.json()


async def test_worker_pages_escape_what_they_show(fake_mturk, mturk):
    hit_id = await new_hit(mturk, Title="<script>alert(1)</script>")
    payload = '"><script>alert(2)</script>'
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake_mturk.url}/") as response:
            text = await response.text()
            assert "&lt;script&gt;alert(1)" in text and "<script>alert" not in text
        async with http.get(
            f"{fake_mturk.url}/mturk/preview", params={"hitId": hit_id}
        ) as response:
            assert response.status == 200
            assert "<iframe" in await response.text()
        for form in (
            {"hitId": payload, "workerId": "AW", "country": "US"},
            {"hitId": hit_id, "workerId": payload, "country": "US"},
            {"hitId": hit_id, "workerId": "AW", "country": payload},
        ):
            async with http.post(f"{fake_mturk.url}/mturk/accept", data=form) as response:
                assert response.status == 403
                assert "<script>alert" not in await response.text()
        async with http.post(
            f"{fake_mturk.url}/mturk/accept",
            data={"hitId": hit_id, "workerId": "AW", "country": "US"},
        ) as response:
            assert response.status == 200
            assert "assignmentId=" in await response.text()


async def test_clock_moves_forward_only(fake_mturk):
    before = fake_mturk.fake.now()
    status, body = await post_json(f"{fake_mturk.url}/_fake/clock", {"advance": 3600})
    assert status == 200 and body["now"] == pytest.approx(before + 3600)
    status, _ = await post_json(f"{fake_mturk.url}/_fake/clock", {"advance": -1})
    assert status == 400


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.0.0.5", "192.0.3.5"])
async def test_fake_listens_on_loopback_or_a_lab_address_only(address):
    from probe_server.server import StartupError

    with pytest.raises(StartupError, match="loopback"):
        await FakeServer().start(address)


async def test_standalone_fake_mturk_command(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "probe_server",
        "fake-mturk",
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        assert process.stdout is not None
        url = None
        async with asyncio.timeout(30):
            while url is None:
                line = (await process.stdout.readline()).decode()
                assert line, "fake-mturk exited early"
                if match := re.search(r"--endpoint-url (http://\S+)", line):
                    url = match.group(1)
        async with mturk_client(Target(endpoint_url=url)) as client:
            assert (await client.get_account_balance())["AvailableBalance"] == "10000.00"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
