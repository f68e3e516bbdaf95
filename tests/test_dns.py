"""The DNS server over real UDP and TCP sockets on 127.0.0.1 and ::1.

Queries are made with dnspython (an independent client) or as raw bytes
where a test needs a packet no client would send.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from probe_server.dnswire import Responder
from probe_server.server import ProbeServer
from probe_server.testing import require_tool
from probe_server.zone import Authority

from .conftest import EXAMPLE_ZONES, MakeConfig
from .dns_client import RawTcp, RawUdp, endpoint, query, wire_query

EDGE_ZONE = str(Path(__file__).parent / "zones" / "edge.test.zone")
RFC4592_ZONE = str(Path(__file__).parent / "zones" / "rfc4592.example.zone")
SOCKETS = [(t, f) for t in ("udp", "tcp") for f in ("ipv4", "ipv6")]
TOKEN = "abcdefghijklmnopqrstuvwxyz234567"


@pytest.fixture
async def dns_server(make_config: MakeConfig) -> AsyncIterator[ProbeServer]:
    config = make_config(
        dns={"zones": [*EXAMPLE_ZONES, EDGE_ZONE, RFC4592_ZONE], "tcp_idle_timeout": 2.0}
    )
    server = ProbeServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def section(message: dns.message.Message, name: str) -> list[tuple[str, str, int, str]]:
    rrsets = getattr(message, name)
    return sorted(
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rrset.ttl, rdata.to_text())
        for rrset in rrsets
        for rdata in rrset
    )


def assert_authoritative(reply: dns.message.Message) -> None:
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.AA
    assert not reply.flags & dns.flags.RA  # we are not a resolver


SOA = "ns1.example.org. hostmaster.example.org. 2024060101 3600 900 1209600 60"


# -- the answer rules, on every socket -----------------------------------------


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
async def test_a_only_and_aaaa_only_names(dns_server, transport, family):
    ask = dict(transport=transport, family=family)
    reply = await query(dns_server, "survey.example.org", "A", **ask)
    assert_authoritative(reply)
    assert reply.rcode() == dns.rcode.NOERROR
    assert section(reply, "answer") == [("survey.example.org.", "A", 300, "192.0.2.10")]

    reply = await query(dns_server, "v6.example.org", "AAAA", **ask)
    assert section(reply, "answer") == [("v6.example.org.", "AAAA", 300, "2001:db8::10")]

    reply = await query(dns_server, "ds.example.org", "AAAA", **ask)
    assert section(reply, "answer") == [("ds.example.org.", "AAAA", 300, "2001:db8::10")]


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
@pytest.mark.parametrize(
    ("qname", "qtype"), [("v6.example.org", "A"), ("survey.example.org", "AAAA")]
)
async def test_missing_family_is_nodata_not_nxdomain(dns_server, transport, family, qname, qtype):
    """The paper's bug: an A query for the IPv6-only name must not be NXDOMAIN."""
    reply = await query(dns_server, qname, qtype, transport=transport, family=family)
    assert_authoritative(reply)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    # The SOA, its TTL min(SOA TTL 3600, MINIMUM 60) (RFC 2308 §3).
    assert section(reply, "authority") == [("example.org.", "SOA", 60, SOA)]


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
async def test_missing_name_is_nxdomain_with_soa(dns_server, transport, family):
    reply = await query(dns_server, "nope.example.org", "A", transport=transport, family=family)
    assert_authoritative(reply)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert section(reply, "authority") == [("example.org.", "SOA", 60, SOA)]


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
async def test_other_rules_on_every_socket(dns_server, transport, family):
    ask = dict(transport=transport, family=family)
    # Wildcard: a per-session name.
    reply = await query(dns_server, f"{TOKEN}.v6.example.org", "AAAA", **ask)
    assert section(reply, "answer") == [(f"{TOKEN}.v6.example.org.", "AAAA", 300, "2001:db8::10")]
    # RFC 4592 §3.3.1: a closer existing name blocks the wildcard. real.v6
    # exists, so names below it are not *.v6's, and the name itself has its
    # own data.
    reply = await query(dns_server, "x.real.v6.edge.test", "AAAA", **ask)
    assert (reply.rcode(), reply.answer) == (dns.rcode.NXDOMAIN, [])
    assert section(reply, "authority")[0][:2] == ("edge.test.", "SOA")
    reply = await query(dns_server, "real.v6.edge.test", "AAAA", **ask)
    assert section(reply, "answer") == [("real.v6.edge.test.", "AAAA", 300, "2001:db8::99")]
    reply = await query(dns_server, "other.v6.edge.test", "AAAA", **ask)
    assert section(reply, "answer") == [("other.v6.edge.test.", "AAAA", 300, "2001:db8::10")]
    # RFC 4592 §2.2.1: host1.example exists, so *.example's MX is not its
    # MX (NODATA) and a name below it is NXDOMAIN (its closest encloser,
    # the empty non-terminal _tcp.host1, has no wildcard), while a name
    # whose closest encloser is the apex gets the wildcard.
    reply = await query(dns_server, "host1.example", "MX", **ask)
    assert (reply.rcode(), reply.answer) == (dns.rcode.NOERROR, [])
    assert section(reply, "authority")[0][:2] == ("example.", "SOA")
    reply = await query(dns_server, "_telnet._tcp.host1.example", "SRV", **ask)
    assert (reply.rcode(), reply.answer) == (dns.rcode.NXDOMAIN, [])
    reply = await query(dns_server, "foo.bar.example", "TXT", **ask)
    assert section(reply, "answer") == [("foo.bar.example.", "TXT", 3600, '"this is a wildcard"')]
    # Empty non-terminal: NODATA.
    reply = await query(dns_server, "c.edge.test", "A", **ask)
    assert (reply.rcode(), reply.answer) == (dns.rcode.NOERROR, [])
    assert section(reply, "authority")[0][1] == "SOA"
    # CNAME, followed inside the zone.
    reply = await query(dns_server, "www.example.org", "A", **ask)
    assert section(reply, "answer") == [
        ("survey.example.org.", "A", 300, "192.0.2.10"),
        ("www.example.org.", "CNAME", 300, "survey.example.org."),
    ]
    # Outside our zones: REFUSED, not authoritative.
    reply = await query(dns_server, "example.com", "A", **ask)
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.flags & dns.flags.AA
    # ANY: one RRset (RFC 8482).
    reply = await query(dns_server, "ds.example.org", "ANY", **ask)
    assert [r[1] for r in section(reply, "answer")] == ["A"]


