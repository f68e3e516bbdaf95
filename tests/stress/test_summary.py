"""The summary table of the stress run: every expected item has a row, and
an item whose test failed, was skipped or did not run says so."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

from .conftest import EXPECTED, ROOT, complete, summary

HERE = Path(__file__).parent


def reported_items() -> set[str]:
    """The item of every report(...) call in the stress tests."""
    items = set()
    for path in HERE.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "report"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                items.add(node.args[0].value)
    return items


def test_every_reported_item_is_expected_and_every_expected_test_exists():
    assert reported_items() == set(EXPECTED)
    for test in EXPECTED.values():
        module, function = test.split("::")
        assert hasattr(importlib.import_module(f"tests.stress.{module[:-3]}"), function), test


def row(item: str, test: str) -> dict[str, str]:
    return {
        "item": item,
        "what was done": "x",
        "how much": "1",
        "observed": "fine",
        "lost": "nothing",
        "test": f"tests/stress/{test}",
    }


EXAMPLE = {"a": "test_a.py::test_a", "b": "test_b.py::test_b", "c": "test_c.py::test_c"}


def test_an_item_without_its_row_says_why_in_the_order_of_the_items():
    outcomes = {
        "tests/stress/test_a.py::test_a": "passed",
        "tests/stress/test_b.py::test_b[1]": "skipped: dnsperf is not installed",
    }
    table = summary([row("a", "test_a.py::test_a")], outcomes, EXAMPLE)
    assert [(r["item"], r["result"]) for r in table] == [
        ("a", "ok"),
        ("b", "SKIPPED"),
        ("c", "NOT RUN"),
    ]
    assert "dnsperf is not installed" in table[1]["observed"]
    assert not complete(table, EXAMPLE)


def test_a_failed_test_fails_its_item_reported_or_not():
    outcomes = {
        "tests/stress/test_a.py::test_a": "failed: AssertionError: RSS grew 400 MiB",
        "tests/stress/test_b.py::test_b": "failed: TimeoutError",
        "tests/stress/test_c.py::test_c": "passed",
    }
    rows = [row("a", "test_a.py::test_a"), row("c", "test_c.py::test_c")]
    table = summary(rows, outcomes, EXAMPLE)
    assert [r["result"] for r in table] == ["FAILED", "FAILED", "ok"]
    assert "RSS grew" in table[0]["lost"] and "TimeoutError" in table[1]["observed"]
    assert not complete(table, EXAMPLE)


def test_a_test_that_passes_without_its_row_fails_the_item():
    table = summary([], {"tests/stress/test_a.py::test_a": "passed"}, {"a": "test_a.py::test_a"})
    assert table[0]["result"] == "FAILED" and "without reporting" in table[0]["observed"]


def test_complete_when_every_item_has_a_good_row():
    rows = [row(item, test) for item, test in EXAMPLE.items()]
    outcomes = {f"tests/stress/{test}": "passed" for test in EXAMPLE.values()}
    table = summary(rows, outcomes, EXAMPLE)
    assert complete(table, EXAMPLE) and [r["item"] for r in table] == ["a", "b", "c"]


def test_a_stress_run_with_items_missing_exits_non_zero(tmp_path):
    # One quick item passes; every other item is NOT RUN: make stress must fail.
    report = tmp_path / "stress-report.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/stress/test_hostile.py::test_open_redirects_never_reach_the_answer_page",
        ],
        cwd=ROOT,
        env={**os.environ, "PROBE_STRESS_REPORT": str(report)},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert "1 passed" in result.stdout, result.stdout
    assert result.returncode == 1, result.stdout
    text = report.read_text()
    assert "| hostile: turkSubmitTo open redirect" in text
    assert text.count("NOT RUN") == len(EXPECTED) - 1
