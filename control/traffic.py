"""The weighted traffic split of a rolling promotion: which deployment one request gets.

The rollout planner decides the candidate's share of an environment's requests
(:attr:`control.rollout.Plan.share_new`, an exact fraction such as 1/4); the router asks
this module, per request, which of the two deployments serves it. Both choices are pure:

- :func:`pick` takes a uniform draw in [0, 1) (the router's ``random.random()``): the
  candidate gets exactly ``share`` of the draw interval, so the expected split is exact
  and requests need no shared counter.
- :func:`pick_by_count` takes the request's sequence number instead: request ``n`` goes to
  the candidate exactly when ``floor((n + 1) x share)`` passes an integer, so after any
  ``n`` requests the candidate has had ``floor(n x share)`` of them, never off by more
  than one. It spreads the candidate's requests evenly (1/4: every fourth request), which
  is what makes a measured share match the documented one over a short window.

Shares are :class:`fractions.Fraction` so 1/3 stays 1/3; a float percentage (33.33) would
drift by a request every few thousand.
"""

from __future__ import annotations

import math
from enum import StrEnum
from fractions import Fraction

from control.errors import RequestError


class Route(StrEnum):
    PREVIOUS = "previous"
    CANDIDATE = "candidate"


def _check_share(share: Fraction) -> Fraction:
    share = Fraction(share)
    if not 0 <= share <= 1:
        raise RequestError(f"{share} is not in 0-1", field="share_new")
    return share


def pick(share_new: Fraction, draw: float) -> Route:
    """The deployment for a request whose uniform draw is ``draw`` (0 <= draw < 1)."""
    share = _check_share(share_new)
    if not 0.0 <= draw < 1.0:
        raise RequestError(f"{draw!r} is not in [0, 1)", field="draw")
    # Compare exactly: Fraction(draw) is the float's exact value.
    return Route.CANDIDATE if Fraction(draw) < share else Route.PREVIOUS


def pick_by_count(share_new: Fraction, n: int) -> Route:
    """The deployment for the ``n``-th request (from 0) under an unchanging share."""
    share = _check_share(share_new)
    if n < 0:
        raise RequestError(f"{n} is negative", field="n")
    crossed = math.floor((n + 1) * share) - math.floor(n * share)
    return Route.CANDIDATE if crossed else Route.PREVIOUS