async def test_referral_to_the_ipv6_only_name_server(make_config):
    server = ProbeServer(make_config(dns={"zones": EXAMPLE_ZONES[:1]}))
    await server.start()
    try:
        reply = await query(server, f"{TOKEN}.ds.v6ns.example.org", "A")
    finally:
        await server.stop()
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.flags & dns.flags.AA  # a referral is not authoritative
    assert reply.answer == []
    assert section(reply, "authority") == [("v6ns.example.org.", "NS", 300, "ns.v6ns.example.org.")]
    assert section(reply, "additional") == [("ns.v6ns.example.org.", "AAAA", 300, "2001:db8::53")]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_ipv6_only_child_is_answered_only_over_ipv6(dns_server, transport):
    """test-ipv6.com's v6ns: its names resolve only via a resolver with IPv6.

    Both zones are served, but over IPv4 the child is left out: the reply is
    the parent's referral to the IPv6-only name server, never the answer.
    """
    name = f"{TOKEN}.ds.v6ns.example.org"
    over_ipv4 = await query(dns_server, name, "A", transport=transport, family="ipv4")
    assert over_ipv4.rcode() == dns.rcode.NOERROR and over_ipv4.answer == []
    assert not over_ipv4.flags & dns.flags.AA
    assert section(over_ipv4, "authority") == [
        ("v6ns.example.org.", "NS", 300, "ns.v6ns.example.org.")
    ]
    assert section(over_ipv4, "additional") == [
        ("ns.v6ns.example.org.", "AAAA", 300, "2001:db8::53")
    ]
    over_ipv6 = await query(dns_server, name, "A", transport=transport, family="ipv6")
    assert over_ipv6.flags & dns.flags.AA
    assert section(over_ipv6, "answer") == [(f"{name}.", "A", 300, "192.0.2.10")]
    # The parent's own names are answered on both.
    for family in ("ipv4", "ipv6"):
        reply = await query(dns_server, f"{TOKEN}.ds.example.org", "AAAA", family=family)
        assert section(reply, "answer") == [
            (f"{TOKEN}.ds.example.org.", "AAAA", 300, "2001:db8::10")
        ]


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
@pytest.mark.parametrize(
    "qname", ["SuRvEy.ExAmPlE.oRg", f"{TOKEN.upper()}.v6.Example.ORG", "NoPe.example.org"]
)
async def test_question_echoed_with_the_clients_letter_case(dns_server, transport, family, qname):
    """0x20: resolvers drop replies whose question changed case."""
    # Lower case first, so the mixed-case query is served from the cache.
    lower = wire_query(qname.lower(), "AAAA", ident=1)
    mixed = wire_query(qname, "AAAA", ident=2)
    raw = await (RawUdp if transport == "udp" else RawTcp).open(dns_server, family)
    try:
        await raw.exchange(lower)
        reply = await raw.exchange(mixed)
    finally:
        result = raw.close()
        if result is not None:
            await result
    end = 12 + len(qname) + 2 + 4
    assert reply[12:end] == mixed[12:end]
    parsed = dns.message.from_wire(reply)
    assert parsed.question[0].name.to_text(omit_final_dot=True) == qname
    if parsed.answer:
        assert parsed.answer[0].name.to_text(omit_final_dot=True) == qname


