"""Faults and hostile input against the real process: shared fixtures and the
summary table.

Every test here runs in two sizes: the CI size (``make test``, a few seconds
each) and the full size (``make stress``, ``PROBE_STRESS=full``). Each test
reports one row per fault or attack with :func:`report`: what was done, how
much, what was observed, what was lost. The rows are printed as a table at
the end of the run and, with ``PROBE_STRESS_REPORT=FILE``, written to FILE as
Markdown (``make stress`` then puts it into docs/reliability.md).

:data:`EXPECTED` names every item the table must hold and the test that
reports it. An item without its row (its test failed, was skipped, or did
not run) gets a FAILED, SKIPPED or NOT RUN row; with
``PROBE_STRESS_REPORT`` set, the run then fails, so ``make stress`` cannot
pass with an item missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from tabulate import tabulate

from probe_server.testing import ServerProcess, write_config

from ..conftest import EXAMPLE_ZONES

FULL = os.environ.get("PROBE_STRESS") == "full"
ROWS: list[dict[str, str]] = []
HEADERS = ["item", "what was done", "how much", "observed", "lost"]

# Every item of the summary table, in its order, and the test reporting it.
EXPECTED: dict[str, str] = {
    "fuzzing: DNS": "test_fuzz.py::test_dns_fuzz_on_the_live_process",
    "fuzzing: HTTP": "test_fuzz.py::test_http_fuzz_raw_and_server_survives",
    "overload: HTTP probes": "test_overload.py::test_http_overload_sheds_load_and_loses_nothing",
    "overload: DNS flood": "test_overload.py::test_dns_flood_does_not_cost_a_probe",
    "kill -9 under mixed load": "test_kill.py::test_kill_9_at_random_moments_under_mixed_load",
    "full disk": "test_full_disk.py::"
    "test_full_disk_keeps_serving_never_acknowledges_and_catches_up",
    "full disk at first start": "test_full_disk.py::"
    "test_first_start_on_a_full_disk_leaves_nothing_that_blocks_the_next",
    "slow clients: slowloris HTTP": "test_slow_clients.py::test_slowloris_and_idle_dns_connections",
    "slow clients: idle DNS TCP": "test_slow_clients.py::test_slowloris_and_idle_dns_connections",
    "slow clients: TLS handshakes": "test_slow_clients.py::test_tls_handshakes_that_never_finish",
    "hostile: forged and replayed tokens": "test_hostile.py::"
    "test_forged_and_replayed_tokens_are_flagged",
    "hostile: turkSubmitTo open redirect": "test_hostile.py::"
    "test_open_redirects_never_reach_the_answer_page",
    "hostile: script injection": "test_hostile.py::test_no_reflected_field_injects_markup",
    "hostile: path traversal": "test_hostile.py::"
    "test_no_file_is_served_by_traversal_and_no_admin_path_is_public",
    "hostile: admin paths on public sites": "test_hostile.py::"
    "test_no_file_is_served_by_traversal_and_no_admin_path_is_public",
    "hostile: DNS amplification": "test_hostile.py::test_rate_limiting_caps_dns_amplification",
}
# What happened to each test of the run: "passed", "failed: ...", "skipped: ...".
OUTCOMES: dict[str, str] = {}
LOAD: list[float] = []


def scale(ci: Any, full: Any) -> Any:
    """The CI size or the full size of a parameter."""
    return full if FULL else ci


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.stress)
            if FULL:
                # Full-size runs take minutes, not the CI timeout's two.
                item.add_marker(pytest.mark.timeout(900))


Report = Callable[..., None]


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """Record a row of the summary table."""

    def add(item: str, done: str, amount: str, observed: str, lost: str) -> None:
        ROWS.append(
            {
                "item": item,
                "what was done": done,
                "how much": amount,
                "observed": observed,
                "lost": lost,
                "test": request.node.nodeid,
            }
        )

    return add


def pytest_sessionstart(session: pytest.Session) -> None:
    LOAD.append(os.getloadavg()[0])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember each test's outcome: an item without its row says why."""
    if report.failed:
        if not OUTCOMES.get(report.nodeid, "").startswith("failed"):
            reason = str(report.longrepr).strip().splitlines()
            OUTCOMES[report.nodeid] = f"failed: {reason[-1][:200] if reason else report.when}"
    elif report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        OUTCOMES[report.nodeid] = f"skipped: {reason.removeprefix('Skipped: ')[:200]}"
    elif report.when == "call":
        OUTCOMES.setdefault(report.nodeid, "passed")


def outcome_of(test: str, outcomes: dict[str, str]) -> str | None:
    """The outcome of the test ``test`` (``module::function``), any parameters."""
    for nodeid, outcome in outcomes.items():
        if nodeid.split("[")[0].endswith(test):
            return outcome
    return None


