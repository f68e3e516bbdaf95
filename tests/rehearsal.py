"""A whole experiment rehearsed against the fake MTurk, through the real CLI.

:func:`run_rehearsal` publishes two batches (US at $0.05 and IN at $0.10,
each excluding the other's workers), lets simulated workers preview and
accept HITs on the fake's worker site, open the survey with MTurk's
parameters, fetch the balls, answer through the probe server and follow its
hand-off form to the fake's externalSubmit, then syncs, reviews and expires
with ``probe-server hits ...``. It returns what it simulated, so any test
(the report's too) can hold the database against it.

The fake's clock stands still unless moved (see the ``fake_mturk`` fixture)
and is moved forward between workers, so completions are spread over hours
of MTurk time without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp

from probe_server.cli import main
from probe_server.mturk.fake import FakeServer
from probe_server.server import ProbeServer


@dataclass(frozen=True)
class WorkerScript:
    """What one simulated worker does, and when (hours after publishing)."""

    batch: str
    hours: float
    worker_id: str | None  # None: an anonymous preview
    country: str
    accept: bool = True
    submit: bool = True
    right: bool = True
    ipv6: bool = False


# The crowd of the rehearsal. Per batch: some previews, some right and some
# wrong answers, one worker who accepts and never submits.
CROWD: tuple[WorkerScript, ...] = (
    WorkerScript("us-005", 0.1, None, "US", accept=False),
    WorkerScript("in-010", 0.2, None, "IN", accept=False),
    WorkerScript("in-010", 0.25, "AIN1WORKER", "IN"),
    WorkerScript("us-005", 0.5, "AUS1WORKER", "US", ipv6=True),
    WorkerScript("us-005", 0.75, None, "US", accept=False),
    WorkerScript("us-005", 1.0, "AUS2WORKER", "US"),
    WorkerScript("us-005", 2.0, "AUS3WORKER", "US", right=False),
    WorkerScript("in-010", 3.0, "AIN2WORKER", "IN", right=False),
    WorkerScript("us-005", 5.0, "AUS4WORKER", "US", ipv6=True),
    WorkerScript("us-005", 6.0, "AUS5WORKER", "US", submit=False),
    WorkerScript("in-010", 8.0, "AIN3WORKER", "IN", ipv6=True),
)

EXPERIMENT = """\
name = "rehearsal"
title = "Count the red and blue balls"
description = "Count the red balls and the blue balls you can see."
keywords = ["survey", "counting"]
external_url = "{external_url}"
frame_height = 0
assignment_duration = 600
lifetime = 86400
auto_approval_delay = 259200
database = "{database}"

[[batches]]
name = "us-005"
reward = "0.05"
assignments = 5
countries = ["US"]
exclude_other_batches = true

[[batches]]
name = "in-010"
reward = "0.10"
assignments = 4
countries = ["IN"]
exclude_other_batches = true
"""

BATCHES = {"us-005": ("0.05", "US"), "in-010": ("0.10", "IN")}
FRESH_WORKER = "AUSFRESHWORKER"


@dataclass
class SimulatedWorker:
    script: WorkerScript
    hit_id: str
    assignment_id: str | None = None
    session_token: str | None = None
    red_shown: int | None = None
    red_answered: int | None = None
    blue_fetched: int = 0
    submitted_at: float | None = None  # fake MTurk time of externalSubmit

    @property
    def batch(self) -> str:
        return self.script.batch

    @property
    def completed(self) -> bool:
        return self.submitted_at is not None

    @property
    def correct(self) -> bool:
        return self.completed and self.red_answered == self.red_shown


@dataclass
class Rehearsal:
    """What the rehearsal did: files, the fake, and every simulated worker."""

    db_path: Path
    experiment_path: Path
    fake: FakeServer
    server: ProbeServer
    # Fake MTurk time each batch's HIT was created (became assignable).
    published_at: dict[str, float]
    workers: list[SimulatedWorker]
    # CLI runs: argv -> (exit status, stdout)
    cli: list[tuple[list[str], int, str]] = field(default_factory=list)
    # Worker id -> why the fake refused them the other batch's HIT after sync.
    refused: dict[str, list[str]] = field(default_factory=dict)

    def of(self, batch: str) -> list[SimulatedWorker]:
        return [w for w in self.workers if w.batch == batch]

    def completed(self, batch: str) -> list[SimulatedWorker]:
        return [w for w in self.of(batch) if w.completed]

    def correct(self, batch: str) -> list[SimulatedWorker]:
        return [w for w in self.of(batch) if w.correct]

    def completion_hours(self, batch: str) -> list[float]:
        """Figure 2's data: hours from publishing to each completion, in order."""
        return sorted(
            (w.submitted_at - self.published_at[batch]) / 3600
            for w in self.completed(batch)
            if w.submitted_at is not None
        )


