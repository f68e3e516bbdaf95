"""The Makefile's bootstrap on a machine whose python3 cannot make a venv."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from probe_server.testing import require_tool

ROOT = Path(__file__).resolve().parent.parent


def test_a_failing_venv_step_prints_the_debian_hint(tmp_path):
    make = require_tool("make")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    # A python3 without the venv module, as Debian's is without python3-venv.
    python = tmp_path / "python3"
    python.write_text("#!/bin/sh\necho 'No module named venv' >&2\nexit 1\n")
    python.chmod(0o755)
    result = subprocess.run(
        [make, "venv", f"PYTHON={python}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    hints = [line for line in result.stderr.splitlines() if "python3-venv" in line]
    assert hints == [
        f"make: '{python} -m venv' failed; on Debian or Ubuntu, install python3-venv"
        " (apt-get install python3-venv)"
    ], result.stderr
    assert not (tmp_path / ".venv" / ".installed-stamp").exists()
