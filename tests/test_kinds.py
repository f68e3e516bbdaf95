"""The speedtest and tool pages over real sockets: pages, validation, storage, languages."""

from __future__ import annotations

import html
import re
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe_server import survey
from probe_server.config import SpeedTest, SpeedTestConfig, ToolConfig
from probe_server.server import ProbeServer

from .test_handoff import ACCEPTED, handoff_of
from .test_web import Page, fetch

OOKLA = SpeedTest(
    id="ookla",
    name="Speedtest by Ookla",
    url="https://www.speedtest.net/",
    share_hosts=("www.speedtest.net",),
)
NDT = SpeedTest(id="ndt", name="M-Lab Speed Test (NDT)", url="https://speed.measurementlab.net/")
SHARE = "https://www.speedtest.net/result/16171819"
GOOD = {
    "download-ookla": "94.5",
    "upload-ookla": "11.8",
    "share-ookla": SHARE,
    "download-ndt": "88,25",  # a decimal comma, as Turkish and other locales write it
    "upload-ndt": "10",
    "download-cloudflare": "120",
    "upload-cloudflare": "12.5",
}
REPORT = "https://spoofer.caida.org/report.php?sessionid=8675309"
EXAMPLE = "https://spoofer.caida.org/report.php?sessionid=1234567"  # on the page
LINK = re.compile(r'<a href="([^"]+)" target="_blank" rel="noopener noreferrer">([^<]+)</a>')
NAMED_INPUT = re.compile(r'<input type="text"[^>]* name="([^"]+)"')


async def open_page(
    http: aiohttp.ClientSession, server: ProbeServer, query: str
) -> tuple[Page, str]:
    async with http.get(f"{server.base_urls['ipv4']}/{query}") as response:
        text = await response.text()
        assert response.status == 200, text
        return Page(text), text


async def post(
    http: aiohttp.ClientSession, server: ProbeServer, data: dict[str, str]
) -> tuple[int, str]:
    async with http.post(f"{server.base_urls['ipv4']}/submit", data=data) as response:
        return response.status, await response.text()


def stored(db: Any) -> tuple[int, int, int]:
    return (
        db("SELECT count(*) FROM speedtest_reports")[0][0],
        db("SELECT count(*) FROM tool_reports")[0][0],
        db("SELECT count(*) FROM answers")[0][0],
    )


# -- the speedtest page ----------------------------------------------------------------


async def test_speedtest_page_lists_the_tests_and_probes_both_families(server, http, db):
    page, text = await open_page(http, server, "?survey=speedtest")
    links = LINK.findall(text)
    assert [(html.unescape(u), n) for u, n in links] == [
        ("https://www.speedtest.net/", "Speedtest by Ookla"),
        ("https://speed.measurementlab.net/", "M-Lab Speed Test (NDT)"),
        ("https://speed.cloudflare.com/", "Cloudflare Speed Test"),
    ]
    # A share field only for the test that has share links.
    assert NAMED_INPUT.findall(text) == [
        "download-ookla",
        "upload-ookla",
        "share-ookla",
        "download-ndt",
        "upload-ndt",
        "download-cloudflare",
        "upload-cloudflare",
    ]
    # The share link is required: the browser says so before the server does.
    assert re.search(r'name="share-ookla"[^>]* required>', text)
    assert "Link to share the result:" in text and "(if the site gives one)" not in text
    assert "Speeds from 0.05 to 10000 Mbit/s are accepted." in text
    # The passive dual-stack probe: one hidden red and one hidden blue image.
    assert len(page.red) == 1 and len(page.blue) == 1
    assert '<div class="probe" aria-hidden="true">' in text
    for url in page.red + page.blue:
        assert (await fetch(http, url))[0] == 200
    (row,) = db("SELECT * FROM sessions")
    assert (row["survey"], row["language"], row["red_count"], row["blue_count"]) == (
        "speedtest",
        "en",
        1,
        1,
    )
    # Correlated through the same views as the ball page.
    (summary,) = db("SELECT ipv4, ipv6, red_fetched, blue_fetched FROM session_summary")
    assert tuple(summary) == ("127.0.0.1", "::1", 1, 1)


