"""The zones we are authoritative for, and what to answer: the meaning of DNS.

Zone files are standard master files read by dnspython's parser (the one
BIND-compatible parser in Python; dnslib's own misses TTL units, class-before-
TTL order, ``$INCLUDE`` and RFC 3597 syntax). Records are converted once, at
start, into dnslib RRs, which the wire layer packs.

:meth:`Authority.answer` is a pure function of (query name, query type): it
walks the zone as RFC 1034 §4.3.2 describes, with the corrections of RFC 2308
(negative answers carry the SOA), RFC 4592 (wildcards), RFC 8020 (NXDOMAIN
means nothing below either) and RFC 8482 (ANY gets one RRset). Names here are
tuples of lower-case labels, leftmost first, without the root label.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rrset
import dns.zone
from dnslib import AAAA, CNAME, MX, NS, PTR, RD, RR, SOA, TXT, A, DNSLabel

Name = tuple[bytes, ...]

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_NS, TYPE_CNAME, TYPE_SOA, TYPE_MX, TYPE_TXT = 1, 2, 5, 6, 15, 16
TYPE_AAAA, TYPE_SRV, TYPE_DNAME, TYPE_DS, TYPE_ANY = 28, 33, 39, 43, 255
WILDCARD = b"*"
# A CNAME chain longer than this is answered as far as it goes.
MAX_CNAME_CHAIN = 8


class ZoneError(Exception):
    """A zone file that cannot be served; the message names the file."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What to say, before it is put on the wire."""

    rcode: int
    authoritative: bool
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    # Set when the answer was synthesised from ``*.<closest encloser>`` for a
    # name exactly one label below it: every such name gets the same answer
    # with only the owner changed, which the wire layer caches once.
    wildcard_parent: Name | None = None


@dataclass
class Zone:
    """One zone: its nodes (owner name -> type -> RRset), cuts and SOA."""

    origin: Name
    soa: RR
    # Every name in the zone, including empty non-terminals (empty dict) and
    # glue below delegation points.
    nodes: dict[Name, dict[int, tuple[RR, ...]]]
    # Names below the apex that carry NS records: delegation points.
    cuts: frozenset[Name] = field(default_factory=frozenset)

    @property
    def negative_soa(self) -> RR:
        """The SOA for negative answers, its TTL min(SOA TTL, MINIMUM) (RFC 2308 §3)."""
        soa = self.soa
        ttl = min(soa.ttl, soa.rdata.times[4])
        return RR(soa.rname, TYPE_SOA, 1, ttl, soa.rdata)


def _label(name: dns.name.Name) -> DNSLabel:
    return DNSLabel([bytes(label) for label in name.labels[:-1]])


def _key(name: dns.name.Name) -> Name:
    return tuple(bytes(label).lower() for label in name.labels[:-1])


def _rdata(rdata: dns.rdata.Rdata) -> RD:
    """dnslib RDATA for one dnspython rdata.

    Types whose names RFC 1035 lets us compress get dnslib's typed classes;
    every other type is carried as its exact wire bytes (RFC 3597 §4 forbids
    compressing names in them, e.g. SRV).
    """
    kind = rdata.rdtype
    if kind == TYPE_A:
        return A(rdata.address)  # type: ignore[attr-defined]
    if kind == TYPE_AAAA:
        return AAAA(rdata.address)  # type: ignore[attr-defined]
    if kind in (TYPE_NS, TYPE_CNAME, dns.rdatatype.PTR):
        target = _label(rdata.target)  # type: ignore[attr-defined]
        return {TYPE_NS: NS, TYPE_CNAME: CNAME}.get(kind, PTR)(target)
    if kind == TYPE_MX:
        return MX(_label(rdata.exchange), rdata.preference)  # type: ignore[attr-defined]
    if kind == TYPE_TXT:
        return TXT(list(rdata.strings))  # type: ignore[attr-defined]
    if kind == TYPE_SOA:
        s = rdata
        times = (s.serial, s.refresh, s.retry, s.expire, s.minimum)  # type: ignore[attr-defined]
        return SOA(_label(s.mname), _label(s.rname), times)  # type: ignore[attr-defined]
    return RD(rdata.to_wire())


