"""``probe-server check``: each check's pass and fail paths, offline and with --public.

The deployment under test lives on loopback: the zone probe.test (tests/
zones/check) puts the name server and both sites on 127.0.0.1 and ::1. For
--public, a second server plays the parent zone test. on 127.0.0.2 and a
third one the recursive resolver; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from probe_server.check import Checker, Options, Result, check_geoip_file, is_probe_server
from probe_server.cli import main
from probe_server.config import Config, load_config
from probe_server.server import ProbeServer
from probe_server.testing import ServerProcess, free_port, write_config

from .certs import TestCA
from .helpers import asn_db, country_db

ROOT = Path(__file__).resolve().parent.parent
CHECK_ZONES = Path(__file__).parent / "zones" / "check"
NAMES = ["survey.probe.test", "*.survey.probe.test", "v6.probe.test", "*.v6.probe.test"]


def shared_port(hosts: tuple[str, ...] = ("127.0.0.1", "::1", "127.0.0.2")) -> int:
    """A port free for UDP and TCP on every one of ``hosts``."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(family, kind) as sock:
                        sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no shared free port")


@dataclass
class Deployment:
    directory: Path
    ca: TestCA
    data: dict[str, Any]
    dns_port: int

    @property
    def zone(self) -> Path:
        return self.directory / "probe.test.zone"

    def write(self) -> Path:
        return write_config(self.directory / "probe.toml", self.data)

    def edit_zone(self, old: str, new: str) -> None:
        text = self.zone.read_text()
        assert old in text
        self.zone.write_text(text.replace(old, new))


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    shutil.copy(CHECK_ZONES / "probe.test.zone", tmp_path)
    (tmp_path / "acme").mkdir()
    ca = TestCA(tmp_path)
    cert, key = ca.issue("probe", NAMES)
    dns_port = shared_port()
    sites = {"acme_webroot": "acme"}
    for name, host, base in (("ipv4", "127.0.0.1", "survey"), ("ipv6", "::1", "v6")):
        where = f"[{host}]" if ":" in host else host
        sites[name] = {
            "listen": f"{where}:{free_port(host)}",
            "base_url": f"https://{base}.probe.test",
            "tls_cert": str(cert),
            "tls_key": str(key),
        }
    data = {
        "server": {"secret_file": "probe.secret"},
        "sites": sites,
        "database": {"path": "probe.db"},
        "dns": {
            "zones": ["probe.test.zone"],
            "listen_ipv4": f"127.0.0.1:{dns_port}",
            "listen_ipv6": f"[::1]:{dns_port}",
        },
        "admin": {"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
    }
    return Deployment(tmp_path, ca, data, dns_port)


def test_a_good_deployment_passes_every_check(deployment, capsys):
    config = deployment.write()
    assert main(["check", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"PASS config: {config.resolve()}"
    assert lines[-1].startswith("probe-server check: all ")
    by_what = {line.split(":")[0] for line in lines[:-1]}
    assert {
        "PASS config",
        "PASS secret",
        "PASS zones",
        "PASS name ipv4",
        "PASS name ipv6",
        "PASS zone probe.test.",
        "PASS tls ipv4",
        "PASS tls ipv6",
        "PASS acme webroot",
        "PASS socket sites.ipv4.listen",
        "PASS socket sites.ipv6.listen",
        "PASS socket dns.listen_ipv4 udp",
        "PASS socket dns.listen_ipv4 tcp",
        "PASS socket dns.listen_ipv6 udp",
        "PASS socket dns.listen_ipv6 tcp",
        "PASS socket admin.listen",
        "SKIP battery names",
        "SKIP geoip",
    } == by_what
    text = "\n".join(lines)
    assert "survey.probe.test: A 127.0.0.1 only" in text
    assert "v6.probe.test: AAAA ::1 only" in text
    assert "covers survey.probe.test" in text and "covers v6.probe.test" in text


# Each breakage: (what to change, the check that must fail, words of its line).
BREAKAGES = {
    "survey name has AAAA": (
        lambda d: d.edit_zone("survey           IN A     127.0.0.1",
                              "survey           IN A     127.0.0.1\nsurvey IN AAAA ::1"),
        "name ipv4",
        "has AAAA ::1: an IPv4-only name must have no AAAA record",
    ),
    "probe name has A": (
        lambda d: d.edit_zone("v6               IN AAAA  ::1", "v6 IN AAAA ::1\nv6 IN A 127.0.0.1"),
        "name ipv6",
        "has A 127.0.0.1: an IPv6-only name must have no A record",
    ),
    "per-session probe names have A": (
        lambda d: d.edit_zone("*.v6             IN AAAA  ::1", "*.v6 IN A 127.0.0.1"),
        "name ipv6",
        "per-session names: has A 127.0.0.1",
    ),
    "survey name points elsewhere": (
        lambda d: d.edit_zone("survey           IN A     127.0.0.1", "survey IN A 192.0.2.10"),
        "name ipv4",
        "192.0.2.10 is not sites.ipv4.listen (127.0.0.1)",
    ),
    "probe name missing": (
        lambda d: d.edit_zone("v6               IN AAAA  ::1", ""),
        "name ipv6",
        "no AAAA record",
    ),
    "name server elsewhere": (
        lambda d: d.edit_zone("ns1              IN A     127.0.0.1", "ns1 IN A 192.0.2.53"),
        "zone probe.test.",
        "ns1.probe.test.: 192.0.2.53 is not dns.listen_ipv4 (127.0.0.1)",
    ),
    "zone does not parse": (
        lambda d: d.edit_zone("ns1              IN A     127.0.0.1", "ns1 IN A 127.0.0.300"),
        "zones",
        "probe.test.zone",
    ),
    "certificate expired": (
        lambda d: d.ca.issue("probe", NAMES, starts=-100, days=-1),
        "tls ipv4",
        "expired on",
    ),
    "certificate about to expire": (
        lambda d: d.ca.issue("probe", NAMES, starts=-85, days=5),
        "tls ipv6",
        "expires in 5 days (of 90): is renewal working?",
    ),
    "certificate self-signed": (
        lambda d: d.ca.issue("probe", NAMES, self_signed=True),
        "tls ipv4",
        "self-signed (CN=survey.probe.test): browsers will refuse it",
    ),
    "certificate for other names": (
        lambda d: d.ca.issue("probe", ["survey.probe.test", "www.probe.test"]),
        "tls ipv6",
        "does not cover v6.probe.test (names: survey.probe.test, www.probe.test)",
    ),
    "key of another certificate": (
        lambda d: shutil.copy(d.ca.issue("other", NAMES)[1], d.directory / "probe.key"),
        "tls ipv4",
        "KEY_VALUES_MISMATCH",
    ),
    "key unreadable": (
        lambda d: (d.directory / "probe.key").unlink(),
        "tls ipv6",
        "probe.key: no such file",
    ),
    "https without certificate": (
        lambda d: [d.data["sites"]["ipv6"].pop(key) for key in ("tls_cert", "tls_key")],
        "tls ipv6",
        "base_url is https:// but no tls_cert is set",
    ),
    "secret readable by others": (
        lambda d: (d.directory / "probe.secret").write_text("00" * 32)
        or (d.directory / "probe.secret").chmod(0o644),
        "secret",
        "readable by others (chmod 600 it)",
    ),
    "acme webroot missing": (
        lambda d: (d.directory / "acme").rmdir(),
        "acme webroot",
        "no such directory",
    ),
    "address not on this machine": (
        lambda d: d.data["admin"].update(listen="127.0.0.1:1")
        or d.data["dns"].update(listen_ipv4=f"192.0.2.53:{d.dns_port}"),
        "socket dns.listen_ipv4 udp",
        "this machine has no such address",
    ),
}  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_each_breakage_fails_its_check(deployment, capsys, breakage):
    change, what, words = BREAKAGES[breakage]
    change(deployment)
    config = deployment.write()
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(f"FAIL {what}: ")]
    assert lines, out
    assert words in lines[0], out
    assert out.splitlines()[-1].endswith("checks FAILED")


V6NS_ZONE = """\
$ORIGIN v6ns.probe.test.
$TTL 300
@           3600 IN SOA   ns.v6ns.probe.test. hostmaster.probe.test. (
                          2024060101 3600 900 1209600 60 )
            3600 IN NS    ns.v6ns.probe.test.
ns               IN AAAA  ::1
ds               IN A     127.0.0.1
ds               IN AAAA  ::1
*.ds             IN A     127.0.0.1
*.ds             IN AAAA  ::1
"""


def with_battery(deployment: Deployment) -> Deployment:
    """The battery's ds and v6ns probes on: their names in the zones, as they should be."""
    deployment.edit_zone(
        "v6               IN AAAA  ::1",
        "v6               IN AAAA  ::1\n"
        "ds IN A 127.0.0.1\nds IN AAAA ::1\n*.ds IN A 127.0.0.1\n*.ds IN AAAA ::1\n"
        "v6ns IN NS ns.v6ns.probe.test.\nns.v6ns IN AAAA ::1",
    )
    (deployment.directory / "v6ns.probe.test.zone").write_text(V6NS_ZONE)
    deployment.data["dns"]["zones"] = ["probe.test.zone", "v6ns.probe.test.zone"]
    deployment.data["battery"] = {
        "probes": ["ds", "v6ns"],
        "ds_url": "https://ds.probe.test",
        "v6ns_url": "https://ds.v6ns.probe.test",
        "labels": ["ds", "v6ns"],
    }
    return deployment


def battery_lines(deployment: Deployment, capsys: Any) -> tuple[int, list[str]]:
    status = main(["check", "--config", str(deployment.write())])
    return status, [line for line in capsys.readouterr().out.splitlines() if " battery" in line]


def test_the_batterys_dual_stack_names_pass_when_right(deployment, capsys):
    status, lines = battery_lines(with_battery(deployment), capsys)
    assert status == 0, lines
    assert lines == [
        "PASS battery ds: ds.probe.test: A 127.0.0.1, AAAA ::1 (both sites)",
        "PASS battery v6ns: ds.v6ns.probe.test: A 127.0.0.1, AAAA ::1 (both sites);"
        " its zone's name servers IPv6-only",
    ]


BATTERY_BREAKAGES = {
    "ds without AAAA": (
        lambda d: d.edit_zone("\nds IN AAAA ::1\n", "\n"),
        "battery ds",
        "ds.probe.test: no AAAA record (a dual-stack name has both)",
    ),
    "ds A elsewhere": (
        lambda d: d.edit_zone("\nds IN A 127.0.0.1\n", "\nds IN A 192.0.2.10\n"),
        "battery ds",
        "ds.probe.test: 192.0.2.10 is not sites.ipv4.listen (127.0.0.1)",
    ),
    "ds per-session names missing": (
        lambda d: d.edit_zone("*.ds IN A 127.0.0.1\n*.ds IN AAAA ::1\n", ""),
        "battery ds",
        "per-session names: no A record",
    ),
    "v6ns name server with an A glue": (
        lambda d: d.edit_zone("ns.v6ns IN AAAA ::1", "ns.v6ns IN AAAA ::1\nns.v6ns IN A 127.0.0.1"),
        "battery v6ns",
        "name server ns.v6ns.probe.test. has A 127.0.0.1 in probe.test.: the v6ns zone's"
        " name servers must have IPv6 addresses only",
    ),
    "v6ns name not delegated": (
        lambda d: (
            d.data["dns"].update(zones=["probe.test.zone"])
            or d.edit_zone("v6ns IN NS ns.v6ns.probe.test.\nns.v6ns IN AAAA ::1", "")
        ),
        "battery v6ns",
        "ds.v6ns.probe.test: no A record",
    ),
}


@pytest.mark.parametrize("breakage", BATTERY_BREAKAGES, ids=list(BATTERY_BREAKAGES))
def test_each_battery_breakage_fails_its_check(deployment, capsys, breakage):
    change, what, words = BATTERY_BREAKAGES[breakage]
    change(with_battery(deployment))
    status, lines = battery_lines(deployment, capsys)
    assert status == 1
    failed = [line for line in lines if line.startswith(f"FAIL {what}: ")]
    assert failed and words in failed[0], lines


def test_a_short_lived_certificate_is_judged_by_its_lifetime(deployment, capsys):
    # A 6-day certificate (Let's Encrypt's short-lived profile) with 2 days left.
    deployment.ca.issue("probe", NAMES, starts=-4, days=2)
    assert main(["check", "--config", str(deployment.write())]) == 0
    out = capsys.readouterr().out
    assert "PASS tls ipv4" in out and "2 days left" in out


def test_a_busy_port_names_the_process_holding_it(deployment, capsys):
    config = deployment.write()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as busy:
        busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        busy.bind(("::1", deployment.dns_port))
        assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("FAIL socket")]
    assert line.startswith(f"FAIL socket dns.listen_ipv6 udp: [::1]:{deployment.dns_port} in use")
    assert f"pid {os.getpid()}" in line


def test_a_bad_config_is_one_fail_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[admin]\nlisten = "0.0.0.0:9180"\n')
    assert main(["check", "--config", str(path)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("FAIL config: ") and "admin.listen: must be a loopback" in line


GEO_NETWORKS = {
    "1.1.1.0/24": ("AU", "Australia"),
    "8.8.8.0/24": ("US", "United States"),
    "2606:4700::/32": ("US", "United States"),
}
ASN_NETWORKS = {"1.1.1.0/24": (13335, "Cloudflare"), "2606:4700::/32": (13335, "Cloudflare")}


def damaged(path: Path) -> Path:
    """``path`` with its search tree overwritten; the metadata (and its marker) intact."""
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(data)
    return path


def test_geoip_files_open_fit_their_key_and_answer(tmp_path):
    now = datetime.now(UTC)
    for key, path in (
        ("country_db", country_db(tmp_path / "country.mmdb", GEO_NETWORKS)),
        ("country_db", country_db(tmp_path / "city.mmdb", GEO_NETWORKS, "GeoLite2-City")),
        ("asn_db", asn_db(tmp_path / "asn.mmdb", ASN_NETWORKS)),
    ):
        status, detail = check_geoip_file(path, key, now)
        assert status == "PASS" and "(0 days ago)" in detail and "lookups ok" in detail, detail
    # Its age is the build's (metadata), not the file's.
    later = now + timedelta(days=40)
    assert "(40 days ago)" in check_geoip_file(tmp_path / "asn.mmdb", "asn_db", later)[1]


def test_geoip_files_of_the_wrong_kind_damaged_or_not_mmdb_fail(tmp_path):
    now = datetime.now(UTC)
    asn = asn_db(tmp_path / "asn.mmdb", ASN_NETWORKS)
    assert check_geoip_file(asn, "country_db", now) == (
        "FAIL",
        f"{asn}: is GeoLite2-ASN, not a Country or City database",
    )
    country = country_db(tmp_path / "country.mmdb", GEO_NETWORKS)
    assert check_geoip_file(country, "asn_db", now) == (
        "FAIL",
        f"{country}: is GeoLite2-Country, not an ASN database",
    )
    # The metadata marker is all the old check looked for: this passed it.
    broken = damaged(country_db(tmp_path / "broken.mmdb", GEO_NETWORKS))
    assert b"\xab\xcd\xefMaxMind.com" in broken.read_bytes()
    status, detail = check_geoip_file(broken, "country_db", now)
    assert status == "FAIL" and "GeoLite2-Country is damaged (a lookup of 1.1.1.1:" in detail
    marker_only = tmp_path / "marker.mmdb"
    marker_only.write_bytes(b"\x00" * 4096 + b"\xab\xcd\xefMaxMind.com" + b"\x00" * 64)
    html = tmp_path / "login.mmdb"
    html.write_bytes(b"<html>login required</html>")
    for path in (marker_only, html):
        assert check_geoip_file(path, "country_db", now) == (
            "FAIL",
            f"{path}: not a MaxMind database (it does not open as one)",
        )
    assert check_geoip_file(tmp_path / "nope.mmdb", "asn_db", now) == (
        "FAIL",
        f"{tmp_path / 'nope.mmdb'}: no such file",
    )


def check_geoip(
    deployment: Deployment, capsys: Any, country: Path, asn: Path
) -> tuple[int, list[str]]:
    """``probe-server check`` with these databases: its exit status and geoip lines."""
    deployment.data["geoip"] = {"country_db": str(country), "asn_db": str(asn)}
    status = main(["check", "--config", str(deployment.write())])
    return status, [line for line in capsys.readouterr().out.splitlines() if " geoip" in line]


def test_check_passes_good_geoip_databases(deployment, capsys):
    country = country_db(deployment.directory / "GeoLite2-City.mmdb", GEO_NETWORKS, "GeoLite2-City")
    asn = asn_db(deployment.directory / "GeoLite2-ASN.mmdb", ASN_NETWORKS)
    status, lines = check_geoip(deployment, capsys, country, asn)
    assert status == 0, lines
    assert [line.split(":")[0] for line in lines] == ["PASS geoip.country_db", "PASS geoip.asn_db"]
    assert "GeoLite2-City, built" in lines[0] and "GeoLite2-ASN, built" in lines[1]


def test_check_fails_a_geoip_database_of_the_wrong_kind_or_damaged(deployment, capsys):
    directory = deployment.directory
    asn = asn_db(directory / "GeoLite2-ASN.mmdb", ASN_NETWORKS)
    country = country_db(directory / "GeoLite2-Country.mmdb", GEO_NETWORKS)
    # The two swapped: each is the wrong kind for its key.
    status, lines = check_geoip(deployment, capsys, asn, country)
    assert status == 1
    assert lines == [
        f"FAIL geoip.country_db: {asn}: is GeoLite2-ASN, not a Country or City database",
        f"FAIL geoip.asn_db: {country}: is GeoLite2-Country, not an ASN database",
    ]
    status, lines = check_geoip(deployment, capsys, damaged(country), asn)
    assert status == 1
    assert lines[0].startswith(f"FAIL geoip.country_db: {country}: GeoLite2-Country is damaged")
    assert lines[1].startswith("PASS geoip.asn_db")


def test_the_running_server_is_recognised():
    assert is_probe_server(
        [
            "/opt/probe-server/venv/bin/python3",
            "/opt/probe-server/venv/bin/probe-server",
            "serve",
            "--config",
            "x",
        ]
    )
    assert is_probe_server(["/usr/bin/python3", "-m", "probe_server", "serve"])
    assert not is_probe_server(["/usr/bin/python3", "-m", "probe_server", "check"])
    assert not is_probe_server(["/usr/sbin/named", "-u", "bind"])


def test_the_shipped_production_example_is_consistent():
    """deploy/probe-server.toml and its zones agree (files and sockets aside)."""
    config = load_config(ROOT / "deploy" / "probe-server.toml")
    results: list[Result] = []
    checker = Checker(config, Options(), results.append)
    checker.check_zones()
    checker.check_names()
    checker.check_name_servers()
    assert [r.status for r in results] == ["PASS"] * len(results), [r.line() for r in results]
    assert len(results) == 5  # zones, two names, two zones' name servers


# -- --public -------------------------------------------------------------------


@dataclass
class World:
    resolver: str
    server: ServerProcess
    parent: ProbeServer
    resolving: ProbeServer
    # The zone files the parent and the resolver serve: the world's view.
    parent_zone: Path
    published_zone: Path


def dns_only_config(tmp_path: Path, name: str, zones: list[Path], listen4: str) -> Config:
    return Config.model_validate(
        {
            "server": {"secret_file": str(tmp_path / f"{name}.secret")},
            "sites": {"ipv4": {"listen": "127.0.0.1:0"}, "ipv6": {"listen": "[::1]:0"}},
            "database": {"path": str(tmp_path / f"{name}.db")},
            "dns": {
                "zones": [str(z) for z in zones],
                "listen_ipv4": listen4,
                "listen_ipv6": "[::1]:0",
                "rrl": {"enabled": False},
            },
        }
    )


@pytest.fixture
async def world(deployment: Deployment, tmp_path: Path) -> AsyncIterator[World]:
    """Our server (a real process), the parent zone's server and a resolver."""
    parent_zone = tmp_path / "test.zone"
    shutil.copy(CHECK_ZONES / "test.zone", parent_zone)
    published_zone = tmp_path / "published" / "probe.test.zone"
    published_zone.parent.mkdir()
    shutil.copy(deployment.zone, published_zone)
    ours = ServerProcess(deployment.write(), tmp_path)
    parent = ProbeServer(
        dns_only_config(tmp_path, "parent", [parent_zone], f"127.0.0.2:{deployment.dns_port}")
    )
    # The resolver's view: both zones, as a recursive resolver would learn them.
    resolving = ProbeServer(
        dns_only_config(tmp_path, "resolver", [parent_zone, published_zone], "127.0.0.1:0")
    )
    await ours.start()
    await parent.start()
    await resolving.start()
    try:
        assert resolving.listeners is not None
        host, port = resolving.listeners.dns["udp_ipv4"].getsockname()[:2]
        yield World(f"{host}:{port}", ours, parent, resolving, parent_zone, published_zone)
    finally:
        await resolving.stop()
        await parent.stop()
        ours.kill(signal.SIGTERM)
        await ours.wait()
        await ours.close()


async def check_public(
    deployment: Deployment, resolver: str, capsys: pytest.CaptureFixture[str], timeout: float = 5
) -> tuple[int, str]:
    argv = [
        "check",
        "--config",
        str(deployment.directory / "probe.toml"),
        "--public",
        "--resolver",
        resolver,
        "--authoritative-port",
        str(deployment.dns_port),
        "--timeout",
        str(timeout),
    ]
    # Our DNS servers run on this event loop: the (blocking) check runs in a thread.
    code = await asyncio.to_thread(main, argv)
    return code, capsys.readouterr().out


async def test_public_dns_as_the_experiment_needs_it(deployment, world, capsys):
    code, text = await check_public(deployment, world.resolver, capsys)
    assert code == 0, text
    assert "PASS public ipv4: survey.probe.test: A 127.0.0.1, no AAAA (NODATA)" in text
    assert "PASS public ipv6: v6.probe.test: AAAA ::1, no A (NODATA)" in text
    assert "PASS public ns probe.test.: NS ns1.probe.test. via the resolver" in text
    assert (
        "PASS delegation probe.test.: test. refers to ns1.probe.test."
        " (glue: ns1.probe.test. 127.0.0.1 ::1)" in text
    )
    assert "PASS server ns1.probe.test. 127.0.0.1: answers for probe.test. (serial 2024" in text
    assert "PASS server ns1.probe.test. ::1: answers for probe.test. (serial 2024" in text
    # The running server holds its own sockets: that is no failure.
    assert "PASS socket dns.listen_ipv4 udp" in text
    assert "held by the running probe-server" in text


async def test_public_dns_differing_from_our_files_fails(deployment, world, capsys):
    """Our files are right; what resolvers and the parent say is not."""
    world.parent_zone.write_text(
        world.parent_zone.read_text().replace("IN A     127.0.0.1", "IN A     127.0.0.9")
    )
    world.published_zone.write_text(
        world.published_zone.read_text()
        .replace("survey           IN A     127.0.0.1", "survey IN A 127.0.0.5\nsurvey IN AAAA ::1")
        .replace("v6               IN AAAA  ::1", "v6 IN AAAA ::1\nv6 IN A 127.0.0.1")
    )
    assert (await world.parent.reload())["zones"]
    assert (await world.resolving.reload())["zones"]
    code, text = await check_public(deployment, world.resolver, capsys)
    assert code == 1
    fails = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert fails == [
        "FAIL public ipv4: survey.probe.test: A 127.0.0.5, expected 127.0.0.1;"
        " has AAAA ::1: an IPv4-only name must have none",
        "FAIL public ipv6: v6.probe.test: has A 127.0.0.1: an IPv6-only name must have none",
        "FAIL delegation probe.test.: glue for ns1.probe.test. at test. is 127.0.0.9, ::1;"
        " our zone says 127.0.0.1, ::1",
    ], text
    assert "PASS name ipv4" in text  # offline, our own zone file is fine


async def test_public_dns_without_a_resolver_fails(deployment, capsys):
    deployment.write()
    closed = free_port()
    code, text = await check_public(deployment, f"127.0.0.1:{closed}", capsys, timeout=0.5)
    assert code == 1
    assert "FAIL public ipv4: survey.probe.test: no answer from the resolver" in text
    assert "FAIL public ns probe.test.: resolver:" in text
