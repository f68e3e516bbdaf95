"""The whole experiment against the fake MTurk: what the reports will read
matches what the simulated crowd did."""

from __future__ import annotations

import json

import pytest

from .rehearsal import BATCHES, FRESH_WORKER, Rehearsal

# Table 3: completed and correct per batch (reward) and country.
TABLE_3 = """
SELECT b.name, b.reward, b.countries,
       count(*) AS completed,
       sum(a.status = 'Approved') AS correct
FROM assignments a JOIN hits h ON h.hit_id = a.hit_id JOIN batches b ON b.name = h.batch
WHERE a.status IN ('Approved', 'Rejected')
GROUP BY b.name ORDER BY b.name
"""

# Figure 2: hours from publishing to each completion.
FIGURE_2 = """
SELECT b.name, (a.submit_time - b.published) / 3600.0 AS hours
FROM assignments a JOIN hits h ON h.hit_id = a.hit_id JOIN batches b ON b.name = h.batch
WHERE a.status IN ('Approved', 'Rejected')
ORDER BY b.name, hours
"""


@pytest.mark.slow
async def test_rehearsal_matches_what_was_simulated(rehearsal: Rehearsal, db):
    # The crowd is what the script says: previews, right and wrong answers,
    # one assignment accepted and never submitted.
    assert {b: len(rehearsal.completed(b)) for b in BATCHES} == {"us-005": 4, "in-010": 3}
    assert {b: len(rehearsal.correct(b)) for b in BATCHES} == {"us-005": 3, "in-010": 2}

    batches = {r["name"]: r for r in db("SELECT * FROM batches")}
    assert set(batches) == set(BATCHES)
    for name, (reward, country) in BATCHES.items():
        row = batches[name]
        assert (row["experiment"], row["reward"], row["countries"]) == (
            "rehearsal",
            reward,
            country,
        )
        assert row["sandbox"] == 1 and row["exclude_other_batches"] == 1
        assert row["published"] == pytest.approx(rehearsal.published_at[name], abs=1e-3)
        assert row["expired"] is not None and row["expired"] >= row["published"]
    assert batches["us-005"]["assignments"] == 5 and batches["in-010"]["assignments"] == 4
    hits = db("SELECT batch, max_assignments, expires FROM hits ORDER BY batch")
    assert [(r["batch"], r["max_assignments"]) for r in hits] == [("in-010", 4), ("us-005", 5)]

    table_3 = {r["name"]: tuple(r)[1:] for r in db(TABLE_3)}
    assert table_3 == {
        b: (BATCHES[b][0], BATCHES[b][1], len(rehearsal.completed(b)), len(rehearsal.correct(b)))
        for b in BATCHES
    }
    # Nothing is left unreviewed, and the abandoned assignment is not there.
    assert db("SELECT count(*) FROM assignments WHERE status = 'Submitted'")[0][0] == 0
    assert db("SELECT count(*) FROM assignments")[0][0] == 7

    figure_2: dict[str, list[float]] = {}
    for row in db(FIGURE_2):
        figure_2.setdefault(row["name"], []).append(row["hours"])
    for batch in BATCHES:
        assert figure_2[batch] == pytest.approx(rehearsal.completion_hours(batch), abs=1e-3)
    assert figure_2["us-005"] == pytest.approx([0.5, 1.0, 2.0, 5.0], abs=1e-3)


@pytest.mark.slow
async def test_rehearsal_sessions_join_their_batches(rehearsal: Rehearsal, db):
    sessions = db(
        "SELECT s.token, s.visit, s.worker_id, b.batch, x.ipv6, x.red_reported"
        " FROM sessions s JOIN session_batch b ON b.session_id = s.id"
        " JOIN session_summary x ON x.id = s.id"
    )
    by_token = {r["token"]: r for r in sessions}
    assert len(by_token) == len(rehearsal.workers)
    for worker in rehearsal.workers:
        row = by_token[worker.session_token]
        assert row["batch"] == worker.batch
        assert row["visit"] == ("accepted" if worker.script.accept else "preview")
        assert row["worker_id"] == worker.script.worker_id
        assert row["ipv6"] == ("::1" if worker.script.ipv6 else None)
        assert row["red_reported"] == worker.red_answered
    # Every assignment names the session it answered, through the hand-off.
    linked = db("SELECT assignment_id, session_token FROM assignment_session")
    expected = {w.assignment_id: w.session_token for w in rehearsal.workers if w.completed}
    assert {r["assignment_id"]: r["session_token"] for r in linked} == expected


@pytest.mark.slow
async def test_rehearsal_review_decisions(rehearsal: Rehearsal, db):
    decided = {r["assignment_id"]: r for r in db("SELECT * FROM reviews")}
    for worker in rehearsal.workers:
        if not worker.completed:
            assert worker.assignment_id not in decided
            continue
        review = decided[worker.assignment_id]
        assert review["decision"] == ("approve" if worker.correct else "reject")
        assert review["done"] is not None and review["error"] is None
        assert (review["red_expected"], review["red_reported"]) == (
            worker.red_shown,
            worker.red_answered,
        )
        mturk = rehearsal.fake.fake.assignments[worker.assignment_id]
        assert mturk.status == ("Approved" if worker.correct else "Rejected")
        answers = json.loads(
            db("SELECT answers FROM assignments WHERE assignment_id = ?", worker.assignment_id)[0][
                0
            ]
        )
        assert answers == {
            "token": worker.session_token,
            "red": str(worker.red_answered),
            "blue": str(worker.blue_fetched),
        }
        if not worker.correct:
            assert mturk.feedback is not None and mturk.feedback.startswith("Thank you")


@pytest.mark.slow
async def test_rehearsal_excludes_workers_of_the_other_batch(rehearsal: Rehearsal, db):
    names = {
        r["batch"]: r["qualification_type_id"] for r in db("SELECT * FROM batch_qualifications")
    }
    grants = {(r["batch"], r["worker_id"]) for r in db("SELECT * FROM qualification_grants")}
    completed = [w for w in rehearsal.workers if w.completed]
    assert grants == {(w.batch, w.script.worker_id) for w in completed}
    for worker in completed:
        unmet = rehearsal.refused[worker.script.worker_id]
        own = names[worker.batch]
        assert any(u.startswith(own) and u.endswith("DoesNotExist") for u in unmet), unmet
    # A worker of neither batch misses only the locale.
    assert [u.split()[0] for u in rehearsal.refused[FRESH_WORKER]] == ["00000000000000000071"]


@pytest.mark.slow
async def test_rehearsal_expired_hits_take_no_more_workers(rehearsal: Rehearsal):
    fake = rehearsal.fake.fake
    for hit in fake.hits.values():
        assert hit.expiration <= fake.now()
        assert fake.counts(hit)["NumberOfAssignmentsAvailable"] == 0
    statuses = [out for argv, _, out in rehearsal.cli if argv[1] == "status"]
    assert "us-005" in statuses[0] and "in-010" in statuses[0]