class _Page(HTMLParser):
    """Images, hidden inputs and form actions of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.forms: list[dict[str, Any]] = []
        self.lang = ""
        self.heading = ""
        self._in_h1 = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "html":
            self.lang = a.get("lang", "")
        elif tag == "h1":
            self._in_h1 = True
        elif tag == "form":
            self.forms.append({"action": a.get("action", ""), "fields": [], "inputs": []})
        elif tag == "input" and self.forms and a.get("type") == "hidden":
            self.forms[-1]["fields"].append((a["name"], a.get("value", "")))
        elif tag == "input" and self.forms:
            # What the worker fills in.
            self.forms[-1]["inputs"].append(a["name"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.heading += data


async def run_cli(rehearsal: Rehearsal | KindRehearsal, *args: str) -> tuple[int, str]:
    """``probe-server ARGS`` in a thread (it runs its own event loop), stdout captured."""
    argv = list(args)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = await asyncio.to_thread(main, argv)
    rehearsal.cli.append((argv, status, out.getvalue()))
    return status, out.getvalue()


async def hits(rehearsal: Rehearsal | KindRehearsal, action: str, *extra: str) -> str:
    status, out = await run_cli(
        rehearsal,
        "hits",
        action,
        str(rehearsal.experiment_path),
        "--endpoint-url",
        rehearsal.fake.url,
        *extra,
    )
    assert status == 0, (action, out)
    return out


async def _post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def simulate(
    rehearsal: Rehearsal, http: aiohttp.ClientSession, script: WorkerScript, hit_id: str
) -> SimulatedWorker:
    """One worker: preview, or accept, open the survey, fetch, answer, hand on."""
    fake_url = rehearsal.fake.url
    worker = SimulatedWorker(script, hit_id)
    if script.accept:
        assert script.worker_id is not None
        status, body = await _post_json(
            http,
            f"{fake_url}/_fake/accept",
            {"hitId": hit_id, "workerId": script.worker_id, "country": script.country},
        )
        assert status == 200, body
        worker.assignment_id = body["assignmentId"]
    else:
        status, body = await _post_json(http, f"{fake_url}/_fake/preview", {"hitId": hit_id})
        assert status == 200, body
    async with http.get(body["url"]) as response:
        assert response.status == 200, await response.text()
        survey = _Page(await response.text())
    ((form,),) = ([f for f in survey.forms if f["action"] == "/submit"],)
    worker.session_token = dict(form["fields"])["token"]
    red = [u for u in survey.images if "/red/" in u]
    blue = [u for u in survey.images if "/blue/" in u]
    worker.red_shown = len(red)
    for url in red + (blue if script.ipv6 else []):
        async with http.get(url) as response:
            assert response.status == 200
            worker.blue_fetched += "/blue/" in url
    if not (script.accept and script.submit):
        return worker
    worker.red_answered = len(red) if script.right else len(red) + 1
    async with http.post(
        f"{rehearsal.server.base_urls['ipv4']}/submit",
        data={
            "token": worker.session_token,
            "red": str(worker.red_answered),
            "blue": str(worker.blue_fetched),
        },
    ) as response:
        assert response.status == 200
        handoff = _Page(await response.text())
    # The answer page's form goes to MTurk's (here: the fake's) externalSubmit.
    (form,) = handoff.forms
    assert form["action"] == f"{fake_url}/mturk/externalSubmit", form
    async with http.post(form["action"], data=form["fields"]) as response:
        assert response.status == 200, await response.text()
    worker.submitted_at = rehearsal.fake.fake.now()
    return worker


async def run_rehearsal(
    tmp_path: Path, server: ProbeServer, fake: FakeServer, crowd: Sequence[WorkerScript] = CROWD
) -> Rehearsal:
    """Publish, simulate ``crowd``, sync, review, check exclusion, expire, sync."""
    experiment_path = tmp_path / "experiment.toml"
    db_path = tmp_path / "probe.db"
    experiment_path.write_text(
        EXPERIMENT.format(external_url=f"{server.base_urls['ipv4']}/", database=db_path)
    )
    rehearsal = Rehearsal(db_path, experiment_path, fake, server, {}, [])
    await hits(rehearsal, "publish")
    # Which HIT is which batch's, and when MTurk (the fake) created it.
    hit_of = {}
    for hit in fake.fake.hits.values():
        assert hit.annotation is not None
        batch = hit.annotation.split("/")[1]
        hit_of[batch] = hit.hit_id
        rehearsal.published_at[batch] = hit.created
    start = min(rehearsal.published_at.values())
    async with aiohttp.ClientSession() as http:
        for script in sorted(crowd, key=lambda s: s.hours):
            target = start + script.hours * 3600
            fake.fake.advance(max(0.0, target - fake.fake.now()))
            rehearsal.workers.append(await simulate(rehearsal, http, script, hit_of[script.batch]))
        await hits(rehearsal, "status")
        await hits(rehearsal, "sync")
        await hits(rehearsal, "review")
        # Each batch excludes the other's workers: after sync granted them
        # their batch's qualification, the other batch's HIT refuses them.
        for worker in rehearsal.workers:
            script = worker.script
            if not worker.completed or script.worker_id is None:
                continue
            other = next(b for b in BATCHES if b != script.batch)
            status, body = await _post_json(
                http,
                f"{fake.url}/_fake/accept",
                {"hitId": hit_of[other], "workerId": script.worker_id, "country": script.country},
            )
            assert status == 403, body
            rehearsal.refused[script.worker_id] = body["unmet"]
        # A worker of neither batch is kept out of the IN batch by locale alone.
        status, body = await _post_json(
            http,
            f"{fake.url}/_fake/accept",
            {"hitId": hit_of["in-010"], "workerId": FRESH_WORKER, "country": "US"},
        )
        assert status == 403, body
        rehearsal.refused[FRESH_WORKER] = body["unmet"]
        await hits(rehearsal, "expire")
        await hits(rehearsal, "sync")
    return rehearsal


# -- the other kinds: a speed-test experiment and a tool experiment ----------------------
#
# :func:`run_kind_rehearsal` runs one experiment of kind "speedtest" or "tool"
# with an English batch and a translated one: workers preview (the page in
# the batch's language), accept, fetch the hidden probes, report (one first
# sends a bad report and is refused), hand on to the fake's externalSubmit;
# one worker posts straight to externalSubmit, so the server never stored a
# report for them. Then sync, review and expire through the CLI.

KIND_EXPERIMENT = """\
name = "{kind}-rehearsal"
kind = "{kind}"
title = "Measure your Internet connection"
description = "Run a measurement and report its result."
external_url = "{external_url}"
assignment_duration = 1800
database = "{database}"

