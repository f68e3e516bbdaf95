"""The requester workflow (API and CLI) against the fake MTurk."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import logging
import os
import sqlite3
import struct
import sys
import termios
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError

from probe_server.cli import main
from probe_server.i18n import read_catalogue
from probe_server.mturk.experiment import load_experiment
from probe_server.mturk.fake import WorkerRefused
from probe_server.mturk.requester import (
    HITS_APPROVED,
    PERCENT_APPROVED,
    WORKER_LOCALE,
    SessionFacts,
    Target,
    account_balance,
    decide,
    mturk_client,
    open_requester,
    request_token,
)

EXPERIMENT = """\
name = "exp"
title = "Count the balls"
description = "Count them."
external_url = "https://survey.example.org/"
database = "probe.db"
"""


def write_experiment(tmp_path: Path, *batches: str) -> Path:
    path = tmp_path / "experiment.toml"
    text = EXPERIMENT
    for batch in batches or ('name = "b1"\nreward = "0.05"\nassignments = 3\ncountries = ["US"]',):
        text += f"\n[[batches]]\n{batch}\n"
    path.write_text(text)
    return path


async def cli(*argv: str, stdin: io.StringIO | None = None) -> tuple[int, str, str]:
    """Run ``probe-server`` in a thread (it runs its own loop), capturing output."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = stdin
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = await asyncio.to_thread(main, list(argv))
    finally:
        sys.stdin = old_stdin
    return status, out.getvalue(), err.getvalue()


