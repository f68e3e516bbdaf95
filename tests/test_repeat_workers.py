"""A worker who takes two HITs of an experiment before `hits sync` could keep
them out: the survey page refuses the second, and review pays the first only.

MTurk enforces the "took part" qualification only once sync has granted it,
so until then the fake (like MTurk) lets one worker accept two HITs of a
split batch, or HITs of two batches that exclude each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from probe_server.mturk.fake import FakeServer
from probe_server.mturk.requester import Participation, earlier_participation
from probe_server.server import ProbeServer

from .test_handoff import handoff_of
from .test_requester import cli, rows
from .test_web import Page

REPEAT_HEADING = "<h1>You have already taken part in this study</h1>"


def experiment(tmp_path: Path, server: ProbeServer, *batches: str) -> Path:
    path = tmp_path / "experiment.toml"
    text = (
        'name = "repeat"\ntitle = "Count the balls"\ndescription = "Count them."\n'
        f'external_url = "{server.base_urls["ipv4"]}/"\ndatabase = "probe.db"\n'
    )
    for batch in batches:
        text += f"\n[[batches]]\n{batch}\n"
    path.write_text(text)
    return path


async def publish(path: Path, fake: FakeServer, *extra: str) -> dict[str, list[str]]:
    """Publish through the CLI; the HIT ids of each batch, in order."""
    status, out, err = await cli("hits", "publish", str(path), "--endpoint-url", fake.url, *extra)
    assert status == 0, out + err
    hits: dict[str, list[str]] = {}
    for hit in sorted(fake.fake.hits.values(), key=lambda h: h.created):
        assert hit.annotation is not None
        hits.setdefault(hit.annotation.split("/")[1], []).append(hit.hit_id)
    return hits


async def accept(http: aiohttp.ClientSession, fake: FakeServer, hit_id: str, worker: str) -> Any:
    async with http.post(
        f"{fake.url}/_fake/accept", json={"hitId": hit_id, "workerId": worker, "country": "US"}
    ) as response:
        body = await response.json()
        assert response.status == 200, body
        return body


async def open_task(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as response:
        assert response.status == 200
        return await response.text()


async def test_the_second_hit_of_a_split_batch_is_refused_before_any_sync(
    tmp_path, turk_server, fake_mturk, http, db
):
    path = experiment(tmp_path, turk_server, 'name = "b"\nreward = "0.05"\nassignments = 10')
    (first, second) = (await publish(path, fake_mturk, "--split"))["b"]
    # Nobody has been synced yet: MTurk lets the worker accept both HITs.
    one = await accept(http, fake_mturk, first, "AREPEAT")
    two = await accept(http, fake_mturk, second, "AREPEAT")
    page = Page(await open_task(http, one["url"]))
    assert len(page.red) >= 1
    text = await open_task(http, two["url"])
    assert REPEAT_HEADING in text
    assert "<img" not in text and "<form" not in text and "/submit" not in text
    # No session for the refused visit; its request is logged as a repeat.
    assert [tuple(r) for r in db("SELECT hit_id, worker_id FROM sessions")] == [(first, "AREPEAT")]
    assert db("SELECT count(*) FROM requests WHERE kind = 'repeat'")[0][0] == 1
    # The worker's own HIT still opens, however often they reload it.
    again = Page(await open_task(http, one["url"]))
    assert again.token != page.token
    # Another worker takes the second HIT as usual.
    other = await accept(http, fake_mturk, second, "AOTHER")
    assert Page(await open_task(http, other["url"])).token
    assert db("SELECT count(*) FROM sessions")[0][0] == 3


async def test_batches_that_exclude_each_other_and_one_that_does_not(
    tmp_path, turk_server, fake_mturk, http, db
):
    path = experiment(
        tmp_path,
        turk_server,
        'name = "open"\nreward = "0.05"\nassignments = 3',
        'name = "closed"\nreward = "0.05"\nassignments = 3\nlanguage = "ja"\n'
        "exclude_other_batches = true",
    )
    hits = await publish(path, fake_mturk)
    (open_hit,), (closed_hit,) = hits["open"], hits["closed"]
    # "closed" keeps out workers of "open": refused, in the batch's language.
    first = await accept(http, fake_mturk, open_hit, "AFIRST")
    Page(await open_task(http, first["url"]))
    text = await open_task(http, (await accept(http, fake_mturk, closed_hit, "AFIRST"))["url"])
    assert '<html lang="ja"' in text
    assert "<h1>この調査にはすでに参加していただいています</h1>" in text
    assert "<img" not in text and "<form" not in text
    # "open" excludes nobody, as on MTurk: a worker of "closed" may take it.
    second = await accept(http, fake_mturk, closed_hit, "ASECOND")
    Page(await open_task(http, second["url"]))
    Page(await open_task(http, (await accept(http, fake_mturk, open_hit, "ASECOND"))["url"]))
    assert rows(tmp_path, "SELECT count(*) FROM sessions") == [(3,)]
    assert db("SELECT count(*) FROM requests WHERE kind = 'repeat'")[0][0] == 1


async def answer(http: aiohttp.ClientSession, server: ProbeServer, page: Page) -> Any:
    """Answer right through the probe server, then follow its hand-off to externalSubmit."""
    async with http.post(
        f"{server.base_urls['ipv4']}/submit",
        data={"token": page.token, "red": str(len(page.red)), "blue": str(len(page.blue))},
    ) as response:
        assert response.status == 200
        action, fields = handoff_of(await response.text())
    async with http.post(action, data=fields) as response:
        assert response.status == 200, await response.text()
    return fields


async def test_review_pays_a_repeat_worker_once_even_with_approve_all(
    tmp_path, turk_server, fake_mturk, http
):
    path = experiment(tmp_path, turk_server, 'name = "b"\nreward = "0.05"\nassignments = 10')
    (first, second) = (await publish(path, fake_mturk, "--split"))["b"]
    fake = fake_mturk.fake
    one = await accept(http, fake_mturk, first, "AREPEAT")
    two = await accept(http, fake_mturk, second, "AREPEAT")
    other = await accept(http, fake_mturk, second, "AOTHER")
    fields = await answer(http, turk_server, Page(await open_task(http, one["url"])))
    fake.advance(60)
    # The second HIT's page refused them; they post its form to MTurk anyway,
    # with the answer of their first page.
    assert REPEAT_HEADING in await open_task(http, two["url"])
    async with http.post(
        f"{fake_mturk.url}/mturk/externalSubmit",
        data={**fields, "assignmentId": two["assignmentId"]},
    ) as response:
        assert response.status == 200
    fake.advance(60)
    await answer(http, turk_server, Page(await open_task(http, other["url"])))
    endpoint = ("--endpoint-url", fake_mturk.url)
    assert (await cli("hits", "sync", str(path), *endpoint))[0] == 0

    status, out, _ = await cli("hits", "review", str(path), "--dry-run", *endpoint)
    assert status == 0
    lines = {line.split()[1]: line for line in out.splitlines()[:-1]}
    assert lines[one["assignmentId"]].startswith("approve")
    assert lines[two["assignmentId"]].startswith("reject")
    assert (
        f"repeat worker: took part first through assignment {one['assignmentId']}"
        in (lines[two["assignmentId"]])
    )
    status, out, _ = await cli("hits", "review", str(path), "--approve-all", *endpoint)
    assert status == 0 and "Approved 2, rejected 1" in out, out
    statuses = {a.assignment_id: (a.status, a.feedback) for a in fake.assignments.values()}
    assert statuses[one["assignmentId"]] == ("Approved", "Thank you for counting the balls!")
    assert statuses[other["assignmentId"]][0] == "Approved"
    status, feedback = statuses[two["assignmentId"]]
    assert status == "Rejected" and feedback is not None
    assert "Each worker may take part in this study only once" in feedback
    assert rows(
        tmp_path, "SELECT decision FROM reviews WHERE assignment_id = ?", two["assignmentId"]
    ) == [("reject",)]


@pytest.mark.parametrize(
    ("this_batch", "other_batch", "same_hit", "excludes", "repeat"),
    [
        ("b", "b", False, False, True),  # another HIT of a split batch
        ("b", "b", True, False, False),  # the same HIT: never a repeat
        ("b", "c", False, True, True),  # b keeps out workers of c
        ("b", "c", False, False, False),  # b excludes nobody
    ],
)
def test_earlier_participation(this_batch, other_batch, same_hit, excludes, repeat):
    this = Participation("A2", "H2", this_batch, submit_time=20.0, accept_time=5.0)
    earlier = Participation("A1", "H2" if same_hit else "H1", other_batch, 10.0, 1.0)
    later = Participation("A3", "H3", other_batch, 30.0, 1.0)
    flags = {"b": excludes, "c": False}
    assert earlier_participation(this, [this, later, earlier], flags) == (
        earlier if repeat else None
    )
    # The first of a worker's assignments is never the repeat.
    assert earlier_participation(earlier, [this, earlier, later], {"b": True, "c": True}) is None
