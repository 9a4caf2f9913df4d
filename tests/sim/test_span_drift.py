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
from p2pfl.sim.runner import run_scenario
from p2pfl.sim.scenario import NO_ATTACK, load_grid
from p2pfl.sim.scorecard import scorecard

GRID = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "ci_robustness.toml"
WITHIN = 0.09


def test_the_span_check_holds_a_made_up_drift_near_no_attack() -> None:
    grid = load_grid(GRID)
    seed = grid.base.seeds[0]
    on = HarmCheck(span_low=3.0)
    results = {}
    for attack in (NO_ATTACK, "alie"):
        cell = grid.cell("clipped_gossip", attack)
        results[attack] = scorecard(run_scenario(replace(cell, harm_check=on), seed))["final"]["honest_mean"]
    assert grid.attack_params["alie"]["signs"] == "random"
    assert results["alie"] > results[NO_ATTACK] - WITHIN
