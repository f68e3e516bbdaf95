"""Address classification: every class, and what each kind of address embeds."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from probe_server.analysis.addresses import CLASSES, classify, decode_teredo
from probe_server.lab import teredo_address


def test_teredo_example_from_rfc_4380_decodes_every_field():
    # The worked example of the Teredo literature: server 65.54.227.120, a
    # pre-RFC 5991 client behind a cone NAT, mapped port 40000, public
    # address 192.0.2.45.
    found = classify("2001:0000:4136:e378:8000:63bf:3fff:fdd2")
    assert found.cls == "teredo" and not found.native
    assert found.teredo is not None
    assert found.teredo.server == IPv4Address("65.54.227.120")
    assert found.teredo.client == IPv4Address("192.0.2.45")
    assert found.teredo.port == 40000
    assert found.teredo.flags == 0x8000 and found.teredo.cone
    # Geolocated by the client's public IPv4 address, not the relay's prefix.
    assert found.embedded_ipv4 == found.geo_address == "192.0.2.45"


def test_teredo_agrees_with_the_stdlib_where_the_stdlib_decodes():
    address = teredo_address("203.0.113.9", "198.51.100.200", 51413, flags=0x0A35)
    stdlib_server, stdlib_client = IPv6Address(address).teredo  # type: ignore[misc]
    decoded = decode_teredo(IPv6Address(address))
    assert (decoded.server, decoded.client) == (stdlib_server, stdlib_client)
    assert decoded.port == 51413 and decoded.flags == 0x0A35 and not decoded.cone


def test_teredo_is_classified_although_the_stdlib_calls_it_not_global():
    address = teredo_address("65.54.227.120", "198.51.100.129", 40000)
    assert IPv6Address(address).is_global is False
    assert classify(address).cls == "teredo"


def test_6to4_embeds_the_router_ipv4_address():
    found = classify("2002:c633:6404::1")
    assert (found.cls, found.embedded_ipv4, found.geo_address) == (
        "6to4",
        "198.51.100.4",
        "198.51.100.4",
    )


def test_nat64_well_known_prefix_embeds_ipv4_local_use_does_not():
    found = classify("64:ff9b::c000:221")
    assert (found.cls, found.embedded_ipv4, found.geo_address) == (
        "nat64",
        "192.0.2.33",
        "192.0.2.33",
    )
    # RFC 8215: a 64:ff9b:1::/48 prefix may embed the address at any RFC 6052
    # length, so nothing is read out of it.
    local = classify("64:ff9b:1:2:3::4")
    assert (local.cls, local.embedded_ipv4, local.geo_address) == ("nat64", None, None)


@pytest.mark.parametrize(
    ("address", "embedded"),
    [("2001:470:1f0b::5efe:c000:221", "192.0.2.33"), ("2600:1::200:5efe:cb00:7109", "203.0.113.9")],
)
def test_isatap_interface_ids(address, embedded):
    found = classify(address)
    assert (found.cls, found.embedded_ipv4) == ("isatap", embedded)
    # The prefix is the site's own: it locates the site, the IPv4 may be private.
    assert found.geo_address == str(IPv6Address(address))


@pytest.mark.parametrize(
    ("address", "cls"),
    [
        ("2601:1:2:3::4", "native"),
        ("2a02:c7f:1::7", "native"),
        ("fd00::5", "ula"),
        ("fc12:3456::1", "ula"),
        ("fe80::1", "link-local"),
        ("fe80::5efe:c000:221", "link-local"),  # ISATAP on a link-local prefix
        ("::1", "loopback"),
        ("2001:db8::1", "documentation"),
        ("3fff:123::1", "documentation"),
        ("2001:2::1", "special"),  # benchmarking, inside 2001::/23
        ("2001:10::1", "special"),  # ORCHID
        ("100::1", "special"),  # discard-only
        ("5f00::1", "special"),  # SRv6 SIDs
        ("ff02::1", "special"),  # multicast
        ("::", "special"),
        ("::c000:221", "special"),  # IPv4-compatible, deprecated
        ("fec0::1", "special"),  # site-local, deprecated
        ("4000::1", "special"),  # outside 2000::/3: unallocated
    ],
)
def test_classes(address, cls):
    found = classify(address)
    assert found.cls == cls
    assert found.address == str(IPv6Address(address))
    assert found.geo_address == (found.address if cls == "native" else None)


def test_every_class_is_listed_once():
    assert len(set(CLASSES)) == len(CLASSES) == 10


def test_mapped_ipv4_is_ipv4_not_an_ipv6_class():
    with pytest.raises(ValueError, match="IPv4"):
        classify("::ffff:192.0.2.1")
    with pytest.raises(ValueError):
        classify("not an address")


def test_zone_ids_and_spelling_are_normalised():
    assert classify("FE80::1%eth0").address == "fe80::1"
    assert classify("2601:0001:0000::0004").address == "2601:1::4"
