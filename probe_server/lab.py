"""A lab of network namespaces: a server and clients of every kind, on one machine.

Each host is a network namespace joined to a bridge that lives in a namespace
of its own, so no packet can leave the lab. IPv4 addresses come from the
documentation range 192.0.2.0/24. IPv6 uses 2d00:1::/64, inside 2d00::/8,
which IANA holds in reserve (never allocated), because the lab needs an
address that classifies as native global unicast: a 2001:db8:: address is
"documentation", and Chromium also treats it as a more private address space
than the page's and blocks the blue ball (Private Network Access). The 6to4
and Teredo-form addresses are derived from lab IPv4 addresses. Each client's resolver
(``/etc/netns/NAME/resolv.conf``) points at the lab server's DNS. Everything
is removed by :meth:`Lab.down`, which is safe to call more than once and also
sweeps away namespaces left by a lab whose process died.

Needs root and iproute2 (``ip netns``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
PREFIX = "psl"

SERVER_V4 = "192.0.2.1"
SERVER_V6 = "2d00:1::1"
LAN_V4 = ipaddress.ip_network("192.0.2.0/24")
LAN_V6 = ipaddress.ip_network("2d00:1::/64")
# The (made-up) Teredo server and the client's public mapping that a
# Teredo-form address encodes (RFC 4380 §4).
TEREDO_SERVER = "198.51.100.1"


def sixtofour_address(ipv4: str, host: int = 1) -> str:
    """The 6to4 address 2002:V4ADDR::host for an IPv4 address (RFC 3056)."""
    packed = ipaddress.IPv4Address(ipv4).packed
    prefix = int.from_bytes(b"\x20\x02" + packed, "big") << 80
    return str(ipaddress.IPv6Address(prefix | host))


def teredo_address(server: str, client: str, port: int, flags: int = 0) -> str:
    """A Teredo address: 2001:0::/32, server IPv4, flags, and the client's
    port and IPv4 each XORed with all ones (RFC 4380 §4)."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= flags << 48
    value |= (port ^ 0xFFFF) << 32
    value |= int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address(value))


@dataclass(frozen=True)
class Host:
    """One namespace: its addresses (with prefix length) and resolver."""

    role: str
    ipv4: str | None = None
    ipv6: tuple[str, ...] = ()
    resolver: str | None = None
    mtu: int | None = None
    # Routes added on-link (no gateway): the lab is one flat segment.
    extra: tuple[str, ...] = field(default=())


