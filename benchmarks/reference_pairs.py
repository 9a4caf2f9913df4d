"""Can the reference set tell label flippers from honest non-IID neighbours, pair by pair?

Usage: python benchmarks/reference_pairs.py [--attack label_flip] [--seeds 0,1,2] [--from-round 5]

Runs the reference grid's cell (examples/scenarios/reference_grid.toml: 16 nodes, random
4-regular, Dirichlet(0.5), 4 random Byzantine, 20 reference digits per class, the default
defence) for each seed. At every honest node, every round, for every neighbour it records
what the reference set can say: the leave-one-out gain the gate judged, and on the first
pass of the gate (every neighbour at its full share) the gain per class, and the
neighbour's own model's class-balanced loss against ours before and after local training
and against the best neighbour's. Each signal is averaged per (observer, neighbour) pair
over the rounds from ``--from-round``; the table gives the honest pairs' 95th percentile,
the Byzantine pairs' 10th and 50th, and the share of Byzantine pairs above that 95th
percentile ("recall at 5%": what a threshold that spares 95% of honest pairs would catch).
Figures: docs/RESULTS.md, "Reference set".
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import p2pfl.node.mixer as mixer_module
import p2pfl.node.node as node_module
from p2pfl.node.harm import full_shares, mixed
from p2pfl.node.reference import ReferenceGate, balanced_loss
from p2pfl.sim.runner import identity_for, run_scenario
from p2pfl.sim.scenario import load_grid

GRID = Path(__file__).resolve().parents[1] / "examples" / "scenarios" / "reference_grid.toml"

Row = dict[str, Any]


def _delta(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] if a[k].is_floating_point() else a[k] for k in a}


def _signals(gate: ReferenceGate, own: Any, start: Any, states: Sequence[Any], shares: Sequence[float]) -> list[Row]:
    """Per neighbour: class gains of leaving it out of the full mix, and its model's losses."""
    deltas = [_delta(mixed(own, state, share), own) for state, share in zip(states, shares, strict=True)]
    full = {k: own[k] + sum(d[k] for d in deltas) if own[k].is_floating_point() else own[k] for k in own}
    withouts = [_delta(full, d) for d in deltas]
    scores = gate.scorer.score_classes([full, *withouts, start, own, *states], gate.reference)
    n = len(states)
    mix, rest = scores[0], scores[1 : 1 + n]
    before, after, alone = scores[1 + n], scores[2 + n], scores[3 + n :]
    best = min(balanced_loss(s) for s in alone)
    rows = []
    for without, model in zip(rest, alone, strict=True):
        class_gains = [m - w for m, w in zip(mix.loss, without.loss, strict=True)]
        rows.append({
            "class_gains": class_gains,
            "vs_start": balanced_loss(model) - balanced_loss(before),
            "vs_own": balanced_loss(model) - balanced_loss(after),
            "vs_best": balanced_loss(model) - best,
        })
    return rows


def record(seed: int, attack: str) -> tuple[set[int], list[Row]]:
    """Run one seed of the grid's cell; return the Byzantine nodes and one row per judged pair."""
    cell = load_grid(GRID).cell("clipped_gossip", attack)
    index = {identity_for(seed, i).peer_id: i for i in range(cell.nodes)}
    rows: list[Row] = []
    now: dict[str, Any] = {}
    node_init, mix, judge = node_module.Node.__init__, mixer_module.Mixer.mix, ReferenceGate.judge

    def tagged_init(self: Any, *args: Any, **kwargs: Any) -> None:
        node_init(self, *args, **kwargs)
        self._mixer.observer = index.get(self.peer_id)

    async def watched_mix(self: Any, number: int, own: Any, start: Any, updates: Any, samples: int) -> Any:
        now.update(observer=getattr(self, "observer", None), round=number, start=start,
                   senders=[index.get(u.sender) for u in updates])
        return await mix(self, number, own, start, updates, samples)

    def watched_judge(self: ReferenceGate, own: Any, states: Any, weights: Any, self_weight: float, floor: float) -> Any:
        verdict = judge(self, own, states, weights, self_weight, floor)
        if not states:
            return verdict
        extra = _signals(self, own, now["start"], states, full_shares(weights, self_weight))
        gains = [g if g == g else float("inf") for g in verdict.gain]
        for sender, gain, more in zip(now["senders"], gains, extra, strict=True):
            others = statistics.median(gains)
            rows.append({"observer": now["observer"], "sender": sender, "round": now["round"],
                         "gain": gain, "gain_vs_median": gain - others, **more})
        return verdict

    node_module.Node.__init__ = tagged_init  # type: ignore[method-assign]
    mixer_module.Mixer.mix = watched_mix  # type: ignore[method-assign]
    ReferenceGate.judge = watched_judge  # type: ignore[method-assign]
    try:
        result = run_scenario(cell, seed)
    finally:
        node_module.Node.__init__ = node_init  # type: ignore[method-assign]
        mixer_module.Mixer.mix = mix  # type: ignore[method-assign]
        ReferenceGate.judge = judge  # type: ignore[method-assign]
    bad = set(result.byzantine)
    return bad, [r for r in rows if r["observer"] not in bad]


SIGNALS: dict[str, Callable[[Row], float]] = {
    "leave-one-out balanced gain (the gate's)": lambda r: min(r["gain"], 10.0),
    "the same, minus the median neighbour's": lambda r: min(r["gain_vs_median"], 10.0),
    "model's balanced loss above ours before training": lambda r: r["vs_start"],
    "... above our own trained model": lambda r: r["vs_own"],
    "... above the best neighbour's model": lambda r: r["vs_best"],
    "leave-one-out, positive class gains only": lambda r: sum(max(g, 0.0) for g in r["class_gains"]) / 10,
    "the class it helps most (higher: helps more)": lambda r: -min(r["class_gains"]),
}


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attack", default="label_flip")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--from-round", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs: dict[tuple[int, int, int, bool], list[Row]] = defaultdict(list)
    for seed in (int(s) for s in args.seeds.split(",")):
        bad, rows = record(seed, args.attack)
        print(f"seed {seed}: {len(rows)} judged pairs-rounds, Byzantine {sorted(bad)}", flush=True)
        for r in rows:
            if r["round"] >= args.from_round:
                pairs[seed, r["observer"], r["sender"], r["sender"] in bad].append(r)
    print(f"\n{args.attack}, seeds {args.seeds}, pair means over rounds >= {args.from_round}")
    print(f"{'signal':52s} {'honest p95':>10s} {'Byz p10':>8s} {'Byz p50':>8s} {'recall at 5%':>12s}")
    for name, signal in SIGNALS.items():
        means = {key: statistics.fmean(signal(r) for r in rs) for key, rs in pairs.items()}
        honest = [v for key, v in means.items() if not key[3]]
        byz = [v for key, v in means.items() if key[3]]
        bar = _quantile(honest, 0.95)
        caught = sum(1 for v in byz if v > bar) / len(byz) if byz else float("nan")
        print(f"{name:52s} {bar:+10.3f} {_quantile(byz, 0.1):+8.3f} {_quantile(byz, 0.5):+8.3f} {caught:12.2f}")


if __name__ == "__main__":
    main()