def summary(
    rows: list[dict[str, str]],
    outcomes: dict[str, str],
    expected: dict[str, str] = EXPECTED,
) -> list[dict[str, str]]:
    """The table's rows in the order of ``expected``, each with its ``result``
    (ok, FAILED, SKIPPED, NOT RUN); a row for every expected item."""
    order = {item: i for i, item in enumerate(expected)}
    table = []
    for row in rows:
        outcome = outcomes.get(row.get("test", ""), "passed")
        if outcome.startswith("failed"):  # reported, then failed
            table.append({**row, "result": "FAILED", "lost": f"FAILED after reporting ({outcome})"})
        else:
            table.append({**row, "result": "ok"})
    reported = {row["item"] for row in rows}
    for item, test in expected.items():
        if item in reported:
            continue
        outcome = outcome_of(test, outcomes)
        if outcome is None:
            result, why = "NOT RUN", "not run"
        elif outcome.startswith("skipped"):
            result, why = "SKIPPED", outcome
        elif outcome.startswith("failed"):
            result, why = "FAILED", outcome
        else:
            result, why = "FAILED", "passed without reporting its row"
        table.append(
            {
                "item": item,
                "what was done": f"`{test}`",
                "how much": "-",
                "observed": f"**{result}**: {why}",
                "lost": "unknown",
                "test": test,
                "result": result,
            }
        )
    table.sort(key=lambda r: order.get(r["item"], len(order)))
    return table


def complete(table: list[dict[str, str]], expected: dict[str, str] = EXPECTED) -> bool:
    """Every expected item has a row, and every row is ok."""
    items = {row["item"] for row in table}
    return set(expected) <= items and all(row["result"] == "ok" for row in table)


def _ran_stress(outcomes: dict[str, str]) -> bool:
    return bool(ROWS) or any(outcome_of(test, outcomes) for test in EXPECTED.values())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # make stress (PROBE_STRESS_REPORT) fails with an item missing or failed,
    # even when pytest itself would pass (skipped tests).
    if not os.environ.get("PROBE_STRESS_REPORT") or not _ran_stress(OUTCOMES):
        return
    if not complete(summary(ROWS, OUTCOMES)) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ran_stress(OUTCOMES):
        return
    table = summary(ROWS, OUTCOMES)
    target = os.environ.get("PROBE_STRESS_REPORT")
    # A partial run (one file, -k) shows what it ran; make stress shows all.
    shown = table if target else [row for row in table if row["result"] != "NOT RUN"]
    terminalreporter.section(f"stress summary ({'full' if FULL else 'CI'} size)")
    terminalreporter.write_line(
        tabulate(
            [[row[h] for h in HEADERS] for row in shown],
            headers=HEADERS,
            tablefmt="simple_grid",
            maxcolwidths=[18, 40, 18, 52, 16],
        )
    )
    missing = [row["item"] for row in table if row["result"] != "ok"]
    if missing:
        terminalreporter.write_line(f"items without a good row: {', '.join(missing)}", red=True)
    rows = [[row[h] for h in HEADERS] for row in table]
    if target:
        machine = (
            f"{psutil.cpu_count()} vCPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB,"
            f" Linux {platform.release()}, Python {platform.python_version()}"
        )
        load = (
            f"load average {LOAD[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
            if LOAD
            else ""
        )
        busy = (
            " (the machine was busy with other work: figures of time and rate are lower"
            " than on an idle one)"
            if LOAD and max(LOAD[0], os.getloadavg()[0]) > 3
            else ""
        )
        text = (
            f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
            f" {'full' if FULL else 'CI'} size, {machine}; {load}{busy}.\n\n"
            + tabulate(
                [[cell.replace("|", "\\|") for cell in row] for row in rows],
                headers=HEADERS,
                tablefmt="github",
            )
            + "\n"
        )
        Path(target).write_text(text)
        Path(target).with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")


# -- the server process ------------------------------------------------------------


def server_config(workdir: Path, **sections: dict[str, Any]) -> Path:
    """A config on loopback, port 0, files in ``workdir``; sections merged in."""
    data: dict[str, Any] = {
        "server": {"secret_file": "probe.secret", "shutdown_timeout": 5},
        "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
        "database": {"path": "probe.db"},
        # The admin listener (metrics, health) on loopback, for the health checks.
        "admin": {"enabled": True, "listen": "127.0.0.1:0"},
        "dns": {
            "zones": EXAMPLE_ZONES,
            "listen_ipv4": "127.0.0.1:0",
            "listen_ipv6": "[::1]:0",
            "rrl": {"enabled": False},
        },
    }
    for name, values in sections.items():
        table = data.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(table.get(key), dict):
                table[key] = {**table[key], **value}
            else:
                table[key] = value
    return write_config(workdir / "probe.toml", data)


@pytest.fixture
async def processes() -> AsyncIterator[list[ServerProcess]]:
    """Server processes the test starts; all killed at the end, whatever happens."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            await server.close()


ROOT = Path(__file__).resolve().parent.parent.parent


class Attack:
    """``tests/stress/attack.py`` in a process of its own (see there)."""

    def __init__(self, attacks: list[tuple[str, str, str | None, int]], seconds: float) -> None:
        self.spec = {"attacks": attacks, "seconds": seconds}
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.stress.attack",
            json.dumps(self.spec),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )

    async def result(self) -> dict[str, dict[str, int]]:
        assert self.process is not None
        async with asyncio.timeout(float(self.spec["seconds"]) + 120):  # type: ignore[arg-type]
            out, _ = await self.process.communicate()
        assert self.process.returncode == 0, out
        result: dict[str, dict[str, int]] = json.loads(out)
        return result

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss / 2**20)


def open_files(pid: int) -> int:
    return int(psutil.Process(pid).num_fds())
