"""Zone files and the pure answer logic (no sockets).

The wire and socket tests (test_dns.py) check the same rules end to end;
these pin each rule to its RFC on small zones made for it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from dnslib import QTYPE

from probe_server.testing import require_tool
from probe_server.zone import (
    NOERROR,
    NXDOMAIN,
    REFUSED,
    Answer,
    Authority,
    ZoneError,
    load_zone,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ZONES = sorted((ROOT / "dns").glob("*.zone")) + sorted((ROOT / "deploy").glob("*.zone"))
TEST_ZONES = sorted((Path(__file__).parent / "zones").glob("*.zone"))


def origin_of(path: Path) -> str:
    match = re.search(r"^\$ORIGIN\s+(\S+)", path.read_text(), re.MULTILINE)
    assert match, f"{path} has no $ORIGIN line"
    return match.group(1)


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.from_files(TEST_ZONES)


@pytest.fixture(scope="module")
def example() -> Authority:
    return Authority.from_files(
        [ROOT / "dns" / "example.org.zone", ROOT / "dns" / "v6ns.example.org.zone"]
    )


def name(text: str) -> tuple[bytes, ...]:
    return tuple(label.encode().lower() for label in text.rstrip(".").split(".") if label)


def records(rrs) -> list[tuple[str, str, int, str]]:
    return [(str(rr.rname), QTYPE[rr.rtype], rr.ttl, str(rr.rdata)) for rr in rrs]


def ask(authority: Authority, qname: str, qtype: str) -> Answer:
    return authority.answer(name(qname), getattr(QTYPE, qtype))


# -- shipped zone files -------------------------------------------------------


def test_dns_directory_holds_data_only():
    # A package named "dns" here would shadow dnspython.
    assert not (ROOT / "dns" / "__init__.py").exists()
    assert {p.name for p in SHIPPED_ZONES} >= {
        "template.zone",
        "example.org.zone",
        "v6ns.example.org.zone",
    }


@pytest.mark.parametrize("path", SHIPPED_ZONES + TEST_ZONES, ids=lambda p: p.name)
def test_named_checkzone_accepts(path):
    tool = require_tool("named-checkzone")
    # -i local: the delegation to an IPv6-only name server is checked for its
    # in-zone glue; the default "full" also asks the system resolver about
    # the child's name server, which fails offline and proves nothing.
    result = subprocess.run(
        [tool, "-k", "fail", "-n", "fail", "-i", "local", origin_of(path), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("OK")


@pytest.mark.parametrize("path", SHIPPED_ZONES + TEST_ZONES, ids=lambda p: p.name)
def test_every_zone_file_loads(path):
    zone = load_zone(path)
    assert zone.origin == name(origin_of(path))


def test_example_zone_has_the_measurement_names(example):
    def types(qname):
        zone = example.find_zone(name(qname))
        assert zone is not None
        return set(zone.nodes[name(qname)])

    a, aaaa, ns, soa = (getattr(QTYPE, t) for t in ("A", "AAAA", "NS", "SOA"))
    assert {soa, ns} <= types("example.org")
    assert types("ns1.example.org") == {a, aaaa}  # the name server, both families
    assert types("survey.example.org") == {a}  # IPv4-only
    assert types("v6.example.org") == {aaaa}  # IPv6-only
    assert types("ds.example.org") == {a, aaaa}  # dual-stack
    assert types("*.v6.example.org") == {aaaa}  # per-session labels
    assert types("*.survey.example.org") == {a}
    # The child zone's name server has only an IPv6 address.
    assert types("ns.v6ns.example.org") == {aaaa}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$ORIGIN bad.test.\n@ 60 IN NS ns.bad.test.\n", "no SOA"),
        ("$ORIGIN bad.test.\n@ 60 IN SOA a. b. 1 2 3 4 5\n", "no NS"),
        (
            "$ORIGIN bad.test.\n@ 60 IN SOA a. b. 1 2 3 4 5\n@ 60 IN NS a.\n"
            "x 60 IN CNAME y\nx 60 IN A 192.0.2.1\n",
            "CNAME",
        ),
        (
            "$ORIGIN bad.test.\n@ 60 IN SOA a. b. 1 2 3 4 5\n@ 60 IN NS a.\nx 60 IN DNAME y\n",
            "DNAME",
        ),
        (
            "$ORIGIN bad.test.\n@ 60 IN SOA a. b. 1 2 3 4 5\n@ 60 IN NS a.\nx 60 IN A 300.1.1.1\n",
            "malformed",
        ),
    ],
)
def test_bad_zone_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.zone"
    path.write_text(text)
    with pytest.raises(ZoneError) as error:
        load_zone(path)
    assert str(error.value).startswith(f"{path}:")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_zone_file(tmp_path):
    with pytest.raises(ZoneError, match="no such file"):
        load_zone(tmp_path / "nope.zone")


# -- the answer rules -----------------------------------------------------------


def test_positive_answer_is_authoritative(example):
    answer = ask(example, "survey.example.org", "A")
    assert (answer.rcode, answer.authoritative) == (NOERROR, True)
    assert records(answer.answer) == [("survey.example.org.", "A", 300, "192.0.2.10")]
    assert answer.authority == ()


@pytest.mark.parametrize(
    ("qname", "qtype"),
    [("v6.example.org", "A"), ("survey.example.org", "AAAA"), ("ds.example.org", "TXT")],
)
def test_missing_type_is_nodata_with_soa(example, qname, qtype):
    """RFC 2308 §2.2: NOERROR, no answer, the SOA with TTL min(SOA TTL, MINIMUM)."""
    answer = ask(example, qname, qtype)
    assert (answer.rcode, answer.authoritative, answer.answer) == (NOERROR, True, ())
    [soa] = records(answer.authority)
    assert soa[:3] == ("example.org.", "SOA", 60)  # min(3600, 60)


def test_negative_ttl_is_the_smaller_of_ttl_and_minimum(authority):
    answer = ask(authority, "nothing.edge.test", "A")
    assert answer.rcode == NXDOMAIN
    assert records(answer.authority)[0][2] == 100  # min(100, 120)


def test_missing_name_is_nxdomain_with_soa(example):
    answer = ask(example, "nope.example.org", "A")
    assert (answer.rcode, answer.authoritative, answer.answer) == (NXDOMAIN, True, ())
    assert records(answer.authority)[0][:3] == ("example.org.", "SOA", 60)


def test_empty_non_terminal_is_nodata(authority):
    for qname in ("b.c.edge.test", "c.edge.test"):
        answer = ask(authority, qname, "A")
        assert (answer.rcode, answer.answer) == (NOERROR, ())
        assert records(answer.authority)[0][1] == "SOA"
    assert ask(authority, "x.c.edge.test", "A").rcode == NXDOMAIN
    assert records(ask(authority, "a.b.c.edge.test", "A").answer)[0][3] == "192.0.2.3"


def test_outside_every_zone_is_refused(example):
    answer = ask(example, "example.com", "A")
    assert (answer.rcode, answer.authoritative, answer.authority) == (REFUSED, False, ())
    assert ask(example, "org", "SOA").rcode == REFUSED
    assert ask(example, "", "NS").rcode == REFUSED


def test_per_session_wildcard_names(example):
    token = "abcdefghijklmnopqrstuvwxyz234567"
    answer = ask(example, f"{token}.v6.example.org", "AAAA")
    assert records(answer.answer) == [(f"{token}.v6.example.org.", "AAAA", 300, "2001:db8::10")]
    assert answer.wildcard_parent == name("v6.example.org")
    nodata = ask(example, f"{token}.v6.example.org", "A")
    assert (nodata.rcode, nodata.answer) == (NOERROR, ())
    assert nodata.wildcard_parent == name("v6.example.org")
    # Deeper names match the wildcard too (RFC 4592 §3.3.1), but are not templated.
    deep = ask(example, f"x.{token}.v6.example.org", "AAAA")
    assert records(deep.answer)[0][3] == "2001:db8::10"
    assert deep.wildcard_parent is None
    # The name with the wildcard itself exists and is not synthesised.
    assert ask(example, "v6.example.org", "AAAA").wildcard_parent is None


# RFC 4592 §2.2.1: the queries and the answers it lists.
@pytest.mark.parametrize(
    ("qname", "qtype", "rcode", "answer"),
    [
        ("host3.example", "MX", NOERROR, [("host3.example.", "MX", 3600, "10 host1.example.")]),
        ("host3.example", "A", NOERROR, []),
        ("foo.bar.example", "TXT", NOERROR,
         [("foo.bar.example.", "TXT", 3600, '"this is a wildcard"')]),
        ("host1.example", "MX", NOERROR, []),
        ("sub.*.example", "MX", NOERROR, []),
        ("_telnet._tcp.host1.example", "SRV", NXDOMAIN, []),
        ("ghost.*.example", "MX", NXDOMAIN, []),
        ("*.example", "MX", NOERROR, [("*.example.", "MX", 3600, "10 host1.example.")]),
        ("_tcp.host1.example", "SRV", NOERROR, []),  # an empty non-terminal
    ],
)  # fmt: skip
def test_rfc4592_examples(authority, qname, qtype, rcode, answer):
    result = ask(authority, qname, qtype)
    assert (result.rcode, result.authoritative) == (rcode, True)
    assert records(result.answer) == answer
    if not answer:
        assert records(result.authority)[0][:2] == ("example.", "SOA")


def test_delegation_is_a_referral_with_glue(authority):
    for qname in ("host.subdel.example", "subdel.example"):
        answer = ask(authority, qname, "A")
        assert (answer.rcode, answer.authoritative, answer.answer) == (NOERROR, False, ())
        assert {r[3] for r in records(answer.authority)} == {"ns.example.com.", "ns.example.net."}
    referral = ask(authority, "www.sub.edge.test", "AAAA")
    assert records(referral.authority) == [("sub.edge.test.", "NS", 300, "ns.sub.edge.test.")]
    assert {r[3] for r in records(referral.additional)} == {"192.0.2.53", "2001:db8::53"}
    # Glue is not answered authoritatively: a query for it is referred too.
    assert not ask(authority, "ns.sub.edge.test", "A").authoritative
    # DS belongs to the parent side of the cut: NODATA from the parent.
    ds = ask(authority, "sub.edge.test", "DS")
    assert (ds.rcode, ds.authoritative, ds.answer) == (NOERROR, True, ())


def test_child_zone_served_too_answers_for_itself(example):
    answer = ask(example, "ds.v6ns.example.org", "AAAA")
    assert (answer.rcode, answer.authoritative) == (NOERROR, True)
    assert records(answer.answer)[0][3] == "2001:db8::10"
    nodata = ask(example, "ns.v6ns.example.org", "A")
    assert records(nodata.authority)[0][:3] == ("v6ns.example.org.", "SOA", 60)
    # DS at the child's apex comes from the parent zone.
    ds = ask(example, "v6ns.example.org", "DS")
    assert records(ds.authority)[0][0] == "example.org."


def test_parent_alone_refers_to_the_ipv6_only_name_server():
    parent = Authority([load_zone(ROOT / "dns" / "example.org.zone")])
    answer = ask(parent, "x.ds.v6ns.example.org", "A")
    assert (answer.authoritative, answer.answer) == (False, ())
    assert records(answer.authority) == [("v6ns.example.org.", "NS", 300, "ns.v6ns.example.org.")]
    assert records(answer.additional) == [("ns.v6ns.example.org.", "AAAA", 300, "2001:db8::53")]


def test_cname_is_followed_inside_our_zones(authority, example):
    assert records(ask(authority, "chain1.edge.test", "A").answer) == [
        ("chain1.edge.test.", "CNAME", 300, "chain2.edge.test."),
        ("chain2.edge.test.", "CNAME", 300, "alias.edge.test."),
        ("alias.edge.test.", "CNAME", 300, "target.edge.test."),
        ("target.edge.test.", "A", 300, "192.0.2.2"),
    ]
    cname = ask(authority, "alias.edge.test", "CNAME")
    assert records(cname.answer) == [("alias.edge.test.", "CNAME", 300, "target.edge.test.")]
    # The target has no such type: NODATA after the CNAME.
    nodata = ask(authority, "alias.edge.test", "AAAA")
    assert (nodata.rcode, len(nodata.answer), records(nodata.authority)[0][1]) == (
        NOERROR,
        1,
        "SOA",
    )
    # The target does not exist: NXDOMAIN with the CNAME (RFC 6604).
    dangling = ask(authority, "dangling.edge.test", "A")
    assert (dangling.rcode, len(dangling.answer)) == (NXDOMAIN, 1)
    # Out of our zones: the CNAME alone, the resolver goes on.
    outside = ask(authority, "outside.edge.test", "A")
    assert (outside.rcode, records(outside.answer)) == (
        NOERROR,
        [("outside.edge.test.", "CNAME", 300, "www.example.com.")],
    )
    # Into a delegated child: the CNAME, and the referral to follow.
    child = ask(authority, "intochild.edge.test", "A")
    assert (child.rcode, child.authoritative, len(child.answer)) == (NOERROR, True, 1)
    assert records(child.authority) == [("sub.edge.test.", "NS", 300, "ns.sub.edge.test.")]
    assert len(child.additional) == 2
    # A loop ends where it closes.
    loop = ask(authority, "loopa.edge.test", "A")
    assert loop.rcode == NOERROR
    assert [r[0] for r in records(loop.answer)] == ["loopa.edge.test.", "loopb.edge.test."]
    # A wildcard CNAME takes the query name as owner.
    wild = ask(authority, "anything.wild.edge.test", "A")
    assert records(wild.answer)[0][:2] == ("anything.wild.edge.test.", "CNAME")
    assert records(wild.answer)[-1][3] == "192.0.2.2"
    assert records(ask(example, "www.example.org", "A").answer)[-1][3] == "192.0.2.10"


def test_any_gets_one_rrset(example, authority):
    """RFC 8482: one RRset, not everything the name has."""
    apex = ask(example, "example.org", "ANY")
    assert len({(r[0], r[1]) for r in records(apex.answer)}) == 1
    dual = ask(example, "ds.example.org", "ANY")
    assert [r[1] for r in records(dual.answer)] == ["A"]
    assert [r[1] for r in records(ask(example, "v6.example.org", "ANY").answer)] == ["AAAA"]
    assert [r[1] for r in records(ask(authority, "alias.edge.test", "ANY").answer)] == ["CNAME"]
    empty = ask(authority, "c.edge.test", "ANY")
    assert (empty.rcode, empty.answer) == (NOERROR, ())


def test_additional_addresses_for_ns_and_mx(example, authority):
    ns = ask(example, "example.org", "NS")
    assert {r[3] for r in records(ns.additional)} == {"192.0.2.53", "2001:db8::53"}
    mx = ask(authority, "mx.edge.test", "MX")
    assert {r[3] for r in records(mx.additional)} == {"192.0.2.1", "2001:db8::1"}


def test_names_are_case_insensitive(authority):
    assert records(ask(authority, "MIXED-case.EDGE.test", "A").answer)[0][3] == "192.0.2.7"


def test_ipv6_only_zones(example):
    # v6ns is delegated to ns.v6ns, which has an AAAA record and no A record.
    assert example.ipv6_only_zones() == {(b"v6ns", b"example", b"org")}
    parent_only = example.without(example.ipv6_only_zones())
    assert list(parent_only.zones) == [(b"example", b"org")]
    referral = parent_only.answer((b"ds", b"v6ns", b"example", b"org"), QTYPE.A)
    assert not referral.authoritative and not referral.answer
    # A zone served alone, or delegated to a name server with IPv4, is not.
    edge = Authority.from_files([ROOT / "tests" / "zones" / "edge.test.zone"])
    assert edge.ipv6_only_zones() == frozenset()
