"""Private nodes report what they spent each round; a restart does not reset the budget;
a node whose budget is spent keeps aggregating and serving without training."""

from __future__ import annotations

from pathlib import Path

import torch
import trio
import trio.testing

from p2pfl.cli.http import render_metrics
from p2pfl.config import PrivacyConfig
from p2pfl.learners.torch_learner import TorchLearner
from p2pfl.node.node import Node
from tests.node.conftest import identities, make_network, make_node
from tests.node.test_node_memory import run_all

PLANNED = 3


def private_nodes(tmp_path: Path, network: object, ids: list, count: int = 3) -> list[Node]:
    nodes = [make_node(network, ident, i, count, data_dir=tmp_path / str(i))  # type: ignore[arg-type]
             for i, ident in enumerate(ids)]
    for i, node in enumerate(nodes):
        assert isinstance(node.learner, TorchLearner)
        node.learner.make_private(PrivacyConfig(epsilon=4.0, rounds=PLANNED, noise_seed=i), epochs=PLANNED)
    return nodes


async def test_spent_epsilon_is_reported_each_round_and_survives_a_restart(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ids = identities(3)
    network = make_network(ids)
    nodes = private_nodes(tmp_path, network, ids)
    await run_all(nodes, rounds=2)
    stats = nodes[0].statistics()
    spent = [r.epsilon_spent for r in stats.history]
    assert spent[0] is not None
    assert spent[1] is not None
    assert 0 < spent[0] < spent[1] < 4.0
    assert stats.epsilon_spent == spent[1]
    assert stats.epsilon_target == 4.0
    assert "p2pfl_epsilon_spent " + repr(spent[1]) in render_metrics(stats)

    again = private_nodes(tmp_path, network, ids)  # new processes, same configs
    async with again[0]:
        assert again[0].statistics().epsilon_spent == spent[1]  # no budget reset by a restart
        assert [r.epsilon_spent for r in again[0].statistics().history] == spent


async def test_a_node_whose_budget_is_spent_keeps_aggregating_without_training(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ids = identities(3)
    nodes = private_nodes(tmp_path, make_network(ids), ids)
    trained: list[torch.Tensor] = []
    learner = nodes[0].learner
    assert isinstance(learner, TorchLearner)
    fit = learner.fit

    def recording_fit(epochs: int) -> int:
        before = learner.get_state()["hidden.weight"].clone()
        weight = fit(epochs)
        trained.append((learner.get_state()["hidden.weight"] - before).norm())
        return weight

    learner.fit = recording_fit  # type: ignore[method-assign]
    await run_all(nodes, rounds=PLANNED + 2)
    stats = nodes[0].statistics()
    assert [float(t) > 0 for t in trained] == [True] * PLANNED + [False, False]
    assert stats.round == PLANNED + 2
    assert [r.used for r in stats.history[PLANNED:]] == [2, 2]  # still mixing its neighbours
    assert stats.epsilon_spent is not None
    assert stats.epsilon_spent <= 4.0
    assert stats.history[PLANNED - 1].epsilon_spent == stats.epsilon_spent  # nothing spent after
