"""End to end in network namespaces: the real server, our DNS, real browsers.

A server namespace runs ``probe-server serve`` on ports 53 and 80 with the lab
zone (``dns/lab.probe.test.zone``) and the measurement battery on. Three
resolver namespaces run Unbound (dual-stack, IPv4-only, AAAA-dropping) with a
stub zone at that server. Client namespaces (IPv4-only, dual-stack native,
6to4, Teredo-form, IPv6-only; a client of the IPv4-only resolver, one of the
AAAA-dropping resolver, one with broken IPv6, one behind a router whose path
drops full-size IPv6 packets) resolve through them and open the survey in
headless Chromium as a worker does, with MTurk's query parameters; each
counts the balls it sees rendered and submits. Needs root, ``ip netns``,
nftables and Unbound; skipped otherwise (never in CI, where .ci/run
provides them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import select
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

CLIENTS = (
    "v4only",
    "dualstack",
    "sixtofour",
    "teredo",
    "v6only",
    "v4resolver",
    "noaaaa",
    "broken",
    "mtu",
)
# Probes still loading after this many seconds are reported timed out.
BEACON_TIMEOUT = 4.0
SURVEY = "http://survey.probe.test/"
PLAIN_TEREDO = "LABWORKERTEREDOPLAIN"
# With PROBE_LAB_SCREENSHOTS=DIR (make lab sets docs/), these visits are saved.
SCREENSHOTS = {"dualstack": "survey-dual-stack.png", "v4only": "survey-ipv4-only.png"}
# The fake MTurk (`probe-server fake-mturk`) in the lab's mturk namespace:
# every browser with IPv4 accepts a HIT there and hands its answer back.
MTURK_SITE = f"http://{netlab.MTURK_V4}:8765"
EXPERIMENT = """\
name = "lab"
title = "Count the red and blue balls"
description = "Count the red balls and the blue balls you can see."
external_url = "{survey}"
assignment_duration = 600
lifetime = 86400
auto_approval_delay = 259200
database = "{database}"

[[batches]]
name = "lab"
reward = "0.05"
assignments = 20
"""
# Two more browser visits beside the clients': one with JavaScript off (no
# beacon: the server's log alone classifies it) on the IPv4-only network,
# and one that answers before the beacon's timeout on the broken-IPv6
# network (the page is closed while its IPv6 probes still load).
NO_JAVASCRIPT = ("v4only", "ALABNOJS")
EARLY = ("broken", "ALABEARLY")


def worker_of(role: str) -> str:
    """The workerId of a client's browser visit (MTurk's form: A and capitals)."""
    return f"ALAB{role.upper()}"


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
        self.extra: dict[str, dict[str, Any]] = {}
        self.report: dict[str, Any] = {}
        self.hit_id = ""
        # The unique survey name the IPv6-only client was sent to.
        self.v6only_name = f"v6only-{secrets.token_hex(6)}.survey.probe.test"

    def db(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        with sqlite3.connect(self.workdir / "probe.db") as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def worker(self, role: str, *extra: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "probe_server.labworker", *extra]
        done = self.lab.run(role, argv, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def visit(self, role: str, *extra: str, worker: str = "") -> dict[str, Any]:
        """A worker on MTurk: accept the lab's HIT, open it, count, answer, hand on."""
        country = LAB_COUNTRIES[f"{public_ipv4(self.lab, role)}/32"][0]
        return self.worker(
            role,
            MTURK_SITE,
            "--hit",
            self.hit_id,
            "--worker",
            worker or worker_of(role),
            "--country",
            country,
            *extra,
        )

    def direct(self, role: str, url: str, *extra: str, worker: str = "") -> dict[str, Any]:
        """A visit straight to ``url`` with MTurk's parameters but no turkSubmitTo."""
        worker = worker or worker_of(role)
        query = f"?assignmentId=LABASSIGN{worker}&hitId=LABHIT&workerId={worker}"
        return self.worker(role, f"{url}{query}", *extra)

    def session(self, role: str, worker: str = "") -> sqlite3.Row | None:
        worker = worker or worker_of(role)
        rows = self.db("SELECT * FROM session_summary WHERE worker_id = ?", worker)
        return rows[-1] if rows else None

    def hits(self, action: str, *extra: str) -> str:
        """``probe-server hits ACTION`` against the fake, from the mturk namespace."""
        argv = [
            sys.executable,
            "-m",
            "probe_server",
            "hits",
            action,
            str(self.workdir / "experiment.toml"),
            "--endpoint-url",
            MTURK_SITE,
            *extra,
        ]
        done = self.lab.run("mturk", argv, timeout=120)
        assert done.returncode == 0, (done.stdout, done.stderr[-2000:])
        return done.stdout