# -- EDNS and truncation ---------------------------------------------------------


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
async def test_edns_reply_carries_our_opt(dns_server, transport, family):
    ask = dict(transport=transport, family=family)
    reply = await query(dns_server, "survey.example.org", "A", use_edns=0, payload=4096, **ask)
    assert reply.edns == 0
    assert reply.payload == 1232
    assert not reply.ednsflags & dns.flags.DO
    reply = await query(dns_server, "survey.example.org", "A", use_edns=0, want_dnssec=True, **ask)
    assert reply.ednsflags & dns.flags.DO  # DO is echoed (RFC 3225)
    reply = await query(dns_server, "survey.example.org", "A", use_edns=False, **ask)
    assert reply.edns == -1  # no OPT to a query without one


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
async def test_unknown_edns_version_is_badvers(dns_server, transport, family):
    reply = await query(
        dns_server, "survey.example.org", "A", use_edns=1, transport=transport, family=family
    )
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0  # we answer with the version we speak
    assert reply.answer == []


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
@pytest.mark.parametrize(
    ("qname", "qtype", "edns", "rdclass", "rcode"),
    [
        ("survey.example.org", "A", 1, "IN", dns.rcode.BADVERS),
        ("version.bind", "TXT", 0, "CH", dns.rcode.REFUSED),
        ("example.org", "AXFR", 0, "IN", dns.rcode.REFUSED),
        ("example.com", "A", 0, "IN", dns.rcode.REFUSED),
    ],
)
async def test_error_replies_copy_the_do_bit(
    dns_server, transport, family, qname, qtype, edns, rdclass, rcode
):
    """RFC 3225 §3: DO is copied into the response, error replies included."""
    ask = dict(transport=transport, family=family, use_edns=edns, rdclass=rdclass)
    for want in (True, False):
        reply = await query(dns_server, qname, qtype, want_dnssec=want, **ask)
        assert reply.rcode() == rcode
        assert reply.edns == 0
        assert bool(reply.ednsflags & dns.flags.DO) is want


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_large_answer_truncated_keeping_question_and_opt(dns_server, family):
    # No EDNS: 512 bytes at most; the answer doesn't fit.
    reply = await query(dns_server, "big.edge.test", "A", use_edns=False, family=family)
    assert reply.flags & dns.flags.TC
    assert reply.question[0].name.to_text() == "big.edge.test."
    assert (reply.answer, reply.authority) == ([], [])
    # EDNS with a small buffer: truncated, and the OPT record stays (RFC 6891 §7).
    reply = await query(dns_server, "big.edge.test", "A", use_edns=0, payload=512, family=family)
    assert reply.flags & dns.flags.TC
    assert (reply.edns, reply.payload) == (0, 1232)
    assert reply.question
    # EDNS with room for it: the whole answer.
    reply = await query(dns_server, "big.edge.test", "A", use_edns=0, payload=1232, family=family)
    assert not reply.flags & dns.flags.TC
    assert len(section(reply, "answer")) == 40
    # TCP: never truncated.
    reply = await query(
        dns_server, "big.edge.test", "A", use_edns=False, transport="tcp", family=family
    )
    assert not reply.flags & dns.flags.TC
    assert len(section(reply, "answer")) == 40


