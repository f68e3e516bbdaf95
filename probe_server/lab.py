"""A lab of network namespaces: a server and clients of every kind, on one machine.

Each host is a network namespace joined to a bridge that lives in a namespace
of its own, so no packet can leave the lab. IPv4 addresses come from the
documentation range 192.0.2.0/24. IPv6 uses 2d00:1::/64, inside 2d00::/8,
which IANA holds in reserve (never allocated), because the lab needs an
address that classifies as native global unicast: a 2001:db8:: address is
"documentation", and Chromium also treats it as a more private address space
than the page's and blocks the blue ball (Private Network Access). The 6to4
and Teredo-form addresses are derived from lab IPv4 addresses. Each client's resolver
(``/etc/netns/NAME/resolv.conf``) is a recursive resolver of its own
namespace (Unbound, :class:`Resolver`) that reaches the lab server's DNS
through a stub zone, as an ISP's resolver reaches an authoritative server.
A host may sit behind a router namespace instead of on the bridge (NAT44,
its own IPv6 prefix, a link MTU), and any namespace may load an nftables
ruleset (a filter that breaks something on purpose). Everything is removed
by :meth:`Lab.down`, which is safe to call more than once: it kills every
process still inside the lab's namespaces (``ip netns del`` alone would leave
them running, holding the namespace alive), then deletes the namespaces and
their ``/etc/netns`` entries. :func:`sweep_stale` does the same for labs
whose process died without tearing down (SIGKILL), and
:func:`signals_interrupt` turns SIGTERM and SIGHUP into an exception, so
that teardown runs when a lab is stopped that way.

Needs root and iproute2 (``ip netns``); routers and filters need nftables,
resolvers Unbound.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import shutil
import signal
import subprocess
import threading
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
    # The router role this host hangs behind (None: the bridge), and its
    # default gateways there.
    behind: str | None = None
    gateway4: str | None = None
    gateway6: str | None = None
    # A router: the addresses and MTU of its side of each link to the hosts
    # behind it; it forwards, masquerades IPv4 and routes IPv6 unchanged.
    downlink: tuple[str, ...] = ()
    downlink_mtu: int | None = None
    # An nftables ruleset (nft -f syntax) loaded in the namespace.
    nft: str | None = None


# The router in front of the path-MTU client: NAT44 like a home router, a
# 6rd-style IPv6 prefix that embeds its public IPv4 address (192.0.2.90 =
# c000:025a in bits 32-63), a 1280-byte link towards the client, and a
# firewall that drops the ICMPv6 Packet Too Big it would send about it.
ROUTER_V4 = "192.0.2.90"
ROUTER_V6 = "2d00:1::90"
SIXRD_PREFIX = "2d00:90:c000:25a"
ROUTER_NFT = """\
table ip lab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" masquerade
    }
}
table ip6 lab_filter {
    chain output {
        type filter hook output priority filter; policy accept;
        # A path-MTU black hole: full-size packets for the 1280-byte link are
        # dropped, and so is the Packet Too Big that would say so.
        icmpv6 type packet-too-big drop
    }
}
"""
# Broken IPv6: the handshake's small packets pass, nothing larger leaves,
# so a connection opens and its request never arrives.
BROKEN_NFT = """\
table ip6 lab_broken {
    chain output {
        type filter hook output priority filter; policy accept;
        meta l4proto tcp meta length > 200 drop
    }
}
"""
RESOLVER_V4, RESOLVER_V6 = "192.0.2.2", "2d00:1::2"
# The fake MTurk's worker site (`probe-server fake-mturk`), where answers are
# handed on: IPv4 only, as the survey itself.
MTURK_V4 = "192.0.2.5"
RESOLVER4_V4 = "192.0.2.3"
NOAAAA_V4, NOAAAA_V6 = "192.0.2.4", "2d00:1::4"


def default_hosts() -> list[Host]:
    """The clients of the issues, their resolvers, a router and MTurk's worker site.

    IPv4-only, dual-stack native, 6to4, Teredo and IPv6-only clients (the
    paper's kinds); a dual-stack client whose resolver has IPv4 only, one
    whose resolver drops AAAA answers, one with broken IPv6, and one behind
    a router whose path drops full-size IPv6 packets (the battery's kinds).
    """
    return [
        Host(
            "server",
            f"{SERVER_V4}/24",
            (f"{SERVER_V6}/64",),
            extra=(f"-6 route add {SIXRD_PREFIX.rsplit(':', 2)[0]}::/32 via {ROUTER_V6}",),
        ),
        Host("resolver", f"{RESOLVER_V4}/24", (f"{RESOLVER_V6}/64",)),
        Host("resolver4", f"{RESOLVER4_V4}/24"),
        Host("resolvernoaaaa", f"{NOAAAA_V4}/24", (f"{NOAAAA_V6}/64",)),
        Host("mturk", f"{MTURK_V4}/24"),
        Host("v4only", "192.0.2.10/24", (), resolver=RESOLVER_V4),
        Host("dualstack", "192.0.2.20/24", ("2d00:1::20/64",), resolver=RESOLVER_V4),
        Host(
            "sixtofour",
            "192.0.2.30/24",
            (sixtofour_address("192.0.2.30") + "/48",),
            resolver=RESOLVER_V4,
        ),
        Host(
            "teredo",
            "192.0.2.40/24",
            (teredo_address(TEREDO_SERVER, "203.0.113.40", 40000, flags=0x8000) + "/32",),
            resolver=RESOLVER_V4,
        ),
        Host("v6only", None, ("2d00:1::60/64",), resolver=RESOLVER_V6),
        Host("v4resolver", "192.0.2.50/24", ("2d00:1::50/64",), resolver=RESOLVER4_V4),
        Host("noaaaa", "192.0.2.70/24", ("2d00:1::70/64",), resolver=NOAAAA_V4),
        Host("broken", "192.0.2.80/24", ("2d00:1::80/64",), resolver=RESOLVER_V4, nft=BROKEN_NFT),
        Host(
            "router",
            f"{ROUTER_V4}/24",
            (f"{ROUTER_V6}/64",),
            downlink=("198.51.100.129/25", f"{SIXRD_PREFIX}::1/64"),
            downlink_mtu=1280,
            nft=ROUTER_NFT,
        ),
        Host(
            "mtu",
            "198.51.100.130/25",
            (f"{SIXRD_PREFIX}::2/64",),
            resolver=RESOLVER_V4,
            behind="router",
            gateway4="198.51.100.129",
            gateway6=f"{SIXRD_PREFIX}::1",
        ),
    ]


def default_resolvers() -> list[Resolver]:
    """A dual-stack resolver, an IPv4-only one, and one that drops the lab's AAAA answers."""
    return [
        Resolver("resolver", stubs=(SERVER_V4, SERVER_V6)),
        Resolver("resolver4", stubs=(SERVER_V4,), ipv6=False),
        # DNS-rebinding protection set to the lab's IPv6 prefix: every AAAA
        # record pointing into it is removed from answers, as by a resolver
        # that filters AAAA.
        Resolver("resolvernoaaaa", stubs=(SERVER_V4,), extra=("private-address: 2d00::/16",)),
    ]


def _run(
    argv: Sequence[str], check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), check=check, capture_output=True, text=True, input=input_text
        )
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(argv)}: {e.stderr.strip()}") from None


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


