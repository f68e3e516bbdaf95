"""ACME challenges (RFC 8555) for the sites' certificates, from our own sockets.

HTTP-01: ``certbot certonly --webroot -w DIR`` writes a file named after the
challenge token to ``DIR/.well-known/acme-challenge/``; both sites answer
``GET /.well-known/acme-challenge/<token>`` with it. Only token-shaped names
(base64url, RFC 8555 §8.1) are looked at, so no path can leave the
directory, and there is no listing.

DNS-01: the only way to a wildcard certificate (per-session names such as
``<token>.v6.example.org``). We are the zone's authoritative server, so a
certbot hook writes the ``_acme-challenge`` TXT records to a file in master
file syntax and sends SIGHUP; the records are served with the zone from then
on. Nothing else may be put in that file.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zonefile

from .zone import ZoneError

# RFC 8555 §8.1: a token is base64url without padding; Let's Encrypt's are 43.
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
# A key authorization is "<token>.<thumbprint>"; certbot's files are that long.
MAX_CHALLENGE_SIZE = 1024
CHALLENGE_LABEL = b"_acme-challenge"
CHALLENGE_TTL = 60


def read_http_challenge(webroot: Path, token: str) -> bytes | None:
    """The key authorization certbot left for ``token``; None when there is none."""
    if not TOKEN.fullmatch(token):
        return None
    path = webroot / ".well-known" / "acme-challenge" / token
    try:
        # O_NOFOLLOW: a symlink planted in the directory is not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CHALLENGE_SIZE:
            return None
        return f.read(MAX_CHALLENGE_SIZE)


def read_dns_challenges(path: Path) -> list[dns.rrset.RRset]:
    """The ``_acme-challenge`` TXT records in ``path`` (none when it is absent).

    Lines are master-file records with absolute names, as the shipped hook
    writes them::

        _acme-challenge.v6.example.org. 60 IN TXT "gfj9Xq...Rg85nM"
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise ZoneError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        rrsets = dns.zonefile.read_rrsets(
            text,
            rdclass=None,
            default_ttl=CHALLENGE_TTL,
            origin=dns.name.root,
            relativize=False,
        )
    except (dns.exception.DNSException, ValueError) as e:
        raise ZoneError(f"{path}: {e}") from None
    merged: dict[dns.name.Name, dns.rrset.RRset] = {}
    for rrset in rrsets:
        first = rrset.name.labels[0].lower() if rrset.name.labels else b""
        if rrset.rdtype != dns.rdatatype.TXT or first != CHALLENGE_LABEL:
            raise ZoneError(
                f"{path}: {rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}:"
                " only _acme-challenge TXT records belong here"
            )
        if rrset.name in merged:
            merged[rrset.name].union_update(rrset)
        else:
            merged[rrset.name] = rrset
    return list(merged.values())
