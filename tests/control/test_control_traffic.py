"""The weighted traffic split: exact over many requests, by draw and by count."""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.errors import RequestError
from control.traffic import Route, pick, pick_by_count

SHARES = [Fraction(0), Fraction(1, 4), Fraction(1, 3), Fraction(1, 2), Fraction(2, 3),
          Fraction(3, 4), Fraction(1)]


@pytest.mark.parametrize("share", SHARES)
def test_evenly_spread_draws_split_exactly(share: Fraction) -> None:
    n = 12_000  # divisible by 3 and 4: every share above is a whole number of draws
    to_candidate = sum(pick(share, (i + 0.5) / n) is Route.CANDIDATE for i in range(n))
    assert to_candidate == share * n


@pytest.mark.parametrize("share", SHARES)
def test_random_draws_split_as_asked_within_sampling_noise(share: Fraction) -> None:
    rng = random.Random(1234)
    n = 40_000
    to_candidate = sum(pick(share, rng.random()) is Route.CANDIDATE for _ in range(n))
    # Four standard deviations of a binomial: a wrong weight fails, noise does not.
    p = float(share)
    assert abs(to_candidate - p * n) <= 4 * (n * p * (1 - p)) ** 0.5 + 1


def test_the_ends_always_route_one_way() -> None:
    assert pick(Fraction(0), 0.0) is Route.PREVIOUS
    assert pick(Fraction(1), 0.999999) is Route.CANDIDATE
    assert pick_by_count(Fraction(0), 5) is Route.PREVIOUS
    assert pick_by_count(Fraction(1), 5) is Route.CANDIDATE


@given(st.fractions(min_value=0, max_value=1, max_denominator=1000), st.integers(0, 5000))
def test_by_count_every_prefix_holds_the_share_to_within_one_request(share: Fraction,
                                                                     n: int) -> None:
    to_candidate = sum(pick_by_count(share, i) is Route.CANDIDATE for i in range(n))
    assert to_candidate == (n * share).__floor__()


def test_by_count_spreads_a_quarter_as_every_fourth_request() -> None:
    routes = [pick_by_count(Fraction(1, 4), i) for i in range(8)]
    assert [r is Route.CANDIDATE for r in routes] == [False, False, False, True] * 2


@pytest.mark.parametrize(("call", "field"), [
    (lambda: pick(Fraction(5, 4), 0.5), "share_new"),
    (lambda: pick(Fraction(-1, 4), 0.5), "share_new"),
    (lambda: pick(Fraction(1, 2), 1.0), "draw"),
    (lambda: pick(Fraction(1, 2), -0.1), "draw"),
    (lambda: pick_by_count(Fraction(1, 2), -1), "n"),
])
def test_bad_input_is_refused_naming_the_argument(call: Callable[[], object],
                                                  field: str) -> None:
    with pytest.raises(RequestError) as err:
        call()
    assert err.value.field == field
