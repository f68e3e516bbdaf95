"""Typed application keys, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiosqlite
from aiohttp import web

from .config import Config
from .dnsserver import DnsServer
from .i18n import Pages
from .metrics import Metrics
from .store import Writer
from .tokens import TokenVerifier

config_key = web.AppKey("config", Config)
secret_key = web.AppKey("secret", bytes)
verifier_key = web.AppKey("verifier", TokenVerifier)
writer_key = web.AppKey("writer", Writer)
reader_key = web.AppKey("reader", aiosqlite.Connection)
# The survey pages in every shipped language.
templates_key = web.AppKey("templates", Pages)
# The base URL of each site ("ipv4", "ipv6") once its socket is bound.
base_urls_key = web.AppKey("base_urls", dict[str, str])
# The base URLs of the battery's probes: the sites' and the IPv6 literal's.
battery_bases_key = web.AppKey("battery_bases", dict[str, str])
# The DNS listeners, when DNS is enabled.
dns_key = web.AppKey("dns", DnsServer)
# Sites with TLS: on their plain-HTTP sockets, everything but ACME is redirected.
https_sites_key = web.AppKey("https_sites", frozenset[str])
# Counters for the admin listener's metrics.
metrics_key = web.AppKey("metrics", Metrics)
# Reloaded on SIGHUP after the certificates and zones: (name, hook) pairs that
# a resource's cleanup_ctx appends. A hook raises to say it kept its old state.
ReloadHook = Callable[[], Awaitable[None]]
reload_hooks_key = web.AppKey("reload_hooks", list[tuple[str, ReloadHook]])
# Origins accepted as turkSubmitTo: MTurk's worker sites and any rehearsal sites.
worker_sites_key = web.AppKey("worker_sites", tuple[str, ...])
# The Content-Security-Policy of every page (framing and form targets).
csp_key = web.AppKey("csp", str)