# -- malformed and unusual messages -------------------------------------------------


def header(ident: int = 0xBEEF, flags: int = 0, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0):
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


QUESTION = b"\x06survey\x07example\x03org\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(("transport", "family"), SOCKETS)
async def test_malformed_messages(dns_server, transport, family):
    raw = await (RawUdp if transport == "udp" else RawTcp).open(dns_server, family)
    valid = wire_query("survey.example.org", "A", ident=7)
    try:
        # Too short for a header, and a response (QR=1): dropped. The next
        # reply on this socket is the valid query's, so nothing was sent.
        for junk in (b"\x12\x34\x01", header(flags=0x8000) + QUESTION):
            raw.send(junk)
            reply = await raw.exchange(valid)
            assert dns.message.from_wire(reply).id == 7
        # A header whose question is cut short: FORMERR, the ID kept.
        reply = dns.message.from_wire(await raw.exchange(header() + QUESTION[:9]))
        assert (reply.id, reply.rcode()) == (0xBEEF, dns.rcode.FORMERR)
        # Two questions: FORMERR.
        reply = dns.message.from_wire(await raw.exchange(header(qd=2) + QUESTION + QUESTION))
        assert reply.rcode() == dns.rcode.FORMERR
        # No question at all: FORMERR.
        reply = dns.message.from_wire(await raw.exchange(header(qd=0)))
        assert reply.rcode() == dns.rcode.FORMERR
        # Two OPT records: FORMERR (RFC 6891 §6.1.1).
        opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
        reply = dns.message.from_wire(await raw.exchange(header(ar=2) + QUESTION + opt + opt))
        assert reply.rcode() == dns.rcode.FORMERR
        # Opcodes other than QUERY (here STATUS, NOTIFY and UPDATE): NOTIMP,
        # with nothing echoed. An UPDATE's first section must be an SOA; found
        # by hypothesis: echoing an A "zone" made the reply unparseable.
        for opcode in (2, 4, 5):
            reply = dns.message.from_wire(await raw.exchange(header(flags=opcode << 11) + QUESTION))
            assert (reply.opcode(), reply.rcode()) == (opcode, dns.rcode.NOTIMP)
            assert reply.id == 0xBEEF
        # Class CH (version.bind and friends): REFUSED.
        chaos = b"\x07version\x04bind\x00\x00\x10\x00\x03"
        reply = dns.message.from_wire(await raw.exchange(header() + chaos))
        assert reply.rcode() == dns.rcode.REFUSED
        # Zone transfers: REFUSED.
        reply = dns.message.from_wire(await raw.exchange(wire_query("example.org", "AXFR")))
        assert reply.rcode() == dns.rcode.REFUSED
        # And the server still answers.
        reply = dns.message.from_wire(await raw.exchange(valid))
        assert section(reply, "answer") == [("survey.example.org.", "A", 300, "192.0.2.10")]
    finally:
        result = raw.close()
        if result is not None:
            await result
    assert dns_server.dns is not None
    assert dns_server.dns.stats.errors == 0


