"""How a node presents itself to the network: honest by default, replaceable for attacks.

A test network or simulation swaps in a subclass (see ``p2pfl.attacks``) to make a node
Byzantine while every other part of the Node stays the same code the daemon runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from p2pfl.node.node import Node

State = dict[str, torch.Tensor]


class Behaviour:
    """The honest behaviour: announce the model we trained."""

    name: str | None = None  # attack name shown in statistics; None for honest nodes
    # A modified client may publish announcements its own validator would refuse (forged
    # signers); honest nodes never do, so the node rejects its own invalid publishes.
    publishes_invalid: bool = False

    def craft(self, node: Node, round: int, own: State) -> State:
        """Return the state to announce this round, given the honestly trained one."""
        return own

    async def announce(self, node: Node, round: int, state: State, samples: int) -> None:
        """Sign, serve and announce ``state`` as our update of ``round``."""
        await node.announce_state(round, state, samples)

    async def reannounce(self, node: Node, round: int) -> None:
        """Repeat this round's announcement (gossip is lossy)."""
        await node.reannounce(round)
