"""Sweep attack strengths over one grid's base scenario; print a markdown table.

Usage: python benchmarks/attack_sweep.py [--grid examples/scenarios/robustness_grid.toml]
       [--out sim-out/attack_sweep] [--jobs 2] [--seeds 3] [--only LABEL,...]

Each variant is (rule, attack, params), run for every seed on the grid file's base
scenario (its rules and attacks lists are ignored). Finished runs are kept in
``OUT/runs/<label>__seed<S>.json`` and not run again, so an interrupted sweep resumes.
The table (one row per variant, over seeds): final honest mean (mean +- population sd),
worst honest node (mean over seeds, and the lowest), worst class by honest mean (mean
over seeds, and the class most often worst), the worst (honest node, class) pair, and
the share of (honest observer, attacker) pairs flagged (weight 0) at the end and ever.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

DEFAULT = "clipped_gossip"
# (rule, attack, params): the defaults, then each attack's strength parameter.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    (DEFAULT, "none", {}),
    *[(DEFAULT, "ipm", {"eps": eps}) for eps in (0.1, 0.5, 1.0, 2.0)],
    (DEFAULT, "ipm", {"eps": 0.5, "space": "update"}),
    *[(DEFAULT, a, {"perturbation": p}) for a in ("min_max", "min_sum") for p in ("std", "unit", "sign")],
    *[(DEFAULT, "clip_aware", {"margin": m}) for m in (0.95, 1.5, 3.0)],
    *[(DEFAULT, "boiling_frog", {"step": s}) for s in (0.1, 0.3, 1.0)],
    (DEFAULT, "targeted_flip", {}),
    ("mean", "ipm", {"eps": 0.5}),
    *[("mean", a, {}) for a in ("min_max", "min_sum", "clip_aware", "boiling_frog", "targeted_flip")],
]


def label(rule: str, attack: str, params: Mapping[str, Any]) -> str:
    """Return a file-name-safe label: ``rule__attack[_key-value...]``."""
    return "__".join([rule, "_".join([attack, *(f"{k}-{v}" for k, v in sorted(params.items()))])])


def _one(grid: str, rule: str, attack: str, params: dict[str, Any], seed: int) -> str:
    import torch

    from p2pfl.sim.runner import run_scenario
    from p2pfl.sim.scenario import load_grid
    from p2pfl.sim.scorecard import scorecard

    torch.set_num_threads(1)
    base = load_grid(grid).base
    scenario = replace(base, rule=rule, rule_params={}, attack=attack, attack_params=params,
                       byzantine=0 if attack == "none" else base.byzantine)
    return json.dumps(scorecard(run_scenario(scenario, seed)), allow_nan=False)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def row(name: str, cards: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table row over the seeds' scorecards."""
    finals = [c["final"] for c in cards]
    means = [f["honest_mean"] for f in finals]
    mins = [f["honest_min"] for f in finals]
    worst = [f["worst_class"] for f in finals if f.get("worst_class") is not None]
    worst_node = [f["worst_node_class"] for f in finals if f.get("worst_node_class") is not None]
    klass = Counter(f.get("worst_class_index") for f in finals).most_common(1)[0][0]
    recall = [c["detection"]["recall"] for c in cards if c["detection"]["recall"] is not None]
    ever = [c["detection"]["recall_ever"] for c in cards if c["detection"]["recall_ever"] is not None]
    fp = [c["detection"]["false_positive_peers"] for c in cards
          if c["detection"]["false_positive_peers"] is not None]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return (f"| {name} | {len(cards)} | {_fmt(mean(means))} ± {statistics.pstdev(means):.3f} | "
            f"{_fmt(mean(mins))} ({_fmt(min(mins))}) | {_fmt(mean(worst))} (class {klass}) | "
            f"{_fmt(mean(worst_node))} | {_fmt(mean(recall))} / {_fmt(mean(ever))} | {_fmt(mean(fp))} |")


HEADER = ("| rule / attack | seeds | honest mean ± sd | worst honest node (lowest) | "
          "worst class (most often) | worst node x class | flagged end / ever | honest flagged |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="examples/scenarios/robustness_grid.toml")
    parser.add_argument("--out", default="sim-out/attack_sweep")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated labels to run (default all)")
    args = parser.parse_args(argv)
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, args.only.split(",")))
    variants = [v for v in VARIANTS if not wanted or label(*v) in wanted]
    todo = [(v, s) for v in variants for s in range(args.seeds)
            if not (runs / f"{label(*v)}__seed{s}.json").exists()]
    print(f"{len(todo)} runs to do", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_one, args.grid, *v, s): (v, s) for v, s in todo}
        for future, (v, s) in futures.items():
            card = future.result()
            (runs / f"{label(*v)}__seed{s}.json").write_text(card + "\n")
            print(f"{label(*v)} seed {s}: {json.loads(card)['final']['honest_mean']:.3f}", flush=True)
    print(HEADER)
    for v in variants:
        cards = [json.loads(p.read_text()) for s in range(args.seeds)
                 if (p := runs / f"{label(*v)}__seed{s}.json").exists()]
        if cards:
            print(row(label(*v).replace("__", " / "), cards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
