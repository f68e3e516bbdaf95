"""A bare aiohttp server returning the blue ball with no logging: the in-process ceiling."""

from __future__ import annotations

import socket
import sys

from aiohttp import web

from probe_server.images import BLUE_BALL


async def ball(request: web.Request) -> web.Response:
    response = web.Response(body=BLUE_BALL, content_type="image/png")
    response.headers["Cache-Control"] = "no-store"
    return response


def main() -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::1", int(sys.argv[1])))
    app = web.Application()
    app.router.add_get("/blue/{token}/{ball}.png", ball)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = None
    web.run_app(app, sock=sock, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
