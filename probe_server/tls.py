"""TLS for the two sites: certificates loaded at start and replaced on SIGHUP.

A listening socket keeps the SSLContext it was started with, so a renewed
certificate is served through that context's SNI callback instead: OpenSSL
calls it for every handshake, with or without a server name (IP literals),
and it hands the handshake to the newest context. Replacing the certificate
is building a new context and swapping one reference, so a bad new file
leaves the old certificate in service, and connections are never dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

log = logging.getLogger(__name__)


class TlsError(Exception):
    """A certificate or key that cannot be served; one line, never the key itself."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What ``check``, the logs and the metrics show of a site's certificate."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    self_signed: bool
    sha256: str

    def days_left(self, now: datetime | None = None) -> float:
        now = now or datetime.now(UTC)
        return (self.not_after - now).total_seconds() / 86400

    def covers(self, host: str) -> bool:
        """True when a browser would accept this certificate's names for ``host``."""
        host = host.strip("[]").rstrip(".").lower()
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return any(ipaddress.ip_address(ip) == address for ip in self.ip_addresses)
        for name in self.dns_names:
            name = name.rstrip(".").lower()
            if name == host:
                return True
            # RFC 6125 §6.4.3: "*." matches exactly one whole left-most label.
            if name.startswith("*.") and "." in host:
                label, rest = host.split(".", 1)
                if label and rest == name[2:]:
                    return True
        return False


def read_certificate(path: Path) -> CertificateInfo:
    """The first (leaf) certificate of a PEM chain file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TlsError(f"{path}: cannot read: {e.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{path}: not a PEM certificate") from None
    cert = certificates[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(names.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in names.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns_names,
        ip_addresses=ips,
        self_signed=cert.issuer == cert.subject,
        sha256=hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    )


def load_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for one certificate chain and its key (checked to match)."""
    for path in (cert, key):
        # OpenSSL's own errors don't say which file is missing.
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            reason = "no such file" if isinstance(e, FileNotFoundError) else e.strerror
            raise TlsError(f"{path}: {reason}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        # OpenSSL's reason ("KEY_VALUES_MISMATCH", "PEM lib"), never file contents.
        reason = e.reason or e.strerror or type(e).__name__
        raise TlsError(f"{cert} / {key}: {reason}") from None
    except OSError as e:
        raise TlsError(f"{cert} / {key}: {e.strerror or e}") from None
    return context


class SiteCertificate:
    """One site's certificate, replaceable while its socket keeps listening."""

    def __init__(self, site: str, cert: Path, key: Path) -> None:
        self.site = site
        self.cert = cert
        self.key = key
        self.current = load_context(cert, key)
        self.info = read_certificate(cert)
        # The context the socket listens with: it only ever hands each
        # handshake on to the current one.
        self.listening = load_context(cert, key)
        self.listening.sni_callback = self._select

    def _select(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        connection.context = self.current

    def reload(self) -> CertificateInfo:
        """Read the files again; on any error the old certificate stays in service."""
        context = load_context(self.cert, self.key)
        info = read_certificate(self.cert)
        self.current, self.info = context, info
        return info

    def describe(self) -> str:
        info = self.info
        return (
            f"site={self.site} not_after={info.not_after:%Y-%m-%dT%H:%M:%SZ}"
            f" sha256={info.sha256[:16]} names={','.join(info.dns_names + info.ip_addresses)}"
        )
