"""End to end in network namespaces: the real server, our DNS, real browsers.

A server namespace runs ``probe-server serve`` on ports 53 and 80 with the lab
zone (``dns/lab.probe.test.zone``). Five client namespaces (IPv4-only,
dual-stack native, 6to4, Teredo-form, IPv6-only) resolve through that server
and open the survey in headless Chromium as a worker does, with MTurk's query
parameters; each counts the balls it sees rendered and submits. Needs root
and ``ip netns``; skipped otherwise (never in CI, where .ci/run provides both).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probe_server import lab as netlab
from probe_server.analysis.addresses import classify
from probe_server.testing import ServerProcess, require_tool, write_config

from .helpers import asn_db, country_db

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.lab

CLIENTS = ("v4only", "dualstack", "sixtofour", "teredo", "v6only")
SURVEY = "http://survey.probe.test/"
PLAIN_TEREDO = "LABWORKERTEREDOPLAIN"
# With PROBE_LAB_SCREENSHOTS=DIR (make lab sets docs/), these visits are saved.
SCREENSHOTS = {"dualstack": "survey-dual-stack.png", "v4only": "survey-ipv4-only.png"}


def _skip_reason() -> str | None:
    reason = netlab.available()
    if reason and os.environ.get("PROBE_SERVER_CI"):
        pytest.fail(f"CI must run the lab: {reason}")
    return reason


class LabRun:
    """The lab, its server, and what each client did."""

    def __init__(self, built: netlab.Lab, workdir: Path) -> None:
        self.lab = built
        self.workdir = workdir
        self.results: dict[str, dict[str, Any]] = {}
        self.plain: dict[str, dict[str, Any]] = {}
        self.report: dict[str, Any] = {}

    def db(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        with sqlite3.connect(self.workdir / "probe.db") as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def visit(self, role: str, *extra: str, worker: str = "") -> dict[str, Any]:
        worker = worker or f"LABWORKER{role.upper()}"
        url = f"{SURVEY}?assignmentId=LABASSIGN{worker}&hitId=LABHIT&workerId={worker}"
        argv = [sys.executable, "-m", "probe_server.labworker", url, *extra]
        done = self.lab.run(role, argv, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def session(self, role: str, worker: str = "") -> sqlite3.Row | None:
        worker = worker or f"LABWORKER{role.upper()}"
        rows = self.db("SELECT * FROM session_summary WHERE worker_id = ?", worker)
        return rows[-1] if rows else None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    require_tool("chromium")
    workdir = tmp_path_factory.mktemp("lab")
    config = write_config(
        workdir / "lab.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": {
                "ipv4": {
                    "listen": f"{netlab.SERVER_V4}:80",
                    "base_url": "http://survey.probe.test",
                },
                "ipv6": {"listen": f"[{netlab.SERVER_V6}]:80", "base_url": "http://v6.probe.test"},
            },
            "database": {"path": "probe.db"},
            "dns": {
                "zones": [
                    str(ROOT / "dns" / "lab.probe.test.zone"),
                    str(ROOT / "dns" / "v6ns.lab.probe.test.zone"),
                ],
                "listen_ipv4": f"{netlab.SERVER_V4}:53",
                "listen_ipv6": f"[{netlab.SERVER_V6}]:53",
            },
        },
    )
    shots = os.environ.get("PROBE_LAB_SCREENSHOTS")
    with netlab.Lab() as built:
        state = LabRun(built, workdir)
        server = ServerProcess(config, workdir, prefix=built.command("server", []))
        loop = asyncio.new_event_loop()
        loop.run_until_complete(server.start())
        try:
            for role in CLIENTS:
                extra = []
                if shots and role in SCREENSHOTS:
                    extra = ["--screenshot", str(Path(shots) / SCREENSHOTS[role])]
                state.results[role] = state.visit(role, *extra)
            state.plain["teredo"] = state.visit("teredo", "--plain", worker=PLAIN_TEREDO)
        finally:
            # SIGTERM flushes every queued row (DNS rows are not held for
            # their commit), so the tests read a complete database.
            server.kill(signal.SIGTERM)
            status = loop.run_until_complete(_stopped(server))
            loop.close()
            assert status == 0, server.stderr.decode()[-2000:]
        state.report = _report(workdir)
        yield state


# The lab's GeoIP: its IPv4 clients in three countries, its native IPv6
# prefix in one network. The report must find exactly this population.
LAB_COUNTRIES = {
    "192.0.2.10/32": ("US", "United States"),
    "192.0.2.20/32": ("US", "United States"),
    "192.0.2.30/32": ("IN", "India"),
    "192.0.2.40/32": ("GB", "United Kingdom"),
}
LAB_NETWORKS = {"2d00:1::/64": (64500, "Lab Native Networks")}


def _report(workdir: Path) -> dict[str, Any]:
    """The real ``probe-server report --format json`` on the lab's database."""
    geo = write_config(
        workdir / "geo.toml",
        {
            "geoip": {
                "country_db": str(country_db(workdir / "country.mmdb", LAB_COUNTRIES)),
                "asn_db": str(asn_db(workdir / "asn.mmdb", LAB_NETWORKS)),
            }
        },
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe_server",
            "report",
            "--db",
            str(workdir / "probe.db"),
            "--config",
            str(geo),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


async def _stopped(server: ServerProcess) -> int:
    try:
        return await server.wait()
    finally:
        await server.close()


def test_ipv4_only_client_has_no_ipv6_and_got_nodata(run: LabRun) -> None:
    result = run.results["v4only"]
    session = run.session("v4only")
    assert session is not None, result
    assert session["ipv6"] is None
    assert result["seen"]["red"] == session["red_count"]
    assert result["seen"]["blue"] == 0
    assert result["seen"]["failed"] == session["blue_count"]
    # The balls that failed leave nothing on screen to count (no broken-image box).
    assert result["seen"]["failed_area"] == 0
    # Its resolver asked for the IPv6-only name's A record and was told NODATA
    # (NOERROR, no answer): the name exists, just not for IPv4.
    client = run.lab.address("v4only", 4)
    rows = run.db(
        "SELECT DISTINCT rcode FROM dns_queries WHERE addr = ? AND lower(qname) = 'v6.probe.test.'"
        " AND qtype = 'A'",
        client,
    )
    assert [r["rcode"] for r in rows] == ["NOERROR"]
    assert not run.db("SELECT 1 FROM dns_queries WHERE addr = ? AND rcode = 'NXDOMAIN'", client)
    assert session["red_reported"] == session["red_count"] and session["red_correct"] == 1
    assert session["blue_reported"] == 0


def test_dual_stack_client_is_correlated_with_its_ipv6(run: LabRun) -> None:
    result = run.results["dualstack"]
    session = run.session("dualstack")
    assert session is not None, result
    assert session["ipv4"] == run.lab.address("dualstack", 4)
    assert session["ipv6"] == run.lab.address("dualstack", 6)
    assert result["seen"] == {
        "red": session["red_count"],
        "blue": session["blue_count"],
        "other": 0,
        "failed": 0,
        "failed_area": 0,
    }
    assert session["blue_fetched"] == session["blue_count"]
    assert session["red_correct"] == 1 and session["blue_reported"] == session["blue_count"]
    assert classify(session["ipv6"]).native


def test_6to4_client_fetches_over_its_6to4_address(run: LabRun) -> None:
    session = run.session("sixtofour")
    assert session is not None, run.results["sixtofour"]
    assert session["ipv6"] == run.lab.address("sixtofour", 6)
    sixtofour = classify(session["ipv6"])
    assert sixtofour.cls == "6to4" and not sixtofour.native
    assert sixtofour.embedded_ipv4 == run.lab.address("sixtofour", 4)


def test_teredo_client(run: LabRun) -> None:
    # A plain HTTP client uses the Teredo address for the IPv6-only name.
    plain = run.plain["teredo"]
    session = run.session("teredo", PLAIN_TEREDO)
    assert session is not None, plain
    assert plain["seen"]["blue"] == session["blue_count"] > 0
    assert session["ipv6"] == run.lab.address("teredo", 6)
    assert session["ipv4"] == run.lab.address("teredo", 4)
    teredo = classify(session["ipv6"])
    assert teredo.cls == "teredo" and not teredo.native
    assert teredo.teredo is not None
    assert (str(teredo.teredo.server), str(teredo.teredo.client), teredo.teredo.port) == (
        netlab.TEREDO_SERVER,
        "203.0.113.40",
        40000,
    )


def test_chromium_ignores_a_teredo_only_address(run: LabRun) -> None:
    # Chromium does not use IPv6 for names when the host's only global IPv6
    # address is Teredo (2001::/32): a measurement bias, written up in
    # docs/lab.md. If this starts failing, Chromium changed and so must the docs.
    result = run.results["teredo"]
    session = run.session("teredo")
    assert session is not None, result
    assert result["seen"]["blue"] == 0
    assert session["ipv6"] is None


def test_ipv6_only_client_cannot_load_the_ipv4_only_survey(run: LabRun) -> None:
    # The paper's design cannot see IPv6-only clients at all: the survey name
    # has only an A record. Chromium gets that A record (it asks for A even
    # without IPv4) and then has no route to it.
    result = run.results["v6only"]
    error = result.get("error", "")
    assert "ERR_ADDRESS_UNREACHABLE" in error or "ERR_NAME_NOT_RESOLVED" in error, result
    assert run.session("v6only") is None
    assert not run.db("SELECT 1 FROM requests WHERE addr = ?", run.lab.address("v6only", 6))
    # It did reach our DNS, over IPv6, and every answer about the survey name
    # was NOERROR (an A record; NODATA for AAAA and for HTTPS, which Chromium
    # also asks for), never NXDOMAIN.
    rows = run.db(
        "SELECT DISTINCT family, qtype, rcode FROM dns_queries WHERE addr = ?"
        " AND lower(qname) = 'survey.probe.test.'",
        run.lab.address("v6only", 6),
    )
    assert ("ipv6", "A", "NOERROR") in {tuple(r) for r in rows}
    assert {(r["family"], r["rcode"]) for r in rows} == {("ipv6", "NOERROR")}


def test_every_visit_reached_only_its_own_sessions(run: LabRun) -> None:
    sessions = run.db("SELECT ipv4, worker_id, visit FROM session_summary ORDER BY id")
    clients = {run.lab.address(role, 4): role for role in CLIENTS if run.lab.address(role, 4)}
    assert {clients[s["ipv4"]] for s in sessions} == {"v4only", "dualstack", "sixtofour", "teredo"}
    assert {s["visit"] for s in sessions} == {"accepted"}


def test_report_matches_the_lab_population(run: LabRun) -> None:
    report = run.report
    # Five sessions: four browsers with IPv4 and the plain Teredo client; the
    # IPv6-only client never got a page.
    assert report["sessions"] == {"total": 5, "previews": 0, "accepted": 5}
    assert report["ipv4_addresses"] == 4
    assert report["ipv6_addresses"] == 3
    classes = {name: n for name, n in report["ipv6_classes"].items() if n}
    assert classes == {"native": 1, "6to4": 1, "teredo": 1}
    countries = {c["country"]: c["ipv4_addresses"] for c in report["countries"]}
    assert countries == {"US": 2, "IN": 1, "GB": 1}
    # Only the dual-stack client counts as native: 1 of 4 IPv4 addresses; 6to4
    # and Teredo are counted as IPv6 but not as adoption, as in the paper.
    overall = report["adoption"]["overall"]
    assert (overall["ipv4_addresses"], overall["native_ipv6"]) == (4, 1)
    assert overall["rate"] == pytest.approx(0.25)
    assert overall["ci95_low"] < 0.25 < overall["ci95_high"]
    by_country = {
        a["country"]: (a["ipv4_addresses"], a["native_ipv6"])
        for a in report["adoption"]["by_country"]
    }
    assert by_country == {"US": (2, 1), "IN": (1, 0), "GB": (1, 0)}
    assert report["providers"] == [{"asn": 64500, "org": "Lab Native Networks", "addresses": 1}]


def test_lab_is_torn_down_after_a_failure_and_after_a_dead_run() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    hosts = [netlab.Host("server", f"{netlab.SERVER_V4}/24", (f"{netlab.SERVER_V6}/64",))]
    built = netlab.Lab(hosts, tag=f"{os.getpid()}x")
    with pytest.raises(RuntimeError), built:
        assert any(n.startswith(built.ns("")) for n in netlab._live_namespaces())
        raise RuntimeError("a test failed inside the lab")
    assert not any(n.startswith(built.ns("")) for n in netlab._live_namespaces())
    # A lab whose process was killed leaves namespaces behind; the next lab
    # sweeps them away. PID 1 is never a lab, so use a free-looking number.
    dead = netlab.Lab(hosts, tag="4194303")
    dead.up()
    assert any(n.startswith(dead.ns("")) for n in netlab._live_namespaces())
    netlab.sweep_stale()
    assert not any(n.startswith(dead.ns("")) for n in netlab._live_namespaces())
    assert not (netlab.NETNS_ETC / dead.ns("server")).exists()