async def test_speedtest_reports_are_stored_per_test_and_handed_on(server, http, db):
    query = ACCEPTED + "https%3A%2F%2Fworkersandbox.mturk.com&survey=speedtest"
    page, _ = await open_page(http, server, query)
    status, text = await post(http, server, {"token": page.token, **GOOD})
    assert status == 200, text
    rows = db(
        "SELECT test, name, download_mbps, upload_mbps, share_url, addr"
        " FROM speedtest_reports ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("ookla", "Speedtest by Ookla", 94.5, 11.8, SHARE, "127.0.0.1"),
        ("ndt", "M-Lab Speed Test (NDT)", 88.25, 10.0, None, "127.0.0.1"),
        ("cloudflare", "Cloudflare Speed Test", 120.0, 12.5, None, "127.0.0.1"),
    ]
    assert len({r["t"] for r in db("SELECT t FROM speedtest_reports")}) == 1
    url, fields = handoff_of(text)
    assert url == "https://workersandbox.mturk.com/mturk/externalSubmit"
    assert fields == {
        "assignmentId": "ASSIGNMENT1",
        "token": page.token,
        "download-ookla": "94.5",
        "upload-ookla": "11.8",
        "share-ookla": SHARE,
        "download-ndt": "88.25",
        "upload-ndt": "10",
        "download-cloudflare": "120",
        "upload-cloudflare": "12.5",
    }
    (view,) = db("SELECT count(*) FROM speedtest_results")
    assert view[0] == 3


async def test_a_second_report_is_stored_but_mturk_gets_the_first(server, http, db):
    speedtest, _ = await open_page(
        http, server, ACCEPTED + "https://www.mturk.com&survey=speedtest"
    )
    tool, _ = await open_page(http, server, ACCEPTED + "https://www.mturk.com&survey=tool")
    assert (await post(http, server, {"token": speedtest.token, **GOOD}))[0] == 200
    assert (await post(http, server, {"token": tool.token, "report": REPORT}))[0] == 200
    changed = {**GOOD, "download-ookla": "9999.5", "share-ookla": SHARE + "0"}
    status, text = await post(http, server, {"token": speedtest.token, **changed})
    assert status == 200
    fields = handoff_of(text)[1]
    assert (fields["download-ookla"], fields["share-ookla"], fields["download-ndt"]) == (
        "94.5",
        SHARE,
        "88.25",
    )
    status, text = await post(http, server, {"token": tool.token, "report": "7654321"})
    assert status == 200 and handoff_of(text)[1]["report"] == REPORT
    # Both submissions are kept; the views (and so the reports) use the first.
    assert stored(db) == (6, 2, 0)
    assert db("SELECT download_mbps FROM speedtest_results WHERE test = 'ookla'")[0][0] == 94.5
    assert db("SELECT report FROM tool_results")[0][0] == REPORT


