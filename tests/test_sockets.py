"""Each family on its own socket: the server's IPv6 sockets are IPv6-only.

Without IPV6_V6ONLY (Linux's default is net.ipv6.bindv6only = 0), an IPv6
socket on [::] also takes IPv4 clients as ::ffff:a.b.c.d, and the IPv6 site
would serve blue balls to IPv4-only clients. asyncio does not set it for
datagram sockets, so the server sets it on every socket it makes.

Linux sets the option by itself on a socket bound to one address such as
::1, so the test binds [::] (every address, as a deployment does) too, on
ephemeral ports; its only traffic is on loopback.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from probe_server.server import ProbeServer

from .conftest import MakeConfig


@pytest.mark.parametrize("address", ["::1", "::"])
async def test_ipv6_sockets_are_ipv6_only(make_config: MakeConfig, address: str):
    config = make_config(
        sites={"ipv6": {"listen": f"[{address}]:0"}}, dns={"listen_ipv6": f"[{address}]:0"}
    )
    server = ProbeServer(config)
    listeners = await server.start()
    try:
        ipv6 = {
            "http": listeners.http["ipv6"],
            "dns udp": listeners.dns["udp_ipv6"],
            "dns tcp": listeners.dns["tcp_ipv6"],
        }
        for role, sock in ipv6.items():
            assert sock.family == socket.AF_INET6, role
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1, role
        assert ipv6["dns udp"].type == socket.SOCK_DGRAM
        assert ipv6["dns tcp"].type == ipv6["http"].type == socket.SOCK_STREAM
        ipv4 = (listeners.http["ipv4"], listeners.dns["udp_ipv4"], listeners.dns["tcp_ipv4"])
        assert {sock.family for sock in ipv4} == {socket.AF_INET}
        port = ipv6["http"].getsockname()[1]
        # (Unless our own IPv4 site happens to have the same port number.)
        if address == "::" and port not in {sock.getsockname()[1] for sock in ipv4}:
            # An IPv4 client cannot reach the IPv6 site through a mapped address.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
    finally:
        await server.stop()
