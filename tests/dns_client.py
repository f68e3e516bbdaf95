"""Test helpers: query a probe-server's DNS sockets with dnspython and raw bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import dns.asyncquery
import dns.message
import dns.rdatatype

from probe_server.server import ProbeServer

TIMEOUT = 5.0


def endpoint(server: ProbeServer, transport: str, family: str) -> tuple[str, int]:
    assert server.listeners is not None
    host, port = server.listeners.dns[f"{transport}_{family}"].getsockname()[:2]
    return host, port


async def query(
    server: ProbeServer,
    qname: str,
    qtype: str = "A",
    *,
    transport: str = "udp",
    family: str = "ipv4",
    **make_query: object,
) -> dns.message.Message:
    """One query through dnspython (an independent client), reply parsed."""
    host, port = endpoint(server, transport, family)
    message = dns.message.make_query(qname, dns.rdatatype.from_text(qtype), **make_query)  # type: ignore[arg-type]
    if transport == "udp":
        return await dns.asyncquery.udp(
            message, host, port=port, timeout=TIMEOUT, raise_on_truncation=False
        )
    return await dns.asyncquery.tcp(message, host, port=port, timeout=TIMEOUT)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.replies.put_nowait(data)


class RawUdp:
    """A UDP socket sending arbitrary bytes; replies come back in order."""

    def __init__(self, transport: asyncio.DatagramTransport, receiver: _Receiver) -> None:
        self.transport = transport
        self.receiver = receiver

    @classmethod
    async def open(cls, server: ProbeServer, family: str = "ipv4") -> RawUdp:
        host, port = endpoint(server, "udp", family)
        loop = asyncio.get_running_loop()
        transport, receiver = await loop.create_datagram_endpoint(
            _Receiver,
            remote_addr=(host, port),
            family=socket.AF_INET6 if family == "ipv6" else socket.AF_INET,
        )
        return cls(transport, receiver)

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    async def receive(self) -> bytes:
        return await asyncio.wait_for(self.receiver.replies.get(), TIMEOUT)

    async def exchange(self, data: bytes) -> bytes:
        self.send(data)
        return await self.receive()

    def close(self) -> None:
        self.transport.close()


class RawTcp:
    """A TCP connection carrying length-prefixed messages (RFC 1035 §4.2.2)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: ProbeServer, family: str = "ipv4") -> RawTcp:
        host, port = endpoint(server, "tcp", family)
        return cls(*await asyncio.open_connection(host, port))

    def send(self, data: bytes) -> None:
        self.writer.write(struct.pack("!H", len(data)) + data)

    async def receive(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            return await self.reader.readexactly(length)

    async def exchange(self, data: bytes) -> bytes:
        self.send(data)
        return await self.receive()

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (EOF)."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def wire_query(qname: str, qtype: str = "A", *, ident: int = 0x1234, **make_query: object) -> bytes:
    message = dns.message.make_query(qname, dns.rdatatype.from_text(qtype), **make_query)  # type: ignore[arg-type]
    message.id = ident
    return message.to_wire()