def start_fake_mturk(built: netlab.Lab, log: Path) -> subprocess.Popen[str]:
    """``probe-server fake-mturk`` on the lab's MTurk address; ready once it says so."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            built.command(
                "mturk",
                [
                    sys.executable,
                    "-m",
                    "probe_server",
                    "fake-mturk",
                    "--listen",
                    MTURK_SITE.removeprefix("http://"),
                ],
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    for line in process.stdout:
        if "Worker site:" in line:
            return process
    process.wait()
    raise RuntimeError(f"fake-mturk exited ({process.returncode}): {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[str] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process is not None and process.stdout is not None:
        process.stdout.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    require_tool("chromium")
    require_tool("unbound")
    require_tool("nft")
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
            "battery": {
                "probes": ["ds", "literal", "mtu", "v6ns"],
                "ds_url": "http://ds.probe.test",
                "literal_url": f"http://[{netlab.SERVER_V6}]",
                "v6ns_url": "http://ds.v6ns.probe.test",
                "labels": ["ipv4", "ipv6", "ds", "v6ns"],
                "beacon": True,
                "beacon_timeout": BEACON_TIMEOUT,
            },
            # The answer page may hand on to the lab's fake MTurk.
            "mturk": {"rehearsal_worker_sites": [MTURK_SITE]},
        },
    )
    (workdir / "experiment.toml").write_text(
        EXPERIMENT.format(survey=SURVEY, database=workdir / "probe.db")
    )
    shots = os.environ.get("PROBE_LAB_SCREENSHOTS")
    # SIGTERM or SIGHUP (a CI job cancelled, a terminal closed) raise, so
    # the teardown below and the Lab's own run as after a failure.
    with netlab.signals_interrupt(), netlab.Lab() as built:
        state = LabRun(built, workdir)
        server = ServerProcess(config, workdir, prefix=built.command("server", []))
        loop = asyncio.new_event_loop()
        resolvers = []
        fake: subprocess.Popen[str] | None = None
        status = None
        try:
            loop.run_until_complete(server.start())
            for resolver in netlab.default_resolvers():
                resolvers.append(netlab.RunningResolver(built, resolver, workdir / resolver.role))
            fake = start_fake_mturk(built, workdir / "fake-mturk.log")
            state.hits("publish", "--no-split")
            (state.hit_id,) = (r["hit_id"] for r in state.db("SELECT hit_id FROM hits"))
            for role in CLIENTS:
                extra = []
                if shots and role in SCREENSHOTS:
                    extra = ["--screenshot", str(Path(shots) / SCREENSHOTS[role])]
                if role == "v6only":
                    # No IPv4: it cannot reach MTurk's IPv4 worker site
                    # either. A name of its own, so that its resolver has
                    # to ask our DNS (nothing cached).
                    url = f"http://{state.v6only_name}/"
                    state.results[role] = state.direct(role, url, *extra)
                else:
                    state.results[role] = state.visit(role, *extra)
            state.plain["teredo"] = state.direct("teredo", SURVEY, "--plain", worker=PLAIN_TEREDO)
            role, worker = NO_JAVASCRIPT
            state.extra["nojs"] = state.visit(role, "--no-javascript", worker=worker)
            role, worker = EARLY
            state.extra["early"] = state.visit(role, "--early", worker=worker)
            state.hits("sync")
        finally:
            stop(fake)
            for running in resolvers:
                running.stop()
            if server.process is not None and server.process.returncode is None:
                # SIGTERM flushes every queued row (DNS rows are not held
                # for their commit), so the tests read a complete database.
                with contextlib.suppress(ProcessLookupError):  # it may have just exited
                    server.kill(signal.SIGTERM)
                status = loop.run_until_complete(_stopped(server))
            loop.close()
        # Outside the finally: a failed visit is reported as itself, not
        # hidden behind the server's exit status.
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
    "192.0.2.50/32": ("US", "United States"),
    "192.0.2.70/32": ("IN", "India"),
    "192.0.2.80/32": ("IN", "India"),
    "192.0.2.90/32": ("GB", "United Kingdom"),
}
# The lab's IPv4 and its native IPv6 in one network; the router's 6rd-style
# prefix in another, as a tunnel provider's would be.
LAB_NETWORKS = {
    "192.0.2.0/24": (64500, "Lab Native Networks"),
    "2d00:1::/64": (64500, "Lab Native Networks"),
    "2d00:90::/32": (64501, "Lab Tunnel Provider"),
}
# The IPv4 address the server sees for each client (the mtu client is
# behind the router's NAT).
PUBLIC_IPV4 = {"mtu": netlab.ROUTER_V4}


def public_ipv4(built: netlab.Lab, role: str) -> str | None:
    return PUBLIC_IPV4.get(role) or built.address(role, 4)


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
    # Its resolver asked for the session's IPv6-only name's A record and was
    # told NODATA (NOERROR, no answer, the zone's SOA in authority): the name
    # exists, just not for IPv4.
    rows = run.db(
        "SELECT DISTINCT rcode, ancount, nscount FROM session_dns WHERE session_token = ?"
        " AND name = 'v6.probe.test.' AND qtype = 'A'",
        session["token"],
    )
    assert [tuple(r) for r in rows] == [("NOERROR", 0, 1)]
    assert not run.db(
        "SELECT 1 FROM session_dns WHERE session_token = ? AND rcode = 'NXDOMAIN'", session["token"]
    )
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
    # without IPv4) and then has no route to it: not a name that failed to
    # resolve, an address it cannot reach.
    result = run.results["v6only"]
    assert "ERR_ADDRESS_UNREACHABLE" in result.get("error", ""), result
    assert run.session("v6only") is None
    assert not run.db("SELECT 1 FROM requests WHERE addr = ?", run.lab.address("v6only", 6))
    # It was sent to a survey name nobody had asked for (under the zone's
    # *.survey wildcard), so its resolver had nothing cached: that exact
    # name's A query reached our DNS and got its A record. The other
    # answers about it (AAAA, and HTTPS, which Chromium also asks for) were
    # NODATA; none was NXDOMAIN.
    rows = run.db(
        "SELECT DISTINCT addr, qtype, rcode, ancount FROM dns_queries WHERE lower(qname) = ?",
        run.v6only_name + ".",
    )
    asked = {(r["qtype"], r["rcode"], r["ancount"]) for r in rows}
    assert ("A", "NOERROR", 1) in asked, asked
    assert {r["rcode"] for r in rows} == {"NOERROR"}
    assert {r["addr"] for r in rows} <= {netlab.RESOLVER_V4, netlab.RESOLVER_V6}


def test_every_browser_hands_its_answer_to_mturk(run: LabRun) -> None:
    # Each browser accepted the lab's HIT on the fake MTurk and opened the
    # task URL it gave (assignmentId, hitId, workerId, turkSubmitTo); after
    # the survey stored the answer, the answer page posted it to the fake's
    # externalSubmit (its script; the no-JavaScript visit pressed its
    # button). `hits sync` then read every assignment back from MTurk.
    visits = {worker_of(role): result for role, result in run.results.items() if role != "v6only"}
    visits[NO_JAVASCRIPT[1]] = run.extra["nojs"]
    visits[EARLY[1]] = run.extra["early"]
    for worker, result in visits.items():
        assert result["after_submit"] == f"{MTURK_SITE}/mturk/externalSubmit", result
        (session,) = run.db(
            "SELECT token, assignment_id, hit_id, turk_submit_to FROM sessions WHERE worker_id = ?",
            worker,
        )
        assert session["turk_submit_to"] == MTURK_SITE
        assert (session["assignment_id"], session["hit_id"]) == (
            result["assignment_id"],
            run.hit_id,
        )
        (assignment,) = run.db(
            "SELECT a.status, a.worker_id, a.answers, s.session_token, s.session_id"
            " FROM assignments a JOIN assignment_session s USING (assignment_id)"
            " WHERE assignment_id = ?",
            result["assignment_id"],
        )
        assert (assignment["status"], assignment["worker_id"]) == ("Submitted", worker)
        # What arrived at MTurk is what the worker typed, with the session.
        assert json.loads(assignment["answers"]) == {
            "token": session["token"],
            "red": str(result["seen"]["red"]),
            "blue": str(result["seen"]["blue"]),
        }
        assert assignment["session_token"] == session["token"]
        assert assignment["session_id"] is not None
    # Without JavaScript the answer page stayed until its button was pressed.
    assert run.extra["nojs"]["answered_at"] == SURVEY + "submit"
    # The plain client came without turkSubmitTo: nothing to hand on.
    assert run.plain["teredo"]["submitted"]
    (plain,) = run.db("SELECT turk_submit_to FROM sessions WHERE worker_id = ?", PLAIN_TEREDO)
    assert plain["turk_submit_to"] is None


def test_every_visit_reached_only_its_own_sessions(run: LabRun) -> None:
    sessions = run.db("SELECT ipv4, worker_id, visit FROM session_summary ORDER BY id")
    clients = {public_ipv4(run.lab, role): role for role in CLIENTS if public_ipv4(run.lab, role)}
    assert {clients[s["ipv4"]] for s in sessions} == set(CLIENTS) - {"v6only"}
    assert {s["visit"] for s in sessions} == {"accepted"}


def test_report_matches_the_lab_population(run: LabRun) -> None:
    report = run.report
    # Eleven sessions: eight browsers with IPv4, the plain Teredo client, and
    # the no-JavaScript and early-answer visits (from the IPv4-only and the
    # broken networks, whose addresses are counted already); the IPv6-only
    # client never got a page.
    assert report["sessions"] == {"total": 11, "previews": 0, "accepted": 11}
    assert report["ipv4_addresses"] == 8
    # Blue balls came from the dual-stack, IPv4-resolver and mtu clients
    # (native), and from 6to4 and Teredo; the AAAA-dropping and broken
    # clients fetched none.
    assert report["ipv6_addresses"] == 5
    classes = {name: n for name, n in report["ipv6_classes"].items() if n}
    assert classes == {"native": 3, "6to4": 1, "teredo": 1}
    countries = {c["country"]: c["ipv4_addresses"] for c in report["countries"]}
    assert countries == {"US": 3, "IN": 3, "GB": 2}
    # Native adoption: dual-stack, IPv4-resolver (US) and the router (GB);
    # 6to4 and Teredo count as IPv6 but not as adoption, as in the paper.
    overall = report["adoption"]["overall"]
    assert (overall["ipv4_addresses"], overall["native_ipv6"]) == (8, 3)
    assert overall["rate"] == pytest.approx(3 / 8)
    assert overall["ci95_low"] < 3 / 8 < overall["ci95_high"]
    by_country = {
        a["country"]: (a["ipv4_addresses"], a["native_ipv6"])
        for a in report["adoption"]["by_country"]
    }
    assert by_country == {"US": (3, 2), "IN": (3, 0), "GB": (2, 1)}
    assert report["providers"] == [
        {"asn": 64500, "org": "Lab Native Networks", "addresses": 2},
        {"asn": 64501, "org": "Lab Tunnel Provider", "addresses": 1},
    ]


def host_links() -> set[str]:
    """The network interfaces of the machine's own namespace."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in links.stdout.splitlines()}