# -- TCP (RFC 7766) ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_tcp_several_queries_per_connection_pipelined(dns_server, family):
    tcp = await RawTcp.open(dns_server, family)
    try:
        names = ["survey.example.org", "v6.example.org", "nope.example.org"]
        message = b"".join(
            struct.pack("!H", len(q)) + q
            for q in (wire_query(n, "A", ident=i) for i, n in enumerate(names))
        )
        # All three in one write, then the same again one byte at a time.
        tcp.writer.write(message)
        replies = [dns.message.from_wire(await tcp.receive()) for _ in names]
        assert [r.id for r in replies] == [0, 1, 2]
        assert [r.rcode() for r in replies] == [0, 0, dns.rcode.NXDOMAIN]
        for byte in message:
            tcp.writer.write(bytes((byte,)))
            await tcp.writer.drain()
        replies = [dns.message.from_wire(await tcp.receive()) for _ in names]
        assert [r.id for r in replies] == [0, 1, 2]
    finally:
        await tcp.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_tcp_idle_connection_is_closed(make_config, family):
    server = ProbeServer(make_config(dns={"tcp_idle_timeout": 0.2}))
    await server.start()
    try:
        tcp = await RawTcp.open(server, family)
        reply = await tcp.exchange(wire_query("survey.example.org"))
        assert dns.message.from_wire(reply).answer
        assert await tcp.closed_by_server()
        await tcp.close()
        assert server.dns is not None and server.dns.stats.tcp_timeouts == 1
    finally:
        await server.stop()


@pytest.fixture
def evict_at_once(monkeypatch):
    """Connections may be evicted as soon as they are idle (not after a second)."""
    from probe_server import limits

    monkeypatch.setattr(limits, "EVICT_AFTER", 0.0)


async def test_tcp_connection_cap_evicts_the_connection_idle_longest(make_config, evict_at_once):
    server = ProbeServer(make_config(dns={"tcp_max_connections": 2}))
    await server.start()
    try:
        first, second = await RawTcp.open(server), await RawTcp.open(server)
        for tcp in (second, first):  # both are served; first is now the most recent
            assert dns.message.from_wire(await tcp.exchange(wire_query("survey.example.org")))
        # A third connection makes room: the one idle longest (second) is closed.
        third = await RawTcp.open(server)
        assert dns.message.from_wire(await third.exchange(wire_query("v6.example.org", "AAAA")))
        assert await second.closed_by_server()
        assert dns.message.from_wire(await first.exchange(wire_query("survey.example.org")))
        for tcp in (first, second, third):
            await tcp.close()
        assert server.dns is not None
        assert (server.dns.stats.tcp_evicted, server.dns.stats.tcp_refused) == (1, 0)
    finally:
        await server.stop()


async def test_tcp_connections_per_client_make_room_among_their_own(make_config, evict_at_once):
    server = ProbeServer(
        make_config(dns={"tcp_max_connections": 100, "tcp_max_connections_per_client": 2})
    )
    await server.start()
    try:
        host, port = endpoint(server, "tcp", "ipv4")
        mine = [await RawTcp.open(server) for _ in range(2)]
        # Another client (127.0.0.2) is not affected by this one's limit.
        other = RawTcp(*await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0)))
        assert dns.message.from_wire(await other.exchange(wire_query("survey.example.org")))
        extra = await RawTcp.open(server)
        assert await mine[0].closed_by_server()
        assert dns.message.from_wire(await extra.exchange(wire_query("survey.example.org")))
        assert dns.message.from_wire(await other.exchange(wire_query("survey.example.org")))
        for tcp in (*mine, other, extra):
            await tcp.close()
    finally:
        await server.stop()


async def test_tcp_query_trickled_byte_by_byte_is_idle(make_config):
    server = ProbeServer(make_config(dns={"tcp_idle_timeout": 0.5}))
    await server.start()
    try:
        tcp = await RawTcp.open(server)
        message = wire_query("survey.example.org")
        framed = len(message).to_bytes(2, "big") + message
        closed = False
        # One byte every 0.1 s: the message takes ~4 s to arrive, and the
        # connection is closed tcp_idle_timeout after it opened, long before.
        for byte in framed[:-1]:
            try:
                tcp.writer.write(bytes([byte]))
                closed = await asyncio.wait_for(tcp.reader.read(1), 0.1) == b""
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
            break
        assert closed, "the server kept a trickling connection open"
        await tcp.close()
    finally:
        await server.stop()