class Terminal(io.StringIO):
    """Typed answers, on what claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def rows(tmp_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "probe.db")) as conn:
        return conn.execute(sql, params).fetchall()


# -- publish -------------------------------------------------------------------------


async def test_publish_twice_creates_nothing_new(tmp_path, fake_mturk):
    path = write_experiment(
        tmp_path,
        'name = "us"\nreward = "0.05"\nassignments = 3\ncountries = ["US"]',
        'name = "in"\nreward = "0.10"\nassignments = 2\ncountries = ["IN"]\n'
        "exclude_other_batches = true",
    )
    status, out, err = await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 0, out
    assert "Published 2 new HITs" in out
    assert "publishing" not in err  # no progress bar where there is no terminal
    fake = fake_mturk.fake
    first = sorted(fake.hits)
    recorded = rows(tmp_path, "SELECT hit_id, batch, hit_index, sandbox FROM hits ORDER BY batch")
    status, out, _ = await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 0 and "Nothing to publish" in out
    assert sorted(fake.hits) == first
    assert fake.calls.count("CreateHIT") == 2
    assert fake.calls.count("CreateQualificationType") == 2
    assert rows(tmp_path, "SELECT hit_id, batch, hit_index, sandbox FROM hits ORDER BY batch") == (
        recorded
    )
    batches = rows(
        tmp_path, "SELECT name, reward, countries, assignments, sandbox, published FROM batches"
    )
    created = {h.annotation.split("/")[1]: h.created for h in fake.hits.values() if h.annotation}
    assert [b[:5] for b in sorted(batches)] == [
        ("in", "0.10", "IN", 2, 1),
        ("us", "0.05", "US", 3, 1),
    ]
    for name, *_, published in batches:
        assert published == pytest.approx(created[name], abs=1e-5)
    # The "in" batch keeps out workers of "us"; "us" excludes nobody.
    by_batch = {h.annotation.split("/")[1]: h for h in fake.hits.values() if h.annotation}
    (qual,) = rows(
        tmp_path, "SELECT qualification_type_id FROM batch_qualifications WHERE batch = 'us'"
    )
    assert {
        "QualificationTypeId": qual[0],
        "Comparator": "DoesNotExist",
        "ActionsGuarded": "Accept",
    } in (by_batch["in"].requirements)
    assert [r["Comparator"] for r in by_batch["us"].requirements] == ["EqualTo"]
    assert by_batch["us"].reward == "0.05" and by_batch["us"].max_assignments == 3


async def test_publish_recovers_a_hit_created_before_a_crash(tmp_path, fake_mturk):
    """MTurk created the HIT but the run died before recording it: the
    UniqueRequestToken makes the next run find it instead of paying twice."""
    experiment = load_experiment(write_experiment(tmp_path))
    target = Target(endpoint_url=fake_mturk.url)
    async with open_requester(experiment, target) as requester:
        (hit,) = await requester.publish(await requester.plan())
        assert hit.created
    assert fake_mturk.fake.request_tokens == {request_token("exp", "b1", 0): hit.hit_id}
    with contextlib.closing(sqlite3.connect(tmp_path / "probe.db")) as conn, conn:
        conn.execute("DELETE FROM hits")
    async with open_requester(experiment, target) as requester:
        plan = await requester.plan()
        assert plan.new_hits == 1
        (again,) = await requester.publish(plan)
    assert (again.hit_id, again.created) == (hit.hit_id, False)
    assert len(fake_mturk.fake.hits) == 1
    assert rows(tmp_path, "SELECT hit_id FROM hits") == [(hit.hit_id,)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('"0.05"', '"0.07"'),
            "published with reward 0.05 and 3 assignments, but the"
            " experiment file now asks for 0.07 and 3",
        ),
        (("assignments = 3", "assignments = 4"), "asks for 0.05 and 4"),
    ],
)
async def test_a_recovered_hit_must_match_the_batch(tmp_path, fake_mturk, change, message):
    """The record of a published batch is lost and the batch changed: the
    UniqueRequestToken finds the old HIT, which must not be taken for the new one."""
    path = write_experiment(tmp_path)
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "publish", str(path), *endpoint))[0] == 0
    (hit_id,) = fake_mturk.fake.hits
    with contextlib.closing(sqlite3.connect(tmp_path / "probe.db")) as conn, conn:
        conn.execute("DELETE FROM hits")
        conn.execute("DELETE FROM batches")
    path.write_text(path.read_text().replace(*change))
    status, _, err = await cli("hits", "publish", str(path), *endpoint)
    assert status == 1, err
    assert f"MTurk already has HIT {hit_id} for b1 #0" in err and message in err
    assert "give the changed batch a new name" in err
    assert list(fake_mturk.fake.hits) == [hit_id]
    assert rows(tmp_path, "SELECT count(*) FROM hits") == [(0,)]
    # The batch as it was published: the HIT is found and recorded again.
    path.write_text(path.read_text().replace(change[1], change[0]))
    status, out, err = await cli("hits", "publish", str(path), *endpoint)
    assert status == 0 and "(1 found already created)" in out, out + err
    assert rows(tmp_path, "SELECT hit_id FROM hits") == [(hit_id,)]


async def test_changed_batch_or_other_site_is_refused(tmp_path, fake_mturk):
    path = write_experiment(tmp_path)
    assert (await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url))[0] == 0
    path.write_text(path.read_text().replace('"0.05"', '"0.06"'))
    status, _, err = await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 1 and "give a changed batch a new name" in err
    path.write_text(path.read_text().replace('"0.06"', '"0.05"'))
    status, _, err = await cli(
        "hits", "publish", str(path), "--endpoint-url", fake_mturk.url, "--live", "--yes"
    )
    assert status == 1 and "published in the sandbox in this database" in err
    assert fake_mturk.fake.calls.count("CreateHIT") == 1


# -- live: cost and confirmation ------------------------------------------------------------


async def test_several_countries_and_approval_records_become_hit_requirements(tmp_path, fake_mturk):
    path = write_experiment(
        tmp_path,
        'name = "jt"\nreward = "0.05"\nassignments = 3\ncountries = ["JP", "TR"]\n'
        "min_approval_rate = 95\nmin_approved_hits = 50",
    )
    status, out, err = await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 0, out + err
    fake = fake_mturk.fake
    (hit,) = fake.hits.values()
    guard = {"ActionsGuarded": "Accept"}
    assert hit.requirements == [
        {
            "QualificationTypeId": WORKER_LOCALE,
            "Comparator": "In",
            "LocaleValues": [{"Country": "JP"}, {"Country": "TR"}],
            **guard,
        },
        {
            "QualificationTypeId": PERCENT_APPROVED,
            "Comparator": "GreaterThanOrEqualTo",
            "IntegerValues": [95],
            **guard,
        },
        {
            "QualificationTypeId": HITS_APPROVED,
            "Comparator": "GreaterThanOrEqualTo",
            "IntegerValues": [50],
            **guard,
        },
    ]
    assert rows(tmp_path, "SELECT countries FROM batches") == [("JP TR",)]
    # MTurk (the fake) lets in a worker of either country, with a good record only.
    fake.accept(hit.hit_id, fake.worker("ATURKEY", "TR"))
    fake.accept(hit.hit_id, fake.worker("AJAPAN", "JP"))
    with pytest.raises(WorkerRefused) as refused:
        fake.accept(hit.hit_id, fake.worker("AUSA", "US"))
    assert refused.value.unmet == [f"{WORKER_LOCALE} (Worker_Locale) In"]
    low = fake.worker("ALOWRATE", "JP")
    low.approval_rate = 90
    with pytest.raises(WorkerRefused) as refused:
        fake.accept(hit.hit_id, low)
    assert [u.split()[0] for u in refused.value.unmet] == [PERCENT_APPROVED]


LARGE = 'name = "big"\nreward = "0.05"\nassignments = 20\ncountries = ["US"]'


async def test_live_publish_refuses_without_confirmation(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, LARGE)
    args = ("hits", "publish", str(path), "--live", "--endpoint-url", fake_mturk.url)
    # Not a terminal and no --yes: nothing is created.
    status, out, err = await cli(*args, stdin=io.StringIO("yes\n"))
    assert status == 3 and "needs a yes on a terminal, or --yes" in err
    # The cost was shown first: 20 x ($0.05 + 40%) = $1.40; split: $1.20.
    assert "$1.40" in out and "40%" in out and "$1.20" in out
    # On a terminal, answering no (twice: to the split, then to publishing).
    status, out, _ = await cli(*args, stdin=Terminal("n\nno\n"))
    assert status == 3
    # On a terminal with nothing typed.
    status, _, _ = await cli(*args, stdin=Terminal(""))
    assert status == 3
    assert "CreateHIT" not in fake_mturk.fake.calls
    assert "CreateQualificationType" not in fake_mturk.fake.calls
    assert not fake_mturk.fake.hits


async def test_live_publish_on_terminal_confirmation_with_split(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, LARGE)
    args = ("hits", "publish", str(path), "--live", "--endpoint-url", fake_mturk.url)
    status, out, _ = await cli(*args, stdin=Terminal("y\nyes\n"))
    assert status == 0, out
    assert "Account balance: $10000.00" in out
    sizes = sorted(h.max_assignments for h in fake_mturk.fake.hits.values())
    assert sizes == [6, 7, 7]
    # Split HITs keep each worker to one of them: they exclude their own batch.
    (qual,) = rows(tmp_path, "SELECT qualification_type_id FROM batch_qualifications")
    for hit in fake_mturk.fake.hits.values():
        assert hit.requirements[-1]["QualificationTypeId"] == qual[0]
        assert hit.requirements[-1]["Comparator"] == "DoesNotExist"
    assert rows(tmp_path, "SELECT sandbox, hit_size FROM batches") == [(0, 7)]


async def test_live_publish_beyond_the_balance_needs_a_yes_on_a_terminal(tmp_path, fake_mturk):
    fake_mturk.fake.balance = Decimal("1.00")
    path = write_experiment(tmp_path, LARGE)
    args = ("hits", "publish", str(path), "--live", "--endpoint-url", fake_mturk.url)
    # --yes answers the cost, not a balance that cannot pay it: a script stops.
    status, out, err = await cli(*args, "--yes", stdin=io.StringIO("y\n"))
    assert status == 3, out
    assert "Account balance: $1.00" in out
    assert "WARNING: the account balance $1.00 does not cover the cost, up to $1.40" in err
    assert "--yes does not answer this" in err
    assert not fake_mturk.fake.hits
    # Not split (n), then yes to the balance question on a terminal.
    status, out, err = await cli(*args, stdin=Terminal("n\ny\n"))
    assert status == 0, out + err
    assert "WARNING" in err and [h.max_assignments for h in fake_mturk.fake.hits.values()] == [20]


async def test_live_publish_with_yes_for_scripts(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, LARGE)
    status, out, _ = await cli(
        "hits", "publish", str(path), "--live", "--yes", "--endpoint-url", fake_mturk.url
    )
    assert status == 0, out
    assert [h.max_assignments for h in fake_mturk.fake.hits.values()] == [20]
    status, out, _ = await cli(
        "hits", "publish", str(path), "--live", "--yes", "--endpoint-url", fake_mturk.url
    )
    assert status == 0 and "Nothing to publish" in out


async def test_split_flag_in_the_sandbox(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, LARGE)
    status, out, _ = await cli(
        "hits", "publish", str(path), "--split", "--endpoint-url", fake_mturk.url
    )
    assert status == 0 and "3 x" not in out
    assert sorted(h.max_assignments for h in fake_mturk.fake.hits.values()) == [6, 7, 7]


async def on_a_terminal(*argv: str) -> bytes:
    """Run ``probe-server ARGV`` with stderr on a pseudo-terminal; what it drew there."""
    main_fd, terminal = os.openpty()
    # A terminal of 24 x 80: tqdm draws nothing on one of no size.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "probe_server",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=terminal,
        )
    finally:
        os.close(terminal)
    out, _ = await process.communicate()
    assert process.returncode == 0, out
    shown = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        shown += chunk
    os.close(main_fd)
    return shown


async def test_progress_shows_on_a_terminal(tmp_path, fake_mturk):
    path = write_experiment(tmp_path)
    endpoint = ("--endpoint-url", fake_mturk.url)
    shown = await on_a_terminal("hits", "publish", str(path), *endpoint)
    assert b"publishing" in shown and b"HIT" in shown
    shown = await on_a_terminal("hits", "sync", str(path), *endpoint)
    assert b"syncing" in shown and b"HIT" in shown
    # Without a terminal: the same run, no bar.
    status, _, err = await cli("hits", "sync", str(path), *endpoint)
    assert status == 0 and "syncing" not in err


# -- credentials ---------------------------------------------------------------------


async def test_credentials_are_never_printed_or_logged(tmp_path, fake_mturk, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMARKERKEYID12345")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "marker-secret-value")
    caplog.set_level(logging.DEBUG)
    path = write_experiment(tmp_path)
    outputs = []
    for argv in (
        ("hits", "publish", str(path)),
        ("hits", "sync", str(path)),
        ("hits", "status", str(path)),
        ("hits", "balance"),
    ):
        status, out, err = await cli(
            "--log-level", "DEBUG", *argv, "--endpoint-url", fake_mturk.url
        )
        assert status == 0, err
        outputs += [out, err]
    text = "\n".join([*outputs, caplog.text])
    assert "AKIAMARKERKEYID12345" not in text and "marker-secret-value" not in text
    assert "Credential=" not in text


async def test_tests_cannot_reach_a_real_endpoint():
    """conftest points AWS's endpoint variables at a closed loopback port."""
    for target in (Target(), Target(live=True)):
        assert target.url == "http://127.0.0.1:9" and target.custom
        async with mturk_client(target, attempts=1) as client:
            with pytest.raises(BotoCoreError, match=r"127\.0\.0\.1:9"):
                await account_balance(client)