[[batches]]
name = "{kind}-us"
reward = "0.20"
assignments = 4
countries = ["US"]
exclude_other_batches = true

[[batches]]
name = "{kind}-{language}"
reward = "0.50"
assignments = 3
countries = ["{country}"]
language = "{language}"
title = "{title}"
exclude_other_batches = true
"""

# The translated batch of each kind: its language, country and MTurk title.
TRANSLATED = {
    "speedtest": ("ja", "JP", "インターネットの速度を測ってください"),
    "tool": ("tr", "TR", "Bir ölçüm programı çalıştırın"),
}
# The page's heading in each language, as its catalogue says.
HEADINGS = {
    ("speedtest", "en"): "Test your Internet speed",
    ("speedtest", "ja"): "インターネットの速度を測ってください",
    ("tool", "en"): "Run Spoofer and report its result",
    ("tool", "tr"): "Spoofer programını çalıştırın ve sonucunu bildirin",
}
# What each default speed test measures at factor 1: (download, upload), Mbit/s.
BASE_SPEEDS = {"ookla": (100.0, 10.0), "ndt": (60.0, 9.0), "cloudflare": (140.0, 11.0)}


@dataclass(frozen=True)
class KindScript:
    """One simulated worker of a speedtest or tool batch."""

    batch: str  # "us" or "translated"
    hours: float
    worker_id: str | None  # None: an anonymous preview
    country: str
    ipv6: bool = False
    factor: float = 1.0  # scales BASE_SPEEDS: workers on faster or slower lines
    retry: bool = False  # first sends an invalid report (refused), then a valid one
    forged: bool = False  # posts straight to externalSubmit: nothing stored by us


KIND_CROWD: tuple[KindScript, ...] = (
    KindScript("translated", 0.1, None, "{country}"),
    KindScript("us", 0.2, None, "US"),
    KindScript("us", 0.5, "AKUS1", "US", ipv6=True),
    KindScript("translated", 0.75, "AKJP1", "{country}", factor=2.0, retry=True),
    KindScript("us", 1.0, "AKUS2", "US", factor=0.5),
    KindScript("us", 2.0, "AKUS3", "US", forged=True),
    KindScript("translated", 3.0, "AKJP2", "{country}", ipv6=True, factor=3.0),
)


@dataclass
class KindWorker:
    script: KindScript
    batch: str
    hit_id: str
    assignment_id: str | None = None
    session_token: str | None = None
    page_lang: str = ""
    heading: str = ""
    inputs: list[str] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (status, page) of bad reports
    reported: dict[str, str] = field(default_factory=dict)
    blue_fetched: int = 0
    submitted_at: float | None = None

    @property
    def completed(self) -> bool:
        return self.submitted_at is not None

    @property
    def stored(self) -> bool:
        """The server stored this worker's report (review approves exactly these)."""
        return self.completed and not self.script.forged


