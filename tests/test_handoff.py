"""The survey inside MTurk's frame: framing headers, the turkSubmitTo
allowlist, and the hand-off of answers to externalSubmit."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator

import pytest

from probe_server.config import ConfigError, load_config
from probe_server.server import ProbeServer
from probe_server.survey import MTURK_WORKER_SITES, worker_site

from .test_web import Page, load_survey, submit

ACCEPTED = "?assignmentId=ASSIGNMENT1&hitId=HIT1&workerId=AWORKER1&turkSubmitTo="
FORM = re.compile(r'<form id="handoff" method="post" action="([^"]*)">')
HIDDEN = re.compile(r'<input type="hidden" name="([^"]*)" value="([^"]*)">')

# turkSubmitTo values that would turn the answer page into a redirect
# somewhere else, or are simply not MTurk.
OPEN_REDIRECTS = [
    "https://evil.example",
    "http://www.mturk.com",
    "https://www.mturk.com.evil.example",
    "https://evil.example/www.mturk.com",
    "https://www.mturk.com@evil.example",
    "https://evil.example?https://www.mturk.com",
    "https://evil.example#https://www.mturk.com",
    "//evil.example",
    "https://www.mturk.com/mturk/../../evil.example",
    "https://www.mturk.com/x",
    "https://www.mturk.com:8443",
    "https://www.mturk.com\\@evil.example",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    " https://www.mturk.com",
    "https://www.mturk.com%2F%2Fevil.example",
    "https://mturk.com",
    "https://workersandbox.mturk.com.evil.example",
    "http://127.0.0.1:8765",
    "",
]


def handoff_of(text: str) -> tuple[str, dict[str, str]]:
    match = FORM.search(text)
    assert match, text
    fields = {name: html.unescape(value) for name, value in HIDDEN.findall(text)}
    return html.unescape(match.group(1)), fields


@pytest.mark.parametrize("value", OPEN_REDIRECTS)
async def test_turk_submit_to_outside_mturk_is_refused(server, http, db, value):
    query = "?assignmentId=A1&hitId=H1&workerId=W1"
    async with http.get(
        f"{server.base_urls['ipv4']}/{query}", params={"turkSubmitTo": value}
    ) as response:
        text = await response.text()
        assert response.status == 400
    assert "not an MTurk worker site" in text
    assert "evil" not in text and "<script>alert" not in text
    assert db("SELECT count(*) FROM sessions")[0][0] == 0


def test_allowlist_is_exact_and_canonical():
    assert worker_site("https://www.mturk.com") == "https://www.mturk.com"
    assert worker_site("https://www.mturk.com/") == "https://www.mturk.com"
    assert worker_site("HTTPS://WorkerSandbox.MTurk.com") == "https://workersandbox.mturk.com"
    assert worker_site("https://worker.mturk.com") == "https://worker.mturk.com"
    for value in OPEN_REDIRECTS:
        assert worker_site(value) is None, value
    # The default list is MTurk's production and sandbox worker sites only.
    assert set(MTURK_WORKER_SITES) == {
        "https://www.mturk.com",
        "https://worker.mturk.com",
        "https://workersandbox.mturk.com",
    }


@pytest.mark.parametrize(
    ("submit_to", "action"),
    [
        ("https://www.mturk.com", "https://www.mturk.com/mturk/externalSubmit"),
        ("https://workersandbox.mturk.com", "https://workersandbox.mturk.com/mturk/externalSubmit"),
        ("https://worker.mturk.com/", "https://worker.mturk.com/mturk/externalSubmit"),
    ],
)
async def test_answer_is_stored_then_handed_to_mturk(server, http, db, submit_to, action):
    page = await load_survey(http, server, ACCEPTED + submit_to)
    assert db("SELECT turk_submit_to FROM sessions")[0][0] == submit_to.rstrip("/")
    red = str(len(page.red))
    status, text = await submit(http, server, token=page.token, red=red, blue="2")
    assert status == 200
    # The answer is committed before the page that hands it on is sent.
    (row,) = db("SELECT red_reported, blue_reported, red_correct FROM session_summary")
    assert tuple(row) == (int(red), 2, 1)
    form_action, fields = handoff_of(text)
    assert form_action == action
    assert fields == {"assignmentId": "ASSIGNMENT1", "token": page.token, "red": red, "blue": "2"}
    # Without JavaScript the worker presses the button; with it, a script does.
    assert '<button type="submit">Submit HIT</button>' in text
    assert 'document.getElementById("handoff").submit()' in text


async def test_wrong_answers_are_handed_on_too(server, http):
    page = await load_survey(http, server, ACCEPTED + "https://www.mturk.com")
    wrong = str(len(page.red) + 1)
    _, text = await submit(http, server, token=page.token, red=wrong, blue="0")
    assert handoff_of(text)[1]["red"] == wrong


async def test_a_second_answer_is_stored_but_mturk_gets_the_first(server, http, db):
    """Reports count a session's first answer; the hand-off must send MTurk the same."""
    page = await load_survey(http, server, ACCEPTED + "https://www.mturk.com")
    right = str(len(page.red))
    _, first = await submit(http, server, token=page.token, red=right, blue="1")
    assert handoff_of(first)[1]["red"] == right
    # Back, a changed answer, submit again: stored, not counted, not handed on.
    status, second = await submit(http, server, token=page.token, red="9", blue="7")
    assert status == 200
    assert handoff_of(second)[1] == {
        "assignmentId": "ASSIGNMENT1",
        "token": page.token,
        "red": right,
        "blue": "1",
    }
    assert [
        tuple(r) for r in db("SELECT red_reported, blue_reported FROM answers ORDER BY id")
    ] == [
        (int(right), 1),
        (9, 7),
    ]
    (summary,) = db("SELECT red_reported, blue_reported, submissions FROM session_summary")
    assert tuple(summary) == (int(right), 1, 2)


