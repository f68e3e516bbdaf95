"""Attackers for the stress tests, run in a process of their own
(``python -m tests.stress.attack SPEC``) so that their event loop is not the
one the health checks run on. SPEC is JSON: the attacks to run and for how
long; the counters of what they saw are printed as JSON at the end."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from collections import Counter

from ..certs import client_hello


def split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


async def slowloris(endpoint: str, source: str | None, stop: asyncio.Event, seen: Counter) -> None:
    """Hold a connection with a request head that never ends; reconnect when closed."""
    host, port = split(endpoint)
    local = (source, 0) if source else None
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        except OSError:
            seen["connect failed"] += 1
            await asyncio.sleep(0.2)  # pacing only: an attacker retrying
            continue
        seen["opened"] += 1
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: stress\r\n")
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")  # one more header line a second
                    continue
                seen["answered 503" if data.startswith(b"HTTP/1.1 503") else "closed"] += 1
                break
        except ConnectionError:
            seen["reset"] += 1
        finally:
            writer.close()
        await asyncio.sleep(1.0)  # pacing: a dropped connection is made again a second later


async def hold(
    endpoint: str, source: str | None, stop: asyncio.Event, seen: Counter, first: bytes = b""
) -> None:
    """Hold a TCP connection open, having sent ``first`` (or nothing); reconnect when closed."""
    host, port = split(endpoint)
    local = (source, 0) if source else None
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        except OSError:
            seen["connect failed"] += 1
            await asyncio.sleep(0.2)
            continue
        seen["opened"] += 1
        try:
            writer.write(first)
            stopped = asyncio.ensure_future(stop.wait())
            eof = asyncio.ensure_future(reader.read(1))
            await asyncio.wait({stopped, eof}, return_when=asyncio.FIRST_COMPLETED)
            if eof.done():
                seen["closed"] += 1
            stopped.cancel()
            eof.cancel()
        except ConnectionError:
            seen["reset"] += 1
        finally:
            writer.close()
        await asyncio.sleep(1.0)  # pacing, as above


async def idle_dns(endpoint: str, source: str, stop: asyncio.Event, seen: Counter) -> None:
    """Hold a DNS TCP connection open without a query; reconnect when closed."""
    await hold(endpoint, source, stop, seen)


async def idle_tls(endpoint: str, source: str | None, stop: asyncio.Event, seen: Counter) -> None:
    """A TCP connection to an HTTPS port that never sends its ClientHello."""
    await hold(endpoint, source, stop, seen)


async def partial_hello(
    endpoint: str, source: str | None, stop: asyncio.Event, seen: Counter
) -> None:
    """A TLS handshake that stops half-way through its ClientHello."""
    hello = client_hello()
    await hold(endpoint, source, stop, seen, first=hello[: len(hello) // 2])


ATTACKS = {
    "slowloris": slowloris,
    "idle_dns": idle_dns,
    "idle_tls": idle_tls,
    "partial_hello": partial_hello,
}


async def main(spec: dict) -> dict[str, dict[str, int]]:
    stop = asyncio.Event()
    seen: dict[str, Counter[str]] = {name: Counter() for name in ATTACKS}
    tasks = [
        asyncio.create_task(ATTACKS[kind](endpoint, source, stop, seen[kind]))
        for kind, endpoint, source, count in spec["attacks"]
        for _ in range(count)
    ]
    await asyncio.sleep(spec["seconds"])
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {name: dict(counter) for name, counter in seen.items()}


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