def test_default_endpoints(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_MTURK")
    assert Target().url == "https://mturk-requester-sandbox.us-east-1.amazonaws.com"
    assert Target(live=True).url == "https://mturk-requester.us-east-1.amazonaws.com"
    assert not Target().custom
    assert Target(endpoint_url="http://127.0.0.1:1").url == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_MTURK", "http://127.0.0.1:2")
    assert Target(live=True).url == "http://127.0.0.1:2"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert Target(live=True).url == "https://mturk-requester.us-east-1.amazonaws.com"


async def test_balance_command(fake_mturk):
    status, out, _ = await cli("hits", "balance", "--endpoint-url", fake_mturk.url)
    assert status == 0 and "$10000.00" in out and "sandbox" in out


# -- sync, review, status, expire -------------------------------------------------------


def submit(fake, hit_id: str, worker_id: str, **answers: str) -> str:
    worker = fake.worker(worker_id, "US")
    assignment, _ = fake.accept(hit_id, worker)
    fake.external_submit([("assignmentId", assignment.assignment_id), *answers.items()])
    return assignment.assignment_id


async def test_sync_reads_more_than_one_page(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, 'name = "many"\nreward = "0.05"\nassignments = 130')
    assert (await cli("hits", "publish", str(path), "--endpoint-url", fake_mturk.url))[0] == 0
    fake = fake_mturk.fake
    (hit_id,) = fake.hits
    for i in range(120):
        submit(fake, hit_id, f"AWORKER{i:03d}", red=str(i % 4 + 1), token=f"t{i}")
    status, out, _ = await cli("hits", "sync", str(path), "--endpoint-url", fake_mturk.url)
    assert status == 0 and "Synced 120 assignments (120 new)" in out
    # botocore's paginator followed MTurk's NextToken: 100 + 20.
    assert fake.calls.count("ListAssignmentsForHIT") == 2
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT worker_id) FROM assignments") == [
        (120, 120)
    ]
    (answers,) = rows(tmp_path, "SELECT answers FROM assignments WHERE worker_id = 'AWORKER007'")[0]
    assert json.loads(answers) == {"red": "4", "token": "t7"}
    assert rows(tmp_path, "SELECT count(*) FROM qualification_grants") == [(120,)]
    # A second sync refreshes; it grants nobody twice.
    status, out, _ = await cli("hits", "sync", str(path), "--endpoint-url", fake_mturk.url)
    assert "(0 new)" in out and "to 0 more workers" in out
    assert fake.calls.count("AssociateQualificationWithWorker") == 120