def namespace_pids(name: str) -> list[int]:
    """The processes inside a namespace (``ip netns pids``)."""
    result = _run(["ip", "netns", "pids", name], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _kill_all(name: str, rounds: int = 20, wait: float = 10.0) -> list[int]:
    """SIGKILL every process inside namespace ``name`` and wait for each to exit.

    Through pidfds, so a pid reused meanwhile is never signalled, and the
    wait is on the process itself (the pidfd turns readable when it exits).
    Repeated until none is left, since a process may fork while it is being
    killed (Chromium). Returns whatever survived (nothing, normally).
    """
    pids: list[int] = []
    for _ in range(rounds):
        pids = namespace_pids(name)
        if not pids:
            return []
        handles = []
        for pid in pids:
            try:
                handles.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
        try:
            for handle in handles:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(handle, signal.SIGKILL)
            for handle in handles:
                select.select([handle], [], [], wait)
        finally:
            for handle in handles:
                os.close(handle)
    return namespace_pids(name)


def remove_namespace(name: str) -> None:
    """Kill what runs inside, delete the namespace and its /etc/netns entry."""
    _kill_all(name)
    _run(["ip", "netns", "del", name], check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def _owner_gone(name: str) -> bool:
    """A lab name (psl-PID-...) whose owning process no longer exists."""
    parts = name.split("-")
    return (
        len(parts) >= 3
        and parts[0] == PREFIX
        and parts[1].isdigit()
        and not Path(f"/proc/{parts[1]}").exists()
    )


def sweep_stale() -> None:
    """Remove what labs whose process no longer exists left behind.

    Their namespaces (and every process still inside them), and their
    ``/etc/netns`` entries, also those whose namespace is already gone.
    """
    for name in _live_namespaces():
        if _owner_gone(name):
            remove_namespace(name)
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            if _owner_gone(entry.name):
                shutil.rmtree(entry, ignore_errors=True)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program was, so teardown runs.

    A KeyboardInterrupt, as for SIGINT: pytest then stops the session and
    still runs every fixture's teardown.
    """


@contextlib.contextmanager
def signals_interrupt(signums: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Interrupted`.

    By default both kill a Python process on the spot, skipping every
    ``finally`` and ``__exit__``: a lab stopped that way would leave its
    namespaces, and the processes in them, behind. The handlers before are
    put back on the way out. (SIGKILL cannot be caught: :func:`sweep_stale`
    in the next lab cleans up after that.)
    """

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(f"lab interrupted by {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM, SIGHUP and SIGINT until the block is done (teardown).

    A second SIGTERM, or an impatient Ctrl-C, must not cut a teardown short
    and leave half a lab: each is noted, and raised as :class:`Interrupted`
    once the block has finished. Only the main thread can set handlers;
    elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    signums = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {signum: signal.signal(signum, hold) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        raise Interrupted(f"lab interrupted by {signal.Signals(held[0]).name} during teardown")


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
            # Routers first: the hosts behind them link to their namespaces.
            hosts = sorted(self.hosts.values(), key=lambda host: host.behind is not None)
            for index, host in enumerate(hosts):
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
        ns = self.ns(host.role)
        upstream = host.behind or "bridge"
        outside, inside = f"ps{index}b", f"ps{index}h"
        # Both ends are created inside the lab's namespaces, never in the host's.
        self._ns_run(
            upstream,
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
        )
        if host.behind is None:
            self._ns_run("bridge", "ip", "link", "set", outside, "master", "br0")
        else:
            self._router_side(self.hosts[host.behind], outside)
        self._ns_run(upstream, "ip", "link", "set", outside, "up")
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
        if host.ipv6 and host.gateway6:
            self._ns_run(host.role, "ip", "-6", "route", "add", "default", "via", host.gateway6)
        elif host.ipv6:
            # One flat segment: every IPv6 destination is on-link. A default
            # route also lets browsers' "do I have IPv6?" checks succeed.
            self._ns_run(host.role, "ip", "-6", "route", "add", "default", "dev", "eth0")
        if host.gateway4:
            self._ns_run(host.role, "ip", "route", "add", "default", "via", host.gateway4)
        for route in host.extra:
            self._ns_run(host.role, "ip", *route.split())
        if host.downlink:
            for setting in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                self._ns_run(host.role, "sysctl", "-q", "-w", setting)
        if host.nft:
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=host.nft)
        if host.resolver:
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                f"nameserver {host.resolver}\noptions timeout:2 attempts:2\n"
            )

    def _router_side(self, router: Host, link: str) -> None:
        """Addresses, MTU and IPv6 settings of a router's end of a downlink."""
        role = router.role
        self._ns_run(role, "sysctl", "-q", "-w", f"net.ipv6.conf.{link}.accept_dad=0")
        if router.downlink_mtu:
            self._ns_run(role, "ip", "link", "set", link, "mtu", str(router.downlink_mtu))
        for address in router.downlink:
            family = "-6" if ":" in address else "-4"
            self._ns_run(role, "ip", family, "addr", "add", address, "dev", link, "nodad")

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
        """Kill every process in this lab's namespaces, remove the namespaces
        and their resolver files. Idempotent; not cut short by a signal."""
        with _signals_deferred():
            for name in reversed(self._created):
                remove_namespace(name)
            self._created.clear()
            mine = f"{PREFIX}-{self.tag}-"
            for name in _live_namespaces():
                if name.startswith(mine):
                    remove_namespace(name)
            if NETNS_ETC.is_dir():
                for entry in NETNS_ETC.iterdir():
                    if entry.name.startswith(mine):
                        shutil.rmtree(entry, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


@contextlib.contextmanager
def lab(hosts: Sequence[Host] | None = None) -> Iterator[Lab]:
    with Lab(hosts) as built:
        yield built


UNBOUND_CONFIG = """\
server:
    username: ""
    chroot: ""
    directory: "{workdir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    so-reuseport: no
{interfaces}
    port: 53
    do-ip4: yes
    do-ip6: {do_ip6}
    access-control: 0.0.0.0/0 allow
    access-control: ::/0 allow
    # No DNSSEC validation: the lab's zone is unsigned and has no trust anchor.
    module-config: "iterator"
    # Unbound serves .test itself (RFC 6761) unless told not to.
    local-zone: "test." nodefault
    # 0x20: random letter case in the names it asks for.
    use-caps-for-id: {caps}
{extra}
stub-zone:
    name: "{zone}"
{stubs}
"""


@dataclass(frozen=True)
class Resolver:
    """A recursive resolver (Unbound) serving the clients of a lab.

    It reaches the lab's zone through a stub zone at the lab server, as an
    ISP's resolver reaches an authoritative server, and follows referrals
    (to the IPv6-only name server of the v6ns child) like any resolver.
    ``ipv6=False`` makes it an IPv4-only resolver; ``extra`` lines go into
    its ``server:`` clause (e.g. ``private-address`` to drop AAAA answers).
    """

    role: str
    stubs: tuple[str, ...]
    ipv6: bool = True
    zone: str = "probe.test"
    extra: tuple[str, ...] = ()

    def config(self, host: Host, workdir: Path) -> str:
        addresses = [a.split("/")[0] for a in ((host.ipv4,) if host.ipv4 else ())]
        if self.ipv6:
            addresses += [a.split("/")[0] for a in host.ipv6]
        return UNBOUND_CONFIG.format(
            workdir=workdir,
            interfaces="\n".join(f"    interface: {address}" for address in addresses),
            do_ip6="yes" if self.ipv6 else "no",
            caps="yes",
            extra="\n".join(f"    {line}" for line in self.extra),
            zone=self.zone,
            stubs="\n".join(f"    stub-addr: {address}" for address in self.stubs),
        )


class RunningResolver:
    """An Unbound process in a lab namespace, ready once it says so."""

    def __init__(self, lab: Lab, resolver: Resolver, workdir: Path) -> None:
        self.resolver = resolver
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "unbound.conf"
        config.write_text(resolver.config(lab.hosts[resolver.role], workdir))
        checked = _run(["unbound-checkconf", str(config)], check=False)
        if checked.returncode != 0:
            raise RuntimeError(f"unbound-checkconf: {checked.stdout}{checked.stderr}")
        self.log: list[str] = []
        self.process = subprocess.Popen(
            lab.command(resolver.role, ["unbound", "-d", "-c", str(config)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        # Unbound binds its sockets, then logs "start of service".
        if not ready.wait(30) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"unbound in {resolver.role} did not start: {self.log[-5:]}")

    def _read(self, ready: threading.Event) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if "start of service" in line:
                ready.set()
        ready.set()  # it exited: the caller sees poll() set

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
