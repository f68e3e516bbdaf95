"""DNS messages on the wire: read a query, write its reply, truncate, cache.

:class:`Responder` turns the bytes of one query into the bytes of its reply,
using :meth:`zone.Authority.answer` for what to say. Two paths lead there:

- The fast path reads the header and the single question of a plain query
  (opcode QUERY, one question, class IN, at most an OPT record) directly from
  the bytes, and serves a reply packed earlier for the same lower-cased name,
  type and EDNS state: the zone never changes while we run. Only the ID, the
  RD/CD bits and the question (the client's own bytes, so its letter case is
  echoed exactly, as resolvers using 0x20 randomisation require) are filled in.
- Everything else is parsed with dnslib, which also decides FORMERR.

Both paths pack the cached part the same way, from the question in lower case:
names later in the reply are compressed against the question, so they come
out in the client's letter case, as from BIND or Knot.

Names synthesised from a wildcard (``<session token>.v6.example.org``) differ
from each other in the first label only; their replies share one packed
template keyed by the parent name and the label's length, so per-session
names are as cheap as static ones and do not churn the cache.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import dns.rcode
import dns.rdatatype
from dnslib import DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from .zone import FORMERR, NOTIMP, REFUSED, SERVFAIL, Answer, Authority, Name

HEADER_SIZE = 12
TCP_LIMIT = 65535
PLAIN_UDP_LIMIT = 512  # RFC 1035 §4.2.1, when the query has no OPT record
TYPE_OPT = 41
BADVERS = 16  # RFC 6891 §6.1.3: extended RCODE, 1 in the OPT's upper 8 bits
# Meta types that are never answered from the zone: OPT (as a question),
# TKEY, TSIG, IXFR, AXFR, MAILB, MAILA.
_META_TYPES = frozenset({41, 249, 250, 251, 252, 253, 254})
_ERROR_FOR_META = {251: REFUSED, 252: REFUSED, 253: NOTIMP, 254: NOTIMP}
_QD1 = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_QD1_AR1 = b"\x00\x01\x00\x00\x00\x00\x00\x01"
# Header byte 2: QR AA TC RD; byte 3: CD and RCODE.
_QR, _AA, _TC, _RD, _CD = 0x80, 0x04, 0x02, 0x01, 0x10
# Bytes that appear as themselves in a name's presentation form.
_PLAIN_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*/"


class Outcome(NamedTuple):
    """A reply (None: send nothing) and what the query log keeps of it."""

    reply: bytes | None
    qname: str | None = None
    qtype: str | None = None
    rcode: str | None = None
    truncated: bool = False
    edns_version: int | None = None
    udp_size: int | None = None
    # The reply's ANCOUNT and NSCOUNT (RFC 1035 §4.1.1): NOERROR with no
    # answer is NODATA, told apart from a referral by its authority (SOA).
    ancount: int = 0
    nscount: int = 0


DROPPED = Outcome(None)


def opt_record(udp_size: int, *, do: bool = False, extended_rcode: int = 0) -> bytes:
    """Our OPT pseudo-RR: root owner, payload size, version 0 (RFC 6891 §6.1.2)."""
    return struct.pack("!BHHBBHH", 0, TYPE_OPT, udp_size, extended_rcode, 0, 0x8000 if do else 0, 0)


def name_wire(labels: Name) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def wire_labels(wire: bytes) -> Name:
    """Split an uncompressed, well-formed wire name into its labels."""
    labels = []
    pos = 0
    while length := wire[pos]:
        labels.append(wire[pos + 1 : pos + 1 + length])
        pos += length + 1
    return tuple(labels)


def _escape(label: bytes) -> str:
    out = []
    for byte in label:
        if byte in _PLAIN_BYTES:
            out.append(chr(byte))
        elif 0x21 <= byte <= 0x7E:
            out.append("\\" + chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def name_text(wire: bytes) -> str:
    """A wire name in presentation form, letter case kept (``Survey.Example.org.``)."""
    labels = wire_labels(wire)
    if not labels:
        return "."
    text = b".".join(labels)
    if not text.translate(None, _PLAIN_BYTES + b".") and text.count(b".") == len(labels) - 1:
        return text.decode("ascii") + "."
    return ".".join(_escape(label) for label in labels) + "."


_TYPE_TEXT: dict[int, str] = {}


def type_text(qtype: int) -> str:
    text = _TYPE_TEXT.get(qtype)
    if text is None:
        text = _TYPE_TEXT[qtype] = dns.rdatatype.to_text(qtype)  # type: ignore[arg-type]
    return text


def rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(rcode)  # type: ignore[arg-type]


class _Entry:
    """A packed reply without its ID and question, in both full and truncated form."""

    __slots__ = ("ancount", "fixed", "heads", "nscount", "rcode", "rest", "tc_heads", "tc_rest")

    def __init__(self, answer: Answer, labels: Name, qtype: int, opt: bytes) -> None:
        record = DNSRecord(DNSHeader(id=0), q=DNSQuestion(DNSLabel(list(labels)), qtype))
        record.rr = list(answer.answer)
        record.auth = list(answer.authority)
        record.ar = list(answer.additional)
        packed = record.pack()
        counts = packed[6:12]
        ancount, nscount, arcount = struct.unpack("!HHH", counts)
        question_size = len(name_wire(labels)) + 4
        self.rest = packed[HEADER_SIZE + question_size :] + opt
        counts = struct.pack("!HHH", ancount, nscount, arcount + (1 if opt else 0))
        flags = _QR | (_AA if answer.authoritative else 0)
        self.heads = _heads(flags, answer.rcode, counts)
        # Truncated: the question and the OPT record stay (RFC 6891 §7), so
        # the resolver learns our buffer size and retries over TCP.
        self.tc_heads = _heads(flags | _TC, answer.rcode, struct.pack("!HHH", 0, 0, int(bool(opt))))
        self.tc_rest = opt
        self.fixed = HEADER_SIZE + len(self.rest)
        self.rcode = rcode_text(answer.rcode)
        self.ancount, self.nscount = ancount, nscount


def _heads(flags: int, rcode: int, counts: bytes) -> tuple[bytes, ...]:
    """Header bytes 2-11 for each setting of the query's RD and CD bits."""
    return tuple(
        bytes((flags | (bits & 1), (rcode & 0x0F) | (_CD if bits & 2 else 0)))
        + b"\x00\x01"
        + counts
        for bits in range(4)
    )


