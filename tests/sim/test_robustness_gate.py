"""The robustness gate (issue 17): the adaptive attacks on the developers' setting.

Runs examples/scenarios/ci_robustness.toml (16 nodes, random 4-regular, Dirichlet(0.5),
4 random Byzantine, 30 rounds) on seed 0, the hardest of seeds 0-3 for the default
defence, with rules mean and clipped_gossip (the default). Measured at this commit
(final honest mean; docs/RESULTS.md has seeds 0-3 and the strength sweeps):

| attack | mean | default | default: worst node / worst node with an honest majority |
|---|---|---|---|
| none | 0.931 | 0.928 | 0.889 / 0.889 |
| min_max | 0.656 | 0.896 | 0.787 / 0.864 |
| clip_aware | 0.731 | 0.885 | 0.678 / 0.849 |
| boiling_frog | 0.551 | 0.894 | 0.771 / 0.858 (0.578 before shared reach) |
| ipm (eps 0.5) | 0.545 | 0.904 | 0.818 / 0.873 |
| label_flip | 0.771 | 0.805 | 0.618 / 0.729 (0.769 and 0.407 / 0.671 before session 13) |
| targeted_flip | 0.892 | 0.887 | 0.773 / 0.858 |
| alie, random signs, z 2 (session 14) | 0.380 | 0.811 | 0.509 / 0.760 (opt-in span check: 0.856, 0.387 / 0.756) |

The gate holds those within a small margin: the default defence far above plain mean on
the attacks it is built for, within 6 points of no attack (4.3 measured), its nodes with an
honest majority of neighbours within 10 points of the worst node without attack (4.0
measured); on the label flips it is at most a little below plain mean on this seed
(targeted_flip 0.5 points; over seeds 0-2 it is above it): the gate stops it from falling
further. Without attack nobody is flagged (session 13: failures weigh in proportion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pfl.sim.cli import scorecards
from p2pfl.sim.scenario import NO_ATTACK, load_grid

GRID = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "ci_robustness.toml"
DEFENDED = ("min_max", "clip_aware", "boiling_frog", "ipm")
FLIPS = ("label_flip", "targeted_flip")
WITHIN = 0.06  # default under a defended attack: at most this far below no attack
SHELTERED = 0.10  # the lowest honest node with an honest majority of neighbours: at most this
# far below the lowest honest node without attack (issue 17's bar for the worst node)
SURROUNDED = 0.68  # boiling_frog: the node with three attackers of four stays above this
ABOVE_MEAN = 0.05  # ... and at least this far above plain mean under the same attack
JOBS = 2  # one run per core: the 15 runs take half the time
FLIP_SLACK = 0.02  # label flips: at most this far below plain mean (measured 0.012, 0.008)


@pytest.fixture(scope="module")
def cards() -> dict[tuple[str, str], dict[str, Any]]:
    grid = load_grid(GRID)
    seed = grid.base.seeds[0]
    cells = [("clipped_gossip", a) for a in grid.attacks] + [
        ("mean", a) for a in grid.attacks if a != NO_ATTACK
    ]
    runs = [(grid.cell(*cell), seed) for cell in cells]
    return dict(zip(cells, scorecards(runs, jobs=JOBS), strict=True))


def final(cards: dict[tuple[str, str], dict[str, Any]], rule: str, attack: str) -> float:
    value = cards[rule, attack]["final"]["honest_mean"]
    assert value is not None
    return float(value)


def test_without_attack_the_default_learns_and_flags_nobody_for_long(
    cards: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert final(cards, "clipped_gossip", NO_ATTACK) > 0.92
    detection = cards["clipped_gossip", NO_ATTACK]["detection"]
    # Before session 13 one honest peer of 16 fell under the threshold for one round
    # (round 21) of this seed: it failed the harm check by a small margin round after round,
    # each failure capping its trust at 0.5. Failures now weigh in proportion.
    assert detection["false_positive_peers"] == 0.0
    assert detection["false_positive_pairs_final"] == 0.0


@pytest.mark.parametrize("attack", DEFENDED)
def test_nodes_with_an_honest_majority_stay_near_the_worst_node_without_attack(
    cards: dict[tuple[str, str], dict[str, Any]], attack: str
) -> None:
    sheltered = cards["clipped_gossip", attack]["final"]["honest_min_sheltered"]
    assert sheltered is not None
    assert sheltered > cards["clipped_gossip", NO_ATTACK]["final"]["honest_min"] - SHELTERED


@pytest.mark.parametrize("attack", DEFENDED)
def test_the_default_holds_against_the_adaptive_attacks(
    cards: dict[tuple[str, str], dict[str, Any]], attack: str
) -> None:
    defended = final(cards, "clipped_gossip", attack)
    assert defended > final(cards, "clipped_gossip", NO_ATTACK) - WITHIN
    assert defended > final(cards, "mean", attack) + ABOVE_MEAN


@pytest.mark.parametrize("attack", FLIPS)
def test_label_flips_stay_near_plain_mean(
    cards: dict[tuple[str, str], dict[str, Any]], attack: str
) -> None:
    assert final(cards, "clipped_gossip", attack) > final(cards, "mean", attack) - FLIP_SLACK


def test_vetted_attackers_that_surround_a_node_share_one_reach(
    cards: dict[tuple[str, str], dict[str, Any]],
) -> None:
    # boiling_frog's three attackers stay vetted at the node they surround; before shared
    # reach their 8 radii added up and dragged it to 0.578 (docs/DEFENCE.md section 4).
    worst = cards["clipped_gossip", "boiling_frog"]["final"]["honest_min"]
    assert worst is not None
    assert worst > SURROUNDED


def test_a_made_up_drift_inside_the_honest_spread_stays_above_plain_mean(
    cards: dict[tuple[str, str], dict[str, Any]],
) -> None:
    # alie with random signs at z 2 (session 14): every attacker pushes the network the
    # same made-up way each round, inside the honest spread; plain mean collapses. The
    # opt-in span check holds it closer to no attack (tests/sim/test_span_drift.py).
    assert final(cards, "clipped_gossip", "alie") > final(cards, "mean", "alie") + ABOVE_MEAN
