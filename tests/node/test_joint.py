"""The joint check: colluders who each pass alone are caught by their part in the whole mix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learners.base import State
from p2pfl.node.config import HarmCheck
from p2pfl.node.harm import HarmGate, leave_one_out

TOLERANCE = HarmCheck(absolute=0.1, relative=0.0)  # the bar: 0.1 above the reference


class Squared:
    """Scores a state by its squared distance to 0: the loss near a minimum."""

    def probe_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
        return [float((s["w"] ** 2).sum()) for s in states]


def at(*values: float) -> State:
    return {"w": torch.tensor([*values, 0.0, 0.0, 0.0, 0.0][:4]), "steps": torch.tensor(3)}


def judge(neighbours: list[State], check: HarmCheck = TOLERANCE) -> tuple[list[bool], list[bool], list[bool]]:
    """Judge ``neighbours`` at full reputation from w = 0: (passed, pulled, failed)."""
    names = [f"n{i}" for i in range(len(neighbours))]
    verdict = HarmGate(check, Squared()).judge(at(), None, names, neighbours, [1.0] * len(neighbours), 1.0)
    return verdict.passed, verdict.pulled, verdict.failed


def test_leave_one_out_is_each_neighbours_part_in_the_whole_mix() -> None:
    # Shares 1/4: the whole mix is w = (0.8 + 0.8 + 0) / 4 = 0.4 (loss 0.16); without one
    # colluder 0.2 (0.04): its part is 0.12. Without the neighbour at our model: none.
    parts = leave_one_out(Squared(), TOLERANCE, at(), [at(0.8), at(0.8), at()], [0.25] * 3, [0, 1, 2])
    assert parts == pytest.approx([0.12, 0.12, 0.0])
    nan = {"w": torch.full((4,), float("nan")), "steps": torch.tensor(3)}
    assert leave_one_out(Squared(), TOLERANCE, at(), [nan, at(0.8)], [0.25] * 2, [0, 1]) is None


def test_two_colluders_each_harmless_alone_are_caught_together() -> None:
    # Shares 1/6. Alone, a colluder at 1.8 raises our loss by (1.8 / 6)^2 = 0.09: within
    # 0.1, it passes. In the whole mix (w = 0.6) its part is 0.36 - 0.09 = 0.27, over the
    # bar: the honest neighbours' median part (0) plus 0.1.
    neighbours = [at(), at(), at(), at(1.8), at(1.8)]
    passed, pulled, failed = judge(neighbours)
    assert pulled == [False, False, False, True, True]
    assert passed == [True, True, True, False, False]
    assert failed == [False] * 5  # no evidence of malice: only no benefit of the doubt
    passed, pulled, _ = judge(neighbours, HarmCheck(absolute=0.1, relative=0.0, joint=False))
    assert passed == [True] * 5
    assert pulled == [False] * 5


@pytest.mark.parametrize("noise", [0.0, 0.6, 1.2, 1.5])
def test_independent_noise_does_not_hide_colluders(noise: float) -> None:
    # Each adds noise along its own axis. Alone: (1.5 + noise^2) / 36, within 0.1 up to
    # noise 1.45; its part in the mix, (3 x 1.5 + noise^2) / 36, only grows with the noise.
    # More noise than that fails the check alone.
    c = 1.5**0.5
    passed, pulled, failed = judge([at(), at(), at(), at(c, noise), at(c, 0.0, noise)])
    assert passed == [True, True, True, False, False]
    caught = pulled if noise < 1.45 else failed
    assert caught == [False, False, False, True, True]


def test_honest_neighbours_pulling_the_same_way_are_not_pulled() -> None:
    # A node with skewed data: every neighbour knows other classes and pulls it the same
    # way. The whole mix raises its loss a lot, but no neighbour's part stands out.
    _, pulled, _ = judge([at(0.9), at(0.9), at(0.9), at(0.9)])
    assert pulled == [False] * 4


def test_a_neighbour_failing_alone_stays_out_of_the_whole_mix() -> None:
    # A wild model (alone: loss 36, it fails) would swamp the mix: with it in, the honest
    # neighbour at 0.9 that leans the same way would have a part of 2.2 (pulled).
    passed, pulled, failed = judge([at(30.0), at(0.9), at(), at()])
    assert failed == [True, False, False, False]
    assert pulled == [False, False, False, False]
    assert passed[1:] == [True, True, True]


def test_joint_is_validated() -> None:
    with pytest.raises(ConfigError, match="harm_check.joint"):
        HarmCheck(joint=1)  # type: ignore[arg-type]
