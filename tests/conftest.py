"""Shared fixtures: configs on port 0, an in-process server on real sockets."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from probe_server.config import Config
from probe_server.server import ProbeServer

MakeConfig = Callable[..., Config]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ZONES = [
    str(ROOT / "dns" / "example.org.zone"),
    str(ROOT / "dns" / "v6ns.example.org.zone"),
]


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
