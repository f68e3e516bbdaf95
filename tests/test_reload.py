"""SIGHUP reloads: zones (caches cleared), ACME DNS-01 records, reload hooks, watchdog."""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import dns.rcode
import pytest

from probe_server.keys import reload_hooks_key
from probe_server.server import ProbeServer, StartupError
from probe_server.testing import ServerProcess, write_config

from .conftest import EXAMPLE_ZONES, MakeConfig
from .dns_client import query


@pytest.fixture
def zones(tmp_path: Path) -> list[Path]:
    copies = []
    for zone in EXAMPLE_ZONES:
        copy = tmp_path / Path(zone).name
        shutil.copy(zone, copy)
        copies.append(copy)
    return copies


@pytest.fixture
async def reloadable(
    make_config: MakeConfig, zones: list[Path], tmp_path: Path
) -> AsyncIterator[ProbeServer]:
    config = make_config(
        dns={"zones": [str(z) for z in zones], "acme_challenges": str(tmp_path / "dns-01.zone")}
    )
    server = ProbeServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def addresses(reply) -> list[str]:
    return sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)


async def test_reload_serves_the_edited_zone_and_forgets_cached_answers(reloadable, zones):
    before = await query(reloadable, "survey.example.org", "A")
    assert addresses(before) == ["192.0.2.10"]
    assert (await query(reloadable, "new.example.org", "A")).rcode() == dns.rcode.NXDOMAIN
    text = zones[0].read_text().replace("survey           IN A     192.0.2.10",
                                        "survey           IN A     192.0.2.11")  # fmt: skip
    zones[0].write_text(text + "new              IN A     192.0.2.99\n")
    assert (await reloadable.reload())["zones"] is True
    assert addresses(await query(reloadable, "survey.example.org", "A")) == ["192.0.2.11"]
    assert addresses(await query(reloadable, "new.example.org", "A")) == ["192.0.2.99"]
    # Per-session names (served from a shared template) follow too.
    reply = await query(reloadable, "abcdefghij.v6.example.org", "AAAA", transport="tcp")
    assert addresses(reply) == ["2001:db8::10"]


async def test_a_broken_zone_keeps_the_old_one(reloadable, zones, caplog):
    zones[0].write_text(zones[0].read_text() + "broken IN A not-an-address\n")
    with caplog.at_level(logging.ERROR):
        assert (await reloadable.reload())["zones"] is False
    assert "event=reload_failed part=zones" in caplog.text
    assert "old zones kept" in caplog.text
    assert addresses(await query(reloadable, "survey.example.org", "A")) == ["192.0.2.10"]


async def test_dns01_challenge_records_come_and_go(reloadable, tmp_path):
    challenges = tmp_path / "dns-01.zone"
    name = "_acme-challenge.v6.example.org"
    # Covered by *.v6 before: NODATA for TXT.
    assert not (await query(reloadable, name, "TXT")).answer
    # A certificate for v6.example.org and *.v6.example.org: two values at once.
    challenges.write_text(
        f'{name}. 60 IN TXT "first-value"\n'
        f'{name}. 60 IN TXT "second-value"\n'
        '_acme-challenge.ds.v6ns.example.org. 60 IN TXT "child-zone"\n'
    )
    assert (await reloadable.reload())["zones"] is True
    reply = await query(reloadable, name, "TXT")
    assert addresses(reply) == ['"first-value"', '"second-value"']
    assert reply.answer[0].ttl == 60
    # The child zone's name server is IPv6-only: IPv6 sockets answer for it.
    child = await query(reloadable, "_acme-challenge.ds.v6ns.example.org", "TXT", family="ipv6")
    assert addresses(child) == ['"child-zone"']
    # The wildcard no longer covers the challenge name, but still everything else.
    assert addresses(await query(reloadable, "x.v6.example.org", "AAAA")) == ["2001:db8::10"]
    challenges.write_text("")  # the cleanup hook removed them
    assert (await reloadable.reload())["zones"] is True
    assert not (await query(reloadable, name, "TXT")).answer


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("_acme-challenge.v6.example.org. 60 IN A 192.0.2.1", "only _acme-challenge TXT"),
        ('survey.example.org. 60 IN TXT "x"', "only _acme-challenge TXT"),
        ('_acme-challenge.example.net. 60 IN TXT "x"', "in none of the zones served"),
        ('_acme-challenge.v6.example.org. 60 IN TXT "unterminated', "dns-01.zone"),
    ],
)
async def test_bad_challenge_file_keeps_the_old_zones(reloadable, tmp_path, line, error, caplog):
    (tmp_path / "dns-01.zone").write_text(line + "\n")
    with caplog.at_level(logging.ERROR):
        assert (await reloadable.reload())["zones"] is False
    assert error in caplog.text
    assert addresses(await query(reloadable, "survey.example.org", "A")) == ["192.0.2.10"]


async def test_bad_challenge_file_stops_startup(make_config, tmp_path):
    path = tmp_path / "dns-01.zone"
    path.write_text('survey.example.org. 60 IN TXT "x"\n')
    server = ProbeServer(make_config(dns={"acme_challenges": str(path)}))
    with pytest.raises(StartupError, match=r"^dns\.acme_challenges: .*only _acme-challenge"):
        await server.start()


async def test_reload_hooks_run_and_a_failing_one_is_reported(reloadable, caplog):
    calls = []

    async def geoip() -> None:
        calls.append("geoip")

    async def broken() -> None:
        raise OSError("database file is truncated")

    assert reloadable.app is not None
    reloadable.app[reload_hooks_key].extend([("broken", broken), ("geoip", geoip)])
    with caplog.at_level(logging.ERROR):
        results = await reloadable.reload()
    assert results == {"zones": True, "broken": False, "geoip": True}
    assert calls == ["geoip"]
    assert "part=broken error='database file is truncated'" in caplog.text


async def test_process_reloads_zones_on_sighup_and_answers_the_watchdog(tmp_path, zones):
    config = write_config(
        tmp_path / "probe.toml",
        {
            "server": {"secret_file": "probe.secret"},
            "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
            "database": {"path": "probe.db"},
            "dns": {
                "zones": [str(z) for z in zones],
                "listen_ipv4": "127.0.0.1:0",
                "listen_ipv6": "[::1]:0",
            },
        },
    )
    # systemd's WatchdogSec=1 would set WATCHDOG_USEC=1000000: a message every 0.5 s.
    server = ServerProcess(config, tmp_path, keep_notify=True, env={"WATCHDOG_USEC": "200000"})
    await server.start()
    try:
        await server.notification(lambda m: m == "WATCHDOG=1")
        await server.notification(lambda m: m == "WATCHDOG=1")
        zones[0].write_text(zones[0].read_text() + "added IN A 192.0.2.77\n")
        server.kill(signal.SIGHUP)
        reloading = await server.notification(lambda m: "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        ready = await server.notification(lambda m: m.startswith("READY=1"))
        assert "zones=ok" in ready
        import dns.asyncquery
        import dns.message

        host, _, port = server.endpoints["dns_udp_ipv4"].rpartition(":")
        reply = await dns.asyncquery.udp(
            dns.message.make_query("added.example.org", "A"), host, port=int(port), timeout=5
        )
        assert addresses(reply) == ["192.0.2.77"]
        server.kill(signal.SIGTERM)
        await server.notification(lambda m: m == "STOPPING=1")
        assert await server.wait() == 0
    finally:
        await server.close()
