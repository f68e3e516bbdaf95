"""The hits commands for each kind of experiment: ExternalURL, titles, terms, review rules."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import pytest

from probe_server.mturk.experiment import ExperimentError, load_experiment
from probe_server.mturk.requester import SessionFacts, decide
from probe_server.server import ProbeServer

from .test_handoff import handoff_of
from .test_repeat_workers import accept, experiment, open_task, publish
from .test_requester import Terminal, cli, rows
from .test_web import Page

EXPERIMENT = """\
name = "exp"
kind = "{kind}"
title = "Run three speed tests"
description = "Run three web speed tests and report their results."
external_url = "https://survey.example.org/?src=mturk"
database = "probe.db"

[[batches]]
name = "us"
reward = "0.20"
assignments = 3
countries = ["US"]

[[batches]]
name = "jp"
reward = "0.50"
assignments = 2
countries = ["JP"]
language = "ja"
title = "インターネットの速度を測ってください"
description = "三つのスピードテストを実行して、結果を報告してください。"
"""


def write(tmp_path: Path, kind: str = "speedtest", text: str = EXPERIMENT) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text.format(kind=kind))
    return path


def test_the_external_url_carries_kind_and_language(tmp_path):
    experiment = load_experiment(write(tmp_path))
    us, jp = experiment.batches
    assert experiment.survey_url(us) == "https://survey.example.org/?src=mturk&survey=speedtest"
    assert experiment.survey_url(jp) == (
        "https://survey.example.org/?src=mturk&survey=speedtest&lang=ja"
    )
    assert experiment.title_of(jp) == "インターネットの速度を測ってください"
    assert experiment.title_of(us) == "Run three speed tests"
    # Balls in English: the URL exactly as written.
    balls = load_experiment(write(tmp_path, "balls"))
    assert balls.survey_url(balls.batches[0]) == "https://survey.example.org/?src=mturk"
    assert balls.survey_url(balls.batches[1]) == "https://survey.example.org/?src=mturk&lang=ja"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('language = "ja"', 'language = "fr"'), "batches.1.language: 'fr' has no catalogue"),
        (('kind = "speedtest"', 'kind = "quiz"'), "kind: Input should be"),
    ],
)
def test_unknown_kind_or_language_is_refused(tmp_path, change, message):
    path = write(tmp_path, text=EXPERIMENT.replace("{kind}", "speedtest").replace(*change))
    with pytest.raises(ExperimentError, match=message.replace(".", r"\.")):
        load_experiment(path)


async def test_publish_builds_each_batch_url_and_title(tmp_path, fake_mturk):
    path = write(tmp_path)
    status, _, err = await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 0, err
    assert "software" not in err
    hits = {h.annotation: h for h in fake_mturk.fake.hits.values()}
    assert hits["exp/us"].external_url == "https://survey.example.org/?src=mturk&survey=speedtest"
    assert hits["exp/jp"].external_url.endswith("&survey=speedtest&lang=ja")
    assert hits["exp/jp"].title == "インターネットの速度を測ってください"
    assert hits["exp/us"].description == "Run three web speed tests and report their results."
    assert rows(tmp_path, "SELECT name, kind, language FROM batches ORDER BY name") == [
        ("jp", "speedtest", "ja"),
        ("us", "speedtest", "en"),
    ]
    # A published batch keeps its kind and language.
    path.write_text(path.read_text().replace('language = "ja"', 'language = "tr"'))
    status, _, err = await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 1 and "published as kind 'speedtest' in language 'ja'" in err


async def test_a_tool_experiment_warns_about_mturk_terms(tmp_path, fake_mturk):
    path = write(tmp_path, "tool")
    base = ("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    # Live: refused without the flag, even with --yes and a yes on a terminal.
    status, _, err = await cli(*base, "--live", "--yes", stdin=Terminal("y\n"))
    assert status == 3
    assert "MTurk's terms and policies restrict HITs that require software downloads" in err
    assert "--software-terms-checked" in err
    assert not fake_mturk.fake.hits
    # The sandbox: warned, published.
    status, _, err = await cli(*base)
    assert status == 0 and "Check the current MTurk terms" in err
    assert {h.external_url for h in fake_mturk.fake.hits.values()} == {
        "https://survey.example.org/?src=mturk&survey=tool",
        "https://survey.example.org/?src=mturk&survey=tool&lang=ja",
    }


async def test_a_live_tool_experiment_with_the_flag(tmp_path, fake_mturk):
    path = write(tmp_path, "tool")
    status, _, err = await cli(
        "hits",
        "publish",
        str(path),
        "--live",
        "--yes",
        "--software-terms-checked",
        "--endpoint-url",
        fake_mturk.url,
        stdin=io.StringIO(""),
    )
    assert status == 0, err
    assert "software downloads" in err  # still warned
    assert len(fake_mturk.fake.hits) == 2


@pytest.mark.parametrize(
    ("kind", "session", "action", "reason"),
    [
        ("speedtest", SessionFacts("t", "A1", 1, "speedtest", 3), "approve", "stored, every"),
        ("speedtest", SessionFacts("t", "A1", 1, "speedtest", 0), "reject", "no valid speed"),
        ("tool", SessionFacts("t", "A1", 1, "tool", 1), "approve", "tool report stored"),
        ("tool", SessionFacts("t", "A1", 1, "tool", 0), "reject", "no valid tool report"),
        # A worker who took the ball page for a speedtest HIT (edited the URL).
        ("speedtest", SessionFacts("t", "A1", 1, "balls", 0), "skip", "showed balls"),
        ("balls", SessionFacts("t", "A1", 1, "tool", 1), "skip", "showed tool"),
        ("balls", SessionFacts("t", "A1", 1, "balls", 0), "approve", "red count 1 is right"),
    ],
)
def test_review_rule_per_kind(kind, session, action, reason):
    decision = decide("A1", "AW", "b", {"token": "t", "red": "1"}, [session], kind=kind)
    assert decision.action == action
    assert reason in decision.reason
    if action != "skip":
        assert decision.session_token == "t"
        assert decision.feedback and decision.feedback.startswith("Thank you")
        assert len(decision.feedback) <= 1024


@pytest.mark.parametrize(
    ("session", "action", "reason"),
    [
        (SessionFacts("t", "A1", 1, "tool", 1, "assignment A0 of worker AW0"), "reject", "first"),
        (SessionFacts("t", "A1", 1, "tool", 1, None), "approve", "tool report stored"),
        # Nothing stored: the usual rejection, whoever sent what.
        (SessionFacts("t", "A1", 1, "tool", 0, "session x"), "reject", "no valid tool report"),
        # A share link seen before: left for a person.
        (SessionFacts("t", "A1", 1, "speedtest", 3, "session x"), "skip", "share link was sent"),
    ],
)
def test_a_report_id_sent_first_by_another_session(session, action, reason):
    decision = decide("A1", "AW", "b", {"token": "t"}, [session], kind=session.survey)
    assert (decision.action, reason in decision.reason) == (action, True)


async def test_review_rejects_a_report_id_another_worker_sent_first(
    tmp_path, turk_server, fake_mturk, http
):
    path = experiment(tmp_path, turk_server, 'name = "b"\nreward = "0.20"\nassignments = 3')
    path.write_text(path.read_text().replace('name = "repeat"', 'name = "tools"\nkind = "tool"'))
    (hit_id,) = (await publish(path, fake_mturk))["b"]
    first = await accept(http, fake_mturk, hit_id, "AFIRST")
    copier = await accept(http, fake_mturk, hit_id, "ACOPIER")
    report = "https://spoofer.caida.org/report.php?sessionid=4242424"
    await report_tool(http, turk_server, Page(await open_task(http, first["url"])), report)
    # The first worker reloads the page and sends their id again: not reuse.
    await report_tool(http, turk_server, Page(await open_task(http, first["url"])), report, False)
    await report_tool(http, turk_server, Page(await open_task(http, copier["url"])), report)
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0
    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 0 and "Approved 1, rejected 1" in out, out
    assignments = fake_mturk.fake.assignments
    assert assignments[first["assignmentId"]].status == "Approved"
    copied = assignments[copier["assignmentId"]]
    assert copied.status == "Rejected"
    assert "had already been sent to us by another worker" in (copied.feedback or "")
    assert f"the report id was sent first by assignment {first['assignmentId']}" in out


async def report_tool(
    http: aiohttp.ClientSession, server: ProbeServer, page: Page, report: str, hand_on: bool = True
) -> None:
    async with http.post(
        f"{server.base_urls['ipv4']}/submit", data={"token": page.token, "report": report}
    ) as response:
        assert response.status == 200
        action, fields = handoff_of(await response.text())
    if hand_on:
        async with http.post(action, data=fields) as response:
            assert response.status == 200


async def test_review_leaves_a_share_link_another_worker_sent_first(
    tmp_path, turk_server, fake_mturk, http
):
    path = experiment(tmp_path, turk_server, 'name = "b"\nreward = "0.20"\nassignments = 3')
    path.write_text(
        path.read_text().replace('name = "repeat"', 'name = "speeds"\nkind = "speedtest"')
    )
    (hit_id,) = (await publish(path, fake_mturk))["b"]
    speeds = {
        f"{d}-{t}": "20" for d in ("download", "upload") for t in ("ookla", "ndt", "cloudflare")
    }
    share = {"share-ookla": "https://www.speedtest.net/result/777"}
    assigned = []
    for worker, link in (
        ("AFIRST", share),
        ("ACOPIER", share),
        ("AOWN", {"share-ookla": share["share-ookla"] + "8"}),
    ):
        assignment = await accept(http, fake_mturk, hit_id, worker)
        page = Page(await open_task(http, assignment["url"]))
        async with http.post(
            f"{turk_server.base_urls['ipv4']}/submit",
            data={"token": page.token, **speeds, **link},
        ) as response:
            assert response.status == 200
            action, fields = handoff_of(await response.text())
        async with http.post(action, data=fields) as response:
            assert response.status == 200
        assigned.append(assignment["assignmentId"])
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0
    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 0 and "Approved 2, rejected 0, left 1" in out, out
    first, copier, own = assigned
    statuses = {a.assignment_id: a.status for a in fake_mturk.fake.assignments.values()}
    assert (statuses[first], statuses[copier], statuses[own]) == (
        "Approved",
        "Submitted",
        "Approved",
    )
    assert f"a share link was sent first by assignment {first} of worker AFIRST" in out
