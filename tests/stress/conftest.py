"""Faults and hostile input against the real process: shared fixtures and the
summary table.

Every test here runs in two sizes: the CI size (``make test``, a few seconds
each) and the full size (``make stress``, ``PROBE_STRESS=full``). Each test
reports one row per fault or attack with :func:`report`: what was done, how
much, what was observed, what was lost. The rows are printed as a table at
the end of the run and, with ``PROBE_STRESS_REPORT=FILE``, written to FILE as
Markdown (the source of docs/reliability.md).
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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    rows = [[row[h] for h in HEADERS] for row in ROWS]
    terminalreporter.section(f"stress summary ({'full' if FULL else 'CI'} size)")
    terminalreporter.write_line(
        tabulate(rows, headers=HEADERS, tablefmt="simple_grid", maxcolwidths=[18, 40, 18, 52, 16])
    )
    target = os.environ.get("PROBE_STRESS_REPORT")
    if target:
        machine = (
            f"{psutil.cpu_count()} vCPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB,"
            f" Linux {platform.release()}, Python {platform.python_version()}"
        )
        text = (
            f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
            f" {'full' if FULL else 'CI'} size, {machine}.\n\n"
            + tabulate(rows, headers=HEADERS, tablefmt="github")
            + "\n"
        )
        Path(target).write_text(text)
        Path(target).with_suffix(".json").write_text(json.dumps(ROWS, indent=1) + "\n")


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
