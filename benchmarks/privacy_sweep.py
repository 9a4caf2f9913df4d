"""Accuracy and honest false positives vs the privacy budget; print a markdown table.

Usage: python benchmarks/privacy_sweep.py [--scenario examples/scenarios/privacy.toml]
       [--out sim-out/privacy_sweep] [--jobs 1] [--seeds 2] [--only LABEL,...]

Every (epsilon, partition, attack) of the grid below runs for every seed on the base
scenario (8 digits nodes, 10 rounds, clipped_gossip; attackers: 2 of 8, no DP). Finished
runs are kept in ``OUT/runs/<label>__seed<S>.json`` and not run again, so an interrupted
sweep resumes. Columns, over seeds: final honest mean accuracy (mean +- population sd),
the worst honest node's, the share of honest peers an honest neighbour ever zeroed
(false positives), and the share of (honest observer, attacker) pairs zeroed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

EPSILONS: tuple[float | None, ...] = (1.0, 4.0, 8.0, None)  # None: no DP
PARTITIONS = ("iid", "dirichlet")  # Dirichlet alpha 0.5
ATTACKS: tuple[tuple[str, dict[str, Any]], ...] = (("none", {}), ("sign_flip", {}), ("ipm", {}))
BYZANTINE = 2


def label(epsilon: float | None, partition: str, attack: str) -> str:
    """Return a file-name-safe label."""
    return f"eps-{'none' if epsilon is None else f'{epsilon:g}'}__{partition}__{attack}"


def _one(path: str, epsilon: float | None, partition: str, attack: str, params: dict[str, Any],
         seed: int) -> str:
    import torch

    from p2pfl.sim.runner import run_scenario
    from p2pfl.sim.scenario import load_scenario
    from p2pfl.sim.scorecard import scorecard

    torch.set_num_threads(1)
    base = load_scenario(path)
    privacy = None if epsilon is None or base.privacy is None else replace(base.privacy, epsilon=epsilon)
    scenario = replace(base, privacy=privacy, partition=partition, alpha=0.5, attack=attack,
                       attack_params=params, byzantine=0 if attack == "none" else BYZANTINE)
    return json.dumps(scorecard(run_scenario(scenario, seed)), allow_nan=False)


def _stats(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    spread = statistics.pstdev(known) if len(known) > 1 else 0.0
    return f"{statistics.fmean(known):.3f} +- {spread:.3f}"


def table(cards: Mapping[str, list[dict[str, Any]]]) -> str:
    """Render one row per (epsilon, partition, attack) over its seeds."""
    rows = ["| epsilon | partition | attack | honest mean | honest min | honest FP peers | attackers zeroed |",
            "|---|---|---|---|---|---|---|"]
    for key, group in cards.items():
        eps, partition, attack = key.split("__")
        det = [c["detection"] for c in group]
        recall = _stats([d["recall"] for d in det]) if attack != "none" else "-"
        rows.append(f"| {eps.removeprefix('eps-')} | {partition} | {attack} | "
                    f"{_stats([c['final']['honest_mean'] for c in group])} | "
                    f"{_stats([c['final']['honest_min'] for c in group])} | "
                    f"{_stats([d['false_positive_peers'] for d in det])} | {recall} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep (resuming) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="examples/scenarios/privacy.toml")
    parser.add_argument("--out", type=Path, default=Path("sim-out/privacy_sweep"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated labels to run")
    args = parser.parse_args(argv)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    todo = [(e, p, a, params, s) for e in EPSILONS for p in PARTITIONS for a, params in ATTACKS
            for s in range(args.seeds) if not only or label(e, p, a) in only]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        pending = {}
        for e, p, a, params, s in todo:
            path = runs / f"{label(e, p, a)}__seed{s}.json"
            if not path.exists():
                pending[pool.submit(_one, args.scenario, e, p, a, params, s)] = path
        for future, path in pending.items():
            path.write_text(future.result())
            print(f"done {path.name}", file=sys.stderr, flush=True)
    cards: dict[str, list[dict[str, Any]]] = {}
    for e, p, a, _, s in todo:
        path = runs / f"{label(e, p, a)}__seed{s}.json"
        cards.setdefault(label(e, p, a), []).append(json.loads(path.read_text()))
    print(table(cards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
