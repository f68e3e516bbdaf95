"""Session tokens: unguessable, verifiable without a database read.

A token is 10 random bytes followed by the first 10 bytes of
HMAC-SHA256(secret, id), written as 32 characters of lower-case base32.
Lower case and no padding keep it usable in a URL path and a form.

A token is a bearer credential (``/submit`` and ``/beacon`` accept it), so it
never goes into a host name: DNS queries cross every resolver on the way and
TLS sends the host name in clear (SNI). Per-session host names carry a
*label* instead (:func:`session_label`), derived from the token with a keyed
hash: it identifies the session in our DNS log and nothing accepts it.
"""

from __future__ import annotations

import base64
import functools
import hmac
import os
import secrets
from hashlib import sha256
from pathlib import Path

TOKEN_LENGTH = 32
_ID_BYTES = 10
_MAC_BYTES = 10
_DOMAIN = b"probe-server session v1\x00"
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
# 15 bytes of HMAC-SHA256: 24 base32 characters (no padding), 120 bits, so
# a million sessions collide with probability below 10^-24. Shorter than a
# token, so no label even has a token's shape.
LABEL_LENGTH = 24
_LABEL_BYTES = 15
_LABEL_DOMAIN = b"probe-server label v1\x00"


def _mac(secret: bytes, ident: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN + ident, sha256).digest()[:_MAC_BYTES]


def new_token(secret: bytes) -> str:
    ident = secrets.token_bytes(_ID_BYTES)
    return base64.b32encode(ident + _mac(secret, ident)).decode("ascii").lower()


def verify_token(secret: bytes, token: str) -> bool:
    """True when ``token`` was made by :func:`new_token` with ``secret``."""
    if len(token) != TOKEN_LENGTH or not _ALPHABET.issuperset(token):
        return False
    raw = base64.b32decode(token.upper())
    return hmac.compare_digest(raw[_ID_BYTES:], _mac(secret, raw[:_ID_BYTES]))


def session_label(secret: bytes, token: str) -> str:
    """The DNS label of a session's host names: HMAC(secret, "label" || token).

    Lower-case base32, so it is a valid host name label whatever letter case
    a resolver asks in (0x20 randomisation; labels compare case-insensitively).
    Knowing a label tells nothing about the token, and the token cannot be
    recovered from it: a resolver that sees it can only ask for it again.
    """
    mac = hmac.new(secret, _LABEL_DOMAIN + token.encode("ascii"), sha256).digest()
    return base64.b32encode(mac[:_LABEL_BYTES]).decode("ascii").lower()


class TokenVerifier:
    """:func:`verify_token` with a memory of recent answers.

    A page's balls all carry the same token, so most probe fetches repeat a
    verification just done; the cache is bounded, so a flood of forged
    tokens only evicts entries.
    """

    def __init__(self, secret: bytes, cache_size: int = 65536) -> None:
        self.secret = secret
        self._cached = functools.lru_cache(maxsize=cache_size)(self._verify)

    def _verify(self, token: str) -> bool:
        return verify_token(self.secret, token)

    def __call__(self, token: str) -> bool:
        return bool(self._cached(token))


def looks_like_token(token: str) -> bool:
    """Shape check only (no secret): worth storing as a claimed token."""
    return len(token) == TOKEN_LENGTH and _ALPHABET.issuperset(token)


def _create_whole(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) holding ``data``, or nothing at all.

    Written to a temporary file first and linked into place once complete:
    a failed write (a full disk) must not leave an empty secret behind, which
    would stop every later start. link() fails if the file has appeared
    meanwhile, as O_EXCL would.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class SecretError(Exception):
    """The signing key cannot be read or created; one line naming its file."""


def load_or_create_secret(path: Path) -> bytes:
    """Read the signing key, creating it (mode 0600) on first run."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = secrets.token_hex(32)
        try:
            _create_whole(path, (text + "\n").encode("ascii"))
        except OSError as e:
            # The error may name the temporary file: say which file we wanted.
            raise SecretError(f"{path}: cannot create: {e.strerror or e}") from None
        return bytes.fromhex(text)
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{path}: expected hex digits") from None
    if len(secret) < 16:
        raise SecretError(f"{path}: the secret must be at least 16 bytes (32 hex digits)")
    return secret
