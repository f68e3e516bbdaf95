"""MTurk's fee: 20%, 40% from 10 assignments per HIT, at least a cent."""

from __future__ import annotations

from decimal import Decimal

import pytest

from probe_server.mturk.fees import (
    fee_per_assignment,
    fee_rate,
    hit_cost,
    hits_cost,
    split_sizes,
)

D = Decimal


def test_fee_rate_changes_at_ten_assignments():
    assert fee_rate(1) == fee_rate(9) == D("0.20")
    assert fee_rate(10) == fee_rate(300) == D("0.40")


@pytest.mark.parametrize(
    ("reward", "nine", "ten"),
    [
        # 9 x (reward + 20%) and 10 x (reward + 40%), fee per assignment
        # rounded half up to the cent and at least one cent.
        ("0.05", "0.54", "0.70"),  # fee 0.01 / 0.02
        ("0.10", "1.08", "1.40"),  # fee 0.02 / 0.04
        ("0.26", "2.79", "3.60"),  # fee 0.052 -> 0.05 / 0.104 -> 0.10
        ("0.40", "4.32", "5.60"),  # fee 0.08 / 0.16
        ("0.01", "0.18", "0.20"),  # fee 0.002 -> the 0.01 minimum
    ],
)
def test_cost_at_nine_and_ten_assignments(reward, nine, ten):
    assert hit_cost(D(reward), 9).total == D(nine)
    assert hit_cost(D(reward), 10).total == D(ten)


def test_fee_rounds_half_up():
    assert fee_per_assignment(D("0.25"), 9) == D("0.05")
    assert fee_per_assignment(D("0.275"), 9) == D("0.06")  # 0.055 -> 0.06
    assert fee_per_assignment(D("0.27"), 10) == D("0.11")  # 0.108 -> 0.11


def test_cost_parts():
    cost = hit_cost(D("0.05"), 100)
    assert (cost.assignments, cost.rewards, cost.fees, cost.total) == (
        100,
        D("5.00"),
        D("2.00"),
        D("7.00"),
    )


def test_splitting_a_batch_pays_twenty_percent():
    sizes = split_sizes(100, 9)
    assert sizes == [9, 9, 9, 9, 8, 8, 8, 8, 8, 8, 8, 8]
    assert sum(sizes) == 100
    assert hits_cost(D("0.05"), sizes).total == D("6.00")
    assert hits_cost(D("0.05"), [100]).total == D("7.00")


@pytest.mark.parametrize(("assignments", "most"), [(1, 9), (9, 9), (10, 9), (19, 9), (300, 9)])
def test_split_sizes_are_even_and_bounded(assignments, most):
    sizes = split_sizes(assignments, most)
    assert sum(sizes) == assignments
    assert max(sizes) <= most and max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-assignments // most)


def test_split_sizes_refuses_nonsense():
    with pytest.raises(ValueError):
        split_sizes(0, 9)
