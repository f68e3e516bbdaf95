"""Typed application keys, in one place."""

from __future__ import annotations

import aiosqlite
import jinja2
from aiohttp import web

from .config import Config
from .dnsserver import DnsServer
from .store import Writer
from .tokens import TokenVerifier

config_key = web.AppKey("config", Config)
secret_key = web.AppKey("secret", bytes)
verifier_key = web.AppKey("verifier", TokenVerifier)
writer_key = web.AppKey("writer", Writer)
reader_key = web.AppKey("reader", aiosqlite.Connection)
templates_key = web.AppKey("templates", jinja2.Environment)
# The base URL of each site ("ipv4", "ipv6") once its socket is bound.
base_urls_key = web.AppKey("base_urls", dict[str, str])
# The DNS listeners, when DNS is enabled.
dns_key = web.AppKey("dns", DnsServer)
# Origins accepted as turkSubmitTo: MTurk's worker sites and any rehearsal sites.
worker_sites_key = web.AppKey("worker_sites", tuple[str, ...])
# The Content-Security-Policy of every page (framing and form targets).
csp_key = web.AppKey("csp", str)
