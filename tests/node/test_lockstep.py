"""A node a round behind must not hold the others to the round deadline (quorum 1.0).

Seen in the namespace NAT runs (docs/benchmarks/nat.txt, note (*)): one node a round
behind, every round then 4 s (the deadline) with every update used. The mechanism, as
reproduced here: node 0 first hears of node 3 when node 3 is two rounds ahead, so in its
round r it aggregates node 3's update of round r + 2. In its round r + 1 it then waits for
node 3's r + 3, which node 3 only trains once it has closed round r + 2, which needs node
0's r + 2 (quorum 1.0), which node 0 only trains once it has closed r + 1. Node 3's round
deadline breaks the wait (it takes node 0's update of the round before), node 0 takes
node 3's newest, and the cycle starts again: every round at the deadline, for ever.
Catch-up never triggers: only node 3 of node 0's three neighbours is two rounds ahead.

The trigger here: node 3's announcement of round 3 reached node 0 (forwarded) before they
were neighbours and was dropped; its re-announcements are the same bytes, which gossip
deduplicates, so node 0 first hears of node 3 at round 4.

The fix breaks the cycle at its root: a round uses a neighbour's update of at most the
next round (``Inbox.take``); one from further ahead still counts toward the quorum (its
author is ahead, not absent) and is used in our next round. A round then never waits for
an update its author can only train after ours of a later round. An earlier candidate
(commit 1bc7837) instead counted a neighbour whose later-round update was used already;
in the namespace NAT test it made nodes close many more rounds with 1-2 updates.
"""

from __future__ import annotations

import trio

from p2pfl.core.state import State
from p2pfl.net.memory import MemoryNetwork
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.node import Node
from p2pfl.node.outbox import Outbox
from tests.node.conftest import identities, make_network, make_node
from tests.node.test_node_memory import run_all

DEADLINE = 4.0


class Trains(Behaviour):
    """Honest, with a training time (mock seconds): a 4-node round here is ~0.2 s."""

    def __init__(self, seconds: float, slow: dict[int, float] | None = None) -> None:
        self.seconds, self.slow = seconds, slow or {}

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        await trio.sleep(self.seconds + self.slow.get(round, 0.0))
        await outbox.announce(round, state, samples)


async def test_a_node_a_round_behind_does_not_hold_every_round_to_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ids = identities(4)
    peers = [i.peer_id for i in ids]
    network = make_network(ids, [(a, b) for a, b in zip(peers, peers[1:], strict=False)] +
                           [(peers[0], peers[2]), (peers[1], peers[3])])  # 0-3 comes later
    behaviours = [Trains(0.2, {2: 1.0}), Trains(0.1), Trains(0.1), Trains(0.05)]
    nodes = [make_node(network, ident, i, 4, round_timeout=DEADLINE, behaviour=behaviours[i])
             for i, ident in enumerate(ids)]
    await run_linking(nodes, network, (peers[0], peers[3]), at=1.5, rounds=14)

    for node in nodes:
        history = node.statistics().history
        assert [r.round for r in history] == list(range(14))
        # Before the fix: rounds 4-12 took 4.0-4.1 s each, at every node.
        assert all(r.duration < 1.0 for r in history[4:13]), [round(r.duration, 1) for r in history]
        assert all(r.used == 3 for r in history[4:13])


async def run_linking(nodes: list[Node], network: MemoryNetwork, edge: tuple[str, str], *, at: float,
                      rounds: int) -> None:
    """Run every node for ``rounds`` (serving until all are done); add ``edge`` at ``at``."""

    async def link() -> None:
        await trio.sleep(at)
        network.connect(*edge)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link)
        nursery.start_soon(run_all, nodes, rounds)


async def test_every_round_waits_for_every_neighbour_on_time(autojump_clock: trio.testing.MockClock) -> None:
    """No round closes early: with every neighbour on time, each round uses every update."""
    ids = identities(4)
    network = make_network(ids)  # all linked from the start
    # Node 3 trains for 1 s a round, well within the deadline: everyone waits for it.
    behaviours = [Trains(0.05), Trains(0.1), Trains(0.2), Trains(1.0)]
    nodes = [make_node(network, ident, i, 4, round_timeout=DEADLINE, behaviour=behaviours[i])
             for i, ident in enumerate(ids)]
    await run_all(nodes, 8)

    for node in nodes:
        history = node.statistics().history
        assert [r.used for r in history] == [3] * 8
        assert all(0.99 <= r.duration < 2.0 for r in history), [round(r.duration, 2) for r in history]
