"""Differential test: our answers equal Knot DNS's for the same zone files.

Knot loads the shipped zone files unchanged (the operator's way out), and
answers every query below the same as probe-server: rcode, AA, TC and the
three sections, TTLs included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import dns.rdatatype
import pytest

from probe_server.server import ProbeServer
from probe_server.testing import KnotProcess, require_tool

from .conftest import EXAMPLE_ZONES, MakeConfig
from .dns_client import endpoint

ZONES = [
    *EXAMPLE_ZONES,
    str(Path(__file__).parent / "zones" / "edge.test.zone"),
    str(Path(__file__).parent / "zones" / "rfc4592.example.zone"),
]
TOKEN = "abcdefghijklmnopqrstuvwxyz234567"
QUESTIONS = [
    (qname, qtype)
    for qname in [
        "example.org",
        "survey.example.org",
        "v6.example.org",
        "ds.example.org",
        "ns1.example.org",
        "www.example.org",
        "nope.example.org",
        f"{TOKEN}.v6.example.org",
        f"{TOKEN}.survey.example.org",
        f"{TOKEN}.ds.example.org",
        f"x.{TOKEN}.ds.example.org",
        "*.v6.example.org",
        "v6ns.example.org",
        "ns.v6ns.example.org",
        "ds.v6ns.example.org",
        f"{TOKEN}.ds.v6ns.example.org",
        "nope.v6ns.example.org",
        "c.edge.test",
        "b.c.edge.test",
        "a.b.c.edge.test",
        "alias.edge.test",
        "chain1.edge.test",
        "dangling.edge.test",
        "outside.edge.test",
        "intochild.edge.test",
        "loopa.edge.test",
        "x.wild.edge.test",
        "real.v6.edge.test",
        "zzzz.v6.edge.test",
        "Mixed-Case.edge.test",
        "sub.edge.test",
        "www.sub.edge.test",
        "ns.sub.edge.test",
        "txt.edge.test",
        "mx.edge.test",
        "srv.edge.test",
        "host3.example",
        "foo.bar.example",
        "host1.example",
        "sub.*.example",
        "_telnet._tcp.host1.example",
        "_tcp.host1.example",
        "ghost.*.example",
        "host.subdel.example",
        "example.com",
    ]
    for qtype in ["A", "AAAA", "NS", "SOA", "MX", "TXT", "CNAME", "SRV", "DS"]
]


@pytest.fixture(scope="module")
def knotd() -> str:
    return require_tool("knotd")


@pytest.fixture
async def knot(knotd, tmp_path) -> AsyncIterator[KnotProcess]:
    (tmp_path / "knot").mkdir()
    process = KnotProcess([Path(z) for z in ZONES], tmp_path / "knot")
    await process.start(knotd)
    try:
        yield process
    finally:
        await process.close()


@pytest.fixture
async def ours(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    server = ProbeServer(make_config(dns={"zones": ZONES}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def summary(reply: dns.message.Message) -> dict[str, object]:
    def rrs(section):
        return sorted(
            (
                rrset.name.to_text().lower(),
                dns.rdatatype.to_text(rrset.rdtype),
                rrset.ttl,
                r.to_text(),
            )
            for rrset in section
            for r in rrset
        )

    return {
        "rcode": reply.rcode(),
        "flags": reply.flags & (dns.flags.AA | dns.flags.TC | dns.flags.RA | dns.flags.QR),
        "answer": rrs(reply.answer),
        "authority": rrs(reply.authority),
        "additional": rrs(reply.additional),
        "edns": (reply.edns, reply.payload if reply.edns >= 0 else None),
    }


@pytest.mark.parametrize("use_edns", [False, 0])
async def test_same_answers_as_knot(knot, ours, use_edns):
    # Our IPv6 sockets serve every zone, as Knot does; the IPv4 ones leave out
    # the IPv6-only child (test_ipv4_sockets_refer_to_the_ipv6_only_child).
    host, port = endpoint(ours, "udp", "ipv6")
    differences = []
    for qname, qtype in QUESTIONS:
        message = dns.message.make_query(qname, qtype, use_edns=use_edns, payload=1232)
        message.flags = 0  # an iterative query, as resolvers send to us
        theirs = await dns.asyncquery.udp(message, "127.0.0.1", port=knot.port, timeout=5)
        mine = await dns.asyncquery.udp(message, host, port=port, timeout=5)
        if summary(mine) != summary(theirs):
            differences.append((qname, qtype, summary(mine), summary(theirs)))
    assert not differences, "\n".join(map(str, differences[:5]))


@pytest.fixture
async def knot_parent_only(knotd, tmp_path) -> AsyncIterator[KnotProcess]:
    (tmp_path / "knot-parent").mkdir()
    process = KnotProcess([Path(EXAMPLE_ZONES[0])], tmp_path / "knot-parent")
    await process.start(knotd)
    try:
        yield process
    finally:
        await process.close()


async def test_ipv4_sockets_refer_to_the_ipv6_only_child(knot_parent_only, ours):
    """Over IPv4 we answer as a server of the parent zone alone: a referral.

    The v6ns child's only name server has only an AAAA record, so a resolver
    reaches it only over IPv6; answering its names on IPv4 would let an
    IPv4-only resolver pass the test.
    """
    host, port = endpoint(ours, "udp", "ipv4")
    differences = []
    for qname in ("ds.v6ns.example.org", f"{TOKEN}.ds.v6ns.example.org", "v6ns.example.org"):
        for qtype in ("A", "AAAA", "NS", "SOA"):
            message = dns.message.make_query(qname, qtype, use_edns=0, payload=1232)
            message.flags = 0
            theirs = await dns.asyncquery.udp(
                message, "127.0.0.1", port=knot_parent_only.port, timeout=5
            )
            mine = await dns.asyncquery.udp(message, host, port=port, timeout=5)
            if summary(mine) != summary(theirs):
                differences.append((qname, qtype, summary(mine), summary(theirs)))
    assert not differences, "\n".join(map(str, differences[:5]))
