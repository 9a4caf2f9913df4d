"""Simulations: many nodes in one process over the memory transport (``p2pfl sim``).

Map of the package:

- ``topology``: seeded graph builders (ring, torus, random regular, Erdos-Renyi,
  dumbbell, exponential, complete) and Byzantine placement.
- ``scenario``: scenario and grid TOML files -> frozen :class:`Scenario` / :class:`Grid`.
- ``runner``: :func:`run_scenario`, one deterministic run on a mock clock.
- ``network``: neighbour-only delivery and shared verification (the speed-ups).
- ``scorecard``: accuracy, consensus distance, detection and traffic of a run; grid tables.
- ``plots``: PNG figures (matplotlib, Agg).
- ``cli``: ``p2pfl sim --scenario FILE | --grid FILE``.
"""

from p2pfl.sim.runner import RunResult, run_scenario
from p2pfl.sim.scenario import Grid, Scenario, load_grid, load_scenario, parse_grid, parse_scenario
from p2pfl.sim.topology import Graph, make_topology, place_byzantine

__all__ = [
    "Graph",
    "Grid",
    "RunResult",
    "Scenario",
    "load_grid",
    "load_scenario",
    "make_topology",
    "parse_grid",
    "parse_scenario",
    "place_byzantine",
    "run_scenario",
]