BAD_SPEEDTESTS = [
    ({"download-ookla": ""}, "Please enter the download speed that Speedtest by Ookla showed"),
    ({"upload-ndt": " "}, "Please enter the upload speed that M-Lab Speed Test (NDT) showed"),
    ({"download-ookla": "0"}, "must be a number from 0.05 to 10000 Mbit/s"),
    ({"download-ookla": "-5"}, "must be a number from 0.05"),
    # Below min_mbps (0.05 by default): a slip, not a measurement.
    ({"download-ookla": "0.001"}, "must be a number from 0.05 to 10000 Mbit/s, such as 94.5"),
    (
        {"upload-ndt": "0,049"},
        "The upload speed of M-Lab Speed Test (NDT) must be a number from 0.05",
    ),
    ({"upload-ookla": "10001"}, "to 10000 Mbit/s"),
    ({"download-ndt": "1,000.5"}, "The download speed of M-Lab Speed Test (NDT)"),
    ({"download-ndt": "1e3"}, "The download speed of M-Lab Speed Test (NDT)"),
    ({"download-ndt": "NaN"}, "The download speed"),
    ({"download-ndt": "inf"}, "The download speed"),
    ({"download-ndt": "٣"}, "The download speed"),  # an Arabic-Indic digit
    ({"download-ndt": "94.5 Mbps"}, "The download speed"),
    # Ookla has share_hosts, so its share link is required (share_required's default).
    ({"share-ookla": ""}, "Please paste the link to share the result that Speedtest by Ookla"),
    ({"share-ookla": "  "}, "Please paste the link to share the result that Speedtest by Ookla"),
    ({"share-ookla": "https://evil.example/result/1"}, "must be an https:// link on"),
    ({"share-ookla": "http://www.speedtest.net/result/1"}, "https:// link on www.speedtest.net"),
    ({"share-ookla": "https://www.speedtest.net@evil.example/"}, "https:// link"),
    ({"share-ookla": "https://www.speedtest.net.evil.example/"}, "https:// link"),
    ({"share-ookla": "https://evil.example/www.speedtest.net"}, "https:// link"),
    ({"share-ookla": "https://www.speedtest.net:8443/result/1"}, "https:// link"),
    ({"share-ookla": "javascript:alert(1)"}, "https:// link"),
    ({"share-ookla": "https://www.speedtest.net\\@evil.example"}, "https:// link"),
    ({"share-ookla": "https://www.speedtest.net/" + "x" * 600}, "https:// link"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPEEDTESTS)
async def test_bad_speedtest_reports_are_refused_and_nothing_is_stored(
    server, http, db, change, message
):
    page, _ = await open_page(http, server, "?survey=speedtest")
    status, text = await post(http, server, {"token": page.token, **GOOD, **change})
    assert status == 400, text
    assert message in html.unescape(text)
    assert "evil" not in text and "<script" not in text
    assert stored(db) == (0, 0, 0)


async def test_a_missing_test_is_refused(server, http, db):
    page, _ = await open_page(http, server, "?survey=speedtest")
    form = {k: v for k, v in GOOD.items() if not k.endswith("cloudflare")}
    status, text = await post(http, server, {"token": page.token, **form})
    assert status == 400 and "Cloudflare Speed Test" in text
    assert stored(db) == (0, 0, 0)


async def test_a_speedtest_preview_cannot_be_submitted(server, http, db):
    page, text = await open_page(
        http, server, "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=H1&survey=speedtest"
    )
    assert "This is a preview of the HIT" in text and "disabled" in text
    status, text = await post(http, server, {"token": page.token, **GOOD})
    assert status == 400 and "this is a preview of the HIT" in text
    assert stored(db) == (0, 0, 0)


async def test_a_ball_answer_to_a_speedtest_session_is_refused(server, http, db):
    page, _ = await open_page(http, server, "?survey=speedtest")
    status, _ = await post(http, server, {"token": page.token, "red": "1", "blue": "1"})
    assert status == 400
    assert stored(db) == (0, 0, 0)


# -- the tool page ---------------------------------------------------------------------


async def test_tool_page_links_the_download_and_stores_a_valid_report(server, http, db):
    query = ACCEPTED + "https%3A%2F%2Fwww.mturk.com&survey=tool"
    page, text = await open_page(http, server, query)
    assert "Run Spoofer and report its result" in text
    assert [html.unescape(u) for u, _ in LINK.findall(text)] == [
        "https://www.caida.org/projects/spoofer/"
    ]
    assert "For example: https://spoofer.caida.org/report.php?sessionid=1234567" in (
        html.unescape(text)
    )
    assert len(page.red) == 1 and len(page.blue) == 1
    status, text = await post(http, server, {"token": page.token, "report": f"  {REPORT} "})
    assert status == 200, text
    (row,) = db("SELECT tool, report, addr FROM tool_reports")
    assert tuple(row) == ("Spoofer", REPORT, "127.0.0.1")
    _, fields = handoff_of(text)
    assert fields == {"assignmentId": "ASSIGNMENT1", "token": page.token, "report": REPORT}
    # A bare session number matches the default pattern too.
    page, _ = await open_page(http, server, "?survey=tool")
    assert (await post(http, server, {"token": page.token, "report": "7654321"}))[0] == 200
    assert stored(db) == (0, 2, 0)


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ("", "Please paste the report id that Spoofer showed."),
        ("not a report", "This does not look like a report id of Spoofer."),
        ("https://evil.example/report.php?sessionid=1", "does not look like"),
        (REPORT + "&x=<script>", "does not look like"),
        ("1" * 300, "does not look like"),
        # The example on the page matches the pattern: not a worker's report.
        (EXAMPLE, "This is the example from this page."),
        (f" {EXAMPLE} ", "This is the example from this page."),
        ("1234567", "This is the example from this page."),
    ],
)
async def test_bad_tool_reports_are_refused(server, http, db, report, message):
    page, _ = await open_page(http, server, "?survey=tool")
    status, text = await post(http, server, {"token": page.token, "report": report})
    assert status == 400 and message in text
    assert "<script>" not in text
    assert stored(db) == (0, 0, 0)