def test_lab_is_torn_down_after_a_failure_and_after_a_dead_run() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    hosts = [netlab.Host("server", f"{netlab.SERVER_V4}/24", (f"{netlab.SERVER_V6}/64",))]
    built = netlab.Lab(hosts, tag=f"{os.getpid()}x")
    before = host_links()
    with pytest.raises(RuntimeError), built:
        assert any(n.startswith(built.ns("")) for n in netlab._live_namespaces())
        # No end of the lab's links is in the machine's own namespace: no
        # packet can leave the lab.
        assert host_links() == before
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


# A process that holds a lab: two hosts, a resolver file, and a process in
# the server's namespace that ignores SIGTERM (as a server busy flushing
# might), which only SIGKILL stops. It says where that process is, then
# waits for a signal.
HOLDER = """
import json, signal, subprocess, sys
from probe_server import lab as netlab

STUBBORN = (
    "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " print('up', flush=True); signal.pause()"
)
hosts = [
    netlab.Host("server", "192.0.2.1/24"),
    netlab.Host("client", "192.0.2.10/24", resolver="192.0.2.1"),
]
with netlab.signals_interrupt(), netlab.Lab(hosts) as built:
    inside = subprocess.Popen(
        built.command("server", [sys.executable, "-c", STUBBORN]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert inside.stdout.readline() == "up\\n"
    print(json.dumps({"inside": inside.pid}), flush=True)
    signal.pause()
"""


