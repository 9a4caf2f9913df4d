"""Scorecard math on hand-made runs, the consensus distance, and that plots produce PNGs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from p2pfl.sim.plots import plot_accuracy, plot_grid, plot_reputation
from p2pfl.sim.runner import RunResult, consensus_distance
from p2pfl.sim.scenario import Scenario
from p2pfl.sim.scorecard import (
    detection,
    exposed_honest,
    grid_summary,
    grid_table,
    reputation_matrix,
    scorecard,
)
from p2pfl.sim.topology import complete

PNG = b"\x89PNG\r\n\x1a\n"


def synthetic(seed: int = 0, final: float = 0.9, attack: str = "sign_flip") -> RunResult:
    """4 nodes, complete graph, node 3 Byzantine, 2 rounds."""
    scenario = Scenario(nodes=4, rounds=2, topology="complete", attack=attack, byzantine=1)
    w = 0.6
    weights = (
        ({1: w, 2: w, 3: 0.5}, {1: w, 2: w, 3: 0.0}),  # observer 0 flags 3 in round 1
        ({0: w, 2: w, 3: w}, {0: w, 2: w, 3: w}),  # observer 1 never does
        ({0: w, 1: 0.0, 3: w}, {0: w, 1: w, 3: w}),  # observer 2 wrongly flags 1, then not
        ({0: w, 1: w, 2: w}, {0: w, 1: w, 2: w}),  # the attacker's view does not count
    )
    return RunResult(
        scenario=scenario,
        seed=seed,
        byzantine=(3,),
        edges=complete(4).edges,
        accuracy=((0.5, final), (0.4, final - 0.2), (None, final + 0.05), (0.1, 0.1)),
        weights=weights,
        consensus=(2.0, 0.5),
        bytes_in=(100, 200, 300, 400),
        bytes_out=(50, 50, 50, 50),
        rejected=({}, {}, {}, {}),
    )


def test_worst_class_is_reported_by_honest_mean_and_by_single_node() -> None:
    classes = ((None, (1.0, 0.8)), (None, (1.0, 0.2)), (None, (0.9, math.nan)), (None, (0.0, 0.0)))
    run = replace(synthetic(), per_class=classes)  # node 3 (Byzantine) does not count
    card = scorecard(run)
    assert card["accuracy"]["honest_class_mean"] == [None, [pytest.approx(29 / 30), pytest.approx(0.5)]]
    final = card["final"]
    assert (final["worst_class_index"], final["worst_class"]) == (1, pytest.approx(0.5))
    assert (final["worst_node"], final["worst_node_class_index"], final["worst_node_class"]) == (1, 1, 0.2)
    assert card["nodes"][1]["class_accuracy"] == [1.0, 0.2]
    summary = grid_summary([card])
    assert summary["cells"][0]["worst_class_mean"] == pytest.approx(0.5)


def test_detection_counts_pairs_seen_by_honest_observers() -> None:
    found = detection(synthetic())
    assert found["pairs"] == 3  # (0,3), (1,3), (2,3)
    assert found["recall"] == pytest.approx(1 / 3)
    assert found["precision"] == 1.0
    assert found["recall_ever"] == pytest.approx(1 / 3)
    assert found["recall_within_5"] == pytest.approx(1 / 3)  # flagged at round 1
    assert found["precision_ever"] == pytest.approx(1 / 2)  # (0,3) right, (2,1) wrong
    assert found["first_flag_round"] == 1
    assert found["false_positive_peers"] == pytest.approx(1 / 3)  # peer 1 of {0, 1, 2}
    assert found["false_positive_pairs_final"] == 0.0
    assert found["false_positive_peers_final"] == 0.0  # peer 1 is flagged in round 0 only


def test_detection_without_attackers_has_no_recall() -> None:
    result = synthetic(attack="none")
    honest_run = RunResult(**{**result.__dict__, "byzantine": (), "scenario": Scenario(
        nodes=4, rounds=2, topology="complete")})
    found = detection(honest_run)
    assert found["pairs"] == 0
    assert found["recall"] is None
    assert found["false_positive_peers"] == pytest.approx(2 / 4)  # peers 1 and 3 of four


def test_scorecard_per_round_figures_and_json() -> None:
    card = scorecard(synthetic())
    assert card["accuracy"]["honest_mean"] == pytest.approx([0.45, (0.9 + 0.7 + 0.95) / 3])
    assert card["accuracy"]["honest_min"] == pytest.approx([0.4, 0.7])
    assert card["accuracy"]["byzantine_mean"] == pytest.approx([0.1, 0.1])
    assert card["final"]["consensus"] == 0.5
    assert card["traffic"]["bytes_in_per_node_round"] == pytest.approx(250 / 2)
    assert card["traffic"]["bytes_out_per_node_round"] == pytest.approx(25)
    assert card["reputation"][0] == [None, 0.6, 0.6, 0.0]
    json.dumps(card, allow_nan=False)  # NaN-free


def test_exposed_honest_nodes_have_no_honest_majority() -> None:
    # Path 0 - 1 - 2 - 3 with 1 and 3 Byzantine: 0 sees only 1, 2 sees only 1 and 3.
    result = synthetic()
    path = RunResult(**{**result.__dict__, "byzantine": (1, 3), "edges": ((0, 1), (1, 2), (2, 3))})
    assert exposed_honest(path) == [0, 2]
    assert exposed_honest(synthetic()) == []  # complete graph of 4, one attacker


def test_false_positives_among_sheltered_peers_leave_out_the_exposed() -> None:
    # Path 0 - 1 - 2 - 3 with 3 Byzantine: 2 sees 1 and 3, so it is exposed.
    w = 0.6
    weights = (
        ({1: w}, {1: w}),
        ({0: w, 2: 0.0}, {0: w, 2: w}),  # 1 flags the exposed 2 in round 0
        ({1: w, 3: w}, {1: w, 3: 0.0}),
        ({2: w}, {2: w}),
    )
    result = RunResult(**{**synthetic().__dict__, "edges": ((0, 1), (1, 2), (2, 3)), "weights": weights})
    found = detection(result)
    assert found["false_positive_peers"] == pytest.approx(1 / 3)  # 2 of {0, 1, 2}
    assert found["false_positive_peers_sheltered"] == 0.0  # of {0, 1}
    flagged_sheltered = (weights[0], ({0: 0.0, 2: w}, {0: w, 2: w}), *weights[2:])
    found = detection(RunResult(**{**result.__dict__, "weights": flagged_sheltered}))
    assert found["false_positive_peers_sheltered"] == pytest.approx(1 / 2)  # 0 of {0, 1}
    assert found["false_positive_peers_final"] == 0.0  # both flags were lifted


def test_false_positives_at_the_end_count_peers_still_flagged_in_the_last_round() -> None:
    # Path 0 - 1 - 2 - 3 with 3 Byzantine: 1 flags 2 in the last round, 0 flags 1 only in round 0.
    w = 0.6
    weights = (({1: 0.0}, {1: w}), ({0: w, 2: w}, {0: w, 2: 0.0}), ({1: w, 3: w}, {1: w, 3: 0.0}), ({2: w}, {2: w}))
    result = RunResult(**{**synthetic().__dict__, "edges": ((0, 1), (1, 2), (2, 3)), "weights": weights})
    found = detection(result)
    assert found["false_positive_peers"] == pytest.approx(2 / 3)  # 1 and 2 of {0, 1, 2}
    assert found["false_positive_peers_final"] == pytest.approx(1 / 3)  # 2 only
    assert found["recall"] == 1.0  # (2, 3)


def test_byzantine_weight_share_is_the_attackers_part_of_each_observers_neighbour_weight() -> None:
    # Path 0 - 1 - 2 - 3 with 3 Byzantine: only 2 has a Byzantine neighbour.
    weights = (({1: 0.6},), ({0: 0.6, 2: 0.6},), ({1: 0.6, 3: 0.2},), ({2: 0.6},))
    result = RunResult(**{**synthetic().__dict__, "edges": ((0, 1), (1, 2), (2, 3)), "weights": weights})
    found = detection(result)
    assert found["recall"] == 0.0  # 3 keeps a little weight: not flagged...
    assert found["byzantine_weight_share"] == pytest.approx(0.2 / 0.8)  # ...but a quarter of 2's mix
    flagged = (*weights[:2], ({1: 0.6, 3: 0.0},), weights[3])
    assert detection(RunResult(**{**result.__dict__, "weights": flagged}))["byzantine_weight_share"] == 0.0
    honest_run = RunResult(**{**result.__dict__, "byzantine": ()})
    assert detection(honest_run)["byzantine_weight_share"] is None


def test_nan_consensus_becomes_null() -> None:
    result = synthetic()
    card = scorecard(RunResult(**{**result.__dict__, "consensus": (math.nan, math.nan)}))
    assert card["consensus"] == [None, None]
    json.dumps(card, allow_nan=False)


def test_reputation_matrix_uses_the_last_recorded_round() -> None:
    matrix = reputation_matrix(synthetic())
    assert matrix[2][1] == 0.6
    assert matrix[0][3] == 0.0
    assert matrix[1][1] is None


def test_consensus_distance_is_mean_squared_distance_to_the_average() -> None:
    vectors = [torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])]
    # mean (1, 1); squared distances 2, 2, 4
    assert consensus_distance(vectors) == pytest.approx(8 / 3)
    assert consensus_distance([vectors[0]] * 3) == 0.0


def test_grid_summary_spreads_over_seeds() -> None:
    cards = [scorecard(synthetic(seed=s, final=f)) for s, f in ((0, 0.9), (1, 0.8))]
    cards.append(scorecard(synthetic(seed=0, final=0.5, attack="gaussian")))
    summary = grid_summary(cards)
    assert summary["attacks"] == ["sign_flip", "gaussian"]
    cell = summary["cells"][0]
    means = [(0.9 + 0.7 + 0.95) / 3, (0.8 + 0.6 + 0.85) / 3]
    assert cell["accuracy_mean"] == pytest.approx(sum(means) / 2)
    assert cell["accuracy_spread"] == pytest.approx(abs(means[0] - means[1]) / 2)
    assert cell["seeds"] == [0, 1]
    text = grid_table(summary)
    assert "sign_flip" in text
    assert f"{sum(means) / 2:.3f}±" in text


def test_plots_write_pngs(tmp_path: Path) -> None:
    card = scorecard(synthetic())
    paths = [
        plot_accuracy(card, tmp_path / "acc.png"),
        plot_reputation(card, tmp_path / "rep.png"),
        plot_grid(grid_summary([card]), tmp_path / "grid.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
        assert path.stat().st_size > 5000