async def test_tool_pattern_comes_from_the_config(make_config, http, db):
    config = make_config(
        tool={
            "name": "ProbeTool",
            "download_url": "https://tool.example/download",
            "report_pattern": "PT-[0-9]{6}",
            "report_example": "PT-123456",
        }
    )
    server = ProbeServer(config)
    await server.start()
    try:
        page, text = await open_page(http, server, "?survey=tool")
        assert "https://tool.example/download" in text and "PT-123456" in text
        assert (await post(http, server, {"token": page.token, "report": REPORT}))[0] == 400
        assert (await post(http, server, {"token": page.token, "report": "PT-123456"}))[0] == 400
        assert (await post(http, server, {"token": page.token, "report": "PT-000042"}))[0] == 200
    finally:
        await server.stop()
    assert db("SELECT tool, report FROM tool_reports")[0][:] == ("ProbeTool", "PT-000042")


# -- languages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "language", "heading"),
    [
        ("?lang=ja", "ja", "ボールを数えてください"),
        ("?survey=speedtest&lang=tr", "tr", "İnternet hızınızı ölçün"),
        ("?survey=tool&lang=hi", "hi", "Spoofer चलाएँ और उसका नतीजा बताएँ"),
        ("?survey=speedtest", "en", "Test your Internet speed"),
    ],
)
async def test_pages_in_the_batch_language(server, http, db, query, language, heading):
    async with http.get(f"{server.base_urls['ipv4']}/{query}") as response:
        text = await response.text()
        assert response.status == 200
        assert response.headers["Content-Language"] == language
    assert f'<html lang="{language}" dir="ltr">' in text
    assert f"<h1>{heading}</h1>" in text
    assert db("SELECT language FROM sessions")[0][0] == language
    # The form carries the language, for errors before the session is found.
    assert f'<input type="hidden" name="lang" value="{language}">' in text


async def test_the_example_report_is_refused_in_the_page_language(server, http, db):
    page, _ = await open_page(http, server, "?survey=tool&lang=tr")
    status, text = await post(http, server, {"token": page.token, "report": EXAMPLE})
    assert status == 400 and '<html lang="tr"' in text
    assert "Bu, bu sayfadaki örnektir." in html.unescape(text)
    assert stored(db) == (0, 0, 0)


def test_what_counts_as_the_example():
    example = "https://spoofer.caida.org/report.php?sessionid=1234567"
    assert survey.is_example(example, example) and survey.is_example("1234567", example)
    assert not survey.is_example("234567", example)  # a different id, not a cut at "="
    assert not survey.is_example("12345678", example)
    assert survey.is_example("123456", "PT-123456") and not survey.is_example("PT-1", "PT-123456")


async def test_errors_are_in_the_session_language(server, http, db):
    page, _ = await open_page(http, server, "?survey=speedtest&lang=ja")
    status, text = await post(http, server, {"token": page.token, **GOOD, "upload-ndt": "x"})
    assert status == 400
    assert '<html lang="ja"' in text and "<h1>問題があります</h1>" in text
    assert "M-Lab Speed Test (NDT) のアップロード速度は" in text
    # Before a session is known, the form's language is used.
    status, text = await post(http, server, {"token": "nonsense", "lang": "tr"})
    assert status == 400 and "bu anket oturumu geçerli değil" in text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?lang=fr", "this survey is not available in that language"),
        ("?lang=../../etc", "this survey is not available in that language"),
        ("?survey=quiz", "there is no survey of this kind"),
        ("?survey=tool&lang=ja&assignmentId=bad!", "assignmentId の形式が正しくありません"),
    ],
)
async def test_unknown_kind_or_language_is_refused(server, http, db, query, message):
    async with http.get(f"{server.base_urls['ipv4']}/{query}") as response:
        assert response.status == 400
        assert message in await response.text()
    assert db("SELECT count(*) FROM sessions")[0][0] == 0


