"""Can an honest node tell a label flipper from an honest neighbour with other classes?

Usage: python benchmarks/label_flip_signals.py [--seed 0] [--rounds 30]

Runs the attack grid's label_flip scenario (16 nodes, random 4-regular, Dirichlet(0.5),
4 flippers, clipped_gossip) in the simulator and, every round, at every honest node,
scores every neighbour's model four ways on what that node has (its own data and the
models it receives):

- ``class_loss``: the neighbour's per-class loss on our data, worst class;
- ``class_mix_rise``: per-class loss rise when mixed into ours at 1/5, worst class;
- ``relabel_gain``: accuracy of its predictions on our data under the best relabelling
  (Hungarian assignment) minus under the identity: a flipper's predictions are a
  permutation of the truth;
- ``row_swap``: data-free: how much better its last-layer change since the previous
  round lines up with *other* classes' rows of our model than with its own rows.

It prints, per signal, how many (observer, flipper) pairs average above the honest
pairs' 95th percentile over rounds 10 and later, and the same per round. The node code
is instrumented by wrapping ``Node._aggregate``; nothing else changes.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from p2pfl.node.node import Node
from p2pfl.sim import runner
from p2pfl.sim.scenario import load_grid
from p2pfl.sim.topology import make_topology, place_byzantine

SIGNALS = ("class_loss", "class_mix_rise", "relabel_gain", "row_swap")
Scores = dict[str, float]


def last_layer(state: Mapping[str, torch.Tensor], classes: int) -> torch.Tensor:
    name = [k for k, v in state.items() if v.ndim == 2 and v.shape[0] == classes][-1]
    return state[name].float()


def row_swap(change: torch.Tensor, rows: torch.Tensor) -> float:
    """Best-assignment gain of cos(change_r, centred row_c) over the identity."""
    centred = rows - rows.mean(0, keepdim=True)
    a = change / (change.norm(dim=1, keepdim=True) + 1e-12)
    b = centred / (centred.norm(dim=1, keepdim=True) + 1e-12)
    m = (a @ b.T).numpy()
    r, c = linear_sum_assignment(-m)
    return float(m[r, c].sum() - np.trace(m))


class Observer:
    """Scores every honest node's neighbours each round."""

    def __init__(self, byzantine: set[str], classes: int) -> None:
        self.byzantine, self.classes = byzantine, classes
        self.rows: list[tuple[int, str, str, Scores]] = []  # round, observer, peer, scores
        self.previous: dict[tuple[str, str], torch.Tensor] = {}

    def data(self, node: Node) -> tuple[torch.Tensor, torch.Tensor, Callable[..., Any]]:
        inner = node.learner.inner  # type: ignore[attr-defined]
        xs, ys = zip(*inner.train_loader, strict=True)
        model = inner.model
        return torch.cat(xs), torch.cat(ys), lambda s, x: torch.func.functional_call(model, dict(s), (x,))

    def score(self, number: int, node: Node, own: Mapping[str, torch.Tensor]) -> None:
        if node.peer_id in self.byzantine:
            return
        x, y, call = self.data(node)
        present = [c for c in range(self.classes) if int((y == c).sum()) >= 10]
        loss = torch.nn.functional.cross_entropy
        with torch.inference_mode():
            own_loss = loss(call(own, x), y, reduction="none")
            for peer, state in node.neighbour_states().items():
                out = call(state, x)
                their = loss(out, y, reduction="none")
                mix = {k: own[k] + (state[k] - own[k]) * 0.2 for k in own}
                mixed = loss(call(mix, x), y, reduction="none")
                confusion = np.zeros((self.classes, self.classes))
                np.add.at(confusion, (y.numpy(), out.argmax(1).numpy()), 1)
                r, c = linear_sum_assignment(-confusion)
                scores = {
                    "class_loss": max(float((their - own_loss)[y == k].mean()) for k in present),
                    "class_mix_rise": max(float((mixed - own_loss)[y == k].mean()) for k in present),
                    "relabel_gain": float(confusion[r, c].sum() - np.trace(confusion)) / len(y),
                }
                rows = last_layer(state, self.classes)
                before = self.previous.get((node.peer_id, peer))
                if before is not None:
                    scores["row_swap"] = row_swap(rows - before, last_layer(own, self.classes))
                self.previous[(node.peer_id, peer)] = rows
                self.rows.append((number, node.peer_id, peer, scores))

    def report(self, first: int) -> None:
        print(f"pairs: per-pair mean over rounds >= {first}; bar = honest pairs' p95")
        print(f"{'signal':16} {'flippers above':>15} {'per round':>10}")
        for signal in SIGNALS:
            pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
            for number, observer, peer, scores in self.rows:
                if number >= first and signal in scores:
                    pairs[(observer, peer)].append(scores[signal])
            honest = [statistics.mean(v) for k, v in pairs.items() if k[1] not in self.byzantine]
            flips = [statistics.mean(v) for k, v in pairs.items() if k[1] in self.byzantine]
            bar = float(np.percentile(honest, 95))
            per_round_h = [s for k, v in pairs.items() if k[1] not in self.byzantine for s in v]
            per_round_f = [s for k, v in pairs.items() if k[1] in self.byzantine for s in v]
            round_bar = float(np.percentile(per_round_h, 95))
            above = sum(f > bar for f in flips)
            rate = float(np.mean(np.array(per_round_f) > round_bar))
            print(f"{signal:16} {above:>9} / {len(flips):<3} {rate:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    grid = load_grid(Path(__file__).parents[1] / "examples/scenarios/attack_grid.toml")
    scenario = replace(grid.cell("clipped_gossip", "label_flip"), rounds=args.rounds)
    graph = make_topology(scenario.topology, scenario.nodes, args.seed, **dict(scenario.topology_params))
    placed = place_byzantine(graph, scenario.byzantine, scenario.placement, args.seed)
    byzantine = {runner.identity_for(args.seed, i).peer_id for i in placed}
    observer = Observer(byzantine, classes=10)
    aggregate = Node._aggregate

    async def instrumented(node: Node, number: int, own: dict[str, torch.Tensor], samples: int) -> int:
        observer.score(number, node, own)
        return await aggregate(node, number, own, samples)

    Node._aggregate = instrumented  # type: ignore[method-assign]
    runner.run_scenario(scenario, args.seed)
    observer.report(first=min(10, args.rounds // 3))


if __name__ == "__main__":
    main()