# -- rate limiting ---------------------------------------------------------------


async def test_rate_limit_drops_and_slips_per_prefix(make_config, db):
    config = make_config(
        dns={"rrl": {"enabled": True, "responses_per_second": 0.001, "burst": 3, "slip": 2}}
    )
    server = ProbeServer(config)
    await server.start()
    try:
        udp = await RawUdp.open(server)
        for ident in range(3):  # the burst
            reply = dns.message.from_wire(
                await udp.exchange(wire_query("survey.example.org", ident=ident))
            )
            assert reply.answer and not reply.flags & dns.flags.TC
        # Over the limit: the 1st limited reply is dropped, the 2nd slips out
        # truncated (TC=1, no data) so a real resolver can retry over TCP.
        udp.send(wire_query("survey.example.org", ident=3))
        udp.send(wire_query("survey.example.org", ident=4))
        reply = dns.message.from_wire(await udp.receive())
        assert reply.id == 4
        assert reply.flags & dns.flags.TC
        assert reply.answer == []
        udp.close()
        # Another prefix (here the other family) and TCP are not limited.
        assert (await query(server, "v6.example.org", "AAAA", family="ipv6")).answer
        assert (await query(server, "survey.example.org", transport="tcp")).answer
        assert server.dns is not None
        await server.dns.drain()
    finally:
        await server.stop()
    rows = db("SELECT rrl, rcode, size, truncated FROM dns_queries WHERE transport = 'udp'"
              " AND family = 'ipv4' ORDER BY id")  # fmt: skip
    assert [tuple(r) for r in rows][3:] == [
        ("drop", None, 0, 0),
        ("slip", "NOERROR", rows[4][2], 1),
    ]
    assert [r["rrl"] for r in rows][:3] == ["pass"] * 3


# -- the query log -----------------------------------------------------------------


async def test_every_query_is_logged(dns_server, db):
    raw_udp = await RawUdp.open(dns_server, "ipv6")
    try:
        query_bytes = wire_query("SuRvEy.example.org", "AAAA", ident=9, use_edns=0, payload=1400)
        reply_udp = await raw_udp.exchange(query_bytes)
        raw_udp.send(b"\x00")  # no header: dropped, still logged
        await raw_udp.exchange(query_bytes)
    finally:
        raw_udp.close()
    tcp = await RawTcp.open(dns_server)
    try:
        reply_tcp = await tcp.exchange(wire_query("nope.example.org", "A"))
    finally:
        await tcp.close()
    assert dns_server.dns is not None
    await dns_server.dns.drain()
    rows = [dict(r) for r in db("SELECT * FROM dns_queries ORDER BY id")]
    assert len(rows) == 4
    first, junk, _, last = rows
    assert first["family"] == "ipv6"
    assert first["addr"] == "::1"
    assert first["port"] > 0
    assert first["transport"] == "udp"
    assert first["qname"] == "SuRvEy.example.org."  # exactly as sent
    assert (first["qtype"], first["rcode"]) == ("AAAA", "NOERROR")
    assert first["size"] == len(reply_udp)
    assert (first["truncated"], first["rrl"]) == (0, "pass")
    assert (first["edns_version"], first["udp_size"]) == (0, 1400)
    assert (junk["qname"], junk["rcode"], junk["size"]) == (None, None, 0)
    assert (last["family"], last["addr"], last["transport"]) == ("ipv4", "127.0.0.1", "tcp")
    assert (last["qname"], last["rcode"], last["size"]) == (
        "nope.example.org.",
        "NXDOMAIN",
        len(reply_tcp),
    )
    assert last["edns_version"] is None
    resolvers = {tuple(r)[:3] for r in db("SELECT family, addr, queries FROM dns_resolvers")}
    assert resolvers == {("ipv6", "::1", 3), ("ipv4", "127.0.0.1", 1)}


