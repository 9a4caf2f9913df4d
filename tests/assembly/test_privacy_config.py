"""[privacy] reaches every way of building a node: node files, testnet, simulations."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from p2pfl.assembly import NodeSpec, build_node, read_node_file
from p2pfl.cli.testnet_plan import TestnetPlan as Plan
from p2pfl.cli.testnet_plan import dumps_toml, node_config
from p2pfl.config import PrivacyConfig
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError
from p2pfl.learners.tasks import TASKS, Task
from p2pfl.learners.torch_learner import TorchLearner
from p2pfl.sim.runner import node_spec
from p2pfl.sim.scenario import parse_scenario

BASE = Path("/cfg")


def read(doc: dict[str, Any]) -> NodeSpec:
    node = {"key_file": "k.pem", **doc.get("node", {})}
    return read_node_file({**doc, "node": node}, base=BASE).spec


def test_privacy_is_off_without_the_section() -> None:
    assert read({}).privacy is None


def test_privacy_rounds_default_to_the_node_rounds() -> None:
    spec = read({"node": {"rounds": 7}, "privacy": {"epsilon": 4}})
    assert spec.privacy == PrivacyConfig(epsilon=4.0, rounds=7)
    assert read({"node": {"rounds": 7}, "privacy": {"rounds": 3}}).privacy == PrivacyConfig(rounds=3)


@pytest.mark.parametrize(("table", "message"), [
    ({"epsilon": 0}, r"\[privacy\] epsilon: must be a positive number"),
    ({"delta": 1.5}, r"\[privacy\] delta: must be in \(0, 1\)"),
    ({"epsilon": "8"}, r"\[privacy\] epsilon: expected a number"),
    ({"max_grad_norm": -1}, r"\[privacy\] max_grad_norm"),
    ({"epsilonn": 8}, r"unknown key 'epsilonn' in \[privacy\]; did you mean 'epsilon'"),
])
def test_a_bad_privacy_value_names_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read({"privacy": table})


def test_a_private_node_without_planned_rounds_fails_before_starting() -> None:
    spec = read({"privacy": {}})
    with pytest.raises(ConfigError, match=r"\[privacy\] rounds"):
        build_node(spec, identity=Identity.generate())


def test_build_node_makes_the_learner_private_for_rounds_x_local_epochs() -> None:
    spec = read({"node": {"rounds": 3}, "round": {"local_epochs": 2}, "privacy": {"noise_seed": 1}})
    node = build_node(spec, identity=Identity.generate())
    assert isinstance(node.learner, TorchLearner)
    assert node.learner.privacy is not None
    assert node.learner.privacy.planned_steps == 6 * node.learner.privacy.batches.steps_per_epoch
    assert node.statistics().epsilon_target == 8.0
    assert node.statistics().epsilon_spent == 0.0


def test_a_task_not_built_on_torch_learner_cannot_be_private(monkeypatch: pytest.MonkeyPatch) -> None:
    class Plain:
        pass

    monkeypatch.setitem(TASKS, "plain", Task(lambda context: Plain()))  # type: ignore[arg-type,return-value]
    spec = NodeSpec(task="plain", privacy=PrivacyConfig(rounds=2))
    with pytest.raises(ConfigError, match="TorchLearner"):
        build_node(spec, identity=Identity.generate())


def test_testnet_dp_epsilon_reaches_honest_nodes_only(tmp_path: Path) -> None:
    plan = Plan(nodes=4, rounds=10, byzantine=1, attack="sign_flip", dp_epsilon=8.0, out=tmp_path)
    peers = [f"16Uiu2HAmPeer{i}" for i in range(4)]
    ports = list(range(4000, 4008))
    honest = tomllib.loads(dumps_toml(node_config(plan, 0, peers, ports)))
    attacker = tomllib.loads(dumps_toml(node_config(plan, 3, peers, ports)))
    assert honest["privacy"] == {"epsilon": 8.0}
    assert "privacy" not in attacker
    assert read_node_file(honest, base=tmp_path).spec.privacy == PrivacyConfig(epsilon=8.0, rounds=10)


def test_a_scenario_privacy_section_reaches_honest_nodes_with_their_own_noise_seed() -> None:
    scenario = parse_scenario({"nodes": 4, "rounds": 5, "privacy": {"epsilon": 2},
                               "attack": {"name": "sign_flip", "byzantine": 1}})
    config = read({}).node
    first, second = (node_spec(scenario, 0, i, False, config, {}) for i in (0, 1))
    assert first.privacy is not None
    assert second.privacy is not None
    assert (first.privacy.epsilon, first.privacy.rounds) == (2.0, 5)
    assert first.privacy.noise_seed != second.privacy.noise_seed
    assert node_spec(scenario, 0, 3, True, config, {}).privacy is None
