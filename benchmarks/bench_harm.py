"""What the harm check, with and without its joint check, costs a node per round.

Run: ``.venv/bin/python benchmarks/bench_harm.py`` (about half a minute, one thread).

For the digits learner of node 0 of 16 (Dirichlet(0.5)) and for the same task with a
wider hidden layer (1024 units, ~77k parameters), with 4 and 7 neighbours, prints the
median time of one local epoch (what a round costs anyway) and of one round's harm check
(``HarmGate.judge``) with ``joint`` off and on, and their ratios: the joint check probes
the whole mix and each neighbour left out of it, one more probe per neighbour and one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from p2pfl.learners.datasets import make_digits_learner
from p2pfl.learners.torch_learner import TorchLearner
from p2pfl.node.config import HarmCheck
from p2pfl.node.harm import HarmGate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learner import median_ms
from bench_span import wide

REPEATS = 15


def measure(name: str, learner: TorchLearner, neighbours: int) -> None:
    own = learner.get_state()
    generator = torch.Generator().manual_seed(0)
    states = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
               for k, v in own.items()} for _ in range(neighbours)]
    senders = [str(i) for i in range(neighbours)]
    weights = [1.0] * neighbours

    def judge(joint: bool) -> float:
        gate = HarmGate(HarmCheck(joint=joint), learner)
        return median_ms(lambda: gate.judge(own, None, senders, states, weights, 1.0), REPEATS)

    epoch = median_ms(lambda: (learner.set_state(own), learner.fit(1)), REPEATS)
    learner.set_state(own)
    alone, joint = judge(False), judge(True)
    size = sum(v.numel() for v in own.values() if v.is_floating_point())
    print(f"{name}, {size} parameters, {neighbours} neighbours | one local epoch {epoch:.1f} ms | "
          f"harm check {alone:.1f} ms, with the joint check {joint:.1f} ms | joint / alone {joint / alone:.2f}, "
          f"with the joint check / epoch {joint / epoch:.2f}")


def main() -> None:
    torch.set_num_threads(1)
    base = make_digits_learner(node_index=0, num_nodes=16, partition="dirichlet", seed=0)
    for neighbours in (4, 7):
        measure("digits (64 hidden)", base, neighbours)
        measure("digits, 1024 hidden", wide(base, 1024), neighbours)


if __name__ == "__main__":
    main()
