"""The check of a plain Python number that the ops' and models' argument checks share."""

from __future__ import annotations

import sys

FLOAT_MAX = sys.float_info.max


def finite_number(value: object) -> bool:
    """Whether value is an int or a float (not a bool) that a float holds finitely: NaN, +-inf
    and ints past the float range (10**400, which a comparison with math.inf lets through, to
    fail later as an OverflowError or an inf) are not."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and -FLOAT_MAX <= value <= FLOAT_MAX
