"""Helpers for tests and benchmarks: the real ``probe-server`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class ServerProcess:
    """``python -m probe_server serve`` with systemd's readiness protocol.

    The test plays systemd: it listens on a NOTIFY_SOCKET and waits for
    READY=1, whose STATUS names the bound endpoints (the config uses port 0).
    With ``keep_notify``, the socket stays open and every later message
    (RELOADING=1, READY=1, WATCHDOG=1, STOPPING=1) can be awaited with
    :meth:`notification`.
    """

    def __init__(
        self,
        config_path: Path,
        workdir: Path,
        prefix: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        keep_notify: bool = False,
    ) -> None:
        self.config_path = config_path
        self.prefix = list(prefix)  # e.g. ["taskset", "-c", "0"]
        self.workdir = workdir
        self.env = env or {}
        self.keep_notify = keep_notify
        self.process: asyncio.subprocess.Process | None = None
        self.endpoints: dict[str, str] = {}
        self.stderr = b""
        self.timeout = 30.0  # seconds for start-up and for exit
        self._notify: socket.socket | None = None
        self._notify_path: Path | None = None

    async def start(self) -> None:
        notify_path = self._notify_path = self.workdir / f"notify-{os.getpid()}-{id(self)}.sock"
        notify = self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": str(notify_path)}
        self.process = await asyncio.create_subprocess_exec(
            *self.prefix,
            sys.executable,
            "-m",
            "probe_server",
            "serve",
            "--config",
            str(self.config_path),
            cwd=self.workdir,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            message = await self.notification(lambda m: "READY=1" in m)
        finally:
            if not self.keep_notify:
                self._close_notify()
        status = re.search(r"STATUS=listening (.*)", message)
        assert status, message
        self.endpoints = dict(part.split("=", 1) for part in status.group(1).split())

    async def notification(self, wanted: Callable[[str], bool]) -> str:
        """The next sd_notify message for which ``wanted`` is true."""
        assert self.process is not None and self._notify is not None
        loop = asyncio.get_running_loop()
        wait_exit = asyncio.ensure_future(self.process.wait())
        receive: asyncio.Future[bytes] | None = None
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    receive = asyncio.ensure_future(loop.sock_recv(self._notify, 4096))
                    done, _ = await asyncio.wait(
                        {receive, wait_exit}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if receive in done:
                        message = receive.result().decode()
                        if wanted(message):
                            return message
                        continue
                    err = await self.process.stderr.read() if self.process.stderr else b""
                    raise RuntimeError(f"server exited: {err.decode(errors='replace')}")
        finally:
            wait_exit.cancel()
            if receive is not None:
                receive.cancel()

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._notify_path is not None:
            self._notify_path.unlink(missing_ok=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def url(self, site: str, scheme: str = "http") -> str:
        return f"{scheme}://{self.endpoints[f'http_{site}']}"

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        async with asyncio.timeout(self.timeout):
            _, self.stderr = await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._close_notify()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a config as TOML (tables of scalars and lists of strings, enough for tests)."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            elif isinstance(value, list | tuple):
                lines.append(f"{key} = [{', '.join(json.dumps(str(v)) for v in value)}]")
            else:
                lines.append(f'{key} = "{value}"')
        for key, value in table.items():
            if isinstance(value, dict):
                emit(f"{prefix}.{key}" if prefix else key, value)

    emit("", data)
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # fail early on a helper bug
    return path


def require_tool(name: str) -> str:
    """The path of an external program a test needs.

    Missing on a developer's machine: the test is skipped with the reason.
    Missing in CI (``PROBE_SERVER_CI=1``, set by ``.ci/run``, which installs
    it): the test fails, so CI can never pass by skipping.
    """
    import shutil

    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("PROBE_SERVER_CI"):
        pytest.fail(f"{name} is required in CI; add its Debian package to .ci/run")
    pytest.skip(f"{name} is not installed")


def require_open_files(count: int) -> int:
    """Raise this process's open-file limit to at least ``count``; the new soft limit.

    The soft limit goes up to the hard one; as root the hard limit is raised
    too (up to the kernel's fs.nr_open). Still short on a developer's
    machine: the test is skipped with the reason. Still short in CI
    (``PROBE_SERVER_CI=1``): the test fails, as :func:`require_tool` does.
    """
    import resource

    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count and os.geteuid() == 0:
        # Over fs.nr_open it fails: then as without root, below.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY or soft >= count:
        return soft
    reason = f"the test needs {count} open files; the hard limit is {hard}"
    if os.environ.get("PROBE_SERVER_CI"):
        pytest.fail(f"{reason} (raise it for CI: ulimit -Hn, or run as root)")
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (for peers without port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


KNOT_CONFIG = """\
server:
    rundir: "{workdir}"
    listen: [ {listen} ]
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
{user}log:
  - target: stderr
    any: warning
database:
    storage: "{workdir}"
template:
  - id: default
    storage: "{workdir}"
    # Serve the files as they are: never write them back, no journal.
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: on
zone:
{zones}"""


class KnotProcess:
    """Knot DNS serving the same zone files, as a reference (tests, benchmark)."""

    def __init__(
        self, zone_files: Sequence[Path], workdir: Path, prefix: Sequence[str] = ()
    ) -> None:
        self.zone_files = list(zone_files)
        self.workdir = workdir
        self.prefix = list(prefix)
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def config(self) -> str:
        zones = ""
        for path in self.zone_files:
            match = re.search(r"^\$ORIGIN\s+(\S+)", path.read_text(), re.MULTILINE)
            assert match, f"{path}: no $ORIGIN"
            zones += f'  - domain: {match.group(1)}\n    file: "{path.resolve()}"\n'
        user = "    user: root:root\n" if os.geteuid() == 0 else ""
        return KNOT_CONFIG.format(
            workdir=self.workdir,
            listen=f"127.0.0.1@{self.port}, ::1@{self.port}",
            user=user,
            zones=zones,
        )

    async def start(self, knotd: str = "knotd") -> None:
        import dns.asyncquery
        import dns.exception
        import dns.message

        self.port = free_port()
        config = self.workdir / "knot.conf"
        config.write_text(self.config())
        self.process = await asyncio.create_subprocess_exec(
            *self.prefix,
            knotd,
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        # knotd loads zones after it starts listening: ready once every zone
        # answers its SOA. Polling is the only readiness signal it gives here.
        origins = [
            re.search(r"^\$ORIGIN\s+(\S+)", p.read_text(), re.MULTILINE) for p in self.zone_files
        ]
        async with asyncio.timeout(30):
            for origin in origins:
                assert origin is not None
                while True:
                    if self.process.returncode is not None:
                        err = await self.process.stderr.read() if self.process.stderr else b""
                        raise RuntimeError(f"knotd exited: {err.decode(errors='replace')}")
                    query = dns.message.make_query(origin.group(1), "SOA")
                    try:
                        reply = await dns.asyncquery.udp(
                            query, "127.0.0.1", port=self.port, timeout=0.5
                        )
                    except dns.exception.Timeout:
                        continue
                    if reply.answer:
                        break
                    await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.process.communicate()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


# The health check of the stress tests: a normal client's DNS query and
# survey page load, each answered within the deadline (a 503 with
# Retry-After is an answer: the server is shedding load, as it should). When
# the admin listener is enabled, its health endpoint must answer in time too
# (200, or 503 while commits fail); set HEALTH_PATH = None to skip it.
HEALTH_PATH: str | None = "/healthz"


async def health_check(
    endpoints: dict[str, str],
    deadline: float = 5.0,
    page: bool = True,
    tls: ssl.SSLContext | None = None,
) -> tuple[bool, str]:
    """(answered in time, what was seen). ``page=False``: the admin listener
    and DNS only, not the public web site (which may be shedding load).
    ``tls``: the site is HTTPS; the page is fetched with this client context."""
    import aiohttp
    import dns.asyncquery
    import dns.exception
    import dns.message

    seen = []
    try:
        async with asyncio.timeout(deadline), aiohttp.ClientSession() as http:
            if HEALTH_PATH is not None and "admin" in endpoints:
                async with http.get(f"http://{endpoints['admin']}{HEALTH_PATH}") as response:
                    seen.append(f"admin {response.status}")
                    if response.status not in (200, 503):
                        return False, ", ".join(seen)
            host, _, port = endpoints["dns_udp_ipv4"].rpartition(":")
            query = dns.message.make_query("survey.example.org", "A")
            reply = await dns.asyncquery.udp(query, host, port=int(port), timeout=deadline)
            if not reply.answer:
                return False, f"dns rcode {reply.rcode()} without an answer"
            seen.append("dns ok")
            if not page:
                return True, ", ".join(seen)
            # batch=health: the sessions health checks make are easy to leave out.
            url = f"{'https' if tls else 'http'}://{endpoints['http_ipv4']}/?batch=health"
            async with http.get(url, ssl=tls if tls is not None else True) as response:
                await response.read()
                seen.append(f"page {response.status}")
                return response.status in (200, 503), ", ".join(seen)
    except (TimeoutError, OSError, aiohttp.ClientError, dns.exception.DNSException) as e:
        return False, f"no answer: {e!r} after {', '.join(seen) or 'nothing'}"