async def test_sync_stores_accept_submit_and_review_times(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, 'name = "b1"\nreward = "0.05"\nassignments = 2')
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "publish", str(path), *endpoint))[0] == 0
    fake = fake_mturk.fake
    (hit_id,) = fake.hits
    fake.advance(100)
    assignment, _ = fake.accept(hit_id, fake.worker("ATIMED", "US"))
    fake.advance(42.5)
    fake.external_submit(
        [("assignmentId", assignment.assignment_id), ("token", "tt"), ("red", "2")]
    )
    fake.advance(60)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0
    ((status, accepted, submitted, reviewed, answers),) = rows(
        tmp_path, "SELECT status, accept_time, submit_time, review_time, answers FROM assignments"
    )
    assert status == "Submitted" and reviewed is None
    assert accepted == pytest.approx(assignment.accept_time, abs=1e-3)
    assert submitted == pytest.approx(assignment.accept_time + 42.5, abs=1e-3)
    assert json.loads(answers) == {"token": "tt", "red": "2"}
    # Approved on MTurk (by hand, say): the next sync brings status and time.
    fake.advance(10)
    await mturk_approve(fake_mturk.url, assignment.assignment_id)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0
    ((status, reviewed),) = rows(tmp_path, "SELECT status, review_time FROM assignments")
    assert status == "Approved"
    assert reviewed == pytest.approx(fake.assignments[assignment.assignment_id].approval_time)


