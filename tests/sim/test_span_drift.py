"""The opt-in span check against a made-up drift inside the honest spread (session 14).

`alie` with random signs at z 2 on the robustness gate's setting and seed
(examples/scenarios/ci_robustness.toml): every attacker moves the mean it receives by two
honest standard deviations per coordinate, up or down by one random sign pattern they
share, every round. Without the span check the default ends about 12 points below no
attack on this seed (tests/sim/test_robustness_gate.py runs it); with it, within 9.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from p2pfl.node.config import HarmCheck
from p2pfl.sim.cli import scorecards
from p2pfl.sim.scenario import NO_ATTACK, load_grid

GRID = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "ci_robustness.toml"
WITHIN = 0.09


def test_the_span_check_holds_a_made_up_drift_near_no_attack() -> None:
    grid = load_grid(GRID)
    seed = grid.base.seeds[0]
    on = HarmCheck(span_low=3.0)
    attacks = (NO_ATTACK, "alie")
    runs = [(replace(grid.cell("clipped_gossip", a), harm_check=on), seed) for a in attacks]
    results = {
        attack: card["final"]["honest_mean"]
        for attack, card in zip(attacks, scorecards(runs, jobs=2), strict=True)
    }
    assert grid.attack_params["alie"]["signs"] == "random"
    assert results["alie"] > results[NO_ATTACK] - WITHIN
