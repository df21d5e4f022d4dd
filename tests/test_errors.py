"""The shared argument checks of `v2l_fast.errors`."""

from __future__ import annotations

import pytest

from v2l_fast.errors import check_int


@pytest.mark.parametrize("value, minimum, note, message", [
    (0, 1, "", r"^steps: expected an int >= 1, got 0$"),
    (True, 0, "", r"^steps: expected an int >= 0, got True$"),  # a bool is not a count
    (2.0, 1, "", r"^steps: expected an int >= 1, got 2.0$"),
    (-1, 0, "0: none", r"^steps: expected an int >= 0 \(0: none\), got -1$"),
])
def test_check_int_refuses_what_is_not_an_int_at_least_the_minimum(value, minimum, note, message):
    with pytest.raises(ValueError, match=message):
        check_int("steps", value, minimum, note)


@pytest.mark.parametrize("value, minimum", [(0, 0), (1, 1), (10**12, 1)])
def test_check_int_accepts_ints_at_or_above_the_minimum(value, minimum):
    check_int("steps", value, minimum)