async def mturk_approve(url: str, assignment_id: str) -> None:
    async with mturk_client(Target(endpoint_url=url), attempts=1) as client:
        await client.approve_assignment(AssignmentId=assignment_id)


async def test_small_pages_through_the_api(tmp_path, fake_mturk):
    experiment = load_experiment(write_experiment(tmp_path))
    async with open_requester(
        experiment, Target(endpoint_url=fake_mturk.url), page_size=1
    ) as requester:
        await requester.publish(await requester.plan())
        (hit_id,) = fake_mturk.fake.hits
        for i in range(3):
            submit(fake_mturk.fake, hit_id, f"AW{i}", red="1")
        report = await requester.sync()
    assert (report.assignments, report.new, report.granted) == (3, 3, 3)
    assert fake_mturk.fake.calls.count("ListAssignmentsForHIT") == 3


def insert_session(tmp_path: Path, token: str, assignment_id: str | None, red: int) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "probe.db")) as conn, conn:
        conn.execute(
            "INSERT INTO sessions (token, created, ipv4, port, red_count, blue_count, visit,"
            " assignment_id) VALUES (?, 0, '192.0.2.1', 1, ?, 1, 'accepted', ?)",
            (token, red, assignment_id),
        )


async def test_review_status_and_expire(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, 'name = "b1"\nreward = "0.05"\nassignments = 6')
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "publish", str(path), *endpoint))[0] == 0
    fake = fake_mturk.fake
    (hit_id,) = fake.hits
    right = submit(fake, hit_id, "ARIGHT", token="tokright", red="3")
    wrong = submit(fake, hit_id, "AWRONG", token="tokwrong", red="2")
    unknown = submit(fake, hit_id, "AUNKNOWN", token="toknobody", red="1")
    no_token = submit(fake, hit_id, "ANOTOKEN", red="4")
    insert_session(tmp_path, "tokright", right, 3)
    insert_session(tmp_path, "tokwrong", wrong, 3)
    insert_session(tmp_path, "tokother", no_token, 4)
    fake.accept(hit_id, fake.worker("APENDING", "US"))
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0

    status, out, _ = await cli("hits", "review", str(path), "--dry-run", *endpoint)
    assert status == 0 and "dry run" in out
    assert "ApproveAssignment" not in fake.calls and "RejectAssignment" not in fake.calls
    assert rows(tmp_path, "SELECT count(*) FROM reviews") == [(0,)]

    status, out, _ = await cli("hits", "status", str(path), *endpoint)
    assert status == 0
    assert out.splitlines()[-1].split() == ["b1", "1", "1", "1", "4", "0", "0"]

    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 0, out
    assert "Approved 2, rejected 1, left 1 for you to decide" in out
    statuses = {a.assignment_id: a.status for a in fake.assignments.values()}
    assert statuses[right] == statuses[no_token] == "Approved"
    assert statuses[wrong] == "Rejected" and statuses[unknown] == "Submitted"
    status, out, _ = await cli("hits", "status", str(path), *endpoint)
    assert status == 0
    assert out.splitlines()[-1].split() == ["b1", "1", "1", "1", "1", "2", "1"]
    assert "The number of red balls on the page was 3 and your answer said 2" in (
        fake.assignments[wrong].feedback or ""
    )
    assert rows(
        tmp_path, "SELECT assignment_id, status FROM assignments ORDER BY assignment_id"
    ) == sorted(
        [(right, "Approved"), (wrong, "Rejected"), (unknown, "Submitted"), (no_token, "Approved")]
    )

    status, out, _ = await cli("hits", "review", str(path), "--approve-all", *endpoint)
    assert status == 0 and "Approved 1" in out
    assert fake.assignments[unknown].status == "Approved"

    status, out, _ = await cli("hits", "expire", str(path), *endpoint)
    assert status == 0 and "Expired 1 HITs of batch b1" in out
    assert fake.counts(fake.hits[hit_id])["NumberOfAssignmentsAvailable"] == 0
    ((expired, expires),) = rows(
        tmp_path, "SELECT b.expired, h.expires FROM batches b JOIN hits h ON h.batch = b.name"
    )
    assert expired == expires == pytest.approx(fake.now())


