"""The Wilson score interval against published values and a bisection."""

from __future__ import annotations

import pytest

from probe_server.analysis.stats import wilson

from .helpers import wilson_by_bisection

# Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3
# (score interval without continuity correction), to four decimals.
NEWCOMBE = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
]


@pytest.mark.parametrize(("x", "n", "low", "high"), NEWCOMBE)
def test_published_values(x, n, low, high):
    got = wilson(x, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize(("x", "n"), [(17, 530), (17, 322), (0, 148), (3, 11), (1, 1), (7, 7)])
def test_closed_form_matches_the_score_test_solved_by_bisection(x, n):
    assert wilson(x, n) == pytest.approx(wilson_by_bisection(x, n), abs=1e-12)


def test_bounds_stay_in_0_1():
    assert wilson(0, 1)[0] == 0.0
    assert wilson(1, 1)[1] == 1.0


@pytest.mark.parametrize(("x", "n"), [(0, 0), (-1, 5), (6, 5)])
def test_impossible_counts_are_refused(x, n):
    with pytest.raises(ValueError):
        wilson(x, n)