@dataclass
class KindRehearsal:
    kind: str
    language: str
    db_path: Path
    experiment_path: Path
    fake: FakeServer
    server: ProbeServer
    workers: list[KindWorker]
    cli: list[tuple[list[str], int, str]] = field(default_factory=list)

    def completed(self) -> list[KindWorker]:
        return [w for w in self.workers if w.completed]


def kind_report(kind: str, script: KindScript) -> dict[str, str]:
    """The form a worker of this kind fills in, with this worker's results."""
    if kind == "tool":
        number = 1_000_000 + sum(map(ord, script.worker_id or ""))
        return {"report": f"https://spoofer.caida.org/report.php?sessionid={number}"}
    fields = {}
    for test, (down, up) in BASE_SPEEDS.items():
        fields[f"download-{test}"] = f"{down * script.factor:g}"
        fields[f"upload-{test}"] = f"{up * script.factor:g}"
    fields["share-ookla"] = f"https://www.speedtest.net/result/{int(1000 * script.factor)}"
    return fields


def bad_report(kind: str, good: dict[str, str]) -> dict[str, str]:
    if kind == "tool":
        return {"report": "I ran it, it said OK"}
    return {**good, "download-ndt": "fast", "share-ookla": "https://evil.example/result"}


async def simulate_kind(
    rehearsal: KindRehearsal, http: aiohttp.ClientSession, script: KindScript, hit_id: str
) -> KindWorker:
    fake_url = rehearsal.fake.url
    batch = (
        f"{rehearsal.kind}-us" if script.batch == "us" else f"{rehearsal.kind}-{rehearsal.language}"
    )
    worker = KindWorker(script, batch, hit_id)
    country = script.country.format(country=TRANSLATED[rehearsal.kind][1])
    if script.worker_id is not None:
        status, body = await _post_json(
            http,
            f"{fake_url}/_fake/accept",
            {"hitId": hit_id, "workerId": script.worker_id, "country": country},
        )
        assert status == 200, body
        worker.assignment_id = body["assignmentId"]
    else:
        status, body = await _post_json(http, f"{fake_url}/_fake/preview", {"hitId": hit_id})
        assert status == 200, body
    async with http.get(body["url"]) as response:
        assert response.status == 200, await response.text()
        page = _Page(await response.text())
    worker.page_lang, worker.heading = page.lang, page.heading.strip()
    ((form,),) = ([f for f in page.forms if f["action"] == "/submit"],)
    worker.session_token = dict(form["fields"])["token"]
    worker.inputs = list(form["inputs"])
    red = [u for u in page.images if "/red/" in u]
    blue = [u for u in page.images if "/blue/" in u]
    assert len(red) == len(blue) == 1, page.images  # the hidden dual-stack probe
    for url in red + (blue if script.ipv6 else []):
        async with http.get(url) as response:
            assert response.status == 200
            worker.blue_fetched += "/blue/" in url
    if script.worker_id is None:
        return worker
    worker.reported = kind_report(rehearsal.kind, script)
    submit = f"{rehearsal.server.base_urls['ipv4']}/submit"
    if script.forged:
        # Straight to MTurk with made-up results: our server stores nothing.
        fields = [("assignmentId", worker.assignment_id or ""), ("token", worker.session_token)]
        async with http.post(
            f"{fake_url}/mturk/externalSubmit", data=fields + list(worker.reported.items())
        ) as response:
            assert response.status == 200, await response.text()
        worker.submitted_at = rehearsal.fake.fake.now()
        return worker
    if script.retry:
        data = {"token": worker.session_token, **bad_report(rehearsal.kind, worker.reported)}
        async with http.post(submit, data=data) as response:
            worker.refused.append((response.status, await response.text()))
    async with http.post(
        submit, data={"token": worker.session_token, **worker.reported}
    ) as response:
        assert response.status == 200, await response.text()
        handoff = _Page(await response.text())
    (form,) = handoff.forms
    assert form["action"] == f"{fake_url}/mturk/externalSubmit", form
    async with http.post(form["action"], data=form["fields"]) as response:
        assert response.status == 200, await response.text()
    worker.submitted_at = rehearsal.fake.fake.now()
    return worker


