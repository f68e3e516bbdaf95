"""Configuration: the documented example, defaults, and one-line errors."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from probe_server.cli import main
from probe_server.config import Config, ConfigError, check_paths, demo_config, load_config
from probe_server.testing import require_tool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "probe-server.example.toml"


def test_example_file_documents_the_defaults():
    example = load_config(EXAMPLE)
    assert example.model_dump(exclude={"source"}) == demo_config().model_dump(exclude={"source"})


def test_the_demo_is_loopback_with_the_example_zones():
    """`make run` with no file: the sites, database and DNS the README's lines use."""
    config = demo_config()
    assert (config.sites.ipv4.listen, config.sites.ipv6.listen) == ("127.0.0.1:8080", "[::1]:8080")
    # No base URL: each comes from its socket (http://127.0.0.1:8080, http://[::1]:8080).
    assert (config.sites.ipv4.base_url, config.sites.ipv6.base_url) == (None, None)
    assert config.database.path == Path("probe.db")
    assert config.dns.enabled
    assert config.dns.rrl.enabled  # response-rate limiting is on unless turned off
    assert (config.dns.listen_ipv4, config.dns.listen_ipv6) == ("127.0.0.1:5353", "[::1]:5353")
    # Relative to the working directory, which make run's is: the repository.
    assert [ROOT / zone for zone in config.dns.zones] == [
        ROOT / "dns" / "example.org.zone",
        ROOT / "dns" / "v6ns.example.org.zone",
    ]
    assert all((ROOT / zone).is_file() for zone in config.dns.zones)


def _model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        args = get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _model_keys(annotation, f"{prefix}{name}.")
        elif (
            get_origin(annotation) is tuple
            and args
            and isinstance(args[0], type)
            and issubclass(args[0], BaseModel)
        ):
            # An array of tables, e.g. [[speedtest.tests]]: its keys.
            keys |= _model_keys(args[0], f"{prefix}{name}.")
        elif name != "source":
            keys.add(f"{prefix}{name}")
    return keys


def test_every_key_is_in_the_example_with_a_comment():
    documented = set()
    section = ""
    previous = ""
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped.strip("[]") + "."
        elif re.match(r"#? ?[a-z_0-9]+ = ", stripped):
            documented.add(section + stripped.lstrip("# ").split(" =")[0])
            if not stripped.startswith("#"):
                # Keys of a repeated [[table]] are explained at its first one.
                assert previous.startswith(("#", "[[")) or re.match(r"[a-z_0-9]+ = ", previous), (
                    line
                )
        previous = stripped
    assert documented == _model_keys(Config)