def record_targets(rrset: Iterable[RR]) -> list[Name]:
    """Names whose addresses belong in the additional section (RFC 1034 §3.6.2, RFC 2782)."""
    names = []
    for rr in rrset:
        rdata = rr.rdata
        if rr.rtype in (TYPE_NS, TYPE_MX):
            names.append(tuple(label.lower() for label in rdata.label.label))
        elif rr.rtype == TYPE_SRV:
            # Carried as wire bytes: priority, weight, port, uncompressed target.
            data, pos, labels = rdata.data, 6, []
            while data[pos]:
                labels.append(data[pos + 1 : pos + 1 + data[pos]].lower())
                pos += data[pos] + 1
            names.append(tuple(labels))
    return names


def _parse(path: str | os.PathLike[str]) -> dns.zone.Zone:
    try:
        return dns.zone.from_file(os.fspath(path), origin=None, relativize=False)
    except FileNotFoundError:
        raise ZoneError(f"{path}: no such file") from None
    except OSError as e:
        raise ZoneError(f"{path}: cannot read: {e.strerror}") from None
    except dns.zone.NoSOA:
        raise ZoneError(f"{path}: no SOA record at the zone's origin") from None
    except dns.zone.NoNS:
        raise ZoneError(f"{path}: no NS records at the zone's origin") from None
    except (dns.exception.DNSException, ValueError, KeyError) as e:
        text = str(e) or type(e).__name__
        # dnspython's syntax errors already start with "FILE:LINE:".
        raise ZoneError(text if text.startswith(f"{path}:") else f"{path}: {text}") from None


def load_zone(path: str | os.PathLike[str], extra: Iterable[dns.rrset.RRset] = ()) -> Zone:
    """Read one master file; its origin comes from its ``$ORIGIN`` line.

    ``extra`` records (ACME DNS-01 challenges) are added to the zone's own.
    """
    return _convert(path, _parse(path), extra)


def _convert(
    path: str | os.PathLike[str], parsed: dns.zone.Zone, extra: Iterable[dns.rrset.RRset] = ()
) -> Zone:
    if parsed.origin is None:
        raise ZoneError(f"{path}: no $ORIGIN line names the zone")
    for rrset in extra:
        node = parsed.find_node(rrset.name, create=True)
        node.find_rdataset(rrset.rdclass, rrset.rdtype, create=True).union_update(rrset)
    origin = _key(parsed.origin)
    nodes: dict[Name, dict[int, tuple[RR, ...]]] = {}
    for name, rdataset in parsed.iterate_rdatasets():
        owner = _key(name)
        kind = int(rdataset.rdtype)
        if kind == TYPE_DNAME:
            raise ZoneError(f"{path}: {name}: DNAME records are not supported")
        label = DNSLabel(list(owner))
        rrs = tuple(
            RR(label, kind, int(rdataset.rdclass), rdataset.ttl, _rdata(rdata))
            for rdata in rdataset
        )
        nodes.setdefault(owner, {})[kind] = rrs
    soa_rrs = nodes[origin][TYPE_SOA]
    for owner, rrsets in list(nodes.items()):
        if TYPE_CNAME in rrsets and len(rrsets) > 1:
            raise ZoneError(f"{path}: {_text(owner)}: a CNAME name can hold no other record")
        if owner and owner[0] == WILDCARD and TYPE_NS in rrsets:
            raise ZoneError(f"{path}: {_text(owner)}: NS records at a wildcard are not supported")
        # Empty non-terminals: every ancestor up to the origin exists.
        for depth in range(1, len(owner) - len(origin)):
            nodes.setdefault(owner[depth:], {})
    cuts = frozenset(
        owner for owner, rrsets in nodes.items() if owner != origin and TYPE_NS in rrsets
    )
    return Zone(origin=origin, soa=soa_rrs[0], nodes=nodes, cuts=cuts)


def _text(name: Name) -> str:
    return ".".join(label.decode("ascii", "backslashreplace") for label in name) + "."