async def test_the_log_tells_an_answer_from_nodata_a_referral_and_nxdomain(dns_server, db):
    asked = [
        ("survey.example.org", "A"),  # an answer
        ("v6.example.org", "A"),  # NODATA: the name has AAAA only
        ("ds.v6ns.example.org", "A"),  # over IPv4: the referral to the IPv6-only server
        ("nope.example.org", "A"),  # NXDOMAIN
    ]
    headers = []
    for qname, qtype in asked:
        reply = await query(dns_server, qname, qtype, transport="udp", family="ipv4")
        headers.append(
            (
                dns.rcode.to_text(reply.rcode()),
                sum(len(rrset) for rrset in reply.answer),
                sum(len(rrset) for rrset in reply.authority),
            )
        )
    assert dns_server.dns is not None
    await dns_server.dns.drain()
    rows = db("SELECT rcode, ancount, nscount FROM dns_queries ORDER BY id")
    assert [tuple(r) for r in rows] == headers
    answer, nodata, referral, nxdomain = headers
    assert answer[:2] == ("NOERROR", 1)
    assert nodata == ("NOERROR", 0, 1)  # the SOA
    assert referral[:2] == ("NOERROR", 0) and referral[2] >= 1  # the NS
    assert nxdomain == ("NXDOMAIN", 0, 1)


async def test_truncated_and_dropped_replies_count_nothing(dns_server, db):
    raw = await RawUdp.open(dns_server, "ipv4")
    try:
        # big.edge.test does not fit 512 bytes: TC=1, no records.
        await raw.exchange(wire_query("big.edge.test", "A"))
        raw.send(b"\x00")  # no header: nothing sent
        await raw.exchange(wire_query("survey.example.org", "A"))
    finally:
        raw.close()
    assert dns_server.dns is not None
    await dns_server.dns.drain()
    rows = db("SELECT truncated, ancount, nscount FROM dns_queries ORDER BY id")
    assert [tuple(r) for r in rows][:2] == [(1, 0, 0), (0, None, None)]


# -- the fast path equals the general path ------------------------------------------------


EQUIVALENCE_QUERIES = [
    (qname, qtype, edns)
    for qname in [
        "survey.example.org",
        "SURVEY.example.ORG",
        "v6.example.org",
        "ds.example.org",
        "nope.example.org",
        "www.example.org",
        "example.org",
        f"{TOKEN}.v6.example.org",
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.v6.example.org",
        f"{TOKEN.upper()}.survey.example.org",
        f"x.{TOKEN}.ds.example.org",
        "ds.v6ns.example.org",
        "big.edge.test",
        "c.edge.test",
        "anything.wild.edge.test",
        "host.sub.edge.test",
        "example.com",
        ".",
    ]
    for qtype in ["A", "AAAA", "ANY", "NS", "SOA", "TXT", "TYPE65534"]
    for edns in [False, 0]
]


def test_fast_path_matches_general_path_and_cache_matches_fresh_answers():
    authority = Authority.from_files([*EXAMPLE_ZONES, EDGE_ZONE])
    warm = Responder(authority)
    for qname, qtype, edns in EQUIVALENCE_QUERIES:
        for ident, flags in ((1, dns.flags.RD), (0xFFFF, dns.flags.CD), (7, 0)):
            message = dns.message.make_query(qname, qtype, use_edns=edns, want_dnssec=ident == 7)
            message.id, message.flags = ident, flags
            data = message.to_wire()
            for tcp in (False, True):
                fresh = Responder(authority).respond(data, tcp=tcp)  # nothing cached
                fast = warm.respond(data, tcp=tcp)  # cached after the first round
                general = warm._slow(data, tcp, False)  # dnslib parse
                assert fast == general == fresh, (qname, qtype, edns, tcp)
                reply = dns.message.from_wire(fast.reply)
                assert reply.id == ident
                assert reply.flags & (dns.flags.RD | dns.flags.CD) == flags
                assert reply.question[0].name.to_text() == message.question[0].name.to_text()
                # What the log keeps of the reply is what the reply says.
                assert (fast.ancount, fast.nscount) == (
                    sum(len(rrset) for rrset in reply.answer),
                    sum(len(rrset) for rrset in reply.authority),
                ), (qname, qtype, edns, tcp)
    # Per-session names share one template; other tokens still get their own name.
    template_hits = warm.respond(wire_query(f"{'q' * 32}.v6.example.org", "AAAA"))
    reply = dns.message.from_wire(template_hits.reply)
    assert reply.answer[0].name.to_text() == f"{'q' * 32}.v6.example.org."
    assert len(warm._cache) < len(EQUIVALENCE_QUERIES) * 2