async def test_expire_names_the_batches_it_ends(tmp_path, fake_mturk):
    path = write_experiment(
        tmp_path,
        'name = "us"\nreward = "0.05"\nassignments = 2\ncountries = ["US"]',
        'name = "in"\nreward = "0.10"\nassignments = 2\ncountries = ["IN"]',
    )
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "publish", str(path), *endpoint))[0] == 0
    fake = fake_mturk.fake
    hit_of = {h.annotation.split("/")[1]: h for h in fake.hits.values() if h.annotation}
    status, out, _ = await cli("hits", "expire", str(path), "us", *endpoint)
    assert status == 0 and out.splitlines() == ["Expired 1 HITs of batch us."]
    assert fake.counts(hit_of["us"])["NumberOfAssignmentsAvailable"] == 0
    # The batch not named runs on.
    assert fake.counts(hit_of["in"])["NumberOfAssignmentsAvailable"] == 2
    assert hit_of["in"].expiration > fake.now()
    assert rows(tmp_path, "SELECT name, expired IS NOT NULL FROM batches ORDER BY name") == [
        ("in", 0),
        ("us", 1),
    ]
    fake.accept(hit_of["in"].hit_id, fake.worker("AINDIA", "IN"))
    status, _, err = await cli("hits", "expire", str(path), "nosuch", *endpoint)
    assert status == 1 and "no batch named 'nosuch'" in err


