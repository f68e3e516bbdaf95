"""kill -9 at random moments under mixed DNS and HTTP load, round after round
on the same database: every acknowledged probe, session and answer is
stored, the database passes integrity_check, and the server starts again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import signal
import sqlite3
import struct

from probe_server.testing import ServerProcess, health_check

from ..dns_client import wire_query
from .conftest import Report, scale, server_config
from .load import Closed, RawHttp, numbers_in

TOKEN = re.compile(rb'name="token" value="([a-z2-7]{32})"')
BLUE = re.compile(rb'<img src="http://\[::1\]:\d+(/blue/[^"]+)"')
RED = re.compile(rb'<img src="http://127\.0\.0\.1:\d+(/red/[^"]+)"')


class Acks:
    """What the server acknowledged (answered 200) in one round."""

    def __init__(self) -> None:
        self.pages: set[str] = set()  # batch labels of survey pages
        self.answers: set[str] = set()  # tokens of answers
        self.probes: set[int] = set()  # n of ball fetches
        self.count = 0
        self.dns = 0
        # Unique across rounds: the database keeps every round's rows.
        self.numbers = itertools.count(next(Acks._rounds) * 100_000_000)

    _rounds = itertools.count(1)


async def visitor(server: ServerProcess, label: str, acks: Acks, stop: asyncio.Event) -> None:
    """A worker's visit, again and again: the page, its balls, the answer."""
    n = 0
    ipv4 = ipv6 = None
    try:
        ipv4 = await RawHttp.open(server.endpoints["http_ipv4"])
        ipv6 = await RawHttp.open(server.endpoints["http_ipv6"])
        while not stop.is_set():
            n += 1
            batch = f"{label}x{n}"
            status, page = await ipv4.request(f"/?batch={batch}")
            if status != 200:
                continue
            acks.pages.add(batch)
            acks.count += 1
            token = TOKEN.search(page).group(1).decode()  # type: ignore[union-attr]
            for pattern, connection in ((RED, ipv4), (BLUE, ipv6)):
                for match in pattern.finditer(page):
                    number = next(acks.numbers)
                    path = match.group(1).decode().replace("&amp;", "&") + f"&n={number}"
                    status, _ = await connection.request(path)
                    if status == 200:
                        acks.probes.add(number)
                        acks.count += 1
            body = f"token={token}&red=1&blue=1".encode()
            status, _ = await ipv4.request(
                "/submit",
                method="POST",
                body=body,
                headers="Content-Type: application/x-www-form-urlencoded\r\n",
            )
            if status == 200:
                acks.answers.add(token)
                acks.count += 1
    except (OSError, Closed, asyncio.IncompleteReadError, ValueError, AttributeError):
        return  # the server was killed
    finally:
        for connection in (ipv4, ipv6):
            if connection is not None:
                connection.close()


async def resolver(server: ServerProcess, acks: Acks, stop: asyncio.Event) -> None:
    """DNS queries over UDP and TCP, as fast as they are answered."""
    host, _, port = server.endpoints["dns_tcp_ipv4"].rpartition(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(host, int(port))
        )
        i = 0
        while not stop.is_set():
            i += 1
            message = wire_query(f"q{i}.ds.example.org", "AAAA", ident=i & 0xFFFF)
            udp.sendto(message)
            writer.write(struct.pack("!H", len(message)) + message)
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            await reader.readexactly(length)
            acks.dns += 1
    except (OSError, asyncio.IncompleteReadError):
        return
    finally:
        with contextlib.suppress(NameError):
            writer.close()
            udp.close()


async def test_kill_9_at_random_moments_under_mixed_load(tmp_path, processes, report: Report):
    rng = random.Random(8)
    rounds = scale(4, 20)
    config = server_config(tmp_path)
    totals = {"pages": 0, "answers": 0, "probes": 0, "dns": 0}
    kill_points = []
    for round_number in range(rounds):
        server = ServerProcess(config, tmp_path)
        processes.append(server)
        await server.start()  # on the database the last kill left
        assert (await health_check(server.endpoints))[0]
        acks = Acks()
        stop = asyncio.Event()
        kill_after = rng.randint(20, scale(400, 1500))
        kill_points.append(kill_after)
        tasks = [
            asyncio.create_task(visitor(server, f"r{round_number}v{v}", acks, stop))
            for v in range(16)
        ] + [asyncio.create_task(resolver(server, acks, stop)) for _ in range(2)]
        async with asyncio.timeout(120):
            while acks.count < kill_after:
                await asyncio.sleep(0.001)  # polling the count: the kill moment
        server.kill(signal.SIGKILL)
        assert await server.wait() == -signal.SIGKILL
        stop.set()
        await asyncio.gather(*tasks)

        with sqlite3.connect(tmp_path / "probe.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            batches = {b for (b,) in conn.execute("SELECT batch FROM sessions")}
            answered = {t for (t,) in conn.execute("SELECT session_token FROM answers")}
            paths = [p for (p,) in conn.execute("SELECT path FROM requests WHERE kind != 'survey'")]
        stored = numbers_in(paths)
        assert acks.pages <= batches, f"round {round_number}: pages lost"
        assert acks.answers <= answered, f"round {round_number}: answers lost"
        assert acks.probes <= stored, f"round {round_number}: probes lost"
        for key in ("pages", "answers", "probes"):
            totals[key] += len(getattr(acks, key))
        totals["dns"] += acks.dns

    final = ServerProcess(config, tmp_path)
    processes.append(final)
    await final.start()
    assert (await health_check(final.endpoints))[0]
    final.kill(signal.SIGTERM)
    assert await final.wait() == 0
    report(
        "kill -9 under mixed load",
        "16 simulated workers (survey page, red and blue balls, answer) and 2 resolvers"
        " (UDP + TCP) against the real process; SIGKILL after a random number of"
        " acknowledged requests; restart on the same database; repeated",
        f"{rounds} rounds, kill after {min(kill_points)}-{max(kill_points)} acks;"
        f" {totals['pages']} pages, {totals['probes']} probes, {totals['answers']} answers"
        f" acknowledged, {totals['dns']} DNS queries answered",
        "every acknowledged page (session), probe and answer found after each kill;"
        " integrity_check ok every round; every restart clean",
        "nothing",
    )