async def test_assignment_id_comes_from_the_session_not_the_form(server, http):
    page = await load_survey(http, server, ACCEPTED + "https://www.mturk.com")
    _, text = await submit(
        http, server, token=page.token, red="1", blue="1", assignmentId="SOMEONEELSE"
    )
    assert handoff_of(text)[1]["assignmentId"] == "ASSIGNMENT1"


async def test_demo_and_accepted_without_turk_submit_to_get_thanks(server, http):
    for query in ("", "?assignmentId=A2&hitId=H2&workerId=W2"):
        page = await load_survey(http, server, query)
        status, text = await submit(http, server, token=page.token, red="1", blue="1")
        assert status == 200 and "Thank you" in text
        assert "externalSubmit" not in text and "<form" not in text


async def test_preview_cannot_be_answered(server, http, db):
    page = await load_survey(
        http,
        server,
        "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=H1&turkSubmitTo=https://www.mturk.com",
    )
    assert "accept the HIT" in page.text
    assert '<button type="submit" disabled>' in page.text
    status, text = await submit(http, server, token=page.token, red="1", blue="1")
    assert status == 400 and "preview" in text
    assert "externalSubmit" not in text
    assert db("SELECT count(*) FROM answers")[0][0] == 0


async def test_pages_may_be_framed_by_mturk_only(server, http):
    urls = [f"{server.base_urls['ipv4']}/{ACCEPTED}https://www.mturk.com"]
    async with http.get(urls[0]) as response:
        page = Page(await response.text())
        headers = [response.headers]
    async with http.post(
        f"{server.base_urls['ipv4']}/submit", data={"token": page.token, "red": "1", "blue": "1"}
    ) as response:
        headers.append(response.headers)
    async with http.get(f"{server.base_urls['ipv4']}/?hitId=<x>") as response:
        assert response.status == 400
        headers.append(response.headers)
    for kind in ("speedtest", "tool"):  # the other experiments' pages, and a preview
        for query in (
            ACCEPTED + "https://www.mturk.com",
            "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE",
        ):
            async with http.get(f"{server.base_urls['ipv4']}/{query}&survey={kind}") as response:
                assert response.status == 200
                headers.append(response.headers)
    for h in headers:
        # X-Frame-Options would give workers a blank HIT.
        assert "X-Frame-Options" not in h
        policy = dict(
            part.strip().split(" ", 1) for part in h["Content-Security-Policy"].split(";")
        )
        ancestors = policy["frame-ancestors"].split()
        assert {"https://www.mturk.com", "https://workersandbox.mturk.com"} <= set(ancestors)
        assert "*" not in ancestors and "http:" not in ancestors and "https:" not in ancestors
        forms = policy["form-action"].split()
        assert set(forms) == {"'self'", *MTURK_WORKER_SITES}


