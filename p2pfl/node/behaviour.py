"""How a node presents itself to the network: honest by default, replaceable for attacks.

A test network or simulation swaps in a subclass (see ``p2pfl.attacks``) to make a node
Byzantine while every other part of the Node stays the same code the daemon runs. A
behaviour never sees the node: it crafts from a :class:`PeerView` (what the node
legitimately received) and sends through the node's :class:`~p2pfl.node.outbox.Outbox`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from p2pfl.core.state import State
from p2pfl.node.outbox import Outbox


class PeerView(Protocol):
    """Read-only: what a node has legitimately received from its neighbours."""

    @property
    def peer_id(self) -> str:
        """The observing node's own id."""
        ...

    def neighbour_states(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The freshest verified model held from each peer, by peer id."""
        ...


class Behaviour:
    """The honest behaviour: announce the model we trained."""

    name: str | None = None  # attack name shown in statistics; None for honest nodes
    # A modified client may publish announcements its own validator would refuse (forged
    # signers); honest nodes never do, so the node rejects its own invalid publishes.
    publishes_invalid: bool = False

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the state to announce this round, given the honestly trained one."""
        return own

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        """Sign, serve and announce ``state`` as our update of ``round``."""
        await outbox.announce(round, state, samples)

    async def reannounce(self, outbox: Outbox, round: int) -> None:
        """Repeat this round's announcement (gossip is lossy)."""
        await outbox.reannounce(round)
