"""What kind of IPv6 address fetched the blue balls.

The paper counts only *native* IPv6: Teredo and 6to4 clients reach an
IPv6-only host too, through automatic tunnels, and are counted apart. The
stdlib's ``is_global`` is False for both tunnel ranges, so every address is
classified here, from its prefix, before anything filters on it.

Prefixes follow the IANA IPv6 Special-Purpose Address Registry.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network

from ..survey import canonical_address

NATIVE = "native"
TEREDO = "teredo"
SIX_TO_FOUR = "6to4"
NAT64 = "nat64"
ISATAP = "isatap"
ULA = "ula"
LINK_LOCAL = "link-local"
LOOPBACK = "loopback"
DOCUMENTATION = "documentation"
SPECIAL = "special"

# Every class, in the order reports list them.
CLASSES = (
    NATIVE,
    TEREDO,
    SIX_TO_FOUR,
    NAT64,
    ISATAP,
    ULA,
    LINK_LOCAL,
    LOOPBACK,
    DOCUMENTATION,
    SPECIAL,
)

DESCRIPTIONS = {
    NATIVE: "native (global unicast)",
    TEREDO: "Teredo (2001::/32, tunnelled over UDP/IPv4)",
    SIX_TO_FOUR: "6to4 (2002::/16, tunnelled over IPv4)",
    NAT64: "NAT64 (64:ff9b::/96, 64:ff9b:1::/48)",
    ISATAP: "ISATAP (interface id 0:5efe / 200:5efe)",
    ULA: "unique local (fc00::/7)",
    LINK_LOCAL: "link-local (fe80::/10)",
    LOOPBACK: "loopback (::1)",
    DOCUMENTATION: "documentation (2001:db8::/32, 3fff::/20)",
    SPECIAL: "other special-purpose or unallocated",
}

_net = IPv6Network
TEREDO_PREFIX = _net("2001::/32")  # RFC 4380
SIX_TO_FOUR_PREFIX = _net("2002::/16")  # RFC 3056
NAT64_WELL_KNOWN = _net("64:ff9b::/96")  # RFC 6052
NAT64_LOCAL_USE = _net("64:ff9b:1::/48")  # RFC 8215
GLOBAL_UNICAST = _net("2000::/3")  # RFC 4291 §2.4

# Checked in order; the first match decides. Teredo sits inside 2001::/23,
# so it comes before the rest of that block.
_PREFIX_CLASSES: tuple[tuple[IPv6Network, str], ...] = (
    (_net("::1/128"), LOOPBACK),
    (_net("fe80::/10"), LINK_LOCAL),
    (_net("fc00::/7"), ULA),
    (_net("2001:db8::/32"), DOCUMENTATION),  # RFC 3849
    (_net("3fff::/20"), DOCUMENTATION),  # RFC 9637
    (TEREDO_PREFIX, TEREDO),
    (SIX_TO_FOUR_PREFIX, SIX_TO_FOUR),
    (NAT64_WELL_KNOWN, NAT64),
    (NAT64_LOCAL_USE, NAT64),
    (_net("2001::/23"), SPECIAL),  # IETF protocol assignments (RFC 2928)
    (_net("5f00::/16"), SPECIAL),  # SRv6 SIDs (RFC 9602)
    (_net("::/96"), SPECIAL),  # unspecified, IPv4-compatible (deprecated)
    (_net("100::/64"), SPECIAL),  # discard-only (RFC 6666)
    (_net("fec0::/10"), SPECIAL),  # site-local (deprecated, RFC 3879)
    (_net("ff00::/8"), SPECIAL),  # multicast: never a source
)

# RFC 5214 §6.1: an ISATAP interface identifier is 00-00-5E-FE followed by
# the IPv4 address, with the u/l bit set (02-00-5E-FE) when the IPv4 address
# is globally unique.
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)

# RFC 4380 §4 as updated by RFC 5991 §3: flags are "CRAAAAUG AAAAAAAA".
TEREDO_CONE_FLAG = 0x8000


@dataclass(frozen=True, slots=True)
class Teredo:
    """The fields a Teredo address carries (RFC 4380 §4)."""

    server: IPv4Address
    client: IPv4Address  # the client's public (NAT-mapped) IPv4 address
    port: int  # the NAT-mapped UDP port
    flags: int

    @property
    def cone(self) -> bool:
        """The C bit: set by pre-RFC 5991 clients behind a cone NAT."""
        return bool(self.flags & TEREDO_CONE_FLAG)


def decode_teredo(address: IPv6Address) -> Teredo:
    """Server, client IPv4, UDP port and flags of a 2001::/32 address.

    Bits 32-63 are the server's IPv4 address, 64-79 the flags, 80-95 the
    port and 96-127 the client's IPv4 address, the last two with every bit
    inverted so that NATs do not rewrite them.
    """
    if address not in TEREDO_PREFIX:
        raise ValueError(f"{address} is not a Teredo address")
    value = int(address)
    return Teredo(
        server=IPv4Address((value >> 64) & 0xFFFFFFFF),
        flags=(value >> 48) & 0xFFFF,
        port=((value >> 32) & 0xFFFF) ^ 0xFFFF,
        client=IPv4Address((value & 0xFFFFFFFF) ^ 0xFFFFFFFF),
    )


@dataclass(frozen=True, slots=True)
class Classified:
    """One address, its class and what it embeds."""

    address: str
    cls: str
    # The IPv4 address inside it: the 6to4 router, the NAT64-translated
    # host, the ISATAP node, or the Teredo client's public address.
    embedded_ipv4: str | None = None
    teredo: Teredo | None = None
    # What to geolocate for it: itself when native or ISATAP (its prefix is
    # the site's), the embedded IPv4 for tunnels and translation (the IPv6
    # address would locate the relay, not the client), None when neither
    # means anything.
    geo_address: str | None = None

    @property
    def native(self) -> bool:
        return self.cls == NATIVE


def _isatap_ipv4(address: IPv6Address) -> IPv4Address | None:
    value = int(address)
    if (value >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        return IPv4Address(value & 0xFFFFFFFF)
    return None


def classify(text: str) -> Classified:
    """Classify one address as stored (IPv4-mapped IPv6 counts as IPv4).

    Raises ``ValueError`` for text that is not an IP address, and for IPv4
    addresses, which have no IPv6 class.
    """
    canonical = canonical_address(text)
    address = ipaddress.ip_address(canonical)
    if not isinstance(address, IPv6Address):
        raise ValueError(f"{text} is an IPv4 address")
    cls = next(
        (found for network, found in _PREFIX_CLASSES if address in network),
        NATIVE if address in GLOBAL_UNICAST else SPECIAL,
    )
    if cls == TEREDO:
        teredo = decode_teredo(address)
        client = str(teredo.client)
        return Classified(canonical, cls, client, teredo, geo_address=client)
    if cls == SIX_TO_FOUR:
        embedded = str(address.sixtofour)
        return Classified(canonical, cls, embedded, geo_address=embedded)
    if cls == NAT64:
        # Only the well-known /96 says where the IPv4 address sits; a
        # local-use prefix may embed it at any RFC 6052 length.
        if address in NAT64_WELL_KNOWN:
            embedded = str(IPv4Address(int(address) & 0xFFFFFFFF))
            return Classified(canonical, cls, embedded, geo_address=embedded)
        return Classified(canonical, cls)
    if cls == NATIVE:
        isatap = _isatap_ipv4(address)
        if isatap is not None:
            return Classified(canonical, ISATAP, str(isatap), geo_address=canonical)
        return Classified(canonical, cls, geo_address=canonical)
    return Classified(canonical, cls)


# test-ipv6.com's 6rd hint: a 6rd prefix embeds (the trailing bits of) the
# customer's IPv4 address after the provider's prefix. Bits 32-63 of the
# IPv6 address holding at least this many trailing bits of the IPv4 address
# of the same session suggest 6rd (RFC 5969) rather than native IPv6.
SIXRD_MIN_BITS = 16


def sixrd_bits(ipv4: str, ipv6: str) -> int:
    """How many trailing bits of ``ipv4`` appear in bits 32-63 of ``ipv6``.

    The longest run found, from all 32 down to :data:`SIXRD_MIN_BITS`, at
    any bit offset in that 32-bit word; 0 when not even that many match
    (about a 1 in 4,000 chance for unrelated addresses).
    """
    v4 = int(IPv4Address(canonical_address(ipv4)))
    word = (int(IPv6Address(canonical_address(ipv6))) >> 64) & 0xFFFFFFFF
    for bits in range(32, SIXRD_MIN_BITS - 1, -1):
        mask = (1 << bits) - 1
        suffix = v4 & mask
        if any((word >> shift) & mask == suffix for shift in range(33 - bits)):
            return bits
    return 0
