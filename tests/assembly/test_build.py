"""One assembly path: a spec builds the same learner and behaviour wherever it comes from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2pfl.assembly import NodeSpec, build_node, read_node_file
from p2pfl.assembly.build import attack_label_map_of
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError
from p2pfl.learners.base import Learner
from p2pfl.learners.tasks import TASKS, Task, TaskContext, make_learner
from p2pfl.sim.runner import node_spec
from p2pfl.sim.scenario import Scenario

LABELS = torch.arange(10)


def node_file(attack: dict[str, object]) -> dict[str, object]:
    return {"node": {"key_file": "k.pem"}, "train": {"node_index": 3, "num_nodes": 4}, "attack": attack}


def test_label_flip_classes_reach_a_daemon_node_as_they_reach_a_simulated_one() -> None:
    # The bug: the daemon built the label map without the attack's parameters (C = 10).
    daemon = read_node_file(node_file({"name": "label_flip", "classes": 5}), base=Path("."))
    scenario = Scenario(nodes=4, attack="label_flip", attack_params={"classes": 5}, byzantine=1)
    simulated = node_spec(scenario, 0, 3, True, daemon.node, {})
    daemon_map, sim_map = attack_label_map_of(daemon.spec), attack_label_map_of(simulated)
    assert daemon_map is not None
    assert sim_map is not None
    assert daemon_map(LABELS).tolist() == sim_map(LABELS).tolist() == [4, 3, 2, 1, 0, -1, -2, -3, -4, -5]


def test_attack_params_may_sit_in_a_params_table() -> None:
    flat = read_node_file(node_file({"name": "label_flip", "classes": 5}), base=Path("."))
    table = read_node_file(node_file({"name": "label_flip", "params": {"classes": 5}}), base=Path("."))
    assert flat.spec.attack_params == table.spec.attack_params == {"classes": 5}


def test_the_built_attacker_gets_the_label_map_and_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TaskContext] = []

    def probe(context: TaskContext) -> Learner:
        seen.append(context)
        return make_learner("digits", TaskContext(node_index=context.node_index, num_nodes=context.num_nodes))

    monkeypatch.setitem(TASKS, "probe", Task(probe))
    spec = NodeSpec(task="probe", node_index=3, num_nodes=4, attack="label_flip", attack_params={"classes": 5})
    node = build_node(spec, identity=Identity.generate(), offload=False)
    assert node.behaviour.name == "label_flip"
    label_map = seen[0].label_map
    assert label_map is not None
    assert label_map(LABELS).tolist()[:5] == [4, 3, 2, 1, 0]
    assert (seen[0].node_index, seen[0].num_nodes, seen[0].device) == (3, 4, "cpu")


def test_an_honest_node_trains_on_true_labels() -> None:
    build_node(NodeSpec(task="digits"), identity=Identity.generate(), offload=False)  # no label map: no error
    assert attack_label_map_of(NodeSpec()) is None


def test_a_bad_attack_parameter_fails_at_build() -> None:
    with pytest.raises(ConfigError, match="classes"):
        build_node(NodeSpec(attack="label_flip", attack_params={"classes": 1}), identity=Identity.generate())


def test_unknown_task_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'mnist'; choose one of digits"):
        make_learner("mnist", TaskContext())
    assert "digits" in TASKS
