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
        },
    )
    shots = os.environ.get("PROBE_LAB_SCREENSHOTS")
    # SIGTERM or SIGHUP (a CI job cancelled, a terminal closed) raise, so
    # the teardown below and the Lab's own run as after a failure.
    with netlab.signals_interrupt(), netlab.Lab() as built:
        state = LabRun(built, workdir)
        server = ServerProcess(config, workdir, prefix=built.command("server", []))
        loop = asyncio.new_event_loop()
        resolvers = []
        status = None
        try:
            loop.run_until_complete(server.start())
            for resolver in netlab.default_resolvers():
                resolvers.append(netlab.RunningResolver(built, resolver, workdir / resolver.role))
            for role in CLIENTS:
                extra = []
                if shots and role in SCREENSHOTS:
                    extra = ["--screenshot", str(Path(shots) / SCREENSHOTS[role])]
                state.results[role] = state.visit(role, *extra)
            state.plain["teredo"] = state.visit("teredo", "--plain", worker=PLAIN_TEREDO)
        finally:
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
    # told NODATA (NOERROR, no answer): the name exists, just not for IPv4.
    rows = run.db(
        "SELECT DISTINCT rcode FROM session_dns WHERE session_token = ? AND name = 'v6.probe.test.'"
        " AND qtype = 'A'",
        session["token"],
    )
    assert [r["rcode"] for r in rows] == ["NOERROR"]
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
    # without IPv4) and then has no route to it.
    result = run.results["v6only"]
    error = result.get("error", "")
    assert "ERR_ADDRESS_UNREACHABLE" in error or "ERR_NAME_NOT_RESOLVED" in error, result
    assert run.session("v6only") is None
    assert not run.db("SELECT 1 FROM requests WHERE addr = ?", run.lab.address("v6only", 6))
    # Its resolver did ask us, and every answer about the survey name was
    # NOERROR (an A record; NODATA for AAAA and for HTTPS, which Chromium
    # also asks for), never NXDOMAIN.
    rows = run.db(
        "SELECT DISTINCT qtype, rcode FROM dns_queries WHERE addr IN (?, ?)"
        " AND lower(qname) = 'survey.probe.test.'",
        netlab.RESOLVER_V4,
        netlab.RESOLVER_V6,
    )
    assert ("A", "NOERROR") in {tuple(r) for r in rows}
    assert {r["rcode"] for r in rows} == {"NOERROR"}


def test_every_visit_reached_only_its_own_sessions(run: LabRun) -> None:
    sessions = run.db("SELECT ipv4, worker_id, visit FROM session_summary ORDER BY id")
    clients = {public_ipv4(run.lab, role): role for role in CLIENTS if public_ipv4(run.lab, role)}
    assert {clients[s["ipv4"]] for s in sessions} == set(CLIENTS) - {"v6only"}
    assert {s["visit"] for s in sessions} == {"accepted"}


def test_report_matches_the_lab_population(run: LabRun) -> None:
    report = run.report
    # Nine sessions: eight browsers with IPv4 and the plain Teredo client; the
    # IPv6-only client never got a page.
    assert report["sessions"] == {"total": 9, "previews": 0, "accepted": 9}
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


def battery_row(run: LabRun, role: str) -> sqlite3.Row:
    session = run.session(role)
    assert session is not None, run.results[role]
    (row,) = run.db("SELECT * FROM battery_outcomes WHERE session_token = ?", session["token"])
    return row


def beacon_states(run: LabRun, role: str) -> dict[str, str]:
    session = run.session(role)
    assert session is not None
    rows = run.db(
        "SELECT probe, beacon_state FROM battery_probes WHERE session_token = ?", session["token"]
    )
    return {r["probe"]: r["beacon_state"] for r in rows}


# What each browser's network makes of the battery (None: not measured).
EXPECTED = {
    "v4only": dict(
        ipv4_only=1,
        ipv6_capable=0,
        ipv6_preferred=0,
        broken_dual_stack=0,
        ipv6_without_aaaa=0,
        mtu_trouble=None,
        resolver_ipv6=1,
    ),
    "dualstack": dict(
        ipv4_only=0,
        ipv6_capable=1,
        ipv6_preferred=1,
        broken_dual_stack=0,
        ipv6_without_aaaa=0,
        mtu_trouble=0,
        resolver_ipv6=1,
    ),
    # Its resolver has no IPv6: the v6ns name never resolves.
    "v4resolver": dict(
        ipv4_only=0,
        ipv6_capable=1,
        ipv6_preferred=1,
        broken_dual_stack=0,
        ipv6_without_aaaa=0,
        mtu_trouble=0,
        resolver_ipv6=0,
    ),
    # Its resolver drops AAAA answers: only the literal reaches IPv6.
    "noaaaa": dict(
        ipv4_only=0,
        ipv6_capable=0,
        ipv6_preferred=0,
        broken_dual_stack=0,
        ipv6_without_aaaa=1,
        mtu_trouble=None,
    ),
    # IPv6 connects, then carries nothing: the dual-stack fetch hangs.
    "broken": dict(
        ipv4_only=0,
        ipv6_capable=0,
        ipv6_preferred=None,
        broken_dual_stack=1,
        ipv6_without_aaaa=0,
        mtu_trouble=None,
        resolver_ipv6=1,
    ),
    # Full-size IPv6 packets are lost on its path; small ones arrive.
    "mtu": dict(
        ipv4_only=0,
        ipv6_capable=1,
        ipv6_preferred=1,
        broken_dual_stack=0,
        ipv6_without_aaaa=0,
        mtu_trouble=1,
        resolver_ipv6=1,
    ),
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


def test_report_has_the_battery(run: LabRun) -> None:
    battery = run.report["battery"]
    assert battery["sessions"] == 9
    outcomes = battery["outcomes"]
    assert outcomes["broken_dual_stack"]["yes"] == 1
    assert outcomes["mtu_trouble"]["yes"] == 1
    assert outcomes["ipv6_without_aaaa"]["yes"] >= 1
    assert outcomes["hint_6rd"]["yes"] == 1
    countries = {c["country"] for c in battery["by_country"]}
    assert countries == {"US", "IN", "GB"}
