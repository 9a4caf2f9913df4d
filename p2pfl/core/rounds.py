"""Round bookkeeping as plain data in, decisions out: admission, quorum, selection.

The node feeds every verified announcement to :func:`admit`, keeps the payloads it
fetched in an :class:`Inbox`, asks :meth:`Inbox.ready` whether the round can close, and
takes the updates to aggregate with :meth:`Inbox.take`. No clock, no network: the
deadline is the node's, the decisions are here and tested without either.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from p2pfl.core.envelope import Observation
from p2pfl.core.reputation import Evidence


class Decision(enum.Enum):
    """What to do with an announced update."""

    FETCH = "fetch"  # pull the payload and consider it
    IGNORE = "ignore"  # harmless: a resend, or not usable now
    REJECT = "reject"  # misbehaviour: count the evidence, never fetch


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision on one announced update, with the evidence it carries."""

    decision: Decision
    evidence: Evidence | None = None
    reason: str = ""


def admit(
    observation: Observation,
    update_round: int,
    current_round: int,
    *,
    max_lag: int,
    max_lead: int,
) -> Admission:
    """Decide what to do with an update of ``update_round`` seen during ``current_round``."""
    if observation is Observation.EQUIVOCATION:
        return Admission(Decision.REJECT, Evidence.EQUIVOCATION, "two digests for one round")
    if observation is Observation.REPLAY:
        return Admission(Decision.REJECT, Evidence.REPLAY, "old update re-sent as new")
    if observation is Observation.STALE or update_round < current_round - max_lag:
        return Admission(Decision.IGNORE, Evidence.STALE, f"round {update_round} is stale")
    if update_round > current_round + max_lead:
        # A peer far ahead is not misbehaving by itself; the node may catch up instead.
        return Admission(Decision.IGNORE, reason=f"round {update_round} is far ahead")
    # NEW or a harmless resend (DUPLICATE): the node fetches it unless it already holds it.
    return Admission(Decision.FETCH)


@dataclass(frozen=True, slots=True)
class Received:
    """A verified, decoded neighbour update waiting to be aggregated."""

    sender: str
    round: int
    digest: bytes
    samples: int
    state: Mapping[str, torch.Tensor]


class Inbox:
    """Freshest verified update per neighbour, each used in at most one aggregation."""

    def __init__(self, *, max_digests: int = 4096) -> None:
        self._latest: dict[str, Received] = {}
        self._used: dict[str, bytes] = {}  # peer -> digest of its update we last used
        self._authors: OrderedDict[bytes, str] = OrderedDict()
        self._max_digests = max_digests

    def first_author(self, digest: bytes, sender: str) -> str:
        """Return who first announced ``digest``, remembering ``sender`` if nobody did."""
        author = self._authors.setdefault(digest, sender)
        self._authors.move_to_end(digest)
        while len(self._authors) > self._max_digests:
            self._authors.popitem(last=False)
        return author

    def deliver(self, update: Received) -> None:
        """Keep ``update`` if it is the sender's freshest."""
        held = self._latest.get(update.sender)
        if held is None or update.round > held.round:
            self._latest[update.sender] = update

    def wants(self, sender: str, update_round: int) -> bool:
        """Whether an update of this round would be fresher than what we hold."""
        held = self._latest.get(sender)
        return held is None or update_round > held.round

    def ready(self, expected: Collection[str], current_round: int, quorum: float) -> bool:
        """Whether enough expected neighbours delivered an unused update of this round or later."""
        if not expected:
            return True
        fresh = sum(1 for peer in expected if self._fresh(peer, current_round, lag=0))
        return fresh >= math.ceil(quorum * len(expected))

    def take(self, current_round: int, *, max_lag: int, max_lead: int) -> list[Received]:
        """Return the unused updates usable in ``current_round`` and mark them used."""
        chosen = [
            update
            for peer, update in sorted(self._latest.items())
            if self._fresh(peer, current_round, lag=max_lag)
            and update.round <= current_round + max_lead
        ]
        self._used.update((update.sender, update.digest) for update in chosen)
        return chosen

    def latest(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The freshest state held from each peer."""
        return {peer: update.state for peer, update in self._latest.items()}

    def forget(self, peer: str) -> None:
        """Drop what we hold from ``peer`` (banned)."""
        self._latest.pop(peer, None)

    def _fresh(self, peer: str, current_round: int, *, lag: int) -> bool:
        update = self._latest.get(peer)
        return (
            update is not None
            and update.round >= current_round - lag
            and self._used.get(peer) != update.digest
        )