class Holder:
    """A child process holding a lab, and a pidfd on the process inside it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.process.communicate(timeout=30)
        self.inside = json.loads(line)["inside"]
        self.pidfd = os.pidfd_open(self.inside)
        self.prefix = f"{netlab.PREFIX}-{self.process.pid}-"
        assert netlab.namespace_pids(self.prefix + "server") == [self.inside]
        assert (netlab.NETNS_ETC / (self.prefix + "client") / "resolv.conf").exists()

    def wait(self) -> int:
        _, stderr = self.process.communicate(timeout=60)
        self.stderr = stderr
        return self.process.returncode

    def left_behind(self) -> list[str]:
        left = [n for n in netlab._live_namespaces() if n.startswith(self.prefix)]
        if netlab.NETNS_ETC.is_dir():
            left += [str(e) for e in netlab.NETNS_ETC.iterdir() if e.name.startswith(self.prefix)]
        # The pidfd turns readable once the process has exited.
        readable, _, _ = select.select([self.pidfd], [], [], 10)
        if not readable:
            left.append(f"process {self.inside}")
        return left

    def close(self) -> None:
        os.close(self.pidfd)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_lab_stopped_by_a_signal_leaves_nothing(signum: int) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    holder = Holder()
    try:
        holder.process.send_signal(signum)
        status = holder.wait()
        # The signal became an exception: the Lab's teardown ran and the
        # process ended with the traceback of the interrupt, not silently.
        assert "Interrupted: lab interrupted by" in holder.stderr, holder.stderr
        assert status != 0
        assert holder.left_behind() == []
    finally:
        holder.close()


def test_a_lab_killed_outright_is_swept_by_the_next() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    holder = Holder()
    try:
        # SIGKILL runs no teardown: namespaces, resolver files and the
        # process inside stay, until the next lab sweeps them away.
        holder.process.kill()
        holder.wait()
        assert netlab.namespace_pids(holder.prefix + "server") == [holder.inside]
        netlab.sweep_stale()
        assert holder.left_behind() == []
    finally:
        holder.close()


# -- the measurement battery ------------------------------------------------------

OUTCOMES = (
    "ipv4_only",
    "ipv6_capable",
    "ipv6_preferred",
    "broken_dual_stack",
    "ipv6_without_aaaa",
    "mtu_trouble",
    "resolver_ipv6",
)


def battery_row(run: LabRun, role: str, worker: str = "") -> sqlite3.Row:
    session = run.session(role, worker)
    assert session is not None, run.results.get(role)
    (row,) = run.db("SELECT * FROM battery_outcomes WHERE session_token = ?", session["token"])
    return row


def probe_rows(run: LabRun, role: str, worker: str = "") -> dict[str, sqlite3.Row]:
    session = run.session(role, worker)
    assert session is not None
    rows = run.db("SELECT * FROM battery_probes WHERE session_token = ?", session["token"])
    return {r["probe"]: r for r in rows}


def beacon_states(run: LabRun, role: str, worker: str = "") -> dict[str, str]:
    return {probe: row["beacon_state"] for probe, row in probe_rows(run, role, worker).items()}


HINTS = ("hint_teredo", "hint_6to4", "hint_6rd", "hint_asn_differs")


def outcomes(
    ipv4_only: int | None,
    ipv6_capable: int | None,
    ipv6_preferred: int | None,
    broken_dual_stack: int | None,
    ipv6_without_aaaa: int | None,
    mtu_trouble: int | None,
    resolver_ipv6: int | None,
    hints: str | None,
) -> dict[str, int | None]:
    """A row of docs/lab.md's outcome table; ``hints``: the hints that are 1,
    space separated ("" for none, None when there is no IPv6 address)."""
    named = (hints or "").split()
    return dict(
        ipv4_only=ipv4_only,
        ipv6_capable=ipv6_capable,
        ipv6_preferred=ipv6_preferred,
        broken_dual_stack=broken_dual_stack,
        ipv6_without_aaaa=ipv6_without_aaaa,
        mtu_trouble=mtu_trouble,
        resolver_ipv6=resolver_ipv6,
        **{hint: None if hints is None else int(hint in named) for hint in HINTS},
    )


# What each browser's network makes of the battery (None: not measured),
# row by row as in docs/lab.md.
EXPECTED = {
    "v4only": outcomes(1, 0, 0, 0, 0, None, 1, None),
    "dualstack": outcomes(0, 1, 1, 0, 0, 0, 1, ""),
    # A 6to4 address is IPv6 all the same (not native: the paper's tables).
    "sixtofour": outcomes(0, 1, 1, 0, 0, 0, 1, "hint_6to4"),
    # Chromium with a Teredo address only: no IPv6 for names, the literal
    # through Teredo (see test_chromium_with_teredo_or_6to4).
    "teredo": outcomes(0, 0, 0, 0, 0, None, 1, "hint_teredo"),
    # Its resolver has no IPv6: the v6ns name never resolves.
    "v4resolver": outcomes(0, 1, 1, 0, 0, 0, 0, ""),
    # Its resolver drops AAAA answers: only the literal reaches IPv6. The
    # filter also drops the v6ns name server's AAAA glue, so that resolver
    # never reaches the child: no IPv6 resolver either.
    "noaaaa": outcomes(0, 0, 0, 0, 1, None, 0, ""),
    # IPv6 connects, then carries nothing: the dual-stack fetch hangs, and
    # no IPv6 fetch ever arrives (no address to hint about).
    "broken": outcomes(0, 0, None, 1, 0, None, 1, None),
    # Full-size IPv6 packets are lost on its path; small ones arrive.
    "mtu": outcomes(0, 1, 1, 0, 0, 1, 1, "hint_6rd hint_asn_differs"),
}


@pytest.mark.parametrize("role", EXPECTED)
def test_battery_classifies_each_client(run: LabRun, role: str) -> None:
    row = battery_row(run, role)
    got = {key: row[key] for key in EXPECTED[role]}
    assert got == EXPECTED[role], (dict(row), run.results[role])
    # Every browser with a page sent its beacon, and the worker counted right.
    assert run.results[role]["beacon"] == "final"
    session = run.session(role)
    assert session is not None and session["red_correct"] == 1


def test_without_javascript_the_servers_log_alone_classifies(run: LabRun) -> None:
    role, worker = NO_JAVASCRIPT
    result = run.extra["nojs"]
    session = run.session(role, worker)
    assert session is not None and session["red_correct"] == 1, result
    assert "beacon" not in result  # the page's script never ran
    assert not run.db("SELECT 1 FROM beacons WHERE session_token = ?", session["token"])
    probes = probe_rows(run, role, worker)
    assert {p: r["beacon_state"] for p, r in probes.items()} == dict.fromkeys(probes, None)
    # What was fetched is 'ok'; what never came is 'missing' (no beacon to
    # say failed or timed out), and the outcomes are those of the same
    # network with JavaScript.
    assert {p: r["result"] for p, r in probes.items()} == {
        "ipv4": "ok",
        "ipv6": "missing",
        "ds": "ok",
        "literal": "missing",
        "mtu": "missing",
        "v6ns": "ok",
    }
    assert probes["ds"]["site"] == probes["v6ns"]["site"] == "ipv4"
    row = battery_row(run, role, worker)
    assert {key: row[key] for key in EXPECTED[role]} == EXPECTED[role], dict(row)


def test_answering_before_the_beacons_timeout_leaves_the_ipv6_probes_unmeasured(
    run: LabRun,
) -> None:
    role, worker = EARLY
    result = run.extra["early"]
    session = run.session(role, worker)
    assert session is not None and session["red_correct"] == 1, result
    # The worker answered while the IPv6 probes still hung: no report yet.
    # Leaving the page sent the one report (the page's "closed": final 0),
    # with what was still loading as pending. It left at pagehide, while the
    # browser went on through the answer page to MTurk's, so it was in long
    # before the browser closed (the server's log is the only witness).
    assert result["beacon_before_submit"] is None
    rows = run.db(
        "SELECT addr, final, probe, state FROM beacons WHERE session_token = ?", session["token"]
    )
    assert {(r["addr"], r["final"]) for r in rows} == {(run.lab.address(role, 4), 0)}
    states = {r["probe"]: r["state"] for r in rows}
    still = {"ipv6", "ds", "literal", "mtu", "v6ns"}
    assert states == {"ipv4": "loaded", **dict.fromkeys(still, "pending")}
    probes = probe_rows(run, role, worker)
    assert probes["ipv4"]["result"] == "ok"
    assert {p: probes[p]["result"] for p in still} == dict.fromkeys(still, "pending")
    # Nothing that depends on a pending probe is measured. The resolver's
    # IPv6 is: the DNS log saw it ask for the v6ns name over IPv6.
    row = battery_row(run, role, worker)
    assert {key: row[key] for key in EXPECTED[role]} == outcomes(
        None, None, None, None, None, None, 1, None
    ), dict(row)


def test_broken_and_black_holed_probes_are_timeouts_not_closed_pages(run: LabRun) -> None:
    broken = beacon_states(run, "broken")
    assert broken["ipv4"] == "loaded"
    assert broken["ipv6"] == broken["ds"] == broken["literal"] == "timeout"
    # The black hole: the large probe's request arrived, its answer never did.
    mtu = beacon_states(run, "mtu")
    assert mtu["mtu"] == "timeout" and mtu["ipv6"] == mtu["ds"] == "loaded"
    session = run.session("mtu")
    assert session is not None
    (large,) = run.db(
        "SELECT requested, result FROM battery_probes WHERE session_token = ? AND probe = 'mtu'",
        session["token"],
    )
    assert tuple(large) == (1, "timeout")
    # The worker behind the black hole still saw every blue ball: they fit
    # in one packet of the 1280-byte link.
    assert run.results["mtu"]["seen"]["blue"] == session["blue_count"]


def test_chromium_with_teredo_or_6to4(run: LabRun) -> None:
    # Chromium never asks for AAAA with only a Teredo address, yet reaches an
    # IPv6 literal through it: not a resolver dropping AAAA, so not counted
    # as one (test-ipv6.com's rule), but Teredo.
    teredo = battery_row(run, "teredo")
    assert (teredo["ipv6_result"], teredo["literal_result"]) == ("failed", "ok")
    assert (teredo["ipv6_without_aaaa"], teredo["hint_teredo"]) == (0, 1)
    # With a 6to4 address it still takes IPv6 for the dual-stack name, where
    # RFC 6724's default policy would prefer IPv4.
    sixtofour = battery_row(run, "sixtofour")
    assert (sixtofour["ds_site"], sixtofour["ipv6_preferred"]) == ("ipv6", 1)


def test_tunnel_hints(run: LabRun) -> None:
    mtu = battery_row(run, "mtu")
    # Its prefix embeds the router's IPv4 address (6rd) in another network.
    assert (mtu["hint_6rd"], mtu["hint_asn_differs"], mtu["hint_6to4"]) == (1, 1, 0)
    assert mtu["ipv4"] == netlab.ROUTER_V4
    dual = battery_row(run, "dualstack")
    assert (dual["hint_6rd"], dual["hint_asn_differs"], dual["hint_teredo"]) == (0, 0, 0)
    assert battery_row(run, "sixtofour")["hint_6to4"] == 1


def test_session_labels_join_each_session_with_its_resolver(run: LabRun) -> None:
    # The dual-stack resolver asks with random letter case (0x20), reaches the
    # IPv6-only name server over IPv6, and the IPv4-only one never does.
    dual = run.session("dualstack")
    v4res = run.session("v4resolver")
    assert dual is not None and v4res is not None
    asked = run.db(
        "SELECT DISTINCT resolver, family FROM session_dns WHERE session_token = ?"
        " AND name = 'ds.v6ns.probe.test.'",
        dual["token"],
    )
    assert ("2d00:1::2", "ipv6") in {tuple(r) for r in asked}
    # The IPv4-only resolver asked for the session's other names, over IPv4
    # only; for the v6ns name it got the referral to the IPv6-only server
    # and stopped (with QNAME minimisation it never even sent the full name).
    only_ipv4 = run.db(
        "SELECT DISTINCT resolver, family FROM session_dns WHERE session_token = ?", v4res["token"]
    )
    assert {tuple(r) for r in only_ipv4} == {(netlab.RESOLVER4_V4, "ipv4")}
    assert run.db("SELECT 1 FROM dns_queries WHERE qname <> lower(qname) LIMIT 1")
    # The resolvers saw labels, never a session's token (its credential).
    tokens = [r["session_token"] for r in run.db("SELECT session_token FROM battery_pages")]
    names = [r["qname"].lower() for r in run.db("SELECT qname FROM dns_queries") if r["qname"]]
    assert tokens and not [n for n in names if any(token in n for token in tokens)]
    labelled = run.db("SELECT DISTINCT session_token FROM session_dns")
    assert len(labelled) == len(tokens)


def test_report_has_the_battery(run: LabRun) -> None:
    battery = run.report["battery"]
    # Counted as the paper's tables count: eleven sessions, eight IPv4
    # addresses, each once (the Teredo host's browser and plain client, the
    # IPv4-only host's two visits, the broken host's two).
    assert (battery["sessions"], battery["ipv4_addresses"]) == (11, 8)
    assert battery["unit"] == "ipv4_addresses"
    outcomes = {key: (o["ipv4_addresses"], o["yes"]) for key, o in battery["outcomes"].items()}
    # IPv6-capable: dual-stack, 6to4, IPv4-resolver, mtu, and the Teredo
    # host (its plain client fetched the blue balls; its browser did not).
    assert outcomes["ipv6_capable"] == (8, 5)
    assert outcomes["broken_dual_stack"] == (8, 1)
    assert outcomes["ipv6_without_aaaa"] == (8, 1)
    assert outcomes["mtu_trouble"][1] == 1
    assert outcomes["hint_6rd"][1] == 1
    countries = {c["country"] for c in battery["by_country"]}
    assert countries == {"US", "IN", "GB"}
