"""Every attack of p2pfl.attacks runs in the simulator, and the runner wires it as specified."""

from __future__ import annotations

import pytest

from p2pfl.attacks import ATTACKS, SybilGroup
from p2pfl.sim.runner import attack_params, node_learner, run_scenario
from p2pfl.sim.scenario import Scenario
from p2pfl.sim.scorecard import scorecard


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_runs_and_honest_nodes_finish(attack: str) -> None:
    scenario = Scenario(nodes=6, rounds=3, topology="complete", attack=attack, byzantine=2,
                        placement="last", round_timeout=1.0)
    card = scorecard(run_scenario(scenario, 0))
    honest = [node for node in card["nodes"] if not node["byzantine"]]
    assert len(honest) == 4
    assert all(None not in node["accuracy"] for node in honest)
    assert card["detection"]["pairs"] == 8  # 4 honest observers x 2 attackers


def test_label_flip_attackers_train_on_flipped_labels() -> None:
    scenario = Scenario(nodes=6, attack="label_flip", byzantine=2)
    flipper, honest = node_learner(scenario, 0, 5, True), node_learner(scenario, 0, 5, False)
    flipper.fit(8)
    honest.fit(8)
    # Evaluated on true labels: the honest model learned digits, the flipper learned 9 - y.
    assert honest.evaluate().accuracy > 0.6
    assert flipper.evaluate().accuracy < 0.2


def test_attack_params_derive_seeds_and_share_the_sybil_group() -> None:
    gaussian = Scenario(nodes=6, attack="gaussian", byzantine=2)
    assert attack_params(gaussian, 3, 4, {})["seed"] == 3 * 100_003 + 4
    assert attack_params(
        Scenario(nodes=6, attack="gaussian", attack_params={"seed": 9}, byzantine=2), 3, 4, {}
    )["seed"] == 9
    sybil = Scenario(nodes=6, attack="sybil", byzantine=2)
    shared: dict[str, object] = {}
    first, second = attack_params(sybil, 0, 4, shared), attack_params(sybil, 0, 5, shared)
    assert isinstance(first["group"], SybilGroup)
    assert first["group"] is second["group"]