async def run_kind_rehearsal(
    tmp_path: Path,
    server: ProbeServer,
    fake: FakeServer,
    kind: str,
    crowd: Sequence[KindScript] = KIND_CROWD,
) -> KindRehearsal:
    """Publish a kind's experiment, simulate ``crowd``, sync, review, expire, sync."""
    language, country, title = TRANSLATED[kind]
    experiment_path = tmp_path / "experiment.toml"
    db_path = tmp_path / "probe.db"
    experiment_path.write_text(
        KIND_EXPERIMENT.format(
            kind=kind,
            external_url=f"{server.base_urls['ipv4']}/",
            database=db_path,
            language=language,
            country=country,
            title=title,
        )
    )
    rehearsal = KindRehearsal(kind, language, db_path, experiment_path, fake, server, [])
    await hits(rehearsal, "publish")
    hit_of = {}
    for hit in fake.fake.hits.values():
        assert hit.annotation is not None
        hit_of[hit.annotation.split("/")[1]] = hit.hit_id
    start = min(hit.created for hit in fake.fake.hits.values())
    async with aiohttp.ClientSession() as http:
        for script in sorted(crowd, key=lambda s: s.hours):
            fake.fake.advance(max(0.0, start + script.hours * 3600 - fake.fake.now()))
            batch = f"{kind}-us" if script.batch == "us" else f"{kind}-{language}"
            rehearsal.workers.append(await simulate_kind(rehearsal, http, script, hit_of[batch]))
    for action in ("sync", "review", "expire", "sync"):
        await hits(rehearsal, action)
    return rehearsal
