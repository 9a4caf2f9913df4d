"""Lockstep search: seeded runs of small lossy networks; which run rounds at the deadline.

A network in lockstep runs every round to the round deadline (tests/node/test_lockstep.py
has the mechanism: a node first hears of a neighbour that is two rounds ahead). Each seed
runs the nodes' own code on the memory transport under a mock clock: NODES all linked but
for one edge, which appears while one of its ends trains a slow round (so it first hears of
the other end late, maybe two rounds ahead), seeded training times, quorum 1.0 and announcement LOSS.
A run is in lockstep when some node ends LOCKSTEP rounds in a row at the deadline.

usage: python benchmarks/lockstep_search.py [RUNS=12] [LOSS=0.05] [NODES=4] [ROUNDS=20]
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import trio
import trio.testing

from p2pfl.core.crypto import Identity
from p2pfl.core.state import State
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.net.memory import LinkProfile, MemoryNetwork
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.config import NodeConfig, RoundConfig
from p2pfl.node.node import Node
from p2pfl.node.outbox import Outbox

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.node.test_node_memory import run_all

torch.set_num_threads(1)
DEADLINE = 4.0
AT_DEADLINE = 0.9 * DEADLINE  # a round this long waited for the deadline
LOCKSTEP = 4  # rounds in a row at the deadline at one node: a lost announcement costs 1 s, not 4 x 4


class Trains(Behaviour):
    """Honest, with a seeded training time (mock seconds) per round and, at one node, one
    slow round during which the late edge appears (``link``)."""

    def __init__(self, rng: random.Random, rounds: int, link: Callable[[], None] | None = None) -> None:
        self.seconds = [rng.uniform(0.05, 0.3)] * rounds
        self.slow, self.extra, self.linked_after = rng.randrange(1, 5), rng.uniform(0.5, 2.0), rng.random()
        self.link = link

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        await trio.sleep(self.seconds[round])
        if self.link is not None and round == self.slow:
            await trio.sleep(self.extra * self.linked_after)
            self.link()
            await trio.sleep(self.extra * (1 - self.linked_after))
        await outbox.announce(round, state, samples)


def node(network: MemoryNetwork, identity: Identity, index: int, n: int, behaviour: Behaviour) -> Node:
    config = NodeConfig(network_id="lockstep", rounds=RoundConfig(round_timeout=DEADLINE, quorum=1.0))
    learner = make_digits_learner(node_index=index, num_nodes=n, seed=0)
    return Node(config, learner, identity=identity, offload=False, behaviour=behaviour,
                transport=lambda validator: network.open_transport(identity.peer_id, validator))


async def run(seed: int, loss: float, n: int, rounds: int) -> list[list[float]]:
    """One run; return each node's round durations."""
    rng = random.Random(seed)
    ids = [Identity.from_secret(bytes([seed % 250 + 1, i + 1]) * 16) for i in range(n)]
    peers = [i.peer_id for i in ids]
    network = MemoryNetwork(link=LinkProfile(latency=0.01, bandwidth=50e6, loss=loss), seed=seed)
    a, b = rng.sample(range(n), 2)  # every pair linked but a-b, which appears while a is slow
    for x in range(n):
        for y in range(x + 1, n):
            if {x, y} != {a, b}:
                network.connect(peers[x], peers[y])

    def link() -> None:
        network.connect(peers[a], peers[b])

    nodes = [node(network, ident, i, n, Trains(rng, rounds, link if i == a else None)) for i, ident in enumerate(ids)]
    await run_all(nodes, rounds)  # each keeps serving until every node is done, as daemons do
    return [[r.duration for r in member.statistics().history] for member in nodes]


def longest_at_deadline(durations: list[float]) -> int:
    """The most consecutive rounds that ended at the deadline."""
    longest = streak = 0
    for duration in durations:
        streak = streak + 1 if duration >= AT_DEADLINE else 0
        longest = max(longest, streak)
    return longest


def main(runs: int, loss: float, n: int, rounds: int) -> None:
    locked = total = 0
    for seed in range(runs):
        started = time.time()
        durations = trio.run(run, seed, loss, n, rounds, clock=trio.testing.MockClock(autojump_threshold=0))
        at_deadline = [sum(d >= AT_DEADLINE for d in h) for h in durations]
        streak = max(longest_at_deadline(h) for h in durations)
        stuck = streak >= LOCKSTEP
        locked += stuck
        total += sum(at_deadline)
        print(f"seed {seed}: rounds at the deadline per node {at_deadline}, longest streak {streak}"
              f"{'  LOCKSTEP' if stuck else ''} ({time.time() - started:.0f} s)", flush=True)
    print(f"{locked} of {runs} runs in lockstep; {total} of {runs * n * rounds} node-rounds at the deadline "
          f"(loss {loss}, {n} nodes, {rounds} rounds)")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 12, float(args[1]) if len(args) > 1 else 0.05,
         int(args[2]) if len(args) > 2 else 4, int(args[3]) if len(args) > 3 else 20)