async def test_review_records_what_mturk_refused(tmp_path, fake_mturk):
    experiment = load_experiment(write_experiment(tmp_path))
    target = Target(endpoint_url=fake_mturk.url)
    async with open_requester(experiment, target) as requester:
        await requester.publish(await requester.plan())
        (hit_id,) = fake_mturk.fake.hits
        assignment_id = submit(fake_mturk.fake, hit_id, "AW", token="tok", red="2")
        insert_session(tmp_path, "tok", assignment_id, 2)
        await requester.sync()
        # Approved on MTurk meanwhile (e.g. by hand, or automatically).
        fake_mturk.fake.assignments[assignment_id].status = "Approved"
        (decision,) = await requester.review()
    assert decision.error is not None and "status of: Submitted" in decision.error
    assert rows(tmp_path, "SELECT status FROM assignments") == [("Approved",)]
    assert rows(tmp_path, "SELECT decision, done, error IS NOT NULL FROM reviews") == [
        ("approve", None, 1)
    ]


def catalogue_text(language: str, msgid: str, **params: Any) -> str:
    """A message as the language's catalogue translates it (not as review renders it)."""
    message = read_catalogue(language).get(msgid)
    assert message is not None and message.string, msgid
    return str(message.string) % params if params else str(message.string)


async def test_review_feedback_is_in_the_batch_language(tmp_path, fake_mturk):
    path = write_experiment(
        tmp_path,
        'name = "en"\nreward = "0.05"\nassignments = 2',
        'name = "ja"\nreward = "0.05"\nassignments = 2\nlanguage = "ja"',
        'name = "hi"\nreward = "0.05"\nassignments = 2\nlanguage = "hi"',
    )
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "publish", str(path), *endpoint))[0] == 0
    fake = fake_mturk.fake
    hit_of = {
        hit.annotation.split("/")[1]: hit.hit_id for hit in fake.hits.values() if hit.annotation
    }
    answered = {}
    for batch in ("en", "ja", "hi"):
        right = submit(fake, hit_of[batch], f"AR{batch.upper()}", token=f"r{batch}", red="3")
        wrong = submit(fake, hit_of[batch], f"AW{batch.upper()}", token=f"w{batch}", red="1")
        insert_session(tmp_path, f"r{batch}", right, 3)
        insert_session(tmp_path, f"w{batch}", wrong, 3)
        answered[batch] = (right, wrong)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0
    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 0 and "Approved 3, rejected 3" in out, out
    feedback = {a.assignment_id: a.feedback for a in fake.assignments.values()}
    wrong_count = (
        "Thank you for taking part. The number of red balls on the page was %(shown)d and your"
        " answer said %(reported)d, so we cannot approve this HIT. If you think this is a"
        " mistake, please write to us through MTurk."
    )
    right, wrong = answered["en"]
    assert feedback[right] == "Thank you for counting the balls!"
    assert feedback[wrong] == wrong_count % {"shown": 3, "reported": 1}
    for language in ("ja", "hi"):
        right, wrong = answered[language]
        assert feedback[right] == catalogue_text(language, "Thank you for counting the balls!")
        assert feedback[wrong] == catalogue_text(language, wrong_count, shown=3, reported=1)
        assert feedback[wrong] != feedback[answered["en"][1]]