# -- validation as plain functions -----------------------------------------------------


@given(st.text(max_size=40))
def test_share_links_never_leave_the_tool_site(raw):
    try:
        link = survey.share_link(raw, OOKLA)
    except survey.BadInput:
        return
    if link is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(link)
        assert parts.scheme.lower() == "https" and parts.hostname == "www.speedtest.net"


@given(st.floats(min_value=0.001, max_value=10000, allow_nan=False).map(lambda f: round(f, 3)))
def test_speeds_as_written_are_read_back(value):
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    assert survey.parse_speed(text, "download", NDT, 0.001, 10000) == pytest.approx(value)
    assert survey.parse_speed(text.replace(".", ","), "upload", NDT, 0.001, 10000) == (
        pytest.approx(value)
    )


def test_the_floor_and_ceiling_of_speeds():
    config = SpeedTestConfig(tests=(NDT,), min_mbps=1, max_mbps=100)
    form = {"download-ndt": "1", "upload-ndt": "100"}
    (report,) = survey.parse_speedtests(form, config)
    assert (report.download_mbps, report.upload_mbps) == (1.0, 100.0)
    with pytest.raises(survey.BadInput, match="from 1 to 100 Mbit/s"):
        survey.parse_speedtests({**form, "download-ndt": "0.999"}, config)
    assert SpeedTestConfig().min_mbps == 0.05
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_mbps: must be below max_mbps"):
        SpeedTestConfig(min_mbps=10, max_mbps=10)
    assert survey.speed_text(1234567.5) == "1234567.5" and survey.speed_text(0.05) == "0.05"


async def test_a_share_link_can_be_made_optional(make_config, http, db):
    config = make_config(
        speedtest={
            "tests": [
                {
                    "id": "ookla",
                    "name": "Speedtest by Ookla",
                    "url": "https://www.speedtest.net/",
                    "share_hosts": ["www.speedtest.net"],
                    "share_required": False,
                }
            ]
        }
    )
    server = ProbeServer(config)
    await server.start()
    try:
        page, text = await open_page(http, server, "?survey=speedtest")
        assert "Link to share the result (if the site gives one):" in text
        assert not re.search(r'name="share-ookla"[^>]* required', text)
        form = {"token": page.token, "download-ookla": "50", "upload-ookla": "5"}
        assert (await post(http, server, form))[0] == 200
    finally:
        await server.stop()
    assert [tuple(r) for r in db("SELECT test, share_url FROM speedtest_reports")] == [
        ("ookla", None)
    ]


def test_a_test_without_share_hosts_ignores_a_share_field():
    config = SpeedTestConfig(tests=(NDT,), max_mbps=100)
    form = {"download-ndt": "5", "upload-ndt": "1", "share-ndt": "https://evil.example/"}
    (report,) = survey.parse_speedtests(form, config)
    assert report.share_url is None
    with pytest.raises(survey.BadInput, match="to 100 Mbit/s"):
        survey.parse_speedtests({**form, "download-ndt": "101"}, config)


def test_config_refuses_bad_pages():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="used twice"):
        SpeedTestConfig(tests=(NDT, NDT))
    with pytest.raises(ValidationError, match="https"):
        SpeedTest(id="x", name="X", url="http://x.example/")
    with pytest.raises(ValidationError, match="share_required: needs share_hosts"):
        SpeedTest(id="x", name="X", url="https://x.example/", share_required=True)
    assert OOKLA.requires_share and not NDT.requires_share
    with pytest.raises(ValidationError, match="host name"):
        SpeedTest(id="x", name="X", url="https://x.example/", share_hosts=("https://x.example",))
    with pytest.raises(ValidationError, match="report_example"):
        ToolConfig(report_pattern="[0-9]+", report_example="abc")
    with pytest.raises(ValidationError, match="regular expression"):
        ToolConfig(report_pattern="(", report_example="(")
