"""The benchmark's peers: nginx and Apache with mod_php, each serving the blue ball.

Each runs from its own configuration under a temporary directory (the files in
``bench/peer-config/``), listens on ``[::1]`` only, is pinned to the server
core, and is stopped afterwards; no system service is touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from probe_server.images import BLUE_BALL

CONFIG = Path(__file__).resolve().parent / "peer-config"

# What each peer needs, by Debian package.
PACKAGES = {
    "nginx": ["nginx"],
    "apache": ["apache2", "libapache2-mod-php"],
    "wrk": ["wrk"],
    "dns": ["dnsperf", "knot"],
}


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until ``[::1]:port`` accepts a connection (neither peer has a readiness signal)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode}")
        try:
            with socket.create_connection(("::1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on [::1]:{port}") from None
            time.sleep(0.05)


def fill(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders only (both formats use braces of their own)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


class Peer:
    """A server process started from a config file, with the ball at ``path``."""

    name = ""
    path = ""

    def __init__(self, workdir: Path, prefix: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.prefix = list(prefix)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        www = workdir / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "blue.png").write_bytes(BLUE_BALL)

    @property
    def url(self) -> str:
        return f"http://[::1]:{self.port}{self.path}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*self.prefix, *self.command()],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / f"{self.name}.stderr", "wb"),  # noqa: SIM115
            # A process group of its own: Apache's prefork parent stops its
            # children by signalling its whole process group, which would
            # otherwise be the benchmark's (and make's).
            start_new_session=True,
        )
        wait_for_port(self.port, self.process)

    # The signal that stops the server gracefully.
    stop_signal = signal.SIGTERM

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logged(self) -> int:
        """Lines in the log that records each fetch."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The process and its children (workers), for CPU and memory readings."""
        assert self.process is not None
        import psutil

        root = psutil.Process(self.process.pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]


class Nginx(Peer):
    """nginx, one worker, the ball from disk, access log on."""

    name = "nginx"
    path = "/blue/x/1.png"

    def command(self) -> list[str]:
        config = self.workdir / "nginx.conf"
        text = (CONFIG / "nginx.conf").read_text()
        # As root, nginx's worker runs as this user (nginx refuses none).
        user = "www-data" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        config.write_text(fill(text, workdir=str(self.workdir), port=str(self.port), user=user))
        return [
            shutil.which("nginx") or "/usr/sbin/nginx",
            "-c",
            str(config),
            "-p",
            str(self.workdir),
        ]

    # nginx's graceful stop, which flushes the buffered access log.
    stop_signal = signal.SIGQUIT

    def logged(self) -> int:
        return _lines(self.workdir / "nginx-access.log")


def php_module() -> str | None:
    modules = sorted(Path("/usr/lib/apache2/modules").glob("libphp*.so"))
    return modules[-1].name if modules else None


class Apache(Peer):
    """Apache 2.4 (prefork) with mod_php running img.php, as in the seed paper."""

    name = "apache"
    path = "/img.php?192.0.2.1"

    def command(self) -> list[str]:
        module = php_module()
        if module is None:
            raise RuntimeError("mod_php is not installed (apt-get install libapache2-mod-php)")
        # Apache refuses to serve as root: the workers run as an unprivileged
        # user, which must be able to write img.php's log.
        user = "www-data" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        shutil.copy(CONFIG / "img.php", self.workdir / "www" / "img.php")
        (self.workdir / "img.log").touch()
        if os.geteuid() == 0:
            os.chmod(self.workdir, 0o755)
            shutil.chown(self.workdir / "img.log", user)
        config = self.workdir / "apache2.conf"
        text = (CONFIG / "apache2.conf").read_text()
        config.write_text(
            fill(
                text,
                workdir=str(self.workdir),
                port=str(self.port),
                php_module=module,
                user=user,
                group=user,
            )
        )
        binary = shutil.which("apache2") or "/usr/sbin/apache2"
        return [binary, "-f", str(config), "-DFOREGROUND"]

    def logged(self) -> int:
        return _lines(self.workdir / "img.log")


def _lines(path: Path) -> int:
    with open(path, "rb") as log:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))