@pytest.fixture
async def rehearsal_server(make_config) -> AsyncIterator[ProbeServer]:
    server = ProbeServer(make_config(mturk={"rehearsal_worker_sites": ["http://127.0.0.1:8765/"]}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_rehearsal_site_must_be_configured(server, rehearsal_server, http):
    query = "?assignmentId=A1&hitId=H1&workerId=W1&turkSubmitTo=http://127.0.0.1:8765"
    async with http.get(f"{server.base_urls['ipv4']}/{query}") as response:
        assert response.status == 400  # off by default
    page = await load_survey(http, rehearsal_server, query)
    _, text = await submit(http, rehearsal_server, token=page.token, red="1", blue="1")
    assert handoff_of(text)[0] == "http://127.0.0.1:8765/mturk/externalSubmit"
    async with http.get(f"{rehearsal_server.base_urls['ipv4']}/") as response:
        policy = response.headers["Content-Security-Policy"]
    assert "http://127.0.0.1:8765" in policy
    # Other sites are still refused.
    async with http.get(
        f"{rehearsal_server.base_urls['ipv4']}/",
        params={"assignmentId": "A1", "turkSubmitTo": "http://127.0.0.1:9999"},
    ) as response:
        assert response.status == 400


@pytest.mark.parametrize(
    "value",
    [
        "https://evil.example",
        "http://10.0.0.1:8765",
        "http://127.0.0.1:8765/path",
        "ftp://[::1]",
        # Next to the lab's range, but routed.
        "http://192.0.3.5:8765",
        # A name is not an address: even a .test one could resolve anywhere.
        "http://mturk.probe.test:8765",
    ],
)
def test_rehearsal_sites_must_be_loopback_or_lab_origins(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text(f'[mturk]\nrehearsal_worker_sites = ["{value}"]\n')
    with pytest.raises(ConfigError, match=r"mturk\.rehearsal_worker_sites\.0: "):
        load_config(path)


def test_the_lab_may_add_its_own_documentation_range_worker_site(tmp_path):
    # The namespace lab's fake MTurk: no real network routes these ranges.
    path = tmp_path / "c.toml"
    path.write_text(
        '[mturk]\nrehearsal_worker_sites = ["http://192.0.2.5:8765", "http://[2001:db8::5]:1"]\n'
    )
    assert load_config(path).mturk.rehearsal_worker_sites == (
        "http://192.0.2.5:8765",
        "http://[2001:db8::5]:1",
    )


def test_rehearsal_sites_are_canonical(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[mturk]\nrehearsal_worker_sites = ["http://LOCALHOST:8765/", "http://[::1]:1"]\n'
    )
    assert load_config(path).mturk.rehearsal_worker_sites == (
        "http://localhost:8765",
        "http://[::1]:1",
    )


PAYLOAD = '"><script>alert(1)</script>'


@pytest.mark.parametrize(
    "name",
    ["assignmentId", "hitId", "workerId", "turkSubmitTo", "batch", "lang", "survey", "token", "x"],
)
async def test_no_script_injection_through_survey_parameters(server, http, name):
    params = {"assignmentId": "A1", "hitId": "H1", "turkSubmitTo": "https://www.mturk.com"}
    params[name] = PAYLOAD
    async with http.get(f"{server.base_urls['ipv4']}/", params=params) as response:
        text = await response.text()
    assert "<script>alert" not in text and PAYLOAD not in text
    if name in ("token", "x"):  # not read: the survey is served
        assert response.status == 200
    else:
        assert response.status == 400


# Every field of each kind's form: (field, kind of page).
FORM_FIELDS = [
    *((name, "balls") for name in ("token", "red", "blue", "lang", "assignmentId", "turkSubmitTo")),
    ("report", "tool"),
    ("lang", "tool"),
    ("download-ookla", "speedtest"),
    ("upload-ndt", "speedtest"),
    ("share-ookla", "speedtest"),
]
VALID_FORMS = {
    "balls": {"red": "1", "blue": "1"},
    "tool": {"report": "https://spoofer.caida.org/report.php?sessionid=8675309"},
    "speedtest": {
        **{
            f"{d}-{t}": "10" for d in ("download", "upload") for t in ("ookla", "ndt", "cloudflare")
        },
        "share-ookla": "https://www.speedtest.net/result/1",
    },
}


@pytest.mark.parametrize(("name", "kind"), FORM_FIELDS)
async def test_no_script_injection_through_the_answer_form(server, http, name, kind):
    page = await load_survey(http, server, f"{ACCEPTED}https://www.mturk.com&survey={kind}")
    form = {"token": page.token, **VALID_FORMS[kind]}
    form[name] = PAYLOAD
    async with http.post(f"{server.base_urls['ipv4']}/submit", data=form) as response:
        text = await response.text()
    assert "<script>alert" not in text and PAYLOAD not in text
    assert "evil" not in text
    if name in ("assignmentId", "turkSubmitTo", "lang"):  # ignored: the session decides
        assert response.status == 200
        assert handoff_of(text)[0] == "https://www.mturk.com/mturk/externalSubmit"
    else:
        assert response.status == 400


async def test_a_valid_share_link_carrying_markup_is_handed_on_escaped(server, http, db):
    """A share link is free text after its host: valid, stored, and shown escaped."""
    page = await load_survey(http, server, f"{ACCEPTED}https://www.mturk.com&survey=speedtest")
    link = f"https://www.speedtest.net/result/1?x={PAYLOAD}"
    form = {"token": page.token, **VALID_FORMS["speedtest"], "share-ookla": link}
    async with http.post(f"{server.base_urls['ipv4']}/submit", data=form) as response:
        text = await response.text()
        assert response.status == 200, text
    assert "<script>alert" not in text and PAYLOAD not in text
    action, fields = handoff_of(text)
    assert action == "https://www.mturk.com/mturk/externalSubmit"
    assert fields["share-ookla"] == link  # MTurk gets the link as the worker wrote it
    assert db("SELECT share_url FROM speedtest_reports WHERE test = 'ookla'")[0][0] == link
