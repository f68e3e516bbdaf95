"""The report's speed-test and tool sections on a small hand-made database."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from probe_server.analysis.report import build_report, coefficient_of_variation, render_markdown
from probe_server.cli import main
from probe_server.store import open_sync
from probe_server.web import (
    INSERT_REQUEST,
    INSERT_SESSION_OF_KIND,
    INSERT_SPEEDTEST,
    INSERT_TOOL_REPORT,
)

T0 = 1_700_000_000.0


def session(conn, token: str, ipv4: str, worker: str | None, survey: str = "speedtest") -> None:
    visit = "accepted" if worker else "direct"
    conn.execute(
        INSERT_SESSION_OF_KIND,
        (
            token,
            T0,
            ipv4,
            1,
            "ua",
            1,
            1,
            visit,
            f"A-{token}" if worker else None,
            None,
            worker,
            None,
            "",
            survey,
            "en",
        ),
    )


def blue(conn, token: str, ipv6: str) -> None:
    conn.execute(
        INSERT_REQUEST,
        (T0, "ipv6", ipv6, 1, "GET", f"/blue/{token}/1.png", "blue", token, 1, 1, 200, 10, "ua"),
    )


def speeds(conn, token: str, t: float, **tests: tuple[float, float]) -> None:
    for test, (down, up) in tests.items():
        conn.execute(INSERT_SPEEDTEST, (token, t, "192.0.2.1", test, test.upper(), down, up, None))


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "probe.db"
    conn = open_sync(path)
    with conn:
        conn.execute("BEGIN")
        # W1 at one address: two sessions; the first submission of each counts.
        session(conn, "s1", "192.0.2.1", "W1")
        speeds(conn, "s1", T0 + 1, ookla=(100, 10), ndt=(50, 5))
        speeds(conn, "s1", T0 + 2, ookla=(999, 999), ndt=(999, 999))  # a resubmission: ignored
        session(conn, "s2", "192.0.2.1", "W1")
        speeds(conn, "s2", T0 + 3, ookla=(300, 30), ndt=(150, 15), cloudflare=(200, 20))
        blue(conn, "s2", "2001:db8::1")
        # W1 again from another address: another vantage point.
        session(conn, "s3", "198.51.100.7", "W1")
        speeds(conn, "s3", T0 + 4, ookla=(20, 2))
        # A direct visit, and a session that never reported.
        session(conn, "s4", "203.0.113.9", None)
        speeds(conn, "s4", T0 + 5, ookla=(10, 1), ndt=(30, 3))
        session(conn, "s5", "203.0.113.10", "W2")
        # A tool report, first one counts.
        session(conn, "s6", "203.0.113.11", "W3", survey="tool")
        conn.execute(INSERT_TOOL_REPORT, ("s6", T0 + 6, "203.0.113.11", "Spoofer", "123"))
        conn.execute(INSERT_TOOL_REPORT, ("s6", T0 + 7, "203.0.113.11", "Spoofer", "456"))
    conn.close()
    return path


def test_coefficient_of_variation():
    assert coefficient_of_variation([10.0]) is None
    assert coefficient_of_variation([]) is None
    assert coefficient_of_variation([10.0, 10.0]) == 0.0
    assert coefficient_of_variation([50.0, 100.0, 150.0]) == pytest.approx(0.5)


def test_vantage_points_and_spread(database):
    report = build_report(database)
    points = {(v.worker_id, v.ipv4): v for v in report.speedtests.vantage_points}
    assert list(points) == [("W1", "192.0.2.1"), ("W1", "198.51.100.7"), (None, "203.0.113.9")]
    w1 = points[("W1", "192.0.2.1")]
    # Each test's mean over the vantage point's sessions (first submissions only).
    assert {s.test: (s.download_mbps, s.upload_mbps, s.reports) for s in w1.speeds} == {
        "cloudflare": (200, 20, 1),
        "ndt": (100, 10, 2),
        "ookla": (200, 20, 2),
    }
    assert w1.ipv6 == ("2001:db8::1",)
    expected = statistics.stdev([200, 100, 200]) / statistics.fmean([200, 100, 200])
    assert w1.download_cv == pytest.approx(expected)
    assert w1.upload_cv == pytest.approx(expected)
    assert points[("W1", "198.51.100.7")].download_cv is None  # one tool: no spread
    direct = points[(None, "203.0.113.9")]
    assert direct.download_cv == pytest.approx(statistics.stdev([10, 30]) / 20)
    tools = {t.test: t for t in report.speedtests.tools}
    assert tools["ookla"].vantage_points == 3
    assert tools["ookla"].download_median == 20
    assert (tools["ookla"].download_min, tools["ookla"].download_max) == (10, 200)
    assert report.speedtests.download_cv_median == pytest.approx(
        statistics.median([expected, direct.download_cv])
    )
    (tool,) = report.tool_reports
    assert (tool.worker_id, tool.ipv4, tool.report) == ("W3", "203.0.113.11", "123")

    text = render_markdown(report, speed_figure="speedtests.png")
    assert "## Speed tests (§3.1, §4.1)" in text
    assert "| W1 | 192.0.2.1 | 2001:db8::1 | 200.0 / 20.0 | 100.0 / 10.0 | 200.0 / 20.0 |" in text
    assert "| (direct visit) | 203.0.113.9 | none | – | 30.0 / 3.0 | 10.0 / 1.0 |" in text
    assert "## Tool reports (§3.2)" in text and "| W3 | 203.0.113.11 | none | (no batch) |" in text


def test_json_and_csv_outputs(database, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--db", str(database), "--format", "json", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [v["worker_id"] for v in data["speedtests"]["vantage_points"]] == ["W1", "W1", None]
    first = data["speedtests"]["vantage_points"][0]
    assert set(first) == {
        "worker_id",
        "ipv4",
        "ipv6",
        "batches",
        "download_cv",
        "upload_cv",
        "tests",
    }
    assert set(first["tests"][0]) == {
        "test",
        "name",
        "download_mbps",
        "upload_mbps",
        "reports",
        "share_urls",
    }
    assert [t["test"] for t in data["speedtests"]["tests"]] == ["cloudflare", "ndt", "ookla"]
    assert data["tool_reports"][0]["report"] == "123"
    assert (out / "speedtests.png").stat().st_size > 0
    assert main(["report", "--db", str(database), "--format", "csv", "--out", str(out)]) == 0
    with (out / "speedtests.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 + 1 + 2
    assert rows[0]["worker_id"] == "W1" and rows[0]["test"] == "cloudflare"
    with (out / "tool_reports.csv").open(newline="") as f:
        assert [r["report"] for r in csv.DictReader(f)] == ["123"]
    capsys.readouterr()


def test_a_report_id_cannot_break_the_markdown_table(tmp_path):
    """A loose report pattern lets a worker's text reach the table: it stays one cell."""
    path = tmp_path / "probe.db"
    conn = open_sync(path)
    hostile = "a|b\n| x | y |<img src=x onerror=alert(1)>\\"
    with conn:
        conn.execute("BEGIN")
        session(conn, "t1", "203.0.113.11", "W|3", survey="tool")
        conn.execute(INSERT_TOOL_REPORT, ("t1", T0, "203.0.113.11", "Spoofer", hostile))
    conn.close()
    text = render_markdown(build_report(path))
    section = text.split("## Tool reports (§3.2)", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header, _, row = rows[:3]
    # The row has as many cells as the header: no pipe ended a cell early.
    cells = lambda line: len(line.replace("\\|", "").split("|"))  # noqa: E731
    assert cells(row) == cells(header)
    assert "<img" not in text
    assert "a\\|b \\| x \\| y \\|&lt;img src=x onerror=alert(1)>\\\\" in row
    assert "W\\|3" in row
