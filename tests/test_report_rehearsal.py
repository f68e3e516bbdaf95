"""The report on the whole experiment rehearsed against the fake MTurk.

What the MTurk side stored (batches, HITs, synced assignments) and what the
simulated crowd did must come out of ``probe-server report`` as Table 3,
Figure 2 and the preview counts.
"""

from __future__ import annotations

import csv
import json

import pytest

from probe_server.cli import main

from .rehearsal import BATCHES, Rehearsal


@pytest.mark.slow
async def test_report_reads_what_the_rehearsal_did(rehearsal: Rehearsal, tmp_path, capsys):
    db = str(rehearsal.db_path)
    capsys.readouterr()
    assert main(["report", "--db", db, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["sessions"]["total"] == len(rehearsal.workers)
    previews = [w for w in rehearsal.workers if not w.script.accept]
    assert report["previews"]["sessions"] == len(previews)
    assert report["sessions"]["accepted"] == len(rehearsal.workers) - len(previews)
    # Table 3: a row per batch, in the country its HITs were restricted to.
    assert sorted(report["batches"], key=lambda b: b["batch"]) == [
        {
            "batch": name,
            "reward": reward,
            "country": country,
            "completed": len(rehearsal.completed(name)),
            "correct": len(rehearsal.correct(name)),
        }
        for name, (reward, country) in sorted(BATCHES.items())
    ]
    # Blue balls over loopback: counted, never native.
    assert report["ipv6_classes"]["native"] == 0
    assert report["adoption"]["overall"]["native_ipv6"] == 0

    out = tmp_path / "out"
    assert main(["report", "--db", db, "--format", "csv", "--out", str(out)]) == 0
    with (out / "figure2.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for name in BATCHES:
        hours = [float(r["hours"]) for r in rows if r["batch"] == name]
        assert hours == pytest.approx(rehearsal.completion_hours(name), abs=1e-3)
        completed = [int(r["completed"]) for r in rows if r["batch"] == name]
        assert completed == list(range(1, len(hours) + 1))
