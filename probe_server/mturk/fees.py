"""What a batch costs: rewards plus MTurk's commission.

MTurk charges 20% of the reward (and of bonuses), and another 20% of the
reward on a HIT with 10 or more assignments; the fee is at least $0.01 per
assignment and rounded half up to the cent (MTurk's pricing page). A batch
split into HITs of at most 9 assignments therefore pays 20%, not 40%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")
BASE_RATE = Decimal("0.20")
LARGE_HIT_RATE = Decimal("0.40")
# A HIT with this many assignments or more pays the higher rate.
LARGE_HIT_ASSIGNMENTS = 10
# The most assignments a HIT may have and still pay the base rate.
SMALL_HIT_MAX = LARGE_HIT_ASSIGNMENTS - 1
MIN_FEE = CENT


def fee_rate(assignments_per_hit: int) -> Decimal:
    """MTurk's commission on the reward of a HIT with this many assignments."""
    return LARGE_HIT_RATE if assignments_per_hit >= LARGE_HIT_ASSIGNMENTS else BASE_RATE


def fee_per_assignment(reward: Decimal, assignments_per_hit: int) -> Decimal:
    fee = (reward * fee_rate(assignments_per_hit)).quantize(CENT, rounding=ROUND_HALF_UP)
    return max(fee, MIN_FEE)


@dataclass(frozen=True, slots=True)
class Cost:
    """The price of some HITs: what workers get, what MTurk keeps, the sum."""

    assignments: int
    rewards: Decimal
    fees: Decimal

    @property
    def total(self) -> Decimal:
        return self.rewards + self.fees

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.assignments + other.assignments,
            self.rewards + other.rewards,
            self.fees + other.fees,
        )


NO_COST = Cost(0, Decimal("0.00"), Decimal("0.00"))


def hit_cost(reward: Decimal, assignments: int) -> Cost:
    """The most one HIT can cost: every assignment approved."""
    return Cost(
        assignments,
        reward * assignments,
        fee_per_assignment(reward, assignments) * assignments,
    )


def hits_cost(reward: Decimal, hit_sizes: Sequence[int]) -> Cost:
    cost = NO_COST
    for size in hit_sizes:
        cost += hit_cost(reward, size)
    return cost


def split_sizes(assignments: int, most_per_hit: int) -> list[int]:
    """Assignments per HIT when a batch is spread over HITs of at most ``most_per_hit``.

    The HITs are as even as possible: 100 assignments in HITs of at most 9
    make 12 HITs, four of 9 and eight of 8.
    """
    if assignments < 1 or most_per_hit < 1:
        raise ValueError("assignments and most_per_hit must be positive")
    count = -(-assignments // most_per_hit)
    base, extra = divmod(assignments, count)
    return [base + 1] * extra + [base] * (count - extra)


def dollars(amount: Decimal) -> str:
    return f"${amount.quantize(CENT, rounding=ROUND_HALF_UP)}"
