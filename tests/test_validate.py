"""The shared argument checks name the argument and the allowed values."""

import pytest

from lightning_recipe._validate import check_int, check_number


def test_check_int():
    assert check_int("k", 3) == 3 and check_int("k", 0, low=0) == 0
    for bad in (0, -1, True, 1.5, "2", None):
        with pytest.raises(ValueError, match=r"`k` must be an int >= 1, got"):
            check_int("k", bad)


def test_check_number_intervals():
    assert check_number("x", 0.5, 0, 1, low_open=True, high_open=True) == 0.5
    assert check_number("x", 1, 0, 1) == 1.0
    with pytest.raises(ValueError, match=r"`x` must be a number in \(0, 1\), got 1"):
        check_number("x", 1, 0, 1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"\[0, inf\)"):
        check_number("x", -1, 0)
    for bad in (float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(ValueError, match="`x`"):
            check_number("x", bad, 0, 1)


def test_check_callable_names_the_argument_and_the_signature():
    from lightning_recipe._validate import check_callable

    assert check_callable("step_fn", None, "(model, batch) -> loss") is None
    assert check_callable("step_fn", len, "(model, batch) -> loss") is len
    with pytest.raises(TypeError, match=r"`step_fn` must be a callable \(model, batch\) -> loss, got int"):
        check_callable("step_fn", 3, "(model, batch) -> loss")