def test_relative_paths_follow_the_config_file(tmp_path):
    path = tmp_path / "sub" / "c.toml"
    path.parent.mkdir()
    path.write_text('[database]\npath = "data/probe.db"\n')
    config = load_config(path)
    assert config.resolve(config.database.path) == path.parent.resolve() / "data" / "probe.db"
    assert demo_config().resolve(Path("probe.db")) == Path("probe.db")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[sites.ipv4]\nlisten = "::1:80"\n', "sites.ipv4.listen: IPv6 addresses need brackets"),
        ('[sites.ipv4]\nlisten = "[::1]:80"\n', "sites.ipv4: listen: the IPv4 site needs an IPv4"),
        (
            '[sites.ipv6]\nlisten = "127.0.0.1:80"\n',
            "sites.ipv6: listen: the IPv6 site needs an IPv6",
        ),
        (
            '[sites.ipv4]\nlisten = "example.org:80"\n',
            "sites.ipv4.listen: 'example.org' is not an IP",
        ),
        ('[sites.ipv4]\nlisten = "127.0.0.1:99999"\n', "sites.ipv4.listen: port must be 0-65535"),
        ('[sites.ipv4]\nlisten = "127.0.0.1:80"\nbase_url = "ftp://x"\n', "sites.ipv4.base_url"),
        (
            '[sites.ipv4]\nlisten = "127.0.0.1:80"\ntls_cert = "c.pem"\n',
            "tls_cert and tls_key go together",
        ),
        (
            '[database]\nsynchronous = "sometimes"\n',
            "database.synchronous: Input should be 'full' or",
        ),
        ("[database]\nqueue_limit = 5\n", "database.queue_limit: Input should be greater than"),
        ("[survey]\nmin_balls = 5\n", "survey: min_balls must not exceed max_balls"),
        ('[survey]\ncolour = "red"\n', "survey.colour: unknown key"),
        ("[srvey]\n", "srvey: unknown key"),
        ("source = 'x'\n", "source: unknown key"),
        (
            "[server]\ncommit_timeout = 'soon'\n",
            "server.commit_timeout: Input should be a valid number",
        ),
        ("[server\n", "not valid TOML"),
        ('[dns]\nlisten_ipv4 = "[::1]:53"\n', "dns.listen_ipv4: needs an IPv4 address"),
        ('[dns]\nlisten_ipv6 = "127.0.0.1:53"\n', "dns.listen_ipv6: needs an IPv6 address"),
        ("[dns]\nzones = []\n", "dns: zones: name at least one zone file"),
        ("[dns.rrl]\nslip = -1\n", "dns.rrl.slip: Input should be greater than"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("site", ["ipv4", "ipv6"])
def test_a_site_table_without_listen_keeps_that_sites_default(tmp_path, site):
    """The example says every key has a default: listen too, each site its own."""
    path = tmp_path / "c.toml"
    path.write_text(f'[sites.{site}]\nbase_url = "https://{site}.example.org"\n')
    config = load_config(path)
    assert config.sites.ipv4.listen == "127.0.0.1:8080"
    assert config.sites.ipv6.listen == "[::1]:8080"
    assert getattr(config.sites, site).base_url == f"https://{site}.example.org"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_bad_config_exits_2_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text('[database]\npath = "x.db"\n[survey]\nmax_balls = 0\n')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "survey.max_balls" in err[0]
    assert list(tmp_path.iterdir()) == [path]  # no database, no secret


ZONE_DIR = ROOT / "dns"
ZONES = ("example.org.zone", "v6ns.example.org.zone")


def _serving_config(tmp_path: Path, **sections: str) -> Path:
    """A config whose every file is in place; ``sections`` replace whole tables."""
    (tmp_path / "cert.pem").write_text("not read before start\n")
    (tmp_path / "key.pem").write_text("not read before start\n")
    tables = {
        "server": 'secret_file = "probe.secret"',
        "database": 'path = "probe.db"',
        "sites.ipv4": 'listen = "127.0.0.1:0"\ntls_cert = "cert.pem"\ntls_key = "key.pem"',
        "sites.ipv6": 'listen = "[::1]:0"',
        "dns": f"zones = [{', '.join(repr(str(ZONE_DIR / z)) for z in ZONES)}]",
        **sections,
    }
    path = tmp_path / "probe.toml"
    path.write_text("".join(f"[{name}]\n{body}\n" for name, body in tables.items()))
    return path


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"dns": f"zones = [{str(ZONE_DIR / ZONES[0])!r}, 'missing.zone']"},
            "dns.zones: {dir}/missing.zone: no such file",
        ),
        ({"dns": "zones = ['.']"}, "dns.zones: {dir}: not a regular file"),
        (
            {"sites.ipv6": 'listen = "[::1]:0"\ntls_cert = "no.pem"\ntls_key = "key.pem"'},
            "sites.ipv6.tls_cert: {dir}/no.pem: no such file",
        ),
        (
            {"sites.ipv4": 'listen = "127.0.0.1:0"\ntls_cert = "cert.pem"\ntls_key = "k/no.pem"'},
            "sites.ipv4.tls_key: {dir}/k/no.pem: no such file",
        ),
        (
            {"server": 'secret_file = "keys/probe.secret"'},
            "server.secret_file: {dir}/keys/probe.secret: directory {dir}/keys does not exist",
        ),
        (
            {"database": 'path = "data/probe.db"'},
            "database.path: {dir}/data/probe.db: directory {dir}/data does not exist",
        ),
    ],
)
def test_missing_files_are_a_bad_config_exit_2_before_anything_starts(
    tmp_path, capsys, sections, expected
):
    path = _serving_config(tmp_path, **sections)
    before = set(tmp_path.iterdir())
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    directory = str(tmp_path.resolve())
    assert err == [
        f"probe-server: config error: {path.resolve()}: {expected.format(dir=directory)}"
    ]
    assert set(tmp_path.iterdir()) == before  # no database, no secret


def test_every_file_in_place_passes_the_check(tmp_path):
    config = load_config(_serving_config(tmp_path))
    check_paths(config)  # raises nothing
    # The secret and the database may exist already: read (and written) in place.
    (tmp_path / "probe.secret").write_text("00" * 32 + "\n")
    (tmp_path / "probe.db").write_bytes(b"")
    check_paths(config)


async def test_an_unwritable_secret_directory_is_a_bad_config(tmp_path):
    """The real process, without the power to ignore permissions even as root."""
    keys = tmp_path / "keys"
    keys.mkdir()
    path = _serving_config(tmp_path, server='secret_file = "keys/probe.secret"')
    keys.chmod(0o500)
    prefix: list[str] = []
    if os.geteuid() == 0:
        # Root ignores file modes through these two capabilities: drop them.
        setpriv = require_tool("setpriv")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            "-m",
            "probe_server",
            "serve",
            "--config",
            str(path),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        keys.chmod(0o700)
    assert proc.returncode == 2, err
    assert err.decode().splitlines() == [
        f"probe-server: config error: {path.resolve()}: server.secret_file:"
        f" {keys.resolve()}/probe.secret: directory {keys.resolve()} is not writable"
    ]
    assert out == b""
    assert list(keys.iterdir()) == [] and not (tmp_path / "probe.db").exists()
