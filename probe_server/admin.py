"""The admin listener: metrics (Prometheus text format) and health, loopback only.

It is a separate application on its own socket, which the config only lets
bind to a loopback address; the public sites have no such routes at all.
Scrape it from the VPS itself (a local Prometheus or node-exporter's
textfile collector, ``curl``), or through an SSH tunnel.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from .config import AdminConfig
from .metrics import Metrics

Health = Callable[[], tuple[bool, str]]


def create_admin_app(config: AdminConfig, metrics: Metrics, health: Health) -> web.Application:
    """``metrics_path``: every metric; ``health_path``: 200 "ok" or 503 and why."""

    async def healthz(request: web.Request) -> web.Response:
        ok, reason = health()
        response = web.Response(status=200 if ok else 503, text=f"{reason}\n")
        response.headers["Cache-Control"] = "no-store"
        return response

    app = web.Application()
    app.router.add_get(config.metrics_path, make_aiohttp_handler(metrics.registry))
    app.router.add_get(config.health_path, healthz)
    return app