class Authority:
    """Every zone this server serves, and the answer to any question."""

    def __init__(self, zones: Sequence[Zone]) -> None:
        self.zones: dict[Name, Zone] = {}
        for zone in zones:
            if zone.origin in self.zones:
                raise ZoneError(f"zone {_text(zone.origin)} is loaded twice")
            self.zones[zone.origin] = zone

    @classmethod
    def from_files(
        cls, paths: Iterable[str | os.PathLike[str]], extra: Iterable[dns.rrset.RRset] = ()
    ) -> Authority:
        """The zones in ``paths``; each ``extra`` RRset joins the innermost zone holding it."""
        parsed = [(path, _parse(path)) for path in paths]
        placed: list[list[dns.rrset.RRset]] = [[] for _ in parsed]
        for rrset in extra:
            homes = [
                (len(zone.origin), index)
                for index, (_, zone) in enumerate(parsed)
                if zone.origin is not None and rrset.name.is_subdomain(zone.origin)
            ]
            if not homes:
                raise ZoneError(f"{rrset.name}: in none of the zones served")
            placed[max(homes)[1]].append(rrset)
        return cls(
            [_convert(path, zone, rrs) for (path, zone), rrs in zip(parsed, placed, strict=True)]
        )

    def ipv6_only_zones(self) -> frozenset[Name]:
        """Child zones whose every name server has an IPv6 address and no IPv4 one.

        test-ipv6.com's ``v6ns``: a name in such a zone resolves only through
        a resolver that reaches DNS over IPv6. When we serve the parent too,
        a query over IPv4 must get the parent's referral, as from a separate
        IPv6-only server; answering it from the child would let an
        IPv4-only resolver through. Only name servers whose addresses we
        serve (glue or our own zones) are judged.
        """
        found = set()
        for origin in self.zones:
            parent = self.find_zone(origin[1:]) if origin else None
            if parent is None or origin not in parent.cuts:
                continue
            targets = record_targets(parent.nodes[origin][TYPE_NS])
            if targets and all(self._only_ipv6(target, parent) for target in targets):
                found.add(origin)
        return frozenset(found)

    def _only_ipv6(self, target: Name, parent: Zone) -> bool:
        kinds: set[int] = set()
        for zone in (parent, self.find_zone(target)):
            if zone is not None:
                kinds.update(zone.nodes.get(target, {}))
        return TYPE_AAAA in kinds and TYPE_A not in kinds

    def without(self, origins: Iterable[Name]) -> Authority:
        """The same zones less ``origins`` (sharing the loaded zones)."""
        left_out = frozenset(origins)
        return Authority([zone for zone in self.zones.values() if zone.origin not in left_out])

    def find_zone(self, name: Name) -> Zone | None:
        """The zone with the longest origin that contains ``name``."""
        for depth in range(len(name) + 1):
            zone = self.zones.get(name[depth:])
            if zone is not None:
                return zone
        return None

    def exists(self, name: Name) -> bool:
        """True when ``name`` is a node (data or empty non-terminal) of some zone."""
        zone = self.find_zone(name)
        return zone is not None and name in zone.nodes

    def answer(self, qname: Name, qtype: int) -> Answer:
        """The response to one question, class IN, names lower-cased."""
        zone = self.find_zone(qname)
        if zone is None:
            return Answer(REFUSED, authoritative=False)
        if qtype == TYPE_DS and qname == zone.origin and qname:
            # DS lives on the parent side of a cut (RFC 4035 §3.1.4.1).
            parent = self.find_zone(qname[1:])
            if parent is not None:
                zone = parent
        answer: list[RR] = []
        additional: list[RR] = []
        wildcard_parent: Name | None = None
        name = qname
        seen = {qname}
        for step in range(MAX_CNAME_CHAIN + 1):
            found = self._find(zone, name, qtype)
            if isinstance(found, _Referral):
                glue = tuple(self._addresses(record_targets(found.ns), zone, glue=True))
                if step == 0:
                    return Answer(NOERROR, authoritative=False, authority=found.ns, additional=glue)
                # A CNAME into a delegated zone: the CNAME, and the referral
                # for the resolver to follow (as BIND and Knot answer).
                return Answer(NOERROR, True, tuple(answer), found.ns, (*additional, *glue))
            if found is None:
                return Answer(
                    NXDOMAIN, True, tuple(answer), (zone.negative_soa,), tuple(additional)
                )
            rrsets, synthesised_parent = found
            if (
                step == 0
                and synthesised_parent is not None
                and len(name) == len(synthesised_parent) + 1
            ):
                wildcard_parent = synthesised_parent
            cname = rrsets.get(TYPE_CNAME)
            if cname is not None and qtype not in (TYPE_CNAME, TYPE_ANY):
                answer.extend(_owned(cname, name))
                target = tuple(label.lower() for label in cname[0].rdata.label.label)
                next_zone = self.find_zone(target)
                if next_zone is None or target in seen or step == MAX_CNAME_CHAIN:
                    break  # out of our zones, a loop, or too long: the resolver goes on
                seen.add(target)
                zone, name = next_zone, target
                continue
            chosen = _minimal_any(rrsets) if qtype == TYPE_ANY else rrsets.get(qtype)
            if not chosen:
                # NODATA: the name exists (perhaps as an empty non-terminal),
                # the type does not (RFC 2308 §2.2).
                return Answer(
                    NOERROR,
                    True,
                    tuple(answer),
                    (zone.negative_soa,),
                    tuple(additional),
                    wildcard_parent,
                )
            answer.extend(_owned(chosen, name))
            additional.extend(self._addresses(record_targets(chosen), zone, glue=False))
            break
        return Answer(NOERROR, True, tuple(answer), (), tuple(additional), wildcard_parent)

    def _find(
        self, zone: Zone, name: Name, qtype: int
    ) -> _Referral | tuple[dict[int, tuple[RR, ...]], Name | None] | None:
        """The node answering ``name``: exact, wildcard, a referral, or None."""
        nodes = zone.nodes
        below = len(name) - len(zone.origin)
        # Walk down from the apex: a cut on the way means the data is the child's.
        for depth in range(below - 1, -1, -1):
            candidate = name[depth:]
            if candidate not in nodes:
                closest = name[depth + 1 :]
                source = nodes.get((WILDCARD, *closest))
                if source is None:
                    return None
                return source, closest
            if candidate in zone.cuts and not (depth == 0 and qtype == TYPE_DS):
                return _Referral(nodes[candidate][TYPE_NS])
        return nodes[name], None

    def _addresses(self, targets: Iterable[Name], zone: Zone, *, glue: bool) -> list[RR]:
        """A and AAAA records of in-zone targets (glue for referrals)."""
        records: list[RR] = []
        for target in targets:
            home = zone if glue else self.find_zone(target)
            if home is None:
                continue
            node = home.nodes.get(target)
            if node is None:
                continue
            if not glue and any(target[d:] in home.cuts for d in range(len(target))):
                continue  # below a cut: not our data to give as authoritative
            for kind in (TYPE_A, TYPE_AAAA):
                records.extend(node.get(kind, ()))
        return records


@dataclass(frozen=True, slots=True)
class _Referral:
    ns: tuple[RR, ...]


def _owned(rrset: tuple[RR, ...], owner: Name) -> tuple[RR, ...]:
    """The RRset with ``owner`` as its name (a wildcard's records take the query name)."""
    if rrset[0].rname.label == owner:
        return rrset
    label = DNSLabel(list(owner))
    return tuple(RR(label, rr.rtype, rr.rclass, rr.ttl, rr.rdata) for rr in rrset)


# RFC 8482 §4.1: answer ANY with one RRset of the name's choosing; prefer the
# address records a client most likely wanted.
_ANY_ORDER = (TYPE_A, TYPE_AAAA)


def _minimal_any(rrsets: dict[int, tuple[RR, ...]]) -> tuple[RR, ...]:
    for kind in _ANY_ORDER:
        if kind in rrsets:
            return rrsets[kind]
    for kind in sorted(rrsets):
        return rrsets[kind]
    return ()