async def test_review_on_a_low_balance_leaves_the_rest_for_a_later_run(tmp_path, fake_mturk):
    path = write_experiment(tmp_path, 'name = "b1"\nreward = "0.05"\nassignments = 3')
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "publish", str(path), *endpoint))[0] == 0
    fake = fake_mturk.fake
    (hit_id,) = fake.hits
    paid = submit(fake, hit_id, "APAID", token="tpaid", red="2")
    fake.advance(1)
    unpaid = submit(fake, hit_id, "AUNPAID", token="tunpaid", red="2")
    insert_session(tmp_path, "tpaid", paid, 2)
    insert_session(tmp_path, "tunpaid", unpaid, 2)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0
    # Enough for one approval: $0.05 and MTurk's $0.01.
    fake.balance = Decimal("0.06")
    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 1, out
    assert f"approve  {unpaid} b1 worker AUNPAID: red count 2 is right FAILED: This Requester" in (
        out
    )
    assert "insufficient funds" in out
    assert "1 refused by MTurk, left as they were for a later run" in out
    assert (fake.assignments[paid].status, fake.assignments[unpaid].status) == (
        "Approved",
        "Submitted",
    )
    assert fake.balance == 0
    assert rows(tmp_path, "SELECT assignment_id, status FROM assignments ORDER BY submit_time") == [
        (paid, "Approved"),
        (unpaid, "Submitted"),
    ]
    # Funds added: the next run approves what is left, and only that.
    fake.balance = Decimal("5.00")
    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 0 and "Approved 1, rejected 0, left 0" in out, out
    assert fake.assignments[unpaid].status == "Approved"
    assert ": $4.94 " in (await cli("hits", "balance", *endpoint))[1]
    assert rows(
        tmp_path,
        "SELECT assignment_id, done IS NOT NULL, error IS NOT NULL FROM reviews ORDER BY id",
    ) == [(paid, 1, 0), (unpaid, 0, 1), (unpaid, 1, 0)]


async def test_unknown_batch_is_refused(tmp_path, fake_mturk):
    path = write_experiment(tmp_path)
    status, _, err = await cli(
        "hits", "publish", str(path), "nosuch", "--endpoint-url", fake_mturk.url
    )
    assert status == 1 and "no batch named 'nosuch'" in err


# -- review decisions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "sessions", "action", "reason"),
    [
        ({"token": "t", "red": "3"}, [SessionFacts("t", "A1", 3)], "approve", "is right"),
        ({"token": "t", "red": " 3 "}, [SessionFacts("t", "A1", 3)], "approve", "is right"),
        ({"token": "t", "red": "2"}, [SessionFacts("t", "A1", 3)], "reject", "page showed 3"),
        ({"token": "t", "red": "x"}, [SessionFacts("t", "A1", 3)], "reject", "no readable"),
        ({"token": "t", "red": "3"}, [], "skip", "never served"),
        ({"token": "t", "red": "3"}, [SessionFacts("t", "A2", 3)], "skip", "another assignment"),
        ({"red": "3"}, [SessionFacts("s", "A1", 3)], "approve", "is right"),
        ({"red": "3"}, [SessionFacts("s", "A1", 3), SessionFacts("u", "A1", 1)], "skip", "2 sess"),
        ({"red": "3"}, [], "skip", "0 sessions"),
    ],
)
def test_decide(answers, sessions, action, reason):
    decision = decide("A1", "AW", "b", answers, sessions)
    assert decision.action == action
    assert reason in decision.reason
    if action == "reject":
        assert decision.feedback and decision.feedback.startswith("Thank you")
        assert len(decision.feedback) <= 1024


def test_request_tokens_are_stable_and_short():
    token = request_token("exp", "batch", 3)
    assert token == request_token("exp", "batch", 3) != request_token("exp", "batch", 4)
    assert 1 <= len(token) <= 64