def test_template_not_used_for_names_that_exist():
    responder = Responder(Authority.from_files([EDGE_ZONE]))
    # "zzzz" makes the template for 4-letter names under v6.edge.test; the
    # real name "real.v6.edge.test" has the same shape but its own record.
    synthesised = responder.respond(wire_query("zzzz.v6.edge.test", "AAAA"))
    assert responder._templates
    assert dns.message.from_wire(synthesised.reply).answer[0][0].to_text() == "2001:db8::10"
    reply = dns.message.from_wire(responder.respond(wire_query("real.v6.edge.test", "AAAA")).reply)
    assert section(reply, "answer") == [("real.v6.edge.test.", "AAAA", 300, "2001:db8::99")]
    # And a later 4-letter name still gets the wildcard.
    again = dns.message.from_wire(responder.respond(wire_query("yyyy.v6.edge.test", "AAAA")).reply)
    assert section(again, "answer") == [("yyyy.v6.edge.test.", "AAAA", 300, "2001:db8::10")]


async def test_bad_zone_file_stops_startup_before_anything_binds(make_config, tmp_path):
    from probe_server.server import StartupError

    bad = tmp_path / "bad.zone"
    bad.write_text("$ORIGIN bad.test.\n@ 60 IN NS ns.bad.test.\n")
    server = ProbeServer(make_config(dns={"zones": [str(bad)]}))
    with pytest.raises(StartupError, match=r"^dns\.zones: .*bad\.zone: no SOA"):
        await server.start()
    assert server.listeners is None
    assert not (tmp_path / "probe.db").exists()


async def test_dns_can_be_turned_off(make_config):
    server = ProbeServer(make_config(dns={"enabled": False, "zones": []}))
    listeners = await server.start()
    try:
        assert listeners.dns == {}
        assert "dns_" not in listeners.describe()
    finally:
        await server.stop()


# -- the README's dig lines ----------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
DIG_LINE = re.compile(r"^dig @(\S+) -p 5353 (.+?)\s+# (.+)$", re.MULTILINE)


async def test_the_readmes_dig_lines_show_what_they_say(dns_server):
    """Each line, run by dig against the demo's zones on this test's ports."""
    dig = require_tool("dig")
    lines = DIG_LINE.findall(README.read_text())
    assert len(lines) >= 4
    for address, arguments, comment in lines:
        family = "ipv6" if ":" in address else "ipv4"
        transport = "tcp" if "+tcp" in arguments.split() else "udp"
        host, port = endpoint(dns_server, transport, family)
        process = await asyncio.create_subprocess_exec(
            dig, f"@{host}", "-p", str(port), *arguments.split(), "+tries=1", "+time=5",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
        assert process.returncode == 0, out
        status = re.search(r"status: (\w+)", out)
        counts = re.search(r"ANSWER: (\d+), AUTHORITY: (\d+)", out)
        assert status and counts, out
        assert "flags: qr aa" in out and " ra" not in out.split("flags:")[1].split(";")[0], out
        if "NODATA" in comment or "NXDOMAIN" in comment:
            expected = "NXDOMAIN" if "NXDOMAIN" in comment else "NOERROR"
            assert (status.group(1), counts.groups()) == (expected, ("0", "1")), out
            assert re.search(r"^example\.org\.\s+60\s+IN\s+SOA\s", out, re.MULTILINE), out
        else:
            assert (status.group(1), counts.group(1)) == ("NOERROR", "1"), out
            # The address the comment shows, if it shows one.
            for shown in re.findall(r"(?:192\.0\.2\.|2001:db8:)[0-9a-f.:]+", comment):
                assert re.search(rf"\sIN\s+A+\s+{re.escape(shown)}$", out, re.MULTILINE), out
