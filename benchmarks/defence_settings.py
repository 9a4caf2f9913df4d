"""The simulator settings of the defence sweeps (benchmarks/defence_sweep.py, defence_trace.py)."""
from dataclasses import replace
from pathlib import Path

from p2pfl.sim.scenario import Scenario, load_grid

# Its [reference] (file and sha256) is the one the sweeps use with ``reference=on``.
REFERENCE_GRID = Path(__file__).resolve().parents[1] / "examples" / "scenarios" / "reference_grid.toml"


def setting(name):
    if name == "reg":   # developers' setting
        return Scenario(name="reg", nodes=16, rounds=30, topology="regular", topology_params={"degree": 4},
                        partition="dirichlet", alpha=0.5, byzantine=4, placement="random")
    if name == "regho":
        # The developers' setting with 20 digits per class held out of every node's data:
        # those make the opt-in reference set (``reference=on`` in defence_sweep.py), so
        # that plain mean, the default and the default with the set see the same data.
        return replace(setting("reg"), name=name, task_options={"holdout": 20})
    if name == "er":
        return Scenario(name="er", nodes=16, rounds=30, topology="erdos_renyi", topology_params={"p": 0.3},
                        partition="dirichlet", alpha=0.5, byzantine=5, placement="random")
    if name == "er_mean" or name == "exp32_mean":
        return replace(setting(name[:-5]), rule="mean")
    if name == "exp32":
        return Scenario(name="exp32", nodes=32, rounds=30, topology="exponential", topology_params={},
                        partition="iid", byzantine=8, placement="random")
    if name == "tn8c":  # the testnet's exact shape: every pair connected, the last two nodes attack
        return Scenario(name=name, nodes=8, rounds=10, topology="complete", partition="dirichlet", alpha=0.5,
                        byzantine=2, placement="last")
    if name in ("tn8", "tn8_30"):  # near the testnet's shape: 8 nodes, 6 neighbours each, 2 random attackers
        return Scenario(name=name, nodes=8, rounds=10 if name == "tn8" else 30, topology="regular",
                        topology_params={"degree": 6}, partition="dirichlet", alpha=0.5, byzantine=2,
                        placement="random")
    # Held out (session 21): shapes, sizes, skews and attacker shares no default was chosen on.
    if name == "torus20":  # a 4 x 5 grid that wraps: four neighbours each, in a fixed pattern
        return Scenario(name=name, nodes=20, rounds=30, topology="torus", topology_params={"rows": 4},
                        partition="dirichlet", alpha=0.5, byzantine=4, placement="random")
    if name == "reg6":  # denser, more skewed data, a quarter attacking
        return Scenario(name=name, nodes=20, rounds=30, topology="regular", topology_params={"degree": 6},
                        partition="dirichlet", alpha=0.3, byzantine=5, placement="random")
    if name == "dumbbell":
        return Scenario(name="dumbbell", nodes=8, rounds=60, topology="dumbbell", partition="halves", byzantine=0)
    raise SystemExit(name)


def with_reference(scenario):
    """``scenario`` with every node scoring its neighbours on the public reference set of
    examples/scenarios/reference_grid.toml (200 digits: run it on ``regho``, which holds
    them out of every node's data)."""
    return replace(scenario, reference=load_grid(REFERENCE_GRID).base.reference)
