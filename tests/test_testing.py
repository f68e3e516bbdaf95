"""The helpers the tests share (probe_server/testing.py): what they do when
something a test needs is missing, in CI and on a developer's machine."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from probe_server.testing import require_open_files


def beyond_the_kernel() -> int:
    """More open files than any process may have (fs.nr_open)."""
    return int(Path("/proc/sys/fs/nr_open").read_text()) + 1


def test_open_files_out_of_reach_fail_in_ci(monkeypatch):
    # As require_tool: CI can never pass by skipping the slow-client tests.
    monkeypatch.setenv("PROBE_SERVER_CI", "1")
    with pytest.raises(pytest.fail.Exception, match=r"needs \d+ open files"):
        require_open_files(beyond_the_kernel())


def test_open_files_out_of_reach_skip_elsewhere(monkeypatch):
    monkeypatch.delenv("PROBE_SERVER_CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"needs \d+ open files"):
        require_open_files(beyond_the_kernel())


def test_open_files_within_the_hard_limit_raise_the_soft_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    assert require_open_files(wanted) >= wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= wanted