def default_hosts() -> list[Host]:
    """The issue's clients: IPv4-only, dual-stack native, 6to4, Teredo, IPv6-only."""
    return [
        Host("server", f"{SERVER_V4}/24", (f"{SERVER_V6}/64",)),
        Host("v4only", "192.0.2.10/24", (), resolver=SERVER_V4),
        Host("dualstack", "192.0.2.20/24", ("2d00:1::20/64",), resolver=SERVER_V4),
        Host(
            "sixtofour",
            "192.0.2.30/24",
            (sixtofour_address("192.0.2.30") + "/48",),
            resolver=SERVER_V4,
        ),
        Host(
            "teredo",
            "192.0.2.40/24",
            (teredo_address(TEREDO_SERVER, "203.0.113.40", 40000, flags=0x8000) + "/32",),
            resolver=SERVER_V4,
        ),
        Host("v6only", None, ("2d00:1::60/64",), resolver=SERVER_V6),
    ]


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def available() -> str | None:
    """None when a lab can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "the lab needs iproute2 ('ip')"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"'ip netns add' failed: {result.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _live_namespaces() -> list[str]:
    result = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def sweep_stale() -> None:
    """Remove namespaces left by labs whose process no longer exists."""
    for name in _live_namespaces():
        parts = name.split("-")
        owner_gone = (
            len(parts) >= 3 and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists()
        )
        if parts[0] == PREFIX and owner_gone:
            _run(["ip", "netns", "del", name], check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


class Lab:
    """Create with the hosts wanted; ``with Lab(...) as lab:`` builds and removes it."""

    def __init__(self, hosts: Sequence[Host] | None = None, tag: str | None = None) -> None:
        self.hosts = {host.role: host for host in (hosts or default_hosts())}
        self.tag = tag or str(os.getpid())
        self._created: list[str] = []

    def ns(self, role: str) -> str:
        """The namespace name of a role (``bridge`` for the switch)."""
        return f"{PREFIX}-{self.tag}-{role}"

    def _ns_run(self, role: str, *argv: str) -> None:
        _run(["ip", "netns", "exec", self.ns(role), *argv])

    def up(self) -> Lab:
        sweep_stale()
        try:
            self._add_namespace("bridge")
            self._ns_run("bridge", "ip", "link", "add", "br0", "type", "bridge")
            self._ns_run("bridge", "ip", "link", "set", "br0", "up")
            for index, host in enumerate(self.hosts.values()):
                self._add_host(index, host)
        except BaseException:
            self.down()
            raise
        return self

    def _add_namespace(self, role: str) -> None:
        name = self.ns(role)
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])

    def _add_host(self, index: int, host: Host) -> None:
        self._add_namespace(host.role)
        ns, bridge = self.ns(host.role), self.ns("bridge")
        outside, inside = f"ps{index}b", f"ps{index}h"
        # Both ends are created inside the lab's namespaces, never in the host's.
        _run(
            [
                "ip",
                "netns",
                "exec",
                bridge,
                "ip",
                "link",
                "add",
                outside,
                "type",
                "veth",
                "peer",
                "name",
                inside,
                "netns",
                ns,
            ]
        )
        self._ns_run("bridge", "ip", "link", "set", outside, "master", "br0")
        self._ns_run("bridge", "ip", "link", "set", outside, "up")
        self._ns_run(host.role, "ip", "link", "set", inside, "name", "eth0")
        if host.mtu:
            self._ns_run(host.role, "ip", "link", "set", "eth0", "mtu", str(host.mtu))
        if not host.ipv6:
            # An IPv4-only host: no IPv6 at all, not even link-local.
            self._ns_run(host.role, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
            self._ns_run(host.role, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
        else:
            # No duplicate address detection: addresses are usable at once.
            self._ns_run(host.role, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0")
            self._ns_run(host.role, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0")
            self._ns_run(host.role, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.accept_dad=0")
        self._ns_run(host.role, "ip", "link", "set", "eth0", "up")
        if host.ipv4:
            self._ns_run(host.role, "ip", "addr", "add", host.ipv4, "dev", "eth0")
        for address in host.ipv6:
            self._ns_run(host.role, "ip", "-6", "addr", "add", address, "dev", "eth0", "nodad")
        if host.ipv6:
            # One flat segment: every IPv6 destination is on-link. A default
            # route also lets browsers' "do I have IPv6?" checks succeed.
            self._ns_run(host.role, "ip", "-6", "route", "add", "default", "dev", "eth0")
        for route in host.extra:
            self._ns_run(host.role, "ip", *route.split())
        if host.resolver:
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                f"nameserver {host.resolver}\noptions timeout:2 attempts:2\n"
            )

    def address(self, role: str, family: int) -> str | None:
        """A host's address (no prefix length) of family 4 or 6."""
        host = self.hosts[role]
        value = host.ipv4 if family == 4 else (host.ipv6[0] if host.ipv6 else None)
        return value.split("/")[0] if value else None

    def command(self, role: str, argv: Sequence[str]) -> list[str]:
        """argv that runs a command inside a host's namespace."""
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def run(
        self, role: str, argv: Sequence[str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(role, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def down(self) -> None:
        """Remove every namespace and resolver file of this lab. Idempotent."""
        for name in reversed(self._created):
            _run(["ip", "netns", "del", name], check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        self._created.clear()
        for name in _live_namespaces():
            if name.startswith(f"{PREFIX}-{self.tag}-"):
                _run(["ip", "netns", "del", name], check=False)
                shutil.rmtree(NETNS_ETC / name, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


@contextlib.contextmanager
def lab(hosts: Sequence[Host] | None = None) -> Iterator[Lab]:
    with Lab(hosts) as built:
        yield built
