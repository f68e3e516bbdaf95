"""Shared fixtures: configs on port 0, an in-process server on real sockets,
a fake MTurk, and a guard that keeps every AWS call on loopback."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from probe_server.config import Config
from probe_server.mturk.fake import FakeMTurk, FakeServer
from probe_server.server import ProbeServer

from .rehearsal import KindRehearsal, Rehearsal, run_kind_rehearsal, run_rehearsal

# Nothing listens on the discard port of loopback: an MTurk (or any AWS)
# client that is not pointed at the fake fails here at once.
DEAD_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(autouse=True, scope="session")
def no_real_aws() -> Iterator[None]:
    """Dummy credentials only, and no AWS endpoint but loopback.

    AWS's standard endpoint variables send every client that is not given
    an endpoint_url (the fake's) to a closed loopback port: botocore honours
    them for any service, probe-server for the MTurk sandbox too. No
    credentials, config or instance metadata of the machine are read.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTONLYNOTREAL")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "test-only-not-a-real-secret")
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)
        patch.setenv("AWS_ENDPOINT_URL_MTURK", DEAD_ENDPOINT)
        yield


@pytest.fixture
async def fake_mturk() -> AsyncIterator[FakeServer]:
    """A fake MTurk on a loopback port: its ``url`` is endpoint_url and worker site.

    Its clock stands still until a test moves it (``fake.fake.advance``), so
    MTurk's times in a test are exact.
    """
    start = time.time()
    server = FakeServer(FakeMTurk(clock=lambda: start))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


MakeConfig = Callable[..., Config]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ZONES = [
    str(ROOT / "dns" / "example.org.zone"),
    str(ROOT / "dns" / "v6ns.example.org.zone"),
]


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """Undo what a test's main() did to logging, so tests don't leak into each other."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if type(h).__name__ == "_StderrHandler"]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """Build a validated config on loopback, port 0, files under tmp_path."""

    def make(**sections: dict[str, Any]) -> Config:
        data: dict[str, Any] = {
            "server": {"secret_file": str(tmp_path / "probe.secret")},
            "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
            "database": {"path": str(tmp_path / "probe.db")},
            # Rate limiting is off unless a test turns it on: tests send
            # bursts from 127.0.0.1 and ::1, one prefix each.
            "dns": {
                "zones": EXAMPLE_ZONES,
                "listen_ipv4": "127.0.0.1:0",
                "listen_ipv6": "[::1]:0",
                "rrl": {"enabled": False},
            },
        }
        for name, values in sections.items():
            merged = data.setdefault(name, {})
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
        return Config.model_validate(data)

    return make


@pytest.fixture
async def server(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    probe_server = ProbeServer(make_config())
    await probe_server.start()
    try:
        yield probe_server
    finally:
        await probe_server.stop()


@pytest.fixture
async def turk_server(
    make_config: MakeConfig, fake_mturk: FakeServer
) -> AsyncIterator[ProbeServer]:
    """The probe server, allowed to hand answers on to the fake MTurk's worker site."""
    server = ProbeServer(make_config(mturk={"rehearsal_worker_sites": [fake_mturk.url]}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Callable[..., list[sqlite3.Row]]]:
    """Query the test database with a separate plain sqlite3 connection."""
    path = tmp_path / "probe.db"
    connections: list[sqlite3.Connection] = []

    def query(sql: str, *params: Any) -> list[sqlite3.Row]:
        if not connections:
            conn = sqlite3.connect(path)
            conn.row_factory = sqlite3.Row
            connections.append(conn)
        return connections[0].execute(sql, params).fetchall()

    yield query
    for conn in connections:
        conn.close()


@pytest.fixture
async def rehearsal(
    tmp_path: Path, make_config: MakeConfig, fake_mturk: FakeServer
) -> AsyncIterator[Rehearsal]:
    """A whole experiment run against the fake MTurk (see tests/rehearsal.py).

    The probe server keeps running until the test ends; ``rehearsal.db_path``
    is its database, ``rehearsal.workers`` what was simulated.
    """
    config = make_config(mturk={"rehearsal_worker_sites": [fake_mturk.url]})
    server = ProbeServer(config)
    await server.start()
    try:
        yield await run_rehearsal(tmp_path, server, fake_mturk)
    finally:
        await server.stop()


@pytest.fixture(params=["speedtest", "tool"])
async def kind_rehearsal(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_config: MakeConfig,
    fake_mturk: FakeServer,
) -> AsyncIterator[KindRehearsal]:
    """A speed-test experiment, then a tool experiment, each with an English and a
    translated batch, run against the fake MTurk (see tests/rehearsal.py)."""
    config = make_config(mturk={"rehearsal_worker_sites": [fake_mturk.url]})
    server = ProbeServer(config)
    await server.start()
    try:
        yield await run_kind_rehearsal(tmp_path, server, fake_mturk, request.param)
    finally:
        await server.stop()
