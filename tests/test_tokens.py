"""Session tokens and the signing key file."""

from __future__ import annotations

import errno
import os

import pytest

from probe_server import tokens
from probe_server.tokens import SecretError, load_or_create_secret, new_token, verify_token


def test_secret_is_created_once_and_kept(tmp_path):
    path = tmp_path / "probe.secret"
    secret = load_or_create_secret(path)
    assert load_or_create_secret(path) == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert verify_token(secret, new_token(secret))
    assert [p.name for p in tmp_path.iterdir()] == ["probe.secret"]


def test_a_failed_write_leaves_no_secret_behind(tmp_path, monkeypatch):
    # A full disk at first start: the next start must not find an empty file.
    path = tmp_path / "probe.secret"

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tokens.os, "write", full)
    with pytest.raises(SecretError, match="No space left") as error:
        load_or_create_secret(path)
    assert str(error.value) == f"{path}: cannot create: No space left on device"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(load_or_create_secret(path)) == 32


def test_a_secret_that_cannot_be_created_is_named_as_configured(tmp_path):
    # It is created under a temporary name first: the error must not show that one.
    path = tmp_path / "no-such-directory" / "probe.secret"
    with pytest.raises(SecretError) as error:
        load_or_create_secret(path)
    assert str(error.value) == f"{path}: cannot create: No such file or directory"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not hex\n", "expected hex digits"),
        ("abcd\n", "at least 16 bytes"),
        ("\xff", "cannot read"),
    ],
)
def test_a_bad_secret_file_is_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "probe.secret"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(SecretError, match=problem) as error:
        load_or_create_secret(path)
    assert str(error.value).startswith(f"{path}: ")
