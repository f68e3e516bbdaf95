"""The experiment file: the documented example, and one-line errors naming the key."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from probe_server.cli import main
from probe_server.mturk.experiment import (
    Batch,
    Experiment,
    ExperimentError,
    load_experiment,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "experiment.example.toml"

GOOD = """\
name = "e"
title = "Count the balls"
description = "Count them."
external_url = "https://survey.example.org/"
"""
BATCH = """
[[batches]]
name = "{name}"
reward = "0.05"
assignments = 10
{extra}
"""


def write(tmp_path: Path, top: str = "", *batches: str) -> Path:
    path = tmp_path / "experiment.toml"
    body = GOOD + top + "".join(batches or (BATCH.format(name="b1", extra=""),))
    path.write_text(body)
    return path


def test_example_file_loads_and_documents_every_key():
    experiment = load_experiment(EXAMPLE)
    assert [b.name for b in experiment.batches] == ["us-005", "in-005", "jp-026"]
    assert experiment.batches[2].language == "ja" and experiment.kind == "balls"
    assert experiment.assignment_duration == timedelta(minutes=10)
    text = EXAMPLE.read_text()
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.MULTILINE))
    keys = (set(Experiment.model_fields) - {"source", "batches"}) | set(Batch.model_fields)
    assert keys <= documented, keys - documented
    # Every key is explained by the comment line just before it (or a sibling key).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[a-z_]+ = ", line) and i > 0:
            assert lines[i - 1].startswith("#") or re.match(r"[a-z_]+ = |\[\[", lines[i - 1])


def test_defaults_and_relative_database(tmp_path):
    experiment = load_experiment(write(tmp_path))
    assert experiment.actions_guarded == "Accept"
    assert experiment.lifetime == timedelta(days=1)
    assert experiment.resolve(experiment.database) == tmp_path.resolve() / "probe.db"


def test_iso_durations_and_loopback_http(tmp_path):
    path = write(
        tmp_path,
        'assignment_duration = "PT5M"\n',
    )
    assert load_experiment(path).assignment_duration == timedelta(minutes=5)
    text = path.read_text().replace("https://survey.example.org/", "http://127.0.0.1:8080/")
    path.write_text(text)
    assert load_experiment(path).external_url == "http://127.0.0.1:8080/"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://survey.probe.test/", True),  # the namespace lab's survey (RFC 6761)
        ("http://192.0.2.1/", True),  # a lab address (RFC 5737)
        ("http://survey.example.org/", False),
        ("http://survey.probe.test.example.org/", False),
        ("http://10.1.2.3/", False),
    ],
)
def test_plain_http_only_for_a_rehearsals_own_hosts(tmp_path, url, allowed):
    path = write(tmp_path)
    path.write_text(path.read_text().replace("https://survey.example.org/", url))
    if allowed:
        assert load_experiment(path).external_url == url
    else:
        with pytest.raises(ExperimentError, match="https://"):
            load_experiment(path)


@pytest.mark.parametrize(
    ("top", "batch", "expected"),
    [
        ("", 'name = "b"\nreward = 0.05\nassignments = 1', "batches.0.reward: Input should be"),
        ("", 'name = "b"\nreward = "0.051"\nassignments = 1', "batches.0.reward: write the"),
        ("", 'name = "b"\nreward = "0.00"\nassignments = 1', "at least 0.01"),
        ("", 'name = "b"\nreward = "5"\nassignments = 1', "batches.0.reward"),
        ("", 'name = "b"\nreward = "0.05"\nassignments = 0', "batches.0.assignments"),
        (
            "",
            'name = "b"\nreward = "0.05"\nassignments = 1\ncountries = ["USA"]',
            "batches.0.countries.0: 'USA' is not an ISO 3166",
        ),
        ("", 'name = "b c"\nreward = "0.05"\nassignments = 1', "batches.0.name"),
        ("", 'name = "b"\nreward = "0.05"\nassignments = 1\ncolour = 1', "colour: unknown key"),
        (
            "",
            'name = "b"\nreward = "0.05"\nassignments = 1\nmin_approval_rate = 101',
            "batches.0.min_approval_rate",
        ),
        ("lifetime = 5\n", None, "lifetime: must be between"),
        ('actions_guarded = "Discover"\n', None, "actions_guarded: Input should be"),
        ("frame_height = -1\n", None, "frame_height"),
    ],
)
def test_bad_files_name_the_key(tmp_path, top, batch, expected):
    batches = (f"\n[[batches]]\n{batch}\n",) if batch else ()
    path = write(tmp_path, top, *batches)
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    message = str(error.value)
    assert expected in message, message
    assert "\n" not in message


def test_external_url_must_be_https(tmp_path):
    path = write(tmp_path)
    path.write_text(path.read_text().replace("https://survey", "http://survey"))
    with pytest.raises(ExperimentError, match="external_url: MTurk needs an https"):
        load_experiment(path)


def test_batch_names_are_unique(tmp_path):
    path = write(tmp_path, "", BATCH.format(name="b", extra=""), BATCH.format(name="b", extra=""))
    with pytest.raises(ExperimentError, match="'b' is used twice"):
        load_experiment(path)


def test_too_many_requirements_are_refused(tmp_path):
    # Locale + approval rate + its own exclusion (when split) + 8 others > 10.
    extra = 'countries = ["US"]\nmin_approval_rate = 90\nexclude_other_batches = true'
    batches = [BATCH.format(name="b0", extra=extra)]
    batches += [BATCH.format(name=f"b{i}", extra="") for i in range(1, 9)]
    with pytest.raises(ExperimentError, match="'b0' would need 11 qualification requirements"):
        load_experiment(write(tmp_path, "", *batches))


def test_bad_experiment_exits_2(tmp_path, capsys):
    path = write(tmp_path, "lifetime = 1\n")
    assert main(["hits", "publish", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lifetime" in err[0]
    assert not (tmp_path / "probe.db").exists()
