"""Fuzzing: random and mutated packets never crash the server or change its answers.

Two layers: hypothesis drives the responder directly (shrinking any failure
to a minimal packet), then seeded random and mutated packets go to the real
server over UDP and TCP on both families, bounded in count and time, after
which valid queries must still get the right answers.
"""

from __future__ import annotations

import asyncio
import random
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe_server.dnswire import Responder
from probe_server.zone import Authority

from .conftest import EXAMPLE_ZONES
from .dns_client import RawTcp, RawUdp, query, wire_query

SEEDS = [
    wire_query("survey.example.org", "A"),
    wire_query("V6.example.org", "AAAA", use_edns=0, payload=4096),
    wire_query("abcdefghijklmnopqrstuvwxyz234567.v6.example.org", "AAAA", use_edns=0),
    wire_query("nope.example.org", "ANY", use_edns=0, want_dnssec=True),
    wire_query("example.org", "SOA"),
    wire_query("www.example.org", "TXT", use_edns=0),
    wire_query("example.com", "NS"),
]


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(5)
        position = rng.randrange(len(data) + 1)
        if action == 0 and data:  # overwrite a byte
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif action == 1:  # cut short
            del data[position:]
        elif action == 2:  # insert bytes
            data[position:position] = rng.randbytes(rng.randint(1, 8))
        elif action == 3 and len(data) > 12:  # garble a count or a flag
            field = rng.randrange(2, 12)
            data[field] = rng.choice([0, 1, 2, 0x80, 0xFF, rng.randrange(256)])
        else:  # a compression pointer somewhere
            data[position:position] = bytes((0xC0 | rng.randrange(64), rng.randrange(256)))
    return bytes(data)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    seed = draw(st.sampled_from(SEEDS))
    return mutate(random.Random(draw(st.integers(0, 2**32))), seed)


@pytest.fixture(scope="module")
def responder() -> Responder:
    return Responder(Authority.from_files(EXAMPLE_ZONES))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packet=packets(), tcp=st.booleans())
def test_any_packet_gets_a_well_formed_reply_or_none(responder, packet, tcp):
    outcome = responder.respond(packet, tcp=tcp)
    if outcome.reply is None:
        # Only packets without a header, or responses, are dropped.
        assert len(packet) < 12 or packet[2] & 0x80
        return
    reply = dns.message.from_wire(outcome.reply)
    assert reply.id == int.from_bytes(packet[:2], "big")
    assert reply.flags & dns.flags.QR
    assert not reply.flags & dns.flags.RA
    if not tcp:
        assert len(outcome.reply) <= 1232
    assert outcome.rcode == dns.rcode.to_text(reply.rcode())


async def check_answers(server) -> None:
    for family in ("ipv4", "ipv6"):
        for transport in ("udp", "tcp"):
            ask = dict(family=family, transport=transport)
            reply = await query(server, "survey.example.org", "A", **ask)
            assert [r.to_text() for r in reply.answer[0]] == ["192.0.2.10"]
            reply = await query(server, "v6.example.org", "A", **ask)
            assert (reply.rcode(), reply.answer, len(reply.authority)) == (0, [], 1)
            reply = await query(server, "nope.example.org", "AAAA", **ask)
            assert reply.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.slow
async def test_server_survives_fuzzing_over_udp_and_tcp(make_config):
    from probe_server.server import ProbeServer

    server = ProbeServer(make_config(dns={"tcp_idle_timeout": 1.0}))
    await server.start()
    rng = random.Random(20240601)
    try:
        async with asyncio.timeout(60):
            for family in ("ipv4", "ipv6"):
                udp = await RawUdp.open(server, family)
                for batch in range(30):
                    for _ in range(50):
                        if rng.random() < 0.3:
                            udp.send(rng.randbytes(rng.randint(0, 700)))
                        else:
                            udp.send(mutate(rng, rng.choice(SEEDS)))
                    # A marker query: the server reads a socket in order, so
                    # its reply comes after every reply to the batch (batches
                    # are small enough for the socket buffer: nothing is lost).
                    ident = (0xF000 + batch).to_bytes(2, "big")
                    udp.send(ident + wire_query("survey.example.org")[2:])
                    while True:
                        reply = await udp.receive()
                        if reply[:2] == ident and reply[2] & 0x80 and len(reply) > 40:
                            break
                udp.close()

                for _ in range(40):
                    tcp = await RawTcp.open(server, family)
                    for _ in range(rng.randint(1, 6)):
                        packet = (
                            rng.randbytes(rng.randint(0, 300))
                            if rng.random() < 0.3
                            else mutate(rng, rng.choice(SEEDS))
                        )
                        if rng.random() < 0.8:
                            tcp.writer.write(struct.pack("!H", len(packet)) + packet)
                        else:
                            tcp.writer.write(packet)  # no framing at all
                    # Well framed so far? Then a valid query is still answered.
                    await tcp.close()
            await check_answers(server)
            # A connection with framed garbage then a valid query: answered in turn.
            tcp = await RawTcp.open(server)
            for _ in range(20):
                tcp.send(mutate(rng, rng.choice(SEEDS)))
            tcp.send(wire_query("ds.example.org", "AAAA", ident=0xABCD))
            while True:
                reply = await tcp.receive()
                if reply[:2] == b"\xab\xcd" and reply[2] & 0x80 and len(reply) > 40:
                    break
            assert dns.message.from_wire(reply).answer
            await tcp.close()
    finally:
        await server.stop()
    assert server.dns is not None
    assert server.dns.stats.errors == 0  # no query made our own code fail
    assert server.dns.stats.queries > 3000
