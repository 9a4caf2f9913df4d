"""One description of how a state fails to fit a model, shared by three callers."""

from __future__ import annotations

import pytest
import torch

from p2pfl.core.state import mismatch, nonfinite, template_of

OWN = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "steps": torch.tensor(4)}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s.pop("b"), "missing key 'b'"),
        (lambda s: s.update(x=torch.zeros(1)), "extra) key 'x'"),
        (lambda s: s.update(w=torch.zeros(3, 2)), "'w' has shape (3, 2), expected (2, 3)"),
        (lambda s: s.update(b=torch.zeros(3, dtype=torch.float64)), "'b' has dtype torch.float64"),
        (lambda s: s.update(steps=torch.tensor(4.0)), "'steps' has dtype"),
        (lambda s: s.update(b=[0.0, 0.0, 0.0]), "'b' is not a tensor (list)"),
    ],
)
def test_mismatch_names_the_first_problem(change, needle: str) -> None:
    other = dict(OWN)
    change(other)
    problem = mismatch(template_of(OWN), other)
    assert problem is not None
    assert needle in problem


def test_a_fitting_state_and_float_casts() -> None:
    assert mismatch(template_of(OWN), dict(OWN)) is None
    wider = {**OWN, "b": torch.zeros(3, dtype=torch.float64)}
    assert mismatch(template_of(OWN), wider, cast_floats=True) is None
    ints = {**OWN, "b": torch.zeros(3, dtype=torch.int64)}
    assert mismatch(template_of(OWN), ints, cast_floats=True) is not None


def test_nonfinite_finds_nan_and_inf_in_floats_only() -> None:
    assert nonfinite(OWN) is None
    assert nonfinite({**OWN, "b": torch.tensor([0.0, float("inf"), 0.0])}) == "b"
    assert nonfinite({**OWN, "w": torch.full((2, 3), float("nan"))}) == "w"
