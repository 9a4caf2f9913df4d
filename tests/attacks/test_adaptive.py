"""Adaptive attacks: their maths as pure functions, and what craft() announces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pytest
import torch

from p2pfl.attacks import ATTACKS, Pool, attack_label_map, make_attack, with_accomplices
from p2pfl.attacks.adaptive import (
    clip_aware_step,
    largest_fitting,
    min_max_gamma,
    min_sum_gamma,
    perturbation,
    spread,
)
from p2pfl.errors import ConfigError
from p2pfl.node.node import Node

Tensor = torch.Tensor


def honest_models(n: int = 6, d: int = 40, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) + 3.0


def max_distance(point: Tensor, honest: Tensor) -> float:
    return float(torch.linalg.vector_norm(honest - point, dim=1).max())


def summed_squares(point: Tensor, honest: Tensor) -> float:
    return float(((honest - point) ** 2).sum())


# ------------------------------------------------------------------ pure maths


def test_largest_fitting_finds_the_edge_of_an_interval() -> None:
    assert largest_fitting(lambda g: g <= 2.5, 10.0) == pytest.approx(2.5, abs=1e-12)
    assert largest_fitting(lambda g: g <= 20.0, 10.0) == 10.0
    assert largest_fitting(lambda g: g > 1.0, 10.0) == 0.0


@pytest.mark.parametrize("kind", ["std", "unit", "sign"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_max_stays_within_the_honest_diameter_and_gamma_is_maximal(kind: str, seed: int) -> None:
    honest = honest_models(seed=seed)
    push = perturbation(kind, honest, direction=honest[0] - honest[1])
    gamma = min_max_gamma(honest, push)
    bound = float(torch.cdist(honest, honest).max())
    centre = honest.mean(dim=0)
    assert gamma > 0
    assert max_distance(centre + gamma * push, honest) <= bound
    assert max_distance(centre + gamma * (1 + 1e-6) * push, honest) > bound


@pytest.mark.parametrize("kind", ["std", "unit", "sign"])
def test_min_sum_gamma_is_the_largest_within_the_honest_summed_distance(kind: str) -> None:
    honest = honest_models(seed=3)
    push = perturbation(kind, honest, direction=honest[2] - honest[0])
    gamma = min_sum_gamma(honest, push)
    bound = float((torch.cdist(honest, honest) ** 2).sum(dim=1).max())
    centre = honest.mean(dim=0)
    assert summed_squares(centre + gamma * push, honest) <= bound
    assert summed_squares(centre + gamma * (1 + 1e-6) * push, honest) > bound
    # Cross terms vanish around the mean: n g^2 |p|^2 = bound - sum |m - x_i|^2.
    closed = ((bound - summed_squares(centre, honest)) / (len(honest) * float(push @ push))) ** 0.5
    assert gamma == pytest.approx(closed, rel=1e-9)


def test_perturbations_follow_the_paper() -> None:
    honest = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64)
    direction = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert torch.allclose(perturbation("std", honest, direction), -honest.std(dim=0))
    assert torch.allclose(perturbation("unit", honest, direction), torch.tensor([-0.6, 0.8], dtype=torch.float64))
    assert torch.equal(perturbation("sign", honest, direction), torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_one_honest_model_leaves_no_room() -> None:
    honest = honest_models(n=1)
    assert min_max_gamma(honest, perturbation("unit", honest, honest[0])) == 0.0
    assert min_max_gamma(honest, perturbation("std", honest, honest[0])) == 0.0  # std 0: no push


def test_clip_aware_sits_just_inside_every_victims_median_distance() -> None:
    honest = honest_models(n=7, seed=4)
    unit = torch.zeros(40, dtype=torch.float64)
    unit[0] = 1.0
    victims = honest[:3]
    step = clip_aware_step(honest, victims, unit, margin=0.9)
    announced = honest.mean(dim=0) - step * unit
    slack = []
    for victim in victims:
        distances = torch.linalg.vector_norm(honest - victim, dim=1)
        radius = 0.9 * float(distances[distances > 0].median())
        slack.append(radius - float(torch.linalg.vector_norm(announced - victim)))
    assert step > 0
    assert min(slack) == pytest.approx(0.0, abs=1e-9)  # the binding victim: on the edge
    assert all(s >= -1e-9 for s in slack)


def test_spread_is_the_rms_distance_to_the_mean() -> None:
    honest = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    assert spread(honest) == pytest.approx(1.0)


# ------------------------------------------------------------------ craft()


class FakeNode:
    """What craft() reads from a node: neighbour_states() and peer_id."""

    def __init__(self, held: Mapping[str, Mapping[str, Tensor]], peer_id: str = "me") -> None:
        self.held = held
        self.peer_id = peer_id

    def neighbour_states(self) -> dict[str, Mapping[str, Tensor]]:
        return dict(self.held)


def states(rows: Tensor, prefix: str = "h") -> dict[str, dict[str, Tensor]]:
    return {f"{prefix}{i}": {"w": row.float(), "steps": torch.tensor([i])} for i, row in enumerate(rows)}


def craft(attack: Any, held: Mapping[str, Mapping[str, Tensor]], round: int = 0,
          own: Tensor | None = None, peer: str = "me") -> dict[str, Tensor]:
    mine = {"w": torch.full((40,), 9.0) if own is None else own, "steps": torch.tensor([7])}
    return cast(dict[str, Tensor], attack.craft(cast(Node, FakeNode(held, peer)), round, mine))


def test_every_new_attack_is_in_the_catalogue() -> None:
    for name in ("min_max", "min_sum", "clip_aware", "boiling_frog", "targeted_flip"):
        assert ATTACKS[name].paper
        assert make_attack(name).name == name


@pytest.mark.parametrize(
    ("name", "params"),
    [("min_max", {"perturbation": "cosine"}), ("min_sum", {"gamma": -1}),
     ("clip_aware", {"margin": 0}), ("boiling_frog", {"start": -1}),
     ("targeted_flip", {"source": 3, "target": 3}), ("min_max", {"pool": "friends"})],
)
def test_bad_parameters_are_config_errors(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(params))):
        make_attack(name, **params)


def test_min_max_announces_within_the_honest_diameter() -> None:
    honest = honest_models(n=5, seed=5).float()
    announced = craft(make_attack("min_max"), states(honest))
    bound = float(torch.cdist(honest, honest).max())
    assert max_distance(announced["w"], honest) <= bound * (1 + 1e-5)
    assert max_distance(announced["w"], honest) >= bound * (1 - 1e-3)  # and pushes to the edge
    assert torch.equal(announced["steps"], torch.tensor([7]))  # integer buffers stay ours


def test_explicit_gamma_is_used() -> None:
    honest = honest_models(n=4, seed=6).float()
    announced = craft(make_attack("min_max", gamma=2.0), states(honest))
    expected = honest.mean(dim=0) - 2.0 * honest.std(dim=0)
    assert torch.allclose(announced["w"], expected, atol=1e-5)


def test_with_nothing_observed_the_adaptive_attacks_announce_their_own_model() -> None:
    mine = torch.arange(40.0)
    for name in ("min_max", "min_sum", "clip_aware", "boiling_frog"):
        assert torch.equal(craft(make_attack(name, **({"start": 0} if name == "boiling_frog" else {})), {},
                                 own=mine)["w"], mine), name


def test_boiling_frog_is_honest_before_start_then_drifts_by_step_spreads() -> None:
    honest = honest_models(n=5, seed=7).float()
    frog = make_attack("boiling_frog", start=3, step=0.5)
    for round in range(3):
        mine = torch.full((40,), float(round))
        assert torch.equal(craft(frog, states(honest), round, own=mine)["w"], mine)
    centre = honest.double().mean(dim=0)
    offsets = [torch.linalg.vector_norm(craft(frog, states(honest), r)["w"].double() - centre) for r in (3, 4, 5)]
    s = spread(honest.double())
    assert [float(o) for o in offsets] == pytest.approx([0.5 * s, 1.0 * s, 1.5 * s], rel=1e-5)


def test_colluders_share_observations_exclude_each_other_and_push_one_way() -> None:
    shared: dict[str, Any] = {}
    one, two = (make_attack("boiling_frog", start=0, **with_accomplices("boiling_frog", {}, shared))
                for _ in range(2))
    pool = shared["pool"]
    assert isinstance(pool, Pool)
    honest = honest_models(n=4, seed=8).float()
    first = craft(one, states(honest[:2]), peer="s1")
    held = {"s1": first, **states(honest[2:], prefix="k")}
    second = craft(two, held, peer="s2")
    assert pool.members == {"s1", "s2"}
    assert sorted(pool.observed) == ["h0", "h1", "k0", "k1"]  # s1's model is not honest
    assert second["w"].shape == (40,)
    assert pool.direction is not None  # fixed once, used by both


def test_clip_aware_keeps_inside_its_neighbours_median_distance() -> None:
    honest = honest_models(n=6, seed=9).float()
    attack = make_attack("clip_aware", margin=0.8)
    craft(attack, states(honest), round=0)  # remembers the honest mean
    moved = honest + 0.5
    announced = craft(attack, states(moved), round=1)["w"]
    for victim in moved:
        distances = torch.linalg.vector_norm(moved - victim, dim=1)
        radius = 0.8 * float(distances[distances > 0].median())
        assert float(torch.linalg.vector_norm(announced - victim)) <= radius * (1 + 1e-5)
    # Pushed against the honest update (+0.5 on every coordinate).
    assert float((announced - moved.mean(dim=0)).sum()) < 0


def test_targeted_flip_relabels_only_the_source_class() -> None:
    default = attack_label_map("targeted_flip")
    assert default is not None
    labels = torch.arange(10).repeat(3)
    mapped = default(labels)
    assert torch.equal(mapped[labels != 7], labels[labels != 7])
    assert set(mapped[labels == 7].tolist()) == {1}
    three = attack_label_map("targeted_flip", source=3, target=8)
    assert three is not None
    assert three(torch.tensor([3, 7, 8])).tolist() == [8, 7, 8]
    trained = {"w": torch.ones(2)}
    assert make_attack("targeted_flip").craft(cast(Node, FakeNode({})), 0, trained) is trained


def test_ipm_on_the_update_pushes_minus_eps_times_the_honest_move_from_the_start() -> None:
    honest = honest_models(n=4, seed=10).float()
    attack = make_attack("ipm", eps=0.5, space="update")
    assert attack.name == "ipm"
    craft(attack, states(honest), round=0)
    moved = honest + torch.linspace(0, 1, 40)
    announced = craft(attack, states(moved), round=1)["w"]
    # m_prev - 0.5 (m - m_prev)
    expected = honest.mean(dim=0) - 0.5 * torch.linspace(0, 1, 40)
    assert torch.allclose(announced, expected, atol=1e-5)
    model_space = craft(make_attack("ipm", eps=0.5), states(moved))["w"]
    assert torch.allclose(model_space, -0.5 * moved.mean(dim=0), atol=1e-5)
