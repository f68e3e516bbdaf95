"""A speed-test experiment and a tool experiment against the fake MTurk, each with an
English and a translated batch: pages, storage, review and report match the crowd."""

from __future__ import annotations

import json
import statistics

import pytest

from probe_server.cli import main

from .rehearsal import BASE_SPEEDS, HEADINGS, TRANSLATED, KindRehearsal

pytestmark = pytest.mark.slow


def test_each_batch_shows_its_kind_in_its_language(kind_rehearsal: KindRehearsal, db):
    r = kind_rehearsal
    batches = {row["name"]: row for row in db("SELECT * FROM batches")}
    assert {name: (b["kind"], b["language"]) for name, b in batches.items()} == {
        f"{r.kind}-us": (r.kind, "en"),
        f"{r.kind}-{r.language}": (r.kind, r.language),
    }
    hits = {h.annotation.split("/")[1]: h for h in r.fake.fake.hits.values()}
    translated = hits[f"{r.kind}-{r.language}"]
    assert translated.title == TRANSLATED[r.kind][2]
    assert translated.external_url.endswith(f"?survey={r.kind}&lang={r.language}")
    expected_inputs = (
        ["report"]
        if r.kind == "tool"
        else [
            "download-ookla",
            "upload-ookla",
            "share-ookla",
            "download-ndt",
            "upload-ndt",
            "download-cloudflare",
            "upload-cloudflare",
        ]
    )
    for worker in r.workers:
        language = "en" if worker.batch.endswith("-us") else r.language
        assert worker.page_lang == language  # previews too
        assert worker.heading == HEADINGS[(r.kind, language)]
        assert worker.inputs == expected_inputs
    sessions = {
        row["token"]: row for row in db("SELECT * FROM session_summary s JOIN sessions USING (id)")
    }
    for worker in r.workers:
        row = sessions[worker.session_token]
        assert (row["survey"], row["red_count"], row["blue_count"]) == (r.kind, 1, 1)
        assert row["ipv6"] == ("::1" if worker.script.ipv6 else None)
        assert row["visit"] == ("preview" if worker.script.worker_id is None else "accepted")


def test_only_valid_reports_are_stored(kind_rehearsal: KindRehearsal, db):
    r = kind_rehearsal
    table = "tool_reports" if r.kind == "tool" else "speedtest_reports"
    per_session = {
        row[0]: row[1]
        for row in db(f"SELECT session_token, count(*) FROM {table} GROUP BY session_token")
    }
    expected = 1 if r.kind == "tool" else len(BASE_SPEEDS)
    assert per_session == {w.session_token: expected for w in r.workers if w.stored}
    # The worker who first sent a bad report was refused, in their page's language.
    (retried,) = [w for w in r.workers if w.script.retry]
    ((status, page),) = retried.refused
    assert status == 400 and f'<html lang="{r.language}"' in page
    if r.kind == "tool":
        (row,) = db(
            "SELECT report FROM tool_reports WHERE session_token = ?", retried.session_token
        )
        assert row[0] == retried.reported["report"]
    else:
        rows = db(
            "SELECT test, download_mbps, upload_mbps, share_url FROM speedtest_reports"
            " WHERE session_token = ? ORDER BY id",
            retried.session_token,
        )
        assert [tuple(x) for x in rows] == [
            (
                test,
                down * retried.script.factor,
                up * retried.script.factor,
                retried.reported["share-ookla"] if test == "ookla" else None,
            )
            for test, (down, up) in BASE_SPEEDS.items()
        ]


def test_review_approves_stored_reports_and_rejects_the_rest(kind_rehearsal: KindRehearsal, db):
    r = kind_rehearsal
    reviews = {row["assignment_id"]: row for row in db("SELECT * FROM reviews")}
    assert set(reviews) == {w.assignment_id for w in r.completed()}
    for worker in r.completed():
        review = reviews[worker.assignment_id]
        assert review["decision"] == ("approve" if worker.stored else "reject"), review["reason"]
        assert review["session_token"] == worker.session_token
        assert review["done"] is not None and review["error"] is None
        mturk = r.fake.fake.assignments[worker.assignment_id]
        assert mturk.status == ("Approved" if worker.stored else "Rejected")
        answers = json.loads(
            db("SELECT answers FROM assignments WHERE assignment_id = ?", worker.assignment_id)[0][
                0
            ]
        )
        # What the hand-off gave MTurk: the token and every report field.
        assert answers["token"] == worker.session_token
        assert {k: v for k, v in answers.items() if k != "token"}.keys() == worker.reported.keys()
    assert db("SELECT count(*) FROM assignments WHERE status = 'Submitted'")[0][0] == 0


def test_report_matches_the_crowd(kind_rehearsal: KindRehearsal, tmp_path, capsys):
    r = kind_rehearsal
    out = tmp_path / "report"
    assert main(["report", "--db", str(r.db_path), "--format", "json", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    stored = [w for w in r.workers if w.stored]
    # Table 3 counts ball batches only.
    assert data["batches"] == []
    if r.kind == "tool":
        assert data["speedtests"]["vantage_points"] == []
        assert [
            (t["worker_id"], t["ipv4"], t["ipv6"], t["batch"], t["tool"], t["report"])
            for t in data["tool_reports"]
        ] == [
            (
                w.script.worker_id,
                "127.0.0.1",
                ["::1"] if w.script.ipv6 else [],
                w.batch,
                "Spoofer",
                w.reported["report"],
            )
            for w in stored
        ]
        return
    assert data["tool_reports"] == []
    speedtests = data["speedtests"]
    points = {v["worker_id"]: v for v in speedtests["vantage_points"]}
    assert set(points) == {w.script.worker_id for w in stored}
    downloads = [down for down, _ in BASE_SPEEDS.values()]
    uploads = [up for _, up in BASE_SPEEDS.values()]
    cv_down = statistics.stdev(downloads) / statistics.fmean(downloads)
    cv_up = statistics.stdev(uploads) / statistics.fmean(uploads)
    for worker in stored:
        point = points[worker.script.worker_id]
        assert point["ipv4"] == "127.0.0.1"
        assert point["ipv6"] == (["::1"] if worker.script.ipv6 else [])
        assert point["batches"] == [worker.batch]
        assert {t["test"]: (t["download_mbps"], t["upload_mbps"]) for t in point["tests"]} == {
            test: pytest.approx((down * worker.script.factor, up * worker.script.factor))
            for test, (down, up) in BASE_SPEEDS.items()
        }
        # The same tools disagree by the same proportion at every vantage point.
        assert point["download_cv"] == pytest.approx(cv_down)
        assert point["upload_cv"] == pytest.approx(cv_up)
    assert speedtests["download_cv_median"] == pytest.approx(cv_down)
    ookla = next(t for t in speedtests["tests"] if t["test"] == "ookla")
    factors = sorted(w.script.factor for w in stored)
    assert ookla["vantage_points"] == len(stored)
    assert ookla["download_median"] == pytest.approx(100 * statistics.median(factors))
    assert (ookla["download_min"], ookla["download_max"]) == pytest.approx(
        (100 * factors[0], 100 * factors[-1])
    )
    assert (out / "speedtests.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "--db", str(r.db_path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Speed tests (§3.1, §4.1)" in text and "![Speed tests by vantage point]" in text
    capsys.readouterr()