class Responder:
    """Query bytes in, reply bytes out, over one :class:`Authority`."""

    def __init__(self, authority: Authority, *, udp_size: int = 1232, cache_size: int = 10000):
        self.authority = authority
        self.udp_size = udp_size
        self.cache_size = cache_size
        self._opts = (b"", opt_record(udp_size), opt_record(udp_size, do=True))
        self._cache: dict[tuple[bytes, int, int], _Entry] = {}
        self._templates: dict[tuple[bytes, int, int, int], _Entry | None] = {}
        self._names = frozenset(
            name_wire(name) for zone in authority.zones.values() for name in zone.nodes
        )
        # Query names as text for the log, by their exact wire bytes; seeded
        # with every zone name and its ancestors in lower case.
        self._zone_texts = {
            wire: name_text(wire)
            for name in {
                node[depth:]
                for zone in authority.zones.values()
                for node in zone.nodes
                for depth in range(len(node) + 1)
            }
            for wire in (name_wire(name),)
        }
        self._texts = dict(self._zone_texts)

    # -- the fast path ---------------------------------------------------------

    def respond(self, data: bytes, *, tcp: bool = False, slip: bool = False) -> Outcome:
        """The reply to one query; ``slip`` asks for the truncated form (RRL)."""
        size = len(data)
        # QR clear, opcode QUERY; one question; no answer or authority; OPT or nothing.
        if size >= 17 and not data[2] & 0xF8:
            counts = data[4:12]
            edns = counts == _QD1_AR1
            if edns or counts == _QD1:
                pos = 12
                length = data[12]
                while 0 < length < 64:
                    pos += length + 1
                    if pos >= size:
                        length = -1
                        break
                    length = data[pos]
                end = pos + 5
                if (
                    length == 0
                    and end <= size
                    and pos - 11 <= 255
                    and data[pos + 3] == 0
                    and data[pos + 4] == 1
                ):
                    qtype = data[pos + 1] << 8 | data[pos + 2]
                    if qtype not in _META_TYPES:
                        bits = (data[2] & 1) | (data[3] >> 3 & 2)
                        if not edns:
                            if end == size:
                                limit = TCP_LIMIT if tcp else PLAIN_UDP_LIMIT
                                return self._serve(
                                    data[:2], bits, data[12 : pos + 1], data[12:end], qtype,
                                    0, limit, None, None, slip,
                                )  # fmt: skip
                        elif (
                            end + 11 <= size
                            and data[end : end + 3] == b"\x00\x00\x29"
                            and data[end + 6] == 0
                            and end + 11 + (data[end + 9] << 8 | data[end + 10]) == size
                        ):
                            udp = data[end + 3] << 8 | data[end + 4]
                            limit = TCP_LIMIT if tcp else min(max(udp, 512), self.udp_size)
                            return self._serve(
                                data[:2], bits, data[12 : pos + 1], data[12:end], qtype,
                                2 if data[end + 7] & 0x80 else 1, limit, 0, udp, slip,
                            )  # fmt: skip
        return self._slow(data, tcp, slip)

    def _serve(
        self,
        ident: bytes,
        bits: int,
        wire: bytes,
        question: bytes,
        qtype: int,
        edns: int,
        limit: int,
        version: int | None,
        udp: int | None,
        slip: bool,
    ) -> Outcome:
        lower = wire.lower()  # length octets (< 64) are below 'A': untouched
        entry = self._cache.get((lower, qtype, edns)) or self._lookup(lower, qtype, edns)
        if slip or len(question) + entry.fixed > limit:
            reply = ident + entry.tc_heads[bits] + question + entry.tc_rest
            truncated = True
            ancount = nscount = 0
        else:
            reply = ident + entry.heads[bits] + question + entry.rest
            truncated = False
            ancount, nscount = entry.ancount, entry.nscount
        text = self._texts.get(wire)
        if text is None:
            text = self._name_text(wire)
        return Outcome(
            reply, text, _TYPE_TEXT.get(qtype) or type_text(qtype), entry.rcode, truncated,
            version, udp, ancount, nscount,
        )  # fmt: skip

    def _name_text(self, wire: bytes) -> str:
        """Presentation form of a name not in the text cache.

        A per-session name is one new label on a known parent: only that
        label is converted. Other names are converted whole and remembered.
        """
        first = wire[0]
        if first:
            parent = self._texts.get(wire[first + 1 :])
            label = wire[1 : first + 1]
            if parent is not None and not label.translate(None, _PLAIN_BYTES):
                return label.decode("ascii") + ("." + parent if parent != "." else ".")
        text = name_text(wire)
        if len(self._texts) >= self.cache_size:
            self._texts = dict(self._zone_texts)
        self._texts[wire] = text
        return text

    def _lookup(self, lower: bytes, qtype: int, edns: int) -> _Entry:
        first = lower[0]
        template_key = None
        if first:
            template_key = (lower[first + 1 :], first, qtype, edns)
            template = self._templates.get(template_key)
            if template is not None and lower not in self._names:
                return template
        labels = wire_labels(lower)
        answer = self.authority.answer(labels, qtype)
        entry = _Entry(answer, labels, qtype, self._opts[edns])
        if answer.wildcard_parent is not None and template_key is not None:
            if template_key not in self._templates:
                if len(self._templates) >= self.cache_size:
                    self._templates.clear()
                self._templates[template_key] = self._template(
                    answer.wildcard_parent, len(labels[0]), qtype, edns
                )
            if self._templates[template_key] is not None:
                return entry  # served by the template from now on: not cached by name
        if len(self._cache) >= self.cache_size:
            self._cache.clear()  # bounded: a flood of random names only costs time
        self._cache[(lower, qtype, edns)] = entry
        return entry

    def _template(self, parent: Name, length: int, qtype: int, edns: int) -> _Entry | None:
        """One packed reply for every absent ``<label of length>.<parent>``.

        Built for two placeholder labels that no zone can reference; if the
        packed bytes after the question come out identical, nothing in them
        depends on the label but the compression pointers to the question, so
        the same bytes serve any label of that length.
        """
        entries = []
        for filler in (b"\x00", b"\xff"):
            labels = (filler * length, *parent)
            answer = self.authority.answer(labels, qtype)
            if answer.wildcard_parent != parent:
                return None
            entries.append(_Entry(answer, labels, qtype, self._opts[edns]))
        first, second = entries
        if first.rest != second.rest or first.heads != second.heads:
            return None
        return first

    # -- everything else, through dnslib --------------------------------------

    def _slow(self, data: bytes, tcp: bool, slip: bool) -> Outcome:
        if len(data) < HEADER_SIZE or data[2] & _QR:
            return DROPPED  # no header to answer, or a response: never reply to those
        try:
            record = DNSRecord.parse(data)
        except Exception:  # dnslib raises assorted errors on garbage
            return self.error(data, FORMERR)
        opts = [rr for rr in record.ar if rr.rtype == TYPE_OPT]
        if len(opts) > 1 or (opts and opts[0].rname.label):
            return self.error(data, FORMERR)  # RFC 6891 §6.1.1
        opt = opts[0] if opts else None
        version = (opt.ttl >> 16) & 0xFF if opt is not None else None
        udp = opt.rclass if opt is not None else None
        edns = 0 if opt is None else (2 if opt.ttl & 0x8000 else 1)
        if record.header.opcode != 0:
            # Only QUERY is implemented. Other opcodes lay out their sections
            # differently (an UPDATE's first section is the zone, which must
            # be an SOA), so nothing is echoed: echoing a section we do not
            # understand can make the reply itself malformed for the client.
            return self.error(data, NOTIMP, edns=edns, version=version, udp=udp)
        if len(record.questions) != 1:
            return self.error(data, FORMERR, edns=edns, version=version, udp=udp)
        q = record.questions[0]
        labels = tuple(q.qname.label)
        if any(not 0 < len(label) < 64 for label in labels):
            return self.error(data, FORMERR)
        wire = name_wire(labels)
        if len(wire) > 255:
            return self.error(data, FORMERR)
        question = wire + struct.pack("!HH", q.qtype, q.qclass)
        context = {"question": question, "edns": edns, "version": version, "udp": udp}
        if version:
            return self.error(data, BADVERS, **context)  # type: ignore[arg-type]
        if q.qclass != 1:
            return self.error(data, REFUSED, **context)  # type: ignore[arg-type]
        if q.qtype in _META_TYPES:
            rcode = _ERROR_FOR_META.get(q.qtype, FORMERR)
            return self.error(data, rcode, **context)  # type: ignore[arg-type]
        limit = TCP_LIMIT if tcp else PLAIN_UDP_LIMIT
        if opt is not None and not tcp:
            limit = min(max(opt.rclass, 512), self.udp_size)
        bits = (data[2] & 1) | (data[3] >> 3 & 2)
        return self._serve(data[:2], bits, wire, question, q.qtype, edns, limit, version, udp, slip)

    def error(
        self,
        data: bytes,
        rcode: int,
        *,
        question: bytes = b"",
        edns: int = 0,
        version: int | None = None,
        udp: int | None = None,
    ) -> Outcome:
        """An error reply (FORMERR, SERVFAIL, NOTIMP, REFUSED, BADVERS).

        ID, opcode and RD are copied; the question is echoed when it could be
        read; an OPT record is added when the query had a readable one, with
        the query's DO bit copied (RFC 3225 §3), as in every other reply.
        """
        opt = b""
        if edns:
            opt = opt_record(self.udp_size, do=edns == 2, extended_rcode=rcode >> 4)
        flags = _QR | (data[2] & 0x79)
        head = bytes((flags, (rcode & 0x0F) | (data[3] & _CD)))
        counts = struct.pack("!HHHH", 1 if question else 0, 0, 0, 1 if opt else 0)
        reply = data[:2] + head + counts + question + opt
        qname = qtype = None
        if question:
            qname = name_text(question[:-4])
            qtype = type_text(int.from_bytes(question[-4:-2], "big"))
        return Outcome(reply, qname, qtype, rcode_text(rcode), False, version, udp)

    def servfail(self, data: bytes) -> Outcome:
        """For a query that made our own code fail: SERVFAIL if it has a header."""
        if len(data) < HEADER_SIZE or data[2] & _QR:
            return DROPPED
        return self.error(data, SERVFAIL)
